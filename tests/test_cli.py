"""The documented commands that need no corpus run as written, through the real CLI."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from d2vcli.cli import app

runner = CliRunner()


def test_help_lists_exactly_the_working_commands():
    out = runner.invoke(app, ["--help"]).output
    for cmd in ("prepare", "config", "pretrain", "finetune", "decode", "evaluate", "transcribe",
                "import", "export", "doctor", "demo"):
        assert cmd in out


def test_config_show_prints_documented_fields():
    res = runner.invoke(app, ["config", "show", "--preset", "speech-base"])
    assert res.exit_code == 0, res.output
    assert "model.embed_dim" in res.output and "Transformer width D" in res.output


def test_config_presets_lists_every_preset():
    from d2vcli.config import PRESETS

    res = runner.invoke(app, ["config", "presets"])
    assert res.exit_code == 0
    assert all(name in res.output for name in PRESETS)


def test_used_by_line_pretrain_speech_large_says_what_to_prepare(tmp_path):
    """`d2v pretrain --preset speech-large` as written: without Libri-light manifests it stops
    cleanly (exit 2, no traceback, nothing created) and names the exact commands to run."""
    ws = tmp_path / "ws"
    proc = subprocess.run([sys.executable, "-m", "d2vcli", "pretrain", "--preset", "speech-large", "--workdir", str(ws)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text
    assert "d2v prepare librilight --root" in text and "--subset large" in text
    assert not (ws / "runs").exists()


def test_unknown_key_is_one_clear_line():
    proc = subprocess.run([sys.executable, "-m", "d2vcli", "config", "show", "--set", "optim.lrr=1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown config key 'optim.lrr'" in proc.stderr and "optim.lr" in proc.stderr
    assert "Traceback" not in proc.stderr
