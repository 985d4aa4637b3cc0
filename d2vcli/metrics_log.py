"""What a training run reports: one update's numbers, their sums over a log interval, metrics.jsonl.

    u = UpdateResult(...)                    # the engine, after each update
    interval.add(u, seconds)                 # summed until the next log line
    log.write(interval.row(step, epoch, skipped=..., wall=...))   # metrics.jsonl (+ TensorBoard, + W&B)

metrics.jsonl has one JSON object per line: {"step", "epoch", "loss", "lr", "gnorm", "sample_size",
<task metrics>, "audio_s_per_s", "skipped", "wall", ["loss_scale"], ["max_mem_gb"]} for training and
the task's validation result for validation lines. Only rank 0 writes.

The same numbers go to TensorBoard (<run>/tensorboard, when tensorboard is importable) and to
Weights & Biases when `train.wandb_project` is set, as "train/<key>" and "valid/<key>" at the
line's step. wandb is imported only then; `require_loggers` fails early (with the fix) when it is
missing. The W&B run keeps one id per run directory (<run>/wandb-id.txt), so `--resume`
continues the same W&B run; W&B cannot drop the points logged after the checkpoint, as the
JSONL does, so it ignores the re-logged steps until the run passes them.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from d2vcli.audio import SAMPLE_RATE
from d2vcli.config import to_dict
from d2vcli.errors import UserError
from d2vcli.fileio import atomic_write_jsonl, atomic_write_text, read_jsonl

WANDB_FIX = "pip install wandb"
WANDB_ID_FILE = "wandb-id.txt"


@dataclass(frozen=True)
class UpdateResult:
    """One update (or skipped attempt) as the engine saw it, all-reduced over ranks.

    `finite` False: a non-finite loss or gradient skipped the update; `overflow` True: an fp16
    gradient overflow made the GradScaler skip it (not counted as non-finite).
    """

    finite: bool
    overflow: bool
    loss: float  # summed over micro-batches and ranks
    sample_size: float  # the total the loss is normalized by
    num_samples: float  # audio samples processed
    signalled: bool  # some rank received SIGINT/SIGTERM
    gnorm: float  # gradient norm before clipping
    lr: float
    metrics: dict[str, float] = field(default_factory=dict)  # the task's, averaged over micro-batches

    @property
    def skipped(self) -> bool:
        return not self.finite


class LoggerError(UserError):
    """An optional logger that was asked for but cannot run; the message names the fix."""


def _import_wandb():
    try:  # here, not at the top: wandb is optional and imported only when train.wandb_project asks for it
        import wandb
    except ImportError as e:
        raise LoggerError(
            f"train.wandb_project is set, but wandb cannot be imported ({e}). Fix: {WANDB_FIX}, or leave "
            f"train.wandb_project empty to log to metrics.jsonl (and TensorBoard) only.") from None
    return wandb


def require_loggers(train_cfg) -> None:
    """Fail now, before any training, when a logger the config asks for is not installed (every rank checks)."""
    if train_cfg.wandb_project:
        _import_wandb()


@dataclass(frozen=True)
class WandbSettings:
    """What `wandb.init` gets: the project and mode of the config, the d2v run's name, directory and config."""

    project: str
    mode: str
    name: str
    run_dir: Path
    config: dict

    @classmethod
    def of(cls, cfg, run) -> Optional["WandbSettings"]:
        """For a `config.Config` and a `run_dir.Run`; None when train.wandb_project is empty."""
        if not cfg.train.wandb_project:
            return None
        return cls(cfg.train.wandb_project, cfg.train.wandb_mode, run.name, Path(run.dir), to_dict(cfg))


