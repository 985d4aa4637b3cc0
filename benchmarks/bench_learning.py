"""Does pretraining pay? Fine-tuned greedy CER from speech-tiny (and speech2-tiny) pretraining against random init.

    python benchmarks/bench_learning.py                         # 3 seeds, the demo's budgets (long: see below)
    python benchmarks/bench_learning.py --seeds 1 --quick        # one seed, short budgets (a smoke run)
    python benchmarks/bench_learning.py --images                 # the image arm (`--images --help`; below)

On the synthetic demo corpus (`d2v prepare synthetic`, 800 training utterances), for each seed:

1. pretraining: `speech-tiny` on all the training audio (unlabeled), for P and for 2P updates
   (two runs, each with its own full schedule: "more pretraining must not hurt"), and data2vec 2.0
   (`speech2-tiny`) for Q updates (`--pretrain2-updates`, 0 to skip), also with its own schedule;
2. fine-tuning (`finetune-tiny`, 1,200 updates for every arm) at two labeled sizes, every 40th
   and every 20th training utterance (2.7 % and 5 % of the audio), from each pretrained model and
   from random init (`--init scratch`) at each learning rate of a small sweep; the random arm's
   rate is picked on dev-clean, as in `d2v demo --compare-init`. As in the demo, the random arm
   trains its encoder from update 0 (no 300-update freeze) and the 2.0 arm fine-tunes with the 2.0
   demo's recipe (`demo.FINETUNE_SETS`);
3. greedy CER on dev-other at the end of fine-tuning (the last validation), and for the 2.0 arm its
   pretraining wall-clock over 1.0's (each run's own training time, same seed and threads).

It prints the table and writes it into docs/benchmarks.md between the markers below (the rest of
the page is left alone). Every number is one fine-tuning run per (seed, arm, size); the spread is
the standard deviation over seeds. Budget: 3 seeds x (P + 2P + Q pretraining updates + 2 sizes x
(3 + len(lrs)) fine-tunings); at the defaults 1.8 h of single-thread training (the table of
2026-12-01: the 42 fine-tunings took about 20 minutes of wall time as 3 parallel processes on 2 cores).
Runs resume, so `--seeds 1`, `--seeds 2`, `--seeds 3` can run side by side (each with its own `--out`)
and a last call with every seed builds the table from the finished runs. This is a benchmark script,
not a timed test.

`--text` runs the text arm instead (its own section of docs/benchmarks.md; the speech arms are left
alone): on the synthetic text corpus (`d2v prepare synthetic-text`), per seed, `text-tiny` pretraining
on the unlabeled pool (`--text-pretrain-updates`, the preset's 1,200 by default), then `glue-tiny` on
the demo's task (AGREEMENT, 400 labeled sentences) from it and from random init at each rate of the
demo's sweep (picked on dev); the task's metric (MCC) of each best.pt on test. Runs resume, so
`--text --seeds 1`, `--seeds 2`, ... can run side by side and a last `--text` call builds the table
from the finished runs (`--quick`: 50 pretraining and 50 fine-tuning updates). About 8 minutes of single-thread training per seed.

The image arm (`--images`, `images_main`): on the synthetic image corpus (`d2v prepare synthetic-images`,
8,000 unlabeled `pool` images, 100 labeled `train`), for each seed, `vision-tiny` pretraining on the pool
(the image demo's 300 updates), then `vision-ft-tiny` on `train` four times: `--linear-probe` and full
fine-tuning, each from the pretrained student and from `--init scratch`. `best.pt` is picked on val and
`d2v evaluate` scores it on test. It prints test top-1 per arm (mean ± std over seeds, per seed), writes every
number as JSON (`--json`, default WORKDIR/learning-images.json) and replaces the table between its markers in
docs/images.md. Per seed about 300 x 128 pretraining images and 4 x 300 x 32 fine-tuning images: about 5
minutes on an idle core, estimated; three seeds as three processes on the shared 2-core machine took about
20 minutes of wall time (0.96 h of training). The speech arms above are unchanged by it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from d2vcli import config as cfgmod
from run_all import _cpu as cpu_name  # benchmarks/ is on sys.path when a script here runs
from d2vcli.demo import FINETUNE_SETS, RANDOM_INIT_LRS, SELECT_SPLIT, _scratch_arch
from d2vcli.demo_images import FINETUNE_PRESET, LABELED_SPLIT, PRETRAIN_PRESET, PRETRAIN_UPDATES, scratch_init
from d2vcli.evaluate_vision import evaluate_images
from d2vcli.prepare.synthetic_images import prepare_synthetic_images
from d2vcli.fileio import read_jsonl
from d2vcli.finetune import finetune
from d2vcli.manifest import read_manifest, write_manifest
from d2vcli.prepare.synthetic import prepare_synthetic
from d2vcli.pretrain import pretrain
from d2vcli.workspace import Workspace

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench_learning: begin -->", "<!-- bench_learning: end -->"
REPORT_SPLIT = "dev-other"
TEXT_BEGIN, TEXT_END = "<!-- bench_learning text: begin -->", "<!-- bench_learning text: end -->"


def labeled_split(ws: Workspace, every: int) -> str:
    """data/train-every<N>.jsonl: every N-th training utterance by id (all speakers)."""
    name = f"train-every{every}"
    records = sorted(read_manifest(ws.manifest("train")), key=lambda r: r.id)
    write_manifest(ws.manifest(name), records[::every])
    return name


def last_cer(ws: Workspace, run: str, split: str) -> float:
    rows = [r for r in read_jsonl(ws.run_dir(run) / "metrics.jsonl") if f"{split}/cer" in r]
    return rows[-1][f"{split}/cer"] if rows else float("nan")


def train_seconds(ws: Workspace, run: str) -> float:
    """The run's own training time (the engine's `wall` on its last log line), so a table rebuilt from
    finished runs (they resume at their end) still reports what they cost."""
    rows = [r for r in read_jsonl(ws.run_dir(run) / "metrics.jsonl") if "wall" in r]
    return rows[-1]["wall"] if rows else 0.0


def run_pretrain(ws: Workspace, seed: int, updates: int, preset: str = "speech-tiny") -> str:
    name = f"pt{'2' if preset == 'speech2-tiny' else ''}-s{seed}-u{updates}"
    cfg = cfgmod.resolve("pretrain", preset=preset,
                         overrides=[f"train.seed={seed}", f"train.max_updates={updates}",
                                    f"train.log_every={min(25, updates)}"])  # a short run still logs its time
    result = pretrain(cfg, ws, name=name, resume_if_exists=True, preset=preset)
    if result.exit_code:
        sys.exit(f"{name}: {result.message}")
    return name


def run_finetune(ws: Workspace, name: str, init, seed: int, split: str, updates: int, lr=None,
                 extra: tuple[str, ...] = ()) -> tuple[float, float]:
    """(SELECT_SPLIT CER, REPORT_SPLIT CER) at the end of a finetune-tiny run on `split`."""
    overrides = [f"train.seed={seed}", f"data.train_splits=[{split}]", f"train.max_updates={updates}",
                 f"finetune.validate_every={updates}", f"finetune.validate_after={updates}", *extra]
    if lr is not None:
        overrides.append(f"optim.lr={lr}")
    cfg = cfgmod.resolve("finetune", preset="finetune-tiny", overrides=overrides)
    cfg = cfgmod.merge(cfg, init if isinstance(init, dict) else {"finetune": {"init": init}})
    result = finetune(cfg, ws, name=name, resume_if_exists=True, preset="finetune-tiny")
    if result.exit_code:
        sys.exit(f"{name}: {result.message}")
    return last_cer(ws, name, SELECT_SPLIT), last_cer(ws, name, REPORT_SPLIT)


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {sd:.1f} ({', '.join(f'{v:.1f}' for v in values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("bench-learning"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--pretrain-updates", type=int, default=1000, help="P (the demo's); 2P is also run")
    ap.add_argument("--pretrain2-updates", type=int, default=200,
                    help="Q: the data2vec 2.0 arm's speech2-tiny updates (0: no 2.0 arm)")
    ap.add_argument("--finetune-updates", type=int, default=1200, help="finetune-tiny's (the demo's)")
    ap.add_argument("--every", type=int, nargs="+", default=[40, 20], help="labeled subsets: every N-th utterance")
    ap.add_argument("--lrs", type=float, nargs="+", default=list(RANDOM_INIT_LRS), help="random-init lr sweep")
    ap.add_argument("--quick", action="store_true", help="P=100, 400 fine-tuning updates: a smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=DOC)
    ap.add_argument("--note", default="", help="a remark for the caption, e.g. that other jobs shared the cores")
    ap.add_argument("--text", action="store_true", help="run the text arm (text-tiny, glue-tiny) instead")
    ap.add_argument("--text-pretrain-updates", type=int, default=0, help="text-tiny updates (0: the preset's)")
    ap.add_argument("--images", action="store_true", help="the image arm instead (its options: --images --help)")
    if "--images" in sys.argv[1:]:  # the image arm has its own options
        sys.argv.remove("--images")
        return images_main(sys.argv[1:])
    args = ap.parse_args()
    if args.text:
        torch.set_num_threads(args.threads)
        write_section(args.out, TEXT_BEGIN, TEXT_END, text_arm(args))
        return
    if args.quick:
        args.pretrain_updates, args.finetune_updates = 100, 400
        args.pretrain2_updates = min(args.pretrain2_updates, 40)
    torch.set_num_threads(args.threads)
    ws = Workspace.resolve(args.workdir)
    prepare_synthetic(ws, size="demo")
    splits = {every: labeled_split(ws, every) for every in args.every}
    minutes = {every: sum(r.seconds for r in read_manifest(ws.manifest(s))) / 60 for every, s in splits.items()}
    total = sum(r.seconds for r in read_manifest(ws.manifest("train"))) / 60
    P, Q = args.pretrain_updates, args.pretrain2_updates
    arm2 = f"data2vec 2.0, {Q} updates"
    arch = _scratch_arch(cfgmod.resolve("pretrain", preset="speech-tiny"))

    cer: dict[tuple[int, str], list[float]] = {}
    picked: dict[int, list[float]] = {}
    runs: list[str] = []
    clock: dict[str, list[float]] = {}  # 2.0's pretraining seconds over 1.0's (P, 2P), per seed
    for seed in args.seeds:
        pretrained = {f"pretrained, {u} updates": run_pretrain(ws, seed, u) for u in (P, 2 * P)}
        if Q:
            pretrained[arm2] = run_pretrain(ws, seed, Q, preset="speech2-tiny")
            for u in (P, 2 * P):
                one = train_seconds(ws, pretrained[f"pretrained, {u} updates"])
                clock.setdefault(str(u), []).append(train_seconds(ws, pretrained[arm2]) / one if one else float("nan"))
        runs += pretrained.values()
        for every, split in splits.items():
            for arm, run in pretrained.items():
                runs.append(f"ft-s{seed}-{split}-{run}")
                extra = FINETUNE_SETS[2] if arm == arm2 else ()  # 2.0's fine-tuning recipe, as in the demo
                _, dev_other = run_finetune(ws, runs[-1], run, seed, split, args.finetune_updates, extra=extra)
                cer.setdefault((every, arm), []).append(dev_other)
            sweep = {lr: run_finetune(ws, f"ft-s{seed}-{split}-scratch-lr{lr:g}", arch, seed, split,
                                      args.finetune_updates, lr) for lr in args.lrs}
            runs += [f"ft-s{seed}-{split}-scratch-lr{lr:g}" for lr in args.lrs]
            best = min(sweep, key=lambda lr: (sweep[lr][0] != sweep[lr][0], sweep[lr][0]))  # NaN last
            picked.setdefault(every, []).append(best)
            cer.setdefault((every, "random init (lr picked on dev-clean)"), []).append(sweep[best][1])
    hours = sum(train_seconds(ws, run) for run in runs) / 3600

    arms = [f"pretrained, {P} updates", f"pretrained, {2 * P} updates", "random init (lr picked on dev-clean)"]
    arms += [arm2] if Q else []
    lines = [BEGIN, "## Learning: does pretraining pay? (`benchmarks/bench_learning.py`)", "",
             f"Greedy CER (%) on {REPORT_SPLIT} after `finetune-tiny` ({args.finetune_updates} updates), mean ± std "
             f"over seeds {', '.join(map(str, args.seeds))} (per-seed values in brackets; one fine-tuning run per "
             f"seed and arm). Pretraining: `speech-tiny` on all {total:.0f} min of training audio"
             f"{f' (data2vec 2.0: `speech2-tiny`, {Q} updates)' if Q else ''}. Random init: "
             f"`--init scratch`, lr from {{{', '.join(f'{lr:g}' for lr in args.lrs)}}} picked on {SELECT_SPLIT}. "
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, "
             f"{args.threads} thread{'s' if args.threads != 1 else ''}; {hours:.1f} h of training in all"
             f"{'; ' + args.note if args.note else ''}; {time.strftime('%Y-%m-%d')}.", "",
             "| labeled | " + " | ".join(arms) + " | gap (random − pretrained " + str(P) + "), per seed |",
             "|---|" + "---|" * (len(arms) + 1)]
    for every in args.every:
        gaps = [r - p for r, p in zip(cer[(every, arms[2])], cer[(every, arms[0])])]
        lines.append(f"| every {every}th: {minutes[every]:.1f} min ({100 * minutes[every] / total:.0f} %) | "
                     + " | ".join(spread(cer[(every, a)]) for a in arms)
                     + f" | {', '.join(f'{g:+.1f}' for g in gaps)} (lrs {', '.join(f'{lr:g}' for lr in picked[every])}) |")
    if Q:
        lines += ["", f"Pretraining wall-clock of data2vec 2.0 ({Q} updates) over 1.0's, per seed (each run's own "
                  "training time): " + "; ".join(f"against {u} updates {', '.join(f'{r:.2f}' for r in rs)}"
                                                   for u, rs in clock.items()) + "."]
    lines += ["", END]
    write_section(args.out, BEGIN, END, "\n".join(lines))


def write_section(out: Path, begin: str, end: str, table: str) -> None:
    """Print `table` (which starts with `begin` and ends with `end`) and put it into the page in place of
    the section between the markers, or at its end; the rest of the page is left alone."""
    print(table)
    page = out.read_text() if out.exists() else "# Benchmarks\n"
    if begin in page and end in page:
        page = page[:page.index(begin)] + table + page[page.index(end) + len(end):]
    else:
        page = page.rstrip("\n") + "\n\n" + table + "\n"
    out.write_text(page)


def text_arm(args) -> str:
    """The text arm (module docstring): its section of the page, markers included."""
    from d2vcli.demo_text import RANDOM_INIT_LRS as TEXT_LRS, SELECT_SPLIT as TEXT_SELECT, TASK, best_dev_score
    from d2vcli.demo_text import scratch_init as text_scratch_init
    from d2vcli.evaluate_text import evaluate_text
    from d2vcli.prepare.synthetic_text import prepare_synthetic_text

    ws = Workspace.resolve(args.workdir)
    prepare_synthetic_text(ws, size="demo")
    updates = args.text_pretrain_updates or cfgmod.resolve("pretrain", preset="text-tiny").train.max_updates
    ft_budget = ["train.max_updates=50", "finetune.validate_every=25"] if args.quick else []  # a smoke run
    if args.quick:
        updates = min(updates, 50)
    arch = text_scratch_init(cfgmod.resolve("pretrain", preset="text-tiny"))
    split = "test"

    def fine_tune(name: str, init, seed: int, lr=None) -> float:
        overrides = [f"train.seed={seed}", f"finetune.task={TASK}", f"data.valid_splits=[{TEXT_SELECT}]",
                     f"finetune.best_metric={TEXT_SELECT}/error", *ft_budget] + ([f"optim.lr={lr}"] if lr else [])
        cfg = cfgmod.merge(cfgmod.resolve("finetune", preset="glue-tiny", overrides=overrides),
                           init if isinstance(init, dict) else {"finetune": {"init": init}})
        result = finetune(cfg, ws, name=name, resume_if_exists=True, preset="glue-tiny")
        if result.exit_code:
            sys.exit(f"{name}: {result.message}")
        return best_dev_score(ws.run_dir(name))

    scores: dict[str, list[float]] = {"pretrained": [], "random": []}
    picked, runs = [], []
    for seed in args.seeds:
        pre = f"text-pt-s{seed}-u{updates}"
        cfg = cfgmod.resolve("pretrain", preset="text-tiny",
                             overrides=[f"train.seed={seed}", f"train.max_updates={updates}"])
        result = pretrain(cfg, ws, name=pre, resume_if_exists=True, preset="text-tiny")
        if result.exit_code:
            sys.exit(f"{pre}: {result.message}")
        runs += [pre, f"text-ft-s{seed}-{pre}"]
        fine_tune(runs[-1], pre, seed)
        scores["pretrained"].append(evaluate_text(ws, runs[-1], [split]).primary(split))
        sweep = {lr: fine_tune(f"text-ft-s{seed}-scratch-lr{lr:g}", arch, seed, lr) for lr in TEXT_LRS}
        runs += [f"text-ft-s{seed}-scratch-lr{lr:g}" for lr in TEXT_LRS]
        best = max(sweep, key=lambda lr: (sweep[lr] == sweep[lr], sweep[lr]))  # NaN last
        picked.append(best)
        scores["random"].append(evaluate_text(ws, f"text-ft-s{seed}-scratch-lr{best:g}", [split]).primary(split))
    hours = sum(train_seconds(ws, run) for run in runs) / 3600
    gaps = [p - r for p, r in zip(scores["pretrained"], scores["random"])]
    budget = "50 updates (--quick)" if args.quick else "the preset's 300 updates"
    return "\n".join([
        TEXT_BEGIN, "## Learning, text: does pretraining pay? (`benchmarks/bench_learning.py --text`)", "",
        f"{TASK} Matthews correlation (x 100) on its {split} split (600 sentences) of the best.pt (picked on "
        f"{TEXT_SELECT}) of `glue-tiny` (400 labeled sentences, {budget}), mean ± std over seeds "
        f"{', '.join(map(str, args.seeds))} (per-seed values in brackets; one run per seed and arm). Pretraining: "
        f"`text-tiny`, {updates} updates on the unlabeled pool of `d2v prepare synthetic-text`. Random init: "
        f"`--init scratch`, lr from {{{', '.join(f'{lr:g}' for lr in TEXT_LRS)}}} picked on {TEXT_SELECT}. "
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} thread{'s' if args.threads != 1 else ''}; "
        f"{hours:.1f} h of training in all{'; ' + args.note if args.note else ''}; {time.strftime('%Y-%m-%d')}.", "",
        "| task | pretrained | random init (lr picked on dev) | gap (pretrained − random), per seed |",
        "|---|---|---|---|",
        f"| {TASK} ({split}, MCC) | {spread(scores['pretrained'])} | {spread(scores['random'])} | "
        f"{', '.join(f'{g:+.1f}' for g in gaps)} (lrs {', '.join(f'{lr:g}' for lr in picked)}) |", "", TEXT_END])


# --------------------------------------------------------------------------- the image arm (--images)

IMAGE_DOC = Path(__file__).resolve().parent.parent / "docs" / "images.md"
IMAGE_BEGIN, IMAGE_END = "<!-- bench_learning images: begin -->", "<!-- bench_learning images: end -->"
IMAGE_ARMS = ("linear probe, pretrained", "linear probe, random init", "fine-tune, pretrained", "fine-tune, random init")
PROBE_LR = 0.01  # the head alone on fixed features takes a larger step than the whole network (vision-ft-tiny's 2e-3)


def image_arm(ws: Workspace, name: str, init, seed: int, probe: bool, args) -> dict:
    """One vision-ft-tiny run on the labeled split (best.pt picked on val), then `d2v evaluate` of best.pt:
    {"val": top-1, "test": top-1}. `init` is a pretraining run name or the scratch settings."""
    overrides = [f"train.seed={seed}", f"data.train_splits=[{LABELED_SPLIT}]", f"data.num_workers={args.workers}"]
    overrides += [f"train.max_updates={args.finetune_updates}"] if args.finetune_updates else []
    overrides += ["finetune.linear_probe=true", f"optim.lr={args.probe_lr}"] if probe else []
    overrides += args.finetune_set
    cfg = cfgmod.resolve("finetune", preset=FINETUNE_PRESET, overrides=overrides)
    cfg = cfgmod.merge(cfg, init if isinstance(init, dict) else {"finetune": {"init": init}})
    result = finetune(cfg, ws, name=name, resume_if_exists=True, preset=FINETUNE_PRESET)
    if result.exit_code:
        sys.exit(f"{name}: {result.message}")
    ev = evaluate_images(ws, name, ["val", "test"])
    return {"val": ev.top1("val"), "test": ev.top1("test"), "seconds": train_seconds(ws, name)}


def spread_stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def images_main(argv: list[str]) -> None:
    """Linear-probe and fine-tune test top-1 from vision-tiny pretraining against random init, per seed."""
    ap = argparse.ArgumentParser(prog="bench_learning.py --images",
                                 description="Does pretraining pay on the synthetic images? Linear-probe and "
                                             "fine-tune top-1, pretrained against random init, over seeds.")
    ap.add_argument("--workdir", type=Path, default=Path("bench-learning-images"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--pretrain-updates", type=int, default=PRETRAIN_UPDATES,
                    help=f"{PRETRAIN_PRESET} updates on the pool (the demo's)")
    ap.add_argument("--finetune-updates", type=int, default=0, help=f"0: {FINETUNE_PRESET}'s own budget")
    ap.add_argument("--probe-lr", type=float, default=PROBE_LR, help="the linear probe's learning rate")
    ap.add_argument("--size", default="demo", help="synthetic image corpus size: demo or tiny (a smoke run)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: in-process; same batches)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="where the numbers go (default WORKDIR/learning-images.json)")
    ap.add_argument("--out", type=Path, default=IMAGE_DOC, help="the page whose marked table is replaced")
    ap.add_argument("--note", default="", help="a remark for the caption, e.g. that other jobs shared the cores")
    ap.add_argument("--pretrain-set", nargs="*", default=[], help="--set overrides of the pretraining runs")
    ap.add_argument("--finetune-set", nargs="*", default=[], help="--set overrides of every probe and fine-tuning run")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ws = Workspace.resolve(args.workdir)
    prepare_synthetic_images(ws, size=args.size)
    pcfg = cfgmod.resolve("pretrain", preset=PRETRAIN_PRESET)
    scratch = scratch_init(pcfg)
    top1: dict[str, dict[str, list[float]]] = {arm: {"val": [], "test": []} for arm in IMAGE_ARMS}
    runs, P = [], args.pretrain_updates
    for seed in args.seeds:
        name = f"img-pt-s{seed}-u{P}"
        cfg = cfgmod.resolve("pretrain", preset=PRETRAIN_PRESET,
                             overrides=[f"train.seed={seed}", f"train.max_updates={P}", f"data.num_workers={args.workers}",
                                        f"train.log_every={min(25, P)}", *args.pretrain_set])
        result = pretrain(cfg, ws, name=name, resume_if_exists=True, preset=PRETRAIN_PRESET)
        if result.exit_code:
            sys.exit(f"{name}: {result.message}")
        runs.append(name)
        for arm, probe, init in ((IMAGE_ARMS[0], True, name), (IMAGE_ARMS[1], True, scratch),
                                 (IMAGE_ARMS[2], False, name), (IMAGE_ARMS[3], False, scratch)):
            run = f"img-{'lp' if probe else 'ft'}-s{seed}-{'scratch' if isinstance(init, dict) else name}"
            scores = image_arm(ws, run, init, seed, probe, args)
            runs.append(run)
            for split in ("val", "test"):
                top1[arm][split].append(scores[split])
    hours = sum(train_seconds(ws, run) for run in runs) / 3600
    ft_updates = args.finetune_updates or cfgmod.resolve("finetune", preset=FINETUNE_PRESET).train.max_updates
    labeled = sum(1 for _ in open(ws.data_dir / "images" / f"{LABELED_SPLIT}.jsonl", encoding="utf-8"))
    pool = sum(1 for _ in open(ws.data_dir / "images" / "pool.jsonl", encoding="utf-8"))
    stats = {arm: {split: spread_stats(v) for split, v in per.items()} for arm, per in top1.items()}
    caption = (f"Top-1 (%) on test (held out) and val of `best.pt` (picked on val) after `{FINETUNE_PRESET}` ({ft_updates} updates) on the "
               f"{labeled} labeled `{LABELED_SPLIT}` images, mean ± std over seeds {', '.join(map(str, args.seeds))} "
               f"(per seed in brackets; one run per seed and arm). Pretrained: `{PRETRAIN_PRESET}`, {P} updates on "
               f"the {pool:,} unlabeled `pool` images, a run per seed. Random init: `--init scratch`, the same "
               f"architecture. Linear probe: `--linear-probe`, lr {args.probe_lr:g}. Chance is 10 %. Machine: "
               f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} thread{'s' if args.threads != 1 else ''}; "
               f"{hours:.2f} h of training in all{'; ' + args.note if args.note else ''}; {time.strftime('%Y-%m-%d')}.")
    lines = [IMAGE_BEGIN, caption, "",
             "| | split | pretrained | random init | gap (pretrained − random), per seed |", "|---|---|---|---|---|"]
    for what, (a, b) in (("linear probe", IMAGE_ARMS[:2]), ("fine-tune", IMAGE_ARMS[2:])):
        for split in ("test", "val"):
            gaps = [p - r for p, r in zip(top1[a][split], top1[b][split])]
            lines.append(f"| {what} | {split}{' (picks best.pt)' if split == 'val' else ''} | {spread(top1[a][split])} | "
                         f"{spread(top1[b][split])} | {', '.join(f'{g:+.1f}' for g in gaps)} |")
    lines += ["", IMAGE_END]
    table = "\n".join(lines)
    print(table)
    out_json = args.json or ws.root / "learning-images.json"
    out_json.write_text(json.dumps({"seeds": args.seeds, "pretrain_preset": PRETRAIN_PRESET, "pretrain_updates": P,
                                    "finetune_preset": FINETUNE_PRESET, "finetune_updates": ft_updates,
                                    "probe_lr": args.probe_lr, "labeled": labeled, "pool": pool,
                                    "top1": stats, "training_hours": hours, "machine": cpu_name(),
                                    "cores": os.cpu_count(), "threads": args.threads, "note": args.note}, indent=2))
    print(f"wrote {out_json}")
    if args.out.exists() and IMAGE_BEGIN in (page := args.out.read_text()) and IMAGE_END in page:
        args.out.write_text(page[:page.index(IMAGE_BEGIN)] + table + page[page.index(IMAGE_END) + len(IMAGE_END):])
        print(f"updated the marked table in {args.out}")


if __name__ == "__main__":
    main()
