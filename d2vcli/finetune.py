"""CTC fine-tuning of a pretrained data2vec model on letters: `d2v finetune`.

    d2v finetune --preset finetune-100h --init speech-base          # a pretrain run name or a checkpoint path
    d2v finetune --preset finetune-10m --init speech-base --from-teacher
    d2v finetune --preset finetune-tiny --init demo-pretrain       # about 3 minutes on CPU (synthetic corpus)
    d2v finetune --preset finetune-100h --resume                    # continue the run exactly
    torchrun --nproc_per_node 8 -m d2vcli finetune --preset finetune-960h --init speech-base

Python: `finetune(cfg, workspace, name=..., resume=...) -> engine.TrainResult`.

It plugs `FinetuneTask` into the one training loop (`d2vcli.engine`); where a run starts is
finetune_start.py, which labels and utterances can train finetune_labels.py. It follows fairseq's
`wav2vec_ctc` + `audio_finetuning` + `ctc` criterion (`fairseq/models/wav2vec/wav2vec2_asr.py`,
`fairseq/tasks/audio_finetuning.py`, `fairseq/criterions/ctc.py`; recipe values in `docs/recipe.md`):

- **Start.** `finetune.init=scratch` (`--init scratch`) is the random-init baseline: the same
  code path with no weights loaded, the architecture from the pretrain preset
  `finetune.arch_preset` (`--arch-preset`) plus model.* settings (`finetune_start.scratch_start`).
  Otherwise the encoder comes from a `d2v pretrain` (or `d2v import`) checkpoint of kind
  "pretrain": the student's weights, or with `finetune.init_from=teacher` the EMA teacher's
  transformer in place of the student's (fairseq `load_ema`). Its regression head is dropped and
  a fresh Linear(D, V) head (xavier, bias 0) is added (`Data2VecForCTC`).
- **What comes from where.** The architecture is the checkpoint's (`arch`); the config supplies
  only regularization (model.dropout, attention_dropout, activation_dropout, dropout_input,
  layerdrop, feature_grad_mult, finetune.final_dropout, masking.*) and the optimization recipe.
  The resolved config printed at start and saved in the run shows the checkpoint's architecture.
  An architecture value set in the config that disagrees with the checkpoint is an error.
- **Waveform normalization** is the checkpoint's `normalize`, always: `data.normalize: null`
  (the fine-tuning default) follows it, and a different explicit value is an error, so
  the normalize-mismatch trap of fairseq setups (an encoder fine-tuned on input scaled otherwise
  than in its pretraining) cannot happen.
- **Letters.** The vocabulary is `<workdir>/data/dict.ltr.txt` (blank `<s>` = 0, `|` between
  words) and is stored in every checkpoint (`vocab`), so decoding never reads a side file. A
  transcript with a character outside it is an error naming the manifest line.
- **Utterances CTC cannot learn** (fewer frames than letters plus repeated-letter blanks) or too
  short to hold the time mask are left out of training, counted and listed in the log.
- **Step.** Time spans are replaced by `mask_emb` and channel spans zeroed (`compute_mask_indices`
  with the masking config; training only, keyed by the batch so resumed runs repeat them). CTC
  loss on fp32 log-softmax, blank 0, summed, `zero_infinity`; sample size = utterances
  (fairseq `sentence_avg`). The logged loss is per utterance in nats (fairseq divides by ln 2).
- **Freezing.** With `model.feature_grad_mult: 0` the conv feature encoder is frozen for the whole
  run (no gradient, not in the optimizer). For the first `finetune.freeze_updates` updates the
  whole encoder runs under no_grad and only the head trains; parameters without a gradient are
  skipped by Adam, so frozen weights get no moments and do not move.
- **Validation** every `finetune.validate_every` updates from `finetune.validate_after` on:
  greedy CTC decoding of each `data.valid_splits` manifest, corpus WER and CER in percent
  (`d2vcli.scoring.score`), the per-utterance CTC loss and the share of empty (all-blank)
  hypotheses. `finetune.best_metric` (default dev-other/wer, lower is better) selects best.pt;
  `finetune.early_stop_patience` validations without improvement end the run.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2vcli import checkpoint as ckpt
from d2vcli import config as cfgmod
from d2vcli import distributed, engine, finetune_text, finetune_vision
from d2vcli.callable_module import make_callable
from d2vcli.config import Config, ConfigError
from d2vcli.data import STREAM_MASK, AudioDataset, Batch, BatchLoader, bad_files_summary, batch_rng, read_splits
from d2vcli.decode.search import greedy_batch
from d2vcli.distributed import DistInfo
from d2vcli.engine import StepOutput, TrainResult
from d2vcli.finetune_labels import FinetuneDataError, TrainingSet, check_labels, select_trainable
from d2vcli.finetune_labels import ctc_min_frames, maskable  # noqa: F401 - re-exported
from d2vcli.finetune_start import build_ctc_model, load_encoder, load_start
from d2vcli.finetune_start import merge_architecture  # noqa: F401 - re-exported
from d2vcli.models.audio import Data2VecForCTC, parameter_count
from d2vcli.objective.masking import compute_channel_mask, compute_mask_indices
from d2vcli.pretrain import check_manifests
from d2vcli.run_dir import default_run_name, prepare_run, resume_wanted, run_lock
from d2vcli.scoring import score
from d2vcli.ui import console, print_config_summary
from d2vcli.vocab import BLANK, SPECIALS, Vocab

VALID_METRICS = ("wer", "cer", "loss")


# ----------------------------------------------------------------------------- loss


def ctc_loss(logits: Tensor, frame_pad: Optional[Tensor], target: Tensor, target_lengths: Tensor) -> Tensor:
    """Summed CTC loss over the batch (fairseq `ctc` criterion), in fp32.

    logits (B, T, V), frame_pad (B, T) True = padding or None, target (B, L) padded with <pad>,
    target_lengths (B,). Blank 0, reduction sum, zero_infinity (an unalignable utterance adds 0
    and no NaN gradient). cuDNN's CTC is off as in fairseq: it needs int32 targets on the CPU
    and gives different results for some lengths.
    """
    B, T, _ = logits.shape
    lprobs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, V)
    if frame_pad is not None:
        input_lengths = (~frame_pad).sum(-1)  # (B,)
    else:
        input_lengths = torch.full((B,), T, dtype=torch.long, device=logits.device)
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(lprobs, target, input_lengths, target_lengths, blank=BLANK, reduction="sum",
                          zero_infinity=True)


# ----------------------------------------------------------------------------- freezing


@contextlib.contextmanager
def encoder_frozen(model: Data2VecForCTC, frozen: bool) -> Iterator[None]:
    """Run `model.backbone` under no_grad inside the forward while `frozen` (fairseq freeze_finetune_updates).

    The engine calls the model through its DDP wrapper, so the freeze has to act inside the
    wrapped forward: a pre-hook on the backbone switches gradients off and a hook switches them
    back on for the head. No activations are kept for the encoder and its parameters get no
    gradient, which Adam skips.
    """
    if not frozen:
        yield
        return
    grad_was_enabled = torch.is_grad_enabled()

    def grad_off(module, args) -> None:
        torch.set_grad_enabled(False)

    def grad_back(module, args, output) -> None:
        torch.set_grad_enabled(grad_was_enabled)

    pre = model.backbone.register_forward_pre_hook(grad_off)
    post = model.backbone.register_forward_hook(grad_back)
    try:
        yield
    finally:
        pre.remove()
        post.remove()
        torch.set_grad_enabled(grad_was_enabled)


# ----------------------------------------------------------------------------- the task


class FinetuneTask:
    """Letter CTC fine-tuning for the engine (see engine.TrainTask for the interface)."""

    kind = "ctc"

    def __init__(self, cfg: Config, model: Data2VecForCTC, vocab: Vocab, valid_sets: dict[str, AudioDataset],
                 info: DistInfo):
        self.cfg, self.model, self.vocab, self.valid_sets, self.info = cfg, model, vocab, valid_sets, info
        ft, m = cfg.finetune, cfg.masking
        # Steps that leave trainable parameters without a gradient: the freeze (whole encoder),
        # LayerDrop (skipped layers) and no time masking (mask_emb unused). DDP must look for them.
        self.find_unused_parameters = ft.freeze_updates > 0 or cfg.model.layerdrop > 0 or m.mask_prob <= 0
        self.amp_dtype = engine.resolve_precision(cfg.train.precision, info.device)
        self.empty_validations = 0
        if ft.encoder_lr_scale != 1.0:  # the engine multiplies the schedule's rate by these (engine.TrainTask)
            self.lr_scales = {name: ft.encoder_lr_scale for name, _ in model.named_parameters()
                              if name.startswith("backbone.")}

    # -- training

    def masks(self, batch: Batch, frames: int, frame_pad: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(time mask (B, T), channel mask (B, D)) for one training batch, from the batch's own RNG."""
        m = self.cfg.masking
        B, device = batch.source.shape[0], batch.source.device
        rng = batch_rng(self.cfg.train.seed, batch.epoch, batch.index, STREAM_MASK)
        time_mask = channel_mask = None
        if m.mask_prob > 0:
            time_mask = compute_mask_indices((B, frames), frame_pad, m.mask_prob, m.mask_length,
                                             min_masks=m.min_masks, require_same_masks=m.require_same_masks, rng=rng)
            time_mask = torch.from_numpy(time_mask).to(device, non_blocking=True)
        if m.mask_channel_prob > 0:
            channel_mask = compute_channel_mask(B, self.model.backbone.embed_dim, m.mask_channel_prob,
                                                m.mask_channel_length, rng)
            channel_mask = torch.from_numpy(channel_mask).to(device, non_blocking=True)
        return time_mask, channel_mask

    def train_step(self, model: nn.Module, batch: Batch, step: int) -> StepOutput:
        source, padding_mask = batch.source, batch.padding_mask  # (B, S), (B, S)
        backbone = self.model.backbone
        frames = backbone.num_frames(source.shape[1])
        frame_pad = backbone.frame_padding_mask(padding_mask, frames)  # (B, T) | None
        time_mask, channel_mask = self.masks(batch, frames, frame_pad)
        with encoder_frozen(self.model, step < self.cfg.finetune.freeze_updates):
            out = model(source, padding_mask, time_mask=time_mask, channel_mask=channel_mask)
        loss = ctc_loss(out["logits"], out["padding_mask"], batch.target, batch.target_lengths)
        return StepOutput(loss=loss, sample_size=source.shape[0])

    def after_update(self, step: int) -> None:
        return None

    def stop_reason(self, step: int, metrics: dict) -> None:
        return None

    # -- validation

    @torch.no_grad()
    def validate(self, model: nn.Module, step: int) -> dict:
        """Greedy WER/CER (percent), loss per utterance and share of empty hypotheses on each valid split.

        Each rank decodes its share of the batches; totals are summed over ranks.
        """
        result = {}
        for split, dataset in self.valid_sets.items():
            refs, hyps, loss = decode_dataset(model, dataset, self.vocab, self.cfg.data.max_tokens, self.info,
                                              self.amp_dtype)
            s = score(refs, hyps)
            totals = torch.tensor([s.words.errors, s.words.ref, s.chars.errors, s.chars.ref, loss, len(refs),
                                   sum(1 for h in hyps if not h)], dtype=torch.float64, device=self.info.device)
            w_err, w_ref, c_err, c_ref, loss_sum, n, empty = distributed.all_reduce_sum(totals).tolist()
            result[f"{split}/wer"] = 100.0 * w_err / max(w_ref, 1)
            result[f"{split}/cer"] = 100.0 * c_err / max(c_ref, 1)
            result[f"{split}/loss"] = loss_sum / max(n, 1)
            result[f"{split}/empty"] = empty / max(n, 1)
        self._warn_if_only_blanks(result, step)
        return result

    def _warn_if_only_blanks(self, result: dict, step: int) -> None:
        empties = [v for k, v in result.items() if k.endswith("/empty")]
        if not empties or min(empties) < 0.99:
            self.empty_validations = 0
            return
        self.empty_validations += 1
        if self.info.is_main and self.empty_validations >= 2:
            ft = self.cfg.finetune
            console.print(
                f"[yellow]warning:[/] the model still emits only blanks at update {step} "
                f"({self.empty_validations} validations in a row). CTC models start this way, and leave it "
                f"some hundreds to thousands of updates after the encoder unfreezes (finetune.freeze_updates="
                f"{ft.freeze_updates}). If it persists: check the learning rate (optim.lr), that the transcripts "
                f"match the audio, and that the pretrained model is healthy."
            )

    # -- checkpoints

    def checkpoint_state(self) -> dict:
        return {
            ckpt.ARCH_KEY: cfgmod.to_dict(self.cfg.model),
            ckpt.NORMALIZE_KEY: bool(self.cfg.data.normalize),
            ckpt.VOCAB_KEY: list(self.vocab.symbols),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        stored = tuple(state.get(ckpt.VOCAB_KEY) or ())
        if stored != self.vocab.symbols:
            raise ckpt.CheckpointError("the checkpoint's vocabulary differs from the run's; resume with the "
                                       "checkpoint it was written with")


@torch.no_grad()
def decode_dataset(model: nn.Module, dataset: AudioDataset, vocab: Vocab, max_tokens: int, info: DistInfo,
                   amp_dtype: Optional[torch.dtype] = None) -> tuple[list[str], list[str], float]:
    """Greedy transcripts of this rank's share of `dataset`: (references, hypotheses, summed CTC loss).

    `model` must be in eval mode: no masks, no dropout, deterministic.
    """
    # Never leave an utterance out of the score: the batch limit grows to the longest one.
    max_tokens = max(max_tokens, int(dataset.sizes.max()))
    loader = BatchLoader(dataset, "pad", max_tokens, seed=0, shuffle=False, rank=info.rank,
                         world_size=info.world_size, drop_uneven=False)
    refs, hyps, loss = [], [], 0.0
    autocast = torch.autocast(info.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    for batch in loader:
        source = batch.source.to(info.device, non_blocking=True)
        padding_mask = batch.padding_mask.to(info.device, non_blocking=True)
        with autocast:
            out = model(source, padding_mask)
        logits = out["logits"].float()
        loss += float(ctc_loss(logits, out["padding_mask"], batch.target.to(info.device),
                               batch.target_lengths.to(info.device)))
        hyps.extend(vocab.decode(ids) for ids in greedy_batch(logits, out["padding_mask"]))
        refs.extend(batch.texts)
    if loader.bad_files:
        console.print(f"warning: validation: {bad_files_summary(loader.bad_files)}; they are not scored.",
                      markup=False, highlight=False, soft_wrap=True)
    return refs, hyps, loss


# ----------------------------------------------------------------------------- entry point


def check_validation(cfg: Config) -> None:
    """`finetune.best_metric` must name a validated split and a reported metric."""
    ft = cfg.finetune
    if not cfg.data.valid_splits or ft.validate_every <= 0 or not ft.best_metric:
        return
    split, _, metric = ft.best_metric.rpartition("/")
    if split not in cfg.data.valid_splits or metric not in VALID_METRICS:
        choices = ", ".join(f"{s}/{m}" for s in cfg.data.valid_splits for m in VALID_METRICS[:2])
        raise ConfigError(
            f"finetune.best_metric '{ft.best_metric}' is not something validation reports; with "
            f"data.valid_splits {list(cfg.data.valid_splits)} choose one of: {choices} "
            f"(or add the split to data.valid_splits)."
        )


def _warn_schedule(cfg: Config) -> None:
    """Recipe values copied to a small run can silently waste it (e.g. a freeze longer than the run)."""
    ft, total = cfg.finetune, cfg.train.max_updates
    if ft.freeze_updates >= total:
        console.print(f"[yellow]warning:[/] finetune.freeze_updates={ft.freeze_updates} >= train.max_updates="
                      f"{total}: only the output layer will ever train.")
    if cfg.data.valid_splits and ft.validate_every > 0 and max(ft.validate_after, ft.validate_every) > total:
        console.print(f"[yellow]warning:[/] no validation will run: finetune.validate_after={ft.validate_after}, "
                      f"validate_every={ft.validate_every}, train.max_updates={total}.")


def _describe_skips(split_names: Sequence[str], ts: TrainingSet, cfg: Config) -> None:
    if ts.infeasible:
        console.print(f"skipped {len(ts.infeasible)} utterance(s) of {', '.join(split_names)} whose transcript needs "
                      f"more CTC frames than the audio has: {', '.join(ts.infeasible[:10])}"
                      f"{' ...' if len(ts.infeasible) > 10 else ''}", markup=False)
    if ts.too_short_to_mask:
        console.print(f"skipped {len(ts.too_short_to_mask)} utterance(s) too short for masking.mask_length="
                      f"{cfg.masking.mask_length}: {', '.join(ts.too_short_to_mask[:10])}"
                      f"{' ...' if len(ts.too_short_to_mask) > 10 else ''}", markup=False)


def finetune(
    cfg: Config,
    workspace,
    name: Optional[str] = None,
    resume: bool = False,
    preset: Optional[str] = None,
    stop_at: Optional[int] = None,
    resume_if_exists: bool = False,
    trust: bool = False,
) -> TrainResult:
    """Run (or resume) CTC fine-tuning in <workdir>/runs/<name>; returns how it ended.

    `resume` without a checkpoint is an error; `resume_if_exists` then starts fresh. The run is
    locked for this process until it returns (`run_dir.run_lock`). `trust` (--trust-checkpoint)
    allows full unpickling of a foreign `finetune.init` checkpoint.

    Prints what the config changes; config.yaml holds it whole, with the checkpoint's architecture.
    `stop_at` saves and returns after that many updates (status "paused") without changing
    the schedule, so a run can be split into parts that together equal one uninterrupted run.
    A config with `modality: images` trains an image classifier (`d2vcli.finetune_vision`), one with
    `modality: text` a sentence classifier or regressor (`d2vcli.finetune_text`).
    """
    if cfg.modality == "images":
        return finetune_vision.finetune(cfg, workspace, name=name, resume=resume, preset=preset, stop_at=stop_at,
                                        resume_if_exists=resume_if_exists, trust=trust)
    if cfg.modality == "text":
        return finetune_text.finetune(cfg, workspace, name=name, resume=resume, preset=preset, stop_at=stop_at,
                                      resume_if_exists=resume_if_exists, trust=trust)
    info = distributed.setup(cfg.train.device)
    try:
        name = distributed.broadcast_object(name or default_run_name("finetune", preset))
        with run_lock(workspace, name, info):
            resume = resume_wanted(workspace, name, resume, resume_if_exists)
            return _finetune(cfg, workspace, name, resume, stop_at, info, trust, preset)
    finally:
        distributed.teardown()


def _finetune(cfg: Config, workspace, name: str, resume: bool, stop_at: Optional[int],
              info: DistInfo, trust: bool, preset: Optional[str]) -> TrainResult:
    """The fine-tuning run proper, under the run lock."""
    start = load_start(cfg, workspace, workspace.run_dir(name), resume, trust=trust)
    # On screen: what the user changed from the preset; what the checkpoint fills in (architecture,
    # normalize) is stated on the init line, and everything is in config.yaml.
    requested, cfg = cfg, start.cfg
    check_manifests(workspace, cfg.data.train_splits)
    for split in cfg.data.valid_splits:
        workspace.require_manifest(split)
    check_validation(cfg)
    vocab = start.vocab or Vocab.load(workspace.dictionary)
    check_labels(workspace, list(cfg.data.train_splits) + list(cfg.data.valid_splits), vocab)
    run = prepare_run(workspace, name, cfg, resume, info)
    if info.is_main:
        a = cfg.model
        scratch = start.path is None
        source = "resuming" if start.resuming else "" if scratch else f"{cfg.finetune.init_from} weights of "
        arch_from = (cfg.finetune.arch_preset or "model defaults") + " + model.*" if scratch else start.path.name
        print_config_summary(requested, cfgmod.base_config("finetune", preset),
                             f"finetune config (model architecture from {arch_from})",
                             f"preset {preset}" if preset else "the defaults", run.dir / "config.yaml")
        console.print(f"init: {source}{start.label} ({a.num_layers} x {a.embed_dim}); normalize="
                      f"{str(cfg.data.normalize).lower()} (from the {'preset' if scratch else 'checkpoint'}); "
                      f"{len(vocab)} outputs ({len(vocab) - len(SPECIALS)} letters)", markup=False)
        _warn_schedule(cfg)

    train = select_trainable(read_splits(workspace, cfg.data.train_splits), vocab, cfg)
    if info.is_main:
        _describe_skips(cfg.data.train_splits, train, cfg)
    if not train.records:
        raise FinetuneDataError(f"no utterance of {', '.join(cfg.data.train_splits)} can be trained on "
                                f"(see the skipped utterances above)")
    dataset = AudioDataset(train.records, normalize=cfg.data.normalize,
                           min_sample_size=cfg.data.min_sample_size, vocab=vocab)
    valid = {split: AudioDataset(read_splits(workspace, [split]), normalize=cfg.data.normalize, vocab=vocab)
             for split in cfg.data.valid_splits}

    torch.manual_seed(cfg.train.seed)  # the same initial head on every rank
    model = build_ctc_model(cfg, len(vocab))
    if not start.resuming and start.path is not None:  # scratch keeps the builder's random init
        load_encoder(model, start, cfg.finetune.init_from)
    start.state = {}  # free the pretrained weights
    model.to(info.device)
    task = FinetuneTask(cfg, model, vocab, valid, info)

    loader = BatchLoader(dataset, "pad", cfg.data.max_tokens, cfg.train.seed, rank=info.rank,
                         world_size=info.world_size, num_workers=cfg.data.num_workers,
                         pin_memory=info.device.type == "cuda", max_bad_files=cfg.data.max_bad_files,
                         length_buckets=cfg.data.length_buckets)
    if info.is_main:
        if loader.buckets is not None:
            console.print(f"batches: {loader.bucketing_cost()}", markup=False)
        console.print(
            f"data: {len(dataset):,} utterances, {dataset.seconds / 3600:.2f} h from "
            f"{', '.join(cfg.data.train_splits)} ({dataset.skipped:,} shorter than {cfg.data.min_sample_size} "
            f"samples and {loader.too_long:,} longer than data.max_tokens left out); "
            f"{len(loader.batches(1)):,} batches per epoch; validation on {', '.join(valid) or 'nothing'}")
        console.print(f"model: {parameter_count(model, trainable_only=True):,} trainable of "
                      f"{parameter_count(model):,} parameters; encoder frozen for the first "
                      f"{cfg.finetune.freeze_updates} updates", markup=False)
    ft = cfg.finetune
    validate = ft.validate_every if cfg.data.valid_splits else 0
    return engine.train(cfg, task, loader, run, info, description="finetune", validate_every=validate,
                        validate_after=ft.validate_after, best_metric=ft.best_metric or None,
                        early_stop_patience=ft.early_stop_patience, stop_at=stop_at)


# `d2vcli.finetune(cfg, ws)` calls the function (the Python API, see d2vcli/__init__.py).
make_callable(__name__, finetune)
