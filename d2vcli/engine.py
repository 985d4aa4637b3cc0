"""The training engine: the one loop behind `d2v pretrain` and `d2v finetune`.

Not run directly: `d2vcli.pretrain.pretrain()` and `d2vcli.finetune` build a task and a data
loader, prepare the run directory (`d2vcli.run_dir.prepare_run`) and call
`train(cfg, task, loader, run, dist_info)`.

The engine owns the loop, precision, gradient accumulation, the LR schedule, clipping,
non-finite handling, logging, checkpoints, resume, signals and DDP. The task owns the model
and the objective. They meet through this step interface (`TrainTask`, a typing.Protocol:
any object with these members works, there is no base class):

    model                    nn.Module already on the device. The engine wraps it in DDP and
                             optimizes its parameters that require grad.
    kind                     checkpoint kind, "pretrain" or "ctc".
    find_unused_parameters   True when a step may leave parameters without a gradient
                             (LayerDrop, frozen parts): DDP must then look for them.
    train_step(model, batch, step) -> StepOutput
        One micro-batch forward on a `data.Batch` already on the device. Call `model` (the DDP
        wrapper in multi-process runs, so gradients synchronize), not `task.model`. Runs under the engine's autocast; `step` = updates done.
        StepOutput.loss         scalar tensor, SUMMED over the micro-batch (not averaged)
        StepOutput.sample_size  what the loss is normalized by (masked frames, utterances, ...)
        StepOutput.metrics      {name: float | 0-dim tensor}, averaged over the micro-batches
                                of an update and over the log interval
    after_update(step) -> dict | None
        Called exactly once after every optimizer update (not after a skipped one), with the new
        update count. The EMA teacher steps here. Returned metrics join the update's metrics.
    validate(model, step) -> dict | None
        Called every `validate_every` updates (after `validate_after`); `model` is the bare module.
        Rank 0's result is logged and, with `best_metric`, selects best.pt (lower is better).
    stop_reason(step, metrics) -> str | None
        Checked after every update with its metrics; a message ends training after saving a
        checkpoint (pretraining's collapse guard). All ranks must agree (use all-reduced metrics).
    checkpoint_state() -> dict          extra checkpoint keys: arch, normalize, teacher, vocab, ...
    load_checkpoint_state(state) -> None    restores them on resume
    lr_scales (optional)     {parameter name: factor} multiplying the schedule's rate per parameter
                             (image fine-tuning's layer-wise lr decay); absent = 1 everywhere

The loader is anything with the members of `BatchSource` (a typing.Protocol too): iteration
over the rest of the current epoch's local batches, `position`, `local_indices`/`batches` for
the epoch's size, and `state_dict`/`load_state_dict` for resume (`data.BatchLoader` is one).

Semantics (fairseq's `fairseq_cli/train.py` + `fairseq/trainer.py`; recipe values in
`docs/recipe.md`):

- Batch size is what one update holds, in the loader's unit (`BatchUnit`, train_settings.py): audio seconds by default
  (`train.batch_seconds`), images for image pretraining (`train.images_per_update`, passed by the
  task as `train(..., batch=image_batch_unit(...))`). Accumulation =
  ceil(per update / (world_size x per micro-batch)), printed at start, so one GPU
  reproduces the 16-GPU recipe's batch: "3800 s/update = 1 GPU x 3.8M samples x 16 accumulation".
- Loss normalization: losses are summed over micro-batches and ranks and the gradient is divided
  by the all-reduced total sample_size. Two processes sharing a global batch therefore compute the
  same update, and log the same loss, as one process accumulating it.
- Update u (0-based) uses lr = schedule(u) (`d2vcli.schedule`). Optional clipping (clip_norm > 0).
  A non-finite loss or gradient skips the update (no optimizer step, no after_update) and is
  counted; `train.max_nonfinite` in a row ends the run with an explanation. fp16 overflows are
  the GradScaler's business (the scale backs off) and are not counted, unless the scale collapses.
- Speed settings (`d2vcli.speedups`): `train.compile` (auto = CUDA only, eager fallback on a
  compiler failure) and `train.activation_checkpointing`; neither changes what is saved.
- Precision `train.precision`: auto = bf16 autocast on GPUs that support it, fp16 autocast with
  dynamic loss scaling elsewhere on GPU, fp32 on CPU. The model keeps its own fp32 islands.
- Randomness (rng_state.py): torch is re-seeded at every update from (seed, rank, update), like fairseq's
  per-update seeding, so dropout does not depend on where a run was resumed; data randomness
  is keyed by batch (`d2vcli.data.batch_rng`).
- Checkpoints (`d2vcli.checkpoint`): last.pt at every save, step-N.pt pruned to
  `train.keep_last` (plus multiples of `train.keep_every`), best.pt for the best validation.
  Each holds model, task state (teacher), optimizer, scheduler, scaler, RNG states, data
  position, step, resolved config and format version; only rank 0 writes.
- Resume continues exactly: the next update sees the same batch, lr, RNG and optimizer state as
  in an uninterrupted run; metrics.jsonl lines after the checkpoint are dropped.
- SIGINT/SIGTERM: finish the current update, save last.pt, return "interrupted" (a second
  Ctrl-C aborts at once).
- Logging: a rich progress bar; metrics.jsonl (one line per `train.log_every` updates and one
  per validation); TensorBoard events in <run>/tensorboard when tensorboard is installed; W&B
  when train.wandb_project is set (metrics_log.py).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Protocol, Sized

import torch
from rich.progress import TextColumn
from torch import nn

from d2vcli import checkpoint as ckpt
from d2vcli import config as cfgmod
from d2vcli import distributed
from d2vcli.config import Config, ConfigError
from d2vcli.data import Batch, DataPosition, bad_files_fix, bad_files_summary
from d2vcli.distributed import DistInfo
from d2vcli.metrics_log import Interval, MetricsLog, UpdateResult, WandbSettings, bar_text, format_value
from d2vcli.rng_state import rng_state, seed_update, set_rng_state
from d2vcli.run_dir import Run
from d2vcli.schedule import build_optimizer, lr_at
from d2vcli.speedups import compile_model, compile_wanted, set_activation_checkpointing, set_fused_alibi
from d2vcli.train_settings import BatchUnit, audio_batch_unit, precision_name, resolve_precision
# Re-exported: tasks, tests and benchmarks name them as engine.image_batch_unit(cfg), ...
from d2vcli.train_settings import accumulation_steps, describe_batch, image_batch_unit  # noqa: F401 - re-exported
from d2vcli.train_settings import text_batch_unit, text_sequence_unit  # noqa: F401 - re-exported
from d2vcli.ui import console, progress

FP16_INIT_SCALE = 128.0  # fairseq fp16_init_scale
FP16_MIN_SCALE = 1e-4  # fairseq min_loss_scale: below this the loss is exploding, not overflowing
IMAGE_FILES_FIX = ("Fix or remove them, then re-run `d2v prepare images` (it lists unreadable files in "
                   "skipped-<split>.tsv)")


# ----------------------------------------------------------------------------- the step interface


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, summed over the micro-batch
    sample_size: Any  # int, float or scalar tensor
    metrics: dict[str, Any] = field(default_factory=dict)


class TrainTask(Protocol):
    model: nn.Module
    kind: str
    find_unused_parameters: bool

    def train_step(self, model: nn.Module, batch: Batch, step: int) -> StepOutput: ...

    def after_update(self, step: int) -> Optional[dict]: ...

    def validate(self, model: nn.Module, step: int) -> Optional[dict]: ...

    def stop_reason(self, step: int, metrics: dict) -> Optional[str]: ...

    def checkpoint_state(self) -> dict: ...

    def load_checkpoint_state(self, state: dict) -> None: ...


class BatchSource(Protocol):
    """What the engine asks of a data loader (see the module docstring)."""

    position: DataPosition  # (epoch, global batches consumed in it): where the next batch comes from
    bad_files: dict[str, str]  # unreadable files skipped so far (path -> reason), in the order met

    def __iter__(self) -> Iterator[Batch]: ...  # the rest of the current epoch; then position moves on

    def local_indices(self, epoch: int, consumed: int) -> list[int]: ...  # this rank's global batch indices

    def batches(self, epoch: int) -> Sized: ...  # the epoch's global batches (only its length is read)

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


Status = Literal["done", "paused", "early_stop", "interrupted", "stopped", "diverged"]


@dataclass
class TrainResult:
    status: Status
    step: int
    message: str
    checkpoint: Optional[Path]
    run_dir: Path
    signum: int = 0

    @property
    def exit_code(self) -> int:
        """0 for a finished (or deliberately paused) run, 128+signal when interrupted, 1 when stopped."""
        if self.status in ("done", "paused", "early_stop"):
            return 0
        if self.status == "interrupted":
            return 128 + self.signum
        return 1


# ----------------------------------------------------------------------------- signals


class _StopOnSignal:
    """SIGINT/SIGTERM set a flag the loop checks after each update; a second Ctrl-C aborts."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        console.print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this update "
                      f"(Ctrl-C again to abort without saving)")

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


