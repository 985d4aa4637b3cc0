"""The d2v checkpoint: one self-describing dict, written atomically, read safely.

Keys (named constants below):

    format_version  int, FORMAT_VERSION; anything else fails loudly (no silent upgrade chain)
    kind            "pretrain" (data2vec student + teacher) or "ctc" (fine-tuned letter CTC); for images
                    "vision-pretrain" (ViT student + regression head) or "vision-cls" (ViT classifier); for
                    text "text-pretrain" (RoBERTa-style student + regression head) or "text-cls" (sentence classifier)
    config          the resolved config (plain dict, see config.to_dict)
    arch            the model architecture (ModelConfig as a dict; for vision kinds models.vision.VisionConfig,
                    for text kinds models.text.TextConfig)
    normalize       bool, waveform normalization the model was trained with (enforced downstream)
    model           model state_dict
    teacher         EMA teacher state_dict (fp32 shadow weights), pretrain only
    vocab           list of dictionary letters (ctc only): outputs are interpretable with no side file
    classes         list of class names (vision-cls, text-cls), in the order of the classifier's outputs
                    (a text regression task has one output and one name)
    task            text-cls only, optional: the labeled task's task.json (name, kind, num_classes, metric...)
    tokenizer       text kinds, optional: the tokenizer the ids belong to (interop_tokenizer.py's entries:
                    a sentencepiece model's bytes, or an imported HF model's tokenizer files)
    optimizer, scheduler, scaler, rng, data_position, step, engine   training state for exact resume
    source          where an imported checkpoint came from (interop), optional

Loading uses `torch.load(weights_only=True)`: tensors, dicts, lists, numbers and
strings only. A file that needs arbitrary unpickling (fairseq's argparse
Namespace, numpy objects...) is refused unless the user passes
--trust-checkpoint, because unpickling runs code from the file.

This module owns the format: `make_state` builds every checkpoint (engine, interop, demo),
`load_checkpoint`/`peek_kind`/`arch_of`/`vocab_of` read them, and the run-directory rules
live here too: `latest` (what `--resume` continues), best.pt over last.pt, and finding a
checkpoint by path, run directory or run name. `d2vcli.models.loading` builds the network.
"""

from __future__ import annotations

import errno
import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from d2vcli.config import ModelConfig, from_dict
from d2vcli.errors import UserError
from d2vcli.fileio import atomic_open
from d2vcli.ui import err_console
from d2vcli.vocab import SPECIALS, Vocab

FORMAT_VERSION = 1
KINDS = ("pretrain", "ctc", "vision-pretrain", "vision-cls", "text-pretrain", "text-cls")
VISION_KINDS = ("vision-pretrain", "vision-cls")
TEXT_KINDS = ("text-pretrain", "text-cls")

FORMAT_VERSION_KEY = "format_version"
KIND_KEY = "kind"
CONFIG_KEY = "config"
ARCH_KEY = "arch"
NORMALIZE_KEY = "normalize"
MODEL_KEY = "model"
TEACHER_KEY = "teacher"
VOCAB_KEY = "vocab"
CLASSES_KEY = "classes"
OPTIMIZER_KEY = "optimizer"
SCHEDULER_KEY = "scheduler"
SCALER_KEY = "scaler"
RNG_KEY = "rng"
DATA_POSITION_KEY = "data_position"
STEP_KEY = "step"
ENGINE_KEY = "engine"
SOURCE_KEY = "source"
TEXT_TASK_KEY = "task"
TOKENIZER_KEY = "tokenizer"

TRUST_FLAG = "--trust-checkpoint"


class CheckpointError(UserError):
    """A checkpoint that cannot be used here; the message names the file and the fix."""


def _tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor in a (nested) state: what torch.save's uncompressed archive holds."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _disk_full(path: Path, needed: int, cause: str = "") -> CheckpointError:
    free = shutil.disk_usage(path.parent).free
    return CheckpointError(
        f"cannot write checkpoint {path}: it needs about {needed / 2**30:.2f} GB and {path.parent} has "
        f"{free / 2**30:.2f} GB free{cause}. The checkpoints already there are intact. Free disk space and run "
        f"the command again; a training run continues with --resume (and keeps fewer rolling checkpoints "
        f"with --set train.keep_last=1).")


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a kill mid-write leaves the previous file at `path` intact.

    A disk without room for it (checked first, and when the write fails) is a CheckpointError that
    says how much is needed and free, instead of torch's "unexpected pos" from a short write."""
    path = Path(path)
    state = dict(state)
    state.setdefault(FORMAT_VERSION_KEY, FORMAT_VERSION)
    if state.get(KIND_KEY) not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {state.get(KIND_KEY)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    needed = _tensor_bytes(state) + 2**20  # the archive's own records, generously
    if shutil.disk_usage(path.parent).free < needed:
        raise _disk_full(path, needed)
    try:
        with atomic_open(path, "wb") as fh:
            torch.save(state, fh)
    except (OSError, RuntimeError) as e:
        short_write = isinstance(e, RuntimeError) and "unexpected pos" in str(e)  # torch's zip writer
        if short_write or getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(path, needed, f" (the write failed: {_first_line(e)})") from None
        raise


# What torch.save writes first in its legacy (pre-zip) format: the pickled magic number.
_LEGACY_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)


