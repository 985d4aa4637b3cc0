"""`d2v prepare` never loses or hides data (issue 15, cases 1, 2, 3, 4, 7, 8, 14 and 17).

Each test reproduces one way that bad input, a mistake or a second process used to lose data or
hide a problem, and checks the guard: truncated audio is found at prepare time, an empty result
never replaces a manifest, converted audio follows its source, the dictionary never changes
behind the user's back, symlink loops are reported, listed audio that is missing is named, two
prepares cannot interleave their writes, and killed runs' temp files are cleaned up.

    python -m pytest -q tests/test_prepare_guards.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from d2vcli import fileio
from d2vcli import prepare as P
from d2vcli.cli import app
from d2vcli.decode.run import decode
from d2vcli.evaluate import evaluate
from d2vcli.fileio import atomic_write_text, is_stale_temp, remove_stale_temps
from d2vcli.lm.prepare import prepare_lm
from d2vcli.locks import LockError, hold
from d2vcli.manifest import ManifestError, read_manifest
from d2vcli.prepare import pipeline
from d2vcli.vocab import Vocab
from d2vcli.workspace import Workspace

SR = 16_000
REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, seconds: float = 1.0, sr: int = SR, channels: int = 1, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    x = (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(0).standard_normal(len(t)))
    x = np.stack([x] * channels, 1) if channels > 1 else x
    sf.write(str(path), x.astype(np.float32), sr, format=path.suffix.lstrip(".").upper())
    return path


def _chapter(split_dir: Path, spk: int, chapter: int, texts: dict[int, str]) -> Path:
    d = split_dir / str(spk) / str(chapter)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{spk}-{chapter}.trans.txt").write_text("".join(f"{spk}-{chapter}-{u:04d} {t}\n" for u, t in texts.items()))
    for u in texts:
        _write(d / f"{spk}-{chapter}-{u:04d}.flac")
    return d


def _skip_rows(ws: Workspace, split: str) -> list[list[str]]:
    return [ln.split("\t") for ln in (ws.data_dir / f"skipped-{split}.tsv").read_text().splitlines()[1:]]


def _symbols(dictionary: bytes) -> list[str]:
    return [ln.split()[0] for ln in dictionary.decode().splitlines()]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace.resolve(tmp_path / "ws")


@pytest.fixture
def libri(tmp_path) -> Path:
    """LibriSpeech/dev-clean with two chapters (3 utterances)."""
    root = tmp_path / "LibriSpeech"
    _chapter(root / "dev-clean", 19, 198, {0: "HELLO WORLD", 1: "IT'S ME"})
    _chapter(root / "dev-clean", 103, 1240, {0: "CHAPTER ONE"})
    return root


def _truncate(path: Path, keep: int) -> None:
    """What `head -c KEEP good.flac > x.flac` does: the header survives, the frames are cut."""
    data = path.read_bytes()
    assert len(data) > keep
    path.write_bytes(data[:keep])


# --------------------------------------------------------------------------- case 1: truncated audio


def test_truncated_flac_is_skipped_and_strict_makes_it_an_error(ws, tmp_path):
    d = tmp_path / "d"
    _write(d / "good.flac", seconds=5.0)
    (d / "good.txt").write_text("GOOD ONE")
    _write(d / "x.flac", seconds=5.0)
    _truncate(d / "x.flac", 40_000)
    (d / "x.txt").write_text("HELLO")
    assert sf.info(str(d / "x.flac")).frames == 5 * SR  # the header still promises 5 s
    with pytest.raises(P.PrepareError, match=r"--strict: .*x\.flac would be skipped \(unreadable: .*truncated"):
        P.prepare_folder(ws, d, split="train", strict=True)
    assert not ws.manifest("train").exists()
    s = P.prepare_folder(ws, d, split="train").split("train")
    assert (s.utterances, s.skipped) == (1, {"unreadable": 1})
    [[path, reason, detail]] = _skip_rows(ws, "train")
    assert (Path(path).name, reason) == ("x.flac", "unreadable") and "truncated or corrupt" in detail
    assert [r.id for r in read_manifest(ws.manifest("train"))] == ["good"]


def test_a_file_cut_in_its_last_block_is_found_too(ws, tmp_path):
    d = tmp_path / "d"
    _write(d / "x.flac", seconds=2.0)
    _truncate(d / "x.flac", (d / "x.flac").stat().st_size - 50)
    _write(d / "y.flac", seconds=2.0)
    s = P.prepare_folder(ws, d, split="u").split("u")
    assert s.skipped == {"unreadable": 1} and [Path(p).name for p, _, _ in _skip_rows(ws, "u")] == ["x.flac"]


def test_the_stamp_covers_the_checks_and_a_fixed_file_is_noticed(ws, tmp_path, monkeypatch):
    d = tmp_path / "d"
    _write(d / "good.flac", seconds=3.0)
    _write(d / "x.flac", seconds=3.0)
    _truncate(d / "x.flac", 20_000)
    # A run that only read headers (as d2v did before) accepts the cut file ...
    monkeypatch.setattr(pipeline, "TAIL_FRAMES", 0)
    assert P.prepare_folder(ws, d, split="u").split("u").utterances == 2
    # ... and its stamp does not make a run that checks more "up to date".
    monkeypatch.undo()
    again = P.prepare_folder(ws, d, split="u").split("u")
    assert (again.status, again.utterances, again.skipped) == ("written", 1, {"unreadable": 1})
    assert P.prepare_folder(ws, d, split="u").split("u").status == "up to date"
    # Fixing the file (a fresh copy) changes its size and mtime: the next run takes it in.
    _write(d / "x.flac", seconds=3.0)
    fixed = P.prepare_folder(ws, d, split="u").split("u")
    assert (fixed.status, fixed.utterances, fixed.skipped) == ("written", 2, {})
    assert not (ws.data_dir / "skipped-u.tsv").exists()


# --------------------------------------------------------------------------- case 3: empty results


def test_an_empty_result_never_replaces_a_good_manifest(ws, libri):
    P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"])
    before = ws.manifest("dev-clean").read_bytes()
    # All-lowercase transcripts: every utterance would be skipped as out-of-vocab.
    for trans in libri.rglob("*.trans.txt"):
        lines = [ln.split(" ", 1) for ln in trans.read_text().splitlines()]
        trans.write_text("".join(f"{uid} {text.lower()}\n" for uid, text in lines))
    with pytest.raises(P.PrepareError, match=r"split 'dev-clean' would be empty: all 3 audio file\(s\) .*"
                                             r"3 out-of-vocab.*skipped-dev-clean\.tsv.*\(3 utterances.*was kept"):
        P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"])
    assert ws.manifest("dev-clean").read_bytes() == before
    assert {r for _, r, _ in _skip_rows(ws, "dev-clean")} == {"out-of-vocab"}


def test_an_empty_split_directory_and_a_missing_trans_txt_are_errors(ws, libri):
    P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"])
    before = ws.manifest("dev-clean").read_bytes()
    (libri / "test-clean").mkdir()
    with pytest.raises(P.PrepareError, match=r"split 'test-clean' would be empty: no audio files were found in "
                                             r".*test-clean.*no manifest was written"):
        P.prepare_librispeech(ws, libri.parent, splits=["test-clean"])
    assert not ws.manifest("test-clean").exists()
    for trans in libri.rglob("*.trans.txt"):
        trans.unlink()
    with pytest.raises(P.PrepareError, match=r"would be empty: .*3 no-transcript"):
        P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"])
    assert ws.manifest("dev-clean").read_bytes() == before


def test_strict_makes_any_skip_fatal_and_lists_every_one(ws, libri):
    d = libri / "dev-clean" / "19" / "198"
    (d / "19-198-0001.flac").write_bytes(b"")
    (d / "19-198-0000.flac").write_bytes(os.urandom(3000))
    with pytest.raises(P.PrepareError, match=r"--strict: .*2 problem\(s\) .*all listed in .*skipped-dev-clean\.tsv"):
        P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"], strict=True)
    assert not ws.manifest("dev-clean").exists()
    assert sorted(r for _, r, _ in _skip_rows(ws, "dev-clean")) == ["empty", "unreadable"]


def test_the_cli_reports_an_empty_split_in_one_line_with_exit_2(tmp_path):
    (tmp_path / "empty" / "LibriSpeech" / "dev-clean").mkdir(parents=True)
    res = CliRunner().invoke(app, ["prepare", "librispeech", "--root", str(tmp_path / "empty"), "--splits",
                                   "dev-clean", "--workdir", str(tmp_path / "ws")])
    assert res.exit_code == 2, res.output
    assert "would be empty" in res.output and "Traceback" not in res.output


def test_decode_and_evaluate_refuse_an_empty_split(tmp_path, random_ctc_checkpoint):
    ws = Workspace.resolve(tmp_path / "ws")
    ws.data_dir.mkdir(parents=True)
    ws.manifest("dev-clean").write_text("")
    for run in (decode, evaluate):
        with pytest.raises(ManifestError, match=r"split 'dev-clean' has no utterances: .*dev-clean\.jsonl is empty"):
            run(ws, checkpoint=str(random_ctc_checkpoint), splits=["dev-clean"], lm=None)


# --------------------------------------------------------------------------- case 4: stale converted audio


def test_resample_converts_a_different_source_with_the_same_id_again(ws, tmp_path):
    root = tmp_path / "cv"
    _write(root / "clip.wav", seconds=0.5, sr=48_000)
    (root / "clip.txt").write_text("a clip")
    P.prepare_folder(ws, root, resample=True, workers=1)
    [old] = read_manifest(ws.manifest("cv"))
    assert old.num_samples == SR // 2
    # Another recording under the same name, copied with its (older) modification time kept,
    # as `cp -p` and rsync do: older than the converted file, which must not be reused.
    (root / "clip.wav").unlink()
    _write(root / "clip.wav", seconds=1.0, sr=48_000, freq=900.0)
    past = time.time() - 86_400
    os.utime(root / "clip.wav", (past, past))
    P.prepare_folder(ws, root, resample=True, workers=1)
    [new] = read_manifest(ws.manifest("cv"))
    assert new.num_samples == SR and sf.info(new.path).frames == SR
    assert new.path != old.path and not Path(old.path).exists()  # the stale conversion is gone
    assert [p.name for p in (ws.data_dir / "audio" / "cv").iterdir()] == [Path(new.path).name]


# --------------------------------------------------------------------------- case 7: the shared dictionary


def test_keep_text_never_rewrites_the_workspace_dictionary(ws, libri, tmp_path):
    P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"])
    dictionary = ws.dictionary.read_bytes()
    folder = tmp_path / "mine"
    _write(folder / "a.wav")
    (folder / "a.txt").write_text("Hello, world! 🙂")
    with pytest.raises(P.PrepareError, match=r"split 'raw' has characters that are not in the workspace's letter "
                                             r"dictionary .*dict\.ltr\.txt: .*'e'.*--keep-text.*--workdir"):
        P.prepare_folder(ws, folder, split="raw", keep_text=True)
    assert ws.dictionary.read_bytes() == dictionary
    assert not ws.manifest("raw").exists()
    assert P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"]).split("dev-clean").status == "up to date"
    # Kept text that fits the dictionary is fine: its symbols (the label indices) stay, only counts change.
    (folder / "a.txt").write_text("HELLO WORLD")
    assert P.prepare_folder(ws, folder, split="raw", keep_text=True).split("raw").utterances == 1
    assert _symbols(ws.dictionary.read_bytes()) == _symbols(dictionary)


def test_the_dictionary_symbols_never_change_once_written(ws, tmp_path):
    folder = tmp_path / "mine"
    _write(folder / "a.wav")
    (folder / "a.txt").write_text("abc ab a")
    P.prepare_folder(ws, folder, split="one", keep_text=True)
    first = [ln.split()[0] for ln in ws.dictionary.read_text().splitlines()]
    # More of the same letters in another order of frequency: a rebuild would reorder the indices.
    (folder / "a.txt").write_text("c c c b b a")
    P.prepare_folder(ws, folder, split="two", keep_text=True)
    assert [ln.split()[0] for ln in ws.dictionary.read_text().splitlines()] == first


# --------------------------------------------------------------------------- case 8: symlink loops


def test_symlink_loops_are_skipped_and_reported_not_a_traceback(ws, libri, tmp_path):
    chapter = libri / "dev-clean" / "19" / "198"
    os.symlink("..", chapter / "loop")  # dev-clean/19/198/loop -> dev-clean/19
    os.symlink("self", chapter / "self")  # a link to itself: ELOOP on stat
    s = P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"]).split("dev-clean")
    assert s.utterances == 3 and s.skipped == {"symlink-loop": 2}
    rows = {Path(p).name: (r, d) for p, r, d in _skip_rows(ws, "dev-clean")}
    assert rows["loop"][0] == "symlink-loop" and "links back to" in rows["loop"][1]
    assert rows["self"][0] == "symlink-loop"
    # prepare folder, from the CLI: a summary and exit 0, and the loop named.
    folder = tmp_path / "f"
    _write(folder / "sub" / "a.wav")
    os.symlink("..", folder / "sub" / "up")
    os.symlink(folder / "sub", folder / "alias")  # a second way to the same directory, not a loop
    res = CliRunner().invoke(app, ["prepare", "folder", str(folder), "--workdir", str(ws.root)])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output and "symlink-loop" in res.output
    assert len(read_manifest(ws.manifest("f"))) == 1  # the file once, not once per way to it
    assert sorted(r for _, r, _ in _skip_rows(ws, "f")) == ["duplicate-dir", "symlink-loop"]


# --------------------------------------------------------------------------- case 14: listed audio missing


def test_a_listing_names_its_missing_audio_and_strict_fails(ws, tmp_path):
    root = tmp_path / "corpus"
    _write(root / "a.wav")
    _write(root / "b.wav")
    table = tmp_path / "t.tsv"
    table.write_text("path\ttext\na.wav\tHELLO\nb.wav\tTHERE\ngone.wav\tLOST ONE\n")
    s = P.prepare_folder(ws, root, split="tab", transcripts=table).split("tab")
    assert (s.utterances, s.skipped) == (2, {"no-audio": 1})
    [[path, reason, detail]] = _skip_rows(ws, "tab")
    assert (path, reason) == (str(root / "gone.wav"), "no-audio") and "t.tsv" in detail
    with pytest.raises(P.PrepareError, match=r"--strict: .*gone\.wav would be skipped \(no-audio"):
        P.prepare_folder(ws, root, split="tab", transcripts=table, strict=True)


# --------------------------------------------------------------------------- case 2: concurrent prepares


def test_a_second_prepare_of_a_split_is_refused_while_the_first_writes(ws, libri):
    code = ("import sys, time; from pathlib import Path; from d2vcli.locks import hold\n"
            "with hold(Path(sys.argv[1]), 'prepare of split dev-clean'):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    other = subprocess.Popen([sys.executable, "-c", code, str(ws.data_dir / ".dev-clean.lock"), "--fake-flag"],
                             stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"is locked by pid {other.pid} .*--fake-flag.* since .*wait for it"):
            P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"])
        assert not ws.manifest("dev-clean").exists()
    finally:
        other.kill()
        other.wait()
    # The kernel dropped the killed holder's lock: the next run goes ahead.
    assert P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"]).split("dev-clean").utterances == 3


def test_a_prepare_waits_for_a_short_dictionary_update_by_another(ws, libri):
    code = ("import sys, time; from pathlib import Path; from d2vcli.locks import hold\n"
            "with hold(Path(sys.argv[1]), 'update of the letter dictionary'):\n"
            "    print('held', flush=True); time.sleep(1.5)\n"
            "    print('letting go at', time.time(), flush=True)\n")
    other = subprocess.Popen([sys.executable, "-c", code, str(ws.data_dir / ".dict.ltr.txt.lock")],
                             stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert other.stdout.readline().strip() == "held"
        assert P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"]).split("dev-clean").utterances == 3
        done = time.time()
        # The holder stamps the time just before it lets go, so a prepare that waited ends after it;
        # the holder's process exit may lag behind its release, so its exit is not what is checked.
        let_go = float(other.stdout.readline().split()[-1])
        assert done > let_go
    finally:
        other.kill()
        other.wait()


def test_prepare_lm_is_refused_while_another_writes_lm(ws, tmp_path):
    Vocab.librispeech().save(ws.dictionary)
    text = tmp_path / "text.txt"
    text.write_text("HELLO WORLD\n")
    with hold(ws.root / ".lm.lock", "d2v prepare lm"):
        with pytest.raises(LockError, match=rf"d2v prepare lm is locked by pid {os.getpid()} .*lm\.lock"):
            prepare_lm(ws, text=text, order=2)


# --------------------------------------------------------------------------- case 17: leftovers


def _killed_writer(target: Path) -> None:
    """A process killed (SIGKILL) in the middle of an atomic write of `target`."""
    code = ("import os, sys; from pathlib import Path; from d2vcli.fileio import atomic_open\n"
            "with atomic_open(Path(sys.argv[1])) as fh:\n"
            "    fh.write('x' * 1000); fh.flush(); os.kill(os.getpid(), 9)\n")
    res = subprocess.run([sys.executable, "-c", code, str(target)], env=_env())
    assert res.returncode == -signal.SIGKILL


def test_the_next_prepare_removes_temp_files_of_a_killed_run_only(ws, libri):
    _killed_writer(ws.manifest("dev-clean"))
    _killed_writer(ws.data_dir / "audio" / "dev-clean" / "19-198-0000.abc.flac")
    leftovers = set(ws.data_dir.rglob(".*.tmp"))
    assert len(leftovers) == 2
    # A live writer's temp file stays: it is still being written.
    code = ("import sys, time; from pathlib import Path; from d2vcli.fileio import atomic_open\n"
            "with atomic_open(Path(sys.argv[1])) as fh:\n"
            "    print('open', flush=True); time.sleep(60)\n")
    live = subprocess.Popen([sys.executable, "-c", code, str(ws.data_dir / "other.jsonl")], stdout=subprocess.PIPE,
                            text=True, env=_env())
    try:
        assert live.stdout.readline().strip() == "open"
        [live_tmp] = set(ws.data_dir.rglob(".*.tmp")) - leftovers
        P.prepare_librispeech(ws, libri.parent, splits=["dev-clean"])
        assert not any(p.exists() for p in leftovers)
        assert live_tmp.exists()
    finally:
        live.kill()
        live.wait()


def test_only_our_temp_names_of_dead_or_long_gone_writers_are_stale(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    mine = tmp_path / f"{fileio._temp_prefix('a.jsonl')}k2j3h4g5.tmp"
    gone = tmp_path / mine.name.replace(f".{os.getpid()}.", f".{pid}.")
    legacy = tmp_path / ".b.jsonl.abcd1234.tmp"  # the name before host and pid were in it
    other_host = tmp_path / f".c.jsonl.elsewhere.{pid}.zzzz9999.tmp"
    user = tmp_path / ".notes.tmp"  # not our naming: never touched
    for p in (mine, gone, legacy, other_host, user):
        p.write_text("x")
    assert not is_stale_temp(mine) and is_stale_temp(gone)
    assert not is_stale_temp(legacy) and not is_stale_temp(other_host) and not is_stale_temp(user)
    old = time.time() - 2 * 86_400
    for p in (legacy, other_host, user):
        os.utime(p, (old, old))
    assert is_stale_temp(legacy) and is_stale_temp(other_host) and not is_stale_temp(user)
    assert sorted(p.name for p in remove_stale_temps(tmp_path)) == sorted([gone.name, legacy.name, other_host.name])
    assert mine.exists() and user.exists()
    atomic_write_text(tmp_path / "done.txt", "ok")  # the naming atomic_open uses still renames into place
    assert (tmp_path / "done.txt").read_text() == "ok" and not list(tmp_path.glob(".done.txt.*"))
