"""The GPU readiness check: every GPU-only path of d2v, run once, in under 8 minutes, into one report.

    python benchmarks/gpu_check.py                       # on a GPU machine: docs/gpu-report-<gpu>.{md,json}
    python benchmarks/gpu_check.py --cpu --out /tmp/r    # dry run with tiny sizes (tests/test_gpu_check.py)
    python benchmarks/gpu_check.py --only precision,sdpa --budget 200

Checks, in order (their code is benchmarks/gpu_checks.py; docs/gpu.md has what each compares, its
tolerance and the report format):

  env          torch, CUDA, GPU, its bf16 peak; which presets exist (speech2-base: data2vec 2.0)
  hf_encoder   encoder forward vs Hugging Face Data2VecAudioModel, same weights, same process:
               fp32 max |diff| <= 1e-4 (TF32 off), bf16 speed ratio
  sdpa         the encoder forward with SDPA forced to math, flash, memory-efficient and cuDNN in turn:
               which ran, outputs against math; which kernel the default picks, with and without padding
  precision    one training step on the same batch in fp32, bf16 autocast and fp16 autocast + GradScaler:
               loss within 2e-2 (bf16) / 5e-3 (fp16) relative, gradient norm within 5e-2 / 2e-2
  checkpointing  the same step with and without activation checkpointing: gradients equal (fp32)
  fused_adamw  the engine builds fused AdamW on CUDA; 3 fused steps equal 3 foreach steps; time per step
  torchrun     `torchrun --nproc_per_node 1 -m d2vcli pretrain` on generated audio: NCCL process group,
               DDP, one update, one checkpoint, then --resume for a second update
  throughput   `d2v pretrain`'s engine on generated audio at the recipe's per-GPU batch, bf16: audio-s/s,
               peak memory, MFU (d2vcli.flops), for 1.0 base and large (and 2.0 base when the preset
               exists), eager vs torch.compile, with/without activation checkpointing, and 2.0 with
               train.fused_alibi (the ALiBi bias in bf16 to a fused SDPA kernel) against fp32 logits
  throughput vision / text   the same for images and text (benchmarks/gpu_checks_images_text.py):
               vision-base (1.0) and vision2-base (images/s), text-base (tokens/s), eager, bf16, on
               generated JPEGs / token shards; last, so a short budget skips them first

Exit status: 0 when every check passed or was skipped, 1 naming the failed checks otherwise (a
check that runs past its time budget is stopped by a watchdog and fails). Each check has a budget;
a check that no longer fits the whole run's budget is skipped, so the run never exceeds it.
With --cpu the sizes are tiny and checks that need CUDA (fp16, flash/efficient kernels, NCCL,
compile, peak GPU memory) are reported as skipped-on-CPU, but everything around them runs: the
tolerances, the report writing, the torchrun path (with gloo).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_checks_images_text  # noqa: E402
from gpu_checks import (ROOT, TOL, CheckFailed, Skip, check_checkpointing, check_env,  # noqa: E402
                        check_fused_adamw, check_hf_encoder, check_precision, check_sdpa, check_throughput,
                        check_torchrun)

FORMAT_VERSION = 2  # 2: adds throughput_images_text
DEFAULT_BUDGET_S = 450.0  # the whole run; 8 minutes minus a margin for start-up and the report


# ----------------------------------------------------------------------------- the run's bookkeeping


class Run:
    """The checks' results, the budget, the watchdog and the report files."""

    def __init__(self, args, device: torch.device):
        self.args, self.device, self.cpu = args, device, device.type == "cpu"
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.results: list[dict] = []
        self.throughput: list[dict] = []  # speech rows (audio-s/s)
        self.throughput_images_text: list[dict] = []  # image and text rows (images/s, tokens/s)
        self.meta: dict = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="d2v-gpu-check-"))
        self.log = io.StringIO()
        self._lock = threading.Lock()
        self._current = ""

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run_check(self, name: str, budget: float, fn) -> None:
        """Run one check under its budget; a watchdog ends the process if it overruns (a hung kernel or compile)."""
        if self.args.only and name not in self.args.only:
            return
        t0 = time.monotonic()
        if self.left() < min(budget, 0.5 * budget + 5):
            self._record(name, "skipped", 0.0, f"not enough of the {self.args.budget:.0f} s budget left "
                         f"({self.left():.0f} s for a {budget:.0f} s check)", {})
            return
        allowed = min(budget, self.left())
        self._current = name
        timer = threading.Timer(allowed, self._overrun, args=(name, allowed))
        timer.daemon = True
        timer.start()
        status, summary, details = "pass", "", {}
        try:
            summary, details = fn(allowed)
        except Skip as e:
            status, summary = "skipped", str(e)
        except CheckFailed as e:
            status, summary = "fail", str(e)
        except Exception as e:  # noqa: BLE001 - a crash in a check is that check's failure
            status, summary = "fail", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            details = {"traceback": traceback.format_exc()[-4000:]}
        finally:
            timer.cancel()
            self._current = ""
        self._record(name, status, time.monotonic() - t0, summary, details)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _record(self, name, status, seconds, summary, details):
        with self._lock:
            self.results.append({"name": name, "status": status, "seconds": round(seconds, 2), "summary": summary,
                                 "details": details})
        print(f"[{status:>7}] {name} ({seconds:.1f} s): {summary}", file=sys.__stderr__, flush=True)

    def _overrun(self, name: str, allowed: float) -> None:
        self._record(name, "fail", allowed, f"timed out after {allowed:.0f} s (its budget); stopped by the watchdog",
                     {})
        self.write()
        print(f"gpu_check: FAILED: {name} timed out", file=sys.__stderr__, flush=True)
        os._exit(1)

    # -- report

    def failed(self) -> list[str]:
        return [r["name"] for r in self.results if r["status"] == "fail"]

    def write(self) -> None:
        with self._lock:
            doc = {"format": FORMAT_VERSION, **self.meta, "mode": "cpu dry run" if self.cpu else "gpu",
                   "budget_s": self.args.budget, "elapsed_s": round(time.monotonic() - self.start, 1),
                   "tolerances": TOL, "checks": self.results, "throughput": self.throughput,
                   "throughput_images_text": self.throughput_images_text, "failed": self.failed()}
            self.args.json.parent.mkdir(parents=True, exist_ok=True)
            self.args.json.write_text(json.dumps(doc, indent=1, default=str) + "\n")
            self.args.md.write_text(render_markdown(doc))


