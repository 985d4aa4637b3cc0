"""Image manifests to tensors (d2vcli/image_data.py): RGB conversion, the recipe's transforms, DataLoader workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from d2vcli.errors import UserError
from d2vcli.image_data import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, eval_transform, pretrain_transform
from d2vcli.prepare.images import image_manifest, prepare_images
from d2vcli.workspace import Workspace


@pytest.fixture()
def prepared(tmp_path):
    """A prepared split whose images are RGB, grayscale, CMYK and RGBA, each one flat colour."""
    flat = {"rgb": ("RGB", (200, 100, 50)), "gray": ("L", 128), "cmyk": ("CMYK", (0, 0, 0, 0)),
            "rgba": ("RGBA", (10, 20, 30, 255))}
    for name, (mode, value) in flat.items():
        (tmp_path / "in" / "train" / name).mkdir(parents=True)
        Image.new(mode, (60, 40), value).save(tmp_path / "in" / "train" / name / "x.png" if mode != "CMYK"
                                               else tmp_path / "in" / "train" / name / "x.jpg")
    ws = Workspace(tmp_path / "w")
    prepare_images(ws, tmp_path / "in")
    return ws


def test_every_mode_becomes_a_normalized_rgb_tensor(prepared):
    ds = ImageDataset(image_manifest(prepared, "train"), eval_transform(32))
    by_class = {r["class"]: i for i, r in enumerate(ds.records)}
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    expect = {"rgb": (200, 100, 50), "gray": (128, 128, 128), "cmyk": (255, 255, 255), "rgba": (10, 20, 30)}
    for name, rgb in expect.items():
        x, label = ds[by_class[name]]
        assert x.shape == (3, 32, 32) and label == ds.records[by_class[name]]["label"]
        want = (torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 255 - mean) / std
        torch.testing.assert_close(x, want.expand(3, 32, 32), atol=0.03, rtol=0)  # JPEG and bicubic rounding


def test_pretrain_augmentation_is_random_but_follows_the_torch_seed(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    tf = pretrain_transform(32)
    torch.manual_seed(1)
    a = tf(img)
    torch.manual_seed(1)
    b = tf(img)
    c = tf(img)
    assert a.shape == (3, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(eval_transform(32)(img), eval_transform(32)(img))


def test_a_dataloader_decodes_in_worker_processes(prepared):
    ds = ImageDataset(image_manifest(prepared, "train"), eval_transform(16))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 16, 16) and sorted(y.tolist()) == [0, 1, 2, 3]


def test_a_speech_manifest_or_a_changed_file_is_a_clear_error(prepared, tmp_path):
    speech = tmp_path / "dev.jsonl"
    speech.write_text(json.dumps({"id": "a", "path": "/x.flac", "num_samples": 1}) + "\n")
    with pytest.raises(UserError, match="not an image record"):
        ImageDataset(speech, eval_transform(16))
    ds = ImageDataset(image_manifest(prepared, "train"), eval_transform(16))
    with open(ds.records[0]["path"], "wb") as fh:
        fh.write(b"overwritten")
    with pytest.raises(UserError, match="re-run the prepare"):
        ds[0]
