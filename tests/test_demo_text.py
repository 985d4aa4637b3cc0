"""`d2v demo --modality text`: the shortened text demo runs every stage for real, both arms included."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from d2vcli import checkpoint as ckpt
from d2vcli.cli import app
from d2vcli.demo_text import (EVAL_SPLITS, FINETUNE_RUN, PRETRAIN_RUN, SCRATCH_RUN, TASK, TextDemoSettings,
                              print_text_demo, run_text_demo)
from d2vcli.fileio import read_jsonl
from d2vcli.workspace import Workspace

# The same code path as the demo, with budgets a test can afford: the tiny corpus (120 documents, 40 / 20 / 20
# records per task), a narrower encoder, 2 pretraining and 4 fine-tuning updates, a two-rate sweep.
SHORT = TextDemoSettings(
    size="tiny", pretrain_updates=2, finetune_updates=4, compare_init=True, workers=1, random_init_lrs=(5e-4, 1e-3),
    pretrain_set=("text.embed_dim=32", "text.ffn_dim=64", "text.num_heads=2", "train.tokens_per_update=1024",
                  "data.text_tokens_per_batch=1024", "schedule.warmup_updates=0", "train.log_every=1"),
    finetune_set=("schedule.warmup_updates=1", "finetune.validate_every=2", "train.save_every=2", "train.log_every=1"))


def test_shortened_text_demo_end_to_end(tmp_path, capsys):
    ws = Workspace(tmp_path / "ws")
    result = run_text_demo(ws, SHORT)
    print_text_demo(result)

    # Every stage left what the next one needs; pretraining read the unlabeled pool only.
    assert (ws.data_dir / "text" / "train.bin").exists() and (ws.data_dir / "glue" / TASK / "train.jsonl").exists()
    pre = ckpt.load_checkpoint(ws.run_dir(PRETRAIN_RUN) / "last.pt", expect_kind="text-pretrain")
    assert pre[ckpt.STEP_KEY] == 2 and pre[ckpt.CONFIG_KEY]["data"]["train_splits"] == ["train"]
    assert pre[ckpt.ARCH_KEY]["embed_dim"] == 32
    pretrained = ckpt.load_checkpoint(ws.run_dir(FINETUNE_RUN) / "best.pt", expect_kind="text-cls")
    runs = {lr: ckpt.load_checkpoint(ws.run_dir(f"{SCRATCH_RUN}-lr{lr:g}") / "best.pt", expect_kind="text-cls")
            for lr in SHORT.random_init_lrs}
    # Both arms: the same network, task and budget; only the start (and the swept rate) differs.
    assert pretrained[ckpt.CONFIG_KEY]["finetune"]["init"] == PRETRAIN_RUN
    for lr, state in runs.items():
        assert state[ckpt.ARCH_KEY] == pretrained[ckpt.ARCH_KEY]
        assert state[ckpt.CONFIG_KEY]["finetune"]["init"] == "scratch"
        assert state[ckpt.CONFIG_KEY]["optim"]["lr"] == lr
    for state in (pretrained, *runs.values()):
        assert state[ckpt.CONFIG_KEY]["finetune"]["task"] == TASK
        assert state[ckpt.CONFIG_KEY]["train"]["max_updates"] == 4

    # The baseline is the sweep's best dev score, read from each run's own validations.
    for lr, value in result.sweep.items():
        rows = read_jsonl(ws.run_dir(f"{SCRATCH_RUN}-lr{lr:g}") / "metrics.jsonl")
        assert value == max(r["dev/primary"] for r in rows if "dev/primary" in r)
    assert result.sweep[result.scratch_lr] == max(result.sweep.values())
    assert result.scratch.checkpoint.parent.name == f"{SCRATCH_RUN}-lr{result.scratch_lr:g}"

    # Both arms were evaluated on dev and test, with their files written.
    for ev in (result.evaluation, result.scratch):
        assert list(ev.scores) == list(EVAL_SPLITS) and ev.task["name"] == TASK
        summary = json.loads((ev.out_dir / "scores.json").read_text())
        for split in EVAL_SPLITS:
            assert ev.records[split] == 20  # the tiny corpus
            assert 0 <= ev.primary(split) <= 100
            assert summary["splits"][split]["primary"] == pytest.approx(ev.primary(split), abs=1e-4)
            assert len(read_jsonl(ev.out_dir / f"predictions-{split}.jsonl")) == 20
    assert result.evaluation.out_dir != result.scratch.out_dir

    printed = capsys.readouterr().out
    assert "pretrained vs random init" in printed and "picked on dev from the sweep" in printed
    for split in EVAL_SPLITS:  # the comparison table has a row per split with both arms' numbers
        assert any(line.strip("│| ").startswith(split) and f"{result.scratch.primary(split):.1f}" in line
                   and f"{result.evaluation.primary(split):.1f}" in line for line in printed.splitlines())
    assert "where everything is" in printed
    assert set(result.seconds) == {"prepare", "pretrain", "finetune", "evaluate", "compare-init"}

    # A re-run resumes: every run is finished, so no update runs again and the scores are the same.
    def updates() -> dict:
        return {p.parent.name: [r["step"] for r in read_jsonl(p) if "loss" in r] for p in ws.runs_dir.glob("*/metrics.jsonl")}

    before = updates()
    assert len(before) == 4 and before[PRETRAIN_RUN] == [1, 2] and before[FINETUNE_RUN] == [1, 2, 3, 4]
    again = run_text_demo(ws, SHORT)
    assert updates() == before
    assert again.evaluation.scores == result.evaluation.scores and again.sweep == result.sweep


def test_demo_text_rejects_a_version():
    v2 = CliRunner().invoke(app, ["demo", "--modality", "text", "--version", "2"])
    assert v2.exit_code == 2 and "drop --version" in v2.output
