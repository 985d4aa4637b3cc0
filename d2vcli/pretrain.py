"""data2vec 1.0 and 2.0 pretraining of the audio model: the tasks that wire it to the objective core.

    d2v pretrain --preset speech-base                       # LibriSpeech 960 h (d2v prepare librispeech)
    d2v pretrain --preset speech-tiny --name demo           # seconds on CPU (d2v prepare synthetic)
    torchrun --nproc_per_node 8 -m d2vcli pretrain --preset speech-base
    d2v pretrain --preset speech-base --resume              # continue the run exactly
    d2v pretrain --preset speech2-base                      # data2vec 2.0 (Pretrain2Task, docs/recipe2.md)
    d2v pretrain --preset vision-tiny                       # images: d2vcli.pretrain_vision
    d2v pretrain --preset vision2-tiny                      # data2vec 2.0 images: d2vcli.pretrain_vision2
    d2v pretrain --preset text-tiny                         # text: d2vcli.pretrain_text
    d2v pretrain --preset text2-tiny                        # data2vec 2.0 text: d2vcli.pretrain_text2

Python: `pretrain(cfg, workspace, name=..., resume=...) -> engine.TrainResult`.

The objective itself is modality-neutral and lives in `d2vcli.objective` (masking, teacher,
targets, monitors); this module supplies the audio parts (model, data, masks keyed by the batch)
and the recipe's choices. One update, as in the paper (arXiv 2202.03555 §3) and fairseq
`examples/data2vec/models/data2vec_audio.py`:

1. The student (`Data2VecForPretraining`) encodes the waveform with span masks
   (`d2vcli.objective.masking.compute_mask_indices`, keyed by the batch) replacing masked frames by
   `mask_emb`, and regresses the masked frames through `final_proj`.
2. The teacher (`EMATeacher`), an EMA copy of the student's *transformer* only, runs in eval mode
   without gradient on the student's **unmasked** projected features (`features` of the student's
   forward; the conv encoder, its LayerNorm and the projection are shared, so there is no second
   conv pass). Its positional conv is copied from the student at each EMA step, not averaged
   (fairseq `ema_layers_only`; `TEACHER_COPIED_PREFIXES`).
3. Targets (`build_targets`): the teacher's top K FFN outputs, each instance-normalized over time in
   fp32, averaged.
4. Loss (`regression_loss`): squared error summed over channels at masked frames, x 1/sqrt(D), in fp32;
   sample_size = masked frames, so the engine divides by the total over micro-batches and ranks.
5. After the optimizer step the engine calls `after_update`, which makes exactly one EMA step with
   decay `ema_decay_at(step)`: linear 0.999 -> 0.9999 over 30k updates, then constant.
   Deliberate difference: fairseq steps the EMA before every *forward* (in the model's
   `set_num_updates`, which `FairseqTask.train_step` calls per micro-batch), so with gradient
   accumulation k its teacher moves k times per update (effective decay tau^k). Here it moves once per update, whatever the accumulation, so a 1-GPU run with 16x
   accumulation has the teacher of the 16-GPU recipe.
6. Collapse monitors (`d2vcli.objective.monitors`): target and prediction std (fairseq's
   `compute_var`, a mean std) every update; on log steps also the conv features' time-varying
   share, the targets' position-explained share and the teacher's target-layer variance over the
   instance-norm eps. After `collapse_check_after` updates a guard (`collapse_guards`) that trips
   saves a checkpoint and stops with a message naming the monitor, its meaning and what to change.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from d2vcli import checkpoint as ckpt
from d2vcli import config as cfgmod
from d2vcli import distributed, engine, pretrain_text, pretrain_text2, pretrain_vision, pretrain_vision2
from d2vcli.callable_module import make_callable
from d2vcli.config import Config
from d2vcli.data import STREAM_MASK, STREAM_MASK_NOISE, AudioDataset, Batch, BatchLoader, batch_rng, read_splits
from d2vcli.engine import StepOutput, TrainResult
from d2vcli.models.audio import parameter_count
from d2vcli.models.loading import build_model
from d2vcli.objective.masking import compute_block_mask, compute_mask_indices
from d2vcli.objective.monitors import (Guard, collapse_reason, compute_std, layer_variance_ratio,
                                      position_explained_share, spread_guards, time_varying_share)
from d2vcli.objective.targets import build_targets, regression_loss
from d2vcli.objective.teacher import EMATeacher
from d2vcli.run_dir import opened_run, print_run_config
from d2vcli.ui import console

# Teacher parameters copied from the student rather than averaged: the positional conv of the
# audio transformer (fairseq `ema_layers_only`, the recipe's setting).
TEACHER_COPIED_PREFIXES = ("pos_conv.",)

# What the collapse message suggests, in the terms of this recipe's config. The spread guards are
# fairseq's; the other three see the collapse measured on speech-tiny, and their fixes are the ones
# that cured it there (docs/troubleshooting.md).
SPREAD_FIXES = (
    "learning rate too high for the batch: lower optim.lr (e.g. halve it) or extend the warmup;",
    "batch too small: raise train.batch_seconds (gradient accumulation reproduces the recipe's batch);",
    "target normalization off: keep objective.layer_target_norm=instance;",
    "input normalization: keep data.normalize=true with the LayerNorm conv encoder.",
)
CONV_FIXES = (
    "lower optim.lr or lengthen the warmup (schedule.phase_ratio): the shared conv encoder drifts fastest early;",
    "feature_grad_mult between 0 and 1 does nothing under Adam (a constant gradient scale cancels); "
    "0 freezes the conv encoder, which stops the drift but also stops it from learning;",
)
TARGET_FIXES = (
    "on a small model, raise model.init_std (speech-tiny: 0.07 = 0.02 x sqrt(768 / width)): with BERT's 0.02 "
    "a narrow layer's outputs start near the instance-norm eps;",
)


def collapse_guards(obj: cfgmod.ObjectiveConfig) -> list[Guard]:
    """The pretraining stop rules with this config's thresholds."""
    return [
        *spread_guards(obj.min_target_std, obj.min_pred_std, "frames", SPREAD_FIXES),
        Guard("conv_time_share", "objective.min_conv_time_share", obj.min_conv_time_share, below=True,
              meaning="the shared conv encoder outputs nearly the same vector at every frame of an utterance, "
              "so neither student nor teacher sees the audio any more.",
              fixes=CONV_FIXES + TARGET_FIXES + SPREAD_FIXES[1:2]),
        Guard("target_position_share", "objective.max_position_share", obj.max_position_share, below=False,
              meaning="the targets mostly encode where a frame is (the positional conv's edge effects), "
              "not what it holds.", fixes=CONV_FIXES[:1] + TARGET_FIXES),
        Guard("teacher_var_ratio", "objective.min_teacher_var_ratio", obj.min_teacher_var_ratio, below=True,
              meaning="a target layer's variance over time is near the instance-norm eps (1e-5), so instance "
              "norm amplifies numerical residue into the targets.", fixes=TARGET_FIXES + CONV_FIXES[:1]),
    ]


