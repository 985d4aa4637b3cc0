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


# ----------------------------------------------------------------------------- prepare

StrictOpt = typer.Option(False, "--strict", help="Any file that would be skipped is an error instead.")
ResampleOpt = typer.Option(
    False, "--resample", help="Convert audio that is not 16 kHz mono to 16 kHz mono FLAC under <workdir>/data/audio/."
)
WorkersOpt = typer.Option(0, "--workers", help="Parallel workers for the header scan (0 = all cores).")
SplitsOpt = typer.Option(None, "--splits", help="Splits to prepare (repeatable).")


def _run_prepare(fn, *args, **kwargs) -> None:
    """Call one prepare function and print its summary; its input errors become one line (exit 2)."""
    from d2vcli.prepare import PrepareError

    try:
        summary = fn(*args, **kwargs)
    except PrepareError as e:
        err_console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False)
        raise typer.Exit(2)
    console.print(summary.table())
    for note in summary.notes:
        console.print(note, markup=False)
    if summary.dictionary:
        console.print(f"dictionary: {summary.dictionary}", markup=False)


@prepare_app.command("librispeech")
def prepare_librispeech_cmd(
    root: Optional[Path] = typer.Option(None, "--root", help="LibriSpeech/ or its parent (default: $D2V_LIBRISPEECH)."),
    splits: Optional[List[str]] = SplitsOpt,
    resample: bool = ResampleOpt,
    strict: bool = StrictOpt,
    workers: int = WorkersOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Manifests for LibriSpeech splits (every standard split present, or --splits)."""
    from d2vcli.prepare import prepare_librispeech

    _run_prepare(prepare_librispeech, Workspace.resolve(workdir), root, splits, resample=resample, strict=strict,
                 workers=workers)


@prepare_app.command("librilight-limited")
def prepare_librilight_limited_cmd(
    root: Optional[Path] = typer.Option(None, "--root", help="librispeech_finetuning/ (holds 1h/ and 9h/)."),
    fold: int = typer.Option(0, "--fold", help="Which 10-minute fold of 1h/ is train-10min."),
    resample: bool = ResampleOpt,
    strict: bool = StrictOpt,
    workers: int = WorkersOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """train-10min, train-1h and train-10h from the Libri-light limited-supervision set."""
    from d2vcli.prepare import prepare_librilight_limited

    _run_prepare(prepare_librilight_limited, Workspace.resolve(workdir), root, fold, resample=resample,
                 strict=strict, workers=workers)


@prepare_app.command("librilight")
def prepare_librilight_cmd(
    subset: str = typer.Option(..., "--subset", help="small, medium or large."),
    root: Optional[Path] = typer.Option(None, "--root", help="The directory holding small/ (default: $D2V_LIBRILIGHT)."),
    max_seconds: float = typer.Option(30.0, "--max-seconds", help="Longest segment cut from the VAD chunks."),
    resample: bool = ResampleOpt,
    strict: bool = StrictOpt,
    workers: int = WorkersOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Unlabeled Libri-light, cut by voice activity into segments of at most --max-seconds."""
    from d2vcli.prepare import prepare_librilight

    _run_prepare(prepare_librilight, Workspace.resolve(workdir), root, subset, max_seconds, resample=resample,
                 strict=strict, workers=workers)


@prepare_app.command("folder")
def prepare_folder_cmd(
    root: Path = typer.Argument(..., help="Folder of audio files (searched recursively)."),
    split: Optional[str] = typer.Option(None, "--split", help="Manifest name (default: the folder's name)."),
    transcripts: Optional[Path] = typer.Option(
        None, "--transcripts", help="CSV/TSV of path,text (default: a same-name .txt next to each audio file)."
    ),
    resample: bool = ResampleOpt,
    keep_text: bool = typer.Option(False, "--keep-text", help="Keep transcripts as they are (no normalization)."),
    strict: bool = StrictOpt,
    workers: int = WorkersOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """A manifest for any folder of audio that soundfile can read."""
    from d2vcli.prepare import prepare_folder

    _run_prepare(prepare_folder, Workspace.resolve(workdir), root, split, transcripts, resample=resample,
                 keep_text=keep_text, strict=strict, workers=workers)


@prepare_app.command("synthetic")
def prepare_synthetic_cmd(
    out: Optional[Path] = typer.Option(None, "--out", help="Where to generate it (default: <workdir>/corpus/synthetic)."),
    size: str = typer.Option("demo", "--size", help="demo (~800 train utterances) or tiny (for tests)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same corpus."),
    strict: bool = StrictOpt,
    workers: int = WorkersOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Generate the synthetic demo corpus (LibriSpeech layout + LM text) and prepare it."""
    from d2vcli.prepare import prepare_synthetic

    _run_prepare(prepare_synthetic, Workspace.resolve(workdir), out, size, seed, strict=strict, workers=workers)


@prepare_app.command("fairseq-export")
def prepare_fairseq_export_cmd(
    out: Path = typer.Option(..., "--out", help="fairseq data dir to write (task.data)."),
    splits: Optional[List[str]] = SplitsOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Write <split>.tsv/.ltr/.wrd + dict.ltr.txt in fairseq's layout (dev-other -> dev_other)."""
    from d2vcli.prepare import fairseq_export

    _run_prepare(fairseq_export, Workspace.resolve(workdir), out, splits)


@prepare_app.command("fairseq-import")
def prepare_fairseq_import_cmd(
    src: Path = typer.Argument(..., help="fairseq data dir with <split>.tsv (+ .ltr or .wrd)."),
    splits: Optional[List[str]] = SplitsOpt,
    resample: bool = ResampleOpt,
    strict: bool = StrictOpt,
    workers: int = WorkersOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Manifests from a fairseq data dir."""
    from d2vcli.prepare import prepare_fairseq_import

    _run_prepare(prepare_fairseq_import, Workspace.resolve(workdir), src, splits, resample=resample, strict=strict,
                 workers=workers)


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
