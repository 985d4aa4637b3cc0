"""The docs cannot drift from the CLI: the command reference is generated from it, and every
`d2v ...` line in the README and docs names a real command and real flags."""

from __future__ import annotations

import re
import runpy
import shlex
import sys
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


def _sections(markdown: str) -> dict[str, list[str]]:
    out, title = {}, ""
    for line in markdown.splitlines():
        if line.startswith("## "):
            title = line[3:]
        out.setdefault(title, []).append(line)
    return out


def test_benchmarks_page_shows_each_table_once():
    """docs/benchmarks.md once printed the encoder table three times (per-case progress tables
    were on stdout). Within a benchmark's section, no table header row may repeat."""
    sections = _sections((ROOT / "docs" / "benchmarks.md").read_text())
    assert any(title.startswith("Encoder inference") for title in sections)
    for title, lines in sections.items():
        headers = [line for line in lines if line.startswith("┃")]
        assert len(headers) == len(set(headers)), f"docs/benchmarks.md section '{title}' repeats a table"
        tops = [line for line in lines if line.startswith("┏")]
        assert len(tops) <= 1, f"docs/benchmarks.md section '{title}' has {len(tops)} tables"


def test_run_all_writes_stdout_once_and_keeps_progress_off_the_page(tmp_path):
    """run_all.py puts a benchmark's stdout (its result) in the page and shows stderr (progress) only."""
    script = tmp_path / "bench_fake.py"
    script.write_text("import sys\nprint('RESULT TABLE')\nprint('progress table', file=sys.stderr)\n")
    main = runpy.run_path(str(ROOT / "benchmarks" / "run_all.py"))["main"]
    main.__globals__["BENCHMARKS"] = [("Fake", str(script), [], [])]
    out = tmp_path / "benchmarks.md"
    argv = sys.argv
    sys.argv = ["run_all.py", "--out", str(out)]
    try:
        main()
    finally:
        sys.argv = argv
    page = out.read_text()
    assert page.count("RESULT TABLE") == 1 and "progress table" not in page and "## Fake" in page
