"""The data2vec teacher: an exponential moving average of the student's encoder.

data2vec paper (arXiv 2202.03555) §3.3, "Teacher parameterization"; fairseq
`examples/data2vec/models/data2vec_audio.py` (`ema_layers_only`, `get_annealed_rate`).

    teacher = EMATeacher(student_encoder, copied_prefixes=("pos_conv.",))
    layers = teacher.layer_results(features, padding_mask)     # after every optimizer update:
    teacher.step(ema_decay_at(step, cfg.objective))

Modality-neutral: the teacher wraps any `nn.Module` whose forward is
`(x (B, T, D), padding_mask (B, T) | None, return_layer_results=True) -> (x, [layer output (B, T, D)])`.
Which of its parameters are copied from the student instead of averaged is the caller's choice
(`copied_prefixes`), since it names the modality's own submodules.
"""

from __future__ import annotations

import copy
from typing import Optional, Protocol, Sequence

import torch
from torch import Tensor, nn


class EMASchedule(Protocol):
    """The three numbers of the decay schedule (`config.ObjectiveConfig` has them)."""

    ema_decay: float
    ema_end_decay: float
    ema_anneal_end_step: int


def ema_decay_at(step: int, objective: EMASchedule) -> float:
    """Teacher decay for the EMA step after update `step`: linear from ema_decay to ema_end_decay
    over ema_anneal_end_step updates, then constant (fairseq `get_annealed_rate`)."""
    start, end, total = objective.ema_decay, objective.ema_end_decay, objective.ema_anneal_end_step
    if step >= total:
        return end
    return end - (end - start) * (1.0 - step / total)


class EMATeacher:
    """An exponential moving average of a student encoder.

    Built once at setup as a deep copy, so it starts equal to the student. Weights are fp32 (a
    1e-4 update is below fp16 resolution; autocast still runs its matmuls in bf16/fp16), it stays
    in eval mode (no dropout, no LayerDrop) and never receives gradients.

    `step(decay)` does theta_t <- decay * theta_t + (1 - decay) * theta_s for every parameter except
    those whose name starts with one of `copied_prefixes`, which are copied (fairseq
    `ema_layers_only`: its skip keys are copied), in a handful of fused foreach kernels. Buffers are
    always copied. At decay >= 1 the teacher is frozen (fairseq skips the step).
    """

    def __init__(self, student: nn.Module, copied_prefixes: Sequence[str] = ()):
        self.copied_prefixes = tuple(copied_prefixes)
        self.module = copy.deepcopy(student).float().eval().requires_grad_(False)
        self.bind(student)

    def bind(self, student: nn.Module) -> None:
        """Pair each teacher tensor with the student's (the student's Parameters live for the whole run)."""
        student_params = dict(student.named_parameters())
        self._ema_t, self._ema_s, self._copy_t, self._copy_s = [], [], [], []
        for name, p in self.module.named_parameters():
            copied = name.startswith(self.copied_prefixes)
            (self._copy_t if copied else self._ema_t).append(p)
            (self._copy_s if copied else self._ema_s).append(student_params[name])
        student_buffers = dict(student.named_buffers())
        for name, b in self.module.named_buffers():
            self._copy_t.append(b)
            self._copy_s.append(student_buffers[name])

    @torch.no_grad()
    def step(self, decay: float) -> None:
        if decay >= 1.0:
            return
        torch._foreach_lerp_(self._ema_t, [s.detach().float() for s in self._ema_s], 1.0 - decay)
        if self._copy_t:
            torch._foreach_copy_(self._copy_t, [s.detach() for s in self._copy_s])

    def scheduled_step(self, step: int, objective: EMASchedule) -> dict:
        """A pretraining task's `after_update`: one step at `ema_decay_at(step)`, and the decay for the log."""
        decay = ema_decay_at(step, objective)
        self.step(decay)
        return {"ema_decay": decay}

    @torch.no_grad()
    def layer_results(self, features: Tensor, padding_mask: Optional[Tensor]) -> list[Tensor]:
        """features (B, T, D) unmasked student features -> output of every layer, each (B, T, D)."""
        self.module.eval()
        _, layer_results = self.module(features.detach(), padding_mask, return_layer_results=True)
        return layer_results

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
