"""Audio batches for pretraining and fine-tuning: manifests in, deterministic resumable batches out.

Used by `d2vcli.pretrain` and `d2vcli.finetune`; nothing here is run directly.

    records = read_splits(workspace, cfg.data.train_splits)
    dataset = AudioDataset(records, normalize=True, min_sample_size=32_000)
    loader = BatchLoader(dataset, "crop", max_tokens=3_800_000, seed=1, max_sample_size=320_000,
                         rank=0, world_size=1, num_workers=4)
    for batch in loader:           # the rest of the current epoch; then loader.position moves to the next
        batch.source               # (B, S) float32 waveform (a `Batch`)

The recipe follows fairseq's raw-audio dataset (`fairseq/data/audio/raw_audio_dataset.py`, with
`examples/data2vec/config/audio/pretraining/base_librispeech.yaml` and the fine-tuning configs;
recipe values in `docs/recipe.md`):

- Each utterance is read with soundfile (`Record.offset`/`num_samples` pick a segment of a longer
  file) and, when `normalize` is on, scaled to zero mean and unit variance over the **whole**
  utterance before any cropping (fairseq's `F.layer_norm(wav, wav.shape)`: biased variance, eps 1e-5).
  Utterances shorter than `min_sample_size` are skipped.
- Batches are packed by size: indices sorted by (capped) length, longest first, ties broken at
  random; a batch grows until batch_size x longest > `max_tokens`. The list of batches is then
  shuffled. Both use a RNG seeded by (seed, epoch), so an epoch's batches are a pure function of
  (seed, epoch). fairseq seeds the tie-break with the seed alone; drawing it per epoch changes nothing
  for LibriSpeech (lengths are almost all distinct) and mixes equal-length corpora better.
- Collation "crop" (pretraining) crops every utterance to the batch's shortest (at most
  `max_sample_size`) at a random offset, so batches carry no padding. Collation "pad" (fine-tuning,
  evaluation) zero-pads to the longest and returns the padding mask and, with a vocabulary, labels.
- Randomness inside a batch (crop offsets; the pretraining mask, see `batch_rng`) comes from a
  generator seeded by (seed, epoch, global batch index, stream). It never depends on worker
  processes, worker count, rank or on what ran before, which is what makes resumed and sharded runs
  reproduce a straight single-process run.
- Rank r of W takes global batches r, r + W, r + 2W, ... from the epoch's list. For training the tail
  that cannot give every rank a batch is dropped (every rank must run the same number of steps);
  for evaluation (`drop_uneven=False`) it is kept.
- `loader.position` = (epoch, global batches consumed in that epoch) is saved in checkpoints; after
  `load_state_dict` iteration continues with the next unseen batch, even with a different world size.
- Length buckets (`data.length_buckets` = N > 0, for torch.compile): every length is rounded to one of
  N fixed lengths evenly spaced from the shortest to the longest (capped) utterance, down when
  cropping, up when padding, before packing. Batches then come in a few shapes, so a compiled graph is
  reused; `bucketing_cost()` says how much audio cropping drops or padding adds compared with exact lengths.
- A file that cannot be read when its batch is built (truncated, unreadable, not 16 kHz, shorter than
  its manifest line) never ends a run: the utterance is dropped from its batch (a batch left empty
  is not yielded) and the file is recorded in `loader.bad_files` with the reason. Whether a file
  reads is a property of the file, so a resumed run drops exactly the same items; `bad_files` is
  part of the saved position. More than `max_bad_files` distinct bad files (`data.max_bad_files`)
  raise `TooManyBadFiles` naming them: the data needs fixing, not skipping.
- A manifest the data does not fit raises `DataError` (a `d2vcli.errors.UserError`): the message
  names the utterance and the fix.
"""

from __future__ import annotations

import dataclasses
import signal
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional, Sequence

import numpy as np
import soundfile as sf
import torch
from torch import Tensor

from d2vcli.audio import SAMPLE_RATE, AudioError
from d2vcli.errors import UserError
from d2vcli.manifest import Record, read_manifest
from d2vcli.vocab import PAD, Vocab

Collate = Literal["crop", "pad"]

# Independent random streams derived from one batch key (see batch_rng).
STREAM_CROP = 0
STREAM_MASK = 1
STREAM_MASK_NOISE = 2  # data2vec 2.0: the decoder's N(0, 0.01) mask tokens

