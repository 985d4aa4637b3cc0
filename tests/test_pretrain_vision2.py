"""data2vec 2.0 image pretraining: 2-D block masks, the visible-only student, decoder, targets, CLS loss, EMA
scope, one engine update, exact resume, and fine-tuning from its checkpoint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli import distributed, engine
from d2vcli.data import STREAM_MASK, batch_rng
from d2vcli.fileio import read_jsonl
from d2vcli.finetune import finetune
from d2vcli.finetune_vision import VisionClassifyTask, layer_lr_scales, load_start, read_classes
from d2vcli.interop_keys import InteropError
from d2vcli.interop_vision import export_hf
from d2vcli.models.loading import build_vision_model, load_model
from d2vcli.models.vision import VisionConfig
from d2vcli.models.vision2 import drop_path_rates, sincos_positions_2d, vision2_base
from d2vcli.objective.masking import compute_block_mask_2d
from d2vcli.objective.teacher import ema_decay_at
from d2vcli.pretrain import pretrain
from d2vcli.pretrain_vision import build_image_loader
from d2vcli.pretrain_vision2 import Vision2PretrainTask
from d2vcli.run_dir import prepare_run
from pretrain_vision_helpers import assert_resume_matches, losses, synthetic_image_ws

CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
TINY_SET = ["data.images_per_batch=8", "train.images_per_update=16", "train.max_updates=6", "train.log_every=1",
            "train.save_every=3", "data.num_workers=0", "schedule.warmup_updates=2"]
FT_SET = ["data.images_per_batch=15", "train.images_per_update=15", "train.max_updates=2", "train.log_every=1",
          "finetune.validate_every=2", "data.num_workers=0", "schedule.warmup_updates=1", "train.save_every=2"]


def tiny_cfg(*extra: str) -> C.Config:
    return C.resolve("pretrain", preset="vision2-tiny", overrides=TINY_SET + list(extra))


@pytest.fixture(scope="module")
def image_ws(tmp_path_factory):
    return synthetic_image_ws(tmp_path_factory, "images2")


@pytest.fixture(scope="module")
def straight_run(image_ws):
    result = pretrain(tiny_cfg(), image_ws, name="v2-straight")
    assert result.status == "done", result.message
    return result


# ----------------------------------------------------------------------------- masks


def test_block_masks_have_the_recipes_exact_counts_and_follow_the_seed():
    base = compute_block_mask_2d(16, (14, 14), 0.8, 3, 0.07, True, np.random.default_rng(0))
    assert base.shape == (16, 196) and (base.sum(1) == 157).all()  # ViT-B: 39 visible of 196 in every clone
    assert len({row.tobytes() for row in base}) == 16  # each clone has its own mask
    large = compute_block_mask_2d(16, (14, 14), 0.75, 3, 0.1, True, np.random.default_rng(0))
    assert (large.sum(1) == 147).all()  # ViT-L: 49 visible
    again = compute_block_mask_2d(16, (14, 14), 0.8, 3, 0.07, True, np.random.default_rng(0))
    assert np.array_equal(base, again)
    assert not np.array_equal(base, compute_block_mask_2d(16, (14, 14), 0.8, 3, 0.07, True, np.random.default_rng(1)))
    plain = compute_block_mask_2d(8, (14, 14), 0.5, 3, 0.0, False, np.random.default_rng(0))
    assert (plain.sum(1) == 98).all()  # without inverse_mask the blocks are the masked patches


def test_visible_patches_are_3x3_blocks():
    # One centre per row (36 x 0.25 / 9) and a target of 9 visible: an interior centre's block is the
    # whole visible set, a 3x3 square; a border centre's block is cut and the rest is topped up at random.
    mask = compute_block_mask_2d(400, (6, 6), 0.75, 3, 0.0, True, np.random.default_rng(0))
    assert (mask.sum(1) == 27).all()
    squares = 0
    for row in ~mask.reshape(400, 6, 6):
        r, c = np.nonzero(row)
        if r.max() - r.min() == 2 and c.max() - c.min() == 2:
            squares += 1
    assert 0.35 < squares / 400 < 0.55  # 16 of 36 centres are interior (0.44)


def test_task_masks_are_keyed_by_the_batch_and_sample_major(image_ws):
    cfg = tiny_cfg()
    task = Vision2PretrainTask(cfg, torch.device("cpu"))
    batch = next(iter(build_image_loader(cfg, image_ws, CPU)))
    mask = task.patch_mask(batch)
    assert mask.shape == (8 * 4, 64) and (mask.sum(1) == 64 - 12).all()
    rng = batch_rng(cfg.train.seed, batch.epoch, batch.index, STREAM_MASK)
    assert np.array_equal(mask.numpy(), compute_block_mask_2d(32, (8, 8), 0.8, 3, 0.07, True, rng))


# ----------------------------------------------------------------------------- the model


def mae_sincos(dim: int, size: int) -> np.ndarray:
    """MAE's get_2d_sincos_pos_embed as the reference describes it: meshgrid(w, h), w's half first."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64)), 0)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def test_positions_are_fixed_2d_sincos_with_the_column_first():
    table = sincos_positions_2d(32, 4, 4)
    np.testing.assert_allclose(table.numpy(), mae_sincos(32, 4), rtol=0, atol=1e-6)
    assert torch.equal(table[1, :16], table[5, :16]) and not torch.equal(table[1, 16:], table[5, 16:])  # same column
    model = build_vision_model("vision-pretrain", VisionConfig(version=2, image_size=16, patch_size=4, embed_dim=32,
                                                               num_layers=1, num_heads=4, ffn_dim=64, decoder_dim=32,
                                                               decoder_layers=1, decoder_groups=4))
    assert "encoder.positions" not in model.state_dict()  # recomputed, never learned
    assert all(p is not model.encoder.positions for p in model.parameters())


