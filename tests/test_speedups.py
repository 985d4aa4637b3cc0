"""The GPU speed settings, checked on CPU: length buckets, torch.compile's fallback, activation checkpointing,
the fused ALiBi attention."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from d2vcli import config as cfgmod
from d2vcli.data import AudioDataset, BatchLoader, bucket_lengths, round_to_buckets
from d2vcli.fileio import read_jsonl
from d2vcli.manifest import Record, write_manifest
from d2vcli.pretrain import PretrainTask, pretrain
from d2vcli import engine
from d2vcli.models.audio2 import ContextEncoder
from d2vcli.objective.masking import compute_block_mask
from d2vcli.speedups import (CompiledWithFallback, compile_model, compile_wanted, set_activation_checkpointing,
                             set_fused_alibi)
from d2vcli.workspace import Workspace


def _corpus(root, lengths) -> Workspace:
    """A workspace whose train split has one noise utterance per length (samples)."""
    ws = Workspace.resolve(root)
    rng = np.random.default_rng(0)
    records = []
    for i, n in enumerate(lengths):
        path = root / "audio" / f"u{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        records.append(Record(id=f"u{i}", path=str(path), num_samples=n))
    ws.data_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(ws.manifest("train"), records)
    return ws


def _records(lengths):
    return [Record(id=f"u{i}", path=f"/nonexistent/u{i}.wav", num_samples=n) for i, n in enumerate(lengths)]


def test_buckets_round_down_for_crops_and_up_for_padding():
    sizes = np.array([16000, 17000, 23999, 24000, 32000])
    buckets = bucket_lengths(sizes, 3, "crop")
    assert buckets.tolist() == [16000, 24000, 32000]
    assert round_to_buckets(sizes, buckets, "crop").tolist() == [16000, 16000, 16000, 24000, 32000]
    assert round_to_buckets(sizes, buckets, "pad").tolist() == [16000, 24000, 24000, 24000, 32000]


def test_bucketed_batches_come_in_few_shapes_and_report_their_cost():
    rng = np.random.default_rng(1)
    lengths = rng.integers(16000, 48000, size=200).tolist()
    dataset = AudioDataset(_records(lengths), normalize=False)
    exact = BatchLoader(dataset, "crop", 96000, seed=1, max_sample_size=40000)
    bucketed = BatchLoader(dataset, "crop", 96000, seed=1, max_sample_size=40000, length_buckets=4)
    crop_lengths = {int(bucketed.sizes[b].min()) for b in bucketed.batches(1)}
    assert crop_lengths <= set(bucketed.buckets.tolist()) and len(bucketed.buckets) == 4
    assert len({int(exact.sizes[b].min()) for b in exact.batches(1)}) > 4 * len(crop_lengths)
    # Every utterance is still used, cropped to a bucket no longer than itself and no longer than 40000.
    assert sorted(np.concatenate(bucketed.batches(1)).tolist()) == list(range(200))
    assert (bucketed.sizes <= np.minimum(dataset.sizes, 40000)).all()
    fed = sum(len(b) * int(bucketed.sizes[b].min()) for b in bucketed.batches(1))
    fed_exact = sum(len(b) * int(exact.sizes[b].min()) for b in exact.batches(1))
    assert f"drops {100 * (1 - fed / fed_exact):.1f}%" in bucketed.bucketing_cost()
    padded = BatchLoader(dataset, "pad", 96000, seed=1, length_buckets=4)
    assert {int(padded.sizes[b].max()) for b in padded.batches(1)} <= set(padded.buckets.tolist())
    assert "padding" in padded.bucketing_cost() and "exact lengths" in padded.bucketing_cost()


def _losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def test_bucketing_keeps_the_losses_where_lengths_already_sit_on_buckets(tmp_path):
    """Compile off, equal effective batch: when every length is a bucket, bucketing changes nothing at all,
    so its crops, masks and packing must be the exact path's (a wrong rounding shortens the 24000 crops)."""
    lengths = [16000, 24000, 32000] * 4
    ws = _corpus(tmp_path / "ws", lengths)
    common = ["data.train_splits=[train]", "data.max_tokens=64000", "data.max_sample_size=32000",
              "data.min_sample_size=8000", "train.batch_seconds=8", "train.max_updates=3", "train.log_every=1",
              "train.save_every=100", "train.compile=off", "model.dropout=0.0", "model.attention_dropout=0.0"]
    runs = {}
    for buckets in (0, 3):
        cfg = cfgmod.resolve("pretrain", preset="speech-tiny", overrides=common + [f"data.length_buckets={buckets}"])
        result = pretrain(cfg, ws, name=f"buckets-{buckets}")
        assert result.status == "done", result.message
        runs[buckets] = _losses(result.run_dir)
    assert len(runs[0]) == 3 and runs[3] == pytest.approx(runs[0], rel=1e-6)


