"""`d2v transcribe`: any rate / channel count in, text and word timestamps out.

Run: python -m pytest -q tests/test_transcribe.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from d2vcli.audio import read_audio, resample, to_mono_16k
from d2vcli.config import BASE_CONV_LAYERS
from d2vcli.lm.formats import read_lexicon
from d2vcli.manifest import num_frames, read_manifest
from d2vcli.models.audio import receptive_field
from d2vcli.transcribe import frame_windows, transcribe
from d2vcli.vocab import Vocab


@pytest.fixture(scope="module")
def stereo_8k(synthetic_workspace, tmp_path_factory):
    """A dev-clean utterance as an 8 kHz stereo WAV (right channel at half level), and its duration."""
    record = read_manifest(synthetic_workspace.manifest("dev-clean"))[0]
    wav, sr = read_audio(record.path)
    x8 = resample(wav, sr, 8000)
    path = tmp_path_factory.mktemp("audio") / "stereo-8k.wav"
    sf.write(path, np.stack([x8, 0.5 * x8], axis=1), 8000, subtype="FLOAT")
    return path, len(x8) / 8000


def test_8khz_stereo_is_downmixed_and_resampled(synthetic_workspace, random_ctc_checkpoint, stereo_8k, tmp_path):
    path, seconds = stereo_8k
    [t] = transcribe([path], synthetic_workspace, model="ctc-random", lm=None, timestamps=True)
    assert (t.sample_rate, t.channels) == (8000, 2) and t.seconds == pytest.approx(seconds, abs=1e-3)
    # The same audio already at 16 kHz mono (d2vcli.audio's downmix + resampler) gives the same result.
    wav, sr = read_audio(path)
    mono16 = tmp_path / "mono-16k.wav"
    sf.write(mono16, to_mono_16k(wav, sr), 16000, subtype="FLOAT")
    [ref] = transcribe([mono16], synthetic_workspace, model="ctc-random", lm=None, timestamps=True)
    assert ref.text == t.text and [(w.word, w.start, w.end) for w in ref.words] == \
        [(w.word, w.start, w.end) for w in t.words]
    assert len(t.words) == len(t.text.split())
    for w in t.words:
        assert 0.0 <= w.start < w.end <= t.seconds + 0.02
    assert all(a.end <= b.start for a, b in zip(t.words, t.words[1:]))


def test_lm_transcription_outputs_only_lexicon_words(synthetic_workspace, synthetic_lm, random_ctc_checkpoint,
                                                     stereo_8k):
    path, _ = stereo_8k
    [t] = transcribe([path], synthetic_workspace, model="ctc-random", lm="4gram.bin", timestamps=True)
    lexicon = read_lexicon(synthetic_workspace.lm_dir / "lexicon.txt", Vocab.load(synthetic_workspace.dictionary))
    assert t.text and set(t.text.split()) <= lexicon.words
    assert [w.word for w in t.words] == t.text.split()


@pytest.mark.parametrize("num_samples", [400, 401, 16_000, 47_999, 48_000, 160_321, 1_000_000])
def test_windows_tile_the_frame_grid(num_samples):
    rf, hop = receptive_field(BASE_CONV_LAYERS)
    assert (rf, hop) == (400, 320)
    windows = frame_windows(num_samples, BASE_CONV_LAYERS, chunk_seconds=1.0)
    frames = [num_frames(e - s, BASE_CONV_LAYERS) for s, e in windows]
    assert sum(frames) == num_frames(num_samples, BASE_CONV_LAYERS)
    starts = np.cumsum([0] + frames[:-1])
    assert [s for s, _ in windows] == [int(f) * hop for f in starts]  # window k starts at its first frame


def test_long_audio_in_windows_keeps_the_20ms_frame_times(synthetic_workspace, random_ctc_checkpoint, tmp_path):
    record = read_manifest(synthetic_workspace.manifest("test-clean"))[0]
    wav, sr = read_audio(record.path)
    long = tmp_path / "long.flac"
    sf.write(long, np.concatenate([wav, wav, wav]), sr)
    [t] = transcribe([long], synthetic_workspace, model="ctc-random", lm=None, timestamps=True, chunk_seconds=2.0)
    assert t.seconds == pytest.approx(3 * len(wav) / sr, abs=1e-3)
    assert t.words and t.words[-1].end <= t.seconds + 0.02


def test_cli_transcribe_writes_json_with_timestamps(synthetic_workspace, random_ctc_checkpoint, stereo_8k, tmp_path):
    from d2vcli.cli import app

    path, _ = stereo_8k
    out = tmp_path / "out.json"
    res = CliRunner().invoke(app, ["transcribe", str(path), "--model", "ctc-random", "--no-lm", "--timestamps",
                                   "--out", str(out), "-w", str(synthetic_workspace.root)])
    assert res.exit_code == 0, res.output
    [item] = json.loads(out.read_text())
    assert item["path"] == str(path) and item["sample_rate"] == 8000 and item["channels"] == 2
    assert [w["word"] for w in item["words"]] == item["text"].split()
    missing = CliRunner().invoke(app, ["transcribe", str(tmp_path / "nope.wav"), "--model", "ctc-random",
                                       "-w", str(synthetic_workspace.root)])
    assert missing.exit_code != 0
