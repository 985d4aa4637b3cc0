"""Sentence classification and regression on a data2vec text encoder: GLUE-style fine-tuning for the engine.

    d2v finetune --preset glue-tiny --task AGREEMENT --init text-tiny              # from the pretraining run
    d2v finetune --preset glue-tiny --task AGREEMENT --init scratch --arch-preset text-tiny   # random init
    d2v finetune --preset glue-base --task RTE --init imported-nlp_base --set optim.lr=2e-5

`d2vcli.finetune.finetune` hands a config with `modality: text` to `finetune()` here. The recipe is
RoBERTa's GLUE fine-tuning, which data2vec text uses (fairseq `examples/roberta/config/finetuning/
<task>.yaml` with `checkpoint.restore_file`, data2vec's `examples/data2vec/README.md`; docs/glue.md):

- Model: `TextClassifier`, the encoder then RoBERTa's head on `<s>` (dropout, dense D->D, tanh,
  dropout, out_proj). A pretraining checkpoint gives the encoder and its regression head is dropped,
  as fairseq's `RobertaModel.upgrade_state_dict_named` deletes `encoder.regression_head.*` and the
  EMA; a text-cls checkpoint (a fine-tuned run, or an HF `...ForSequenceClassification` import)
  gives encoder and head, and must have as many outputs as the task has classes.
- Loss: cross entropy summed over the batch (classification), or squared error of the single
  output against the float label (regression, STS-B), over sample_size = sentences: fairseq's
  `sentence_prediction` criterion, so the engine's division gives the per-sentence mean.
- Optimizer and schedule from the preset: Adam (0.9, 0.98), eps 1e-6, weight decay 0.1, no clipping,
  polynomial decay with 6 % warmup, 10 epochs, dropout 0.1, pooler dropout 0.
- The batch is counted in sentences per update (fairseq's `dataset.batch_size`; `engine.text_sequence_unit`).
  `finetune.task_schedule` (glue-base) takes each GLUE task's batch, warmup, updates and lr from
  `GLUE_SCHEDULES` (the data2vec 1.0 / RoBERTa configs' values; data2vec 2.0's configs differ only in
  the lr, which the docs' sweep covers) unless the user set them: `with_task_schedule` puts the row
  between the preset and the user's --config/--set when the config is resolved.
- Validation on each of data.valid_splits: the task's GLUE metric (`glue_metrics.task_scores`) as
  `<split>/<name>`, the selecting number as `<split>/primary` and `<split>/error` = 100 - primary, which
  the engine minimizes for best.pt (finetune.best_metric `dev/error`).
- Checkpoints ("text-cls") carry the task description, the class names and the tokenizer (the init
  checkpoint's, else the workspace's data/text/spm.model), so `d2v evaluate` and exports need no side file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from d2vcli import checkpoint as ckpt
from d2vcli import config as cfgmod
from d2vcli import distributed, engine, glue_metrics
from d2vcli.config import Config, ConfigError
from d2vcli.data import Batch, DataError
from d2vcli.distributed import DistInfo
from d2vcli.engine import StepOutput, TrainResult
from d2vcli.interop_tokenizer import entry_sha256, sentencepiece_entry
from d2vcli.models.audio import parameter_count
from d2vcli.models.loading import build_text_model, text_arch
from d2vcli.models.text import TextConfig
from d2vcli.run_dir import check_best_split, opened_run, print_run_config
from d2vcli.text_data import TextTaskLoader, Tokenizer, glue_dir, read_task, read_task_records, text_dir
from d2vcli.ui import console

# Fields of the text section that fine-tuning takes from the config, not from the checkpoint.
FINETUNE_TEXT_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "layerdrop", "pooler_dropout")


@dataclass(frozen=True)
class GlueSchedule:
    """One row of the per-task schedule (fairseq `examples/roberta/config/finetuning/<task>.yaml`)."""

    batch: int  # sentences per update
    warmup: int
    max_updates: int  # 10 epochs at that batch
    lr: float  # the RoBERTa / data2vec 1.0 config's
    lr_v2: float  # data2vec 2.0's `text_finetuning/<task>.yaml`


GLUE_SCHEDULES: dict[str, GlueSchedule] = {
    "MNLI": GlueSchedule(32, 7432, 123873, 1e-5, 2e-5),
    "QNLI": GlueSchedule(32, 1986, 33112, 1e-5, 2e-5),
    "QQP": GlueSchedule(32, 28318, 113272, 1e-5, 2e-5),
    "RTE": GlueSchedule(16, 122, 2036, 2e-5, 2e-5),
    "SST-2": GlueSchedule(32, 1256, 20935, 1e-5, 2e-5),
    "MRPC": GlueSchedule(16, 137, 2296, 1e-5, 2e-5),
    "CoLA": GlueSchedule(16, 320, 5336, 1e-5, 2e-5),
    "STS-B": GlueSchedule(16, 214, 3598, 2e-5, 4e-5),
}
EPOCHS = 10  # the recipe's max_epoch; validation (and a checkpoint) once per epoch


class TextTaskError(DataError):
    """A labeled text task that cannot be fine-tuned on as asked; the message says what to do."""


# ----------------------------------------------------------------------------- the task's data and schedule


def task_names(ws) -> list[str]:
    folder = glue_dir(ws)
    return sorted(p.parent.name for p in folder.glob("*/task.json")) if folder.is_dir() else []


def resolve_task(ws, name: str) -> Path:
    """The task folder `finetune.task` names (case-insensitive), or the only one prepared."""
    have = task_names(ws)
    listing = (f"prepared tasks in {glue_dir(ws)}: {', '.join(have)}" if have else
               f"no labeled task in {glue_dir(ws)}: run `d2v prepare glue DIR` or `d2v prepare synthetic-text`")
    if not name:
        if len(have) == 1:
            return glue_dir(ws) / have[0]
        raise TextTaskError(f"name the task to fine-tune on with --task NAME; {listing}")
    match = [t for t in have if t.lower() == name.lower()]
    if not match:
        raise TextTaskError(f"unknown task {name!r}; {listing}")
    return glue_dir(ws) / match[0]


def glue_schedule(name: str) -> Optional[GlueSchedule]:
    key = {k.lower().replace("-", ""): k for k in GLUE_SCHEDULES}.get(name.lower().replace("-", ""))
    return GLUE_SCHEDULES.get(key) if key else None


def schedule_delta(row: GlueSchedule) -> dict:
    """The config delta of one GLUE task's row: batch, warmup, updates, lr, validation once per epoch."""
    per_epoch = math.ceil(row.max_updates / EPOCHS)
    return {"train": {"sequences_per_update": row.batch, "max_updates": row.max_updates, "save_every": per_epoch},
            "data": {"text_sequences_per_batch": row.batch}, "schedule": {"warmup_updates": row.warmup},
            "optim": {"lr": row.lr}, "finetune": {"validate_every": per_epoch}}


