"""data2vec 2.0 text pretraining (`model.version: 2`, `modality: text`): masks, student, decoder, targets,
loss, EMA scope, the engine, exact resume, and fine-tuning / HF export of the checkpoint.

Batches come from an in-test source of random `<s> ... </s>` blocks with TextBlockLoader's interface
(right-padded, keyed by epoch and index, resumable; test_pretrain_text's), so the task is tested on its own.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli import engine
from d2vcli.data import STREAM_MASK, batch_rng
from d2vcli.fileio import read_jsonl
from d2vcli.models.audio2 import restore_masked
from d2vcli.models.text2 import Data2Vec2TextPretrainModel
from d2vcli.objective.masking import compute_random_mask
from d2vcli.objective.teacher import ema_decay_at
from d2vcli.pretrain_text import text_arch
from d2vcli.pretrain_text2 import Text2PretrainTask
from d2vcli.run_dir import prepare_run
from d2vcli.workspace import Workspace
from pretrain_text_helpers import (CPU, MASK_ID, SPECIALS, VOCAB, RandomBlocks, assert_resume_is_exact,
                                   direct_ffn_outputs)

TINY = ["text.embed_dim=32", "text.num_layers=3", "text.num_heads=4", "text.ffn_dim=64", "text.max_positions=32",
        "text.decoder_dim=32", "text.decoder_layers=2", "text.decoder_kernel=5", "text.dropout=0.0",
        "text.attention_dropout=0.0", "text.decoder_dropout=0.0", "objective.average_top_k_layers=3",
        "masking.clone_batch=3", "data.tokens_per_sample=32", "data.text_tokens_per_batch=128",
        "train.tokens_per_update=256", "train.max_updates=4", "train.log_every=1", "train.save_every=2",
        "schedule.warmup_updates=1", "optim.lr=0.002", "objective.ema_decay=0.9", "objective.ema_end_decay=0.99",
        "objective.ema_anneal_end_step=4"]


def tiny_cfg(*extra: str) -> C.Config:
    return C.resolve("pretrain", preset="text2-base", overrides=TINY + list(extra))


def make_task(cfg: C.Config) -> Text2PretrainTask:
    torch.manual_seed(0)
    return Text2PretrainTask(cfg, torch.device("cpu"), text_arch(cfg, VOCAB, MASK_ID), SPECIALS)


def a_batch(index: int = 2):
    loader = RandomBlocks()
    batch = loader.make_batch(loader.batches(1)[index], 1, index)
    assert batch.padding_mask is not None
    return batch


# ----------------------------------------------------------------------------- config


def test_text2_base_preset_holds_the_recipes_values():
    cfg = C.resolve("pretrain", preset="text2-base")
    assert (cfg.modality, cfg.model.version) == ("text", 2)
    t, m, o = cfg.text, cfg.masking, cfg.objective
    assert (t.num_layers, t.embed_dim, t.num_heads, t.max_positions, t.dropout, t.layer_norm_eps) == (
        12, 768, 12, 512, 0.1, 1e-5)
    assert (t.decoder_dim, t.decoder_layers, t.decoder_kernel, t.decoder_groups, t.decoder_dropout) == (
        768, 5, 9, 1, 0.1)
    assert (m.mask_prob, m.mask_length, m.clone_batch) == (0.48, 1, 8)
    assert (o.average_top_k_layers, o.layer_target_norm, o.final_target_norm, o.loss_beta, o.loss_scale) == (
        12, "instance", "none", 0.0, 1.0)
    assert ema_decay_at(0, o) == 0.9999 and ema_decay_at(100_000, o) == ema_decay_at(500_000, o) == 0.99999
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.clip_norm) == (
        2e-4, (0.9, 0.98), 1e-6, 0.01, 1.0)
    assert (cfg.schedule.kind, cfg.schedule.warmup_updates, cfg.train.max_updates) == ("cosine", 4000, 1_000_000)
    unit = engine.text_batch_unit(cfg)  # 64 blocks of 512 = 16 GPUs x 4 blocks
    assert cfg.train.tokens_per_update == 64 * 512 and unit.accumulation(16) == 1 and unit.accumulation(1) == 16
    with pytest.raises(C.ConfigError, match="masking.mask_length=1"):
        C.resolve("pretrain", preset="text2-base", overrides=["masking.mask_length=4"])
    tiny = C.resolve("pretrain", preset="text2-tiny")
    assert (tiny.model.version, tiny.masking.mask_prob, tiny.objective.loss_scale) == (2, 0.48, 1.0)


# ----------------------------------------------------------------------------- masks


def test_random_masks_keep_exactly_int_t_times_0_52_per_clone_and_follow_the_batch():
    mask = compute_random_mask(64, 512, 0.48, np.random.default_rng(0))
    assert ((~mask).sum(1) == 266).all()  # int(512 x 0.52) kept, 246 masked, in every row (fairseq's len_keep)
    assert not (mask == mask[0]).all()  # each row its own permutation
    assert abs(mask[:, 0].mean() - 0.48) < 0.1 and abs(mask[:, -1].mean() - 0.48) < 0.1  # no positional bias
    cfg = tiny_cfg()
    task = make_task(cfg)
    batch = a_batch()
    A, T = batch.source.shape
    m = task.mask(batch)
    assert m.shape == (A * 3, T) and ((~m).sum(1) == int(T * (1 - 0.48))).all()
    assert torch.equal(m, make_task(cfg).mask(batch))  # deterministic: keyed by (seed, epoch, index)
    rng = batch_rng(cfg.train.seed, batch.epoch, batch.index, STREAM_MASK)
    assert torch.equal(m, torch.from_numpy(compute_random_mask(A * 3, T, 0.48, rng)))
    assert not torch.equal(m, task.mask(dataclasses.replace(batch, index=batch.index + 1)))  # another batch
    # Padding is not looked at (the recipe): some padded positions are masked across the clones.
    pad = batch.padding_mask.repeat_interleave(3, 0)
    assert m[pad].any()


# ----------------------------------------------------------------------------- the student


def test_the_student_encodes_only_the_kept_tokens():
    cfg = tiny_cfg()
    task = make_task(cfg)
    model = task.model.eval()
    batch = a_batch()
    mask = task.mask(batch)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    with torch.no_grad():
        out = model(batch.source, batch.padding_mask, mask, g())
        A, T = batch.source.shape
        keep = int(T * (1 - 0.48))
        assert out["encoded"].shape == (A * 3, keep, 32) and out["clones"] == 3
        assert out["pred"].shape == (int(mask.sum()), 32) and out["features"].shape == (A, T, 32)
        # A token masked in every clone of its sequence is never read: changing it changes no encoder output.
        hidden = mask.view(A, 3, T).all(1) & ~batch.padding_mask  # (A, T)
        assert hidden.any()
        changed = batch.source.masked_fill(hidden, 7)
        assert not torch.equal(changed, batch.source)
        out2 = model(changed, batch.padding_mask, mask, g())
        torch.testing.assert_close(out2["encoded"], out["encoded"], rtol=0, atol=0)
        torch.testing.assert_close(out2["pred"], out["pred"], rtol=0, atol=0)
        # ... while a kept one does.
        seen = ~mask.view(A, 3, T).any(1) & ~batch.padding_mask & batch.source.ne(7)
        out3 = model(batch.source.masked_fill(seen, 7), batch.padding_mask, mask, g())
        assert not torch.allclose(out3["encoded"], out["encoded"])


def test_the_decoder_has_no_residual_a_two_layer_projection_and_predicts_every_position():
    cfg = C.resolve("pretrain", preset="text2-base").text
    arch = text_arch(C.resolve("pretrain", preset="text2-base"), VOCAB, MASK_ID)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Data2Vec2TextPretrainModel(arch).decoder.state_dict().items()}
    assert shapes == {**{f"blocks.{i}.conv.weight": (768, 768, 9) for i in range(5)},
                      **{f"blocks.{i}.conv.bias": (768,) for i in range(5)},
                      "proj.0.weight": (1536, 768), "proj.0.bias": (1536,),
                      "proj.2.weight": (768, 1536), "proj.2.bias": (768,)}
    assert cfg.decoder_groups == 1
    torch.manual_seed(0)
    dec = make_task(tiny_cfg()).model.decoder.eval()  # text2's decoder: 2 blocks of 32, kernel 5
    x = torch.randn(2, 6, 32)
    mask = torch.from_numpy(compute_random_mask(2, 12, 0.5, np.random.default_rng(1)))
    with torch.no_grad():
        got = dec(x, mask, torch.Generator().manual_seed(5))
        h = restore_masked(x, mask, torch.Generator().manual_seed(5))  # (2, 12, 32), noise at the masked
        assert torch.equal(h[~mask], x.reshape(-1, 32))
        for block in dec.blocks:  # Conv1d -> LayerNorm (no affine) -> GELU, nothing added back
            c = F.conv1d(h.transpose(1, 2), block.conv.weight, block.conv.bias, padding=2).transpose(1, 2)
            h = F.gelu(F.layer_norm(c, (32,), eps=1e-5))
        expect = dec.proj[2](F.gelu(dec.proj[0](h)))
        assert got.shape == (2, 12, 32)  # every position, masked or not
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)
        dec.residual = True
        assert not torch.allclose(dec(x, mask, torch.Generator().manual_seed(5)), got, atol=1e-3)


# ----------------------------------------------------------------------------- targets, loss, teacher


def test_step_targets_and_loss_equal_a_direct_computation():
    cfg = tiny_cfg()
    task = make_task(cfg)
    with torch.no_grad():  # a teacher unlike the student, so a swapped forward cannot pass
        for p in task.teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = a_batch()
    task.model.eval()
    out = task.train_step(task.model, batch, 0)
    mask = task.mask(batch)
    with torch.no_grad():
        student = task.model(batch.source, batch.padding_mask, mask, task.noise_generator(batch, CPU.device))
        features = task.model.encoder.embed(batch.source) * (~batch.padding_mask).unsqueeze(-1)  # (A, T, D)
        torch.testing.assert_close(student["features"], features)
        layers = direct_ffn_outputs(task.teacher.module, features, batch.padding_mask)

        def instance_norm(y):  # over time per sequence and channel, pads included, biased variance, eps 1e-5
            return (y - y.mean(1, keepdim=True)) / torch.sqrt(y.var(1, unbiased=False, keepdim=True) + 1e-5)

        target = (sum(instance_norm(y) for y in layers) / 3).repeat_interleave(3, 0)[mask]  # all 3 layers
    expect = ((student["pred"] - target) ** 2).sum(-1).mean()  # summed over D, NOT / sqrt(D), mean over masked
    assert out.sample_size == int(mask.sum()) == mask.shape[0] * (mask.shape[1] - int(mask.shape[1] * 0.52))
    torch.testing.assert_close(out.loss.detach() / out.sample_size, expect, rtol=1e-5, atol=1e-6)
    assert float(out.metrics["masked_share"]) == pytest.approx(float(mask.float().mean()))


def test_the_teacher_reads_the_students_dropout_perturbed_embeddings():
    cfg = tiny_cfg("text.dropout=0.3")
    task = make_task(cfg)
    seen, returned = [], []
    layer_results = task.teacher.layer_results
    task.teacher.layer_results = lambda x, pad: seen.append(x) or layer_results(x, pad)
    forward = task.model.forward
    task.model.forward = lambda *a, **k: returned.append(forward(*a, **k)) or returned[-1]
    batch = a_batch()
    task.model.train()
    task.train_step(task.model, batch, 0)
    assert seen[0] is returned[0]["features"]  # the same tensor the clones were cut from
    with torch.no_grad():
        clean = task.model.encoder.embed.eval()(batch.source)
    assert not torch.allclose(seen[0], clean * (~batch.padding_mask).unsqueeze(-1))  # dropout is on


def test_one_update_steps_an_ema_of_the_layers_only(tmp_path):
    cfg = tiny_cfg("train.max_updates=1", "schedule.warmup_updates=0")
    task = make_task(cfg)
    init = {k: v.clone() for k, v in task.model.encoder.layers.state_dict().items()}
    assert set(task.teacher.state_dict()) == set(init)  # the blocks: no embeddings, no decoder
    loader = RandomBlocks()
    ws = Workspace.resolve(tmp_path / "ws")
    run = prepare_run(ws, "t2-ema", cfg, False, CPU)
    result = engine.train(cfg, task, loader, run, CPU, batch=engine.text_batch_unit(cfg))
    assert result.status == "done" and result.step == 1
    assert loader.state_dict() == {"epoch": 1, "consumed": 2}
    student, teacher = task.model.encoder.layers.state_dict(), task.teacher.state_dict()
    d = ema_decay_at(1, cfg.objective)
    for name in teacher:
        assert not torch.equal(student[name], init[name]), name
        torch.testing.assert_close(teacher[name], d * init[name] + (1 - d) * student[name])
    row = [r for r in read_jsonl(run.dir / "metrics.jsonl") if "loss" in r][0]
    assert np.isfinite(row["loss"]) and row["target_std"] > 0 and row["pred_std"] > 0
    state = ckpt.load_checkpoint(run.dir / "last.pt")
    assert state[ckpt.ARCH_KEY]["version"] == 2 and any(k.startswith("decoder.") for k in state[ckpt.MODEL_KEY])


def test_resume_reproduces_the_straight_run_exactly(tmp_path):
    cfg = tiny_cfg("text.dropout=0.1", "text.decoder_dropout=0.1")  # dropout on: its RNG must resume too
    assert_resume_is_exact(Workspace.resolve(tmp_path / "ws"), cfg, make_task)


# ----------------------------------------------------------------------------- the checkpoint downstream


@pytest.fixture(scope="module")
def text2_ws(tmp_path_factory):
    """The tiny synthetic text corpus and a 2-update text2-tiny run `t2` through `d2v pretrain`'s dispatch."""
    from d2vcli.prepare.synthetic_text import prepare_synthetic_text
    from d2vcli.pretrain import pretrain

    torch.set_num_threads(1)
    ws = Workspace.resolve(tmp_path_factory.mktemp("text2") / "ws")
    prepare_synthetic_text(ws, size="tiny", seed=0, workers=1)
    cfg = C.resolve("pretrain", preset="text2-tiny", overrides=[
        "train.max_updates=2", "data.text_tokens_per_batch=1024", "train.tokens_per_update=1024",
        "schedule.warmup_updates=1", "train.save_every=2"])
    result = pretrain(cfg, ws, name="t2")
    assert result.status == "done", result.message
    return ws


