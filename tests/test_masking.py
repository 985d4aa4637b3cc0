"""Span masking (d2vcli/objective/masking.py): the statistics data2vec's recipe relies on.

Run: python -m pytest -q tests/test_masking.py
"""

import numpy as np
import pytest
import torch

from d2vcli.objective.masking import compute_block_mask, compute_channel_mask, compute_mask_indices


def test_pretraining_coverage_is_about_49_percent():
    # 0.65 / 10 with overlapping spans covers about 1 - (1 - 0.065)^10 = 49% of the frames (paper: ~49%).
    rng = np.random.default_rng(0)
    masks = np.concatenate([compute_mask_indices((8, 500), None, 0.65, 10, 1, False, rng) for _ in range(50)])
    assert masks.shape == (400, 500)
    assert 0.45 <= masks.mean() <= 0.53


def test_same_count_per_row_and_batch_minimum():
    rng = np.random.default_rng(1)
    free = compute_mask_indices((6, 300), None, 0.65, 10, 1, False, np.random.default_rng(1))
    same = compute_mask_indices((6, 300), None, 0.65, 10, 1, True, rng)
    counts = same.sum(1)
    assert len(set(counts)) == 1
    # The same generator state draws the same spans, so rows keep a subset of them: the batch minimum.
    assert counts[0] == free.sum(1).min()
    assert not (same & ~free).any()


def test_spans_are_mask_length_runs():
    # Without subsampling, every run of masked frames is a union of whole 10-frame spans (or clipped at the end).
    mask = compute_mask_indices((20, 200), None, 0.2, 10, 1, False, np.random.default_rng(2))
    for row in mask:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]])))
        for start, end in zip(edges[::2], edges[1::2]):
            assert end - start >= 10 or end == len(row)


def test_at_least_min_masks_even_when_probability_rounds_to_zero():
    mask = compute_mask_indices((50, 100), None, 0.01, 10, 1, True, np.random.default_rng(3))
    assert (mask.sum(1) >= 1).all()


def test_respects_padding():
    pad = np.zeros((4, 200), dtype=bool)
    pad[1, 120:] = True
    pad[3, 60:] = True
    for seed in range(20):
        mask = compute_mask_indices((4, 200), torch.from_numpy(pad), 0.65, 10, 1, True, np.random.default_rng(seed))
        assert not (mask & pad).any()
        assert len(set(mask.sum(1))) == 1


def test_deterministic_given_the_generator():
    a = compute_mask_indices((4, 100), None, 0.65, 10, 1, True, np.random.default_rng(7))
    b = compute_mask_indices((4, 100), None, 0.65, 10, 1, True, np.random.default_rng(7))
    c = compute_mask_indices((4, 100), None, 0.65, 10, 1, True, np.random.default_rng(8))
    assert (a == b).all() and not (a == c).all()
    with pytest.raises(ValueError, match="Generator"):
        compute_mask_indices((4, 100), None, 0.65, 10, 1, True, None)


def test_channel_mask():
    # Fine-tuning: int(0.5 * 768 / 64 + U) = 6 spans of 64 channels per row, overlapping, same count per row.
    mask = compute_channel_mask(16, 768, 0.5, 64, np.random.default_rng(4))
    assert mask.shape == (16, 768)
    assert len(set(mask.sum(1))) == 1
    assert 0 < mask.sum(1)[0] <= 6 * 64
    # min_masks is 0 for channels: a tiny probability masks nothing.
    assert not compute_channel_mask(4, 64, 0.001, 8, np.random.default_rng(5)).any()


def test_never_masks_a_whole_utterance():
    # fairseq refuses to hide every frame of an utterance; so do we, with a message that says what to change.
    raised = 0
    for seed in range(20):
        try:
            mask = compute_mask_indices((1, 5), None, 0.65, 10, 1, True, np.random.default_rng(seed))
        except ValueError as e:
            assert "min_sample_size" in str(e)
            raised += 1
        else:
            assert 0 < mask.sum() < 5
    assert raised > 0


# ----------------------------------------------------------------------------- data2vec 2.0 block masks


def _runs(row: np.ndarray) -> list[int]:
    """Lengths of the runs of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], row.astype(int), [0]]))
    return list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))


def test_block_mask_masks_exactly_floor_p_times_t_in_every_clone():
    # The recipe's counts for a 10 s crop (499 frames): 249 at base's 0.5, 274 at large's 0.55.
    for p, adjust, expect in ((0.5, 0.05, 249), (0.55, 0.1, 274)):
        mask = compute_block_mask((64, 499), None, p, 5, adjust, np.random.default_rng(0))
        assert mask.dtype == bool and (mask.sum(1) == expect).all()


def test_block_mask_spans_are_centred_blocks_of_mask_length():
    # Sparse centres: almost every block stands alone, so runs are mask_length long (or joined blocks).
    mask = compute_block_mask((200, 1000), None, 0.05, 5, 0.0, np.random.default_rng(2))
    runs = [n for row in mask for n in _runs(row)]
    assert max(set(runs), key=runs.count) == 5
    assert sum(n for n in runs if n >= 5) / sum(runs) > 0.85
    # mask_prob_adjust draws more centres before the exact-count correction, so fewer frames are
    # masked one at a time to make up the count.
    def single_share(adjust):
        m = compute_block_mask((200, 500), None, 0.5, 5, adjust, np.random.default_rng(3))
        runs = [n for row in m for n in _runs(row)]
        return runs.count(1) / sum(runs)
    assert single_share(0.1) < single_share(0.0)


def test_block_mask_respects_padding_and_is_deterministic():
    pad = np.zeros((4, 100), dtype=bool)
    pad[1, 80:] = True
    pad[3, 60:] = True
    mask = compute_block_mask((4, 100), pad, 0.5, 5, 0.05, np.random.default_rng(4))
    assert not (mask & pad).any()
    assert (mask.sum(1) == 30).all()  # the batch minimum: floor(0.5 x 60) in every row
    again = compute_block_mask((4, 100), pad, 0.5, 5, 0.05, np.random.default_rng(4))
    assert np.array_equal(mask, again)
