"""The training engine with a toy task: schedules, accumulation, loss normalization, skipping, checkpoints."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli import engine
from d2vcli.data import BatchLoader, Item
from d2vcli.distributed import DistInfo
from d2vcli.engine import StepOutput
from d2vcli.errors import UserError
from d2vcli.fileio import read_jsonl
from d2vcli.schedule import cosine_lr, lr_at, tri_stage_phases
from d2vcli.run_dir import RunDirError, prepare_run
from d2vcli.workspace import Workspace

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


# ----------------------------------------------------------------------------- schedules and settings


def test_tri_stage_matches_the_reference_at_phase_boundaries():
    cfg = C.pretrain_base()
    assert tri_stage_phases(400_000, cfg.schedule.phase_ratio) == (12_000, 360_000, 28_000)

    def lr(u):
        return lr_at(u, 5e-4, cfg.schedule, 400_000)

    assert lr(0) == pytest.approx(5e-6)  # warmup starts at init_lr_scale x peak
    assert lr(6_000) == pytest.approx(5e-6 + (5e-4 - 5e-6) / 2)  # linear
    assert lr(12_000) == pytest.approx(5e-4)
    assert lr(371_999) == pytest.approx(5e-4)  # end of hold
    assert lr(372_000) == pytest.approx(5e-4)  # decay starts at the peak
    # Exponential, not linear: halfway through the decay the rate is the geometric mean.
    assert lr(386_000) == pytest.approx(5e-4 * math.exp(-math.log(100) * 0.5)) == pytest.approx(5e-5)
    assert lr(400_000) == pytest.approx(5e-6)
    assert lr(450_000) == pytest.approx(5e-6)  # constant afterwards


def test_cosine_and_constant_schedules():
    assert cosine_lr(0, 1e-3, 1000, 100) == 0.0  # warmup from 0
    assert cosine_lr(50, 1e-3, 1000, 100) == pytest.approx(5e-4)
    assert cosine_lr(100, 1e-3, 1000, 100) == pytest.approx(1e-3)
    assert cosine_lr(550, 1e-3, 1000, 100) == pytest.approx(5e-4)  # half-cosine midpoint
    assert cosine_lr(1000, 1e-3, 1000, 100) == pytest.approx(0.0, abs=1e-15)
    const = C.ScheduleConfig(kind="constant")
    assert lr_at(0, 3e-4, const, 10) == lr_at(9, 3e-4, const, 10) == 3e-4


def test_batch_seconds_give_the_accumulation_and_its_derivation():
    gpu1 = DistInfo(0, 1, 0, torch.device("cuda", 0))
    assert engine.accumulation_steps(3800, 3_800_000, 1) == 16
    assert engine.accumulation_steps(3800, 3_800_000, 16) == 1
    assert engine.accumulation_steps(3800, 1_200_000, 4) == 13  # ceil: never less audio than asked
    assert engine.describe_batch(3800, 3_800_000, gpu1, 16) == "3800 s/update = 1 GPU x 3.8M samples x 16 accumulation"
    assert "up to 3900 s" in engine.describe_batch(3800, 1_200_000, DistInfo(0, 4, 0, torch.device("cuda", 0)), 13)


def test_precision_choice():
    assert engine.resolve_precision("auto", torch.device("cpu")) is None  # fp32 on CPU
    assert engine.resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(C.ConfigError, match="fp16 needs a GPU"):
        engine.resolve_precision("fp16", torch.device("cpu"))


# ----------------------------------------------------------------------------- a toy task


class ToyDataset:
    """Items of 8-30 samples; the toy model reads the first 4."""

    def __init__(self, n=24):
        rng = np.random.default_rng(0)
        self.items = [rng.standard_normal(int(rng.integers(8, 31))).astype(np.float32) for _ in range(n)]
        self.sizes = np.array([len(x) for x in self.items])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return Item(id=str(i), source=self.items[i])


class ToyTask:
    """Linear regression of sum(x[:4]); summed squared error, sample_size = utterances."""

    kind = "pretrain"
    find_unused_parameters = False

    def __init__(self, nan_batches=()):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.nan_batches = set(nan_batches)
        self.updates, self.grads, self.batches = [], [], []

    def train_step(self, model, batch, step):
        self.batches.append(batch.index)
        x = batch.source[:, :4]  # (B, 4)
        loss = ((model(x) - x.sum(-1, keepdim=True)) ** 2).sum()
        if batch.index in self.nan_batches:
            loss = loss * float("nan")
        return StepOutput(loss, x.shape[0], {"seen": float(x.shape[0])})

    def after_update(self, step):
        self.updates.append(step)
        self.grads.append([p.grad.clone() for p in self.model.parameters()])
        return {"hook": float(step)}

    def validate(self, model, step):
        return None

    def stop_reason(self, step, metrics):
        return None

    def checkpoint_state(self):
        return {ckpt.ARCH_KEY: {}, ckpt.NORMALIZE_KEY: False, ckpt.TEACHER_KEY: {"w": self.model.weight.detach().clone()}}

    def load_checkpoint_state(self, state):
        self.restored_teacher = state[ckpt.TEACHER_KEY]


def toy_cfg(accumulation=1, **train):
    cfg = C.Config()
    cfg.data.max_tokens = 64
    cfg.train.batch_seconds = accumulation * 64 / 16000
    cfg.train.log_every = 1
    cfg.train.max_updates = 4
    cfg.schedule.kind = "constant"
    cfg.optim.lr = 0.01
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def run_toy(tmp_path, task, cfg, name="toy", resume=False, stop_at=None):
    ws = Workspace.resolve(tmp_path / "ws")
    loader = BatchLoader(ToyDataset(), "pad", cfg.data.max_tokens, seed=cfg.train.seed)
    run = prepare_run(ws, name, cfg, resume, CPU)
    return engine.train(cfg, task, loader, run, CPU, stop_at=stop_at), run


def test_gradient_is_the_sum_over_micro_batches_divided_by_total_sample_size(tmp_path):
    task = ToyTask()
    init = [p.detach().clone() for p in task.model.parameters()]
    result, run = run_toy(tmp_path, task, toy_cfg(accumulation=3, max_updates=2))
    assert result.status == "done" and result.step == 2
    assert task.updates == [1, 2], "after_update runs exactly once per optimizer update"
    assert task.batches == [0, 1, 2, 3, 4, 5], "3 micro-batches per update"

    loader = BatchLoader(ToyDataset(), "pad", 64, seed=1)
    micro = [b for _, b in zip(range(3), loader)]
    ref = nn.Linear(4, 1)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), init):
            p.copy_(q)
    total, size = 0.0, 0
    for b in micro:
        x = b.source[:, :4]
        total = total + ((ref(x) - x.sum(-1, keepdim=True)) ** 2).sum()
        size += x.shape[0]
    (total / size).backward()
    for g, p in zip(task.grads[0], ref.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)

    rows = read_jsonl(run.metrics_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(total.item() / size, rel=1e-6)  # logged = sum / sample size
    assert rows[0]["sample_size"] == size and rows[0]["hook"] == 1.0


def test_nonfinite_loss_skips_the_update_and_a_streak_stops_the_run(tmp_path):
    task = ToyTask(nan_batches={1})
    result, run = run_toy(tmp_path, task, toy_cfg(max_updates=3))
    assert result.status == "done" and result.step == 3
    assert task.batches == [0, 1, 2, 3] and task.updates == [1, 2, 3]  # batch 1 gave no update
    assert read_jsonl(run.metrics_path)[-1]["skipped"] == 1

    task = ToyTask(nan_batches=set(range(100)))
    result, run = run_toy(tmp_path, task, toy_cfg(max_updates=50, max_nonfinite=3), name="diverge")
    assert result.status == "diverged" and result.exit_code == 1 and task.updates == []
    assert len(task.batches) == 3
    assert "optim.lr" in result.message and "optim.clip_norm" in result.message
    assert result.checkpoint.exists()


def test_checkpoint_is_complete_and_loads_with_weights_only(tmp_path):
    task = ToyTask()
    result, run = run_toy(tmp_path, task, toy_cfg(max_updates=4, save_every=2, keep_last=1))
    state = ckpt.load_checkpoint(result.checkpoint, expect_kind="pretrain")  # weights_only=True inside
    for key in (ckpt.MODEL_KEY, ckpt.TEACHER_KEY, ckpt.OPTIMIZER_KEY, ckpt.SCHEDULER_KEY, ckpt.SCALER_KEY,
                ckpt.RNG_KEY, ckpt.DATA_POSITION_KEY, ckpt.STEP_KEY, ckpt.CONFIG_KEY, ckpt.FORMAT_VERSION_KEY):
        assert key in state, key
    assert state[ckpt.STEP_KEY] == 4 and state[ckpt.DATA_POSITION_KEY] == {"epoch": 1, "consumed": 4}
    assert set(state[ckpt.RNG_KEY]) >= {"torch", "numpy", "python", "cuda"}
    assert C.from_dict(state[ckpt.CONFIG_KEY]).train.max_updates == 4
    assert (run.dir / "config.yaml").exists()
    assert sorted(p.name for p in run.dir.glob("step-*.pt")) == ["step-4.pt"]  # keep_last=1 pruned step-2


def test_existing_run_needs_resume_and_resume_continues(tmp_path):
    cfg = toy_cfg(max_updates=4)
    straight = ToyTask()
    run_toy(tmp_path, straight, cfg, name="straight")
    with pytest.raises(RunDirError, match=r"--resume.*--name"):
        prepare_run(Workspace.resolve(tmp_path / "ws"), "straight", cfg, False, CPU)
    other_arch = toy_cfg(max_updates=4)
    other_arch.model.embed_dim = 128
    with pytest.raises(RunDirError, match=r"model.embed_dim 768 -> 128"):
        prepare_run(Workspace.resolve(tmp_path / "ws"), "straight", other_arch, True, CPU)

    first = ToyTask()
    result, _ = run_toy(tmp_path, first, cfg, name="split", stop_at=2)
    assert result.status == "paused" and result.exit_code == 0 and first.updates == [1, 2]
    second = ToyTask()
    result, run = run_toy(tmp_path, second, cfg, name="split", resume=True)
    assert result.status == "done" and second.updates == [3, 4] and second.batches == [2, 3]
    assert "w" in second.restored_teacher
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [r["step"] for r in read_jsonl(run.metrics_path)] == [1, 2, 3, 4]


def test_clipping_bounds_the_update_gradient(tmp_path):
    task = ToyTask()
    cfg = toy_cfg(max_updates=2)
    cfg.optim.clip_norm = 0.01
    _, run = run_toy(tmp_path, task, cfg)
    for grads, row in zip(task.grads, read_jsonl(run.metrics_path)):
        assert row["gnorm"] > 0.01  # logged before clipping
        assert torch.sqrt(sum((g**2).sum() for g in grads)).item() == pytest.approx(0.01, rel=1e-4)


# ----------------------------------------------------------------------------- Weights & Biases logging


class FakeWandb(types.ModuleType):
    """Stands in for the `wandb` package (not installed here): records init arguments and logged dicts."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return self

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished += 1