# ----------------------------------------------------------------------------- the task


class PretrainTask:
    """data2vec pretraining for the engine (see engine.TrainTask for the interface)."""

    kind = "pretrain"

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.model = build_model("pretrain", cfg.model).to(device)
        self.teacher = EMATeacher(self.model.backbone.transformer, copied_prefixes=TEACHER_COPIED_PREFIXES)
        # LayerDrop makes a rank skip layers: DDP must look for parameters without gradient.
        self.find_unused_parameters = cfg.model.layerdrop > 0

    def time_mask(self, batch: Batch, num_frames_: int, frame_pad: Optional[Tensor]) -> Tensor:
        """(B, T) bool span mask, drawn from the batch's own RNG stream (same in any process or resume)."""
        m = self.cfg.masking
        rng = batch_rng(self.cfg.train.seed, batch.epoch, batch.index, STREAM_MASK)
        mask = compute_mask_indices((batch.source.shape[0], num_frames_), frame_pad, m.mask_prob, m.mask_length,
                                    min_masks=m.min_masks, require_same_masks=m.require_same_masks, rng=rng)
        return torch.from_numpy(mask).to(batch.source.device, non_blocking=True)

    def train_step(self, model: nn.Module, batch: Batch, step: int) -> StepOutput:
        obj = self.cfg.objective
        source, padding_mask = batch.source, batch.padding_mask  # (B, S), (B, S) | None
        backbone = self.model.backbone
        frames = backbone.num_frames(source.shape[1])
        frame_pad = backbone.frame_padding_mask(padding_mask, frames)  # (B, T) | None
        time_mask = self.time_mask(batch, frames, frame_pad)  # (B, T)
        out = model(source, padding_mask, time_mask=time_mask)
        pred = out["pred"]  # (N_masked, D)
        layer_results = self.teacher.layer_results(out["features"], out["padding_mask"])
        with torch.no_grad():
            full_target = build_targets(layer_results, obj.average_top_k_layers, obj.layer_target_norm,
                                        obj.final_target_norm)  # (B, T, D) fp32
            target = full_target[time_mask]  # (N_masked, D)
        loss = regression_loss(pred, target, obj.loss_beta, obj.loss_scale)
        metrics = {"target_std": compute_std(target), "pred_std": compute_std(pred)}
        if (step + 1) % max(1, self.cfg.train.log_every) == 0:  # the update this step makes is logged
            metrics.update(self.collapse_monitors(out, layer_results, full_target))
        return StepOutput(loss=loss, sample_size=pred.shape[0], metrics=metrics)

    def collapse_monitors(self, out: dict, layer_results: list[Tensor], full_target: Tensor) -> dict:
        """The log-step monitors (objective.monitors): conv time share, position share, teacher variance."""
        pad = out["padding_mask"]
        top = layer_results[-self.cfg.objective.average_top_k_layers:]
        ratios = layer_variance_ratio(top, pad)
        metrics = {
            "conv_time_share": time_varying_share(out["conv_features"], pad),
            "target_position_share": position_explained_share(full_target, pad),
            "teacher_var_ratio": torch.stack(ratios).min(),  # the guard watches the weakest target layer
        }
        # Per target layer, counted from the top (LayerDrop can skip layers, so absolute indices vary).
        metrics.update({f"teacher_var_ratio_top{j + 1}": r for j, r in enumerate(reversed(ratios))})
        return metrics

    def after_update(self, step: int) -> dict:
        return self.teacher.scheduled_step(step, self.cfg.objective)

    def validate(self, model: nn.Module, step: int) -> None:
        return None  # the fairseq recipe disables validation during pretraining

    def stop_reason(self, step: int, metrics: dict) -> Optional[str]:
        obj = self.cfg.objective
        return collapse_reason(step, metrics, check_after=obj.collapse_check_after, guards=collapse_guards(obj))

    def checkpoint_state(self) -> dict:
        return {
            ckpt.ARCH_KEY: cfgmod.to_dict(self.cfg.model),
            ckpt.NORMALIZE_KEY: self.cfg.data.normalize,
            ckpt.TEACHER_KEY: self.teacher.state_dict(),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state[ckpt.TEACHER_KEY])


