"""Issue 15, runs and checkpoints: unreadable audio in loaders and decoding, the run lock,
--resume on a missing run, leftover temp files, checkpoint diagnoses, import/export overwrites."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from d2vcli import checkpoint as ck
from d2vcli import config as cfgmod
from d2vcli.checkpoint import CheckpointError, load_raw
from d2vcli.data import AudioDataset, BatchLoader, TooManyBadFiles
from d2vcli.decode.emissions import compute_emissions, load_emissions
from d2vcli.distributed import DistInfo
from d2vcli.fileio import OutputExistsError
from d2vcli.interop import InteropError, export_hf, import_fairseq, import_hf
from d2vcli.locks import LockError, hold
from d2vcli.manifest import Record, read_manifest
from d2vcli.models.loading import load_ctc_model
from d2vcli.pretrain import pretrain
from d2vcli.run_dir import RunDirError, prepare_run, remove_leftovers, resume_wanted, run_lock
from d2vcli.workspace import Workspace

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
REPO = Path(__file__).resolve().parents[1]
TINY = ["data.max_tokens=64000", "data.max_sample_size=32000", "train.batch_seconds=4", "train.log_every=1",
        "data.num_workers=0"]


def _env() -> dict:
    # One thread each: these tests start two training processes at once, and two 2-thread torch
    # processes on 2 cores spin against each other (a 60-update run took 20-90 s instead of 10).
    return {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}


def _truncate(src: str, dst: Path) -> Path:
    data = Path(src).read_bytes()
    dst.write_bytes(data[: len(data) // 3])  # header intact, frames cut: `head -c` of the issue
    return dst


def _workspace_with_bad_file(synthetic_workspace, tmp_path, bad: int = 1) -> tuple[Workspace, list[str]]:
    """A workspace whose train manifest is the synthetic one with `bad` files truncated."""
    ws = Workspace.resolve(tmp_path / "ws")
    ws.data_dir.mkdir(parents=True)
    (ws.data_dir / "dict.ltr.txt").write_bytes(synthetic_workspace.dictionary.read_bytes())
    rows = [json.loads(line) for line in synthetic_workspace.manifest("train").read_text().splitlines()]
    paths = []
    for row in rows[:bad]:
        row["path"] = str(_truncate(row["path"], tmp_path / f"cut-{row['id']}.flac"))
        paths.append(row["path"])
    ws.manifest("train").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ws, paths


# ----------------------------------------------------------------------------- cases 1 and 9: loaders


def test_training_skips_a_truncated_flac_and_names_it_in_log_and_summary(synthetic_workspace, tmp_path):
    ws, (bad,) = _workspace_with_bad_file(synthetic_workspace, tmp_path)
    cfg = cfgmod.resolve("pretrain", preset="speech-tiny",
                         overrides=TINY + ["train.max_updates=17", "train.save_every=8", "data.train_splits=[train]"])
    result = pretrain(cfg, ws, name="skip-bad")  # 16 batches per epoch: every file is read
    assert result.status == "done", result.message
    assert bad in result.message and "--strict" in result.message  # the run's summary
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_file"] for r in rows if "skipped_file" in r] == [bad]  # named once, in the log
    assert ck.load_checkpoint(result.checkpoint)[ck.DATA_POSITION_KEY]["bad_files"].keys() == {bad}


def _bad_loader(synthetic_workspace, tmp_path, bad: int, **kw) -> tuple[BatchLoader, list[str]]:
    ws, paths = _workspace_with_bad_file(synthetic_workspace, tmp_path, bad)
    dataset = AudioDataset(read_manifest(ws.manifest("train")), normalize=True)
    return BatchLoader(dataset, "crop", 64000, seed=3, max_sample_size=32000, **kw), paths


def test_a_skipped_file_is_skipped_the_same_way_after_resume(synthetic_workspace, tmp_path):
    straight, (bad,) = _bad_loader(synthetic_workspace, tmp_path / "a", 1)
    whole = [(b.index, b.ids, b.source.numpy().copy()) for b in straight]
    assert bad in straight.bad_files and "cannot read audio" in straight.bad_files[bad]
    first, _ = _bad_loader(synthetic_workspace, tmp_path / "b", 1)
    it = iter(first)
    head = [next(it) for _ in range(len(whole) // 2)]
    resumed, _ = _bad_loader(synthetic_workspace, tmp_path / "c", 1)
    resumed.load_state_dict(first.state_dict())
    rest = [(b.index, b.ids, b.source.numpy()) for b in resumed]
    assert [b.index for b in head] + [r[0] for r in rest] == [w[0] for w in whole]
    for (i, ids, src), (j, ids2, src2) in zip(whole[len(head):], rest):
        assert ids == ids2 and np.array_equal(src, src2)
    assert [Path(p).name for p in resumed.bad_files] == [Path(bad).name]


def test_too_many_bad_files_stop_with_the_list_and_the_fix(synthetic_workspace, tmp_path):
    loader, paths = _bad_loader(synthetic_workspace, tmp_path, 3, max_bad_files=2)
    with pytest.raises(TooManyBadFiles) as e:
        list(loader)
    msg = str(e.value)
    assert all(p in msg for p in paths) and "data.max_bad_files=2" in msg and "--strict" in msg


def test_decoding_leaves_an_unreadable_file_out_and_reports_it(synthetic_workspace, random_ctc_checkpoint,
                                                               tmp_path, capsys):
    records = read_manifest(synthetic_workspace.manifest("dev-clean"))
    bad = _truncate(records[2].path, tmp_path / "cut.flac")
    records[2] = Record(id=records[2].id, path=str(bad), num_samples=records[2].num_samples, text=records[2].text)
    model, vocab, normalize, _ = load_ctc_model(random_ctc_checkpoint)
    em = compute_emissions(model, vocab, normalize, records, tmp_path / "dec", "dev-clean", "k1", torch.device("cpu"))
    assert records[2].id not in em.ids and len(em) == len(records) - 1
    assert list(em.skipped) == [str(bad)]
    good = records[3]
    np.testing.assert_array_equal(em[em.ids.index(good.id)].shape[0], em.lengths[em.ids.index(good.id)])
    cached = load_emissions(tmp_path / "dec", "dev-clean", "k1")
    assert cached is not None and list(cached.skipped) == [str(bad)] and cached.ids == em.ids
    for i in range(len(em)):
        np.testing.assert_array_equal(cached[i], em[i])
    bad.write_bytes(Path(records[3].path).read_bytes())  # fixed: the cache no longer stands
    assert load_emissions(tmp_path / "dec", "dev-clean", "k1") is None


# ----------------------------------------------------------------------------- case 2: the run lock


def test_the_lock_names_its_holder_and_dies_with_it(tmp_path):
    lock = tmp_path / "runs" / ".x.lock"
    with hold(lock, "run 'x'"):
        with pytest.raises(LockError, match=rf"run 'x' is locked by pid {os.getpid()} .* since .*another --name"):
            with hold(lock, "run 'x'", "wait for it to finish or pick another --name"):
                pass
    with hold(lock, "run 'x'"):  # released on exit
        pass
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; from d2vcli.locks import hold\n"
                              f"with hold({str(lock)!r}, 'run x'):\n print('held', flush=True); time.sleep(60)"],
                             env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=f"pid {child.pid}"):
            with hold(lock, "run 'x'"):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    with hold(lock, "run 'x'"):  # a killed holder leaves no stale lock
        pass


def test_two_runs_with_one_name_one_is_refused_and_the_other_intact(synthetic_workspace):
    cmd = [sys.executable, "-m", "d2vcli", "pretrain", "--preset", "speech-tiny", "--name", "dup",
           "--workdir", str(synthetic_workspace.root)]
    for s in TINY + ["train.max_updates=60", "train.save_every=20"]:
        cmd += ["--set", s]
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    second = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outs = [p.communicate(timeout=300) for p in (first, second)]
    codes = [first.returncode, second.returncode]
    # Whichever reaches the lock first trains (import times vary); the other is refused.
    assert sorted(codes) == [0, 2], outs
    refused_out, refused_err = outs[codes.index(2)]
    assert "is locked by pid" in refused_err and "another --name" in refused_err
    assert "Traceback" not in refused_err + refused_out
    run = synthetic_workspace.run_dir("dup")
    assert ck.load_checkpoint(run / "last.pt")[ck.STEP_KEY] == 60
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 61))  # one run's log, whole
    assert cfgmod.load_yaml(run / "config.yaml")["train"]["max_updates"] == 60


def test_a_full_disk_is_a_clear_error_and_leaves_the_checkpoints_intact(tmp_path, monkeypatch):
    """No room for a checkpoint, seen before writing or when the write fails (ENOSPC, or torch's
    "unexpected pos" of a short write): one CheckpointError with the sizes and the fix, the previous
    file untouched, no temp file left."""
    import errno
    import shutil

    path = tmp_path / "run" / "last.pt"
    ck.save_checkpoint(path, {ck.KIND_KEY: "pretrain", "model": {"w": torch.zeros(1000)}})
    before = path.read_bytes()
    newer = {ck.KIND_KEY: "pretrain", "model": {"w": torch.ones(1000)}}
    real_usage = shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1000))
    with pytest.raises(CheckpointError, match=r"needs about 0\.00 GB and .* has 0\.00 GB free.*--resume"):
        ck.save_checkpoint(path, newer)
    monkeypatch.setattr(ck.shutil, "disk_usage", real_usage)

    def failing_save(state, fh, error):
        fh.write(b"PK partial")
        raise error

    for error in (OSError(errno.ENOSPC, "No space left on device"),
                  RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1333200000 vs 1333199888")):
        monkeypatch.setattr(ck.torch, "save", lambda state, fh, e=error: failing_save(state, fh, e))
        with pytest.raises(CheckpointError, match="the write failed") as info:
            ck.save_checkpoint(path, newer)
        assert str(path) in str(info.value) and "keep_last" in str(info.value)
        assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]
    def buggy_save(state, fh):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(ck.torch, "save", buggy_save)
    with pytest.raises(RuntimeError, match="a real bug"):  # not a disk problem: not disguised as one
        ck.save_checkpoint(path, newer)


def test_pretrain_on_a_full_disk_exits_with_one_line(synthetic_workspace, monkeypatch):
    from typer.testing import CliRunner

    from d2vcli.cli import app

    real_usage = ck.shutil.disk_usage
    monkeypatch.setattr(ck.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))
    args = ["pretrain", "--preset", "speech-tiny", "--name", "full-disk", "--workdir", str(synthetic_workspace.root)]
    for s in TINY + ["train.max_updates=1"]:
        args += ["--set", s]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "error: cannot write checkpoint" in result.output and "Traceback" not in result.output
    assert "last.pt" in result.output


# ----------------------------------------------------------------------------- cases 13 and 17


def test_resume_of_a_missing_run_lists_the_runs_and_resume_if_exists_starts_fresh(tmp_path):
    ws = Workspace.resolve(tmp_path / "ws")
    _pretrain_checkpoint(ws.run_dir("base-run") / "last.pt")
    with pytest.raises(RunDirError, match=r"run 'base-rnu' has no checkpoint.*Runs in .*: base-run\..*"
                                          r"--resume-if-exists"):
        resume_wanted(ws, "base-rnu", resume=True)
    cfg = cfgmod.resolve("pretrain", preset="speech-tiny")
    with pytest.raises(RunDirError, match="no checkpoint to continue"):
        prepare_run(ws, "base-rnu", cfg, True, CPU)  # the gate itself refuses too
    assert not ws.run_dir("base-rnu").exists()
    assert resume_wanted(ws, "base-rnu", resume=False, resume_if_exists=True) is False
    assert resume_wanted(ws, "base-run", resume=False, resume_if_exists=True) is True
    assert resume_wanted(ws, "base-run", resume=True) is True


def test_the_next_run_removes_temp_files_a_killed_run_left(tmp_path):
    ws = Workspace.resolve(tmp_path / "ws")
    run = ws.run_dir("r")
    run.mkdir(parents=True)
    leftovers = [run / ".last.pt.x8k2_a.tmp", run / ".best.pt.4242.tmp"]
    for p in leftovers:
        p.write_bytes(b"partial")
    mine = [run / ".notes.tmp", run / "keep.tmp"]
    for p in mine:
        p.write_text("user file")
    with run_lock(ws, "r", CPU):
        assert not any(p.exists() for p in leftovers) and all(p.exists() for p in mine)
    assert remove_leftovers(tmp_path / "missing") == []


# ----------------------------------------------------------------------------- case 12: checkpoint diagnoses


def test_garbage_and_yaml_are_not_checkpoints_and_only_real_pickles_get_the_trust_advice(tmp_path):
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "config.pt").write_text("train:\n  max_updates: 10\nmodel: [1, 2]\n")
    for name in ("random.pt", "config.pt"):
        with pytest.raises(CheckpointError) as e:
            load_raw(tmp_path / name)
        assert "not a checkpoint or is corrupt" in str(e.value) and "--trust-checkpoint" not in str(e.value)
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match=r"(?s)argparse.Namespace.*--trust-checkpoint"):
        load_raw(tmp_path / "pickled.pt")
    assert load_raw(tmp_path / "pickled.pt", trust=True)["args"].lr == 1.0


def test_finetune_offers_trust_checkpoint_and_reports_garbage_init(synthetic_workspace, tmp_path):
    garbage = tmp_path / "init.pt"
    garbage.write_bytes(np.random.default_rng(1).bytes(2048))
    proc = subprocess.run([sys.executable, "-m", "d2vcli", "finetune", "--preset", "finetune-tiny", "--init",
                           str(garbage), "--name", "ft-garbage", "--trust-checkpoint",
                           "--workdir", str(synthetic_workspace.root)], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "not a checkpoint or is corrupt" in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- cases 16 and 6: import / export


def test_import_diagnoses_d2v_checkpoints_and_missing_paths(random_ctc_checkpoint, tmp_path):
    with pytest.raises(InteropError, match="already a d2v checkpoint.*no conversion needed") as e:
        import_fairseq(random_ctc_checkpoint, out=tmp_path / "x.pt")
    assert "wav2vec 2.0" not in str(e.value)
    with pytest.raises(InteropError, match="does not exist"):
        import_hf(tmp_path / "no-such-folder", out=tmp_path / "y.pt")
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


def _pretrain_checkpoint(path: Path) -> Path:
    from d2vcli.models.loading import build_model

    cfg = cfgmod.resolve("pretrain", preset="speech-tiny")
    model = build_model("pretrain", cfg.model)
    ck.save_checkpoint(path, ck.make_state("pretrain", config=cfgmod.to_dict(cfg), arch=cfgmod.to_dict(cfg.model),
                                           normalize=True, model=model.state_dict()))
    return path


def test_export_hf_refuses_a_non_empty_folder_and_force_replaces_only_its_own_files(random_ctc_checkpoint, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "README.md").write_text("my notes")
    with pytest.raises(OutputExistsError, match="not empty.*--force"):
        export_hf(random_ctc_checkpoint, out)
    assert json.loads((out / "config.json").read_text()) == {"mine": True}
    export_hf(random_ctc_checkpoint, out, force=True)
    assert (out / "vocab.json").exists() and (out / "README.md").read_text() == "my notes"
    # A pretrained model exported over the CTC export must not leave the CTC tokenizer behind.
    export_hf(_pretrain_checkpoint(tmp_path / "pre.pt"), out, force=True)
    left = {p.name for p in out.iterdir()}
    assert left == {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"}


def test_import_refuses_to_overwrite_a_checkpoint_unless_forced(random_ctc_checkpoint, tmp_path):
    from d2vcli.interop import export_hf as export

    hf = tmp_path / "hf"
    export(_pretrain_checkpoint(tmp_path / "pre.pt"), hf)
    run = tmp_path / "runs" / "ctc"
    run.mkdir(parents=True)
    for name in ("last.pt", "best.pt"):
        (run / name).write_bytes(random_ctc_checkpoint.read_bytes())
    (run / "config.yaml").write_text("kind: ctc\n")
    with pytest.raises(OutputExistsError, match=r"last.pt.*--force"):
        import_hf(hf, out=run / "last.pt")
    assert ck.peek_kind(run / "last.pt") == "ctc" and (run / "config.yaml").read_text() == "kind: ctc\n"
    import_hf(hf, out=run / "last.pt", force=True)
    assert ck.peek_kind(run / "last.pt") == "pretrain" and not (run / "best.pt").exists()
    assert cfgmod.load_yaml(run / "config.yaml")["model"]["embed_dim"] == ck.load_checkpoint(
        run / "last.pt")[ck.ARCH_KEY]["embed_dim"]
