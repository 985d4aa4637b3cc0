"""Every command, on broken input, prints a clear message and exits non-zero, never a traceback (issue 15).

The commands are enumerated from the Typer app, so a new command fails
`test_every_command_has_broken_inputs` until it gets a row in BROKEN; its numeric options are
checked for a declared range automatically.

Run: python -m pytest -q tests/test_cli_errors.py
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import typing

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from d2vcli.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent


def all_commands() -> dict:
    """Every leaf command of `d2v`, by its path (("prepare", "folder"), ("pretrain",), ...)."""
    out = {}

    def walk(cmd, path: tuple[str, ...]) -> None:
        if getattr(cmd, "commands", None):  # a group (typer vendors its own click: no isinstance)
            for name, sub in cmd.commands.items():
                walk(sub, path + (name,))
        else:
            out[path] = cmd

    walk(get_command(app), ())
    return out


# {command path: [(arguments, text the message must contain), ...]}. In the arguments, {W} is an empty
# workspace, {MISSING} a path that does not exist, {GARBAGE} a file of random bytes named garbage.pt, {JUNK}
# a folder holding garbage.flac, garbage.txt, train.tsv and config.json full of random bytes, {OUT} a fresh path,
# {S} the session's synthetic workspace (prepared splits, not modified).
BROKEN: dict[tuple[str, ...], list[tuple[list[str], str]]] = {
    ("config", "show"): [(["--config", "{GARBAGE}"], "garbage.pt"), (["--set", "optim.lr=abc"], "optim.lr"),
                         (["--set", "optim.betas=[0.9"], "optim.betas"), (["--config", "{JUNK}"], "junk")],
    ("config", "presets"): [(["unexpected"], "unexpected")],
    ("prepare", "librispeech"): [(["--root", "{MISSING}", "-w", "{W}"], "missing")],
    ("prepare", "librilight-limited"): [(["--root", "{MISSING}", "-w", "{W}"], "missing")],
    ("prepare", "librilight"): [(["--subset", "small", "--root", "{MISSING}", "-w", "{W}"], "missing"),
                                (["--subset", "huge", "--root", "{JUNK}", "-w", "{W}"], "huge")],
    ("prepare", "folder"): [(["{MISSING}", "-w", "{W}"], "missing"), (["{JUNK}", "--strict", "-w", "{W}"], "garbage")],
    ("prepare", "synthetic"): [(["--size", "huge", "-w", "{W}"], "huge")],
    ("prepare", "images"): [(["{MISSING}", "-w", "{W}"], "missing"), (["{JUNK}", "--strict", "-w", "{W}"], "class folder")],
    ("prepare", "synthetic-images"): [(["--size", "huge", "-w", "{W}"], "huge"),
                                      (["--out", "{JUNK}", "-w", "{W}"], "not a d2v synthetic image corpus")],
    ("prepare", "text"): [(["{MISSING}", "-w", "{W}"], "missing"), (["{JUNK}/garbage.txt", "-w", "{W}"], "garbage.txt"),
                          (["{JUNK}", "-w", "{W}"], "directory")],
    ("prepare", "glue"): [(["{MISSING}", "-w", "{W}"], "missing"), (["{JUNK}", "-w", "{W}"], "no task folders"),
                          (["--tsv", "{JUNK}/train.tsv", "--task-name", "X", "-w", "{W}"], "prepare text")],
    ("prepare", "synthetic-text"): [(["--size", "huge", "-w", "{W}"], "huge"),
                                    (["--out", "{JUNK}", "-w", "{W}"], "not a d2v synthetic text corpus")],
    ("prepare", "fairseq-export"): [(["--out", "{OUT}", "-w", "{W}"], "manifest")],
    ("prepare", "fairseq-import"): [(["{MISSING}", "-w", "{W}"], "missing"), (["{JUNK}", "-w", "{W}"], "train.tsv")],
    ("prepare", "lm"): [(["--text", "{MISSING}", "-w", "{W}"], "missing"), (["--arpa", "{GARBAGE}", "-w", "{W}"],
                                                                           "dict.ltr.txt"),
                   (["--arpa", "{GARBAGE}", "--dict", "{JUNK}/garbage.txt", "-w", "{W}"], "garbage")],
    ("pretrain",): [(["--config", "{GARBAGE}", "-w", "{W}"], "garbage.pt"), (["--preset", "nope", "-w", "{W}"], "nope"),
                    (["--preset", "speech-tiny", "-w", "{W}"], "manifest")],
    ("finetune",): [(["--preset", "finetune-tiny", "--init", "{MISSING}", "-w", "{W}"], "missing"),
                    (["--preset", "finetune-tiny", "--init", "{GARBAGE}", "-w", "{W}"], "garbage.pt")],
    ("import", "fairseq"): [(["{MISSING}", "-w", "{W}"], "missing"), (["{GARBAGE}", "-w", "{W}"], "garbage.pt")],
    ("import", "hf"): [(["{MISSING}", "-w", "{W}"], "missing"), (["{JUNK}", "-w", "{W}"], "config.json")],
    ("export", "hf"): [(["{MISSING}", "{OUT}", "-w", "{W}"], "missing"), (["{GARBAGE}", "{OUT}", "-w", "{W}"],
                                                                            "garbage.pt")],
    ("decode",): [(["{MISSING}", "-w", "{W}"], "missing"), (["{GARBAGE}", "-w", "{W}"], "manifests"),
                  (["{GARBAGE}", "--no-lm", "-w", "{S}"], "garbage.pt")],
    ("evaluate",): [(["{GARBAGE}", "--no-lm", "-w", "{S}"], "garbage.pt")],
    ("transcribe",): [(["{MISSING}", "-w", "{W}"], "missing"), (["{JUNK}/garbage.flac", "--model", "{GARBAGE}", "-w",
                                                               "{W}"], "garbage"), (["{W}", "-w", "{W}"], "no audio")],
    ("predict",): [(["{MISSING}", "-w", "{W}"], "missing"), (["{JUNK}/garbage.txt", "--model", "{GARBAGE}", "-w",
                                                            "{W}"], "garbage.pt"), (["{W}", "-w", "{W}"], "no image")],
    ("doctor",): [(["--bogus"], "--bogus")],
    ("demo",): [(["-w", "{GARBAGE}"], "garbage.pt")],
    ("report",): [(["nope-run", "-w", "{W}"], "nope-run")],
}


@pytest.fixture(scope="module")
def places(tmp_path_factory, synthetic_workspace) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("broken")
    noise = random.Random(2).randbytes(4096)  # fixed: random bytes make torch.load fail in many different ways
    (tmp / "garbage.pt").write_bytes(noise)
    junk = tmp / "junk"
    junk.mkdir()
    for name in ("garbage.flac", "garbage.txt", "train.tsv", "config.json"):
        (junk / name).write_bytes(noise)
    (tmp / "ws").mkdir()
    return {"W": str(tmp / "ws"), "MISSING": str(tmp / "missing"), "GARBAGE": str(tmp / "garbage.pt"),
            "JUNK": str(junk), "OUT": str(tmp / "out"), "S": str(synthetic_workspace.root)}


def test_every_command_has_broken_inputs():
    """A new command must say here how it is broken (and then the tests below run it)."""
    assert set(all_commands()) == set(BROKEN), "add the new command to BROKEN"


def _assert_clean_failure(res, expect: str, what: str) -> None:
    """Non-zero exit, no traceback (a CliRunner exception other than SystemExit would be one), a message."""
    out = res.output
    assert res.exit_code != 0, f"{what}: exit 0\n{out}"
    assert res.exception is None or isinstance(res.exception, SystemExit), \
        f"{what}: traceback ({type(res.exception).__name__}: {res.exception})\n{out}"
    assert "Traceback" not in out, f"{what}\n{out}"
    assert "error" in out.lower() or "invalid value" in out.lower(), f"{what}: no message\n{out}"
    assert expect.lower() in out.lower(), f"{what}: the message does not name {expect!r}\n{out}"


@pytest.mark.parametrize("path,args,expect", [(p, a, e) for p, cases in BROKEN.items() for a, e in cases],
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else None)
def test_broken_input_is_one_clear_message(path, args, expect, places):
    argv = list(path) + [a.format(**places) for a in args]
    res = runner.invoke(app, argv)
    _assert_clean_failure(res, expect, " ".join(argv))
    assert not Path(places["OUT"]).exists(), "a failed command wrote its output"


def _number_type(param):
    """int or float for a numeric option (Optional[...] too), else None."""
    annotation = param.type_descriptor.annotation
    types_ = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return types_[0] if len(types_) == 1 and types_[0] in (int, float) else None


def _numeric_options():
    for path, cmd in sorted(all_commands().items()):
        for p in cmd.params:
            if p.opts[0].startswith("--") and _number_type(p) is not None:
                yield path, p


def test_numeric_options_are_found():
    names = {p.opts[0] for _, p in _numeric_options()}
    assert {"--chunk-seconds", "--workers", "--order", "--trials", "--worst", "--seed"} <= names


@pytest.mark.parametrize("path,option", list(_numeric_options()),
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else v.opts[0])
def test_every_numeric_option_declares_its_range(path, option, places):
    """The guard: each numeric option has a lower bound, and a value below it is refused before any work."""
    assert option.min is not None, f"d2v {' '.join(path)} {option.opts[0]}: give it min= (and max= where there is one)"
    low = option.min - 1
    args = [a.format(**places) for a in BROKEN[path][0][0]]
    res = runner.invoke(app, list(path) + [option.opts[0], str(low)] + args)
    _assert_clean_failure(res, option.opts[0], f"d2v {' '.join(path)} {option.opts[0]} {low}")
    assert res.exit_code == 2


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_transcribe_chunk_seconds_zero_or_negative_is_refused(value, places):
    """Issue 15: --chunk-seconds 0 was accepted and ran 8x slower (one-frame windows)."""
    res = runner.invoke(app, ["transcribe", places["GARBAGE"], "--chunk-seconds", value, "-w", places["W"]])
    _assert_clean_failure(res, "--chunk-seconds", value)


def test_the_real_cli_prints_no_traceback(places):
    """The same guard through `python -m d2vcli`, as a shell sees it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "d2vcli", "decode", places["GARBAGE"], "--no-lm", "-w", places["S"]],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "garbage.pt" in proc.stderr


