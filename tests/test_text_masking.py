"""Span masking of token batches: fairseq MaskTokensDataset's statistics, padding, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from d2vcli.objective.text_masking import BERT_MASKING, TextMaskParams, mask_tokens, span_mask

SPECIALS = (0, 1, 2, 3)
VOCAB, MASK_ID, PAD = 200, 199, 1


def batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.full((len(lengths), T), PAD, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(4, MASK_ID, (n,), generator=g)
        tokens[b, 0] = 0
    return tokens, tokens.eq(PAD)


def runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of the runs of True in a 1-D bool array."""
    padded = np.concatenate([[False], row, [False]]).astype(int)
    d = np.diff(padded)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def test_recipe_masks_35_percent_in_spans_of_4_all_replaced_by_mask():
    tokens, pm = batch([512] * 64)
    masked, mask = mask_tokens(tokens, pm, np.random.default_rng(0), TextMaskParams(), SPECIALS, VOCAB, MASK_ID)
    # Expected coverage of 0.35 n / 4 spans of 4 with overlaps merged: 1 - (1 - 4/n)^(0.35 n / 4) ~ 0.295.
    share = mask.float().mean().item()
    expected = 1 - (1 - 4 / 512) ** (0.35 * 512 / 4)
    assert abs(share - expected) < 0.01
    assert torch.equal(masked[mask], torch.full_like(masked[mask], MASK_ID))  # no 80/10/10
    assert torch.equal(masked[~mask], tokens[~mask])
    # Every run of masked positions is a union of whole spans: at least 4 long, except at a row's end.
    for row in mask.numpy():
        assert all(length >= 4 or start + length == len(row) for start, length in runs(row))


def test_span_count_is_the_probabilistic_rounding_of_p_n_over_length():
    params = TextMaskParams(mask_prob=0.35, span_length=1)
    counts = [span_mask(np.random.default_rng(s), 100, params).sum() for s in range(400)]
    assert set(counts) == {35}  # int(0.35 x 100 + U[0, 1)) is always 35
    counts = [span_mask(np.random.default_rng(s), 10, TextMaskParams(mask_prob=0.35, span_length=4)).sum()
              for s in range(2000)]
    assert set(counts) <= {0, 1, 2, 3, 4}  # int(0.875 + U): one span of 4 (clipped) or none
    assert abs(np.mean([c > 0 for c in counts]) - 0.875) < 0.03
    counts = [span_mask(np.random.default_rng(s), 10, TextMaskParams(mask_prob=0.25, span_length=1)).sum()
              for s in range(4000)]
    assert abs(np.mean(counts) - 2.5) < 0.05  # int(2.5 + U): 2 or 3 with equal odds


def test_spans_are_clipped_at_the_sequence_end():
    # One span of 4 in 6 tokens (int(0.35 x 6 / 4 + U) is 0 or 1): a start in the last 3 is cut at the end.
    params = TextMaskParams(span_length=4)
    seen = set()
    for s in range(300):
        chosen = span_mask(np.random.default_rng(s), 6, params)
        assert chosen.shape == (6,)
        for start, length in runs(chosen):
            assert length == min(4, 6 - start)
            seen.add(start)
    assert seen == set(range(6))


def test_bert_80_10_10_proportions():
    tokens, pm = batch([400] * 100)
    masked, mask = mask_tokens(tokens, pm, np.random.default_rng(1), BERT_MASKING, SPECIALS, VOCAB, MASK_ID)
    chosen = mask.sum().item()
    assert abs(chosen / mask.numel() - 0.15) < 0.005
    as_mask = (masked[mask] == MASK_ID).float().mean().item()
    unchanged = (masked[mask] == tokens[mask]).float().mean().item()
    random = 1 - as_mask - unchanged
    assert abs(as_mask - 0.8) < 0.02 and abs(unchanged - 0.1 - 0.1 / 195) < 0.02 and abs(random - 0.1) < 0.02
    replaced = masked[mask & (masked != MASK_ID) & (masked != tokens)]
    assert replaced.numel() > 0 and replaced.min() >= 4 and replaced.max() < MASK_ID  # never a special or <mask>
    assert torch.equal(masked[~mask], tokens[~mask])


@pytest.mark.parametrize("keep,rand", [(0.2, 0.0), (0.0, 0.3)])
def test_leave_unmasked_and_random_alone(keep, rand):
    tokens, pm = batch([300] * 100)
    params = TextMaskParams(leave_unmasked_prob=keep, random_token_prob=rand)
    masked, mask = mask_tokens(tokens, pm, np.random.default_rng(2), params, SPECIALS, VOCAB, MASK_ID)
    sel_masked, sel_tokens = masked[mask], tokens[mask]
    as_mask = (sel_masked == MASK_ID).float().mean().item()
    assert abs(as_mask - (1 - keep - rand)) < 0.02
    if keep:
        assert torch.equal(sel_masked[sel_masked != MASK_ID], sel_tokens[sel_masked != MASK_ID])
    if rand:
        assert abs((sel_masked != MASK_ID).float().mean().item() - rand) < 0.02


def test_padding_is_never_masked_and_the_share_follows_each_row_length():
    tokens, pm = batch([64, 40, 9, 1] * 50)
    masked, mask = mask_tokens(tokens, pm, np.random.default_rng(3), BERT_MASKING, SPECIALS, VOCAB, MASK_ID)
    assert not mask[pm].any()
    assert torch.equal(masked[pm], tokens[pm])
    share_40 = mask[1::4, :40].float().mean().item()
    assert abs(share_40 - 0.15) < 0.02  # the rate is over the real tokens, not the padded width


def test_start_token_can_be_masked_like_fairseq():
    tokens, pm = batch([32] * 200)
    _, mask = mask_tokens(tokens, pm, np.random.default_rng(4), TextMaskParams(), SPECIALS, VOCAB, MASK_ID)
    assert mask[:, 0].any()


def test_masks_follow_from_the_generator_seed_alone():
    tokens, pm = batch([50, 30, 20], seed=5)
    a = mask_tokens(tokens, pm, np.random.default_rng([1, 2, 3]), BERT_MASKING, SPECIALS, VOCAB, MASK_ID)
    b = mask_tokens(tokens, pm, np.random.default_rng([1, 2, 3]), BERT_MASKING, SPECIALS, VOCAB, MASK_ID)
    c = mask_tokens(tokens, pm, np.random.default_rng([1, 2, 4]), BERT_MASKING, SPECIALS, VOCAB, MASK_ID)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert a[0].dtype == torch.long and a[1].dtype == torch.bool


def test_no_padding_mask_and_bad_parameters():
    tokens = torch.randint(4, MASK_ID, (4, 40))
    _, mask = mask_tokens(tokens, None, np.random.default_rng(0), TextMaskParams(), SPECIALS, VOCAB, MASK_ID)
    assert mask.any()
    with pytest.raises(ValueError, match="at most 1"):
        mask_tokens(tokens, None, np.random.default_rng(0), TextMaskParams(leave_unmasked_prob=0.6,
                                                                            random_token_prob=0.6),
                    SPECIALS, VOCAB, MASK_ID)
    left_padded = torch.tensor([[PAD, 0, 5, 6]])
    with pytest.raises(ValueError, match="right-padded"):
        mask_tokens(left_padded, left_padded.eq(PAD), np.random.default_rng(0), TextMaskParams(), SPECIALS,
                    VOCAB, MASK_ID)
