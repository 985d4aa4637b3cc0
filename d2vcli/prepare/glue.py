"""`d2v prepare glue DIR`: GLUE task folders (or any sentence[,sentence2],label table) into token records.

    d2v prepare glue /data/glue_data [--task RTE] [--spm PATH] [--tokens-per-sample 512]
    d2v prepare glue --tsv my/train.tsv --tsv my/dev.tsv --task-name MYTASK --kind classification

DIR is the GLUE download's root (CoLA/, SST-2/, MRPC/, STS-B/, QQP/, MNLI/, QNLI/, RTE/) or one task
folder. Each task's files, columns and label sets are in docs/glue-data.md with their sources. A
folder of DIR that is not a GLUE task but holds a `d2v-task.json` ({"kind", "label_names",
"metric"}) and train/dev/test .tsv or .csv files is read like `--tsv` files (what `d2v prepare
synthetic-text` writes). `--tsv` files need a header naming `sentence` (or `sentence1`), optionally
`sentence2`, and `label` (a test file may lack it); the split is the file's name (train, dev, test).

Every sentence is tokenized with the workspace's tokenizer (`data/text/spm.model` from `d2v prepare
text`, or --spm; or, with --tokenizer-from RUN, the tokenizer a text checkpoint carries, e.g. an imported
HF model's byte-level BPE) in RoBERTa's format: `<s> a </s>` or `<s> a </s></s> b </s>`, truncated to
tokens_per_sample by cutting the longer sentence first (truncations are counted). Outputs, per
task under `data/glue/<TASK>/`: `<split>.jsonl` records {"id", "tokens", "label"} (label null on
test splits), `task.json` (name, kind, num_classes, label_names, metric, per-split counts, the
tokenizer's sha256) and `bad-rows-<split>.tsv` listing rows left out (wrong column count, empty
sentence, unknown label). MNLI's dev_matched/test_matched are its `dev`/`test`, the mismatched
ones `dev_mismatched`/`test_mismatched`. A re-run with the same inputs, tokenizer and settings is
"up to date"; every file is written atomically, task.json last.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from d2vcli import checkpoint as ckpt
from d2vcli.fileio import atomic_write_jsonl, atomic_write_text, remove_stale_temps
from d2vcli.interop_tokenizer import InteropError, tokenizer_of
from d2vcli.locks import hold
from d2vcli.prepare.result import PrepareError
from d2vcli.prepare.text import normalize_line
from d2vcli.text_data import BOS, EOS, Tokenizer, TokenizerError, glue_dir, text_dir
from d2vcli.ui import console, progress, table
from d2vcli.workspace import Workspace

STAMP_VERSION = 1
KINDS = ("classification", "regression")
METRICS = ("acc", "acc_and_f1", "mcc", "pearson_spearman")
SPLIT_FILES = ("train", "dev", "test")
csv.field_size_limit(1 << 24)


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task's files and columns (docs/glue-data.md)."""

    name: str
    kind: str
    label_names: tuple[str, ...]
    metric: str
    sentence1: str
    sentence2: Optional[str]
    label: Optional[str]
    files: tuple[tuple[str, str], ...]  # (our split, file name)
    headerless: tuple[str, ...] = ()  # column names of train/dev files written without a header (CoLA)
    id_column: Optional[str] = None

    @property
    def num_classes(self) -> int:
        return 1 if self.kind == "regression" else len(self.label_names)


_STD = (("train", "train.tsv"), ("dev", "dev.tsv"), ("test", "test.tsv"))
GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("CoLA", "classification", ("unacceptable", "acceptable"), "mcc", "sentence", None, "label", _STD,
             headerless=("source", "label", "author_label", "sentence"), id_column="index"),
    GlueTask("SST-2", "classification", ("negative", "positive"), "acc", "sentence", None, "label", _STD,
             id_column="index"),
    GlueTask("MRPC", "classification", ("not_equivalent", "equivalent"), "acc_and_f1", "#1 String", "#2 String",
             "Quality", _STD, id_column="index"),
    GlueTask("STS-B", "regression", (), "pearson_spearman", "sentence1", "sentence2", "score", _STD,
             id_column="index"),
    GlueTask("QQP", "classification", ("not_duplicate", "duplicate"), "acc_and_f1", "question1", "question2",
             "is_duplicate", _STD, id_column="id"),
    GlueTask("MNLI", "classification", ("entailment", "neutral", "contradiction"), "acc", "sentence1", "sentence2",
             "gold_label", (("train", "train.tsv"), ("dev", "dev_matched.tsv"),
                            ("dev_mismatched", "dev_mismatched.tsv"), ("test", "test_matched.tsv"),
                            ("test_mismatched", "test_mismatched.tsv")),
             id_column="index"),
    GlueTask("QNLI", "classification", ("entailment", "not_entailment"), "acc", "question", "sentence", "label", _STD,
             id_column="index"),
    GlueTask("RTE", "classification", ("entailment", "not_entailment"), "acc", "sentence1", "sentence2", "label",
             _STD, id_column="index"),
]}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


