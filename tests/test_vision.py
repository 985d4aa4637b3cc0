"""The ViT of models/vision.py against transformers' Data2VecVision, and the HF import/export of images.

Tiny random HF configs (width 32, 2 blocks, 32x32 images of 8x8 patches) with every parameter,
the relative position tables included, filled with noise so a wrong key, a wrong split of qkv
or a transposed bias table cannot hide behind a zero init.
"""

from __future__ import annotations

import json

import pytest
import torch

from d2vcli import checkpoint as ck
from d2vcli.errors import UserError
from d2vcli.interop_vision import export_hf, from_hf_state, import_hf, to_hf_state
from d2vcli.models.loading import build_vision_model, load_model
from d2vcli.models.vision import VisionConfig, relative_position_index, vision_base, vision_large

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    Data2VecVisionConfig, Data2VecVisionForImageClassification, Data2VecVisionModel,
)

TOL = 1e-5


def _hf_config(**kw) -> Data2VecVisionConfig:
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8, layer_norm_eps=1e-6, use_mask_token=True, use_shared_relative_position_bias=True,
                use_relative_position_bias=False, layer_scale_init_value=0.1, drop_path_rate=0.0,
                use_mean_pooling=False)
    base.update(kw)
    return Data2VecVisionConfig(**base)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _arch_like(hf_cfg: Data2VecVisionConfig) -> VisionConfig:
    return VisionConfig(image_size=32, patch_size=8, embed_dim=32, num_layers=2, num_heads=4, ffn_dim=64,
                        layer_scale_init=0.1, drop_path=0.0, attention_dropout=0.0,
                        rel_pos_bias="shared" if hf_cfg.use_shared_relative_position_bias else "per-layer")


def _images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_encoder_outputs_and_every_layer_equal_hf_data2vec_vision_model():
    hf_cfg = _hf_config()
    hf = Data2VecVisionModel(hf_cfg).eval()
    _randomize(hf)
    state, unmatched = from_hf_state("vision-pretrain", hf.state_dict())
    assert unmatched == []
    ours = build_vision_model("vision-pretrain", _arch_like(hf_cfg)).eval()
    fresh = ours.state_dict()
    state["lm_head.weight"], state["lm_head.bias"] = fresh["lm_head.weight"], fresh["lm_head.bias"]
    ours.load_state_dict(state, strict=True)
    x = _images()
    mask = torch.rand(3, 16, generator=torch.Generator().manual_seed(2)) < 0.5
    with torch.no_grad():
        for m in (None, mask):
            ref = hf(x, bool_masked_pos=m, output_hidden_states=True)
            last, layers = ours.encoder(x, m, return_layer_results=True)
            torch.testing.assert_close(ours.norm(last), ref.last_hidden_state, atol=TOL, rtol=0)
            # hidden_states[0] is the embedding output; [i + 1] is block i's end-of-block output (the targets).
            for ours_i, ref_i in zip(layers, ref.hidden_states[1:]):
                torch.testing.assert_close(ours_i, ref_i, atol=TOL, rtol=0)
    # The mask changes what the encoder sees: the test above is not blind to it.
    assert not torch.allclose(ours.encoder(x, mask)[0], ours.encoder(x)[0])


@pytest.mark.parametrize("per_layer", [False, True])
def test_classifier_logits_equal_hf_for_image_classification(per_layer):
    hf_cfg = _hf_config(use_mean_pooling=True, num_labels=5, use_shared_relative_position_bias=not per_layer,
                        use_relative_position_bias=per_layer)
    hf = Data2VecVisionForImageClassification(hf_cfg).eval()
    _randomize(hf, seed=3)
    state, unmatched = from_hf_state("vision-cls", hf.state_dict())
    assert unmatched == []
    ours = build_vision_model("vision-cls", _arch_like(hf_cfg), num_classes=5).eval()
    ours.load_state_dict(state, strict=True)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=TOL, rtol=0)


def test_to_hf_state_inverts_from_hf_state():
    hf = Data2VecVisionForImageClassification(_hf_config(use_mean_pooling=True, num_labels=4))
    _randomize(hf)
    hf_state = {k: v for k, v in hf.state_dict().items() if "relative_position_index" not in k}
    ours, _ = from_hf_state("vision-cls", hf_state)
    back = to_hf_state("vision-cls", ours)
    assert sorted(back) == sorted(hf_state)
    assert all(torch.equal(back[k], hf_state[k]) for k in hf_state)


