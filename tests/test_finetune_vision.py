"""Image classification on the ViT: start from pretraining, layer decay, mixup/cutmix, validation, linear probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli import distributed
from d2vcli.cli import app
from d2vcli.fileio import read_jsonl
from d2vcli.finetune import finetune
from d2vcli.finetune_vision import (VisionClassifyTask, layer_lr_scales, load_start, mix_batch, read_classes,
                                    soft_targets)
from d2vcli.models.loading import load_model
from d2vcli.pretrain import pretrain
from d2vcli.schedule import lr_at

CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
FT_SET = ["data.images_per_batch=15", "train.images_per_update=15", "train.max_updates=6", "train.log_every=1",
          "finetune.validate_every=3", "data.num_workers=0", "schedule.warmup_updates=2", "train.save_every=3"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A workspace with the tiny image corpus and a 2-update vision-tiny pretraining run `vt`."""
    from d2vcli.prepare.synthetic_images import prepare_synthetic_images
    from d2vcli.workspace import Workspace

    ws = Workspace.resolve(tmp_path_factory.mktemp("ft-images") / "ws")
    prepare_synthetic_images(ws, size="tiny", workers=1)
    cfg = C.resolve("pretrain", preset="vision-tiny", overrides=[
        "data.images_per_batch=8", "train.images_per_update=8", "train.max_updates=2", "data.num_workers=0",
        "schedule.warmup_updates=0"])
    assert pretrain(cfg, ws, name="vt").status == "done"
    return ws


def ft_cfg(*extra: str) -> C.Config:
    return C.resolve("finetune", preset="vision-ft-tiny", overrides=FT_SET + list(extra))


def test_layer_decay_follows_the_recipe():
    task_cfg = ft_cfg("finetune.init=scratch")
    from d2vcli.models.loading import build_vision_model

    model = build_vision_model("vision-cls", load_start(task_cfg, None).arch, 10)
    s = layer_lr_scales(model, 4, 0.65)
    assert s["encoder.patch_embed.proj.weight"] == s["encoder.cls_token"] == pytest.approx(0.65**5)
    assert s["encoder.blocks.0.attn.qkv.weight"] == pytest.approx(0.65**4)
    assert s["encoder.blocks.3.mlp.fc2.bias"] == pytest.approx(0.65)
    assert s["head.weight"] == s["fc_norm.weight"] == s["encoder.rel_pos_bias.relative_position_bias_table"] == 1.0


def test_mixup_and_cutmix_mix_images_and_labels_alike():
    labels = torch.tensor([0, 1, 2, 3])
    y = soft_targets(labels, 5, 0.1)
    assert torch.allclose(y.sum(1), torch.ones(4)) and y[0, 0] == pytest.approx(0.92) and y[0, 1] == pytest.approx(0.02)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    ft = ft_cfg().finetune
    cut = C.merge(ft, {"mixup": 0.0})  # cutmix only: a box of the reversed batch
    mixed, t = mix_batch(images, labels, 5, cut, np.random.default_rng(3))
    from_partner = (mixed[0, 0] == 3.0).float().mean()  # image 0's partner is image 3
    assert 0 < from_partner < 1
    assert t[0, 3] == pytest.approx(float(from_partner) * y[0, 0] + (1 - float(from_partner)) * y[0, 3], abs=1e-6)
    blend = C.merge(ft, {"cutmix": 0.0})  # mixup only: every pixel is lam x + (1 - lam) x_partner
    mixed, t = mix_batch(images, labels, 5, blend, np.random.default_rng(3))
    lam = 1 - float(mixed[0, 0, 0, 0]) / 3.0
    assert torch.allclose(mixed[0], torch.full_like(mixed[0], 3.0 * (1 - lam)))
    assert torch.allclose(t.sum(1), torch.ones(4))
    again, _ = mix_batch(images, labels, 5, blend, np.random.default_rng(3))
    assert torch.equal(again, mixed)  # the batch's rng alone decides


