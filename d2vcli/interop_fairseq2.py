"""fairseq data2vec 2.0 speech checkpoints in: `data2vec_multi` (pretrained) and `wav2vec_ctc` fine-tuned from it.

    d2v import fairseq base_libri.pt                         # pretrained: student, decoder and EMA teacher
    d2v import fairseq base_libri_960h.pt --dict dict.ltr.txt   # fine-tuned CTC model

The layout is what fairseq `examples/data2vec/models/data2vec2.py` (`Data2VecMultiModel`,
modality AUDIO; snapshot 3d262bb) saves, described in docs/checkpoints.md. Three tensors are not
plain renames, and `_normalize` rewrites them before the key map applies:

- `blocks.{i}.attn.qkv.{weight,bias}`: one fused Linear (3D, D) whose rows are [q; k; v]; ours
  are three Linears, so the rows are split.
- `relative_positional_encoder.{n}.0.*`: the positional conv blocks sit in a Sequential after a
  TransposeLast, so fairseq's block n is our block n - 1.
- `alibi_scale`: (1, 1, H, 1, 1) (4-D in older files); ours is (H,).

The EMA teacher (`_ema`, a nested dict with teacher-relative keys) maps onto our ContextEncoder;
the decoder keys of a pretrained file load into our conv decoder (continued pretraining), and
a fine-tuned file has none.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional

import torch

from d2vcli import config as cfgmod
from d2vcli.interop_keys import (InteropError, Kind, KeyMap, check_state_dict, make_checkpoint, parse_conv_layers,
                                 rename, section, teacher_from, vocab_for)
from d2vcli.models.loading import expected_state

AUDIO = "modality_encoders.AUDIO."
EMA_KEY = "_ema"
CTC_PREFIX = "w2v_encoder.w2v_model."

# d2v TransformerLayer key  <->  fairseq AltBlock key (post-LN: norm1 after attention, norm2 after the MLP).
LAYER_KEYS: list[tuple[str, str]] = [
    ("self_attn.out_proj.{w}", "attn.proj.{w}"),
    ("self_attn.{p}.{w}", "attn.{p}.{w}"),  # q/k/v_proj: the rows of attn.qkv, split by _normalize
    ("self_attn_norm.{w}", "norm1.{w}"),
    ("fc1.{w}", "mlp.fc1.{w}"),
    ("fc2.{w}", "mlp.fc2.{w}"),
    ("final_norm.{w}", "norm2.{w}"),
]
# d2v ContextEncoder key (the EMA teacher's)  <->  fairseq key outside the blocks.
ENCODER_KEYS: list[tuple[str, str]] = [
    ("alibi_scale", AUDIO + "alibi_scale"),
    ("pos_conv.blocks.{i}.conv.{w}", AUDIO + "relative_positional_encoder.conv{i}.{w}"),  # renumbered by _normalize
    ("norm.{w}", AUDIO + "context_encoder.norm.{w}"),
]
# d2v Data2Vec2Audio key  <->  fairseq key of the conv front end.
FRONT_KEYS: list[tuple[str, str]] = [
    ("feature_extractor.blocks.{i}.conv.weight", AUDIO + "local_encoder.conv_layers.{i}.0.weight"),
    ("feature_extractor.blocks.{i}.norm.{w}", AUDIO + "local_encoder.conv_layers.{i}.2.1.{w}"),
    ("feature_norm.{w}", AUDIO + "project_features.1.{w}"),
    ("feature_proj.{w}", AUDIO + "project_features.2.{w}"),
]
DECODER_KEYS: list[tuple[str, str]] = [
    ("decoder.blocks.{i}.conv.{w}", AUDIO + "decoder.blocks.{i}.0.{w}"),
    ("decoder.proj.{w}", AUDIO + "decoder.proj.{w}"),
]


def _encoder_sections(d2v: str, foreign: str) -> list[tuple[list[tuple[str, str]], str, str]]:
    return [(ENCODER_KEYS, d2v, foreign), (LAYER_KEYS, d2v + "layers.{i}.", foreign + "blocks.{i}."),
            (LAYER_KEYS, d2v + "prenet.{i}.", foreign + AUDIO + "context_encoder.blocks.{i}.")]


PRETRAIN_MAP = KeyMap((FRONT_KEYS, "backbone.", ""), *_encoder_sections("backbone.encoder.", ""),
                      (DECODER_KEYS, "", ""))
CTC_MAP = KeyMap((FRONT_KEYS, "backbone.", CTC_PREFIX), *_encoder_sections("backbone.encoder.", CTC_PREFIX),
                 ([("proj.{w}", "w2v_encoder.proj.{w}")], "", ""))
EMA_MAP = KeyMap(*_encoder_sections("", ""))

_QKV = re.compile(r"(?P<pre>.*attn\.)qkv\.(?P<w>weight|bias)$")
_POS = re.compile(r"(?P<pre>.*relative_positional_encoder\.)(?P<n>\d+)\.0\.(?P<w>weight|bias)$")


def _normalize(state: dict, num_heads: int) -> dict:
    """Split fused qkv rows, renumber the positional conv blocks, flatten alibi_scale (module docstring)."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            out[key] = value
        elif m := _QKV.match(key):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{m['pre']}{name}.{m['w']}"] = part
        elif m := _POS.match(key):
            out[f"{m['pre']}conv{int(m['n']) - 1}.{m['w']}"] = value
        elif key.endswith("alibi_scale"):
            if value.numel() not in (1, num_heads):
                raise InteropError(f"alibi_scale has shape {tuple(value.shape)}: a scale per layer "
                                   f"(learned_alibi_scale_per_layer) is not supported")
            out[key] = value.reshape(-1).expand(num_heads).clone()  # one scale for all heads -> per head
        else:
            out[key] = value
    return out


