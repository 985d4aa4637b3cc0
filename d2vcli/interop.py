"""Foreign checkpoints in and out: fairseq data2vec `.pt` files and Hugging Face Data2VecAudio folders.

    d2v import fairseq audio_base_ls_960h.pt --dict dict.ltr.txt   # -> <workdir>/runs/imported-audio_base_ls_960h/last.pt
    d2v import hf ./data2vec-audio-base-960h                        # a save_pretrained folder
    d2v export hf RUN_OR_CHECKPOINT ./out                           # loads with transformers' from_pretrained

Imports write ordinary d2v checkpoints (kind "pretrain" or "ctc", with arch, config,
normalize and vocab), so they work wherever a d2v checkpoint does: `d2v finetune` from
a pretrained import, decode/evaluate/transcribe from a CTC import.

Each foreign format has one key-map table below (d2v name <-> foreign name, with
`{i}` for a layer index and `{w}` for weight/bias); both directions are derived from
it. The formats are described in docs/checkpoints.md (fairseq `data2vec_audio.py` / `wav2vec2_asr.py` at 3d262bb; transformers 5.23
`modeling_data2vec_audio.py`). No tensor needs a transpose.

Conversions are all-or-nothing: every missing key, unexpected key and shape mismatch is
collected and reported together, and nothing is written unless the whole state dict
fits the model. Files are read with `checkpoint.load_raw` (weights_only; a pickle that
needs code is refused without --trust-checkpoint). fairseq's `conv_feature_layers`
is a Python expression string; it is parsed by a small AST walker, never eval'd.
data2vec 2.0 (`data2vec_multi`) checkpoints have another layout and are refused.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from safetensors.torch import load_file, save

from d2vcli import checkpoint as ck
from d2vcli import config as cfgmod
from d2vcli.fileio import atomic_open, atomic_write_text, claim_output_dir, refuse_overwrite
from d2vcli.models.loading import expected_state
from d2vcli.vocab import SPECIALS, Vocab
from d2vcli.workspace import Workspace

Kind = Literal["pretrain", "ctc"]


class InteropError(ck.CheckpointError):
    """A foreign checkpoint that cannot be converted; the message lists every problem."""


# --------------------------------------------------------------------------- key maps

# Placeholders in the templates: {i} layer index, {w} weight|bias, {p} an attention projection.
_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "w": r"(?P<w>weight|bias)", "p": r"(?P<p>[qkv]_proj|out_proj)"}

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


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)
    regex = "".join(_PLACEHOLDERS[p] if n % 2 else re.escape(p) for n, p in enumerate(parts))
    return re.compile(regex + "$")


class KeyMap:
    """Key-map tables usable both ways: `to_d2v(foreign_key)` and `from_d2v(d2v_key)` (None = no rule).

    Each section is (table, d2v prefix, foreign prefix): the same backbone table serves the
    bare model and the CTC wrapper, which only differ in prefixes.
    """

    def __init__(self, *sections: tuple[list[tuple[str, str]], str, str]):
        self.rules = [(_compile(dp + d), dp + d, _compile(fp + f), fp + f)
                      for table, dp, fp in sections for d, f in table]

    @staticmethod
    def _apply(key: str, pattern: re.Pattern, template: str) -> Optional[str]:
        m = pattern.match(key)
        return template.format(**m.groupdict()) if m else None

    def to_d2v(self, key: str) -> Optional[str]:
        for d_re, d_t, f_re, f_t in self.rules:
            out = self._apply(key, f_re, d_t)
            if out is not None:
                return out
        return None

    def from_d2v(self, key: str) -> Optional[str]:
        for d_re, d_t, f_re, f_t in self.rules:
            out = self._apply(key, d_re, f_t)
            if out is not None:
                return out
        return None


HF_MODEL_MAP = KeyMap((HF_BACKBONE_KEYS, "backbone.", ""))
HF_CTC_MAP = KeyMap((HF_BACKBONE_KEYS, "backbone.", HF_CTC_PREFIX), ([HF_CTC_HEAD], "", ""))
FAIRSEQ_PRETRAIN_MAP = KeyMap((FAIRSEQ_BACKBONE_KEYS, "backbone.", ""), (FAIRSEQ_PRETRAIN_HEADS, "", ""))
FAIRSEQ_CTC_MAP = KeyMap((FAIRSEQ_BACKBONE_KEYS, "backbone.", FAIRSEQ_CTC_PREFIX), ([FAIRSEQ_CTC_HEAD], "", ""))
# The EMA dict holds transformer keys relative to fairseq's `encoder.`, ours are relative to `transformer.`.
FAIRSEQ_EMA_MAP = KeyMap(([(d[len("transformer."):], f[len("encoder."):])
                           for d, f in FAIRSEQ_BACKBONE_KEYS if d.startswith("transformer.")], "", ""))


def rename(state: dict, to_d2v) -> tuple[dict, list[str]]:
    """Apply a key map (a function key -> new key or None); returns (renamed tensors fp32, unmatched keys)."""
    out, unmatched = {}, []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            unmatched.append(key)
            continue
        new = to_d2v(key)
        if new is None:
            unmatched.append(key)
        else:
            out[new] = value.detach().to("cpu", torch.float32).contiguous()
    return out, unmatched


# --------------------------------------------------------------------------- building and checking


def check_state_dict(state: dict, expected: dict, source: str, what: str = "model",
                     unknown: tuple[str, ...] = ()) -> None:
    """Raise InteropError listing every missing key, unexpected key and shape mismatch.

    `unknown`: foreign keys no key-map rule matched, reported (under their own names) as unexpected.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected)) + sorted(f"{k} (no d2v name)" for k in unknown)
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source}: the {what} weights do not fit the architecture in its config; nothing was written."]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines += [f"  {x}" for x in items]
    raise InteropError("\n".join(lines))


