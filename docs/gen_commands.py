"""Generate docs/commands.md from the CLI itself, so the reference cannot drift.

    python docs/gen_commands.py > docs/commands.md

tests/test_docs.py fails when the committed file differs from what this prints.
"""

from __future__ import annotations

import typer.main

from d2vcli.cli import app


def _walk(cmd, path: list[str]):
    if hasattr(cmd, "commands"):  # a group (Typer vendors its own click)
        for name in sorted(cmd.commands):
            yield from _walk(cmd.commands[name], path + [name])
    else:
        yield path, cmd


def _param_row(p) -> str:
    if p.param_type_name == "argument":
        name = (p.metavar or p.name).upper()
        return f"| `{name}` | argument{'' if p.required else ', optional'} | |"
    opts = ", ".join(f"`{o}`" for o in p.opts + p.secondary_opts)
    default = ""
    if not p.required and p.default not in (None, False, (), []) and not callable(p.default):
        default = f"default: `{p.default}`"
    help_text = (getattr(p, "help", "") or "").replace("|", "\\|").replace("\n", " ")
    return f"| {opts} | {help_text} | {default} |"


def render() -> str:
    root = typer.main.get_command(app)
    out = ["# Command reference", "",
           "Generated from the CLI by `python docs/gen_commands.py > docs/commands.md`; "
           "`d2v COMMAND --help` shows the same.", ""]
    for path, cmd in _walk(root, []):
        out.append(f"## `d2v {' '.join(path)}`")
        out.append("")
        if cmd.help:
            out.append(cmd.help.strip())
            out.append("")
        params = [p for p in cmd.params if p.name != "help"]
        if params:
            out.append("| flag | meaning | default |")
            out.append("|---|---|---|")
            out.extend(_param_row(p) for p in params)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
