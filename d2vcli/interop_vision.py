"""Image checkpoints in and out: Hugging Face `Data2VecVision*` folders and the BEiT repo's data2vec files.

    d2v import hf ./data2vec-vision-base-ft1k        # -> runs/imported-data2vec-vision-base-ft1k/last.pt
    d2v export hf RUN_OR_CHECKPOINT ./out            # Data2VecVisionModel / Data2VecVisionForImageClassification
    d2v import fairseq checkpoint-799.pth --trust-checkpoint   # data2vec_vision/beit files (interop.import_fairseq
                                                                # hands them here)

Our ViT (`d2vcli/models/vision.py`) names its parameters as the BEiT repo does, so one table
maps them to transformers' names (docs/images.md, "Hugging Face"; transformers
`models/data2vec/modeling_data2vec_vision.py`). One entry is not a rename: BEiT's fused
`attn.qkv.weight` (3D x D) is split by rows into HF's query, key and value weights, and HF's
key projection has no bias (BEiT's k bias is fixed at zero).

The kinds: "vision-pretrain" (encoder + final norm + `lm_head`; HF `Data2VecVisionModel` with
`use_mean_pooling: false`, whose `layernorm` is our `norm`; HF has no `lm_head`) and
"vision-cls" (`Data2VecVisionForImageClassification`: `pooler.layernorm` is our `fc_norm`,
`classifier` our `head`). Conversions are all-or-nothing, as for audio (`interop_keys.check_state_dict`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

import torch

from d2vcli import checkpoint as ck
from d2vcli.fileio import atomic_write_text
from d2vcli.interop_hf import read_hf_weights
from d2vcli.interop_keys import (HF_WEIGHT_FILES, InteropError, ModelImportResult, check_state_dict,
                                 hf_encoder_fields, hf_label_fields, import_hf_folder, save_model_import,
                                 write_hf_folder)
from d2vcli.models.loading import build_vision_model, vision_arch
from d2vcli.models.vision import VisionConfig
from d2vcli.workspace import Workspace

HF_MODEL_TYPE = "data2vec-vision"
HF_CLS_PREFIX = "data2vec_vision."  # ForImageClassification wraps the backbone under this name

# d2v key (relative to the model's `encoder.`)  <->  HF key (relative to the backbone); {i} block, {w} weight|bias.
HF_ENCODER_KEYS: list[tuple[str, str]] = [
    ("cls_token", "embeddings.cls_token"),
    ("mask_token", "embeddings.mask_token"),
    ("patch_embed.proj.{w}", "embeddings.patch_embeddings.projection.{w}"),
    ("rel_pos_bias.relative_position_bias_table", "encoder.relative_position_bias.relative_position_bias_table"),
    ("blocks.{i}.rel_pos_bias.relative_position_bias_table",
     "encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table"),
    ("blocks.{i}.norm1.{w}", "encoder.layer.{i}.layernorm_before.{w}"),
    ("blocks.{i}.attn.q_bias", "encoder.layer.{i}.attention.attention.query.bias"),
    ("blocks.{i}.attn.v_bias", "encoder.layer.{i}.attention.attention.value.bias"),
    ("blocks.{i}.attn.proj.{w}", "encoder.layer.{i}.attention.output.dense.{w}"),
    ("blocks.{i}.gamma_1", "encoder.layer.{i}.lambda_1"),
    ("blocks.{i}.gamma_2", "encoder.layer.{i}.lambda_2"),
    ("blocks.{i}.norm2.{w}", "encoder.layer.{i}.layernorm_after.{w}"),
    ("blocks.{i}.mlp.fc1.{w}", "encoder.layer.{i}.intermediate.dense.{w}"),
    ("blocks.{i}.mlp.fc2.{w}", "encoder.layer.{i}.output.dense.{w}"),
]
QKV = "blocks.{i}.attn.qkv.weight"  # split by rows into the three below
HF_QKV = tuple(f"encoder.layer.{{i}}.attention.attention.{p}.weight" for p in ("query", "key", "value"))
HF_PRETRAIN_HEAD = [("norm.{w}", "layernorm.{w}")]  # lm_head has no HF home
HF_CLS_HEAD = [("fc_norm.{w}", HF_CLS_PREFIX + "pooler.layernorm.{w}"), ("head.{w}", "classifier.{w}")]

_PLACEHOLDERS = {"i": r"(?P<i>\d+)", "w": r"(?P<w>weight|bias)"}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)
    return re.compile("".join(_PLACEHOLDERS[p] if n % 2 else re.escape(p) for n, p in enumerate(parts)) + "$")


def _rules(kind: str) -> list[tuple[str, str]]:
    """(d2v template, HF template) pairs of full keys for a kind."""
    hf_prefix = HF_CLS_PREFIX if kind == "vision-cls" else ""
    rules = [("encoder." + d, hf_prefix + h) for d, h in HF_ENCODER_KEYS]
    return rules + (HF_CLS_HEAD if kind == "vision-cls" else HF_PRETRAIN_HEAD)


def _qkv_rules(kind: str) -> tuple[str, tuple[str, ...]]:
    hf_prefix = HF_CLS_PREFIX if kind == "vision-cls" else ""
    return "encoder." + QKV, tuple(hf_prefix + h for h in HF_QKV)


def to_hf_state(kind: str, model_state: dict) -> dict:
    """d2v model state dict -> HF state dict (lm_head left behind: HF has no regression head)."""
    rules = [(_compile(d), h) for d, h in _rules(kind)]
    qkv, hf_qkv = _qkv_rules(kind)
    qkv_re = _compile(qkv)
    out, unmatched = {}, []
    for key, value in model_state.items():
        value = value.detach().to("cpu")
        if kind == "vision-pretrain" and key.startswith("lm_head."):
            continue
        m = qkv_re.match(key)
        if m:
            for hf, part in zip(hf_qkv, value.chunk(3, dim=0)):
                out[hf.format(**m.groupdict())] = part.contiguous()
            continue
        for pattern, template in rules:
            m = pattern.match(key)
            if m:
                out[template.format(**m.groupdict())] = value.contiguous()
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise InteropError("no Hugging Face name for: " + ", ".join(sorted(unmatched)))
    return out


def from_hf_state(kind: str, hf_state: dict) -> tuple[dict, list[str]]:
    """HF state dict -> (d2v model state dict in fp32, HF keys with no d2v name)."""
    rules = [(_compile(h), d) for d, h in _rules(kind)]
    qkv, hf_qkv = _qkv_rules(kind)
    qkv_res = [_compile(h) for h in hf_qkv]
    out, unmatched, parts = {}, [], {}
    for key, value in hf_state.items():
        value = value.detach().to("cpu", torch.float32).contiguous()
        if "relative_position_index" in key:
            continue  # recomputed from the grid (HF ignores it on load too)
        for n, pattern in enumerate(qkv_res):
            m = pattern.match(key)
            if m:
                parts.setdefault(m["i"], {})[n] = value
                break
        else:
            for pattern, template in rules:
                m = pattern.match(key)
                if m:
                    out[template.format(**m.groupdict())] = value
                    break
            else:
                unmatched.append(key)
    for i, got in parts.items():
        if len(got) != 3:
            unmatched += [hf_qkv[n].format(i=i) for n in got]  # an incomplete triple fits nothing
            continue
        out[qkv.format(i=i)] = torch.cat([got[0], got[1], got[2]], dim=0)
    return out, unmatched


# --------------------------------------------------------------------------- config.json


def arch_from_hf(hf: dict, source: Path) -> VisionConfig:
    """config.json of a data2vec-vision model -> VisionConfig; what our ViT cannot represent is refused."""
    g = lambda k, d: hf.get(k, d) if hf.get(k) is not None else d  # noqa: E731 - HF defaults for absent keys
    problems = []
    if g("hidden_act", "gelu") != "gelu":
        problems.append(f"hidden_act is {hf.get('hidden_act')!r}; only the exact GELU ('gelu') is implemented")
    if g("use_absolute_position_embeddings", False):
        problems.append("use_absolute_position_embeddings is true (data2vec's ViT uses relative position bias only)")
    shared = bool(g("use_shared_relative_position_bias", False))
    per_layer = bool(g("use_relative_position_bias", False))
    if shared == per_layer:
        problems.append("exactly one of use_shared_relative_position_bias and use_relative_position_bias must be "
                        "true (data2vec's ViT has one kind of relative position bias)")
    sizes = {}
    for name, default in (("image_size", 224), ("patch_size", 16)):
        v = g(name, default)
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                problems.append(f"{name} {v} is not square")
            v = v[0]
        sizes[name] = int(v)
    if problems:
        raise InteropError(f"{source}/config.json: " + "; ".join(problems))
    return VisionConfig(
        image_size=sizes["image_size"], patch_size=sizes["patch_size"], in_channels=int(g("num_channels", 3)),
        embed_dim=int(g("hidden_size", 768)), num_layers=int(g("num_hidden_layers", 12)),
        num_heads=int(g("num_attention_heads", 12)), ffn_dim=int(g("intermediate_size", 3072)),
        layer_norm_eps=float(g("layer_norm_eps", 1e-12)), layer_scale_init=float(g("layer_scale_init_value", 0.1)),
        rel_pos_bias="shared" if shared else "per-layer", drop_path=float(g("drop_path_rate", 0.1)),
        attention_dropout=float(g("attention_probs_dropout_prob", 0.0)), dropout=float(g("hidden_dropout_prob", 0.0)),
        init_std=float(g("initializer_range", 0.02)),
    )


def hf_config(kind: str, arch: VisionConfig, classes: Optional[list[str]] = None) -> dict:
    """config.json for a d2v image checkpoint: the fields transformers' Data2VecVisionConfig reads."""
    cfg = {
        "architectures": ["Data2VecVisionForImageClassification" if kind == "vision-cls" else "Data2VecVisionModel"],
        "model_type": HF_MODEL_TYPE,
        "dtype": "float32",
        **hf_encoder_fields(arch),
        "image_size": arch.image_size,
        "patch_size": arch.patch_size,
        "num_channels": arch.in_channels,
        "use_mask_token": True,  # we always carry the mask token
        "use_absolute_position_embeddings": False,
        "use_relative_position_bias": arch.rel_pos_bias == "per-layer",
        "use_shared_relative_position_bias": arch.rel_pos_bias == "shared",
        "layer_scale_init_value": arch.layer_scale_init,
        "drop_path_rate": arch.drop_path,
        # The classifier pools the mean of the patch tokens; the pretrained model keeps its final norm.
        "use_mean_pooling": kind == "vision-cls",
    }
    if kind == "vision-cls":
        cfg |= hf_label_fields(classes)
    return cfg


