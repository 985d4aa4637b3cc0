"""What the image pretraining tests (data2vec 1.0 and 2.0) share: the tiny synthetic image workspace,
a run's loss curve, and the exact-resume check against a straight run."""

from __future__ import annotations

import pytest
import torch

from d2vcli import checkpoint as ckpt
from d2vcli.fileio import read_jsonl
from d2vcli.prepare.synthetic_images import prepare_synthetic_images
from d2vcli.pretrain import pretrain
from d2vcli.workspace import Workspace


def synthetic_image_ws(tmp_path_factory, name: str) -> Workspace:
    """A workspace with the tiny synthetic image corpus prepared (pool of 100, train/val/test of 30)."""
    ws = Workspace.resolve(tmp_path_factory.mktemp(name) / "ws")
    prepare_synthetic_images(ws, size="tiny", workers=1)
    return ws


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def assert_resume_matches(straight, ws, cfg, name: str, stop_at: int) -> None:
    """Run `name` with `cfg` to `stop_at`, resume it to the end: the losses and the checkpoint's weights
    (student and teacher) are the straight run's, up to float noise."""
    first = pretrain(cfg, ws, name=name, stop_at=stop_at)
    assert first.status == "paused" and first.step == stop_at
    second = pretrain(cfg, ws, name=name, resume=True)
    assert second.status == "done" and second.step == cfg.train.max_updates
    assert losses(first.run_dir) == pytest.approx(losses(straight.run_dir), rel=1e-6, abs=1e-7)
    a, b = ckpt.load_checkpoint(second.checkpoint), ckpt.load_checkpoint(straight.checkpoint)
    for key in (ckpt.MODEL_KEY, ckpt.TEACHER_KEY):
        for name in b[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6)
