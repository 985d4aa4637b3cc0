"""Span masks for data2vec / wav2vec 2.0: which positions the student sees as `mask_emb`.

Modality-neutral: it masks positions of a (B, T) grid, whatever a position stands for (a 20 ms
audio frame today). Follows fairseq `fairseq/data/data_utils.py::compute_mask_indices` (3d262bb) with
the settings data2vec 1.0 uses: static span lengths, overlapping spans allowed, no
mask dropout. Per row of the batch:

    sz       = unpadded length
    num_mask = max(min_masks, int(mask_prob * sz / mask_length + U[0, 1)))   probabilistic rounding
    starts   = num_mask distinct indices drawn from [0, sz - mask_length)
    mask     = starts expanded to spans of mask_length, clipped to sz

then, with `require_same_masks`, every row keeps a random subset of its masked frames
so all rows have the batch-minimum count (this can fragment spans; fairseq does the
same). With 0.65 / 10 about 49% of the frames end up masked.

Randomness comes only from the numpy Generator passed in, so a seeded generator gives
the same masks on every run. (fairseq seeds one generator per row from
hash(seed, epoch, index); one generator per batch has the same statistics.)

data2vec 2.0 draws block masks instead (`compute_block_mask`, fairseq `compute_block_mask_1d`):
centres with replacement, spans centred on them, then an exact masked count per row; for images
`compute_block_mask_2d` (fairseq `compute_block_mask_2d`) does the same with square blocks on the
patch grid, and with `inverse_mask` the blocks mark the patches the student sees.

Used by the pretrain and finetune steps:

    rng = np.random.default_rng(seed)
    time_mask = compute_mask_indices((B, T), frame_padding, 0.65, 10, min_masks=1, require_same_masks=True, rng=rng)
    channel_mask = compute_channel_mask(B, D, 0.5, 64, rng)   # fine-tuning only
"""

from __future__ import annotations

from typing import Optional

import numpy as np

# A leaf module (it imports nothing): the user-error base lets the CLI report masking settings
# that cannot work as one line instead of a traceback.
from d2vcli.errors import UserError


class MaskingError(UserError):
    """The masking settings would hide a whole utterance; the message names the settings to change."""


def _as_numpy_bool(mask) -> Optional[np.ndarray]:
    if mask is None:
        return None
    if hasattr(mask, "detach"):  # a torch tensor, possibly on GPU
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask, dtype=bool)


def _row_spans(sz: int, mask_prob: float, mask_length: int, min_masks: int, rng: np.random.Generator) -> np.ndarray:
    """Masked indices of one row of unpadded length `sz` (sorted, unique)."""
    num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + rng.random()))
    if num_mask == 0 or sz == 0:
        return np.empty(0, dtype=np.int64)
    min_len = mask_length
    if sz - min_len <= num_mask:
        # Short row: shrink the start range so num_mask distinct starts still exist (fairseq).
        min_len = sz - num_mask - 1
    starts = rng.choice(sz - min_len, num_mask, replace=False)
    idc = (starts[:, None] + np.arange(mask_length)[None, :]).reshape(-1)
    idc = np.unique(idc[idc < sz])
    if len(idc) >= sz:
        raise MaskingError(
            f"masking would hide all {sz} frames of an utterance; raise data.min_sample_size "
            f"or lower masking.mask_prob / masking.mask_length"
        )
    return idc