def preprocessor_config(arch: VisionConfig) -> dict:
    """A BeitImageProcessor config: resize to the model's size, then normalize with its mean and std."""
    return {
        "image_processor_type": "BeitImageProcessor", "do_resize": True,
        "size": {"height": arch.image_size, "width": arch.image_size}, "resample": 3,  # bicubic
        "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(arch.image_mean), "image_std": list(arch.image_std), "do_reduce_labels": False,
    }


# --------------------------------------------------------------------------- import


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InteropError(f"{path} cannot be read as JSON ({e})") from None


def is_vision_folder(folder: Path) -> bool:
    """Whether `folder` is a save_pretrained folder of a data2vec-vision model (`model_type` in config.json)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == HF_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def _classes_from_hf(hf: dict, num_classes: int) -> list[str]:
    id2label = hf.get("id2label") or {}
    names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num_classes)]
    return names


def convert_hf(folder: Path, trust: bool = False) -> tuple[dict, list[str]]:
    """A save_pretrained folder of Data2VecVisionModel / ForImageClassification -> (d2v checkpoint dict, notes)."""
    folder = Path(folder)
    hf = _read_json(folder / "config.json")
    arch = arch_from_hf(hf, folder)
    weights = read_hf_weights(folder, trust=trust)
    kind = "vision-cls" if "classifier.weight" in weights else "vision-pretrain"
    if kind == "vision-cls" and not hf.get("use_mean_pooling", True):
        raise InteropError(f"{folder}/config.json: use_mean_pooling is false (a CLS-token classifier); d2v's image "
                           f"classifier pools the mean of the patch tokens, as data2vec fine-tunes it")
    notes: list[str] = []
    pooler = sorted(k for k in weights if k.startswith("pooler."))
    if kind == "vision-pretrain" and pooler:
        # A Data2VecVisionModel saved with its pooling layer: a LayerNorm over the mean of the patch
        # tokens, which only a classifier uses (ours is `fc_norm`, built at fine-tuning).
        weights = {k: v for k, v in weights.items() if k not in pooler}
        notes.append(f"dropped the pooling layer ({', '.join(pooler)}): a pretrained model has no use for it")
    model_state, unmatched = from_hf_state(kind, weights)
    num_classes = int(weights["classifier.weight"].shape[0]) if kind == "vision-cls" else 0
    fresh = build_vision_model(kind, arch, num_classes).state_dict()
    if "encoder.mask_token" not in model_state:
        model_state["encoder.mask_token"] = fresh["encoder.mask_token"]
        notes.append("no mask token in the file (use_mask_token false): freshly initialized")
    if kind == "vision-pretrain":
        for key in ("norm.weight", "norm.bias"):
            if key not in model_state:
                model_state[key] = fresh[key]
        if "norm.weight" not in weights and "layernorm.weight" not in weights:
            notes.append("no final layernorm in the file (use_mean_pooling true): the student's norm starts at "
                         "ones/zeros")
        model_state["lm_head.weight"], model_state["lm_head.bias"] = fresh["lm_head.weight"], fresh["lm_head.bias"]
        notes.append("HF models have no lm_head or EMA teacher: lm_head is freshly initialized and the teacher "
                     "starts as a copy of the student (continued pretraining is not exact)")
    check_state_dict(model_state, fresh, str(folder), unknown=tuple(unmatched))
    classes = _classes_from_hf(hf, num_classes) if kind == "vision-cls" else None
    teacher = {k: v.clone() for k, v in model_state.items()} if kind == "vision-pretrain" else None
    src = {"format": "hf", "path": str(folder.resolve()), "architectures": hf.get("architectures")}
    state = ck.make_state(kind, config={}, arch=dataclasses.asdict(arch), normalize=False, model=model_state,
                          teacher=teacher, classes=classes, source=src)
    return state, notes


def import_hf(folder: Path, out: Optional[Path] = None, trust: bool = False, workspace: Optional[Workspace] = None,
              force: bool = False, dict_path: Optional[Path] = None) -> ModelImportResult:
    """`d2v import hf` for a data2vec-vision folder: write it as a d2v checkpoint (vision-pretrain or vision-cls)."""
    return import_hf_folder(folder, convert_hf, "data2vec-vision", "class names come from config.json's id2label",
                            out, trust, workspace, force, dict_path)


# --------------------------------------------------------------------------- the BEiT repo's files
#
# data2vec 1.0 vision was released from `facebookresearch/data2vec_vision/beit` (README: base_800/
# checkpoint-799.pth, large_1600/..., finetuned_base/.../mp_rank_00_model_states.pt). Those files are
# `torch.save` dicts holding the state dict under "model" (deepspeed: "module"), the EMA under
# "model_ema" when one was kept, and an argparse Namespace under "args" (so --trust-checkpoint is
# needed). Our names are the BEiT names with `encoder.` before the encoder's, except a per-block
# table, which BEiT keeps inside the attention. The architecture is not stored in a usable form;
# it is read off the tensor shapes.

BEIT_HEADS = ("norm.", "lm_head.", "fc_norm.", "head.")
BEIT_DROPPED = re.compile(r"(^|\.)relative_position_index$")
BEIT_PER_LAYER = re.compile(r"^blocks\.(\d+)\.attn\.relative_position_bias_table$")


def _beit_state(raw) -> Optional[dict]:
    """The BEiT-layout state dict inside a loaded file, or None if it is not one."""
    if not isinstance(raw, dict):
        return None
    for key in ("model", "module"):
        sd = raw.get(key)
        if isinstance(sd, dict) and "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd:
            return sd
    return None


def is_beit_checkpoint(raw) -> bool:
    """Whether a loaded file is a data2vec_vision/beit checkpoint (pretrained or fine-tuned)."""
    return _beit_state(raw) is not None


def _d2v_name(key: str) -> str:
    m = BEIT_PER_LAYER.match(key)
    if m:
        return f"encoder.blocks.{m[1]}.rel_pos_bias.relative_position_bias_table"
    return key if key.startswith(BEIT_HEADS) else "encoder." + key


def _from_beit(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        if BEIT_DROPPED.search(key) or not isinstance(value, torch.Tensor):
            continue
        out[_d2v_name(key.removeprefix("module."))] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def arch_from_beit(sd: dict, source: Path) -> VisionConfig:
    """The ViT's shape read off a BEiT state dict."""
    if "pos_embed" in sd:
        raise InteropError(f"{source}: the model has an absolute position embedding (pos_embed); data2vec's ViT uses "
                           f"relative position bias only")
    patch = sd["patch_embed.proj.weight"]  # (D, C, P, P)
    dim, channels, p = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[-1])
    shared = "rel_pos_bias.relative_position_bias_table" in sd
    table = sd["rel_pos_bias.relative_position_bias_table" if shared else "blocks.0.attn.relative_position_bias_table"]
    side = (int(round((int(table.shape[0]) - 3) ** 0.5)) + 1) // 2  # ((2 side - 1)^2 + 3) rows
    if (2 * side - 1) ** 2 + 3 != table.shape[0]:
        raise InteropError(f"{source}: a relative position table of {table.shape[0]} rows is not a square grid's")
    layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    gamma = sd.get("blocks.0.gamma_1")
    return VisionConfig(
        image_size=side * p, patch_size=p, in_channels=channels, embed_dim=dim, num_layers=layers,
        num_heads=int(table.shape[1]), ffn_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]),
        # Only a fresh model's init reads these; the file's gammas are loaded as they are.
        layer_scale_init=0.0 if gamma is None else (1e-4 if dim < 1024 else 1e-5),
        rel_pos_bias="shared" if shared else "per-layer",
        drop_path=0.25 if dim < 1024 else 0.2, attention_dropout=0.05 if dim < 1024 else 0.15,
    )


