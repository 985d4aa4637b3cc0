"""Images: the input pipeline alone (decode + augment, images/s per DataLoader worker), and image
pretraining through the real engine (images/s, peak memory) for vision-tiny and vision-base.

    python benchmarks/bench_image_data.py                     # both parts, on CPU
    python benchmarks/bench_image_data.py --part data --workers 0,1,2 --images 1024
    python benchmarks/bench_image_data.py --part pretrain --configs tiny,base --steps 6

Data: the synthetic image corpus (`d2vcli.synthetic_images`, 32x32 PNGs, generated into a temporary
folder) read by `image_data.ImageBatchLoader`, the loader `d2v pretrain --preset vision-*` uses,
with the recipe's pretraining augmentation (`pretrain_transform`: colour jitter, flip, random
resized crop, normalize) at 32 px (vision-tiny) and 224 px (vision-base, so the crop upsamples
and the resize is the real one). With 0 workers the main process decodes; with N, N worker
processes do; the clock starts when the first batch arrives (worker start-up excluded).
"per worker" divides by max(N, 1). Compare it with the pretraining images/s below:
if the model takes more images per second than the loader gives, the input pipeline starves it.

Pretrain: `engine.train` over an in-memory loader of random images (no decode, so the number is the
model + engine), the preset's objective, masking and EMA teacher, `train.log_every=1`; images/s is
the median of the engine's own `images_per_s` after two warm-up updates, peak memory the case
process's max RSS (each case runs in its own subprocess). vision-base runs at a CPU-sized batch
(8 images per update) of random 224 px images.

On a shared machine pass --threads 1 and read the numbers as one run's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from d2vcli.data import Batch
from engine_bench import RandomBatches, peak_mem_gb, train_rows

# config -> (preset, images per update = per micro-batch)
CASES = {"tiny": ("vision-tiny", 64), "base": ("vision-base", 8)}


# ----------------------------------------------------------------------------- data loading


def bench_data(workers: list[int], images: int, sizes: list[int], batch: int) -> list[dict]:
    from d2vcli.image_data import ImageBatchLoader, pretrain_transform
    from d2vcli.synthetic_images import generate_image_corpus

    out = []
    # DataLoader workers run torch at 1 thread; so does the main process here, or with 0 workers idle
    # OpenMP threads spinning against other processes make the same transforms many times slower.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        info = generate_image_corpus(Path(tmp) / "corpus", size="demo", seed=0)
        print(f"generated the demo image corpus in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        pool = sorted((Path(info.root) / "pool").rglob("*.png"))[:images]
        records = [{"id": str(i), "path": str(p), "label": 0} for i, p in enumerate(pool)]
        for size in sizes:
            for n in workers:
                loader = ImageBatchLoader(records, pretrain_transform(size), batch, seed=0, num_workers=n)
                it = iter(loader)  # one epoch: len(records) // batch batches
                next(it)  # worker start-up is not the steady rate: the clock starts at the first batch
                t = time.perf_counter()
                seen = sum(b.num_samples for b in it)
                s = time.perf_counter() - t
                row = {"size": size, "workers": n, "images": seen, "seconds": s, "images_per_s": seen / s,
                       "per_worker": seen / s / max(n, 1)}
                print(json.dumps(row), file=sys.stderr)
                out.append(row)
    return out


# ----------------------------------------------------------------------------- pretraining


def random_images(batch: int, size: int) -> RandomBatches:
    """Fixed-size random images, endless (in place of image_data.ImageBatchLoader)."""

    def make(g: torch.Generator, index: int) -> Batch:
        source = torch.randn(batch, 3, size, size, generator=g)
        return Batch(source=source, padding_mask=None, ids=[str(i) for i in range(batch)], num_samples=batch,
                     target=torch.zeros(batch, dtype=torch.long), epoch=1, index=index)

    return RandomBatches(make)


def run_case(name: str, steps: int) -> dict:
    from d2vcli import config as C
    from d2vcli import engine
    from d2vcli.distributed import DistInfo
    from d2vcli.models.audio import parameter_count
    from d2vcli.pretrain_vision import VisionPretrainTask

    preset, batch = CASES[name]
    cfg = C.resolve("pretrain", preset=preset, overrides=[
        f"data.images_per_batch={batch}", f"train.images_per_update={batch}", f"train.max_updates={steps}",
        "train.log_every=1", f"train.save_every={10 * steps}", "train.device=cpu", "schedule.warmup_updates=0"])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    task = VisionPretrainTask(cfg, torch.device("cpu"))
    rows, _ = train_rows(cfg, task, random_images(batch, cfg.vision.image_size), info, f"bench {name}",
                         batch=engine.image_batch_unit(cfg))
    rows = [r for r in rows if "images_per_s" in r]  # the update records
    speeds = [r["images_per_s"] for r in rows[2:]] or [rows[-1]["images_per_s"]]
    return {"config": name, "preset": preset, "params_m": parameter_count(task.model) / 1e6,
            "image_size": cfg.vision.image_size, "batch": batch, "images_per_s": statistics.median(speeds),
            "peak_mem_gb": peak_mem_gb("cpu"),
            "threads": torch.get_num_threads()}


def bench_pretrain(configs: list[str], steps: int, threads: int) -> list[dict]:
    out = []
    for name in configs:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, __file__, "--case", name, "--steps", str(steps)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"case {name} failed")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps(row), file=sys.stderr)
        out.append(row)
    return out


# ----------------------------------------------------------------------------- report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("data", "pretrain", "both"), default="both")
    ap.add_argument("--workers", default="0,1,2", help="DataLoader worker counts, comma-separated")
    ap.add_argument("--images", type=int, default=1024, help="pool images read per data case")
    ap.add_argument("--sizes", default="32,224", help="crop sizes of the data cases")
    ap.add_argument("--batch", type=int, default=64, help="images per batch in the data cases")
    ap.add_argument("--configs", default="tiny,base")
    ap.add_argument("--steps", type=int, default=6, help="updates per pretraining case (2 are warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the pretraining cases")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one pretraining case, print its JSON
    args = ap.parse_args()
    if args.case:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(run_case(args.case, args.steps)))
        return
    lines = []
    if args.part in ("data", "both"):
        rows = bench_data([int(w) for w in args.workers.split(",")], args.images,
                          [int(s) for s in args.sizes.split(",")], args.batch)
        base = {r["size"]: r["images_per_s"] for r in rows if r["workers"] == rows[0]["workers"]}
        lines += [f"Data loading (decode + pretraining augmentation, {rows[0]['images']} synthetic 32x32 PNGs, "
                  f"batches of {args.batch}, torch at 1 thread; ratio against {rows[0]['workers']} workers):", "",
                  "| crop | workers | images/s | per worker | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {r['size']} | {r['workers']} | {r['images_per_s']:.0f} | {r['per_worker']:.0f} | "
                  f"{r['images_per_s'] / base[r['size']]:.2f}x |" for r in rows]
        lines.append("")
    if args.part in ("pretrain", "both"):
        rows = bench_pretrain(args.configs.split(","), args.steps, args.threads)
        lines += [f"Pretraining on CPU ({args.threads} thread{'s' * (args.threads > 1)}, random images, "
                  f"median over updates 3-{args.steps}):", "",
                  "| preset | params | image | images/update | images/s | peak RSS |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['preset']} | {r['params_m']:.1f} M | {r['image_size']} px | {r['batch']} | "
                  f"{r['images_per_s']:.1f} | {r['peak_mem_gb']:.2f} GB |" for r in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
