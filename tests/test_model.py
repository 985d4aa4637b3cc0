"""The data2vec audio model (d2vcli/models/): parity with HF transformers' Data2VecAudio and the
behaviours pretraining and fine-tuning rely on (targets, masking, padding, LayerDrop, CTC blanks).

Run: python -m pytest -q tests/test_model.py
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from d2vcli import config as cfgmod
from d2vcli.interop import HF_CTC_MAP, model_config_from_hf, rename
from d2vcli.manifest import num_frames
from d2vcli.models.audio import (Data2VecAudio, Data2VecForCTC, Data2VecForPretraining, build_backbone,
                          parameter_count)

TOL = dict(atol=1e-5, rtol=1e-4)


def tiny_backbone(**kw) -> Data2VecAudio:
    args = dict(conv_layers=((32, 10, 5), (32, 3, 2), (32, 3, 2)), embed_dim=64, num_layers=3, num_heads=4,
                ffn_dim=128, dropout=0.0, attention_dropout=0.0, layerdrop=0.0, pos_conv_depth=5,
                pos_conv_kernel=19, pos_conv_groups=16)
    args.update(kw)
    return Data2VecAudio(**args)


@pytest.fixture(scope="module")
def ours_and_hf(hf_tiny_ctc):
    """Our CTC model holding the HF model's weights (mapped with interop's key table)."""
    arch = model_config_from_hf(hf_tiny_ctc.config.to_dict(), "hf")
    model = Data2VecForCTC(build_backbone(arch), hf_tiny_ctc.config.vocab_size).eval()
    state, unmatched = rename(hf_tiny_ctc.state_dict(), HF_CTC_MAP.to_d2v)
    assert unmatched == []
    model.load_state_dict(state, strict=True)
    return model, hf_tiny_ctc


def batch(lengths, total=None, seed=0):
    """Waveforms (B, S) with zeroed padding and the sample padding mask (True = padding)."""
    g = torch.Generator().manual_seed(seed)
    total = total or max(lengths)
    x = torch.randn(len(lengths), total, generator=g)
    pad = torch.arange(total)[None, :] >= torch.tensor(lengths)[:, None]
    return x.masked_fill(pad, 0.0), pad


def run_both(model, hf, x, pad):
    """Our outputs and HF's, with per-layer outputs and FFN outputs captured by hooks on both."""
    ours_layers, hf_ffn = [], []
    transformer = model.backbone.transformer
    hooks = [transformer.norm.register_forward_hook(lambda m, i, o: ours_layers.append(o))]
    hooks += [layer.register_forward_hook(lambda m, i, o: ours_layers.append(o[0])) for layer in transformer.layers]
    hooks += [layer.feed_forward.register_forward_hook(lambda m, i, o: hf_ffn.append(o))
              for layer in hf.data2vec_audio.encoder.layers]
    try:
        with torch.inference_mode():
            out = model.backbone(x, pad, return_layer_results=True)
            ref = hf(x, attention_mask=None if pad is None else (~pad).long(), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    with torch.inference_mode():
        logits = model(x, pad)["logits"]
    return out, logits, ours_layers, ref, hf_ffn


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_matches_hf(ours_and_hf, padded):
    model, hf = ours_and_hf
    x, pad = batch([8000, 5300, 8000] if padded else [8000, 8000])
    out, logits, layers, ref, hf_ffn = run_both(model, hf, x, pad if padded else None)
    frame_pad = out["padding_mask"]
    if padded:
        hf_valid = hf.data2vec_audio._get_feature_vector_attention_mask(logits.shape[1], (~pad).long()).bool()
        assert torch.equal(~frame_pad, hf_valid)
        assert frame_pad[1].logical_not().sum() == num_frames(5300, ((32, 10, 5), (32, 3, 2), (32, 3, 2)))
    else:
        assert frame_pad is None
    valid = torch.ones(logits.shape[:2], dtype=torch.bool) if frame_pad is None else ~frame_pad
    # every hidden state: [0] encoder input after LayerNorm, [i] output of layer i, [-1] last_hidden_state
    assert len(layers) == len(ref.hidden_states) == 4
    for ours_h, hf_h in zip(layers, ref.hidden_states):
        torch.testing.assert_close(ours_h[valid], hf_h[valid], **TOL)
    torch.testing.assert_close(out["x"][valid], ref.hidden_states[-1][valid], **TOL)
    torch.testing.assert_close(logits[valid], ref.logits[valid], **TOL)
    # The data2vec targets: each layer's FFN output before residual and LayerNorm.
    assert len(out["layer_results"]) == len(hf_ffn) == 3
    for ours_f, hf_f in zip(out["layer_results"], hf_ffn):
        torch.testing.assert_close(ours_f[valid], hf_f[valid], **TOL)


def test_conv_encoder_gradients_match_hf(ours_and_hf):
    """The conv feature encoder's weight and LayerNorm gradients equal HF's: ours runs the first block as
    a matmul over waveform windows and the rest channels-last, for speed; training relies on the same
    gradients as a plain Conv1d stack."""
    model, hf = ours_and_hf
    ours_fe, hf_fe = copy.deepcopy(model.backbone.feature_extractor), copy.deepcopy(hf.data2vec_audio.feature_extractor)
    x, _ = batch([8000, 8000])
    ours_out = ours_fe(x)  # (B, T, C)
    cotangent = torch.randn(ours_out.shape, generator=torch.Generator().manual_seed(1))
    ours_out.backward(cotangent)
    hf_fe._requires_grad = True
    hf_out = hf_fe(x)  # (B, C, T)
    torch.testing.assert_close(ours_out, hf_out.transpose(1, 2), **TOL)
    hf_out.backward(cotangent.transpose(1, 2))
    for ours_block, hf_layer in zip(ours_fe.blocks, hf_fe.conv_layers):
        pairs = ((ours_block.conv.weight, hf_layer.conv.weight), (ours_block.norm.weight, hf_layer.layer_norm.weight),
                 (ours_block.norm.bias, hf_layer.layer_norm.bias))
        for ours_p, hf_p in pairs:
            torch.testing.assert_close(ours_p.grad, hf_p.grad, atol=1e-4, rtol=1e-4)


def test_layer_results_are_the_ffn_output_before_residual_and_norm(ours_and_hf):
    model, _ = ours_and_hf
    x, _ = batch([4000, 4000], seed=3)
    captured = []
    layer = model.backbone.transformer.layers[1]
    hook = layer.self_attn_norm.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.inference_mode():
        out = model.backbone(x, return_layer_results=True)
    hook.remove()
    h = captured[0]
    with torch.inference_mode():
        expected_ffn = layer.fc2(F.gelu(layer.fc1(h)))
        torch.testing.assert_close(out["layer_results"][1], expected_ffn)
        # and the layer output is LN(h + ffn), so the target is not the residual stream
        rerun = model.backbone.transformer(out["features"], None, return_layer_results=True)[1]
    assert len(out["layer_results"]) == 3
    for a, b in zip(out["layer_results"], rerun):
        assert torch.equal(a, b)


def test_padding_invariance_where_it_holds():
    torch.manual_seed(0)
    x, pad = batch([6000, 3500], seed=1)
    # An unpadded row does not depend on its batch neighbours' padding.
    model = tiny_backbone().eval()
    with torch.inference_mode():
        both = model(x, pad)["x"]
        alone = model(x[:1], None)["x"]
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=1e-4)
    # With one positional conv layer a padded row equals the clip run alone; with 5 layers it does
    # not (padding is zeroed only before the first one, as in fairseq and HF: transformers#25621).
    shallow = tiny_backbone(pos_conv_depth=1).eval()
    with torch.inference_mode():
        out = shallow(x, pad)
        alone = shallow(x[1:, :3500], None)["x"]
        valid = ~out["padding_mask"][1]
    torch.testing.assert_close(out["x"][1][valid], alone[0], atol=1e-5, rtol=1e-4)


