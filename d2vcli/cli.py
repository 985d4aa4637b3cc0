"""The `d2v` command: a thin Typer shell over library functions.

Each command parses its arguments, resolves the config (defaults -> --preset ->
--config -> --set), prints it, and calls one library function. No logic lives here.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from d2vcli import config as cfgmod
from d2vcli.ui import console, err_console
from d2vcli.workspace import Workspace

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="data2vec for speech: prepare, pretrain, finetune, decode, evaluate.",
)
prepare_app = typer.Typer(no_args_is_help=True, help="Build manifests and LM resources in the workspace.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs and presets.")
app.add_typer(prepare_app, name="prepare")
app.add_typer(config_app, name="config")

WorkdirOpt = typer.Option(None, "--workdir", "-w", help="Workspace (default: $D2V_WORKDIR or ./d2v-work).")
PresetOpt = typer.Option(None, "--preset", help="A preset from presets/ (see `d2v config presets`).")
ConfigOpt = typer.Option(None, "--config", help="A YAML file of config overrides.")
SetOpt = typer.Option(None, "--set", help="Override one field: --set optim.lr=1e-4 (repeatable).")


def resolve_config(command, preset, config_file, overrides) -> cfgmod.Config:
    return cfgmod.resolve(command, preset=preset, config_file=config_file, overrides=overrides or [])


# ----------------------------------------------------------------------------- config


@config_app.command("show")
def config_show(
    preset: Optional[str] = PresetOpt,
    command: str = typer.Option("pretrain", "--for", help="pretrain or finetune defaults."),
    config_file: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
):
    """Print the resolved config with each field's documentation."""
    if preset and preset in cfgmod.PRESETS:
        command = cfgmod.PRESETS[preset][0]
    cfg = resolve_config(command, preset, config_file, overrides)
    from d2vcli.ui import table

    rows = [(k, repr(v) if isinstance(v, str) else v, doc) for k, v, doc in cfgmod.field_docs(cfg)]
    console.print(table(f"d2v {command} config" + (f" (preset {preset})" if preset else ""),
                        ["key", "value", "doc"], rows))


@config_app.command("presets")
def config_presets():
    """List the presets and the command each belongs to."""
    from d2vcli.ui import table

    rows = []
    for name, (command, fname) in cfgmod.PRESETS.items():
        first = cfgmod.preset_path(name).read_text().splitlines()
        desc = first[1].lstrip("# ") if len(first) > 1 else ""
        rows.append((name, command, desc))
    console.print(table("presets", ["preset", "command", "what"], rows))


def main() -> None:
    """Entry point: user errors print one clear message, not a traceback."""
    from d2vcli.checkpoint import CheckpointError

    try:
        app()
    except (cfgmod.ConfigError, CheckpointError, FileNotFoundError) as e:
        err_console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
