"""Text checkpoints in and out: Hugging Face `Data2VecText*` folders and fairseq's data2vec text files.

    d2v import hf ./data2vec-text-base            # -> runs/imported-data2vec-text-base/last.pt (text-pretrain)
    d2v import hf ./my-sst2-model                 # Data2VecTextForSequenceClassification -> text-cls
    d2v export hf RUN_OR_CHECKPOINT ./out         # Data2VecTextModel / Data2VecTextForSequenceClassification
    d2v import fairseq nlp_base.pt --trust-checkpoint   # data2vec 1.0 / 2.0 text: interop_fairseq_text.py

Our encoder (`d2vcli/models/text.py`) uses fairseq-like names, so each foreign format is one table of
(d2v name, foreign name) templates (docs/text-interop.md gives them with their sources: transformers
`models/data2vec/modeling_data2vec_text.py`, fairseq `fairseq/models/transformer/transformer_encoder.py`,
`examples/data2vec/models/data2vec_text.py`, `examples/data2vec/models/modalities/text.py`; the fairseq
tables are in `interop_fairseq_text.py`). Three entries are not renames:

* HF's `token_type_embeddings` (RoBERTa uses one type) adds the same vector to every token, so an import folds
  it into the position table (every row) and an export writes one zero row; several different rows are refused.
* HF's `Data2VecTextModel` has a pooler (dense + tanh on `<s>`) that data2vec never trains: dropped on import,
  written freshly initialized (HF's own N(0, initializer_range) init, seeded) on export so that the folder loads
  with no missing key; `last_hidden_state` does not depend on it.
* data2vec 2.0 (fairseq) fuses q, k and v into `attn.qkv` (3D rows): split by rows into ours.

Conversions are all-or-nothing (`interop_keys.check_state_dict`), and outputs are replaced only with --force.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from d2vcli import checkpoint as ck
from d2vcli import interop_tokenizer as toks
from d2vcli.interop_hf import read_hf_weights
from d2vcli.interop_keys import (HF_WEIGHT_FILES, InteropError, KeyMap, ModelImportResult, check_state_dict,
                                 hf_encoder_fields, hf_label_fields, import_hf_folder, rename,
                                 write_hf_folder)
from d2vcli.models.loading import build_text_model, text_arch
from d2vcli.models.text import TextConfig
from d2vcli.workspace import Workspace

HF_MODEL_TYPE = "data2vec-text"
HF_PREFIX = "data2vec_text."  # ForSequenceClassification / ForMaskedLM wrap the backbone under this name
TOKENIZER_KEY = ck.TOKENIZER_KEY

# d2v key (relative to the model's `encoder.`)  <->  HF key (relative to the backbone).
HF_ENCODER_KEYS: list[tuple[str, str]] = [
    ("embed.embed_tokens.weight", "embeddings.word_embeddings.weight"),
    ("embed.embed_positions.weight", "embeddings.position_embeddings.weight"),
    ("embed.layernorm_embedding.{w}", "embeddings.LayerNorm.{w}"),
    ("layers.{i}.self_attn.q_proj.{w}", "encoder.layer.{i}.attention.self.query.{w}"),
    ("layers.{i}.self_attn.k_proj.{w}", "encoder.layer.{i}.attention.self.key.{w}"),
    ("layers.{i}.self_attn.v_proj.{w}", "encoder.layer.{i}.attention.self.value.{w}"),
    ("layers.{i}.self_attn.out_proj.{w}", "encoder.layer.{i}.attention.output.dense.{w}"),
    ("layers.{i}.self_attn_norm.{w}", "encoder.layer.{i}.attention.output.LayerNorm.{w}"),
    ("layers.{i}.fc1.{w}", "encoder.layer.{i}.intermediate.dense.{w}"),
    ("layers.{i}.fc2.{w}", "encoder.layer.{i}.output.dense.{w}"),
    ("layers.{i}.final_norm.{w}", "encoder.layer.{i}.output.LayerNorm.{w}"),
]
HF_CLS_HEAD = [("classifier.dense.{w}", "classifier.dense.{w}"), ("classifier.out_proj.{w}", "classifier.out_proj.{w}")]
HF_TOKEN_TYPES = "embeddings.token_type_embeddings.weight"
HF_POOLER = ("pooler.dense.weight", "pooler.dense.bias")

HF_MODEL_MAP = KeyMap((HF_ENCODER_KEYS, "encoder.", ""))
HF_CLS_MAP = KeyMap((HF_ENCODER_KEYS, "encoder.", HF_PREFIX), (HF_CLS_HEAD, "", ""))

# --------------------------------------------------------------------------- config.json


def arch_from_hf(hf: dict, source: Path, mask_id: Optional[int]) -> tuple[TextConfig, list[str]]:
    """config.json of a data2vec-text model -> (TextConfig, notes); what our encoder cannot run is refused."""
    g = lambda k, d: hf.get(k) if hf.get(k) is not None else d  # noqa: E731 - HF defaults for absent keys
    problems, notes = [], []
    if hf.get("model_type") != HF_MODEL_TYPE:
        problems.append(f"model_type is {hf.get('model_type')!r}, not {HF_MODEL_TYPE!r}")
    if g("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act is {hf.get('hidden_act')!r}; only the exact GELU ('gelu') is implemented")
    if g("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type is {hf.get('position_embedding_type')!r}; data2vec text uses "
                        f"learned absolute positions")
    if g("is_decoder", False) or g("add_cross_attention", False):
        problems.append("is_decoder / add_cross_attention is true (a causal or cross-attending model)")
    pad = int(g("pad_token_id", 1))
    rows = int(g("max_position_embeddings", 512))
    if rows < pad + 3:
        problems.append(f"max_position_embeddings {rows} leaves no positions: they start at pad_token_id + 1 = "
                        f"{pad + 1}")
    vocab = int(g("vocab_size", 30522))
    if problems:
        raise InteropError(f"{source}/config.json: " + "; ".join(problems))
    if mask_id is None:
        mask_id = vocab - 1
        notes.append(f"no <mask> token in the tokenizer files: mask_id is the last id, {mask_id} (RoBERTa's layout)")
    eps = float(g("layer_norm_eps", 1e-12))
    if eps != 1e-5:
        notes.append(f"layer_norm_eps is {eps:g} (fairseq's data2vec uses 1e-5); kept as the file says")
    # Our position table has max_positions + pad_id + 1 rows (positions run pad+1 .. pad+max_positions).
    cfg = TextConfig(
        vocab_size=vocab, max_positions=rows - pad - 1, embed_dim=int(g("hidden_size", 768)),
        num_layers=int(g("num_hidden_layers", 12)), num_heads=int(g("num_attention_heads", 12)),
        ffn_dim=int(g("intermediate_size", 3072)), dropout=float(g("hidden_dropout_prob", 0.1)),
        attention_dropout=float(g("attention_probs_dropout_prob", 0.1)), activation_dropout=0.0,
        layer_norm_eps=eps, pad_id=pad, mask_id=int(mask_id), init_std=float(g("initializer_range", 0.02)),
        pooler_dropout=float(g("classifier_dropout", g("hidden_dropout_prob", 0.1))),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise InteropError(f"{source}/config.json: {e}") from None
    return cfg, notes


def hf_config(kind: str, arch: TextConfig, classes: Optional[list[str]] = None, bos_id: int = 0,
              eos_id: int = 2) -> dict:
    """config.json for a d2v text checkpoint: the fields transformers' Data2VecTextConfig reads."""
    cfg = {
        "architectures": ["Data2VecTextForSequenceClassification" if kind == "text-cls" else "Data2VecTextModel"],
        "model_type": HF_MODEL_TYPE,
        "dtype": "float32",
        "vocab_size": arch.vocab_size,
        **hf_encoder_fields(arch),  # layer_norm_eps: fairseq's 1e-5 (HF's default 1e-12 would change every output)
        "max_position_embeddings": arch.position_rows,  # 514 for 512 tokens: positions start after <pad>
        "type_vocab_size": 1,
        "pad_token_id": arch.pad_id,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "position_embedding_type": "absolute",
        "classifier_dropout": arch.pooler_dropout,
        "use_cache": False,
    }
    if kind == "text-cls":
        cfg |= hf_label_fields(classes)
        cfg["problem_type"] = "regression" if cfg["num_labels"] == 1 else "single_label_classification"
    return cfg


