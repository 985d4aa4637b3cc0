"""`d2v evaluate` on an image classifier and `d2v predict`: accuracy against direct computations, files, errors.

Run: python -m pytest -q tests/test_evaluate_vision.py
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import d2vcli
from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli import distributed
from d2vcli.cli import app
from d2vcli.evaluate_vision import ImageEvalError, evaluate_images
from d2vcli.finetune_vision import Start, VisionClassifyTask, read_classes
from d2vcli.image_data import ImageDataset, eval_transform, read_image_manifest
from d2vcli.models.loading import build_vision_model
from d2vcli.models.vision import vision_tiny
from d2vcli.predict import PredictError, predict
from d2vcli.prepare.images import image_manifest
from d2vcli.synthetic_images import CLASSES as SYNTHETIC_CLASSES

CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CLASSES = sorted(SYNTHETIC_CLASSES)  # data/images/classes.txt: the ImageFolder order, as fine-tuning saves it


def _save(path, kind, model, arch, classes=None):
    ckpt.save_checkpoint(path, ckpt.make_state(kind, config={}, arch=C.to_dict(arch), normalize=False,
                                               model=model.state_dict(), classes=classes))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The tiny image corpus, runs/vcls/best.pt (a random vision-tiny classifier whose head is scaled up so
    its predictions vary) and runs/vpre/last.pt (a vision-pretrain checkpoint)."""
    from d2vcli.prepare.synthetic_images import prepare_synthetic_images
    from d2vcli.workspace import Workspace

    ws = Workspace.resolve(tmp_path_factory.mktemp("eval-images") / "ws")
    prepare_synthetic_images(ws, size="tiny", workers=1)
    assert read_classes(ws) == CLASSES
    arch = C.merge(vision_tiny(), {"image_mean": MEAN, "image_std": STD})
    torch.manual_seed(0)
    model = build_vision_model("vision-cls", arch, len(CLASSES))
    with torch.no_grad():
        model.head.weight.normal_(0, 3.0)
    _save(ws.run_dir("vcls") / "best.pt", "vision-cls", model, arch, list(CLASSES))
    _save(ws.run_dir("vpre") / "last.pt", "vision-pretrain", build_vision_model("vision-pretrain", arch), arch)
    return ws


def _direct_logits(ws, split):
    """Logits of the saved model on the split, computed here: the checkpoint's network on eval_transform."""
    state = ckpt.load_checkpoint(ws.run_dir("vcls") / "best.pt")
    model = build_vision_model("vision-cls", state["arch"], len(CLASSES)).eval()
    model.load_state_dict(state["model"])
    tf = eval_transform(32, MEAN, STD)
    records = read_image_manifest(image_manifest(ws, split))
    with torch.no_grad():
        x = torch.stack([tf(Image.open(r["path"]).convert("RGB")) for r in records])
        return model(x), torch.tensor([CLASSES.index(r["class"]) for r in records]), records, model


def test_top1_top5_and_confusion_match_a_direct_computation(ws):
    result = evaluate_images(ws, "vcls", device="cpu")
    assert list(result.scores) == ["test", "val"]  # the default: the val*/test* splits present, not pool/train
    for split in ("val", "test"):
        logits, labels, records, _ = _direct_logits(ws, split)
        top5 = logits.topk(5, -1).indices
        sc = result.scores[split]
        assert sc.images == len(records) == 30
        assert sc.top1 == pytest.approx(100.0 * (top5[:, 0] == labels).float().mean().item())
        assert sc.top5 == pytest.approx(100.0 * (top5 == labels[:, None]).any(-1).float().mean().item())
        pred = top5[:, 0]
        for i, c in enumerate(CLASSES):  # per-class accuracy and the confusion pairs from the same predictions
            if (labels == i).any():
                assert sc.per_class[c] == pytest.approx(100.0 * (pred[labels == i] == i).float().mean().item())
        wrong = [(CLASSES[t], CLASSES[p]) for t, p in zip(labels.tolist(), pred.tolist()) if t != p]
        assert sum(n for *_, n in sc.confused) == len(wrong) or len(sc.confused) == 10
        for t, p, n in sc.confused:
            assert n == wrong.count((t, p))
    # guards that the predictions vary, so the comparisons above can fail
    assert 0 < result.top5("val") < 100 and len({c for c, _, _ in result.scores["val"].confused}) > 3


