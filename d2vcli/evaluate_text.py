"""`d2v evaluate` on a sentence classifier or regressor: the task's GLUE metric per split, per-record predictions.

    d2v evaluate glue-tiny [--splits dev,test]
    from d2vcli.evaluate_text import evaluate_text; result = evaluate_text(ws, "glue-tiny")

`d2v evaluate` comes here when its checkpoint is a "text-cls" one (`is_text_classifier`). The task
is the one the checkpoint was fine-tuned on (its stored task.json: name, kind, metric), read from
<workdir>/data/glue/<TASK>/; the splits are that folder's labeled ones (default: all but train*).
Records are predicted exactly as fine-tuning's validation does (`finetune_text.predict`, with the
run's micro-batch size), and scored with `glue_metrics.task_scores`, so a split's `primary` here
equals the `<split>/primary` the run logged for the same weights. It writes, atomically, in
<workdir>/decode/<run>/:

    predictions-<split>.jsonl   per record: id, predicted (class index or score), prediction (class name
                                or score), label, label_name, correct (classification), text (the tokens
                                decoded with the model's own tokenizer, when the checkpoint carries one)
    scores-summary.txt          the metric's numbers per split
    scores.json                 the same, with the task description and the checkpoint
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from d2vcli import checkpoint as ckpt
from d2vcli.distributed import resolve_device
from d2vcli.errors import UserError
from d2vcli.fileio import atomic_open, atomic_write_text
from d2vcli.finetune_text import predict, score
from d2vcli.interop_tokenizer import InteropError, entry_sha256, tokenizer_of
from d2vcli.models.loading import load_model
from d2vcli.text_data import glue_dir, read_task_records
from d2vcli.ui import console, table
from d2vcli.workspace import Workspace

DEFAULT_BATCH = 32  # records per forward pass when the checkpoint's config does not say


class TextEvalError(UserError):
    """A text evaluation that cannot run: wrong checkpoint kind, missing task, unknown or unlabeled split."""


@dataclass
class TextEvalResult:
    run: str
    checkpoint: Path
    out_dir: Path
    task: dict
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> task_scores + error
    records: dict[str, int] = field(default_factory=dict)

    def primary(self, split: str) -> float:
        return self.scores[split]["primary"]

    def table(self):
        names = [k for k in next(iter(self.scores.values())) if k != "error"] if self.scores else []
        rows = [[s, self.records[s]] + [f"{sc[k]:.2f}" for k in names] for s, sc in self.scores.items()]
        return table(f"{self.task.get('name')} ({self.task.get('metric')}, %) - {self.run}",
                     ["split", "records"] + names, rows)


# ----------------------------------------------------------------------------- dispatch


def is_text_classifier(ws: Workspace, ref: Optional[str | Path]) -> bool:
    """Whether `d2v evaluate REF` is a text evaluation: REF resolves to a text-cls checkpoint, or, with no
    REF, the newest run with a classifier (ctc, vision-cls or text-cls) is a text one. A text pretraining
    checkpoint is a TextEvalError (nothing to score)."""
    if ref:
        try:
            path = ckpt.find_checkpoint(ws, ref)
        except FileNotFoundError:
            return False  # the speech path reports it, with its own message
        kind = ckpt.peek_kind(path)
        if kind == "text-pretrain":
            raise TextEvalError(f"{path} is a pretrained text model (kind text-pretrain): it has no classifier to "
                                f"evaluate. Fine-tune it first: `d2v finetune --preset glue-tiny --task NAME "
                                f"--init {ref}`")
        return kind == "text-cls"
    return ckpt.newest_classifier_kind(ws) == "text-cls"


def find_text_classifier(ws: Workspace, ref: Optional[str | Path]) -> Path:
    if ref:
        try:
            return ckpt.find_checkpoint(ws, ref)
        except FileNotFoundError as e:
            raise TextEvalError(str(e)) from None
    found = ckpt.newest_checkpoint(ws, "text-cls", "text classification")
    if found is None:
        raise TextEvalError(f"no text classifier in {ws.runs_dir}: fine-tune one with `d2v finetune --preset "
                            f"glue-tiny --task NAME --init RUN`")
    return found


def resolve_splits(task_dir: Path, splits: Optional[Sequence[str]]) -> list[str]:
    """The splits to score: the given ones (each prepared and labeled), else the labeled non-train ones."""
    present = sorted(p.stem for p in task_dir.glob("*.jsonl"))
    listing = f"splits of {task_dir}: {', '.join(present) or 'none'}"
    if splits:
        unknown = [s for s in splits if s not in present]
        if unknown:
            raise TextEvalError(f"unknown split{'s' * (len(unknown) > 1)} {', '.join(unknown)} "
                                f"(no {task_dir / (unknown[0] + '.jsonl')}); {listing}")
        for s in splits:
            if any(r["label"] is None for r in read_task_records(task_dir, s)):
                raise TextEvalError(f"{task_dir / (s + '.jsonl')} has no labels (GLUE's test splits are "
                                    f"unlabeled): nothing to score; name a labeled split, e.g. dev")
        return list(dict.fromkeys(splits))
    default = [s for s in present if not s.startswith("train")
               and all(r["label"] is not None for r in read_task_records(task_dir, s))]
    if not default:
        raise TextEvalError(f"no labeled split besides train to evaluate on; {listing}. Pass --splits NAME.")
    return default


# ----------------------------------------------------------------------------- scoring


def prediction_rows(records: Sequence[dict], preds, task: dict, classes: Sequence[str], decoder) -> list[dict]:
    regression = task["kind"] == "regression"
    rows = []
    for r, p in zip(records, preds):
        if regression:
            row = {"id": r["id"], "predicted": round(float(p), 6), "prediction": round(float(p), 6),
                   "label": r["label"]}
        else:
            p = int(p)
            row = {"id": r["id"], "predicted": p, "prediction": classes[p], "label": r["label"],
                   "label_name": classes[int(r["label"])] if 0 <= int(r["label"]) < len(classes) else None,
                   "correct": p == int(r["label"])}
        if decoder is not None:
            row["text"] = decoder.decode(r["tokens"])
        rows.append(row)
    return rows


def evaluate_text(ws: Workspace, checkpoint: Optional[str | Path] = None, splits: Optional[Sequence[str]] = None,
                  trust: bool = False, device: str = "auto") -> TextEvalResult:
    """Score a text-cls checkpoint on its task's splits and write the artefacts (module docstring).

    `checkpoint`: a file, run directory or run name (default: the newest text classification run).
    """
    path = find_text_classifier(ws, checkpoint)
    kind = ckpt.peek_kind(path)
    if kind != "text-cls":
        hint = (" Fine-tune it first: `d2v finetune --preset glue-tiny --task NAME --init RUN`."
                if kind == "text-pretrain" else "")
        raise TextEvalError(f"{path} is a {kind} checkpoint, not a text classifier (text-cls).{hint}")
    loaded = load_model(path, expect_kind="text-cls", trust=trust)
    task = loaded.state.get(ckpt.TEXT_TASK_KEY)
    if not task or "metric" not in task or "kind" not in task:
        raise TextEvalError(f"{path} does not say which task it was trained for (no task description): "
                            f"evaluate a `d2v finetune --preset glue-*` run")
    task_dir = glue_dir(ws) / str(task.get("name"))
    if not (task_dir / "task.json").is_file():
        raise TextEvalError(f"{path} was fine-tuned on task {task.get('name')!r}, which is not prepared in "
                            f"{glue_dir(ws)}: run `d2v prepare glue DIR --task {task.get('name')}` (or `d2v prepare "
                            f"synthetic-text`) with this --workdir")
    names = resolve_splits(task_dir, splits)
    entry = loaded.state.get(ckpt.TOKENIZER_KEY)
    sha = json.loads((task_dir / "task.json").read_text()).get("tokenizer_sha256")
    if entry and sha and sha != entry_sha256(entry):
        raise TextEvalError(f"{task_dir} was tokenized with another tokenizer (sha256 {sha[:12]}) than the model's "
                            f"({entry_sha256(entry)[:12]}); re-run `d2v prepare glue` with the model's tokenizer "
                            f"(--spm PATH, or --tokenizer-from {ckpt.run_name(ws, path)})")
    try:
        decoder = tokenizer_of(entry, str(path)) if entry else None
    except InteropError:
        decoder = None  # the scores do not need it; the rows then carry no text
    batch = int(((loaded.state.get(ckpt.CONFIG_KEY) or {}).get("data") or {}).get("text_sequences_per_batch")
                or DEFAULT_BATCH)
    dev = resolve_device(device)
    model = loaded.model.to(dev)
    run = ckpt.run_name(ws, path)
    out_dir = ws.decode_dir / run
    out_dir.mkdir(parents=True, exist_ok=True)
    result = TextEvalResult(run, path, out_dir, dict(task))
    regression = task["kind"] == "regression"
    for split in names:
        records = read_task_records(task_dir, split)
        preds = predict(model, records, batch, dev, regression)
        result.scores[split] = score(task["metric"], preds, records)
        result.records[split] = len(records)
        with atomic_open(out_dir / f"predictions-{split}.jsonl") as fh:
            for row in prediction_rows(records, preds, task, loaded.classes or [], decoder):
                fh.write(json.dumps(row) + "\n")
    keys = [k for k in next(iter(result.scores.values())) if k != "error"]
    lines = ["split\trecords\t" + "\t".join(keys)]
    lines += [f"{s}\t{result.records[s]}\t" + "\t".join(f"{sc[k]:.2f}" for k in keys) for s, sc in result.scores.items()]
    atomic_write_text(out_dir / "scores-summary.txt", "\n".join(lines) + "\n")
    atomic_write_text(out_dir / "scores.json", json.dumps(
        {"run": run, "checkpoint": str(path), "task": task, "classes": loaded.classes,
         "splits": {s: {"records": result.records[s], **{k: round(v, 6) for k, v in sc.items()}}
                    for s, sc in result.scores.items()}}, indent=1) + "\n")
    return result


def print_text_result(result: TextEvalResult) -> None:
    console.print(result.table())
    console.print(f"artefacts: {result.out_dir} (predictions-*.jsonl, scores-summary.txt, scores.json)", markup=False)
