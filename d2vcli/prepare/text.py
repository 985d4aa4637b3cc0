"""`d2v prepare text FILES...`: raw text into a tokenizer and binarized token blocks under data/text/.

    d2v prepare text corpus/*.txt [--vocab-size 32000] [--model-type bpe|unigram] [--spm PATH] [--lowercase]
                     [--valid-fraction 0.01] [--tokens-per-sample 512] [--break-mode complete_doc]

Input: UTF-8 text files, one sentence (or paragraph) per line, documents separated by empty
lines (the layout fairseq's RoBERTa preprocessing expects). Each line is

1. decoded as UTF-8; undecodable bytes become U+FFFD and are counted;
2. normalized: Unicode NFC, control characters removed (tabs become spaces), runs of spaces
   collapsed, optionally lower-cased;
3. tokenized and ended with `</s>` (fairseq binarizes every line with its eos).

Documents (runs of non-empty lines) go to train or valid by a hash of their text, so the split is
the same on every run and does not move when other documents change. The tokenizer is trained on
the train documents (sentencepiece, one thread, so the same input gives the same model bytes) or
taken from --spm. Blocks (`--break-mode`, fairseq's `sample_break_mode`):

- complete_doc (the data2vec text recipe): whole lines, up to tokens_per_sample - 1 tokens, never
  across a document boundary;
- complete: whole lines, up to tokens_per_sample - 1 tokens, across documents;
- none (the data2vec 2.0 text recipe): the token stream cut every tokens_per_sample - 1 tokens.

A line longer than a block is counted as over-long and cut into block-sized pieces (fairseq would
make one over-long block, which a model with 512 positions cannot take). The loader prepends `<s>`.

Outputs (`data/text/`): spm.model (+ spm.vocab), train.bin / valid.bin (token ids back to back),
train.idx.npy / valid.idx.npy (block offsets), meta.json (counts, problems, settings, the
tokenizer's sha256, the inputs' fingerprint). A re-run with the same inputs and settings is
"up to date" and reads nothing; one process at a time holds the folder's lock; every file is
written to a temp file and renamed, and meta.json (what makes the folder usable) is removed first
and written last, so a failure leaves the earlier corpus whole and a crash leaves no usable half.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
from rich.console import Group

from d2vcli.fileio import OutputExistsError, atomic_open, atomic_write_bytes, atomic_write_text, remove_stale_temps
from d2vcli.locks import hold
from d2vcli.prepare.pipeline import map_in_batches
from d2vcli.prepare.result import PrepareError
from d2vcli.text_data import EOS, META_VERSION, Tokenizer, TokenizerError, sha256_file, text_dir, token_dtype
from d2vcli.ui import console, progress, table
from d2vcli.workspace import Workspace

BreakMode = Literal["complete_doc", "complete", "none"]
BREAK_MODES = ("complete_doc", "complete", "none")
MODEL_TYPES = ("bpe", "unigram")
SPLITS = ("train", "valid")
BINARY_SNIFF_BYTES = 8192
ENCODE_BATCH = 2048
ENCODE_POOL_MIN = 50_000  # lines; below this one thread encodes faster than a pool starts
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u3000]+")


# --------------------------------------------------------------------------- results


@dataclass
class TextSplitSummary:
    split: str
    documents: int
    lines: int
    blocks: int
    tokens: int
    unk_tokens: int = 0


@dataclass
class TextPrepareSummary:
    command: str
    status: Literal["written", "up to date"]
    splits: list[TextSplitSummary]
    problems: dict[str, int]
    tokenizer: str
    vocab_size: int
    outputs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dictionary: Optional[str] = None  # the speech summaries' field; text has the tokenizer instead
    glue: Any = None  # prepare synthetic-text: the GluePrepareSummary of its labeled tasks, printed below

    def split(self, name: str) -> TextSplitSummary:
        return next(s for s in self.splits if s.split == name)

    def table(self):
        rows = [[s.split, self.status, s.documents, s.lines, s.blocks, s.tokens, s.unk_tokens] for s in self.splits]
        problems = ", ".join(f"{k} {n}" for k, n in sorted(self.problems.items()))
        text = table(f"d2v prepare {self.command}  (all splits: {problems})",
                     ["split", "status", "documents", "lines", "blocks", "tokens", "<unk>"], rows)
        return text if self.glue is None else Group(text, self.glue.table())


# --------------------------------------------------------------------------- reading and normalizing


def read_text_file(path: Path) -> tuple[str, int]:
    """The file's text and how many undecodable byte sequences became U+FFFD; clear errors for files
    that are missing, empty or binary."""
    if not path.exists():
        raise PrepareError(f"text file not found: {path}; check the path")
    if path.is_dir():
        raise PrepareError(f"{path} is a directory; pass the text files in it (e.g. {path}/*.txt)")
    raw = path.read_bytes()
    if not raw.strip():
        raise PrepareError(f"{path} is empty; remove it from the command line or fill it")
    if b"\x00" in raw[:BINARY_SNIFF_BYTES]:
        raise PrepareError(f"{path} looks binary (NUL bytes in its first {BINARY_SNIFF_BYTES} bytes), not text; "
                           f"pass plain UTF-8 text files (decompress archives first)")
    text = raw.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - raw.count("\ufffd".encode())
    return text, bad


def normalize_line(line: str, lowercase: bool) -> tuple[str, int]:
    """NFC, control characters removed, whitespace runs made one space, stripped (and lower-cased);
    returns the line and how many control characters were removed."""
    line = unicodedata.normalize("NFC", line)
    line, removed = _CONTROL.subn("", line.replace("\t", " "))
    line = _SPACES.sub(" ", line).strip()
    return (line.lower() if lowercase else line), removed


def split_documents(text: str, lowercase: bool, problems: Counter) -> list[list[str]]:
    """Documents (lists of normalized non-empty lines); empty lines separate them and are counted."""
    docs: list[list[str]] = []
    current: list[str] = []
    for raw in text.splitlines():
        line, removed = normalize_line(raw, lowercase)
        problems["control chars removed"] += removed
        if not line:
            problems["empty lines"] += 1
            if current:
                docs.append(current)
                current = []
            continue
        current.append(line)
    if current:
        docs.append(current)
    return docs


def document_split(doc: list[str], valid_fraction: float) -> tuple[str, float]:
    """('train' or 'valid', the document's hash in [0, 1)): the split depends on the text only."""
    h = int.from_bytes(hashlib.sha1("\n".join(doc).encode()).digest()[:8], "big") / 2**64
    return ("valid" if h < valid_fraction else "train"), h


def assign_splits(docs: list[list[str]], valid_fraction: float) -> dict[str, list[list[str]]]:
    """Train/valid by document hash; with valid_fraction > 0 and two documents or more, valid gets at
    least the one with the lowest hash (a tiny corpus still has a validation set)."""
    out: dict[str, list[list[str]]] = {"train": [], "valid": []}
    hashes = []
    for d in docs:
        split, h = document_split(d, valid_fraction)
        out[split].append(d)
        hashes.append(h)
    if valid_fraction > 0 and not out["valid"] and len(docs) >= 2:
        k = int(np.argmin(hashes))
        out["valid"].append(docs[k])
        out["train"] = [d for i, d in enumerate(docs) if i != k]
    return out


# --------------------------------------------------------------------------- tokens and blocks


_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}


