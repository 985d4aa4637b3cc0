"""The one place a network is built from an architecture or a checkpoint.

    model = build_model("pretrain", cfg.model)                    # a fresh student + regression head
    model = build_model("ctc", arch, vocab_size=32)              # a fresh CTC model
    loaded = load_model("runs/base-10h/best.pt")                  # any kind, weights checked
    loaded.model, loaded.kind, loaded.vocab, loaded.normalize
    model = build_vision_model("vision-cls", vision_tiny(), num_classes=10)   # the image kinds
    model = build_text_model("text-cls", text_tiny(), num_classes=2)          # the text kinds

Pretraining, fine-tuning, interop, decode, transcribe and the demo all build their networks
here, so a kind's architecture and its weights can only be paired one way. Unlike the network
files beside it, this module reads config and checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from d2vcli import checkpoint as ckpt
from d2vcli.config import ModelConfig, from_dict
from d2vcli.models.audio import Data2VecForCTC, Data2VecForPretraining, build_backbone
from d2vcli.models.audio2 import Data2Vec2ForPretraining, build_backbone2, build_decoder2
from d2vcli.models.text import Data2VecTextPretrainModel, TextClassifier, TextConfig
from d2vcli.models.text2 import Data2Vec2TextPretrainModel
from d2vcli.models.vision import Data2VecVisionForImageClassification, Data2VecVisionForPretraining, VisionConfig
from d2vcli.models.vision2 import Data2Vec2VisionForImageClassification, Data2Vec2VisionForPretraining
from d2vcli.vocab import BLANK, Vocab


def build_model(kind: str, arch: ModelConfig | dict, vocab_size: int = 0, final_dropout: float = 0.0) -> nn.Module:
    """A freshly initialized network of `kind` ("pretrain" or "ctc") for `arch` (a ModelConfig or its dict);
    the vision kinds go to `build_vision_model` (`vocab_size` is then the number of classes).

    `arch.version` picks the data2vec generation (an arch saved before 2.0 existed reads as 1):
    the CTC head is the same for both, the pretraining head is 1.0's final_proj or 2.0's decoder.
    """
    if kind in ckpt.VISION_KINDS:
        return build_vision_model(kind, arch, vocab_size)
    if kind in ckpt.TEXT_KINDS:
        return build_text_model(kind, arch, vocab_size)
    if isinstance(arch, dict):
        arch = from_dict(arch, ModelConfig)
    backbone = build_backbone2(arch) if arch.version == 2 else build_backbone(arch)
    if kind == "ctc":
        return Data2VecForCTC(backbone, vocab_size, final_dropout, blank=BLANK)
    if kind == "pretrain" and arch.version == 2:
        return Data2Vec2ForPretraining(backbone, build_decoder2(arch))
    if kind == "pretrain":
        return Data2VecForPretraining(backbone)
    raise ValueError(f"unknown model kind {kind!r}; expected one of {ckpt.KINDS}")


def vision_arch(arch: VisionConfig | dict, path: Path | str = "checkpoint") -> VisionConfig:
    """A VisionConfig from a checkpoint's `arch` dict (unknown or missing fields are a CheckpointError)."""
    if isinstance(arch, VisionConfig):
        return arch
    fields = VisionConfig.__dataclass_fields__
    unknown = sorted(set(arch) - set(fields))
    if unknown:
        raise ckpt.CheckpointError(f"{path}: its image architecture has unknown fields {unknown}; "
                                   f"it was written by another d2vcli version")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items()}
    try:
        cfg = VisionConfig(**values)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: its image architecture is not valid ({e})") from None
    return cfg


def build_vision_model(kind: str, arch: VisionConfig | dict, num_classes: int = 0) -> nn.Module:
    """A fresh ViT: "vision-pretrain" (student + regression head, or 2.0's decoder) or "vision-cls"
    (classifier, `num_classes`); `arch.version` picks the data2vec generation (models/vision2.py for 2)."""
    arch = vision_arch(arch)
    v2 = arch.version == 2
    if kind == "vision-pretrain":
        return Data2Vec2VisionForPretraining(arch) if v2 else Data2VecVisionForPretraining(arch)
    if kind == "vision-cls":
        if num_classes < 1:
            raise ValueError("a vision-cls model needs num_classes >= 1")
        return (Data2Vec2VisionForImageClassification if v2 else Data2VecVisionForImageClassification)(arch,
                                                                                                      num_classes)
    raise ValueError(f"unknown image model kind {kind!r}; expected one of {ckpt.VISION_KINDS}")