# --------------------------------------------------------------------------- HF -> d2v


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InteropError(f"{path} not found: a save_pretrained folder has a config.json")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path} cannot be read as JSON ({e})") from None
    if not isinstance(value, dict):
        raise InteropError(f"{path} is not a JSON object")
    return value


def is_text_folder(folder: Path) -> bool:
    """Whether `folder` is a save_pretrained folder of a data2vec-text model (`model_type` in config.json)."""
    try:
        return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type") == HF_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def _fold_token_types(weights: dict, source: Path, notes: list[str]) -> None:
    """Add HF's (single) token-type row to every position row; refuse distinct rows (pair segment ids)."""
    types = weights.pop(HF_TOKEN_TYPES, None)
    if types is None:
        return
    if types.dim() != 2 or types.shape[0] < 1:
        raise InteropError(f"{source}: {HF_TOKEN_TYPES} has shape {tuple(types.shape)}")
    if types.shape[0] > 1 and not torch.equal(types, types[:1].expand_as(types)):
        raise InteropError(f"{source}: the model has {types.shape[0]} different token-type embeddings; d2v's text "
                           f"encoder has none (data2vec/RoBERTa use a single type). Only a model with one token "
                           f"type (type_vocab_size 1) or identical rows can be imported")
    pos = "embeddings.position_embeddings.weight"
    if pos in weights and types.shape[-1] == weights[pos].shape[-1]:
        weights[pos] = weights[pos].float() + types[0].float()
        if types.abs().max() > 0:
            notes.append("the token-type embedding (one row) was added to every position embedding row: the sum "
                         "the model computes is unchanged")