def test_compile_is_on_by_default_only_on_cuda():
    assert compile_wanted("auto", torch.device("cuda", 0))
    assert not compile_wanted("auto", torch.device("cpu"))
    assert compile_wanted("on", torch.device("cpu")) and not compile_wanted("off", torch.device("cuda", 0))
    assert cfgmod.resolve("pretrain").train.compile == "auto"
    model = torch.nn.Linear(3, 2)
    assert compile_model(model, "auto", torch.device("cpu")) is model


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch, capsys):
    def broken(module, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("inductor: no C++ compiler found\nlong traceback")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    wrapped = compile_model(model, "on", torch.device("cpu"))
    assert isinstance(wrapped, CompiledWithFallback)
    assert [p is q for p, q in zip(wrapped.parameters(), model.parameters())] == [True, True]
    x = torch.randn(4, 3)
    assert torch.equal(wrapped(x), model(x)) and torch.equal(wrapped(x), model(x))
    out = capsys.readouterr().out
    assert out.count("warning: torch.compile failed") == 1
    assert "RuntimeError: inductor: no C++ compiler found" in out and "long traceback" not in out


def test_activation_checkpointing_gives_the_same_gradients():
    """Dropout on: non-reentrant checkpointing must replay the same dropout masks in the recomputation."""
    cfg = cfgmod.resolve("pretrain", preset="speech-tiny", overrides=["model.dropout=0.1",
                                                                      "model.attention_dropout=0.1"])
    torch.manual_seed(0)
    task = PretrainTask(cfg, torch.device("cpu"))
    model = task.model.train()
    source = torch.randn(2, 16000)
    frames = model.backbone.num_frames(16000)
    mask = torch.zeros(2, frames, dtype=torch.bool)
    mask[:, 5:20] = True

    def grads(checkpointing: bool) -> dict:
        assert set_activation_checkpointing(model, checkpointing) == 1  # the student's layer stack
        model.zero_grad()
        torch.manual_seed(3)
        out = model(source, time_mask=mask)
        (out["pred"].square().sum() + out["x"].sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) > 20
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not cfgmod.resolve("pretrain", preset="speech-base").train.activation_checkpointing


def test_checkpointing_keeps_only_each_layers_input_for_backward():
    """What the setting is for: the activations saved for backward shrink (speech-large: 4.2 -> 0.5 GiB
    per 15.6 s utterance in bf16, docs/gpu.md); here on speech-tiny with 8 layers."""
    cfg = cfgmod.resolve("pretrain", preset="speech-tiny", overrides=["model.num_layers=8"])
    torch.manual_seed(0)
    task = PretrainTask(cfg, torch.device("cpu"))
    task.model.train()
    source = torch.randn(1, 32000)

    def saved_bytes(checkpointing: bool) -> int:
        set_activation_checkpointing(task.model, checkpointing)
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            task.model(source)
        params = {p.untyped_storage().data_ptr() for p in task.model.parameters()}
        return sum(n for ptr, n in storages.items() if ptr not in params)

    plain, ckpt = saved_bytes(False), saved_bytes(True)
    assert ckpt < 0.6 * plain


def test_fused_alibi_agrees_with_fp32_logits_within_bf16_rounding():
    """train.fused_alibi: in bf16 the ALiBi bias goes to SDPA rounded to bf16 (so CUDA can run a fused kernel)
    instead of fp32 logits as fairseq forms them. Outputs and the learned ALiBi scale's gradient agree within
    bf16 rounding, with padding and removed frames; in fp32 the flag changes nothing."""
    torch.manual_seed(0)
    enc = ContextEncoder(64, 2, 4, 128, 0.0, 0.0, 0.0, 0.0, 0.0, 0, 2, 5, 4, 1e-5).train()
    with torch.no_grad():
        enc.alibi_scale.copy_(torch.tensor([1.5, 0.3, 1.0, 0.7]))
    N, T = 4, 60
    x = torch.randn(N, T, 64)
    pad = torch.zeros(N, T, dtype=torch.bool)
    pad[0, 50:] = True
    mask = torch.from_numpy(compute_block_mask((N, T), pad.numpy(), 0.5, 5, 0.05, np.random.default_rng(1)))
    probe = torch.randn(N, T - int(mask[0].sum()), 64)

    def run(fused: bool, bf16: bool):
        assert set_fused_alibi(enc, fused) == 2  # one attention per layer
        enc.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, _ = enc(x, pad, time_mask=mask)
        (out.float() * probe).sum().backward()  # a fixed random read-out (post-LN outputs have a fixed norm)
        return out.float().detach(), enc.alibi_scale.grad.clone()

    (plain, g_plain), (fused, g_fused) = run(False, True), run(True, True)
    assert torch.isfinite(fused).all()
    # Measured 1e-4 of the output's max, against 6e-3 between bf16 and fp32, and 5e-3 from halving the scale.
    assert (fused - plain).abs().max() <= 1e-3 * plain.abs().max()
    torch.testing.assert_close(g_fused, g_plain, rtol=1e-2, atol=1e-2 * g_plain.abs().max().item())
    (a, ga), (b, gb) = run(False, False), run(True, False)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    assert not cfgmod.resolve("pretrain", preset="speech2-base").train.fused_alibi  # fairseq's numbers by default


def test_the_engine_sets_fused_alibi_on_the_student_and_the_teacher(tmp_path, monkeypatch):
    calls = []
    real = engine.set_fused_alibi

    def spy(module, enabled):
        calls.append((real(module, enabled), enabled))
        return calls[-1][0]

    monkeypatch.setattr(engine, "set_fused_alibi", spy)
    ws = _corpus(tmp_path / "ws", [16000] * 4)
    cfg = cfgmod.resolve("pretrain", preset="speech2-tiny", overrides=[
        "data.train_splits=[train]", "data.max_tokens=32000", "data.min_sample_size=8000", "train.batch_seconds=2",
        "train.max_updates=1", "train.save_every=100", "train.fused_alibi=true"])
    assert pretrain(cfg, ws, name="fused").status == "done"
    assert calls == [(4, True), (4, True)]  # the student's 4 attentions, then the EMA teacher's


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_training_on_cuda_matches_eager(tmp_path):
    """On a GPU: train.compile=on (the CUDA default) gives the eager losses within bf16 noise, without a fallback."""
    ws = _corpus(tmp_path / "ws", [32000] * 8)
    common = ["data.train_splits=[train]", "data.max_tokens=64000", "data.max_sample_size=32000",
              "data.min_sample_size=8000", "train.batch_seconds=4", "train.max_updates=3", "train.log_every=1",
              "model.dropout=0.0", "model.attention_dropout=0.0", "train.device=cuda"]
    losses = {}
    for mode in ("off", "on"):
        cfg = cfgmod.resolve("pretrain", preset="speech-tiny", overrides=common + [f"train.compile={mode}"])
        result = pretrain(cfg, ws, name=f"compile-{mode}")
        assert result.status == "done", result.message
        losses[mode] = _losses(result.run_dir)
    assert losses["on"] == pytest.approx(losses["off"], rel=2e-2)
