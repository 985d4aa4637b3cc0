"""The machinery every checkpoint conversion shares: key-map tables, checks, writing a d2v checkpoint.

`d2vcli.interop` (fairseq data2vec 1.0 and the public entry points), `d2vcli.interop_fairseq2`
(fairseq data2vec 2.0, `data2vec_multi`) and `d2vcli.interop_hf` (Hugging Face) build on it.

A key map is a table of (d2v name, foreign name) templates with `{i}` for a layer index, `{w}`
for weight/bias and `{p}` for an attention projection; `KeyMap` applies it both ways.
Conversions are all-or-nothing: `check_state_dict` collects every missing key, unexpected key
and shape mismatch, and nothing is written unless the whole state dict fits the model.
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
from safetensors.torch import save

from d2vcli import checkpoint as ck
from d2vcli import config as cfgmod
from d2vcli.fileio import atomic_open, atomic_write_text, claim_output_dir, refuse_overwrite
from d2vcli.vocab import SPECIALS, Vocab
from d2vcli.workspace import Workspace

Kind = Literal["pretrain", "ctc"]


class InteropError(ck.CheckpointError):
    """A foreign checkpoint that cannot be converted; the message lists every problem."""


# --------------------------------------------------------------------------- key maps

# Placeholders in the templates: {i} layer index, {w} weight|bias, {p} an attention projection.
_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "w": r"(?P<w>weight|bias)", "p": r"(?P<p>[qkv]_proj|out_proj)"}


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


def make_checkpoint(kind: Kind, model_cfg: cfgmod.ModelConfig, normalize: bool, model_state: dict,
                     source: dict, vocab: Optional[Vocab] = None, teacher: Optional[dict] = None,
                     final_dropout: float = 0.0) -> dict:
    """An ordinary d2v checkpoint dict; `config` is the command's defaults (data2vec 2.0's recipe for a
    2.0 pretrained model) with this model."""
    if kind == "pretrain" and model_cfg.version == 2:
        cfg = cfgmod.pretrain2_base()
    else:
        cfg = cfgmod.DEFAULTS["finetune" if kind == "ctc" else "pretrain"]()
    cfg.model = model_cfg
    cfg.data = dataclasses.replace(cfg.data, normalize=normalize)
    if kind == "ctc":
        cfg.finetune = dataclasses.replace(cfg.finetune, final_dropout=final_dropout)
    return ck.make_state(kind, config=cfgmod.to_dict(cfg), arch=cfgmod.to_dict(model_cfg), normalize=normalize,
                         model=model_state, teacher=teacher if kind == "pretrain" else None,
                         vocab=list(vocab.symbols) if kind == "ctc" else None, source=source)


def teacher_from(model_state: dict, ema: Optional[dict], prefix: str = "backbone.transformer.") -> dict:
    """Teacher = the EMA weights where given, the student's part under `prefix` elsewhere (fairseq's
    ema_layers_only teachers copy pos_conv from the student, so those keys may be absent). The
    teacher covers 1.0's transformer, or 2.0's context encoder (`backbone.encoder.`)."""
    student = {k[len(prefix):]: v.clone() for k, v in model_state.items() if k.startswith(prefix)}
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


def remove_replaced_run(out: Path, force: bool, notes: list[str]) -> None:
    """A forced import into a run's last.pt replaces the run: its best.pt and step-N.pt go too, or best.pt
    would win over the new last.pt wherever a run name is resolved."""
    if force and out.name == ck.LAST:
        for stale in [out.parent / ck.BEST] + [p for _, p in ck.step_checkpoints(out.parent)]:
            if stale.exists():
                stale.unlink()
                notes.append(f"removed {stale} (a checkpoint of the replaced run)")


def write_import(state: dict, out: Optional[Path], workspace: Optional[Workspace], source: Path,
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
    remove_replaced_run(out, force, notes)
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


# ----------------------------------------------------------------------------- images and text


@dataclass
class ModelImportResult:
    """What an image or text import wrote (`d2v import` prints it)."""

    path: Path
    kind: str
    arch: dict
    num_classes: int
    num_parameters: int
    notes: list[str] = field(default_factory=list)
    normalize: bool = False  # the audio field; images and text are normalized by their own front ends
    tokenizer: Optional[str] = None  # text: what the checkpoint carries, "sentencepiece", "hf" or None


def save_model_import(state: dict, out: Path, force: bool, notes: list[str]) -> ModelImportResult:
    """Write an imported image or text checkpoint to `out`; an existing file is replaced only with `force`."""
    refuse_overwrite([out], force, "the import")
    remove_replaced_run(out, force, notes)
    ck.save_checkpoint(out, state)
    entry = state.get(ck.TOKENIZER_KEY)
    return ModelImportResult(
        path=out, kind=state[ck.KIND_KEY], arch=state[ck.ARCH_KEY], num_classes=len(state.get(ck.CLASSES_KEY) or []),
        num_parameters=sum(v.numel() for v in state[ck.MODEL_KEY].values()), notes=notes,
        tokenizer=entry.get("format") if entry else None,
    )


def import_hf_folder(folder: Path, convert, model_type: str, labels_from: str, out: Optional[Path], trust: bool,
                     workspace: Optional[Workspace], force: bool, dict_path: Optional[Path]) -> ModelImportResult:
    """`d2v import hf` of a data2vec-vision or data2vec-text folder: `convert(folder, trust=)` gives (state,
    notes), written to `out` (default runs/imported-<name>/last.pt). A --dict is refused: it is the audio CTC
    models' letter dictionary, while these take their labels from `labels_from`."""
    folder = Path(folder)
    if dict_path is not None:
        raise InteropError(f"{folder} is a {model_type} model: --dict (a letter dictionary) is for data2vec-audio "
                           f"CTC models; drop it ({labels_from})")
    state, notes = convert(folder, trust=trust)
    out = Path(out) if out is not None else default_import_path(workspace or Workspace.resolve(), folder)
    return save_model_import(state, out, force, notes)