def container_problem(path: Path) -> Optional[str]:
    """Why `path` cannot be a torch.save file at all (None when its container looks right).

    torch.save writes a zip archive holding `<name>/data.pkl` (or, in its legacy format, a
    pickle stream that starts with a magic number). Checking the container first keeps random
    bytes, text and YAML from reaching the unpickler, whose errors for them read like "needs
    unpickling" and would steer users to --trust-checkpoint.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                if any(n.endswith("data.pkl") for n in z.namelist()):
                    return None
            return "it is a zip archive without the data.pkl of a PyTorch checkpoint"
        with open(path, "rb") as fh:
            head = fh.read(512)
    except (OSError, zipfile.BadZipFile) as e:
        return f"it cannot be read ({_first_line(e)})"
    if head.startswith(_LEGACY_MAGIC):
        return None
    if head.startswith(b"PK"):
        return "it is a damaged zip archive (truncated or corrupt)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "its bytes are neither a PyTorch zip archive nor a pickle (corrupt, or another format)"
    if "\x00" not in text:
        return "it is a text file (YAML, JSON or similar), not a PyTorch checkpoint"
    return "its bytes are neither a PyTorch zip archive nor a pickle (corrupt, or another format)"


def load_raw(path: Path, trust: bool = False) -> Any:
    """torch.load with weights_only=True; refuse pickled objects unless `trust`.

    Three diagnoses, kept apart: not a checkpoint at all (wrong file, garbage), a checkpoint that
    is truncated or corrupt, and a sound checkpoint whose pickle needs classes a safe load does
    not allow. Only the last gets the --trust-checkpoint advice.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the write was interrupted or the copy failed")
    problem = container_problem(path)
    if problem:
        raise CheckpointError(
            f"{path} is not a checkpoint or is corrupt: {problem}. Check the path; use an earlier checkpoint "
            f"(a run directory keeps the previous ones) or re-download the file."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):
            raise CheckpointError(_corrupt(path, e)) from None
        if not trust:
            raise CheckpointError(
                f"{path} contains pickled Python objects that a safe load refuses ({_unsafe_global(e)}).\n"
                f"Loading it would run code stored in the file. If you trust where it came from, pass "
                f"{TRUST_FLAG} to load it with full unpickling."
            ) from None
    except Exception as e:  # noqa: BLE001 - a sound container whose contents fail to load is corrupt
        raise CheckpointError(_corrupt(path, e)) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure here is a corrupt file
        raise CheckpointError(_corrupt(path, e)) from None


def _corrupt(path: Path, e: BaseException) -> str:
    return (f"{path} is truncated or corrupt and cannot be read ({_first_line(e)}). "
            f"Use an earlier checkpoint (the run directory keeps the previous ones) or re-download it.")


def _unsafe_global(e: BaseException) -> str:
    """'GLOBAL argparse.Namespace' out of torch's long weights_only message."""
    text = str(e)
    i = text.find("Unsupported global")
    return text[i:].splitlines()[0].split(" was not")[0] if i >= 0 else _first_line(e)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def load_checkpoint(path: Path, expect_kind: Optional[str] = None, trust: bool = False) -> dict:
    """Load a d2v checkpoint and check its version and kind."""
    path = Path(path)
    state = load_raw(path, trust=trust)
    if not isinstance(state, dict) or FORMAT_VERSION_KEY not in state:
        hint = ""
        if isinstance(state, dict) and ("cfg" in state or "args" in state) and "model" in state:
            hint = f" It looks like a fairseq checkpoint: convert it with `d2v import fairseq {path}`."
        elif isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
            hint = " It looks like a bare state dict (e.g. pytorch_model.bin): use `d2v import hf DIR` on its folder."
        raise CheckpointError(f"{path} is not a d2v checkpoint.{hint}")
    version = state[FORMAT_VERSION_KEY]
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}; this d2vcli reads version {FORMAT_VERSION}. "
            f"Use the d2vcli release that wrote it."
        )
    kind = state.get(KIND_KEY)
    if expect_kind and kind != expect_kind:
        what = {"pretrain": "a pretrained data2vec model (from `d2v pretrain` or `d2v import`)",
                "ctc": "a fine-tuned CTC model (from `d2v finetune` or `d2v import`)",
                "vision-pretrain": "a pretrained data2vec image model (from `d2v pretrain --preset vision-*` "
                                   "or `d2v import hf`)",
                "vision-cls": "an image classifier (from `d2v import hf`)",
                "text-pretrain": "a pretrained data2vec text model (from `d2v pretrain --preset text-*` "
                                 "or `d2v import`)",
                "text-cls": "a text classifier (from `d2v finetune --preset glue-*` or `d2v import hf`)"}
        raise CheckpointError(
            f"{path} is {what.get(kind, repr(kind))}, but {what[expect_kind]} is needed here."
        )
    return state