def with_task_schedule(cfg: Config, preset: Optional[str], config_file: Optional[Path] = None,
                       overrides: Sequence[str] = (), flags: Optional[dict] = None) -> Config:
    """`cfg` (resolved from `preset`, `config_file`, `overrides`, then the CLI's `flags` delta) with the GLUE
    task's row between the preset and the user's settings, when finetune.task_schedule is on and
    finetune.task names a GLUE task: what the user set (even to the preset's value) wins. `d2v finetune`
    resolves its config through this; a Python caller of `finetune()` does the same."""
    cfg = cfgmod.merge(cfg, flags or {})
    row = glue_schedule(cfg.finetune.task)
    if row is None or not cfg.finetune.task_schedule:
        return cfg
    out = cfgmod.merge(cfgmod.base_config("finetune", preset), schedule_delta(row))
    if config_file:
        out = cfgmod.merge(out, cfgmod.load_yaml(Path(config_file)))
    for item in overrides:
        out = cfgmod.merge(out, cfgmod.parse_set(item))
    out = cfgmod.merge(out, flags or {})
    out.validate("finetune")
    return out


def read_labeled(task_dir: Path, split: str) -> list[dict]:
    """A split's records, every one labeled (training and validation need the labels)."""
    records = read_task_records(task_dir, split)
    if any(r["label"] is None for r in records):
        raise TextTaskError(f"{task_dir / (split + '.jsonl')} has records without a label (a test split?); "
                            f"train and validate on labeled splits, e.g. --set 'data.valid_splits=[dev]'")
    if not records:
        raise TextTaskError(f"{task_dir / (split + '.jsonl')} has no records; re-run `d2v prepare glue`")
    return records


# ----------------------------------------------------------------------------- the start


@dataclass
class Start:
    arch: TextConfig
    weights: Optional[dict]  # the model state to load: encoder.* (pretrain) or the whole classifier (text-cls)
    whole: bool  # weights hold the classifier head too
    tokenizer: Optional[dict]  # the checkpoint's tokenizer entry (interop_tokenizer), None if it has none
    source: str  # what the weights came from, for the screen


