"""The d2v checkpoint: one self-describing dict, written atomically, read safely.

Keys (named constants below):

    format_version  int, FORMAT_VERSION; anything else fails loudly (no silent upgrade chain)
    kind            "pretrain" (data2vec student + teacher) or "ctc" (fine-tuned letter CTC)
    config          the resolved config (plain dict, see config.to_dict)
    arch            the model architecture (ModelConfig as a dict): enough to rebuild the network
    normalize       bool, waveform normalization the model was trained with (enforced downstream)
    model           model state_dict
    teacher         EMA teacher state_dict (fp32 shadow weights), pretrain only
    vocab           list of dictionary letters (ctc only): outputs are interpretable with no side file
    optimizer, scheduler, scaler, rng, data_position, step, engine   training state for exact resume
    source          where an imported checkpoint came from (interop), optional

Loading uses `torch.load(weights_only=True)`: tensors, dicts, lists, numbers and
strings only. A file that needs arbitrary unpickling (fairseq's argparse
Namespace, numpy objects...) is refused unless the user passes
--trust-checkpoint, because unpickling runs code from the file.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from d2vcli.errors import UserError
from d2vcli.fileio import atomic_open
from d2vcli.ui import err_console
from d2vcli.vocab import SPECIALS, Vocab

FORMAT_VERSION = 1
KINDS = ("pretrain", "ctc")

FORMAT_VERSION_KEY = "format_version"
KIND_KEY = "kind"
CONFIG_KEY = "config"
ARCH_KEY = "arch"
NORMALIZE_KEY = "normalize"
MODEL_KEY = "model"
TEACHER_KEY = "teacher"
VOCAB_KEY = "vocab"
OPTIMIZER_KEY = "optimizer"
SCHEDULER_KEY = "scheduler"
SCALER_KEY = "scaler"
RNG_KEY = "rng"
DATA_POSITION_KEY = "data_position"
STEP_KEY = "step"
ENGINE_KEY = "engine"
SOURCE_KEY = "source"

TRUST_FLAG = "--trust-checkpoint"


class CheckpointError(UserError):
    """A checkpoint that cannot be used here; the message names the file and the fix."""


def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a kill mid-write leaves the previous file at `path` intact."""
    state = dict(state)
    state.setdefault(FORMAT_VERSION_KEY, FORMAT_VERSION)
    if state.get(KIND_KEY) not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {state.get(KIND_KEY)!r}")
    with atomic_open(Path(path), "wb") as fh:
        torch.save(state, fh)