def _make_checkpoint(kind: Kind, model_cfg: cfgmod.ModelConfig, normalize: bool, model_state: dict,
                     source: dict, vocab: Optional[Vocab] = None, teacher: Optional[dict] = None,
                     final_dropout: float = 0.0) -> dict:
    """An ordinary d2v checkpoint dict; `config` is the command's defaults with this model."""
    cfg = cfgmod.DEFAULTS["finetune" if kind == "ctc" else "pretrain"]()
    cfg.model = model_cfg
    cfg.data = dataclasses.replace(cfg.data, normalize=normalize)
    if kind == "ctc":
        cfg.finetune = dataclasses.replace(cfg.finetune, final_dropout=final_dropout)
    return ck.make_state(kind, config=cfgmod.to_dict(cfg), arch=cfgmod.to_dict(model_cfg), normalize=normalize,
                         model=model_state, teacher=teacher if kind == "pretrain" else None,
                         vocab=list(vocab.symbols) if kind == "ctc" else None, source=source)


def _teacher_from(model_state: dict, ema: Optional[dict]) -> dict:
    """Teacher = the EMA weights where given, the student's transformer elsewhere (fairseq's
    ema_layers_only teachers copy pos_conv from the student, so those keys may be absent)."""
    student = {k[len("backbone.transformer."):]: v.clone() for k, v in model_state.items()
               if k.startswith("backbone.transformer.")}
    if ema:
        student.update(ema)
    return student


@dataclass
class ImportResult:
    path: Path
    kind: Kind
    arch: dict
    normalize: bool
    vocab_size: int
    num_parameters: int
    notes: list[str] = field(default_factory=list)


def _write(state: dict, out: Optional[Path], workspace: Optional[Workspace], source: Path,
           notes: list[str], force: bool = False) -> ImportResult:
    """Save to `out`, or into a run directory of the workspace (with its config.yaml, like any run).

    An existing checkpoint (or the config.yaml beside it) is only replaced with `force`; then the
    run's other checkpoints go too, since best.pt would otherwise win over the new last.pt.
    """
    in_run_dir = out is None
    out = default_import_path(workspace or Workspace.resolve(), source) if in_run_dir else Path(out)
    config_path = out.parent / "config.yaml"
    with_config = in_run_dir or config_path.exists()  # a run directory: keep its config matching
    refuse_overwrite([out] + ([config_path] if with_config else []), force, "the import")
    if force and out.name == ck.LAST:
        for stale in [out.parent / ck.BEST] + [p for _, p in ck.step_checkpoints(out.parent)]:
            if stale.exists():
                stale.unlink()
                notes.append(f"removed {stale} (a checkpoint of the replaced run)")
    ck.save_checkpoint(out, state)
    if with_config:
        cfgmod.save(cfgmod.from_dict(state[ck.CONFIG_KEY]), config_path)
    return ImportResult(
        path=out, kind=state[ck.KIND_KEY], arch=state[ck.ARCH_KEY], normalize=state[ck.NORMALIZE_KEY],
        vocab_size=len(SPECIALS) + len(state.get(ck.VOCAB_KEY, [])) if state[ck.KIND_KEY] == "ctc" else 0,
        num_parameters=sum(v.numel() for v in state[ck.MODEL_KEY].values()), notes=notes,
    )