GLUE_BY_KEY = {_key(n): t for n, t in GLUE_TASKS.items()}


# --------------------------------------------------------------------------- results


@dataclass
class GlueSplitSummary:
    task: str
    split: str
    status: str
    records: int
    bad_rows: int
    truncated: int
    labels: dict[str, int] = field(default_factory=dict)
    output: str = ""


@dataclass
class GluePrepareSummary:
    command: str
    splits: list[GlueSplitSummary]
    notes: list[str] = field(default_factory=list)
    dictionary: Optional[str] = None

    def split(self, task: str, split: str) -> GlueSplitSummary:
        return next(s for s in self.splits if s.task == task and s.split == split)

    def table(self):
        rows = [[s.task, s.split, s.status, s.records, s.bad_rows, s.truncated,
                 ", ".join(f"{k} {v}" for k, v in s.labels.items()) or "-"] for s in self.splits]
        folders = sorted({str(Path(s.output).parent) for s in self.splits})
        return table(f"d2v prepare {self.command}  ({', '.join(folders)})",
                     ["task", "split", "status", "records", "bad rows", "truncated", "labels"], rows)


# --------------------------------------------------------------------------- reading tables


def read_table(path: Path, headerless: Sequence[str] = ()) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(column names, [(line number, fields)]): a TSV read as GLUE's loader does (no quoting), a .csv
    with standard quoting. `headerless` names the columns of a file that has no header row."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 (byte {e.start}); convert it to UTF-8") from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(text.splitlines()))
    else:
        rows = list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    numbered = [(i, r) for i, r in enumerate(rows, 1) if any(c.strip() for c in r)]
    if not numbered:
        raise PrepareError(f"{path} is empty; a task file needs a header row and at least one row")
    if headerless:
        return list(headerless), numbered
    return [c.strip() for c in numbered[0][1]], numbered[1:]


def _column(header: list[str], name: Optional[str], path: Path, required: bool) -> Optional[int]:
    if name is None:
        return None
    for cand in ([name, "sentence1"] if name == "sentence" else [name]):
        if cand in header:
            return header.index(cand)
    if required:
        raise PrepareError(f"{path}: no column '{name}' in its header ({', '.join(header) or 'empty'}); this is "
                           f"not the file layout expected (docs/glue-data.md)")
    return None


def _encode(tok: Tokenizer, text: str, lowercase: bool) -> list[int]:
    return tok.encode(normalize_line(text, lowercase)[0])


def pair_tokens(a: list[int], b: Optional[list[int]], tokens_per_sample: int) -> tuple[list[int], bool]:
    """RoBERTa's `<s> a </s>` / `<s> a </s></s> b </s>`, cut to tokens_per_sample by shortening the
    longer sentence first; returns the ids and whether anything was cut."""
    budget = tokens_per_sample - (2 if b is None else 4)
    la, lb = len(a), len(b) if b is not None else 0
    cut = la + lb > budget
    while la + lb > budget:
        if la >= lb:
            la -= 1
        else:
            lb -= 1
    if b is None:
        return [BOS] + a[:la] + [EOS], cut
    return [BOS] + a[:la] + [EOS, EOS] + b[:lb] + [EOS], cut


@dataclass
class _TaskSource:
    name: str
    kind: str
    label_names: Optional[list[str]]  # None: taken from the train file (generic classification)
    metric: str
    files: list[tuple[str, Path]]
    spec: Optional[GlueTask] = None


def _label_value(raw: str, kind: str, names: list[str]) -> tuple[Optional[float | int], str]:
    raw = raw.strip()
    if kind == "regression":
        try:
            v = float(raw)
        except ValueError:
            return None, f"label {raw!r} is not a number"
        return (v, "") if v == v else (None, "label is NaN")
    if raw in names:
        return names.index(raw), ""
    if raw.isdigit() and int(raw) < len(names):
        return int(raw), ""
    return None, f"label {raw!r} is not one of {', '.join(names)}"