NORMALIZE_EPS = 1e-5  # fairseq layer_norm default


class DataError(UserError):
    """Manifests that training cannot use as they are; the message names the utterance and the fix."""


class TooManyBadFiles(DataError):
    """More unreadable audio files than `data.max_bad_files`: a clear stop instead of skipping on."""


def bad_files_summary(bad: dict[str, str], limit: int = 10, what: str = "audio") -> str:
    """'N unreadable audio file(s) skipped: path (reason); ...' for logs and run summaries."""
    shown = "; ".join(f"{path} ({reason})" for path, reason in list(bad.items())[:limit])
    more = f"; and {len(bad) - limit} more" if len(bad) > limit else ""
    return f"{len(bad)} unreadable {what} file(s) skipped: {shown}{more}"


def bad_files_fix() -> str:
    return ("Fix or remove them, then rebuild the manifest with `d2v prepare ... --strict` (it checks that "
            "every file decodes to its end)")


def batch_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """The generator for one batch's randomness of one kind (crop, mask, ...).

    Seeded by (seed, epoch, global batch index, stream) through numpy's SeedSequence, so it is the
    same in any process, worker or resumed run that sees that batch.
    """
    return np.random.default_rng([seed, epoch, index, stream])


# ----------------------------------------------------------------------------- reading audio


def read_splits(workspace, splits: Sequence[str]) -> list[Record]:
    """All records of the given manifests in the workspace, in order (missing split -> clear error)."""
    records: list[Record] = []
    for split in splits:
        records.extend(read_manifest(workspace.require_manifest(split)))
    return records