def _encode_lines(model_path: str, lines: list[str]) -> list[list[int]]:
    tok = _WORKER_TOKENIZERS.get(model_path)
    if tok is None:
        tok = _WORKER_TOKENIZERS[model_path] = Tokenizer.load(model_path)
    return tok.encode_batch(lines)


def encode_lines(model_path: Path, lines: Sequence[str], workers: int = 0, on_progress=None) -> list[list[int]]:
    """Every line's ids, in order; from ENCODE_POOL_MIN lines on in a process pool (map_in_batches)."""
    return map_in_batches(partial(_encode_lines, str(model_path)), lines, workers, "process", on_progress,
                          ENCODE_BATCH, min_pool=ENCODE_POOL_MIN)


def make_blocks(docs_ids: list[list[list[int]]], block: int, mode: BreakMode, problems: Counter) -> list[np.ndarray]:
    """Blocks of at most `block` tokens from documents of lines of ids (each line ending in </s>)."""
    blocks: list[np.ndarray] = []
    if mode == "none":
        stream = [t for doc in docs_ids for line in doc for t in line]
        return [np.asarray(stream[i:i + block], dtype=np.int64) for i in range(0, len(stream), block)]
    current: list[int] = []
    for doc in docs_ids:
        for line in doc:
            if len(line) > block:
                problems["over-long lines"] += 1
                if current:
                    blocks.append(np.asarray(current, dtype=np.int64))
                    current = []
                blocks.extend(np.asarray(line[i:i + block], dtype=np.int64) for i in range(0, len(line), block))
                continue
            if current and len(current) + len(line) > block:
                blocks.append(np.asarray(current, dtype=np.int64))
                current = []
            current.extend(line)
        if mode == "complete_doc" and current:
            blocks.append(np.asarray(current, dtype=np.int64))
            current = []
    if current:
        blocks.append(np.asarray(current, dtype=np.int64))
    return blocks