def test_layerdrop_only_in_training():
    torch.manual_seed(0)
    model = tiny_backbone(layerdrop=1.0)  # U[0, 1) <= 1 always: every layer is skipped in training
    x, _ = batch([4000, 4000])
    with torch.no_grad():
        model.train()
        trained = model(x, return_layer_results=True)
        model.eval()
        a = model(x, return_layer_results=True)
        b = model(x, return_layer_results=True)
    assert trained["layer_results"] == []
    assert len(a["layer_results"]) == 3
    assert torch.equal(a["x"], b["x"])
    # The EMA teacher is a deepcopy of the transformer and runs in eval mode: no layer is dropped.
    teacher = copy.deepcopy(model.transformer).eval()
    with torch.no_grad():
        _, results = teacher(a["features"], None, return_layer_results=True)
    assert len(results) == 3


def test_mask_emb_replaces_masked_frames_and_features_stay_unmasked():
    torch.manual_seed(0)
    model = tiny_backbone().eval()
    x, _ = batch([4000, 4000])
    with torch.no_grad():
        features, _ = model.extract_features(x)
    T = features.shape[1]
    time_mask = torch.zeros(2, T, dtype=torch.bool)
    time_mask[0, 5:15] = True
    time_mask[1, 30:33] = True
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(x, time_mask=time_mask)
    hook.remove()
    inp = seen[0]
    assert torch.equal(inp[time_mask], model.mask_emb.detach().expand(int(time_mask.sum()), -1))
    assert torch.equal(inp[~time_mask], features[~time_mask])
    assert torch.equal(out["features"], features)  # the teacher's input is not overwritten
    assert (0 <= model.mask_emb).all() and (model.mask_emb < 1).all()  # uniform [0, 1) init


def test_mask_emb_receives_gradient():
    torch.manual_seed(0)
    model = Data2VecForPretraining(tiny_backbone())
    x, _ = batch([4000, 4000])
    time_mask = torch.zeros(2, 12, dtype=torch.bool)
    T = model.backbone.num_frames(torch.tensor(4000)).item()
    time_mask = torch.zeros(2, T, dtype=torch.bool)
    time_mask[:, 3:9] = True
    out = model(x, time_mask=time_mask)
    assert out["pred"].shape == (12, 64)  # final_proj at the masked frames only
    out["pred"].square().mean().backward()
    assert model.backbone.mask_emb.grad is not None and model.backbone.mask_emb.grad.abs().sum() > 0


