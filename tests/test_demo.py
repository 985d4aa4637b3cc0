"""`d2v demo`: the shortened pipeline runs every stage for real, and a shortened recipe leaves CTC's blank phase."""

from __future__ import annotations

import json

import pytest

from d2vcli.demo import (EVAL_SPLITS, FINETUNE_RUN, LABELED_EVERY, PRETRAIN_RUN, RANDOM_INIT_LRS, DemoSettings,
                         print_demo, run_demo)
from d2vcli.workspace import Workspace

CER_BOUND = 90  # greedy CER (%): an all-blank model scores 100; the short recipe's test measured 76.6 / 77.4


def test_shortened_demo_end_to_end(tmp_path, kenlm_tools, capsys):
    ws = Workspace(tmp_path / "ws")
    settings = DemoSettings(size="tiny", pretrain_updates=3, finetune_updates=4, tune_trials=2, compare_init=True,
                            finetune_set=("train.log_every=1",))  # so the report has curves to draw
    result = run_demo(ws, settings)
    print_demo(result)

    # Every stage left what the next one needs.
    assert (ws.data_dir / "train.jsonl").exists() and ws.dictionary.exists()
    assert (ws.run_dir(PRETRAIN_RUN) / "last.pt").exists()
    assert (ws.run_dir(PRETRAIN_RUN) / "config.yaml").exists()
    assert (ws.run_dir(FINETUNE_RUN) / "last.pt").exists()
    assert (ws.lm_dir / "4gram.bin").exists() and (ws.lm_dir / "lexicon.txt").exists()
    out = result.evaluation.out_dir
    assert (out / "tuned.json").exists(), "stage 5 tunes the LM weights and saves them"
    assert json.loads((out / "wer.json").read_text())
    # It ends by writing the run's report page, and names it.
    page = ws.run_dir(FINETUNE_RUN) / "report" / "index.html"
    assert page.exists() and ".png" in page.read_text()
    assert result.artefacts["report (open in a browser)"] == page

    # The table covers every dev/test split, greedy and 4-gram, with real numbers.
    ev = result.evaluation
    assert set(ev.splits) == set(EVAL_SPLITS)
    assert {"greedy", "lm"} <= set(ev.tags)
    for split in EVAL_SPLITS:
        assert ev.cer(split, "greedy") >= 0 and ev.wer(split, "lm") >= 0  # > 100 possible: insertions
        assert (out / f"recogs-{split}-lm.txt").exists()
        assert (out / f"errs-{split}-greedy.txt").exists()

    # --compare-init: the random arm is a real `--init scratch` run of the same architecture.
    from d2vcli import checkpoint as ckpt
    from d2vcli.demo import SCRATCH_RUN
    assert set(result.scratch.splits) == set(EVAL_SPLITS)
    assert set(result.sweep) == set(RANDOM_INIT_LRS) and result.scratch_lr in result.sweep, "the baseline's lr sweep"
    scratch = ckpt.load_checkpoint(ws.run_dir(f"{SCRATCH_RUN}-lr{result.scratch_lr:g}") / "last.pt",
                                   expect_kind="ctc")
    pretrained = ckpt.load_checkpoint(ws.run_dir(FINETUNE_RUN) / "last.pt", expect_kind="ctc")
    assert scratch[ckpt.ARCH_KEY] == pretrained[ckpt.ARCH_KEY]
    assert scratch[ckpt.CONFIG_KEY]["finetune"]["init"] == "scratch"
    # The baseline trains every parameter at one rate from the first update; the pretrained arm keeps
    # finetune-tiny's probe-first recipe (head alone, then the encoder at a hundredth of the rate).
    recipes = [(c[ckpt.CONFIG_KEY]["finetune"]["freeze_updates"], c[ckpt.CONFIG_KEY]["finetune"]["encoder_lr_scale"])
               for c in (scratch, pretrained)]
    assert recipes == [(0, 1.0), (900, 0.01)]
    # Both arms fine-tuned on the labeled subset only: every LABELED_EVERY-th training utterance.
    from d2vcli.demo import LABELED_SPLIT
    from d2vcli.manifest import read_manifest
    assert pretrained[ckpt.CONFIG_KEY]["data"]["train_splits"] == [LABELED_SPLIT]
    n_train = len(read_manifest(ws.manifest("train")))
    assert len(read_manifest(ws.manifest(LABELED_SPLIT))) == -(-n_train // LABELED_EVERY)

    printed = capsys.readouterr().out
    assert "WER / CER" in printed and "where everything is" in printed and "random init" in printed
    # Issue 15 case 18: each stage printed the whole config (about 120 lines); now a summary and the path.
    # (The random-init arm sets its architecture with model.* fields, so those lines are expected.)
    assert "ema_anneal_end_step" not in printed and "mask_channel_length" not in printed
    assert f"full config: {ws.run_dir(PRETRAIN_RUN) / 'config.yaml'}" in printed
    assert f"full config: {ws.run_dir(FINETUNE_RUN) / 'config.yaml'}" in printed
    assert set(result.seconds) == {"prepare", "pretrain", "finetune", "lm", "decode", "evaluate", "compare-init"}


def test_a_short_demo_recipe_pretrains_healthily_and_leaves_the_blank_phase(tmp_path):
    """The demo's recipe, shortened: speech-tiny on all 800 training utterances of the demo corpus (unlabeled)
    for 100 updates with every collapse guard armed from update 50, then finetune-tiny (400 updates, the head
    alone for 300) on the demo's labeled subset from it. Guards silent, and greedy dev CER below an all-blank
    model's 100 % (measured 76.6 % dev-clean, 77.4 % dev-other, one run; 35 s on 2 idle cores).
    Whether pretraining beats random init is the benchmark's question (benchmarks/bench_learning.py)."""
    from d2vcli import config as cfgmod
    from d2vcli.demo import LABELED_SPLIT, _finetune, write_labeled_subset
    from d2vcli.fileio import read_jsonl
    from d2vcli.prepare import prepare_synthetic
    from d2vcli.pretrain import pretrain

    ws = Workspace(tmp_path / "ws")
    prepare_synthetic(ws, size="demo")
    pcfg = cfgmod.resolve("pretrain", preset="speech-tiny",
                          overrides=["train.max_updates=100", "objective.collapse_check_after=50",
                                     "train.save_every=100"])
    result = pretrain(pcfg, ws, name="pt")
    assert result.status == "done", result.message  # no collapse guard fired from update 50 on
    assert "20 of 800 training utterances" in write_labeled_subset(ws, LABELED_EVERY)
    # finetune-tiny's head-alone phase is three quarters of its budget (900 of 1,200 updates): so here too.
    _finetune(ws, "pt", "ft", DemoSettings(finetune_updates=400, finetune_set=(
        "finetune.freeze_updates=300", "finetune.validate_every=200", "finetune.validate_after=200")))
    last = [r for r in read_jsonl(ws.run_dir("ft") / "metrics.jsonl") if "dev-other/cer" in r][-1]
    assert last["dev-clean/cer"] < CER_BOUND and last["dev-other/cer"] < CER_BOUND, last
    cfg = cfgmod.from_dict(cfgmod.load_yaml(ws.run_dir("ft") / "config.yaml"))
    assert list(cfg.data.train_splits) == [LABELED_SPLIT]


def test_a_stage_that_stops_early_ends_the_demo_with_one_line_and_its_status(tmp_path, capsys):
    """A collapse guard (here forced to fire) or an interrupt stops the demo with the run's status and a
    one-line pointer to the run, not a traceback; the finished stages stay for a resumed demo."""
    ws = Workspace(tmp_path / "ws")
    settings = DemoSettings(size="tiny", pretrain_updates=4, pretrain_set=(
        "train.log_every=1", "objective.collapse_check_after=1", "objective.min_target_std=100"))
    with pytest.raises(SystemExit) as stop:
        run_demo(ws, settings)
    assert stop.value.code == 1
    printed = capsys.readouterr().out
    assert f"demo: pretraining ended with status stopped; see {ws.run_dir(PRETRAIN_RUN)}" in printed
    assert (ws.data_dir / "train.jsonl").exists(), "stage 1's output is kept"


def test_shortened_demo_version_2_pretrains_data2vec_2_and_says_so(tmp_path, kenlm_tools, capsys):
    """`d2v demo --version 2`: every stage runs on a speech2-tiny encoder, under its own run names."""
    from d2vcli import checkpoint as ckpt
    from d2vcli.demo import run_names

    ws = Workspace(tmp_path / "ws")
    result = run_demo(ws, DemoSettings(size="tiny", version=2, pretrain_updates=3, finetune_updates=4, tune_trials=2))
    print_demo(result)

    pretrain_run, finetune_run, _ = run_names(2)
    assert (pretrain_run, finetune_run) != (PRETRAIN_RUN, FINETUNE_RUN)
    assert not ws.run_dir(PRETRAIN_RUN).exists(), "a 1.0 demo in the same workdir would be resumed as 2.0"
    pre = ckpt.load_checkpoint(ws.run_dir(pretrain_run) / "last.pt", expect_kind="pretrain")
    assert pre[ckpt.ARCH_KEY]["version"] == 2 and pre[ckpt.CONFIG_KEY]["masking"]["clone_batch"] == 4
    ctc = ckpt.load_checkpoint(ws.run_dir(finetune_run) / "last.pt", expect_kind="ctc")
    assert ctc[ckpt.ARCH_KEY]["version"] == 2, "fine-tuned from the 2.0 encoder (ALiBi)"
    assert result.version == 2 and set(result.evaluation.splits) == set(EVAL_SPLITS)
    assert result.artefacts["pretrained model"] == ws.run_dir(pretrain_run) / "last.pt"
    printed = capsys.readouterr().out
    assert "data2vec 2.0 pretraining (speech2-tiny)" in printed
    assert "demo results: data2vec 2.0 (speech2-tiny pretraining)" in printed


def test_demo_version_flag_reaches_the_demo_and_1_stays_the_default(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import d2vcli.demo
    from d2vcli.cli import app

    seen = []
    monkeypatch.setattr(d2vcli.demo, "run_demo", lambda ws, settings: seen.append(settings.version))
    monkeypatch.setattr(d2vcli.demo, "print_demo", lambda result: None)
    runner = CliRunner()
    assert runner.invoke(app, ["demo", "-w", str(tmp_path)]).exit_code == 0
    assert runner.invoke(app, ["demo", "--version", "2", "-w", str(tmp_path)]).exit_code == 0
    assert seen == [1, 2]
    bad = runner.invoke(app, ["demo", "--version", "3", "-w", str(tmp_path)])
    assert bad.exit_code == 2 and "--version" in bad.output
