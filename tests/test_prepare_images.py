"""`d2v prepare images`: manifests, the classes file, every bad-input case, idempotence and guards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from d2vcli.cli import app
from d2vcli.errors import UserError
from d2vcli.locks import hold
from d2vcli.prepare import images as pim
from d2vcli.prepare.images import classes_path, image_manifest, prepare_images
from d2vcli.workspace import Workspace


def _img(path: Path, size=(48, 40), mode="RGB", fmt=None, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(path, format=fmt)
    return path


def _tree(root: Path) -> dict[str, Path]:
    """train/{cat,dog} and val/{cat,dog} with one example of every case the prepare must handle."""
    p = {}
    p["ok_jpg"] = _img(root / "train/cat/a.jpg", fmt="JPEG")
    p["ok_png"] = _img(root / "train/cat/b.png", fmt="PNG", seed=1)
    p["gray"] = _img(root / "train/dog/gray.png", mode="L", fmt="PNG", seed=2)
    p["cmyk"] = _img(root / "train/dog/cmyk.jpg", mode="CMYK", fmt="JPEG", seed=3)
    p["tiny"] = _img(root / "train/dog/nested/tiny.png", size=(8, 20), fmt="PNG", seed=4)
    p["empty"] = root / "train/dog/empty.jpg"
    p["empty"].write_bytes(b"")
    data = _img(root / "train/cat/cut.jpg", fmt="JPEG", seed=5).read_bytes()
    p["cut_jpg"] = root / "train/cat/cut.jpg"
    p["cut_jpg"].write_bytes(data[: len(data) // 2])
    data = _img(root / "train/cat/cut.png", size=(64, 64), fmt="PNG", seed=6).read_bytes()
    p["cut_png"] = root / "train/cat/cut.png"
    p["cut_png"].write_bytes(data[: len(data) - 40])
    p["garbage"] = root / "train/cat/garbage.jpg"
    p["garbage"].write_bytes(b"this is not a jpeg at all" * 20)
    p["text"] = root / "train/cat/notes.txt"
    p["text"].write_text("labels by hand\n")
    p["loose"] = _img(root / "train/loose.jpg", fmt="JPEG", seed=7)
    (root / "train/cat/.DS_Store").write_bytes(b"\0\1")  # hidden files are not the user's data: ignored
    p["val_cat"] = _img(root / "val/cat/v1.jpg", fmt="JPEG", seed=8)
    p["val_dog"] = _img(root / "val/dog/v2.jpg", fmt="JPEG", seed=9)
    return p


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _skips(ws: Workspace, split: str) -> dict[str, str]:
    lines = (pim.images_dir(ws) / f"skipped-{split}.tsv").read_text().splitlines()[1:]
    return {Path(p).name: r for p, r, _ in (line.split("\t") for line in lines)}


def test_imagenet_layout_gives_manifests_classes_and_every_skip_reason(tmp_path):
    p = _tree(tmp_path / "imagenet")
    ws = Workspace(tmp_path / "w")
    summary = prepare_images(ws, tmp_path / "imagenet")
    assert classes_path(ws).read_text() == "cat\ndog\n"
    train = {r["id"]: r for r in _rows(image_manifest(ws, "train"))}
    assert sorted(train) == ["cat/a", "cat/b", "dog/cmyk", "dog/gray", "dog/nested/tiny"]
    a = train["cat/a"]
    assert (a["class"], a["label"], a["width"], a["height"], a["mode"], a["format"], a["tiny"]) == \
        ("cat", 0, 48, 40, "RGB", "JPEG", False)
    assert a["path"] == str(p["ok_jpg"].resolve())
    assert train["dog/nested/tiny"]["tiny"] and train["dog/nested/tiny"]["label"] == 1
    assert train["dog/gray"]["mode"] == "L" and train["dog/cmyk"]["mode"] == "CMYK"
    assert _skips(ws, "train") == {"empty.jpg": "empty", "cut.jpg": "truncated", "cut.png": "truncated",
                                   "garbage.jpg": "unreadable", "notes.txt": "not-image", "loose.jpg": "no-class"}
    s = summary.split("train")
    assert (s.images, s.classes, s.tiny, s.converted) == (5, 2, 1, {"grayscale": 1, "cmyk": 1})
    assert s.skipped == {"empty": 1, "truncated": 2, "unreadable": 1, "not-image": 1, "no-class": 1}
    assert summary.split("val").images == 2 and not (pim.images_dir(ws) / "skipped-val.tsv").exists()
    # The speech manifests' folder is untouched: their readers expect audio records.
    assert not list(ws.data_dir.glob("*.jsonl"))


def test_rerun_is_up_to_date_and_a_changed_file_is_read_again(tmp_path):
    p = _tree(tmp_path / "in")
    ws = Workspace(tmp_path / "w")
    prepare_images(ws, tmp_path / "in")
    before = image_manifest(ws, "train").stat().st_mtime_ns
    again = prepare_images(ws, tmp_path / "in")
    assert [s.status for s in again.splits] == ["up to date", "up to date"]
    assert image_manifest(ws, "train").stat().st_mtime_ns == before
    _img(p["cut_jpg"], fmt="JPEG", seed=11)  # the truncated file, repaired
    third = prepare_images(ws, tmp_path / "in", splits=["train"])
    assert third.split("train").status == "written" and third.split("train").images == 6


def test_strict_makes_any_skip_an_error_and_keeps_the_old_manifest(tmp_path):
    _tree(tmp_path / "in")
    ws = Workspace(tmp_path / "w")
    prepare_images(ws, tmp_path / "in", splits=["train"])
    old = image_manifest(ws, "train").read_text()
    with pytest.raises(UserError, match=r"--strict: .* 6 problem\(s\) in split 'train'.*was kept"):
        prepare_images(ws, tmp_path / "in", splits=["train"], strict=True)
    assert image_manifest(ws, "train").read_text() == old
    assert len(_skips(ws, "train")) == 6  # every problem listed, not just the first


def test_a_split_with_nothing_usable_is_an_error_and_writes_no_manifest(tmp_path):
    (tmp_path / "in/train/cat").mkdir(parents=True)
    (tmp_path / "in/train/cat/x.jpg").write_bytes(b"")
    ws = Workspace(tmp_path / "w")
    with pytest.raises(UserError, match="split 'train' would be empty: all 1 image file"):
        prepare_images(ws, tmp_path / "in")
    assert not image_manifest(ws, "train").exists()


def test_a_later_split_with_a_new_class_is_refused_and_a_subset_is_fine(tmp_path):
    _img(tmp_path / "a/train/cat/1.png", fmt="PNG")
    _img(tmp_path / "a/train/dog/1.png", fmt="PNG")
    ws = Workspace(tmp_path / "w")
    prepare_images(ws, tmp_path / "a")
    _img(tmp_path / "b/val/cat/1.png", fmt="PNG")
    prepare_images(ws, tmp_path / "b")  # a subset of the classes keeps their labels
    assert _rows(image_manifest(ws, "val"))[0]["label"] == 0
    _img(tmp_path / "c/test/bird/1.png", fmt="PNG")
    with pytest.raises(UserError, match="not in .*classes.txt: bird"):
        prepare_images(ws, tmp_path / "c")
    assert classes_path(ws).read_text() == "cat\ndog\n" and not image_manifest(ws, "test").exists()


def test_a_folder_of_class_folders_is_one_split(tmp_path):
    _img(tmp_path / "shapes/circle/1.png", fmt="PNG")
    _img(tmp_path / "shapes/square/1.png", fmt="PNG")
    ws = Workspace(tmp_path / "w")
    assert prepare_images(ws, tmp_path / "shapes").splits[0].split == "shapes"
    prepare_images(ws, tmp_path / "shapes", split="labeled")
    assert [r["class"] for r in _rows(image_manifest(ws, "labeled"))] == ["circle", "square"]
    with pytest.raises(UserError, match="no split folder test"):
        prepare_images(ws, tmp_path / "shapes", splits=["test"])


def test_a_second_prepare_of_the_same_split_is_refused_while_one_runs(tmp_path):
    _tree(tmp_path / "in")
    ws = Workspace(tmp_path / "w")
    with hold(pim.images_dir(ws) / ".train.lock", "test holder"):
        with pytest.raises(UserError, match="image split 'train' is locked by pid"):
            prepare_images(ws, tmp_path / "in", splits=["train"])


def test_the_process_pool_scan_equals_the_serial_one(tmp_path, monkeypatch):
    p = _tree(tmp_path / "in")
    paths = [str(v) for k, v in sorted(p.items()) if k not in ("text",)]
    serial = pim.scan_images(paths, workers=1)
    monkeypatch.setattr(pim, "POOL_MIN_FILES", 1)
    assert pim.scan_images(paths, workers=2, batch=3) == serial


def test_cli_prints_the_summary_and_bad_input_is_one_line(tmp_path):
    _tree(tmp_path / "in")
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", "images", str(tmp_path / "in"), "-w", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())  # rich wraps long paths at the test terminal's width
    assert "prepare images" in flat and "classes: " in flat and "train" in flat and "to RGB" in flat
    res = runner.invoke(app, ["prepare", "images", str(tmp_path / "nowhere"), "-w", str(tmp_path / "w")])
    assert res.exit_code == 2 and "is not a directory" in res.output and "Traceback" not in res.output


def test_a_workspace_inside_the_tree_is_not_taken_for_a_split_or_a_class(tmp_path):
    _img(tmp_path / "in/train/cat/1.png", fmt="PNG")
    ws = Workspace(tmp_path / "in" / "d2v-work")
    prepare_images(ws, tmp_path / "in")
    prepare_images(ws, tmp_path / "in")  # its own manifests are now inside the tree: still not read
    assert [s.split for s in prepare_images(ws, tmp_path / "in").splits] == ["train"]
    assert classes_path(ws).read_text() == "cat\n"


def test_a_prepare_waits_for_a_moment_long_holder_of_the_classes_file(tmp_path):
    import threading

    _img(tmp_path / "in/train/cat/1.png", fmt="PNG")
    ws = Workspace(tmp_path / "w")
    pim.images_dir(ws).mkdir(parents=True)
    held, release = threading.Event(), threading.Event()

    def holder():
        with pim.hold_classes(ws):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(5)
    threading.Timer(0.3, release.set).start()
    prepare_images(ws, tmp_path / "in")  # waits for the holder instead of failing
    t.join()
    assert classes_path(ws).read_text() == "cat\n"
    with pim.hold_classes(ws):  # past its wait, a holder that does not let go is named
        with pytest.raises(UserError, match="image classes file is locked"):
            with pim.hold_classes(ws, wait_s=0.0):
                pass
