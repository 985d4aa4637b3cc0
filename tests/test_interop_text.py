"""Text checkpoints in and out, checked against transformers' Data2VecText* and the sentencepiece library.

Peers: a tiny random HF model saved with `save_pretrained` (import must reproduce its hidden states and
logits within 1e-5), `from_pretrained` with `output_loading_info` (export must load with no missing or
unexpected key and give our outputs), `AutoTokenizer` (the exported tokenizer must give sentencepiece's ids),
and for fairseq files a direct computation: the same fairseq-named weights mapped into a HF model by the
published fairseq->HF key table (written out here independently of d2vcli's maps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import sentencepiece as spm
import torch
from typer.testing import CliRunner
from transformers import (AutoTokenizer, Data2VecTextConfig, Data2VecTextForSequenceClassification,
                          Data2VecTextModel, RobertaTokenizerFast)

from d2vcli import checkpoint as ck
from d2vcli import interop, interop_text
from d2vcli.cli import app
from d2vcli.fileio import OutputExistsError
from d2vcli.interop_keys import InteropError
from d2vcli.interop_tokenizer import sentencepiece_entry, spm_to_tokenizers, tokenizer_of
from d2vcli.models.loading import build_text_model, load_model
from d2vcli.models.text import text_tiny

ATOL = 1e-5
torch.set_num_threads(1)
SENTENCES = ["the cat that the dogs chase runs", "a dog sees the cats", "cats and dogs run quickly home",
             "the bird which sings flies away", "no one knows the answer"] * 4


def hf_cfg(vocab: int = 60, **kw) -> Data2VecTextConfig:
    base = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                hidden_act="gelu", max_position_embeddings=34, layer_norm_eps=1e-5, type_vocab_size=1,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1, attn_implementation="eager")
    return Data2VecTextConfig(**{**base, **kw})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (LayerNorms and biases too), so a wrong mapping cannot hide behind ones/zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] > 8 else 0.0))
    return model.eval()


def batch(vocab: int, pad: int = 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [11, 6, 3]
    tokens = torch.full((3, 11), pad, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(5, vocab, (n,), generator=g)
        tokens[b, 0], tokens[b, n - 1] = 0, 2
    return tokens, tokens.ne(pad).long()


def bpe_files(folder) -> None:
    """A small RoBERTa-style byte-level BPE (vocab.json + merges.txt), <s> <pad> </s> <unk> <mask> first."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(SENTENCES, vocab_size=60, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    tok.save_model(str(folder))


@pytest.fixture(scope="module")
def hf_pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-text")
    model = randomize(Data2VecTextModel(hf_cfg()))
    model.save_pretrained(folder)
    bpe_files(folder)
    return folder, model


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    (d / "corpus.txt").write_text("\n".join(SENTENCES * 5), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "spm"), vocab_size=40,
                                   model_type="unigram", bos_id=0, pad_id=1, eos_id=2, unk_id=3,
                                   user_defined_symbols=["<mask>"], minloglevel=2, num_threads=1)
    return d / "spm.model"


