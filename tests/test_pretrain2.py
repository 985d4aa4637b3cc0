"""data2vec 2.0 pretraining (model.version 2): the model's gather, ALiBi, teacher, EMA, loss, runs, resume, DDP.

Run: python -m pytest -q tests/test_pretrain2.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli import distributed
from d2vcli.fileio import read_jsonl
from d2vcli.models.audio2 import ContextEncoder, alibi_bias, alibi_slopes
from d2vcli.models.loading import build_model
from d2vcli.objective.masking import compute_block_mask
from d2vcli.objective.targets import build_targets
from d2vcli.objective.teacher import ema_decay_at
from d2vcli.pretrain import Pretrain2Task, build_loader, pretrain

from conftest import PRETRAIN_TINY_SET

CPU = distributed.DistInfo(0, 1, 0, torch.device("cpu"))
# The 20-update runs: a 5-update warmup so the cosine schedule reaches its peak inside them.
PRETRAIN2_SET = PRETRAIN_TINY_SET + ["schedule.warmup_updates=5"]
NO_DROPOUT = ["model.dropout=0.0", "model.attention_dropout=0.0", "model.decoder_dropout=0.0"]


def tiny2_cfg(*extra: str) -> C.Config:
    return C.resolve("pretrain", preset="speech2-tiny", overrides=PRETRAIN2_SET + list(extra))


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def pretrained2_tiny(synthetic_workspace):
    """last.pt of a 20-update speech2-tiny run on the synthetic corpus (about 5 s)."""
    result = pretrain(tiny2_cfg(), synthetic_workspace, name="pretrained2-tiny")
    assert result.status == "done", result.message
    return result.checkpoint


# ----------------------------------------------------------------------------- the presets' networks


@pytest.mark.parametrize("preset,params,ema_keys,blocks", [("speech2-base", 93_783_308, 157, 12),
                                                           ("speech2-large", 315_184_144, 301, 24)])
def test_presets_build_the_recipes_networks(preset, params, ema_keys, blocks):
    """Parameter counts of fairseq's data2vec_multi built from base/large_audio_only_task.yaml (93.78M and
    315.18M, decoder included), and its EMA key count (157 / 301) plus our q/k/v split (+4 tensors per block)."""
    with torch.device("meta"):
        model = build_model("pretrain", C.resolve("pretrain", preset=preset).model)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.backbone.encoder.state_dict()) == ema_keys + 4 * blocks


# ----------------------------------------------------------------------------- ALiBi and the gather


def test_alibi_slopes_are_the_recipes():
    # 12 heads (base) are 8 + 4 interleaved, not one geometric series; 16 heads (large) are 2^-0.5 ... 2^-8.
    assert alibi_slopes(12) == pytest.approx([2.0 ** -e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)])
    assert alibi_slopes(16) == pytest.approx([2.0 ** (-0.5 * (i + 1)) for i in range(16)])


def test_alibi_bias_is_symmetric_on_original_positions_with_clamped_scale():
    slopes, scale = torch.tensor([0.5, 0.25]), torch.tensor([2.0, -1.0])
    bias = alibi_bias(torch.tensor([[0, 3, 4]]), slopes, scale)  # kept frames 0, 3, 4
    expect = torch.tensor([[0, -3, -4], [-3, 0, -1], [-4, -1, 0]], dtype=torch.float32)
    torch.testing.assert_close(bias[0, 0], expect * 0.5 * 2.0, rtol=0, atol=0)
    torch.testing.assert_close(bias[0, 1], torch.zeros(3, 3), rtol=0, atol=0)  # a negative scale clamps to 0


def test_kept_frames_equal_the_full_sequence_with_masked_keys_removed():
    """The student's gather is exact: its kept-frame outputs equal a full-length run where the masked
    frames are only removed as keys (content before zeroing, positional conv on the zeroed sequence,
    ALiBi at full length from absolute positions)."""
    torch.manual_seed(0)
    enc = ContextEncoder(32, 2, 4, 64, 0.0, 0.0, 0.0, 0.0, 0.0, 1, 2, 5, 4, 1e-5).eval()
    with torch.no_grad():
        enc.alibi_scale.copy_(torch.tensor([1.5, 0.3, -0.2, 1.0]))  # learned, one clamped
    N, T = 6, 40
    x = torch.randn(N, T, 32)
    mask = torch.from_numpy(compute_block_mask((N, T), None, 0.5, 5, 0.05, np.random.default_rng(1)))
    with torch.no_grad():
        kept, layers = enc(x, None, time_mask=mask, return_layer_results=True)
        # The reference, at full length.
        full = x + enc.pos_conv(x.masked_fill(mask.unsqueeze(-1), 0.0))
        bias = alibi_bias(torch.arange(T).expand(N, T), enc.alibi_slopes, enc.alibi_scale)
        h = enc.norm(full)
        h, _ = enc.prenet(h, mask, attn_bias=bias)
        h, ref_layers = enc.layers(h, mask, return_layer_results=True, attn_bias=bias)
    assert kept.shape == (N, T - int(mask[0].sum()), 32)
    torch.testing.assert_close(kept, h[~mask].view_as(kept), rtol=1e-5, atol=1e-5)
    for a, b in zip(layers, ref_layers):
        torch.testing.assert_close(a, b[~mask].view_as(a), rtol=1e-5, atol=1e-5)


def test_decoder_puts_kept_frames_back_in_time_order():
    cfg = tiny2_cfg("model.decoder_layers=1")
    model = build_model("pretrain", cfg.model).eval()
    dec = model.decoder
    mask = torch.tensor([[False, True, True, False, False, True]])
    kept = torch.randn(1, 3, cfg.model.embed_dim)
    seen = []
    handle = dec.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0][:, :, 0, :].transpose(1, 2)))
    with torch.no_grad():
        dec(kept, mask, torch.Generator().manual_seed(0))
    handle.remove()
    filled = seen[0][0]
    torch.testing.assert_close(filled[~mask[0]], kept[0])
    assert float(filled[mask[0]].std()) < 0.05  # the masked frames hold N(0, 0.01) noise


# ----------------------------------------------------------------------------- the step


def test_teacher_runs_once_per_utterance_and_targets_repeat_per_clone(synthetic_workspace):
    cfg = tiny2_cfg(*NO_DROPOUT)
    torch.manual_seed(0)
    task = Pretrain2Task(cfg, torch.device("cpu"))
    batch = next(iter(build_loader(cfg, synthetic_workspace, CPU)))
    A, M = batch.source.shape[0], cfg.masking.clone_batch
    teacher_inputs = []
    hook = task.teacher.module.register_forward_pre_hook(lambda m, a: teacher_inputs.append(a[0].shape))
    out = task.train_step(task.model, batch, 0)
    hook.remove()
    frames = task.model.backbone.num_frames(batch.source.shape[1])
    assert teacher_inputs == [(A, frames, cfg.model.embed_dim)]  # one run, on A utterances, all frames
    mask = task.time_mask(batch, frames, None)
    assert mask.shape == (A * M, frames)
    # Loss normalization (A.8): sample size = masked frames over all clones, the loss their sum / sqrt(D).
    assert out.sample_size == A * M * int(frames * cfg.masking.mask_prob) == int(mask.sum())
    with torch.no_grad():
        student = task.model(batch.source, None, mask, generator=task.noise_generator(batch, torch.device("cpu")))
        _, layers = task.teacher.module(student["features"], None, return_layer_results=True)
        y = build_targets(layers, cfg.objective.average_top_k_layers)  # (A, T, D)
        repeated = y.repeat_interleave(M, 0)
        assert torch.equal(repeated[0], repeated[M - 1]) and torch.equal(repeated[M], y[1])
        expect = ((student["pred"] - repeated[mask]) ** 2).sum() / cfg.model.embed_dim ** 0.5
    torch.testing.assert_close(out.loss.detach(), expect, rtol=1e-5, atol=1e-5)


def test_ema_covers_the_context_encoder_only_and_follows_the_schedule():
    cfg = tiny2_cfg()
    torch.manual_seed(0)
    task = Pretrain2Task(cfg, torch.device("cpu"))
    names = set(task.teacher.state_dict())
    assert names == set(task.model.backbone.encoder.state_dict())
    assert "alibi_scale" in names and any(n.startswith("pos_conv.") for n in names)
    assert not any(n.startswith(("feature_", "decoder")) for n in names)
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    with torch.no_grad():
        for p in task.model.backbone.encoder.parameters():
            p.add_(1.0)
    task.teacher.step(0.9)
    now = task.model.backbone.encoder.state_dict()
    for k, v in task.teacher.state_dict().items():  # everything averaged, nothing copied
        torch.testing.assert_close(v, 0.9 * before[k] + 0.1 * now[k])
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in task.teacher.module.parameters())
    base = C.resolve("pretrain", preset="speech2-base").objective
    assert ema_decay_at(0, base) == pytest.approx(0.999)
    assert ema_decay_at(37_500, base) == pytest.approx((0.999 + 0.99999) / 2)
    assert ema_decay_at(75_000, base) == ema_decay_at(400_000, base) == pytest.approx(0.99999)
    large = C.resolve("pretrain", preset="speech2-large").objective
    assert ema_decay_at(300_000, large) == 1.0  # the large teacher freezes ...
    frozen = {k: v.clone() for k, v in task.teacher.state_dict().items()}
    task.teacher.step(ema_decay_at(300_000, large))  # ... and a decay of 1 leaves it as it is
    assert all(torch.equal(frozen[k], v) for k, v in task.teacher.state_dict().items())


def test_masks_and_noise_are_a_function_of_the_batch(synthetic_workspace):
    cfg = tiny2_cfg()
    task = Pretrain2Task(cfg, torch.device("cpu"))
    first, second = list(build_loader(cfg, synthetic_workspace, CPU))[:2]
    frames = task.model.backbone.num_frames(first.source.shape[1])
    assert torch.equal(task.time_mask(first, frames, None), task.time_mask(first, frames, None))
    assert not torch.equal(task.time_mask(first, frames, None), task.time_mask(second, frames, None))
    a = torch.randn(4, generator=task.noise_generator(first, torch.device("cpu")))
    b = torch.randn(4, generator=task.noise_generator(first, torch.device("cpu")))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- runs


def test_short_run_loss_falls_with_healthy_monitors(pretrained2_tiny):
    run_dir = pretrained2_tiny.parent
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    curve = [r["loss"] for r in rows]
    assert len(curve) == 20
    assert sum(curve[-3:]) / 3 < 0.8 * sum(curve[:3]) / 3
    last = rows[-1]
    obj = C.resolve("pretrain", preset="speech2-tiny").objective
    assert last["target_std"] > obj.min_target_std and last["pred_std"] > obj.min_pred_std
    assert last["conv_time_share"] > obj.min_conv_time_share
    assert last["target_position_share"] < obj.max_position_share
    assert last["teacher_var_ratio"] > obj.min_teacher_var_ratio
    assert last["masked_share"] == pytest.approx(49 / 99, abs=1e-6)  # floor(0.5 x 99) of 99 frames, every clone
    state = ckpt.load_checkpoint(pretrained2_tiny, expect_kind="pretrain")
    assert state[ckpt.ARCH_KEY]["version"] == 2
    assert set(state[ckpt.TEACHER_KEY]) == {k[len("backbone.encoder."):] for k in state[ckpt.MODEL_KEY]
                                           if k.startswith("backbone.encoder.")}
    assert any(k.startswith("decoder.") for k in state[ckpt.MODEL_KEY])


def test_resume_reproduces_the_straight_run_exactly(pretrained2_tiny, synthetic_workspace):
    cfg = tiny2_cfg()
    first = pretrain(cfg, synthetic_workspace, name="resume2-split", stop_at=10)
    assert first.status == "paused" and first.step == 10
    second = pretrain(cfg, synthetic_workspace, name="resume2-split", resume=True)
    assert second.status == "done" and second.step == 20
    assert losses(first.run_dir) == pytest.approx(losses(pretrained2_tiny.parent), rel=1e-6, abs=1e-7)
    a, b = ckpt.load_checkpoint(second.checkpoint), ckpt.load_checkpoint(pretrained2_tiny)
    for key in (ckpt.MODEL_KEY, ckpt.TEACHER_KEY):
        for name in b[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6)


def test_two_processes_match_one_process_with_accumulation(synthetic_workspace):
    # Dropout off (each process draws its own); the masks and the decoder's noise are keyed by the batch.
    steps = ["train.max_updates=3", "model.layerdrop=0.0", "train.batch_seconds=8"] + NO_DROPOUT
    one = pretrain(tiny2_cfg(*steps), synthetic_workspace, name="ddp2-one")
    assert one.status == "done"
    env = dict(os.environ, OMP_NUM_THREADS="1", D2V_PROGRESS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "d2vcli", "pretrain", "--preset", "speech2-tiny", "--name", "ddp2-two",
           "--workdir", str(synthetic_workspace.root)]
    for item in PRETRAIN2_SET + steps:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = losses(synthetic_workspace.run_dir("ddp2-two"))
    assert len(two) == 3
    assert two == pytest.approx(losses(one.run_dir), rel=1e-5, abs=1e-5)


# ----------------------------------------------------------------------------- fine-tuning and inference


def test_finetune_from_a_2_0_checkpoint_then_transcribe_and_evaluate(pretrained2_tiny, synthetic_workspace):
    from typer.testing import CliRunner

    from d2vcli.audio import read_audio
    from d2vcli.cli import app
    from d2vcli.decode.search import greedy_batch
    from d2vcli.manifest import read_manifest
    from d2vcli.models.loading import load_ctc_model
    from d2vcli.transcribe import model_input, transcribe

    ws = synthetic_workspace
    args = ["finetune", "--preset", "finetune-tiny", "--init", "pretrained2-tiny", "--from-teacher",
            "--name", "ft2", "--workdir", str(ws.root)]
    for item in ["data.max_tokens=64000", "train.batch_seconds=4", "train.log_every=1", "train.save_every=1000",
                 "data.valid_splits=[dev-clean]", "finetune.best_metric=dev-clean/cer", "finetune.validate_every=1000",
                 "finetune.validate_after=0", "train.max_updates=30", "finetune.freeze_updates=0", "optim.lr=0.001",
                 "finetune.encoder_lr_scale=1.0"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [r for r in read_jsonl(ws.run_dir("ft2") / "metrics.jsonl") if "loss" in r and "epoch" in r]
    curve = [r["loss"] for r in rows]
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5  # CTC on the ALiBi encoder learns

    model, vocab, normalize, state = load_ctc_model(ws.run_dir("ft2") / "last.pt")
    assert state[ckpt.ARCH_KEY]["version"] == 2 and type(model.backbone).__name__ == "Data2Vec2Audio"
    path = read_manifest(ws.manifest("train"))[0].path
    [t] = transcribe([path], ws, model="ft2", lm=None)
    wav, sr = read_audio(path)
    with torch.no_grad():
        logits = model(torch.from_numpy(model_input(wav, sr, normalize))[None])["logits"]
    assert t.text == vocab.decode(greedy_batch(logits)[0])  # transcribe runs the same 2.0 network
    import d2vcli

    loaded = d2vcli.load("ft2", workdir=ws.root)
    frames = model.backbone.num_frames(len(model_input(wav, sr, normalize)))
    assert loaded.embed(path, layer=2).shape == (frames, state[ckpt.ARCH_KEY]["embed_dim"])  # the Python API's hidden states

    evaluated = CliRunner().invoke(app, ["evaluate", "ft2", "--splits", "dev-clean", "--no-lm",
                                         "--workdir", str(ws.root)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "dev-clean" in evaluated.output
