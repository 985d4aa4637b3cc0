"""Image classification on a data2vec ViT: fine-tuning and linear probing, the task for the engine.

    d2v finetune --preset vision-ft-tiny --init vision-tiny                  # from the pretraining run
    d2v finetune --preset vision-ft-tiny --init vision-tiny --linear-probe   # frozen encoder, linear head
    d2v finetune --preset vision-ft-tiny --init scratch                      # the random-init baseline
    d2v finetune --preset vision-ft-base --init imported-data2vec-vision-base

`d2vcli.finetune.finetune` hands a config with `modality: images` to `finetune()` here. The recipe
is the BEiT repo's `run_class_finetuning.py`, `modeling_finetune.py` and `optim_factory.py`
(docs/images.md):

- Model: `Data2VecVisionForImageClassification`, the mean of the patch tokens (CLS excluded), then
  `fc_norm`, then `head`, which starts at truncated normal x 0.001. The encoder comes from the
  pretrained student (or the teacher, `finetune.init_from`), the classes from `classes.txt`.
- Layer-wise lr decay: the rate of parameter group `layer_id` is lr x decay^(L + 1 - layer_id),
  with layer_id 0 for the patch embedding and the CLS and mask tokens, i + 1 for block i, and
  L + 1 for the position table, `fc_norm` and `head`.
- Mixup (alpha 0.8) or cutmix (alpha 1.0), one of the two per batch, mixing the batch with its
  reverse. Label smoothing 0.1 goes into the mixed soft targets, and the loss is soft-target cross entropy.
- Augmentation: RandomResizedCrop, flip, RandAugment, Inception mean/std (0.5), random erasing
  0.25. Validation: resize, center crop, then top-1/top-5 on each valid split. `best.pt` is the
  lowest `<split>/error` (100 - top-1).
- `finetune.linear_probe`: the encoder is frozen and only `fc_norm` and `head` train, without
  mixup, cutmix, drop path or RandAugment.
- A data2vec 2.0 checkpoint (`arch.version: 2`, `d2v pretrain --preset vision2-*`) builds
  `Data2Vec2VisionForImageClassification` (the same pooling and head names), keeps its ImageNet
  mean/std, and takes fairseq `mae_image_classification.py`'s layer decay: blocks numbered over
  the prenet then the main blocks, everything else at the full rate (docs/images.md, "data2vec 2.0").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import transforms as T

from d2vcli import checkpoint as ckpt
from d2vcli import config as cfgmod
from d2vcli import distributed, engine
from d2vcli.config import Config, ConfigError
from d2vcli.data import Batch, DataError, batch_rng
from d2vcli.distributed import DistInfo
from d2vcli.engine import StepOutput, TrainResult
from d2vcli.image_data import ImageBatchLoader, ImageDataset, eval_transform, read_image_manifest
from d2vcli.models.audio import parameter_count
from d2vcli.models.loading import build_vision_model, vision_arch
from d2vcli.models.vision import VisionConfig
from d2vcli.pretrain_vision import check_image_manifests
from d2vcli.prepare.images import classes_path, image_manifest
from d2vcli.run_dir import check_best_split, opened_run, print_run_config
from d2vcli.ui import console

STREAM_MIX = 4  # batch_rng stream of mixup/cutmix (0-2 data.py's, 3 image_data's augmentation)
RANDOM_ERASING = 0.25  # the recipe's --reprob
# Fields of the vision section that fine-tuning takes from the config, not from the checkpoint.
FINETUNE_VISION_FIELDS = ("drop_path", "attention_dropout", "dropout", "image_mean", "image_std")


def finetune_transform(size: int, mean, std, min_scale: float = 0.08, rand_augment: bool = True) -> Callable:
    """The recipe's training augmentation, in torchvision: crop, flip, RandAugment(2, 9), erasing."""
    steps = [T.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=T.InterpolationMode.BICUBIC),
             T.RandomHorizontalFlip()]
    if rand_augment:
        steps.append(T.RandAugment(num_ops=2, magnitude=9, interpolation=T.InterpolationMode.BICUBIC))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if rand_augment:
        steps.append(T.RandomErasing(RANDOM_ERASING, value=0))
    return T.Compose(steps)