def our_checkpoint(path, kind, spm_path, num_classes=0, seed=0, vocab=40, mask=4):
    arch = dataclasses.replace(text_tiny(vocab_size=vocab, mask_id=mask), embed_dim=32, num_heads=4, ffn_dim=64,
                               max_positions=32)
    model = randomize(build_text_model(kind, arch, num_classes), seed)
    classes = ([f"label{i}" for i in range(num_classes)] if num_classes > 1 else ["score"]) if kind == "text-cls" \
        else None
    state = ck.make_state(kind, config={}, arch=dataclasses.asdict(arch), normalize=False, model=model.state_dict(),
                          classes=classes)
    if spm_path is not None:
        state[ck.TOKENIZER_KEY] = sentencepiece_entry(spm_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ck.save_checkpoint(path, state)
    return model, arch


# --------------------------------------------------------------------------- HF -> d2v


def test_hf_import_gives_the_hf_hidden_states_and_keeps_the_bpe_tokenizer(hf_pretrained, tmp_path):
    folder, hf = hf_pretrained
    result = interop_text.import_hf(folder, out=tmp_path / "m.pt")
    assert result.kind == "text-pretrain" and result.tokenizer == "hf"
    assert any("regression head is freshly initialized" in n for n in result.notes)
    assert any("pooler" in n for n in result.notes)
    loaded = load_model(tmp_path / "m.pt")
    tokens, attention = batch(60)
    ours = loaded.model.encoder(tokens, tokens.eq(1)).x
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=attention).last_hidden_state
    real = attention.bool()
    assert torch.allclose(ours[real], ref[real], atol=ATOL)
    # The teacher starts as the student's encoder; the tokenizer gives RoBERTa's tokenizer's ids.
    teacher = loaded.state[ck.TEACHER_KEY]
    assert all(torch.equal(teacher[k], v) for k, v in loaded.model.encoder.state_dict().items())
    tok = tokenizer_of(loaded.state[ck.TOKENIZER_KEY])
    peer = RobertaTokenizerFast.from_pretrained(folder)
    for text in ("the cat runs", "dogs see birds quickly", "unknown zebra words"):
        assert [tok.bos_id] + tok.encode(text) + [tok.eos_id] == peer(text)["input_ids"]
    assert (tok.pad_id, tok.mask_id) == (1, 4) and loaded.model.encoder.cfg.mask_id == 4


@pytest.mark.parametrize("num_labels", [3, 1])
def test_hf_classifier_import_gives_the_hf_logits(tmp_path, num_labels):
    labels = {"id2label": {0: "neg", 1: "neu", 2: "pos"}} if num_labels == 3 else {}
    # Two identical token-type rows are folded into the positions: the model's sums do not change.
    hf = Data2VecTextForSequenceClassification(hf_cfg(num_labels=num_labels, type_vocab_size=2, **labels))
    randomize(hf, seed=3)
    with torch.no_grad():
        tt = hf.data2vec_text.embeddings.token_type_embeddings.weight
        tt[1] = tt[0]
    hf.save_pretrained(tmp_path / "hf")
    result = interop_text.import_hf(tmp_path / "hf", out=tmp_path / "c.pt")
    assert result.kind == "text-cls" and result.num_classes == num_labels
    loaded = load_model(tmp_path / "c.pt")
    assert loaded.classes == (["neg", "neu", "pos"] if num_labels == 3 else ["LABEL_0"])
    assert loaded.state[ck.TEXT_TASK_KEY]["kind"] == ("classification" if num_labels == 3 else "regression")
    tokens, attention = batch(60)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=attention).logits
        ours = loaded.model(tokens, tokens.eq(1))
    assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=ATOL)


# --------------------------------------------------------------------------- d2v -> HF


