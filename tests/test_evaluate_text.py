"""`d2v evaluate` on a text classifier: the task's metric per split, its predictions, and agreement with
fine-tuning's validation on the same weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from d2vcli import config as C
from d2vcli import distributed
from d2vcli.cli import app
from d2vcli.evaluate_text import TextEvalError, evaluate_text, find_text_classifier, is_text_classifier
from d2vcli.fileio import read_jsonl
from d2vcli.finetune import finetune
from d2vcli.finetune_text import TextClassifyTask, load_start
from d2vcli.glue_metrics import task_scores
from d2vcli.text_data import read_task, read_task_records
from d2vcli.workspace import Workspace

CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
FT_SET = ["train.max_updates=16", "finetune.validate_every=4", "train.save_every=4", "train.log_every=4",
          "schedule.warmup_updates=1", "data.text_sequences_per_batch=16", "train.sequences_per_update=16",
          "optim.lr=0.002", "finetune.init=tt", "data.valid_splits=[dev,test]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny synthetic text workspace, a text-tiny pretraining run `tt`, and fine-tuning runs on
    AGREEMENT (`ag`, classification, MCC) and on REFERENT (`ref`, accuracy)."""
    from d2vcli.prepare.synthetic_text import prepare_synthetic_text
    from d2vcli.pretrain import pretrain

    torch.set_num_threads(1)
    ws = Workspace.resolve(tmp_path_factory.mktemp("eval-text") / "ws")
    prepare_synthetic_text(ws, size="tiny", seed=0)
    cfg = C.resolve("pretrain", preset="text-tiny", overrides=[
        "train.max_updates=2", "data.text_tokens_per_batch=1024", "train.tokens_per_update=1024",
        "schedule.warmup_updates=1"])
    assert pretrain(cfg, ws, name="tt").status == "done"
    for name, task in (("ag", "AGREEMENT"), ("ref", "REFERENT")):
        cfg = C.resolve("finetune", preset="glue-tiny", overrides=FT_SET + [f"finetune.task={task}"])
        assert finetune(cfg, ws, name=name).status == "done"
    return ws


@pytest.mark.parametrize("run,task", [("ag", "AGREEMENT"), ("ref", "REFERENT")])
def test_scores_are_the_metric_of_the_written_predictions(runs, run, task):
    from sklearn.metrics import accuracy_score, matthews_corrcoef

    result = evaluate_text(runs, run)
    assert list(result.scores) == ["dev", "test"]  # the labeled splits besides train
    metric = read_task(runs.data_dir / "glue" / task)["metric"]
    for split in ("dev", "test"):
        rows = read_jsonl(result.out_dir / f"predictions-{split}.jsonl")
        records = read_task_records(runs.data_dir / "glue" / task, split)
        assert [r["id"] for r in rows] == [r["id"] for r in records]
        assert [r["label"] for r in rows] == [r["label"] for r in records]
        preds, labels = [r["predicted"] for r in rows], [r["label"] for r in rows]
        assert result.scores[split] == {**task_scores(metric, preds, labels),
                                        "error": 100 - task_scores(metric, preds, labels)["primary"]}
        peer = matthews_corrcoef(labels, preds) if metric == "mcc" else accuracy_score(labels, preds)
        assert result.primary(split) == pytest.approx(100 * peer)
        assert all(r["correct"] == (r["predicted"] == r["label"]) for r in rows)
        classes = read_task(runs.data_dir / "glue" / task)["label_names"]
        assert all(r["prediction"] == classes[r["predicted"]] for r in rows)
    summary = json.loads((result.out_dir / "scores.json").read_text())
    assert summary["task"]["name"] == task and summary["splits"]["dev"]["records"] == len(rows)
    assert (result.out_dir / "scores-summary.txt").read_text().startswith("split\trecords\t")


def test_predictions_name_the_class_and_decode_the_text_with_the_models_tokenizer(runs):
    from d2vcli.text_data import Tokenizer

    result = evaluate_text(runs, "ag", splits=["dev"])
    tok = Tokenizer.load(runs.data_dir / "text" / "spm.model")
    classes = read_task(runs.data_dir / "glue" / "AGREEMENT")["label_names"]
    rows = read_jsonl(result.out_dir / "predictions-dev.jsonl")
    records = read_task_records(runs.data_dir / "glue" / "AGREEMENT", "dev")
    for row, rec in zip(rows, records):
        assert row["prediction"] == classes[row["predicted"]] and row["label_name"] == classes[rec["label"]]
        assert row["text"] == tok.decode(rec["tokens"]) and row["text"]