# --------------------------------------------------------------------------- the command


def _fingerprint(files: list[Path], opts: dict) -> str:
    h = hashlib.sha256(json.dumps({"version": META_VERSION, **opts}, sort_keys=True).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _up_to_date(out: Path, fingerprint: str) -> Optional[dict]:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("fingerprint") != fingerprint or not all((out / f).exists() for f in meta.get("files", ["-"])):
        return None
    if sha256_file(out / "spm.model") != meta.get("tokenizer_sha256"):
        return None
    return meta


def _summary_from_meta(meta: dict, status: str, out: Path) -> TextPrepareSummary:
    splits = [TextSplitSummary(**meta["splits"][s]) for s in SPLITS if s in meta["splits"]]
    return TextPrepareSummary("text", status, splits, meta["problems"], meta["tokenizer"], meta["vocab_size"],
                              outputs=[str(out / n) for n in sorted(meta["files"])])


def _write_split(out: Path, split: str, blocks: list[np.ndarray], dtype: np.dtype) -> None:
    offsets = np.zeros(len(blocks) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blocks])
    with atomic_open(out / f"{split}.bin", "wb", encoding=None) as fh:
        for b in blocks:
            fh.write(b.astype(dtype).tobytes())
    with atomic_open(out / f"{split}.idx.npy", "wb", encoding=None) as fh:
        np.save(fh, offsets)