@pytest.mark.parametrize("kind,num_classes", [("text-pretrain", 0), ("text-cls", 2), ("text-cls", 1)])
def test_export_loads_in_transformers_with_no_missing_keys_and_the_same_outputs(tmp_path, spm_model, kind,
                                                                                 num_classes):
    model, arch = our_checkpoint(tmp_path / "m.pt", kind, spm_model, num_classes)
    written = interop_text.export_hf(tmp_path / "m.pt", tmp_path / "out")
    assert {p.name for p in written} == {"model.safetensors", "config.json", "tokenizer.json",
                                         "tokenizer_config.json"}
    cls = Data2VecTextForSequenceClassification if kind == "text-cls" else Data2VecTextModel
    hf, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    tokens, attention = batch(40)
    with torch.no_grad():
        if kind == "text-cls":
            assert torch.allclose(hf(input_ids=tokens, attention_mask=attention).logits, model(tokens, tokens.eq(1)),
                                  atol=ATOL)
            names = ["label0", "label1"] if num_classes == 2 else ["score"]
            assert hf.config.id2label == dict(enumerate(names))
            assert hf.config.problem_type == ("regression" if num_classes == 1 else "single_label_classification")
        else:
            real = attention.bool()
            ref = hf(input_ids=tokens, attention_mask=attention).last_hidden_state
            assert torch.allclose(ref[real], model.encoder(tokens, tokens.eq(1)).x[real], atol=ATOL)
    # The tokenizer transformers loads gives the sentencepiece ids, framed <s> A </s> (</s></s> for a pair).
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    for a, b in [("the cat that the dogs chase runs", "a dog sees"), ("unseen  Words, here!", "zebra")]:
        assert hf_tok(a)["input_ids"] == [0] + sp.encode(a) + [2]
        assert hf_tok(a, b)["input_ids"] == [0] + sp.encode(a) + [2, 2] + sp.encode(b) + [2]
    assert (hf_tok.pad_token_id, hf_tok.mask_token_id) == (arch.pad_id, arch.mask_id)


def test_export_of_a_sentencepiece_model_without_mask_appends_it_after_the_last_piece(tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(SENTENCES * 5), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "bpe"), vocab_size=30,
                                   model_type="bpe", bos_id=0, pad_id=1, eos_id=2, unk_id=3, minloglevel=2,
                                   num_threads=1)
    our_checkpoint(tmp_path / "m.pt", "text-pretrain", tmp_path / "bpe.model", vocab=31, mask=30)
    interop_text.export_hf(tmp_path / "m.pt", tmp_path / "out")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "bpe.model"))
    assert hf_tok.mask_token_id == 30 and len(hf_tok) == 31
    text = "the dogs chase a cat"
    assert hf_tok(text)["input_ids"] == [0] + sp.encode(text) + [2]
    assert hf_tok.convert_tokens_to_ids("<mask>") == 30 and 30 in hf_tok("the <mask> runs")["input_ids"]


def test_export_of_a_run_takes_the_workspace_tokenizer_or_says_there_is_none(tmp_path, spm_model):
    ws = tmp_path / "ws"
    our_checkpoint(ws / "runs" / "tiny" / "last.pt", "text-pretrain", None)
    runner = CliRunner()
    res = runner.invoke(app, ["export", "hf", "tiny", str(tmp_path / "bare"), "-w", str(ws)])
    assert res.exit_code == 0, res.output
    assert "no tokenizer written" in " ".join(res.output.split())
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    (ws / "data" / "text").mkdir(parents=True)
    (ws / "data" / "text" / "spm.model").write_bytes(spm_model.read_bytes())
    res = runner.invoke(app, ["export", "hf", "tiny", str(tmp_path / "full"), "-w", str(ws)])
    assert res.exit_code == 0 and (tmp_path / "full" / "tokenizer.json").is_file(), res.output
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    assert AutoTokenizer.from_pretrained(tmp_path / "full")("a dog")["input_ids"] == [0] + sp.encode("a dog") + [2]


@pytest.mark.parametrize("model_type,byte_fallback", [("bpe", False), ("bpe", True), ("unigram", False),
                                                      ("unigram", True)])
