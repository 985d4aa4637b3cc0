"""The options several `d2v` commands share, spelled and documented once.

cli.py (the root app) and its sub-apps (cli_prepare.py, cli_interop.py) take them from here, so a
sub-app never imports cli.py.
"""

from __future__ import annotations

import typer

WorkdirOpt = typer.Option(None, "--workdir", "-w", help="Workspace (default: $D2V_WORKDIR or ./d2v-work).")
PresetOpt = typer.Option(None, "--preset", help="A built-in preset (list them with `d2v config presets`).")
ConfigOpt = typer.Option(None, "--config", help="A YAML file of config overrides.")
SetOpt = typer.Option(None, "--set", help="Override one field: --set optim.lr=1e-4 (repeatable).")
ResumeOpt = typer.Option(False, "--resume", help="Continue the run's last checkpoint exactly (an error when the "
                         "run has none).")
ResumeIfExistsOpt = typer.Option(False, "--resume-if-exists", help="Continue the run if it has a checkpoint, "
                                 "else start it (for schedulers that relaunch the same command).")

TrustOpt = typer.Option(False, "--trust-checkpoint",
                        help="Allow full unpickling (runs code from the file): only for files you trust.")