def convert_beit(raw, source: Path, use_ema: bool = False) -> tuple[dict, list[str]]:
    """A loaded data2vec_vision/beit file -> (d2v checkpoint dict, notes); all-or-nothing like every import."""
    sd = _beit_state(raw)
    if sd is None:
        raise InteropError(f"{source} is not a data2vec_vision (BEiT repo) checkpoint")
    source = Path(source)
    arch = arch_from_beit(sd, source)
    kind = "vision-cls" if "head.weight" in sd else "vision-pretrain"
    model_state = _from_beit(sd)
    num_classes = int(sd["head.weight"].shape[0]) if kind == "vision-cls" else 0
    fresh = build_vision_model(kind, arch, num_classes).state_dict()
    notes = [f"architecture read off the tensor shapes: {arch.num_layers} blocks x {arch.embed_dim}, "
             f"{arch.num_heads} heads, {arch.image_size}px images of {arch.patch_size}px patches"]
    if "encoder.mask_token" not in model_state:
        model_state["encoder.mask_token"] = fresh["encoder.mask_token"]
        notes.append("no mask token in the file: freshly initialized")
    ema = raw.get("model_ema") if isinstance(raw.get("model_ema"), dict) else None
    teacher = None
    if kind == "vision-pretrain":
        teacher = _from_beit(ema) if ema else None
        if teacher is not None:
            teacher.setdefault("encoder.mask_token", model_state["encoder.mask_token"])
            check_state_dict(teacher, fresh, str(source), what="EMA teacher (model_ema)")
            notes.append(f"EMA teacher imported from model_ema ({len(teacher)} tensors)")
            if use_ema:
                model_state = {k: v.clone() for k, v in teacher.items()}
                notes.append("student initialized from the EMA teacher (--use-ema)")
        else:
            if use_ema:
                raise InteropError(f"{source} has no EMA teacher (model_ema); drop --use-ema")
            teacher = {k: v.clone() for k, v in model_state.items()}
            notes.append("no model_ema in the file: the teacher starts as a copy of the student")
    elif use_ema:
        raise InteropError(f"{source} is a fine-tuned classifier: it has no EMA teacher; drop --use-ema")
    check_state_dict(model_state, fresh, str(source))
    classes = [str(i) for i in range(num_classes)] if kind == "vision-cls" else None
    if classes:
        notes.append(f"the file has no class names: the {num_classes} classes are named by index 0..{num_classes - 1}")
    src = {"format": "beit", "path": str(source.resolve()), "use_ema": use_ema}
    state = ck.make_state(kind, config={}, arch=dataclasses.asdict(arch), normalize=False, model=model_state,
                          teacher=teacher, classes=classes, source=src)
    return state, notes


