"""The predict command: the top classes of image files under an image classification checkpoint.

    d2v predict photo.jpg more/ --model vision-ft-tiny --top-k 3 [--json]
    from d2vcli.predict import predict; preds = predict(["a.png"], ws, model="vision-ft-tiny")

The image counterpart of `d2v transcribe`. A "vision-cls" checkpoint (`d2v finetune --preset
vision-ft-*`, or `d2v import hf` of a `Data2VecVisionForImageClassification` folder) carries its
class names and its architecture, and the architecture carries the input size and the mean/std
the model was fine-tuned with, so every image gets the recipe's evaluation transform
(`image_data.eval_transform`: resize to size / 0.875, center crop, normalize) and nothing is read
from the data directory. Files that cannot be decoded are returned in `Predictions.failures`
(path and reason) and the others are still predicted; if none can be, PredictError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from PIL import Image
from torch import nn

from d2vcli import checkpoint as ckpt
from d2vcli.decode.emissions import resolve_device
from d2vcli.errors import UserError
from d2vcli.image_data import ImageLoadError, eval_transform, load_rgb
from d2vcli.models.loading import LoadedModel, load_model, vision_arch
from d2vcli.transcribe import Failure
from d2vcli.workspace import Workspace

DEFAULT_TOP_K = 5
PREDICT_BATCH = 64  # images per forward pass


class PredictError(UserError):
    """No image could be predicted, or the checkpoint is not an image classifier; names the files and the fix."""


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]]  # (class, probability), most probable first

    def to_dict(self) -> dict:
        return {"path": self.path, "top": [{"class": c, "prob": round(p, 6)} for c, p in self.top]}


class Predictions(list):
    """The predictions of the images that could be read, in input order; `failures` lists the others."""

    def __init__(self, items=(), failures=(), checkpoint: Optional[Path] = None):
        super().__init__(items)
        self.failures: list[Failure] = list(failures)
        self.checkpoint = checkpoint


# ----------------------------------------------------------------------------- the classifier


@dataclass
class ImageClassifier:
    """A vision-cls network with its class names and its evaluation transform."""

    network: nn.Module  # Data2VecVisionForImageClassification, eval mode
    classes: list[str]
    transform: Callable  # PIL RGB image -> (3, H, W)
    checkpoint: Path
    state: dict = field(repr=False, default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) transformed images -> (B, C) softmax probabilities, float32 on the CPU."""
        logits = self.network(images.to(self.device)).float()
        return logits.softmax(-1).cpu()

    def top(self, probs: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """(B, C) probabilities -> per row the k most probable (class, probability)."""
        values, indices = probs.topk(min(k, probs.shape[1]), -1)
        return [[(self.classes[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
                for vs, ix in zip(values, indices)]


def classifier_from(loaded: LoadedModel, path: Path) -> ImageClassifier:
    """An ImageClassifier of a loaded checkpoint; any other kind is a PredictError with the fix."""
    if loaded.kind != "vision-cls":
        fix = {"vision-pretrain": f"it is a pretrained image model with no classifier: fine-tune it first "
                                  f"(`d2v finetune --preset vision-ft-tiny --init {path}`)",
               "ctc": "it is a speech (CTC) model: use `d2v transcribe` / `d2v evaluate` for audio",
               "pretrain": "it is a pretrained speech model"}.get(loaded.kind, "")
        raise PredictError(f"{path} is a '{loaded.kind}' checkpoint, not an image classifier (vision-cls); {fix}")
    arch = vision_arch(loaded.state.get(ckpt.ARCH_KEY) or {}, path)
    return ImageClassifier(loaded.model, list(loaded.classes or []),
                           eval_transform(arch.image_size, arch.image_mean, arch.image_std), path, loaded.state)


def find_image_classifier(ws: Workspace, ref: Optional[str | Path] = None) -> Path:
    """`ref` (path, run dir or run name), else the newest run whose checkpoint is a vision-cls one."""
    if ref:
        return ckpt.find_checkpoint(ws, ref)
    found = ckpt.newest_checkpoint(ws, "vision-cls", "image classification")
    if found is not None:
        return found
    raise FileNotFoundError(
        f"no image classification (vision-cls) run in {ws.runs_dir}. Fine-tune one with "
        "`d2v finetune --preset vision-ft-tiny --init RUN`, import one with `d2v import hf`, or pass --model.")


def load_classifier(ws: Workspace, ref: Optional[str | Path] = None, trust: bool = False,
                    device: str = "auto") -> ImageClassifier:
    path = find_image_classifier(ws, ref)
    clf = classifier_from(load_model(path, trust=trust), path)
    clf.network.to(resolve_device(device))
    return clf


# ----------------------------------------------------------------------------- inputs


def image_extensions() -> set[str]:
    """Every file extension PIL can open, lower case with the dot."""
    Image.init()
    return {e.lower() for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def expand_images(inputs: Sequence[Path | str]) -> tuple[list[Path], list[Failure]]:
    """The files to predict (directories replaced by the image files inside them) and the inputs not there."""
    files, failures = [], []
    exts = image_extensions()
    for p in map(Path, inputs):
        if p.is_dir():
            inside = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
            if not inside:
                failures.append(Failure(str(p), "a directory with no image files in it (searched recursively)"))
            files.extend(inside)
        elif p.is_file():
            files.append(p)
        else:
            failures.append(Failure(str(p), "image file not found"))
    return files, failures


def read_image(path: Path | str) -> Image.Image:
    """An image file as RGB; anything PIL cannot decode (not an image, truncated, empty) is an ImageLoadError."""
    try:
        return load_rgb(str(path))
    except ImageLoadError:
        raise ImageLoadError(f"not a readable image ({_why(path)})") from None


def _why(path) -> str:
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - only the reason's text is wanted
        return str(e).strip() or type(e).__name__
    return "unreadable"


# ----------------------------------------------------------------------------- predict


def predict_images(clf: ImageClassifier, images: Sequence[Path | str | Image.Image], top_k: int = DEFAULT_TOP_K,
                   failures: Optional[list[Failure]] = None, names: Optional[Sequence[str]] = None) -> list[Prediction]:
    """Top-k (class, probability) per image, batched; unreadable files go to `failures` (else they raise)."""
    out, batch, batch_names = [], [], []

    def flush():
        if batch:
            for name, top in zip(batch_names, clf.top(clf.probabilities(torch.stack(batch)), top_k)):
                out.append(Prediction(name, top))
            batch.clear()
            batch_names.clear()

    for i, item in enumerate(images):
        name = names[i] if names is not None else (str(item) if not isinstance(item, Image.Image) else "<image>")
        try:
            im = item.convert("RGB") if isinstance(item, Image.Image) else read_image(item)
        except ImageLoadError as e:
            if failures is None:
                raise ImageLoadError(f"{name}: {e}") from None
            failures.append(Failure(name, str(e)))
            continue
        batch.append(clf.transform(im))
        batch_names.append(name)
        if len(batch) == PREDICT_BATCH:
            flush()
    flush()
    return out


def predict(images: Sequence[Path | str], ws: Optional[Workspace] = None, model: Optional[str | Path] = None,
            top_k: int = DEFAULT_TOP_K, trust: bool = False, device: str = "auto") -> Predictions:
    """Predict files and directories of images with `model` (checkpoint, run directory or run name;
    default: the newest image classification run). Unreadable files land in `.failures`."""
    ws = ws if ws is not None else Workspace.resolve(None)
    if top_k < 1:
        raise PredictError(f"--top-k must be at least 1, got {top_k}")
    files, failures = expand_images(images)
    if not files:  # before loading the model: nothing to do
        raise PredictError(_no_file(failures))
    clf = load_classifier(ws, model, trust=trust, device=device)
    out = predict_images(clf, files, top_k, failures)
    if not out:
        raise PredictError(_no_file(failures))
    return Predictions(out, failures, clf.checkpoint)


def _no_file(failures: Sequence[Failure]) -> str:
    return "no image could be predicted:\n" + "\n".join(f"  {f.path}: {f.reason}" for f in failures)


def format_predictions(preds: Sequence[Prediction], as_json: bool = False) -> str:
    """One line per image: its path, then `class probability` pairs, tab-separated; or a JSON list."""
    if as_json:
        return json.dumps([p.to_dict() for p in preds], indent=1) + "\n"
    return "".join(p.path + "".join(f"\t{c} {v:.4f}" for c, v in p.top) + "\n" for p in preds)
