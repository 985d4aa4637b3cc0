"""Header-scan and prepare throughput: files per second, process pool vs thread pool vs one process.

    python benchmarks/bench_prepare.py [--files 4000] [--workers 2] [--synthetic]

Generates N short FLAC files (with .txt transcripts) in a temporary directory, then
times, on the same files and after one untimed warm-up pass (so the page cache is
equally warm for every contender):

* `scan_headers` serially, with a process pool and with a thread pool;
* a full `prepare_folder` (walk, fingerprint, scan, validate, write) and its re-run,
  which must find the split up to date.

`--synthetic` also times generating the demo synthetic corpus. The target is at
least 1,000 files/s for the scan on 2 cores. Prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from d2vcli.prepare.folder import prepare_folder  # noqa: E402
from d2vcli.prepare.pipeline import scan_headers  # noqa: E402
from d2vcli.synthetic import generate_corpus  # noqa: E402
from d2vcli.workspace import Workspace  # noqa: E402


def make_files(root: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    wav = (0.1 * rng.standard_normal(6400)).astype(np.float32)  # 0.4 s: 19 frames for the 8 CTC targets below
    paths = []
    for k in range(n):
        d = root / f"spk{k % 40:02d}"
        d.mkdir(exist_ok=True)
        p = d / f"utt{k:06d}.flac"
        sf.write(str(p), wav, 16_000, format="FLAC", subtype="PCM_16", compression_level=0.0)
        p.with_suffix(".txt").write_text("A LINE\n")
        paths.append(p)
    return paths


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--synthetic", action="store_true", help="also time `generate_corpus(size='demo')`")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "audio"
        root.mkdir()
        t = timed(lambda: make_files(root, args.files))
        print(f"generated {args.files} files in {t:.1f} s")
        paths = sorted(root.rglob("*.flac"))
        scan_headers(paths, workers=1)  # warm the page cache for everyone

        n = len(paths)
        serial = timed(lambda: scan_headers(paths, workers=1))
        proc = timed(lambda: scan_headers(paths, workers=args.workers, pool="process"))
        thread = timed(lambda: scan_headers(paths, workers=args.workers, pool="thread"))
        print(f"header scan, {n} files:")
        print(f"  one process        {n / serial:9.0f} files/s")
        print(f"  process pool x{args.workers}    {n / proc:9.0f} files/s   ({serial / proc:.2f}x one process)")
        print(f"  thread pool x{args.workers}     {n / thread:9.0f} files/s   ({serial / thread:.2f}x one process)")
        print(f"  process / thread   {thread / proc:9.2f}x")

        ws = Workspace.resolve(Path(tmp) / "ws")
        full = timed(lambda: prepare_folder(ws, root, split="bench", workers=args.workers))
        rerun = timed(lambda: prepare_folder(ws, root, split="bench", workers=args.workers))
        status = prepare_folder(ws, root, split="bench", workers=args.workers).splits[0].status
        print(f"prepare folder (walk + scan + validate + write): {n / full:9.0f} files/s ({full:.2f} s)")
        print(f"re-run ({status}):                          {n / rerun:9.0f} files/s ({rerun:.2f} s)")

        if args.synthetic:
            t = timed(lambda: generate_corpus(Path(tmp) / "synthetic", size="demo"))
            print(f"synthetic demo corpus generated in {t:.1f} s (one process)")


if __name__ == "__main__":
    main()
