"""Tokenization throughput: `d2v prepare text`'s path against the sentencepiece CLI (`spm_encode`).

    python benchmarks/bench_tokenize.py                     # 100,000 lines, BPE 8,000 pieces
    python benchmarks/bench_tokenize.py --lines 20000 --workers 1,2

Text: generated lines (a Zipf-distributed vocabulary of 20,000 made-up words, 5 to 40 words per
line, an empty line every 8 lines as a document boundary), written to a temporary file; one BPE
sentencepiece model (8,000 pieces, trained by `Tokenizer.train` on the first 20,000 lines) is
used by every arm, so all of them produce the same ids (checked).

Arms, each timed once over the same lines:
- `spm_encode --output_format=id` (Debian package `sentencepiece`), input file to /dev/null: the
  reference; the ratio column is each arm's sentences/s over its.
- `encode_lines` (the prepare path's tokenizer call, `map_in_batches` over processes) with each
  worker count;
- the sentencepiece Python library's batch encode (`encode(list, num_threads=N)`), a peer;
- the whole `prepare_text --spm` (read, normalize, split, tokenize, block, write) for the end-to-end rate.
If `spm_encode` is not installed its row says so and the ratios use the library's single-thread
encode instead (the output says which).

On a shared machine read the numbers as one run's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from d2vcli.prepare.text import encode_lines, prepare_text  # noqa: E402
from d2vcli.text_data import Tokenizer  # noqa: E402
from d2vcli.workspace import Workspace  # noqa: E402


def make_lines(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 11)))) for _ in range(20000)]
    p = 1.0 / np.arange(1, len(vocab) + 1)
    p /= p.sum()
    return [" ".join(vocab[i] for i in rng.choice(len(vocab), size=int(rng.integers(5, 41)), p=p)) for _ in range(n)]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--workers", default="1,2", help="worker counts of the prepare path")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    lines = make_lines(args.lines)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        text = tmp / "corpus.txt"
        text.write_text("".join(line + ("\n\n" if i % 8 == 7 else "\n") for i, line in enumerate(lines)))
        t_train, tok = timed(lambda: Tokenizer.train(lines[:20000], args.vocab_size))
        model = tmp / "spm.model"
        model.write_bytes(tok.proto)
        reference = tok.encode_batch(lines)
        n_tokens = sum(len(r) for r in reference)
        rows = []  # (arm, seconds)

        exe = shutil.which("spm_encode")
        if exe:
            plain = tmp / "plain.txt"
            plain.write_text("\n".join(lines) + "\n")
            t, res = timed(lambda: subprocess.run([exe, f"--model={model}", "--output_format=id"],
                                                  stdin=open(plain), capture_output=True, text=True, check=True))
            got = [list(map(int, r.split())) for r in res.stdout.splitlines()]
            assert got == reference, "spm_encode gave other ids"
            rows.append(("spm_encode (CLI, 1 thread)", t))
            base = "spm_encode"
        else:
            print("spm_encode not installed (apt-get install sentencepiece): ratios are over the Python "
                  "library's single-thread batch encode", file=sys.stderr)
            base = "sentencepiece encode(list, num_threads=1)"
        sp = spm.SentencePieceProcessor(model_file=str(model))
        for n in sorted({1, *workers}):
            t, got = timed(lambda: sp.encode(lines, num_threads=n))
            assert got == reference
            rows.append((f"sentencepiece encode(list, num_threads={n})", t))
        for w in workers:
            t, got = timed(lambda: encode_lines(model, lines, workers=w))
            assert got == reference
            rows.append((f"d2v encode_lines (workers={w})", t))
        t, summary = timed(lambda: prepare_text(Workspace(tmp / "ws"), [text], spm_path=model, valid_fraction=0.01,
                                                workers=max(workers)))
        rows.append((f"d2v prepare text --spm, end to end (workers={max(workers)})", t))

        ref_s = dict(rows).get("spm_encode (CLI, 1 thread)") or dict(rows)["sentencepiece encode(list, num_threads=1)"]
        print(f"{args.lines:,} lines, {n_tokens:,} tokens (BPE {args.vocab_size} pieces, trained on 20,000 lines in "
              f"{t_train:.1f} s); one run, {os.cpu_count()} CPUs (shared machine); ratio = sentences/s over "
              f"{base}'s\n")
        print("| arm | seconds | sentences/s | tokens/s | ratio |")
        print("|---|---|---|---|---|")
        for arm, s in rows:
            print(f"| {arm} | {s:.2f} | {args.lines / s:,.0f} | {n_tokens / s:,.0f} | {ref_s / s:.2f} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