def test_student_encodes_only_the_visible_patches_and_the_decoder_predicts_every_patch():
    arch = VisionConfig(version=2, image_size=32, patch_size=4, embed_dim=32, num_layers=2, prenet_depth=1,
                        num_heads=4, ffn_dim=64, decoder_dim=32, decoder_layers=2, decoder_groups=4)
    model = build_vision_model("vision-pretrain", arch)
    seen = {}

    def record(name, shape):
        seen[name] = shape  # a hook that returns None leaves the output alone

    model.encoder.prenet[0].register_forward_hook(lambda m, i, o: record("prenet", i[0].shape))
    model.encoder.layers[1].register_forward_hook(lambda m, i, o: record("last", o[0].shape))
    model.decoder.register_forward_hook(lambda m, i, o: record("decoder", o.shape))
    mask = torch.from_numpy(compute_block_mask_2d(6, (8, 8), 0.8, 3, 0.07, True, np.random.default_rng(0)))
    out = model(torch.randn(2, 3, 32, 32), mask)
    assert seen["prenet"] == seen["last"] == (6, 1 + 12, 32)  # 3 clones of 2 images, CLS + 12 visible
    assert seen["decoder"] == (6, 64, 32)
    assert out["pred"].shape == (6 * 52, 32) and out["cls"].shape == (6, 32) and out["clones"] == 3


def test_fine_tuning_drop_path_is_spread_as_the_recipe_does():
    prenet, main = drop_path_rates(0.1, 2, 10)
    assert prenet == pytest.approx([0.0, 0.1 / 9]) and main[0] == pytest.approx(0.2 / 9) and main[-1] == 0.1
    assert len(main) == 10 and drop_path_rates(0.0, 2, 10) == ([0.0, 0.0], [0.0] * 10)


# ----------------------------------------------------------------------------- the objective