def _infer_labels(path: Path, src: _TaskSource) -> list[str]:
    header, rows = read_table(path)
    col = _column(header, "label", path, required=True)
    seen = sorted({r[col].strip() for _, r in rows if len(r) == len(header) and r[col].strip()})
    if seen and all(s.isdigit() for s in seen):
        return [str(i) for i in range(max(int(s) for s in seen) + 1)]
    return seen


def _read_split(tok: Tokenizer, src: _TaskSource, split: str, path: Path, names: list[str],
                tokens_per_sample: int, lowercase: bool) -> tuple[list[dict], list[tuple[int, str]], int]:
    spec = src.spec
    headerless = spec.headerless if spec is not None and spec.headerless and split in ("train", "dev") else ()
    header, rows = read_table(path, headerless)
    s1_name = spec.sentence1 if spec else "sentence"
    s2_name = spec.sentence2 if spec else ("sentence2" if "sentence2" in header else None)
    label_name = spec.label if spec else "label"
    c1 = _column(header, s1_name, path, True)
    c2 = _column(header, s2_name, path, True)
    cl = _column(header, label_name, path, required=not split.startswith("test"))
    cid = _column(header, spec.id_column if spec else "id", path, False)
    records, bad, truncated = [], [], 0
    for line, r in rows:
        if len(r) != len(header):
            bad.append((line, f"{len(r)} fields, the header has {len(header)}"))
            continue
        a = r[c1].strip()
        b = r[c2].strip() if c2 is not None else None
        if not a or (c2 is not None and not b):
            bad.append((line, "empty sentence"))
            continue
        label = None
        if cl is not None:
            label, why = _label_value(r[cl], src.kind, names)
            if why:
                bad.append((line, why))
                continue
        ids, cut = pair_tokens(_encode(tok, a, lowercase), _encode(tok, b, lowercase) if b is not None else None,
                               tokens_per_sample)
        truncated += cut
        rid = r[cid].strip() if cid is not None else str(len(records) + len(bad))
        records.append({"id": f"{split}-{rid}", "tokens": ids, "label": label})
    return records, bad, truncated


def _fingerprint(src: _TaskSource, tok_sha: str, tokens_per_sample: int, lowercase: bool) -> str:
    h = hashlib.sha256(json.dumps({"v": STAMP_VERSION, "name": src.name, "kind": src.kind, "labels": src.label_names,
                                   "metric": src.metric, "tok": tok_sha, "tps": tokens_per_sample,
                                   "lower": lowercase}).encode())
    for split, p in src.files:
        st = p.stat()
        h.update(f"{split}\0{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def prepare_task(ws: Workspace, tok: Tokenizer, src: _TaskSource, tokens_per_sample: int,
                 lowercase: bool = False) -> list[GlueSplitSummary]:
    """Write one task's records and task.json (see the module docstring)."""
    out = glue_dir(ws) / src.name
    out.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(src, tok.sha256(), tokens_per_sample, lowercase)
    with hold(out / ".prepare.lock", f"prepare of text task '{src.name}'"):
        remove_stale_temps(out)
        try:
            saved = json.loads((out / "task.json").read_text())
            if saved.get("fingerprint") == fp and all((out / f"{s}.jsonl").exists() for s in saved["splits"]):
                return [GlueSplitSummary(src.name, s, "up to date", v["records"], v["bad_rows"], v["truncated"],
                                         v["labels"], str(out / f"{s}.jsonl")) for s, v in saved["splits"].items()]
        except (OSError, ValueError, KeyError, TypeError):
            pass
        names = src.label_names
        if names is None:
            train = dict(src.files).get("train") or src.files[0][1]
            names = _infer_labels(train, src) if src.kind == "classification" else []
        results: dict[str, tuple[list[dict], list, int, Path]] = {}
        with progress() as bar:
            task = bar.add_task(f"tokenize {src.name}", total=len(src.files))
            for split, path in src.files:
                records, bad, truncated = _read_split(tok, src, split, path, names, tokens_per_sample, lowercase)
                if not records:
                    shown = "; ".join(f"line {n}: {why}" for n, why in bad[:5])
                    raise PrepareError(f"{path}: no usable row ({len(bad)} bad: {shown}); nothing was written for "
                                       f"task {src.name}. Fix the file (docs/glue-data.md gives the layout).")
                results[split] = (records, bad, truncated, path)
                bar.advance(task)
        summaries, splits_meta = [], {}
        for split, (records, bad, truncated, path) in results.items():
            atomic_write_jsonl(out / f"{split}.jsonl", records)
            bad_file = out / f"bad-rows-{split}.tsv"
            if bad:
                atomic_write_text(bad_file, "file\tline\treason\n" + "".join(f"{path}\t{n}\t{why}\n" for n, why in bad))
            elif bad_file.exists():
                bad_file.unlink()
            labels: dict[str, int] = {}
            if src.kind == "classification":
                counts = Counter(r["label"] for r in records if r["label"] is not None)
                labels = {names[k]: counts[k] for k in sorted(counts)}
            splits_meta[split] = {"source": str(path), "records": len(records), "bad_rows": len(bad),
                                  "truncated": truncated, "labels": labels}
            summaries.append(GlueSplitSummary(src.name, split, "written", len(records), len(bad), truncated, labels,
                                              str(out / f"{split}.jsonl")))
        meta = {"name": src.name, "kind": src.kind, "num_classes": 1 if src.kind == "regression" else len(names),
                "label_names": list(names), "metric": src.metric, "splits": splits_meta,
                "tokens_per_sample": tokens_per_sample, "lowercase": lowercase, "tokenizer_sha256": tok.sha256(),
                "fingerprint": fp}
        atomic_write_text(out / "task.json", json.dumps(meta, indent=1))
    return summaries