class ValidatingToyTask(ToyTask):
    def validate(self, model, step):
        return {"dev/wer": 10.0 / step, "dev/cer": 1.0 / step}


def _numbers(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_wandb_gets_the_config_and_every_metrics_line(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = toy_cfg(max_updates=4, wandb_project="d2v-tests", wandb_mode="offline")
    ws = Workspace.resolve(tmp_path / "ws")

    def train(resume, stop_at=None):
        loader = BatchLoader(ToyDataset(), "pad", cfg.data.max_tokens, seed=cfg.train.seed)
        run = prepare_run(ws, "wb", cfg, resume, CPU)
        result = engine.train(cfg, ValidatingToyTask(), loader, run, CPU, validate_every=2, best_metric="dev/wer",
                              stop_at=stop_at)
        return result, run

    result, run = train(resume=False, stop_at=2)
    assert result.status == "paused"
    [init] = fake.inits
    assert (init["project"], init["name"], init["mode"], init["dir"]) == ("d2v-tests", "wb", "offline", str(run.dir))
    assert init["config"] == C.to_dict(cfg) and init["config"]["train"]["wandb_project"] == "d2v-tests"
    assert fake.finished == 1

    result, run = train(resume=True)  # --resume continues the same W&B run
    assert result.status == "done"
    assert len(fake.inits) == 2 and fake.inits[1]["id"] == init["id"] and fake.inits[1]["resume"] == "allow"
    assert fake.finished == 2

    rows = read_jsonl(run.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 2, 3, 4, 4]  # training lines, validation at 2 and 4
    expected = [(r["step"], {f"{'valid' if 'dev/wer' in r else 'train'}/{k}": v for k, v in _numbers(r).items()})
                for r in rows]
    assert fake.logged == expected
    assert fake.logged[2][1]["valid/dev/wer"] == 5.0 and "train/loss" in fake.logged[0][1]


def test_wandb_is_rank_0_only_and_never_imported_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now raises ImportError
    result, _ = run_toy(tmp_path, ToyTask(), toy_cfg(max_updates=2))  # wandb_project empty: not imported
    assert result.status == "done"

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = toy_cfg(max_updates=2, wandb_project="p")
    run = prepare_run(Workspace.resolve(tmp_path / "ws"), "ranks", cfg, False, CPU)
    from d2vcli.metrics_log import MetricsLog, WandbSettings

    log = MetricsLog(run.metrics_path, run.dir / "tb", False, None, WandbSettings.of(cfg, run))  # rank 1
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert fake.inits == [] and fake.logged == []


def test_wandb_missing_is_a_user_error_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    task = ToyTask()
    with pytest.raises(UserError, match=r"pip install wandb"):
        run_toy(tmp_path, task, toy_cfg(max_updates=2, wandb_project="p"))
    assert task.batches == [] and not (tmp_path / "ws" / "runs" / "toy").exists()


def test_a_failing_wandb_init_is_a_user_error_that_names_offline_mode(tmp_path, monkeypatch):
    fake = FakeWandb()

    def refuse(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    fake.init = refuse
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with pytest.raises(UserError, match=r"wandb login.*train.wandb_mode=offline"):
        run_toy(tmp_path, ToyTask(), toy_cfg(max_updates=2, wandb_project="p"))
