"""`d2v demo`, shortened: every stage runs for real, in order, and leaves its artefacts."""

from __future__ import annotations

import json

from d2vcli.demo import EVAL_SPLITS, FINETUNE_RUN, PRETRAIN_RUN, DemoSettings, print_demo, run_demo
from d2vcli.workspace import Workspace


def test_shortened_demo_end_to_end(tmp_path, kenlm_tools, capsys):
    ws = Workspace(tmp_path / "ws")
    settings = DemoSettings(size="tiny", pretrain_updates=3, finetune_updates=4, tune_trials=2)
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

    # The table covers every dev/test split, greedy and 4-gram, with real numbers.
    ev = result.evaluation
    assert set(ev.splits) == set(EVAL_SPLITS)
    assert {"greedy", "lm"} <= set(ev.tags)
    for split in EVAL_SPLITS:
        assert ev.cer(split, "greedy") >= 0 and ev.wer(split, "lm") >= 0  # > 100 possible: insertions
        assert (out / f"recogs-{split}-lm.txt").exists()
        assert (out / f"errs-{split}-greedy.txt").exists()

    printed = capsys.readouterr().out
    assert "WER / CER" in printed and "where everything is" in printed
    assert set(result.seconds) == {"prepare", "pretrain", "finetune", "lm", "decode", "evaluate"}