@pytest.mark.parametrize("file", ["best.pt", "last.pt"])
def test_evaluate_equals_fine_tunings_validation_on_the_same_weights(runs, file):
    from d2vcli import checkpoint as ckpt

    path = runs.run_dir("ag") / file
    step = ckpt.load_checkpoint(path)[ckpt.STEP_KEY]
    logged = next(r for r in read_jsonl(runs.run_dir("ag") / "metrics.jsonl") if "dev/error" in r and r["step"] == step)
    result = evaluate_text(runs, path)
    for split in ("dev", "test"):
        for key, value in result.scores[split].items():
            assert logged[f"{split}/{key}"] == pytest.approx(value, abs=1e-9)
    # And in-process: the task's validate on the checkpoint's weights.
    cfg = C.resolve("finetune", preset="glue-tiny", overrides=FT_SET + ["finetune.task=AGREEMENT",
                                                                        f"finetune.init={path}"])
    task_dir = runs.data_dir / "glue" / "AGREEMENT"
    valid = {s: read_task_records(task_dir, s) for s in ("dev", "test")}
    task = TextClassifyTask(cfg, load_start(cfg, runs, 2), read_task(task_dir), valid, CPU)
    task.model.eval()
    got = task.validate(task.model, step)
    assert got == {f"{s}/{k}": v for s, sc in result.scores.items() for k, v in sc.items()}


def test_the_cli_dispatches_a_text_classifier_and_reports_bad_inputs(runs):
    ok = CliRunner().invoke(app, ["evaluate", "ref", "--splits", "dev", "--workdir", str(runs.root)])
    assert ok.exit_code == 0, ok.output
    assert "REFERENT" in ok.output and (runs.decode_dir / "ref" / "predictions-dev.jsonl").is_file()
    pre = CliRunner().invoke(app, ["evaluate", "tt", "--workdir", str(runs.root)])
    assert pre.exit_code == 2 and "text-pretrain" in pre.output and "d2v finetune" in pre.output
    unknown = CliRunner().invoke(app, ["evaluate", "ag", "--splits", "nope", "--workdir", str(runs.root)])
    assert unknown.exit_code == 2 and "unknown split nope" in unknown.output and "dev, test, train" in unknown.output
    assert is_text_classifier(runs, None)  # the newest classifier run is a text one


def test_no_checkpoint_means_the_newest_text_runs_best_checkpoint(runs, tmp_path):
    """As for speech and images: the newest text-cls run, and its best.pt, not its (newer) last.pt."""
    import os

    ws = Workspace.resolve(tmp_path / "copy")
    shutil.copytree(runs.root, ws.root)
    for age, name in enumerate(("ref", "ag")):  # ag's files the newest, last.pt after best.pt
        for file in ("best.pt", "last.pt"):
            os.utime(ws.run_dir(name) / file, (1e9 + 10 * age + (file == "last.pt"),) * 2)
    assert find_text_classifier(ws, None) == (ws.run_dir("ag") / "best.pt").resolve()
    (ws.run_dir("ag") / "best.pt").unlink()
    assert find_text_classifier(ws, None) == (ws.run_dir("ag") / "last.pt").resolve()


def test_unlabeled_split_missing_task_and_pretrain_checkpoint_are_clear_errors(runs, tmp_path):
    ws = Workspace.resolve(tmp_path / "copy")
    shutil.copytree(runs.root, ws.root)
    task_dir = ws.data_dir / "glue" / "AGREEMENT"
    rows = read_task_records(task_dir, "test")
    (task_dir / "test.jsonl").write_text("".join(json.dumps({**r, "label": None}) + "\n" for r in rows))
    with pytest.raises(TextEvalError, match="no labels"):
        evaluate_text(ws, "ag", splits=["test"])
    assert list(evaluate_text(ws, "ag").scores) == ["dev"]  # the unlabeled split is left out by default
    with pytest.raises(TextEvalError, match="text-pretrain"):
        evaluate_text(ws, "tt")
    with pytest.raises(TextEvalError, match="text-pretrain"):
        is_text_classifier(ws, "tt")
    before = (ws.decode_dir / "ag" / "scores.json").read_bytes()
    shutil.rmtree(task_dir)
    with pytest.raises(TextEvalError, match="AGREEMENT.*not prepared"):
        evaluate_text(ws, "ag")
    assert (ws.decode_dir / "ag" / "scores.json").read_bytes() == before  # earlier outputs intact


def test_the_written_predictions_are_those_of_the_exported_hf_classifier(runs, tmp_path):
    """Peer check: `d2v export hf` of the run, loaded by transformers, predicts the same class for every record."""
    from transformers import Data2VecTextForSequenceClassification

    from d2vcli import checkpoint as ckpt
    from d2vcli.interop_text import export_hf

    export_hf(ckpt.find_checkpoint(runs, "ag"), tmp_path / "hf")
    hf = Data2VecTextForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    rows = read_jsonl(evaluate_text(runs, "ag", splits=["dev"]).out_dir / "predictions-dev.jsonl")
    records = read_task_records(runs.data_dir / "glue" / "AGREEMENT", "dev")
    with torch.no_grad():
        for row, rec in zip(rows, records):
            logits = hf(torch.tensor([rec["tokens"]])).logits[0]
            assert int(logits.argmax()) == row["predicted"]
            assert hf.config.id2label[row["predicted"]] == row["prediction"]
