"""`d2v evaluate` on an image classifier: top-1/top-5 per split, a confusion summary, per-image predictions.

    d2v evaluate vision-ft-tiny [--splits val,test]
    from d2vcli.evaluate_vision import evaluate_images; result = evaluate_images(ws, "vision-ft-tiny")

`d2v evaluate` comes here when its checkpoint is a "vision-cls" one (`is_image_classifier`). Every
split's images go through the checkpoint's evaluation transform (`predict.ImageClassifier`: resize
to size / 0.875, center crop, the mean/std stored with the architecture), as fine-tuning's
validation does, so top-1 here equals the `<split>/top1` the run logged for the same weights.
The splits are the prepared image manifests in <workdir>/data/images/ (default: those named val*
or test*). A manifest's classes are matched to the checkpoint's by name, so a model evaluates on
any prepare of the same classes. It writes, atomically, in <workdir>/decode/<run>/ (as speech's
evaluate):

    predictions-<split>.jsonl   per image: id, path, true class, correct, the top-k (class, prob)
    confusion-<split>.tsv       the confusion matrix: one row per true class, one column per prediction
    accuracy-summary.txt        top-1, top-5, images and unreadable files per split
    accuracy.json               everything above as numbers, with per-class accuracy and the most-confused pairs
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from d2vcli import checkpoint as ckpt
from d2vcli.errors import UserError
from d2vcli.fileio import atomic_open, atomic_write_text
from d2vcli.image_data import read_image_manifest
from d2vcli.predict import ImageClassifier, PredictError, load_classifier, predict_images
from d2vcli.prepare.images import image_manifest, images_dir
from d2vcli.transcribe import Failure
from d2vcli.ui import console, table
from d2vcli.workspace import Workspace

TOP_K = 5  # top-k accuracy and the predictions written per image
CONFUSED_PAIRS = 10  # most-confused (true, predicted) pairs kept in the summary


class ImageEvalError(UserError):
    """An image evaluation that cannot run: wrong checkpoint kind, missing or unknown split, unknown class."""


@dataclass
class ImageSplitScore:
    split: str
    images: int
    top1: float  # percent
    top5: float  # percent (top-min(5, classes))
    per_class: dict[str, float]  # class -> top-1 percent on its images (classes with no image left out)
    confused: list[tuple[str, str, int]]  # (true, predicted, count), most frequent first
    unreadable: list[Failure] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"images": self.images, "top1": round(self.top1, 4), "top5": round(self.top5, 4),
                "per_class_top1": {c: round(a, 4) for c, a in self.per_class.items()},
                "most_confused": [{"true": t, "predicted": p, "count": n} for t, p, n in self.confused],
                "unreadable": [{"path": f.path, "reason": f.reason} for f in self.unreadable]}


@dataclass
class ImageEvalResult:
    run: str
    checkpoint: Path
    out_dir: Path
    scores: dict[str, ImageSplitScore] = field(default_factory=dict)

    def top1(self, split: str) -> float:
        return self.scores[split].top1

    def top5(self, split: str) -> float:
        return self.scores[split].top5

    def table(self):
        rows = [[s, sc.images, f"{sc.top1:.2f}", f"{sc.top5:.2f}", len(sc.unreadable)] for s, sc in self.scores.items()]
        return table(f"top-1 / top-5 accuracy (%) - {self.run}", ["split", "images", "top-1", "top-5", "unreadable"],
                     rows)


# ----------------------------------------------------------------------------- dispatch


def is_image_classifier(ws: Workspace, ref: Optional[str | Path], splits: Optional[Sequence[str]] = None) -> bool:
    """Whether `d2v evaluate REF` is an image evaluation: REF resolves to a vision-cls checkpoint, or, with
    no REF, the newest run with a classifier (ctc, vision-cls or text-cls) is an image one. A speech checkpoint
    asked for image splits only is an ImageEvalError."""
    if ref:
        try:
            path = ckpt.find_checkpoint(ws, ref)
        except FileNotFoundError:
            return False  # the speech path reports it, with its own message
        kind = ckpt.peek_kind(path)
        if kind == "vision-pretrain":
            raise ImageEvalError(f"{path} is a pretrained image model (kind vision-pretrain): it has no classifier "
                                 f"to evaluate. Fine-tune it first: `d2v finetune --preset vision-ft-tiny --init {ref}`")
        images = set(present_splits(ws))
        if kind in ("ctc", "pretrain") and splits and all(s in images and not ws.manifest(s).exists() for s in splits):
            raise ImageEvalError(f"{path} is a speech checkpoint (kind {kind}), but {', '.join(splits)} "
                                 f"{'are image splits' if len(splits) > 1 else 'is an image split'} "
                                 f"({images_dir(ws)}): evaluate an image classifier (a `d2v finetune --preset "
                                 f"vision-ft-*` run) on them, or name speech splits")
        return kind == "vision-cls"
    return ckpt.newest_classifier_kind(ws) == "vision-cls"


def present_splits(ws: Workspace) -> list[str]:
    folder = images_dir(ws)
    return sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []


def resolve_splits(ws: Workspace, splits: Optional[Sequence[str]]) -> list[str]:
    """The image splits to score: the given ones (each must be prepared), else the val*/test* ones present."""
    present = present_splits(ws)
    listing = f"prepared image splits in {images_dir(ws)}: {', '.join(present)}" if present else \
        f"no image split is prepared in {images_dir(ws)}: run `d2v prepare images ROOT` or `d2v prepare synthetic-images`"
    if splits:
        unknown = [s for s in splits if s not in present]
        if unknown:
            raise ImageEvalError(f"unknown image split{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                                 f"(no {image_manifest(ws, unknown[0])}); {listing}")
        return list(dict.fromkeys(splits))
    default = [s for s in present if s.startswith(("val", "test"))]
    if not default:
        raise ImageEvalError(f"no validation or test image split to evaluate on; {listing}. Pass --splits NAME.")
    return default


# ----------------------------------------------------------------------------- scoring


def score_split(clf: ImageClassifier, split: str, manifest: Path, top_k: int = TOP_K
                ) -> tuple[ImageSplitScore, list[dict], torch.Tensor]:
    """Predict every image of a manifest: (the score, one prediction row per image, the (C, C) confusion)."""
    records = read_image_manifest(manifest)
    index = {c: i for i, c in enumerate(clf.classes)}
    foreign = sorted({r["class"] for r in records} - set(index))
    if foreign:
        raise ImageEvalError(f"{manifest}: class{'es' * (len(foreign) > 1)} {', '.join(foreign[:5])} "
                             f"{'are' if len(foreign) > 1 else 'is'} not among the {len(index)} classes of "
                             f"{clf.checkpoint}; evaluate on images of the classes it was trained on")
    failures: list[Failure] = []
    by_path = {str(r["path"]): r for r in records}
    preds = predict_images(clf, [r["path"] for r in records], max(top_k, TOP_K), failures)
    C = len(clf.classes)
    confusion = torch.zeros(C, C, dtype=torch.long)
    hits1 = hits5 = 0
    rows = []
    k5 = min(TOP_K, C)
    for p in preds:
        r = by_path[p.path]
        true = r["class"]
        top_names = [c for c, _ in p.top]
        confusion[index[true], index[top_names[0]]] += 1
        hits1 += top_names[0] == true
        hits5 += true in top_names[:k5]
        rows.append({"id": r["id"], "path": p.path, "class": true, "correct": top_names[0] == true,
                     "top": [[c, round(v, 6)] for c, v in p.top[:top_k]]})
    n = len(preds)
    per_class = {c: 100.0 * confusion[i, i].item() / confusion[i].sum().item()
                 for i, c in enumerate(clf.classes) if confusion[i].sum() > 0}
    off = confusion.clone()
    off.fill_diagonal_(0)
    pairs = sorted(((clf.classes[t], clf.classes[q], int(off[t, q])) for t, q in off.nonzero().tolist()),
                   key=lambda x: (-x[2], x[0], x[1]))
    score = ImageSplitScore(split, n, 100.0 * hits1 / max(n, 1), 100.0 * hits5 / max(n, 1), per_class,
                            pairs[:CONFUSED_PAIRS], failures)
    return score, rows, confusion


def write_split_artefacts(out_dir: Path, split: str, classes: Sequence[str], rows: list[dict],
                          confusion: torch.Tensor) -> None:
    with atomic_open(out_dir / f"predictions-{split}.jsonl") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    with atomic_open(out_dir / f"confusion-{split}.tsv") as fh:
        fh.write("true \\ predicted\t" + "\t".join(classes) + "\n")
        for c, counts in zip(classes, confusion.tolist()):
            fh.write(c + "\t" + "\t".join(map(str, counts)) + "\n")


def evaluate_images(ws: Workspace, checkpoint: Optional[str | Path] = None, splits: Optional[Sequence[str]] = None,
                    top_k: int = TOP_K, trust: bool = False, device: str = "auto") -> ImageEvalResult:
    """Score a vision-cls checkpoint on prepared image splits and write the artefacts (module docstring).

    `checkpoint`: a file, run directory or run name (default: the newest image classification run).
    """
    if top_k < 1:
        raise ImageEvalError(f"top_k must be at least 1, got {top_k}")
    names = resolve_splits(ws, splits)
    try:
        clf = load_classifier(ws, checkpoint, trust=trust, device=device)
    except PredictError as e:
        raise ImageEvalError(f"{e}. `d2v evaluate` scores image splits only with an image classifier.") from None
    run = ckpt.run_name(ws, clf.checkpoint)
    out_dir = ws.decode_dir / run
    out_dir.mkdir(parents=True, exist_ok=True)
    result = ImageEvalResult(run, clf.checkpoint, out_dir)
    for split in names:
        score, rows, confusion = score_split(clf, split, image_manifest(ws, split), top_k)
        write_split_artefacts(out_dir, split, clf.classes, rows, confusion)
        result.scores[split] = score
    lines = ["split\timages\ttop1\ttop5\tunreadable"]
    lines += [f"{s}\t{sc.images}\t{sc.top1:.2f}\t{sc.top5:.2f}\t{len(sc.unreadable)}" for s, sc in result.scores.items()]
    atomic_write_text(out_dir / "accuracy-summary.txt", "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "accuracy.json", json.dumps(
        {"run": run, "checkpoint": str(clf.checkpoint), "classes": clf.classes, "top_k": top_k,
         "splits": {s: sc.to_dict() for s, sc in result.scores.items()}}, indent=1) + "\n")
    return result


def print_image_result(result: ImageEvalResult) -> None:
    console.print(result.table())
    for split, sc in result.scores.items():
        if sc.confused:
            pairs = ", ".join(f"{t} -> {p} ({n})" for t, p, n in sc.confused[:5])
            console.print(f"{split}: most confused (true -> predicted): {pairs}", markup=False)
        worst = sorted(sc.per_class.items(), key=lambda x: x[1])[:3]
        if worst:
            console.print(f"{split}: lowest per-class top-1: " + ", ".join(f"{c} {a:.1f}%" for c, a in worst),
                          markup=False)
        for f in sc.unreadable:
            console.print(f"[bold yellow]warning:[/] {split}: skipped {f.path}: {f.reason}")
    console.print(f"artefacts: {result.out_dir} (predictions-*.jsonl, confusion-*.tsv, accuracy-summary.txt, "
                  f"accuracy.json)", markup=False)
