"""`d2v prepare text`: bad inputs, problem counts, blocks, idempotence, --spm reuse (d2vcli/prepare/text.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sentencepiece as spm
from typer.testing import CliRunner

from d2vcli.cli import app
from d2vcli.fileio import OutputExistsError
from d2vcli.prepare.result import PrepareError
from d2vcli.prepare.text import assign_splits, make_blocks, normalize_line, prepare_text
from d2vcli.text_data import TokenBlocks
from d2vcli.workspace import Workspace

WORDS = "the king queen walks sees girls who either or he she they boy runs small dog cats".split()


def corpus(path, docs=40, seed=0, extra: bytes = b""):
    rng = np.random.default_rng(seed)
    text = "".join("\n".join(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
                             for _ in range(int(rng.integers(1, 4)))) + "\n\n" for _ in range(docs))
    path.write_bytes(text.encode() + extra)
    return path


def run(tmp_path, files, **kw):
    kw.setdefault("vocab_size", 40)
    kw.setdefault("valid_fraction", 0.1)
    return prepare_text(Workspace(tmp_path / "ws"), files, **kw)


def text_files(tmp_path):
    d = tmp_path / "ws" / "data" / "text"
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}


def test_missing_file(tmp_path):
    with pytest.raises(PrepareError, match="text file not found: .*nope.txt"):
        run(tmp_path, [tmp_path / "nope.txt"])


def test_empty_and_blank_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PrepareError, match="empty.txt is empty"):
        run(tmp_path, [tmp_path / "empty.txt"])
    (tmp_path / "blank.txt").write_text("\x01\x02\n   \n\t\n\x7f\n")
    with pytest.raises(PrepareError, match="no text in .*every line is empty after normalization"):
        run(tmp_path, [tmp_path / "blank.txt"])
    assert not (tmp_path / "ws" / "data" / "text" / "meta.json").exists()


def test_binary_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(PrepareError, match="x.bin looks binary"):
        run(tmp_path, [tmp_path / "x.bin"])


def test_directory_given(tmp_path):
    with pytest.raises(PrepareError, match="is a directory"):
        run(tmp_path, [tmp_path])


def test_problems_are_counted(tmp_path):
    long_line = " ".join(["the king sees the girls"] * 20)
    extra = (b"bad \xff\xfe bytes and \xc3 here\n\nctrl\x07 char\n\n" + long_line.encode() + b"\n")
    s = run(tmp_path, [corpus(tmp_path / "c.txt", extra=extra)], tokens_per_sample=16)
    assert s.problems["undecodable bytes"] == 3  # \xff, \xfe and the cut-off \xc3: one U+FFFD each
    assert s.problems["over-long lines"] >= 1 and s.problems["control chars removed"] == 1
    assert s.problems["empty lines"] >= 40
    meta = json.loads((tmp_path / "ws/data/text/meta.json").read_text())
    assert meta["problems"] == s.problems and meta["inputs"][str(tmp_path / "c.txt")]["undecodable_bytes"] == 3
    assert any("undecodable" in n for n in s.notes) and any("longer than a block" in n for n in s.notes)
    for split in ("train", "valid"):
        blocks = TokenBlocks(tmp_path / "ws/data/text", split)
        assert blocks.sizes.max() <= 15  # tokens_per_sample - 1, <s> comes at load time


def test_normalization():
    assert normalize_line("Cafe\u0301\tau  lait\x00", False) == ("Café au lait", 1)
    assert normalize_line("ÉCOLE", True)[0] == "école"


def test_break_modes():
    docs = [[[5, 6, 2], [7, 2]], [[8, 9, 10, 2]], [[11, 2]]]
    flat = [t for d in docs for line in d for t in line]
    from collections import Counter
    c: Counter = Counter()
    doc = make_blocks(docs, 6, "complete_doc", c)
    assert [b.tolist() for b in doc] == [[5, 6, 2, 7, 2], [8, 9, 10, 2], [11, 2]]  # never across documents
    comp = make_blocks(docs, 6, "complete", c)
    assert [b.tolist() for b in comp] == [[5, 6, 2, 7, 2], [8, 9, 10, 2, 11, 2]]  # whole lines, across documents
    none = make_blocks(docs, 4, "none", c)
    assert [len(b) for b in none] == [4, 4, 3] and sum((b.tolist() for b in none), []) == flat
    assert c["over-long lines"] == 0
    assert [b.tolist() for b in make_blocks([[[1, 2, 3, 4, 5, 2]]], 4, "complete_doc", c)] == [[1, 2, 3, 4], [5, 2]]
    assert c["over-long lines"] == 1


def test_split_is_by_document_and_stable():
    docs = [[f"doc {i} line"] for i in range(200)]
    a = assign_splits(docs, 0.1)
    b = assign_splits(docs + [[f"new {i}"] for i in range(50)], 0.1)
    assert 5 < len(a["valid"]) < 40 and all(d in b["valid"] for d in a["valid"])
    assert len(assign_splits(docs[:2], 0.01)["valid"]) == 1  # a tiny corpus still gets a valid document


def test_rerun_is_up_to_date_and_settings_rebuild(tmp_path):
    f = corpus(tmp_path / "c.txt")
    assert run(tmp_path, [f]).status == "written"
    before = text_files(tmp_path)
    again = run(tmp_path, [f])
    assert again.status == "up to date" and "nothing read again" in again.notes[0]
    assert text_files(tmp_path) == before
    assert run(tmp_path, [f], lowercase=True).status == "written"


def test_failure_leaves_existing_outputs_intact(tmp_path):
    f = corpus(tmp_path / "c.txt")
    run(tmp_path, [f])
    before = text_files(tmp_path)
    with pytest.raises(PrepareError, match="--vocab-size 5000"):
        run(tmp_path, [f], vocab_size=5000)
    (tmp_path / "bad.txt").write_bytes(b"\x00\x01binary")
    with pytest.raises(PrepareError, match="binary"):
        run(tmp_path, [f, tmp_path / "bad.txt"])
    assert text_files(tmp_path) == before
    assert run(tmp_path, [f]).status == "up to date"


def test_another_tokenizer_needs_force(tmp_path):
    f = corpus(tmp_path / "c.txt")
    run(tmp_path, [f])
    before = text_files(tmp_path)
    with pytest.raises(OutputExistsError, match="spm.model holds another tokenizer.*--force"):
        run(tmp_path, [f], vocab_size=44)
    assert text_files(tmp_path) == before
    assert run(tmp_path, [f], vocab_size=44, force=True).vocab_size == 44


def test_spm_reuse(tmp_path):
    f = corpus(tmp_path / "c.txt")
    run(tmp_path, [f])
    model = tmp_path / "ws/data/text/spm.model"
    other = prepare_text(Workspace(tmp_path / "ws2"), [f], spm_path=model, valid_fraction=0.1)
    assert (tmp_path / "ws2/data/text/spm.model").read_bytes() == model.read_bytes()
    assert other.split("train").tokens == run(tmp_path, [f]).split("train").tokens
    sp = spm.SentencePieceProcessor(model_file=str(model))
    block = TokenBlocks(tmp_path / "ws2/data/text", "train")[0]
    assert sp.decode([t for t in block.tolist() if t != 2])
    plain = tmp_path / "plain.model"
    spm.SentencePieceTrainer.train(input=str(f), model_prefix=str(plain.with_suffix("")), vocab_size=30,
                                   minloglevel=2)
    with pytest.raises(PrepareError, match="--spm: .*plain.model: its special ids"):
        prepare_text(Workspace(tmp_path / "ws3"), [f], spm_path=plain)


def test_cli_prints_one_line_errors(tmp_path):
    res = CliRunner().invoke(app, ["prepare", "text", str(tmp_path / "none.txt"), "-w", str(tmp_path / "w")])
    assert res.exit_code == 2 and "text file not found" in res.output and "Traceback" not in res.output
    f = corpus(tmp_path / "c.txt")
    res = CliRunner().invoke(app, ["prepare", "text", str(f), "--vocab-size", "40", "-w", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    assert "d2v prepare text" in res.output and "undecodable bytes 0" in res.output