def _start_wandb(s: WandbSettings, resume_step: Optional[int]):
    wandb = _import_wandb()
    id_file = s.run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else ""
    if not run_id:
        run_id = uuid.uuid4().hex[:16]
        atomic_write_text(id_file, run_id + "\n")
    try:
        return wandb.init(project=s.project, name=s.name, config=s.config, mode=s.mode, dir=str(s.run_dir),
                          id=run_id, resume="allow")
    except Exception as e:  # noqa: BLE001 - wandb raises its own error types (login, network, permissions)
        raise LoggerError(f"wandb.init failed for project '{s.project}' ({type(e).__name__}: {e}). Log in with "
                          f"`wandb login`, or set train.wandb_mode=offline to log without a network.") from e


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when importable, + W&B when `wandb` settings are given); rank 0 only.

    Lines are appended and flushed rather than rewritten atomically: the log grows with the run,
    and a torn last line is dropped on resume, when the file is rewritten (atomically) up to
    the checkpoint's step.
    """

    def __init__(self, path: Path, tensorboard_dir: Path, enabled: bool, resume_step: Optional[int],
                 wandb: Optional[WandbSettings] = None):
        self.enabled = enabled
        self.fh = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        rows: list[dict] = []
        if resume_step is not None and path.exists():
            rows = [r for r in _read_jsonl_tolerant(path) if r.get("step", 0) <= resume_step]
        atomic_write_jsonl(path, rows)
        self.fh = open(path, "a", encoding="utf-8")
        try:  # here, not at the top: tensorboard is optional and only rank 0 of a training run needs it
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step)
        if wandb is not None:
            try:
                self.wandb = _start_wandb(wandb, resume_step)
            except BaseException:
                self.close()  # the JSONL and TensorBoard files opened above
                raise

    def write(self, row: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(row) + "\n")
        self.fh.flush()
        scalars = {f"{prefix}/{k}": v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _read_jsonl_tolerant(path: Path) -> list[dict]:
    try:
        return read_jsonl(path)
    except ValueError:  # a line torn by a kill: keep the complete ones
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
        return rows


def format_value(v: Any) -> str:
    """A metric for the console: 4 significant digits, scientific below 1e-3."""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


class Interval:
    """Sums over the updates since the last log line."""

    def __init__(self, samples_per_unit: float = SAMPLE_RATE, rate_key: str = "audio_s_per_s"):
        # Throughput: num_samples / samples_per_unit per second, logged as `rate_key` (audio seconds or images).
        self.samples_per_unit, self.rate_key = samples_per_unit, rate_key
        self.updates = 0
        self.loss = 0.0
        self.sample_size = 0.0
        self.samples = 0.0
        self.seconds = 0.0
        self.gnorm = 0.0
        self.metrics: dict[str, float] = {}
        # Per-metric counts: some metrics (the pretraining collapse monitors) are computed only on
        # log steps, so each is averaged over the updates that reported it, not over all of them.
        self.metric_counts: dict[str, int] = {}
        self.last: Optional[UpdateResult] = None

    def add(self, u: UpdateResult, seconds: float) -> None:
        self.seconds += seconds
        self.samples += u.num_samples
        self.last = u
        if not u.finite:
            return
        self.updates += 1
        self.loss += u.loss
        self.sample_size += u.sample_size
        self.gnorm += u.gnorm
        for k, v in u.metrics.items():
            self.metrics[k] = self.metrics.get(k, 0.0) + v
            self.metric_counts[k] = self.metric_counts.get(k, 0) + 1

    def audio_per_second(self) -> float:
        """Throughput in the interval's unit (audio seconds per second, or images per second)."""
        return self.samples / self.samples_per_unit / max(self.seconds, 1e-9)

    def row(self, step: int, epoch: int, skipped: int, wall: float, extra: Optional[dict] = None) -> dict:
        """The metrics.jsonl line: means over the interval's finite updates; `extra` is appended
        (the engine's loss scale and peak memory, when they apply)."""
        n = max(1, self.updates)
        return {
            "step": step,
            "epoch": epoch,
            "loss": self.loss / max(self.sample_size, 1e-12),
            "lr": self.last.lr if self.last is not None else 0.0,
            "gnorm": self.gnorm / n,
            "sample_size": self.sample_size / n,
            **{k: v / self.metric_counts[k] for k, v in self.metrics.items()},
            self.rate_key: self.audio_per_second(),
            "skipped": skipped,
            "wall": round(wall, 3),
            **(extra or {}),
        }


def bar_text(u: UpdateResult, interval: Interval) -> str:
    """The progress bar's text after update `u`."""
    if not u.finite:
        return "skipped (non-finite)"
    parts = [f"loss {u.loss / max(u.sample_size, 1e-12):.4g}", f"lr {u.lr:.2e}"]
    parts += [f"{k} {format_value(v)}" for k, v in u.metrics.items()]
    unit = "audio-s/s" if interval.rate_key == "audio_s_per_s" else interval.rate_key.replace("_per_s", "/s")
    parts.append(f"{interval.audio_per_second():.0f} {unit}")
    return "  ".join(parts)
