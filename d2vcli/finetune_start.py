"""Where CTC fine-tuning starts: the pretrained checkpoint `finetune.init` (or this run's own checkpoint on
resume, or random weights for `finetune.init=scratch`), the config completed from it (its architecture,
its input normalization, its objective), and the CTC model with that encoder loaded.

finetune.py calls these (and re-exports merge_architecture); the rules they enforce are in its docstring under
**Start**, **What comes from where** and **Waveform normalization**.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from d2vcli import checkpoint as ckpt
from d2vcli import config as cfgmod
from d2vcli.config import REGULARIZATION_FIELDS, Config, ConfigError, ModelConfig
from d2vcli.finetune_labels import maskable
from d2vcli.models.audio import Data2VecForCTC
from d2vcli.models.loading import build_model
from d2vcli.vocab import Vocab

# finetune.init value for the random-init baseline. A run literally named "scratch" is still
# reachable by its directory (runs/scratch).
SCRATCH = "scratch"


@dataclass
class Start:
    """What a run starts from: the checkpoint read and the config completed from it."""

    cfg: Config  # architecture and normalize filled in from the checkpoint
    path: Optional[Path]  # None: random initialization (finetune.init=scratch)
    state: dict
    resuming: bool  # True: `path` is this run's own ctc checkpoint; False: a pretrained one (or scratch)

    @property
    def label(self) -> str:
        return str(self.path) if self.path is not None else "random initialization (finetune.init=scratch)"

    @property
    def vocab(self) -> Optional[Vocab]:
        """The stored vocabulary of a resumed run (None when starting from a pretrained model)."""
        letters = self.state.get(ckpt.VOCAB_KEY) if self.resuming else None
        return Vocab(tuple(letters)) if letters else None


def merge_architecture(model: ModelConfig, arch: dict, source: Path) -> ModelConfig:
    """The checkpoint's architecture with the config's regularization fields.

    An architecture field the config sets away from its default and away from the checkpoint's
    value is an error: the user asked for a network the checkpoint does not hold.
    """
    stored = cfgmod.from_dict(arch, ModelConfig)
    defaults = ModelConfig()
    conflicts = []
    for fl in dataclasses.fields(ModelConfig):
        if fl.name in REGULARIZATION_FIELDS:
            continue
        asked, have = getattr(model, fl.name), getattr(stored, fl.name)
        if asked != getattr(defaults, fl.name) and asked != have:
            conflicts.append(f"model.{fl.name}={asked!r} (the checkpoint has {have!r})")
    if conflicts:
        raise ConfigError(
            f"the architecture comes from the pretrained checkpoint {source}, but the config sets "
            f"{', '.join(conflicts)}. Fine-tuning can only change regularization "
            f"({', '.join('model.' + n for n in REGULARIZATION_FIELDS)}); remove the other model.* settings."
        )
    return dataclasses.replace(stored, **{n: getattr(model, n) for n in REGULARIZATION_FIELDS})


def resolve_normalize(asked: Optional[bool], stored: bool, source: Path) -> bool:
    """The checkpoint's waveform normalization; an explicit different `data.normalize` is an error."""
    if asked is not None and bool(asked) != bool(stored):
        raise ConfigError(
            f"data.normalize={str(asked).lower()} but {source} was trained with "
            f"normalize={str(bool(stored)).lower()}. The encoder only works on input scaled the way it was "
            f"trained on (fairseq asserts the same), so fine-tuning always uses the checkpoint's setting: "
            f"remove data.normalize from your config (or set it to null)."
        )
    return bool(stored)


def load_start(cfg: Config, workspace, run_dir: Path, resume: bool, trust: bool = False) -> Start:
    """Read the checkpoint this run starts from and complete `cfg` from it.

    With `resume` and a checkpoint in `run_dir`, that (ctc) checkpoint; otherwise the pretrained
    checkpoint `finetune.init` (a path, run directory or run name in the workspace).
    """
    own = ckpt.latest(run_dir) if resume else None
    if own is not None:
        path, kind = own, "ctc"
    elif cfg.finetune.init == SCRATCH:
        return scratch_start(cfg)
    elif cfg.finetune.arch_preset:
        raise ConfigError(f"finetune.arch_preset={cfg.finetune.arch_preset} (--arch-preset) only applies with "
                          f"finetune.init=scratch; a pretrained checkpoint brings its own architecture.")
    else:
        if not cfg.finetune.init:
            raise ConfigError(
                "no pretrained model to fine-tune: pass --init RUN_OR_CHECKPOINT (or --set finetune.init=...), "
                "e.g. the name of a `d2v pretrain` run in this workspace or a checkpoint from `d2v import`."
            )
        path, kind = ckpt.find_checkpoint(workspace, cfg.finetune.init), "pretrain"
    try:
        # Only the pretrained model may be foreign; a resumed run's own checkpoint is always safe to load.
        state = ckpt.load_checkpoint(path, expect_kind=kind, trust=trust and kind == "pretrain")
    except ckpt.CheckpointError as e:
        raise ckpt.CheckpointError(f"{e}{_kind_hint(path, kind, run_dir.name, trust)}") from None
    for key in (ckpt.ARCH_KEY, ckpt.NORMALIZE_KEY, ckpt.MODEL_KEY):
        if key not in state:
            raise ckpt.CheckpointError(f"{path} has no '{key}' entry; it is not a complete d2v checkpoint")
    model_cfg = merge_architecture(cfg.model, state[ckpt.ARCH_KEY], path)
    normalize = resolve_normalize(cfg.data.normalize, state[ckpt.NORMALIZE_KEY], path)
    cfg = dataclasses.replace(cfg, model=model_cfg, data=dataclasses.replace(cfg.data, normalize=normalize),
                              objective=_objective_of(state, cfg.objective, model_cfg.num_layers))
    cfg.validate()
    m = cfg.masking
    if not maskable(model_cfg.embed_dim, m.mask_channel_prob, m.mask_channel_length, 0):
        raise ConfigError(
            f"masking.mask_channel_length={m.mask_channel_length} with mask_channel_prob={m.mask_channel_prob} can "
            f"zero every one of this model's {model_cfg.embed_dim} channels (model.embed_dim, from {path}); use "
            f"spans of at most {model_cfg.embed_dim // 4} channels (fairseq's 64 is for 768)."
        )
    return Start(cfg=cfg, path=path, state=state, resuming=own is not None)