def hf_encoder_fields(arch) -> dict:
    """The config.json fields every BERT-style Hugging Face encoder shares (Data2VecText, Data2VecVision),
    from an architecture with embed_dim, num_layers, num_heads, ffn_dim, dropouts, init_std, layer_norm_eps."""
    return {
        "hidden_size": arch.embed_dim,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "intermediate_size": arch.ffn_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": arch.dropout,
        "attention_probs_dropout_prob": arch.attention_dropout,
        "initializer_range": arch.init_std,
        "layer_norm_eps": arch.layer_norm_eps,
    }


def hf_label_fields(classes) -> dict:
    """id2label / label2id / num_labels of a classifier's config.json."""
    names = list(classes or [])
    return {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
            "num_labels": len(names)}


HF_WEIGHT_FILES = ("model.safetensors", "config.json")


def write_hf_folder(out_dir: Path, files: tuple[str, ...], force: bool, weights: dict, config: dict) -> list[Path]:
    """The two files every exported Hugging Face folder has, model.safetensors and config.json, after
    claiming `out_dir` for all of `files` (the caller writes the rest; existing ones need `force`)."""
    out_dir = Path(out_dir)
    claim_output_dir(out_dir, files, force, "d2v export hf")
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_dir / "model.safetensors", "wb") as fh:
        fh.write(save(weights, metadata={"format": "pt"}))  # transformers rejects files without "format"
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return [out_dir / name for name in HF_WEIGHT_FILES]


def vocab_for(num_outputs: int, dict_path: Optional[Path], source: Path) -> tuple[Vocab, list[str]]:
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



# --------------------------------------------------------------------------- fairseq files (both generations)


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



def section(cfg: Any, name: str) -> dict:
    value = cfg.get(name) if hasattr(cfg, "get") else None
    return dict(value) if value is not None else {}


def fairseq_cfg(raw: dict, source: Path) -> dict:
    """The hydra cfg as nested plain dicts (data2vec postdates fairseq's move to hydra, so its files have one)."""
    cfg = raw.get("cfg")
    if cfg is None:
        raise InteropError(f"{source}: no 'cfg' entry. Files with only argparse 'args' predate data2vec "
                           f"(wav2vec 2.0 era) and are not supported")
    return {k: (dict(v) if hasattr(v, "items") else v) for k, v in dict(cfg).items()}



def already_d2v(source: Path, kind: str) -> str:
    use = {"pretrain": "--init it in `d2v finetune`", "ctc": "pass it to `d2v decode`/`evaluate`/`transcribe`"}.get(
        kind, "`d2v export hf` it")
    return (f"{source} is already a d2v checkpoint (kind {kind!r}): no conversion needed. Use it as it is "
            f"({use}), or copy it to <workdir>/runs/NAME/last.pt to refer to it by run name.")

