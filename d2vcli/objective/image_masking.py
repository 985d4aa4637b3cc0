"""BEiT's block-wise masking of image patches, as data2vec 1.0 vision uses it.

data2vec paper (arXiv 2202.03555) §4.1: images are masked with BEiT's block-wise strategy.
The algorithm and its parameters are the BEiT repo's (`data2vec_vision/beit/masking_generator.py`,
`datasets.py`; see docs/images.md):

    while fewer than `num_masking_patches` are masked:
        up to 10 tries: a rectangle of area ~ U(min_num_patches, remaining) and aspect ratio
        exp(U(log min_aspect, log max_aspect)), h = round(sqrt(area * aspect)),
        w = round(sqrt(area / aspect)), both smaller than the grid, at a uniform position;
        it is kept if it masks at least one new patch and no more than the remaining budget
        stop when a round of tries masks nothing

The count is at most `num_masking_patches` (120 of 196 for ViT-B/L, about 61%) and can be
fewer: it varies per image. Masks are drawn from a numpy Generator, so a batch's masks follow
from its seed alone (`block_masks(np.random.default_rng(seed), ...)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

ATTEMPTS = 10  # rectangles tried per round (BEiT's `_mask`)


@dataclass(frozen=True)
class BlockMaskParams:
    """The recipe's masking: 120 patches of a 14x14 grid, blocks of at least 16 patches, aspect 0.3 to 1/0.3."""

    num_masking_patches: int = 120
    min_num_patches: int = 16
    max_num_patches: Optional[int] = None  # None: no cap beyond the remaining budget (the recipe passes 196)
    min_aspect: float = 0.3
    max_aspect: Optional[float] = None  # None: 1 / min_aspect


def _uniform(rng: np.random.Generator, a: float, b: float) -> float:
    """Python's random.uniform: a + (b - a) U[0, 1), also when b < a (the last blocks of a mask)."""
    return a + (b - a) * rng.random()


def _add_block(rng: np.random.Generator, mask: np.ndarray, max_patches: int, p: BlockMaskParams,
               blocks: Optional[list]) -> int:
    """One round of up to ATTEMPTS rectangles; returns how many patches it newly masked."""
    rows, cols = mask.shape
    log_aspect = (math.log(p.min_aspect), math.log(p.max_aspect or 1 / p.min_aspect))
    added = 0
    for _ in range(ATTEMPTS):
        area = _uniform(rng, p.min_num_patches, max_patches)
        aspect = math.exp(_uniform(rng, *log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w < cols and h < rows:
            top = int(rng.integers(0, rows - h + 1))
            left = int(rng.integers(0, cols - w + 1))
            window = mask[top: top + h, left: left + w]
            new = h * w - int(window.sum())
            if 0 < new <= max_patches:
                window[:] = True
                added += new
                if blocks is not None:
                    blocks.append((top, left, h, w))
        if added > 0:
            break
    return added


def block_mask(rng: np.random.Generator, grid: tuple[int, int] = (14, 14), params: BlockMaskParams = BlockMaskParams(),
               blocks: Optional[list] = None) -> np.ndarray:
    """One image's mask, (rows, cols) bool, True = masked. `blocks`, if given, receives each accepted
    rectangle as (top, left, h, w)."""
    mask = np.zeros(grid, dtype=bool)
    count = 0
    while count < params.num_masking_patches:
        budget = params.num_masking_patches - count
        if params.max_num_patches is not None:
            budget = min(budget, params.max_num_patches)
        added = _add_block(rng, mask, budget, params, blocks)
        if added == 0:
            break
        count += added
    return mask


def block_masks(rng: np.random.Generator, batch: int, grid: tuple[int, int] = (14, 14),
                params: BlockMaskParams = BlockMaskParams()) -> np.ndarray:
    """A batch's masks, (batch, rows * cols) bool in the patch order of models.vision.PatchEmbed (row-major)."""
    return np.stack([block_mask(rng, grid, params).reshape(-1) for _ in range(batch)])
