"""data2vec pretraining: targets, loss, EMA teacher, collapse guard, exact resume, DDP equivalence, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli import distributed, engine
from d2vcli.cli import app
from d2vcli.fileio import read_jsonl
from d2vcli.models.audio import Data2VecForPretraining, build_backbone
from d2vcli.objective.monitors import compute_std
from d2vcli.objective.targets import build_targets, regression_loss
from d2vcli.objective.teacher import EMATeacher, ema_decay_at
from d2vcli.pretrain import TEACHER_COPIED_PREFIXES, PretrainTask, build_loader, pretrain
from d2vcli.run_dir import prepare_run

from conftest import PRETRAIN_TINY_SET

CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))


def tiny_cfg(*extra: str) -> C.Config:
    return C.resolve("pretrain", preset="speech-tiny", overrides=PRETRAIN_TINY_SET + list(extra))


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


# ----------------------------------------------------------------------------- targets, loss, std


def test_targets_average_instance_normalized_top_k_layers():
    torch.manual_seed(0)
    layers = [torch.randn(2, 7, 5) * (i + 1) + i for i in range(4)]  # (B, T, D)
    y = build_targets(layers, k=3)

    def inorm(t):  # per utterance and channel over time, biased variance, eps 1e-5
        mean = t.mean(1, keepdim=True)
        var = ((t - mean) ** 2).mean(1, keepdim=True)
        return (t - mean) / torch.sqrt(var + 1e-5)

    torch.testing.assert_close(y, sum(inorm(t) for t in layers[1:]) / 3)
    ln = build_targets(layers, k=2, layer_norm="layer", final_norm="instance")
    torch.testing.assert_close(ln, inorm(sum(F.layer_norm(t, (5,)) for t in layers[2:]) / 2))
    plain = build_targets([t.half() for t in layers], k=1, layer_norm="none")
    assert plain.dtype == torch.float32  # targets are built in fp32 whatever the teacher ran in


def test_regression_loss_is_summed_over_channels_and_scaled():
    pred, target = torch.zeros(3, 16), torch.ones(3, 16)
    assert regression_loss(pred, target).item() == pytest.approx(3 * 16 / 4)  # x 1/sqrt(D)
    assert regression_loss(pred, target, loss_scale=1.0).item() == pytest.approx(48)
    beta = regression_loss(pred, 0.25 * target, loss_beta=1.0, loss_scale=1.0).item()
    assert beta == pytest.approx(48 * 0.5 * 0.25**2)  # smooth L1 in its quadratic zone


def test_compute_std_is_the_mean_per_channel_std():
    y = torch.randn(500, 8) * torch.arange(1, 9)
    expect = torch.sqrt(y.var(0) + 1e-6).mean()
    torch.testing.assert_close(compute_std(y), expect, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- teacher


def test_ema_decay_schedule():
    obj = C.pretrain_base().objective
    assert ema_decay_at(0, obj) == pytest.approx(0.999)
    assert ema_decay_at(15_000, obj) == pytest.approx(0.99945)
    assert ema_decay_at(30_000, obj) == pytest.approx(0.9999)
    assert ema_decay_at(100_000, obj) == pytest.approx(0.9999)


def test_teacher_averages_layers_and_copies_pos_conv():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    student = Data2VecForPretraining(build_backbone(cfg.model)).backbone.transformer
    teacher = EMATeacher(student, copied_prefixes=TEACHER_COPIED_PREFIXES)
    assert not any(p.requires_grad for p in teacher.module.parameters()) and not teacher.module.training
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.step(0.9)
    after, now = teacher.state_dict(), dict(student.state_dict())
    for name in after:
        if name.startswith("pos_conv."):
            torch.testing.assert_close(after[name], now[name], rtol=0, atol=0)
        else:
            torch.testing.assert_close(after[name], 0.9 * before[name] + 0.1 * now[name])
    teacher.step(1.0)  # decay 1: frozen
    torch.testing.assert_close(teacher.state_dict()["norm.weight"], after["norm.weight"], rtol=0, atol=0)


def test_step_loss_uses_masked_frames_only(synthetic_workspace):
    cfg = tiny_cfg("model.dropout=0.0", "model.attention_dropout=0.0")  # so both computations agree
    torch.manual_seed(0)
    task = PretrainTask(cfg, torch.device("cpu"))
    batch = next(iter(build_loader(cfg, synthetic_workspace, CPU)))
    out = task.train_step(task.model, batch, 0)
    frames = task.model.backbone.num_frames(torch.tensor(batch.source.shape[1])).item()
    mask = task.time_mask(batch, frames, None)
    assert out.sample_size == int(mask.sum()) and 0 < out.sample_size < mask.numel()
    # The same numbers, computed directly: teacher on the unmasked features, top-K instance norm.
    with torch.no_grad():
        student = task.model.backbone(batch.source, time_mask=mask)
        pred = task.model.final_proj(student["x"][mask])
        _, layers = task.teacher.module(student["features"], None, return_layer_results=True)
        y = build_targets(layers, cfg.objective.average_top_k_layers)[mask]
    expect = ((pred - y) ** 2).sum() / cfg.model.embed_dim**0.5
    torch.testing.assert_close(out.loss.detach(), expect, rtol=1e-5, atol=1e-5)


def test_teacher_steps_once_per_update_with_accumulation(synthetic_workspace, tmp_path):
    cfg = tiny_cfg("train.batch_seconds=12", "train.max_updates=1")  # 3 micro-batches of 4 s
    torch.manual_seed(0)
    task = PretrainTask(cfg, torch.device("cpu"))
    init = {k: v.clone() for k, v in task.model.backbone.transformer.state_dict().items()}
    loader = build_loader(cfg, synthetic_workspace, CPU)
    run = prepare_run(synthetic_workspace, "ema-accumulation", cfg, False, CPU)
    result = engine.train(cfg, task, loader, run, CPU)
    assert result.step == 1 and loader.state_dict() == {"epoch": 1, "consumed": 3}
    decay = ema_decay_at(1, cfg.objective)
    student = task.model.backbone.transformer.state_dict()
    teacher = task.teacher.state_dict()
    for name, t in teacher.items():
        if name.startswith("pos_conv."):
            torch.testing.assert_close(t, student[name], rtol=0, atol=0)  # copied from the student
        else:  # exactly one EMA step from the common initialization (three would give decay^3)
            torch.testing.assert_close(t, decay * init[name] + (1 - decay) * student[name])


# ----------------------------------------------------------------------------- runs


def test_short_run_loss_falls_and_checkpoint_is_complete(pretrained_tiny):
    run_dir = pretrained_tiny.parent
    curve = losses(run_dir)
    assert len(curve) == 20
    assert sum(curve[-3:]) / 3 < 0.7 * sum(curve[:3]) / 3
    state = ckpt.load_checkpoint(pretrained_tiny, expect_kind="pretrain")
    assert state[ckpt.STEP_KEY] == 20 and state[ckpt.NORMALIZE_KEY] is True
    assert set(state[ckpt.TEACHER_KEY]) == {k[len("backbone.transformer."):] for k in state[ckpt.MODEL_KEY]
                                           if k.startswith("backbone.transformer.")}
    assert C.from_dict(state[ckpt.ARCH_KEY], C.ModelConfig).embed_dim == 64
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert {"ema_decay", "target_std", "pred_std", "audio_s_per_s", "lr"} <= set(rows[0])
    assert sorted(p.name for p in run_dir.glob("step-*.pt")) == ["step-10.pt", "step-20.pt"]


def test_resume_reproduces_the_straight_run_exactly(pretrained_tiny, synthetic_workspace):
    cfg = tiny_cfg()
    first = pretrain(cfg, synthetic_workspace, name="resume-split", stop_at=10)
    assert first.status == "paused" and first.step == 10
    second = pretrain(cfg, synthetic_workspace, name="resume-split", resume=True)
    assert second.status == "done" and second.step == 20
    split, straight = losses(first.run_dir), losses(pretrained_tiny.parent)
    assert len(split) == 20
    assert split == pytest.approx(straight, rel=1e-6, abs=1e-7)
    a = ckpt.load_checkpoint(second.checkpoint)
    b = ckpt.load_checkpoint(pretrained_tiny)
    for key in (ckpt.MODEL_KEY, ckpt.TEACHER_KEY):
        for name in b[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6)


def test_two_processes_match_one_process_with_accumulation(synthetic_workspace, tmp_path):
    # Dropout off: each process draws its own dropout masks, so only the deterministic math can match.
    steps = ["train.max_updates=3", "model.dropout=0.0", "model.attention_dropout=0.0", "model.layerdrop=0.0"]
    one = pretrain(tiny_cfg(*steps, "train.batch_seconds=8"), synthetic_workspace, name="ddp-one")
    assert one.status == "done"
    env = dict(os.environ, OMP_NUM_THREADS="1", D2V_PROGRESS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "d2vcli", "pretrain", "--preset", "speech-tiny", "--name", "ddp-two",
           "--workdir", str(synthetic_workspace.root)]
    for item in PRETRAIN_TINY_SET + steps + ["train.batch_seconds=8"]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 s/update = 2 CPU processes x 0.064M samples x 1 accumulation" in proc.stdout
    two = losses(synthetic_workspace.run_dir("ddp-two"))
    assert len(two) == 3
    assert two == pytest.approx(losses(one.run_dir), rel=1e-5, abs=1e-5)


def test_collapse_guard_saves_and_explains(synthetic_workspace):
    cfg = tiny_cfg("objective.collapse_check_after=2", "objective.min_target_std=50", "train.max_updates=10")
    result = pretrain(cfg, synthetic_workspace, name="collapse")
    assert result.status == "stopped" and result.step == 2 and result.exit_code == 1
    assert "collapse" in result.message and "optim.lr" in result.message and "--resume" in result.message
    assert ckpt.load_checkpoint(result.checkpoint)[ckpt.STEP_KEY] == 2


def test_missing_manifests_say_what_to_run(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--preset", "speech-large", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2, result.output  # one message, not an exception escaping the command
    message = result.output
    assert "d2v prepare librilight --root /path/to/librilight --subset small" in message
    assert "--subset large" in message
    assert not (tmp_path / "w" / "runs").exists(), "nothing is created before the data is there"


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(synthetic_workspace):
    run_dir = synthetic_workspace.run_dir("sigterm")
    cmd = [sys.executable, "-m", "d2vcli", "pretrain", "--preset", "speech-tiny", "--name", "sigterm",
           "--workdir", str(synthetic_workspace.root)]
    for item in PRETRAIN_TINY_SET + ["train.max_updates=1000", "train.save_every=1000"]:
        cmd += ["--set", item]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and len(read_jsonl(run_dir / "metrics.jsonl")) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "Traceback" not in out and "--resume" in out
    state = ckpt.load_checkpoint(run_dir / "last.pt")
    assert 2 <= state[ckpt.STEP_KEY] < 1000


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_pretraining_on_gpu_keeps_fp32_teacher(synthetic_workspace):
    result = pretrain(tiny_cfg("train.max_updates=5", "train.device=cuda"), synthetic_workspace, name="gpu-bf16")
    assert result.status == "done"
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    assert all(r["loss"] == r["loss"] and r["loss"] < 1e4 for r in rows) and "max_mem_gb" in rows[-1]
    state = ckpt.load_checkpoint(result.checkpoint)
    assert all(v.dtype == torch.float32 for v in state[ckpt.TEACHER_KEY].values() if v.is_floating_point())
