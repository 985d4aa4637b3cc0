"""Audio reading and resampling shared by `d2v prepare` and `d2v transcribe`.

    wav, sr = read_audio("x.flac")                 # float32 (S,) mono or (S, C)
    wav16 = to_mono_16k(wav, sr)                   # float32 (S',) at 16 kHz
    y = resample(x, 44_100, 16_000)                # band-limited, any rational ratio

The resampler is a windowed-sinc polyphase filter in numpy (no scipy, no
torchaudio): for output sample n at input time t = n * sr_in / sr_out it sums the
input under a Kaiser-windowed sinc whose cutoff is the lower of the two Nyquist
frequencies (times a roll-off), so a tone above the new Nyquist is removed, not
folded back. The ratio is reduced to L/M with gcd, and the L filter phases are
precomputed once.
"""

from __future__ import annotations

from functools import lru_cache
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf

from d2vcli.errors import UserError

SAMPLE_RATE = 16_000


class AudioError(UserError):
    """Audio that cannot be read; the message names the file."""


def read_audio(path: Path | str, offset: int = 0, num_samples: int = -1) -> tuple[np.ndarray, int]:
    """Read `num_samples` samples (-1: to the end) starting at sample `offset`.

    Returns float32 (S,) for mono and (S, C) for multi-channel audio, and the sample rate.
    """
    try:
        wav, sr = sf.read(str(path), start=offset, frames=num_samples, dtype="float32", always_2d=False)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError or TypeError
        raise AudioError(f"cannot read audio {path}: {e}") from e
    return wav, sr


def to_mono_16k(wav: np.ndarray, sr: int) -> np.ndarray:
    """Downmix (mean over channels) and resample to 16 kHz: float32 (S,)."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    return resample(wav, sr, SAMPLE_RATE)


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


def resample(
    wav: np.ndarray,
    sr_in: int,
    sr_out: int,
    zeros: int = 16,
    rolloff: float = 0.945,
    beta: float = 8.6,
    block: int = 32_768,
) -> np.ndarray:
    """Band-limited resampling of (S,) or (S, C) float audio; returns float32 of length ceil(S * sr_out / sr_in).

    `zeros` sinc zero-crossings on each side set the filter length; `rolloff`
    places the cutoff just below the lower Nyquist; Kaiser `beta` 8.6 gives
    about 80 dB stop-band attenuation.
    """
    wav = np.asarray(wav, dtype=np.float32)
    if sr_in == sr_out:
        return wav
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be positive, got {sr_in} -> {sr_out}")
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
