"""`d2v demo --modality text`: the text pipeline on the generated text corpus, on CPU, with no downloads.

    d2v demo --modality text [--workdir W] [--compare-init]

Stages, each the same library call the matching command makes:

  1. prepare   `d2v prepare synthetic-text`          3,000 unlabeled documents (the pretraining pool) and two
                                                     labeled tasks of 400 train / 300 dev / 600 test records
  2. pretrain  `d2v pretrain --preset text-tiny`     data2vec 1.0 text on the pool, unlabeled
  3. finetune  `d2v finetune --preset glue-tiny --task AGREEMENT --init demo-text-pretrain`
                                                     on AGREEMENT's 400 labeled sentences
  4. evaluate  `d2v evaluate`                        Matthews correlation (and accuracy) on dev and test

`--compare-init` also fine-tunes the same architecture from random weights (`--init scratch`) on the
same records with the same budget, at each learning rate of a small sweep; the rate with the best dev
score (its best.pt's) is the baseline, as in the speech demo, and both arms are printed in one table
with the sweep beside it, whatever it shows. best.pt is picked on dev in every run, so test is the split
none of the demo's choices has seen. Every stage resumes: a re-run skips the prepared corpus and
finished runs. The speech demo is `d2vcli/demo.py`; its stage helpers are shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from d2vcli import config as cfgmod
from d2vcli.demo import Laps, pretrain_stage, stage, stop, updates_set
from d2vcli.evaluate_text import TextEvalResult, evaluate_text
from d2vcli.fileio import read_jsonl
from d2vcli.finetune import finetune
from d2vcli.finetune_text import FINETUNE_TEXT_FIELDS
from d2vcli.prepare.synthetic_text import default_synthetic_text_dir, prepare_synthetic_text
from d2vcli.text_data import TokenBlocks, glue_dir, read_task_records, text_dir
from d2vcli.ui import console, table

COMMAND = "d2v demo --modality text"
PRETRAIN_PRESET = "text-tiny"
FINETUNE_PRESET = "glue-tiny"
PRETRAIN_RUN = "demo-text-pretrain"
FINETUNE_RUN = "demo-text-finetune"
SCRATCH_RUN = "demo-text-finetune-scratch"  # + "-lr<rate>" per rate of the sweep
# AGREEMENT (CoLA-like: is the sentence grammatical? scored by Matthews correlation, as CoLA is): every
# violation is a dependency the unlabeled pool shows only in its grammatical form (d2vcli/synthetic_text.py).
TASK = "AGREEMENT"
CHANCE = {"mcc": "0", "acc": "50 %", "acc_and_f1": "50 %"}  # a constant or random guess, per metric
EVAL_SPLITS = ("dev", "test")
SELECT_SPLIT = "dev"
# The random-init arm's sweep: glue-tiny's 5e-4 and a rate on each side of it, picked on SELECT_SPLIT.
RANDOM_INIT_LRS = (2e-4, 5e-4, 1e-3)


@dataclass
class TextDemoSettings:
    size: str = "demo"  # synthetic text corpus size: "demo" or "tiny"
    task: str = TASK  # the labeled task to fine-tune on: AGREEMENT or REFERENT
    pretrain_updates: Optional[int] = None  # None: the text-tiny preset's train.max_updates
    pretrain_set: tuple[str, ...] = ()  # --set overrides of the pretraining preset
    finetune_updates: Optional[int] = None  # None: the glue-tiny preset's value
    finetune_set: tuple[str, ...] = ()  # --set overrides of the fine-tuning preset (every run of both arms)
    random_init_lrs: tuple[float, ...] = RANDOM_INIT_LRS
    compare_init: bool = False
    workers: int = 0  # prepare's processes (0: the prepare default)


@dataclass
class TextDemoResult:
    workdir: Path
    evaluation: TextEvalResult  # the pretrained -> fine-tuned model
    scratch: Optional[TextEvalResult] = None  # the best random-init run of the sweep (--compare-init)
    sweep: dict[float, float] = field(default_factory=dict)  # random-init lr -> best dev score (primary, %)
    scratch_lr: Optional[float] = None
    labeled: str = ""  # what the labeled set is, in words
    seconds: dict[str, float] = field(default_factory=dict)
    artefacts: dict[str, Path] = field(default_factory=dict)


def scratch_init(pcfg: cfgmod.Config) -> dict:
    """--init scratch settings with the demo's pretraining architecture (any --set of it included), so both
    arms fine-tune the same network; the fine-tuning fields (dropouts) stay the fine-tuning preset's."""
    arch = {k: v for k, v in cfgmod.to_dict(pcfg.text).items() if k not in FINETUNE_TEXT_FIELDS}
    return {"finetune": {"init": "scratch", "arch_preset": ""}, "text": arch}


def best_dev_score(run_dir: Path) -> float:
    """The best SELECT_SPLIT score (the task's primary metric, %) the run validated: its best.pt's."""
    scores = [r[f"{SELECT_SPLIT}/primary"] for r in read_jsonl(run_dir / "metrics.jsonl")
              if f"{SELECT_SPLIT}/primary" in r]
    return max(scores) if scores else float("nan")