def workspace_tokenizer(cfg: Config, ws) -> Optional[dict]:
    path = text_dir(ws, cfg.data.text_dir) / "spm.model"
    return sentencepiece_entry(path) if path.is_file() else None


def tokenizer_entry(cfg: Config, ws, state: dict, arch: TextConfig) -> Optional[dict]:
    """The checkpoint's tokenizer, else (a run that does not carry one) the workspace's when its
    vocabulary is the model's size."""
    entry = state.get(ckpt.TOKENIZER_KEY)
    if entry is None:
        ws_entry = workspace_tokenizer(cfg, ws)
        if ws_entry is not None and Tokenizer(ws_entry["model"], ws_entry["path"]).vocab_size == arch.vocab_size:
            entry = ws_entry
    return entry


def load_start(cfg: Config, ws, num_classes: int, trust: bool = False) -> Start:
    """The architecture and weights `finetune.init` names ('scratch' = random, the config's encoder)."""
    ft = cfg.finetune
    overrides = {k: getattr(cfg.text, k) for k in FINETUNE_TEXT_FIELDS}
    if not ft.init:
        raise ConfigError("no pretrained model to fine-tune: pass --init RUN_OR_CHECKPOINT (a `d2v pretrain "
                          "--preset text-*` run or a `d2v import hf|fairseq` checkpoint), or --init scratch")
    if ft.init == "scratch":
        base = cfg if not ft.arch_preset else cfgmod.resolve("pretrain", preset=ft.arch_preset)
        entry = workspace_tokenizer(cfg, ws)
        if entry is None:
            raise TextTaskError(f"--init scratch takes its vocabulary from the workspace's tokenizer, and "
                                f"{text_dir(ws, cfg.data.text_dir) / 'spm.model'} does not exist: run "
                                f"`d2v prepare text` (or `d2v prepare synthetic-text`) first")
        tok = Tokenizer(entry["model"], entry["path"])
        values = cfgmod.to_dict(base.text) | overrides | {"vocab_size": tok.vocab_size, "mask_id": tok.mask_id}
        return Start(text_arch(values, "the text config section"), None, False, entry, "random init")
    path = ckpt.find_checkpoint(ws, ft.init)
    state = ckpt.load_checkpoint(path, trust=trust)
    kind = state[ckpt.KIND_KEY]
    if kind not in ckpt.TEXT_KINDS:
        raise ConfigError(f"{path} is a {kind} checkpoint, not a text model: pass a `d2v pretrain --preset "
                          f"text-*` run, a text import or a text fine-tuning run with --init")
    arch = text_arch({**state[ckpt.ARCH_KEY], **overrides}, path)
    if kind == "text-cls":
        have = len(state.get(ckpt.CLASSES_KEY) or [])
        if have != num_classes:
            raise TextTaskError(f"{path} is a classifier with {have} output(s) but the task has {num_classes} "
                                f"({'regression' if num_classes == 1 else 'classes'}); fine-tune a pretrained "
                                f"(text-pretrain) checkpoint instead, or pick the task it was trained for")
        return Start(arch, dict(state[ckpt.MODEL_KEY]), True, tokenizer_entry(cfg, ws, state, arch),
                     f"{path} (classifier, head included)")
    entry = tokenizer_entry(cfg, ws, state, arch)
    if ft.init_from == "teacher" and arch.version == 2:
        # data2vec 2.0's teacher is the layers alone (ema_encoder_only): the embeddings are the student's.
        weights = {k: v for k, v in state[ckpt.MODEL_KEY].items() if k.startswith("encoder.embed.")}
        weights |= {f"encoder.layers.{k}": v for k, v in state[ckpt.TEACHER_KEY].items()}
    elif ft.init_from == "teacher":
        weights = {f"encoder.{k}": v for k, v in state[ckpt.TEACHER_KEY].items()}
    else:  # the student's encoder; fairseq's upgrade_state_dict (1.0) / the 2.0 classifier drop the
        # regression head or the decoder
        weights = {k: v for k, v in state[ckpt.MODEL_KEY].items() if k.startswith("encoder.")}
    return Start(arch, weights, False, entry, f"{path} ({ft.init_from})")


