"""The `d2v` command: a thin Typer shell over library functions.

Each command parses its arguments, resolves the config (defaults -> --preset ->
--config -> --set) and calls one library function, which prints a short summary of the
config. No logic lives here.

This file is the root app: `main`, the error reporting, `d2v config` and the top-level commands
(pretrain, finetune, decode, evaluate, transcribe, predict, doctor, demo, report). The sub-apps
`d2v prepare` (cli_prepare.py) and `d2v import` / `d2v export` (cli_interop.py) live in their own
files and take the shared options from cli_options.py.

Two guards hold for every command, present and future (tests/test_cli_errors.py checks both):
  - a user error raised anywhere below a command is one line and exit 2, never a traceback
    (`_Group.invoke` catches `user_error_types()` once, for the whole command tree);
  - every numeric option declares its range (`min=`/`max=`), so Click refuses a bad value
    before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer
from typer.core import TyperGroup

from d2vcli import __version__
from d2vcli import config as cfgmod
from d2vcli.cli_interop import export_app, import_app
from d2vcli.cli_options import (ConfigOpt, PresetOpt, ResumeIfExistsOpt, ResumeOpt, SetOpt, TrustOpt,
                                WorkdirOpt)
from d2vcli.cli_prepare import prepare_app
from d2vcli.errors import UserError
from d2vcli.ui import console, err_console
from d2vcli.workspace import Workspace


def user_error_types() -> tuple:
    """Errors caused by the user's input: reported as one line with the fix, exit 2, no traceback.

    Besides UserError, the OS errors a path the user gave causes (missing, a directory where a file
    belongs or the reverse, no permission, already there) carry the path and a clear reason.
    """
    return (UserError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def _report(e: BaseException) -> None:
    err_console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)


class _Group(TyperGroup):
    """The root command group: every sub-command runs inside its invoke, so catching user errors here
    covers all commands at once (and CliRunner sees the same exit code and message as a shell)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except user_error_types() as e:
            _report(e)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="data2vec for speech: prepare, pretrain, finetune, decode, evaluate.",
)
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs and presets.")
app.add_typer(prepare_app, name="prepare")
app.add_typer(config_app, name="config")
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")


def _print_version(value: bool) -> None:
    if value:
        console.print(f"d2vcli {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the d2vcli version and exit.")) -> None:
    """data2vec for speech: prepare, pretrain, finetune, decode, evaluate."""


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


# ----------------------------------------------------------------------------- pretrain