# Dataclass defaults of Data2VecMultiConfig / D2vAudioConfig / D2vDecoderConfig (fairseq
# `examples/data2vec/models/data2vec2.py`, `modalities/base.py`, `modalities/audio.py`), for
# fields a saved cfg might omit.
_MODEL_DEFAULTS = {
    "depth": 8, "embed_dim": 768, "num_heads": 12, "mlp_ratio": 4.0, "layer_norm_first": False, "norm_eps": 1e-6,
    "encoder_dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "post_mlp_drop": 0.1,
    "dropout_input": 0.0, "layerdrop": 0.0,
}
_AUDIO_DEFAULTS = {
    "feature_encoder_spec": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]",
    "extractor_mode": "layer_norm", "conv_pos_depth": 5, "conv_pos_width": 95, "conv_pos_groups": 16,
    "conv_pos_pre_ln": False, "prenet_depth": 4, "prenet_layerdrop": 0.0, "prenet_dropout": 0.0,
    "use_alibi_encoder": False, "learned_alibi": False, "learned_alibi_scale_per_layer": False,
    "num_extra_tokens": 0, "local_grad_mult": 1.0,
}
_DECODER_DEFAULTS = {"decoder_dim": 384, "decoder_groups": 16, "decoder_kernel": 5, "decoder_layers": 5,
                     "input_dropout": 0.1, "decoder_residual": True, "projection_layers": 1}
# Fine-tuning regularization fairseq's arg_overrides push into the pretrained cfg (wav2vec2_asr.py), by our name.
_FT_OVERRIDES = ("dropout", "attention_dropout", "activation_dropout", "dropout_input", "layerdrop", "feature_grad_mult")


def _given(d: Any) -> dict:
    return {k: v for k, v in dict(d or {}).items() if v is not None}


def is_fairseq2(model_cfg: dict) -> bool:
    """A data2vec_multi model, or a CTC model fine-tuned from one."""
    if model_cfg.get("_name") == "data2vec_multi":
        return True
    inner = section(dict(model_cfg.get("w2v_args") or {}), "model") if model_cfg.get("_name") == "wav2vec_ctc" else {}
    return inner.get("_name") == "data2vec_multi"


