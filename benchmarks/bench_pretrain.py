"""Pretraining throughput through the real engine: audio-seconds/second, peak memory, EMA cost, conv passes.

    python benchmarks/bench_pretrain.py                          # tiny and base on CPU (+ GPU when present)
    python benchmarks/bench_pretrain.py --device cuda --configs base,large --steps 12
    python benchmarks/bench_pretrain.py --configs tiny,tiny2,base,base2   # data2vec 1.0 and 2.0 side by side

`tiny2`/`base2` are data2vec 2.0 (presets speech2-tiny / speech2-base) with the same encoder size
and the same unique audio per update as `tiny`/`base`, so their audio-s/s compare directly (2.0
encodes each utterance's visible frames M times). The forward-time shares split each case's
training time into the conv front end, the student encoder (transformer / context encoder), the
head (1.0's final_proj, 2.0's conv decoder) and the teacher; backward time is not split.

Each (config, device) case runs in its own subprocess, so peak memory is that case's alone.
A case is `engine.train` over an in-memory loader of random "audio" crops (no disk I/O, so the
number is the model + engine; the real data loader runs in worker processes beside it), with
`train.log_every=1`: the throughput is the median over the updates after the first two (warm-up)
of the engine's own audio_s_per_s. On top of that it reports:

- EMA: the time of one `EMATeacher.step` (median of 20, after warm-up) as a fraction of an update;
- conv passes per micro-batch: forward calls of the conv feature encoder counted with a hook (1 means
  the teacher reuses the student's features and adds no conv-encoder pass), and teacher passes;
- MFU on GPU: achieved FLOP/s over the GPU's dense bf16 peak, with the update's FLOPs counted from
  the architecture by `d2vcli.flops` (formula in docs/gpu.md; about 56 GFLOP per audio-second for
  base and 154 for large at 15.6 s crops).
- `--threads 1,2` runs every case once per thread count, one after the other, and prints the speed-up
  of each count over the first (on a shared machine the ratio is only as good as the load is steady).

CPU cases use small batches (a few seconds of audio) so they finish in a few minutes on 2 cores. On a
shared machine pass --threads 1: idle OpenMP threads spinning against other processes can make
2-thread runs several times slower than 1-thread ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from d2vcli.data import Batch
from d2vcli.flops import flops_per_audio_second, peak_flops
from engine_bench import RandomBatches, peak_mem_gb, train_rows, worker_result


# (preset, samples per crop, max_tokens) per device.
CASES = {
    ("tiny", "cpu"): ("speech-tiny", 64_000, 384_000),
    ("base", "cpu"): ("speech-base", 64_000, 64_000),
    ("tiny", "cuda"): ("speech-tiny", 250_000, 3_800_000),
    ("base", "cuda"): ("speech-base", 250_000, 3_800_000),  # 15.6 s crops: LibriSpeech's typical batch
    ("large", "cuda"): ("speech-large", 250_000, 1_200_000),
    ("tiny2", "cpu"): ("speech2-tiny", 64_000, 384_000),
    ("base2", "cpu"): ("speech2-base", 64_000, 64_000),
    ("tiny2", "cuda"): ("speech2-tiny", 250_000, 3_800_000),
    ("base2", "cuda"): ("speech2-base", 250_000, 1_000_000),  # the recipe's 1M samples per GPU
}


class ForwardTimer:
    """Wall time spent inside named modules' forward calls (synchronized on GPU)."""

    def __init__(self, device: str):
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.total: dict[str, float] = {}
        self.start: dict[str, float] = {}

    def attach(self, name: str, module: torch.nn.Module) -> None:
        self.total[name] = 0.0

        def pre(*_):
            self.sync()
            self.start[name] = time.perf_counter()

        def post(*_):
            self.sync()
            self.total[name] += time.perf_counter() - self.start[name]

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def random_audio(batch: int, samples: int, pin: bool) -> RandomBatches:
    """Fixed-size random crops, endless (in place of data.BatchLoader); pinned for a CUDA run."""

    def make(g: torch.Generator, index: int) -> Batch:
        source = torch.randn(batch, samples, generator=g)
        if pin:
            source = source.pin_memory()
        return Batch(source=source, padding_mask=None, ids=[], num_samples=source.numel(), epoch=1, index=index)

    return RandomBatches(make)


