"""The `d2v` command: a thin Typer shell over library functions.

Each command parses its arguments, resolves the config (defaults -> --preset ->
--config -> --set) and calls one library function, which prints a short summary of the
config. No logic lives here.

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
prepare_app = typer.Typer(no_args_is_help=True, help="Build manifests and LM resources in the workspace.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs and presets.")
app.add_typer(prepare_app, name="prepare")
app.add_typer(config_app, name="config")


def _print_version(value: bool) -> None:
    if value:
        console.print(f"d2vcli {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the d2vcli version and exit.")) -> None:
    """data2vec for speech: prepare, pretrain, finetune, decode, evaluate."""

WorkdirOpt = typer.Option(None, "--workdir", "-w", help="Workspace (default: $D2V_WORKDIR or ./d2v-work).")
PresetOpt = typer.Option(None, "--preset", help="A built-in preset (list them with `d2v config presets`).")
ConfigOpt = typer.Option(None, "--config", help="A YAML file of config overrides.")
SetOpt = typer.Option(None, "--set", help="Override one field: --set optim.lr=1e-4 (repeatable).")
ResumeOpt = typer.Option(False, "--resume", help="Continue the run's last checkpoint exactly (an error when the "
                         "run has none).")
ResumeIfExistsOpt = typer.Option(False, "--resume-if-exists", help="Continue the run if it has a checkpoint, "
                                 "else start it (for schedulers that relaunch the same command).")


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
WorkersOpt = typer.Option(0, "--workers", min=0, help="Parallel workers for the header scan (0 = all cores).")
SplitsOpt = typer.Option(None, "--splits", help="Splits to prepare (repeatable).")


def _run_prepare(fn, *args, **kwargs) -> None:
    """Call one prepare function and print its summary."""
    summary = fn(*args, **kwargs)
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
    fold: int = typer.Option(0, "--fold", min=0, help="Which 10-minute fold of 1h/ is train-10min."),
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
    max_seconds: float = typer.Option(30.0, "--max-seconds", min=1.0, help="Longest segment cut from the VAD chunks (at least 1 s)."),
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


@prepare_app.command("images")
def prepare_images_cmd(
    root: Path = typer.Argument(..., help="ImageNet-style tree (train/<class>/..., val/<class>/...) or one folder "
                                "of class folders."),
    splits: Optional[List[str]] = SplitsOpt,
    split: Optional[str] = typer.Option(None, "--split", help="Name of the one split when ROOT holds the class "
                                        "folders (default: ROOT's name)."),
    min_side: int = typer.Option(32, "--min-side", min=1, max=100000, help="Flag images whose shorter side is "
                                 "below this many pixels as tiny."),
    strict: bool = StrictOpt,
    workers: int = WorkersOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Image manifests (path, class, width, height) and classes.txt under <workdir>/data/images/."""
    from d2vcli.prepare.images import prepare_images

    _run_prepare(prepare_images, Workspace.resolve(workdir), root, splits, split=split, strict=strict,
                 min_side=min_side, workers=workers)