def prepare_text(ws: Workspace, files: Sequence[Path | str], vocab_size: int = 32000, model_type: str = "bpe",
                 spm_path: Optional[Path | str] = None, lowercase: bool = False, valid_fraction: float = 0.01,
                 tokens_per_sample: int = 512, break_mode: str = "complete_doc", workers: int = 0,
                 out_dir: Optional[Path | str] = None, command: str = "text",
                 force: bool = False) -> TextPrepareSummary:
    """Tokenizer and token shards for `files` under data/text/ (see the module docstring)."""
    if not files:
        raise PrepareError("no text files given: pass one or more UTF-8 text files")
    if model_type not in MODEL_TYPES:
        raise PrepareError(f"--model-type {model_type!r}: pass one of {', '.join(MODEL_TYPES)}")
    if break_mode not in BREAK_MODES:
        raise PrepareError(f"--break-mode {break_mode!r}: pass one of {', '.join(BREAK_MODES)}")
    if not 0 <= valid_fraction < 1:
        raise PrepareError(f"--valid-fraction {valid_fraction} must be in [0, 1)")
    if tokens_per_sample < 2:
        raise PrepareError(f"--tokens-per-sample {tokens_per_sample} must be at least 2 (<s> and one token)")
    if spm_path is None and vocab_size < 8:
        raise PrepareError(f"--vocab-size {vocab_size} is too small (the 5 special tokens need room); pass 8 or more")
    paths = [Path(p).expanduser().resolve() for p in files]
    for p in paths:
        if not p.is_file():
            raise PrepareError(f"text file not found: {p}; check the path" if not p.exists() else
                               f"{p} is a directory; pass the text files in it (e.g. {p}/*.txt)")
    spm_src = Path(spm_path).expanduser().resolve() if spm_path else None
    if spm_src is not None and not spm_src.is_file():
        raise PrepareError(f"--spm {spm_src}: no such file; pass an existing sentencepiece .model")
    out = Path(out_dir) if out_dir else text_dir(ws)
    opts = {"vocab_size": None if spm_src else vocab_size, "model_type": None if spm_src else model_type,
            "spm": (str(spm_src), sha256_file(spm_src)) if spm_src else None, "lowercase": lowercase,
            "valid_fraction": valid_fraction, "tokens_per_sample": tokens_per_sample, "break_mode": break_mode}
    fingerprint = _fingerprint(paths, opts)
    out.mkdir(parents=True, exist_ok=True)
    with hold(out / ".prepare.lock", "prepare of the text corpus"):
        removed = remove_stale_temps(out)
        if removed:
            console.print(f"removed {len(removed)} temp file(s) left by an interrupted earlier run")
        meta = _up_to_date(out, fingerprint)
        if meta is not None:
            summary = _summary_from_meta(meta, "up to date", out)
            summary.command = command
            summary.notes.append(f"{out}: inputs and settings unchanged since the last run; nothing read again "
                                 f"(change a file or a setting to rebuild)")
            return summary
        return _build(out, paths, opts, fingerprint, spm_src, workers, command, force)


def _refuse_other_tokenizer(out: Path, tok: Tokenizer, force: bool) -> None:
    """A corpus made with another tokenizer is only replaced with force: models pretrained on it and
    task records tokenized with it read ids that would mean other pieces."""
    model = out / "spm.model"
    if force or not model.exists() or sha256_file(model) == tok.sha256():
        return
    raise OutputExistsError(
        f"{model} holds another tokenizer than this run would make (other inputs or settings); models "
        f"pretrained on {out} and data/glue records tokenized with it would no longer match its ids. Pass "
        f"--force to replace it (then re-run `d2v prepare glue`), or prepare into another --workdir. Nothing "
        f"was changed.")


