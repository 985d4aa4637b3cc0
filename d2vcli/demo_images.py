"""`d2v demo --modality images`: the image pipeline on the generated image corpus, on CPU, with no downloads.

    d2v demo --modality images [--workdir W] [--compare-init]

Stages, each the same library call the matching command makes:

  1. prepare   `d2v prepare synthetic-images`        8,000 unlabeled `pool` images, 100 labeled `train`,
                                                     300 `val`, 300 `test` (10 classes, 32x32)
  2. pretrain  `d2v pretrain --preset vision-tiny`   data2vec 1.0 on the pool, unlabeled (PRETRAIN_UPDATES)
  3. finetune  `d2v finetune --preset vision-ft-tiny --init demo-images-pretrain`   on the 100 labeled images
  4. evaluate  `d2v evaluate`                        top-1 / top-5 on val and test

`--compare-init` also fine-tunes the same architecture from random weights (`--init scratch`) with the same
preset and budget, evaluates it the same way and prints both in one table, whatever it shows. `best.pt` is
picked on val top-1 in both arms, so test is the split neither arm's choices have seen. Every stage resumes:
a re-run skips prepared splits and finished runs. The speech demo is `d2vcli/demo.py`; its stage helpers
are shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from d2vcli import config as cfgmod
from d2vcli.demo import Laps, pretrain_stage, stage, stop, updates_set
from d2vcli.evaluate_vision import ImageEvalResult, evaluate_images
from d2vcli.finetune import finetune
from d2vcli.finetune_vision import FINETUNE_VISION_FIELDS
from d2vcli.image_data import read_image_manifest
from d2vcli.prepare.images import image_manifest
from d2vcli.prepare.synthetic_images import default_synthetic_images_dir, prepare_synthetic_images
from d2vcli.ui import console, table

COMMAND = "d2v demo --modality images"
PRETRAIN_PRESET = "vision-tiny"
FINETUNE_PRESET = "vision-ft-tiny"
PRETRAIN_RUN = "demo-images-pretrain"
FINETUNE_RUN = "demo-images-finetune"
SCRATCH_RUN = "demo-images-finetune-scratch"
LABELED_SPLIT = "train"  # the corpus's labeled split: 10 images per class
EVAL_SPLITS = ("val", "test")
# vision-tiny's preset runs 500 updates; the demo runs 300 (about 3 minutes on 2 CPU cores), the length
# docs/images.md measured fine-tuning after, to keep the whole demo with --compare-init well under 10 minutes.
PRETRAIN_UPDATES = 300


@dataclass
class ImageDemoSettings:
    size: str = "demo"  # synthetic image corpus size: "demo" or "tiny"
    pretrain_updates: Optional[int] = PRETRAIN_UPDATES  # None: the vision-tiny preset's train.max_updates
    pretrain_set: tuple[str, ...] = ()  # --set overrides of the pretraining preset
    finetune_updates: Optional[int] = None  # None: the vision-ft-tiny preset's value
    finetune_set: tuple[str, ...] = ()  # --set overrides of the fine-tuning preset (both arms)
    compare_init: bool = False
    workers: int = 0  # prepare's header-scan processes (0: the prepare default)


@dataclass
class ImageDemoResult:
    workdir: Path
    evaluation: ImageEvalResult  # the pretrained -> fine-tuned model
    scratch: Optional[ImageEvalResult] = None  # the same fine-tuning from random init (--compare-init)
    labeled: str = ""  # what the labeled subset is, in words
    seconds: dict[str, float] = field(default_factory=dict)
    artefacts: dict[str, Path] = field(default_factory=dict)


def scratch_init(pcfg: cfgmod.Config) -> dict:
    """--init scratch settings with the demo's pretraining architecture (any --set of it included), so both
    arms fine-tune the same network; the fine-tuning fields (drop path, mean/std) stay the fine-tuning
    preset's in both."""
    arch = {k: v for k, v in cfgmod.to_dict(pcfg.vision).items() if k not in FINETUNE_VISION_FIELDS}
    return {"finetune": {"init": "scratch", "arch_preset": ""}, "vision": arch}