@prepare_app.command("synthetic")
def prepare_synthetic_cmd(
    out: Optional[Path] = typer.Option(None, "--out", help="Where to generate it (default: <workdir>/corpus/synthetic)."),
    size: str = typer.Option("demo", "--size", help="demo (~800 train utterances) or tiny (for tests)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Random seed; the same seed gives the same "
                              "corpus."),
    strict: bool = StrictOpt,
    workers: int = WorkersOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Generate the synthetic demo corpus (LibriSpeech layout + LM text) and prepare it."""
    from d2vcli.prepare import prepare_synthetic

    _run_prepare(prepare_synthetic, Workspace.resolve(workdir), out, size, seed, strict=strict, workers=workers)


@prepare_app.command("synthetic-images")
def prepare_synthetic_images_cmd(
    out: Optional[Path] = typer.Option(None, "--out", help="Where to generate it (default: "
                                       "<workdir>/corpus/synthetic-images)."),
    size: str = typer.Option("demo", "--size", help="demo (8,000 pool + 100 labeled images) or tiny (for tests)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Random seed; the same seed gives the same "
                              "corpus."),
    strict: bool = StrictOpt,
    workers: int = WorkersOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Generate the synthetic image corpus (10 shape/texture classes, ImageFolder layout) and prepare it."""
    from d2vcli.prepare.synthetic_images import prepare_synthetic_images

    _run_prepare(prepare_synthetic_images, Workspace.resolve(workdir), out, size, seed, strict=strict,
                 workers=workers)


@prepare_app.command("text")
def prepare_text_cmd(
    files: List[Path] = typer.Argument(..., help="UTF-8 text files: one sentence per line, an empty line between "
                                       "documents."),
    vocab_size: int = typer.Option(32000, "--vocab-size", min=8, max=1_000_000,
                                   help="Pieces of the sentencepiece model to train."),
    model_type: str = typer.Option("bpe", "--model-type", help="bpe or unigram."),
    spm: Optional[Path] = typer.Option(None, "--spm", help="Use this sentencepiece .model instead of training one."),
    lowercase: bool = typer.Option(False, "--lowercase", help="Lower-case the text after NFC normalization."),
    valid_fraction: float = typer.Option(0.01, "--valid-fraction", min=0.0, max=0.99,
                                         help="Share of documents for valid (by a hash of each document's text)."),
    tokens_per_sample: int = typer.Option(512, "--tokens-per-sample", min=2, max=1_000_000,
                                          help="Block length with <s>."),
    break_mode: str = typer.Option("complete_doc", "--break-mode", help="complete_doc, complete or none "
                                   "(fairseq's sample_break_mode)."),
    force: bool = typer.Option(False, "--force", help="Replace a corpus made with another tokenizer."),
    workers: int = WorkersOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Tokenizer and binarized token blocks (train/valid) under <workdir>/data/text/."""
    from d2vcli.prepare.text import prepare_text

    _run_prepare(prepare_text, Workspace.resolve(workdir), files, vocab_size=vocab_size, model_type=model_type,
                 spm_path=spm, lowercase=lowercase, valid_fraction=valid_fraction,
                 tokens_per_sample=tokens_per_sample, break_mode=break_mode, workers=workers, force=force)


@prepare_app.command("glue")
def prepare_glue_cmd(
    root: Optional[Path] = typer.Argument(None, help="GLUE data folder (CoLA/, RTE/, ...) or one task folder."),
    task: Optional[str] = typer.Option(None, "--task", help="Only this task of DIR (e.g. RTE)."),
    tsv: Optional[List[Path]] = typer.Option(None, "--tsv", help="A sentence[,sentence2],label table instead of "
                                             "DIR (repeatable; its file name is the split)."),
    task_name: Optional[str] = typer.Option(None, "--task-name", help="With --tsv: the task's folder name."),
    kind: str = typer.Option("classification", "--kind", help="With --tsv: classification or regression."),
    spm: Optional[Path] = typer.Option(None, "--spm", help="Tokenizer (default: <workdir>/data/text/spm.model)."),
    tokenizer_from: Optional[str] = typer.Option(None, "--tokenizer-from", help="Tokenize with the tokenizer this "
                                                 "text checkpoint or run carries (e.g. an imported HF model's BPE)."),
    tokens_per_sample: Optional[int] = typer.Option(None, "--tokens-per-sample", min=6, help="Longest record "
                                                    "(default: the text corpus's, else 512)."),
    workdir: Optional[Path] = WorkdirOpt,
):
    """Token records and task.json per task under <workdir>/data/glue/<TASK>/."""
    from d2vcli.prepare.glue import prepare_glue

    _run_prepare(prepare_glue, Workspace.resolve(workdir), root, task, tsv=tsv or (), task_name=task_name,
                 kind=kind, spm_path=spm, tokens_per_sample=tokens_per_sample, tokenizer_from=tokenizer_from)


@prepare_app.command("synthetic-text")
def prepare_synthetic_text_cmd(
    out: Optional[Path] = typer.Option(None, "--out", help="Where to generate it (default: "
                                       "<workdir>/corpus/synthetic-text)."),
    size: str = typer.Option("demo", "--size", help="demo (3,000 documents, 400 labeled per task) or tiny."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Random seed; the same seed gives the same "
                              "corpus."),
    force: bool = typer.Option(False, "--force", help="Replace a text corpus made with another tokenizer."),
    workers: int = WorkersOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Generate the synthetic text corpus (a grammar with agreement; 2 labeled tasks) and prepare it."""
    from d2vcli.prepare.synthetic_text import prepare_synthetic_text

    _run_prepare(prepare_synthetic_text, Workspace.resolve(workdir), out, size, seed, workers=workers, force=force)


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


# ----------------------------------------------------------------------------- import / export (interop)

import_app = typer.Typer(no_args_is_help=True, help="Convert fairseq or Hugging Face data2vec checkpoints to d2v.")
export_app = typer.Typer(no_args_is_help=True, help="Write d2v checkpoints in other toolkits' formats.")
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")
TrustOpt = typer.Option(False, "--trust-checkpoint",
                        help="Allow full unpickling (runs code from the file): only for files you trust.")
ImportOutOpt = typer.Option(None, "--out", help="Checkpoint to write (default: <workdir>/runs/imported-<name>/last.pt).")
ForceOpt = typer.Option(False, "--force", help="Replace an existing output (an earlier import or export).")


def _print_import(result) -> None:
    from d2vcli.ui import table

    a = result.arch
    vision = result.kind.startswith("vision-")
    rows = [("kind", result.kind), ("parameters", f"{result.num_parameters:,}"),
            ("architecture", f"{a['num_layers']} layers x {a['embed_dim']}, {a['num_heads']} heads, "
                             f"FFN {a['ffn_dim']}")]
    if vision:
        rows.append(("image", f"{a['image_size']}px, {a['patch_size']}px patches"))
    elif result.kind.startswith("text-"):
        rows += [("vocabulary", f"{a['vocab_size']} tokens, {a['max_positions']} positions"),
                 ("tokenizer", result.tokenizer or "none")]
    else:
        rows.append(("normalize", result.normalize))
    if result.kind == "ctc":
        rows.append(("vocabulary", f"{result.vocab_size} outputs"))
    if result.kind in ("vision-cls", "text-cls"):
        rows.append(("classes", result.num_classes))
    console.print(table("imported", ["field", "value"], rows))
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    run = result.path.parent.name
    use = {"pretrain": f"--set finetune.init={run}", "ctc": f"decode/evaluate with {run}"}.get(
        result.kind, f"d2v export hf {run} DIR, or d2vcli.models.loading.load_model")
    console.print(f"wrote {result.path}  (use it by run name: {use})", markup=False)


@import_app.command("fairseq")
def import_fairseq_cmd(
    file: Path = typer.Argument(..., help="fairseq data2vec checkpoint (.pt): pretrained or CTC fine-tuned."),
    dict_path: Optional[Path] = typer.Option(None, "--dict", help="dict.ltr.txt the CTC model was fine-tuned with "
                                             "(default: the LibriSpeech letter dictionary)."),
    use_ema: bool = typer.Option(False, "--use-ema", help="Pretrained only: initialize the student's transformer "
                                 "(2.0: context encoder) from the EMA teacher."),
    out: Optional[Path] = ImportOutOpt,
    trust: bool = TrustOpt,
    force: bool = ForceOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Convert a fairseq data2vec audio checkpoint (1.0: audio_base_ls*.pt, vox_*.pt; 2.0: base_libri*.pt,
    large_vox*.pt), a data2vec 1.0 vision checkpoint of the BEiT repo (checkpoint-799.pth,
    mp_rank_00_model_states.pt), or a data2vec text checkpoint (1.0 or 2.0 nlp_base.pt), into a d2v checkpoint."""
    from d2vcli.interop import import_fairseq

    _print_import(import_fairseq(file, out=out, dict_path=dict_path, use_ema=use_ema, trust=trust,
                                 workspace=Workspace.resolve(workdir), force=force))


@import_app.command("hf")
def import_hf_cmd(
    folder: Path = typer.Argument(..., help="A save_pretrained folder of Data2VecAudioModel/ForCTC, "
                                  "Data2VecVisionModel/ForImageClassification or "
                                  "Data2VecTextModel/ForSequenceClassification."),
    dict_path: Optional[Path] = typer.Option(None, "--dict", help="dict.ltr.txt to use instead of vocab.json."),
    out: Optional[Path] = ImportOutOpt,
    trust: bool = TrustOpt,
    force: bool = ForceOpt,
    workdir: Optional[Path] = WorkdirOpt,
):
    """Convert a Hugging Face data2vec-audio, data2vec-vision or data2vec-text model folder into a d2v checkpoint."""
    from d2vcli import interop_text, interop_vision
    from d2vcli.interop import import_hf

    convert = interop_vision.import_hf if interop_vision.is_vision_folder(folder) else \
        interop_text.import_hf if interop_text.is_text_folder(folder) else import_hf
    _print_import(convert(folder, out=out, dict_path=dict_path, trust=trust, workspace=Workspace.resolve(workdir),
                          force=force))


@export_app.command("hf")
def export_hf_cmd(
    checkpoint: str = typer.Argument(..., help="A d2v checkpoint: a path, a run directory or a run name."),
    out_dir: Path = typer.Argument(..., help="Folder to write (loads with transformers' from_pretrained)."),
    trust: bool = TrustOpt,
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder, first removing the files an "
                               "earlier export wrote there (other files are kept)."),
    spm: Optional[Path] = typer.Option(None, "--spm", help="Text models: the sentencepiece model to write as the "
                                       "tokenizer (default: the checkpoint's, else <workdir>/data/text/spm.model)."),
    workdir: Optional[Path] = WorkdirOpt,
):
    """Write a d2v checkpoint as a Hugging Face Data2VecAudioForCTC (ctc) or Data2VecAudioModel (pretrain) folder
    (data2vec 1.0 only: HF has no ALiBi), an image model as Data2VecVisionForImageClassification (vision-cls)
    or Data2VecVisionModel (vision-pretrain), or a text model as Data2VecTextForSequenceClassification (text-cls)
    or Data2VecTextModel (text-pretrain), with its tokenizer."""
    from d2vcli import interop_text, interop_vision
    from d2vcli.checkpoint import find_checkpoint
    from d2vcli.interop import export_hf

    path = find_checkpoint(Workspace.resolve(workdir), checkpoint)
    text = interop_text.is_text_checkpoint(path)
    if spm is not None and not text:
        raise typer.BadParameter("--spm is for text models", param_hint="--spm")
    if text:
        written = interop_text.export_hf(path, out_dir, trust=trust, force=force, tokenizer=spm)
    else:
        write = interop_vision.export_hf if interop_vision.is_vision_checkpoint(path) else export_hf
        written = write(path, out_dir, trust=trust, force=force)
    for p in written:
        console.print(f"wrote {p}", markup=False)
    note = interop_text.missing_tokenizer_note(written) if text else None
    if note:
        console.print(f"note: {note}", markup=False)


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


@prepare_app.command("lm")
def prepare_lm_cmd(
    arpa: Optional[Path] = typer.Option(None, "--arpa", help="An ARPA LM (.arpa or .arpa.gz) to convert."),
    text: Optional[Path] = typer.Option(None, "--text", help="A text corpus (.txt or .txt.gz, a sentence a line)."),
    order: int = typer.Option(4, "--order", min=2, help="n-gram order for --text (at least 2; the most the "
                              "KenLM in flashlight-text reads is checked too)."),
    unit: Literal["word", "letter"] = typer.Option("word", "--unit", help="word (lexicon decoding) or letter "
                                                   "(lexicon-free decoding)."),
    words: Optional[Path] = typer.Option(None, "--words", help="Word list for the lexicon instead of the LM unigrams."),
    dict_path: Optional[Path] = typer.Option(None, "--dict", help="Letter dictionary (default <workdir>/data/dict.ltr.txt)."),
    name: Optional[str] = typer.Option(None, "--name", help="Binary name in lm/ (default: 4gram)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="Normalize --text like the transcripts."),
    match_case: bool = typer.Option(False, "--match-case", help="Convert the LM's words to the dictionary's case."),
    discount_fallback: Literal["auto", "always", "never"] = typer.Option(
        "auto", "--discount-fallback", help="lmplz --discount_fallback: auto = only when the corpus is too small."),
    structure: Literal["probing", "trie"] = typer.Option("probing", "--structure", help="KenLM binary layout."),
    memory: str = typer.Option("20%", "--memory", help="lmplz sorting memory (-S), e.g. 4G or 50%."),
    keep_arpa: bool = typer.Option(False, "--keep-arpa", help="Keep the ARPA lmplz wrote next to the binary."),
    workdir: Optional[Path] = WorkdirOpt,
):
    """Build the KenLM binary + lexicon in <workdir>/lm/ and validate them (OOV, perplexity, case)."""
    from d2vcli.lm.prepare import prepare_lm, print_report

    report = prepare_lm(Workspace.resolve(workdir), arpa=arpa, text=text, order=order, unit=unit, words=words,
                        dictionary=dict_path, name=name, normalize=normalize, match_case=match_case,
                        discount_fallback=discount_fallback, structure=structure, memory=memory,
                        keep_arpa=keep_arpa)
    print_report(report)


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
