"""Text classification and regression fine-tuning: the start (pretrain, classifier, scratch), the loss, the
per-task GLUE schedule, best.pt by the task's metric, exact resume and the bad-input cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli import distributed, engine, glue_metrics
from d2vcli.cli import app
from d2vcli.config import ConfigError
from d2vcli.data import DataError
from d2vcli.fileio import read_jsonl
from d2vcli.finetune import finetune
from d2vcli.finetune_text import (GLUE_SCHEDULES, TextClassifyTask, TextTaskError, load_start, predict, score,
                                  with_task_schedule)
from d2vcli.models.loading import load_model
from d2vcli.text_data import TextTaskLoader, read_task, read_task_records
from d2vcli.workspace import Workspace

CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
FT_SET = ["train.max_updates=6", "finetune.validate_every=2", "train.save_every=3", "train.log_every=1",
          "schedule.warmup_updates=1", "data.text_sequences_per_batch=16", "train.sequences_per_update=16",
          "optim.lr=0.002"]


def make_regression_task(ws: Workspace) -> None:
    """A regression task LENGTH (score = words / 4) from the synthetic AGREEMENT sentences, via --tsv."""
    from d2vcli.prepare.glue import prepare_glue

    src = ws.root / "corpus" / "synthetic-text" / "glue" / "AGREEMENT"
    out = ws.root / "length"
    out.mkdir()
    for split in ("train", "dev"):
        lines = (src / f"{split}.tsv").read_text().splitlines()
        header = lines[0].split("\t")
        col = header.index("sentence")
        rows = [f"{r.split(chr(9))[col]}\t{len(r.split(chr(9))[col].split()) / 4:.2f}" for r in lines[1:]]
        (out / f"{split}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    prepare_glue(ws, tsv=[out / "train.tsv", out / "dev.tsv"], task_name="LENGTH", kind="regression")


@pytest.fixture(scope="module")
def text_ws(tmp_path_factory):
    """The tiny synthetic text workspace, a regression task, and a 2-update text-tiny pretraining run `tt`."""
    from d2vcli.prepare.synthetic_text import prepare_synthetic_text
    from d2vcli.pretrain import pretrain

    torch.set_num_threads(1)
    ws = Workspace.resolve(tmp_path_factory.mktemp("ft-text") / "ws")
    prepare_synthetic_text(ws, size="tiny", seed=0)
    make_regression_task(ws)
    cfg = C.resolve("pretrain", preset="text-tiny", overrides=[
        "train.max_updates=2", "data.text_tokens_per_batch=1024", "train.tokens_per_update=1024",
        "schedule.warmup_updates=1"])
    assert pretrain(cfg, ws, name="tt").status == "done"
    return ws


def ft_cfg(*extra: str, preset: str = "glue-tiny") -> C.Config:
    return C.resolve("finetune", preset=preset, overrides=FT_SET + list(extra))


def test_a_pretraining_start_takes_the_students_encoder_and_drops_its_regression_head(text_ws):
    pre = ckpt.load_checkpoint(text_ws.run_dir("tt") / "last.pt")
    start = load_start(ft_cfg("finetune.init=tt"), text_ws, 2)
    task = TextClassifyTask(ft_cfg(), start, read_task(text_ws.data_dir / "glue" / "AGREEMENT"), {}, CPU)
    state = task.model.state_dict()
    encoder = {k: v for k, v in pre[ckpt.MODEL_KEY].items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(state[k], v) for k, v in encoder.items())
    assert not any(k.startswith("regression_head") for k in state)
    assert {k for k in state if not k.startswith("encoder.")} == {
        "classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight", "classifier.out_proj.bias"}
    teacher = load_start(ft_cfg("finetune.init=tt", "finetune.init_from=teacher"), text_ws, 2)
    assert all(torch.equal(teacher.weights[f"encoder.{k}"], v) for k, v in pre[ckpt.TEACHER_KEY].items())
    # Dropout settings are the fine-tuning config's, the architecture the checkpoint's.
    assert start.arch.embed_dim == pre[ckpt.ARCH_KEY]["embed_dim"] and start.arch.pooler_dropout == 0.0
    assert start.tokenizer["sha256"] == pre[ckpt.TOKENIZER_KEY]["sha256"]


def test_finetune_from_pretraining_picks_best_pt_by_the_tasks_metric(text_ws):
    result = finetune(ft_cfg("finetune.init=tt", "finetune.task=agreement", "train.max_updates=24",
                             "finetune.validate_every=4"), text_ws, name="ag", preset="glue-tiny")
    assert result.status == "done"
    run = text_ws.run_dir("ag")
    valid = [r for r in read_jsonl(run / "metrics.jsonl") if "dev/error" in r]
    assert [r["step"] for r in valid] == [4, 8, 12, 16, 20, 24]
    assert len({r["dev/error"] for r in valid}) > 1  # so the choice below means something
    for r in valid:  # MCC is AGREEMENT's metric; error = 100 - primary
        assert r["dev/primary"] == r["dev/mcc"] and r["dev/error"] == pytest.approx(100 - r["dev/mcc"])
    best_step = min(valid, key=lambda r: r["dev/error"])["step"]  # the first of equal values
    best = ckpt.load_checkpoint(run / "best.pt")
    assert best[ckpt.STEP_KEY] == best_step
    assert best[ckpt.ENGINE_KEY]["best"] == min(r["dev/error"] for r in valid)
    assert best[ckpt.KIND_KEY] == "text-cls" and best[ckpt.CLASSES_KEY] == ["ungrammatical", "grammatical"]
    assert best[ckpt.TEXT_TASK_KEY]["metric"] == "mcc" and best[ckpt.TOKENIZER_KEY]["format"] == "sentencepiece"
    # The logged score is the metric of best.pt's predictions on dev.
    model = load_model(run / "best.pt").model
    records = read_task_records(text_ws.data_dir / "glue" / "AGREEMENT", "dev")
    preds = predict(model, records, 16, torch.device("cpu"), regression=False)
    logged = next(r for r in valid if r["step"] == best_step)
    assert logged["dev/mcc"] == pytest.approx(glue_metrics.task_scores("mcc", preds, [r["label"] for r in records])["mcc"])


def test_classification_loss_is_summed_cross_entropy_over_sentences(text_ws):
    task_dir = text_ws.data_dir / "glue" / "AGREEMENT"
    task = TextClassifyTask(ft_cfg(), load_start(ft_cfg("finetune.init=tt"), text_ws, 2), read_task(task_dir), {}, CPU)
    batch = next(iter(TextTaskLoader(read_task_records(task_dir, "train"), 8, 1)))
    task.model.eval()
    out = task.train_step(task.model, batch, 0)
    logits = task.model(batch.source, batch.padding_mask)
    assert out.sample_size == 8
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, batch.target, reduction="sum"))


def test_a_regression_task_trains_with_squared_error_and_reports_pearson_spearman(text_ws):
    result = finetune(ft_cfg("finetune.init=tt", "finetune.task=LENGTH"), text_ws, name="len", preset="glue-tiny")
    assert result.status == "done"
    state = ckpt.load_checkpoint(text_ws.run_dir("len") / "last.pt")
    assert state[ckpt.TEXT_TASK_KEY]["kind"] == "regression" and len(state[ckpt.CLASSES_KEY]) == 1
    model = load_model(text_ws.run_dir("len") / "last.pt").model
    task_dir = text_ws.data_dir / "glue" / "LENGTH"
    records = read_task_records(task_dir, "dev")
    preds = predict(model, records, 16, torch.device("cpu"), regression=True)
    from scipy import stats

    labels = [r["label"] for r in records]
    last = [r for r in read_jsonl(text_ws.run_dir("len") / "metrics.jsonl") if "dev/pearson" in r][-1]
    assert last["dev/pearson"] == pytest.approx(100 * stats.pearsonr(preds, labels)[0], abs=1e-6)
    assert last["dev/spearman"] == pytest.approx(100 * stats.spearmanr(preds, labels)[0], abs=1e-6)
    task = TextClassifyTask(ft_cfg(), load_start(ft_cfg("finetune.init=tt"), text_ws, 1), read_task(task_dir), {}, CPU)
    batch = next(iter(TextTaskLoader(read_task_records(task_dir, "train"), 8, 1, regression=True)))
    task.model.eval()
    out = task.train_step(task.model, batch, 0)
    torch.testing.assert_close(out.loss, ((task.model(batch.source, batch.padding_mask)[:, 0] - batch.target) ** 2).sum())


def test_scratch_start_via_the_cli_uses_the_workspace_tokenizer(text_ws):
    args = ["finetune", "--preset", "glue-tiny", "--task", "AGREEMENT", "--init", "scratch", "--arch-preset",
            "text-tiny", "--name", "scratch", "--workdir", str(text_ws.root)]
    for s in FT_SET:
        args += ["--set", s]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    state = ckpt.load_checkpoint(text_ws.run_dir("scratch") / "last.pt")
    from d2vcli.text_data import Tokenizer

    tok = Tokenizer.load(text_ws.data_dir / "text" / "spm.model")
    assert state[ckpt.ARCH_KEY]["vocab_size"] == tok.vocab_size and state[ckpt.ARCH_KEY]["num_layers"] == 2
    assert state[ckpt.TOKENIZER_KEY]["sha256"] == tok.sha256()


def test_a_classifier_start_loads_encoder_and_head(text_ws):
    start = load_start(ft_cfg("finetune.init=ag"), text_ws, 2)
    task = TextClassifyTask(ft_cfg(), start, read_task(text_ws.data_dir / "glue" / "AGREEMENT"), {}, CPU)
    trained = ckpt.load_checkpoint(text_ws.run_dir("ag") / "best.pt")[ckpt.MODEL_KEY]
    assert all(torch.equal(task.model.state_dict()[k], v) for k, v in trained.items())


def test_resume_continues_exactly(text_ws):
    straight = finetune(ft_cfg("finetune.init=tt", "finetune.task=AGREEMENT"), text_ws, name="straight")
    first = finetune(ft_cfg("finetune.init=tt", "finetune.task=AGREEMENT"), text_ws, name="split", stop_at=3)
    assert (straight.status, first.status) == ("done", "paused")
    second = finetune(ft_cfg("finetune.init=tt", "finetune.task=AGREEMENT"), text_ws, name="split", resume=True)
    assert second.status == "done"
    a = ckpt.load_checkpoint(text_ws.run_dir("straight") / "last.pt")[ckpt.MODEL_KEY]
    b = ckpt.load_checkpoint(text_ws.run_dir("split") / "last.pt")[ckpt.MODEL_KEY]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[(r["step"], r.get("loss"), r.get("dev/error")) for r in read_jsonl(text_ws.run_dir(n) / "metrics.jsonl")]
            for n in ("straight", "split")]
    assert rows[0] == rows[1]


def test_the_glue_schedule_follows_the_task_and_yields_to_explicit_settings():
    def resolved(*sets, preset="glue-base", task="RTE"):
        cfg = C.resolve("finetune", preset=preset, overrides=list(sets))
        return with_task_schedule(cfg, preset, None, list(sets), {"finetune": {"task": task}})

    rte = resolved()
    assert (rte.train.sequences_per_update, rte.schedule.warmup_updates, rte.train.max_updates, rte.optim.lr) == \
        (16, 122, 2036, 2e-5)
    assert rte.finetune.validate_every == 204 and engine.text_sequence_unit(rte).accumulation(1) == 1
    assert resolved("optim.lr=6e-5").optim.lr == 6e-5 and resolved("optim.lr=6e-5").train.max_updates == 2036
    # The sweep's 1e-5 is kept although it is also glue-base's (SST-2's) value.
    assert resolved("optim.lr=1e-5").optim.lr == 1e-5
    assert resolved(task="sts-b").train.max_updates == 3598  # names are matched without case or dash
    base = C.resolve("finetune", preset="glue-base")
    assert with_task_schedule(base, "glue-base") == base  # no task
    assert resolved(task="AGREEMENT") == C.merge(base, {"finetune": {"task": "AGREEMENT"}})  # not a GLUE task
    tiny = C.resolve("finetune", preset="glue-tiny")
    assert resolved(preset="glue-tiny").train.max_updates == tiny.train.max_updates  # task_schedule off
    for name, row in GLUE_SCHEDULES.items():  # warmup 6 % of the updates, except QQP's 25 % (as in its file)
        assert row.warmup / row.max_updates == pytest.approx(0.25 if name == "QQP" else 0.06, abs=0.001)


def test_the_cli_applies_the_glue_schedule(text_ws, monkeypatch):
    import d2vcli.finetune as ft_module

    seen = {}

    def record(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        return engine.TrainResult("done", 0, "", None, None)

    monkeypatch.setattr(ft_module, "finetune", record)
    r = CliRunner().invoke(app, ["finetune", "--preset", "glue-base", "--task", "CoLA", "--init", "tt",
                                 "--set", "optim.lr=1e-5", "--workdir", str(text_ws.root)])
    assert r.exit_code == 0, r.output
    cfg = seen["cfg"]
    assert (cfg.train.sequences_per_update, cfg.train.max_updates, cfg.optim.lr, cfg.finetune.task) == \
        (16, 5336, 1e-5, "CoLA")


def test_sequences_per_update_derive_the_accumulation(text_ws):
    cfg = ft_cfg("data.text_sequences_per_batch=8", "train.sequences_per_update=16")
    assert engine.text_sequence_unit(cfg).accumulation(1) == 2
    result = finetune(ft_cfg("finetune.init=tt", "finetune.task=AGREEMENT", "data.text_sequences_per_batch=8",
                             "train.max_updates=2"), text_ws, name="accum")
    rows = [r for r in read_jsonl(text_ws.run_dir("accum") / "metrics.jsonl") if "sample_size" in r]
    assert result.status == "done" and rows[0]["sample_size"] == 16


def test_score_gives_the_primary_metric_and_its_error():
    s = score("acc_and_f1", np.array([1, 0, 1, 1]), [{"label": v} for v in (1, 0, 0, 1)])
    assert s["accuracy"] == 75.0 and s["f1"] == pytest.approx(80.0)
    assert s["primary"] == pytest.approx(77.5) and s["error"] == pytest.approx(22.5)


def test_bad_inputs_are_clear_errors(text_ws, tmp_path):
    with pytest.raises(TextTaskError, match="unknown task 'NOPE'.*AGREEMENT, LENGTH, REFERENT"):
        finetune(ft_cfg("finetune.init=tt", "finetune.task=NOPE"), text_ws, name="bad")
    with pytest.raises(TextTaskError, match="--task NAME"):
        finetune(ft_cfg("finetune.init=tt"), text_ws, name="bad")
    with pytest.raises(TextTaskError, match="prepare glue"):
        finetune(ft_cfg("finetune.init=scratch", "finetune.task=X"), Workspace.resolve(tmp_path / "empty"), name="b")
    with pytest.raises(TextTaskError, match="2 output.*task has 1"):
        finetune(ft_cfg("finetune.init=ag", "finetune.task=LENGTH"), text_ws, name="bad")
    with pytest.raises(ConfigError, match="--init"):
        finetune(ft_cfg("finetune.task=AGREEMENT"), text_ws, name="bad")
    with pytest.raises(ConfigError, match="best_metric"):
        finetune(ft_cfg("finetune.init=tt", "finetune.task=AGREEMENT", "finetune.best_metric=valid/error"), text_ws,
                 name="bad")
    with pytest.raises(DataError, match="splits dev, test, train"):
        finetune(ft_cfg("finetune.init=tt", "finetune.task=AGREEMENT", "data.valid_splits=[nope]",
                        "finetune.best_metric=nope/error"), text_ws, name="bad")
    assert not text_ws.run_dir("bad").exists() and not text_ws.run_dir("b").exists()


def test_unlabeled_splits_and_foreign_tokens_are_refused(text_ws):
    task_dir = text_ws.data_dir / "glue" / "AGREEMENT"
    records = read_task_records(task_dir, "dev")
    (task_dir / "unlabeled.jsonl").write_text("".join(json.dumps({**r, "label": None}) + "\n" for r in records))
    (task_dir / "foreign.jsonl").write_text("".join(json.dumps({**r, "tokens": [0, 9999, 2]}) + "\n" for r in records))
    try:
        with pytest.raises(TextTaskError, match="without a label"):
            finetune(ft_cfg("finetune.init=tt", "finetune.task=AGREEMENT", "data.valid_splits=[unlabeled]",
                            "finetune.best_metric=unlabeled/error"), text_ws, name="bad")
        with pytest.raises(TextTaskError, match="token id 9999"):
            finetune(ft_cfg("finetune.init=tt", "finetune.task=AGREEMENT", "data.train_splits=[foreign]"), text_ws,
                     name="bad")
    finally:
        (task_dir / "unlabeled.jsonl").unlink()
        (task_dir / "foreign.jsonl").unlink()


def test_an_hf_import_fine_tunes_on_records_tokenized_with_its_own_bpe(text_ws, tmp_path):
    """The released-model path: `d2v import hf`, `d2v prepare glue --tokenizer-from`, fine-tune, evaluate."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import Data2VecTextConfig, Data2VecTextModel, RobertaTokenizerFast

    from d2vcli.evaluate_text import evaluate_text
    from d2vcli.interop_text import import_hf
    from d2vcli.prepare.glue import prepare_glue

    src = text_ws.root / "corpus" / "synthetic-text" / "glue" / "AGREEMENT"
    sentences = [ln.split("\t")[-2] for ln in (src / "train.tsv").read_text().splitlines()[1:]]
    folder = tmp_path / "hf-bpe"
    folder.mkdir()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(sentences, vocab_size=300, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    torch.manual_seed(0)
    Data2VecTextModel(Data2VecTextConfig(
        vocab_size=bpe.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=130, layer_norm_eps=1e-5, type_vocab_size=1, pad_token_id=1,
        bos_token_id=0, eos_token_id=2)).save_pretrained(folder)
    import_hf(folder, workspace=text_ws)
    tsv = tmp_path / "tsv"
    tsv.mkdir()
    for split in ("train", "dev"):
        (tsv / f"{split}.tsv").write_text((src / f"{split}.tsv").read_text())
    prepare_glue(text_ws, tsv=[tsv / "train.tsv", tsv / "dev.tsv"], task_name="AGREEMENT-BPE",
                 tokenizer_from="imported-hf-bpe")
    peer = RobertaTokenizerFast.from_pretrained(folder)
    record = read_task_records(text_ws.data_dir / "glue" / "AGREEMENT-BPE", "train")[0]
    assert record["tokens"] == peer(sentences[0])["input_ids"]  # <s> pieces </s>, RoBERTa's ids

    with pytest.raises(TextTaskError, match="another tokenizer.*--tokenizer-from"):
        finetune(ft_cfg("finetune.init=imported-hf-bpe", "finetune.task=AGREEMENT"), text_ws, name="bad")
    result = finetune(ft_cfg("finetune.init=imported-hf-bpe", "finetune.task=AGREEMENT-BPE", "train.max_updates=2"),
                      text_ws, name="hf-ft")
    assert result.status == "done"
    state = ckpt.load_checkpoint(text_ws.run_dir("hf-ft") / "last.pt")
    assert state[ckpt.TOKENIZER_KEY]["format"] == "hf"
    rows = read_jsonl(evaluate_text(text_ws, "hf-ft").out_dir / "predictions-dev.jsonl")
    dev = read_task_records(text_ws.data_dir / "glue" / "AGREEMENT-BPE", "dev")
    assert rows[0]["text"] == peer.decode(dev[0]["tokens"], skip_special_tokens=True)