def _finetune(ws, init, name: str, settings: ImageDemoSettings) -> None:
    """vision-ft-tiny on the labeled split from `init`: a run name, or a dict of settings (the scratch arm)."""
    overrides = [f"data.train_splits=[{LABELED_SPLIT}]", *settings.finetune_set,
                 *updates_set(settings.finetune_updates)]
    cfg = cfgmod.resolve("finetune", preset=FINETUNE_PRESET, overrides=overrides)
    cfg = cfgmod.merge(cfg, init if isinstance(init, dict) else {"finetune": {"init": init}})
    result = finetune(cfg, ws, name=name, resume_if_exists=True, preset=FINETUNE_PRESET)
    if result.exit_code:
        stop(f"fine-tuning {name}", result, ws.run_dir(name), COMMAND)


def run_image_demo(ws, settings: Optional[ImageDemoSettings] = None) -> ImageDemoResult:
    """Run the four stages (and the random-init arm with compare_init) in `ws`."""
    settings = settings or ImageDemoSettings()
    total = 4
    lap = Laps()

    stage(1, total, "prepare the synthetic image corpus")
    summary = prepare_synthetic_images(ws, size=settings.size, workers=settings.workers)
    console.print(summary.table())
    lap("prepare")

    stage(2, total, f"data2vec 1.0 pretraining of the ViT on the unlabeled pool ({PRETRAIN_PRESET})")
    pcfg = pretrain_stage(ws, PRETRAIN_PRESET, PRETRAIN_RUN, settings.pretrain_set, settings.pretrain_updates,
                          COMMAND)
    lap("pretrain")

    stage(3, total, f"classification fine-tuning from the pretrained ViT on the labeled split ({FINETUNE_PRESET})")
    labeled = (f"{len(read_image_manifest(image_manifest(ws, LABELED_SPLIT)))} labeled images "
               f"('{LABELED_SPLIT}') against {len(read_image_manifest(image_manifest(ws, 'pool')))} unlabeled ('pool')")
    console.print(labeled, markup=False)
    _finetune(ws, PRETRAIN_RUN, FINETUNE_RUN, settings)
    lap("finetune")

    stage(4, total, "evaluate: top-1 / top-5 on " + " and ".join(EVAL_SPLITS))
    evaluation = evaluate_images(ws, FINETUNE_RUN, list(EVAL_SPLITS))
    lap("evaluate")

    scratch = None
    if settings.compare_init:
        console.rule("[bold]demo --compare-init: the same fine-tuning from random init")
        _finetune(ws, scratch_init(pcfg), SCRATCH_RUN, settings)
        scratch = evaluate_images(ws, SCRATCH_RUN, list(EVAL_SPLITS))
        lap("compare-init")

    artefacts = {
        "corpus": default_synthetic_images_dir(ws),
        "manifests": ws.data_dir / "images",
        "pretrained model": ws.run_dir(PRETRAIN_RUN) / "last.pt",
        "fine-tuned model": ws.run_dir(FINETUNE_RUN) / "best.pt",
        "training logs": ws.run_dir(FINETUNE_RUN) / "metrics.jsonl",
        "predictions, confusion, accuracy": evaluation.out_dir,
    }
    if scratch is not None:
        artefacts["random-init model"] = ws.run_dir(SCRATCH_RUN) / "best.pt"
        artefacts["random-init predictions"] = scratch.out_dir
    return ImageDemoResult(ws.root, evaluation, scratch, labeled, lap.seconds, artefacts)


def print_image_demo(result: ImageDemoResult) -> None:
    ev = result.evaluation
    console.rule(f"[bold]image demo results ({PRETRAIN_PRESET} pretraining, {FINETUNE_PRESET})")
    console.print(ev.table())
    if result.scratch is not None:
        sc = result.scratch
        rows = [(s, f"{ev.top1(s):.1f}", f"{sc.top1(s):.1f}", f"{ev.top1(s) - sc.top1(s):+.1f}",
                 f"{ev.top5(s):.1f}", f"{sc.top5(s):.1f}") for s in ev.scores]
        console.print(table("pretrained vs random init, top-1 / top-5 (%)",
                            ["split", "top-1 pretr.", "top-1 random", "gap", "top-5 pretr.", "top-5 random"], rows))
        console.print(f"both arms: {FINETUNE_PRESET} on {result.labeled}, the same budget; chance is 10 %.",
                      markup=False)
        console.print("best.pt is picked on val top-1 in both arms; test is held out from every choice.",
                      markup=False)
    console.print(table("where everything is", ["artefact", "path"],
                        [(k, str(v)) for k, v in result.artefacts.items()]))
    console.print("time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
                  + f" (total {sum(result.seconds.values()):.0f} s)", markup=False)
