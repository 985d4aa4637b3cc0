"""Run directories: <workdir>/runs/<name>, what a training run writes and `--resume` continues.

    run = prepare_run(workspace, name, cfg, resume, info)   # creates the directory, writes config.yaml
    run.resume_from                                          # the checkpoint to continue, or None

Rules, kept in one place: an existing run with checkpoints is only continued with `--resume`
(`RunDirError` otherwise); `--resume` continues from last.pt, else the newest step-N.pt; it refuses
a different architecture than the run was started with and reports other changed settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from d2vcli import checkpoint as ckpt
from d2vcli import config as cfgmod
from d2vcli import distributed
from d2vcli.config import Config, ConfigError
from d2vcli.distributed import DistInfo
from d2vcli.metrics_log import require_loggers
from d2vcli.ui import console


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


def prepare_run(workspace, name: str, cfg: Config, resume: bool, info: DistInfo) -> Run:
    """Create <workdir>/runs/<name> and write config.yaml there before any work starts.

    An existing run with checkpoints is only continued with `resume`; `resume` without a
    checkpoint starts fresh (so a preemptible job can always be launched with --resume).
    """
    name = distributed.broadcast_object(name)  # a timestamped default must be the same on every rank
    run_dir = workspace.run_dir(name)
    existing = ckpt.latest(run_dir)
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
        if resume and resume_from is None:
            console.print(f"--resume: no checkpoint in {run_dir}, starting a new run")
    distributed.barrier()
    return Run(name=name, dir=run_dir, resume_from=resume_from)


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
