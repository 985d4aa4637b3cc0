"""Collapse monitors and the guard: constructed healthy and collapsed tensors, a model whose conv
encoder is forced flat, and the guard's checkpoint and message in a real run."""

from __future__ import annotations

import pytest
import torch

from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli import distributed
from d2vcli.data import Batch
from d2vcli.fileio import read_jsonl
from d2vcli.objective.monitors import (Guard, collapse_reason, layer_variance_ratio, position_explained_share,
                                       time_varying_share)
from d2vcli.objective.targets import INSTANCE_NORM_EPS
from d2vcli.pretrain import PretrainTask, build_loader, collapse_guards, pretrain

from conftest import PRETRAIN_TINY_SET

CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))


def tiny_cfg(*extra: str) -> C.Config:
    return C.resolve("pretrain", preset="speech-tiny", overrides=PRETRAIN_TINY_SET + list(extra))


# ----------------------------------------------------------------------------- the statistics


def test_time_varying_share_separates_varying_from_constant_frames():
    torch.manual_seed(0)
    varying = torch.randn(3, 50, 8)  # zero-mean noise: nearly all energy varies in time
    assert time_varying_share(varying).item() == pytest.approx(1.0, abs=0.05)
    offset = torch.randn(3, 1, 8) * 10 + 0.1 * torch.randn(3, 50, 8)  # a per-utterance constant dominates
    assert time_varying_share(offset).item() < 0.01
    # Exactly the definition, and padded frames do not count: garbage there changes nothing.
    x = torch.randn(2, 6, 4)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    garbage = x.clone()
    garbage[1, 4:] = 1e3
    r0 = x[0] - x[0].mean(0)
    r1 = x[1, :4] - x[1, :4].mean(0)
    expected = ((r0 ** 2).sum() + (r1 ** 2).sum()) / ((x[0] ** 2).sum() + (x[1, :4] ** 2).sum())
    assert time_varying_share(garbage, pad).item() == pytest.approx(expected.item(), rel=1e-5)


def test_position_share_is_near_zero_for_content_and_near_one_for_position():
    torch.manual_seed(0)
    content = torch.randn(8, 99, 16)  # rows share nothing: only chance (1/B) would remain, and it is removed
    assert abs(position_explained_share(content).item()) < 0.03
    edges = torch.zeros(99, 16)
    edges[:10], edges[-10:] = torch.randn(10, 16) * 3, torch.randn(10, 16) * 3  # the collapsed targets' shape
    positional = edges + 0.2 * torch.randn(8, 99, 16)
    assert position_explained_share(positional).item() > 0.8
    # A padded tail is ignored; one row cannot tell position from content.
    pad = torch.zeros(8, 99, dtype=torch.bool)
    pad[:, 90:] = True
    spoiled = positional.clone()
    spoiled[:, 90:] = torch.randn(8, 9, 16) * 100
    assert position_explained_share(spoiled, pad).item() > 0.8
    assert position_explained_share(positional[:1]).item() == 0.0


def test_layer_variance_ratio_is_the_instance_norm_variance_over_eps():
    torch.manual_seed(0)
    layers = [torch.randn(2, 30, 4) * s for s in (1e-3, 1.0)]
    ratios = layer_variance_ratio(layers)
    for y, r in zip(layers, ratios):
        assert r.item() == pytest.approx((y.var(1, unbiased=False).mean() / INSTANCE_NORM_EPS).item(), rel=1e-4)
    assert ratios[0].item() < 1.0 < 1e4 < ratios[1].item()


# ----------------------------------------------------------------------------- the guard


def test_guard_names_the_monitor_its_meaning_and_the_fix():
    guards = collapse_guards(C.Config().objective)
    healthy = {"target_std": 0.5, "pred_std": 0.3, "conv_time_share": 0.4, "target_position_share": 0.01,
               "teacher_var_ratio": 500.0}
    assert collapse_reason(6000, healthy, check_after=5000, guards=guards) is None
    collapsed = dict(healthy, conv_time_share=0.006, target_position_share=0.84)
    assert collapse_reason(100, collapsed, check_after=5000, guards=guards) is None, "not armed yet"
    message = collapse_reason(6000, collapsed, check_after=5000, guards=guards)
    assert "conv_time_share = 0.006 < objective.min_conv_time_share" in message
    assert "target_position_share = 0.84 > objective.max_position_share" in message
    assert "same vector at every frame" in message and "where a frame is" in message
    assert "optim.lr" in message and "feature_grad_mult between 0 and 1 does nothing" in message
    assert "target_std" not in message, "only the tripped monitors are named"
    # Monitors computed on log steps only are not checked on the other updates.
    assert collapse_reason(6000, {"target_std": 0.5}, check_after=0, guards=guards) is None
    assert Guard("m", "x.y", 1.0, below=False, meaning="").tripped({"m": 2.0})


