"""CTC fine-tuning: it learns, resumes exactly, freezes, masks only in training, and refuses bad inputs.

Most tests share the session fixtures `pretrained_tiny` (a 20-update speech-tiny pretraining) and
`finetuned_tiny` (the fine-tuning run of tests/conftest.py); the rest run a few updates of their own.

Run: python -m pytest -q tests/test_finetune.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli.cli import app
from d2vcli.data import AudioDataset, BatchLoader
from d2vcli.decode.search import greedy_batch
from d2vcli.distributed import DistInfo
from d2vcli.fileio import read_jsonl
from d2vcli.finetune import (
    FinetuneDataError, FinetuneTask, build_ctc_model, ctc_loss, ctc_min_frames, decode_dataset, finetune,
    maskable, merge_architecture, select_trainable,
)
from d2vcli.manifest import Record, read_manifest, write_manifest
from d2vcli.objective.masking import compute_mask_indices
from d2vcli.models.audio import Data2VecForCTC, build_backbone
from d2vcli.models.loading import load_ctc_model
from d2vcli.vocab import Vocab
from d2vcli.workspace import Workspace

CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# A few-update run: 4 s batches, every update logged, validation on dev-clean only.
SHORT = ["data.max_tokens=64000", "train.batch_seconds=4", "train.log_every=1", "train.save_every=1000",
         "data.valid_splits=[dev-clean]", "finetune.best_metric=dev-clean/cer", "finetune.validate_every=1000",
         "finetune.validate_after=0"]


def short_cfg(init, *overrides: str) -> C.Config:
    cfg = C.resolve("finetune", preset="finetune-tiny", overrides=[*SHORT, *overrides])
    return C.merge(cfg, {"finetune": {"init": str(init)}})


def scratch_workspace(tmp_path, src: Workspace) -> Workspace:
    """A workspace with a copy of `src`'s manifests and dictionary (the audio stays where it is)."""
    ws = Workspace.resolve(tmp_path / "ws")
    shutil.copytree(src.data_dir, ws.data_dir)
    return ws


def dev_cer(model, vocab, normalize, ws, split="dev-clean") -> float:
    from d2vcli.scoring import score

    model.eval()
    dataset = AudioDataset(read_manifest(ws.manifest(split)), normalize, vocab=vocab)
    refs, hyps, _ = decode_dataset(model, dataset, vocab, 400_000, CPU)
    return score(refs, hyps).chars.rate


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r and "epoch" in r]


# ----------------------------------------------------------------------------- it learns


def test_finetuning_learns_to_transcribe(finetuned_tiny, pretrained_tiny, synthetic_workspace):
    ws = synthetic_workspace
    model, vocab, normalize, state = load_ctc_model(finetuned_tiny)
    trained = {s: dev_cer(model, vocab, normalize, ws, s) for s in ("train", "dev-clean")}

    # The same network before fine-tuning: the pretrained encoder with a fresh head.
    cfg = C.from_dict(state[ckpt.CONFIG_KEY])
    torch.manual_seed(cfg.train.seed)  # the head's init, independent of the tests that ran before
    untrained = build_ctc_model(cfg, len(vocab))
    pre = ckpt.load_checkpoint(pretrained_tiny)
    untrained.backbone.load_state_dict({k[9:]: v for k, v in pre[ckpt.MODEL_KEY].items() if k.startswith("backbone.")})
    before = dev_cer(untrained, vocab, normalize, ws)

    assert trained["train"] < 10.0, trained  # the training transcripts are learnt
    assert trained["dev-clean"] < 85.0, trained  # and unseen speakers are partly transcribed
    assert trained["dev-clean"] < before - 10.0, (trained, before)

    # Validation ran and was logged; best.pt is the best validation's model, and says so.
    metric = cfg.finetune.best_metric
    rows = [r for r in read_jsonl(finetuned_tiny.parent / "metrics.jsonl") if metric in r]
    assert len(rows) == 2 and all(k in rows[-1] for k in ("dev-clean/wer", "dev-clean/loss", "dev-clean/empty"))
    best = min(rows, key=lambda r: r[metric])
    assert state[ckpt.ENGINE_KEY]["best"] == best[metric] == rows[-1]["best"]
    assert state[ckpt.ENGINE_KEY]["best_metric"] == metric and state[ckpt.STEP_KEY] == best["step"]


