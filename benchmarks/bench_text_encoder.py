"""Text encoder forward speed: d2v's TextEncoder vs Hugging Face Data2VecTextModel, same weights, same process.

    python benchmarks/bench_text_encoder.py                       # base and tiny, batch 1 and 8 of 128 tokens
    python benchmarks/bench_text_encoder.py --sizes base --batches 8 --tokens 512 --repeat 3

Both models get identical weights (HF's init plus noise on every tensor, mapped with interop_text's key
table), so the outputs are compared too (max |diff| over the real tokens). Every batch has padding (the
second half of the rows is a quarter shorter), as real batches do. The two run alternately
(bench_encoder.timed_pair), so a busy machine slows both alike; the table shows the median of `--repeat`
runs after `--warmup`: wall clock and process CPU time, tokens/second, and HF wall / d2v wall (> 1: d2v
is faster). HF runs with its default attention (SDPA); on CUDA fp32 and bf16 autocast are both measured.
Needs `transformers` (pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console

from bench_encoder import timed_pair
from d2vcli.interop_keys import rename
from d2vcli.interop_text import HF_MODEL_MAP, HF_TOKEN_TYPES, arch_from_hf
from d2vcli.models.text import TextEncoder
from d2vcli.ui import table

console = Console(width=150, highlight=False)
progress = Console(width=150, highlight=False, stderr=True)

# base: data2vec text / RoBERTa-base (50k BPE vocabulary, 514 position rows); tiny: the text-tiny preset.
SIZES = {
    "base": dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=514),
    "tiny": dict(vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                 max_position_embeddings=130),
}
COLUMNS = ["size", "prec", "B x T", "d2v s", "d2v cpu", "HF s", "HF cpu", "d2v tok/s", "HF tok/s", "HF/d2v",
           "max |diff|"]


def build_pair(size: str, device: str):
    from transformers import Data2VecTextConfig, Data2VecTextModel

    torch.manual_seed(0)
    hf_cfg = Data2VecTextConfig(**SIZES[size], layer_norm_eps=1e-5, type_vocab_size=1, pad_token_id=1,
                                bos_token_id=0, eos_token_id=2, hidden_act="gelu")
    hf = Data2VecTextModel(hf_cfg, add_pooling_layer=False).eval()
    with torch.no_grad():  # noise on every weight (LayerNorm affine included), token-type row zeroed
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        hf.embeddings.token_type_embeddings.weight.zero_()
    arch, _ = arch_from_hf(hf_cfg.to_dict(), "hf", mask_id=SIZES[size]["vocab_size"] - 1)
    ours = TextEncoder(arch).eval()
    state = {k: v for k, v in hf.state_dict().items() if k != HF_TOKEN_TYPES and "position_ids" not in k}
    mapped, unmatched = rename(state, HF_MODEL_MAP.to_d2v)
    assert not unmatched, unmatched
    ours.load_state_dict({k.removeprefix("encoder."): v for k, v in mapped.items()}, strict=True)
    return ours.to(device), hf.to(device), arch


def padded_batch(batch: int, tokens: int, vocab: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (B, T), padding_mask (B, T)): `<s> ... </s>` rows, the second half 3/4 as long, right-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab - 1, (batch, tokens), generator=g)
    ids[:, 0] = 0
    lengths = [tokens if b < (batch + 1) // 2 else max(3, 3 * tokens // 4) for b in range(batch)]
    for b, n in enumerate(lengths):
        ids[b, n - 1] = 2
        ids[b, n:] = 1
    return ids.to(device), ids.eq(1).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="base,tiny")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per row (the longest row of the batch)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    precisions = ["fp32", "bf16"] if device == "cuda" else ["fp32"]
    console.print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}", markup=False)
    rows = []
    for size in args.sizes.split(","):
        ours, hf, arch = build_pair(size, device)
        T = min(args.tokens, arch.max_positions)
        for batch in (int(b) for b in args.batches.split(",")):
            tokens, padding_mask = padded_batch(batch, T, arch.vocab_size, device)
            real = ~padding_mask
            n_real = int(real.sum())
            for precision in precisions:
                autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")

                def run_ours():
                    with torch.inference_mode(), autocast:
                        return ours(tokens, padding_mask if padding_mask.any() else None,
                                    return_layer_results=False).x

                def run_hf():
                    with torch.inference_mode(), autocast:
                        return hf(input_ids=tokens, attention_mask=real.long()).last_hidden_state

                (o_wall, o_cpu, o_out), (h_wall, h_cpu, h_out) = timed_pair([run_ours, run_hf], args.warmup,
                                                                            args.repeat, device)
                diff = (o_out.float()[real] - h_out.float()[real]).abs().max().item()
                rows.append((size, precision, f"{batch} x {T}", f"{o_wall:.3f}", f"{o_cpu:.2f}", f"{h_wall:.3f}",
                             f"{h_cpu:.2f}", f"{n_real / o_wall:,.0f}", f"{n_real / h_wall:,.0f}",
                             f"{h_wall / o_wall:.2f}", f"{diff:.1e}"))
                progress.print(table("", COLUMNS, rows[-1:]))
        del ours, hf
    console.print(table(f"text encoder forward, median of {args.repeat} ({device}; tok/s counts real tokens)",
                        COLUMNS, rows))


if __name__ == "__main__":
    main()