def normalize_waveform(wav: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole utterance (biased variance, eps 1e-5), float32."""
    wav64 = wav.astype(np.float64)
    mean = wav64.mean()
    var = ((wav64 - mean) ** 2).mean()
    return ((wav64 - mean) / np.sqrt(var + NORMALIZE_EPS)).astype(np.float32)


def load_audio(record: Record, normalize: bool) -> np.ndarray:
    """The record's samples as float32 mono (channels averaged), optionally normalized.

    Raises AudioError naming the file when it is unreadable, not 16 kHz or shorter than the manifest says.
    """
    try:
        wav, sr = sf.read(
            record.path, start=record.offset, stop=record.offset + record.num_samples, dtype="float32",
            always_2d=True,
        )
    except (RuntimeError, sf.LibsndfileError) as e:
        raise AudioError(
            f"cannot read audio {record.path} (utterance {record.id}): {e}. "
            f"Check the file, or re-run `d2v prepare` to rebuild the manifest."
        ) from None
    if sr != SAMPLE_RATE:
        raise AudioError(
            f"{record.path} has sample rate {sr} Hz; d2v models take {SAMPLE_RATE} Hz audio. "
            f"Resample it (e.g. `sox in.flac -r 16000 out.flac`) and re-run `d2v prepare`."
        )
    if wav.shape[0] != record.num_samples:
        raise AudioError(
            f"{record.path}: the manifest says {record.num_samples} samples from offset {record.offset}, "
            f"the file gives {wav.shape[0]}. The manifest is stale: re-run `d2v prepare`."
        )
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    return normalize_waveform(wav) if normalize else np.ascontiguousarray(wav)


@dataclass
class Item:
    id: str
    source: np.ndarray  # (S,) float32
    label: Optional[list[int]] = None
    text: str = ""


class AudioDataset:
    """Utterances of a manifest, minus those shorter than `min_sample_size`.

    With a `vocab`, every transcript is encoded up front, so a character missing from the
    dictionary fails before training starts (naming the utterance), not hours into it.
    """

    def __init__(
        self,
        records: Sequence[Record],
        normalize: bool,
        min_sample_size: int = 0,
        vocab: Optional[Vocab] = None,
    ):
        self.normalize = normalize
        self.records = [r for r in records if r.num_samples >= min_sample_size]
        self.skipped = len(records) - len(self.records)
        if not self.records:
            raise DataError(
                f"no utterance is at least data.min_sample_size={min_sample_size} samples long "
                f"({len(records)} in the manifests). Lower it with --set data.min_sample_size=N."
            )
        self.sizes = np.array([r.num_samples for r in self.records], dtype=np.int64)
        self.labels: Optional[list[list[int]]] = None
        if vocab is not None:
            self.labels = []
            for r in self.records:
                if not r.text.strip():
                    raise DataError(
                        f"utterance {r.id} ({r.path}) has no transcript; fine-tuning needs labelled splits "
                        f"(check data.train_splits / data.valid_splits)."
                    )
                try:
                    self.labels.append(vocab.encode(r.text))
                except KeyError as e:
                    raise DataError(
                        f"utterance {r.id}: {e.args[0]}. Add the character to dict.ltr.txt or normalize the "
                        f"transcript (d2v prepare does both)."
                    ) from None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Item:
        r = self.records[i]
        return Item(
            id=r.id,
            source=load_audio(r, self.normalize),
            label=self.labels[i] if self.labels is not None else None,
            text=r.text,
        )

    @property
    def seconds(self) -> float:
        return float(self.sizes.sum()) / SAMPLE_RATE


# ----------------------------------------------------------------------------- batching


def batch_by_size(order: np.ndarray, sizes: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Greedy packing in `order`: a batch closes when (len + 1) x longest would exceed max_tokens.

    `sizes` are the lengths the collater will produce (capped for cropping). Items longer than
    max_tokens are left out (the caller reports them).
    """
    batches: list[np.ndarray] = []
    current: list[int] = []
    longest = 0
    for idx in order:
        size = int(sizes[idx])
        if size > max_tokens:
            continue
        new_longest = max(longest, size)
        if current and (len(current) + 1) * new_longest > max_tokens:
            batches.append(np.array(current, dtype=np.int64))
            current, new_longest = [], size
        current.append(int(idx))
        longest = new_longest
    if current:
        batches.append(np.array(current, dtype=np.int64))
    return batches


def epoch_batches(sizes: np.ndarray, max_tokens: int, seed: int, epoch: int, shuffle: bool) -> list[np.ndarray]:
    """The global list of batches for one epoch (a pure function of its arguments)."""
    if not shuffle:
        order = np.argsort(-sizes, kind="stable")
        return batch_by_size(order, sizes, max_tokens)
    rng = np.random.default_rng([seed, epoch, 0xBA7C])
    # lexsort: last key is primary -> ascending size, random tie-break; reversed -> longest first.
    order = np.lexsort((rng.permutation(len(sizes)), sizes))[::-1]
    batches = batch_by_size(order, sizes, max_tokens)
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def bucket_lengths(sizes: np.ndarray, count: int, collate: Collate) -> np.ndarray:
    """`count` fixed lengths evenly spaced from the shortest to the longest of `sizes` (one: the shortest
    when cropping, the longest when padding, so every size has a bucket)."""
    lo, hi = int(sizes.min()), int(sizes.max())
    if count == 1:
        return np.array([lo if collate == "crop" else hi], dtype=np.int64)
    return np.unique(np.linspace(lo, hi, count).round().astype(np.int64))


def round_to_buckets(sizes: np.ndarray, buckets: np.ndarray, collate: Collate) -> np.ndarray:
    """Each size's bucket: the longest bucket not above it (crop) or the shortest not below it (pad)."""
    if collate == "crop":
        return buckets[np.searchsorted(buckets, sizes, side="right") - 1]
    return buckets[np.searchsorted(buckets, sizes, side="left")]


# ----------------------------------------------------------------------------- collation


@dataclass(frozen=True)
class Batch:
    """One collated batch, what a task's `train_step` receives.

    `epoch` and `index` (the global batch index in that epoch) are the key of `batch_rng`; the
    loader sets them, bare collation leaves them 0. `target`, `target_lengths` and `texts` are
    set only for labelled data ("pad" collation with a vocabulary).
    """

    source: Tensor  # (B, S) float32 waveform, or (B, 3, H, W) normalized images (image_data.ImageBatchLoader)
    padding_mask: Optional[Tensor]  # (B, S) bool, True = padding; None when nothing is padded (crop)
    ids: list[str]
    num_samples: int  # real (unpadded) samples in the batch
    target: Optional[Tensor] = None  # (B, L) int64 letter ids, padded with vocab.PAD
    target_lengths: Optional[Tensor] = None  # (B,) int64
    texts: Optional[list[str]] = None
    epoch: int = 0
    index: int = 0
    # (path, reason) of the batch's utterances whose audio could not be read; they are not in it.
    skipped: tuple[tuple[str, str], ...] = ()

    def _map_tensors(self, fn) -> "Batch":
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: fn(v) for k, v in tensors.items() if isinstance(v, Tensor)})

    def to(self, device: torch.device, non_blocking: bool = True) -> "Batch":
        """The same batch with its tensors on `device` (asynchronous copies from pinned memory)."""
        return self._map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader's pinning thread (`pin_memory=True`), which only knows tensors and containers."""
        return self._map_tensors(lambda t: t.pin_memory())