def run_case(name: str, device: str, steps: int) -> dict:
    from d2vcli import config as C
    from d2vcli.distributed import DistInfo
    from d2vcli.models.audio import parameter_count
    from d2vcli.pretrain import make_task

    preset, samples, max_tokens = CASES[(name, device)]
    batch = max_tokens // samples
    cfg = C.resolve("pretrain", preset=preset, overrides=[
        f"data.max_tokens={max_tokens}", f"train.batch_seconds={batch * samples / 16000}",
        f"train.max_updates={steps}", "train.log_every=1", f"train.save_every={10 * steps}",
        f"train.device={'cuda' if device == 'cuda' else 'cpu'}",
    ])
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    info = DistInfo(0, 1, 0, dev)
    torch.manual_seed(0)
    task = make_task(cfg, dev)
    v2 = cfg.model.version == 2
    timer = ForwardTimer(device)
    timer.attach("conv", task.model.backbone.feature_extractor)
    timer.attach("encoder", task.model.backbone.encoder if v2 else task.model.backbone.transformer)
    timer.attach("head", task.model.decoder if v2 else task.model.final_proj)
    timer.attach("teacher", task.teacher.module)
    conv_calls, teacher_calls = [0], [0]
    task.model.backbone.feature_extractor.register_forward_hook(lambda *a: conv_calls.__setitem__(0, conv_calls[0] + 1))
    task.teacher.module.register_forward_hook(lambda *a: teacher_calls.__setitem__(0, teacher_calls[0] + 1))
    loader = random_audio(batch, samples, pin=device == "cuda")
    rows, train_s = train_rows(cfg, task, loader, info, f"bench {name}")
    micro = loader.index
    speeds = [r["audio_s_per_s"] for r in rows[2:]] or [rows[-1]["audio_s_per_s"]]
    audio_per_s = statistics.median(speeds)
    update_s = batch * samples / 16000 / audio_per_s

    # EMA step alone (what after_update adds to every update).
    for _ in range(3):
        task.teacher.step(0.999)
    times = []
    for _ in range(20):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        task.teacher.step(0.999)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    ema_s = statistics.median(times)

    out = {
        "config": name, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "params_m": parameter_count(task.model) / 1e6, "batch": f"{batch} x {samples / 16000:.1f} s",
        "audio_s_per_s": audio_per_s, "update_s": update_s, "ema_ms": ema_s * 1e3,
        "ema_fraction": ema_s / update_s, "conv_per_micro": conv_calls[0] / micro,
        "teacher_per_micro": teacher_calls[0] / micro, "threads": torch.get_num_threads(),
        "version": cfg.model.version, "clones": cfg.masking.clone_batch if v2 else 1,
        "share": {k: v / train_s for k, v in timer.total.items()},
    }
    out["peak_mem_gb"] = peak_mem_gb(device)
    peak = peak_flops(out["device"]) if device == "cuda" else None
    if peak:
        out["mfu"] = audio_per_s * flops_per_audio_second(samples, cfg.model, cfg.masking) / peak
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,tiny2,base,base2")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--steps", type=int, default=0, help="updates per case (default: 5 on CPU, 12 on GPU)")
    ap.add_argument("--threads", default="0",
                    help="torch intra-op threads on CPU, or a list (1,2) to compare them (default: torch's)")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    thread_counts = [int(t) for t in str(args.threads).split(",")]
    if args.worker:
        if thread_counts[0]:
            torch.set_num_threads(thread_counts[0])
        name, device = args.worker
        print("RESULT " + json.dumps(run_case(name, device, args.steps or (12 if device == "cuda" else 5))))
        return

    from d2vcli.ui import console, table

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
    results = []
    for device in devices:
        for name in args.configs.split(","):
            if (name, device) not in CASES:
                continue
            for threads in (thread_counts if device == "cpu" else thread_counts[:1]):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, device, "--steps",
                       str(args.steps), "--threads", str(threads)]
                result = worker_result(cmd, f"{name} on {device}", console)
                if result is not None:
                    results.append(result)
    by_name = {(r["config"], r["device"], r.get("threads")): r for r in results}

    def vs_1_0(r: dict) -> str:  # 2.0's unique audio-s/s over 1.0's of the same size, same run and threads
        peer = (by_name.get((r["config"].removesuffix("2"), r["device"], r.get("threads")))
                if r["version"] == 2 else None)
        return f"{r['audio_s_per_s'] / peer['audio_s_per_s']:.2f}x" if peer else "-"

    def shares(r: dict) -> str:
        return " / ".join(f"{100 * r['share'][k]:.0f}" for k in ("conv", "encoder", "head", "teacher"))

    rows = [(r["config"], f"{r['version']}.0 (M={r['clones']})",
             f"{r['device']} ({r['threads']} thr)" if r["device"] == "cpu" else r["device"], f"{r['params_m']:.1f}M",
             r["batch"], f"{r['audio_s_per_s']:.1f}", vs_1_0(r), f"{r['update_s']:.3f}", f"{r['peak_mem_gb']:.2f}",
             f"{r['ema_ms']:.2f} ({100 * r['ema_fraction']:.3g}%)",
             f"{r['conv_per_micro']:.0f} / {r['teacher_per_micro']:.0f}", shares(r),
             f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-") for r in results]
    from rich.console import Console

    wide = Console(width=max(console.width, 190), highlight=False)  # a readable table in logs too
    wide.print(table("d2v pretraining throughput (engine, random audio)",
                     ["config", "data2vec", "device", "params", "micro-batch", "unique audio-s/s", "vs 1.0",
                      "s/update", "peak GB", "EMA ms (% of update)", "conv / teacher passes per micro-batch",
                      "fwd % conv / encoder / head / teacher", "MFU"], rows))
    for r in results:
        first = next(q for q in results if q["config"] == r["config"] and q["device"] == r["device"])
        if r is not first:
            wide.print(f"{r['config']} on {r['device']}: {r['threads']} threads {r['audio_s_per_s'] / first['audio_s_per_s']:.2f}x "
                       f"the speed of {first['threads']}")
    for r in results:  # the raw numbers, on stderr: stdout (docs/benchmarks.md) has them once, in the table
        print(json.dumps(r), file=sys.stderr)


if __name__ == "__main__":
    main()