def test_finetune_from_a_text2_checkpoint_drops_the_decoder_and_trains(text2_ws):
    from d2vcli.finetune_text import TextClassifyTask, finetune, load_start
    from d2vcli.text_data import read_task

    ws = text2_ws
    pre = ckpt.load_checkpoint(ws.run_dir("t2") / "last.pt")
    assert pre[ckpt.KIND_KEY] == "text-pretrain" and pre[ckpt.ARCH_KEY]["version"] == 2
    ft = ["finetune.init=t2", "finetune.task=agreement", "train.max_updates=4", "finetune.validate_every=2",
          "data.text_sequences_per_batch=16", "train.sequences_per_update=16", "schedule.warmup_updates=1"]
    cfg = C.resolve("finetune", preset="glue-tiny", overrides=ft)
    start = load_start(cfg, ws, 2)
    task = TextClassifyTask(cfg, start, read_task(ws.data_dir / "glue" / "AGREEMENT"), {}, CPU)
    state = task.model.state_dict()
    encoder = {k: v for k, v in pre[ckpt.MODEL_KEY].items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(state[k], v) for k, v in encoder.items())
    assert not any(k.startswith("decoder") for k in state)
    teacher = load_start(C.resolve("finetune", preset="glue-tiny", overrides=ft + ["finetune.init_from=teacher"]),
                         ws, 2)
    assert set(teacher.weights) == set(encoder)  # the student's embeddings, the teacher's layers
    assert all(torch.equal(teacher.weights[f"encoder.layers.{k}"], v) for k, v in pre[ckpt.TEACHER_KEY].items())
    result = finetune(cfg, ws, name="t2-ag", preset="glue-tiny")
    assert result.status == "done" and (ws.run_dir("t2-ag") / "best.pt").exists()


def test_hf_export_of_a_text2_checkpoint_gives_the_same_hidden_states(text2_ws, tmp_path):
    from transformers import Data2VecTextModel

    from d2vcli import interop_text
    from d2vcli.models.loading import load_model

    path = text2_ws.run_dir("t2") / "last.pt"
    interop_text.export_hf(path, tmp_path / "hf")
    hf, info = Data2VecTextModel.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                 attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = load_model(path, expect_kind="text-pretrain").model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, ours.encoder.cfg.vocab_size - 1, (3, 20), generator=g)
    tokens[:, 0] = 0
    tokens[1, 14:] = 1
    attention = tokens.ne(1).long()
    with torch.no_grad():
        ref = hf.eval()(input_ids=tokens, attention_mask=attention).last_hidden_state
        got = ours.encoder(tokens, tokens.eq(1)).x
    real = attention.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-4)