# ----------------------------------------------------------------------------- case 18: no config dump


def test_pretrain_error_is_not_preceded_by_the_config(places):
    """Issue 15: pretrain printed the ~90-line resolved config before its one-line error."""
    res = runner.invoke(app, ["pretrain", "--preset", "speech-tiny", "-w", places["W"]])
    assert res.exit_code == 2
    assert "conv_layers" not in res.output and "ema_decay" not in res.output, res.output
    assert len(res.output.strip().splitlines()) <= 6, res.output


def test_decode_error_is_not_preceded_by_the_config(places):
    res = runner.invoke(app, ["decode", places["MISSING"], "-w", places["W"], "--set", "decode.beam=7"])
    assert res.exit_code == 2
    assert "beam_threshold" not in res.output and "tune_trials" not in res.output, res.output


@pytest.mark.parametrize("seed", range(40))
def test_random_bytes_are_never_a_traceback_when_read_as_a_checkpoint(seed, tmp_path):
    """torch's weights-only unpickler fails on garbage with IndexError, KeyError, ...: all are "not a checkpoint"."""
    from d2vcli.checkpoint import CheckpointError, load_checkpoint

    path = tmp_path / "x.pt"
    path.write_bytes(random.Random(seed).randbytes(2048))
    with pytest.raises(CheckpointError, match="x.pt"):
        load_checkpoint(path)