def test_step_targets_loss_and_cls_loss_equal_a_direct_computation(image_ws):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    task = Vision2PretrainTask(cfg, torch.device("cpu"))
    with torch.no_grad():  # a teacher unlike the student, so a swapped forward cannot pass
        for p in task.teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(build_image_loader(cfg, image_ws, CPU)))
    out = task.train_step(task.model, batch, 0)
    images, mask = batch.source, task.patch_mask(batch)
    t = task.teacher.module
    with torch.no_grad():
        x = t.patch_embed(images) + torch.from_numpy(mae_sincos(64, 8)).float()  # (8, 64, 64)
        x = torch.cat([t.cls_token.expand(8, -1, -1), x], 1)
        x = t.norm(x)
        main = []
        for i, layer in enumerate(list(t.prenet) + list(t.layers)):  # post-LN blocks; the FFN output is the target
            h = layer.self_attn_norm(x + layer.self_attn(x))
            ffn = layer.fc2(F.gelu(layer.fc1(h)))
            x = layer.final_norm(h + ffn)
            if i >= len(t.prenet):
                main.append(ffn[:, 1:])  # main blocks only, CLS stripped
        tops = main[-3:]
        normed = [(y - y.mean(1, keepdim=True)) / torch.sqrt(y.var(1, unbiased=False, keepdim=True) + 1e-5)
                  for y in tops]  # instance norm over the patches
        avg = sum(normed) / 3
        target = (avg - avg.mean(-1, keepdim=True)) / torch.sqrt(avg.var(-1, unbiased=False, keepdim=True) + 1e-5)
        gen = task.noise_generator(batch, images.device)
        student = task.model(images, mask, generator=gen)
    full = target.repeat_interleave(4, 0)
    n = int(mask.sum())
    regression = ((student["pred"] - full[mask]) ** 2).sum() / math.sqrt(64)
    cls_target = target.mean(1).repeat_interleave(4, 0)  # (32, 64): each image's mean target, per clone
    cls = ((student["cls"] - cls_target) ** 2).sum() / math.sqrt(64) * 0.01 * n
    assert out.sample_size == n == 8 * 4 * 52
    torch.testing.assert_close(out.loss.detach(), regression + cls, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.metrics["cls_loss"], cls / n, rtol=1e-5, atol=1e-6)
    # Normalization: the engine divides the summed loss by the masked count, so this is a mean per masked patch.
    per_patch = out.loss.detach() / out.sample_size
    assert float(per_patch) == pytest.approx(float((regression + cls) / n), rel=1e-5)


def test_teacher_is_an_ema_of_the_encoder_incl_the_patch_embedding_not_the_decoder(image_ws):
    cfg = tiny_cfg("train.max_updates=1", "schedule.warmup_updates=0")
    torch.manual_seed(0)
    task = Vision2PretrainTask(cfg, torch.device("cpu"))
    init = {k: v.clone() for k, v in task.model.state_dict().items()}
    loader = build_image_loader(cfg, image_ws, CPU)
    run = prepare_run(image_ws, "v2-ema", cfg, False, CPU)
    assert engine.train(cfg, task, loader, run, CPU, batch=engine.image_batch_unit(cfg)).step == 1
    student, teacher = task.model.state_dict(), task.teacher.state_dict()
    assert set(teacher) == {k[len("encoder."):] for k in student if k.startswith("encoder.")}
    assert any(k.startswith("decoder.") for k in student)
    d = ema_decay_at(1, cfg.objective)
    for name in ("patch_embed.proj.weight", "cls_token", "norm.weight", "prenet.0.fc1.weight", "layers.2.fc2.weight"):
        assert not torch.equal(student["encoder." + name], init["encoder." + name]), name
    for name in teacher:
        torch.testing.assert_close(teacher[name], d * init["encoder." + name] + (1 - d) * student["encoder." + name])


# ----------------------------------------------------------------------------- presets and runs