def test_finetune_starts_from_the_pretrained_encoder_and_validation_selects_best(pretrained):
    cfg = ft_cfg("finetune.init=vt", "vision.image_mean=[0.5,0.5,0.5]")  # the recipe's, not the checkpoint's
    start = load_start(cfg, pretrained)
    pre = ckpt.load_checkpoint(pretrained.run_dir("vt") / "last.pt")
    task = VisionClassifyTask(cfg, start, read_classes(pretrained), {}, CPU)
    for name, value in task.model.encoder.state_dict().items():
        torch.testing.assert_close(value, pre[ckpt.MODEL_KEY][f"encoder.{name}"], rtol=0, atol=0)
    assert task.arch.drop_path == 0.1 and task.arch.image_mean == (0.5, 0.5, 0.5)  # the fine-tuning values
    result = finetune(cfg, pretrained, name="ft")
    assert result.status == "done", result.message
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    valid = [r for r in rows if "val/top1" in r]
    assert [r["step"] for r in valid] == [3, 6]
    assert all(0 <= r["val/top1"] <= r["val/top5"] <= 100 and r["val/error"] == 100 - r["val/top1"] for r in valid)
    best = min(valid, key=lambda r: r["val/error"])
    state = ckpt.load_checkpoint(result.run_dir / "best.pt")
    assert state[ckpt.STEP_KEY] == best["step"]
    loaded = load_model(result.run_dir / "best.pt", expect_kind="vision-cls")
    assert loaded.classes == read_classes(pretrained) and len(loaded.classes) == 10
    # Layer decay reached the optimizer: each group runs at the schedule's rate times its scale.
    last = ckpt.load_checkpoint(result.checkpoint)
    rate = lr_at(5, cfg.optim.lr, cfg.schedule, cfg.train.max_updates)
    scales = sorted({round(g["lr_scale"], 6) for g in last[ckpt.OPTIMIZER_KEY]["param_groups"]})
    assert scales == sorted({round(0.65**k, 6) for k in range(6)})
    for g in last[ckpt.OPTIMIZER_KEY]["param_groups"]:
        assert g["lr"] == pytest.approx(rate * g["lr_scale"])


def test_linear_probe_trains_only_the_head(pretrained):
    result = CliRunner().invoke(app, ["finetune", "--preset", "vision-ft-tiny", "--init", "vt", "--linear-probe",
                                      "--name", "probe", "--workdir", str(pretrained.root)]
                                + [a for item in FT_SET for a in ("--set", item)])
    assert result.exit_code == 0, result.output
    assert "linear probe, encoder frozen" in result.output
    pre = ckpt.load_checkpoint(pretrained.run_dir("vt") / "last.pt")[ckpt.MODEL_KEY]
    probe = ckpt.load_checkpoint(pretrained.run_dir("probe") / "last.pt")
    for name, value in probe[ckpt.MODEL_KEY].items():
        if name.startswith("encoder."):
            torch.testing.assert_close(value, pre[name], rtol=0, atol=0)
    assert C.from_dict(probe[ckpt.CONFIG_KEY]).vision.drop_path == 0.0
    fresh = ckpt.load_checkpoint(pretrained.run_dir("probe") / "step-3.pt")[ckpt.MODEL_KEY]
    assert not torch.equal(fresh["head.weight"], probe[ckpt.MODEL_KEY]["head.weight"])


def test_bad_starts_are_clear_errors(pretrained, tmp_path):
    runner = CliRunner()
    none = runner.invoke(app, ["finetune", "--preset", "vision-ft-tiny", "--workdir", str(pretrained.root)])
    assert none.exit_code == 2 and "--init" in none.output and "scratch" in none.output
    missing = runner.invoke(app, ["finetune", "--preset", "vision-ft-tiny", "--init", "nope",
                                  "--workdir", str(pretrained.root)])
    assert missing.exit_code == 2 and "no checkpoint found for 'nope'" in missing.output
    empty = runner.invoke(app, ["finetune", "--preset", "vision-ft-tiny", "--init", "scratch",
                                "--workdir", str(tmp_path / "w")])
    assert empty.exit_code == 2 and "d2v prepare synthetic-images" in empty.output