def scratch_start(cfg: Config) -> Start:
    """The random-init baseline (finetune.init=scratch): the architecture of the pretrain preset
    `finetune.arch_preset` (or the model defaults), with every model.* field the config sets away
    from its default on top, and that preset's input normalization. No weights are read: the CTC
    model is built and seeded exactly as for a pretrained start, and its encoder keeps its init."""
    ft = cfg.finetune
    arch_cfg = cfgmod.resolve("pretrain", preset=ft.arch_preset) if ft.arch_preset else cfgmod.Config()
    defaults = ModelConfig()
    asked = {fl.name: getattr(cfg.model, fl.name) for fl in dataclasses.fields(ModelConfig)
             if fl.name in REGULARIZATION_FIELDS or getattr(cfg.model, fl.name) != getattr(defaults, fl.name)}
    model_cfg = dataclasses.replace(arch_cfg.model, **asked)
    normalize = arch_cfg.data.normalize if cfg.data.normalize is None else cfg.data.normalize
    top_k = min(arch_cfg.objective.average_top_k_layers, model_cfg.num_layers)
    cfg = dataclasses.replace(cfg, model=model_cfg, data=dataclasses.replace(cfg.data, normalize=normalize),
                              objective=dataclasses.replace(arch_cfg.objective, average_top_k_layers=top_k))
    cfg.validate()
    return Start(cfg=cfg, path=None, state={}, resuming=False)


def _kind_hint(path: Path, expected: str, run_name: str, trust: bool = False) -> str:
    """What to do instead when `path` is a checkpoint of the other kind (read again only on this error path)."""
    try:
        found = ckpt.load_raw(path, trust=trust).get(ckpt.KIND_KEY)
    except Exception:  # noqa: BLE001 - the original error already says what is wrong with the file
        return ""
    if found == expected or found not in ckpt.KINDS:
        return ""
    if expected == "ctc":
        return (f" --resume continues a fine-tuning run, and runs/{run_name} is not one: to fine-tune from it, "
                f"pass --init {run_name} with a new --name.")
    return (" finetune.init (--init) takes a pretrained model; to continue a fine-tuning run, use its --name "
            "with --resume.")


def _objective_of(state: dict, default: cfgmod.ObjectiveConfig, num_layers: int) -> cfgmod.ObjectiveConfig:
    """The pretraining objective the checkpoint records (unused here, but it must fit its layer count,
    and the run's config then tells how its encoder was pretrained)."""
    try:
        objective = cfgmod.from_dict(state.get(ckpt.CONFIG_KEY, {}).get("objective", {}), cfgmod.ObjectiveConfig)
    except ConfigError:
        objective = default
    if objective.average_top_k_layers > num_layers:
        objective = dataclasses.replace(objective, average_top_k_layers=num_layers)
    return objective


def encoder_state(state: dict, init_from: str, path: Path) -> dict:
    """Backbone weights (keys relative to `backbone.`) of a pretrained checkpoint, student or teacher."""
    model = state[ckpt.MODEL_KEY]
    backbone = {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}
    if init_from == "teacher":
        teacher = state.get(ckpt.TEACHER_KEY)
        if not teacher:
            raise ckpt.CheckpointError(
                f"{path} holds no EMA teacher weights, so finetune.init_from=teacher (--from-teacher) cannot be "
                f"used; fine-tune from the student (the default) instead."
            )
        # The teacher is an EMA of the 1.0 transformer / the 2.0 context encoder (pos conv, ALiBi scale, layers).
        prefix = "encoder." if ckpt.arch_of(state, path).version == 2 else "transformer."
        for k, v in teacher.items():
            backbone[prefix + k] = v
    return backbone


def build_ctc_model(cfg: Config, vocab_size: int) -> Data2VecForCTC:
    """Data2VecForCTC for `cfg.model` (already the checkpoint's architecture); conv encoder frozen
    (requires_grad off) when feature_grad_mult is 0, as it then runs under no_grad anyway."""
    model = build_model("ctc", cfg.model, vocab_size, cfg.finetune.final_dropout)
    if cfg.model.feature_grad_mult == 0:
        model.backbone.feature_extractor.requires_grad_(False)
    return model


def load_encoder(model: Data2VecForCTC, start: Start, init_from: str) -> None:
    """Copy the pretrained encoder into `model.backbone`; every backbone tensor must be provided."""
    weights = encoder_state(start.state, init_from, start.path)
    missing, unexpected = model.backbone.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ckpt.CheckpointError(
            f"{start.path}: the encoder weights do not fit the architecture stored with them "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}). The file is damaged or was edited."
        )