def convert_hf(folder: Path, trust: bool = False) -> tuple[dict, list[str]]:
    """A save_pretrained folder of Data2VecTextModel / ForSequenceClassification -> (d2v checkpoint, notes)."""
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    tokenizer = toks.hf_entry(folder)
    arch, notes = arch_from_hf(hf, folder, toks.special_id(tokenizer, "<mask>"))
    weights = dict(read_hf_weights(folder, trust=trust))
    if not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise InteropError(f"{folder}: the weights file is not a state dict of tensors")
    cls = "classifier.out_proj.weight" in weights
    kind = "text-cls" if cls else "text-pretrain"
    # Backbone keys without the wrapper's `data2vec_text.` (ForSequenceClassification, ForMaskedLM).
    heads = {k: v for k, v in weights.items() if k.startswith("classifier.")}
    backbone = {k.removeprefix(HF_PREFIX): v for k, v in weights.items() if not k.startswith("classifier.")}
    dropped = sorted(k for k in backbone if k.startswith(("pooler.", "lm_head.")))
    if dropped:
        what = sorted({k.split(".")[0] for k in dropped})
        notes.append(f"dropped {' and '.join(what)} ({len(dropped)} tensors): data2vec has no use for it "
                     f"(the pooler is untrained; an LM head is not data2vec's)")
    backbone = {k: v for k, v in backbone.items() if k not in dropped}
    _fold_token_types(backbone, folder, notes)
    model_state, unmatched = rename(backbone, HF_MODEL_MAP.to_d2v)
    head_state, head_unmatched = rename(heads, KeyMap((HF_CLS_HEAD, "", "")).to_d2v)
    model_state.update(head_state)
    unmatched += head_unmatched
    num_classes = int(weights["classifier.out_proj.weight"].shape[0]) if cls else 0
    fresh = build_text_model(kind, arch, num_classes).state_dict()
    teacher = None
    if kind == "text-pretrain":
        model_state.update({k: v for k, v in fresh.items() if k.startswith("regression_head.")})
        notes.append("HF models have no regression head or EMA teacher: the regression head is freshly "
                     "initialized and the teacher starts as a copy of the student (continued pretraining is not "
                     "exact)")
    check_state_dict(model_state, fresh, str(folder), unknown=tuple(unmatched))
    if kind == "text-pretrain":
        teacher = teacher_state(model_state)
    classes, task = None, None
    if kind == "text-cls":
        id2label = hf.get("id2label") or {}
        classes = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_classes)]
        regression = num_classes == 1  # our head: one output = regression, several = single-label classes
        task = {"name": folder.resolve().name, "kind": "regression" if regression else "classification",
                "num_classes": num_classes, "label_names": classes,
                "metric": "pearson_spearman" if regression else "acc"}
        notes.append(f"task {task['kind']} with {num_classes} output(s) ({', '.join(classes)}); the metric "
                     f"({task['metric']}) is a default: HF folders do not record it")
    if tokenizer is None:
        notes.append("no tokenizer files in the folder (vocab.json + merges.txt or tokenizer.json): "
                     "predictions need the tokenizer the model was trained with")
    else:
        notes.append(f"tokenizer kept in the checkpoint: {', '.join(sorted(tokenizer['files']))}")
    src = {"format": "hf", "path": str(folder.resolve()), "architectures": hf.get("architectures"),
           "bos_token_id": hf.get("bos_token_id", 0), "eos_token_id": hf.get("eos_token_id", 2)}
    state = ck.make_state(kind, config={}, arch=dataclasses.asdict(arch), normalize=False, model=model_state,
                          teacher=teacher, classes=classes, task=task, source=src)
    if tokenizer is not None:
        state[TOKENIZER_KEY] = tokenizer
    return state, notes


