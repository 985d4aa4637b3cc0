"""`d2vcli.audio`: band-limited resampling (libsoxr) and the downmix to 16 kHz mono.

Run: python -m pytest -q tests/test_audio.py
"""

from __future__ import annotations

import numpy as np
import pytest

from d2vcli.audio import SAMPLE_RATE, resample, to_mono_16k


def _tone(hz: float, sr: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * hz * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    """RMS away from the edges, where the filter's start-up and tail live."""
    edge = len(x) // 8
    return float(np.sqrt(np.mean(x[edge:-edge].astype(np.float64) ** 2)))


def test_tone_above_the_new_nyquist_is_removed():
    # 10 kHz at 44.1 kHz is above 16 kHz's Nyquist (8 kHz): it must vanish, not fold back to 6 kHz.
    x = _tone(10_000, 44_100)
    assert _rms(resample(x, 44_100, SAMPLE_RATE)) < 1e-3 * _rms(x)


@pytest.mark.parametrize("hz", [1_000, 7_000])
def test_passband_tones_are_kept_within_a_tenth_of_a_db(hz):
    x = _tone(hz, 44_100)
    y = resample(x, 44_100, SAMPLE_RATE)
    gain_db = 20 * np.log10(_rms(y) / _rms(x))
    assert abs(gain_db) < 0.1, f"{hz} Hz changed by {gain_db:.3f} dB"
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert np.fft.rfftfreq(len(y), 1 / SAMPLE_RATE)[spec.argmax()] == pytest.approx(hz, abs=2)


@pytest.mark.parametrize("n,sr_in,sr_out", [(44_100, 44_100, 16_000), (44_101, 44_100, 16_000), (1_000, 44_100, 16_000),
                                            (12_345, 48_000, 16_000), (8_001, 8_000, 16_000), (16_000, 22_050, 16_000),
                                            (777, 16_000, 11_025)])
def test_output_length_is_the_rounded_ratio(n, sr_in, sr_out):
    y = resample(np.random.default_rng(0).standard_normal(n).astype(np.float32), sr_in, sr_out)
    assert abs(len(y) - round(n * sr_out / sr_in)) <= 1
    assert y.dtype == np.float32


def test_channels_are_resampled_independently():
    left, right = _tone(1_000, 48_000), _tone(3_000, 48_000, amplitude=0.25)
    y = resample(np.stack([left, right], axis=1), 48_000, SAMPLE_RATE)
    assert y.shape == (SAMPLE_RATE, 2) and y.dtype == np.float32
    np.testing.assert_allclose(y[:, 0], resample(left, 48_000, SAMPLE_RATE), atol=1e-6)
    np.testing.assert_allclose(y[:, 1], resample(right, 48_000, SAMPLE_RATE), atol=1e-6)


def test_stereo_is_downmixed_to_16k_mono():
    tone = _tone(1_000, 44_100)
    assert to_mono_16k(np.stack([tone, tone], axis=1), 44_100).shape == (SAMPLE_RATE,)
    mono = to_mono_16k(np.stack([tone, 0.5 * tone], axis=1), 44_100)
    np.testing.assert_allclose(mono, resample(0.75 * tone, 44_100, SAMPLE_RATE), atol=1e-6)
    # Opposite channels cancel in the mean.
    assert np.abs(to_mono_16k(np.stack([tone, -tone], axis=1), 44_100)).max() < 1e-5


def test_matching_rate_is_passed_through_and_bad_rates_are_refused():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float64)
    y = resample(x, SAMPLE_RATE, SAMPLE_RATE)
    assert y.dtype == np.float32 and np.array_equal(y, x.astype(np.float32))
    assert resample(x, 8_000, SAMPLE_RATE).dtype == np.float32  # float64 in, float32 out
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0, SAMPLE_RATE)
