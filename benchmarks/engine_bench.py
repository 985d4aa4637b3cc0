"""What the engine-throughput benchmarks share (bench_pretrain.py, bench_image_data.py, bench_text_pretrain.py).

    loader = RandomBatches(lambda g, index: Batch(source=torch.randn(8, 16000, generator=g), ...))
    rows, seconds = train_rows(cfg, task, loader, info, "bench tiny")   # the run's metrics.jsonl records
    result = worker_result(cmd, "tiny on cpu", console)                 # a case run in its own process

A case trains through the real `engine.train` on in-memory random batches (no disk I/O), in a
temporary workspace, so its number is the model plus the engine. Each case runs in its own
subprocess so that its peak memory (`peak_mem_gb`) is its own.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import tempfile
import time
from typing import Callable, Optional

import torch

from d2vcli import engine
from d2vcli.data import Batch
from d2vcli.fileio import read_jsonl
from d2vcli.run_dir import prepare_run
from d2vcli.workspace import Workspace


class RandomBatches:
    """Duck-types the engine's batch sources (data.BatchLoader, ImageBatchLoader, TextBlockLoader): an
    endless epoch of `make(generator, index)` batches from one generator seeded 0."""

    def __init__(self, make: Callable[[torch.Generator, int], Batch]):
        self.make = make
        self.index = 0
        self.position = type("P", (), {"epoch": 1, "consumed": 0})()
        self.bad_files: dict[str, str] = {}  # random data never fails to read

    def local_indices(self, epoch, consumed):
        return [0]

    def batches(self, epoch):
        return [0]

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            self.index += 1
            self.position.consumed = self.index
            yield self.make(g, self.index)

    def state_dict(self):
        return {"epoch": 1, "consumed": self.index}

    def load_state_dict(self, state):
        self.index = state["consumed"]


def train_rows(cfg, task, loader, info, description: str, **train_args) -> tuple[list[dict], float]:
    """Train `task` for cfg.train.max_updates in a temporary run: (the run's metrics records, seconds in
    engine.train). On CUDA the peak-memory counter is reset first, so `peak_mem_gb` is this run's."""
    with tempfile.TemporaryDirectory() as tmp:
        run = prepare_run(Workspace.resolve(tmp), "bench", cfg, False, info)
        os.environ["D2V_PROGRESS"] = "0"
        if info.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = engine.train(cfg, task, loader, run, info, description=description, **train_args)
        seconds = time.perf_counter() - started
        rows = read_jsonl(run.metrics_path)
    assert result.status == "done", result.message
    return rows, seconds


def peak_mem_gb(device: str) -> float:
    """This process's peak memory: max allocated on CUDA, max RSS on CPU (Linux reports KiB)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def worker_result(cmd: list[str], label: str, console) -> Optional[dict]:
    """Run one case's worker process; its result is the JSON after the last `RESULT ` line of its
    stdout. A failed case is reported (the ends of its output) and gives None."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        console.print(f"[red]{label} failed[/]\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return None
    return json.loads(lines[-1][len("RESULT "):])
