"""Image manifests to tensors: decode to RGB and apply the recipe's transforms, inside DataLoader workers.

    ds = ImageDataset(ws_images / "train.jsonl", pretrain_transform(224))
    loader = DataLoader(ds, batch_size=128, num_workers=8, shuffle=True)   # (B, 3, 224, 224), labels (B,)

The manifests are `d2v prepare images`' (`d2vcli/prepare/images.py`). Every image is converted to
RGB when it is read (grayscale, palette and CMYK files are kept by prepare and counted there),
then transformed with torchvision:

- `pretrain_transform`: data2vec 1.0 vision's pretraining augmentation, in the BEiT repo's order
  (`beit/datasets.py`, `DataAugmentationForCyclical`): ColorJitter(0.4, 0.4, 0.4), horizontal flip,
  RandomResizedCrop(size, scale 0.08-1, ratio 3/4-4/3, bicubic), then ImageNet mean/std.
- `eval_transform`: resize the shorter side to size / 0.875 (bicubic), center crop, normalize
  (the repo's evaluation: 256 then 224).

Masks are not drawn here: the training step draws them from the batch's seed
(`objective.image_masking.block_masks`), as for speech.

`ImageBatchLoader` is the engine's `BatchSource` for images: each epoch is a seeded permutation
cut into batches of `images_per_batch` (the last, short one dropped, as the recipe's
`drop_last=True`), rank r takes global batches r, r + world, ... and every batch is decoded and
augmented in a DataLoader worker with torch's RNG seeded from (seed, epoch, global batch index),
so a batch's pixels are the same in any process, worker count or resumed run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from d2vcli.data import Batch, DataError, DataPosition, EpochShare, identity, ignore_stop_signals, batch_rng
from d2vcli.errors import UserError
from d2vcli.fileio import read_jsonl
from d2vcli.models.vision import IMAGENET_MEAN, IMAGENET_STD

STREAM_AUGMENT = 3  # batch_rng stream of the augmentation (data.py's streams 0-2: crop, masks, mask noise)

EVAL_CROP_PCT = 0.875  # 224 of 256
RECORD_FIELDS = ("id", "path", "class", "label", "width", "height")


class ImageLoadError(UserError):
    """An image in a manifest that cannot be read now; the message names it and the fix."""


def pretrain_transform(size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                       min_scale: float = 0.08, color_jitter: bool = True) -> Callable:
    """The recipe's pretraining augmentation (module docstring); PIL RGB image -> (3, size, size) float.
    `color_jitter` False: data2vec 2.0's (crop, flip, normalize only; fairseq `mae_image_dataset.py`)."""
    return T.Compose([
        *([T.ColorJitter(0.4, 0.4, 0.4)] if color_jitter else []),
        T.RandomHorizontalFlip(0.5),
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   crop_pct: float = EVAL_CROP_PCT) -> Callable:
    """Resize the shorter side to size / crop_pct, center crop `size`, normalize: deterministic."""
    return T.Compose([
        T.Resize(int(size / crop_pct), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def read_image_manifest(path: Path) -> list[dict]:
    """The records of an image manifest, each checked for the fields the loader needs."""
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(f"image manifest not found: {path}. Run `d2v prepare images` (or "
                             f"`d2v prepare synthetic-images`) first.")
    rows = read_jsonl(path)
    for i, row in enumerate(rows, 1):
        missing = [f for f in RECORD_FIELDS if f not in row]
        if missing:
            raise ImageLoadError(f"{path}: line {i} is not an image record (no {', '.join(missing)}); it may be a "
                                 f"speech manifest. Image manifests live in <workdir>/data/images/.")
    return rows


def load_rgb(path: str) -> Image.Image:
    """An image file as RGB (grayscale, palette, CMYK and alpha are converted)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(f"cannot read {path} ({str(e).strip() or type(e).__name__}); it changed since "
                             f"`d2v prepare images` checked it: re-run the prepare") from None


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, label) per manifest line; decoding runs in the DataLoader's worker processes."""

    def __init__(self, manifest: Path, transform: Callable):
        self.records = read_image_manifest(manifest)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        r = self.records[index]
        return self.transform(load_rgb(r["path"])), int(r["label"])


# ----------------------------------------------------------------------------- the engine's batch source


class ImageBatchLoader:
    """One rank's image batches of the current epoch, from the saved position on (engine.BatchSource).

    A `data.Batch` with `source` (B, 3, H, W) float, `target` the labels (B,), `num_samples` B and
    `epoch`/`index` (the key of its masks). Unreadable images are left out of their batch and listed
    (`bad_files`); past `max_bad_files` training stops with the list.
    """

    def __init__(self, records: list[dict], transform: Callable, images_per_batch: int, seed: int, *,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                 max_bad_files: Optional[int] = None):
        self.records, self.transform, self.images_per_batch, self.seed = records, transform, images_per_batch, seed
        self.rank, self.world_size, self.num_workers, self.pin_memory = rank, world_size, num_workers, pin_memory
        self.max_bad_files = max_bad_files
        self.position = DataPosition()
        self.bad_files: dict[str, str] = {}
        self.share = EpochShare(self._plan, rank, world_size)

    def _plan(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches: a permutation keyed by (seed, epoch), full batches only."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.records))
        n = len(order) // self.images_per_batch
        return [order[i * self.images_per_batch:(i + 1) * self.images_per_batch] for i in range(n)]

    def batches(self, epoch: int) -> list[np.ndarray]:
        return self.share.batches(epoch)

    def local_indices(self, epoch: int, consumed: int) -> list[int]:
        """Global batch indices this rank reads in `epoch` after `consumed` (an even share per rank)."""
        return self.share.local_indices(epoch, consumed)

    def make_batch(self, indices: np.ndarray, epoch: int, index: int) -> Batch:
        """Decode and augment the batch's images; runs in DataLoader workers."""
        images, labels, ids, skipped = [], [], [], []
        seed = int(batch_rng(self.seed, epoch, index, STREAM_AUGMENT).integers(2**63 - 1))
        # The transforms draw from torch's global RNG: seed it for this batch, and leave the caller's as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i in indices:
                r = self.records[int(i)]
                try:
                    images.append(self.transform(load_rgb(r["path"])))
                except ImageLoadError as e:
                    skipped.append((r["path"], str(e)))
                    continue
                labels.append(int(r["label"]))
                ids.append(str(r["id"]))
        source = torch.stack(images) if images else torch.zeros((0, 0, 0, 0))
        return Batch(source=source, padding_mask=None, ids=ids, num_samples=len(images),
                     target=torch.tensor(labels, dtype=torch.long), epoch=epoch, index=index,
                     skipped=tuple(skipped))

    def _note_skipped(self, batch: Batch) -> None:
        for path, reason in batch.skipped:
            self.bad_files.setdefault(path, reason)
        if self.max_bad_files is not None and len(self.bad_files) > self.max_bad_files:
            shown = "; ".join(f"{p} ({why})" for p, why in list(self.bad_files.items())[:10])
            raise DataError(f"{len(self.bad_files)} unreadable images skipped, more than data.max_bad_files="
                            f"{self.max_bad_files}: {shown}. Re-run `d2v prepare images` (it lists unreadable "
                            f"files in skipped-<split>.tsv), or allow more with --set data.max_bad_files=N.")

    def __iter__(self) -> Iterator[Batch]:
        epoch, consumed = self.position.epoch, self.position.consumed
        batches = self.batches(epoch)
        if not batches:
            raise DataError(f"no full batch: {len(self.records)} images, data.images_per_batch="
                            f"{self.images_per_batch}. Lower data.images_per_batch or prepare more images.")
        indices = self.local_indices(epoch, consumed)
        if self.num_workers > 0 and indices:
            view = _EpochImageBatches(self, batches, indices, epoch)
            source: Iterator[Batch] = iter(torch.utils.data.DataLoader(
                view, batch_size=None, shuffle=False, num_workers=self.num_workers, pin_memory=self.pin_memory,
                collate_fn=identity, worker_init_fn=ignore_stop_signals,
                generator=torch.Generator().manual_seed(self.seed)))
        else:
            source = (self.make_batch(batches[g], epoch, g) for g in indices)
        for batch in source:
            self._note_skipped(batch)
            if not batch.ids:
                continue
            # Counted when handed over: a checkpoint taken now resumes right after this batch.
            self.position = self.share.position_after(epoch, batch.index)
            yield batch
        self.position = DataPosition(epoch + 1, 0)

    def state_dict(self) -> dict:
        state = self.position.to_dict()
        if self.bad_files:
            state["bad_files"] = dict(self.bad_files)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.position = DataPosition.from_dict(state)
        self.bad_files = dict(state.get("bad_files") or {})


class _EpochImageBatches(torch.utils.data.Dataset):
    """Item i is rank-local batch i, whole, so every random draw is keyed by the batch, not the worker."""

    def __init__(self, loader: ImageBatchLoader, batches: list[np.ndarray], global_indices: list[int], epoch: int):
        self.loader, self.batches, self.global_indices, self.epoch = loader, batches, global_indices, epoch

    def __len__(self) -> int:
        return len(self.global_indices)

    def __getitem__(self, i: int) -> Batch:
        g = self.global_indices[i]
        return self.loader.make_batch(self.batches[g], self.epoch, g)
