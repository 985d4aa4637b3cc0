"""Span masking of token sequences, as data2vec 1.0 text uses it (fairseq `MaskTokensDataset`).

data2vec paper (arXiv 2202.03555) §4.3: text is masked like BERT, but in spans. The algorithm is
fairseq's `fairseq/data/mask_tokens_dataset.py` (`__getitem__`) with the recipe's parameters
(`examples/data2vec/config/text/pretraining/base.yaml`; docs/text.md), per sequence of n real tokens:

    spans  = int(mask_prob * n / span_length + U[0, 1))         probabilistic rounding
    starts = `spans` distinct positions of the n, uniformly      (so <s> can be masked)
    chosen = start .. start + span_length - 1 for every start, clipped to n; overlaps merge
    of the chosen: each is left unchanged or replaced by a random token with probability
    leave_unmasked_prob / random_token_prob (one U[0, 1) per position, then a second one splitting
    the two), the others become <mask>

The recipe uses mask_prob 0.35, spans of 4 and no replacement (0 / 0: every chosen token becomes
`<mask>`); BERT's 80/10/10 is leave_unmasked_prob 0.1, random_token_prob 0.1. Padding is never
chosen: fairseq masks each sequence before it is padded into a batch, which is what masking the
first n (the real) positions of each row does. Random tokens are drawn uniformly from the
vocabulary without the special ids and `<mask>` (fairseq zeroes the specials' weights only, so it
can draw `<mask>` itself; that difference is deliberate).

All randomness comes from the numpy Generator passed in (the batch's `data.batch_rng` stream),
rows in order, so a batch's masks follow from its seed alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class TextMaskParams:
    """The recipe's masking: 35 % of the tokens in spans of 4, all of them replaced by `<mask>`."""

    mask_prob: float = 0.35
    span_length: int = 4  # fairseq `mask_multiple_length`
    leave_unmasked_prob: float = 0.0
    random_token_prob: float = 0.0

    def validate(self) -> None:
        if not 0 <= self.mask_prob <= 1:
            raise ValueError(f"mask_prob must be in [0, 1], got {self.mask_prob}")
        if self.span_length < 1:
            raise ValueError(f"span_length must be at least 1, got {self.span_length}")
        for name in ("leave_unmasked_prob", "random_token_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.leave_unmasked_prob + self.random_token_prob > 1:
            raise ValueError("leave_unmasked_prob + random_token_prob must be at most 1")


BERT_MASKING = TextMaskParams(mask_prob=0.15, span_length=1, leave_unmasked_prob=0.1, random_token_prob=0.1)


def span_mask(rng: np.random.Generator, n: int, params: TextMaskParams) -> np.ndarray:
    """(n,) bool: the positions chosen for prediction in a sequence of n real tokens."""
    chosen = np.zeros(n, dtype=bool)
    if n == 0:
        return chosen
    spans = int(params.mask_prob * n / params.span_length + rng.random())
    starts = rng.choice(n, spans, replace=False)  # (spans,)
    idx = (starts[:, None] + np.arange(params.span_length)[None, :]).reshape(-1)
    chosen[idx[idx < n]] = True
    return chosen


def mask_tokens(tokens: Tensor, padding_mask: Optional[Tensor], rng: np.random.Generator, params: TextMaskParams,
                special_ids: Sequence[int], vocab_size: int, mask_id: int) -> tuple[Tensor, Tensor]:
    """tokens (B, T) int64, right-padded; padding_mask (B, T) True = pad (None: nothing padded) ->
    (masked tokens (B, T) int64, mask (B, T) bool: the positions the student predicts, the ones left
    unchanged or replaced by a random token included), on tokens' device."""
    params.validate()
    src = tokens.detach().cpu().numpy()
    B, T = src.shape
    lengths = np.full(B, T) if padding_mask is None else (~padding_mask).sum(1).cpu().numpy()
    if padding_mask is not None and (padding_mask.cpu().numpy() != (np.arange(T)[None, :] >= lengths[:, None])).any():
        raise ValueError("mask_tokens needs right-padded rows (the real tokens first, then the pads)")
    excluded = np.zeros(vocab_size, dtype=bool)
    excluded[[i for i in (*special_ids, mask_id) if 0 <= i < vocab_size]] = True
    candidates = np.flatnonzero(~excluded)  # the tokens a random replacement may be
    replace_prob = params.leave_unmasked_prob + params.random_token_prob
    out = src.copy()
    mask = np.zeros((B, T), dtype=bool)
    for b in range(B):
        n = int(lengths[b])
        chosen = span_mask(rng, n, params)  # (n,)
        mask[b, :n] = chosen
        to_mask, to_random = chosen, None
        if replace_prob > 0:
            altered = chosen & (rng.random(n) < replace_prob)
            if params.random_token_prob == 0:
                to_mask = chosen & ~altered  # the altered ones are left as they are
            elif params.leave_unmasked_prob == 0:
                to_random = altered
            else:
                keep = rng.random(n) < params.leave_unmasked_prob / replace_prob
                to_mask, to_random = chosen & ~(altered & keep), altered & ~keep
        row = out[b, :n]
        row[to_mask] = mask_id
        if to_random is not None and to_random.any():
            row[to_random] = rng.choice(candidates, int(to_random.sum()))
    device = tokens.device
    return torch.from_numpy(out).to(device), torch.from_numpy(mask).to(device)