def check_tokens(task: dict, task_dir: Path, start: Start, records: Sequence[dict]) -> None:
    """The records' ids must be the model's: the same sentencepiece model, ids inside the vocabulary."""
    entry = start.tokenizer
    sha = task.get("tokenizer_sha256")
    if entry is not None and sha and sha != entry_sha256(entry):
        fix = (f"`d2v prepare glue ... --tokenizer-from {start.source.split(' ')[0]}`" if entry.get("format") == "hf"
               else f"`d2v prepare glue ... --spm` with the model's sentencepiece model ({entry.get('path')})")
        raise TextTaskError(f"{task_dir} was tokenized with another tokenizer (sha256 {sha[:12]}) than the model's "
                            f"({entry.get('format')}, {entry_sha256(entry)[:12]}), so its ids would mean other "
                            f"pieces to the model: re-run {fix}")
    if entry is None:
        raise TextTaskError(f"{start.source} carries no tokenizer and its vocabulary ({start.arch.vocab_size} ids) "
                            f"is not the workspace's tokenizer's, so the ids in {task_dir} would mean other pieces "
                            f"to it (a fairseq import: its ids are fairseq's GPT-2 BPE dict.txt ones); fine-tune a "
                            f"model pretrained on this workspace's tokenizer, or an HF import (it brings its tokenizer: "
                            f"`d2v prepare glue DIR --tokenizer-from RUN`)")
    top = max((max(r["tokens"]) for r in records if r["tokens"]), default=0)
    if top >= start.arch.vocab_size:
        raise TextTaskError(f"{task_dir}: a record holds token id {top}, outside the model's vocabulary of "
                            f"{start.arch.vocab_size}: the task was tokenized with another tokenizer; re-run "
                            f"`d2v prepare glue` with the model's")


# ----------------------------------------------------------------------------- predictions and scores


@torch.no_grad()
def predict(model: nn.Module, records: Sequence[dict], batch_size: int, device: torch.device, regression: bool,
            rank: int = 0, world_size: int = 1) -> np.ndarray:
    """The model's prediction per record (class index, or the regression output), in record order; with
    world_size > 1 each rank predicts records rank, rank + world, ... and the sum over ranks fills the rest."""
    out = torch.zeros(len(records), dtype=torch.float64, device=device)
    mine = list(range(rank, len(records), world_size))
    loader = TextTaskLoader([records[i] for i in mine], batch_size, 0, regression=regression, shuffle=False)
    done = 0
    for batch in loader:
        logits = model(batch.source.to(device), None if batch.padding_mask is None
                       else batch.padding_mask.to(device)).float()  # (B, C)
        values = logits[:, 0] if regression else logits.argmax(-1)
        idx = torch.tensor(mine[done:done + len(values)], device=device)
        out[idx] = values.double()
        done += len(values)
    if world_size > 1:
        out = distributed.all_reduce_sum(out)
    return out.cpu().numpy() if regression else out.cpu().numpy().astype(np.int64)


def score(metric: str, preds: np.ndarray, records: Sequence[dict]) -> dict[str, float]:
    """glue_metrics.task_scores of the labeled records, plus error = 100 - primary (lower is better)."""
    labels = [r["label"] for r in records]
    scores = glue_metrics.task_scores(metric, preds, labels)
    return {**scores, "error": 100.0 - scores["primary"]}


# ----------------------------------------------------------------------------- the task