def render_markdown(doc: dict) -> str:
    lines = [f"# GPU check: {doc.get('gpu', '?')}", "",
             f"{doc['mode']}, {doc.get('date', '')}; torch {doc.get('torch', '?')}, CUDA {doc.get('cuda', '-')}, "
             f"d2v commit {doc.get('commit', '?')}; {doc['elapsed_s']} s of a {doc['budget_s']:.0f} s budget. "
             f"Written by `benchmarks/gpu_check.py`; format in docs/gpu.md.", "",
             "**Result: " + ("FAILED: " + ", ".join(doc["failed"]) if doc["failed"] else "all checks passed or skipped")
             + "**", "", "| check | status | s | summary |", "|---|---|---|---|"]
    for r in doc["checks"]:
        lines.append(f"| {r['name']} | {r['status']} | {r['seconds']} | {r['summary'].replace('|', '/')} |")
    if doc["throughput"]:
        lines += ["", "## Pretraining throughput (engine, generated audio, bf16 on GPU)", "",
                  "| model | variant | micro-batch | audio-s/s | s/update | peak GB | GFLOP/audio-s | MFU | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in doc["throughput"]:
            mfu = f"{100 * t['mfu']:.1f}%" if t.get("mfu") is not None else "-"
            peak = f"{t['peak_gb']:.1f}" if t.get("peak_gb") is not None else "-"
            sps = f"{t['audio_s_per_s']:.1f}" if t.get("audio_s_per_s") else "-"
            upd = f"{t['update_s']:.3f}" if t.get("update_s") else "-"
            lines.append(f"| {t['model']} | {t['variant']} | {t.get('batch', '-')} | {sps} | {upd} | {peak} | "
                         f"{t.get('gflop_per_audio_s', 0):.1f} | {mfu} | {t.get('note', '')} |")
    if doc.get("throughput_images_text"):
        lines += ["", "## Pretraining throughput, images and text (engine, generated inputs, bf16 on GPU)", "",
                  "| model | variant | micro-batch | rate | s/update | peak GB | GFLOP per image/token | MFU | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for t in doc["throughput_images_text"]:
            mfu = f"{100 * t['mfu']:.1f}%" if t.get("mfu") is not None else "-"
            peak = f"{t['peak_gb']:.1f}" if t.get("peak_gb") is not None else "-"
            rate = f"{t['per_s']:.1f} {t['unit']}/s" if t.get("per_s") else "-"
            upd = f"{t['update_s']:.3f}" if t.get("update_s") else "-"
            lines.append(f"| {t['model']} | {t['variant']} | {t.get('batch', '-')} | {rate} | {upd} | {peak} | "
                         f"{t.get('gflop_per_unit', 0):.3g} | {mfu} | {t.get('note', '')} |")
    lines += ["", "## Details", ""]
    for r in doc["checks"]:
        if r["details"]:
            lines += [f"### {r['name']}", "", "```", json.dumps(r["details"], indent=1, default=str)[:6000], "```", ""]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "gpu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on CPU with tiny sizes (CUDA-only checks skipped)")
    ap.add_argument("--out", type=Path, help="report path without suffix (default docs/gpu-report-<gpu>)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole run")
    ap.add_argument("--only", default="", help="comma-separated check names to run (default: all)")
    args = ap.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --cpu for the dry run", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    name = "cpu-dry-run" if args.cpu else gpu_slug(torch.cuda.get_device_name(0))
    base = args.out or ROOT / "docs" / f"gpu-report-{name}"
    args.md, args.json = base.with_suffix(".md"), base.with_suffix(".json")
    run = Run(args, device)

    def timed(fn):
        def wrapped(allowed):
            run._check_start = time.monotonic()
            return fn(run, allowed)
        return wrapped

    cpu = args.cpu
    checks = [
        ("env", 30, timed(check_env)),
        ("hf_encoder", 20 if cpu else 40, timed(check_hf_encoder)),
        ("sdpa", 20 if cpu else 40, timed(check_sdpa)),
        ("precision", 20 if cpu else 60, timed(check_precision)),
        ("checkpointing", 15 if cpu else 40, timed(check_checkpointing)),
        ("fused_adamw", 15 if cpu else 30, timed(check_fused_adamw)),
        ("torchrun", 60 if cpu else 120, timed(check_torchrun)),
        # Eager runs of every model first, then the compiled ones: compiling takes a minute or two each,
        # so on a short budget those are what gets skipped.
        ("throughput 1.0 base", 30 if cpu else 70, check_throughput(run, "1.0 base", [
            ("eager", ["train.compile=off"], True),
            ("eager + act. ckpt", ["train.compile=off", "train.activation_checkpointing=true"], False)])),
        ("throughput 2.0 base", 30 if cpu else 70, check_throughput(run, "2.0 base", [
            ("eager", ["train.compile=off"], True),
            ("eager, fused ALiBi", ["train.compile=off", "train.fused_alibi=true"], False)])),
        ("throughput 1.0 large", 30 if cpu else 90, check_throughput(run, "1.0 large", [
            ("eager + act. ckpt", ["train.compile=off", "train.activation_checkpointing=true"], True),
            ("eager, no act. ckpt", ["train.compile=off", "train.activation_checkpointing=false"], False)])),
        ("compile 1.0 base", 10 if cpu else 150, check_throughput(run, "1.0 base", [
            ("compile", ["train.compile=on"], False)])),
        ("compile 2.0 base", 10 if cpu else 150, check_throughput(run, "2.0 base", [
            ("compile", ["train.compile=on"], False)])),
        ("compile 1.0 large", 10 if cpu else 150, check_throughput(run, "1.0 large", [
            ("compile + act. ckpt", ["train.compile=on", "train.activation_checkpointing=true"], False)])),
        # Images and text last: the speech checks keep their budgets, these get what is left.
        ("throughput vision 1.0 base", 20 if cpu else 45, gpu_checks_images_text.check_throughput(
            run, "vision 1.0 base", [("eager", ["train.compile=off"])])),
        ("throughput vision 2.0 base", 20 if cpu else 40, gpu_checks_images_text.check_throughput(
            run, "vision 2.0 base", [("eager", ["train.compile=off"])])),
        ("throughput text 1.0 base", 20 if cpu else 35, gpu_checks_images_text.check_throughput(
            run, "text 1.0 base", [("eager", ["train.compile=off"])])),
    ]
    try:
        for check_name, budget, fn in checks:
            run.run_check(check_name, budget, fn)
    finally:
        run.write()
        # d2v's own output of every run (config summaries, torchrun logs), for when a check fails; not committed.
        run.args.md.with_suffix(".log").write_text(run.log.getvalue())
        shutil.rmtree(run.tmp, ignore_errors=True)
    failed = run.failed()
    print(f"report: {args.md} and {args.json} (d2v's output: {args.md.with_suffix('.log')})", file=sys.stderr)
    if failed:
        print(f"gpu_check: FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("gpu_check: all checks passed or skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