def test_checkpoint_carries_vocab_arch_and_normalize(finetuned_tiny, pretrained_tiny, synthetic_workspace):
    state = ckpt.load_checkpoint(finetuned_tiny, expect_kind="ctc")
    pre = ckpt.load_checkpoint(pretrained_tiny)
    assert state[ckpt.VOCAB_KEY] == list(Vocab.load(synthetic_workspace.dictionary).symbols)
    assert state[ckpt.NORMALIZE_KEY] is pre[ckpt.NORMALIZE_KEY] is True
    arch, pre_arch = state[ckpt.ARCH_KEY], pre[ckpt.ARCH_KEY]
    for key in ("conv_layers", "embed_dim", "num_layers", "num_heads", "ffn_dim", "pos_conv_kernel"):
        assert arch[key] == pre_arch[key]
    config = state[ckpt.CONFIG_KEY]
    assert config["data"]["normalize"] is True and config["model"]["embed_dim"] == 64
    # The run's config.yaml shows the checkpoint's architecture, not the base defaults.
    saved = C.load_yaml(finetuned_tiny.parent / "config.yaml")
    assert saved["model"]["num_layers"] == 4 and saved["data"]["normalize"] is True
    # Decoding needs no side file: a workspace without dict.ltr.txt still works.
    model, vocab, _, _ = load_ctc_model(finetuned_tiny)
    assert vocab.symbols == tuple(state[ckpt.VOCAB_KEY]) and len(vocab) == model.proj.out_features


# ----------------------------------------------------------------------------- resume and freezing


