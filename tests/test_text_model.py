"""The text encoder and its heads against Hugging Face's Data2VecText*, on mapped weights.

A tiny random HF config (fairseq's eps 1e-5, one token type, 2 + max_positions position rows) is
built, its weights are copied into our modules by name, and the outputs must agree within 1e-5
on a padded batch: the final states, every layer's FFN output (captured by hooks on HF's
`output.dense`, the data2vec targets), and the classification / regression logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Data2VecTextConfig, Data2VecTextForSequenceClassification, Data2VecTextModel

from d2vcli import checkpoint as ckpt
from d2vcli.models.loading import build_text_model, load_model
from d2vcli.models.text import (Data2VecTextPretrainModel, TextClassifier, TextConfig, TextEncoder, make_positions,
                                text_tiny)

ATOL = 1e-5


def hf_key_map(num_layers: int, hf_prefix: str = "", ours_prefix: str = "") -> dict[str, str]:
    """Our encoder's parameter names -> HF `Data2VecTextModel`'s (the test's own small map;
    d2vcli/interop_text.py holds the real one)."""
    m = {
        "embed.embed_tokens.weight": "embeddings.word_embeddings.weight",
        "embed.embed_positions.weight": "embeddings.position_embeddings.weight",
        "embed.layernorm_embedding.weight": "embeddings.LayerNorm.weight",
        "embed.layernorm_embedding.bias": "embeddings.LayerNorm.bias",
    }
    layer = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
             "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
             "self_attn_norm": "attention.output.LayerNorm", "fc1": "intermediate.dense", "fc2": "output.dense",
             "final_norm": "output.LayerNorm"}
    for i in range(num_layers):
        for ours, hf in layer.items():
            for p in ("weight", "bias"):
                m[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{hf}.{p}"
    return {ours_prefix + k: hf_prefix + v for k, v in m.items()}


def hf_config(cfg: TextConfig, **kw) -> Data2VecTextConfig:
    return Data2VecTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.ffn_dim, hidden_act="gelu",
        max_position_embeddings=cfg.position_rows, layer_norm_eps=cfg.layer_norm_eps, type_vocab_size=1,
        pad_token_id=cfg.pad_id, bos_token_id=0, eos_token_id=2, hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout, attn_implementation="eager", **kw)


def copy_from_hf(ours: torch.nn.Module, hf_state: dict, key_map: dict[str, str]) -> None:
    state = ours.state_dict()
    assert set(key_map) <= set(state)
    missing = [k for k in state if k not in key_map]
    assert not missing, missing
    ours.load_state_dict({k: hf_state[v] for k, v in key_map.items()})


def tiny() -> TextConfig:
    return text_tiny(vocab_size=50)


def padded_batch(cfg: TextConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = [12, 7, 3]
    tokens = torch.full((len(lengths), max(lengths)), cfg.pad_id, dtype=torch.long)
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.randint(4, cfg.vocab_size, (n,), generator=g)
        tokens[b, 0], tokens[b, n - 1] = 0, 2  # <s> ... </s>
    return tokens, tokens.eq(cfg.pad_id)


def hf_ffn_outputs(hf: torch.nn.Module) -> tuple[list, list]:
    outs = []
    handles = [layer.output.dense.register_forward_hook(lambda m, i, o: outs.append(o))
               for layer in hf.encoder.layer]
    return outs, handles


def test_positions_start_after_pad_and_skip_pads():
    tokens = torch.tensor([[0, 7, 8, 2, 1, 1], [0, 2, 1, 1, 1, 1]])
    assert make_positions(tokens, pad_id=1).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 1, 1, 1, 1]]
    assert TextEncoder(text_base_small()).embed.embed_positions.num_embeddings == 16 + 2


def text_base_small() -> TextConfig:
    return TextConfig(vocab_size=30, mask_id=29, max_positions=16, embed_dim=32, num_layers=1, num_heads=2, ffn_dim=64)


def test_encoder_equals_hf_data2vec_text_model_on_a_padded_batch():
    torch.manual_seed(0)
    cfg = tiny()
    hf = Data2VecTextModel(hf_config(cfg), add_pooling_layer=False).eval()
    with torch.no_grad():  # random LN affine and token-type row 0 = 0, so every mapped tensor matters
        for name, p in hf.named_parameters():
            if "LayerNorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
        hf.embeddings.token_type_embeddings.weight.zero_()
    ours = TextEncoder(cfg).eval()
    copy_from_hf(ours, hf.state_dict(), hf_key_map(cfg.num_layers))
    tokens, padding_mask = padded_batch(cfg)
    ffn, handles = hf_ffn_outputs(hf)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=(~padding_mask).long()).last_hidden_state
        out = ours(tokens, padding_mask)
    for h in handles:
        h.remove()
    real = ~padding_mask  # pads are zeroed before our layers (fairseq) and never attended to by either
    assert out.padding_mask is not None and torch.equal(out.padding_mask, padding_mask)
    torch.testing.assert_close(out.x[real], ref[real], atol=ATOL, rtol=0)
    assert len(out.layer_results) == cfg.num_layers == len(ffn)
    for ours_layer, hf_layer in zip(out.layer_results, ffn):
        torch.testing.assert_close(ours_layer[real], hf_layer[real], atol=ATOL, rtol=0)
    # No padding_mask given: it is taken from the pad tokens, as fairseq does.
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).x[real], out.x[real], atol=0, rtol=0)


def test_mask_replaces_tokens_by_mask_id_before_embedding():
    torch.manual_seed(0)
    cfg = tiny()
    enc = TextEncoder(cfg).eval()
    tokens, padding_mask = padded_batch(cfg)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[0, 2:6] = True
    with torch.no_grad():
        a = enc(tokens, padding_mask, mask).x
        b = enc(tokens.masked_fill(mask, cfg.mask_id), padding_mask).x
        c = enc(tokens, padding_mask).x
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a[0], c[0])


@pytest.mark.parametrize("num_labels", [3, 1], ids=["classification", "regression"])
def test_classifier_logits_equal_hf_sequence_classification(num_labels):
    torch.manual_seed(1)
    cfg = tiny()
    hf = Data2VecTextForSequenceClassification(hf_config(cfg, num_labels=num_labels)).eval()
    with torch.no_grad():
        hf.data2vec_text.embeddings.token_type_embeddings.weight.zero_()
    ours = TextClassifier(cfg, num_labels).eval()
    key_map = hf_key_map(cfg.num_layers, hf_prefix="data2vec_text.", ours_prefix="encoder.")
    for part in ("dense", "out_proj"):
        for p in ("weight", "bias"):
            key_map[f"classifier.{part}.{p}"] = f"classifier.{part}.{p}"
    copy_from_hf(ours, hf.state_dict(), key_map)
    tokens, padding_mask = padded_batch(cfg, seed=3)
    with torch.no_grad():
        ref = hf(input_ids=tokens, attention_mask=(~padding_mask).long()).logits
        logits = ours(tokens, padding_mask)
    assert logits.shape == (3, num_labels)
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=0)


def test_pretrain_model_predicts_every_position_with_the_regression_head():
    torch.manual_seed(0)
    cfg = tiny()
    model = Data2VecTextPretrainModel(cfg).eval()
    tokens, padding_mask = padded_batch(cfg)
    with torch.no_grad():
        pred = model(tokens, padding_mask)
        x = model.encoder(tokens, padding_mask).x
        head = model.regression_head
        direct = head[2](torch.nn.functional.gelu(head[0](x)))
    assert pred.shape == (3, 12, cfg.embed_dim)
    torch.testing.assert_close(pred, direct)
    keys = set(model.state_dict())
    assert {"regression_head.0.weight", "regression_head.2.weight"} <= keys
    assert head[0].out_features == 2 * cfg.embed_dim


def test_bert_init_and_zero_pad_rows():
    torch.manual_seed(0)
    cfg = TextConfig(vocab_size=4000, mask_id=3999, max_positions=512, embed_dim=64, num_layers=2, num_heads=4,
                     ffn_dim=256)
    enc = TextEncoder(cfg)
    for emb in (enc.embed.embed_tokens, enc.embed.embed_positions):
        w = emb.weight.detach()
        assert torch.count_nonzero(w[cfg.pad_id]) == 0
        assert abs(w.std().item() - 0.02) < 0.002  # N(0, 0.02), not PyTorch's N(0, 1)
    assert abs(enc.layers[0].fc1.weight.std().item() - 0.02) < 0.002


def test_bad_architecture_and_too_long_input_are_clear_errors():
    with pytest.raises(ValueError, match="mask_id"):
        TextConfig(vocab_size=10, mask_id=10).validate()
    with pytest.raises(ValueError, match="divisible"):
        TextConfig(embed_dim=30, num_heads=4).validate()
    enc = TextEncoder(text_base_small())
    with pytest.raises(ValueError, match="max_positions"):
        enc(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("kind", ["text-pretrain", "text-cls"])
def test_text_checkpoint_kinds_round_trip_through_load_model(tmp_path, kind):
    torch.manual_seed(0)
    cfg = tiny()
    classes = ["no", "yes"] if kind == "text-cls" else None
    model = build_text_model(kind, cfg, num_classes=len(classes or []))
    extra = {"classes": classes, "task": {"name": "toy", "kind": "classification", "num_classes": 2,
                                          "metric": "acc"}} if classes else {}
    state = ckpt.make_state(kind, config={}, arch=dataclasses.asdict(cfg), normalize=False,
                            model=model.state_dict(), **extra)
    ckpt.save_checkpoint(tmp_path / "m.pt", state)
    loaded = load_model(tmp_path / "m.pt", expect_kind=kind)
    assert loaded.kind == kind and loaded.classes == classes
    tokens, padding_mask = padded_batch(cfg)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens, padding_mask), model(tokens, padding_mask), atol=0, rtol=0)
    bad = dict(state, arch=dict(state["arch"], colour="red"))
    ckpt.save_checkpoint(tmp_path / "bad.pt", bad)
    with pytest.raises(ckpt.CheckpointError, match="unknown fields"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(ckpt.CheckpointError, match="text classifier" if classes else "text model"):
        load_model(tmp_path / "m.pt", expect_kind="text-cls" if kind == "text-pretrain" else "text-pretrain")