# --------------------------------------------------------------------------- finding tasks


def _glue_source(folder: Path, spec: GlueTask) -> _TaskSource:
    files = [(split, folder / name) for split, name in spec.files if (folder / name).is_file()]
    if not files:
        raise PrepareError(f"{folder}: none of {spec.name}'s files ({', '.join(n for _, n in spec.files)}) are "
                           f"there; is this the GLUE download's {spec.name} folder?")
    return _TaskSource(spec.name, spec.kind, list(spec.label_names), spec.metric, files, spec)


def _split_files(folder: Path) -> list[tuple[str, Path]]:
    found = []
    for split in SPLIT_FILES:
        for ext in (".tsv", ".csv"):
            if (folder / f"{split}{ext}").is_file():
                found.append((split, folder / f"{split}{ext}"))
                break
    return found


def _generic_source(name: str, kind: str, files: list[tuple[str, Path]], label_names: Optional[list[str]] = None,
                    metric: Optional[str] = None) -> _TaskSource:
    if kind not in KINDS:
        raise PrepareError(f"--kind {kind!r}: pass classification or regression")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise PrepareError(f"task name {name!r} must be letters, digits, '.', '_' or '-'; pass --task-name NAME")
    metric = metric or ("pearson_spearman" if kind == "regression" else "acc")
    if metric not in METRICS:
        raise PrepareError(f"metric {metric!r}: one of {', '.join(METRICS)}")
    return _TaskSource(name, kind, label_names, metric, files)


def _custom_folder(folder: Path) -> Optional[_TaskSource]:
    cfg_path = folder / "d2v-task.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise PrepareError(f"{cfg_path}: not valid JSON ({e})") from None
    files = _split_files(folder)
    if not files:
        raise PrepareError(f"{folder} has {cfg_path.name} but no train/dev/test .tsv or .csv file")
    return _generic_source(folder.name, cfg.get("kind", "classification"), files, cfg.get("label_names"),
                           cfg.get("metric"))


def find_tasks(root: Path, task: Optional[str]) -> list[_TaskSource]:
    """The GLUE (and d2v-task.json) folders under root, or root itself when it is one."""
    if not root.is_dir():
        raise PrepareError(f"{root} is not a directory: pass the GLUE data folder (holding CoLA/, RTE/, ...)")
    spec = GLUE_BY_KEY.get(_key(root.name))
    if spec is not None:
        sources = [_glue_source(root, spec)]
    elif _custom_folder(root) is not None:
        sources = [_custom_folder(root)]
    else:
        sources = []
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            spec = GLUE_BY_KEY.get(_key(sub.name))
            if spec is not None:
                sources.append(_glue_source(sub, spec))
            else:
                custom = _custom_folder(sub)
                if custom is not None:
                    sources.append(custom)
    if task is not None:
        wanted = [s for s in sources if _key(s.name) == _key(task)]
        if not wanted:
            known = ", ".join(s.name for s in sources) or "none"
            raise PrepareError(f"no task {task!r} in {root} (found: {known}; GLUE names: {', '.join(GLUE_TASKS)})")
        sources = wanted
    if not sources:
        raise PrepareError(f"no task folders in {root}: expected GLUE folders ({', '.join(GLUE_TASKS)}) or folders "
                           f"with a d2v-task.json; for a single table use --tsv FILE --task-name NAME")
    return sources


