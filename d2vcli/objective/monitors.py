"""Collapse monitors: the spread of targets and predictions, and the rule that stops a collapsed run.

A data2vec run can collapse: the teacher's targets (and so the student's predictions) become
the same vector at every position, and the loss falls without anything being learned (the
data2vec paper, arXiv 2202.03555, discusses it; fairseq `examples/data2vec/models/data2vec_audio.py`
logs `compute_var` and stops below `min_target_var` / `min_pred_var`).

    metrics = {"target_std": compute_std(target), "pred_std": compute_std(pred)}
    message = collapse_reason(step, metrics, check_after=1000, min_target_std=0.1, min_pred_std=0.01,
                              fixes=("lower optim.lr ...",))
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from d2vcli import distributed

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


def collapse_reason(step: int, metrics: Mapping[str, float], *, check_after: int, min_target_std: float,
                    min_pred_std: float, fixes: Sequence[str]) -> Optional[str]:
    """The message that stops training when `target_std` / `pred_std` fell below their thresholds, else None.

    Only checked from update `check_after` on (the spread is small at initialization). `fixes` are
    the lines listed under "Usual causes and fixes", which depend on the modality's recipe. The
    metrics must be all-reduced (as `compute_std`'s are) so every rank decides alike.
    """
    if step < check_after:
        return None
    target_std, pred_std = metrics.get("target_std"), metrics.get("pred_std")
    problems = []
    if target_std is not None and target_std < min_target_std:
        problems.append(f"target std {target_std:.4g} < objective.min_target_std {min_target_std}")
    if pred_std is not None and pred_std < min_pred_std:
        problems.append(f"prediction std {pred_std:.4g} < objective.min_pred_std {min_pred_std}")
    if not problems:
        return None
    return (
        "representation collapse: " + "; ".join(problems) + ".\n"
        "The teacher's targets (or the student's predictions) became nearly constant across frames, so the "
        "loss can fall without learning anything. Usual causes and fixes:\n"
        + "".join(f"  - {fix}\n" for fix in fixes)
        + "Resume from the last healthy checkpoint with --resume and the new --set values "
        "(if this one already collapsed, start a new run with --name)."
    )
