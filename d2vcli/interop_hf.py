"""Hugging Face Data2VecAudio folders in and out (`d2v import hf`, `d2v export hf`).

The format is transformers 5.23 `modeling_data2vec_audio.py` (docs/checkpoints.md). HF has no
EMA teacher, no regression head and no data2vec 2.0 (its attention has no ALiBi), so a 2.0 model
is refused on export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save

from d2vcli import checkpoint as ck
from d2vcli import config as cfgmod
from d2vcli.fileio import atomic_open, atomic_write_text, claim_output_dir
from d2vcli.interop_keys import (InteropError, ImportResult, Kind, KeyMap, check_state_dict, make_checkpoint, rename,
                                 teacher_from, vocab_for, write_import)
from d2vcli.models.loading import expected_state
from d2vcli.vocab import SPECIALS, Vocab
from d2vcli.workspace import Workspace

# d2v `Data2VecAudio` key (relative to `backbone.`)  <->  HF `Data2VecAudioModel` key.
HF_BACKBONE_KEYS: list[tuple[str, str]] = [
    ("mask_emb", "masked_spec_embed"),
    ("feature_extractor.blocks.{i}.conv.weight", "feature_extractor.conv_layers.{i}.conv.weight"),
    ("feature_extractor.blocks.{i}.norm.{w}", "feature_extractor.conv_layers.{i}.layer_norm.{w}"),
    ("feature_norm.{w}", "feature_projection.layer_norm.{w}"),
    ("feature_proj.{w}", "feature_projection.projection.{w}"),
    ("transformer.pos_conv.blocks.{i}.conv.{w}", "encoder.pos_conv_embed.layers.{i}.conv.{w}"),
    ("transformer.norm.{w}", "encoder.layer_norm.{w}"),
    ("transformer.layers.{i}.self_attn.{p}.{w}", "encoder.layers.{i}.attention.{p}.{w}"),
    ("transformer.layers.{i}.self_attn_norm.{w}", "encoder.layers.{i}.layer_norm.{w}"),
    ("transformer.layers.{i}.fc1.{w}", "encoder.layers.{i}.feed_forward.intermediate_dense.{w}"),
    ("transformer.layers.{i}.fc2.{w}", "encoder.layers.{i}.feed_forward.output_dense.{w}"),
    ("transformer.layers.{i}.final_norm.{w}", "encoder.layers.{i}.final_layer_norm.{w}"),
]
HF_CTC_PREFIX = "data2vec_audio."  # Data2VecAudioForCTC wraps the backbone under this name
HF_CTC_HEAD = ("proj.{w}", "lm_head.{w}")  # no row permutation: index 0 is the blank in both

HF_MODEL_MAP = KeyMap((HF_BACKBONE_KEYS, "backbone.", ""))
HF_CTC_MAP = KeyMap((HF_BACKBONE_KEYS, "backbone.", HF_CTC_PREFIX), ([HF_CTC_HEAD], "", ""))


def model_config_from_hf(hf: dict, source: Path) -> cfgmod.ModelConfig:
    """config.json of a data2vec-audio model -> ModelConfig (docs/checkpoints.md, Hugging Face config fields).

    Naming trap: in data2vec-audio `num_conv_pos_embeddings` is the positional conv LAYER
    count and `conv_pos_kernel_size` its kernel (in wav2vec2 the former is the kernel).
    `do_stable_layer_norm` / `feat_extract_norm` are wav2vec2 leftovers some Hub configs
    carry; HF's data2vec-audio ignores them and so do we.
    """
    if hf.get("model_type") != "data2vec-audio":
        raise InteropError(f"{source}/config.json: model_type is {hf.get('model_type')!r}; d2v imports "
                           f"'data2vec-audio' models (Data2VecAudioModel / Data2VecAudioForCTC)")
    g = lambda k, d: hf.get(k, d) if hf.get(k) is not None else d  # noqa: E731 - HF defaults for absent keys
    problems = []
    if g("hidden_act", "gelu") != "gelu" or g("feat_extract_activation", "gelu") != "gelu":
        problems.append("only the exact GELU activation ('gelu') is implemented")
    if g("conv_bias", False):
        problems.append("conv_bias is true (data2vec's conv encoder has no bias)")
    if g("add_adapter", False):
        problems.append("add_adapter is true (no data2vec checkpoint uses the adapter)")
    dims, kernels, strides = g("conv_dim", [512] * 7), g("conv_kernel", [10, 3, 3, 3, 3, 2, 2]), \
        g("conv_stride", [5, 2, 2, 2, 2, 2, 2])
    if not len(dims) == len(kernels) == len(strides):
        problems.append("conv_dim, conv_kernel and conv_stride have different lengths")
    if problems:
        raise InteropError(f"{source}/config.json: " + "; ".join(problems))
    return cfgmod.ModelConfig(
        conv_layers=tuple((int(c), int(k), int(s)) for c, k, s in zip(dims, kernels, strides)),
        embed_dim=int(g("hidden_size", 768)), num_layers=int(g("num_hidden_layers", 12)),
        num_heads=int(g("num_attention_heads", 12)), ffn_dim=int(g("intermediate_size", 3072)),
        dropout=float(g("hidden_dropout", 0.1)), attention_dropout=float(g("attention_dropout", 0.1)),
        activation_dropout=float(g("activation_dropout", 0.1)), dropout_input=float(g("feat_proj_dropout", 0.0)),
        layerdrop=float(g("layerdrop", 0.1)), pos_conv_depth=int(g("num_conv_pos_embeddings", 5)),
        pos_conv_kernel=int(g("conv_pos_kernel_size", 19)), pos_conv_groups=int(g("num_conv_pos_embedding_groups", 16)),
        feature_grad_mult=1.0, layer_norm_eps=float(g("layer_norm_eps", 1e-5)),
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path} is not valid JSON ({e})") from None


def read_hf_weights(folder: Path, trust: bool = False) -> dict:
    """model.safetensors (or a sharded index of them), else pytorch_model.bin, of a save_pretrained folder."""
    folder = Path(folder)
    single, index, legacy = folder / "model.safetensors", folder / "model.safetensors.index.json", \
        folder / "pytorch_model.bin"
    try:
        if single.exists():
            return load_file(str(single))
        if index.exists():
            state = {}
            for shard in sorted(set(_read_json(index)["weight_map"].values())):
                state.update(load_file(str(folder / shard)))
            return state
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad files
        raise InteropError(f"{folder}: cannot read the safetensors weights ({e}); re-download the folder") from None
    if legacy.exists():
        return ck.load_raw(legacy, trust=trust)
    raise InteropError(f"{folder}: no model.safetensors or pytorch_model.bin (a `save_pretrained` folder is needed)")


def vocab_from_hf(folder: Path, num_outputs: int, dict_path: Optional[Path]) -> tuple[Vocab, list[str]]:
    """vocab.json -> our letter Vocab. HF's converters call ids 0/1 `<pad>`/`<s>` (fairseq: `<s>`/`<pad>`)
    but keep the rows in place, so id 0 is the blank in both; ids 0-3 are specials in any order."""
    vocab_file = Path(folder) / "vocab.json"
    if dict_path or not vocab_file.exists():
        return vocab_for(num_outputs, dict_path, Path(folder))
    table = _read_json(vocab_file)
    if not all(isinstance(v, int) for v in table.values()):
        raise InteropError(f"{vocab_file}: a nested (multi-language) vocabulary is not supported; pass --dict")
    by_id = {i: tok for tok, i in table.items()}
    if sorted(by_id) != list(range(len(by_id))) or len(by_id) != num_outputs:
        raise InteropError(f"{vocab_file}: expected ids 0..{num_outputs - 1} for the {num_outputs} CTC outputs, "
                           f"got {len(by_id)} entries")
    if {by_id.get(i) for i in range(len(SPECIALS))} != set(SPECIALS):
        raise InteropError(f"{vocab_file}: ids 0-3 must be the special tokens {', '.join(SPECIALS)} "
                           f"(fairseq letter layout); pass the fine-tuning dict.ltr.txt with --dict")
    return Vocab(tuple(by_id[i] for i in range(len(SPECIALS), len(by_id)))), []


def convert_hf(folder: Path, dict_path: Optional[Path] = None, trust: bool = False) -> tuple[dict, list[str]]:
    """A save_pretrained folder of Data2VecAudioModel / Data2VecAudioForCTC -> (d2v checkpoint dict, notes)."""
    folder = Path(folder)
    if not folder.exists():
        raise InteropError(f"{folder} does not exist: check the path (a `save_pretrained` folder is needed)")
    if not folder.is_dir():
        hint = ("; for a fairseq .pt file use `d2v import fairseq`" if ck.container_problem(folder) is None else "")
        raise InteropError(f"{folder} is a file, not a folder: `d2v import hf` takes a `save_pretrained` "
                           f"folder{hint}")
    if not (folder / "config.json").exists():
        raise InteropError(f"{folder}: no config.json (a `save_pretrained` folder is needed)")
    hf_cfg = _read_json(folder / "config.json")
    arch = model_config_from_hf(hf_cfg, folder)
    weights = read_hf_weights(folder, trust=trust)
    notes: list[str] = []
    # A ForCTC folder has `lm_head.*`; a Model folder has no head and no `data2vec_audio.` prefix.
    is_ctc = any(k.startswith("lm_head.") for k in weights)
    kind: Kind = "ctc" if is_ctc else "pretrain"
    model_state, unmatched = rename(weights, (HF_CTC_MAP if is_ctc else HF_MODEL_MAP).to_d2v)
    expected_backbone = expected_state("pretrain", cfgmod.to_dict(arch), 0)
    if "backbone.mask_emb" not in model_state:
        # HF saves masked_spec_embed only when mask_time_prob or mask_feature_prob > 0.
        model_state["backbone.mask_emb"] = torch.empty(arch.embed_dim).uniform_()
        notes.append("no masked_spec_embed in the file: mask embedding freshly initialized (uniform [0, 1))")
    vocab = None
    if is_ctc:
        vocab, vocab_notes = vocab_from_hf(folder, model_state["proj.weight"].shape[0], dict_path)
        notes += vocab_notes
    else:
        # HF keeps neither the regression head nor the EMA teacher (docs/checkpoints.md).
        fresh = torch.nn.Linear(arch.embed_dim, arch.embed_dim)
        model_state["final_proj.weight"] = fresh.weight.detach().clone()
        model_state["final_proj.bias"] = fresh.bias.detach().clone()
        notes.append("HF models have no final_proj or EMA teacher: final_proj is freshly initialized and the "
                     "teacher starts as a copy of the student (continued pretraining is not exact)")
    expected = expected_backbone if kind == "pretrain" else expected_state(kind, cfgmod.to_dict(arch), len(vocab))
    check_state_dict(model_state, expected, str(folder), unknown=tuple(unmatched))
    normalize = True
    pre = folder / "preprocessor_config.json"
    if pre.exists():
        normalize = bool(_read_json(pre).get("do_normalize", True))
    else:
        notes.append("no preprocessor_config.json: assuming normalize=true (data2vec's setting)")
    teacher = teacher_from(model_state, None) if kind == "pretrain" else None
    src = {"format": "hf", "path": str(folder.resolve()), "architectures": hf_cfg.get("architectures")}
    return make_checkpoint(kind, arch, normalize, model_state, src, vocab, teacher,
                            float(hf_cfg.get("final_dropout", 0.0) or 0.0)), notes


def import_hf(folder: Path, out: Optional[Path] = None, dict_path: Optional[Path] = None, trust: bool = False,
              workspace: Optional[Workspace] = None, force: bool = False) -> ImportResult:
    """`d2v import hf`: convert a Hugging Face Data2VecAudio folder and write it as a d2v checkpoint."""
    folder = Path(folder)
    state, notes = convert_hf(folder, dict_path=dict_path, trust=trust)
    return write_import(state, out, workspace, folder, notes, force)


def hf_config(state: dict) -> dict:
    """config.json for a d2v checkpoint: every field transformers' Data2VecAudioConfig uses."""
    arch = ck.arch_of(state)
    cfg = cfgmod.from_dict(state.get(ck.CONFIG_KEY) or {})
    is_ctc = state[ck.KIND_KEY] == "ctc"
    # masked_spec_embed only exists in HF when a mask probability is > 0, and we always carry mask_emb.
    mask_prob = cfg.masking.mask_prob if cfg.masking.mask_prob > 0 else 0.05
    return {
        "architectures": ["Data2VecAudioForCTC" if is_ctc else "Data2VecAudioModel"],
        "model_type": "data2vec-audio",
        "dtype": "float32",
        "hidden_size": arch.embed_dim,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "intermediate_size": arch.ffn_dim,
        "hidden_act": "gelu",
        "feat_extract_activation": "gelu",
        "hidden_dropout": arch.dropout,
        "attention_dropout": arch.attention_dropout,
        "activation_dropout": arch.activation_dropout,
        "feat_proj_dropout": arch.dropout_input,
        "final_dropout": cfg.finetune.final_dropout,
        "layerdrop": arch.layerdrop,
        "layer_norm_eps": arch.layer_norm_eps,
        "conv_dim": [c for c, _, _ in arch.conv_layers],
        "conv_kernel": [k for _, k, _ in arch.conv_layers],
        "conv_stride": [s for _, _, s in arch.conv_layers],
        "num_feat_extract_layers": len(arch.conv_layers),
        "conv_bias": False,
        "num_conv_pos_embeddings": arch.pos_conv_depth,  # data2vec-audio: the LAYER count
        "conv_pos_kernel_size": arch.pos_conv_kernel,
        "num_conv_pos_embedding_groups": arch.pos_conv_groups,
        "mask_time_prob": mask_prob,
        "mask_time_length": cfg.masking.mask_length,
        "mask_feature_prob": cfg.masking.mask_channel_prob,
        "mask_feature_length": cfg.masking.mask_channel_length,
        "vocab_size": len(SPECIALS) + len(state.get(ck.VOCAB_KEY, [])) if is_ctc else 32,
        "pad_token_id": 0,  # HF's CTC blank is pad_token_id: our blank, index 0
        "bos_token_id": 1,
        "eos_token_id": 2,
        "ctc_loss_reduction": "sum",
        "ctc_zero_infinity": True,  # fairseq's fine-tuning setting
        "add_adapter": False,
        "use_weighted_layer_sum": False,
    }