def test_relative_position_index_matches_hf():
    from transformers.models.data2vec.modeling_data2vec_vision import Data2VecVisionRelativePositionBias

    for grid in ((4, 4), (14, 14), (3, 5)):
        ref = Data2VecVisionRelativePositionBias.generate_relative_position_index(grid)
        assert torch.equal(relative_position_index(*grid), ref)


def _save_checkpoint(tmp_path, kind: str, classes=None):
    arch = VisionConfig(image_size=32, patch_size=8, embed_dim=32, num_layers=2, num_heads=4, ffn_dim=64,
                        layer_scale_init=0.1, drop_path=0.1, attention_dropout=0.0)
    model = build_vision_model(kind, arch, len(classes or []))
    _randomize(model, seed=5)
    import dataclasses

    state = ck.make_state(kind, config={}, arch=dataclasses.asdict(arch), normalize=False, model=model.state_dict(),
                          classes=classes)
    path = tmp_path / "run" / "last.pt"
    ck.save_checkpoint(path, state)
    return path, model.eval()


def test_export_then_transformers_loads_with_no_missing_keys_and_same_logits(tmp_path):
    classes = ["circle", "square", "triangle"]
    path, ours = _save_checkpoint(tmp_path, "vision-cls", classes)
    out = tmp_path / "hf"
    export_hf(path, out)
    hf, info = Data2VecVisionForImageClassification.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] in ([], set()) and info["unexpected_keys"] in ([], set())
    assert hf.config.id2label == dict(enumerate(classes))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).logits, ours(x), atol=TOL, rtol=0)
    # A second export into the same folder is refused without --force, allowed with it.
    with pytest.raises(UserError, match="not empty"):
        export_hf(path, out)
    export_hf(path, out, force=True)


def test_export_pretrained_gives_data2vec_vision_model_with_the_students_final_norm(tmp_path):
    path, ours = _save_checkpoint(tmp_path, "vision-pretrain")
    out = tmp_path / "hf"
    export_hf(path, out)
    hf, info = Data2VecVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(x).last_hidden_state, ours.norm(ours.encoder(x)[0]), atol=TOL, rtol=0)


def test_import_hf_classifier_gives_a_checkpoint_with_the_same_logits_and_class_names(tmp_path):
    hf_cfg = _hf_config(use_mean_pooling=True, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                        label2id={"a": 0, "b": 1, "c": 2}, use_mask_token=False)
    hf = Data2VecVisionForImageClassification(hf_cfg).eval()
    _randomize(hf, seed=7)
    hf.save_pretrained(tmp_path / "folder")
    result = import_hf(tmp_path / "folder", out=tmp_path / "imported" / "last.pt")
    assert result.kind == "vision-cls" and result.num_classes == 3
    assert any("mask token" in n for n in result.notes)  # use_mask_token false: said, not hidden
    loaded = load_model(result.path)
    assert loaded.kind == "vision-cls" and loaded.classes == ["a", "b", "c"]
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), hf(x).logits, atol=TOL, rtol=0)


