"""data2vec's regression targets and loss: what the student predicts and how it is scored.

data2vec paper (arXiv 2202.03555) §3.3 "Targets" and §3.4 "Objective"; fairseq
`examples/data2vec/models/data2vec_audio.py` (`forward`: `average_top_k_layers`,
`layer_norm_target_layer`, `instance_norm_target_layer`, `loss_beta`, `loss_scale`).

    y = build_targets(teacher_layers, k=8)[time_mask]     # (N_masked, D) fp32
    loss = regression_loss(pred, y)                       # summed over the masked positions

Modality-neutral: inputs are (B, T, D) layer outputs whatever a position stands for.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


# F.instance_norm's eps (fairseq's instance_norm_target_layer uses the default). A teacher layer whose
# variance over time nears this is amplified to unit variance whatever it holds (objective.monitors).
INSTANCE_NORM_EPS = 1e-5


def _instance_norm(x: Tensor) -> Tensor:  # (B, T, D): per sample and channel, over positions
    return F.instance_norm(x.transpose(1, 2), eps=INSTANCE_NORM_EPS).transpose(1, 2)


def build_targets(layer_results: Sequence[Tensor], k: int, layer_norm: str = "instance",
                  final_norm: str = "none") -> Tensor:
    """Average of the top-k teacher layers, each normalized in fp32 -> (B, T, D) fp32.

    layer_norm: "instance" (over time per utterance and channel, F.instance_norm: biased variance,
    eps 1e-5), "layer" (over channels per frame), "batch" (per channel over batch and time), "none".
    final_norm: "instance", "layer" or "none", applied to the average.
    """
    top = [y.float() for y in layer_results[-k:]]  # k x (B, T, D)
    if layer_norm == "instance":
        top = [_instance_norm(y) for y in top]
    elif layer_norm == "layer":
        top = [F.layer_norm(y, y.shape[-1:]) for y in top]
    elif layer_norm == "batch":
        top = [F.batch_norm(y.transpose(1, 2), None, None, training=True).transpose(1, 2) for y in top]
    elif layer_norm != "none":
        raise ValueError(f"unknown layer_target_norm {layer_norm!r}")
    y = torch.stack(top).mean(0)  # (B, T, D)
    if final_norm == "instance":
        y = _instance_norm(y)
    elif final_norm == "layer":
        y = F.layer_norm(y, y.shape[-1:])
    elif final_norm != "none":
        raise ValueError(f"unknown final_target_norm {final_norm!r}")
    return y


def regression_loss(pred: Tensor, target: Tensor, loss_beta: float = 0.0, loss_scale: Optional[float] = None) -> Tensor:
    """pred, target (N, D) at the masked frames -> scalar loss, summed over frames (fp32).

    Per frame: sum over channels of the squared error (loss_beta 0) or smooth L1 with that beta;
    times loss_scale, or 1/sqrt(D) when it is None.
    """
    pred, target = pred.float(), target.float()
    if loss_beta == 0:
        per_frame = F.mse_loss(pred, target, reduction="none").sum(-1)  # (N,)
    else:
        per_frame = F.smooth_l1_loss(pred, target, reduction="none", beta=loss_beta).sum(-1)
    scale = loss_scale if loss_scale is not None else 1.0 / math.sqrt(pred.shape[-1])
    return per_frame.sum() * scale


def cls_loss(cls_pred: Tensor, targets: Tensor, clones: int, weight: float, sample_size: int,
             loss_scale: Optional[float] = None) -> Tensor:
    """data2vec 2.0 images' CLS term: cls_pred (A*M, D) regresses each image's mean target -> scalar (fp32).

    targets (A, P, D) are the final (normalized) targets of every patch; their mean over P, repeated
    for the M clones, is the CLS target. fairseq (`data2vec2.py`, cls_loss) sums the scaled squared
    error over rows and channels and multiplies it by `weight` x the micro-batch's masked-patch count,
    so after the engine divides by that count it is `weight` x a SUM over the clone rows.
    """
    target = targets.float().mean(1).repeat_interleave(clones, 0)  # (A*M, D)
    return regression_loss(cls_pred, target, 0.0, loss_scale) * (weight * sample_size)