# ----------------------------------------------------------------------------- mixup, cutmix, lr decay


def soft_targets(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """(B,) labels -> (B, C) smoothed one-hot: 1 - s + s/C on the label, s/C elsewhere (timm)."""
    off = smoothing / num_classes
    y = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return y.scatter_(1, labels.unsqueeze(1), 1.0 - smoothing + off)


def mix_batch(images: Tensor, labels: Tensor, num_classes: int, ft: cfgmod.FinetuneConfig,
              rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """timm's batch-mode Mixup with the recipe's settings: one of mixup/cutmix per batch (switch 0.5),
    lam ~ Beta(alpha, alpha), each image mixed with the batch's reverse; -> (images, (B, C) soft targets)."""
    y = soft_targets(labels, num_classes, ft.label_smoothing)
    use_cutmix = ft.cutmix > 0 and (ft.mixup <= 0 or rng.random() < 0.5)
    if not use_cutmix and ft.mixup <= 0:
        return images, y
    lam = float(rng.beta(ft.cutmix, ft.cutmix) if use_cutmix else rng.beta(ft.mixup, ft.mixup))
    if use_cutmix:  # a box of area (1 - lam), clipped at the border; lam becomes the kept share
        H, W = images.shape[-2:]
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(H * cut), int(W * cut)
        cy, cx = int(rng.integers(0, H)), int(rng.integers(0, W))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, H), max(cx - cw // 2, 0), min(cx + cw // 2, W)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = images.flip(0)[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        images = images * lam + images.flip(0) * (1.0 - lam)
    return images, y * lam + y.flip(0) * (1.0 - lam)


def layer_lr_scales(model: nn.Module, num_layers: int, decay: float, version: int = 1,
                    prenet_depth: int = 0) -> dict[str, float]:
    """Parameter name -> decay^(L + 1 - layer_id) (BEiT `optim_factory.get_layer_id_for_vit`).

    data2vec 2.0 (fairseq `mae_image_classification.py`): blocks are numbered over the prenet, then
    the main blocks, L = both counts, block i gets decay^(L - i); everything else (patch embedding,
    CLS, input LayerNorm, fc_norm, head) keeps the full rate.
    """
    if version == 2:
        total = prenet_depth + num_layers
        scales = {}
        for name, _ in model.named_parameters():
            parts = name.split(".")
            if name.startswith(("encoder.prenet.", "encoder.layers.")):
                block = int(parts[2]) + (prenet_depth if parts[1] == "layers" else 0)
                scales[name] = decay ** (total - block)
            else:
                scales[name] = 1.0
        return scales
    scales = {}
    for name, _ in model.named_parameters():
        if name.startswith(("encoder.patch_embed.", "encoder.cls_token", "encoder.mask_token")):
            layer_id = 0
        elif name.startswith("encoder.blocks."):
            layer_id = int(name.split(".")[2]) + 1
        else:  # the shared position table, fc_norm, head
            layer_id = num_layers + 1
        scales[name] = decay ** (num_layers + 1 - layer_id)
    return scales


# ----------------------------------------------------------------------------- the start


@dataclass
class Start:
    arch: VisionConfig
    encoder: Optional[dict]  # the pretrained encoder's state dict, None from scratch
    source: str  # what the encoder came from, for the screen


def load_start(cfg: Config, workspace, trust: bool = False) -> Start:
    """The architecture and encoder weights `finetune.init` names ('scratch' = random, the config's ViT)."""
    ft = cfg.finetune
    overrides = {k: getattr(cfg.vision, k) for k in FINETUNE_VISION_FIELDS}
    if not ft.init:
        raise ConfigError("no pretrained model to fine-tune: pass --init RUN_OR_CHECKPOINT (a `d2v pretrain "
                          "--preset vision-*` run or a `d2v import hf` checkpoint), or --init scratch")
    if ft.init == "scratch":
        base = cfg if not ft.arch_preset else cfgmod.resolve("pretrain", preset=ft.arch_preset)
        arch = vision_arch({**cfgmod.to_dict(base.vision), **cfgmod.to_dict(overrides),
                            "version": base.model.version}, "the vision config section")
        return Start(arch, None, "random init")
    path = ckpt.find_checkpoint(workspace, ft.init)
    state = ckpt.load_checkpoint(path, expect_kind="vision-pretrain", trust=trust)
    if (state[ckpt.ARCH_KEY] or {}).get("version", 1) == 2:
        # data2vec 2.0 fine-tunes with its pretraining's input normalization (ImageNet statistics), and
        # its teacher is the encoder itself (keys without the `encoder.` prefix).
        overrides = {k: v for k, v in overrides.items() if k not in ("image_mean", "image_std")}
    arch = vision_arch({**state[ckpt.ARCH_KEY], **cfgmod.to_dict(overrides)}, path)
    weights = state[ckpt.TEACHER_KEY if ft.init_from == "teacher" else ckpt.MODEL_KEY]
    if arch.version == 2 and ft.init_from == "teacher":
        encoder = dict(weights)
    else:
        encoder = {k[len("encoder."):]: v for k, v in weights.items() if k.startswith("encoder.")}
    return Start(arch, encoder, f"{path} ({ft.init_from}, data2vec {arch.version}.0)")


def read_classes(workspace) -> list[str]:
    path = classes_path(workspace)
    if not path.exists():
        raise DataError(f"no class list {path}: prepare the labeled images first with `d2v prepare images ROOT` "
                        f"or `d2v prepare synthetic-images`")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line]


# ----------------------------------------------------------------------------- the task


class VisionClassifyTask:
    """Image classification for the engine (see engine.TrainTask for the interface)."""

    kind = "vision-cls"
    find_unused_parameters = False

    def __init__(self, cfg: Config, start: Start, classes: list[str], valid: dict[str, ImageDataset], info: DistInfo):
        self.cfg, self.arch, self.classes, self.valid, self.info = cfg, start.arch, classes, valid, info
        self.model = build_vision_model("vision-cls", start.arch, len(classes)).to(info.device)
        if start.encoder is not None:
            self.model.encoder.load_state_dict(start.encoder)
        if cfg.finetune.linear_probe:
            self.model.encoder.requires_grad_(False)
        self.lr_scales = layer_lr_scales(self.model, start.arch.num_layers, cfg.finetune.layer_decay,
                                         start.arch.version, start.arch.prenet_depth)

    def train_step(self, model: nn.Module, batch: Batch, step: int) -> StepOutput:
        ft = self.cfg.finetune
        images, labels = batch.source, batch.target  # (B, 3, H, W), (B,)
        if ft.linear_probe:
            targets = soft_targets(labels, len(self.classes), ft.label_smoothing)
        else:
            rng = batch_rng(self.cfg.train.seed, batch.epoch, batch.index, STREAM_MIX)
            images, targets = mix_batch(images, labels, len(self.classes), ft, rng)
        logits = model(images).float()  # (B, C)
        loss = -(targets * F.log_softmax(logits, -1)).sum()
        accuracy = (logits.argmax(-1) == labels).float().mean()  # against the unmixed labels
        return StepOutput(loss=loss, sample_size=labels.shape[0], metrics={"train_top1": 100.0 * accuracy})

    def after_update(self, step: int) -> None:
        return None

    @torch.no_grad()
    def validate(self, model: nn.Module, step: int) -> dict:
        """Top-1, top-5, error (100 - top-1) and loss per valid split; each rank scores its share."""
        result = {}
        for split, dataset in self.valid.items():
            share = torch.utils.data.Subset(dataset, range(self.info.rank, len(dataset), self.info.world_size))
            loader = torch.utils.data.DataLoader(share, batch_size=self.cfg.data.images_per_batch,
                                                 num_workers=self.cfg.data.num_workers)
            totals = torch.zeros(4, dtype=torch.float64, device=self.info.device)
            for images, labels in loader:
                images, labels = images.to(self.info.device), labels.to(self.info.device)
                logits = model(images).float()
                top5 = logits.topk(min(5, logits.shape[1]), -1).indices
                totals += torch.stack([(top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(-1).sum(),
                                       F.cross_entropy(logits, labels, reduction="sum"),
                                       torch.tensor(labels.shape[0], device=labels.device)]).double()
            top1, top5_hits, loss, n = distributed.all_reduce_sum(totals).tolist()
            result.update({f"{split}/top1": 100.0 * top1 / max(n, 1), f"{split}/top5": 100.0 * top5_hits / max(n, 1),
                           f"{split}/error": 100.0 - 100.0 * top1 / max(n, 1), f"{split}/loss": loss / max(n, 1)})
        return result

    def stop_reason(self, step: int, metrics: dict) -> None:
        return None

    def checkpoint_state(self) -> dict:
        return {ckpt.ARCH_KEY: cfgmod.to_dict(self.arch), ckpt.NORMALIZE_KEY: False,
                ckpt.CLASSES_KEY: list(self.classes)}

    def load_checkpoint_state(self, state: dict) -> None:
        if list(state.get(ckpt.CLASSES_KEY) or []) != list(self.classes):
            raise ConfigError("the run's checkpoint has other classes than data/images/classes.txt; "
                              "start a new run with --name")


# ----------------------------------------------------------------------------- entry point


def finetune(cfg: Config, workspace, name: Optional[str] = None, resume: bool = False, preset: Optional[str] = None,
             stop_at: Optional[int] = None, resume_if_exists: bool = False, trust: bool = False) -> TrainResult:
    """Run (or resume) image classification in <workdir>/runs/<name>; as `d2vcli.finetune.finetune`."""
    info = distributed.setup(cfg.train.device)
    try:
        check_image_manifests(workspace, tuple(cfg.data.train_splits) + tuple(cfg.data.valid_splits))
        check_best_split(cfg, "val")
        if cfg.finetune.linear_probe:  # a linear classifier on fixed features: no regularization of the encoder
            cfg = cfgmod.merge(cfg, {"vision": {"drop_path": 0.0, "attention_dropout": 0.0, "dropout": 0.0}})
        start = load_start(cfg, workspace, trust)
        classes = read_classes(workspace)
        with opened_run(workspace, cfg, info, "finetune", name, preset, resume, resume_if_exists) as run:
            a = start.arch
            valid = {s: ImageDataset(image_manifest(workspace, s), eval_transform(a.image_size, a.image_mean,
                                                                                 a.image_std))
                     for s in cfg.data.valid_splits}
            task = VisionClassifyTask(cfg, start, classes, valid, info)
            if info.is_main:
                print_run_config(cfg, "finetune", preset, run)
                what = "linear probe, encoder frozen" if cfg.finetune.linear_probe else "fine-tuning"
                console.print(f"model: {parameter_count(task.model):,} parameters "
                              f"({parameter_count(task.model, trainable_only=True):,} trained; {what}), "
                              f"{len(classes)} classes; encoder from {start.source}")
            records = [r for s in cfg.data.train_splits for r in read_image_manifest(image_manifest(workspace, s))]
            transform = finetune_transform(a.image_size, a.image_mean, a.image_std, cfg.data.min_crop_scale,
                                           rand_augment=not cfg.finetune.linear_probe)
            loader = ImageBatchLoader(records, transform, cfg.data.images_per_batch, cfg.train.seed, rank=info.rank,
                                      world_size=info.world_size, num_workers=cfg.data.num_workers,
                                      pin_memory=info.device.type == "cuda", max_bad_files=cfg.data.max_bad_files)
            ft = cfg.finetune
            return engine.train(cfg, task, loader, run, info, description="finetune", validate_every=ft.validate_every,
                                validate_after=ft.validate_after, best_metric=ft.best_metric or None,
                                early_stop_patience=ft.early_stop_patience, stop_at=stop_at,
                                batch=engine.image_batch_unit(cfg))
    finally:
        distributed.teardown()
