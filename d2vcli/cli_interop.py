"""`d2v import ...` and `d2v export ...`: the sub-apps that convert checkpoints from and to fairseq and
Hugging Face (d2vcli.interop*, picked by model type or checkpoint kind); cli.py adds them to the root app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from d2vcli.cli_options import TrustOpt, WorkdirOpt
from d2vcli.ui import console
from d2vcli.workspace import Workspace

import_app = typer.Typer(no_args_is_help=True, help="Convert fairseq or Hugging Face data2vec checkpoints to d2v.")
export_app = typer.Typer(no_args_is_help=True, help="Write d2v checkpoints in other toolkits' formats.")
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