def hf_state_dict(state: dict) -> dict:
    """d2v checkpoint -> HF state dict (ForCTC keys for ctc, headless Model keys for pretrain)."""
    kind = state[ck.KIND_KEY]
    key_map = HF_CTC_MAP if kind == "ctc" else HF_MODEL_MAP
    out, unmatched = {}, []
    for key, value in state[ck.MODEL_KEY].items():
        if kind == "pretrain" and key.startswith("final_proj."):
            continue  # HF has no regression head
        new = key_map.from_d2v(key)
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value.detach().to("cpu").contiguous()
    if unmatched:
        raise InteropError("no Hugging Face name for: " + ", ".join(sorted(unmatched)))
    return out


# Every file export_hf may write: what --force removes from an earlier export (of either kind).
HF_EXPORT_FILES = ("model.safetensors", "config.json", "preprocessor_config.json", "vocab.json",
                   "special_tokens_map.json", "tokenizer_config.json")


def export_hf(checkpoint: Path, out_dir: Path, trust: bool = False, force: bool = False) -> list[Path]:
    """`d2v export hf`: write a save_pretrained folder transformers loads with no missing or unexpected keys.

    ctc -> Data2VecAudioForCTC + vocab.json, tokenizer and feature-extractor configs;
    pretrain -> headless Data2VecAudioModel (the student; final_proj and the teacher stay behind).
    A non-empty `out_dir` is refused unless `force`, which first removes HF_EXPORT_FILES.
    """
    state = ck.load_checkpoint(Path(checkpoint), trust=trust)
    arch = ck.arch_of(state, checkpoint)
    if arch.version == 2:
        raise InteropError(
            f"{checkpoint} is a data2vec 2.0 model: Hugging Face's Data2VecAudio has no ALiBi attention bias, "
            f"so an exported folder would load without error and compute something "
            f"else. Use the d2v checkpoint itself (`d2v transcribe`, `d2vcli.load`), or export a data2vec 1.0 model.")
    vocab = ck.vocab_of(state, checkpoint) if state[ck.KIND_KEY] == "ctc" else None
    vocab_size = len(vocab) if vocab else 0
    check_state_dict(state[ck.MODEL_KEY], expected_state(state[ck.KIND_KEY], cfgmod.to_dict(arch), vocab_size),
                     str(checkpoint))
    weights = hf_state_dict(state)
    out_dir = Path(out_dir)
    claim_output_dir(out_dir, HF_EXPORT_FILES, force, "d2v export hf")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def write_json(name: str, obj: dict) -> None:
        atomic_write_text(out_dir / name, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        written.append(out_dir / name)

    with atomic_open(out_dir / "model.safetensors", "wb") as fh:
        # transformers 4.x rejects safetensors files without {"format": "pt"} metadata.
        fh.write(save(weights, metadata={"format": "pt"}))
    written.append(out_dir / "model.safetensors")
    write_json("config.json", hf_config(state))
    write_json("preprocessor_config.json", {
        "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
        "padding_value": 0.0, "padding_side": "right", "do_normalize": bool(state[ck.NORMALIZE_KEY]),
        "return_attention_mask": True, **({"processor_class": "Wav2Vec2Processor"}
                                          if state[ck.KIND_KEY] == "ctc" else {}),
    })
    if state[ck.KIND_KEY] == "ctc":
        # HF letter vocabularies name id 0 `<pad>` (its CTC blank = pad_token_id) and id 1 `<s>`.
        tokens = ["<pad>", "<s>", "</s>", "<unk>"] + list(vocab.symbols)
        write_json("vocab.json", {tok: i for i, tok in enumerate(tokens)})
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
        write_json("special_tokens_map.json", specials)
        write_json("tokenizer_config.json", {
            "tokenizer_class": "Wav2Vec2CTCTokenizer", **specials, "word_delimiter_token": "|",
            "replace_word_delimiter_char": " ", "do_lower_case": False, "processor_class": "Wav2Vec2Processor",
        })
    return written
