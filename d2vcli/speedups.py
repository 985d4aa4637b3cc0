"""The engine's optional speed and memory settings: torch.compile with a fallback, activation checkpointing.

Used by `d2vcli.engine` when it sets up a run (docs/gpu.md explains when each pays):

    model = compile_model(task.model, cfg.train.compile, device)     # the callable the step runs
    set_activation_checkpointing(task.model, cfg.train.activation_checkpointing)

Neither changes the parameters, their names or the checkpoint: the compiled callable shares the
module's parameters, and the engine keeps saving `task.model`'s state dict.

- `train.compile`: auto = on CUDA, off on CPU (on CPU the inductor build of every new shape costs
  more than the step it speeds up; measured in benchmarks/gpu_check.py). The first call compiles;
  when that raises (a missing compiler, an unsupported op, a backend bug), the run goes on in eager
  mode after one warning line naming the error. Shapes that repeat reuse the graph; pair compile
  with `data.length_buckets` so a pretraining run sees a few batch shapes instead of hundreds.
- `train.activation_checkpointing`: any submodule with a `checkpointing` attribute (the transformer's
  `LayerStack`) recomputes its layers in the backward pass.
- `train.fused_alibi`: every attention with a `fused_bias` attribute (`models.encoder.SelfAttention`)
  gives data2vec 2.0's ALiBi bias to SDPA in bf16/fp16, so a fused kernel runs, instead of forming the
  logits in fp32 as fairseq does; the bias is rounded to that dtype. Set on the student and the teacher.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from d2vcli.ui import console


def compile_wanted(setting: str, device: torch.device) -> bool:
    """`train.compile` on `device`: auto = CUDA only."""
    if setting == "auto":
        return device.type == "cuda"
    return setting == "on"


class CompiledWithFallback(nn.Module):
    """Calls `torch.compile(module)`; if compiling or running the compiled graph fails, warns once
    and calls `module` itself from then on.

    The module is held as a submodule (so DDP, `.train()`/`.eval()` and `parameters()` see exactly the
    module's parameters); the compiled wrapper is kept outside the module tree so nothing is counted twice.
    """

    def __init__(self, module: nn.Module, **compile_kwargs: Any):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_compiled", torch.compile(module, **compile_kwargs))
        self.failed: str = ""

    def forward(self, *args, **kwargs):
        if self.failed:
            return self.module(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except (torch.cuda.OutOfMemoryError, KeyboardInterrupt):
            raise  # not a compiler problem: eager would run out of memory too
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eager
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.failed = f"{type(e).__name__}: {first}"
            console.print(f"warning: torch.compile failed ({self.failed}); training continues without it "
                          f"(set train.compile=off to skip the attempt)", markup=False, highlight=False)
            return self.module(*args, **kwargs)


def compile_model(module: nn.Module, setting: str, device: torch.device) -> nn.Module:
    """The callable a training step should run: `module` itself, or its compiled form with a fallback."""
    if not compile_wanted(setting, device):
        return module
    return CompiledWithFallback(module)


def _set_everywhere(module: nn.Module, attribute: str, value: bool) -> int:
    """Set `attribute` on every submodule that has one; returns how many there were."""
    found = [m for m in module.modules() if hasattr(m, attribute)]
    for m in found:
        setattr(m, attribute, value)
    return len(found)


def set_activation_checkpointing(module: nn.Module, enabled: bool) -> int:
    """Turn checkpointing on or off in every submodule that supports it; returns how many there were."""
    return _set_everywhere(module, "checkpointing", enabled)


def set_fused_alibi(module: nn.Module, enabled: bool) -> int:
    """Turn the fused ALiBi attention on or off in every attention module; returns how many there were."""
    return _set_everywhere(module, "fused_bias", enabled)