def model_config_from_fairseq2(model: dict, source: Path) -> tuple[cfgmod.ModelConfig, list[str]]:
    """fairseq `data2vec_multi` model cfg (modality AUDIO) -> (ModelConfig version 2, notes)."""
    m = {**_MODEL_DEFAULTS, **_given(model)}
    audio = {**_AUDIO_DEFAULTS, **_given(section(_given(m.get("modalities")), "audio"))}
    dec = {**_DECODER_DEFAULTS, **_given(audio.get("decoder"))}
    problems, notes = [], []
    if m["layer_norm_first"]:
        problems.append("layer_norm_first is true (data2vec 2.0 audio is post-LN)")
    if not audio["use_alibi_encoder"]:
        problems.append("use_alibi_encoder is false (d2v's data2vec 2.0 encoder always uses ALiBi)")
    if audio["learned_alibi"] or audio["learned_alibi_scale_per_layer"]:
        problems.append("a learned ALiBi bias or a scale per layer is not implemented")
    if audio["num_extra_tokens"] or audio["conv_pos_pre_ln"]:
        problems.append("extra tokens / conv_pos_pre_ln are not implemented")
    if audio["extractor_mode"] != "layer_norm":
        problems.append(f"extractor_mode is {audio['extractor_mode']!r} (data2vec uses 'layer_norm')")
    if not dec["decoder_residual"] or int(dec["projection_layers"]) != 1:
        problems.append("only the residual conv decoder with one projection layer is implemented")
    if problems:
        raise InteropError(f"{source}: not a data2vec 2.0 audio architecture d2v can run: " + "; ".join(problems))
    dropout = float(m["encoder_dropout"])
    if {float(audio["prenet_dropout"]), float(m["post_mlp_drop"])} != {dropout}:
        notes.append(f"encoder_dropout {dropout}, prenet_dropout {audio['prenet_dropout']} and post_mlp_drop "
                     f"{m['post_mlp_drop']} differ; d2v has one model.dropout for the three: {dropout}")
    if float(audio["prenet_layerdrop"]) != float(m["layerdrop"]) and int(audio["prenet_depth"]) > 0:
        notes.append(f"prenet_layerdrop {audio['prenet_layerdrop']} differs from layerdrop {m['layerdrop']}; "
                     f"d2v uses model.layerdrop for both")
    if float(m["norm_eps"]) != 1e-5:
        notes.append(f"norm_eps is {m['norm_eps']}; d2v uses it for the feature LayerNorm too (fairseq: 1e-5)")
    depth = int(audio["conv_pos_depth"])
    arch = cfgmod.ModelConfig(
        conv_layers=parse_conv_layers(str(audio["feature_encoder_spec"])), embed_dim=int(m["embed_dim"]),
        num_layers=int(m["depth"]), num_heads=int(m["num_heads"]), ffn_dim=int(m["embed_dim"] * m["mlp_ratio"]),
        dropout=dropout, attention_dropout=float(m["attention_dropout"]),
        activation_dropout=float(m["activation_dropout"]), dropout_input=float(m["dropout_input"]),
        layerdrop=float(m["layerdrop"]), pos_conv_depth=depth,
        pos_conv_kernel=max(3, int(audio["conv_pos_width"]) // depth),  # fairseq's per-layer kernel rule
        pos_conv_groups=int(audio["conv_pos_groups"]), feature_grad_mult=float(audio["local_grad_mult"]),
        layer_norm_eps=float(m["norm_eps"]), version=2, prenet_depth=int(audio["prenet_depth"]),
        decoder_dim=int(dec["decoder_dim"]), decoder_layers=int(dec["decoder_layers"]),
        decoder_kernel=int(dec["decoder_kernel"]), decoder_groups=int(dec["decoder_groups"]),
        decoder_dropout=float(dec["input_dropout"]),
    )
    return arch, notes


def convert_fairseq2(cfg: dict, state: dict, source: Path, dict_path: Optional[Path] = None,
                     use_ema: bool = False) -> tuple[dict, list[str]]:
    """A data2vec 2.0 fairseq checkpoint (its cfg as plain dicts and its `model` state) -> (d2v checkpoint, notes)."""
    model_cfg = section(cfg, "model")
    teacher, vocab, final_dropout = None, None, 0.0
    if model_cfg.get("_name") == "data2vec_multi":
        kind: Kind = "pretrain"
        arch, notes = model_config_from_fairseq2(model_cfg, source)
        normalize = bool(section(cfg, "task").get("normalize", False))
        ema = state.pop(EMA_KEY, None)
        model_state, unmatched = rename(_normalize(state, arch.num_heads), PRETRAIN_MAP.to_d2v)
        if isinstance(ema, dict):
            teacher, ema_unmatched = rename(_normalize(ema, arch.num_heads), EMA_MAP.to_d2v)
            if ema_unmatched:
                raise InteropError(f"{source}: unexpected keys in the EMA teacher ({EMA_KEY}): "
                                   + ", ".join(sorted(ema_unmatched)))
            if use_ema:
                model_state.update({"backbone.encoder." + k: v.clone() for k, v in teacher.items()})
                notes.append("student context encoder initialized from the EMA teacher (--use-ema)")
            notes.append(f"EMA teacher imported ({len(teacher)} tensors)")
        elif use_ema:
            raise InteropError(f"{source} has no EMA teacher ({EMA_KEY}); drop --use-ema")
        else:
            notes.append("no EMA teacher in the file: the teacher starts as a copy of the student")
    else:  # wav2vec_ctc around a data2vec_multi model
        kind = "ctc"
        w2v = {k: (dict(v) if hasattr(v, "items") else v) for k, v in dict(model_cfg["w2v_args"]).items()}
        arch, notes = model_config_from_fairseq2(section(w2v, "model"), source)
        overrides = {name: model_cfg[name] for name in _FT_OVERRIDES if model_cfg.get(name) is not None}
        arch = dataclasses.replace(arch, **{k: float(v) for k, v in overrides.items()})
        task = section(cfg, "task") or section(w2v, "task")
        normalize = bool(task.get("normalize", section(w2v, "task").get("normalize", False)))
        if use_ema:
            raise InteropError(f"{source} is a fine-tuned model: it has no EMA teacher; drop --use-ema")
        model_state, unmatched = rename(_normalize(state, arch.num_heads), CTC_MAP.to_d2v)
        head = model_state.get("proj.weight")
        if head is None:
            raise InteropError(f"{source}: no CTC head (w2v_encoder.proj.weight) in the state dict")
        vocab, vocab_notes = vocab_for(head.shape[0], dict_path, source)
        notes += vocab_notes
        final_dropout = float(model_cfg.get("final_dropout") or 0.0)
    expected = expected_state(kind, cfgmod.to_dict(arch), len(vocab) if vocab else 0)
    check_state_dict(model_state, expected, str(source), unknown=tuple(unmatched))
    if kind == "pretrain":
        teacher = teacher_from(model_state, teacher, prefix="backbone.encoder.")
        expected_teacher = {k[len("backbone.encoder."):]: v for k, v in expected.items()
                            if k.startswith("backbone.encoder.")}
        check_state_dict(teacher, expected_teacher, str(source), what="EMA teacher")
    if not normalize:
        notes.append("normalize is false in the file's task config (data2vec 2.0 was pretrained with normalize=true; "
                     "fairseq asserts it when fine-tuning)")
    src = {"format": "fairseq", "path": str(Path(source).resolve()), "fairseq_model": "data2vec_multi",
           "use_ema": use_ema}
    return make_checkpoint(kind, arch, normalize, model_state, src, vocab, teacher, final_dropout), notes
