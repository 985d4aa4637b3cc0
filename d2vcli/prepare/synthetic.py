"""`d2v prepare synthetic`: generate the synthetic corpus (`d2vcli.synthetic`) and prepare its splits.

    d2v prepare synthetic [--out DIR] [--size demo|tiny] [--seed 0]

The corpus is in LibriSpeech layout, so its splits go through `prepare_librispeech`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Literal, Optional

from d2vcli.prepare.librispeech import prepare_librispeech
from d2vcli.prepare.result import PrepareError, PrepareSummary
from d2vcli.synthetic import SIZES, SPLITS, generate_corpus
from d2vcli.ui import progress
from d2vcli.workspace import Workspace


def generate_for_prepare(generate: Callable, out: Path, size: str, seed: int, sizes: Iterable[str], what: str):
    """`generate(out, size=, seed=, progress=)` with a progress bar; a bad size or a folder that is not
    one of our corpora is a PrepareError naming the fix. Shared by the speech and image corpora."""
    if size not in sizes:
        raise PrepareError(f"unknown {what} size {size!r}; pass --size with one of {', '.join(sizes)}")
    try:
        with progress() as bar:
            return generate(out, size=size, seed=seed, progress=bar)
    except FileExistsError as e:
        raise PrepareError(str(e)) from e


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
    out = Path(out) if out is not None else default_synthetic_dir(ws)
    info = generate_for_prepare(generate_corpus, out, size, seed, SIZES, "synthetic corpus")
    summary = prepare_librispeech(ws, info.root, splits=SPLITS, strict=strict, workers=workers,
                                  command="synthetic")
    summary.notes.append(f"corpus: {info.root} (size {size}, seed {seed})")
    summary.notes.append(f"LM text: {info.lm_text}")
    return summary
