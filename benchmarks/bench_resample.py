"""Resampling speed and passband: libsoxr (what `d2vcli.audio` uses) vs the numpy polyphase filter it replaced.

    python benchmarks/bench_resample.py [--seconds 60] [--repeat 3]

Times 44.1 kHz stereo -> 16 kHz mono (downmix, then resample: `d2vcli.audio.to_mono_16k`)
on the same generated audio (noise plus tones), best of --repeat after one untimed warm-up,
and prints both times, their ratio and the real-time factor. Then resamples a 7 kHz tone
(inside the new 8 kHz Nyquist, so it must pass unchanged) with both and prints the output
RMS against the input's. Prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import lru_cache
from math import gcd
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from d2vcli.audio import resample, to_mono_16k  # noqa: E402

SR_IN, SR_OUT = 44_100, 16_000


# ----------------------------------------------------------------------------- baseline
# BASELINE, not used by d2vcli: the windowed-sinc polyphase resampler that d2vcli/audio.py
# had before it moved to libsoxr, copied unchanged so the comparison stays reproducible.


@lru_cache(maxsize=16)
def _filters(up: int, down: int, zeros: int, rolloff: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Polyphase filter bank: (L, taps) weights and the (taps,) input offsets they apply to."""
    cutoff = 0.5 * rolloff * min(1.0, up / down)  # cycles per input sample
    half = int(np.ceil(zeros / (2 * cutoff)))  # filter half-width in input samples
    offsets = np.arange(-half + 1, half + 1)  # input index = floor(t) + offset
    phase = np.arange(up) / up  # fractional part of t for each of the L phases
    x = offsets[None, :] - phase[:, None]  # (L, taps) distance from t in input samples
    window = np.i0(beta * np.sqrt(np.clip(1.0 - (x / half) ** 2, 0.0, None))) / np.i0(beta)
    weights = 2 * cutoff * np.sinc(2 * cutoff * x) * window
    return weights.astype(np.float32), offsets


def numpy_resample(
    wav: np.ndarray,
    sr_in: int,
    sr_out: int,
    zeros: int = 16,
    rolloff: float = 0.945,
    beta: float = 8.6,
    block: int = 32_768,
) -> np.ndarray:
    """Band-limited resampling of (S,) or (S, C) float audio; returns float32 of length ceil(S * sr_out / sr_in)."""
    wav = np.asarray(wav, dtype=np.float32)
    if sr_in == sr_out:
        return wav
    g = gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    weights, offsets = _filters(up, down, zeros, rolloff, beta)
    squeeze = wav.ndim == 1
    x = wav[:, None] if squeeze else wav  # (S, C)
    n_in = x.shape[0]
    n_out = -(-n_in * up // down)
    pad = len(offsets)
    xp = np.concatenate([np.zeros((pad, x.shape[1]), np.float32), x, np.zeros((pad, x.shape[1]), np.float32)])
    out = np.empty((n_out, x.shape[1]), np.float32)
    for start in range(0, n_out, block):
        n = np.arange(start, min(start + block, n_out), dtype=np.int64)
        base, ph = np.divmod(n * down, up)  # t = base + ph / up
        idx = base[:, None] + offsets[None, :] + pad  # (n, taps)
        out[n] = np.einsum("nt,ntc->nc", weights[ph], xp[idx])
    return out[:, 0] if squeeze else out


def numpy_to_mono_16k(wav: np.ndarray, sr: int) -> np.ndarray:
    return numpy_resample(np.asarray(wav, dtype=np.float32).mean(axis=1), sr, SR_OUT)


# ----------------------------------------------------------------------------- measurement


def _best_of(fn, x: np.ndarray, repeat: int) -> float:
    fn(x, SR_IN)  # warm-up: filter design, caches, page faults
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x, SR_IN)
        best = min(best, time.perf_counter() - t0)
    return best


def _rms(x: np.ndarray) -> float:
    edge = len(x) // 8  # away from the filters' start-up and tail
    return float(np.sqrt(np.mean(x[edge:-edge].astype(np.float64) ** 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the stereo test signal")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per resampler (the best is kept)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n = int(args.seconds * SR_IN)
    t = np.arange(n) / SR_IN
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n),
                       0.3 * np.sin(2 * np.pi * 3_000 * t) + 0.05 * rng.standard_normal(n)], axis=1).astype(np.float32)

    t_soxr = _best_of(to_mono_16k, stereo, args.repeat)
    t_numpy = _best_of(numpy_to_mono_16k, stereo, args.repeat)
    print(f"{args.seconds:g} s of {SR_IN} Hz stereo -> {SR_OUT} Hz mono (downmix + resample), best of {args.repeat}")
    print(f"{'resampler':<28} {'seconds':>9} {'x real time':>12}")
    print(f"{'soxr VHQ (d2vcli.audio)':<28} {t_soxr:>9.3f} {args.seconds / t_soxr:>12.0f}")
    print(f"{'numpy polyphase (baseline)':<28} {t_numpy:>9.3f} {args.seconds / t_numpy:>12.0f}")
    print(f"soxr is {t_numpy / t_soxr:.1f}x faster")

    tone = (0.5 * np.sin(2 * np.pi * 7_000 * np.arange(SR_IN) / SR_IN)).astype(np.float32)
    rms_in = _rms(tone)
    print(f"\n7 kHz tone, 1 s at {SR_IN} Hz -> {SR_OUT} Hz: RMS (input {rms_in:.5f})")
    for name, fn in (("soxr VHQ (d2vcli.audio)", resample), ("numpy polyphase (baseline)", numpy_resample)):
        rms = _rms(fn(tone, SR_IN, SR_OUT))
        print(f"{name:<28} {rms:.5f}  ({20 * np.log10(rms / rms_in):+.3f} dB)")


if __name__ == "__main__":
    main()
