"""Run directories: <workdir>/runs/<name>, what a training run writes and `--resume` continues.

    with run_lock(workspace, name, info):                    # one process per run name, for the run's life
        resume = resume_wanted(workspace, name, resume, resume_if_exists)
        run = prepare_run(workspace, name, cfg, resume, info)   # creates the directory, writes config.yaml
        run.resume_from                                          # the checkpoint to continue, or None

    with opened_run(workspace, cfg, info, "pretrain", name, preset, resume, resume_if_exists) as run:
        ...                      # the same for a training command: its default name, then torch seeded

Rules, kept in one place: an existing run with checkpoints is only continued with `--resume`
(`RunDirError` otherwise); `--resume` continues from last.pt, else the newest step-N.pt, and is an
error when the run has no checkpoint (the message lists the runs there are), while
`--resume-if-exists` starts fresh then (for schedulers that always pass it); resuming refuses a
different architecture than the run was started with and reports other changed settings.
Two processes never train into one run directory: `run_lock` holds `runs/.<name>.lock`
(`d2vcli.locks`) from before the directory is read until the run ends, and under it removes the
temp files a killed run left beside its checkpoints.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator, Optional

import torch

from d2vcli import checkpoint as ckpt
from d2vcli import config as cfgmod
from d2vcli import distributed, locks
from d2vcli.config import Config, ConfigError
from d2vcli.distributed import DistInfo
from d2vcli.metrics_log import require_loggers
from d2vcli.ui import console, print_config_summary


class RunDirError(ConfigError):
    """The run directory cannot be used as asked; the message offers the ways out."""


@dataclass(frozen=True)
class Run:
    name: str
    dir: Path
    resume_from: Optional[Path]

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"


def default_run_name(command: str, preset: Optional[str]) -> str:
    return preset or f"{command}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def lock_path(workspace, name: str) -> Path:
    """runs/.<name>.lock: beside the run directory, so a refused or failed start creates no run."""
    return workspace.runs_dir / f".{name}.lock"


@contextlib.contextmanager
def run_lock(workspace, name: str, info: DistInfo) -> Iterator[None]:
    """Hold run `name` for this process (rank 0 of a torchrun job) until the block ends.

    A second `d2v pretrain/finetune --name NAME` gets a LockError naming the holder. Rank 0 alone
    locks: the other ranks of the job write nothing to the run directory. Under the lock, the
    temp files of an earlier killed run are removed (`remove_leftovers`).
    """
    if not info.is_main:
        yield
        return
    with locks.hold(lock_path(workspace, name), f"run '{name}' ({workspace.run_dir(name)})",
                    "wait for it to finish or pick another --name"):
        removed = remove_leftovers(workspace.run_dir(name))
        if removed:
            console.print(f"removed {len(removed)} temp file(s) left in {workspace.run_dir(name)} by an "
                          f"interrupted run: {', '.join(p.name for p in removed)}", markup=False)
        yield


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete `.<file>.<anything>.tmp` in `run_dir`: what `fileio.atomic_open` and the engine's
    checkpoint links write before their rename. Only safe under the run lock (no writer is alive)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    doomed = [p for p in run_dir.glob(".*.tmp") if p.is_file() and p.name.count(".") >= 3]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def resume_wanted(workspace, name: str, resume: bool, resume_if_exists: bool = False) -> bool:
    """Whether to continue run `name`: `resume` with no checkpoint is an error listing the runs
    there are (a mistyped --name must not quietly start a new run); `resume_if_exists` continues
    when there is a checkpoint and starts fresh when there is none."""
    if not (resume or resume_if_exists):
        return False
    if ckpt.latest(workspace.run_dir(name)) is not None:
        return True
    if resume_if_exists and not resume:
        if distributed.is_main_process():
            console.print(f"--resume-if-exists: no checkpoint in {workspace.run_dir(name)}, starting a new run")
        return False
    runs = ckpt.run_names(workspace)
    listing = (f"Runs in {workspace.runs_dir}: {', '.join(runs)}." if runs else f"{workspace.runs_dir} has no runs.")
    raise RunDirError(
        f"--resume: run '{name}' has no checkpoint to continue ({workspace.run_dir(name)}). {listing} "
        f"Check --name, drop --resume to start a new run, or pass --resume-if-exists to start fresh "
        f"when there is nothing to resume."
    )


def prepare_run(workspace, name: str, cfg: Config, resume: bool, info: DistInfo) -> Run:
    """Create <workdir>/runs/<name> and write config.yaml there before any work starts.

    An existing run with checkpoints is only continued with `resume`; decide `resume` with
    `resume_wanted` (which refuses --resume without a checkpoint) and call this under `run_lock`.
    """
    name = distributed.broadcast_object(name)  # a timestamped default must be the same on every rank
    run_dir = workspace.run_dir(name)
    existing = ckpt.latest(run_dir)
    if resume and existing is None:
        resume_wanted(workspace, name, resume)  # raises: nothing to continue
    if existing is not None and not resume:
        raise RunDirError(
            f"run '{name}' already has checkpoints ({existing.name} in {run_dir}). "
            f"Pass --resume to continue it, or --name NEW_NAME to start a separate run."
        )
    resume_from = existing if resume else None
    require_loggers(cfg.train)  # a missing optional logger (wandb) fails here, before any training
    config_path = run_dir / "config.yaml"
    if resume_from is not None and config_path.exists():  # every rank checks, so every rank fails alike
        _report_config_changes(cfgmod.load_yaml(config_path), cfgmod.to_dict(cfg), info.is_main)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfgmod.save(cfg, config_path)
    distributed.barrier()
    return Run(name=name, dir=run_dir, resume_from=resume_from)


@contextlib.contextmanager
def opened_run(workspace, cfg: Config, info: DistInfo, command: str, name: Optional[str], preset: Optional[str],
               resume: bool, resume_if_exists: bool) -> Iterator[Run]:
    """The run of a training command, held (`run_lock`) while the block runs: its name (the default
    `default_run_name`, the same on every rank), the resume decision, the prepared directory; then
    `train.seed` seeds torch, so every rank builds the same initial weights (and head, and teacher)."""
    name = distributed.broadcast_object(name or default_run_name(command, preset))
    with run_lock(workspace, name, info):
        resume = resume_wanted(workspace, name, resume, resume_if_exists)
        run = prepare_run(workspace, name, cfg, resume, info)
        torch.manual_seed(cfg.train.seed)
        yield run


def print_run_config(cfg: Config, command: str, preset: Optional[str], run: Run) -> None:
    """The start-up table of the settings that differ from the preset (or the defaults), and where
    config.yaml was saved; rank 0 calls it."""
    print_config_summary(cfg, cfgmod.base_config(command, preset), f"{command} config",
                         f"preset {preset}" if preset else "the defaults", run.dir / "config.yaml")


def check_best_split(cfg: Config, example_split: str) -> None:
    """finetune.best_metric must name a valid split, or best.pt would never be written; the message
    suggests `example_split` (the modality's usual validation split) when data.valid_splits is empty."""
    split = cfg.finetune.best_metric.split("/")[0]
    if cfg.finetune.best_metric and split not in cfg.data.valid_splits:
        example = cfg.data.valid_splits[0] if cfg.data.valid_splits else example_split
        raise ConfigError(f"finetune.best_metric {cfg.finetune.best_metric!r} names split {split!r}, which is "
                          f"not in data.valid_splits {list(cfg.data.valid_splits)}; use e.g. "
                          f"--set finetune.best_metric={example}/error")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _report_config_changes(old: dict, new: dict, verbose: bool) -> None:
    a, b = _flatten(old), _flatten(new)
    changed = [k for k in b if a.get(k) != b[k]]
    if not changed:
        return
    arch = [k for k in changed if k.startswith("model.") and k.split(".")[1] in cfgmod.ARCHITECTURE_FIELDS]
    if arch:
        raise RunDirError(
            "--resume with a different architecture than the run was started with: "
            + ", ".join(f"{k} {a.get(k)!r} -> {b[k]!r}" for k in arch)
            + ". Resume with the original settings, or start a new run with --name."
        )
    if verbose:
        console.print("[yellow]resuming with changed settings:[/] "
                      + ", ".join(f"{k} {a.get(k)!r} -> {b[k]!r}" for k in changed))
