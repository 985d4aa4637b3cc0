"""Foreign checkpoints in and out: fairseq data2vec `.pt` files and Hugging Face Data2VecAudio folders.

    d2v import fairseq audio_base_ls_960h.pt --dict dict.ltr.txt   # -> <workdir>/runs/imported-audio_base_ls_960h/last.pt
    d2v import hf ./data2vec-audio-base-960h                        # a save_pretrained folder
    d2v export hf RUN_OR_CHECKPOINT ./out                           # loads with transformers' from_pretrained

Imports write ordinary d2v checkpoints (kind "pretrain" or "ctc", with arch, config,
normalize and vocab), so they work wherever a d2v checkpoint does: `d2v finetune` from
a pretrained import, decode/evaluate/transcribe from a CTC import.

This module holds the entry points and fairseq data2vec 1.0 (`data2vec_audio`, and `wav2vec_ctc`
fine-tuned from it); `interop_fairseq2.py` holds data2vec 2.0 (`data2vec_multi`), `interop_hf.py`
Hugging Face, and `interop_keys.py` the machinery they share. Each foreign format has one key-map
table (d2v name <-> foreign name, with `{i}` for a layer index and `{w}` for weight/bias); both
directions are derived from it. The formats are described in docs/checkpoints.md (fairseq
`data2vec_audio.py` / `data2vec2.py` / `wav2vec2_asr.py` at 3d262bb; transformers 5.23
`modeling_data2vec_audio.py`).

Conversions are all-or-nothing: every missing key, unexpected key and shape mismatch is
collected and reported together, and nothing is written unless the whole state dict
fits the model. Files are read with `checkpoint.load_raw` (weights_only; a pickle that
needs code is refused without --trust-checkpoint). fairseq's `conv_feature_layers`
is a Python expression string; it is parsed by a small AST walker, never eval'd.
A data2vec 2.0 model cannot be exported to Hugging Face (its Data2VecAudio has no ALiBi).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from d2vcli import checkpoint as ck
from d2vcli import config as cfgmod
from d2vcli import interop_fairseq_text, interop_vision
from d2vcli.interop_fairseq2 import convert_fairseq2, is_fairseq2
from d2vcli.interop_hf import (HF_CTC_MAP, HF_MODEL_MAP, convert_hf, export_hf, hf_config, hf_state_dict,
                               import_hf, model_config_from_hf)
from d2vcli.interop_keys import (ImportResult, InteropError, Kind, KeyMap, already_d2v, check_state_dict,
                                 default_import_path, fairseq_cfg, make_checkpoint, parse_conv_layers, rename,
                                 section, teacher_from, vocab_for, write_import)
from d2vcli.models.loading import expected_state
from d2vcli.workspace import Workspace

# The public names of every format, importable from here (the CLI, the tests and the benchmarks do).
__all__ = ["InteropError", "ImportResult", "KeyMap", "rename", "check_state_dict", "default_import_path",
           "parse_conv_layers", "convert_fairseq", "import_fairseq", "model_config_from_fairseq",
           "HF_CTC_MAP", "HF_MODEL_MAP", "convert_hf", "import_hf", "export_hf", "hf_config", "hf_state_dict",
           "model_config_from_hf"]

# --------------------------------------------------------------------------- fairseq data2vec 1.0

# d2v `Data2VecAudio` key (relative to `backbone.`)  <->  fairseq `Data2VecAudioModel` key.
FAIRSEQ_BACKBONE_KEYS: list[tuple[str, str]] = [
    ("mask_emb", "mask_emb"),
    ("feature_extractor.blocks.{i}.conv.weight", "feature_extractor.conv_layers.{i}.0.weight"),
    # fairseq's block is Sequential(conv, dropout, Sequential(transpose, Fp32LayerNorm, transpose), GELU)
    ("feature_extractor.blocks.{i}.norm.{w}", "feature_extractor.conv_layers.{i}.2.1.{w}"),
    ("feature_norm.{w}", "layer_norm.{w}"),
    ("feature_proj.{w}", "post_extract_proj.{w}"),
    ("transformer.pos_conv.blocks.{i}.conv.{w}", "encoder.pos_conv.{i}.0.{w}"),
    ("transformer.norm.{w}", "encoder.layer_norm.{w}"),
    ("transformer.layers.{i}.self_attn.{p}.{w}", "encoder.layers.{i}.self_attn.{p}.{w}"),
    ("transformer.layers.{i}.self_attn_norm.{w}", "encoder.layers.{i}.self_attn_layer_norm.{w}"),
    ("transformer.layers.{i}.fc1.{w}", "encoder.layers.{i}.fc1.{w}"),
    ("transformer.layers.{i}.fc2.{w}", "encoder.layers.{i}.fc2.{w}"),
    ("transformer.layers.{i}.final_norm.{w}", "encoder.layers.{i}.final_layer_norm.{w}"),
]
FAIRSEQ_CTC_PREFIX = "w2v_encoder.w2v_model."  # wav2vec_ctc wraps the pretrained model under this name
FAIRSEQ_CTC_HEAD = ("proj.{w}", "w2v_encoder.proj.{w}")
# Current fairseq names the regression head `final_proj.weight`; the released v1 files were
# written when it was a Sequential, `final_proj.0.weight`. Both are accepted.
FAIRSEQ_PRETRAIN_HEADS = [("final_proj.{w}", "final_proj.{w}"), ("final_proj.{w}", "final_proj.0.{w}")]
FAIRSEQ_EMA_KEY = "_ema"  # the EMA teacher, keys relative to fairseq's `encoder.`

FAIRSEQ_PRETRAIN_MAP = KeyMap((FAIRSEQ_BACKBONE_KEYS, "backbone.", ""), (FAIRSEQ_PRETRAIN_HEADS, "", ""))
FAIRSEQ_CTC_MAP = KeyMap((FAIRSEQ_BACKBONE_KEYS, "backbone.", FAIRSEQ_CTC_PREFIX), ([FAIRSEQ_CTC_HEAD], "", ""))
# The EMA dict holds transformer keys relative to fairseq's `encoder.`, ours are relative to `transformer.`.
FAIRSEQ_EMA_MAP = KeyMap(([(d[len("transformer."):], f[len("encoder."):])
                           for d, f in FAIRSEQ_BACKBONE_KEYS if d.startswith("transformer.")], "", ""))


# Wav2Vec2Config / Data2VecAudioConfig defaults, for fields a saved cfg might omit.
_FAIRSEQ_DEFAULTS = {
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "encoder_embed_dim": 768, "encoder_layers": 12, "encoder_attention_heads": 12, "encoder_ffn_embed_dim": 3072,
    "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "dropout_input": 0.0,
    "encoder_layerdrop": 0.0, "conv_pos": 128, "pos_conv_depth": 1, "conv_pos_groups": 16,
    "feature_grad_mult": 1.0, "extractor_mode": "default", "layer_norm_first": False, "conv_bias": False,
    "activation_fn": "gelu",
}
# Fine-tuning regularization that fairseq's arg_overrides push into the pretrained model's cfg.
_FAIRSEQ_FT_OVERRIDES = {"dropout": "dropout", "attention_dropout": "attention_dropout",
                         "activation_dropout": "activation_dropout", "dropout_input": "dropout_input",
                         "layerdrop": "encoder_layerdrop", "feature_grad_mult": "feature_grad_mult"}


def model_config_from_fairseq(model: dict, source: Path) -> cfgmod.ModelConfig:
    """fairseq `data2vec_audio` model cfg -> ModelConfig (docs/checkpoints.md, fairseq section)."""
    m = {**_FAIRSEQ_DEFAULTS, **{k: v for k, v in dict(model).items() if v is not None}}
    problems = []
    if m["extractor_mode"] != "layer_norm":
        problems.append(f"extractor_mode is {m['extractor_mode']!r} (data2vec uses 'layer_norm')")
    if m["layer_norm_first"]:
        problems.append("layer_norm_first is true (a pre-LN model; data2vec 1.0 is post-LN)")
    if m["conv_bias"]:
        problems.append("conv_bias is true (data2vec's conv encoder has no bias)")
    if m["activation_fn"] != "gelu":
        problems.append(f"activation_fn is {m['activation_fn']!r} (only 'gelu' is implemented)")
    if int(m["pos_conv_depth"]) < 2:
        problems.append("pos_conv_depth is 1: that is wav2vec 2.0's weight-normalized positional conv")
    if problems:
        raise InteropError(f"{source}: not a data2vec 1.0 audio architecture d2v can run: " + "; ".join(problems))
    depth = int(m["pos_conv_depth"])
    return cfgmod.ModelConfig(
        conv_layers=parse_conv_layers(str(m["conv_feature_layers"])),
        embed_dim=int(m["encoder_embed_dim"]), num_layers=int(m["encoder_layers"]),
        num_heads=int(m["encoder_attention_heads"]), ffn_dim=int(m["encoder_ffn_embed_dim"]),
        dropout=float(m["dropout"]), attention_dropout=float(m["attention_dropout"]),
        activation_dropout=float(m["activation_dropout"]), dropout_input=float(m["dropout_input"]),
        layerdrop=float(m["encoder_layerdrop"]), pos_conv_depth=depth,
        pos_conv_kernel=max(3, int(m["conv_pos"]) // depth),  # fairseq's per-layer kernel rule
        pos_conv_groups=int(m["conv_pos_groups"]), feature_grad_mult=float(m["feature_grad_mult"]),
        layer_norm_eps=1e-5,  # fairseq's LayerNorm default; it has no config field for it
    )


def convert_fairseq(raw: Any, source: Path, dict_path: Optional[Path] = None, use_ema: bool = False) -> tuple[dict, list[str]]:
    """A loaded fairseq checkpoint -> (d2v checkpoint dict, notes). Raises InteropError on any mismatch."""
    if isinstance(raw, dict) and ck.FORMAT_VERSION_KEY in raw and raw.get(ck.KIND_KEY) in ck.KINDS:
        raise InteropError(already_d2v(source, raw[ck.KIND_KEY]))
    if not isinstance(raw, dict) or "model" not in raw:
        raise InteropError(f"{source} is not a fairseq checkpoint (no 'model' state dict)")
    cfg = fairseq_cfg(raw, source)
    model_cfg = section(cfg, "model")
    name = model_cfg.get("_name")
    notes: list[str] = []
    state = dict(raw["model"])
    if is_fairseq2(model_cfg):
        return convert_fairseq2(cfg, state, source, dict_path=dict_path, use_ema=use_ema)
    if name == "data2vec_audio":
        kind: Kind = "pretrain"
        arch = model_config_from_fairseq(model_cfg, source)
        normalize = bool(section(cfg, "task").get("normalize", False))
        ema = state.pop(FAIRSEQ_EMA_KEY, None)
        model_state, unmatched = rename(state, FAIRSEQ_PRETRAIN_MAP.to_d2v)
        teacher = None
        if isinstance(ema, dict):
            teacher, ema_unmatched = rename(ema, FAIRSEQ_EMA_MAP.to_d2v)
            if ema_unmatched:
                raise InteropError(f"{source}: unexpected keys in the EMA teacher ({FAIRSEQ_EMA_KEY}): "
                                   + ", ".join(sorted(ema_unmatched)))
            if use_ema:
                for k, v in teacher.items():
                    model_state["backbone.transformer." + k] = v.clone()
                notes.append("student transformer initialized from the EMA teacher (--use-ema)")
            notes.append(f"EMA teacher imported ({len(teacher)} tensors)")
        else:
            if use_ema:
                raise InteropError(f"{source} has no EMA teacher ({FAIRSEQ_EMA_KEY}); drop --use-ema")
            notes.append("no EMA teacher in the file: the teacher starts as a copy of the student")
        vocab, final_dropout = None, 0.0
    elif name == "wav2vec_ctc":
        kind = "ctc"
        w2v_args = model_cfg.get("w2v_args")
        if not w2v_args:
            raise InteropError(f"{source}: fine-tuned checkpoint without cfg.model.w2v_args (the pretrained "
                               f"architecture); it cannot be rebuilt")
        w2v = {k: (dict(v) if hasattr(v, "items") else v) for k, v in dict(w2v_args).items()}
        inner = section(w2v, "model")
        if inner.get("_name") != "data2vec_audio":
            raise InteropError(f"{source}: fine-tuned from a {inner.get('_name')!r} model; d2v imports data2vec 1.0 "
                               f"audio (data2vec_audio) only")
        merged = dict(inner)
        for ft_key, pt_key in _FAIRSEQ_FT_OVERRIDES.items():
            if model_cfg.get(ft_key) is not None:
                merged[pt_key] = model_cfg[ft_key]
        arch = model_config_from_fairseq(merged, source)
        task = section(cfg, "task") or section(w2v, "task")
        normalize = bool(task.get("normalize", section(w2v, "task").get("normalize", False)))
        if use_ema:
            raise InteropError(f"{source} is a fine-tuned model: it has no EMA teacher; drop --use-ema")
        model_state, unmatched = rename(state, FAIRSEQ_CTC_MAP.to_d2v)
        head = model_state.get("proj.weight")
        if head is None:
            raise InteropError(f"{source}: no CTC head (w2v_encoder.proj.weight) in the state dict")
        vocab, vocab_notes = vocab_for(head.shape[0], dict_path, source)
        notes += vocab_notes
        teacher, final_dropout = None, float(model_cfg.get("final_dropout") or 0.0)
    else:
        raise InteropError(f"{source}: model type {name!r} is not data2vec_audio / data2vec_multi (pretrained) or "
                           f"wav2vec_ctc (fine-tuned)")
    vocab_size = len(vocab) if vocab else 0
    expected = expected_state(kind, cfgmod.to_dict(arch), vocab_size)
    check_state_dict(model_state, expected, str(source), unknown=tuple(unmatched))
    if kind == "pretrain":
        teacher = teacher_from(model_state, teacher)
        expected_teacher = {k[len("backbone.transformer."):]: v for k, v in expected.items()
                            if k.startswith("backbone.transformer.")}
        check_state_dict(teacher, expected_teacher, str(source), what="EMA teacher")
    if not normalize:
        notes.append("normalize is false in the file's task config (data2vec was pretrained with normalize=true)")
    src = {"format": "fairseq", "path": str(Path(source).resolve()), "fairseq_model": name, "use_ema": use_ema}
    return make_checkpoint(kind, arch, normalize, model_state, src, vocab, teacher, final_dropout), notes


def import_fairseq(path: Path, out: Optional[Path] = None, dict_path: Optional[Path] = None, use_ema: bool = False,
                   trust: bool = False, workspace: Optional[Workspace] = None, force: bool = False) -> ImportResult:
    """`d2v import fairseq`: convert a fairseq data2vec checkpoint and write it as a d2v checkpoint
    (a data2vec vision file from the BEiT repo goes to `interop_vision.import_beit`, a text one to
    `interop_fairseq_text.import_fairseq_text`)."""
    path = Path(path)
    raw = ck.load_raw(path, trust=trust)
    if interop_fairseq_text.is_fairseq_text(raw):  # data2vec 1.0 / 2.0 text (nlp_base.pt)
        return interop_fairseq_text.import_fairseq_text(raw, path, out=out, workspace=workspace, force=force,
                                                        use_ema=use_ema, dict_path=dict_path)
    if interop_vision.is_beit_checkpoint(raw):  # data2vec 1.0 vision, released from the BEiT repo
        return interop_vision.import_beit(raw, path, out=out, workspace=workspace, force=force, use_ema=use_ema,
                                          dict_path=dict_path)
    state, notes = convert_fairseq(raw, path, dict_path=dict_path, use_ema=use_ema)
    return write_import(state, out, workspace, path, notes, force)