def collate_crop(items: list[Item], max_sample_size: int, rng: np.random.Generator,
                 length: Optional[int] = None) -> Batch:
    """Crop every utterance to the batch's shortest (at most max_sample_size, and at most `length`,
    a length bucket, when given) at random offsets."""
    target = min(min(len(it.source) for it in items), max_sample_size, length or max_sample_size)
    source = np.empty((len(items), target), dtype=np.float32)  # (B, S)
    for b, it in enumerate(items):
        extra = len(it.source) - target
        start = int(rng.integers(0, extra + 1)) if extra > 0 else 0
        source[b] = it.source[start:start + target]
    return Batch(source=torch.from_numpy(source), padding_mask=None, ids=[it.id for it in items],
                 num_samples=int(source.size))


def collate_pad(items: list[Item], length: Optional[int] = None) -> Batch:
    """Zero-pad to the longest (or to `length`, a length bucket, when longer); padding_mask (B, S) is
    True at padding. Adds labels when present."""
    lengths = [len(it.source) for it in items]
    longest = max(max(lengths), length or 0)
    source = np.zeros((len(items), longest), dtype=np.float32)  # (B, S)
    padding_mask = np.ones((len(items), longest), dtype=bool)
    for b, it in enumerate(items):
        source[b, : lengths[b]] = it.source
        padding_mask[b, : lengths[b]] = False
    batch = Batch(source=torch.from_numpy(source), padding_mask=torch.from_numpy(padding_mask),
                  ids=[it.id for it in items], num_samples=int(sum(lengths)))
    if items[0].label is None:
        return batch
    target_lengths = [len(it.label) for it in items]
    target = np.full((len(items), max(target_lengths)), PAD, dtype=np.int64)  # (B, L)
    for b, it in enumerate(items):
        target[b, : len(it.label)] = it.label
    return dataclasses.replace(batch, target=torch.from_numpy(target),
                               target_lengths=torch.tensor(target_lengths, dtype=torch.long),
                               texts=[it.text for it in items])


# ----------------------------------------------------------------------------- loader


@dataclass(frozen=True)
class DataPosition:
    """Where training is in the data: epoch (1-based) and global batches of it already consumed."""

    epoch: int = 1
    consumed: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    @classmethod
    def from_dict(cls, d: dict) -> "DataPosition":
        return cls(epoch=int(d["epoch"]), consumed=int(d["consumed"]))


class EpochShare:
    """An epoch's global batches, made once per epoch by `plan(epoch)`, and one rank's share of them.

    Every loader (audio, images, text) cuts its epochs this way: the plan is keyed by (seed, epoch), so
    every rank sees the same global batches, and rank r reads every world_size-th one from `consumed` on.
    With `drop_uneven` the batches left after an even share per rank are skipped (DDP ranks must take
    as many steps); evaluation keeps them.
    """

    def __init__(self, plan: Callable[[int], list[np.ndarray]], rank: int = 0, world_size: int = 1,
                 drop_uneven: bool = True):
        self.plan, self.rank, self.world_size, self.drop_uneven = plan, rank, world_size, drop_uneven
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.plan(epoch))
        return self._cache[1]

    def local_indices(self, epoch: int, consumed: int) -> list[int]:
        """Global indices this rank reads in `epoch`, starting after `consumed` global batches."""
        remaining = max(0, len(self.batches(epoch)) - consumed)
        if self.drop_uneven:
            remaining -= remaining % self.world_size
        return list(range(consumed + self.rank, consumed + remaining, self.world_size))

    def position_after(self, epoch: int, index: int) -> DataPosition:
        """The position once global batch `index` is handed over: a checkpoint taken then resumes right after it."""
        return DataPosition(epoch, index - self.rank + self.world_size)