def compute_mask_indices(
    shape: tuple[int, int],
    padding_mask,
    mask_prob: float,
    mask_length: int,
    min_masks: int = 0,
    require_same_masks: bool = True,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """A (B, T) bool array, True = masked.

    shape: (B, T) batch size and frames. padding_mask: (B, T) bool (True = padding; numpy or
    torch) or None; padded frames are never masked and don't count toward the row length.
    mask_prob: probability of a frame starting a span. mask_length: span length in frames.
    min_masks: at least this many spans per row. require_same_masks: every row ends with the
    batch-minimum number of masked frames. rng: the numpy Generator to draw from.
    """
    if rng is None:
        raise ValueError("compute_mask_indices needs an explicit numpy Generator (np.random.default_rng(seed))")
    bsz, all_sz = shape
    pad = _as_numpy_bool(padding_mask)
    mask = np.zeros((bsz, all_sz), dtype=bool)
    if mask_prob <= 0 and min_masks <= 0:
        return mask
    rows = []
    for i in range(bsz):
        sz = all_sz - int(pad[i].sum()) if pad is not None else all_sz
        rows.append(_row_spans(sz, mask_prob, mask_length, min_masks, rng))
    target_len = min(len(r) for r in rows) if require_same_masks else None
    for i, idc in enumerate(rows):
        if target_len is not None and len(idc) > target_len:
            idc = rng.choice(idc, target_len, replace=False)
        mask[i, idc] = True
    return mask


def compute_channel_mask(
    batch_size: int, num_channels: int, mask_prob: float, mask_length: int, rng: np.random.Generator
) -> np.ndarray:
    """A (B, C) bool array, True = channel zeroed in every frame (fine-tuning's channel masking).

    fairseq calls compute_mask_indices on (B, C) with min_masks 0 and require_same_masks, and
    broadcasts the result over time; the model does the broadcast (its `channel_mask` argument).
    """
    return compute_mask_indices((batch_size, num_channels), None, mask_prob, mask_length, min_masks=0,
                                require_same_masks=True, rng=rng)


def _exact_count(row: np.ndarray, target: int, rng: np.random.Generator) -> None:
    """Make exactly `target` entries of the bool `row` True, in place: surplus ones cleared, a deficit
    set, uniformly at random (fairseq's require_same_masks step, `torch.multinomial` over the row)."""
    masked = int(row.sum())
    if masked > target:
        row[rng.choice(np.flatnonzero(row), masked - target, replace=False)] = False
    elif masked < target:
        row[rng.choice(np.flatnonzero(~row), target - masked, replace=False)] = True


def compute_block_mask(
    shape: tuple[int, int],
    padding_mask,
    mask_prob: float,
    mask_length: int,
    mask_prob_adjust: float = 0.0,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """data2vec 2.0's block mask: a (N, T) bool array, True = masked, the same masked count in every row.

    fairseq `fairseq/data/data_utils.py::compute_block_mask_1d` (require_same_masks, non_overlapping
    False, mask_dropout 0), per row of unpadded length L:

        centres  = int(L * (mask_prob + mask_prob_adjust) / mask_length) draws from [0, L), with replacement
        mask     = each centre c expanded to [c - mask_length // 2, c - mask_length // 2 + mask_length), clipped
        target   = floor(L * mask_prob): surplus masked frames are unmasked, a deficit masked, uniformly at random

    With padding the rows' targets differ; all rows get the batch minimum (the student removes the
    same number of frames from every row), and padded frames are never masked. Without padding
    every row has exactly floor(T * mask_prob) masked frames, as in the recipe.
    """
    if rng is None:
        raise ValueError("compute_block_mask needs an explicit numpy Generator (np.random.default_rng(seed))")
    rows, all_sz = shape
    pad = _as_numpy_bool(padding_mask)
    lengths = [all_sz - int(pad[i].sum()) if pad is not None else all_sz for i in range(rows)]
    target = min(int(L * mask_prob) for L in lengths) if rows else 0  # < L for mask_prob < 1 (config checks it)
    mask = np.zeros((rows, all_sz), dtype=bool)
    for i, L in enumerate(lengths):
        row = np.zeros(L, dtype=bool)
        if L:
            centres = rng.integers(0, L, int(L * (mask_prob + mask_prob_adjust) / mask_length))
            spans = centres[:, None] - mask_length // 2 + np.arange(mask_length)[None, :]
            row[np.clip(spans, 0, L - 1).reshape(-1)] = True
        _exact_count(row, target, rng)
        # fairseq's padding_mask convention (True = padding) and ours put the real frames first.
        real = np.flatnonzero(~pad[i]) if pad is not None else np.arange(all_sz)
        mask[i, real[:L]] = row
    return mask


def compute_block_mask_2d(
    rows: int,
    grid: tuple[int, int],
    mask_prob: float,
    mask_length: int,
    mask_prob_adjust: float = 0.0,
    inverse_mask: bool = False,
    rng: Optional[np.random.Generator] = None,
) -> np.ndarray:
    """data2vec 2.0's image mask: a (rows, H * W) bool array, True = masked, patches in row-major order.

    fairseq `fairseq/data/data_utils.py::compute_block_mask_2d` (require_same_masks, non_overlapping
    False, expand_adjcent False, mask_dropout 0), per row, with L = H * W patches:

        p        = 1 - mask_prob with inverse_mask (the blocks are what stays visible), else mask_prob
        centres  = int(L * (p + mask_prob_adjust) / mask_length**2) patches drawn from [0, L), with replacement
        blocks   = mask_length x mask_length squares from (r - mask_length // 2, c - mask_length // 2),
                   each coordinate clamped into the grid (a border block is cut, not moved)
        exact    = floor(L * p) block patches: surplus ones dropped, a deficit added, uniformly at random
        mask     = the blocks, or their complement with inverse_mask

    So every row has the same count (ViT-B/16, mask_prob 0.8: 39 visible, 157 masked) and rows
    differ in where: the recipe draws one row per clone of an image (clone_batch of them).
    """
    if rng is None:
        raise ValueError("compute_block_mask_2d needs an explicit numpy Generator (np.random.default_rng(seed))")
    H, W = grid
    L = H * W
    p = 1.0 - mask_prob if inverse_mask else mask_prob
    target = int(L * p)
    offsets = np.arange(mask_length) - mask_length // 2
    mask = np.zeros((rows, L), dtype=bool)
    for i in range(rows):
        centres = rng.integers(0, L, int(L * (p + mask_prob_adjust) / mask_length**2))
        r = np.clip(centres[:, None, None] // W + offsets[None, :, None], 0, H - 1)  # (n, k, 1)
        c = np.clip(centres[:, None, None] % W + offsets[None, None, :], 0, W - 1)  # (n, 1, k)
        row = np.zeros(L, dtype=bool)
        row[(r * W + c).reshape(-1)] = True
        _exact_count(row, target, rng)
        mask[i] = ~row if inverse_mask else row
    return mask


def compute_random_mask(rows: int, length: int, mask_prob: float, rng: Optional[np.random.Generator] = None
                        ) -> np.ndarray:
    """MAE-style random masking (data2vec 2.0 text, `mask_length: 1`): (rows, length) bool, True = masked.

    fairseq `examples/data2vec/models/modalities/base.py::random_masking`: per row, uniform noise
    argsorted, the first int(length * (1 - mask_prob)) positions kept (266 of 512 at 0.48), the
    other length - keep masked. Padding is not looked at, as in the recipe: padded positions can be
    masked (and then scored), which with full 512-token blocks (`sample_break_mode: none`) is rare.
    """
    if rng is None:
        raise ValueError("compute_random_mask needs an explicit numpy Generator (np.random.default_rng(seed))")
    if not 0 <= mask_prob < 1:
        raise MaskingError(f"masking.mask_prob must be in [0, 1), got {mask_prob}")
    keep = int(length * (1 - mask_prob))
    order = np.argsort(rng.random((rows, length)), axis=1)  # (rows, length) a random permutation per row
    mask = np.ones((rows, length), dtype=bool)
    np.put_along_axis(mask, order[:, :keep], False, axis=1)
    return mask