class TextClassifyTask:
    """Sentence classification / regression for the engine (see engine.TrainTask for the interface)."""

    kind = "text-cls"

    def __init__(self, cfg: Config, start: Start, task: dict, valid: dict[str, list[dict]], info: DistInfo):
        self.cfg, self.arch, self.task, self.valid, self.info = cfg, start.arch, task, valid, info
        self.regression = task["kind"] == "regression"
        self.num_classes = 1 if self.regression else int(task["num_classes"])
        names = list(task.get("label_names") or [])
        self.classes = names if len(names) == self.num_classes else (["score"] if self.regression else
                                                                    [str(i) for i in range(self.num_classes)])
        self.tokenizer = start.tokenizer
        self.model = build_text_model("text-cls", start.arch, self.num_classes).to(info.device)
        if start.weights is not None:
            missing, unexpected = self.model.load_state_dict(start.weights, strict=False)
            # From a pretraining checkpoint the head starts fresh; from a classifier every weight must load.
            bad_missing = missing if start.whole else [k for k in missing if not k.startswith("classifier.")]
            if unexpected or bad_missing:
                raise ckpt.CheckpointError(f"{start.source}: its weights do not fit the architecture stored "
                                           f"with them (missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.find_unused_parameters = start.arch.layerdrop > 0

    def train_step(self, model: nn.Module, batch: Batch, step: int) -> StepOutput:
        logits = model(batch.source, batch.padding_mask).float()  # (B, C)
        if self.regression:
            loss = F.mse_loss(logits[:, 0], batch.target.float(), reduction="sum")
            return StepOutput(loss=loss, sample_size=batch.target.shape[0], metrics={})
        loss = F.cross_entropy(logits, batch.target, reduction="sum")
        accuracy = (logits.argmax(-1) == batch.target).float().mean()
        return StepOutput(loss=loss, sample_size=batch.target.shape[0], metrics={"train_accuracy": 100.0 * accuracy})

    def after_update(self, step: int) -> None:
        return None

    @torch.no_grad()
    def validate(self, model: nn.Module, step: int) -> dict:
        """The task's GLUE scores per valid split (every rank predicts its share; the metric sees all)."""
        result = {}
        for split, records in self.valid.items():
            preds = predict(model, records, self.cfg.data.text_sequences_per_batch, self.info.device,
                            self.regression, self.info.rank, self.info.world_size)
            result.update({f"{split}/{k}": v for k, v in score(self.task["metric"], preds, records).items()})
        return result

    def stop_reason(self, step: int, metrics: dict) -> None:
        return None

    def checkpoint_state(self) -> dict:
        return {ckpt.ARCH_KEY: dataclasses.asdict(self.arch), ckpt.NORMALIZE_KEY: False,
                ckpt.CLASSES_KEY: list(self.classes), ckpt.TEXT_TASK_KEY: dict(self.task),
                ckpt.TOKENIZER_KEY: self.tokenizer}

    def load_checkpoint_state(self, state: dict) -> None:
        if list(state.get(ckpt.CLASSES_KEY) or []) != list(self.classes):
            raise ConfigError(f"the run's checkpoint has other classes than task {self.task.get('name')}; "
                              f"start a new run with --name")


# ----------------------------------------------------------------------------- entry point


def finetune(cfg: Config, workspace, name: Optional[str] = None, resume: bool = False, preset: Optional[str] = None,
             stop_at: Optional[int] = None, resume_if_exists: bool = False, trust: bool = False) -> TrainResult:
    """Run (or resume) text classification in <workdir>/runs/<name>; as `d2vcli.finetune.finetune`."""
    info = distributed.setup(cfg.train.device)
    try:
        task_dir = resolve_task(workspace, cfg.finetune.task)
        task = read_task(task_dir)
        cfg = cfgmod.merge(cfg, {"finetune": {"task": task_dir.name}})
        check_best_split(cfg, "dev")
        train_records = [r for s in cfg.data.train_splits for r in read_labeled(task_dir, s)]
        valid = {s: read_labeled(task_dir, s) for s in cfg.data.valid_splits}
        regression = task["kind"] == "regression"
        start = load_start(cfg, workspace, 1 if regression else int(task["num_classes"]), trust)
        check_tokens(task, task_dir, start, train_records + [r for v in valid.values() for r in v])
        with opened_run(workspace, cfg, info, "finetune", name, preset, resume, resume_if_exists) as run:
            model_task = TextClassifyTask(cfg, start, task, valid, info)
            if info.is_main:
                print_run_config(cfg, "finetune", preset, run)
                a = start.arch
                console.print(f"model: {parameter_count(model_task.model):,} parameters ({a.num_layers} x "
                              f"{a.embed_dim}); task {task_dir.name} ({task['kind']}, {model_task.num_classes} "
                              f"output(s), metric {task['metric']}): {len(train_records):,} training records, "
                              f"validation on {', '.join(valid) or 'nothing'}; weights from {start.source}",
                              markup=False)
            loader = TextTaskLoader(train_records, cfg.data.text_sequences_per_batch, cfg.train.seed,
                                    regression=regression, pad_id=start.arch.pad_id, rank=info.rank,
                                    world_size=info.world_size, max_tokens=start.arch.max_positions)
            ft = cfg.finetune
            return engine.train(cfg, model_task, loader, run, info, description="finetune",
                                validate_every=ft.validate_every if valid else 0, validate_after=ft.validate_after,
                                best_metric=ft.best_metric or None, early_stop_patience=ft.early_stop_patience,
                                stop_at=stop_at, batch=engine.text_sequence_unit(cfg))
    finally:
        distributed.teardown()