def load_raw(path: Path, trust: bool = False) -> Any:
    """torch.load with weights_only=True; refuse pickled objects unless `trust`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the write was interrupted or the copy failed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust:
            raise CheckpointError(
                f"{path} contains pickled Python objects that a safe load refuses ({_first_line(e)}).\n"
                f"Loading it would run code stored in the file. If you trust where it came from, pass "
                f"{TRUST_FLAG} to load it with full unpickling."
            ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupt and cannot be read ({_first_line(e)}). "
            f"Use an earlier checkpoint (the run directory keeps the previous ones) or re-download it."
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure here is a corrupt file
        raise CheckpointError(f"{path} is truncated or corrupt ({_first_line(e)})") from None


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
                "ctc": "a fine-tuned CTC model (from `d2v finetune` or `d2v import`)"}
        raise CheckpointError(
            f"{path} is {what.get(kind, repr(kind))}, but {what[expect_kind]} is needed here."
        )
    return state


def checkpoint_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: int) -> None:
    """Delete old step-N.pt files, keeping the newest `keep_last` and multiples of `keep_every`."""
    steps = []
    for p in Path(run_dir).glob("step-*.pt"):
        try:
            steps.append((int(p.stem.split("-", 1)[1]), p))
        except ValueError:
            continue
    steps.sort()
    doomed = steps[:-keep_last] if keep_last > 0 else steps
    for step, p in doomed:
        if keep_every and step % keep_every == 0:
            continue
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def load_ctc_model(path: Path, trust: bool = False):
    """A fine-tuned CTC checkpoint, ready for inference.

    Returns (Data2VecForCTC in eval mode on CPU, Vocab from the checkpoint, normalize flag, state).
    The vocabulary and the normalize flag always come from the checkpoint, never from the data
    directory, so inference cannot pair a model with the wrong dictionary or input scaling.
    """
    from d2vcli.config import ModelConfig, from_dict
    from d2vcli.models.audio import Data2VecForCTC, build_backbone
    from d2vcli.vocab import SPECIALS, Vocab

    path = Path(path)
    state = load_checkpoint(path, expect_kind="ctc", trust=trust)
    letters = list(state.get(VOCAB_KEY) or [])
    if letters[: len(SPECIALS)] == list(SPECIALS):
        letters = letters[len(SPECIALS):]
    if not letters:
        raise CheckpointError(f"{path} has no vocabulary ('{VOCAB_KEY}'); it cannot be decoded. Re-export it.")
    vocab = Vocab(tuple(letters))
    arch = from_dict(state[ARCH_KEY], ModelConfig)
    model = Data2VecForCTC(build_backbone(arch), len(vocab))
    missing, unexpected = model.load_state_dict(state[MODEL_KEY], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: the weights do not fit the architecture stored with them "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}). The file is damaged or was edited."
        )
    model.eval()
    return model, vocab, bool(state.get(NORMALIZE_KEY, True)), state


# --- moved from decode (to be consolidated)


def peek_kind(path: Path) -> Optional[str]:
    """A checkpoint's kind without reading its tensors (memory-mapped load)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable files are simply not candidates
        return None
    return state.get(KIND_KEY) if isinstance(state, dict) else None


def find_ctc_checkpoint(ws, ref: Optional[str | Path] = None) -> Path:
    """`ref` (path, run dir or run name), else the newest fine-tuned run's best.pt (or last.pt)."""
    if ref:
        return ws.find_checkpoint(str(ref))
    candidates = []
    if ws.runs_dir.exists():
        for d in ws.runs_dir.iterdir():
            for name in ("best.pt", "last.pt"):
                if (d / name).is_file():
                    candidates.append(d / name)
                    break
    candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for p in candidates:
        if peek_kind(p) == "ctc":
            # Said on stderr so `d2v transcribe` output stays clean; with several runs, the newest
            # may not be the one the user means.
            err_console.print(f"no model given: using the newest fine-tuned run '{p.parent.name}' ({p}); "
                              f"name another run to choose", markup=False, highlight=False, soft_wrap=True)
            return p.resolve()
    raise FileNotFoundError(
        f"no fine-tuned (CTC) run in {ws.runs_dir}. Fine-tune one with `d2v finetune`, import one with "
        "`d2v import`, or pass a checkpoint: `d2v decode path/to/best.pt`."
    )


def run_name(ws, checkpoint: Path) -> str:
    """decode/<run>/: the run's name for checkpoints inside runs/, else the file's stem."""
    checkpoint = Path(checkpoint).resolve()
    try:
        rel = checkpoint.relative_to(ws.runs_dir.resolve())
        return rel.parts[0]
    except ValueError:
        return checkpoint.stem


def checkpoint_vocab(path: Path, trust: bool) -> Vocab:
    """The checkpoint's dictionary, read without building the model."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - fall back to the full, checked load (clear errors, --trust-checkpoint)
        state = load_checkpoint(path, expect_kind="ctc", trust=trust)
    if not isinstance(state, dict) or state.get(KIND_KEY) != "ctc":
        state = load_checkpoint(path, expect_kind="ctc", trust=trust)  # raises the kind/format error
    letters = list(state.get(VOCAB_KEY) or [])
    if letters[: len(SPECIALS)] == list(SPECIALS):
        letters = letters[len(SPECIALS):]
    return Vocab(tuple(letters))