class Pretrain2Task(PretrainTask):
    """data2vec 2.0 pretraining (`model.version: 2`) for the same engine, objective core and monitors.

    What changes against 1.0 (docs/recipe2.md; fairseq `examples/data2vec/models/data2vec2.py`):
    - masks: `masking.clone_batch` (M) block masks per utterance, exactly floor(mask_prob x T)
      frames each, drawn from the batch's own RNG (like 1.0's), rows sample-major;
    - the student (`Data2Vec2ForPretraining`) encodes only each clone's kept frames and its conv
      decoder predicts the masked ones; its mask tokens come from a generator keyed by the batch too;
    - the teacher is an EMA of the whole `ContextEncoder` (positional conv, ALiBi scale, input
      LayerNorm, prenet and main layers; not the conv front end, not the decoder), run once per
      utterance on the unmasked features; its targets are repeated for the M clones.
    Loss, its normalization (a sum over masked frames of all clones, divided by their count), the
    EMA schedule and step, and the collapse monitors are 1.0's.
    """

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.model = build_model("pretrain", cfg.model).to(device)
        # Nothing is copied instead of averaged (fairseq ema_encoder_only=false, ema_local_encoder=false).
        self.teacher = EMATeacher(self.model.backbone.encoder)
        if cfg.model.feature_grad_mult == 0:  # a frozen conv encoder (speech2-tiny) runs under no_grad: no grads
            self.model.backbone.feature_extractor.requires_grad_(False)
        self.find_unused_parameters = cfg.model.layerdrop > 0

    def time_mask(self, batch: Batch, num_frames_: int, frame_pad: Optional[Tensor]) -> Tensor:
        """(A * M, T) bool block masks, utterance 0's M clones first, from the batch's own RNG stream."""
        m = self.cfg.masking
        rows = batch.source.shape[0] * m.clone_batch
        pad = frame_pad.repeat_interleave(m.clone_batch, 0) if frame_pad is not None else None
        rng = batch_rng(self.cfg.train.seed, batch.epoch, batch.index, STREAM_MASK)
        mask = compute_block_mask((rows, num_frames_), pad, m.mask_prob, m.mask_length, m.mask_prob_adjust, rng)
        return torch.from_numpy(mask).to(batch.source.device, non_blocking=True)

    def noise_generator(self, batch: Batch, device: torch.device) -> torch.Generator:
        """The decoder's mask-token generator for this batch (the same in any process or resumed run)."""
        seed = int(batch_rng(self.cfg.train.seed, batch.epoch, batch.index, STREAM_MASK_NOISE).integers(2**62))
        return torch.Generator(device=device).manual_seed(seed)

    def train_step(self, model: nn.Module, batch: Batch, step: int) -> StepOutput:
        obj = self.cfg.objective
        source, padding_mask = batch.source, batch.padding_mask  # (A, S), (A, S) | None
        backbone = self.model.backbone
        frames = backbone.num_frames(source.shape[1])
        frame_pad = backbone.frame_padding_mask(padding_mask, frames)  # (A, T) | None
        time_mask = self.time_mask(batch, frames, frame_pad)  # (A * M, T)
        out = model(source, padding_mask, time_mask=time_mask, generator=self.noise_generator(batch, source.device))
        pred = out["pred"]  # (N_masked, D), all clones
        # Once per utterance, on the unmasked features: (A, T, D) per main layer.
        layer_results = self.teacher.layer_results(out["features"], out["padding_mask"])
        with torch.no_grad():
            full_target = build_targets(layer_results, obj.average_top_k_layers, obj.layer_target_norm,
                                        obj.final_target_norm)  # (A, T, D) fp32
            target = full_target.repeat_interleave(out["clones"], 0)[time_mask]  # (N_masked, D)
        loss = regression_loss(pred, target, obj.loss_beta, obj.loss_scale)
        metrics = {"target_std": compute_std(target), "pred_std": compute_std(pred),
                   "masked_share": time_mask.float().mean()}
        if (step + 1) % max(1, self.cfg.train.log_every) == 0:
            metrics.update(self.collapse_monitors(out, layer_results, full_target))
        return StepOutput(loss=loss, sample_size=pred.shape[0], metrics=metrics)


