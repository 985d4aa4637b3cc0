"""Collapse monitors: statistics that see a data2vec run collapse, and the guard that stops it.

A data2vec run can collapse: the targets stop carrying information about the input, and the
loss falls without anything being learned (data2vec paper, arXiv 2202.03555; fairseq
`examples/data2vec/models/data2vec_audio.py` logs `compute_var` and stops below
`min_target_var` / `min_pred_var`). The target/prediction std alone misses the collapse we
measured on the tiny speech model (issue 11, docs/troubleshooting.md): the shared front end
flattens, the teacher's layer outputs shrink to the instance-norm epsilon, and instance norm
then blows up what is left, the positional conv's edge effects. The targets keep a std of 0.28
but are a function of frame position only. Hence three more monitors, each cheap (one pass
over tensors the step already has) and computed only on log steps:

- `time_varying_share(x)`: energy of the front end's features minus their per-utterance time
  mean, over their total energy. 0 = every frame of an utterance is the same vector.
- `position_explained_share(y)`: the share of the targets' variance explained by frame position
  (R² of the targets against their per-position mean across the batch), corrected for chance.
  1 = the targets say where a frame is, not what it holds.
- `layer_variance_ratio(layers)`: each target layer's variance over time (what instance norm
  divides by) over the instance-norm eps. Near 1 = instance norm amplifies numerical residue.

    guards = [Guard("target_std", "objective.min_target_std", 0.1, below=True, meaning=..., fixes=...)]
    message = collapse_reason(step, metrics, check_after=1000, guards=guards)

All statistics are averaged over ranks, so every rank takes the same stop decision.
Modality-neutral: inputs are (B, T, C) with T the positions, whatever a position stands for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from d2vcli import distributed
from d2vcli.objective.targets import INSTANCE_NORM_EPS

STD_EPS = 1e-6  # fairseq compute_var: sqrt(var + 1e-6)


@torch.no_grad()
def compute_std(y: Tensor) -> Tensor:
    """Mean over channels of the per-channel std over all frames of all ranks (fairseq compute_var).

    y (..., D). Per channel: unbiased variance from all-reduced count, sum and sum of squares;
    then sqrt(var + 1e-6) and the mean over channels. 0-dim fp32 tensor.
    """
    y = y.reshape(-1, y.shape[-1]).float()
    stats = torch.cat([
        torch.tensor([float(y.shape[0])], dtype=torch.float64, device=y.device),
        y.sum(0, dtype=torch.float64),
        (y * y).sum(0, dtype=torch.float64),
    ])
    distributed.all_reduce_sum(stats)
    n, s, ss = stats[0], stats[1:1 + y.shape[1]], stats[1 + y.shape[1]:]
    var = (ss - s * s / n) / (n - 1).clamp(min=1)
    return torch.sqrt(var.clamp(min=0) + STD_EPS).mean().float()


def _valid(x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
    """(B, T, 1) float weights: 1 at real positions, 0 at padding."""
    if padding_mask is None:
        return torch.ones(x.shape[0], x.shape[1], 1, dtype=torch.float32, device=x.device)
    return (~padding_mask).unsqueeze(-1).float()


def _rank_mean(value: Tensor) -> Tensor:
    """The mean of a 0-dim statistic over ranks (each rank weighs the same)."""
    stats = torch.stack([value.double(), torch.ones((), dtype=torch.float64, device=value.device)])
    distributed.all_reduce_sum(stats)
    return (stats[0] / stats[1]).float()


@torch.no_grad()
def time_varying_share(x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
    """x (B, T, C) -> 0-dim: sum ||x - mean_t x||² / sum ||x||², per utterance, over real positions.

    The speech-tiny conv encoder at initialization: 0.43; collapsed (issue 11): 0.006.
    """
    x = x.float()
    w = _valid(x, padding_mask)
    mean = (x * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)  # (B, 1, C)
    varying = (((x - mean) ** 2) * w).sum()
    total = ((x ** 2) * w).sum()
    stats = torch.stack([varying.double(), total.double()])
    distributed.all_reduce_sum(stats)
    return (stats[0] / stats[1].clamp(min=1e-30)).float()


@torch.no_grad()
def position_explained_share(y: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
    """y (B, T, D) targets -> 0-dim: the R² of y against its per-position mean over the batch, chance removed.

    R² = sum_t n_t ||mean_b y[:, t] - m||² / sum ||y - m||² (m: the per-channel mean of all real
    frames, n_t: the rows real at position t). Rows that share nothing but their position still
    give R² = P / N by chance (P positions, N frames: 1/B for equal lengths), so the share is
    reported as (R² - P/N) / (1 - P/N): about 0 for healthy targets, 1 when position alone
    determines them. A batch of one row cannot tell, and gives 0. Speech-tiny collapsed at update
    60 (issue 11): 0.84.
    """
    y = y.float()
    w = _valid(y, padding_mask)  # (B, T, 1)
    n_t = w.sum(0)  # (T, 1)
    frames = w.sum()
    m = (y * w).sum((0, 1)) / frames.clamp(min=1)  # (D,)
    centred = (y - m) * w
    total = (centred ** 2).sum()
    per_position = centred.sum(0) / n_t.clamp(min=1)  # (T, D)
    explained = (n_t * per_position ** 2).sum()
    positions = (n_t > 0).sum()
    chance = positions / frames.clamp(min=1)
    if bool(chance >= 1) or bool(total <= 0):
        return _rank_mean(torch.zeros((), device=y.device))
    r2 = explained / total
    return _rank_mean((r2 - chance) / (1 - chance))


@torch.no_grad()
def layer_variance_ratio(layers: Sequence[Tensor], padding_mask: Optional[Tensor] = None,
                         eps: float = INSTANCE_NORM_EPS) -> list[Tensor]:
    """[(B, T, D)] -> per layer, 0-dim: mean over utterances and channels of the variance over time, / eps.

    This is the variance instance norm divides by (biased, over real positions). At a ratio r the
    normalized target keeps a share r / (r + 1) of its variance from the layer's signal; at r ~ 1
    half of it is numerical residue blown up to unit scale. Speech-tiny at initialization: about
    1e3 (tiny width, BERT init); collapsed: about 1 (issue 11 and docs/troubleshooting.md).
    """
    ratios = []
    for y in layers:
        y = y.float()
        w = _valid(y, padding_mask)
        n = w.sum(1, keepdim=True).clamp(min=1)  # (B, 1, 1)
        mean = (y * w).sum(1, keepdim=True) / n
        var = ((((y - mean) ** 2) * w).sum(1, keepdim=True) / n).mean()  # over utterances and channels
        ratios.append(_rank_mean(var / eps))
    return ratios


@dataclass(frozen=True)
class Guard:
    """One stop rule: `metric` below (or above) `threshold`, with what it means and what to change.

    `setting` names the config field that holds the threshold, so the message says how to turn
    the rule off or move it. A metric missing from an update's metrics (the monitors computed only
    on log steps) is not checked on that update.
    """

    metric: str
    setting: str
    threshold: float
    below: bool
    meaning: str
    fixes: Sequence[str] = field(default_factory=tuple)

    def tripped(self, metrics: Mapping[str, float]) -> bool:
        value = metrics.get(self.metric)
        if value is None:
            return False
        return value < self.threshold if self.below else value > self.threshold


def spread_guards(min_target_std: float, min_pred_std: float, positions: str, fixes: Sequence[str]) -> list[Guard]:
    """fairseq's compute_var stop rules, which every modality has: the targets' or the predictions'
    spread across `positions` (frames, patches, tokens) fell below the threshold."""
    return [
        Guard("target_std", "objective.min_target_std", min_target_std, below=True,
              meaning=f"the teacher's targets are nearly constant across {positions}.", fixes=fixes),
        Guard("pred_std", "objective.min_pred_std", min_pred_std, below=True,
              meaning=f"the student's predictions are nearly constant across {positions}.", fixes=fixes),
    ]


def collapse_reason(step: int, metrics: Mapping[str, float], *, check_after: int,
                    guards: Sequence[Guard]) -> Optional[str]:
    """The message that stops training when a guard trips (from update `check_after` on), else None.

    The message names each tripped monitor, its value and threshold, what it means and what to
    change. The metrics must be averaged over ranks (as this module's are) so every rank decides alike.
    """
    if step < check_after:
        return None
    tripped = [g for g in guards if g.tripped(metrics)]
    if not tripped:
        return None
    lines = ["representation collapse:"]
    fixes: list[str] = []
    for g in tripped:
        sign = "<" if g.below else ">"
        lines.append(f"  {g.metric} = {metrics[g.metric]:.4g} {sign} {g.setting} {g.threshold:g}: {g.meaning}")
        fixes += [fix for fix in g.fixes if fix not in fixes]
    lines.append("The loss can fall without the model learning anything. What to change:")
    lines += [f"  - {fix}" for fix in fixes]
    lines.append("Resume from the last healthy checkpoint with --resume and the new --set values "
                 "(if this one already collapsed, start a new run with --name); a threshold set to its "
                 "no-op value (0 for a minimum, 1 for a maximum) disables that monitor's guard.")
    return "\n".join(lines)
