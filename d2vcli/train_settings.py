"""What the engine derives from the config before its loop: the autocast precision, and the batch unit
(what one update holds, in seconds of audio, images, tokens or sequences) with the gradient accumulation
that makes one process reproduce the recipe's multi-GPU batch.

engine.py imports these (and re-exports them: `engine.image_batch_unit(cfg)` is how a task names its unit);
nothing here imports the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from d2vcli.audio import SAMPLE_RATE
from d2vcli.config import Config, ConfigError
from d2vcli.distributed import DistInfo


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `train.precision` on `device`, or None for fp32."""
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if precision == "auto":
            return None
        if precision == "fp16":
            raise ConfigError("train.precision=fp16 needs a GPU; use fp32 (or bf16) on CPU")
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{torch.cuda.get_device_name(device)} does not support bf16; use train.precision=fp16")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def precision_name(dtype: Optional[torch.dtype]) -> str:
    return {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + loss scaling"}[dtype]


def accumulation_steps(batch_seconds: float, max_tokens: int, world_size: int) -> int:
    """Micro-batches per update so that world_size x max_tokens x accumulation >= batch_seconds of audio."""
    return max(1, math.ceil(round(batch_seconds * SAMPLE_RATE / (world_size * max_tokens), 9)))


@dataclass(frozen=True)
class BatchUnit:
    """How the loader's batches are counted: per update in the config's unit, per micro-batch in
    `Batch.num_samples` units (audio samples, images)."""

    per_update: float  # what the config asks one update to hold (seconds, images)
    per_micro_batch: float  # what one process's micro-batch holds at most (samples, images)
    unit: str  # the config's unit: "s" (audio seconds) or "images"
    samples_per_unit: float  # num_samples per unit: SAMPLE_RATE for seconds, 1 for images
    rate_key: str  # the throughput column of metrics.jsonl: audio_s_per_s, images_per_s
    seen_key: str  # the engine-state total of what training consumed: audio_seconds, images

    def accumulation(self, world_size: int) -> int:
        per_micro_batches = self.per_update * self.samples_per_unit / (world_size * self.per_micro_batch)
        return max(1, math.ceil(round(per_micro_batches, 9)))

    def describe(self, info: DistInfo, accumulation: int) -> str:
        if self.unit == "s":
            return describe_batch(self.per_update, int(self.per_micro_batch), info, accumulation)
        text = (f"{self.per_update:g} {self.unit}/update = {info.describe()} x {self.per_micro_batch:g} {self.unit} x "
                f"{accumulation} accumulation")
        actual = info.world_size * self.per_micro_batch * accumulation
        return text + (f" ({actual:g} {self.unit})" if actual != self.per_update else "")


def audio_batch_unit(cfg: Config) -> BatchUnit:
    """Audio seconds per update (train.batch_seconds) in micro-batches of data.max_tokens samples."""
    return BatchUnit(cfg.train.batch_seconds, cfg.data.max_tokens, "s", SAMPLE_RATE,
                     "audio_s_per_s", "audio_seconds")


def image_batch_unit(cfg: Config) -> BatchUnit:
    """Images per update (train.images_per_update) in micro-batches of data.images_per_batch."""
    return BatchUnit(cfg.train.images_per_update, cfg.data.images_per_batch, "images", 1.0, "images_per_s",
                     "images")


def text_batch_unit(cfg: Config) -> BatchUnit:
    """Text tokens per update (train.tokens_per_update) in micro-batches of data.text_tokens_per_batch."""
    return BatchUnit(cfg.train.tokens_per_update, cfg.data.text_tokens_per_batch, "tokens", 1.0, "tokens_per_s",
                     "tokens")


def text_sequence_unit(cfg: Config) -> BatchUnit:
    """Labeled records per update (train.sequences_per_update, fairseq's batch_size) in micro-batches of
    data.text_sequences_per_batch: text fine-tuning."""
    return BatchUnit(cfg.train.sequences_per_update, cfg.data.text_sequences_per_batch, "sequences", 1.0,
                     "sequences_per_s", "sequences")


def describe_batch(batch_seconds: float, max_tokens: int, info: DistInfo, accumulation: int) -> str:
    """'3800 s/update = 1 GPU x 3.8M samples x 16 accumulation' (plus the exact total if it differs)."""
    text = (f"{batch_seconds:g} s/update = {info.describe()} x {max_tokens / 1e6:g}M samples x "
            f"{accumulation} accumulation")
    actual = info.world_size * max_tokens * accumulation / SAMPLE_RATE
    if abs(actual - batch_seconds) > 1e-6 * batch_seconds:
        text += f" (up to {actual:g} s)"
    return text
