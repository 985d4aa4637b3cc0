"""The synthetic corpus: LibriSpeech layout, determinism, and letters a model can tell apart.

    python -m pytest -q tests/test_synthetic.py
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import soundfile as sf

from d2vcli import synthetic
from d2vcli.manifest import num_frames, read_manifest
from d2vcli.vocab import LIBRISPEECH_LETTERS, to_letters


def _corpus_dir(ws) -> Path:
    return ws.root / "corpus" / "synthetic"


def test_layout_matches_librispeech(synthetic_workspace):
    root = _corpus_dir(synthetic_workspace) / "LibriSpeech"
    size = synthetic.SIZES["tiny"]
    speakers_by_split = {}
    for split in synthetic.SPLITS:
        flacs = sorted((root / split).glob("*/*/*.flac"))
        per_chapter = size.train_utts_per_chapter if split == "train" else size.eval_utts_per_chapter
        n_spk = size.train_speakers if split == "train" else size.eval_speakers
        assert len(flacs) == n_spk * size.chapters_per_speaker * per_chapter
        speakers_by_split[split] = {f.parent.parent.name for f in flacs}
        for f in flacs:
            spk, chapter = f.parent.parent.name, f.parent.name
            assert re.fullmatch(rf"{spk}-{chapter}-\d{{4}}\.flac", f.name)
            info = sf.info(str(f))
            assert (info.samplerate, info.channels, info.format) == (16_000, 1, "FLAC")
            assert 1.5 <= info.duration <= 5.0
        for trans in (root / split).glob("*/*/*.trans.txt"):
            spk, chapter = trans.parent.parent.name, trans.parent.name
            assert trans.name == f"{spk}-{chapter}.trans.txt"
            ids = [ln.split(" ", 1)[0] for ln in trans.read_text().splitlines()]
            assert ids == sorted(p.stem for p in trans.parent.glob("*.flac"))
    # Every speaker belongs to one split, and SPEAKERS.TXT says which.
    all_ids = [s for ids in speakers_by_split.values() for s in ids]
    assert len(all_ids) == len(set(all_ids))
    rows = [ln.split("|") for ln in (root / "SPEAKERS.TXT").read_text().splitlines() if not ln.startswith(";")]
    assert {r[0].strip(): r[2].strip() for r in rows} == {s: split for split, ids in speakers_by_split.items()
                                                          for s in ids}


def test_text_fits_librispeech_letters_and_ctc(synthetic_workspace):
    ws = synthetic_workspace
    lm_lines = (_corpus_dir(ws) / "lm-text.txt").read_text().splitlines()
    assert len(lm_lines) == synthetic.SIZES["tiny"].lm_sentences
    words = set()
    for line in lm_lines:
        assert re.fullmatch(r"[A-Z']+( [A-Z']+){1,5}", line), line
        words.update(line.split())
    assert set("".join(words)) <= set(LIBRISPEECH_LETTERS)
    vocabulary = {w for ws_ in synthetic.WORDS.values() for w in ws_}
    assert 40 <= len(vocabulary) <= 80 and words <= vocabulary
    for split in synthetic.SPLITS:
        for r in read_manifest(ws.manifest(split)):
            # At 50 frames/s each letter has room for itself and a blank.
            assert 2 * len(to_letters(r.text).split()) <= num_frames(r.num_samples), r.text
    # The LM text shares the test sentences' language: their words all occur in it.
    test_words = {w for r in read_manifest(ws.manifest("test-clean")) for w in r.text.split()}
    assert test_words <= vocabulary


def test_generation_is_deterministic(synthetic_workspace, tmp_path):
    ref = _corpus_dir(synthetic_workspace)
    again = synthetic.generate_corpus(tmp_path / "a", size="tiny", seed=0)
    other = synthetic.generate_corpus(tmp_path / "b", size="tiny", seed=1)
    assert again.utterances == other.utterances
    rel = sorted(p.relative_to(ref) for p in ref.rglob("*") if p.is_file())
    assert rel == sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for p in rel:
        if p.suffix == ".flac":
            assert np.array_equal(sf.read(ref / p)[0], sf.read(tmp_path / "a" / p)[0]), p
        elif p.name != "corpus.json":  # corpus.json names its own directory
            assert (ref / p).read_bytes() == (tmp_path / "a" / p).read_bytes(), p
    assert (tmp_path / "b" / "lm-text.txt").read_text() != (ref / "lm-text.txt").read_text()


def test_generate_is_idempotent_and_protects_other_dirs(tmp_path):
    out = tmp_path / "c"
    synthetic.generate_corpus(out, size="tiny", seed=3)
    flac = next(out.rglob("*.flac"))
    mtime = flac.stat().st_mtime_ns
    synthetic.generate_corpus(out, size="tiny", seed=3)
    assert flac.stat().st_mtime_ns == mtime  # reused, not regenerated
    synthetic.generate_corpus(out, size="tiny", seed=4)  # our own corpus with other params: replaced
    assert not flac.exists() or flac.stat().st_mtime_ns != mtime
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    try:
        synthetic.generate_corpus(foreign, size="tiny")
    except FileExistsError as e:
        assert "not a d2v synthetic corpus" in str(e)
    else:
        raise AssertionError("generate_corpus overwrote a directory it did not make")
    assert (foreign / "notes.txt").read_text() == "keep me"


def _spectrum(x: np.ndarray) -> np.ndarray:
    """Log band energies (64 bands over 0-8 kHz) of one phone."""
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x)), 4096)) ** 2
    bands = mag[: 64 * 32].reshape(64, 32).sum(1)
    return np.log(bands + 1e-6)


def test_letters_are_distinguishable_across_speakers():
    """Nearest-centroid on phone spectra, centroids from some speakers, tested on others.

    All letters are told apart, except the deliberately confusable pairs (M/N, D/T),
    which are the closest letters in the spectral space.
    """
    rng = np.random.default_rng(0)

    def speakers(n, seed):
        r = np.random.default_rng(seed)
        return [synthetic._make_speaker(r, k, "F" if k % 2 else "M", "other") for k in range(n)]

    letters = synthetic.LETTERS
    train = {c: np.mean([_spectrum(synthetic._phone_audio(c, s, rng)) for s in speakers(12, 1)], 0) for c in letters}
    merged = {"N": "M", "T": "D"}
    correct = total = 0
    for s in speakers(8, 2):
        for c in letters:
            x = _spectrum(synthetic._phone_audio(c, s, rng))
            guess = min(letters, key=lambda k: np.sum((train[k] - x) ** 2))
            correct += merged.get(guess, guess) == merged.get(c, c)
            total += 1
    assert correct / total >= 0.95
    dist = {(a, b): np.sum((train[a] - train[b]) ** 2) for a in letters for b in letters if a < b}
    closest = sorted(dist, key=dist.get)[:2]
    assert set(closest) == {("M", "N"), ("D", "T")}