def _build(out: Path, paths: list[Path], opts: dict, fingerprint: str, spm_src: Optional[Path], workers: int,
           command: str, force: bool = False) -> TextPrepareSummary:
    problems: Counter = Counter({"undecodable bytes": 0, "empty lines": 0, "over-long lines": 0,
                                 "control chars removed": 0})
    per_file = {}
    docs: list[list[str]] = []
    with progress() as bar:
        task = bar.add_task("read", total=len(paths))
        for p in paths:
            text, bad = read_text_file(p)
            problems["undecodable bytes"] += bad
            file_docs = split_documents(text, opts["lowercase"], problems)
            per_file[str(p)] = {"undecodable_bytes": bad, "documents": len(file_docs)}
            docs += file_docs
            bar.advance(task)
    if not docs:
        raise PrepareError(f"no text in {', '.join(map(str, paths))}: every line is empty after normalization "
                           f"(control characters and spaces removed); nothing was written")
    by_split = assign_splits(docs, opts["valid_fraction"])
    if opts["spm"]:
        try:
            tok = Tokenizer.load(spm_src)
        except TokenizerError as e:
            raise PrepareError(f"--spm: {e}") from None
    else:
        train_lines = [line for d in by_split["train"] for line in d]
        console.print(f"training a {opts['model_type']} sentencepiece model ({opts['vocab_size']} pieces) on "
                      f"{len(train_lines)} lines")
        try:
            tok = Tokenizer.train(train_lines, opts["vocab_size"], opts["model_type"])
        except TokenizerError as e:
            raise PrepareError(str(e)) from None
    _refuse_other_tokenizer(out, tok, force)
    tmp_model = out / ".spm.model.new"
    atomic_write_bytes(tmp_model, tok.proto)  # the pool's workers load it from here
    dtype = token_dtype(tok.vocab_size)
    block = opts["tokens_per_sample"] - 1
    split_blocks: dict[str, list[np.ndarray]] = {}
    summaries: list[TextSplitSummary] = []
    try:
        with progress() as bar:
            for split in SPLITS:
                split_docs = by_split[split]
                lines = [line for d in split_docs for line in d]
                task = bar.add_task(f"tokenize {split}", total=len(lines))
                ids = encode_lines(tmp_model, lines, workers, lambda n: bar.advance(task, n))
                docs_ids, k = [], 0
                for d in split_docs:
                    docs_ids.append([ids[k + j] + [EOS] for j in range(len(d))])
                    k += len(d)
                blocks = make_blocks(docs_ids, block, opts["break_mode"], problems)
                split_blocks[split] = blocks
                tokens = sum(len(b) for b in blocks)
                unk = sum(int((b == tok.unk_id).sum()) for b in blocks)
                summaries.append(TextSplitSummary(split, len(split_docs), len(lines), len(blocks), tokens, unk))
        if not split_blocks["train"]:
            raise PrepareError("every document went to valid (--valid-fraction too high for this corpus); lower it")
        # The earlier corpus stops being usable first (its meta.json goes), then the new files replace it.
        (out / "meta.json").unlink(missing_ok=True)
        for split in SPLITS:
            _write_split(out, split, split_blocks[split], dtype)
        os.replace(tmp_model, out / "spm.model")
    finally:
        tmp_model.unlink(missing_ok=True)
    vocab = "".join(f"{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i):g}\n" for i in range(tok.sp.get_piece_size()))
    atomic_write_text(out / "spm.vocab", vocab)
    tokenizer_note = str(spm_src) if spm_src else f"trained {opts['model_type']} ({opts['vocab_size']} pieces)"
    files = ["spm.model", "spm.vocab"] + [f"{s}{ext}" for s in SPLITS for ext in (".bin", ".idx.npy")] + ["meta.json"]
    meta = {
        "version": META_VERSION, "fingerprint": fingerprint, "dtype": dtype.name, "vocab_size": tok.vocab_size,
        "mask_id": tok.mask_id, "special_ids": {"bos": tok.bos_id, "pad": tok.pad_id, "eos": tok.eos_id,
                                                "unk": tok.unk_id, "mask": tok.mask_id},
        "tokenizer": tokenizer_note, "tokenizer_path": str(out / "spm.model"), "tokenizer_sha256": tok.sha256(),
        "normalization": {"unicode": "NFC", "control_chars": "removed", "tabs": "space",
                          "lowercase": opts["lowercase"]},
        "tokens_per_sample": opts["tokens_per_sample"], "break_mode": opts["break_mode"],
        "valid_fraction": opts["valid_fraction"], "splits": {s.split: asdict(s) for s in summaries},
        "problems": dict(problems), "inputs": per_file, "files": files,
    }
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1))
    summary = _summary_from_meta(meta, "written", out)
    summary.command = command
    summary.notes += _problem_notes(problems, opts["tokens_per_sample"])
    unk = sum(s.unk_tokens for s in summaries)
    if unk:
        summary.notes.append(f"{unk} token(s) are <unk> (characters the tokenizer does not cover)")
    summary.notes.append(f"tokenizer: {out / 'spm.model'} ({tok.vocab_size} ids with <mask> = {tok.mask_id})")
    return summary


def _problem_notes(problems: Counter, tokens_per_sample: int) -> list[str]:
    notes = []
    if problems["undecodable bytes"]:
        notes.append(f"{problems['undecodable bytes']} undecodable byte sequence(s) were replaced by U+FFFD "
                     f"(per file in meta.json 'inputs'); convert the files to UTF-8 to keep those characters")
    if problems["over-long lines"]:
        notes.append(f"{problems['over-long lines']} line(s) are longer than a block ({tokens_per_sample - 1} "
                     f"tokens) and were cut into block-sized pieces")
    if problems["control chars removed"]:
        notes.append(f"{problems['control chars removed']} control character(s) were removed")
    return notes
