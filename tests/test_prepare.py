"""`d2v prepare` on small generated corpora that copy the real layouts, and the audio helpers.

    python -m pytest -q tests/test_prepare.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from d2vcli import prepare as P
from d2vcli.audio import AudioError, read_audio, resample, to_mono_16k
from d2vcli.cli import app
from d2vcli.manifest import read_manifest
from d2vcli.prepare import pipeline
from d2vcli.prepare.librilight import vad_segments
from d2vcli.prepare.librilight_limited import LIMITED_SPLITS
from d2vcli.prepare.librispeech import ENV_LIBRISPEECH
from d2vcli.prepare.pipeline import scan_headers
from d2vcli.vocab import LIBRISPEECH_LETTERS, Vocab
from d2vcli.workspace import Workspace

SR = 16_000


def _wav(seconds: float, sr: int = SR, channels: int = 1, freq: float = 440.0, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return np.stack([x] * channels, 1).astype(np.float32) if channels > 1 else x.astype(np.float32)


def _write(path: Path, seconds: float = 1.0, sr: int = SR, channels: int = 1, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), _wav(seconds, sr, channels, freq), sr, format=path.suffix.lstrip(".").upper())
    return path


def _chapter(split_dir: Path, spk: int, chapter: int, texts: dict[int, str], audio: tuple[int, ...] | None = None,
             seconds: float = 1.0) -> None:
    """One LibriSpeech chapter: trans.txt lines for `texts`, FLACs for `audio` (default: the same utterances)."""
    d = split_dir / str(spk) / str(chapter)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{spk}-{chapter}.trans.txt").write_text(
        "".join(f"{spk}-{chapter}-{u:04d} {t}\n" for u, t in texts.items()))
    for u in texts if audio is None else audio:
        _write(d / f"{spk}-{chapter}-{u:04d}.flac", seconds)


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.resolve(tmp_path / "ws")


@pytest.fixture
def libri(tmp_path) -> Path:
    """A parent dir with LibriSpeech/{dev-clean,test-clean} (speakers 19, 103, 1272 to check numeric sorting)."""
    root = tmp_path / "corpora" / "LibriSpeech"
    (root / "SPEAKERS.TXT").parent.mkdir(parents=True)
    (root / "SPEAKERS.TXT").write_text(";ID |SEX| SUBSET |MINUTES| NAME\n19 | F | dev-clean | 1.0 | A\n")
    _chapter(root / "dev-clean", 1272, 128104, {0: "MISTER QUILTER", 1: "IS THE APOSTLE"})
    _chapter(root / "dev-clean", 19, 198, {0: "HELLO WORLD", 1: "IT'S ME", 2: "NO AUDIO FOR THIS LINE"},
             audio=(0, 1))
    _chapter(root / "dev-clean", 103, 1240, {0: "CHAPTER ONE"})
    _chapter(root / "test-clean", 1089, 134686, {0: "HE HOPED THERE WOULD BE STEW"})
    return root.parent


# --------------------------------------------------------------------------- librispeech


def test_librispeech_walks_audio_and_sorts(ws, libri):
    summary = P.prepare_librispeech(ws, libri)
    assert [s.split for s in summary.splits] == ["dev-clean", "test-clean"]
    recs = read_manifest(ws.manifest("dev-clean"))
    # The trans.txt line without audio is not in the manifest; speakers sort numerically.
    assert [r.id for r in recs] == ["19-198-0000", "19-198-0001", "103-1240-0000", "1272-128104-0000",
                                    "1272-128104-0001"]
    first = recs[0]
    assert Path(first.path).is_absolute() and Path(first.path).exists()
    assert (first.num_samples, first.sample_rate, first.speaker, first.text) == (SR, SR, "19", "HELLO WORLD")
    assert recs[1].text == "IT'S ME"
    dev = summary.split("dev-clean")
    assert (dev.status, dev.utterances, dev.orphan_transcripts) == ("written", 5, 1)
    assert dev.hours == pytest.approx(5 / 3600)
    assert any("1 transcript line(s) have no audio" in n for n in summary.notes)
    assert Vocab.load(ws.dictionary).symbols == LIBRISPEECH_LETTERS
    assert ws.dictionary.read_text().splitlines()[0].startswith("| ")


def test_librispeech_root_and_split_errors(ws, libri, monkeypatch):
    monkeypatch.delenv(ENV_LIBRISPEECH, raising=False)
    with pytest.raises(P.PrepareError, match="pass --root .* or set \\$D2V_LIBRISPEECH"):
        P.prepare_librispeech(ws)
    monkeypatch.setenv(ENV_LIBRISPEECH, str(libri / "LibriSpeech"))  # the LibriSpeech/ dir itself works too
    summary = P.prepare_librispeech(ws, splits=["test-clean"])
    assert [s.split for s in summary.splits] == ["test-clean"]
    with pytest.raises(P.PrepareError, match="train-clean-100 not found .*found: dev-clean, test-clean"):
        P.prepare_librispeech(ws, libri, splits=["train-clean-100"])
    empty = libri.parent / "empty" / "LibriSpeech" / "train"
    empty.mkdir(parents=True)
    with pytest.raises(P.PrepareError, match="no LibriSpeech split .*found: train.*--splits"):
        P.prepare_librispeech(ws, empty.parent)


def test_bad_inputs_are_skipped_and_listed(ws, libri):
    d = libri / "LibriSpeech" / "dev-clean" / "19" / "198"
    (d / "19-198-0005.flac").write_bytes(os.urandom(2000))  # corrupt
    (d / "19-198-0006.flac").write_bytes(b"")  # zero-length
    _write(d / "19-198-0007.flac")  # no transcript line
    _write(d / "19-198-0008.flac")  # out-of-vocabulary characters
    _write(d / "19-198-0009.flac", seconds=0.1)  # 4 frames for a 12-target transcript
    with open(d / "19-198.trans.txt", "a") as fh:
        fh.write("19-198-0005 CORRUPT\n19-198-0006 EMPTY\n19-198-0008 ROOM 101\n19-198-0009 TOO LONG NOW\n")
    summary = P.prepare_librispeech(ws, libri, splits=["dev-clean"])
    dev = summary.split("dev-clean")
    assert dev.utterances == 5
    # The fixture's trans.txt line without audio (19-198-0002) is listed too.
    assert dev.skipped == {"unreadable": 1, "empty": 1, "no-transcript": 1, "out-of-vocab": 1, "text-too-long": 1,
                           "no-audio": 1}
    rows = [ln.split("\t") for ln in (ws.data_dir / "skipped-dev-clean.tsv").read_text().splitlines()[1:]]
    reasons = {Path(p).stem: r for p, r, _ in rows}
    assert reasons == {"19-198-0005": "unreadable", "19-198-0006": "empty", "19-198-0007": "no-transcript",
                       "19-198-0008": "out-of-vocab", "19-198-0009": "text-too-long", "19-198-0002": "no-audio"}
    assert "'0'" in next(detail for p, r, detail in rows if r == "out-of-vocab")
    assert str(ws.data_dir / "skipped-dev-clean.tsv") in dev.outputs
    assert {r.id for r in read_manifest(ws.manifest("dev-clean"))}.isdisjoint(reasons)


def test_strict_turns_a_skip_into_an_error_and_keeps_earlier_output(ws, libri):
    P.prepare_librispeech(ws, libri, splits=["test-clean"])
    before = ws.manifest("test-clean").read_bytes()
    (libri / "LibriSpeech" / "dev-clean" / "103" / "1240" / "103-1240-0001.flac").write_bytes(b"")
    with pytest.raises(P.PrepareError, match=r"--strict: .*103-1240-0001\.flac would be skipped \(empty"):
        P.prepare_librispeech(ws, libri, strict=True)
    assert not ws.manifest("dev-clean").exists()  # nothing written for the failing split
    assert ws.manifest("test-clean").read_bytes() == before


def test_rerun_is_up_to_date_and_notices_changes(ws, libri):
    P.prepare_librispeech(ws, libri)
    manifest = ws.manifest("dev-clean")
    mtime = manifest.stat().st_mtime_ns
    again = P.prepare_librispeech(ws, libri)
    assert [s.status for s in again.splits] == ["up to date", "up to date"]
    assert again.split("dev-clean").utterances == 5
    assert manifest.stat().st_mtime_ns == mtime
    # A new file changes the fingerprint: only that split is redone.
    _chapter(libri / "LibriSpeech" / "dev-clean", 200, 300, {0: "NEW ONE"})
    third = P.prepare_librispeech(ws, libri)
    assert [s.status for s in third.splits] == ["written", "up to date"]
    assert third.split("dev-clean").utterances == 6
    # A changed transcript does too.
    trans = libri / "LibriSpeech" / "test-clean" / "1089" / "134686" / "1089-134686.trans.txt"
    trans.write_text("1089-134686-0000 HE HOPED\n")
    fourth = P.prepare_librispeech(ws, libri)
    assert fourth.split("test-clean").status == "written"
    assert read_manifest(ws.manifest("test-clean"))[0].text == "HE HOPED"


def test_wrong_sample_rate_is_an_error_unless_resampled(ws, libri):
    d = libri / "LibriSpeech" / "dev-clean" / "103" / "1240"
    (d / "103-1240-0000.flac").unlink()
    _write(d / "103-1240-0000.flac", seconds=1.0, sr=22_050, channels=2)
    with pytest.raises(P.PrepareError, match=r"1 of 5 audio files .*22050 Hz, 2 channels.*--resample"):
        P.prepare_librispeech(ws, libri, splits=["dev-clean"])
    assert not ws.manifest("dev-clean").exists()
    P.prepare_librispeech(ws, libri, splits=["dev-clean"], resample=True)
    rec = next(r for r in read_manifest(ws.manifest("dev-clean")) if r.id == "103-1240-0000")
    # Named by the id and a hash of the source's identity (see test_prepare_guards.py).
    assert Path(rec.path).parent == ws.data_dir / "audio" / "dev-clean"
    assert Path(rec.path).name.startswith("103-1240-0000.") and rec.path.endswith(".flac")
    info = sf.info(rec.path)
    assert (info.samplerate, info.channels, info.frames) == (SR, 1, rec.num_samples) and rec.num_samples == SR
    others = [r for r in read_manifest(ws.manifest("dev-clean")) if r.id != "103-1240-0000"]
    assert all("/LibriSpeech/" in r.path for r in others)  # 16 kHz files are used in place


# --------------------------------------------------------------------------- libri-light


def test_librilight_limited_subsets_and_folds(ws, tmp_path):
    root = tmp_path / "librispeech_finetuning"
    spk = 100
    expected: dict[str, set[str]] = {"0": set(), "1": set(), "9h": set()}
    for fold in ("0", "1"):
        for tag in ("clean", "other"):
            spk += 1
            _chapter(root / "1h" / fold / tag, spk, 10, {0: "ONE", 1: "TWO"})
            expected[fold] |= {f"{spk}-10-0000", f"{spk}-10-0001"}
    for tag in ("clean", "other"):
        spk += 1
        _chapter(root / "9h" / tag, spk, 20, {0: "NINE"})
        expected["9h"].add(f"{spk}-20-0000")
    (root / "phones").mkdir()
    P.prepare_librilight_limited(ws, tmp_path)  # the parent of librispeech_finetuning/ works too
    ids = {s: {r.id for r in read_manifest(ws.manifest(s))} for s in LIMITED_SPLITS}
    assert ids["train-10min"] == expected["0"]
    assert ids["train-1h"] == expected["0"] | expected["1"]
    assert ids["train-10h"] == expected["0"] | expected["1"] | expected["9h"]
    P.prepare_librilight_limited(ws, root, fold=1)
    assert {r.id for r in read_manifest(ws.manifest("train-10min"))} == expected["1"]
    with pytest.raises(P.PrepareError, match="no fold 7 .*folds: 0, 1"):
        P.prepare_librilight_limited(ws, root, fold=7)


def test_vad_segments_group_chunks_within_the_limit():
    # Chunks (s): two short ones close together, one 25 s chunk, then short ones again.
    vad = [[0.5, 2.0], [2.5, 5.0], [6.0, 31.0], [31.5, 33.0], [34.0, 36.0], [36.2, 50.0]]
    segs = vad_segments(vad, num_samples=45 * SR, max_seconds=10)
    sec = [(o / SR, (o + n) / SR) for o, n in segs]
    assert sec[0] == (0.5, 5.0)  # two chunks and the pause between them
    assert all(n <= 10 * SR for _, n in segs)
    # The 25 s chunk is split into 3 equal pieces that tile it exactly.
    assert sec[1][0] == 6.0 and sec[3][1] == 31.0
    assert [round(b - a, 3) for a, b in sec[1:4]] == [8.333, 8.333, 8.333]
    # Grouping keeps inner pauses; the last chunk is clipped to the file's end (45 s).
    assert sec[4:] == [(31.5, 36.0), (36.2, 45.0)]
    assert vad_segments([], 10 * SR, 30) == []


def test_librilight_unlabeled_segments(ws, tmp_path):
    sub = tmp_path / "librilight" / "small"
    book = sub / "100" / "sea_fairies_0812_librivox_64kb_mp3"
    # A file whose seconds are marked by frequency: second k is a tone at 200 + 100 k Hz.
    wav = np.concatenate([_wav(1.0, freq=200 + 100 * k) for k in range(12)])
    book.mkdir(parents=True)
    sf.write(str(book / "01_baum.flac"), wav, SR)
    (book / "01_baum.json").write_text(json.dumps({"speaker": "100", "snr": 9.0,
                                                   "voice_activity": [[1.0, 3.0], [3.5, 6.0], [7.0, 11.0]]}))
    sf.write(str(book / "02_baum.flac"), _wav(2.0), SR)  # no json: skipped
    summary = P.prepare_librilight(ws, tmp_path / "librilight", "small", max_seconds=5)
    s = summary.split("librilight-small")
    assert (s.utterances, s.skipped) == (2, {"bad-vad": 1})
    recs = read_manifest(ws.manifest("librilight-small"))
    assert [(r.offset, r.num_samples) for r in recs] == [(1 * SR, 5 * SR), (7 * SR, 4 * SR)]
    assert all(r.text == "" and r.speaker == "100" for r in recs)
    assert recs[0].id == "100-sea_fairies_0812_librivox_64kb_mp3-01_baum-0000"
    # The offset points at the right audio: second 7 of the file is the 900 Hz tone.
    seg, _ = read_audio(recs[1].path, recs[1].offset, SR // 2)
    spec = np.abs(np.fft.rfft(seg))
    assert np.fft.rfftfreq(len(seg), 1 / SR)[spec.argmax()] == pytest.approx(900, abs=4)
    assert P.prepare_librilight(ws, tmp_path / "librilight", "small", max_seconds=5).splits[0].status == "up to date"


# --------------------------------------------------------------------------- folder


def test_folder_sidecars_normalization_and_keep_text(ws, tmp_path):
    root = tmp_path / "my-audio"
    _write(root / "a.wav")
    (root / "a.txt").write_text("Hello, world!\n")
    _write(root / "sub" / "b.flac")
    (root / "sub" / "b.txt").write_text("ALREADY FINE")
    _write(root / "c.wav")  # no transcript
    summary = P.prepare_folder(ws, root)
    s = summary.split("my-audio")
    assert (s.utterances, s.normalized, s.skipped) == (2, 1, {"no-transcript": 1})
    assert any("1 transcript(s) changed by normalization" in n for n in summary.notes)
    assert "normalized" in [c.header for c in summary.table().columns]
    recs = {r.id: r for r in read_manifest(ws.manifest("my-audio"))}
    assert recs["a"].text == "HELLO WORLD" and recs["sub/b"].text == "ALREADY FINE"
    assert recs["sub/b"].speaker == "sub"
    # --keep-text in a workspace of its own: its dictionary holds the kept characters. (In a workspace
    # whose dictionary lacks them it is an error: tests/test_prepare_guards.py.)
    own = Workspace.resolve(tmp_path / "raw-ws")
    P.prepare_folder(own, root, split="raw", keep_text=True)
    raw = {r.id: r.text for r in read_manifest(own.manifest("raw"))}
    assert raw == {"a": "Hello, world!", "sub/b": "ALREADY FINE"}
    assert {"e", ",", "!"} <= set(Vocab.load(own.dictionary).symbols)


@pytest.mark.parametrize("table", [
    "path,text\na.wav,\"Hi, there\"\nsub/b.wav,bye\n",
    "file_name\ttranscription\na.wav\tHi, there\nsub/b.wav\tbye\n",
    "a.wav,Hi, there\n{root}/sub/b.wav,bye\n",  # no header, absolute path, unquoted comma in the text
])
def test_folder_transcript_table(ws, tmp_path, table):
    root = tmp_path / "corpus"
    _write(root / "a.wav")
    _write(root / "sub" / "b.wav")
    (tmp_path / "t.csv").write_text(table.format(root=root))
    P.prepare_folder(ws, root, split="tab", transcripts=tmp_path / "t.csv")
    assert {r.id: r.text for r in read_manifest(ws.manifest("tab"))} == {"a": "HI THERE", "sub/b": "BYE"}


def test_folder_sample_rate_and_resample(tmp_path):
    root = tmp_path / "cv"
    ws = Workspace.resolve(root / "work")  # inside the folder: its resampled audio must not be re-read
    for k in range(3):
        _write(root / f"clip{k}.wav", seconds=0.5, sr=48_000, channels=2)
        (root / f"clip{k}.txt").write_text("a clip")
    with pytest.raises(P.PrepareError, match="3 of 3 audio files .*48000 Hz, 2 channels.*--resample"):
        P.prepare_folder(ws, root)
    summary = P.prepare_folder(ws, root, resample=True, workers=1)
    assert summary.split("cv").utterances == 3
    for r in read_manifest(ws.manifest("cv")):
        assert Path(r.path).parent == ws.data_dir / "audio" / "cv"
        wav, sr = read_audio(r.path)
        assert (sr, wav.ndim, len(wav), r.num_samples) == (SR, 1, SR // 2, SR // 2)
    (root / "clip0.txt").write_text("changed")  # force a rescan
    assert P.prepare_folder(ws, root, resample=True, workers=1).split("cv").utterances == 3


def test_folder_unlabeled(ws, tmp_path):
    root = tmp_path / "unlab"
    _write(root / "x.flac")
    summary = P.prepare_folder(ws, root)
    assert summary.dictionary is None and "unlabeled" in summary.notes[0]
    assert read_manifest(ws.manifest("unlab"))[0].text == ""


# --------------------------------------------------------------------------- fairseq


def test_fairseq_export_import_round_trip(ws, libri, tmp_path):
    P.prepare_librispeech(ws, libri)
    out = tmp_path / "fairseq"
    summary = P.fairseq_export(ws, out)
    assert summary.split("dev-clean").status == "written"
    tsv = (out / "dev_clean.tsv").read_text().splitlines()
    root = libri.resolve() / "LibriSpeech" / "dev-clean"
    assert tsv[0] == str(root)
    assert tsv[1] == f"19/198/19-198-0000.flac\t{SR}"
    assert (out / "dev_clean.ltr").read_text().splitlines()[:2] == ["H E L L O | W O R L D |", "I T ' S | M E |"]
    assert (out / "dev_clean.wrd").read_text().splitlines()[0] == "HELLO WORLD"
    assert (out / "dict.ltr.txt").read_text() == ws.dictionary.read_text()
    assert P.fairseq_export(ws, out).split("dev-clean").status == "up to date"

    ws2 = Workspace.resolve(tmp_path / "ws2")
    imported = P.prepare_fairseq_import(ws2, out)
    assert [s.split for s in imported.splits] == ["dev-clean", "test-clean"]
    for split in ("dev-clean", "test-clean"):
        assert read_manifest(ws2.manifest(split)) == read_manifest(ws.manifest(split))
    # Labels are optional: a .tsv alone gives an unlabeled manifest.
    (out / "dev_clean.ltr").unlink()
    (out / "dev_clean.wrd").unlink()
    P.prepare_fairseq_import(ws2, out, splits=["dev_clean"])
    assert {r.text for r in read_manifest(ws2.manifest("dev-clean"))} == {""}


def test_fairseq_export_refuses_segments(ws, tmp_path):
    book = tmp_path / "ll" / "small" / "1" / "b"
    book.mkdir(parents=True)
    sf.write(str(book / "f.flac"), _wav(3.0), SR)
    (book / "f.json").write_text(json.dumps({"voice_activity": [[0.5, 2.5]]}))
    P.prepare_librilight(ws, tmp_path / "ll", "small")
    with pytest.raises(P.PrepareError, match="offset"):
        P.fairseq_export(ws, tmp_path / "fs", ["librilight-small"])


# --------------------------------------------------------------------------- scan, CLI, audio


def test_scan_headers_pool_matches_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "POOL_MIN_FILES", 0)  # use the pools even for 7 files
    paths = [_write(tmp_path / f"{k}.flac", seconds=0.05 * (k + 1)) for k in range(6)]
    (tmp_path / "bad.flac").write_bytes(b"not audio")
    paths.append(tmp_path / "bad.flac")
    serial = scan_headers(paths, workers=1)
    assert [h.frames for h in serial[:6]] == [int(0.05 * (k + 1) * SR) for k in range(6)]
    assert serial[6].error.startswith("unreadable")
    for pool in ("process", "thread"):
        assert scan_headers(paths, workers=2, pool=pool, batch=2) == serial


def test_cli_prepare_librispeech(tmp_path, libri, monkeypatch):
    monkeypatch.delenv(ENV_LIBRISPEECH, raising=False)
    runner = CliRunner()
    res = runner.invoke(app, ["prepare", "librispeech", "-w", str(tmp_path / "w")])
    assert res.exit_code == 2 and "--root" in res.output
    res = runner.invoke(app, ["prepare", "librispeech", "--root", str(libri), "--splits", "test-clean",
                              "-w", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    assert "test-clean" in res.output and "written" in res.output
    assert (tmp_path / "w" / "data" / "test-clean.jsonl").exists()


def _peak_hz(x: np.ndarray, sr: int) -> float:
    x = x[len(x) // 8: -len(x) // 8]
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


def test_resample_keeps_tones_and_removes_aliases():
    sr = 44_100
    t = np.arange(sr) / sr
    tone = np.sin(2 * np.pi * 1000 * t).astype(np.float32)
    y = resample(tone, sr, SR)
    assert len(y) == SR and _peak_hz(y, SR) == pytest.approx(1000, abs=2)
    assert np.sqrt(np.mean(y[SR // 8: -SR // 8] ** 2)) == pytest.approx(np.sqrt(0.5), rel=0.01)
    # 11 kHz is above the new Nyquist (8 kHz): it must vanish, not fold back to 5 kHz.
    high = np.sin(2 * np.pi * 11_000 * t).astype(np.float32)
    assert np.sqrt(np.mean(resample(high, sr, SR)[SR // 8: -SR // 8] ** 2)) < 1e-3
    up = resample(np.sin(2 * np.pi * 440 * np.arange(8000) / 8000).astype(np.float32), 8000, SR)
    assert len(up) == SR and _peak_hz(up, SR) == pytest.approx(440, abs=2)
    stereo = np.stack([tone, -tone], 1)
    assert to_mono_16k(stereo, sr).shape == (SR,) and np.abs(to_mono_16k(stereo, sr)).max() < 1e-5


def test_read_audio_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.flac"
    bad.write_bytes(b"garbage")
    with pytest.raises(AudioError, match="broken.flac"):
        read_audio(bad)
    good = _write(tmp_path / "ok.wav", seconds=0.5, channels=2)
    wav, sr = read_audio(good, offset=100, num_samples=50)
    assert wav.shape == (50, 2) and wav.dtype == np.float32 and sr == SR