def checkpoint_tokenizer(ws: Workspace, ref: str):
    """The tokenizer a text checkpoint carries (`--tokenizer-from RUN`: e.g. an imported HF model's
    byte-level BPE), so the records' ids are that model's."""
    try:
        path = ckpt.find_checkpoint(ws, ref)
    except FileNotFoundError as e:
        raise PrepareError(f"--tokenizer-from: {e}") from None
    try:
        entry = ckpt.load_checkpoint(path).get(ckpt.TOKENIZER_KEY)
        if not entry:
            raise PrepareError(f"--tokenizer-from {ref}: {path} carries no tokenizer (a fairseq import has none); "
                               f"pass --spm PATH, or import the HF release, which brings its tokenizer files")
        tok = tokenizer_of(entry, str(path))
    except (InteropError, ckpt.CheckpointError) as e:
        raise PrepareError(f"--tokenizer-from {ref}: {e}") from None
    if (tok.bos_id, tok.eos_id) != (BOS, EOS):
        raise PrepareError(f"--tokenizer-from {ref}: its <s>/</s> ids are {tok.bos_id}/{tok.eos_id}, not RoBERTa's "
                           f"{BOS}/{EOS}, which the records use")
    return tok


def load_workspace_tokenizer(ws: Workspace, spm_path: Optional[Path | str]) -> Tokenizer:
    path = Path(spm_path) if spm_path else text_dir(ws) / "spm.model"
    if not path.is_file():
        raise PrepareError(f"no tokenizer at {path}: run `d2v prepare text FILES...` first (it trains "
                           f"data/text/spm.model), or pass --spm PATH")
    try:
        return Tokenizer.load(path)
    except TokenizerError as e:
        raise PrepareError(str(e)) from None


def _text_meta(ws: Workspace) -> dict:
    try:
        return json.loads((text_dir(ws) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}


def prepare_glue(ws: Workspace, root: Optional[Path | str] = None, task: Optional[str] = None,
                 tsv: Sequence[Path | str] = (), task_name: Optional[str] = None, kind: str = "classification",
                 spm_path: Optional[Path | str] = None, tokens_per_sample: Optional[int] = None,
                 tokenizer_from: Optional[str] = None) -> GluePrepareSummary:
    """Records and task.json for GLUE tasks under root, or for --tsv files (see the module docstring)."""
    if (root is None) == (not tsv):
        raise PrepareError("pass either the GLUE folder (DIR) or --tsv FILE ... --task-name NAME, not both")
    if tsv:
        files = []
        for f in tsv:
            p = Path(f).expanduser().resolve()
            if not p.is_file():
                raise PrepareError(f"--tsv {p}: no such file")
            split = p.stem
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", split):
                raise PrepareError(f"--tsv {p}: its name gives the split ({split!r}); rename it train.tsv, dev.tsv ...")
            files.append((split, p))
        if len({s for s, _ in files}) != len(files):
            raise PrepareError("two --tsv files have the same name (the split); give each split its own file name")
        if task_name is None:
            raise PrepareError("--tsv needs --task-name NAME (the folder under data/glue/)")
        sources = [_generic_source(task_name, kind, files)]
    else:
        sources = find_tasks(Path(root).expanduser().resolve(), task)
    meta = _text_meta(ws)
    tokens_per_sample = tokens_per_sample or int(meta.get("tokens_per_sample", 512))
    if tokens_per_sample < 6:
        raise PrepareError(f"--tokens-per-sample {tokens_per_sample}: a pair needs at least 6 (4 special tokens)")
    if tokenizer_from and spm_path:
        raise PrepareError("pass --spm PATH or --tokenizer-from RUN, not both")
    tok = checkpoint_tokenizer(ws, tokenizer_from) if tokenizer_from else load_workspace_tokenizer(ws, spm_path)
    # The text corpus's lower-casing applies when this is its tokenizer (the model saw only lower case).
    lowercase = bool(meta.get("tokenizer_sha256") == tok.sha256() and meta.get("normalization", {}).get("lowercase"))
    summaries: list[GlueSplitSummary] = []
    for src in sources:
        summaries += prepare_task(ws, tok, src, tokens_per_sample, lowercase)
    notes = [f"tokenizer: {tok.source} (sha256 {tok.sha256()[:12]}), tokens_per_sample {tokens_per_sample}"
             + (", lower-cased as the text corpus" if lowercase else "")]
    bad = sum(s.bad_rows for s in summaries)
    if bad:
        notes.append(f"{bad} bad row(s) left out, listed in data/glue/<task>/bad-rows-<split>.tsv")
        console.print(f"[yellow]{bad} bad row(s) left out (see the bad-rows files)[/]")
    return GluePrepareSummary("glue", summaries, notes)