def test_vision2_presets_hold_the_recipes_values():
    base = C.resolve("pretrain", preset="vision2-base")
    assert base.modality == "images" and base.model.version == 2
    arch = {**C.to_dict(base.vision), "version": 2}
    assert arch == {**C.to_dict(vision2_base()), "image_mean": arch["image_mean"], "image_std": arch["image_std"]}
    m, o = base.masking, base.objective
    assert (m.mask_prob, m.mask_prob_adjust, m.mask_length, m.inverse_mask, m.clone_batch) == (0.8, 0.07, 3, True, 16)
    assert (o.average_top_k_layers, o.layer_target_norm, o.final_target_norm, o.cls_loss) == (10, "instance",
                                                                                               "layer", 0.01)
    assert ema_decay_at(0, o) == 0.9998 and ema_decay_at(100_000, o) == 0.99999
    assert (base.optim.lr, base.optim.betas, base.optim.weight_decay, base.optim.clip_norm) == (1e-3, (0.9, 0.95),
                                                                                                0.05, 4.0)
    assert (base.schedule.kind, base.schedule.warmup_updates, base.train.max_updates) == ("cosine", 50_040, 375_300)
    assert engine.image_batch_unit(base).describe(CPU, 16) == \
        "256 images/update = 1 CPU process x 16 images x 16 accumulation"
    large = C.resolve("pretrain", preset="vision2-large")
    assert (large.vision.num_layers, large.vision.prenet_depth, large.objective.average_top_k_layers) == (24, 0, 18)
    with pytest.raises(C.ConfigError, match="decoder_groups"):
        tiny_cfg("vision.decoder_dim=60")
    with pytest.raises(C.ConfigError, match="visible"):
        tiny_cfg("masking.mask_prob=0.99")


def test_short_run_learns_and_resume_reproduces_it_exactly(straight_run, image_ws):
    curve = losses(straight_run.run_dir)
    assert len(curve) == 6 and curve[-1] < curve[0]
    rows = read_jsonl(straight_run.run_dir / "metrics.jsonl")
    assert {"target_std", "pred_std", "cls_loss", "masked_share", "ema_decay"} <= set(rows[0])
    loaded = load_model(straight_run.checkpoint, expect_kind="vision-pretrain")
    assert type(loaded.model).__name__ == "Data2Vec2VisionForPretraining"
    assert_resume_matches(straight_run, image_ws, tiny_cfg(), "v2-split", stop_at=2)  # 6 updates


def test_finetune_from_a_vision2_checkpoint(straight_run, image_ws, tmp_path):
    cfg = C.resolve("finetune", preset="vision-ft-tiny", overrides=FT_SET + ["finetune.init=v2-straight"])
    start = load_start(cfg, image_ws)
    pre = ckpt.load_checkpoint(straight_run.checkpoint)
    assert start.arch.version == 2 and start.arch.prenet_depth == 1 and start.arch.drop_path == 0.1
    assert start.arch.image_mean == (0.485, 0.456, 0.406)  # 2.0 fine-tunes with its pretraining's statistics
    task = VisionClassifyTask(cfg, start, read_classes(image_ws), {}, CPU)
    assert not any(k.startswith("decoder") for k in task.model.state_dict())
    for name, value in task.model.encoder.state_dict().items():
        torch.testing.assert_close(value, pre[ckpt.MODEL_KEY][f"encoder.{name}"], rtol=0, atol=0)
    s = layer_lr_scales(task.model, 3, 0.65, version=2, prenet_depth=1)
    assert s["encoder.prenet.0.fc1.weight"] == pytest.approx(0.65**4)
    assert s["encoder.layers.2.fc1.weight"] == pytest.approx(0.65)
    assert s["encoder.patch_embed.proj.weight"] == s["encoder.cls_token"] == s["head.weight"] == 1.0
    teacher_start = load_start(C.merge(cfg, {"finetune": {"init_from": "teacher"}}), image_ws)
    for name, value in teacher_start.encoder.items():
        torch.testing.assert_close(value, pre[ckpt.TEACHER_KEY][name], rtol=0, atol=0)
    result = finetune(cfg, image_ws, name="v2-ft")
    assert result.status == "done", result.message
    loaded = load_model(result.run_dir / "best.pt", expect_kind="vision-cls")
    assert type(loaded.model).__name__ == "Data2Vec2VisionForImageClassification"
    assert loaded.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(InteropError, match="data2vec 2.0"):
        export_hf(result.run_dir / "best.pt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
