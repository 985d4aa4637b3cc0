"""Encoder forward speed: d2v's Data2VecAudio vs Hugging Face Data2VecAudioModel, same weights, same process.

    python benchmarks/bench_encoder.py                      # base + tiny, batch 1 and 8, 10 s clips
    python benchmarks/bench_encoder.py --sizes base --batches 1 --repeat 3

Both models get identical weights (HF's random init mapped with interop's key table), so
the outputs are compared too (max |diff| column). Timing: inference mode, eval, `--warmup`
runs, then the median of `--repeat` runs, wall clock and process CPU time. RTF = wall
seconds per second of audio. Ratio = HF wall / d2v wall (> 1: d2v is faster).
On CPU the case is fp32; on CUDA it is fp32 and bf16 autocast, both with SDPA attention
(HF's default `sdpa`; d2v always uses F.scaled_dot_product_attention).
Needs `transformers` (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console

from d2vcli.interop import HF_MODEL_MAP, model_config_from_hf, rename
from d2vcli.models.audio import build_backbone
from d2vcli.ui import table

console = Console(width=150, highlight=False)
# Progress (each case as it finishes) goes to stderr; stdout carries the one summary table, which
# run_all.py copies into docs/benchmarks.md.
progress = Console(width=150, highlight=False, stderr=True)

SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                 conv_dim=(64,) * 7, num_conv_pos_embeddings=2),
}


def build_pair(size: str, device: str):
    from transformers import Data2VecAudioConfig, Data2VecAudioModel

    torch.manual_seed(0)
    hf_cfg = Data2VecAudioConfig(**SIZES[size], layerdrop=0.0, mask_time_prob=0.05)
    hf = Data2VecAudioModel(hf_cfg).eval().to(device)
    ours = build_backbone(model_config_from_hf(hf_cfg.to_dict(), "hf")).eval()
    state, unmatched = rename(hf.state_dict(), HF_MODEL_MAP.to_d2v)
    assert not unmatched, unmatched
    ours.load_state_dict({k.removeprefix("backbone."): v for k, v in state.items()}, strict=True)
    return ours.to(device), hf


def timed_pair(fns, warmup: int, repeat: int, device: str) -> list[tuple[float, float, torch.Tensor]]:
    """For each fn: (median wall s, median process CPU s, last output). The fns run alternately,
    so a busy machine slows both alike instead of whichever happened to run second."""
    outs = [None] * len(fns)
    for _ in range(warmup):
        outs = [fn() for fn in fns]
    walls, cpus = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            if device == "cuda":
                torch.cuda.synchronize()
            w, c = time.perf_counter(), time.process_time()
            outs[i] = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            walls[i].append(time.perf_counter() - w)
            cpus[i].append(time.process_time() - c)
    return [(statistics.median(w), statistics.median(c), o) for w, c, o in zip(walls, cpus, outs)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="base,tiny")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = args.device
    precisions = ["fp32", "bf16"] if device == "cuda" else ["fp32"]
    console.print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}", markup=False)
    rows = []
    for size in args.sizes.split(","):
        ours, hf = build_pair(size, device)
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, int(args.seconds * 16000), device=device)
            audio_s = batch * args.seconds
            for precision in precisions:
                autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

                def run_ours():
                    with torch.inference_mode(), autocast:
                        return ours(x)["x"]

                def run_hf():
                    with torch.inference_mode(), autocast:
                        return hf(x).last_hidden_state

                (o_wall, o_cpu, o_out), (h_wall, h_cpu, h_out) = timed_pair([run_ours, run_hf], args.warmup,
                                                                            args.repeat, device)
                diff = (o_out.float() - h_out.float()).abs().max().item()
                rows.append((size, precision, batch, f"{o_wall:.3f}", f"{o_cpu:.2f}", f"{h_wall:.3f}", f"{h_cpu:.2f}",
                             f"{o_wall / audio_s:.4f}", f"{h_wall / audio_s:.4f}", f"{h_wall / o_wall:.2f}",
                             f"{diff:.1e}"))
                progress.print(table("", ["size", "prec", "B", "d2v s", "d2v cpu", "HF s", "HF cpu", "d2v RTF",
                                          "HF RTF", "HF/d2v", "max |diff|"], rows[-1:]))
        del ours, hf
    console.print(table(f"encoder forward, {args.seconds:g} s clips, median of {args.repeat} ({device})",
                        ["size", "prec", "B", "d2v s", "d2v cpu", "HF s", "HF cpu", "d2v RTF", "HF RTF", "HF/d2v",
                         "max |diff|"], rows))


if __name__ == "__main__":
    main()