def text_arch(arch: TextConfig | dict, path: Path | str = "checkpoint") -> TextConfig:
    """A TextConfig from a checkpoint's `arch` dict (unknown or missing fields are a CheckpointError)."""
    if isinstance(arch, TextConfig):
        return arch
    unknown = sorted(set(arch) - set(TextConfig.__dataclass_fields__))
    if unknown:
        raise ckpt.CheckpointError(f"{path}: its text architecture has unknown fields {unknown}; "
                                   f"it was written by another d2vcli version")
    try:
        cfg = TextConfig(**arch)
        cfg.validate()
    except (TypeError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: its text architecture is not valid ({e})") from None
    return cfg


def build_text_model(kind: str, arch: TextConfig | dict, num_classes: int = 0) -> nn.Module:
    """A fresh text encoder: "text-pretrain" (student + regression head, or with `arch.version` 2 the
    2.0 student + conv decoder, models/text2.py) or "text-cls" (classifier with `num_classes` outputs;
    1 = a regression task; the encoder is the same for both versions)."""
    arch = text_arch(arch)
    if kind == "text-pretrain":
        return Data2Vec2TextPretrainModel(arch) if arch.version == 2 else Data2VecTextPretrainModel(arch)
    if kind == "text-cls":
        if num_classes < 1:
            raise ValueError("a text-cls model needs num_classes >= 1")
        return TextClassifier(arch, num_classes)
    raise ValueError(f"unknown text model kind {kind!r}; expected one of {ckpt.TEXT_KINDS}")


def expected_state(kind: str, arch: ModelConfig | dict, vocab_size: int = 0) -> dict:
    """The state dict (names and shapes) a checkpoint of this kind and architecture must hold; no memory used."""
    with torch.device("meta"):
        return build_model(kind, arch, vocab_size).state_dict()


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on CPU
    kind: str
    vocab: Optional[Vocab]  # ctc only
    normalize: bool  # the waveform normalization the model was trained with
    state: dict  # the whole checkpoint, for callers that need more (config, teacher, source)
    classes: Optional[list[str]] = None  # vision-cls and text-cls only, in output order


def load_model(path: Path, expect_kind: Optional[str] = None, trust: bool = False) -> LoadedModel:
    """Read a d2v checkpoint and build its network with its weights.

    The vocabulary and the normalize flag always come from the checkpoint, never from the data
    directory, so inference cannot pair a model with the wrong dictionary or input scaling.
    """
    path = Path(path)
    state = ckpt.load_checkpoint(path, expect_kind=expect_kind, trust=trust)
    kind = state[ckpt.KIND_KEY]
    vocab = ckpt.vocab_of(state, path) if kind == "ctc" else None
    classes = list(state.get(ckpt.CLASSES_KEY) or []) if kind in ("vision-cls", "text-cls") else None
    if kind in ckpt.VISION_KINDS:
        model = build_vision_model(kind, vision_arch(state.get(ckpt.ARCH_KEY) or {}, path), len(classes or []))
    elif kind in ckpt.TEXT_KINDS:
        if kind == "text-cls" and not classes:
            raise ckpt.CheckpointError(f"{path}: a text classifier without its class names ('{ckpt.CLASSES_KEY}'); "
                                       f"the file is damaged or was edited")
        model = build_text_model(kind, text_arch(state.get(ckpt.ARCH_KEY) or {}, path), len(classes or []))
    else:
        model = build_model(kind, ckpt.arch_of(state, path), len(vocab) if vocab else 0)
    missing, unexpected = model.load_state_dict(state[ckpt.MODEL_KEY], strict=False)
    if missing or unexpected:
        raise ckpt.CheckpointError(
            f"{path}: the weights do not fit the architecture stored with them "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}). The file is damaged or was edited."
        )
    model.eval()
    return LoadedModel(model, kind, vocab, bool(state.get(ckpt.NORMALIZE_KEY, True)), state, classes)


def load_ctc_model(path: Path, trust: bool = False) -> tuple[Data2VecForCTC, Vocab, bool, dict]:
    """A fine-tuned CTC checkpoint ready for inference: (model, vocab, normalize, state)."""
    loaded = load_model(path, expect_kind="ctc", trust=trust)
    return loaded.model, loaded.vocab, loaded.normalize, loaded.state
