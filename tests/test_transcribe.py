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
from d2vcli.cli import app
from d2vcli.transcribe import TranscribeError, frame_windows, transcribe
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


# ----------------------------------------------------------------------------- issue 15: cases 5 and 15


def _good_files(ws, tmp_path, n: int) -> list:
    """n short 16 kHz FLACs copied from dev-clean (tmp copies: the workspace's data stays untouched)."""
    out = []
    for i, record in enumerate(read_manifest(ws.manifest("dev-clean"))[:n]):
        wav, sr = read_audio(record.path)
        path = tmp_path / f"good-{i}.flac"
        sf.write(path, wav[: sr], sr)
        out.append(path)
    return out


def test_one_bad_file_does_not_lose_the_others(synthetic_workspace, random_ctc_checkpoint, tmp_path):
    """Issue 15 case 5: one unreadable or missing file aborted the batch and wrote no --out."""
    good = _good_files(synthetic_workspace, tmp_path, 2)
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wav file")
    missing = tmp_path / "missing.flac"
    out = tmp_path / "out.json"
    res = CliRunner().invoke(app, ["transcribe", str(good[0]), str(broken), str(missing), str(good[1]), "--model",
                                   "ctc-random", "--no-lm", "--out", str(out), "-w", str(synthetic_workspace.root)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit))
    assert [item["path"] for item in json.loads(out.read_text())] == [str(good[0]), str(good[1])]
    for bad in (broken, missing):
        assert any(str(bad) in line and "error" in line for line in res.output.splitlines()), res.output
    assert "2 of 4 files could not be transcribed" in res.output


def test_library_returns_failures_with_reasons(synthetic_workspace, random_ctc_checkpoint, tmp_path):
    [good] = _good_files(synthetic_workspace, tmp_path, 1)
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"fLaC" + bytes(100))
    result = transcribe([broken, good], synthetic_workspace, model="ctc-random", lm=None)
    assert [t.path for t in result] == [str(good)]
    [failure] = result.failures
    assert failure.path == str(broken) and "cannot read audio" in failure.reason


def test_when_nothing_can_be_read_out_is_left_alone(synthetic_workspace, random_ctc_checkpoint, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"garbage")
    out = tmp_path / "out.txt"
    out.write_text("earlier results\n")
    res = CliRunner().invoke(app, ["transcribe", str(broken), "--model", "ctc-random", "--no-lm", "--out", str(out),
                                   "-w", str(synthetic_workspace.root)])
    assert res.exit_code == 2 and "no file could be transcribed" in res.output and str(broken) in res.output
    assert out.read_text() == "earlier results\n"


def test_a_directory_is_transcribed_recursively(synthetic_workspace, random_ctc_checkpoint, tmp_path):
    """Issue 15 case 15: `transcribe DIR` said "audio file not found" although the directory exists."""
    folder = tmp_path / "talks"
    (folder / "day2").mkdir(parents=True)
    good = _good_files(synthetic_workspace, tmp_path, 2)
    a, b = folder / "a.flac", folder / "day2" / "b.FLAC"
    good[0].rename(a)
    good[1].rename(b)
    (folder / "notes.txt").write_text("not audio\n")
    result = transcribe([folder], synthetic_workspace, model="ctc-random", lm=None)
    assert [t.path for t in result] == [str(a), str(b)] and not result.failures
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(app, ["transcribe", str(empty), "--model", "ctc-random", "--no-lm",
                                   "-w", str(synthetic_workspace.root)])
    assert res.exit_code == 2 and "no audio files" in res.output and str(empty) in res.output


def test_chunk_seconds_below_one_second_is_refused_by_the_library(synthetic_workspace, tmp_path):
    with pytest.raises(TranscribeError, match="chunk_seconds"):
        transcribe([tmp_path], synthetic_workspace, chunk_seconds=0)
