"""data2vec 1.0 pretraining of the text encoder: the text task that wires it to the objective core.

    d2v prepare synthetic-text && d2v pretrain --preset text-tiny        # minutes on CPU
    d2v prepare text corpus/*.txt && d2v pretrain --preset text-base
    torchrun --nproc_per_node 8 -m d2vcli pretrain --preset text-base   # 8 x 8192 tokens x 2 accumulation

`d2vcli.pretrain.pretrain` hands a config with `modality: text` to `pretrain()` here. The recipe is
fairseq's `examples/data2vec/models/data2vec_text.py` with `config/text/pretraining/base.yaml`
(docs/text.md). One update:

1. Masks: span masking (`objective.text_masking`: 35 % of the tokens in spans of 4, all `<mask>`),
   drawn per batch from the batch's own RNG stream, so they are the same in any process or resumed run.
2. The student (`Data2VecTextPretrainModel`) reads the masked tokens and predicts every position
   through its regression head; the masked positions are scored.
3. The teacher (`EMATeacher`) is an EMA of the encoder's transformer layers; the token and position
   embeddings and the embedding LayerNorm are copied from the student every step
   (`ema_transformer_layers_only`; `objective.teacher_ema_embeddings` averages them too, as text-tiny
   does: docs/text.md). It runs in eval mode on the **unmasked** sequence, as the paper
   says (the released code feeds it only the masked tokens, fairseq issue #4881:
   `objective.text_teacher_input: masked-only` reproduces that).
4. Targets (`build_targets`): the FFN outputs of the top 10 of 12 layers, each layer-normed (no
   affine), averaged, no final norm.
5. Loss (`regression_loss`): smooth L1 with beta 4 summed over each masked token's channels and over
   the masked tokens; sample_size = masked tokens, so the engine's division gives the recipe's mean
   over masked tokens of the summed smooth L1, over micro-batches and ranks.
6. `after_update`: one EMA step at `ema_decay_at(step)` (0.999 -> 0.9999 over 300k updates).
7. Monitors: target and prediction std every update, and on log steps the share of the targets'
   variance that token position explains (`target_position_share`); the guards stop a collapsed run.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor, nn

from d2vcli import checkpoint as ckpt
from d2vcli import config as cfgmod
from d2vcli import distributed, engine
from d2vcli.config import Config, ConfigError
from d2vcli.data import STREAM_MASK, Batch, batch_rng
from d2vcli.engine import StepOutput, TrainResult
from d2vcli.interop_tokenizer import sentencepiece_entry
from d2vcli.models.audio import parameter_count
from d2vcli.models.loading import build_text_model
from d2vcli.models.text import TextConfig
from d2vcli.objective.monitors import Guard, collapse_reason, compute_std, position_explained_share, spread_guards
from d2vcli.objective.targets import build_targets, regression_loss
from d2vcli.objective.teacher import EMATeacher
from d2vcli.objective.text_masking import TextMaskParams, mask_tokens
from d2vcli.run_dir import opened_run, print_run_config
from d2vcli.text_data import TextBlockLoader, TokenBlocks, Tokenizer, text_dir
from d2vcli.ui import console

# The embedding parts the teacher copies instead of averaging (fairseq `ema_transformer_layers_only`).
COPIED_PREFIXES = ("embed.",)

SPREAD_FIXES = (
    "learning rate too high for the batch: lower optim.lr (e.g. halve it) or lengthen schedule.warmup_updates;",
    "batch too small: raise train.tokens_per_update (gradient accumulation reproduces the recipe's batch);",
    "target normalization off: keep objective.layer_target_norm=layer;",
)


POSITION_FIXES = (
    "the teacher copies the student's embeddings every step, so a student that grows its position embeddings "
    "makes the targets positional at once: set objective.teacher_ema_embeddings=true (text-tiny does);",
    "a teacher that follows the student fast feeds the drift back: raise objective.ema_decay / ema_end_decay;",
)


def collapse_guards(obj: cfgmod.ObjectiveConfig) -> list[Guard]:
    """The text pretraining stop rules: the spread of targets and predictions (fairseq's compute_var guards)
    and, on log steps, the share of the targets' variance that token position alone explains."""
    return [
        *spread_guards(obj.min_target_std, obj.min_pred_std, "tokens", SPREAD_FIXES),
        Guard("target_position_share", "objective.max_position_share", obj.max_position_share, below=False,
              meaning="the targets mostly encode where a token is, not which token or what surrounds it, so "
              "the student can lower the loss from the position alone.", fixes=POSITION_FIXES),
    ]


def mask_params(m: cfgmod.MaskingConfig) -> TextMaskParams:
    return TextMaskParams(mask_prob=m.mask_prob, span_length=m.mask_length, leave_unmasked_prob=m.leave_unmasked_prob,
                          random_token_prob=m.random_token_prob)


def text_arch(cfg: Config, vocab_size: int, mask_id: int) -> TextConfig:
    """The encoder's TextConfig: the `text` section with the tokenizer's vocabulary size and <mask> id
    where the section leaves them to it (0 / -1); a section value that disagrees is a ConfigError."""
    t = cfg.text
    if t.vocab_size and t.vocab_size != vocab_size:
        raise ConfigError(f"text.vocab_size is {t.vocab_size} but the corpus's tokenizer has {vocab_size} ids; "
                          f"set text.vocab_size=0 (the tokenizer's) or prepare the corpus with that vocabulary")
    if t.mask_id >= 0 and t.mask_id != mask_id:
        raise ConfigError(f"text.mask_id is {t.mask_id} but the tokenizer's <mask> is {mask_id}; set text.mask_id=-1")
    values = dataclasses.asdict(t) | {"vocab_size": vocab_size, "mask_id": mask_id, "version": cfg.model.version}
    arch = TextConfig(**values)
    try:
        arch.validate()
    except ValueError as e:
        raise ConfigError(f"the text section does not fit the tokenizer: {e}") from None
    return arch


# ----------------------------------------------------------------------------- the task


class TextPretrainTask:
    """data2vec 1.0 text pretraining for the engine (see engine.TrainTask for the interface)."""

    kind = "text-pretrain"

    def __init__(self, cfg: Config, device: torch.device, arch: TextConfig, special_ids: tuple[int, ...] = (0, 1, 2, 3),
                 tokenizer: Optional[dict] = None):
        self.cfg = cfg
        self.tokenizer = tokenizer  # the checkpoint's tokenizer entry (interop_tokenizer), so the run carries it
        self.arch = arch
        self.special_ids = tuple(special_ids)
        self.masking = mask_params(cfg.masking)
        self.masking.validate()
        self.model = build_text_model("text-pretrain", arch).to(device)
        copied = () if cfg.objective.teacher_ema_embeddings else COPIED_PREFIXES
        self.teacher = EMATeacher(self.model.encoder, copied_prefixes=copied)
        self.find_unused_parameters = arch.layerdrop > 0

    @property
    def teacher_scope(self) -> str:
        """What the start-up line says the teacher is (2.0 overrides it)."""
        scope = ("EMA of the whole encoder" if self.cfg.objective.teacher_ema_embeddings
                 else "EMA of the transformer layers, embeddings copied")
        return f"{scope}; it reads the {self.cfg.objective.text_teacher_input} text"

    def mask(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(masked tokens (B, T), mask (B, T) bool) from the batch's own RNG stream."""
        rng = batch_rng(self.cfg.train.seed, batch.epoch, batch.index, STREAM_MASK)
        return mask_tokens(batch.source, batch.padding_mask, rng, self.masking, self.special_ids,
                           self.arch.vocab_size, self.arch.mask_id)

    def teacher_input(self, tokens: Tensor, padding_mask: Optional[Tensor], mask: Tensor):
        """What the teacher reads: the unmasked tokens, or (masked-only) the masked ones with every other
        position a pad, renumbered by make_positions as in the released code."""
        if self.cfg.objective.text_teacher_input == "masked-only":
            return tokens.masked_fill(~mask, self.arch.pad_id), None
        return tokens, padding_mask

    @torch.no_grad()
    def targets(self, tokens: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """The teacher's targets for every position: (B, T, D) fp32."""
        obj = self.cfg.objective
        self.teacher.module.eval()
        layer_results = self.teacher.module(tokens, padding_mask).layer_results  # L x (B, T, D)
        return build_targets(layer_results, obj.average_top_k_layers, obj.layer_target_norm, obj.final_target_norm)

    def train_step(self, model: nn.Module, batch: Batch, step: int) -> StepOutput:
        obj = self.cfg.objective
        tokens, padding_mask = batch.source, batch.padding_mask  # (B, T), (B, T) | None
        masked, mask = self.mask(batch)
        pred = model(masked, padding_mask)[mask]  # (N_masked, D)
        teacher_tokens, teacher_pad = self.teacher_input(tokens, padding_mask, mask)
        full_target = self.targets(teacher_tokens, teacher_pad)  # (B, T, D)
        target = full_target[mask]  # (N_masked, D)
        loss = regression_loss(pred, target, obj.loss_beta, obj.loss_scale)
        real = mask.numel() if padding_mask is None else int((~padding_mask).sum())
        metrics = {"target_std": compute_std(target), "pred_std": compute_std(pred),
                   "masked_share": mask.sum().float() / max(real, 1)}
        if (step + 1) % max(1, self.cfg.train.log_every) == 0:  # the update this step makes is logged
            # Over the positions the teacher read as text (masked-only: the masked ones).
            unread = teacher_tokens.eq(self.arch.pad_id)  # (B, T) True where the teacher saw padding
            metrics["target_position_share"] = position_explained_share(full_target, unread if unread.any() else None)
        return StepOutput(loss=loss, sample_size=pred.shape[0], metrics=metrics)

    def after_update(self, step: int) -> dict:
        return self.teacher.scheduled_step(step, self.cfg.objective)

    def validate(self, model: nn.Module, step: int) -> None:
        return None  # the recipe does not validate during pretraining

    def stop_reason(self, step: int, metrics: dict) -> Optional[str]:
        obj = self.cfg.objective
        return collapse_reason(step, metrics, check_after=obj.collapse_check_after, guards=collapse_guards(obj))

    def checkpoint_state(self) -> dict:
        return {
            ckpt.ARCH_KEY: dataclasses.asdict(self.arch),
            ckpt.NORMALIZE_KEY: False,  # no waveform to normalize
            ckpt.TEACHER_KEY: self.teacher.state_dict(),
            ckpt.TOKENIZER_KEY: self.tokenizer,
        }

    def load_checkpoint_state(self, state: dict) -> None:
        self.teacher.load_state_dict(state[ckpt.TEACHER_KEY])


# ----------------------------------------------------------------------------- entry point


def build_text_loader(cfg: Config, workspace, info: distributed.DistInfo) -> tuple[TextBlockLoader, Tokenizer]:
    """The pretraining batches of data.train_splits (one split: the shards hold one block sequence per
    split) and the corpus's tokenizer."""
    folder = text_dir(workspace, cfg.data.text_dir)
    if len(cfg.data.train_splits) != 1:
        raise ConfigError(f"text pretraining reads one split; data.train_splits is {list(cfg.data.train_splits)} "
                          f"(the prepared corpus has train and valid): set --set 'data.train_splits=[train]'")
    blocks = TokenBlocks(folder, cfg.data.train_splits[0])
    tokenizer = Tokenizer.load(folder / "spm.model")
    loader = TextBlockLoader(blocks, tokenizer, cfg.data.text_tokens_per_batch, cfg.train.seed,
                             tokens_per_sample=cfg.data.tokens_per_sample, rank=info.rank,
                             world_size=info.world_size)
    if info.is_main:
        console.print(f"data: {len(blocks):,} blocks, {int(blocks.sizes.sum()):,} tokens from {folder} "
                      f"({cfg.data.train_splits[0]}); {len(loader.batches(1)):,} batches of up to "
                      f"{cfg.data.text_tokens_per_batch:,} tokens per epoch")
    return loader, tokenizer


def pretrain(cfg: Config, workspace, name: Optional[str] = None, resume: bool = False, preset: Optional[str] = None,
             stop_at: Optional[int] = None, resume_if_exists: bool = False, make_task=None) -> TrainResult:
    """Run (or resume) data2vec text pretraining in <workdir>/runs/<name>; as `d2vcli.pretrain.pretrain`.

    `make_task` builds the task with TextPretrainTask's arguments (`pretrain_text2` passes 2.0's)."""
    if cfg.data.tokens_per_sample > cfg.text.max_positions:
        raise ConfigError(f"data.tokens_per_sample ({cfg.data.tokens_per_sample}) is longer than the encoder's "
                          f"text.max_positions ({cfg.text.max_positions}); lower one or raise the other")
    info = distributed.setup(cfg.train.device)
    try:
        loader, tokenizer = build_text_loader(cfg, workspace, info)
        arch = text_arch(cfg, tokenizer.vocab_size, tokenizer.mask_id)
        with opened_run(workspace, cfg, info, "pretrain", name, preset, resume, resume_if_exists) as run:
            specials = (tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id)
            task = (make_task or TextPretrainTask)(cfg, info.device, arch, specials,
                                                   sentencepiece_entry(text_dir(workspace, cfg.data.text_dir)
                                                                       / "spm.model"))
            if info.is_main:
                print_run_config(cfg, "pretrain", preset, run)
                console.print(f"model: {parameter_count(task.model):,} parameters ({arch.num_layers} x "
                              f"{arch.embed_dim}, {arch.vocab_size:,} tokens, data2vec {arch.version}.0; teacher: "
                              f"{task.teacher_scope})")
            return engine.train(cfg, task, loader, run, info, description="pretrain", stop_at=stop_at,
                                batch=engine.text_batch_unit(cfg))
    finally:
        distributed.teardown()
