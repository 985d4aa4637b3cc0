"""data2vec 2.0 pretraining of the ViT: the image task of `model.version: 2` on the shared objective core.

    d2v prepare synthetic-images && d2v pretrain --preset vision2-tiny     # minutes on CPU
    d2v prepare images /data/imagenet && d2v pretrain --preset vision2-base
    torchrun --nproc_per_node 16 -m d2vcli pretrain --preset vision2-base  # 16 x 16 images, no accumulation

`d2vcli.pretrain.pretrain` hands a config with `modality: images` and `model.version: 2` to
`pretrain()` here, which runs `pretrain_vision`'s entry point (manifests, run folder, loader,
engine) with this task. The recipe is fairseq's `data2vec_multi` with modality IMAGE
(`examples/data2vec/config/v2/base_images_only_task.yaml`, `models/data2vec2.py`,
`models/modalities/images.py`; docs/images.md, "data2vec 2.0"). One update, A images, M clones:

1. Masks: `masking.clone_batch` (M) inverse 2-D block masks per image
   (`objective.masking.compute_block_mask_2d`), exactly the same visible count in every row, rows
   sample-major, drawn from the batch's own RNG stream (the same in any process or resumed run).
2. The student (`Data2Vec2VisionForPretraining`) embeds each image once, encodes only each clone's
   visible patches behind a CLS token, and its 2-D conv decoder predicts every patch; its mask
   tokens are noise from a generator keyed by the batch too.
3. The teacher (`EMATeacher`) is an EMA of the whole encoder, patch embedding and CLS token
   included (fairseq `ema_local_encoder: true`; the decoder is not in it), run once per image on
   the same augmented image, unmasked, in eval mode.
4. Targets (`build_targets`): the FFN outputs of the top K main blocks, CLS dropped, each
   instance-normed over the patches, averaged, then layer-normed over D; repeated for the M clones.
5. Loss: `regression_loss` (squared error summed over D, x 1/sqrt(D)) over the masked patches of all
   clones, plus `cls_loss` (weight 0.01): the CLS output regresses the image's mean target, scaled
   by the micro-batch's masked count as fairseq does. sample_size = masked patches, so the engine's
   division gives fairseq's mean over all masked patches of all clones and ranks.
6. `after_update`: one EMA step at `ema_decay_at(step)` (0.9998 -> 0.99999 over 100k updates).
7. Monitors: target and prediction std every update (the recipe's guards are off: thresholds 0).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from d2vcli import config as cfgmod
from d2vcli import pretrain_vision
from d2vcli.config import Config
from d2vcli.data import STREAM_MASK, STREAM_MASK_NOISE, Batch, batch_rng
from d2vcli.engine import StepOutput, TrainResult
from d2vcli.models.loading import build_vision_model, vision_arch
from d2vcli.objective.masking import compute_block_mask_2d
from d2vcli.objective.monitors import compute_std
from d2vcli.objective.targets import build_targets, cls_loss, regression_loss
from d2vcli.objective.teacher import EMATeacher
from d2vcli.pretrain_vision import VisionPretrainTask


class Vision2PretrainTask(VisionPretrainTask):
    """data2vec 2.0 image pretraining for the engine; EMA step, guards and checkpoint state are 1.0's."""

    teacher_scope = "the encoder (patch embedding included, decoder not)"

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg = cfg
        self.arch = vision_arch({**cfgmod.to_dict(cfg.vision), "version": 2}, "the vision config section")
        self.model = build_vision_model("vision-pretrain", self.arch).to(device)
        self.teacher = EMATeacher(self.model.encoder)  # nothing copied but the (fixed) position buffer
        self.find_unused_parameters = False

    def patch_mask(self, batch: Batch) -> Tensor:
        """(A * M, P) bool (True = masked), image 0's M clones first, from the batch's own RNG stream."""
        m = self.cfg.masking
        rng = batch_rng(self.cfg.train.seed, batch.epoch, batch.index, STREAM_MASK)
        mask = compute_block_mask_2d(batch.source.shape[0] * m.clone_batch, self.arch.grid, m.mask_prob,
                                     m.mask_length, m.mask_prob_adjust, m.inverse_mask, rng)
        return torch.from_numpy(mask).to(batch.source.device, non_blocking=True)

    def noise_generator(self, batch: Batch, device: torch.device) -> torch.Generator:
        """The decoder's mask-token generator for this batch (the same in any process or resumed run)."""
        seed = int(batch_rng(self.cfg.train.seed, batch.epoch, batch.index, STREAM_MASK_NOISE).integers(2**62))
        return torch.Generator(device=device).manual_seed(seed)

    def targets(self, images: Tensor) -> Tensor:
        """The teacher's targets for every patch of the unmasked images, once per image: (A, P, D) fp32."""
        obj = self.cfg.objective
        layer_results = self.teacher.layer_results(images, None)  # K main blocks x (A, 1+P, D)
        with torch.no_grad():
            return build_targets([y[:, 1:] for y in layer_results], obj.average_top_k_layers,
                                 obj.layer_target_norm, obj.final_target_norm)

    def train_step(self, model: nn.Module, batch: Batch, step: int) -> StepOutput:
        obj = self.cfg.objective
        images = batch.source  # (A, 3, H, W)
        mask = self.patch_mask(batch)  # (A * M, P)
        out = model(images, mask, generator=self.noise_generator(batch, images.device))
        pred, clones = out["pred"], out["clones"]  # (N_masked, D), all clones
        full_target = self.targets(images)  # (A, P, D)
        target = full_target.repeat_interleave(clones, 0)[mask]  # (N_masked, D)
        loss = regression_loss(pred, target, obj.loss_beta, obj.loss_scale)
        metrics = {"target_std": compute_std(target), "pred_std": compute_std(pred),
                   "masked_share": mask.float().mean()}
        if obj.cls_loss > 0:
            cls = cls_loss(out["cls"], full_target, clones, obj.cls_loss, pred.shape[0], obj.loss_scale)
            metrics["cls_loss"] = cls.detach() / max(pred.shape[0], 1)  # its share of the logged loss
            loss = loss + cls
        return StepOutput(loss=loss, sample_size=pred.shape[0], metrics=metrics)


def pretrain(cfg: Config, workspace, name: Optional[str] = None, resume: bool = False, preset: Optional[str] = None,
             stop_at: Optional[int] = None, resume_if_exists: bool = False) -> TrainResult:
    """Run (or resume) data2vec 2.0 image pretraining in <workdir>/runs/<name>; as `d2vcli.pretrain.pretrain`."""
    return pretrain_vision.pretrain(cfg, workspace, name=name, resume=resume, preset=preset, stop_at=stop_at,
                                    resume_if_exists=resume_if_exists, make_task=Vision2PretrainTask)