def test_the_tokenizer_json_segments_as_sentencepiece_does(tmp_path, model_type, byte_fallback):
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyzéåï") for _ in range(rng.randint(2, 8)))
             for _ in range(200)]
    (tmp_path / "c.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
                                              for _ in range(1500)), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "m"),
                                   vocab_size=300 if byte_fallback else 150, model_type=model_type, bos_id=0,
                                   pad_id=1, eos_id=2, unk_id=3, user_defined_symbols=["<mask>"],
                                   byte_fallback=byte_fallback, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    data = (tmp_path / "m.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=data)
    tok = spm_to_tokenizers(data)
    odd = ["  leading and   inner  spaces ", "Unseen ZEBRA 123 ﬁ", "ＦＵＬＬ width", "emoji 🙂 ok", "", "tab\there",
           "with <mask> inside"]
    texts = [" ".join(rng.choice(words + ["Hello", "QUIX", "42"]) for _ in range(rng.randint(1, 10)))
             for _ in range(300)] + odd
    for text in texts:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text


def test_tokenizer_conversion_without_the_tokenizers_package_says_what_to_install(monkeypatch, spm_model):
    import sys

    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(InteropError, match="pip install tokenizers"):
        spm_to_tokenizers(spm_model.read_bytes())


def test_import_export_import_round_trip_is_exact(hf_pretrained, tmp_path):
    folder, _ = hf_pretrained
    ws = tmp_path / "ws"
    runner = CliRunner()
    res = runner.invoke(app, ["import", "hf", str(folder), "-w", str(ws)])
    assert res.exit_code == 0, res.output
    assert "text-pretrain" in res.output and "tokenizer" in res.output
    res = runner.invoke(app, ["export", "hf", f"imported-{folder.name}", str(tmp_path / "out"), "-w", str(ws)])
    assert res.exit_code == 0, res.output
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "out" / name).read_bytes() == (folder / name).read_bytes()
    interop_text.import_hf(tmp_path / "out", out=tmp_path / "again.pt")
    first = ck.load_checkpoint(ws / "runs" / f"imported-{folder.name}" / "last.pt")
    again = ck.load_checkpoint(tmp_path / "again.pt")
    enc = [k for k in first[ck.MODEL_KEY] if k.startswith("encoder.")]
    assert enc and all(torch.equal(first[ck.MODEL_KEY][k], again[ck.MODEL_KEY][k]) for k in enc)
    assert first[ck.ARCH_KEY] == again[ck.ARCH_KEY]
    assert first[ck.TOKENIZER_KEY] == again[ck.TOKENIZER_KEY]


# --------------------------------------------------------------------------- fairseq

# The published fairseq -> HF map of data2vec 1.0 text (transformers' conversion; docs/text-interop.md),
# written out here on its own so the test does not reuse d2vcli's tables.
FS_TO_HF = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
            "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
            "self_attn_layer_norm": "attention.output.LayerNorm", "fc1": "intermediate.dense",
            "fc2": "output.dense", "final_layer_norm": "output.LayerNorm"}


