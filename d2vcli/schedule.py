"""Optimizer and learning-rate schedules of the engine (pure functions of the update number).

Used by `d2vcli.engine`; `python -m d2vcli.schedule [max_updates]` prints the base recipe's
learning rate at its phase boundaries.

Update u (0-based: the number of updates already done) runs with `lr_at(u, ...)`, as in fairseq,
which sets the rate for the next update after each optimizer step.

- tri_stage (fairseq `tri_stage_lr_scheduler.py`): phases of int(ratio x max_updates) updates.
  warmup: linear from init_lr_scale x lr to lr; hold: lr; decay: **exponential**
  lr x exp(-ln(1 / final_lr_scale) x s / decay_steps) down to final_lr_scale x lr; then constant.
  data2vec base, 400k updates: warmup 12,000 (5e-6 -> 5e-4), hold 360,000, decay 28,000 (-> 5e-6).
- cosine (fairseq `cosine_lr_scheduler.py` with the d2v2 settings): linear warmup from 0, then
  0.5 x lr x (1 + cos(pi x t / (max_updates - warmup))) down to 0.
- polynomial (fairseq `polynomial_decay_schedule.py`, power 1, end lr 0: RoBERTa's GLUE fine-tuning):
  linear warmup to lr (update 0 already runs at lr / warmup, as fairseq's initial warmup factor), then
  linear decay lr x (1 - (t - warmup) / (max_updates - warmup)) down to 0 at max_updates.
- constant: lr.

The optimizer is AdamW with decoupled weight decay on every parameter (fairseq `adam` with
weight_decay: p <- p - wd x lr x p, biases and norms included; fairseq `fairseq/optim/adam.py`). Fine-tuning's
"Adam, no weight decay" is the same optimizer with weight_decay 0. One small, deliberate
difference: torch adds eps to the bias-corrected sqrt(v), fairseq to the uncorrected one, so
fairseq's effective eps is eps x sqrt(1 - beta2^t); with eps 1e-6 this only matters in the first
few hundred updates and only for parameters whose gradients are ~1e-6.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch

from d2vcli.config import OptimConfig, ScheduleConfig, pretrain_base


def tri_stage_phases(max_updates: int, phase_ratio: tuple[float, float, float]) -> tuple[int, int, int]:
    """(warmup, hold, decay) update counts, truncated like fairseq's int(ratio x max_update)."""
    return tuple(int(max_updates * r) for r in phase_ratio)  # type: ignore[return-value]


def tri_stage_lr(step: int, lr: float, max_updates: int, phase_ratio: tuple[float, float, float],
                 init_lr_scale: float, final_lr_scale: float) -> float:
    warmup, hold, decay = tri_stage_phases(max_updates, phase_ratio)
    init_lr, final_lr = init_lr_scale * lr, final_lr_scale * lr
    if step < warmup:
        return init_lr + (lr - init_lr) * step / warmup
    step -= warmup
    if step < hold:
        return lr
    step -= hold
    if step <= decay and decay > 0:
        return lr * math.exp(-math.log(1.0 / final_lr_scale) * step / decay)
    return final_lr


def cosine_lr(step: int, lr: float, max_updates: int, warmup: int) -> float:
    if step < warmup:
        return lr * step / warmup
    span = max(1, max_updates - warmup)
    t = min(step - warmup, span)
    return 0.5 * lr * (1.0 + math.cos(math.pi * t / span))


def polynomial_lr(step: int, lr: float, max_updates: int, warmup: int) -> float:
    if warmup > 0 and step <= warmup:
        return lr * max(step, 1) / warmup
    if step >= max_updates:
        return 0.0
    return lr * (1.0 - (step - warmup) / max(1, max_updates - warmup))


def lr_at(step: int, lr: float, schedule: ScheduleConfig, max_updates: int) -> float:
    """The learning rate of update `step` (0-based) under `schedule`."""
    if schedule.kind == "tri_stage":
        return tri_stage_lr(step, lr, max_updates, schedule.phase_ratio, schedule.init_lr_scale,
                            schedule.final_lr_scale)
    if schedule.kind == "cosine":
        return cosine_lr(step, lr, max_updates, schedule.warmup_updates)
    if schedule.kind == "polynomial":
        return polynomial_lr(step, lr, max_updates, schedule.warmup_updates)
    return lr


# Devices with a fused AdamW kernel (torch >= 2.4 has CUDA and CPU ones). On CPU the fused step of the
# base model takes 0.10 s against foreach's 0.71 s on one thread (docs/gpu.md, "CPU efficiency").
FUSED_ADAMW_DEVICES = ("cuda", "cpu")

# Parameters the BEiT recipe exempts from weight decay besides 1-D ones (`optim_factory.get_parameter_groups`:
# 1-D tensors, names ending in ".bias", and its skip list `pos_embed`, `cls_token`).
NO_DECAY_NAMES = ("cls_token", "pos_embed")


def decay_groups(named_params, weight_decay: float, no_decay_1d: bool = True,
                 lr_scales: Optional[dict[str, float]] = None) -> list[dict]:
    """AdamW groups by (weight decay, lr scale): with `no_decay_1d`, biases, norms, 1-D tensors and
    cls_token get weight_decay 0; `lr_scales` (parameter name -> factor, default 1) gives each group
    an "lr_scale" the engine multiplies the schedule's rate by (layer-wise lr decay)."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        exempt = no_decay_1d and (p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES)
        key = (0.0 if exempt else weight_decay, (lr_scales or {}).get(name, 1.0))
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": scale} for (wd, scale), ps in groups.items()]


def build_optimizer(params, optim: OptimConfig, device: torch.device, named_params=None,
                    lr_scales: Optional[dict[str, float]] = None) -> torch.optim.AdamW:
    """AdamW over `params` (those with requires_grad), with the fused kernel where the device has one.
    With `optim.no_decay_1d` or `lr_scales` the groups come from `named_params` (the model's
    named_parameters()) through `decay_groups`."""
    fused = device.type in FUSED_ADAMW_DEVICES
    if (optim.no_decay_1d or lr_scales) and named_params is not None:
        groups = decay_groups(named_params, optim.weight_decay, optim.no_decay_1d, lr_scales)
    else:
        groups = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=fused, foreach=None if fused else True)


if __name__ == "__main__":
    cfg = pretrain_base()
    total = int(sys.argv[1]) if len(sys.argv) > 1 else cfg.train.max_updates
    w, h, d = tri_stage_phases(total, cfg.schedule.phase_ratio)
    for s in sorted({0, w // 2, w, w + h, w + h + d // 2, total - 1, w + h + d}):
        print(f"update {s:>8}: lr {lr_at(s, cfg.optim.lr, cfg.schedule, total):.3e}")