def teacher_state(model_state: dict) -> dict:
    """The EMA teacher of a fresh import: a copy of the student's encoder (keys relative to `encoder.`)."""
    return {k[len("encoder."):]: v.clone() for k, v in model_state.items() if k.startswith("encoder.")}


def import_hf(folder: Path, out: Optional[Path] = None, trust: bool = False, workspace: Optional[Workspace] = None,
              force: bool = False, dict_path: Optional[Path] = None) -> ModelImportResult:
    """`d2v import hf` for a data2vec-text folder: a text-pretrain or text-cls d2v checkpoint."""
    return import_hf_folder(folder, convert_hf, "data2vec-text", "the tokenizer comes from the folder", out, trust,
                            workspace, force, dict_path)


# --------------------------------------------------------------------------- d2v -> HF


# What a text-pretrain state holds beside the encoder: 1.0's regression head, 2.0's conv decoder.
PRETRAINING_HEADS = ("regression_head.", "decoder.")


def to_hf_state(kind: str, model_state: dict, arch: TextConfig, seed: int = 0) -> dict:
    """d2v model state -> HF state dict (the regression head, or data2vec 2.0's conv decoder, stays behind:
    HF has neither; the 2.0 encoder is 1.0's post-LN RoBERTa layers, docs/text.md)."""
    key_map = HF_CLS_MAP if kind == "text-cls" else HF_MODEL_MAP
    out, unmatched = {}, []
    for key, value in model_state.items():
        if kind == "text-pretrain" and key.startswith(PRETRAINING_HEADS):
            continue
        hf = key_map.from_d2v(key)
        if hf is None:
            unmatched.append(key)
        else:
            out[hf] = value.detach().to("cpu", torch.float32).contiguous()
    if unmatched:
        raise InteropError("no Hugging Face name for: " + ", ".join(sorted(unmatched)))
    prefix = HF_PREFIX if kind == "text-cls" else ""
    out[prefix + HF_TOKEN_TYPES] = torch.zeros(1, arch.embed_dim)  # folded into the positions on import
    if kind == "text-pretrain":
        g = torch.Generator().manual_seed(seed)
        out[HF_POOLER[0]] = torch.randn(arch.embed_dim, arch.embed_dim, generator=g) * arch.init_std
        out[HF_POOLER[1]] = torch.zeros(arch.embed_dim)
    return out




def is_text_checkpoint(path: Path) -> bool:
    return ck.peek_kind(Path(path)) in ck.TEXT_KINDS