def test_import_hf_refuses_what_the_vit_cannot_represent(tmp_path):
    hf = Data2VecVisionModel(_hf_config(use_absolute_position_embeddings=True))
    hf.save_pretrained(tmp_path / "abs")
    with pytest.raises(UserError, match="use_absolute_position_embeddings"):
        import_hf(tmp_path / "abs", out=tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    cfg = json.loads((tmp_path / "abs" / "config.json").read_text())
    cfg.update(use_absolute_position_embeddings=False, use_shared_relative_position_bias=False)
    (tmp_path / "abs" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="exactly one of"):
        import_hf(tmp_path / "abs", out=tmp_path / "x.pt")


def test_import_hf_reports_every_missing_key_and_writes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = Data2VecVisionModel(_hf_config())
    hf.save_pretrained(tmp_path / "folder")
    weights = load_file(str(tmp_path / "folder" / "model.safetensors"))
    dropped = [k for k in weights if k.endswith("layernorm_after.weight")]
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(tmp_path / "folder" / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing \(2\)") as err:
        import_hf(tmp_path / "folder", out=tmp_path / "x.pt")
    assert "encoder.blocks.1.norm2.weight" in str(err.value)
    assert not (tmp_path / "x.pt").exists()


def test_named_architectures_are_the_papers_vit_b_and_vit_l():
    b, L = vision_base(), vision_large()
    assert (b.embed_dim, b.num_layers, b.num_heads, b.ffn_dim, b.num_patches) == (768, 12, 12, 3072, 196)
    assert (L.embed_dim, L.num_layers, L.num_heads, L.layer_scale_init) == (1024, 24, 16, 1e-5)
    with torch.device("meta"):
        n = sum(p.numel() for p in build_vision_model("vision-cls", b, 1000).parameters())
    assert 86e6 < n < 87.5e6  # ViT-B/16: about 86M parameters


def test_cli_import_and_export_hf_dispatch_on_image_models(tmp_path):
    from typer.testing import CliRunner

    from d2vcli.cli import app

    hf = Data2VecVisionForImageClassification(_hf_config(use_mean_pooling=True, num_labels=2))
    _randomize(hf, seed=9)
    hf.save_pretrained(tmp_path / "folder")
    runner = CliRunner()
    res = runner.invoke(app, ["import", "hf", str(tmp_path / "folder"), "-w", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    assert "vision-cls" in res.output
    run = tmp_path / "w" / "runs" / "imported-folder" / "last.pt"
    assert ck.load_checkpoint(run)[ck.KIND_KEY] == "vision-cls"
    res = runner.invoke(app, ["export", "hf", "imported-folder", str(tmp_path / "out"), "-w", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    back = Data2VecVisionForImageClassification.from_pretrained(tmp_path / "out").eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, hf.eval()(x).logits, atol=TOL, rtol=0)
    res = runner.invoke(app, ["import", "hf", str(tmp_path / "folder"), "--dict", "x.txt", "-w", str(tmp_path / "w")])
    assert res.exit_code == 2 and "--dict" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- the BEiT repo's files

def _beit_layout(hf_model, kind: str) -> dict:
    """A state dict in data2vec_vision/beit's names (docs/images.md), written from the HF model's tensors."""
    from d2vcli.interop_vision import from_hf_state

    ours, _ = from_hf_state(kind, hf_model.state_dict())
    out = {}
    for k, v in ours.items():
        k = k.removeprefix("encoder.")
        if ".rel_pos_bias.relative_position_bias_table" in k and k.startswith("blocks."):
            k = k.replace(".rel_pos_bias.", ".attn.")  # BEiT keeps a per-block table inside the attention
        out[k] = v
    # The repo saves the index buffers too; they must be dropped, not reported as unexpected.
    if "rel_pos_bias.relative_position_bias_table" in out:
        out["rel_pos_bias.relative_position_index"] = relative_position_index(4, 4)
    for i in range(2):
        if f"blocks.{i}.attn.relative_position_bias_table" in out:
            out[f"blocks.{i}.attn.relative_position_index"] = relative_position_index(4, 4)
    return out


@pytest.mark.parametrize("per_layer", [False, True])
def test_import_fairseq_reads_a_beit_repo_classifier_with_the_same_logits(tmp_path, per_layer):
    from d2vcli.interop import import_fairseq

    hf_cfg = _hf_config(use_mean_pooling=True, num_labels=4, use_shared_relative_position_bias=not per_layer,
                        use_relative_position_bias=per_layer)
    hf = Data2VecVisionForImageClassification(hf_cfg).eval()
    _randomize(hf, seed=11)
    sd = _beit_layout(hf, "vision-cls")
    sd.pop("mask_token", None)  # fine-tuned BEiT models carry none
    torch.save({"module": sd, "epoch": 99}, tmp_path / "mp_rank_00_model_states.pt")
    result = import_fairseq(tmp_path / "mp_rank_00_model_states.pt", out=tmp_path / "ft" / "last.pt")
    assert result.kind == "vision-cls" and result.num_classes == 4
    loaded = load_model(result.path)
    assert loaded.model.encoder.cfg.rel_pos_bias == ("per-layer" if per_layer else "shared")
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), hf(x).logits, atol=TOL, rtol=0)


def test_import_fairseq_reads_a_beit_repo_pretrained_model_and_its_ema(tmp_path):
    from d2vcli.interop import import_fairseq

    hf = Data2VecVisionModel(_hf_config()).eval()
    _randomize(hf, seed=12)
    sd = _beit_layout(hf, "vision-pretrain")
    sd["lm_head.weight"], sd["lm_head.bias"] = torch.randn(32, 32), torch.randn(32)
    ema = {k: v + 1 for k, v in sd.items() if "index" not in k}
    torch.save({"model": sd, "model_ema": ema, "epoch": 799}, tmp_path / "checkpoint-799.pth")
    result = import_fairseq(tmp_path / "checkpoint-799.pth", out=tmp_path / "pt" / "last.pt")
    state = ck.load_checkpoint(result.path)
    assert state[ck.KIND_KEY] == "vision-pretrain"
    assert torch.equal(state[ck.MODEL_KEY]["lm_head.weight"], sd["lm_head.weight"])
    assert torch.equal(state[ck.TEACHER_KEY]["encoder.blocks.1.mlp.fc2.weight"], ema["blocks.1.mlp.fc2.weight"])
    model = load_model(result.path).model
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model.norm(model.encoder(x)[0]), hf(x).last_hidden_state, atol=TOL, rtol=0)
    used = import_fairseq(tmp_path / "checkpoint-799.pth", out=tmp_path / "ema" / "last.pt", use_ema=True)
    assert torch.equal(ck.load_checkpoint(used.path)[ck.MODEL_KEY]["encoder.cls_token"], ema["cls_token"])


def test_import_fairseq_refuses_a_beit_file_with_absolute_positions_or_unknown_keys(tmp_path):
    from d2vcli.interop import import_fairseq

    hf = Data2VecVisionModel(_hf_config())
    sd = _beit_layout(hf, "vision-pretrain")
    sd["lm_head.weight"], sd["lm_head.bias"] = torch.randn(32, 32), torch.randn(32)
    torch.save({"model": {**sd, "pos_embed": torch.zeros(1, 17, 32)}}, tmp_path / "abs.pth")
    with pytest.raises(UserError, match="pos_embed"):
        import_fairseq(tmp_path / "abs.pth", out=tmp_path / "x.pt")
    torch.save({"model": {**sd, "blocks.0.attn.k_bias": torch.zeros(32)}}, tmp_path / "odd.pth")
    with pytest.raises(UserError, match=r"unexpected \(1\):\s+encoder.blocks.0.attn.k_bias"):
        import_fairseq(tmp_path / "odd.pth", out=tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_import_hf_pretrained_model_saved_with_its_pooler_drops_it_and_says_so(tmp_path):
    hf = Data2VecVisionModel(_hf_config(use_mean_pooling=True), add_pooling_layer=True).eval()
    _randomize(hf, seed=13)
    hf.save_pretrained(tmp_path / "folder")
    result = import_hf(tmp_path / "folder", out=tmp_path / "pt" / "last.pt")
    assert result.kind == "vision-pretrain" and any("pooling layer" in n for n in result.notes)
    model = load_model(result.path).model
    x = _images()
    with torch.no_grad():  # use_mean_pooling: HF's last_hidden_state has no final norm
        torch.testing.assert_close(model.encoder(x)[0], hf(x).last_hidden_state, atol=TOL, rtol=0)


def test_cli_import_fairseq_of_a_beit_file_with_pickled_args_needs_trust(tmp_path):
    """The repo's files carry an argparse Namespace: refused by a safe load, imported with --trust-checkpoint."""
    import argparse

    from typer.testing import CliRunner

    from d2vcli.cli import app

    hf = Data2VecVisionForImageClassification(_hf_config(use_mean_pooling=True, num_labels=3))
    sd = _beit_layout(hf, "vision-cls")
    torch.save({"model": sd, "args": argparse.Namespace(model="beit_base_patch16_224")}, tmp_path / "checkpoint-99.pth")
    runner = CliRunner()
    argv = ["import", "fairseq", str(tmp_path / "checkpoint-99.pth"), "-w", str(tmp_path / "w")]
    res = runner.invoke(app, argv)
    assert res.exit_code == 2 and "--trust-checkpoint" in res.output
    res = runner.invoke(app, argv + ["--trust-checkpoint"])
    assert res.exit_code == 0, res.output
    assert "vision-cls" in res.output and "tensor shapes" in " ".join(res.output.split())
    assert ck.load_checkpoint(tmp_path / "w/runs/imported-checkpoint-99/last.pt")[ck.CLASSES_KEY] == ["0", "1", "2"]
