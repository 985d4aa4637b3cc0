"""`d2v demo --modality images`: the shortened image demo runs every stage for real, both arms included."""

from __future__ import annotations

import json

import pytest

from typer.testing import CliRunner

from d2vcli import checkpoint as ckpt
from d2vcli.cli import app
from d2vcli.demo_images import (EVAL_SPLITS, FINETUNE_RUN, LABELED_SPLIT, PRETRAIN_RUN, SCRATCH_RUN,
                                ImageDemoSettings, print_image_demo, run_image_demo)
from d2vcli.workspace import Workspace

# The same code path as the demo, with budgets a test can afford: the tiny corpus (100 pool, 3 per class in
# train/val/test), 2 pretraining and 4 fine-tuning updates, no DataLoader workers.
SHORT = ImageDemoSettings(
    size="tiny", pretrain_updates=2, finetune_updates=4, compare_init=True, workers=1,
    pretrain_set=("data.images_per_batch=8", "train.images_per_update=8", "data.num_workers=0",
                  "schedule.warmup_updates=0"),
    finetune_set=("data.images_per_batch=15", "train.images_per_update=15", "data.num_workers=0",
                  "schedule.warmup_updates=1", "finetune.validate_every=2", "train.save_every=2"))


def test_shortened_image_demo_end_to_end(tmp_path, capsys):
    ws = Workspace(tmp_path / "ws")
    result = run_image_demo(ws, SHORT)
    print_image_demo(result)

    # Every stage left what the next one needs.
    assert (ws.data_dir / "images" / "pool.jsonl").exists() and (ws.data_dir / "images" / "train.jsonl").exists()
    pre = ckpt.load_checkpoint(ws.run_dir(PRETRAIN_RUN) / "last.pt", expect_kind="vision-pretrain")
    assert pre[ckpt.CONFIG_KEY]["data"]["train_splits"] == ["pool"], "pretraining sees the unlabeled pool"
    pretrained = ckpt.load_checkpoint(ws.run_dir(FINETUNE_RUN) / "best.pt", expect_kind="vision-cls")
    scratch = ckpt.load_checkpoint(ws.run_dir(SCRATCH_RUN) / "best.pt", expect_kind="vision-cls")
    # Both arms: the same network and labeled split; only the start differs.
    assert scratch[ckpt.ARCH_KEY] == pretrained[ckpt.ARCH_KEY]
    assert pretrained[ckpt.CONFIG_KEY]["finetune"]["init"] == PRETRAIN_RUN
    assert scratch[ckpt.CONFIG_KEY]["finetune"]["init"] == "scratch"
    for state in (pretrained, scratch):
        assert state[ckpt.CONFIG_KEY]["data"]["train_splits"] == [LABELED_SPLIT]
        assert state[ckpt.CONFIG_KEY]["train"]["max_updates"] == 4

    # Both arms were evaluated on val and test, with their files written.
    for ev in (result.evaluation, result.scratch):
        assert list(ev.scores) == list(EVAL_SPLITS)
        summary = json.loads((ev.out_dir / "accuracy.json").read_text())
        for split in EVAL_SPLITS:
            assert ev.scores[split].images == 30  # the tiny corpus: 3 per class
            assert 0 <= ev.top1(split) <= ev.top5(split) <= 100
            assert summary["splits"][split]["top1"] == pytest.approx(ev.top1(split), abs=1e-3)
            assert (ev.out_dir / f"predictions-{split}.jsonl").exists()
    assert result.evaluation.out_dir != result.scratch.out_dir

    printed = capsys.readouterr().out
    assert "pretrained vs random init" in printed and "top-1 random" in printed
    for split in EVAL_SPLITS:  # the comparison table has a row per split with both arms' numbers
        row = next(line for line in printed.splitlines() if line.strip("│| ").startswith(split)
                   and f"{result.scratch.top1(split):.1f}" in line and f"{result.evaluation.top1(split):.1f}" in line)
        assert row
    assert "where everything is" in printed
    assert set(result.seconds) == {"prepare", "pretrain", "finetune", "evaluate", "compare-init"}


def test_demo_modality_is_checked(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["demo", "--modality", "video", "--workdir", str(tmp_path)])
    assert bad.exit_code == 2 and "--modality speech (the default), images or text" in bad.output
    v2 = runner.invoke(app, ["demo", "--modality", "images", "--version", "2", "--workdir", str(tmp_path)])
    assert v2.exit_code == 2 and "drop --version" in v2.output
