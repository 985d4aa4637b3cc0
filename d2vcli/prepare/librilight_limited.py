"""`d2v prepare librilight-limited`: the Libri-light limited-supervision fine-tuning sets.

    d2v prepare librilight-limited --root /data/librispeech_finetuning [--fold 0]

`librispeech_finetuning/` holds `1h/<fold>/` (10-minute folds) and `9h/`, each a
LibriSpeech-shaped tree (see `librispeech.walk_libri_tree`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from d2vcli.prepare.librispeech import walk_libri_tree
from d2vcli.prepare.outputs import finish
from d2vcli.prepare.pipeline import SplitOptions, id_key, prepare_split, resolve_root
from d2vcli.prepare.result import PrepareError, PrepareSummary
from d2vcli.vocab import Vocab
from d2vcli.workspace import Workspace

LIMITED_SPLITS = ("train-10min", "train-1h", "train-10h")


def prepare_librilight_limited(
    ws: Workspace,
    root: Optional[Path | str] = None,
    fold: int = 0,
    resample: bool = False,
    strict: bool = False,
    workers: int = 0,
) -> PrepareSummary:
    """train-10min (= 1h/<fold>), train-1h (= 1h/*) and train-10h (= 1h/* + 9h/*) from librispeech_finetuning/."""
    path = resolve_root(root, "D2V_LIBRILIGHT_LIMITED", "Libri-light limited", "/path/to/librispeech_finetuning")
    if not (path / "1h").is_dir() and (path / "librispeech_finetuning").is_dir():
        path = path / "librispeech_finetuning"
    if not (path / "1h").is_dir():
        raise PrepareError(f"{path} has no 1h/ directory: pass --root /path/to/librispeech_finetuning "
                           f"(it holds 1h/ and 9h/)")
    folds = sorted((p for p in (path / "1h").iterdir() if p.is_dir()), key=lambda p: id_key(p.name))
    fold_dir = path / "1h" / str(fold)
    if not fold_dir.is_dir():
        raise PrepareError(f"no fold {fold} in {path / '1h'} (folds: {', '.join(p.name for p in folds)}); "
                           f"pass --fold with one of them")
    nine = path / "9h"
    if not nine.is_dir():
        raise PrepareError(f"{path} has no 9h/ directory, needed for train-10h")
    subsets = {"train-10min": [fold_dir], "train-1h": folds, "train-10h": folds + [nine]}
    opts = SplitOptions("librilight-limited", labeled=True, vocab=Vocab.librispeech(), resample=resample,
                        strict=strict)
    results = []
    for split, dirs in subsets.items():
        items, index, skips = walk_libri_tree(dirs)
        results.append(prepare_split(ws, split, items, opts, index.stat_files(), skips, workers,
                                     source=", ".join(str(d) for d in dirs)))
    return finish(ws, "librilight-limited", results, labeled=True)
