"""data2vec 1.0 pretraining of the ViT: the image task that wires it to the objective core.

    d2v prepare synthetic-images && d2v pretrain --preset vision-tiny      # minutes on CPU
    d2v prepare images /data/imagenet && d2v pretrain --preset vision-base
    torchrun --nproc_per_node 8 -m d2vcli pretrain --preset vision-base  # 8 x 128 x 2 accumulation

`d2vcli.pretrain.pretrain` hands a config with `modality: images` to `pretrain()` here. The recipe
is the BEiT codebase's (`data2vec_vision/beit`: `engine_for_cyclical.py`, `run_cyclical.py`;
docs/images.md). One update:

1. Masks: BEiT block masks (`objective.image_masking.block_masks`), drawn per batch from the
   batch's own RNG stream, so they are the same in any process or resumed run.
2. The student (`Data2VecVisionForPretraining`) replaces masked patch embeddings by the learned
   mask token and predicts every patch through `norm` and `lm_head`; the masked ones are scored.
3. The teacher (`EMATeacher`) is an EMA of the **whole** student model (patch embedding, tokens,
   position table, blocks, heads: timm's ModelEmaV2 in the recipe) and runs in eval mode on the
   **unmasked** image; its end-of-block outputs, CLS dropped, are the layer results.
4. Targets (`build_targets`): the top K (6 for ViT-B/L) layer-normed, averaged, layer-normed again.
5. Loss (`regression_loss`): smooth L1 with beta 2 summed over the masked patches' elements;
   sample_size = masked patches x D, so the engine's division gives the recipe's mean over all
   elements, over micro-batches and ranks.
6. `after_update`: one EMA step at `ema_decay_at(step)` (constant 0.9998 in the recipe).
7. Monitors: target and prediction std every update; the guards stop a collapsed run.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from d2vcli import checkpoint as ckpt
from d2vcli import config as cfgmod
from d2vcli import distributed, engine
from d2vcli.config import Config
from d2vcli.data import STREAM_MASK, Batch, DataError, batch_rng
from d2vcli.engine import StepOutput, TrainResult
from d2vcli.image_data import ImageBatchLoader, pretrain_transform, read_image_manifest
from d2vcli.models.audio import parameter_count
from d2vcli.models.loading import build_vision_model, vision_arch
from d2vcli.objective.image_masking import BlockMaskParams, block_masks
from d2vcli.objective.monitors import Guard, collapse_reason, compute_std, spread_guards
from d2vcli.objective.targets import build_targets, regression_loss
from d2vcli.objective.teacher import EMATeacher
from d2vcli.prepare.images import image_manifest, images_dir
from d2vcli.run_dir import opened_run, print_run_config
from d2vcli.ui import console

SPREAD_FIXES = (
    "learning rate too high for the batch: lower optim.lr (e.g. halve it) or lengthen schedule.warmup_updates;",
    "batch too small: raise train.images_per_update (gradient accumulation reproduces the recipe's batch);",
    "target normalization off: keep objective.layer_target_norm=layer and objective.final_target_norm=layer;",
)


def collapse_guards(obj: cfgmod.ObjectiveConfig) -> list[Guard]:
    """The image pretraining stop rules: the spread of targets and predictions (fairseq's compute_var guards)."""
    return spread_guards(obj.min_target_std, obj.min_pred_std, "patches", SPREAD_FIXES)


def mask_params(m: cfgmod.MaskingConfig) -> BlockMaskParams:
    return BlockMaskParams(num_masking_patches=m.block_patches, min_num_patches=m.block_min_patches,
                           min_aspect=m.block_min_aspect)


# ----------------------------------------------------------------------------- the task


class VisionPretrainTask:
    """data2vec 1.0 vision pretraining for the engine (see engine.TrainTask for the interface)."""

    kind = "vision-pretrain"
    teacher_scope = "the whole model"

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.arch = vision_arch(cfgmod.to_dict(cfg.vision), "the vision config section")
        self.model = build_vision_model("vision-pretrain", self.arch).to(device)
        self.teacher = EMATeacher(self.model)  # the whole model, nothing copied (BEiT's ModelEmaV2)
        # Drop path skips whole residual branches per sample, never a parameter for the whole batch.
        self.find_unused_parameters = False

    def patch_mask(self, batch: Batch) -> Tensor:
        """(B, N) bool block masks (True = masked), drawn from the batch's own RNG stream."""
        rng = batch_rng(self.cfg.train.seed, batch.epoch, batch.index, STREAM_MASK)
        mask = block_masks(rng, batch.source.shape[0], self.arch.grid, mask_params(self.cfg.masking))
        return torch.from_numpy(mask).to(batch.source.device, non_blocking=True)

    def targets(self, images: Tensor) -> Tensor:
        """The teacher's targets for every patch of the unmasked images: (B, N, D) fp32."""
        obj = self.cfg.objective
        layer_results = self.teacher.layer_results(images, None)  # L x (B, 1+N, D)
        with torch.no_grad():
            return build_targets([y[:, 1:] for y in layer_results], obj.average_top_k_layers,
                                 obj.layer_target_norm, obj.final_target_norm)

    def train_step(self, model: nn.Module, batch: Batch, step: int) -> StepOutput:
        obj = self.cfg.objective
        images = batch.source  # (B, 3, H, W)
        mask = self.patch_mask(batch)  # (B, N)
        pred = model(images, mask)[mask]  # (N_masked, D)
        target = self.targets(images)[mask]  # (N_masked, D)
        loss = regression_loss(pred, target, obj.loss_beta, obj.loss_scale)
        metrics = {"target_std": compute_std(target), "pred_std": compute_std(pred),
                   "masked_share": mask.float().mean()}
        return StepOutput(loss=loss, sample_size=pred.numel(), metrics=metrics)

    def after_update(self, step: int) -> dict:
        return self.teacher.scheduled_step(step, self.cfg.objective)

    def validate(self, model: nn.Module, step: int) -> None:
        return None  # the recipe does not validate during pretraining

    def stop_reason(self, step: int, metrics: dict) -> Optional[str]:
        obj = self.cfg.objective
        return collapse_reason(step, metrics, check_after=obj.collapse_check_after, guards=collapse_guards(obj))

    def checkpoint_state(self) -> dict:
        return {
            ckpt.ARCH_KEY: cfgmod.to_dict(self.arch),
            ckpt.NORMALIZE_KEY: False,  # images are normalized with the arch's image_mean / image_std
            ckpt.TEACHER_KEY: self.teacher.state_dict(),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state[ckpt.TEACHER_KEY])


# ----------------------------------------------------------------------------- entry point


def check_image_manifests(workspace, splits: Sequence[str]) -> None:
    """Fail before anything is created when a training split has no image manifest, saying what to run."""
    missing = [s for s in splits if not image_manifest(workspace, s).exists()]
    if not missing:
        return
    w = f" --workdir {workspace.root}"
    raise DataError(
        f"no image manifest for data.train_splits {', '.join(missing)} in {images_dir(workspace)}. Create it with:\n"
        f"  d2v prepare images /path/to/images{w}   (train/<class>/*.jpg, ...; or one folder of class folders "
        f"with --split NAME)\n  d2v prepare synthetic-images{w}   (the generated corpus: splits pool, train, "
        f"val, test)\nor train on prepared splits with --set 'data.train_splits=[...]'."
    )


def build_image_loader(cfg: Config, workspace, info: distributed.DistInfo) -> ImageBatchLoader:
    records = [r for s in cfg.data.train_splits for r in read_image_manifest(image_manifest(workspace, s))]
    v = cfg.vision
    transform = pretrain_transform(v.image_size, v.image_mean, v.image_std, min_scale=cfg.data.min_crop_scale,
                                   color_jitter=cfg.model.version == 1)
    loader = ImageBatchLoader(records, transform, cfg.data.images_per_batch, cfg.train.seed, rank=info.rank,
                              world_size=info.world_size, num_workers=cfg.data.num_workers,
                              pin_memory=info.device.type == "cuda", max_bad_files=cfg.data.max_bad_files)
    if info.is_main:
        console.print(f"data: {len(records):,} images from {', '.join(cfg.data.train_splits)}; "
                      f"{len(loader.batches(1)):,} batches of {cfg.data.images_per_batch} per epoch")
    return loader


def pretrain(cfg: Config, workspace, name: Optional[str] = None, resume: bool = False, preset: Optional[str] = None,
             stop_at: Optional[int] = None, resume_if_exists: bool = False,
             make_task: Callable[[Config, torch.device], "VisionPretrainTask"] = None) -> TrainResult:
    """Run (or resume) data2vec image pretraining in <workdir>/runs/<name>; as `d2vcli.pretrain.pretrain`.
    `make_task` builds the task (default VisionPretrainTask; data2vec 2.0's comes from pretrain_vision2)."""
    info = distributed.setup(cfg.train.device)
    try:
        check_image_manifests(workspace, cfg.data.train_splits)
        with opened_run(workspace, cfg, info, "pretrain", name, preset, resume, resume_if_exists) as run:
            task = (make_task or VisionPretrainTask)(cfg, info.device)
            if info.is_main:
                print_run_config(cfg, "pretrain", preset, run)
                a = task.arch
                console.print(f"model: {parameter_count(task.model):,} parameters (ViT {a.num_layers} x "
                              f"{a.embed_dim}, {a.grid[0]}x{a.grid[1]} patches of {a.patch_size} px; teacher: "
                              f"EMA of {task.teacher_scope})")
            loader = build_image_loader(cfg, workspace, info)
            return engine.train(cfg, task, loader, run, info, description="pretrain", stop_at=stop_at,
                                batch=engine.image_batch_unit(cfg))
    finally:
        distributed.teardown()
