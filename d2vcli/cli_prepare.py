"""`d2v prepare ...`: the sub-app that builds manifests, token shards and LM resources in the workspace.

Each command calls one function of d2vcli.prepare (or d2vcli.lm) and prints its summary; cli.py adds
this app to the root one.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Literal, Optional

import typer

from d2vcli.cli_options import WorkdirOpt
from d2vcli.ui import console
from d2vcli.workspace import Workspace

prepare_app = typer.Typer(no_args_is_help=True, help="Build manifests and LM resources in the workspace.")

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