class _EpochBatches(torch.utils.data.Dataset):
    """Map-style view of one rank's share of an epoch: item i is a collated batch.

    Handing whole batches to the DataLoader keeps every random draw keyed by the batch, not by
    which worker happened to load it.
    """

    def __init__(self, loader: "BatchLoader", batches: list[np.ndarray], global_indices: list[int], epoch: int):
        self.loader, self.batches, self.global_indices, self.epoch = loader, batches, global_indices, epoch

    def __len__(self) -> int:
        return len(self.global_indices)

    def __getitem__(self, i: int) -> Batch:
        return self.loader.make_batch(self.batches[self.global_indices[i]], self.epoch, self.global_indices[i])


class BatchLoader:
    """Iterates one rank's batches of the current epoch, from the saved position on.

    Each `iter()` yields the rest of the current epoch and then moves `position` to the next
    epoch, so a training loop is `while not done: for batch in loader: ...`. Every `Batch`
    carries `epoch` and `index` (its global index): the key for `batch_rng`.
    """

    def __init__(
        self,
        dataset: AudioDataset,
        collate: Collate,
        max_tokens: int,
        seed: int,
        *,
        max_sample_size: Optional[int] = None,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        drop_uneven: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_bad_files: Optional[int] = None,
        length_buckets: int = 0,
    ):
        if collate == "crop" and not max_sample_size:
            raise ValueError("collate='crop' needs max_sample_size")
        self.dataset, self.collate, self.max_tokens, self.seed = dataset, collate, max_tokens, seed
        self.max_sample_size = max_sample_size
        self.shuffle, self.rank, self.world_size, self.drop_uneven = shuffle, rank, world_size, drop_uneven
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.position = DataPosition()
        self.max_bad_files = max_bad_files  # None: no limit (evaluation reports what it skipped)
        self.bad_files: dict[str, str] = {}  # path -> why it could not be read, in the order met
        # The length the collater will produce: cropping caps it; padding does not.
        self.exact_sizes = np.minimum(dataset.sizes, max_sample_size) if collate == "crop" else dataset.sizes
        self.too_long = int((self.exact_sizes > max_tokens).sum())
        self.buckets: Optional[np.ndarray] = None
        self.sizes = self.exact_sizes  # what packing and collation use
        fits = self.exact_sizes[self.exact_sizes <= max_tokens]
        if length_buckets > 0 and len(fits):
            # Buckets from the sizes that fit, so rounding up never pushes an utterance past max_tokens.
            self.buckets = bucket_lengths(fits, length_buckets, collate)
            self.sizes = np.where(self.exact_sizes <= max_tokens,
                                  round_to_buckets(np.minimum(self.exact_sizes, fits.max()), self.buckets, collate),
                                  self.exact_sizes)
        self.share = EpochShare(lambda epoch: epoch_batches(self.sizes, self.max_tokens, self.seed, epoch, self.shuffle),
                                rank, world_size, drop_uneven)

    # -- the epoch's batches

    def batches(self, epoch: int) -> list[np.ndarray]:
        return self.share.batches(epoch)

    def bucketing_cost(self, epoch: int = 1) -> str:
        """One line for the run's start: the buckets, the batch shapes and what rounding costs in `epoch`."""
        if self.buckets is None:
            return "exact lengths (data.length_buckets=0)"
        exact = epoch_batches(self.exact_sizes, self.max_tokens, self.seed, epoch, self.shuffle)
        bucketed = self.batches(epoch)
        shapes = len({(len(b), int(self.sizes[b].min() if self.collate == "crop" else self.sizes[b].max()))
                      for b in bucketed})
        lengths = ", ".join(f"{n / SAMPLE_RATE:.3g}" for n in self.buckets)
        head = f"{len(self.buckets)} length buckets ({lengths} s), {shapes} batch shapes in epoch {epoch}"
        if self.collate == "crop":
            fed_exact = sum(len(b) * int(self.exact_sizes[b].min()) for b in exact)
            fed = sum(len(b) * int(self.sizes[b].min()) for b in bucketed)
            return f"{head}; cropping to them drops {100 * (1 - fed / fed_exact):.1f}% of the audio exact crops keep"
        real = float(self.exact_sizes[np.concatenate(bucketed)].sum()) if bucketed else 0.0
        padded = sum(len(b) * int(self.sizes[b].max()) for b in bucketed)
        padded_exact = sum(len(b) * int(self.exact_sizes[b].max()) for b in exact)
        return (f"{head}; padding {100 * (1 - real / padded):.1f}% of the samples "
                f"(exact lengths: {100 * (1 - real / padded_exact):.1f}%)")

    def local_indices(self, epoch: int, consumed: int) -> list[int]:
        return self.share.local_indices(epoch, consumed)

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch (the current one)."""
        return len(self.local_indices(self.position.epoch, 0))

    def make_batch(self, indices: np.ndarray, epoch: int, index: int) -> Batch:
        """The collated batch; unreadable utterances are left out and listed in `skipped`.

        Runs in DataLoader workers, so what it learns travels with the batch, not in `self`.
        """
        items, skipped, kept = [], [], []
        for i in indices:
            try:
                items.append(self.dataset[int(i)])
                kept.append(int(i))
            except AudioError as e:
                skipped.append((self.dataset.records[int(i)].path, str(e)))
        if not items:  # the whole batch is unreadable: nothing to collate, __iter__ passes over it
            return Batch(source=torch.zeros((0, 0)), padding_mask=None, ids=[], num_samples=0, epoch=epoch,
                         index=index, skipped=tuple(skipped))
        bucketed = self.buckets is not None
        if self.collate == "crop":
            length = int(self.sizes[kept].min()) if bucketed else None
            batch = collate_crop(items, self.max_sample_size, batch_rng(self.seed, epoch, index, STREAM_CROP), length)
        else:
            batch = collate_pad(items, int(self.sizes[kept].max()) if bucketed else None)
        return dataclasses.replace(batch, epoch=epoch, index=index, skipped=tuple(skipped))

    def _note_skipped(self, batch: Batch) -> None:
        for path, reason in batch.skipped:
            self.bad_files.setdefault(path, reason)
        if self.max_bad_files is not None and len(self.bad_files) > self.max_bad_files:
            raise TooManyBadFiles(
                f"{bad_files_summary(self.bad_files)}. That is more than data.max_bad_files={self.max_bad_files}, "
                f"so training stops rather than skipping on. {bad_files_fix()}; or allow more with "
                f"--set data.max_bad_files={len(self.bad_files)} (or more)."
            )

    # -- iteration and position

    def __iter__(self) -> Iterator[Batch]:
        epoch, consumed = self.position.epoch, self.position.consumed
        indices = self.local_indices(epoch, consumed)
        batches = self.batches(epoch)
        if not batches:
            raise DataError(
                f"no batch fits: every utterance is longer than data.max_tokens={self.max_tokens} samples. "
                f"Raise data.max_tokens or lower data.max_sample_size."
            )
        if self.num_workers > 0 and indices:
            view = _EpochBatches(self, batches, indices, epoch)
            source: Iterator[Batch] = iter(
                torch.utils.data.DataLoader(
                    view, batch_size=None, shuffle=False, num_workers=self.num_workers,
                    pin_memory=self.pin_memory, collate_fn=identity, worker_init_fn=ignore_stop_signals,
                    # An explicit generator keeps DataLoader from drawing its base seed from the
                    # global torch RNG, which would make dropout depend on epoch boundaries.
                    generator=torch.Generator().manual_seed(self.seed),
                )
            )
        else:
            source = (self.make_batch(batches[g], epoch, g) for g in indices)
        for batch in source:
            self._note_skipped(batch)
            if not batch.ids:
                continue  # every utterance unreadable; the position moves past it with the next batch
            # Counted when handed over, not when a worker prefetched it: a checkpoint taken now
            # resumes exactly after this batch.
            # Global count: this rank's batch and the ones the other ranks took beside it.
            self.position = self.share.position_after(epoch, batch.index)
            yield batch
        self.position = DataPosition(epoch + 1, 0)

    def state_dict(self) -> dict:
        state = self.position.to_dict()
        if self.bad_files:  # saved so a resumed run's count and summary include what came before
            state["bad_files"] = dict(self.bad_files)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition.from_dict(state)
        self.bad_files = dict(state.get("bad_files") or {})


def identity(x):
    return x


def ignore_stop_signals(worker_id: int) -> None:
    """Workers leave Ctrl-C/SIGTERM to the training process, which saves a checkpoint and then
    shuts them down; a worker dying first would turn a clean stop into a DataLoader error."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