def make_task(cfg: Config, device: torch.device) -> PretrainTask:
    """The pretraining task of the config's data2vec version."""
    return Pretrain2Task(cfg, device) if cfg.model.version == 2 else PretrainTask(cfg, device)


# ----------------------------------------------------------------------------- entry point


def _prepare_command(split: str, workdir) -> str:
    w = f" --workdir {workdir}"
    if split.startswith("librilight-") and split != "librilight-limited":
        return f"d2v prepare librilight --root /path/to/librilight --subset {split.split('-', 1)[1]}{w}"
    if split.split("-")[0] in ("train", "dev", "test") and split != "train":
        return f"d2v prepare librispeech --root /path/to/LibriSpeech --splits {split}{w}"
    if split == "train":
        return f"d2v prepare synthetic{w}   (or: d2v prepare folder /path/to/audio --split train{w})"
    return f"d2v prepare folder /path/to/audio --split {split}{w}"


def check_manifests(workspace, splits: Sequence[str]) -> None:
    """Fail before anything is created when a training split has no manifest, saying what to run."""
    missing = [s for s in splits if not workspace.manifest(s).exists()]
    if not missing:
        return
    commands = "\n".join(f"  {_prepare_command(s, workspace.root)}" for s in missing)
    raise FileNotFoundError(
        f"no manifest for data.train_splits {', '.join(missing)} in {workspace.data_dir}. Create them with:\n"
        f"{commands}\nor train on prepared splits with --set 'data.train_splits=[...]'."
    )


