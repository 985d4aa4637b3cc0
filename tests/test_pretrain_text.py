"""data2vec 1.0 text pretraining through the engine: presets, targets, loss, EMA scope, resume.

The batches come from a small in-test source of random token blocks with the interface of
text_data.TextBlockLoader (right-padded `<s> ... </s>` blocks, keyed by epoch and index,
resumable position), so the task is tested on its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from d2vcli import config as C
from d2vcli import engine
from d2vcli.data import STREAM_MASK, batch_rng
from d2vcli.fileio import read_jsonl
from d2vcli.objective.teacher import ema_decay_at
from d2vcli.objective.text_masking import mask_tokens
from d2vcli.pretrain_text import TextPretrainTask, mask_params, text_arch
from d2vcli.run_dir import prepare_run
from d2vcli.schedule import lr_at
from d2vcli.workspace import Workspace
from pretrain_text_helpers import (CPU, MASK_ID, PAD, SPECIALS, VOCAB, RandomBlocks, assert_resume_is_exact,
                                   direct_ffn_outputs)


TINY = ["text.embed_dim=32", "text.num_layers=3", "text.num_heads=4", "text.ffn_dim=64", "text.max_positions=32",
        "text.dropout=0.0", "text.attention_dropout=0.0", "objective.average_top_k_layers=2",
        "data.tokens_per_sample=32", "data.text_tokens_per_batch=128", "train.tokens_per_update=256",
        "train.max_updates=4", "train.log_every=1", "train.save_every=2", "schedule.warmup_updates=1",
        "optim.lr=0.002", "objective.ema_decay=0.9", "objective.ema_end_decay=0.99",
        "objective.ema_anneal_end_step=4"]


def tiny_cfg(*extra: str) -> C.Config:
    return C.resolve("pretrain", preset="text-base", overrides=TINY + list(extra))


def make_task(cfg: C.Config) -> TextPretrainTask:
    torch.manual_seed(0)
    return TextPretrainTask(cfg, torch.device("cpu"), text_arch(cfg, VOCAB, MASK_ID), SPECIALS)


# ----------------------------------------------------------------------------- config


def test_text_base_preset_holds_the_recipes_values():
    cfg = C.resolve("pretrain", preset="text-base")
    assert cfg.modality == "text"
    t = cfg.text
    assert (t.num_layers, t.embed_dim, t.num_heads, t.ffn_dim, t.max_positions) == (12, 768, 12, 3072, 512)
    assert (t.dropout, t.attention_dropout, t.activation_dropout, t.layer_norm_eps) == (0.1, 0.1, 0.0, 1e-5)
    m, o = cfg.masking, cfg.objective
    assert (m.mask_prob, m.mask_length, m.leave_unmasked_prob, m.random_token_prob) == (0.35, 4, 0.0, 0.0)
    assert (o.average_top_k_layers, o.layer_target_norm, o.final_target_norm, o.loss_beta, o.loss_scale) == (
        10, "layer", "none", 4.0, 1.0)
    assert ema_decay_at(0, o) == 0.999 and ema_decay_at(150_000, o) == pytest.approx(0.99945)
    assert ema_decay_at(300_000, o) == ema_decay_at(900_000, o) == 0.9999
    assert o.text_teacher_input == "unmasked"
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.clip_norm) == (
        2e-4, (0.9, 0.98), 1e-6, 0.01, 5.0)
    assert (cfg.schedule.kind, cfg.schedule.warmup_updates, cfg.train.max_updates) == ("cosine", 10_000, 1_000_000)
    unit = engine.text_batch_unit(cfg)
    assert unit.accumulation(1) == 16 and unit.accumulation(16) == 1  # 131,072 tokens = 16 x 8192
    with pytest.raises(C.ConfigError, match="text.num_layers"):
        C.resolve("pretrain", preset="text-base", overrides=["objective.average_top_k_layers=13"])
    with pytest.raises(C.ConfigError, match="random_token_prob"):
        C.resolve("pretrain", preset="text-base", overrides=["masking.random_token_prob=0.7",
                                                              "masking.leave_unmasked_prob=0.7"])


def test_text_arch_takes_the_tokenizers_vocabulary_and_refuses_a_mismatch():
    cfg = tiny_cfg()
    arch = text_arch(cfg, VOCAB, MASK_ID)
    assert (arch.vocab_size, arch.mask_id, arch.pad_id, arch.num_layers) == (VOCAB, MASK_ID, PAD, 3)
    with pytest.raises(C.ConfigError, match="tokenizer has 60 ids"):
        text_arch(tiny_cfg("text.vocab_size=50265"), VOCAB, MASK_ID)
    with pytest.raises(C.ConfigError, match="text.mask_id=-1"):
        text_arch(tiny_cfg("text.mask_id=4"), VOCAB, MASK_ID)


# ----------------------------------------------------------------------------- the objective


def test_step_targets_and_loss_equal_a_direct_computation():
    cfg = tiny_cfg()
    task = make_task(cfg)
    with torch.no_grad():  # a teacher unlike the student, so a swapped forward cannot pass
        for p in task.teacher.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loader = RandomBlocks()
    batch = loader.make_batch(loader.batches(1)[2], 1, 2)
    assert batch.padding_mask is not None
    task.model.eval()  # no dropout anyway (tiny config), eval keeps the comparison exact
    out = task.train_step(task.model, batch, 0)
    # By hand: the batch's span masks, the teacher's FFN outputs on the UNMASKED tokens, layer norm per layer
    # (no affine), the top-2 average, smooth L1 (beta 4) summed per token, averaged over masked tokens.
    rng = batch_rng(cfg.train.seed, batch.epoch, batch.index, STREAM_MASK)
    masked, mask = mask_tokens(batch.source, batch.padding_mask, rng, mask_params(cfg.masking), SPECIALS, VOCAB,
                               MASK_ID)
    assert 0 < int(mask.sum()) and not mask[batch.padding_mask].any()
    with torch.no_grad():
        teacher = task.teacher.module
        features = teacher.embed(batch.source) * (~batch.padding_mask).unsqueeze(-1)  # (B, T, D)
        layers = direct_ffn_outputs(teacher.layers, features, batch.padding_mask)

        def ln(t):
            return (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)

        target = ((ln(layers[1]) + ln(layers[2])) / 2)[mask]
        pred = task.model(masked, batch.padding_mask)[mask]
    expect = F.smooth_l1_loss(pred, target, beta=4.0, reduction="none").sum(-1).mean()
    assert out.sample_size == int(mask.sum())  # masked tokens, not elements
    torch.testing.assert_close(out.loss.detach() / out.sample_size, expect, rtol=1e-5, atol=1e-6)
    real = int((~batch.padding_mask).sum())
    assert float(out.metrics["masked_share"]) == pytest.approx(int(mask.sum()) / real)


def test_masked_only_teacher_reads_just_the_masked_tokens_renumbered():
    cfg = tiny_cfg("objective.text_teacher_input=masked-only")
    task = make_task(cfg)
    loader = RandomBlocks()
    batch = loader.make_batch(loader.batches(1)[0], 1, 0)
    _, mask = task.mask(batch)
    tokens, padding_mask = task.teacher_input(batch.source, batch.padding_mask, mask)
    assert padding_mask is None  # taken from the pads, as fairseq's key-padding mask is
    assert torch.equal(tokens[mask], batch.source[mask]) and (tokens[~mask] == PAD).all()
    with torch.no_grad():
        got = task.targets(tokens, padding_mask)[mask]
        # The released code's teacher: only the masked tokens, packed together with positions 2, 3, ...
        for b in range(tokens.shape[0]):
            kept = batch.source[b][mask[b]].unsqueeze(0)
            if kept.numel():
                alone = task.targets(kept, None)[0]
                torch.testing.assert_close(got[mask[:b].sum():mask[:b + 1].sum()], alone, rtol=1e-5, atol=1e-5)
        full = task.targets(batch.source, batch.padding_mask)[mask]
    assert not torch.allclose(got, full, atol=1e-3)


def test_teacher_averages_the_layers_and_copies_the_embeddings(tmp_path):
    cfg = tiny_cfg("train.max_updates=1", "schedule.warmup_updates=0")  # 2 micro-batches, lr > 0
    task = make_task(cfg)
    init = {k: v.clone() for k, v in task.model.encoder.state_dict().items()}
    loader = RandomBlocks()
    ws = Workspace.resolve(tmp_path / "ws")
    run = prepare_run(ws, "text-ema", cfg, False, CPU)
    result = engine.train(cfg, task, loader, run, CPU, batch=engine.text_batch_unit(cfg))
    assert result.status == "done" and result.step == 1
    assert loader.state_dict() == {"epoch": 1, "consumed": 2}  # 256 tokens per update / 128 per micro-batch
    student, teacher = task.model.encoder.state_dict(), task.teacher.state_dict()
    assert set(teacher) == set(student)  # the encoder only: no regression head in the teacher
    d = ema_decay_at(1, cfg.objective)
    copied = [k for k in teacher if k.startswith("embed.")]
    assert sorted(copied) == ["embed.embed_positions.weight", "embed.embed_tokens.weight",
                              "embed.layernorm_embedding.bias", "embed.layernorm_embedding.weight"]
    for name in teacher:
        assert not torch.equal(student[name], init[name]), name
        if name in copied:
            torch.testing.assert_close(teacher[name], student[name], rtol=0, atol=0)
        else:
            torch.testing.assert_close(teacher[name], d * init[name] + (1 - d) * student[name])
    row = [r for r in read_jsonl(run.dir / "metrics.jsonl") if "loss" in r][0]
    assert np.isfinite(row["loss"]) and row["target_std"] > 0 and "tokens_per_s" in row


def test_resume_reproduces_the_straight_run_exactly(tmp_path):
    cfg = tiny_cfg()
    assert_resume_is_exact(Workspace.resolve(tmp_path / "ws"), cfg, make_task)


def test_glue_presets_hold_robertas_finetuning_recipe_and_polynomial_decays_linearly():
    cfg = C.resolve("finetune", preset="glue-base")
    assert cfg.modality == "text"
    assert (cfg.optim.betas, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.clip_norm) == ((0.9, 0.98), 1e-6, 0.1,
                                                                                           0.0)
    assert (cfg.text.dropout, cfg.text.attention_dropout, cfg.text.pooler_dropout) == (0.1, 0.1, 0.0)
    assert (cfg.optim.lr, cfg.schedule.warmup_updates, cfg.train.max_updates) == (1e-5, 1256, 20935)  # SST-2's row
    assert cfg.schedule.warmup_updates / cfg.train.max_updates == pytest.approx(0.06, abs=0.001)
    tiny = C.resolve("finetune", preset="glue-tiny")
    assert tiny.schedule.kind == "polynomial" and tiny.schedule.warmup_updates / tiny.train.max_updates == 0.06
    s = cfg.schedule
    assert lr_at(0, 1.0, s, 1000 + 1256) == pytest.approx(1 / 1256)  # fairseq's first warmup factor
    assert lr_at(628, 1.0, s, 2256) == pytest.approx(0.5)
    assert lr_at(1256, 1.0, s, 2256) == pytest.approx(1.0)
    assert lr_at(1756, 1.0, s, 2256) == pytest.approx(0.5)  # linear, not cosine or exponential
    assert lr_at(2256, 1.0, s, 2256) == 0.0 == lr_at(5000, 1.0, s, 2256)


def test_d2v_pretrain_text_tiny_runs_on_the_synthetic_corpus_and_saves_a_loadable_model(tmp_path):
    from d2vcli.models.loading import load_model
    from d2vcli.prepare.synthetic_text import prepare_synthetic_text
    from d2vcli.pretrain import pretrain
    from d2vcli.text_data import Tokenizer

    ws = Workspace.resolve(tmp_path / "ws")
    prepare_synthetic_text(ws, size="tiny", workers=1)
    cfg = C.resolve("pretrain", preset="text-tiny", overrides=["train.max_updates=3", "train.save_every=3",
                                                              "train.tokens_per_update=2048", "train.log_every=1"])
    result = pretrain(cfg, ws, name="text-tiny")
    assert result.status == "done" and result.step == 3, result.message
    loaded = load_model(ws.run_dir("text-tiny") / "last.pt", expect_kind="text-pretrain")
    tok = Tokenizer.load(ws.data_dir / "text" / "spm.model")
    arch = loaded.model.encoder.cfg
    assert (arch.vocab_size, arch.mask_id, arch.num_layers, arch.embed_dim) == (tok.vocab_size, tok.mask_id, 2, 64)
    assert set(loaded.state["teacher"]) == set(loaded.model.encoder.state_dict())
    rows = [r for r in read_jsonl(ws.run_dir("text-tiny") / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    with pytest.raises(C.ConfigError, match="tokenizer has"):
        pretrain(C.resolve("pretrain", preset="text-tiny", overrides=["text.vocab_size=1000"]), ws, name="bad")
    assert not ws.run_dir("bad").exists()  # refused before the run folder is made


def test_pretrain_text_without_a_corpus_says_what_to_run(tmp_path):
    from typer.testing import CliRunner

    from d2vcli.cli import app

    result = CliRunner().invoke(app, ["pretrain", "--preset", "text-tiny", "--workdir", str(tmp_path / "empty")])
    assert result.exit_code == 2, result.output
    assert "d2v prepare text" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["pretrain", "--preset", "text-tiny", "--workdir", str(tmp_path / "empty"),
                                      "--set", "data.tokens_per_sample=256"])
    assert result.exit_code == 2 and "text.max_positions" in result.output, result.output


def test_activation_checkpointing_gives_the_same_gradients():
    from d2vcli.speedups import set_activation_checkpointing

    cfg = tiny_cfg("text.dropout=0.1", "text.attention_dropout=0.1")  # dropout on: recomputation must replay it
    task = make_task(cfg)
    loader = RandomBlocks()
    batch = loader.make_batch(loader.batches(1)[1], 1, 1)

    def grads(checkpointing: bool) -> dict:
        assert set_activation_checkpointing(task.model, checkpointing) == 1  # the student's layer stack
        task.model.zero_grad()
        torch.manual_seed(5)
        task.train_step(task.model, batch, 0).loss.backward()
        return {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}

    plain, recomputed = grads(False), grads(True)
    assert set(plain) == set(recomputed) and len(plain) == len(list(task.model.parameters()))
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_the_text_section_has_exactly_the_models_fields_with_its_defaults():
    from d2vcli.models.text import TextConfig, text_base

    section = C.to_dict(C.TextModelConfig())
    # `version` is model.version's (data2vec 1.0 or 2.0, as for images), written into the arch by text_arch.
    assert set(section) | {"version"} == set(TextConfig.__dataclass_fields__)
    base = C.to_dict(text_base())
    base.pop("version")
    tokenizer_fields = {"vocab_size", "mask_id"}  # 0 / -1: taken from the corpus's tokenizer
    assert {k: v for k, v in section.items() if k not in tokenizer_fields} == \
        {k: v for k, v in base.items() if k not in tokenizer_fields}


def test_teacher_ema_embeddings_averages_the_embeddings_like_the_layers(tmp_path):
    cfg = tiny_cfg("train.max_updates=1", "schedule.warmup_updates=0", "objective.teacher_ema_embeddings=true")
    task = make_task(cfg)
    init = {k: v.clone() for k, v in task.model.encoder.state_dict().items()}
    run = prepare_run(Workspace.resolve(tmp_path / "ws"), "text-ema-all", cfg, False, CPU)
    result = engine.train(cfg, task, RandomBlocks(), run, CPU, batch=engine.text_batch_unit(cfg))
    assert result.status == "done" and result.step == 1
    student, teacher = task.model.encoder.state_dict(), task.teacher.state_dict()
    d = ema_decay_at(1, cfg.objective)
    for name in teacher:  # the embeddings included: nothing is copied
        assert not torch.equal(teacher[name], student[name]), name
        torch.testing.assert_close(teacher[name], d * init[name] + (1 - d) * student[name])
    assert "EMA of the whole encoder" in task.teacher_scope


def test_targets_that_only_encode_position_trip_the_position_guard():
    cfg = tiny_cfg("objective.collapse_check_after=0", "objective.max_position_share=0.8", "objective.min_pred_std=0")
    task = make_task(cfg)
    loader = RandomBlocks()
    batch = loader.make_batch(loader.batches(0)[0], 0, 0)
    healthy = task.train_step(task.model, batch, step=0).metrics  # log_every 1: every step is a log step
    assert 0 <= float(healthy["target_position_share"]) < 0.8
    assert task.stop_reason(0, {k: float(v) for k, v in healthy.items()}) is None
    with torch.no_grad():  # a teacher blind to the tokens: its targets are a function of position alone
        task.teacher.module.embed.embed_tokens.weight.zero_()
    collapsed = {k: float(v) for k, v in task.train_step(task.model, batch, step=0).metrics.items()}
    assert collapsed["target_position_share"] > 0.95
    message = task.stop_reason(0, collapsed)
    assert "target_position_share" in message and "objective.max_position_share 0.8" in message
    assert "objective.teacher_ema_embeddings=true" in message
