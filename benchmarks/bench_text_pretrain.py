"""Text pretraining throughput through the real engine: tokens/second and peak memory, text-tiny and text-base.

    python benchmarks/bench_text_pretrain.py --threads 1                  # tiny and base on CPU
    python benchmarks/bench_text_pretrain.py --configs base --device cuda --steps 12

A case is `engine.train` with the preset's `TextPretrainTask` (student, EMA teacher on the unmasked
text, span masking, targets, loss, EMA step) over an in-memory loader of random token blocks (full
blocks, no padding, no disk I/O: the number is the model + engine), with `train.log_every=1`. The
throughput is the median over the updates after the first two of the engine's own tokens_per_s. Each
case runs in its own subprocess, so its peak memory (max RSS on CPU, max allocated on CUDA) is its
own. CPU micro-batches are small (text-tiny 16 x 128 tokens, text-base 4 x 512) so a case takes
about a minute on 2 cores; the GPU case uses the recipe's 16 x 512 per GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from d2vcli.data import Batch
from engine_bench import RandomBatches, peak_mem_gb, train_rows, worker_result

# (preset, block length, blocks per micro-batch, vocabulary) per device.
CASES = {
    ("tiny", "cpu"): ("text-tiny", 128, 16, 384),
    ("base", "cpu"): ("text-base", 512, 4, 50265),
    ("tiny", "cuda"): ("text-tiny", 128, 64, 384),
    ("base", "cuda"): ("text-base", 512, 16, 50265),
}


def random_blocks(blocks: int, length: int, vocab: int) -> RandomBatches:
    """Fixed-size random `<s> ... </s>` blocks, endless (in place of text_data.TextBlockLoader)."""

    def make(g: torch.Generator, index: int) -> Batch:
        source = torch.randint(5, vocab - 1, (blocks, length), generator=g)
        source[:, 0], source[:, -1] = 0, 2
        return Batch(source=source, padding_mask=None, ids=[], num_samples=source.numel(), epoch=1, index=index)

    return RandomBatches(make)


def run_case(name: str, device: str, steps: int) -> dict:
    from d2vcli import config as C
    from d2vcli import engine
    from d2vcli.distributed import DistInfo
    from d2vcli.models.audio import parameter_count
    from d2vcli.pretrain_text import TextPretrainTask, text_arch

    preset, length, blocks, vocab = CASES[(name, device)]
    tokens = length * blocks
    cfg = C.resolve("pretrain", preset=preset, overrides=[
        f"data.tokens_per_sample={length}", f"data.text_tokens_per_batch={tokens}",
        f"train.tokens_per_update={tokens}", f"train.max_updates={steps}", "train.log_every=1",
        f"train.save_every={10 * steps}", f"train.device={'cuda' if device == 'cuda' else 'cpu'}",
        "objective.collapse_check_after=1000000",  # random tokens: nothing to learn, no guard to trip
    ])
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    info = DistInfo(0, 1, 0, dev)
    torch.manual_seed(0)
    task = TextPretrainTask(cfg, dev, text_arch(cfg, vocab, vocab - 1))
    rows, _ = train_rows(cfg, task, random_blocks(blocks, length, vocab), info, f"bench text {name}",
                         batch=engine.text_batch_unit(cfg))
    speeds = [r["tokens_per_s"] for r in rows[2:] if "tokens_per_s" in r] or [rows[-1]["tokens_per_s"]]
    out = {"config": name, "preset": preset, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
           "params_m": parameter_count(task.model) / 1e6, "micro_batch": f"{blocks} x {length}",
           "tokens_per_s": statistics.median(speeds), "threads": torch.get_num_threads()}
    out["update_s"] = tokens / out["tokens_per_s"]
    out["peak_mem_gb"] = peak_mem_gb(device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,base")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--steps", type=int, default=0, help="updates per case (default: 6 on CPU, 12 on GPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.threads:
            torch.set_num_threads(args.threads)
        name, device = args.worker
        print("RESULT " + json.dumps(run_case(name, device, args.steps or (12 if device == "cuda" else 6))))
        return

    from rich.console import Console

    from d2vcli.ui import table

    console = Console(width=150, highlight=False)  # a readable table in logs and docs too

    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
    results = []
    for device in devices:
        for name in args.configs.split(","):
            if (name, device) not in CASES:
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, device, "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            result = worker_result(cmd, f"{name} on {device}", console)
            if result is not None:
                results.append(result)
    rows = [(r["preset"], f"{r['device']} ({r['threads']} thr)" if r["device"] == "cpu" else r["device"],
             f"{r['params_m']:.1f}M", r["micro_batch"], f"{r['tokens_per_s']:,.0f}", f"{r['update_s']:.3f}",
             f"{r['peak_mem_gb']:.2f}") for r in results]
    console.print(table("d2v text pretraining throughput (engine, random token blocks)",
                        ["preset", "device", "params", "micro-batch (blocks x tokens)", "tokens/s", "s/update",
                         "peak GB"], rows))
    for r in results:
        print(json.dumps(r), file=sys.stderr)


if __name__ == "__main__":
    main()
