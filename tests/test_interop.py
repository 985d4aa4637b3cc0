"""Import/export (d2vcli/interop.py): fairseq .pt and Hugging Face folders in, HF folders out, with
outputs equal to HF transformers' Data2VecAudio and no half-loaded models.

The fairseq files are synthesized from an HF model with the key layout documented in
docs/checkpoints.md (a table written out here independently of interop's), since real
fairseq checkpoints cannot be downloaded in tests.

Run: python -m pytest -q tests/test_interop.py
"""

import argparse
import json
import re

import pytest
import torch
from typer.testing import CliRunner

from d2vcli import checkpoint as ck
from d2vcli import config as cfgmod
from d2vcli.cli import app
from d2vcli.interop import InteropError, export_hf, import_fairseq, import_hf, parse_conv_layers
from d2vcli.models.loading import build_model, load_ctc_model
from d2vcli.vocab import Vocab
from d2vcli.workspace import Workspace

transformers = pytest.importorskip("transformers")
TOL = dict(atol=1e-5, rtol=1e-4)
LETTERS = list("|ETAONIHSRDLUMWCFGYPBVK'XJQZ")

# docs/checkpoints.md, HF (Model-relative) -> fairseq (pretrained-relative).
HF_TO_FAIRSEQ = [
    (r"^feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
    (r"^feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", r"feature_extractor.conv_layers.\1.2.1."),
    (r"^feature_projection\.layer_norm\.", "layer_norm."),
    (r"^feature_projection\.projection\.", "post_extract_proj."),
    (r"^masked_spec_embed$", "mask_emb"),
    (r"^encoder\.pos_conv_embed\.layers\.(\d+)\.conv\.", r"encoder.pos_conv.\1.0."),
    (r"^encoder\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
    (r"^encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
    (r"^encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.layers.\1.fc1."),
    (r"^encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
]
FAIRSEQ_ARCH = {
    "_name": "data2vec_audio", "extractor_mode": "layer_norm", "conv_feature_layers": "[(32, 10, 5)] + [(32, 3, 2)] * 2",
    "conv_bias": False, "encoder_layers": 3, "encoder_embed_dim": 64, "encoder_ffn_embed_dim": 128,
    "encoder_attention_heads": 4, "activation_fn": "gelu", "layer_norm_first": False, "conv_pos": 95,
    "pos_conv_depth": 5, "conv_pos_groups": 16, "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0,
    "dropout_input": 0.0, "encoder_layerdrop": 0.05, "feature_grad_mult": 1.0, "mask_prob": 0.65,
}


def to_fairseq(hf_state: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in hf_state.items():
        key = key.removeprefix("data2vec_audio.")
        if key.startswith("lm_head."):
            out["w2v_encoder.proj." + key.split(".")[-1]] = value.clone()
            continue
        for pattern, repl in HF_TO_FAIRSEQ:
            key = re.sub(pattern, repl, key)
        out[prefix + key] = value.clone()
    return out


def sample_batch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7000, generator=g)
    pad = torch.arange(7000)[None, :] >= torch.tensor([7000, 4100, 6500])[:, None]
    return x.masked_fill(pad, 0.0), pad


def load_d2v(path):
    state = ck.load_checkpoint(path)
    model = build_model(state[ck.KIND_KEY], state[ck.ARCH_KEY], 4 + len(state.get(ck.VOCAB_KEY, [])))
    model.load_state_dict(state[ck.MODEL_KEY], strict=True)
    return state, model.eval()


def compare_ctc(ours, hf, padded):
    x, pad = sample_batch()
    pad = pad if padded else None
    with torch.inference_mode():
        out = ours(x, pad)
        ref = hf(x, attention_mask=None if pad is None else (~pad).long(), output_hidden_states=True)
        hidden = ours.backbone(x, pad)["x"]
    valid = torch.ones(out["logits"].shape[:2], dtype=torch.bool) if out["padding_mask"] is None \
        else ~out["padding_mask"]
    assert padded == (out["padding_mask"] is not None)
    torch.testing.assert_close(out["logits"][valid], ref.logits[valid], **TOL)
    torch.testing.assert_close(hidden[valid], ref.hidden_states[-1][valid], **TOL)


@pytest.fixture(scope="module")
def hf_folder(hf_tiny_ctc, tmp_path_factory):
    """A save_pretrained folder as on the Hub: vocab.json with HF's <pad>/<s> naming, a preprocessor
    config, and the wav2vec2 leftovers some data2vec configs carry (which must be ignored)."""
    folder = tmp_path_factory.mktemp("hf") / "d2v-audio-tiny-ctc"
    hf_tiny_ctc.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(do_stable_layer_norm=True, feat_extract_norm="group")
    (folder / "config.json").write_text(json.dumps(cfg))
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + LETTERS)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "preprocessor_config.json").write_text(json.dumps({"do_normalize": True, "sampling_rate": 16000}))
    return folder


@pytest.fixture(scope="module")
def imported_ctc(hf_folder, tmp_path_factory):
    return import_hf(hf_folder, out=tmp_path_factory.mktemp("imp") / "runs" / "x" / "last.pt")


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_import_hf_ctc_matches_hf(imported_ctc, hf_tiny_ctc, padded):
    state, ours = load_d2v(imported_ctc.path)
    compare_ctc(ours, hf_tiny_ctc, padded)


def test_imported_checkpoint_is_an_ordinary_d2v_checkpoint(imported_ctc):
    state = ck.load_checkpoint(imported_ctc.path, expect_kind="ctc")
    assert state[ck.VOCAB_KEY] == LETTERS  # ids 4.. in order; 0 stays the blank
    assert Vocab(tuple(state[ck.VOCAB_KEY])).index("E") == 5
    assert state[ck.NORMALIZE_KEY] is True
    cfg = cfgmod.from_dict(state[ck.CONFIG_KEY])
    assert cfg.data.normalize is True
    assert cfgmod.to_dict(cfg.model) == state[ck.ARCH_KEY]
    arch = cfgmod.from_dict(state[ck.ARCH_KEY], cfgmod.ModelConfig)
    # the naming trap: data2vec-audio's num_conv_pos_embeddings is the layer count, not the kernel
    assert (arch.pos_conv_depth, arch.pos_conv_kernel, arch.pos_conv_groups) == (5, 19, 16)
    # the loader decode/evaluate/transcribe use takes it as is
    model, vocab, normalize, _ = load_ctc_model(imported_ctc.path)
    assert len(vocab) == 32 and normalize is True and not model.training


def test_export_loads_in_transformers_with_the_same_outputs(imported_ctc, hf_tiny_ctc, tmp_path):
    written = export_hf(imported_ctc.path, tmp_path / "out")
    names = {p.name for p in written}
    assert {"config.json", "model.safetensors", "vocab.json", "preprocessor_config.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= names
    from safetensors import safe_open

    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    hf, info = transformers.Data2VecAudioForCTC.from_pretrained(tmp_path / "out", output_loading_info=True,
                                                                attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _, ours = load_d2v(imported_ctc.path)
    compare_ctc(ours, hf.eval(), padded=True)
    # HF -> d2v -> HF: identical tensors under identical names
    original, exported = hf_tiny_ctc.state_dict(), hf.state_dict()
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)
    # the tokenizer and feature extractor read the side files: id 0 is the blank (HF calls it <pad>)
    processor = transformers.Wav2Vec2Processor.from_pretrained(tmp_path / "out")
    assert processor.tokenizer.pad_token_id == 0 and hf.config.pad_token_id == 0
    assert processor.tokenizer.decode([7, 9, 9, 0, 4, 5]) == "AN E"  # blank and repeats collapse, | is a space
    assert processor.feature_extractor.do_normalize is True


def test_headless_model_round_trip(hf_tiny_ctc, tmp_path):
    torch.manual_seed(0)
    model = transformers.Data2VecAudioModel(hf_tiny_ctc.config).eval()
    model.save_pretrained(tmp_path / "hf")
    result = import_hf(tmp_path / "hf", out=tmp_path / "ck" / "last.pt")
    assert result.kind == "pretrain"
    state, ours = load_d2v(result.path)
    assert set(state[ck.TEACHER_KEY]) == {k.removeprefix("backbone.transformer.") for k in state[ck.MODEL_KEY]
                                          if k.startswith("backbone.transformer.")}
    x, pad = sample_batch()
    with torch.inference_mode():
        ref = model(x, attention_mask=(~pad).long()).last_hidden_state
        out = ours.backbone(x, pad)
    valid = ~out["padding_mask"]
    torch.testing.assert_close(out["x"][valid], ref[valid], **TOL)
    export_hf(result.path, tmp_path / "out")
    back, info = transformers.Data2VecAudioModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.state_dict().keys() == back.state_dict().keys()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def fairseq_ctc_file(hf_model, path, extra=None, drop=None, args=None):
    sd = to_fairseq(hf_model.state_dict(), prefix="w2v_encoder.w2v_model.")
    for k in drop or ():
        del sd[k]
    sd.update(extra or {})
    cfg = {"model": {"_name": "wav2vec_ctc", "final_dropout": 0.0, "layerdrop": 0.1, "mask_prob": 0.5,
                     "w2v_args": {"model": FAIRSEQ_ARCH, "task": {"_name": "audio_pretraining", "normalize": True}}},
           "task": {"_name": "audio_finetuning", "normalize": True, "labels": "ltr"}}
    torch.save({"args": args, "cfg": cfg, "model": sd, "criterion": None, "optimizer_history": [],
                "extra_state": {"previous_training_time": 1.0}}, path)
    return path


@pytest.fixture(scope="module")
def fairseq_ctc_import(hf_tiny_ctc, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fairseq")
    pt = fairseq_ctc_file(hf_tiny_ctc, tmp / "audio_tiny_ft.pt")
    Vocab(tuple(LETTERS)).save(tmp / "dict.ltr.txt")
    result = import_fairseq(pt, dict_path=tmp / "dict.ltr.txt", workspace=Workspace.resolve(tmp / "ws"))
    # placed as a run of the workspace, so `--init imported-audio_tiny_ft` / decode by run name find it
    assert result.path == tmp / "ws" / "runs" / "imported-audio_tiny_ft" / "last.pt"
    assert ck.find_checkpoint(Workspace.resolve(tmp / "ws"), "imported-audio_tiny_ft") == result.path
    assert (result.path.parent / "config.yaml").exists()
    return result


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_import_fairseq_ctc_matches_hf(fairseq_ctc_import, hf_tiny_ctc, padded):
    state, ours = load_d2v(fairseq_ctc_import.path)
    assert state[ck.KIND_KEY] == "ctc" and state[ck.NORMALIZE_KEY] is True
    assert state[ck.ARCH_KEY]["layerdrop"] == 0.1  # the fine-tuning override, as fairseq applies it
    compare_ctc(ours, hf_tiny_ctc, padded)


def test_import_fairseq_pretrained_with_ema(hf_tiny_ctc, tmp_path):
    hf = transformers.Data2VecAudioModel(hf_tiny_ctc.config).eval()
    hf.load_state_dict({k.removeprefix("data2vec_audio."): v for k, v in hf_tiny_ctc.state_dict().items()
                        if not k.startswith("lm_head.")})
    sd = to_fairseq(hf.state_dict())
    torch.manual_seed(3)
    sd["final_proj.0.weight"], sd["final_proj.0.bias"] = torch.randn(64, 64), torch.randn(64)
    # the EMA teacher: encoder-relative keys, slightly different values than the student
    ema = {k.removeprefix("encoder."): v + 0.01 * torch.randn_like(v) for k, v in sd.items() if k.startswith("encoder.")}
    sd["_ema"] = ema
    cfg = {"model": FAIRSEQ_ARCH, "task": {"_name": "audio_pretraining", "normalize": True}}
    torch.save({"args": None, "cfg": cfg, "model": sd}, tmp_path / "audio_tiny.pt")

    result = import_fairseq(tmp_path / "audio_tiny.pt", out=tmp_path / "pt" / "last.pt")
    state, ours = load_d2v(result.path)
    assert state[ck.KIND_KEY] == "pretrain"
    assert torch.equal(state[ck.MODEL_KEY]["final_proj.weight"], sd["final_proj.0.weight"])
    assert torch.equal(state[ck.TEACHER_KEY]["layers.2.fc1.weight"], ema["layers.2.fc1.weight"])
    assert torch.equal(state[ck.TEACHER_KEY]["pos_conv.blocks.4.conv.bias"], ema["pos_conv.4.0.bias"])
    x, pad = sample_batch()
    with torch.inference_mode():
        ref = hf(x, attention_mask=(~pad).long()).last_hidden_state
        out = ours.backbone(x, pad)
    valid = ~out["padding_mask"]
    torch.testing.assert_close(out["x"][valid], ref[valid], **TOL)
    # the teacher loads into a transformer as-is
    ours.backbone.transformer.load_state_dict(state[ck.TEACHER_KEY], strict=True)

    ema_result = import_fairseq(tmp_path / "audio_tiny.pt", out=tmp_path / "ema" / "last.pt", use_ema=True)
    ema_state = ck.load_checkpoint(ema_result.path)
    assert torch.equal(ema_state[ck.MODEL_KEY]["backbone.transformer.layers.0.fc2.weight"], ema["layers.0.fc2.weight"])
    assert torch.equal(ema_state[ck.MODEL_KEY]["backbone.feature_proj.weight"], sd["post_extract_proj.weight"])


def test_mismatches_are_reported_in_full_and_nothing_is_written(hf_tiny_ctc, tmp_path):
    pt = fairseq_ctc_file(hf_tiny_ctc, tmp_path / "bad.pt",
                          drop=["w2v_encoder.w2v_model.encoder.layers.1.fc1.bias"],
                          extra={"w2v_encoder.w2v_model.quantizer.vars": torch.zeros(3),
                                 "w2v_encoder.w2v_model.encoder.layers.0.fc2.bias": torch.zeros(7)})
    out = tmp_path / "never" / "last.pt"
    with pytest.raises(InteropError) as err:
        import_fairseq(pt, out=out)
    msg = str(err.value)
    assert "backbone.transformer.layers.1.fc1.bias" in msg  # missing
    assert "quantizer.vars" in msg  # unexpected
    assert "backbone.transformer.layers.0.fc2.bias: file (7,), model (64,)" in msg  # shape
    assert not out.exists() and not out.parent.exists()


def test_pickled_objects_need_trust_and_corrupt_files_are_clear(hf_tiny_ctc, tmp_path):
    pt = fairseq_ctc_file(hf_tiny_ctc, tmp_path / "old.pt", args=argparse.Namespace(arch="wav2vec_ctc"))
    with pytest.raises(ck.CheckpointError, match="--trust-checkpoint"):
        import_fairseq(pt, out=tmp_path / "a" / "last.pt")
    assert not (tmp_path / "a").exists()
    result = import_fairseq(pt, out=tmp_path / "b" / "last.pt", trust=True)
    assert result.kind == "ctc" and result.vocab_size == 32  # default: the LibriSpeech letters
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        import_fairseq(truncated, out=tmp_path / "c" / "last.pt")


def test_conv_feature_layers_are_parsed_without_eval(tmp_path):
    base = "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] + [(512,2,2)]"
    assert parse_conv_layers(base) == cfgmod.BASE_CONV_LAYERS
    marker = tmp_path / "pwned"
    for hostile in [f"__import__('pathlib').Path({str(marker)!r}).touch()", "[(1, 2, 3)] * 10 ** 9",
                    "[(1, 2, x)]", "[(1, 2)]", "[(512, 10, 5.0)]"]:
        with pytest.raises(InteropError, match="conv_feature_layers"):
            parse_conv_layers(hostile)
    assert not marker.exists()


def test_cli_import_and_export(hf_folder, tmp_path):
    runner = CliRunner()
    ws = tmp_path / "ws"
    res = runner.invoke(app, ["import", "hf", str(hf_folder), "-w", str(ws)])
    assert res.exit_code == 0, res.output
    assert "imported-d2v-audio-tiny-ctc" in res.output
    path = ck.find_checkpoint(Workspace.resolve(ws), "imported-d2v-audio-tiny-ctc")
    assert ck.load_checkpoint(path, expect_kind="ctc")
    res = runner.invoke(app, ["export", "hf", "imported-d2v-audio-tiny-ctc", str(tmp_path / "out"), "-w", str(ws)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "model.safetensors").exists()
    # a non-data2vec HF folder is refused with the reason
    cfg = json.loads((hf_folder / "config.json").read_text())
    (tmp_path / "w2v").mkdir()
    (tmp_path / "w2v" / "config.json").write_text(json.dumps({**cfg, "model_type": "wav2vec2"}))
    with pytest.raises(InteropError, match="data2vec-audio"):
        import_hf(tmp_path / "w2v", out=tmp_path / "w2v.pt")


# ----------------------------------------------------------------------------- fairseq data2vec 2.0 (data2vec_multi)

import torch.nn.functional as F  # noqa: E402

A2 = "modality_encoders.AUDIO."
CONV2 = [(32, 10, 5), (32, 3, 2), (32, 3, 2)]
D2, H2, G2, K2 = 32, 4, 4, 5  # width, heads, pos-conv groups, pos-conv kernel (conv_pos_width 10 // depth 2)
MULTI_ARCH = {
    "_name": "data2vec_multi", "depth": 2, "embed_dim": D2, "num_heads": H2, "mlp_ratio": 2.0, "norm_eps": 1e-5,
    "layer_norm_first": False, "encoder_dropout": 0.1, "post_mlp_drop": 0.1, "attention_dropout": 0.1,
    "activation_dropout": 0.0, "dropout_input": 0.0, "layerdrop": 0.05, "clone_batch": 8,
    "modalities": {"audio": {
        "feature_encoder_spec": "[(32, 10, 5)] + [(32, 3, 2)] * 2", "extractor_mode": "layer_norm",
        "conv_pos_depth": 2, "conv_pos_width": 10, "conv_pos_groups": G2, "prenet_depth": 1, "prenet_dropout": 0.1,
        "prenet_layerdrop": 0.05, "use_alibi_encoder": True, "learned_alibi_scale": True,
        "learned_alibi_scale_per_head": True, "mask_prob": 0.5, "mask_length": 5,
        "decoder": {"decoder_dim": 16, "decoder_groups": 4, "decoder_kernel": 3, "decoder_layers": 2,
                    "input_dropout": 0.1}}},
}


def multi_state(seed: int) -> dict:
    """A data2vec_multi state dict in the documented layout (docs/checkpoints.md), random values."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.2 * torch.randn(*shape, generator=g)  # noqa: E731
    sd, cin = {}, 1
    for i, (c, k, _) in enumerate(CONV2):
        sd[f"{A2}local_encoder.conv_layers.{i}.0.weight"] = r(c, cin, k)
        sd[f"{A2}local_encoder.conv_layers.{i}.2.1.weight"], sd[f"{A2}local_encoder.conv_layers.{i}.2.1.bias"] = \
            1 + r(c), r(c)
        cin = c
    sd[A2 + "project_features.1.weight"], sd[A2 + "project_features.1.bias"] = 1 + r(32), r(32)
    sd[A2 + "project_features.2.weight"], sd[A2 + "project_features.2.bias"] = r(D2, 32), r(D2)
    for n in (1, 2):  # index 0 of fairseq's Sequential is a TransposeLast
        sd[f"{A2}relative_positional_encoder.{n}.0.weight"] = r(D2, D2 // G2, K2)
        sd[f"{A2}relative_positional_encoder.{n}.0.bias"] = r(D2)
    sd[A2 + "alibi_scale"] = torch.tensor([1.5, 0.5, 1.0, 2.0]).view(1, 1, H2, 1, 1)
    sd[A2 + "context_encoder.norm.weight"], sd[A2 + "context_encoder.norm.bias"] = 1 + r(D2), r(D2)
    for block in [A2 + "context_encoder.blocks.0."] + [f"blocks.{i}." for i in range(2)]:
        for name, shape in (("attn.qkv", (3 * D2, D2)), ("attn.proj", (D2, D2)), ("mlp.fc1", (2 * D2, D2)),
                            ("mlp.fc2", (D2, 2 * D2))):
            sd[f"{block}{name}.weight"], sd[f"{block}{name}.bias"] = r(*shape), r(shape[0])
        for name in ("norm1", "norm2"):
            sd[f"{block}{name}.weight"], sd[f"{block}{name}.bias"] = 1 + r(D2), r(D2)
    sd[A2 + "decoder.blocks.0.0.weight"], sd[A2 + "decoder.blocks.0.0.bias"] = r(16, D2 // 4, 3), r(16)
    sd[A2 + "decoder.blocks.1.0.weight"], sd[A2 + "decoder.blocks.1.0.bias"] = r(16, 16 // 4, 3), r(16)
    sd[A2 + "decoder.proj.weight"], sd[A2 + "decoder.proj.bias"] = r(D2, 16), r(D2)
    return sd


def multi_reference(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """fairseq data2vec_multi's unmasked forward (features_only), written from its documented semantics:
    CNN -> LN + Linear -> x + posconv(x) -> symmetric ALiBi x clamped scale -> input LN -> post-LN AltBlocks."""
    h = x[:, None]
    for i, (c, _, s) in enumerate(CONV2):
        h = F.conv1d(h, sd[f"{A2}local_encoder.conv_layers.{i}.0.weight"], stride=s)
        h = F.layer_norm(h.transpose(1, 2), (c,), sd[f"{A2}local_encoder.conv_layers.{i}.2.1.weight"],
                         sd[f"{A2}local_encoder.conv_layers.{i}.2.1.bias"], 1e-5)
        h = F.gelu(h).transpose(1, 2)
    h = F.layer_norm(h.transpose(1, 2), (32,), sd[A2 + "project_features.1.weight"], sd[A2 + "project_features.1.bias"])
    h = F.linear(h, sd[A2 + "project_features.2.weight"], sd[A2 + "project_features.2.bias"])
    p = h.transpose(1, 2)
    for n in (1, 2):
        p = F.conv1d(p, sd[f"{A2}relative_positional_encoder.{n}.0.weight"],
                     sd[f"{A2}relative_positional_encoder.{n}.0.bias"], padding=K2 // 2, groups=G2)
        p = F.gelu(F.layer_norm(p.transpose(1, 2), (D2,), eps=1e-5)).transpose(1, 2)
    h = h + p.transpose(1, 2)
    B, T, _ = h.shape
    slopes = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])  # ALiBi for 4 heads
    pos = torch.arange(T)
    alibi = slopes[:, None, None] * -(pos[:, None] - pos[None, :]).abs().float()
    alibi = alibi * sd[A2 + "alibi_scale"].reshape(H2).clamp_min(0)[:, None, None]
    h = F.layer_norm(h, (D2,), sd[A2 + "context_encoder.norm.weight"], sd[A2 + "context_encoder.norm.bias"], 1e-5)
    for blk in [A2 + "context_encoder.blocks.0."] + [f"blocks.{i}." for i in range(2)]:
        qkv = F.linear(h, sd[blk + "attn.qkv.weight"], sd[blk + "attn.qkv.bias"])
        q, k, v = qkv.view(B, T, 3, H2, D2 // H2).permute(2, 0, 3, 1, 4)
        att = ((q * (D2 // H2) ** -0.5) @ k.transpose(-1, -2) + alibi).softmax(-1)
        a = (att @ v).transpose(1, 2).reshape(B, T, D2)
        h = F.layer_norm(h + F.linear(a, sd[blk + "attn.proj.weight"], sd[blk + "attn.proj.bias"]), (D2,),
                         sd[blk + "norm1.weight"], sd[blk + "norm1.bias"], 1e-5)
        m = F.linear(F.gelu(F.linear(h, sd[blk + "mlp.fc1.weight"], sd[blk + "mlp.fc1.bias"])),
                     sd[blk + "mlp.fc2.weight"], sd[blk + "mlp.fc2.bias"])
        h = F.layer_norm(h + m, (D2,), sd[blk + "norm2.weight"], sd[blk + "norm2.bias"], 1e-5)
    return h


def test_import_fairseq_2_0_pretrained_matches_the_reference_with_its_teacher(tmp_path):
    sd = multi_state(0)
    ema = {k: v + 0.01 for k, v in multi_state(1).items()
           if not k.startswith((A2 + "local_encoder", A2 + "project_features", A2 + "decoder"))}
    torch.save({"cfg": {"model": MULTI_ARCH, "task": {"_name": "audio_pretraining", "normalize": True}},
                "model": {**sd, "_ema": ema}}, tmp_path / "base_tiny.pt")
    result = import_fairseq(tmp_path / "base_tiny.pt", out=tmp_path / "pt" / "last.pt")
    state, ours = load_d2v(result.path)
    arch = cfgmod.from_dict(state[ck.ARCH_KEY], cfgmod.ModelConfig)
    assert state[ck.KIND_KEY] == "pretrain" and arch.version == 2 and arch.prenet_depth == 1
    assert (arch.decoder_dim, arch.decoder_layers, arch.decoder_kernel, arch.ffn_dim) == (16, 2, 3, 64)
    assert cfgmod.from_dict(state[ck.CONFIG_KEY]).masking.clone_batch == 8  # the 2.0 recipe's config
    x = torch.randn(2, 4000, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        torch.testing.assert_close(ours.backbone(x)["x"], multi_reference(sd, x), **TOL)
    teacher = state[ck.TEACHER_KEY]
    assert torch.equal(teacher["layers.1.self_attn.k_proj.weight"], ema["blocks.1.attn.qkv.weight"][D2:2 * D2])
    assert torch.equal(teacher["prenet.0.fc1.weight"], ema[A2 + "context_encoder.blocks.0.mlp.fc1.weight"])
    assert torch.equal(teacher["pos_conv.blocks.0.conv.bias"], ema[A2 + "relative_positional_encoder.1.0.bias"])
    assert torch.equal(teacher["alibi_scale"], ema[A2 + "alibi_scale"].reshape(H2))
    ours.backbone.encoder.load_state_dict(teacher, strict=True)  # the teacher is a ContextEncoder
    assert torch.equal(state[ck.MODEL_KEY]["decoder.blocks.1.conv.weight"], sd[A2 + "decoder.blocks.1.0.weight"])
    with pytest.raises(InteropError, match="ALiBi"):  # HF's Data2VecAudio would compute something else
        export_hf(result.path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_import_fairseq_2_0_fine_tuned_matches_the_reference(tmp_path):
    sd = {k: v for k, v in multi_state(2).items() if not k.startswith(A2 + "decoder")}
    sd = {"w2v_encoder.w2v_model." + k: v for k, v in sd.items()}
    sd["w2v_encoder.proj.weight"], sd["w2v_encoder.proj.bias"] = torch.randn(32, D2), torch.randn(32)
    cfg = {"model": {"_name": "wav2vec_ctc", "final_dropout": 0.0, "layerdrop": 0.1, "dropout": 0.0,
                     "w2v_args": {"model": MULTI_ARCH, "task": {"_name": "audio_pretraining", "normalize": True}}},
           "task": {"_name": "audio_finetuning", "normalize": True}}
    torch.save({"cfg": cfg, "model": sd}, tmp_path / "base_tiny_960h.pt")
    result = import_fairseq(tmp_path / "base_tiny_960h.pt", out=tmp_path / "ft" / "last.pt")
    state, ours = load_d2v(result.path)
    assert state[ck.KIND_KEY] == "ctc" and state[ck.ARCH_KEY]["version"] == 2
    assert state[ck.ARCH_KEY]["layerdrop"] == 0.1 and state[ck.ARCH_KEY]["dropout"] == 0.0  # fine-tuning overrides
    x = torch.randn(2, 4000, generator=torch.Generator().manual_seed(4))
    bare = {k.removeprefix("w2v_encoder.w2v_model."): v for k, v in sd.items()}
    with torch.inference_mode():
        ref = F.linear(multi_reference(bare, x), sd["w2v_encoder.proj.weight"], sd["w2v_encoder.proj.bias"])
        torch.testing.assert_close(ours(x)["logits"], ref, **TOL)
    model, vocab, _, _ = load_ctc_model(result.path)  # what decode / evaluate / transcribe load
    assert len(vocab) == 32 and type(model.backbone).__name__ == "Data2Vec2Audio"