@app.command("pretrain")
def pretrain_cmd(
    preset: Optional[str] = PresetOpt,
    config_file: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    name: Optional[str] = typer.Option(None, "--name", help="Run name: <workdir>/runs/NAME (default: the preset)."),
    resume: bool = ResumeOpt,
    resume_if_exists: bool = ResumeIfExistsOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """data2vec self-supervised pretraining (EMA teacher, masked regression). Multi-GPU: torchrun -m d2vcli pretrain."""
    from d2vcli.pretrain import pretrain

    cfg = resolve_config("pretrain", preset, config_file, overrides)
    # pretrain() prints the config summary once the manifests and the run directory are checked.
    result = pretrain(cfg, Workspace.resolve(workdir), name=name, resume=resume, preset=preset,
                      resume_if_exists=resume_if_exists)
    raise typer.Exit(result.exit_code)


# ----------------------------------------------------------------------------- finetune


@app.command("finetune")
def finetune_cmd(
    preset: Optional[str] = PresetOpt,
    config_file: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    init: Optional[str] = typer.Option(None, "--init", help="Pretrained model to start from: a `d2v pretrain` run "
                                       "name, a run directory or a checkpoint (sets finetune.init); 'scratch' = "
                                       "random weights, the baseline."),
    arch_preset: Optional[str] = typer.Option(None, "--arch-preset", help="With --init scratch: the pretrain preset "
                                              "whose model section is the architecture, e.g. speech-tiny "
                                              "(sets finetune.arch_preset; --set model.* overrides it)."),
    from_teacher: bool = typer.Option(False, "--from-teacher", help="Initialize the encoder from the EMA teacher "
                                      "instead of the student (finetune.init_from=teacher)."),
    linear_probe: bool = typer.Option(False, "--linear-probe", help="Images: freeze the encoder and train a linear "
                                      "classifier on it (finetune.linear_probe=true)."),
    task: Optional[str] = typer.Option(None, "--task", help="Text: the labeled task under data/glue/ (RTE, SST-2, "
                                       "AGREEMENT...; sets finetune.task); glue-base takes its GLUE schedule."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name: <workdir>/runs/NAME (default: the preset)."),
    resume: bool = ResumeOpt,
    resume_if_exists: bool = ResumeIfExistsOpt,
    trust: bool = typer.Option(False, "--trust-checkpoint", help="Allow full unpickling of the --init checkpoint "
                               "(runs code from the file): only for files you trust."),
    workdir: Optional[Path] = WorkdirOpt,
):
    """CTC fine-tuning on letters, image classification (presets vision-ft-*) or sentence classification and
    regression (presets glue-*, --task). Architecture and input normalization come from the pretrained checkpoint."""
    from d2vcli.finetune import finetune

    cfg = resolve_config("finetune", preset, config_file, overrides)
    start = {"init": init} if init else {}
    if arch_preset:
        start["arch_preset"] = arch_preset
    if from_teacher:
        start["init_from"] = "teacher"
    if linear_probe:
        start["linear_probe"] = True
    if task:
        start["task"] = task
    cfg = cfgmod.merge(cfg, {"finetune": start})
    if cfg.modality == "text":  # a GLUE task's schedule sits between the preset and the user's settings
        from d2vcli.finetune_text import with_task_schedule

        cfg = with_task_schedule(cfg, preset, config_file, overrides or [], {"finetune": start})
    # Prints the config summary once completed from the checkpoint (its architecture and normalize).
    result = finetune(cfg, Workspace.resolve(workdir), name=name, resume=resume, preset=preset,
                      resume_if_exists=resume_if_exists, trust=trust)
    raise typer.Exit(result.exit_code)


# ----------------------------------------------------------------------------- LM, decode, evaluate, transcribe, doctor

LMOpt = typer.Option(None, "--lm", help="KenLM binary: a path or a file name in <workdir>/lm/ "
                     "(default: the LM `d2v prepare lm` built, if any).")
NoLMOpt = typer.Option(False, "--no-lm", help="Greedy decoding only, even if the workspace has an LM.")
LexiconOpt = typer.Option(None, "--lexicon", help="Lexicon (WORD<TAB>W O R D |); default <workdir>/lm/lexicon.txt.")
LexiconFreeOpt = typer.Option(False, "--lexicon-free", help="Beam search without a lexicon: with a letter LM "
                              "(`d2v prepare lm --unit letter`) or, with no LM, a plain CTC beam search.")
DecodeSplitsOpt = typer.Option(None, "--splits", help="Splits to decode, repeatable or comma-separated "
                               "(default: the dev and test manifests present).")
DecodeWorkersOpt = typer.Option(None, "--workers", min=0, help="Beam-search processes "
                               "(default decode.workers; 0 = one per core).")
DeviceOpt = typer.Option("auto", "--device", help="Device for the acoustic model: auto, cpu, cuda, cuda:N.")
NoTunedOpt = typer.Option(False, "--no-tuned", help="Ignore decode/<run>/tuned.json (use the config's LM weights).")
_TUNED_KEYS = ("decode.lm_weight", "decode.word_score", "decode.sil_weight")


def _splits(values: Optional[List[str]]) -> Optional[list]:
    return [s for v in values for s in v.split(",") if s] if values else None


def _lm_arg(lm: Optional[str], no_lm: bool):
    return None if no_lm else (lm if lm else "auto")


def _use_tuned(no_tuned: bool, overrides: Optional[List[str]]) -> bool:
    """Explicit --set of an LM weight wins over tuned.json."""
    return not no_tuned and not any(o.split("=", 1)[0].strip() in _TUNED_KEYS for o in overrides or [])




@app.command("decode")
def decode_cmd(
    checkpoint: Optional[str] = typer.Argument(None, help="Run name, run directory or checkpoint "
                                               "(default: the newest fine-tuned run)."),
    splits: Optional[List[str]] = DecodeSplitsOpt,
    lm: Optional[str] = LMOpt,
    no_lm: bool = NoLMOpt,
    lexicon: Optional[Path] = LexiconOpt,
    lexicon_free: bool = LexiconFreeOpt,
    tune: bool = typer.Option(False, "--tune", help="Tune lm_weight, word_score, sil_weight on decode.tune_split first."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Settings to try with --tune "
                                          "(decode.tune_trials)."),
    search: Optional[Literal["random", "grid"]] = typer.Option(None, "--search", help="--tune search (decode.tune_search)."),
    tune_beam: Optional[int] = typer.Option(None, "--tune-beam", min=1, help="Beam while tuning "
                                            "(decode.tune_beam)."),
    no_tuned: bool = NoTunedOpt,
    workers: Optional[int] = DecodeWorkersOpt,
    device: str = DeviceOpt,
    config_file: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    trust: bool = TrustOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Decode dev/test splits: greedy always, lexicon + KenLM beam search with an LM (emissions cached)."""
    from d2vcli.decode.run import decode, print_result

    cfg = resolve_config("decode", None, config_file, overrides)
    result = decode(Workspace.resolve(workdir), cfg.decode, checkpoint=checkpoint, splits=_splits(splits),
                    lm=_lm_arg(lm, no_lm), lexicon=lexicon, lexicon_free=lexicon_free, tune=tune, trials=trials,
                    search=search, tune_beam=tune_beam, use_tuned=_use_tuned(no_tuned, overrides),
                    workers=workers, trust=trust, device=device)
    print_result(result)


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Optional[str] = typer.Argument(None, help="Run name, run directory or checkpoint "
                                               "(default: the newest fine-tuned run)."),
    splits: Optional[List[str]] = DecodeSplitsOpt,
    lm: Optional[str] = LMOpt,
    no_lm: bool = NoLMOpt,
    lexicon: Optional[Path] = LexiconOpt,
    lexicon_free: bool = LexiconFreeOpt,
    no_tuned: bool = NoTunedOpt,
    workers: Optional[int] = DecodeWorkersOpt,
    device: str = DeviceOpt,
    config_file: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    trust: bool = TrustOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """WER and CER per split, greedy and LM side by side; writes recogs-/errs-/wer-summary files and wer.json.

    On an image classifier (vision-cls): top-1 and top-5 per image split (default the val*/test* ones),
    a confusion summary, and predictions-/confusion- files, accuracy-summary.txt and accuracy.json.
    On a text classifier (text-cls): its task's GLUE metric per split, predictions-*.jsonl and scores.json.
    """
    from d2vcli.evaluate import evaluate, print_result
    from d2vcli.evaluate_text import evaluate_text, is_text_classifier, print_text_result
    from d2vcli.evaluate_vision import evaluate_images, is_image_classifier, print_image_result

    ws = Workspace.resolve(workdir)
    if is_text_classifier(ws, checkpoint):
        print_text_result(evaluate_text(ws, checkpoint, _splits(splits), trust=trust, device=device))
        return
    if is_image_classifier(ws, checkpoint, _splits(splits)):
        print_image_result(evaluate_images(ws, checkpoint, _splits(splits), trust=trust, device=device))
        return
    cfg = resolve_config("decode", None, config_file, overrides)
    result = evaluate(ws, cfg.decode, checkpoint=checkpoint, splits=_splits(splits),
                      lm=_lm_arg(lm, no_lm), lexicon=lexicon, lexicon_free=lexicon_free,
                      use_tuned=_use_tuned(no_tuned, overrides), workers=workers, trust=trust, device=device)
    print_result(result)


@app.command("transcribe")
def transcribe_cmd(
    audio: List[Path] = typer.Argument(..., help="Audio files (any format soundfile reads, any rate/channels), "
                                       "or directories: the audio files inside them, recursively."),
    model: Optional[str] = typer.Option(None, "--model", help="Run name, run directory or checkpoint "
                                        "(default: the newest fine-tuned run)."),
    lm: Optional[str] = LMOpt,
    no_lm: bool = NoLMOpt,
    lexicon: Optional[Path] = LexiconOpt,
    lexicon_free: bool = LexiconFreeOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Write here instead of stdout (.json: a JSON list)."),
    timestamps: bool = typer.Option(False, "--timestamps", help="Per-word start and end times (seconds)."),
    chunk_seconds: float = typer.Option(30.0, "--chunk-seconds", min=1.0, help="Longest window the model sees at "
                                         "once (at least 1 s: shorter windows only cost time and context)."),
    no_tuned: bool = NoTunedOpt,
    device: str = DeviceOpt,
    config_file: Optional[Path] = ConfigOpt,
    overrides: Optional[List[str]] = SetOpt,
    trust: bool = TrustOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Transcribe audio files, greedy or with the LM, optionally with word timestamps.

    A file that cannot be read is reported (path and reason) and the others are still transcribed;
    the exit code is then 1 (2 when no file could be transcribed, and --out is left untouched).
    """
    from d2vcli.transcribe import format_transcripts, transcribe, write_transcripts

    cfg = resolve_config("decode", None, config_file, overrides)
    result = transcribe(audio, Workspace.resolve(workdir), model=model, lm=_lm_arg(lm, no_lm), lexicon=lexicon,
                        lexicon_free=lexicon_free, cfg=cfg.decode, timestamps=timestamps,
                        use_tuned=_use_tuned(no_tuned, overrides), chunk_seconds=chunk_seconds, trust=trust,
                        device=device)
    if out:
        write_transcripts(result, out, timestamps)
        err_console.print(f"wrote {out} ({len(result)} file{'s' * (len(result) != 1)})", markup=False)
    else:
        console.print(format_transcripts(result, timestamps), end="", markup=False, highlight=False, soft_wrap=True)
    if result.failures:
        for failure in result.failures:
            _report(f"{failure.path}: {failure.reason}")
        err_console.print(f"{len(result.failures)} of {len(result) + len(result.failures)} files could not be "
                          "transcribed (listed above); the others were.", markup=False)
        raise typer.Exit(1)


@app.command("predict")
def predict_cmd(
    images: List[Path] = typer.Argument(..., help="Image files (any format PIL reads), or directories: the "
                                        "image files inside them, recursively."),
    model: Optional[str] = typer.Option(None, "--model", help="Run name, run directory or checkpoint of an image "
                                        "classifier (default: the newest vision-cls run)."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Classes shown per image, most probable first."),
    as_json: bool = typer.Option(False, "--json", help="A JSON list of {path, top: [{class, prob}]}."),
    device: str = DeviceOpt,
    trust: bool = TrustOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """The top classes of each image, with probabilities, under an image classification checkpoint.

    A file that cannot be read is reported (path and reason) and the others are still predicted;
    the exit code is then 1 (2 when no image could be predicted).
    """
    from d2vcli.predict import format_predictions, predict

    result = predict(images, Workspace.resolve(workdir), model=model, top_k=top_k, trust=trust, device=device)
    typer.echo(format_predictions(result, as_json), nl=False)  # verbatim: tabs kept for `cut`, JSON unwrapped
    if result.failures:
        for failure in result.failures:
            _report(f"{failure.path}: {failure.reason}")
        err_console.print(f"{len(result.failures)} of {len(result) + len(result.failures)} files could not be "
                          "predicted (listed above); the others were.", markup=False)
        raise typer.Exit(1)


@app.command("doctor")
def doctor_cmd(
    build_tools: bool = typer.Option(False, "--build-tools", help="Build lmplz/build_binary now if missing."),
):
    """Check the decoding stack (flashlight-text, KenLM, tools, a tiny end-to-end decode) and print fixes."""
    from d2vcli.doctor import run_checks

    report = run_checks(build_tools=build_tools)
    console.print(report.table())
    raise typer.Exit(0 if report.ok else 1)


# ----------------------------------------------------------------------------- demo


@app.command("demo")
def demo_cmd(
    compare_init: bool = typer.Option(False, "--compare-init", help="Also fine-tune from a random encoder with the "
                                      "same budget and report both (what pretraining buys)."),
    version: int = typer.Option(1, "--version", min=1, max=2, help="data2vec version to pretrain: 1 "
                                "(speech-tiny) or 2 (speech2-tiny, data2vec 2.0; runs named demo2-*)."),
    modality: str = typer.Option("speech", "--modality", help="speech (the default), images (synthetic images, "
                                 "vision-tiny, vision-ft-tiny, top-1/top-5) or text (synthetic text, text-tiny, "
                                 "glue-tiny on AGREEMENT, MCC)."),
    workdir: Optional[Path] = WorkdirOpt,
):
    """The whole pipeline on a generated corpus, on CPU: prepare, pretrain, finetune, LM, decode, evaluate."""
    if modality in ("images", "text") and version != 1:
        raise UserError(f"d2v demo --modality {modality} --version {version}: the {modality} demo pretrains "
                        "data2vec 1.0 (vision-tiny / text-tiny); drop --version.")
    if modality == "images":
        from d2vcli.demo_images import ImageDemoSettings, print_image_demo, run_image_demo

        print_image_demo(run_image_demo(Workspace.resolve(workdir), ImageDemoSettings(compare_init=compare_init)))
        return
    if modality == "text":
        from d2vcli.demo_text import TextDemoSettings, print_text_demo, run_text_demo

        print_text_demo(run_text_demo(Workspace.resolve(workdir), TextDemoSettings(compare_init=compare_init)))
        return
    if modality != "speech":
        raise UserError(f"d2v demo --modality {modality!r}: pass --modality speech (the default), images or text.")
    from d2vcli.demo import DemoSettings, print_demo, run_demo

    print_demo(run_demo(Workspace.resolve(workdir), DemoSettings(compare_init=compare_init, version=version)))


# ----------------------------------------------------------------------------- report


@app.command("report")
def report_cmd(
    run: str = typer.Argument(..., help="Run name: <workdir>/runs/RUN."),
    worst: int = typer.Option(10, "--worst", min=0, help="Worst utterances listed per split and decoding "
                              "(from `d2v evaluate`'s errs- files)."),
    workdir: Optional[Path] = WorkdirOpt,
):
    """An HTML page of a run's training curves, and its WER once `d2v evaluate` has scored it."""
    from d2vcli.report import write_report  # on use, like every command here: keeps `d2v --help` fast

    path = write_report(Workspace.resolve(workdir), run, worst=worst)
    console.print(str(path), markup=False, highlight=False, soft_wrap=True)


def main() -> None:
    """Entry point: user errors print one clear message, not a traceback."""
    try:
        app()
    except user_error_types() as e:
        _report(e)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
