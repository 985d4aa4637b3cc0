"""The tokenizer wrapper, the token shards and the text batch sources (d2vcli/text_data.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import sentencepiece as spm
import torch

from d2vcli import checkpoint as ckpt
from d2vcli import engine
from d2vcli.config import Config
from d2vcli.distributed import DistInfo
from d2vcli.engine import StepOutput, text_batch_unit
from d2vcli.prepare.text import prepare_text
from d2vcli.text_data import (TextBlockLoader, TextTaskLoader, TokenBlocks, Tokenizer, TokenizerError, read_task,
                              token_dtype)
from d2vcli.run_dir import prepare_run
from d2vcli.workspace import Workspace

WORDS = ("the king queen walks walk sees girls who either or he she they boy runs red small "
         "happy dog cats sleeps quietly").split()


def corpus_lines(n: int = 300, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 14)))) for _ in range(n)]


def write_corpus(path, docs: int = 60, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    out = []
    for d in range(docs):
        out.append(corpus_lines(int(rng.integers(1, 5)), seed * 1000 + d))
    path.write_text("".join("\n".join(d) + "\n\n" for d in out), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(corpus_lines(), 48)


def test_special_ids_are_fairseq_roberta_ids(tok):
    sp = spm.SentencePieceProcessor(model_proto=tok.proto)
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [sp.id_to_piece(i) for i in range(5)] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    assert tok.vocab_size == sp.get_piece_size() == 48
    # Ordinary text never produces a special id; "<mask>" written in text is the mask token.
    ids = tok.encode("the king sees the girls")
    assert ids == sp.encode("the king sees the girls") and min(ids) > 4


def test_round_trip(tok):
    for line in corpus_lines(20, seed=7) + ["the happy dog sleeps quietly"]:
        assert tok.decode(tok.encode(line)) == line
    assert tok.decode([0] + tok.encode("the boy runs") + [2, 1, 1]) == "the boy runs"


def test_training_is_deterministic():
    lines = corpus_lines()
    a, b = Tokenizer.train(lines, 40), Tokenizer.train(lines, 40)
    assert a.proto == b.proto
    assert Tokenizer.train(lines, 40, "unigram").proto == Tokenizer.train(lines, 40, "unigram").proto
    assert Tokenizer.train(lines, 41).proto != a.proto


def test_vocab_too_large_is_a_clear_error():
    with pytest.raises(TokenizerError, match="--vocab-size 5000 .*at most"):
        Tokenizer.train(corpus_lines(50), 5000)


def _foreign_model(**ids) -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines()), model_writer=buf, vocab_size=40,
                                   minloglevel=2, **ids)
    return buf.getvalue()


def test_model_with_other_special_ids_is_refused(tmp_path):
    path = tmp_path / "default.model"
    path.write_bytes(_foreign_model())  # sentencepiece's defaults: unk 0, bos 1, eos 2, no pad
    with pytest.raises(TokenizerError, match="default.model.*<s> 0, <pad> 1, </s> 2"):
        Tokenizer.load(path)


def test_model_without_mask_gets_it_appended():
    proto = _foreign_model(bos_id=0, pad_id=1, eos_id=2, unk_id=3)
    tok = Tokenizer(proto)
    assert tok.mask_appended and tok.mask_id == 40 and tok.vocab_size == 41


def test_missing_or_garbage_model(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "none.model")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        Tokenizer.load(tmp_path / "bad.model")


def test_token_dtype():
    assert token_dtype(50265) == np.uint16 and token_dtype(65536) == np.int32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    docs = write_corpus(root / "c.txt", docs=80)
    ws = Workspace(root / "ws")
    prepare_text(ws, [root / "c.txt"], vocab_size=48, valid_fraction=0.1, tokens_per_sample=512)
    return ws, docs


def test_shards_equal_tokenizing_the_text_directly(prepared):
    ws, docs = prepared
    sp = spm.SentencePieceProcessor(model_file=str(ws.data_dir / "text" / "spm.model"))
    expected = {tuple(t for line in d for t in sp.encode(line) + [2]) for d in docs}
    got = set()
    for split in ("train", "valid"):
        blocks = TokenBlocks(ws.data_dir / "text", split)
        assert blocks[0].dtype == np.int64 and len(blocks) > 0
        got |= {tuple(blocks[i].tolist()) for i in range(len(blocks))}
    # tokens_per_sample 512 holds every document whole: one block per document (complete_doc).
    assert got == expected


def _all(loader, n=None):
    out = []
    for b in loader:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def test_block_loader_batches(prepared):
    ws, _ = prepared
    blocks = TokenBlocks(ws.data_dir / "text", "train")
    loader = TextBlockLoader(blocks, 0, tokens_per_batch=200, seed=3)
    batches = _all(loader)
    seen = []
    for b in batches:
        assert b.source.dtype == torch.int64 and (b.source[:, 0] == 0).all()  # <s> prepended
        assert b.source.numel() <= 200 and b.target is None
        real = b.padding_mask.logical_not().sum() if b.padding_mask is not None else b.source.numel()
        assert b.num_samples == int(real)
        if b.padding_mask is not None:
            assert (b.source[b.padding_mask] == 1).all()
        for row, i in zip(b.source, b.ids):
            block = blocks[int(i)]
            assert row[1:1 + len(block)].tolist() == block.tolist()
        seen += [int(i) for i in b.ids]
    assert sorted(seen) == list(range(len(blocks)))  # each block once per epoch
    # The next epoch is another order, the same epoch again the same one.
    again = TextBlockLoader(blocks, 0, tokens_per_batch=200, seed=3)
    assert [b.ids for b in _all(again)] == [b.ids for b in batches]
    assert [b.ids for b in _all(again)] != [b.ids for b in batches]


def test_block_loader_resumes_where_it_stopped(prepared):
    ws, _ = prepared
    blocks = TokenBlocks(ws.data_dir / "text", "train")
    full = [b.ids for b in _all(TextBlockLoader(blocks, 0, 150, seed=5))]
    first = TextBlockLoader(blocks, 0, 150, seed=5)
    head = [b.ids for b in _all(first, 3)]
    state = first.state_dict()
    resumed = TextBlockLoader(blocks, 0, 150, seed=5)
    resumed.load_state_dict(state)
    assert head + [b.ids for b in _all(resumed)] == full


def test_block_loader_ranks_share_the_epoch(prepared):
    ws, _ = prepared
    blocks = TokenBlocks(ws.data_dir / "text", "train")
    one = [b.ids for b in _all(TextBlockLoader(blocks, 0, 150, seed=5))]
    r0 = [b.ids for b in _all(TextBlockLoader(blocks, 0, 150, seed=5, rank=0, world_size=2))]
    r1 = [b.ids for b in _all(TextBlockLoader(blocks, 0, 150, seed=5, rank=1, world_size=2))]
    assert r0 == one[0::2][:len(r0)] and r1 == one[1::2][:len(r1)] and len(r0) == len(r1) == len(one) // 2


def test_block_loader_refusals(prepared):
    ws, _ = prepared
    blocks = TokenBlocks(ws.data_dir / "text", "train")
    longest = int(blocks.sizes.max()) + 1
    with pytest.raises(ValueError, match="text_tokens_per_batch"):
        TextBlockLoader(blocks, 0, longest - 1, seed=1)
    with pytest.raises(ValueError, match="tokens_per_sample"):
        TextBlockLoader(blocks, 0, 10_000, seed=1, tokens_per_sample=longest - 1)
    with pytest.raises(ValueError, match="prepare text"):
        TokenBlocks(ws.root / "elsewhere", "train")


def test_task_loader_pads_and_labels():
    records = [{"id": str(i), "tokens": [0] + [5 + i] * (i + 1) + [2], "label": i % 3} for i in range(7)]
    loader = TextTaskLoader(records, batch_size=3, seed=0, shuffle=False)
    batches = _all(loader)
    assert [len(b.ids) for b in batches] == [3, 3, 1]
    b = batches[0]
    assert b.source.tolist() == [[0, 5, 2, 1, 1], [0, 6, 6, 2, 1], [0, 7, 7, 7, 2]]
    assert b.padding_mask.tolist() == [[False] * 3 + [True] * 2, [False] * 4 + [True], [False] * 5]
    assert b.target.dtype == torch.int64 and b.target.tolist() == [0, 1, 2] and b.num_samples == 3
    assert batches[2].padding_mask is None
    reg = [dict(r, label=float(i) / 2) for i, r in enumerate(records)] + [{"id": "t", "tokens": [0, 2], "label": None}]
    rb = _all(TextTaskLoader(reg, batch_size=8, seed=0, regression=True, shuffle=False))[0]
    assert rb.target.dtype == torch.float32 and rb.target[:7].tolist() == [i / 2 for i in range(7)]
    assert torch.isnan(rb.target[7])
    shuffled = TextTaskLoader(records, batch_size=3, seed=0)
    head = [b.ids for b in _all(shuffled, 1)]
    resumed = TextTaskLoader(records, batch_size=3, seed=0)
    resumed.load_state_dict(shuffled.state_dict())
    rest = [b.ids for b in _all(resumed)]
    assert sorted(sum(head + rest, [])) == sorted(r["id"] for r in records)
    with pytest.raises(ValueError, match="record has 9 tokens .*at most 8"):
        TextTaskLoader(records, batch_size=3, seed=0, max_tokens=8)


def test_task_records_refuse_another_tokenizer(tmp_path, tok):
    (tmp_path / "task.json").write_text(json.dumps({"name": "T", "tokenizer_sha256": tok.sha256()}))
    assert read_task(tmp_path, tok)["name"] == "T"
    other = Tokenizer.train(corpus_lines(), 44)
    with pytest.raises(ValueError, match="another tokenizer"):
        read_task(tmp_path, other)


def test_text_batch_unit_is_the_recipe():
    cfg = Config()
    unit = text_batch_unit(cfg)
    assert unit.unit == "tokens" and cfg.train.tokens_per_update == 131072 and cfg.data.tokens_per_sample == 512
    assert unit.accumulation(1) == 16 and unit.accumulation(16) == 1  # 8192 tokens x 16 GPUs


class TokenToyTask:
    """Per-token regression to 1 on an embedding: enough to run the engine on text batches."""

    kind = "pretrain"
    find_unused_parameters = False

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Embedding(48, 1)
        self.seen: list[tuple[str, ...]] = []

    def train_step(self, model, batch, step):
        self.seen.append(tuple(batch.ids))
        real = torch.ones_like(batch.source, dtype=torch.bool) if batch.padding_mask is None else ~batch.padding_mask
        loss = ((model(batch.source).squeeze(-1) - 1.0) ** 2)[real].sum()
        return StepOutput(loss, batch.num_samples, {})

    def after_update(self, step):
        return None

    def validate(self, model, step):
        return None

    def stop_reason(self, step, metrics):
        return None

    def checkpoint_state(self):
        return {ckpt.ARCH_KEY: {}, ckpt.NORMALIZE_KEY: False}

    def load_checkpoint_state(self, state):
        pass


def test_engine_trains_on_text_batches_and_resumes_exactly(prepared, tmp_path):
    """tokens_per_update / text_tokens_per_batch give the accumulation; a paused run resumes with the
    same batches and ends with the same weights as an uninterrupted one."""
    ws, _ = prepared
    cfg = Config()
    cfg.data.text_tokens_per_batch, cfg.train.tokens_per_update = 150, 300
    cfg.train.max_updates, cfg.train.log_every, cfg.schedule.kind, cfg.optim.lr = 2, 1, "constant", 0.01
    unit = text_batch_unit(cfg)
    assert unit.accumulation(1) == 2
    cpu = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    work = Workspace(tmp_path / "runs")

    def train(task, name, resume=False, stop_at=None):
        loader = TextBlockLoader(TokenBlocks(ws.data_dir / "text", "train"), 0, 150, seed=cfg.train.seed)
        run = prepare_run(work, name, cfg, resume, cpu)
        return engine.train(cfg, task, loader, run, cpu, stop_at=stop_at, batch=unit)

    straight = TokenToyTask()
    assert train(straight, "straight").status == "done" and len(straight.seen) == 4  # 2 updates x 2
    first, second = TokenToyTask(), TokenToyTask()
    assert train(first, "split", stop_at=1).status == "paused"
    assert train(second, "split", resume=True).status == "done"
    assert first.seen + second.seen == straight.seen
    torch.testing.assert_close(second.model.weight, straight.model.weight, rtol=0, atol=0)


def test_config_refuses_impossible_text_sizes():
    Config().validate()
    cfg = Config()
    cfg.data.text_tokens_per_batch = 0
    with pytest.raises(ValueError, match="text_tokens_per_batch"):
        cfg.validate()
