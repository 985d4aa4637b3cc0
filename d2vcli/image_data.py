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
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from d2vcli.errors import UserError
from d2vcli.fileio import read_jsonl
from d2vcli.models.vision import IMAGENET_MEAN, IMAGENET_STD

EVAL_CROP_PCT = 0.875  # 224 of 256
RECORD_FIELDS = ("id", "path", "class", "label", "width", "height")


class ImageLoadError(UserError):
    """An image in a manifest that cannot be read now; the message names it and the fix."""


def pretrain_transform(size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                       min_scale: float = 0.08) -> Callable:
    """The recipe's pretraining augmentation (module docstring); PIL RGB image -> (3, size, size) float."""
    return T.Compose([
        T.ColorJitter(0.4, 0.4, 0.4),
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