def test_top1_equals_finetune_validation_on_the_same_weights(ws):
    """The peer is the fine-tuning task's own validation (VisionClassifyTask.validate)."""
    logits, labels, _, model = _direct_logits(ws, "val")
    cfg = C.resolve("finetune", preset="vision-ft-tiny", overrides=["finetune.init=scratch", "data.num_workers=0"])
    arch = C.merge(vision_tiny(), {"image_mean": MEAN, "image_std": STD})
    valid = {"val": ImageDataset(image_manifest(ws, "val"), eval_transform(32, MEAN, STD))}
    task = VisionClassifyTask(cfg, Start(arch, None, "test"), list(CLASSES), valid, CPU)
    logged = task.validate(model, 0)
    result = evaluate_images(ws, "vcls", splits=["val"], device="cpu")
    assert result.top1("val") == pytest.approx(logged["val/top1"])
    assert result.top5("val") == pytest.approx(logged["val/top5"])


def test_classes_are_matched_by_name_not_by_index(ws):
    """A checkpoint whose classes are in another order (head rows permuted alike) scores the same."""
    state = ckpt.load_checkpoint(ws.run_dir("vcls") / "best.pt")
    perm = list(reversed(range(len(CLASSES))))
    weights = dict(state["model"])
    weights["head.weight"], weights["head.bias"] = weights["head.weight"][perm], weights["head.bias"][perm]
    path = ws.run_dir("vcls-reversed") / "best.pt"
    ckpt.save_checkpoint(path, {**state, "model": weights, "classes": [CLASSES[i] for i in perm]})
    a = evaluate_images(ws, "vcls", splits=["val"], device="cpu").scores["val"]
    b = evaluate_images(ws, path, splits=["val"], device="cpu").scores["val"]
    assert (a.top1, a.top5, a.per_class, a.confused) == (b.top1, b.top5, b.per_class, b.confused)


def test_artefacts_are_written_in_the_runs_decode_folder(ws):
    result = evaluate_images(ws, str(ws.run_dir("vcls")), splits=["val"], top_k=3, device="cpu")
    out = ws.decode_dir / "vcls"
    assert result.out_dir == out
    rows = [json.loads(line) for line in (out / "predictions-val.jsonl").read_text().splitlines()]
    logits, labels, records, _ = _direct_logits(ws, "val")
    probs = logits.softmax(-1)
    assert [r["path"] for r in rows] == [r["path"] for r in records]
    for row, p, y in zip(rows, probs, labels.tolist()):
        assert row["class"] == CLASSES[y] and len(row["top"]) == 3
        assert [c for c, _ in row["top"]] == [CLASSES[i] for i in p.topk(3).indices.tolist()]
        assert row["top"][0][1] == pytest.approx(p.max().item(), abs=1e-5)
        assert row["correct"] == (row["top"][0][0] == row["class"])
    confusion = (out / "confusion-val.tsv").read_text().splitlines()
    assert confusion[0].split("\t")[1:] == list(CLASSES)
    assert sum(int(v) for line in confusion[1:] for v in line.split("\t")[1:]) == 30
    summary = json.loads((out / "accuracy.json").read_text())
    assert summary["splits"]["val"]["top1"] == pytest.approx(result.top1("val"), abs=1e-4)
    assert (out / "accuracy-summary.txt").read_text().startswith("split\timages\ttop1\ttop5")
    assert not list(out.glob("*.tmp*"))


def test_evaluate_cli_dispatches_on_the_checkpoint_kind(ws):
    r = CliRunner().invoke(app, ["evaluate", "vcls", "--splits", "val", "--device", "cpu", "-w", str(ws.root)])
    assert r.exit_code == 0, r.output
    assert "top-1" in r.output and "most confused" in r.output and "predictions-" in r.output


@pytest.mark.parametrize("args, message", [
    (["vcls", "--splits", "nope"], "unknown image split nope"),
    (["vpre"], "pretrained image model"),
])
def test_evaluate_bad_input_is_a_clear_error(ws, args, message):
    r = CliRunner().invoke(app, ["evaluate", *args, "-w", str(ws.root)])
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_evaluate_images_refuses_other_kinds_and_missing_manifests(ws, tmp_path):
    with pytest.raises(ImageEvalError, match="not an image classifier"):
        evaluate_images(ws, "vpre", splits=["val"])
    from d2vcli.workspace import Workspace

    empty = Workspace.resolve(tmp_path / "empty")
    with pytest.raises(ImageEvalError, match="no image split is prepared"):
        evaluate_images(empty, ws.run_dir("vcls") / "best.pt")