def import_beit(raw, path: Path, out: Optional[Path] = None, workspace: Optional[Workspace] = None,
                force: bool = False, use_ema: bool = False, dict_path: Optional[Path] = None) -> ModelImportResult:
    """`d2v import fairseq` for a data2vec_vision file (`interop.import_fairseq` hands the loaded file here)."""
    path = Path(path)
    if dict_path is not None:
        raise InteropError(f"{path} is a data2vec vision model: --dict (a letter dictionary) is for speech CTC "
                           f"models; drop it")
    state, notes = convert_beit(raw, path, use_ema=use_ema)
    if out is None:
        out = (workspace or Workspace.resolve()).run_dir(f"imported-{path.stem}") / ck.LAST
    return save_model_import(state, Path(out), force, notes)


# --------------------------------------------------------------------------- export

HF_EXPORT_FILES = HF_WEIGHT_FILES + ("preprocessor_config.json",)


def is_vision_checkpoint(path: Path) -> bool:
    return ck.peek_kind(Path(path)) in ck.VISION_KINDS


def export_hf(checkpoint: Path, out_dir: Path, trust: bool = False, force: bool = False) -> list[Path]:
    """`d2v export hf` for an image checkpoint: a folder transformers loads with no missing or unexpected keys.

    vision-pretrain -> Data2VecVisionModel (the student; lm_head and the teacher stay behind);
    vision-cls -> Data2VecVisionForImageClassification with the class names as id2label.
    """
    checkpoint = Path(checkpoint)
    state = ck.load_checkpoint(checkpoint, trust=trust)
    kind = state[ck.KIND_KEY]
    if kind not in ck.VISION_KINDS:
        raise InteropError(f"{checkpoint} is a {kind!r} checkpoint, not an image model")
    arch = vision_arch(state.get(ck.ARCH_KEY) or {}, checkpoint)
    if arch.version == 2:
        raise InteropError(f"{checkpoint} is a data2vec 2.0 image model; Hugging Face's Data2VecVision is the "
                           f"1.0 (BEiT) architecture and has no 2.0 counterpart, so it cannot be exported")
    classes = list(state.get(ck.CLASSES_KEY) or [])
    check_state_dict(state[ck.MODEL_KEY], build_vision_model(kind, arch, len(classes)).state_dict(), str(checkpoint))
    weights = to_hf_state(kind, state[ck.MODEL_KEY])
    written = write_hf_folder(out_dir, HF_EXPORT_FILES, force, weights, hf_config(kind, arch, classes))
    preprocessor = Path(out_dir) / "preprocessor_config.json"
    atomic_write_text(preprocessor, json.dumps(preprocessor_config(arch), indent=2) + "\n")
    return written + [preprocessor]
