"""A generated, labeled image corpus for the image demo and tests: no downloads, made in seconds.

    generate_image_corpus("corpus/synthetic-images", size="demo", seed=0)

Ten classes, each a **shape** (circle, square, triangle, cross, ring) filled with a **texture**
(solid, striped, checked, dotted, wavy), drawn at 32x32 under a random pose (rotation, position),
scale, background (a random colour with a gradient) and pixel noise. Every shape comes with two
textures and every texture with two shapes (`PAIRS`), so neither cue alone names the class. Each
class has a **colour**, a hue centre, but every image's hue is drawn up to a quarter turn away from
it, and the background is random: mean colour alone is a weak cue (tests/test_synthetic_images.py
measures it), so a classifier has to see the silhouette and the pattern. The textures have a period
of about one vision-tiny patch and turn with the shape, so a masked patch inside a shape can be
predicted from the patches around it: masked prediction on the unlabeled pool has a pattern to
learn that the small labeled split alone shows few examples of. How much that helps a classifier
is measured, not assumed: docs/images.md (`benchmarks/bench_learning.py --images`).

Layout (ImageFolder, so `d2v prepare images` reads it like any tree):

    <out>/images/pool/<class>/NNNNN.png    the large pool, for pretraining (its labels go unused there)
    <out>/images/train/<class>/NNNNN.png   the small labeled subset, for fine-tuning or a linear probe
    <out>/images/val/<class>/...  <out>/images/test/<class>/...
    <out>/corpus.json                      parameters and counts; an identical corpus is reused

Every image comes from its own numpy Generator seeded by (seed, split, index), so the corpus is
the same on every machine; it is written into a temporary sibling directory and renamed into place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from d2vcli.fileio import build_stamped_dir

FORMAT_VERSION = 2
IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross", "ring")
TEXTURES = ("solid", "striped", "checked", "dotted", "wavy")
# Each shape comes with two textures and each texture with two shapes, so neither cue alone names the
# class: shape s carries texture s and texture s + 2 (mod 5). Sorted by name, so a class's index here is
# its label in the prepared manifests (classes.txt is in folder order).
PAIRS = tuple(sorted((s, TEXTURES[(i + k) % len(TEXTURES)]) for i, s in enumerate(SHAPES) for k in (0, 2)))
CLASSES = tuple(f"{s}-{t}" for s, t in PAIRS)
HUE_JITTER = 0.25  # of a full turn, either way: a class's colour overlaps its neighbours'
DARK = 0.3  # a texture's dark parts keep this share of the colour


@dataclass(frozen=True)
class ImageCorpusSize:
    pool: int  # images in the pretraining pool (all classes, balanced)
    train_per_class: int
    val_per_class: int
    test_per_class: int


SIZES = {"demo": ImageCorpusSize(8000, 10, 30, 30), "tiny": ImageCorpusSize(100, 3, 3, 3)}
Size = Literal["demo", "tiny"]
SPLITS = ("pool", "train", "val", "test")


@dataclass
class ImageCorpusInfo:
    root: str  # the ImageFolder tree (<out>/images)
    size: str
    seed: int
    version: int
    images: dict  # split -> count
    classes: list


# --------------------------------------------------------------------------- drawing


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit-sized shape in its own (rotated, scaled) coordinates."""
    r = np.sqrt(u * u + v * v)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == "triangle":  # equilateral, circumradius 1: three half-planes
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2 * math.pi * k / 3 + math.pi / 2
            inside &= u * math.cos(a) + v * math.sin(a) >= -0.5
        return inside
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    raise ValueError(f"unknown shape {shape!r}")