def build_loader(cfg: Config, workspace, info: distributed.DistInfo) -> BatchLoader:
    records = read_splits(workspace, cfg.data.train_splits)
    dataset = AudioDataset(records, normalize=cfg.data.normalize, min_sample_size=cfg.data.min_sample_size)
    loader = BatchLoader(
        dataset, "crop", cfg.data.max_tokens, cfg.train.seed, max_sample_size=cfg.data.max_sample_size,
        rank=info.rank, world_size=info.world_size, num_workers=cfg.data.num_workers,
        pin_memory=info.device.type == "cuda", max_bad_files=cfg.data.max_bad_files,
        length_buckets=cfg.data.length_buckets,
    )
    if info.is_main:
        if loader.buckets is not None:
            console.print(f"batches: {loader.bucketing_cost()}", markup=False)
        console.print(
            f"data: {len(dataset):,} utterances, {dataset.seconds / 3600:.2f} h from {', '.join(cfg.data.train_splits)} "
            f"({dataset.skipped:,} shorter than {cfg.data.min_sample_size} samples skipped); "
            f"{len(loader.batches(1)):,} batches per epoch"
        )
    return loader


def pretrain(
    cfg: Config,
    workspace,
    name: Optional[str] = None,
    resume: bool = False,
    preset: Optional[str] = None,
    stop_at: Optional[int] = None,
    resume_if_exists: bool = False,
) -> TrainResult:
    """Run (or resume) data2vec pretraining in <workdir>/runs/<name>; returns how it ended.

    `resume` without a checkpoint is an error; `resume_if_exists` then starts fresh. The run
    is locked for this process until it returns (`run_dir.run_lock`). `stop_at` saves and
    returns after that many updates (status "paused") without changing the schedule,
    so a run can be split into parts that together equal one uninterrupted run.
    A config with `modality: images` trains the ViT (`d2vcli.pretrain_vision`; with `model.version: 2`
    data2vec 2.0's, `d2vcli.pretrain_vision2`), `modality: text` the text encoder (`d2vcli.pretrain_text`;
    with `model.version: 2` `d2vcli.pretrain_text2`).
    """
    if cfg.modality == "text":
        run = pretrain_text2.pretrain if cfg.model.version == 2 else pretrain_text.pretrain
        return run(cfg, workspace, name=name, resume=resume, preset=preset, stop_at=stop_at,
                   resume_if_exists=resume_if_exists)
    if cfg.modality == "images":
        run = pretrain_vision2.pretrain if cfg.model.version == 2 else pretrain_vision.pretrain
        return run(cfg, workspace, name=name, resume=resume, preset=preset, stop_at=stop_at,
                                        resume_if_exists=resume_if_exists)
    info = distributed.setup(cfg.train.device)
    try:
        check_manifests(workspace, cfg.data.train_splits)
        with opened_run(workspace, cfg, info, "pretrain", name, preset, resume, resume_if_exists) as run:
            task = make_task(cfg, info.device)
            if info.is_main:
                print_run_config(cfg, "pretrain", preset, run)
                console.print(f"model: {parameter_count(task.model):,} parameters "
                              f"({cfg.model.num_layers} x {cfg.model.embed_dim}, data2vec {cfg.model.version}.0, "
                              f"teacher: EMA of the {'context encoder' if cfg.model.version == 2 else 'transformer'})")
            loader = build_loader(cfg, workspace, info)
            return engine.train(cfg, task, loader, run, info, description="pretrain", stop_at=stop_at)
    finally:
        distributed.teardown()


# `d2vcli.pretrain(cfg, ws)` calls the function (the Python API, see d2vcli/__init__.py).
make_callable(__name__, pretrain)
