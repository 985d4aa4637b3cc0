"""Data-parallel training: process-group setup, the DDP wrapper, and the few collectives we use.

One process per device. Launch several with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT:

    torchrun --nproc_per_node 8 -m d2vcli pretrain --preset speech-base     # 8 GPUs, one node
    d2v pretrain --preset speech-base                                        # 1 process, no process group

GPUs use NCCL (device cuda:LOCAL_RANK); CPUs use gloo. Under torchrun the process group is joined
and the model DDP-wrapped even with one process, so `torchrun --nproc_per_node 1` exercises the
same NCCL/DDP path as eight GPUs do (benchmarks/gpu_check.py relies on it). The model itself knows nothing of this
(STYLE principle 10): the engine calls `wrap_model` and the collectives below, which are no-ops
in a single process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str = ""  # "nccl" or "gloo" when a process group was joined (torchrun), else ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Several processes, or one launched by torchrun: the model is DDP-wrapped."""
        return self.world_size > 1 or bool(self.backend)

    def describe(self) -> str:
        n = self.world_size
        if self.device.type == "cuda":
            return f"{n} GPU" + ("s" if n > 1 else "")
        return f"{n} CPU process" + ("es" if n > 1 else "")


def is_main_process() -> bool:
    """Rank 0 (or no launcher at all); readable before the process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """`train.device`: auto -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if preference == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={preference} but CUDA is not available here; use --set train.device=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device_preference: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a 1-process DistInfo."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_preference, local_rank)
    launched = world_size > 1 or ("MASTER_ADDR" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ)
    backend = ""
    if launched:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, find_unused_parameters: bool) -> nn.Module:
    """DDP when there are several processes; the module itself otherwise.

    DDP averages gradients over ranks; the engine rescales them to fairseq's "sum over the
    global batch / total sample size" afterwards. `find_unused_parameters` is needed when a
    rank may skip parameters in a step (LayerDrop, frozen parts).
    """
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (returns `t`)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s value of a picklable object, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
