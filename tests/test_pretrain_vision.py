"""data2vec 1.0 image pretraining through the engine: targets, loss, EMA scope, data, resume, DDP, bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli import distributed, engine
from d2vcli.cli import app
from d2vcli.data import STREAM_MASK, batch_rng
from d2vcli.fileio import read_jsonl
from d2vcli.models.loading import load_model
from d2vcli.models.vision import vision_base
from d2vcli.objective.image_masking import block_masks
from d2vcli.objective.teacher import ema_decay_at
from d2vcli.pretrain import pretrain
from d2vcli.pretrain_vision import VisionPretrainTask, build_image_loader, mask_params
from d2vcli.run_dir import prepare_run
from d2vcli.schedule import build_optimizer
from pretrain_vision_helpers import assert_resume_matches, losses, synthetic_image_ws

CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))

# 8 images per micro-batch, 2 micro-batches per update: 12 updates read 192 images (about 2 epochs of the pool).
TINY_SET = ["data.images_per_batch=8", "train.images_per_update=16", "train.max_updates=12", "train.log_every=1",
            "train.save_every=6", "data.num_workers=0", "schedule.warmup_updates=2", "optim.lr=0.002"]


def tiny_cfg(*extra: str) -> C.Config:
    return C.resolve("pretrain", preset="vision-tiny", overrides=TINY_SET + list(extra))


@pytest.fixture(scope="module")
def image_ws(tmp_path_factory):
    return synthetic_image_ws(tmp_path_factory, "images")


@pytest.fixture(scope="module")
def straight_run(image_ws):
    result = pretrain(tiny_cfg(), image_ws, name="vision-straight")
    assert result.status == "done", result.message
    return result


# ----------------------------------------------------------------------------- config


def test_vision_presets_hold_the_recipes_values():
    base = C.resolve("pretrain", preset="vision-base")
    assert base.modality == "images"
    # The section (plus model.version, which picks the generation) is the model's ViT-B/16.
    assert {**C.to_dict(base.vision), "version": base.model.version} == C.to_dict(vision_base())
    o = base.objective
    assert (o.average_top_k_layers, o.layer_target_norm, o.final_target_norm, o.loss_beta) == (6, "layer", "layer", 2.0)
    assert ema_decay_at(0, o) == ema_decay_at(400_000, o) == 0.9998  # constant from update 0
    assert (base.optim.lr, base.optim.weight_decay, base.optim.clip_norm, base.optim.betas) == (2e-3, 0.05, 3.0,
                                                                                                   (0.9, 0.999))
    assert (base.masking.block_patches, base.masking.block_min_patches, base.masking.block_min_aspect) == (120, 16, 0.3)
    unit = engine.image_batch_unit(base)
    assert unit.accumulation(1) == 16 and unit.describe(CPU, 16) == \
        "2048 images/update = 1 CPU process x 128 images x 16 accumulation"
    large = C.resolve("pretrain", preset="vision-large")
    assert (large.vision.num_layers, large.vision.embed_dim, large.vision.layer_scale_init) == (24, 1024, 1e-5)
    assert large.train.images_per_update == 4096 and large.optim.lr == 1e-3
    with pytest.raises(C.ConfigError, match="masking.block_patches"):
        C.resolve("pretrain", preset="vision-tiny", overrides=["masking.block_patches=64"])
    with pytest.raises(C.ConfigError, match="vision.num_layers"):
        C.resolve("pretrain", preset="vision-tiny", overrides=["objective.average_top_k_layers=5"])


def test_config_show_prints_the_vision_preset():
    result = CliRunner().invoke(app, ["config", "show", "--preset", "vision-base"])
    assert result.exit_code == 0, result.output
    assert "vision.embed_dim" in result.output and "train.images_per_update" in result.output


def test_weight_decay_spares_biases_norms_and_cls_token_but_not_mask_token():
    cfg = tiny_cfg()
    task = VisionPretrainTask(cfg, torch.device("cpu"))
    opt = build_optimizer(task.model.parameters(), cfg.optim, torch.device("cpu"), task.model.named_parameters())
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n: id(p) in decayed for n, p in task.model.named_parameters()}
    assert not names["encoder.cls_token"] and not names["norm.weight"] and not names["lm_head.bias"]
    assert not names["encoder.blocks.0.gamma_1"] and not names["encoder.blocks.0.attn.q_bias"]
    assert names["encoder.mask_token"] and names["encoder.rel_pos_bias.relative_position_bias_table"]
    assert names["encoder.blocks.0.attn.qkv.weight"] and names["encoder.patch_embed.proj.weight"]


# ----------------------------------------------------------------------------- data


def test_batches_are_keyed_by_seed_epoch_and_index_in_any_worker(image_ws):
    loader = build_image_loader(tiny_cfg(), image_ws, CPU)
    before = torch.get_rng_state()
    a = loader.make_batch(loader.batches(1)[3], 1, 3)
    assert torch.equal(torch.get_rng_state(), before)  # the augmentation leaves the caller's RNG alone
    assert a.source.shape == (8, 3, 32, 32) and a.num_samples == 8 and a.target.shape == (8,)
    torch.testing.assert_close(loader.make_batch(loader.batches(1)[3], 1, 3).source, a.source, rtol=0, atol=0)
    assert not torch.equal(loader.make_batch(loader.batches(1)[3], 2, 3).source, a.source)  # new epoch, new crops
    assert len(loader.batches(1)) == 12  # 100 images // 8, the short last batch dropped
    assert not np.array_equal(np.concatenate(loader.batches(1)), np.concatenate(loader.batches(2)))  # reshuffled
    loader.num_workers = 2  # decoding in DataLoader workers gives the same pixels
    from_workers = [b.source for b in loader]
    loader.num_workers, loader.position = 0, type(loader.position)()
    in_process = [b.source for b in loader]
    assert len(from_workers) == len(in_process) == 12
    for x, y in zip(from_workers, in_process):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ----------------------------------------------------------------------------- the objective


def test_step_targets_and_loss_equal_a_direct_computation(image_ws):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    task = VisionPretrainTask(cfg, torch.device("cpu"))
    with torch.no_grad():  # a teacher unlike the student, so a swapped forward cannot pass
        for p in task.teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(build_image_loader(cfg, image_ws, CPU)))
    out = task.train_step(task.model, batch, 0)
    # The same numbers by hand: the batch's block masks, the teacher's end-of-block outputs on the
    # unmasked image (CLS dropped), LayerNorm per layer, the average of vision-tiny's top 4 (all its blocks),
    # LayerNorm, smooth L1 (beta 2) mean.
    rng = batch_rng(cfg.train.seed, batch.epoch, batch.index, STREAM_MASK)
    mask = torch.from_numpy(block_masks(rng, 8, (8, 8), mask_params(cfg.masking)))
    assert 0 < int(mask.sum()) <= 8 * 39
    with torch.no_grad():
        x = task.teacher.module.encoder.patch_embed(batch.source)
        x = torch.cat([task.teacher.module.encoder.cls_token.expand(8, -1, -1), x], 1)
        bias = task.teacher.module.encoder.rel_pos_bias()
        layers = []
        for block in task.teacher.module.encoder.blocks:
            x = block(x, bias)
            layers.append(x[:, 1:])

        def ln(t):
            return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)

        assert cfg.objective.average_top_k_layers == 4
        target = ln((ln(layers[0]) + ln(layers[1]) + ln(layers[2]) + ln(layers[3])) / 4)[mask]
        pred = task.model(batch.source, mask)[mask]
    expect = F.smooth_l1_loss(pred, target, beta=2.0)  # mean over every element of the masked patches
    assert out.sample_size == int(mask.sum()) * 64
    torch.testing.assert_close(out.loss.detach() / out.sample_size, expect, rtol=1e-5, atol=1e-7)
    assert float(out.metrics["masked_share"]) == pytest.approx(float(mask.float().mean()))


def test_teacher_is_an_ema_of_the_whole_model_stepped_once_per_update(image_ws):
    cfg = tiny_cfg("train.max_updates=1", "schedule.warmup_updates=0")  # 2 micro-batches, lr > 0
    torch.manual_seed(0)
    task = VisionPretrainTask(cfg, torch.device("cpu"))
    init = {k: v.clone() for k, v in task.model.state_dict().items()}
    loader = build_image_loader(cfg, image_ws, CPU)
    run = prepare_run(image_ws, "vision-ema", cfg, False, CPU)
    assert engine.train(cfg, task, loader, run, CPU, batch=engine.image_batch_unit(cfg)).step == 1
    assert loader.state_dict() == {"epoch": 1, "consumed": 2}
    student, teacher = task.model.state_dict(), task.teacher.state_dict()
    assert set(teacher) == set(student)  # patch embedding, tokens, position table, blocks, norm, lm_head
    d = ema_decay_at(1, cfg.objective)
    for name in ("encoder.patch_embed.proj.weight", "encoder.cls_token", "encoder.mask_token",
                 "encoder.rel_pos_bias.relative_position_bias_table", "encoder.blocks.3.mlp.fc2.weight",
                 "norm.weight", "lm_head.weight"):
        assert not torch.equal(student[name], init[name]), name
    for name in teacher:
        torch.testing.assert_close(teacher[name], d * init[name] + (1 - d) * student[name])


def test_activation_checkpointing_gives_the_same_gradients(image_ws):
    from d2vcli.speedups import set_activation_checkpointing

    cfg = tiny_cfg("vision.drop_path=0.3")  # drop path on: the recomputation must replay its draws
    task = VisionPretrainTask(cfg, torch.device("cpu"))
    batch = next(iter(build_image_loader(cfg, image_ws, CPU)))

    def grads(checkpointing: bool) -> dict:
        assert set_activation_checkpointing(task.model, checkpointing) == 1  # the student's ViT
        task.model.zero_grad()
        torch.manual_seed(5)
        task.train_step(task.model, batch, 0).loss.backward()
        return {n: p.grad.clone() for n, p in task.model.named_parameters()}

    plain, recomputed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- runs


def test_short_run_loss_falls_and_the_checkpoint_loads(straight_run):
    curve = losses(straight_run.run_dir)
    assert len(curve) == 12
    assert sum(curve[-3:]) / 3 < 0.9 * sum(curve[:3]) / 3
    rows = read_jsonl(straight_run.run_dir / "metrics.jsonl")
    assert {"target_std", "pred_std", "ema_decay", "images_per_s", "masked_share"} <= set(rows[0])
    assert "audio_s_per_s" not in rows[0]
    loaded = load_model(straight_run.checkpoint, expect_kind="vision-pretrain")
    assert loaded.kind == "vision-pretrain"
    state = ckpt.load_checkpoint(straight_run.checkpoint)
    assert state[ckpt.STEP_KEY] == 12 and state[ckpt.ENGINE_KEY]["images"] == 12 * 16
    assert set(state[ckpt.TEACHER_KEY]) == set(state[ckpt.MODEL_KEY])
    assert sorted(p.name for p in straight_run.run_dir.glob("step-*.pt")) == ["step-12.pt", "step-6.pt"]


def test_resume_reproduces_the_straight_run_exactly(straight_run, image_ws):
    assert_resume_matches(straight_run, image_ws, tiny_cfg(), "vision-split", stop_at=5)  # 12 updates


def test_two_processes_match_one_process_with_accumulation(image_ws):
    steps = ["train.max_updates=3"]
    one = pretrain(tiny_cfg(*steps), image_ws, name="vision-ddp-one")
    assert one.status == "done"
    env = dict(os.environ, OMP_NUM_THREADS="1", D2V_PROGRESS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "d2vcli", "pretrain", "--preset", "vision-tiny", "--name", "vision-ddp-two",
           "--workdir", str(image_ws.root)]
    for item in TINY_SET + steps:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "16 images/update = 2 CPU processes x 8 images x 1 accumulation" in proc.stdout
    two = losses(image_ws.run_dir("vision-ddp-two"))
    assert len(two) == 3
    assert two == pytest.approx(losses(one.run_dir), rel=1e-5, abs=1e-6)


def test_collapse_guard_stops_with_the_images_fixes(image_ws):
    cfg = tiny_cfg("objective.collapse_check_after=2", "objective.min_target_std=50", "train.max_updates=6")
    result = pretrain(cfg, image_ws, name="vision-collapse")
    assert result.status == "stopped" and result.step == 2
    assert "target_std" in result.message and "train.images_per_update" in result.message


def test_an_unreadable_image_is_skipped_named_and_limited(image_ws, tmp_path):
    from d2vcli.data import DataError
    from d2vcli.fileio import atomic_write_jsonl
    from d2vcli.prepare.images import image_manifest
    from d2vcli.workspace import Workspace

    ws = Workspace.resolve(tmp_path / "ws")
    rows = read_jsonl(image_manifest(image_ws, "pool"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")  # emptied after prepare checked it
    rows[0] = {**rows[0], "path": str(broken)}
    image_manifest(ws, "pool").parent.mkdir(parents=True)
    atomic_write_jsonl(image_manifest(ws, "pool"), rows)
    result = pretrain(tiny_cfg("train.max_updates=12"), ws, name="bad-image")
    assert result.status == "done"
    assert "1 unreadable image file(s) skipped" in result.message and str(broken) in result.message
    assert "d2v prepare images" in result.message
    with pytest.raises(DataError, match="data.max_bad_files=0"):
        pretrain(tiny_cfg("train.max_updates=12", "data.max_bad_files=0"), ws, name="bad-image-strict")


def test_missing_image_manifests_name_the_prepare_commands(tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--preset", "vision-tiny", "--workdir", str(tmp_path / "w")])
    assert result.exit_code == 2, result.output
    assert "d2v prepare synthetic-images" in result.output and "d2v prepare images" in result.output
    assert "pool" in result.output
    assert not (tmp_path / "w" / "runs").exists(), "nothing is created before the data is there"
