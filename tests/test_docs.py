"""The docs cannot drift from the CLI: the command reference is generated from it, and every
`d2v ...` line in the README and docs names a real command and real flags."""

from __future__ import annotations

import re
import runpy
import shlex
from pathlib import Path

import pytest
import typer.main

from d2vcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_command_reference_is_up_to_date():
    render = runpy.run_path(str(ROOT / "docs" / "gen_commands.py"))["render"]
    committed = (ROOT / "docs" / "commands.md").read_text()
    assert committed == render(), "docs/commands.md is stale: python docs/gen_commands.py > docs/commands.md"


def _command_lines():
    for doc in DOCS:
        if doc.name in ("commands.md", "benchmarks.md"):  # generated: reference and measured output
            continue
        for line in doc.read_text().splitlines():
            line = line.strip().lstrip("$ ")
            if line.startswith("d2v ") or " -m d2vcli " in line:
                code = line.split("#", 1)[0].strip().rstrip("\\").strip().strip("`")
                if " -m d2vcli " in code:
                    code = "d2v " + code.split(" -m d2vcli ", 1)[1]
                yield doc.name, code


def _resolve(words: list[str]):
    cmd = typer.main.get_command(app)
    i = 0
    while hasattr(cmd, "commands") and i < len(words) and not words[i].startswith("-"):
        assert words[i] in cmd.commands, f"unknown command {' '.join(words[:i + 1])!r}"
        cmd = cmd.commands[words[i]]
        i += 1
    return cmd, words[i:]


@pytest.mark.parametrize("doc,line", list(_command_lines()))
def test_documented_commands_exist(doc, line):
    words = shlex.split(line)[1:]
    cmd, rest = _resolve(words)
    assert not hasattr(cmd, "commands"), f"{doc}: '{line}' names a group, not a command"
    flags = {o for p in cmd.params for o in p.opts + p.secondary_opts}
    for w in rest:
        if w.startswith("-") and not re.match(r"^-\d", w):
            assert w.split("=", 1)[0] in flags, f"{doc}: '{line}' uses {w}, which `d2v {' '.join(words[:len(words) - len(rest)])}` lacks"