def test_resume_reproduces_the_straight_run_exactly(pretrained_tiny, synthetic_workspace):
    # Masks, dropout and LayerDrop on; the freeze ends inside the second half; one validation per half.
    cfg = short_cfg(pretrained_tiny, "train.max_updates=6", "finetune.freeze_updates=4", "finetune.validate_every=3",
                    "masking.mask_prob=0.3", "masking.mask_length=3", "masking.mask_channel_prob=0.3",
                    "masking.mask_channel_length=8", "model.dropout=0.1", "model.layerdrop=0.2", "model.feature_grad_mult=0.0")
    straight = finetune(cfg, synthetic_workspace, name="ft-straight")
    first = finetune(cfg, synthetic_workspace, name="ft-split", stop_at=3)
    assert first.status == "paused" and first.step == 3
    second = finetune(cfg, synthetic_workspace, name="ft-split", resume=True)
    assert straight.status == second.status == "done" and second.step == 6

    a, b = read_jsonl(straight.run_dir / "metrics.jsonl"), read_jsonl(second.run_dir / "metrics.jsonl")
    drop = ("wall", "audio_s_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in b] == \
           [{k: v for k, v in r.items() if k not in drop} for r in a]
    assert len(losses(straight.run_dir)) == 6 and sum("dev-clean/wer" in r for r in a) == 2
    sa, sb = ckpt.load_checkpoint(straight.checkpoint), ckpt.load_checkpoint(second.checkpoint)
    for name, value in sa[ckpt.MODEL_KEY].items():
        assert torch.equal(value, sb[ckpt.MODEL_KEY][name]), name
    # After the freeze the encoder did train; the conv feature encoder never does with feature_grad_mult 0.
    pre = ckpt.load_checkpoint(pretrained_tiny)[ckpt.MODEL_KEY]
    assert not torch.equal(sa[ckpt.MODEL_KEY]["backbone.transformer.layers.0.fc1.weight"],
                           pre["backbone.transformer.layers.0.fc1.weight"])
    assert torch.equal(sa[ckpt.MODEL_KEY]["backbone.feature_extractor.blocks.0.conv.weight"],
                       pre["backbone.feature_extractor.blocks.0.conv.weight"])


def test_two_processes_match_one_process_with_accumulation(pretrained_tiny, synthetic_workspace):
    """torchrun with 2 processes = 1 process accumulating 2 micro-batches: the same losses through the
    freeze boundary (the freeze acts inside DDP's forward) and the same sharded, all-reduced validation."""
    steps = SHORT + ["train.max_updates=4", "train.batch_seconds=8", "finetune.freeze_updates=2",
                     "finetune.validate_every=2", "masking.mask_prob=0.3", "masking.mask_length=3",
                     "masking.mask_channel_prob=0.2", "model.activation_dropout=0.0"]  # no per-rank dropout
    one = finetune(short_cfg(pretrained_tiny, *steps[len(SHORT):]), synthetic_workspace, name="ft-ddp-one")
    assert one.status == "done"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "d2vcli",
           "finetune", "--preset", "finetune-tiny", "--init", "pretrained-tiny", "--name", "ft-ddp-two",
           "--workdir", str(synthetic_workspace.root)]
    for item in steps:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", D2V_PROGRESS="0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 s/update = 2 CPU processes x 0.064M samples x 1 accumulation" in proc.stdout
    drop = ("wall", "audio_s_per_s")
    a = [{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(one.run_dir / "metrics.jsonl")]
    b = [{k: v for k, v in r.items() if k not in drop}
         for r in read_jsonl(synthetic_workspace.run_dir("ft-ddp-two") / "metrics.jsonl")]
    assert len(a) == 6 and sum("dev-clean/cer" in r for r in a) == 2
    assert len(b) == len(a)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x == pytest.approx(y, rel=1e-5, abs=1e-6)


def test_early_stopping_ends_a_run_that_stops_improving(pretrained_tiny, synthetic_workspace):
    # lr 0: the model never changes, so the second validation cannot improve on the first.
    cfg = short_cfg(pretrained_tiny, "train.max_updates=50", "optim.lr=0.0", "finetune.validate_every=2",
                    "finetune.early_stop_patience=1")
    result = finetune(cfg, synthetic_workspace, name="ft-early-stop")
    assert result.status == "early_stop" and result.step == 4 and result.exit_code == 0
    assert (result.run_dir / "best.pt").exists()
    assert ckpt.load_checkpoint(result.run_dir / "best.pt")[ckpt.STEP_KEY] == 2


def test_cli_from_teacher_with_the_encoder_frozen(pretrained_tiny, synthetic_workspace):
    """--init/--from-teacher through the CLI; during freeze_updates only the head moves, bit for bit."""
    ws = synthetic_workspace
    args = ["finetune", "--preset", "finetune-tiny", "--init", "pretrained-tiny", "--from-teacher",
            "--name", "ft-frozen", "--workdir", str(ws.root)]
    for item in SHORT + ["train.max_updates=3", "finetune.freeze_updates=3", "model.feature_grad_mult=1.0"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "model architecture from last.pt" in result.output and "teacher weights of" in result.output

    state = ckpt.load_checkpoint(ws.run_dir("ft-frozen") / "last.pt", expect_kind="ctc")
    pre = ckpt.load_checkpoint(pretrained_tiny)
    model = state[ckpt.MODEL_KEY]
    for name, value in pre[ckpt.TEACHER_KEY].items():  # the transformer is the teacher's, untouched
        assert torch.equal(model[f"backbone.transformer.{name}"], value), name
    for name, value in pre[ckpt.MODEL_KEY].items():  # the rest of the encoder is the student's
        if name.startswith("backbone.") and not name.startswith("backbone.transformer."):
            assert torch.equal(model[name], value), name
    cfg = C.from_dict(state[ckpt.CONFIG_KEY])
    assert cfg.finetune.init_from == "teacher" and cfg.model.feature_grad_mult == 1.0
    torch.manual_seed(cfg.train.seed)
    fresh = build_ctc_model(cfg, len(state[ckpt.VOCAB_KEY]) + 4)
    assert not torch.equal(model["proj.weight"], fresh.proj.weight)  # the head did train
    # Adam kept moments for the head's two tensors only: frozen weights never entered the update.
    assert len(state[ckpt.OPTIMIZER_KEY]["state"]) == 2


def test_encoder_lr_scale_moves_the_encoder_at_that_fraction_of_the_heads_rate(pretrained_tiny, synthetic_workspace):
    """finetune.encoder_lr_scale (finetune-tiny's 0.01): Adam's first step moves each weight by about the rate
    whatever its gradient, so from the same start and batch the encoder moves 0.01 x as far as at one rate
    for all, and the CTC head exactly as far."""
    pre = ckpt.load_checkpoint(pretrained_tiny)[ckpt.MODEL_KEY]
    states = {}
    for scale in (1.0, 0.01):
        cfg = short_cfg(pretrained_tiny, "train.max_updates=1", "finetune.freeze_updates=0",
                        "model.feature_grad_mult=1.0", f"finetune.encoder_lr_scale={scale}")
        result = finetune(cfg, synthetic_workspace, name=f"ft-encoder-lr-{scale:g}")
        assert result.status == "done", result.message
        states[scale] = ckpt.load_checkpoint(result.run_dir / "last.pt", expect_kind="ctc")[ckpt.MODEL_KEY]
    one, slow = states[1.0], states[0.01]
    encoder = [n for n in one if n.startswith("backbone.") and n in pre and pre[n].is_floating_point()]
    assert len(encoder) > 20
    for name in encoder:
        full, scaled = one[name] - pre[name], slow[name] - pre[name]
        torch.testing.assert_close(scaled, 0.01 * full, rtol=2e-2, atol=1e-7, msg=name)
    assert sum(float((one[n] - pre[n]).abs().max()) > 0 for n in encoder) > 20, "the encoder did train"
    assert torch.equal(one["proj.weight"], slow["proj.weight"]) and torch.equal(one["proj.bias"], slow["proj.bias"])


def test_encoder_lr_scale_must_be_positive():
    with pytest.raises(C.ConfigError, match="finetune.encoder_lr_scale"):
        C.resolve("finetune", preset="finetune-tiny", overrides=["finetune.encoder_lr_scale=0"])


# ----------------------------------------------------------------------------- the step


def tiny_task(**masking) -> FinetuneTask:
    cfg = C.resolve("finetune", preset="finetune-tiny")
    cfg = C.merge(cfg, {"model": C.to_dict(C.resolve("pretrain", preset="speech-tiny").model),
                        "masking": masking, "data": {"normalize": True}})
    torch.manual_seed(0)
    model = build_ctc_model(cfg, 32)
    return FinetuneTask(cfg, model, Vocab.librispeech(), {}, CPU)


def test_masks_apply_in_training_only(synthetic_workspace):
    task = tiny_task(mask_prob=0.5, mask_length=3, mask_channel_prob=0.5, mask_channel_length=8)
    vocab = task.vocab
    dataset = AudioDataset(read_manifest(synthetic_workspace.manifest("dev-clean")), True, vocab=vocab)
    batch = next(iter(BatchLoader(dataset, "pad", 200_000, seed=1)))

    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, source, padding_mask=None, time_mask=None, channel_mask=None):
            seen.append((time_mask, channel_mask))
            return self.inner(source, padding_mask, time_mask=time_mask, channel_mask=channel_mask)

    spy = Spy(task.model)
    task.model.train()
    task.train_step(spy, batch, step=100)
    time_mask, channel_mask = seen[-1]
    frame_pad = task.model.backbone.frame_padding_mask(batch.padding_mask, time_mask.shape[1])
    assert time_mask.any(dim=1).all() and not (time_mask & frame_pad).any()  # real frames only
    assert channel_mask.any(dim=1).all() and channel_mask.shape == (batch.source.shape[0], 64)
    task.train_step(spy, batch, step=100)
    assert torch.equal(seen[-1][0], time_mask) and torch.equal(seen[-1][1], channel_mask)  # keyed by the batch

    # Evaluation (validation, decoding): no masks, and the same output every time.
    spy.eval()
    refs, hyps, loss = decode_dataset(spy, dataset, vocab, 200_000, CPU)
    assert all(t is None and c is None for t, c in seen[2:]) and len(seen) > 2
    assert decode_dataset(spy, dataset, vocab, 200_000, CPU) == (refs, hyps, loss)
    task.model.eval()
    with torch.no_grad():
        plain = task.model(batch.source, batch.padding_mask)["logits"]
        masked = task.model(batch.source, batch.padding_mask, time_mask=time_mask,
                            channel_mask=channel_mask)["logits"]
    assert not torch.allclose(plain, masked)  # the masks do change what the encoder sees


def test_padded_frames_are_blank_and_do_not_count():
    torch.manual_seed(0)
    cfg = C.resolve("pretrain", preset="speech-tiny")
    model = Data2VecForCTC(build_backbone(cfg.model), 32).eval()
    lengths = [16000, 9000]
    source = torch.randn(2, 16000)
    padding_mask = torch.arange(16000)[None, :] >= torch.tensor(lengths)[:, None]
    with torch.no_grad():
        out = model(source, padding_mask)
    logits, frame_pad = out["logits"], out["padding_mask"]
    assert frame_pad[1].any() and not frame_pad[0].any()
    pad_rows = logits[frame_pad]  # (N, V)
    assert (pad_rows[:, 0] == 0).all() and torch.isinf(pad_rows[:, 1:]).all()
    assert (logits[frame_pad].argmax(-1) == 0).all()

    target = torch.tensor([[5, 6, 6, 7], [8, 9, 1, 1]])  # second row padded with <pad> = 1
    target_lengths = torch.tensor([4, 2])
    total = ctc_loss(logits, frame_pad, target, target_lengths)
    frames = [int((~frame_pad[b]).sum()) for b in range(2)]
    each = [ctc_loss(logits[b:b + 1, :frames[b]], None, target[b:b + 1, :target_lengths[b]], target_lengths[b:b + 1])
            for b in range(2)]
    torch.testing.assert_close(total, sum(each))

    # Greedy decoding: argmax, collapse repeats, drop blanks, ignore padding.
    toy = torch.full((1, 6, 5), -5.0)
    for t, k in enumerate([0, 3, 3, 0, 3, 4]):
        toy[0, t, k] = 0.0
    pad = torch.tensor([[False, False, False, False, False, True]])
    assert greedy_batch(toy, pad) == [[3, 3]] and greedy_batch(toy, None) == [[3, 3, 4]]


# ----------------------------------------------------------------------------- data problems


def test_utterances_ctc_cannot_learn_are_skipped_and_counted(pretrained_tiny, synthetic_workspace, tmp_path, capsys):
    assert ctc_min_frames([5, 6, 6, 7]) == 5 and ctc_min_frames([]) == 0
    assert maskable(12, 0.65, 10, 1) and not maskable(11, 0.65, 10, 1) and maskable(3, 0.0, 10, 1)
    for frames in range(1, 40):  # maskable means compute_mask_indices never covers the whole utterance
        if maskable(frames, 0.65, 10, 1):
            for seed in range(20):
                compute_mask_indices((1, frames), None, 0.65, 10, 1, rng=np.random.default_rng(seed))

    ws = scratch_workspace(tmp_path, synthetic_workspace)
    records = read_manifest(ws.manifest("train"))
    short = records[0]
    # 0.3 s of audio (14 frames) cannot carry a 36-letter transcript.
    bad = Record(id="too-long-text", path=short.path, num_samples=4800, text="THE GOLDEN HERMIT BUILDS A GREEN HOUSE")
    write_manifest(ws.manifest("train"), records + [bad])
    cfg = short_cfg(pretrained_tiny, "train.max_updates=1")
    vocab = Vocab.load(ws.dictionary)
    picked = select_trainable(read_manifest(ws.manifest("train")), vocab, cfg)
    assert picked.infeasible == ["too-long-text"] and len(picked.records) == len(records)

    capsys.readouterr()
    result = finetune(cfg, ws, name="ft-skip")
    assert result.status == "done"
    out = capsys.readouterr().out
    assert "skipped 1 utterance(s) of train whose transcript needs more CTC frames" in out and "too-long-text" in out
    assert f"data: {len(records)} utterances" in out


def test_characters_outside_the_dictionary_name_the_manifest_line(pretrained_tiny, synthetic_workspace, tmp_path):
    ws = scratch_workspace(tmp_path, synthetic_workspace)
    records = read_manifest(ws.manifest("dev-clean"))
    records[2] = Record(**{**records[2].__dict__, "text": records[2].text + " CAFÉ"})
    write_manifest(ws.manifest("dev-clean"), records)
    with pytest.raises(FinetuneDataError) as e:
        finetune(short_cfg(pretrained_tiny, "train.max_updates=1"), ws, name="ft-bad-text")
    assert f"{ws.manifest('dev-clean')}:3:" in str(e.value) and "'C'" not in str(e.value) and "'É'" in str(e.value)
    assert not ws.run_dir("ft-bad-text").exists(), "nothing is created before the data is checked"


# ----------------------------------------------------------------------------- wrong inputs


def test_wrong_checkpoint_kind_is_a_clear_error_both_ways(finetuned_tiny, pretrained_tiny, synthetic_workspace):
    # A fine-tuned model where the pretrained one belongs.
    with pytest.raises(ckpt.CheckpointError) as e:
        finetune(short_cfg(finetuned_tiny, "train.max_updates=1"), synthetic_workspace, name="ft-wrong-init")
    assert "fine-tuned CTC model" in str(e.value) and "pretrained data2vec model" in str(e.value)
    assert "--resume" in str(e.value)  # what to do instead
    # A pretrained model where this run's own (ctc) checkpoint belongs: resuming a pretraining run's name.
    with pytest.raises(ckpt.CheckpointError) as e:
        finetune(short_cfg(pretrained_tiny), synthetic_workspace, name="pretrained-tiny", resume=True)
    assert str(e.value).startswith(str(pretrained_tiny)) and "is a pretrained data2vec model" in str(e.value)
    assert "fine-tuned CTC model" in str(e.value) and "pass --init pretrained-tiny with a new --name" in str(e.value)
    # No init at all.
    with pytest.raises(C.ConfigError, match="--init"):
        finetune(C.resolve("finetune", preset="finetune-tiny"), synthetic_workspace, name="ft-no-init")


def test_normalize_follows_the_checkpoint_and_a_mismatch_is_an_error(pretrained_tiny, synthetic_workspace):
    assert C.resolve("finetune").data.normalize is None  # "as the checkpoint"
    with pytest.raises(C.ConfigError) as e:
        finetune(short_cfg(pretrained_tiny, "data.normalize=false"), synthetic_workspace, name="ft-normalize")
    message = str(e.value)
    assert "data.normalize=false" in message and "normalize=true" in message and str(pretrained_tiny) in message
    assert not synthetic_workspace.run_dir("ft-normalize").exists()
    with pytest.raises(C.ConfigError, match="only applies to `d2v finetune`"):
        C.resolve("pretrain", overrides=["data.normalize=null"])
    # fairseq's 64-channel spans would blank all of speech-tiny's 64 channels: refused up front as well.
    with pytest.raises(C.ConfigError, match="mask_channel_length=64"):
        finetune(short_cfg(pretrained_tiny, "masking.mask_channel_prob=0.5", "masking.mask_channel_length=64"),
                 synthetic_workspace, name="ft-channels")


def test_architecture_comes_from_the_checkpoint():
    tiny = C.resolve("pretrain", preset="speech-tiny").model
    asked = C.merge(C.ModelConfig(), {"dropout": 0.2, "layerdrop": 0.0})
    merged = merge_architecture(asked, C.to_dict(tiny), "ckpt.pt")
    assert merged.embed_dim == 64 and merged.num_layers == 4 and merged.conv_layers == tiny.conv_layers
    assert merged.dropout == 0.2 and merged.layerdrop == 0.0
    with pytest.raises(C.ConfigError, match=r"model.embed_dim=512 \(the checkpoint has 64\)"):
        merge_architecture(C.merge(C.ModelConfig(), {"embed_dim": 512}), C.to_dict(tiny), "ckpt.pt")


def test_best_metric_must_be_validated():
    cfg = C.resolve("finetune", preset="finetune-tiny", overrides=["finetune.best_metric=test-clean/wer"])
    from d2vcli.finetune import check_validation

    with pytest.raises(C.ConfigError, match="dev-clean/wer"):
        check_validation(cfg)


def test_imported_checkpoints_start_fine_tuning_like_pretrain_runs(pretrained_tiny, synthetic_workspace, tmp_path):
    """A model that went out to Hugging Face and came back (`d2v export hf`, `d2v import hf`) fine-tunes
    from the same encoder weights; a checkpoint without a teacher cannot start from the teacher."""
    from d2vcli.interop import export_hf, import_hf

    export_hf(pretrained_tiny, tmp_path / "hf")
    imported = import_hf(tmp_path / "hf", out=tmp_path / "imported.pt")
    result = finetune(short_cfg(imported.path, "train.max_updates=2", "finetune.freeze_updates=2"),
                      synthetic_workspace, name="ft-from-hf")
    assert result.status == "done"
    tuned = ckpt.load_checkpoint(result.checkpoint)[ckpt.MODEL_KEY]
    pre = ckpt.load_checkpoint(pretrained_tiny)[ckpt.MODEL_KEY]
    backbone = [k for k in pre if k.startswith("backbone.")]
    assert all(torch.equal(tuned[k], pre[k]) for k in backbone if k != "backbone.mask_emb")

    state = ckpt.load_checkpoint(pretrained_tiny)
    del state[ckpt.TEACHER_KEY]
    ckpt.save_checkpoint(tmp_path / "student-only.pt", state)
    with pytest.raises(ckpt.CheckpointError, match="no EMA teacher weights"):
        finetune(short_cfg(tmp_path / "student-only.pt", "finetune.init_from=teacher"), synthetic_workspace,
                 name="ft-no-teacher")


# ----------------------------------------------------------------------------- random-init baseline


def test_init_scratch_fine_tunes_the_preset_architecture_from_random_weights(synthetic_workspace):
    """--init scratch --arch-preset: same code path, no weights read, architecture from the preset plus --set."""
    ws = synthetic_workspace
    args = ["finetune", "--preset", "finetune-tiny", "--init", "scratch", "--arch-preset", "speech-tiny",
            "--name", "ft-scratch", "--workdir", str(ws.root)]
    for item in SHORT + ["train.max_updates=3", "finetune.freeze_updates=0", "model.ffn_dim=128"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "random initialization (finetune.init=scratch)" in result.output
    state = ckpt.load_checkpoint(ws.run_dir("ft-scratch") / "last.pt", expect_kind="ctc")
    tiny = C.resolve("pretrain", preset="speech-tiny").model
    arch = state[ckpt.ARCH_KEY]
    assert arch["embed_dim"] == tiny.embed_dim and arch["ffn_dim"] == 128, "preset, then --set on top"
    assert [list(c) for c in arch["conv_layers"]] == [list(c) for c in tiny.conv_layers]
    assert state[ckpt.NORMALIZE_KEY] is True
    cfg = C.from_dict(state[ckpt.CONFIG_KEY])
    assert cfg.finetune.init == "scratch" and cfg.finetune.arch_preset == "speech-tiny"
    # The encoder started from the builder's seeded random init: 3 updates moved it only a little.
    torch.manual_seed(cfg.train.seed)
    fresh = build_ctc_model(cfg, len(state[ckpt.VOCAB_KEY]) + 4).state_dict()
    w = "backbone.transformer.layers.layers.0.fc1.weight"
    w = w if w in fresh else next(k for k in fresh if k.endswith("fc1.weight"))
    moved = (state[ckpt.MODEL_KEY][w] - fresh[w]).abs().max().item()
    assert 0 < moved < 0.05, moved


def test_arch_preset_without_scratch_is_an_error(pretrained_tiny, synthetic_workspace):
    cfg = short_cfg(str(pretrained_tiny), "finetune.arch_preset=speech-tiny")
    with pytest.raises(C.ConfigError, match="only applies with finetune.init=scratch"):
        finetune(cfg, synthetic_workspace, name="ft-arch-conflict")