def test_channel_mask_zeroes_channels_in_every_frame():
    torch.manual_seed(0)
    model = tiny_backbone().eval()
    x, _ = batch([4000, 4000])
    channel_mask = torch.zeros(2, 64, dtype=torch.bool)
    channel_mask[0, :8] = True
    channel_mask[1, 40:60] = True
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x, channel_mask=channel_mask)
    hook.remove()
    inp = seen[0]
    assert (inp[0][:, :8] == 0).all() and (inp[1][:, 40:60] == 0).all()
    assert (inp[0][:, 8:] != 0).any(dim=0).all()


def test_ctc_padded_frames_are_forced_to_blank_and_the_loss_stays_finite():
    torch.manual_seed(0)
    model = Data2VecForCTC(tiny_backbone(), vocab_size=10)
    x, pad = batch([6000, 3000])
    out = model(x, pad)
    logits, frame_pad = out["logits"], out["padding_mask"]
    padded = logits[1][frame_pad[1]]
    assert len(padded) > 0
    assert (padded[:, 0] == 0).all() and torch.isneginf(padded[:, 1:]).all()
    assert torch.isfinite(logits[~frame_pad]).all()
    lprobs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
    lengths = (~frame_pad).sum(-1)
    targets = torch.tensor([[4, 5, 6, 4], [7, 8, 0, 0]])
    loss = F.ctc_loss(lprobs, targets, lengths, torch.tensor([4, 2]), blank=0, reduction="sum", zero_infinity=True)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.proj.bias.abs().sum() == 0  # CTC head: xavier weights, zero bias


def test_conv_layernorm_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = tiny_backbone().eval()
    norm = model.feature_extractor.blocks[1].norm
    seen = []
    hook = norm.register_forward_hook(lambda m, i, o: seen.append((i[0], o)))
    x, _ = batch([4000])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    hook.remove()
    inp, result = seen[0]
    assert inp.dtype == torch.bfloat16 and result.dtype == torch.bfloat16
    fp32 = F.layer_norm(inp.float(), norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    assert torch.equal(result, fp32.to(torch.bfloat16))  # normalized in fp32, then cast back
    assert torch.isfinite(out["x"]).all()


def test_feature_grad_mult_scales_or_freezes_the_conv_encoder():
    x, _ = batch([4000, 4000])

    def conv_grad(mult):
        torch.manual_seed(0)
        model = tiny_backbone(feature_grad_mult=mult)
        model(x)["x"].sum().backward()
        return model.feature_extractor.blocks[0].conv.weight.grad, model.feature_proj.weight.grad

    full, proj_full = conv_grad(1.0)
    half, proj_half = conv_grad(0.5)
    frozen, proj_frozen = conv_grad(0.0)
    torch.testing.assert_close(half, 0.5 * full)
    torch.testing.assert_close(proj_half, proj_full)  # only the conv encoder's gradient is scaled
    assert frozen is None and proj_frozen is not None


def test_parameter_counts_match_fairseq_and_hf():
    with torch.device("meta"):
        base = build_backbone(cfgmod.pretrain_base().model)
        # fairseq's data2vec_audio base checkpoint: 93,754,880 parameters with final_proj.
        assert parameter_count(Data2VecForPretraining(base)) == 93_754_880
        # HF Data2VecAudioForCTC base (32 letters): 93,188,896.
        assert parameter_count(Data2VecForCTC(copy.deepcopy(base), 32)) == 93_188_896


def test_build_backbone_follows_the_config_and_frames_match_the_manifest_formula():
    cfg = cfgmod.resolve("pretrain", preset="speech-tiny")
    model = build_backbone(cfg.model)
    assert len(model.transformer.layers) == cfg.model.num_layers
    assert len(model.transformer.pos_conv.blocks) == cfg.model.pos_conv_depth
    assert model.transformer.layers[0].fc1.out_features == cfg.model.ffn_dim
    assert model.transformer.layerdrop == cfg.model.layerdrop
    samples = torch.tensor([400, 16000, 32000, 160000, 123457])
    assert model.num_frames(samples).tolist() == [num_frames(int(s), cfg.model.conv_layers) for s in samples]
    assert model.num_frames(torch.tensor([16000, 160000])).tolist() == [49, 499]
    with torch.no_grad():
        out = model(torch.randn(1, 16000))
    assert out["x"].shape == (1, 49, cfg.model.embed_dim)


def test_even_positional_kernel_keeps_the_length():
    model = tiny_backbone(pos_conv_kernel=4, pos_conv_depth=2).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 4000))
    assert out["x"].shape[1] == model.num_frames(torch.tensor(4000)).item()


def test_fully_padded_row_gives_no_nan():
    model = tiny_backbone().eval()
    x = torch.randn(2, 4000)
    pad = torch.zeros(2, 4000, dtype=torch.bool)
    pad[1] = True
    with torch.no_grad():
        out = model(x.masked_fill(pad, 0), pad)
    assert torch.isfinite(out["x"]).all()