def test_a_speech_checkpoint_on_image_splits_is_a_clear_error(ws):
    from d2vcli.models.audio import Data2VecForCTC, build_backbone

    cfg = C.resolve("pretrain", preset="speech-tiny")
    path = ws.run_dir("speech") / "best.pt"
    ckpt.save_checkpoint(path, {"kind": "ctc", "arch": C.to_dict(cfg.model), "normalize": True, "config": {},
                                "model": Data2VecForCTC(build_backbone(cfg.model), 8).state_dict(),
                                "vocab": list("abcd")})
    try:
        r = CliRunner().invoke(app, ["evaluate", str(path), "--splits", "val", "-w", str(ws.root)])
        assert r.exit_code == 2 and "speech checkpoint" in r.output and "image split" in r.output, r.output
    finally:
        path.unlink()


# ----------------------------------------------------------------------------- predict


def test_predict_matches_the_direct_computation_and_reports_bad_files(ws, tmp_path):
    records = read_image_manifest(image_manifest(ws, "val"))[:3]
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    args = ["predict", *[r["path"] for r in records], str(bad), str(tmp_path / "gone.jpg"), "--model", "vcls",
            "--top-k", "2", "--json", "-w", str(ws.root)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"{bad}: not a readable image" in r.output and "gone.jpg: image file not found" in r.output
    out = json.loads(r.stdout[:r.stdout.rindex("]") + 1])
    logits, *_ = _direct_logits(ws, "val")
    probs = logits[:3].softmax(-1)
    assert [o["path"] for o in out] == [r["path"] for r in records]
    for o, p in zip(out, probs):
        assert [t["class"] for t in o["top"]] == [CLASSES[i] for i in p.topk(2).indices.tolist()]
        assert [t["prob"] for t in o["top"]] == pytest.approx(p.topk(2).values.tolist(), abs=1e-5)


def test_predict_text_output_and_default_model(ws):
    path = read_image_manifest(image_manifest(ws, "test"))[0]["path"]
    r = CliRunner().invoke(app, ["predict", path, "--top-k", "3", "-w", str(ws.root)])
    assert r.exit_code == 0, r.output
    line = next(line for line in r.stdout.splitlines() if line.startswith(path))
    fields = line.split("\t")[1:]
    assert len(fields) == 3 and all(f.split(" ")[0] in CLASSES for f in fields)
    probs = [float(f.split(" ")[1]) for f in fields]
    assert probs == sorted(probs, reverse=True)


def test_predict_errors_without_a_readable_image_or_with_a_pretrained_model(ws, tmp_path):
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    with pytest.raises(PredictError, match="no image could be predicted"):
        predict([bad], ws, model="vcls")
    path = read_image_manifest(image_manifest(ws, "val"))[0]["path"]
    r = CliRunner().invoke(app, ["predict", path, "--model", "vpre", "-w", str(ws.root)])
    assert r.exit_code == 2 and "fine-tune it first" in r.output


def test_api_load_predict_equals_the_cli(ws):
    records = read_image_manifest(image_manifest(ws, "val"))[:2]
    model = d2vcli.load("vcls", workdir=ws.root, device="cpu")
    one = model.predict(records[0]["path"], top_k=2)
    both = model.predict([r["path"] for r in records], top_k=2)
    cli = predict([r["path"] for r in records], ws, model="vcls", top_k=2, device="cpu")
    # The same classes in the same order, and the same probabilities up to float rounding (one image or a batch).
    for a, b in ((one, both[0]), (both[0], cli[0]), (both[1], cli[1])):
        assert [c for c, _ in a.top] == [c for c, _ in b.top]
        assert [p for _, p in a.top] == pytest.approx([p for _, p in b.top], rel=1e-5, abs=1e-9)
    im = Image.open(records[1]["path"])
    pil = model.predict(im, top_k=2)
    assert [c for c, _ in pil.top] == [c for c, _ in cli[1].top]
    assert [p for _, p in pil.top] == pytest.approx([p for _, p in cli[1].top], abs=1e-6)


def test_api_audio_methods_on_an_image_model_are_a_clear_error(ws):
    from d2vcli.api import APIError

    model = d2vcli.load("vcls", workdir=ws.root, device="cpu")
    with pytest.raises(APIError, match="image model"):
        model.transcribe("a.wav")
    with pytest.raises(APIError, match="image model"):
        model.embed("a.wav")
    with pytest.raises(APIError, match="not an image classifier"):
        d2vcli.load("vpre", workdir=ws.root, device="cpu").predict("a.png")
