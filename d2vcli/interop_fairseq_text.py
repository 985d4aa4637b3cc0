"""fairseq's data2vec text checkpoints: 1.0 (`data2vec_text`, `nlp_base.pt`) and 2.0 (`data2vec_multi`, TEXT).

    d2v import fairseq nlp_base.pt --trust-checkpoint    # interop.import_fairseq hands text files here

The files are `torch.save` dicts {"cfg": hydra config, "model": state dict}; the released ones pickle an
omegaconf config, so a safe load refuses them and --trust-checkpoint is needed (checkpoint.load_raw).
1.0 keeps the encoder under `encoder.sentence_encoder.` (fairseq `TransformerEncoder(return_fc=True)`), the
regression head under `encoder.regression_head.{0,2}` and the EMA teacher as a nested dict `encoder._ema`
of sentence-encoder keys (`examples/data2vec/models/data2vec_text.py`). 2.0 keeps the embeddings under
`modality_encoders.TEXT.local_encoder.`, the post-LN blocks under `blocks.{i}.` with a fused `attn.qkv`,
a conv decoder (dropped: our text pretraining is 1.0's, its regression head starts fresh) and `_ema`
relative to `blocks` (`examples/data2vec/models/modalities/text.py`, `data2vec2.py`). The architecture is
read off the tensor shapes; the cfg gives the head count and dropouts and is checked for what our encoder
cannot run (pre-LN, sinusoidal or scaled embeddings, another activation). docs/text-interop.md has the tables.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional

import torch

from d2vcli import checkpoint as ck
from d2vcli.interop_keys import (InteropError, KeyMap, ModelImportResult, check_state_dict, default_import_path,
                                 fairseq_cfg, rename, save_model_import, section)
from d2vcli.interop_text import teacher_state
from d2vcli.models.loading import build_text_model
from d2vcli.models.text import TextConfig
from d2vcli.workspace import Workspace

# fairseq data2vec 1.0 text (`data2vec_text`): d2v key (relative to `encoder.`) <-> key under
# `encoder.sentence_encoder.` (a `TransformerEncoder(return_fc=True)`).
FAIRSEQ_ENCODER_KEYS: list[tuple[str, str]] = [
    ("embed.embed_tokens.weight", "embed_tokens.weight"),
    ("embed.embed_positions.weight", "embed_positions.weight"),
    ("embed.layernorm_embedding.{w}", "layernorm_embedding.{w}"),
    ("embed.layernorm_embedding.{w}", "emb_layer_norm.{w}"),  # its older name (data2vec_text's upgrade renames it)
    ("layers.{i}.self_attn.{p}.{w}", "layers.{i}.self_attn.{p}.{w}"),
    ("layers.{i}.self_attn_norm.{w}", "layers.{i}.self_attn_layer_norm.{w}"),
    ("layers.{i}.fc1.{w}", "layers.{i}.fc1.{w}"),
    ("layers.{i}.fc2.{w}", "layers.{i}.fc2.{w}"),
    ("layers.{i}.final_norm.{w}", "layers.{i}.final_layer_norm.{w}"),
]
FAIRSEQ_PREFIX = "encoder.sentence_encoder."
FAIRSEQ_HEADS = [("regression_head.0.{w}", "encoder.regression_head.0.{w}"),
                 ("regression_head.2.{w}", "encoder.regression_head.2.{w}")]
FAIRSEQ_EMA_KEY = "encoder._ema"  # the teacher: a dict of sentence-encoder keys
FAIRSEQ_MAP = KeyMap((FAIRSEQ_ENCODER_KEYS, "encoder.", FAIRSEQ_PREFIX), (FAIRSEQ_HEADS, "", ""))
FAIRSEQ_EMA_MAP = KeyMap((FAIRSEQ_ENCODER_KEYS, "", ""))
# Keys fairseq stores that carry no weights: TransformerEncoder's `version` buffer.
FAIRSEQ_IGNORED = re.compile(r"(^|\.)version$")
FAIRSEQ_CLS_HEAD = re.compile(r"^classification_heads\.([^.]+)\.(dense|out_proj)\.(weight|bias)$")

# fairseq data2vec 2.0 text (`data2vec_multi`, modality TEXT): the local encoder is the embeddings, the
# shared `blocks` are post-LN AltBlocks (`norm1` after attention, `norm2` after the MLP).
FAIRSEQ2_TEXT = "modality_encoders.TEXT."
FAIRSEQ2_KEYS: list[tuple[str, str]] = [
    ("embed.embed_tokens.weight", FAIRSEQ2_TEXT + "local_encoder.embed_tokens.weight"),
    ("embed.embed_positions.weight", FAIRSEQ2_TEXT + "local_encoder.embed_positions.weight"),
    ("embed.layernorm_embedding.{w}", FAIRSEQ2_TEXT + "local_encoder.layernorm_embedding.{w}"),
    ("layers.{i}.self_attn.out_proj.{w}", "blocks.{i}.attn.proj.{w}"),
    ("layers.{i}.self_attn_norm.{w}", "blocks.{i}.norm1.{w}"),
    ("layers.{i}.fc1.{w}", "blocks.{i}.mlp.fc1.{w}"),
    ("layers.{i}.fc2.{w}", "blocks.{i}.mlp.fc2.{w}"),
    ("layers.{i}.final_norm.{w}", "blocks.{i}.norm2.{w}"),
]
FAIRSEQ2_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
FAIRSEQ2_DROPPED = (FAIRSEQ2_TEXT + "decoder.", "decoder.", "shared_decoder.", "recon_proj.")
FAIRSEQ2_MAP = KeyMap((FAIRSEQ2_KEYS, "encoder.", ""))
FAIRSEQ2_EMA_MAP = KeyMap(([(d, f) for d, f in FAIRSEQ2_KEYS if f.startswith("blocks.")], "", ""))


def _split_qkv(state: dict, key_re: re.Pattern, prefix: str = "encoder.") -> tuple[dict, list[str]]:
    """Fused (3D, ...) q/k/v tensors -> our three projections; returns (tensors, keys consumed)."""
    out, used = {}, []
    for key, value in state.items():
        m = key_re.match(key)
        if m:
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}layers.{m[1]}.self_attn.{proj}.{m[2]}"] = part.detach().to(torch.float32).contiguous()
            used.append(key)
    return out, used


def is_fairseq_text(raw: Any) -> bool:
    """A fairseq data2vec 1.0 text (`data2vec_text`) or 2.0 text (`data2vec_multi` + TEXT) checkpoint."""
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        return False
    keys = raw["model"]
    return any(k.startswith((FAIRSEQ_PREFIX + "embed_tokens.", "decoder.sentence_encoder.embed_tokens.", FAIRSEQ2_TEXT))
               for k in keys)


def _plain(value: Any) -> Any:
    if hasattr(value, "items"):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _arch_from_fairseq(sd: dict, embed_key: str, model_cfg: dict, layer_re: re.Pattern, fc1_key: str,
                       source: Path, notes: list[str]) -> TextConfig:
    """The encoder's shape read off the tensors; heads, dropouts and checks from the model cfg."""
    transformer = model_cfg.get("transformer") or {}
    enc = transformer.get("encoder") or {}
    get = lambda *ks, default=None: next((d[k] for d, k in ks if d.get(k) is not None), default)  # noqa: E731
    problems = []
    if get((enc, "normalize_before"), (model_cfg, "layer_norm_first"), default=False):
        problems.append("normalize_before / layer_norm_first is true (a pre-LN model; data2vec text is post-LN)")
    act = get((transformer, "activation_fn"), (model_cfg, "activation_fn"), default="gelu")
    if act != "gelu":
        problems.append(f"activation_fn is {act!r} (only 'gelu' is implemented)")
    if transformer and not get((enc, "learned_pos"), default=True):
        problems.append("learned_pos is false (sinusoidal positions; data2vec text learns them)")
    if transformer and not get((transformer, "no_scale_embedding"), default=True):
        problems.append("no_scale_embedding is false (embeddings scaled by sqrt(D); data2vec text does not)")
    if problems:
        raise InteropError(f"{source}: not a data2vec text architecture d2v can run: " + "; ".join(problems))
    vocab, dim = (int(n) for n in sd[embed_key].shape)
    rows = int(sd[embed_key.replace("embed_tokens", "embed_positions")].shape[0])
    layers = 1 + max(int(layer_re.match(k)[1]) for k in sd if layer_re.match(k))
    heads = get((enc, "attention_heads"), (model_cfg, "num_heads"), (model_cfg, "encoder_attention_heads"))
    if heads is None:
        heads = max(1, dim // 64)
        notes.append(f"the file's cfg does not give the head count: {heads} heads assumed (D/64, as in base)")
    pad = 1  # fairseq's Dictionary: <s> 0, <pad> 1, </s> 2, <unk> 3
    notes.append(f"architecture: {layers} layers x {dim}, {heads} heads, FFN {int(sd[fc1_key].shape[0])}, "
                 f"{vocab} tokens (pad 1, <mask> {vocab - 1}: fairseq's dictionary with <mask> appended), "
                 f"{rows - pad - 1} positions")
    return TextConfig(
        vocab_size=vocab, max_positions=rows - pad - 1, embed_dim=dim, num_layers=layers, num_heads=int(heads),
        ffn_dim=int(sd[fc1_key].shape[0]),
        dropout=float(get((transformer, "dropout"), (model_cfg, "encoder_dropout"), (model_cfg, "dropout"),
                          default=0.1)),
        attention_dropout=float(get((transformer, "attention_dropout"), (model_cfg, "attention_dropout"),
                                    default=0.1)),
        activation_dropout=float(get((transformer, "activation_dropout"), (model_cfg, "activation_dropout"),
                                     default=0.0)),
        layer_norm_eps=float(get((model_cfg, "norm_eps"), default=1e-5)),  # fairseq LayerNorm: 1e-5
        pad_id=pad, mask_id=vocab - 1,
    )


def _v1_state(sd: dict, model_cfg: dict, source: Path, notes: list[str]) -> tuple[TextConfig, dict, list[str]]:
    """data2vec 1.0 text (or a RoBERTa-style classifier fine-tuned from it) -> (arch, d2v state, unmatched)."""
    layer_re = re.compile(r"^" + re.escape(FAIRSEQ_PREFIX) + r"layers\.(\d+)\.")
    arch = _arch_from_fairseq(sd, FAIRSEQ_PREFIX + "embed_tokens.weight", model_cfg, layer_re,
                              FAIRSEQ_PREFIX + "layers.0.fc1.weight", source, notes)
    lm = sorted(k for k in sd if k.startswith("encoder.lm_head."))
    if lm:
        notes.append(f"dropped the masked-LM head (encoder.lm_head, {len(lm)} tensors): not data2vec's")
    heads = sorted({m[1] for k in sd if (m := FAIRSEQ_CLS_HEAD.match(k))})
    if len(heads) > 1:
        raise InteropError(f"{source} has {len(heads)} classification heads ({', '.join(heads)}); d2v's text "
                           f"classifier has one")
    rest = {k: v for k, v in sd.items() if k not in lm and not FAIRSEQ_CLS_HEAD.match(k)}
    model_state, unmatched = rename(rest, FAIRSEQ_MAP.to_d2v)
    for k, v in sd.items():
        if m := FAIRSEQ_CLS_HEAD.match(k):
            model_state[f"classifier.{m[2]}.{m[3]}"] = v.detach().to(torch.float32).contiguous()
    return arch, model_state, unmatched


def _v2_state(sd: dict, model_cfg: dict, source: Path, notes: list[str]) -> tuple[TextConfig, dict, list[str]]:
    """data2vec 2.0 text (`data2vec_multi`, modality TEXT) -> (arch, d2v state, unmatched); the decoder dropped."""
    dropped = sorted(k for k in sd if k.startswith(FAIRSEQ2_DROPPED))
    if dropped:
        notes.append(f"dropped the data2vec 2.0 decoder ({len(dropped)} tensors): d2v's text pretraining is "
                     f"1.0's (regression head), freshly initialized")
    sd = {k: v for k, v in sd.items() if k not in dropped}
    arch = _arch_from_fairseq(sd, FAIRSEQ2_TEXT + "local_encoder.embed_tokens.weight", model_cfg,
                              re.compile(r"^blocks\.(\d+)\."), "blocks.0.mlp.fc1.weight", source, notes)
    qkv, used = _split_qkv(sd, FAIRSEQ2_QKV)
    model_state, unmatched = rename({k: v for k, v in sd.items() if k not in used}, FAIRSEQ2_MAP.to_d2v)
    model_state.update(qkv)
    return arch, model_state, unmatched


def _teacher(model_state: dict, ema: Any, v2: bool, expected: dict, source: Path, notes: list[str]) -> dict:
    """The EMA teacher (keys relative to `encoder.`): the file's `_ema` over a copy of the student's encoder
    (1.0's EMA skips the embeddings, which are copied from the student each step; 2.0's covers the blocks)."""
    teacher = teacher_state(model_state)
    if not isinstance(ema, dict) or not ema:
        notes.append("no EMA teacher in the file: the teacher starts as a copy of the student")
        return teacher
    ema = {k: v for k, v in ema.items() if not FAIRSEQ_IGNORED.search(str(k))}
    if v2:  # relative to `blocks` with no prefix: "0.norm1.weight"
        ema = {f"blocks.{k}": v for k, v in ema.items()}
        ema_qkv, used = _split_qkv(ema, FAIRSEQ2_QKV, prefix="")
        ema_state, unmatched = rename({k: v for k, v in ema.items() if k not in used}, FAIRSEQ2_EMA_MAP.to_d2v)
        ema_state.update(ema_qkv)
    else:
        ema_state, unmatched = rename(ema, FAIRSEQ_EMA_MAP.to_d2v)
    if unmatched:
        raise InteropError(f"{source}: unexpected keys in the EMA teacher (_ema): " + ", ".join(sorted(map(str, unmatched))))
    teacher.update(ema_state)
    check_state_dict(teacher, expected, str(source), what="EMA teacher (_ema)")
    notes.append(f"EMA teacher imported ({len(ema_state)} tensors)")
    return teacher


def _task(name: str, num_classes: int) -> dict:
    regression = num_classes == 1
    return {"name": name, "kind": "regression" if regression else "classification", "num_classes": num_classes,
            "label_names": [str(i) for i in range(num_classes)],
            "metric": "pearson_spearman" if regression else "acc"}


def convert_fairseq_text(raw: dict, source: Path, use_ema: bool = False) -> tuple[dict, list[str]]:
    """A loaded fairseq data2vec text checkpoint (1.0 or 2.0) -> (d2v checkpoint, notes); all-or-nothing."""
    source = Path(source)
    model_cfg = section(_plain(fairseq_cfg(raw, source)), "model")
    # Older RoBERTa-layout files call the encoder `decoder` (fairseq's upgrade_state_dict_named renames it).
    sd = {("encoder." + k[len("decoder."):] if k.startswith("decoder.sentence_encoder.") or
           k.startswith("decoder.lm_head.") else k): v for k, v in raw["model"].items()}
    ema = sd.pop(FAIRSEQ_EMA_KEY, None) if FAIRSEQ_EMA_KEY in sd else sd.pop("_ema", None)
    sd = {k: v for k, v in sd.items() if not FAIRSEQ_IGNORED.search(k)}
    notes: list[str] = []
    v2 = any(k.startswith(FAIRSEQ2_TEXT) for k in sd)
    arch, model_state, unmatched = (_v2_state if v2 else _v1_state)(sd, model_cfg, source, notes)
    num_classes = int(model_state["classifier.out_proj.weight"].shape[0]) if "classifier.out_proj.weight" in \
        model_state else 0
    kind = "text-cls" if num_classes else "text-pretrain"
    fresh = build_text_model(kind, arch, num_classes).state_dict()
    if kind == "text-pretrain":
        head = {k: v for k, v in model_state.items() if k.startswith("regression_head.")}
        want = {k: v for k, v in fresh.items() if k.startswith("regression_head.")}
        if set(head) != set(want) or any(head[k].shape != want[k].shape for k in head):
            model_state = {**{k: v for k, v in model_state.items() if k not in head}, **want}
            if not v2:
                notes.append("the file's regression head is not 1.0's Linear D->2D, GELU, Linear 2D->D "
                             "(head_layers 2): freshly initialized")
    check_state_dict(model_state, fresh, str(source), unknown=tuple(sorted(unmatched)))
    teacher = None
    if kind == "text-pretrain":
        expected = {k[len("encoder."):]: v for k, v in fresh.items() if k.startswith("encoder.")}
        teacher = _teacher(model_state, ema, v2, expected, source, notes)
        if use_ema:
            if not isinstance(ema, dict) or not ema:
                raise InteropError(f"{source} has no EMA teacher (_ema); drop --use-ema")
            model_state.update({"encoder." + k: v.clone() for k, v in teacher.items()})
            notes.append("student encoder initialized from the EMA teacher (--use-ema)")
    elif use_ema:
        raise InteropError(f"{source} is a fine-tuned classifier: it has no EMA teacher; drop --use-ema")
    notes.append("no tokenizer in the file: fairseq text models use GPT-2 BPE with fairseq's dict.txt ids "
                 "(docs/text-interop.md, \"fairseq files\")")
    task = _task(source.stem, num_classes) if num_classes else None
    src = {"format": "fairseq", "path": str(source.resolve()), "fairseq_model": model_cfg.get("_name"),
           "data2vec": 2 if v2 else 1, "use_ema": use_ema}
    state = ck.make_state(kind, config={}, arch=dataclasses.asdict(arch), normalize=False, model=model_state,
                          teacher=teacher, classes=task["label_names"] if task else None, task=task, source=src)
    return state, notes


def import_fairseq_text(raw: dict, path: Path, out: Optional[Path] = None, workspace: Optional[Workspace] = None,
                        force: bool = False, use_ema: bool = False, dict_path: Optional[Path] = None
                        ) -> ModelImportResult:
    """`d2v import fairseq` for a data2vec text file (`interop.import_fairseq` hands the loaded file here)."""
    path = Path(path)
    if dict_path is not None:
        raise InteropError(f"{path} is a data2vec text model: --dict (a letter dictionary) is for speech CTC "
                           f"models; drop it")
    state, notes = convert_fairseq_text(raw, path, use_ema=use_ema)
    out = Path(out) if out is not None else default_import_path(workspace or Workspace.resolve(), path)
    return save_model_import(state, out, force, notes)
