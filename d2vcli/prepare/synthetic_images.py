"""`d2v prepare synthetic-images`: generate the synthetic image corpus (`d2vcli.synthetic_images`) and prepare it.

    d2v prepare synthetic-images [--out DIR] [--size demo|tiny] [--seed 0]

The corpus is an ImageFolder tree, so its splits (pool, train, val, test) go through `prepare_images`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from d2vcli.prepare.images import ImagePrepareSummary, prepare_images
from d2vcli.prepare.synthetic import generate_for_prepare
from d2vcli.synthetic_images import SIZES, SPLITS, generate_image_corpus
from d2vcli.workspace import Workspace


def default_synthetic_images_dir(ws: Workspace) -> Path:
    return ws.root / "corpus" / "synthetic-images"


def prepare_synthetic_images(
    ws: Workspace,
    out: Optional[Path | str] = None,
    size: Literal["demo", "tiny"] = "demo",
    seed: int = 0,
    strict: bool = False,
    workers: int = 0,
) -> ImagePrepareSummary:
    """Generate the synthetic image corpus and prepare its four splits."""
    out = Path(out) if out is not None else default_synthetic_images_dir(ws)
    info = generate_for_prepare(generate_image_corpus, out, size, seed, SIZES, "synthetic image corpus")
    summary = prepare_images(ws, info.root, splits=list(SPLITS), strict=strict, workers=workers)
    summary.command = "synthetic-images"
    summary.notes.append(f"corpus: {info.root} (size {size}, seed {seed}); pretrain on 'pool', "
                         f"fine-tune or probe on 'train'")
    return summary