def checkpoint_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def peek_kind(path: Path) -> Optional[str]:
    """A checkpoint's kind without reading its tensors (memory-mapped load); None if unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable files are simply not candidates
        return None
    return state.get(KIND_KEY) if isinstance(state, dict) else None


# ----------------------------------------------------------------------------- building and reading a state


def make_state(kind: str, *, config: dict, arch: dict, normalize: bool, model: dict,
               teacher: Optional[dict] = None, vocab: Optional[Sequence[str]] = None,
               source: Any = None, classes: Optional[Sequence[str]] = None, task: Optional[dict] = None,
               tokenizer: Optional[dict] = None, **training: Any) -> dict:
    """The one constructor of a checkpoint dict.

    `kind` "pretrain" carries the EMA `teacher` (may be None for a random or student-only
    model); "ctc" carries the `vocab` letters (specials excluded); "vision-cls" and "text-cls" the `classes`
    names (one per output); "text-cls" also its labeled `task` description when known; text kinds their
    `tokenizer` entry (interop_tokenizer) when known.
    `training` holds the engine's
    resume keys (optimizer, scheduler, scaler, rng, data_position, step, engine) by their key names.
    """
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    if kind == "ctc" and not vocab:
        raise ValueError("a ctc checkpoint needs its vocabulary")
    if kind in ("vision-cls", "text-cls") and not classes:
        raise ValueError(f"a {kind} checkpoint needs its class names")
    state = {FORMAT_VERSION_KEY: FORMAT_VERSION, KIND_KEY: kind, CONFIG_KEY: config, ARCH_KEY: arch,
             NORMALIZE_KEY: bool(normalize), MODEL_KEY: model}
    if kind == "ctc":
        state[VOCAB_KEY] = list(vocab)
    elif kind in ("vision-cls", "text-cls"):
        state[CLASSES_KEY] = list(classes)
        if kind == "text-cls" and task is not None:
            state[TEXT_TASK_KEY] = dict(task)
    elif teacher is not None:
        state[TEACHER_KEY] = teacher
    if tokenizer is not None and kind in TEXT_KINDS:
        state[TOKENIZER_KEY] = tokenizer
    if source is not None:
        state[SOURCE_KEY] = source
    unknown = set(training) - TRAINING_KEYS
    if unknown:
        raise ValueError(f"unknown checkpoint keys {sorted(unknown)}")
    state.update(training)
    return state


TRAINING_KEYS = {OPTIMIZER_KEY, SCHEDULER_KEY, SCALER_KEY, RNG_KEY, DATA_POSITION_KEY, STEP_KEY, ENGINE_KEY}


def arch_of(state: dict, path: Path | str = "checkpoint") -> ModelConfig:
    """The architecture stored with the weights."""
    if ARCH_KEY not in state:
        raise CheckpointError(f"{path} has no '{ARCH_KEY}' entry; it is not a complete d2v checkpoint")
    return from_dict(state[ARCH_KEY], ModelConfig)


def vocab_of(state: dict, path: Path | str = "checkpoint") -> Vocab:
    """A ctc checkpoint's letter dictionary (older files may list the specials first)."""
    letters = list(state.get(VOCAB_KEY) or [])
    if letters[: len(SPECIALS)] == list(SPECIALS):
        letters = letters[len(SPECIALS):]
    if not letters:
        raise CheckpointError(f"{path} has no vocabulary ('{VOCAB_KEY}'); it cannot be decoded. Re-export it.")
    return Vocab(tuple(letters))


