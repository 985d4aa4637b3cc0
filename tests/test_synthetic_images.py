"""The synthetic image corpus: deterministic, labeled, in ImageFolder layout, and not solvable by colour alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from d2vcli.errors import UserError
from d2vcli.prepare.images import image_manifest
from d2vcli.prepare.synthetic_images import prepare_synthetic_images
from d2vcli.synthetic_images import CLASSES, PAIRS, SHAPES, TEXTURES, generate_image_corpus, render
from d2vcli.workspace import Workspace


def test_tiny_corpus_is_prepared_into_four_labeled_splits(tmp_path):
    ws = Workspace(tmp_path / "w")
    summary = prepare_synthetic_images(ws, size="tiny")
    counts = {s.split: (s.images, s.classes, sum(s.skipped.values())) for s in summary.splits}
    assert counts == {"pool": (100, 10, 0), "train": (30, 10, 0), "val": (30, 10, 0), "test": (30, 10, 0)}
    row = json.loads(image_manifest(ws, "train").read_text().splitlines()[0])
    assert (row["width"], row["height"], row["mode"], row["class"]) == (32, 32, "RGB", CLASSES[row["label"]])
    again = prepare_synthetic_images(ws, size="tiny")  # the corpus is reused and every split is up to date
    assert {s.status for s in again.splits} == {"up to date"}


def test_the_same_seed_gives_the_same_pixels_and_another_seed_others(tmp_path):
    a = generate_image_corpus(tmp_path / "a", size="tiny", seed=3)
    b = generate_image_corpus(tmp_path / "b", size="tiny", seed=3)
    c = generate_image_corpus(tmp_path / "c", size="tiny", seed=4)
    name = f"train/{CLASSES[4]}/00012.png"
    pa, pb, pc = (np.array(Image.open(f"{x.root}/{name}")) for x in (a, b, c))
    assert np.array_equal(pa, pb) and not np.array_equal(pa, pc)


def test_a_folder_that_is_not_a_corpus_is_never_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(UserError, match="not a d2v synthetic image corpus"):
        prepare_synthetic_images(Workspace(tmp_path / "w"), out=tmp_path / "mine", size="tiny")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"


def _softmax_regression_accuracy(train_x, train_y, test_x, test_y, steps=1500):
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-9
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    w, bias = np.zeros((a.shape[1], len(CLASSES))), np.zeros(len(CLASSES))
    for _ in range(steps):
        z = a @ w + bias
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(train_y)), train_y] -= 1
        w -= 0.5 * a.T @ p / len(train_y)
        bias -= 0.5 * p.mean(0)
    return float(((b @ w + bias).argmax(1) == test_y).mean())


def test_mean_colour_alone_is_a_weak_cue_so_shape_and_texture_must_be_seen():
    def mean_colours(offset, n):
        labels = np.arange(n) % len(CLASSES)
        x = np.stack([render(int(c), np.random.default_rng([9, offset, i])).reshape(-1, 3).mean(0)
                      for i, c in enumerate(labels)])
        return x, labels

    acc = _softmax_regression_accuracy(*mean_colours(0, 1500), *mean_colours(1, 500))
    assert 0.1 < acc < 0.3  # above chance (colour is one of the class cues), far from solved


def test_neither_shape_nor_texture_alone_names_the_class():
    """Every shape comes with two textures and every texture with two shapes, and the class index is the
    prepared label (classes.txt is in folder order)."""
    assert len(set(PAIRS)) == len(CLASSES) == 10 and list(CLASSES) == sorted(CLASSES)
    assert sorted(s for s, _ in PAIRS) == sorted(SHAPES * 2) and sorted(t for _, t in PAIRS) == sorted(TEXTURES * 2)
