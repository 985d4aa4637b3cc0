"""data2vec 1.0 pretraining: the EMA teacher, the targets and the regression loss, in plain sight.

    d2v pretrain --preset speech-base                       # LibriSpeech 960 h (d2v prepare librispeech)
    d2v pretrain --preset speech-tiny --name demo           # seconds on CPU (d2v prepare synthetic)
    torchrun --nproc_per_node 8 -m d2vcli pretrain --preset speech-base
    d2v pretrain --preset speech-base --resume              # continue the run exactly

Python: `pretrain(cfg, workspace, name=..., resume=...) -> engine.TrainResult`.

One update, as in the paper (arXiv 2202.03555 §3) and fairseq's `data2vec_audio.py` (reference §2):

1. The student (`Data2VecForPretraining`) encodes the waveform with span masks
   (`d2vcli.masking.compute_mask_indices`, keyed by the batch) replacing masked frames by
   `mask_emb`, and regresses the masked frames through `final_proj`.
2. The teacher (`EMATeacher`), an EMA copy of the student's *transformer* only, runs in eval mode
   without gradient on the student's **unmasked** projected features (`features` of the student's
   forward; the conv encoder, its LayerNorm and the projection are shared, so there is no second
   conv pass). Its positional conv is copied from the student at each EMA step, not averaged
   (fairseq `ema_layers_only`).
3. Targets (`build_targets`): the teacher's top K FFN outputs, each instance-normalized over time in
   fp32, averaged.
4. Loss (`regression_loss`): squared error summed over channels at masked frames, x 1/sqrt(D), in fp32;
   sample_size = masked frames, so the engine divides by the total over micro-batches and ranks.
5. After the optimizer step the engine calls `after_update`, which makes exactly one EMA step with
   decay `ema_decay_at(step)`: linear 0.999 -> 0.9999 over 30k updates, then constant.
   Deliberate difference: fairseq steps the EMA before every *forward* (reference P1), so with
   gradient accumulation k its teacher moves k times per update (effective decay tau^k). Here it moves
   once per update, whatever the accumulation, so a 1-GPU run with 16x accumulation has the teacher
   of the 16-GPU recipe.
6. Collapse monitors (`compute_std`, fairseq's `compute_var`, which is a mean std): target and
   prediction std are logged every update; after `collapse_check_after` updates a value below
   `min_target_std` / `min_pred_std` saves a checkpoint and stops with an explanation.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2vcli import checkpoint as ckpt
from d2vcli import config as cfgmod
from d2vcli import distributed, engine
from d2vcli.config import Config, ObjectiveConfig
from d2vcli.data import STREAM_MASK, AudioDataset, BatchLoader, batch_rng, read_splits
from d2vcli.engine import StepOutput, TrainResult
from d2vcli.manifest import num_frames
from d2vcli.masking import compute_mask_indices
from d2vcli.model import Data2VecForPretraining, build_backbone, parameter_count
from d2vcli.ui import console

STD_EPS = 1e-6  # fairseq compute_var: sqrt(var + 1e-6)


# ----------------------------------------------------------------------------- teacher


def ema_decay_at(step: int, objective: ObjectiveConfig) -> float:
    """Teacher decay for the EMA step after update `step`: linear from ema_decay to ema_end_decay
    over ema_anneal_end_step updates, then constant (fairseq `get_annealed_rate`)."""
    start, end, total = objective.ema_decay, objective.ema_end_decay, objective.ema_anneal_end_step
    if step >= total:
        return end
    return end - (end - start) * (1.0 - step / total)


class EMATeacher:
    """An exponential moving average of the student's transformer (pos_conv + LayerNorm + layers).

    Built once at setup as a deep copy, so it starts equal to the student. Weights are fp32 (a
    1e-4 update is below fp16 resolution; autocast still runs its matmuls in bf16/fp16), it stays
    in eval mode (no dropout, no LayerDrop) and never receives gradients.

    `step(decay)` does theta_t <- decay * theta_t + (1 - decay) * theta_s for every parameter except
    the positional conv, which is copied (fairseq `ema_layers_only`: its skip keys are copied),
    in a handful of fused foreach kernels. At decay >= 1 the teacher is frozen (fairseq skips).
    """

    COPIED_PREFIXES = ("pos_conv.",)

    def __init__(self, student_transformer: nn.Module):
        self.module = copy.deepcopy(student_transformer).float().eval().requires_grad_(False)
        self.bind(student_transformer)

    def bind(self, student_transformer: nn.Module) -> None:
        """Pair each teacher tensor with the student's (the student's Parameters live for the whole run)."""
        student = dict(student_transformer.named_parameters())
        self._ema_t, self._ema_s, self._copy_t, self._copy_s = [], [], [], []
        for name, p in self.module.named_parameters():
            copied = name.startswith(self.COPIED_PREFIXES)
            (self._copy_t if copied else self._ema_t).append(p)
            (self._copy_s if copied else self._ema_s).append(student[name])
        student_buffers = dict(student_transformer.named_buffers())
        for name, b in self.module.named_buffers():
            self._copy_t.append(b)
            self._copy_s.append(student_buffers[name])

    @torch.no_grad()
    def step(self, decay: float) -> None:
        if decay >= 1.0:
            return
        torch._foreach_lerp_(self._ema_t, [s.detach().float() for s in self._ema_s], 1.0 - decay)
        if self._copy_t:
            torch._foreach_copy_(self._copy_t, [s.detach() for s in self._copy_s])

    @torch.no_grad()
    def layer_results(self, features: Tensor, padding_mask: Optional[Tensor]) -> list[Tensor]:
        """features (B, T, D) unmasked student features -> FFN outputs of every layer, each (B, T, D)."""
        self.module.eval()
        _, layer_results = self.module(features.detach(), padding_mask, return_layer_results=True)
        return layer_results

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


# ----------------------------------------------------------------------------- targets and loss


def _instance_norm(x: Tensor) -> Tensor:  # (B, T, D): per utterance and channel, over time
    return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)


def build_targets(layer_results: Sequence[Tensor], k: int, layer_norm: str = "instance",
                  final_norm: str = "none") -> Tensor:
    """Average of the top-k teacher layers, each normalized in fp32 -> (B, T, D) fp32.

    layer_norm: "instance" (over time per utterance and channel, F.instance_norm: biased variance,
    eps 1e-5), "layer" (over channels per frame), "batch" (per channel over batch and time), "none".
    final_norm: "instance", "layer" or "none", applied to the average.
    """
    top = [y.float() for y in layer_results[-k:]]  # k x (B, T, D)
    if layer_norm == "instance":
        top = [_instance_norm(y) for y in top]
    elif layer_norm == "layer":
        top = [F.layer_norm(y, y.shape[-1:]) for y in top]
    elif layer_norm == "batch":
        top = [F.batch_norm(y.transpose(1, 2), None, None, training=True).transpose(1, 2) for y in top]
    elif layer_norm != "none":
        raise ValueError(f"unknown layer_target_norm {layer_norm!r}")
    y = torch.stack(top).mean(0)  # (B, T, D)
    if final_norm == "instance":
        y = _instance_norm(y)
    elif final_norm == "layer":
        y = F.layer_norm(y, y.shape[-1:])
    elif final_norm != "none":
        raise ValueError(f"unknown final_target_norm {final_norm!r}")
    return y


def regression_loss(pred: Tensor, target: Tensor, loss_beta: float = 0.0, loss_scale: Optional[float] = None) -> Tensor:
    """pred, target (N, D) at the masked frames -> scalar loss, summed over frames (fp32).

    Per frame: sum over channels of the squared error (loss_beta 0) or smooth L1 with that beta;
    times loss_scale, or 1/sqrt(D) when it is None.
    """
    pred, target = pred.float(), target.float()
    if loss_beta == 0:
        per_frame = F.mse_loss(pred, target, reduction="none").sum(-1)  # (N,)
    else:
        per_frame = F.smooth_l1_loss(pred, target, reduction="none", beta=loss_beta).sum(-1)
    scale = loss_scale if loss_scale is not None else 1.0 / math.sqrt(pred.shape[-1])
    return per_frame.sum() * scale


@torch.no_grad()
def compute_std(y: Tensor) -> Tensor:
    """Mean over channels of the per-channel std over all frames of all ranks (fairseq compute_var).

    y (..., D). Per channel: unbiased variance from all-reduced count, sum and sum of squares;
    then sqrt(var + 1e-6) and the mean over channels. 0-dim fp32 tensor.
    """
    y = y.reshape(-1, y.shape[-1]).float()
    stats = torch.cat([
        torch.tensor([float(y.shape[0])], dtype=torch.float64, device=y.device),
        y.sum(0, dtype=torch.float64),
        (y * y).sum(0, dtype=torch.float64),
    ])
    distributed.all_reduce_sum(stats)
    n, s, ss = stats[0], stats[1:1 + y.shape[1]], stats[1 + y.shape[1]:]
    var = (ss - s * s / n) / (n - 1).clamp(min=1)
    return torch.sqrt(var.clamp(min=0) + STD_EPS).mean().float()


# ----------------------------------------------------------------------------- the task


class PretrainTask:
    """data2vec pretraining for the engine (see engine.TrainTask for the interface)."""

    kind = "pretrain"

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.model = Data2VecForPretraining(build_backbone(cfg.model)).to(device)
        self.teacher = EMATeacher(self.model.backbone.transformer)
        # LayerDrop makes a rank skip layers: DDP must look for parameters without gradient.
        self.find_unused_parameters = cfg.model.layerdrop > 0

    def time_mask(self, batch: dict, num_frames_: int, frame_pad: Optional[Tensor]) -> Tensor:
        """(B, T) bool span mask, drawn from the batch's own RNG stream (same in any process or resume)."""
        m = self.cfg.masking
        rng = batch_rng(self.cfg.train.seed, batch["epoch"], batch["index"], STREAM_MASK)
        mask = compute_mask_indices((batch["source"].shape[0], num_frames_), frame_pad, m.mask_prob, m.mask_length,
                                    min_masks=m.min_masks, require_same_masks=m.require_same_masks, rng=rng)
        return torch.from_numpy(mask).to(batch["source"].device, non_blocking=True)

    def train_step(self, model: nn.Module, batch: dict, step: int) -> StepOutput:
        obj = self.cfg.objective
        source, padding_mask = batch["source"], batch["padding_mask"]  # (B, S), (B, S) | None
        backbone = self.model.backbone
        frames = num_frames(source.shape[1], backbone.conv_layers)
        frame_pad = backbone.frame_padding_mask(padding_mask, frames)  # (B, T) | None
        time_mask = self.time_mask(batch, frames, frame_pad)  # (B, T)
        out = model(source, padding_mask, time_mask=time_mask)
        pred = out["pred"]  # (N_masked, D)
        layer_results = self.teacher.layer_results(out["features"], out["padding_mask"])
        with torch.no_grad():
            target = build_targets(layer_results, obj.average_top_k_layers, obj.layer_target_norm,
                                   obj.final_target_norm)[time_mask]  # (N_masked, D) fp32
        loss = regression_loss(pred, target, obj.loss_beta, obj.loss_scale)
        metrics = {"target_std": compute_std(target), "pred_std": compute_std(pred)}
        return StepOutput(loss=loss, sample_size=pred.shape[0], metrics=metrics)

    def after_update(self, step: int) -> dict:
        decay = ema_decay_at(step, self.cfg.objective)
        self.teacher.step(decay)
        return {"ema_decay": decay}

    def validate(self, model: nn.Module, step: int) -> None:
        return None  # the reference recipe disables validation during pretraining

    def stop_reason(self, step: int, metrics: dict) -> Optional[str]:
        obj = self.cfg.objective
        if step < obj.collapse_check_after:
            return None
        target_std, pred_std = metrics.get("target_std"), metrics.get("pred_std")
        problems = []
        if target_std is not None and target_std < obj.min_target_std:
            problems.append(f"target std {target_std:.4g} < objective.min_target_std {obj.min_target_std}")
        if pred_std is not None and pred_std < obj.min_pred_std:
            problems.append(f"prediction std {pred_std:.4g} < objective.min_pred_std {obj.min_pred_std}")
        if not problems:
            return None
        return (
            "representation collapse: " + "; ".join(problems) + ".\n"
            "The teacher's targets (or the student's predictions) became nearly constant across frames, so the "
            "loss can fall without learning anything. Usual causes and fixes:\n"
            "  - learning rate too high for the batch: lower optim.lr (e.g. halve it) or extend the warmup;\n"
            "  - batch too small: raise train.batch_seconds (gradient accumulation reproduces the recipe's batch);\n"
            "  - target normalization off: keep objective.layer_target_norm=instance;\n"
            "  - input normalization: keep data.normalize=true with the LayerNorm conv encoder.\n"
            "Resume from the last healthy checkpoint with --resume and the new --set values "
            "(if this one already collapsed, start a new run with --name)."
        )

    def checkpoint_state(self) -> dict:
        return {
            ckpt.ARCH_KEY: cfgmod.to_dict(self.cfg.model),
            ckpt.NORMALIZE_KEY: self.cfg.data.normalize,
            ckpt.TEACHER_KEY: self.teacher.state_dict(),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state[ckpt.TEACHER_KEY])


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
        pin_memory=info.device.type == "cuda",
    )
    if info.is_main:
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
) -> TrainResult:
    """Run (or resume) data2vec pretraining in <workdir>/runs/<name>; returns how it ended.

    `stop_at` saves and returns after that many updates (status "paused") without changing the
    schedule, so a run can be split into parts that together equal one uninterrupted run.
    """
    info = distributed.setup(cfg.train.device)
    try:
        check_manifests(workspace, cfg.data.train_splits)
        run = engine.prepare_run(workspace, name or engine.default_run_name("pretrain", preset), cfg, resume, info)
        torch.manual_seed(cfg.train.seed)  # the same initial weights (and teacher) on every rank
        task = PretrainTask(cfg, info.device)
        if info.is_main:
            console.print(f"model: {parameter_count(task.model):,} parameters "
                          f"({cfg.model.num_layers} x {cfg.model.embed_dim}, teacher: EMA of the transformer)")
        loader = build_loader(cfg, workspace, info)
        return engine.train(cfg, task, loader, run, info, description="pretrain", stop_at=stop_at)
    finally:
        distributed.teardown()