# ----------------------------------------------------------------------------- the loop


def train(
    cfg: Config,
    task: TrainTask,
    loader: BatchSource,
    run: Run,
    info: DistInfo,
    *,
    description: str = "train",
    validate_every: int = 0,
    validate_after: int = 0,
    best_metric: Optional[str] = None,
    early_stop_patience: int = 0,
    stop_at: Optional[int] = None,
    batch: Optional[BatchUnit] = None,
) -> TrainResult:
    """Train `task` on `loader` until cfg.train.max_updates (or `stop_at` updates, then save
    and return "paused"; used to split a run in parts). `batch` says how the loader's batches are
    counted (default: audio seconds). See the module docstring for semantics."""
    return _Trainer(cfg, task, loader, run, info, description, validate_every, validate_after, best_metric,
                    early_stop_patience, stop_at, batch or audio_batch_unit(cfg)).run()


class _Trainer:
    def __init__(self, cfg: Config, task: TrainTask, loader: BatchSource, run: Run, info: DistInfo,
                 description: str, validate_every: int, validate_after: int, best_metric: Optional[str],
                 early_stop_patience: int, stop_at: Optional[int], batch: BatchUnit):
        self.cfg, self.task, self.loader, self.run_info, self.info = cfg, task, loader, run, info
        self.description = description
        self.validate_every, self.validate_after = validate_every, validate_after
        self.best_metric, self.patience, self.stop_at = best_metric, early_stop_patience, stop_at
        self.device = info.device
        self.amp_dtype = resolve_precision(cfg.train.precision, self.device)
        self.batch = batch
        self.accumulation = batch.accumulation(info.world_size)
        task.model.train()
        set_activation_checkpointing(task.model, cfg.train.activation_checkpointing)
        teacher = getattr(getattr(task, "teacher", None), "module", None)  # an EMA teacher runs the same attention
        for module in filter(None, (task.model, teacher)):
            set_fused_alibi(module, cfg.train.fused_alibi)
        # DDP wraps the compiled callable (so no_sync and the gradient hooks stay DDP's); checkpoints save task.model.
        self.model = distributed.wrap_model(compile_model(task.model, cfg.train.compile, self.device), info,
                                            task.find_unused_parameters)
        self.params = [p for p in task.model.parameters() if p.requires_grad]
        # A task may scale the rate per parameter (`lr_scales`: name -> factor, layer-wise lr decay).
        self.optimizer = build_optimizer(self.params, cfg.optim, self.device, task.model.named_parameters(),
                                         getattr(task, "lr_scales", None))
        self.scaler = (torch.amp.GradScaler("cuda", init_scale=FP16_INIT_SCALE)
                       if self.amp_dtype == torch.float16 else None)
        self.step = 0
        # Engine state saved with checkpoints.
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.best: Optional[float] = None
        self.bad_validations = 0
        self.seen = 0.0  # seconds of audio or images consumed, saved as batch.seen_key
        self.train_seconds = 0.0

    # -- checkpoints

    def _state(self) -> dict:
        return ckpt.make_state(self.task.kind, config=cfgmod.to_dict(self.cfg), model=self.task.model.state_dict(),
                               **self.task.checkpoint_state(), **{
            ckpt.OPTIMIZER_KEY: self.optimizer.state_dict(),
            ckpt.SCHEDULER_KEY: {"kind": self.cfg.schedule.kind, "step": self.step},
            ckpt.SCALER_KEY: self.scaler.state_dict() if self.scaler is not None else {},
            ckpt.RNG_KEY: rng_state(),
            ckpt.DATA_POSITION_KEY: self.loader.state_dict(),
            ckpt.STEP_KEY: self.step,
            ckpt.ENGINE_KEY: {
                "nonfinite_streak": self.nonfinite_streak, "nonfinite_total": self.nonfinite_total,
                "best": self.best, "best_metric": self.best_metric, "bad_validations": self.bad_validations,
                self.batch.seen_key: self.seen, "train_seconds": self.train_seconds,
                "world_size": self.info.world_size,
            },
        })

    def save(self, periodic: bool, best: bool = False) -> Optional[Path]:
        """Write last.pt (and step-N.pt / best.pt as hard links to it) on rank 0."""
        last = self.run_info.last
        if self.info.is_main:
            ckpt.save_checkpoint(last, self._state())
            if periodic:
                _link(last, self.run_info.dir / f"step-{self.step}.pt")
                ckpt.prune_checkpoints(self.run_info.dir, self.cfg.train.keep_last, self.cfg.train.keep_every)
            if best:
                _link(last, self.run_info.dir / "best.pt")
        distributed.barrier()
        return last

    def resume(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, expect_kind=self.task.kind)
        self.task.model.load_state_dict(state[ckpt.MODEL_KEY])
        self.task.load_checkpoint_state(state)
        self.optimizer.load_state_dict(state[ckpt.OPTIMIZER_KEY])
        if self.scaler is not None and state.get(ckpt.SCALER_KEY):
            self.scaler.load_state_dict(state[ckpt.SCALER_KEY])
        self.loader.load_state_dict(state[ckpt.DATA_POSITION_KEY])
        set_rng_state(state[ckpt.RNG_KEY])
        self.step = int(state[ckpt.STEP_KEY])
        eng = state.get(ckpt.ENGINE_KEY, {})
        self.nonfinite_streak = int(eng.get("nonfinite_streak", 0))
        self.nonfinite_total = int(eng.get("nonfinite_total", 0))
        self.best = eng.get("best")
        self.bad_validations = int(eng.get("bad_validations", 0))
        self.seen = float(eng.get(self.batch.seen_key, 0.0))
        self.train_seconds = float(eng.get("train_seconds", 0.0))
        if self.info.is_main:
            pos = self.loader.position
            console.print(f"resumed from {path} at update {self.step} (epoch {pos.epoch}, "
                          f"{pos.consumed} batches into it)")

    # -- data

    def _micro_batches(self) -> Iterator[Batch]:
        """Micro-batches forever, epoch after epoch (an update may span an epoch boundary)."""
        while True:
            if not self.loader.local_indices(self.loader.position.epoch, 0):
                raise ConfigError(
                    f"the training data gives no batch to process {self.info.rank} of {self.info.world_size}: "
                    f"{len(self.loader.batches(self.loader.position.epoch))} batches per epoch. Use fewer "
                    f"processes or a smaller data.max_tokens."
                )
            yield from self.loader

    # -- one update

    def _update(self, batches: Iterator[Batch]) -> UpdateResult:
        """Accumulate `self.accumulation` micro-batches, then step (or skip). Returns the update's numbers."""
        cfg = self.cfg
        seed_update(cfg.train.seed, self.info.rank, self.step)
        lr = lr_at(self.step, cfg.optim.lr, cfg.schedule, cfg.train.max_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        sample_size = torch.zeros((), device=self.device, dtype=torch.float64)
        num_samples = 0
        metric_sums: dict[str, Any] = {}
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                  enabled=self.amp_dtype is not None)
        for i in range(self.accumulation):
            batch = next(batches).to(self.device)
            num_samples += batch.num_samples
            last = i == self.accumulation - 1
            sync = contextlib.nullcontext() if (last or not self.info.distributed) else self.model.no_sync()
            with sync:
                with autocast:
                    out = self.task.train_step(self.model, batch, self.step)
                loss = out.loss
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += loss.detach().double()
            sample_size += torch.as_tensor(out.sample_size, dtype=torch.float64, device=self.device)
            for k, v in out.metrics.items():
                v = v.detach().double() if isinstance(v, torch.Tensor) else float(v)
                metric_sums[k] = metric_sums[k] + v if k in metric_sums else v

        # One all-reduce for everything the ranks must agree on.
        totals = torch.stack([loss_sum, sample_size,
                              torch.tensor(float(num_samples), dtype=torch.float64, device=self.device),
                              torch.tensor(float(self._signal.signum > 0), dtype=torch.float64,
                                           device=self.device)])
        distributed.all_reduce_sum(totals)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        # DDP averaged the gradients over ranks; fairseq's rule is sum / total sample size.
        scale = self.info.world_size / totals[1].clamp(min=1e-12)
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].dtype))
            gnorm = torch.nn.utils.get_total_norm(grads, foreach=True)
        else:
            gnorm = torch.zeros((), device=self.device)
        # One device->host transfer per update for the totals, the norm and the task metrics.
        tensor_keys = [k for k, v in metric_sums.items() if isinstance(v, torch.Tensor)]
        values = torch.cat([totals, gnorm.double().reshape(1)]
                           + [metric_sums[k].reshape(1).to(self.device) for k in tensor_keys]).tolist()
        loss_total, size_total, samples_total, signals, gnorm_value = values[:5]
        metric_sums.update(zip(tensor_keys, values[5:]))
        metrics = {k: v / self.accumulation for k, v in metric_sums.items()}

        finite = math.isfinite(loss_total) and math.isfinite(gnorm_value) and size_total > 0
        overflow = False
        if finite:
            if cfg.optim.clip_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(self.params, cfg.optim.clip_norm, gnorm, foreach=True)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.step += 1
            self.nonfinite_streak = 0
            extra = self.task.after_update(self.step)
            if extra:
                metrics.update(extra)
        elif self.scaler is not None and math.isfinite(loss_total) and size_total > 0:
            # fp16 gradient overflow: the scaler skips the step and halves the scale.
            overflow = True
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.scaler is not None:
                self.scaler.update(self.scaler.get_scale())  # forget this iteration's inf checks
            self.nonfinite_streak += 1
            self.nonfinite_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        return UpdateResult(finite=finite, overflow=overflow, loss=loss_total, sample_size=size_total,
                            num_samples=samples_total, signalled=signals > 0, gnorm=gnorm_value, lr=lr,
                            metrics=metrics)

    # -- the loop

    def run(self) -> TrainResult:
        cfg, info = self.cfg, self.info
        if self.run_info.resume_from is not None:
            self.resume(self.run_info.resume_from)
        log = MetricsLog(self.run_info.metrics_path, self.run_info.dir / "tensorboard", info.is_main,
                         self.step if self.run_info.resume_from else None, WandbSettings.of(cfg, self.run_info))
        if info.is_main:
            if info.backend:
                console.print(f"distributed: {info.backend} process group, {info.world_size} process(es), DDP")
            console.print(f"batch: {self.batch.describe(info, self.accumulation)}")
            compiled = "torch.compile" if compile_wanted(cfg.train.compile, self.device) else "eager"
            ckpting = (", activation checkpointing" if cfg.train.activation_checkpointing else "") + (
                ", fused ALiBi" if cfg.train.fused_alibi else "")
            console.print(f"precision: {precision_name(self.amp_dtype)} on {self.device} ({compiled}{ckpting}); "
                          f"run dir {self.run_info.dir}")
        batches = self._micro_batches()
        self._bad_reported = len(self.loader.bad_files)  # those of a resumed run were reported before
        interval = Interval(self.batch.samples_per_unit, self.batch.rate_key)
        result: Optional[TrainResult] = None
        bar = progress(TextColumn("{task.fields[info]}")) if info.is_main else None
        try:
            with _StopOnSignal() as self._signal, (bar or contextlib.nullcontext()):
                bar_task = bar.add_task(self.description, total=cfg.train.max_updates, completed=self.step,
                                        info="") if bar else None
                while result is None:
                    if self.step >= cfg.train.max_updates:
                        path = self.save(periodic=True)
                        result = TrainResult("done", self.step, f"finished {self.step} updates", path,
                                             self.run_info.dir)
                        break
                    if self.stop_at is not None and self.step >= self.stop_at:
                        path = self.save(periodic=False)
                        result = TrainResult("paused", self.step, f"paused at update {self.step}; continue with "
                                             f"--resume", path, self.run_info.dir)
                        break
                    t0 = time.perf_counter()
                    u = self._update(batches)
                    dt = time.perf_counter() - t0
                    self.train_seconds += dt
                    self.seen += u.num_samples / self.batch.samples_per_unit
                    interval.add(u, dt)
                    if bar is not None:
                        bar.update(bar_task, completed=self.step, info=bar_text(u, interval))
                    if u.finite and self.step % max(1, cfg.train.log_every) == 0:
                        row = interval.row(self.step, self.loader.position.epoch, skipped=self.nonfinite_total,
                                           wall=self.train_seconds, extra=self._resource_metrics())
                        log.write(row)
                        if info.is_main and (bar is None or bar.disable):
                            console.print(" ".join(f"{k}={format_value(v)}" for k, v in row.items()), markup=False)
                        interval = Interval(self.batch.samples_per_unit, self.batch.rate_key)
                    self._report_bad_files(log)
                    result = self._after(u, log)
        finally:
            log.close()
        if self.loader.bad_files:
            what = "audio" if self.batch.unit == "s" else "image"
            fix = bad_files_fix() if what == "audio" else IMAGE_FILES_FIX
            result.message += f"\n{bad_files_summary(self.loader.bad_files, what=what)}. {fix}."
        if info.is_main:
            colour = "green" if result.exit_code == 0 else "red"
            console.print(f"[{colour}]{result.message}[/]")
        return result

    def _report_bad_files(self, log: MetricsLog) -> None:
        """Name each unreadable file the loader skipped since the last update, on screen and in metrics.jsonl."""
        new = list(self.loader.bad_files.items())[self._bad_reported:]
        self._bad_reported += len(new)
        for path, reason in new:
            log.write({"step": self.step, "skipped_file": path, "reason": reason}, prefix="data")
            if self.info.is_main:
                what = "audio" if self.batch.unit == "s" else "image"
                console.print(f"warning: skipped unreadable {what} {path}: {reason}", markup=False,
                              highlight=False, soft_wrap=True)

    def _resource_metrics(self) -> dict:
        """The log line's engine extras: the fp16 loss scale and the peak GPU memory, when they apply."""
        extra = {}
        if self.scaler is not None:
            extra["loss_scale"] = self.scaler.get_scale()
        if self.device.type == "cuda":
            extra["max_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return extra

    def _after(self, u: UpdateResult, log: MetricsLog) -> Optional[TrainResult]:
        """Everything that can follow an update: stop conditions, validation, checkpoints."""
        cfg = self.cfg
        if not u.finite and not u.overflow:
            if self.nonfinite_streak >= cfg.train.max_nonfinite:
                path = self.save(periodic=False)
                return TrainResult(
                    "diverged", self.step,
                    f"{self.nonfinite_streak} updates in a row had a non-finite loss or gradient "
                    f"({self.nonfinite_total} in total); each was skipped. The model is diverging: lower "
                    f"optim.lr, set optim.clip_norm (e.g. 1.0), or use train.precision=fp32/bf16 instead of fp16. "
                    f"Weights from before the first bad update are in {path}; continue with --resume and --set.",
                    path, self.run_info.dir)
            return self._signal_result(u)
        if u.overflow:
            if self.scaler.get_scale() < FP16_MIN_SCALE:
                path = self.save(periodic=False)
                return TrainResult(
                    "diverged", self.step,
                    f"fp16 loss scale fell below {FP16_MIN_SCALE}: gradients overflow even at tiny scales, so the "
                    f"loss is exploding. Lower optim.lr, set optim.clip_norm, or use train.precision=bf16/fp32. "
                    f"Saved {path}.", path, self.run_info.dir)
            return self._signal_result(u)
        reason = self.task.stop_reason(self.step, u.metrics)
        if reason:
            path = self.save(periodic=False)
            return TrainResult("stopped", self.step, f"stopped at update {self.step}: {reason}\n"
                               f"checkpoint: {path}", path, self.run_info.dir)
        validated = best = False
        if (self.validate_every and self.step % self.validate_every == 0 and self.step >= self.validate_after):
            best = self._validate(log)
            validated = True
        periodic = (cfg.train.save_every > 0 and self.step % cfg.train.save_every == 0
                    and self.step < cfg.train.max_updates)
        if periodic or validated:
            self.save(periodic=periodic, best=best)
        if self.patience and self.bad_validations >= self.patience:
            path = self.save(periodic=False)
            return TrainResult("early_stop", self.step, f"{self.best_metric} did not improve in {self.patience} "
                               f"validations; best {self.best:.4g} in best.pt", path, self.run_info.dir)
        return self._signal_result(u)

    def _signal_result(self, u: UpdateResult) -> Optional[TrainResult]:
        if not u.signalled:
            return None
        path = self.save(periodic=False)
        signum = self._signal.signum or signal.SIGTERM
        return TrainResult("interrupted", self.step, f"interrupted at update {self.step}; saved {path}. "
                           f"Continue with the same command plus --resume.", path, self.run_info.dir,
                           signum=int(signum))

    def _validate(self, log: MetricsLog) -> bool:
        """Run the task's validation; returns whether it is the best so far."""
        self.task.model.eval()
        try:
            result = self.task.validate(self.task.model, self.step)
        finally:
            self.task.model.train()
        result = distributed.broadcast_object(result)
        if not result:
            return False
        improved = False
        if self.best_metric and self.best_metric in result:
            value = float(result[self.best_metric])
            improved = self.best is None or value < self.best
            if improved:
                self.best, self.bad_validations = value, 0
            else:
                self.bad_validations += 1
            # The best value so far goes into the log line too (and into every checkpoint's engine state).
            result = {**result, "best": self.best}
        log.write({"step": self.step, **result}, prefix="valid")
        if self.info.is_main:
            console.print("valid " + " ".join(f"{k}={format_value(v)}" for k, v in result.items()), markup=False)
        return improved


def _link(src: Path, dst: Path) -> None:
    """Make `dst` the same file as `src` atomically (hard link, or a copy where links fail)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