def _collapsed_task(cfg: C.Config) -> PretrainTask:
    """A speech-tiny task whose conv encoder outputs the same vector at every frame: the last conv
    block's weights zeroed (LayerNorm of 0 is its bias, 0, and GELU(0) = 0), the collapse's end state."""
    torch.manual_seed(cfg.train.seed)
    task = PretrainTask(cfg, torch.device("cpu"))
    with torch.no_grad():
        task.model.backbone.feature_extractor.blocks[-1].conv.weight.zero_()
    return task


def _monitors(task: PretrainTask, batch: Batch) -> dict:
    out = task.train_step(task.model, batch, step=task.cfg.train.log_every - 1)  # a log step
    return {k: float(v) for k, v in out.metrics.items()}


def test_monitors_see_a_forced_collapse_and_pass_a_fresh_model(synthetic_workspace):
    cfg = tiny_cfg()
    batch = next(iter(build_loader(cfg, synthetic_workspace, CPU)))
    healthy = _monitors(PretrainTask(cfg, torch.device("cpu")), batch)
    collapsed = _monitors(_collapsed_task(cfg), batch)
    obj = cfg.objective
    assert healthy["conv_time_share"] > 0.2 > obj.min_conv_time_share > collapsed["conv_time_share"]
    assert healthy["target_position_share"] < 0.2 < obj.max_position_share < collapsed["target_position_share"]
    assert collapse_reason(10**6, healthy, check_after=0, guards=collapse_guards(obj)) is None
    assert "conv_time_share" in collapse_reason(10**6, collapsed, check_after=0, guards=collapse_guards(obj))
    assert {f"teacher_var_ratio_top{j}" for j in range(1, obj.average_top_k_layers + 1)} <= set(healthy)
    assert healthy["teacher_var_ratio"] == min(healthy[f"teacher_var_ratio_top{j}"]
                                               for j in range(1, obj.average_top_k_layers + 1))
    # Off log steps the extra monitors cost nothing: they are not computed.
    task = PretrainTask(tiny_cfg("train.log_every=5"), torch.device("cpu"))
    assert set(task.train_step(task.model, batch, step=0).metrics) == {"target_std", "pred_std"}


# ----------------------------------------------------------------------------- real runs

# speech-tiny as it was before issue 11 (reference BERT init, lr 1e-3 after a 10 % warmup): it collapses.
OLD_TINY = ["model.init_std=0.02", "optim.lr=0.001", "schedule.phase_ratio=[0.1,0.8,0.1]"]


def test_guard_stops_the_old_tiny_recipe_with_a_checkpoint_and_says_why(synthetic_workspace):
    cfg = tiny_cfg(*OLD_TINY, "train.max_updates=120", "train.log_every=10", "objective.collapse_check_after=40",
                   "objective.min_target_std=0", "objective.min_pred_std=0")  # only the new monitors can stop it
    result = pretrain(cfg, synthetic_workspace, name="old-tiny-collapses")
    assert result.status == "stopped" and result.exit_code == 1, result.message
    assert 40 <= result.step < 120 and result.step % 10 == 0, "checked on log steps once armed"
    assert ckpt.load_checkpoint(result.checkpoint)[ckpt.STEP_KEY] == result.step
    assert "representation collapse" in result.message and "What to change" in result.message
    assert "conv_time_share" in result.message or "target_position_share" in result.message, result.message
    assert str(result.checkpoint) in result.message


def test_the_tiny_preset_stays_healthy_with_every_guard_armed(synthetic_workspace):
    cfg = tiny_cfg("train.max_updates=120", "train.log_every=10", "objective.collapse_check_after=10")
    result = pretrain(cfg, synthetic_workspace, name="tiny-healthy")
    assert result.status == "done", result.message
    rows = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if "conv_time_share" in r]
    assert [r["step"] for r in rows] == list(range(10, 121, 10))
    obj = cfg.objective
    last = rows[-1]
    assert last["conv_time_share"] > 2 * obj.min_conv_time_share
    assert last["target_position_share"] < obj.max_position_share / 2
    assert last["teacher_var_ratio"] > 10 * obj.min_teacher_var_ratio
