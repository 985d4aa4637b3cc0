"""BEiT block masking (objective/image_masking.py): block shapes, the mask ratio, determinism."""

from __future__ import annotations

import numpy as np

from d2vcli.objective.image_masking import BlockMaskParams, block_mask, block_masks


def test_mask_ratio_is_the_recipes_120_of_196_and_never_more():
    counts = block_masks(np.random.default_rng(0), 1000).sum(1)
    assert counts.max() == 120  # the budget is a ceiling, never exceeded
    assert 117 < counts.mean() <= 120  # nearly always reached: about 61% of the patches
    assert (counts == 120).mean() > 0.5
    assert counts.min() >= 100  # a round masks nothing only when the budget left is tiny


def test_masks_are_unions_of_rectangles_inside_the_grid_with_bounded_aspect():
    rng = np.random.default_rng(1)
    for _ in range(300):
        blocks: list = []
        mask = block_mask(rng, (14, 14), blocks=blocks)
        rebuilt = np.zeros_like(mask)
        for top, left, h, w in blocks:
            assert 1 <= h < 14 and 1 <= w < 14 and top + h <= 14 and left + w <= 14
            assert 0.2 <= h / w <= 5.0  # aspect in [0.3, 1/0.3] before rounding to whole patches
            rebuilt[top: top + h, left: left + w] = True
        assert np.array_equal(rebuilt, mask)
        top, left, h, w = blocks[0]
        assert 14 <= h * w <= 120  # the first block: area ~ U(16, 120), rounded


def test_blocks_are_large_contiguous_regions_not_scattered_patches():
    """Block masking leaves far fewer masked/unmasked edges than masking the same count at random."""
    rng = np.random.default_rng(2)

    def edges(m):
        return (m[:, 1:] != m[:, :-1]).sum() + (m[1:] != m[:-1]).sum()

    block = np.mean([edges(block_mask(rng)) for _ in range(200)])
    scattered = np.mean([edges(rng.permutation(np.arange(196) < 120).reshape(14, 14)) for _ in range(200)])
    assert block < 0.5 * scattered


def test_masks_follow_from_the_seed_alone():
    a = block_masks(np.random.default_rng(7), 8)
    b = block_masks(np.random.default_rng(7), 8)
    c = block_masks(np.random.default_rng(8), 8)
    assert a.shape == (8, 196) and a.dtype == bool
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len({row.tobytes() for row in a}) == 8  # each image of a batch gets its own mask


def test_small_grids_and_budgets():
    params = BlockMaskParams(num_masking_patches=38, min_num_patches=4)
    counts = block_masks(np.random.default_rng(3), 300, (8, 8), params).sum(1)
    assert counts.max() == 38 and counts.mean() > 36