def _finetune(ws, init, name: str, settings: TextDemoSettings, lr: Optional[float] = None) -> float:
    """glue-tiny on the task from `init`: a run name, or a dict of settings (the scratch arm). Returns the
    run's best dev score."""
    overrides = [f"finetune.task={settings.task}", f"data.valid_splits=[{SELECT_SPLIT}]",
                 f"finetune.best_metric={SELECT_SPLIT}/error", *settings.finetune_set,
                 *updates_set(settings.finetune_updates)]
    if lr is not None:
        overrides.append(f"optim.lr={lr}")
    cfg = cfgmod.resolve("finetune", preset=FINETUNE_PRESET, overrides=overrides)
    cfg = cfgmod.merge(cfg, init if isinstance(init, dict) else {"finetune": {"init": init}})
    result = finetune(cfg, ws, name=name, resume_if_exists=True, preset=FINETUNE_PRESET)
    if result.exit_code:
        stop(f"fine-tuning {name}", result, ws.run_dir(name), COMMAND)
    return best_dev_score(ws.run_dir(name))


def describe_labeled(ws, task: str) -> str:
    folder = glue_dir(ws) / task
    counts = {s: len(read_task_records(folder, s)) for s in ("train", *EVAL_SPLITS)}
    return (f"{counts['train']} labeled {task} records ('train'; dev {counts['dev']}, test {counts['test']}) "
            f"against the unlabeled pool of {len(TokenBlocks(text_dir(ws), 'train')):,} blocks")


def run_text_demo(ws, settings: Optional[TextDemoSettings] = None) -> TextDemoResult:
    """Run the four stages (and the random-init sweep with compare_init) in `ws`."""
    settings = settings or TextDemoSettings()
    total = 4
    lap = Laps()

    stage(1, total, "prepare the synthetic text corpus")
    summary = prepare_synthetic_text(ws, size=settings.size, workers=settings.workers)
    console.print(summary.table())
    lap("prepare")

    stage(2, total, f"data2vec 1.0 pretraining of the text encoder on the unlabeled pool ({PRETRAIN_PRESET})")
    pcfg = pretrain_stage(ws, PRETRAIN_PRESET, PRETRAIN_RUN, settings.pretrain_set, settings.pretrain_updates,
                          COMMAND)
    lap("pretrain")

    stage(3, total, f"{settings.task} fine-tuning from the pretrained encoder ({FINETUNE_PRESET})")
    labeled = describe_labeled(ws, settings.task)
    console.print(labeled, markup=False)
    _finetune(ws, PRETRAIN_RUN, FINETUNE_RUN, settings)
    lap("finetune")

    stage(4, total, "evaluate: the task's metric on " + " and ".join(EVAL_SPLITS))
    evaluation = evaluate_text(ws, FINETUNE_RUN, list(EVAL_SPLITS))
    lap("evaluate")

    scratch, sweep, best_lr = None, {}, None
    if settings.compare_init:
        console.rule("[bold]demo --compare-init: the same fine-tuning from random weights (--init scratch)")
        for lr in settings.random_init_lrs:
            sweep[lr] = _finetune(ws, scratch_init(pcfg), f"{SCRATCH_RUN}-lr{lr:g}", settings, lr=lr)
        best_lr = max(sweep, key=lambda lr: (sweep[lr] == sweep[lr], sweep[lr]))  # NaN (never validated) last
        scratch = evaluate_text(ws, f"{SCRATCH_RUN}-lr{best_lr:g}", list(EVAL_SPLITS))
        lap("compare-init")

    artefacts = {
        "corpus": default_synthetic_text_dir(ws),
        "token shards, tokenizer": text_dir(ws),
        "labeled task": glue_dir(ws) / settings.task,
        "pretrained model": ws.run_dir(PRETRAIN_RUN) / "last.pt",
        "fine-tuned model": ws.run_dir(FINETUNE_RUN) / "best.pt",
        "training logs": ws.run_dir(FINETUNE_RUN) / "metrics.jsonl",
        "predictions, scores": evaluation.out_dir,
    }
    if scratch is not None:
        artefacts["random-init model"] = scratch.checkpoint
        artefacts["random-init predictions"] = scratch.out_dir
    return TextDemoResult(ws.root, evaluation, scratch, sweep, best_lr, labeled, lap.seconds, artefacts)


def print_text_demo(result: TextDemoResult) -> None:
    ev = result.evaluation
    metric = ev.task.get("metric", "")
    console.rule(f"[bold]text demo results ({PRETRAIN_PRESET} pretraining, {FINETUNE_PRESET} on {ev.task.get('name')})")
    console.print(ev.table())
    if result.scratch is not None:
        sc = result.scratch
        rows = [(s, f"{ev.primary(s):.1f}", f"{sc.primary(s):.1f}", f"{ev.primary(s) - sc.primary(s):+.1f}")
                for s in ev.scores]
        console.print(table(f"pretrained vs random init, {ev.task.get('name')} {metric} (%)",
                            ["split", "pretrained", "random init", "gap"], rows))
        chance = f"; chance is {CHANCE[metric]}" if metric in CHANCE else ""
        console.print(f"both arms: {FINETUNE_PRESET} on {result.labeled}, the same budget{chance}.", markup=False)
        console.print(f"random init: optim.lr {result.scratch_lr:g} picked on {SELECT_SPLIT} from the sweep "
                      + ", ".join(f"{lr:g} -> {v:.1f}" for lr, v in result.sweep.items())
                      + f"; best.pt is picked on {SELECT_SPLIT} in every run, test is held out from every choice.",
                      markup=False)
    console.print(table("where everything is", ["artefact", "path"],
                        [(k, str(v)) for k, v in result.artefacts.items()]))
    console.print("time per stage: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items())
                  + f" (total {sum(result.seconds.values()):.0f} s)", markup=False)