def fairseq_v1_state(cfg: Data2VecTextConfig, seed: int = 0) -> tuple[dict, dict]:
    """(fairseq state dict, the same weights under HF names) for data2vec_text with a 2-layer regression head."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    D, F, V, P = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.max_position_embeddings
    p = "encoder.sentence_encoder."
    fs = {p + "embed_tokens.weight": r(V, D), p + "embed_positions.weight": r(P, D),
          p + "layernorm_embedding.weight": 1 + r(D), p + "layernorm_embedding.bias": r(D),
          p + "version": torch.tensor([3.0]),
          "encoder.regression_head.0.weight": r(2 * D, D), "encoder.regression_head.0.bias": r(2 * D),
          "encoder.regression_head.2.weight": r(D, 2 * D), "encoder.regression_head.2.bias": r(D)}
    hf = {"embeddings.word_embeddings.weight": fs[p + "embed_tokens.weight"],
          "embeddings.position_embeddings.weight": fs[p + "embed_positions.weight"],
          "embeddings.LayerNorm.weight": fs[p + "layernorm_embedding.weight"],
          "embeddings.LayerNorm.bias": fs[p + "layernorm_embedding.bias"],
          "embeddings.token_type_embeddings.weight": torch.zeros(1, D)}
    shapes = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (D, D), "self_attn.v_proj": (D, D),
              "self_attn.out_proj": (D, D), "self_attn_layer_norm": (D,), "fc1": (F, D), "fc2": (D, F),
              "final_layer_norm": (D,)}
    for i in range(cfg.num_hidden_layers):
        for name, shape in shapes.items():
            w = r(*shape) + (1 if len(shape) == 1 else 0)
            b = r(shape[0])
            fs[f"{p}layers.{i}.{name}.weight"], fs[f"{p}layers.{i}.{name}.bias"] = w, b
            hf[f"encoder.layer.{i}.{FS_TO_HF[name]}.weight"], hf[f"encoder.layer.{i}.{FS_TO_HF[name]}.bias"] = w, b
    return fs, hf


def fairseq_cfg_dict(cfg: Data2VecTextConfig, name: str = "data2vec_text") -> dict:
    return {"model": {"_name": name, "head_layers": 2, "transformer": {
        "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "activation_fn": "gelu",
        "no_scale_embedding": True, "layernorm_embedding": True,
        "encoder": {"embed_dim": cfg.hidden_size, "ffn_embed_dim": cfg.intermediate_size,
                    "layers": cfg.num_hidden_layers, "attention_heads": cfg.num_attention_heads,
                    "normalize_before": False, "learned_pos": True}}},
        "task": {"_name": "masked_lm", "tokens_per_sample": cfg.max_position_embeddings - 2}}


def hf_reference(cfg: Data2VecTextConfig, hf_state: dict) -> Data2VecTextModel:
    ref = Data2VecTextModel(cfg, add_pooling_layer=False)
    ref.load_state_dict(hf_state, strict=True)
    return ref.eval()


def test_fairseq_v1_text_import_matches_hf_on_the_same_weights_and_reads_the_ema(tmp_path):
    cfg = hf_cfg()
    fs, hf_state = fairseq_v1_state(cfg)
    ema = {k[len("encoder.sentence_encoder."):]: v + 0.01 for k, v in fs.items()
           if k.startswith("encoder.sentence_encoder.layers.")}
    torch.save({"cfg": fairseq_cfg_dict(cfg), "model": {**fs, "encoder._ema": ema}}, tmp_path / "nlp_base.pt")
    result = interop.import_fairseq(tmp_path / "nlp_base.pt", out=tmp_path / "a.pt")
    assert result.kind == "text-pretrain" and any("EMA teacher imported" in n for n in result.notes)
    loaded = load_model(tmp_path / "a.pt")
    assert loaded.model.encoder.cfg.mask_id == cfg.vocab_size - 1 and loaded.model.encoder.cfg.num_heads == 4
    tokens, attention = batch(cfg.vocab_size)
    real = attention.bool()
    with torch.no_grad():
        ref = hf_reference(cfg, hf_state)(input_ids=tokens, attention_mask=attention).last_hidden_state
    assert torch.allclose(loaded.model.encoder(tokens).x[real], ref[real], atol=ATOL)
    assert torch.equal(loaded.state[ck.MODEL_KEY]["regression_head.2.weight"], fs["encoder.regression_head.2.weight"])
    teacher = loaded.state[ck.TEACHER_KEY]
    assert torch.equal(teacher["layers.1.fc2.weight"], ema["layers.1.fc2.weight"])
    assert torch.equal(teacher["embed.embed_tokens.weight"], fs["encoder.sentence_encoder.embed_tokens.weight"])
    # --use-ema: the student's encoder is the teacher.
    interop.import_fairseq(tmp_path / "nlp_base.pt", out=tmp_path / "b.pt", use_ema=True)
    student = ck.load_checkpoint(tmp_path / "b.pt")[ck.MODEL_KEY]
    assert torch.equal(student["encoder.layers.0.fc1.bias"], ema["layers.0.fc1.bias"])


def test_fairseq_v2_text_import_splits_qkv_and_matches_hf(tmp_path):
    cfg = hf_cfg()
    fs1, hf_state = fairseq_v1_state(cfg, seed=5)
    p, t = "encoder.sentence_encoder.", "modality_encoders.TEXT.local_encoder."
    v2_names = {"self_attn.out_proj": "attn.proj", "self_attn_layer_norm": "norm1", "fc1": "mlp.fc1",
                "fc2": "mlp.fc2", "final_layer_norm": "norm2"}
    fs = {t + k[len(p):]: v for k, v in fs1.items() if k.startswith(p) and ".layers." not in k and "version" not in k}
    for i in range(cfg.num_hidden_layers):
        for w in ("weight", "bias"):
            fs[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([fs1[f"{p}layers.{i}.self_attn.{q}_proj.{w}"] for q in "qkv"])
            for old, new in v2_names.items():
                fs[f"blocks.{i}.{new}.{w}"] = fs1[f"{p}layers.{i}.{old}.{w}"]
    fs["modality_encoders.TEXT.decoder.blocks.0.0.weight"] = torch.zeros(32, 32, 9)
    ema = {k[len("blocks."):]: v for k, v in fs.items() if k.startswith("blocks.")}
    torch.save({"cfg": {"model": {"_name": "data2vec_multi", "num_heads": 4}}, "model": {**fs, "_ema": ema}},
               tmp_path / "v2.pt")
    result = interop.import_fairseq(tmp_path / "v2.pt", out=tmp_path / "v2-d2v.pt")
    assert result.kind == "text-pretrain" and any("decoder" in n for n in result.notes)
    loaded = load_model(tmp_path / "v2-d2v.pt")
    tokens, attention = batch(cfg.vocab_size)
    real = attention.bool()
    with torch.no_grad():
        ref = hf_reference(cfg, hf_state)(input_ids=tokens, attention_mask=attention).last_hidden_state
    assert torch.allclose(loaded.model.encoder(tokens).x[real], ref[real], atol=ATOL)
    assert torch.equal(loaded.state[ck.TEACHER_KEY]["layers.1.self_attn.k_proj.weight"],
                       fs1[f"{p}layers.1.self_attn.k_proj.weight"])


def test_fairseq_finetuned_classifier_import_gives_the_hf_logits(tmp_path):
    cfg = hf_cfg(num_labels=2)
    fs, hf_state = fairseq_v1_state(cfg, seed=7)
    fs = {k: v for k, v in fs.items() if "regression_head" not in k}
    g = torch.Generator().manual_seed(8)
    for part, shape in (("dense", (32, 32)), ("out_proj", (2, 32))):
        w, b = torch.randn(*shape, generator=g), torch.randn(shape[0], generator=g)
        fs[f"classification_heads.sentence_classification_head.{part}.weight"] = w
        fs[f"classification_heads.sentence_classification_head.{part}.bias"] = b
        hf_state[f"classifier.{part}.weight"], hf_state[f"classifier.{part}.bias"] = w, b
    # The older names fairseq's upgrade still reads: `decoder.` for the encoder, `emb_layer_norm`.
    fs = {k.replace("encoder.sentence_encoder.", "decoder.sentence_encoder.").replace("layernorm_embedding",
                                                                                       "emb_layer_norm"): v
          for k, v in fs.items()}
    torch.save({"cfg": fairseq_cfg_dict(cfg, "roberta"), "model": fs}, tmp_path / "sst2.pt")
    with pytest.raises(InteropError, match="fine-tuned classifier"):
        interop.import_fairseq(tmp_path / "sst2.pt", out=tmp_path / "c.pt", use_ema=True)
    assert interop.import_fairseq(tmp_path / "sst2.pt", out=tmp_path / "c.pt").kind == "text-cls"
    ref = Data2VecTextForSequenceClassification(cfg)
    ref.load_state_dict({**{"data2vec_text." + k: v for k, v in hf_state.items() if not k.startswith("classifier.")},
                         **{k: v for k, v in hf_state.items() if k.startswith("classifier.")}})
    tokens, attention = batch(cfg.vocab_size)
    with torch.no_grad():
        want = ref.eval()(input_ids=tokens, attention_mask=attention).logits
        got = load_model(tmp_path / "c.pt").model(tokens)
    assert torch.allclose(got, want, atol=ATOL)


# --------------------------------------------------------------------------- bad inputs


def test_bad_inputs_are_clear_errors_and_leave_outputs_intact(hf_pretrained, tmp_path):
    folder, hf = hf_pretrained
    out = tmp_path / "keep.pt"
    out.write_bytes(b"earlier")
    with pytest.raises(OutputExistsError, match="--force"):
        interop_text.import_hf(folder, out=out)
    assert out.read_bytes() == b"earlier"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InteropError, match="config.json"):
        interop_text.import_hf(empty, out=tmp_path / "x.pt")
    # Wrong model type.
    wrong = tmp_path / "wrong"
    hf.save_pretrained(wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(InteropError, match="model_type is 'bert'"):
        interop_text.import_hf(wrong, out=tmp_path / "x.pt")
    # Shapes that do not fit the config: every problem listed, nothing written.
    (wrong / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(InteropError, match=r"shape mismatch[\s\S]*fc1\.weight") as e:
        interop_text.import_hf(wrong, out=tmp_path / "x.pt")
    assert "nothing was written" in str(e.value) and not (tmp_path / "x.pt").exists()
    # Distinct token-type rows cannot be folded into the positions.
    two = Data2VecTextModel(hf_cfg(type_vocab_size=2))
    randomize(two).save_pretrained(tmp_path / "types")
    with pytest.raises(InteropError, match="2 different token-type embeddings"):
        interop_text.import_hf(tmp_path / "types", out=tmp_path / "x.pt")
    # A damaged tokenizer file.
    broken = tmp_path / "broken"
    hf.save_pretrained(broken)
    bpe_files(broken)
    (broken / "vocab.json").write_text("{not json")
    with pytest.raises(InteropError, match="vocab.json cannot be read"):
        interop_text.import_hf(broken, out=tmp_path / "x.pt")
    # A pickled pytorch_model.bin that needs code to load is refused without --trust-checkpoint.
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(cfg))
    torch.save({**hf.state_dict(), "args": argparse.Namespace(x=1)}, pickled / "pytorch_model.bin")
    with pytest.raises(ck.CheckpointError, match="--trust-checkpoint"):
        interop_text.import_hf(pickled, out=tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_export_refuses_a_foreign_tokenizer_and_a_non_empty_folder(tmp_path, spm_model):
    our_checkpoint(tmp_path / "m.pt", "text-pretrain", spm_model)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("mine")
    with pytest.raises(OutputExistsError):
        interop_text.export_hf(tmp_path / "m.pt", tmp_path / "out")
    assert (tmp_path / "out" / "config.json").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "c.txt").write_text("\n".join(SENTENCES * 5))
    spm.SentencePieceTrainer.train(input=str(other / "c.txt"), model_prefix=str(other / "o"), vocab_size=30,
                                   bos_id=0, pad_id=1, eos_id=2, unk_id=3, minloglevel=2, num_threads=1)
    with pytest.raises(InteropError, match="not the model's tokenizer"):
        interop_text.export_hf(tmp_path / "m.pt", tmp_path / "out2", tokenizer=other / "o.model")
    assert not (tmp_path / "out2").exists()


def test_a_forced_import_into_a_run_replaces_the_whole_run(hf_pretrained, tmp_path):
    folder, _ = hf_pretrained
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    last = run / ck.LAST
    interop_text.import_hf(folder, out=last)
    # The run had trained on: its best.pt would otherwise win over the newly imported last.pt.
    for name in (ck.BEST, "step-100.pt"):
        (run / name).write_bytes(last.read_bytes())
    result = interop_text.import_hf(folder, out=last, force=True)
    assert last.exists() and not (run / ck.BEST).exists() and not (run / "step-100.pt").exists()
    assert any("removed" in n and ck.BEST in n for n in result.notes)