def _texture_dark(texture: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where a texture darkens the shape, in the shape's own coordinates (so it turns and scales with it).
    The period is about a patch of vision-tiny (4 pixels) or a little more, so one patch sees the pattern."""
    period = rng.uniform(0.35, 0.55)
    pu, pv = u / period + rng.uniform(0, 1), v / period + rng.uniform(0, 1)  # in periods, random phase
    if texture == "solid":
        return np.zeros_like(u, dtype=bool)
    if texture == "striped":
        return np.sin(2 * math.pi * pu) < 0
    if texture == "checked":
        return (np.floor(pu) + np.floor(pv)) % 2 == 0
    if texture == "dotted":  # a dot in every cell
        return (pu % 1 - 0.5) ** 2 + (pv % 1 - 0.5) ** 2 < 0.3 ** 2
    if texture == "wavy":  # stripes bent by a sine across them
        return np.sin(2 * math.pi * (pu + 0.35 * np.sin(2 * math.pi * pv / 2))) < 0
    raise ValueError(f"unknown texture {texture!r}")


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def render(label: int, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image of class `label`: (size, size, 3) uint8."""
    shape, texture = PAIRS[label]
    # Background: a random colour with a linear gradient in a random direction.
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1) * 2 - 1  # [-1, 1]
    bg = rng.uniform(0.1, 0.9, 3)
    g_angle = rng.uniform(0, 2 * math.pi)
    grad = (xs * math.cos(g_angle) + ys * math.sin(g_angle))[..., None] * rng.uniform(0.05, 0.25)
    img = np.clip(bg + grad * rng.choice([-1, 1], 3), 0, 1)
    # Pose and scale: the shape's own coordinates (u, v) for every pixel.
    scale = rng.uniform(0.5, 0.9)
    cx, cy = rng.uniform(-1 + scale, 1 - scale, 2) * 0.9
    theta = rng.uniform(0, 2 * math.pi)
    dx, dy = xs - cx, ys - cy
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / scale
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / scale
    inside = _shape_mask(shape, u, v)
    # Colour: the class's hue centre, jittered up to a quarter turn; saturation and value random.
    hue = (label / len(CLASSES) + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    fg = _hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0))
    colour = np.broadcast_to(fg, img.shape).copy()
    colour[_texture_dark(texture, u, v, rng)] *= DARK
    img[inside] = colour[inside]
    img += rng.normal(0, rng.uniform(0.02, 0.08), img.shape)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------- the corpus


def _plan(size: ImageCorpusSize) -> dict[str, list[int]]:
    """split -> the label of each image, balanced over classes."""
    n = len(CLASSES)
    per_class = {"train": size.train_per_class, "val": size.val_per_class, "test": size.test_per_class}
    return {"pool": [i % n for i in range(size.pool)],
            **{split: [c for c in range(n) for _ in range(k)] for split, k in per_class.items()}}


def _stamp_params(size: str, seed: int) -> dict:
    return {"version": FORMAT_VERSION, "size": size, "seed": seed, "sizes": asdict(SIZES[size])}


def generate_image_corpus(out_dir: Path | str, size: Size = "demo", seed: int = 0, progress=None) -> ImageCorpusInfo:
    """Generate the corpus under `out_dir` (an identical existing one is reused; a folder that is not
    one of ours is never touched). `progress` is an optional rich Progress."""
    if size not in SIZES:
        raise ValueError(f"unknown synthetic image corpus size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out_dir).expanduser().resolve()

    def build(tmp: Path) -> dict:
        plan = _plan(SIZES[size])
        task = progress.add_task("generating synthetic images", total=sum(map(len, plan.values()))) \
            if progress is not None else None
        for s_idx, (split, labels) in enumerate(plan.items()):
            for name in CLASSES:
                (tmp / "images" / split / name).mkdir(parents=True)
            for i, label in enumerate(labels):
                pixels = render(label, np.random.default_rng([seed, s_idx, i]))
                Image.fromarray(pixels, "RGB").save(tmp / "images" / split / CLASSES[label] / f"{i:05d}.png")
                if task is not None:
                    progress.advance(task)
        return asdict(ImageCorpusInfo(root=str(out / "images"), size=size, seed=seed, version=FORMAT_VERSION,
                                      images={s: len(v) for s, v in plan.items()}, classes=list(CLASSES)))

    return ImageCorpusInfo(**build_stamped_dir(out, _stamp_params(size, seed), "synthetic image corpus", build))
