"""The CTC labels and which utterances can train: every transcript spelled with the letter dictionary
(else an error naming the manifest line), and utterances long enough for CTC to align and for the time
mask to leave unmasked frames (the others are left out and counted).

finetune.py calls these (and re-exports ctc_min_frames and maskable); finetune_start.py uses `maskable` for
the channel mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from d2vcli.config import Config
from d2vcli.data import read_splits
from d2vcli.errors import UserError
from d2vcli.manifest import Record, num_frames
from d2vcli.vocab import Vocab


class FinetuneDataError(UserError):
    """A manifest that fine-tuning cannot use; the message names the file and line and the fix."""


def ctc_min_frames(label: Sequence[int]) -> int:
    """Frames CTC needs for `label`: one per token plus a blank between each repeated pair."""
    return len(label) + sum(1 for a, b in zip(label, label[1:]) if a == b)


def maskable(frames: int, mask_prob: float, mask_length: int, min_masks: int) -> bool:
    """Whether `compute_mask_indices` can mask an utterance of `frames` frames without covering it.

    Spans start in [0, frames - mask_length) unless that range holds fewer starts than spans; only
    then can the whole utterance be covered (fairseq raises there), so require more starts than
    the largest possible number of spans.
    """
    if mask_prob <= 0:
        return True
    most_spans = max(min_masks, int(mask_prob * frames / mask_length) + 1)
    return frames - mask_length > most_spans


def _line_of(manifest: Path, utt_id: str) -> int:
    """1-based line of `utt_id` in a manifest (only read on the error path)."""
    needle = f'"id": "{utt_id}"'
    for i, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if needle in line:
            return i
    return 0


def check_labels(workspace, splits: Sequence[str], vocab: Vocab) -> None:
    """Every utterance of `splits` has a transcript spelled with `vocab`'s letters, or an error naming
    the manifest line (d2v prepare filters these, so this catches hand-made or stale manifests)."""
    for split in splits:
        path = workspace.require_manifest(split)
        for r in read_splits(workspace, [split]):
            if not r.text.strip():
                raise FinetuneDataError(
                    f"{path}:{_line_of(path, r.id)}: utterance {r.id} has no transcript; fine-tuning needs "
                    f"labelled splits (check data.train_splits / data.valid_splits)."
                )
            bad = vocab.unknown_chars(r.text)
            if bad:
                raise FinetuneDataError(
                    f"{path}:{_line_of(path, r.id)}: the transcript of {r.id} has characters that are not in the "
                    f"letter dictionary ({' '.join(sorted(map(repr, bad)))}). Re-run `d2v prepare` (it normalizes "
                    f"transcripts and rebuilds dict.ltr.txt), or fix the transcript."
                )


@dataclass
class TrainingSet:
    records: list[Record]
    infeasible: list[str]  # ids: fewer frames than CTC needs
    too_short_to_mask: list[str]  # ids: the time mask could cover every frame


def select_trainable(records: Sequence[Record], vocab: Vocab, cfg: Config) -> TrainingSet:
    """Drop utterances CTC cannot align (or the time mask could swallow), keeping their ids."""
    keep, infeasible, short = [], [], []
    m = cfg.masking
    for r in records:
        frames = num_frames(r.num_samples, cfg.model.conv_layers)
        if frames < ctc_min_frames(vocab.encode(r.text)):
            infeasible.append(r.id)
        elif not maskable(frames, m.mask_prob, m.mask_length, m.min_masks):
            short.append(r.id)
        else:
            keep.append(r)
    return TrainingSet(keep, infeasible, short)