def _workspace_tokenizer(state: dict, checkpoint: Path) -> Optional[dict]:
    """The sentencepiece model of the workspace the checkpoint was trained in (data/text/spm.model), if any."""
    config = state.get(ck.CONFIG_KEY) or {}
    data = config.get("data") or {}
    candidates = [Path(data["text_dir"]) / "spm.model"] if data.get("text_dir") else []
    run_root = Path(checkpoint).resolve().parent.parent.parent  # <workdir>/runs/<name>/last.pt
    candidates.append(run_root / "data" / "text" / "spm.model")
    for c in candidates:
        if c.is_file():
            return toks.sentencepiece_entry(c)
    return None


def export_hf(checkpoint: Path, out_dir: Path, trust: bool = False, force: bool = False,
              tokenizer: Optional[Path] = None) -> list[Path]:
    """`d2v export hf` for a text checkpoint: a folder transformers loads with no missing or unexpected keys.

    text-pretrain -> Data2VecTextModel (the student's encoder; regression head and teacher stay behind);
    text-cls -> Data2VecTextForSequenceClassification with the class names as id2label. The tokenizer is the
    checkpoint's (an imported HF one, or a sentencepiece model), else `tokenizer` (a sentencepiece .model),
    else the workspace's data/text/spm.model; with none, the weights are written alone and the caller is told.
    """
    checkpoint = Path(checkpoint)
    state = ck.load_checkpoint(checkpoint, trust=trust)
    kind = state[ck.KIND_KEY]
    if kind not in ck.TEXT_KINDS:
        raise InteropError(f"{checkpoint} is a {kind!r} checkpoint, not a text model")
    arch = text_arch(state.get(ck.ARCH_KEY) or {}, checkpoint)
    classes = list(state.get(ck.CLASSES_KEY) or [])
    check_state_dict(state[ck.MODEL_KEY], build_text_model(kind, arch, len(classes)).state_dict(), str(checkpoint))
    if tokenizer is not None:
        entry = toks.sentencepiece_entry(Path(tokenizer))
    else:
        entry = state.get(TOKENIZER_KEY) or _workspace_tokenizer(state, checkpoint)
    src = state.get(ck.SOURCE_KEY) or {}
    given = lambda key, default: default if src.get(key) is None else int(src[key])  # noqa: E731
    bos, eos, unk = given("bos_token_id", 0), given("eos_token_id", 2), 3
    if entry is not None and entry.get("format") == "sentencepiece":
        sp = toks.tokenizer_of(entry)
        if (sp.pad_id, sp.mask_id, sp.vocab_size) != (arch.pad_id, arch.mask_id, arch.vocab_size):
            raise InteropError(
                f"{entry.get('path', 'the sentencepiece model')}: pad {sp.pad_id}, <mask> {sp.mask_id}, {sp.vocab_size} "
                f"pieces, but {checkpoint} was built for pad {arch.pad_id}, <mask> {arch.mask_id}, vocabulary "
                f"{arch.vocab_size}: not the model's tokenizer")
        bos, eos, unk = sp.bos_id, sp.eos_id, sp.unk_id
    weights = to_hf_state(kind, state[ck.MODEL_KEY], arch)
    written = write_hf_folder(out_dir, HF_WEIGHT_FILES + toks.HF_TOKENIZER_FILES, force, weights,
                              hf_config(kind, arch, classes, bos, eos))
    if entry is not None:
        written += toks.write_hf_tokenizer(entry, out_dir, bos_id=bos, pad_id=arch.pad_id, eos_id=eos,
                                           unk_id=unk, mask_id=arch.mask_id, max_length=arch.max_positions)
    return written


def missing_tokenizer_note(written: list[Path]) -> Optional[str]:
    """What the export command says when it wrote the weights without a tokenizer."""
    if any(p.name in toks.HF_TOKENIZER_FILES for p in written):
        return None
    return ("no tokenizer written (the checkpoint carries none and no sentencepiece model was found): "
            "pass --spm data/text/spm.model")
