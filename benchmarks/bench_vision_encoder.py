"""ViT encoder forward speed: d2v's VisionTransformer vs Hugging Face Data2VecVisionModel, same weights, same process.

    python benchmarks/bench_vision_encoder.py                   # ViT-B and tiny, batch 1 and 8
    python benchmarks/bench_vision_encoder.py --sizes base --batches 8 --repeat 3

Both models get identical weights (HF's init, randomized, mapped with interop_vision's table), so
the outputs are compared too (max |diff|). The two run alternately (bench_encoder.timed_pair), so
a busy machine slows both alike; the table shows the median of `--repeat` runs after `--warmup`,
wall clock and process CPU time, images/second, and HF wall / d2v wall (> 1: d2v is faster).
On CUDA both fp32 and bf16 autocast are measured, with SDPA attention on both sides.
Needs `transformers` (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console

from bench_encoder import timed_pair
from d2vcli.interop_vision import arch_from_hf, from_hf_state
from d2vcli.models.vision import VisionTransformer
from d2vcli.ui import table

console = Console(width=150, highlight=False)
progress = Console(width=150, highlight=False, stderr=True)

SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                 image_size=224, patch_size=16),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256, image_size=32,
                 patch_size=4),
}
COLUMNS = ["size", "prec", "B", "d2v s", "d2v cpu", "HF s", "HF cpu", "d2v img/s", "HF img/s", "HF/d2v", "max |diff|"]


def build_pair(size: str, device: str):
    from transformers import Data2VecVisionConfig, Data2VecVisionModel

    torch.manual_seed(0)
    hf_cfg = Data2VecVisionConfig(**SIZES[size], layer_norm_eps=1e-6, use_shared_relative_position_bias=True,
                                  use_mask_token=True, use_mean_pooling=True, drop_path_rate=0.0,
                                  layer_scale_init_value=1e-4)
    hf = Data2VecVisionModel(hf_cfg).eval()
    with torch.no_grad():  # noise on every weight: the zero-initialized position table is unlike a trained one
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = VisionTransformer(arch_from_hf(hf_cfg.to_dict(), "hf")).eval()
    state, unmatched = from_hf_state("vision-pretrain", hf.state_dict())
    assert not unmatched, unmatched
    ours.load_state_dict({k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")},
                         strict=True)
    return ours.to(device), hf.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="base,tiny")
    ap.add_argument("--batches", default="1,8")
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
        side = SIZES[size]["image_size"]
        for batch in (int(b) for b in args.batches.split(",")):
            x = torch.randn(batch, 3, side, side, device=device)
            for precision in precisions:
                autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

                def run_ours():
                    with torch.inference_mode(), autocast:
                        return ours(x)[0]

                def run_hf():
                    with torch.inference_mode(), autocast:
                        return hf(x).last_hidden_state

                (o_wall, o_cpu, o_out), (h_wall, h_cpu, h_out) = timed_pair([run_ours, run_hf], args.warmup,
                                                                            args.repeat, device)
                diff = (o_out.float() - h_out.float()).abs().max().item()
                rows.append((size, precision, batch, f"{o_wall:.3f}", f"{o_cpu:.2f}", f"{h_wall:.3f}", f"{h_cpu:.2f}",
                             f"{batch / o_wall:.1f}", f"{batch / h_wall:.1f}", f"{h_wall / o_wall:.2f}", f"{diff:.1e}"))
                progress.print(table("", COLUMNS, rows[-1:]))
        del ours, hf
    console.print(table(f"ViT encoder forward, median of {args.repeat} ({device})", COLUMNS, rows))


if __name__ == "__main__":
    main()