def checkpoint_vocab(path: Path, trust: bool = False) -> Vocab:
    """A ctc checkpoint's dictionary, read without loading its tensors into memory."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - fall back to the full, checked load (clear errors, --trust-checkpoint)
        state = load_checkpoint(path, expect_kind="ctc", trust=trust)
    if not isinstance(state, dict) or state.get(KIND_KEY) != "ctc":
        state = load_checkpoint(path, expect_kind="ctc", trust=trust)  # raises the kind/format error
    return vocab_of(state, path)


# ----------------------------------------------------------------------------- run directories

LAST = "last.pt"
BEST = "best.pt"


def step_of(path: Path) -> Optional[int]:
    """N for step-N.pt, else None."""
    stem = Path(path).stem
    if not stem.startswith("step-") or not stem[5:].isdigit():
        return None
    return int(stem[5:])


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The run's step-N.pt files as (N, path), oldest first."""
    found = [(step_of(p), p) for p in Path(run_dir).glob("step-*.pt")]
    return sorted((n, p) for n, p in found if n is not None)


def latest(run_dir: Path) -> Optional[Path]:
    """The checkpoint `--resume` continues from: last.pt, else the newest step-N.pt, else None."""
    run_dir = Path(run_dir)
    if (run_dir / LAST).is_file():
        return run_dir / LAST
    steps = step_checkpoints(run_dir) if run_dir.is_dir() else []
    return steps[-1][1] if steps else None


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: int) -> None:
    """Delete old step-N.pt files, keeping the newest `keep_last` and multiples of `keep_every`."""
    steps = step_checkpoints(run_dir)
    doomed = steps[:-keep_last] if keep_last > 0 else steps
    for step, p in doomed:
        if keep_every and step % keep_every == 0:
            continue
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def run_names(ws) -> list[str]:
    return sorted(d.name for d in ws.runs_dir.iterdir() if d.is_dir()) if ws.runs_dir.exists() else []


def find_checkpoint(ws, ref: str | Path, prefer: str = BEST) -> Path:
    """A checkpoint from a file path, a run directory or a run name in workspace `ws`.

    In a directory, `prefer` (best.pt) wins over last.pt.
    """
    p = Path(ref).expanduser()
    candidates = [p] if p.suffix else []
    for d in (p, ws.run_dir(str(ref))):
        candidates += [d / prefer, d / LAST]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    runs = run_names(ws)
    hint = f" Runs in {ws.runs_dir}: {', '.join(runs)}." if runs else ""
    raise FileNotFoundError(f"no checkpoint found for '{ref}' (tried a file, a run directory and a run name).{hint}")


def run_checkpoints(ws) -> list[Path]:
    """Each run's best.pt (or, without one, its last.pt), the newest first."""
    found = [next((p for p in (ws.run_dir(n) / BEST, ws.run_dir(n) / LAST) if p.is_file()), None)
             for n in run_names(ws)]
    return sorted((p for p in found if p is not None), key=lambda p: p.stat().st_mtime, reverse=True)


# The kinds `d2v evaluate` scores: speech CTC, image and text classifiers.
CLASSIFIER_KINDS = ("ctc", "vision-cls", "text-cls")


def newest_classifier_kind(ws) -> Optional[str]:
    """The kind of the newest run that holds a classifier (CLASSIFIER_KINDS): what `d2v evaluate` with no
    checkpoint scores. None when no run has one."""
    return next((k for p in run_checkpoints(ws) if (k := peek_kind(p)) in CLASSIFIER_KINDS), None)


def newest_checkpoint(ws, kind: str, what: str) -> Optional[Path]:
    """The newest run's best.pt (or last.pt) of checkpoint kind `kind`, None when no run has one.

    Said on stderr (so `d2v transcribe` output stays clean) as "the newest `what` run": with several
    runs, the newest may not be the one the user means."""
    for p in run_checkpoints(ws):
        if peek_kind(p) == kind:
            err_console.print(f"no model given: using the newest {what} run '{p.parent.name}' ({p}); "
                              f"name another run to choose", markup=False, highlight=False, soft_wrap=True)
            return p.resolve()
    return None


def find_ctc_checkpoint(ws, ref: Optional[str | Path] = None) -> Path:
    """`ref` (path, run dir or run name), else the newest fine-tuned run's best.pt (or last.pt)."""
    if ref:
        return find_checkpoint(ws, ref)
    found = newest_checkpoint(ws, "ctc", "fine-tuned")
    if found is None:
        raise FileNotFoundError(
            f"no fine-tuned (CTC) run in {ws.runs_dir}. Fine-tune one with `d2v finetune`, import one with "
            "`d2v import`, or pass a checkpoint: `d2v decode path/to/best.pt`."
        )
    return found


def run_name(ws, checkpoint: Path) -> str:
    """decode/<run>/: the run's name for checkpoints inside runs/, else the file's stem."""
    checkpoint = Path(checkpoint).resolve()
    try:
        rel = checkpoint.relative_to(ws.runs_dir.resolve())
        return rel.parts[0]
    except ValueError:
        return checkpoint.stem