def default_import_path(workspace: Workspace, source: Path) -> Path:
    """runs/imported-<stem>/last.pt: found later by run name (`--init imported-<stem>`)."""
    source = Path(source)
    name = source.resolve().name if source.is_dir() else source.stem
    return workspace.run_dir(f"imported-{name}") / "last.pt"


def _vocab_for(num_outputs: int, dict_path: Optional[Path], source: Path) -> tuple[Vocab, list[str]]:
    notes = []
    if dict_path:
        try:
            vocab = Vocab.load(dict_path)
        except ValueError as e:
            raise InteropError(f"{e}") from None
    else:
        vocab = Vocab.librispeech()
        notes.append("vocabulary: the LibriSpeech letter dictionary (fairseq dict.ltr.txt); pass --dict otherwise")
    if len(vocab) != num_outputs:
        raise InteropError(
            f"{source}: the CTC head has {num_outputs} outputs but the dictionary "
            f"{dict_path or '(LibriSpeech letters)'} gives {len(vocab)} (4 specials + {len(vocab.symbols)} symbols). "
            f"Pass the dict.ltr.txt the model was fine-tuned with: --dict PATH."
        )
    return vocab, notes


# --------------------------------------------------------------------------- fairseq


def parse_conv_layers(expr: str) -> tuple[tuple[int, int, int], ...]:
    """fairseq's `conv_feature_layers` string, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4", without eval.

    Only list and tuple literals, integers, `+` and `*` are allowed; anything else is an error.
    """

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(ev(e) for e in node.elts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
                return left * right
            if isinstance(node.op, ast.Mult) and not (isinstance(left, int) or isinstance(right, int)):
                raise ValueError("'*' needs an integer on one side")
            if isinstance(node.op, ast.Mult) and max(left if isinstance(left, int) else right, 0) > 10_000:
                raise ValueError("repeat count too large")
            if isinstance(node.op, ast.Add) and type(left) is not type(right):
                raise ValueError("'+' joins two lists or two tuples")
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError(f"'{ast.unparse(node)}' is not allowed (only lists, tuples, integers, + and *)")

    try:
        value = ev(ast.parse(expr.strip(), mode="eval"))
        layers = tuple(tuple(layer) for layer in value)
        if not layers or any(len(layer) != 3 or not all(isinstance(v, int) and v > 0 for v in layer)
                             for layer in layers):
            raise ValueError("expected a non-empty list of (dim, kernel, stride) triples of positive integers")
    except (SyntaxError, ValueError, TypeError) as e:
        raise InteropError(f"conv_feature_layers {expr!r} cannot be parsed: {e}") from None
    return layers


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


def _section(cfg: Any, name: str) -> dict:
    value = cfg.get(name) if hasattr(cfg, "get") else None
    return dict(value) if value is not None else {}


def _fairseq_cfg(raw: dict, source: Path) -> dict:
    """The hydra cfg as nested plain dicts (data2vec postdates fairseq's move to hydra, so its files have one)."""
    cfg = raw.get("cfg")
    if cfg is None:
        raise InteropError(f"{source}: no 'cfg' entry. Files with only argparse 'args' predate data2vec "
                           f"(wav2vec 2.0 era) and are not supported")
    return {k: (dict(v) if hasattr(v, "items") else v) for k, v in dict(cfg).items()}


def convert_fairseq(raw: Any, source: Path, dict_path: Optional[Path] = None, use_ema: bool = False) -> tuple[dict, list[str]]:
    """A loaded fairseq checkpoint -> (d2v checkpoint dict, notes). Raises InteropError on any mismatch."""
    if isinstance(raw, dict) and ck.FORMAT_VERSION_KEY in raw and raw.get(ck.KIND_KEY) in ck.KINDS:
        raise InteropError(_already_d2v(source, raw[ck.KIND_KEY]))
    if not isinstance(raw, dict) or "model" not in raw:
        raise InteropError(f"{source} is not a fairseq checkpoint (no 'model' state dict)")
    cfg = _fairseq_cfg(raw, source)
    model_cfg = _section(cfg, "model")
    name = model_cfg.get("_name")
    notes: list[str] = []
    state = dict(raw["model"])
    if name == "data2vec_audio":
        kind: Kind = "pretrain"
        arch = model_config_from_fairseq(model_cfg, source)
        normalize = bool(_section(cfg, "task").get("normalize", False))
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
        inner = _section(w2v, "model")
        if inner.get("_name") != "data2vec_audio":
            raise InteropError(f"{source}: fine-tuned from a {inner.get('_name')!r} model; d2v imports data2vec 1.0 "
                               f"audio (data2vec_audio) only")
        merged = dict(inner)
        for ft_key, pt_key in _FAIRSEQ_FT_OVERRIDES.items():
            if model_cfg.get(ft_key) is not None:
                merged[pt_key] = model_cfg[ft_key]
        arch = model_config_from_fairseq(merged, source)
        task = _section(cfg, "task") or _section(w2v, "task")
        normalize = bool(task.get("normalize", _section(w2v, "task").get("normalize", False)))
        if use_ema:
            raise InteropError(f"{source} is a fine-tuned model: it has no EMA teacher; drop --use-ema")
        model_state, unmatched = rename(state, FAIRSEQ_CTC_MAP.to_d2v)
        head = model_state.get("proj.weight")
        if head is None:
            raise InteropError(f"{source}: no CTC head (w2v_encoder.proj.weight) in the state dict")
        vocab, vocab_notes = _vocab_for(head.shape[0], dict_path, source)
        notes += vocab_notes
        teacher, final_dropout = None, float(model_cfg.get("final_dropout") or 0.0)
    elif name == "data2vec_multi":
        raise InteropError(f"{source} is a data2vec 2.0 checkpoint (data2vec_multi); d2v implements data2vec 1.0 "
                           f"audio only")
    else:
        raise InteropError(f"{source}: model type {name!r} is not data2vec_audio (pretrained) or wav2vec_ctc "
                           f"(fine-tuned)")
    vocab_size = len(vocab) if vocab else 0
    expected = expected_state(kind, cfgmod.to_dict(arch), vocab_size)
    check_state_dict(model_state, expected, str(source), unknown=tuple(unmatched))
    if kind == "pretrain":
        teacher = _teacher_from(model_state, teacher)
        expected_teacher = {k[len("backbone.transformer."):]: v for k, v in expected.items()
                            if k.startswith("backbone.transformer.")}
        check_state_dict(teacher, expected_teacher, str(source), what="EMA teacher")
    if not normalize:
        notes.append("normalize is false in the file's task config (data2vec was pretrained with normalize=true)")
    src = {"format": "fairseq", "path": str(Path(source).resolve()), "fairseq_model": name, "use_ema": use_ema}
    return _make_checkpoint(kind, arch, normalize, model_state, src, vocab, teacher, final_dropout), notes


def _already_d2v(source: Path, kind: str) -> str:
    use = {"pretrain": "--init it in `d2v finetune`", "ctc": "pass it to `d2v decode`/`evaluate`/`transcribe`"}.get(
        kind, "`d2v export hf` it")
    return (f"{source} is already a d2v checkpoint (kind {kind!r}): no conversion needed. Use it as it is "
            f"({use}), or copy it to <workdir>/runs/NAME/last.pt to refer to it by run name.")


def import_fairseq(path: Path, out: Optional[Path] = None, dict_path: Optional[Path] = None, use_ema: bool = False,
                   trust: bool = False, workspace: Optional[Workspace] = None, force: bool = False) -> ImportResult:
    """`d2v import fairseq`: convert a fairseq data2vec checkpoint and write it as a d2v checkpoint
    (a data2vec vision file from the BEiT repo goes to `interop_vision.import_beit`)."""
    path = Path(path)
    raw = ck.load_raw(path, trust=trust)
    from d2vcli import interop_vision  # deferred: interop_vision builds on this module's checks

    if interop_vision.is_beit_checkpoint(raw):  # data2vec 1.0 vision, released from the BEiT repo
        return interop_vision.import_beit(raw, path, out=out, workspace=workspace, force=force, use_ema=use_ema,
                                          dict_path=dict_path)
    state, notes = convert_fairseq(raw, path, dict_path=dict_path, use_ema=use_ema)
    return _write(state, out, workspace, path, notes, force)


# --------------------------------------------------------------------------- Hugging Face


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
        return _vocab_for(num_outputs, dict_path, Path(folder))
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
    teacher = _teacher_from(model_state, None) if kind == "pretrain" else None
    src = {"format": "hf", "path": str(folder.resolve()), "architectures": hf_cfg.get("architectures")}
    return _make_checkpoint(kind, arch, normalize, model_state, src, vocab, teacher,
                            float(hf_cfg.get("final_dropout", 0.0) or 0.0)), notes


def import_hf(folder: Path, out: Optional[Path] = None, dict_path: Optional[Path] = None, trust: bool = False,
              workspace: Optional[Workspace] = None, force: bool = False) -> ImportResult:
    """`d2v import hf`: convert a Hugging Face Data2VecAudio folder and write it as a d2v checkpoint."""
    folder = Path(folder)
    state, notes = convert_hf(folder, dict_path=dict_path, trust=trust)
    return _write(state, out, workspace, folder, notes, force)


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
