"""Span masking (d2vcli/objective/masking.py): the statistics data2vec's recipe relies on.

Run: python -m pytest -q tests/test_masking.py
"""

import numpy as np
import pytest
import torch

from d2vcli.objective.masking import compute_channel_mask, compute_mask_indices


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
