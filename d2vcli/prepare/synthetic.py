"""`d2v prepare synthetic`: generate the synthetic corpus (`d2vcli.synthetic`) and prepare its splits.

    d2v prepare synthetic [--out DIR] [--size demo|tiny] [--seed 0]

The corpus is in LibriSpeech layout, so its splits go through `prepare_librispeech`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from d2vcli.prepare.librispeech import prepare_librispeech
from d2vcli.prepare.result import PrepareError, PrepareSummary
from d2vcli.synthetic import SIZES, SPLITS, generate_corpus
from d2vcli.ui import progress
from d2vcli.workspace import Workspace


def default_synthetic_dir(ws: Workspace) -> Path:
    return ws.root / "corpus" / "synthetic"


def prepare_synthetic(
    ws: Workspace,
    out: Optional[Path | str] = None,
    size: Literal["demo", "tiny"] = "demo",
    seed: int = 0,
    strict: bool = False,
    workers: int = 0,
) -> PrepareSummary:
    """Generate the synthetic corpus (d2vcli.synthetic) and prepare its five splits."""
    if size not in SIZES:
        raise PrepareError(f"unknown synthetic corpus size {size!r}; pass --size with one of {', '.join(SIZES)}")
    out = Path(out) if out is not None else default_synthetic_dir(ws)
    try:
        with progress() as bar:
            info = generate_corpus(out, size=size, seed=seed, progress=bar)
    except FileExistsError as e:
        raise PrepareError(str(e)) from e
    summary = prepare_librispeech(ws, info.root, splits=SPLITS, strict=strict, workers=workers,
                                  command="synthetic")
    summary.notes.append(f"corpus: {info.root} (size {size}, seed {seed})")
    summary.notes.append(f"LM text: {info.lm_text}")
    return summary
