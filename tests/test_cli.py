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


# ----------------------------------------------------------------------------- issue 15 case 18: config summary


def test_pretrain_prints_a_summary_of_the_changes_and_saves_the_full_config(synthetic_workspace):
    """It printed the ~90-line resolved config; now the preset, what --set changed, and config.yaml's path."""
    sets = ["data.max_tokens=64000", "data.max_sample_size=32000", "train.batch_seconds=4", "train.max_updates=1",
            "optim.lr=1e-4"]
    args = ["pretrain", "--preset", "speech-tiny", "--name", "summary-test", "-w", str(synthetic_workspace.root)]
    res = runner.invoke(app, args + [a for s in sets for a in ("--set", s)])
    assert res.exit_code == 0, res.output
    config_yaml = synthetic_workspace.run_dir("summary-test") / "config.yaml"
    assert "pretrain config: preset speech-tiny, changed: " in res.output
    assert "optim.lr = 0.0001" in res.output and "train.max_updates = 1 " in res.output
    assert f"full config: {config_yaml}" in res.output
    assert "conv_layers" not in res.output and "ema_anneal_end_step" not in res.output
    saved = config_yaml.read_text()
    assert "conv_layers" in saved and "lr: 0.0001" in saved


def test_config_show_still_prints_every_field():
    res = runner.invoke(app, ["config", "show"])
    assert res.exit_code == 0
    assert all(key in res.output for key in ("model.conv_layers", "train.keep_every", "optim.lr", "decode.tune_beam"))


def test_summary_lists_only_the_changes():
    from d2vcli import config as C
    from d2vcli.ui import config_summary

    base = C.base_config("pretrain", "speech-tiny")
    cfg = C.resolve("pretrain", preset="speech-tiny", overrides=["optim.lr=1e-4"])
    text = config_summary(cfg, base, "pretrain config", "preset speech-tiny")
    assert text.splitlines() == ["pretrain config: preset speech-tiny, changed: 1 setting",
                                 f"  optim.lr = 0.0001   (was {base.optim.lr!r})"]
    assert config_summary(base, base, "t", "preset speech-tiny") == "t: preset speech-tiny, nothing changed"
