"""`d2v prepare glue`: each GLUE task's layout, the RoBERTa pair format, labels, bad rows (d2vcli/prepare/glue.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
from typer.testing import CliRunner

from d2vcli.cli import app
from d2vcli.fileio import read_jsonl
from d2vcli.prepare.glue import GLUE_TASKS, pair_tokens, prepare_glue
from d2vcli.prepare.result import PrepareError
from d2vcli.prepare.text import prepare_text
from d2vcli.workspace import Workspace

WORDS = "the king queen walks sees girls who either or he she they boy runs small dog cats a b".split()


def sent(rng, n=None):
    return " ".join(rng.choice(WORDS, size=n or int(rng.integers(2, 8))))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("glue")
    rng = np.random.default_rng(0)
    (root / "c.txt").write_text("".join(sent(rng) + "\n" + ("\n" if i % 3 == 0 else "") for i in range(200)))
    w = Workspace(root / "ws")
    prepare_text(w, [root / "c.txt"], vocab_size=40, tokens_per_sample=64)
    return w


def tsv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    path.write_text("".join("\t".join(map(str, r)) + "\n" for r in lines))


def write_glue(root, rng):
    """Tiny files in each task's real GLUE layout (docs/glue-data.md): 4 train/dev rows, 2 test rows."""
    s = lambda: sent(rng)  # noqa: E731
    tsv(root / "CoLA/train.tsv", None, [["gj04", i % 2, "" if i % 2 else "*", s()] for i in range(4)])
    tsv(root / "CoLA/dev.tsv", None, [["gj04", i % 2, "", s()] for i in range(4)])
    tsv(root / "CoLA/test.tsv", ["index", "sentence"], [[i, s()] for i in range(2)])
    for split in ("train", "dev"):
        tsv(root / f"SST-2/{split}.tsv", ["sentence", "label"], [[s(), i % 2] for i in range(4)])
        tsv(root / f"MRPC/{split}.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            [[i % 2, 100 + i, 200 + i, s(), s()] for i in range(4)])
        tsv(root / f"STS-B/{split}.tsv", ["index", "genre", "filename", "year", "old_index", "source1", "source2",
                                          "sentence1", "sentence2", "score"],
            [[i, "main-captions", "MSRvid", "2012test", i, "none", "none", s(), s(), f"{i * 1.25:.3f}"]
             for i in range(4)])
        tsv(root / f"QQP/{split}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            [[i, 2 * i, 2 * i + 1, s(), s(), i % 2] for i in range(4)])
        tsv(root / f"QNLI/{split}.tsv", ["index", "question", "sentence", "label"],
            [[i, s(), s(), ["entailment", "not_entailment"][i % 2]] for i in range(4)])
        tsv(root / f"RTE/{split}.tsv", ["index", "sentence1", "sentence2", "label"],
            [[i, s(), s(), ["entailment", "not_entailment"][i % 2]] for i in range(4)])
    tsv(root / "SST-2/test.tsv", ["index", "sentence"], [[i, s()] for i in range(2)])
    tsv(root / "MRPC/test.tsv", ["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        [[i, 1, 2, s(), s()] for i in range(2)])
    tsv(root / "STS-B/test.tsv", ["index", "genre", "filename", "year", "old_index", "source1", "source2",
                                  "sentence1", "sentence2"],
        [[i, "g", "f", "y", i, "n", "n", s(), s()] for i in range(2)])
    tsv(root / "QQP/test.tsv", ["id", "question1", "question2"], [[i, s(), s()] for i in range(2)])
    tsv(root / "QNLI/test.tsv", ["index", "question", "sentence"], [[i, s(), s()] for i in range(2)])
    tsv(root / "RTE/test.tsv", ["index", "sentence1", "sentence2"], [[i, s(), s()] for i in range(2)])
    mnli_head = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                 "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    labels = ["entailment", "neutral", "contradiction", "neutral"]
    for name in ("train", "dev_matched", "dev_mismatched"):
        tsv(root / f"MNLI/{name}.tsv", mnli_head,
            [[i, 1, f"{i}e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s(), s(), labels[i], labels[i]]
             for i in range(4)])
    for name in ("test_matched", "test_mismatched"):
        tsv(root / f"MNLI/{name}.tsv", mnli_head[:10], [[i, 1, f"{i}e", "g", "x", "y", "x", "y", s(), s()]
                                                      for i in range(2)])


EXPECTED = {  # kind, num_classes, metric, label of train row i
    "CoLA": ("classification", 2, "mcc", lambda i: i % 2),
    "SST-2": ("classification", 2, "acc", lambda i: i % 2),
    "MRPC": ("classification", 2, "acc_and_f1", lambda i: i % 2),
    "STS-B": ("regression", 1, "pearson_spearman", lambda i: i * 1.25),
    "QQP": ("classification", 2, "acc_and_f1", lambda i: i % 2),
    "MNLI": ("classification", 3, "acc", lambda i: [0, 1, 2, 1][i]),
    "QNLI": ("classification", 2, "acc", lambda i: i % 2),
    "RTE": ("classification", 2, "acc", lambda i: i % 2),
}


def test_every_glue_task_layout(ws, tmp_path):
    write_glue(tmp_path / "glue_data", np.random.default_rng(1))
    summary = prepare_glue(ws, tmp_path / "glue_data")
    assert {s.task for s in summary.splits} == set(GLUE_TASKS) == set(EXPECTED)
    for name, (kind, n, metric, label) in EXPECTED.items():
        out = ws.data_dir / "glue" / name
        task = json.loads((out / "task.json").read_text())
        assert (task["kind"], task["num_classes"], task["metric"]) == (kind, n, metric)
        train = read_jsonl(out / "train.jsonl")
        assert [r["label"] for r in train] == [label(i) for i in range(4)], name
        test = read_jsonl(out / "test.jsonl")
        assert all(r["label"] is None for r in test) and len(test) == 2
        pair = GLUE_TASKS[name].sentence2 is not None
        for r in train:
            assert r["tokens"][0] == 0 and r["tokens"][-1] == 2
            assert (r["tokens"].count(2) == 3) == pair  # <s> a </s></s> b </s>
    assert len(read_jsonl(ws.data_dir / "glue/MNLI/dev_mismatched.jsonl")) == 4
    assert len(read_jsonl(ws.data_dir / "glue/MNLI/test_mismatched.jsonl")) == 2
    assert json.loads((ws.data_dir / "glue/MNLI/task.json").read_text())["label_names"] == [
        "entailment", "neutral", "contradiction"]
    again = prepare_glue(ws, tmp_path / "glue_data", task="rte")
    assert {s.status for s in again.splits} == {"up to date"} and {s.task for s in again.splits} == {"RTE"}


def test_pair_format_equals_sentencepiece(ws, tmp_path):
    tsv(tmp_path / "t/train.tsv", ["sentence1", "sentence2", "label"], [["the king walks", "she runs", "yes"]])
    prepare_glue(ws, tsv=[tmp_path / "t/train.tsv"], task_name="PAIR")
    sp = spm.SentencePieceProcessor(model_file=str(ws.data_dir / "text/spm.model"))
    rec = read_jsonl(ws.data_dir / "glue/PAIR/train.jsonl")[0]
    assert rec["tokens"] == [0] + sp.encode("the king walks") + [2, 2] + sp.encode("she runs") + [2]
    assert json.loads((ws.data_dir / "glue/PAIR/task.json").read_text())["label_names"] == ["yes"]


def test_truncation():
    ids, cut = pair_tokens(list(range(10, 30)), list(range(40, 45)), 16)
    assert cut and len(ids) == 16 and ids[:1] == [0] and ids.count(2) == 3
    assert ids[-6:] == [40, 41, 42, 43, 44, 2]  # the longer sentence was cut first
    single, cut1 = pair_tokens(list(range(10, 30)), None, 8)
    assert cut1 and single == [0, 10, 11, 12, 13, 14, 15, 2]
    assert pair_tokens([5, 6], [7], 16) == ([0, 5, 6, 2, 2, 7, 2], False)


def test_truncations_are_counted(ws, tmp_path):
    long = " ".join(["the king sees the girls"] * 30)
    tsv(tmp_path / "t/train.tsv", ["sentence", "label"], [[long, 0], ["the dog", 1]])
    s = prepare_glue(ws, tsv=[tmp_path / "t/train.tsv"], task_name="LONG", tokens_per_sample=32)
    assert s.split("LONG", "train").truncated == 1
    assert max(len(r["tokens"]) for r in read_jsonl(ws.data_dir / "glue/LONG/train.jsonl")) == 32


def test_regression_csv(ws, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r/train.csv").write_text('sentence,sentence2,label\n"the king, again",the dog,0.5\na b,b a,4\n')
    (tmp_path / "r/dev.csv").write_text("sentence,sentence2,label\nthe dog,a cat,2.25\n")
    prepare_glue(ws, tsv=[tmp_path / "r/train.csv", tmp_path / "r/dev.csv"], task_name="SIM", kind="regression")
    assert [r["label"] for r in read_jsonl(ws.data_dir / "glue/SIM/train.jsonl")] == [0.5, 4.0]
    task = json.loads((ws.data_dir / "glue/SIM/task.json").read_text())
    assert task["kind"] == "regression" and task["num_classes"] == 1 and task["metric"] == "pearson_spearman"


def test_bad_rows_are_counted_and_listed(ws, tmp_path):
    tsv(tmp_path / "RTE/train.tsv", ["index", "sentence1", "sentence2", "label"],
        [[0, "the king", "the dog", "entailment"], [1, "only two fields"], [2, "", "x", "entailment"],
         [3, "a", "b", "maybe"], [4, "a b", "b a", "not_entailment"]])
    s = prepare_glue(ws, tmp_path / "RTE")
    split = s.split("RTE", "train")
    assert (split.records, split.bad_rows) == (2, 3)
    listed = (ws.data_dir / "glue/RTE/bad-rows-train.tsv").read_text().splitlines()
    assert len(listed) == 4 and "empty sentence" in listed[2] and "'maybe' is not one of" in listed[3]
    assert "2 fields" in listed[1]


def test_clear_errors(ws, tmp_path):
    tsv(tmp_path / "x/train.tsv", ["text", "label"], [["a", 0]])
    with pytest.raises(PrepareError, match="no column 'sentence'"):
        prepare_glue(ws, tsv=[tmp_path / "x/train.tsv"], task_name="X")
    tsv(tmp_path / "y/train.tsv", ["sentence", "label"], [["", 0], ["a"]])
    with pytest.raises(PrepareError, match="no usable row"):
        prepare_glue(ws, tsv=[tmp_path / "y/train.tsv"], task_name="Y")
    assert not (ws.data_dir / "glue/Y/task.json").exists()
    with pytest.raises(PrepareError, match="no task folders"):
        prepare_glue(ws, tmp_path / "x")
    with pytest.raises(PrepareError, match="no task 'QQP'"):
        (tmp_path / "g/RTE").mkdir(parents=True)
        tsv(tmp_path / "g/RTE/dev.tsv", ["index", "sentence1", "sentence2", "label"], [[0, "a", "b", "entailment"]])
        prepare_glue(ws, tmp_path / "g", task="QQP")
    with pytest.raises(PrepareError, match="needs --task-name"):
        prepare_glue(ws, tsv=[tmp_path / "x/train.tsv"])
    with pytest.raises(PrepareError, match="no tokenizer at .*prepare text"):
        prepare_glue(Workspace(tmp_path / "empty"), tmp_path / "g")
    res = CliRunner().invoke(app, ["prepare", "glue", str(tmp_path / "nowhere"), "-w", str(ws.root)])
    assert res.exit_code == 2 and "is not a directory" in res.output
