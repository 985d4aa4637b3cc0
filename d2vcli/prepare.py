"""`d2v prepare`: turn a corpus on disk into manifests in the workspace's data/ directory.

    d2v prepare librispeech --root /data/LibriSpeech [--splits dev-clean ...]
    d2v prepare librilight-limited --root /data/librispeech_finetuning [--fold 0]
    d2v prepare librilight --root /data/librilight --subset small [--max-seconds 30]
    d2v prepare folder /data/my-audio [--split NAME] [--transcripts FILE.csv] [--resample] [--keep-text]
    d2v prepare synthetic [--out DIR]
    d2v prepare fairseq-export --out DIR [--splits ...]
    d2v prepare fairseq-import DIR [--splits ...]

Each subcommand is one library function here (`prepare_librispeech`, ...) that takes a
`Workspace` and returns a `PrepareSummary`; the CLI only prints it. Every function is
pure and idempotent and shares one pipeline per split:

1. **walk** the audio files (never the transcript lines: a transcript may list audio
   that is absent) and look up each file's transcript;
2. **fingerprint** the inputs (paths, sizes, mtimes of audio and transcript files, and
   the options). If `data/<split>.stamp.json` holds the same fingerprint and the manifest
   exists, the split is "up to date" and nothing is read or written;
3. **scan** the audio headers in parallel (`scan_headers`: a process pool for large
   inputs; threads measured no faster than one process, see benchmarks/bench_prepare.py);
4. check the sample rate: anything other than 16 kHz mono is an error unless
   `resample=True`, which writes 16 kHz mono FLAC under `data/audio/<split>/`;
5. **validate**: unreadable or corrupt audio, zero-length audio, a missing transcript,
   characters outside the letter vocabulary, and a transcript with more CTC targets
   (letters plus `|`) than the model has frames are skipped, counted, and listed in
   `data/skipped-<split>.tsv`. `strict=True` turns the first skip into an error;
6. **write** the skip list, the manifest `data/<split>.jsonl` and then the stamp, each
   atomically, so a failure never leaves a half-written split and never touches the
   splits finished before it. Labeled commands then rewrite `data/dict.ltr.txt` from the
   text of every manifest in data/ (fairseq's LibriSpeech order and specials whenever
   the text fits it).

Only headers are read, so a FLAC file with an intact header but damaged frames is
found later, when the data loader decodes it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence

import numpy as np
import soundfile as sf

from d2vcli.errors import UserError
from d2vcli.audio import AudioError, read_audio, to_mono_16k
from d2vcli.fileio import atomic_open, atomic_write_text
from d2vcli.manifest import SAMPLE_RATE, Record, num_frames, read_manifest, write_manifest
from d2vcli.vocab import SPECIALS, WORD_SEP, Vocab, from_letters, normalize_text, to_letters
from d2vcli.workspace import Workspace

STAMP_VERSION = 1
ENV_LIBRISPEECH = "D2V_LIBRISPEECH"
LIBRISPEECH_SPLITS = (
    "dev-clean", "dev-other", "test-clean", "test-other", "train-clean-100", "train-clean-360", "train-other-500",
)
LIMITED_SPLITS = ("train-10min", "train-1h", "train-10h")
LIBRILIGHT_SUBSETS = ("small", "medium", "large")
SkipReason = Literal["unreadable", "empty", "no-transcript", "out-of-vocab", "text-too-long", "bad-vad"]
SKIP_REASONS: tuple[str, ...] = SkipReason.__args__  # type: ignore[attr-defined]
PoolKind = Literal["process", "thread"]


class PrepareError(UserError):
    """Input that `d2v prepare` cannot use; the message names the file or option and the fix."""


# --------------------------------------------------------------------------- results


@dataclass
class SplitSummary:
    """What happened to one split: returned to callers and printed as one table row."""

    split: str
    status: Literal["written", "up to date"]
    utterances: int
    seconds: float
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    outputs: list[str] = field(default_factory=list)
    normalized: int = 0  # transcripts changed by text normalization (folder)
    orphan_transcripts: int = 0  # transcript lines whose audio does not exist (ignored)

    @property
    def hours(self) -> float:
        return self.seconds / 3600

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


@dataclass
class PrepareSummary:
    command: str
    splits: list[SplitSummary]
    dictionary: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    workdir: Optional[str] = None  # outputs inside it are shown relative to it

    def split(self, name: str) -> SplitSummary:
        for s in self.splits:
            if s.split == name:
                return s
        raise KeyError(f"no split {name!r} in this summary ({', '.join(s.split for s in self.splits)})")

    def table(self):
        from d2vcli.ui import table

        show_norm = any(s.normalized for s in self.splits)
        cols = ["split", "status", "utterances", "hours", "skipped"] + (["normalized"] if show_norm else []) + ["outputs"]
        rows = []
        for s in self.splits:
            skipped = ", ".join(f"{n} {r}" for r, n in sorted(s.skipped.items()) if n) or "0"
            row = [s.split, s.status, s.utterances, f"{s.hours:.3f}", skipped]
            if show_norm:
                row.append(s.normalized)
            rows.append(row + ["\n".join(self._short(p) for p in s.outputs)])
        title = f"d2v prepare {self.command}" + (f" (workspace {self.workdir})" if self.workdir else "")
        return table(title, cols, rows)

    def _short(self, path: str) -> str:
        if self.workdir and path.startswith(self.workdir.rstrip("/") + "/"):
            return os.path.relpath(path, self.workdir)
        return path


@dataclass
class Item:
    """One audio file found by a walker, with its transcript looked up."""

    id: str
    path: Path
    size: int
    mtime_ns: int
    speaker: str = ""
    text: Optional[str] = None  # None: no transcript (ignored for unlabeled corpora)
    normalized: bool = False  # text normalization changed this transcript
    problem: Optional[tuple[str, str]] = None  # (reason, detail) found while walking
    vad: Optional[list[tuple[float, float]]] = None  # Libri-light voice activity, seconds


@dataclass(frozen=True)
class Header:
    sample_rate: int
    channels: int
    frames: int
    error: str = ""  # "" if readable


# --------------------------------------------------------------------------- walking


def _walk(root: Path, exts: frozenset[str], exclude: Optional[Path] = None) -> Iterable[os.DirEntry]:
    """Every file under `root` whose lower-cased suffix is in `exts` (recursive, unsorted), outside `exclude`."""
    stack = [str(root)]
    skip = str(exclude) if exclude is not None else None
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=True):
                        if e.path != skip:
                            stack.append(e.path)
                    elif os.path.splitext(e.name)[1].lower() in exts:
                        yield e
        except PermissionError:
            continue


def _id_key(utt_id: str):
    """Sort key: numeric parts numerically (LibriSpeech speaker 19 < 103), the rest as text."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[-_/]", utt_id))


def _stat_item(e: os.DirEntry, utt_id: str) -> Item:
    st = e.stat()
    # Walks start from resolved roots, so e.path is already absolute (resolving each file is slow).
    return Item(id=utt_id, path=Path(e.path), size=st.st_size, mtime_ns=st.st_mtime_ns)


class _TransIndex:
    """LibriSpeech `<spk>-<chapter>.trans.txt` files, each parsed once, looked up by utterance id."""

    def __init__(self) -> None:
        self.files: dict[Path, tuple[dict[str, str], str]] = {}
        self.used: dict[Path, set[str]] = {}

    def lookup(self, audio: Path, utt_id: str) -> tuple[Optional[str], str]:
        parts = utt_id.split("-")
        if len(parts) < 3:
            return None, f"file name {audio.name} is not <speaker>-<chapter>-<utterance>"
        trans = audio.parent / f"{parts[0]}-{parts[1]}.trans.txt"
        if trans not in self.files:
            self.files[trans] = self._parse(trans)
            self.used[trans] = set()
        lines, error = self.files[trans]
        if error:
            return None, error
        if utt_id not in lines:
            return None, f"{trans.name} has no line for {utt_id}"
        self.used[trans].add(utt_id)
        return lines[utt_id], ""

    @staticmethod
    def _parse(trans: Path) -> tuple[dict[str, str], str]:
        try:
            raw = trans.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, f"no transcript file {trans}"
        except (OSError, UnicodeDecodeError) as e:
            return {}, f"cannot read {trans}: {e}"
        lines = {}
        for line in raw.splitlines():
            parts = line.strip().split(maxsplit=1)
            if parts:
                lines[parts[0]] = " ".join(parts[1].split()) if len(parts) > 1 else ""
        return lines, ""

    def orphans(self) -> int:
        return sum(len(lines) - len(self.used[p]) for p, (lines, err) in self.files.items() if not err)

    def stat_files(self) -> list[tuple[str, int, int]]:
        out = []
        for p in self.files:
            try:
                st = p.stat()
                out.append((str(p), st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((str(p), -1, -1))
        return out


def _walk_libri_tree(dirs: Sequence[Path]) -> tuple[list[Item], _TransIndex]:
    """LibriSpeech-shaped trees (`.../<spk>/<chapter>/<spk>-<chapter>-<utt>.flac` + trans.txt)."""
    index = _TransIndex()
    items = []
    for d in dirs:
        for e in _walk(d, frozenset({".flac"})):
            utt_id = e.name[: -len(".flac")]
            item = _stat_item(e, utt_id)
            item.speaker = utt_id.split("-")[0]
            item.text, detail = index.lookup(item.path, utt_id)
            if item.text is None:
                item.problem = ("no-transcript", detail)
            items.append(item)
    items.sort(key=lambda it: _id_key(it.id))
    return items, index


# --------------------------------------------------------------------------- header scan


def _read_header(path: str) -> Header:
    try:
        if os.path.getsize(path) == 0:
            return Header(0, 0, 0, "empty: zero-length file")
        with sf.SoundFile(path) as f:
            return Header(f.samplerate, f.channels, f.frames, "" if f.frames > 0 else "empty: no samples")
    except Exception as e:  # LibsndfileError / RuntimeError / OSError: corrupt, unsupported, unreadable
        return Header(0, 0, 0, f"unreadable: {str(e).strip() or type(e).__name__}")


def _read_headers(paths: list[str]) -> list[Header]:
    return [_read_header(p) for p in paths]


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


# Below this many files a pool costs more than it saves (benchmarks/bench_prepare.py: 4,000 cached
# headers take about 0.5 s in one process, and a 2-process pool was slower).
POOL_MIN_FILES = 4096


def scan_headers(
    paths: Sequence[str | Path],
    workers: int = 0,
    pool: PoolKind = "process",
    on_progress: Optional[Callable[[int], None]] = None,
    batch: int = 256,
) -> list[Header]:
    """Audio headers of `paths`, in order, read by `workers` processes or threads (0 = all cores).

    Fewer than POOL_MIN_FILES files are read in this process: starting a pool costs more.
    Processes, not threads, by default: with threads the Python side of each header read
    holds the GIL, so they measured no faster than one process.
    """
    paths = [str(p) for p in paths]
    workers = workers or default_workers()
    batches = [paths[i: i + batch] for i in range(0, len(paths), batch)]
    out: list[Header] = []
    if workers == 1 or len(batches) < 2 or len(paths) < POOL_MIN_FILES:
        for b in batches:
            out += _read_headers(b)
            if on_progress:
                on_progress(len(b))
        return out
    executor = ProcessPoolExecutor if pool == "process" else ThreadPoolExecutor
    with executor(max_workers=min(workers, len(batches))) as ex:
        for b, headers in zip(batches, ex.map(_read_headers, batches)):
            out += headers
            if on_progress:
                on_progress(len(b))
    return out


# --------------------------------------------------------------------------- resampling


def _convert(src: str, dst: str) -> tuple[int, str]:
    """Write `src` as 16 kHz mono FLAC at `dst` (atomically); returns (num_samples, error)."""
    try:
        if os.path.exists(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
            with sf.SoundFile(dst) as f:
                if f.samplerate == SAMPLE_RATE and f.channels == 1:
                    return f.frames, ""
        wav, sr = read_audio(src)
        wav = to_mono_16k(wav, sr)
        peak = float(np.abs(wav).max()) if len(wav) else 0.0
        if peak > 1.0:  # resampling can overshoot full scale; FLAC PCM_16 would clip
            wav = wav / peak
        with atomic_open(Path(dst), "wb") as fh:
            sf.write(fh, wav, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        return len(wav), ""
    except (AudioError, RuntimeError, OSError, ValueError) as e:
        return 0, f"unreadable: {e}"


def _convert_batch(jobs: list[tuple[str, str]]) -> list[tuple[int, str]]:
    return [_convert(s, d) for s, d in jobs]


def _resample_all(jobs: list[tuple[str, str]], workers: int, on_progress) -> list[tuple[int, str]]:
    workers = workers or default_workers()
    batches = [jobs[i: i + 8] for i in range(0, len(jobs), 8)]
    out: list[tuple[int, str]] = []
    if workers == 1 or len(batches) < 2:
        for b in batches:
            out += _convert_batch(b)
            on_progress(len(b))
        return out
    with ProcessPoolExecutor(max_workers=min(workers, len(batches))) as ex:
        for b, res in zip(batches, ex.map(_convert_batch, batches)):
            out += res
            on_progress(len(b))
    return out


# --------------------------------------------------------------------------- the per-split pipeline


@dataclass
class _Options:
    """What decides a split's output besides its input files; part of the fingerprint."""

    command: str
    labeled: bool
    vocab: Optional[Vocab]  # None: any character but '|' and the specials (keep-text)
    resample: bool
    strict: bool
    extra: dict = field(default_factory=dict)


def _fingerprint(items: list[Item], other_files: list[tuple[str, int, int]], opts: _Options) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({
        "version": STAMP_VERSION, "command": opts.command, "labeled": opts.labeled, "resample": opts.resample,
        "strict": opts.strict, "vocab": list(opts.vocab.symbols) if opts.vocab else None, "extra": opts.extra,
    }, sort_keys=True).encode())
    for it in items:
        h.update(f"{it.path}\0{it.size}\0{it.mtime_ns}\0{it.id}\n".encode())
    for path, size, mtime in sorted(other_files):
        h.update(f"{path}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _stamp_path(ws: Workspace, split: str) -> Path:
    return ws.data_dir / f"{split}.stamp.json"


def _skipped_path(ws: Workspace, split: str) -> Path:
    return ws.data_dir / f"skipped-{split}.tsv"


def _up_to_date(ws: Workspace, split: str, fingerprint: str) -> Optional[SplitSummary]:
    try:
        stamp = json.loads(_stamp_path(ws, split).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("fingerprint") != fingerprint or not ws.manifest(split).exists():
        return None
    s = SplitSummary(**stamp["summary"])
    s.status = "up to date"
    return s


def _text_problem(text: str, vocab: Optional[Vocab]) -> Optional[tuple[str, str]]:
    if vocab is None:
        bad = {c for c in text.replace(" ", "") if c == WORD_SEP} | {t for t in text.split() if t in SPECIALS}
    else:
        bad = vocab.unknown_chars(text) | ({WORD_SEP} & set(text))
    if bad:
        return "out-of-vocab", f"characters not in the letter dictionary: {' '.join(sorted(map(repr, bad)))}"
    return None


def _prepare_split(
    ws: Workspace,
    split: str,
    items: list[Item],
    opts: _Options,
    other_files: list[tuple[str, int, int]] = (),
    orphans: int = 0,
    workers: int = 0,
    segment: Optional[Callable[[Item, int], list[tuple[int, int]]]] = None,
) -> SplitSummary:
    """Steps 2-6 of the module docstring for one split. `segment(item, num_samples)` -> [(offset, length)]."""
    from d2vcli.ui import console, progress

    fingerprint = _fingerprint(items, list(other_files), opts)
    done = _up_to_date(ws, split, fingerprint)
    if done is not None:
        return done

    with progress() as bar:
        task = bar.add_task(f"scan {split}", total=len(items))
        headers = scan_headers([it.path for it in items], workers, on_progress=lambda n: bar.advance(task, n))

        # Sample rate and channels: an error unless we convert.
        wrong = [k for k, h in enumerate(headers) if not h.error and (h.sample_rate != SAMPLE_RATE or h.channels != 1)]
        audio_dir = ws.data_dir / "audio" / split
        if wrong and not opts.resample:
            it, h = items[wrong[0]], headers[wrong[0]]
            raise PrepareError(
                f"{len(wrong)} of {len(items)} audio files in split '{split}' are not 16 kHz mono "
                f"(e.g. {it.path}: {h.sample_rate} Hz, {h.channels} channel{'s' if h.channels > 1 else ''}). "
                f"Pass --resample to convert them to 16 kHz mono FLAC under {audio_dir}/."
            )
        # Indexed by position: ids need not be unique across directories (fairseq imports).
        paths = [str(it.path) for it in items]
        lengths = [h.frames for h in headers]
        errors = [h.error for h in headers]
        if wrong:
            task = bar.add_task(f"resample {split}", total=len(wrong))
            jobs = [(paths[k], str(audio_dir / f"{items[k].id}.flac")) for k in wrong]
            for d in {Path(dst).parent for _, dst in jobs}:
                d.mkdir(parents=True, exist_ok=True)
            results = _resample_all(jobs, workers, lambda n: bar.advance(task, n))
            for k, (_, dst), (n, err) in zip(wrong, jobs, results):
                paths[k], lengths[k], errors[k] = dst, n, err

    records: list[Record] = []
    skipped: list[tuple[str, str, str]] = []  # (path, reason, detail)
    normalized = 0
    for k, it in enumerate(items):
        problem = it.problem
        if errors[k]:  # broken audio outranks a missing transcript
            reason, _, detail = errors[k].partition(": ")
            problem = (reason, detail)
        if problem is None and opts.labeled:
            if it.text is None or not it.text.strip():
                problem = ("no-transcript", "empty transcript" if it.text is not None else "no transcript")
            else:
                problem = _text_problem(it.text, opts.vocab)
        pieces = [(0, lengths[k])]
        if problem is None and segment is not None:
            try:
                pieces = segment(it, lengths[k])
            except PrepareError as e:
                problem = ("bad-vad", str(e))
        if problem is None and opts.labeled:
            targets = len(to_letters(it.text).split())
            frames = num_frames(lengths[k])
            if targets > frames:
                problem = ("text-too-long", f"{targets} letters (with '|') but only {frames} frames "
                                            f"({lengths[k] / SAMPLE_RATE:.2f} s)")
        if problem is not None:
            skipped.append((str(it.path), problem[0], problem[1]))
            continue
        normalized += it.normalized
        for j, (offset, length) in enumerate(pieces):
            records.append(Record(
                id=it.id if segment is None else f"{it.id}-{j:04d}",
                path=paths[k], num_samples=int(length), sample_rate=SAMPLE_RATE,
                speaker=it.speaker, text=it.text if opts.labeled else "", offset=int(offset),
            ))

    if opts.strict and skipped:
        path, reason, detail = skipped[0]
        raise PrepareError(
            f"--strict: {path} would be skipped ({reason}: {detail}); {len(skipped)} file(s) in split "
            f"'{split}' have problems. Fix them or drop --strict to skip them (nothing was written for '{split}')."
        )
    counts = {r: 0 for r in SKIP_REASONS}
    for _, reason, _ in skipped:
        counts[reason] += 1
    summary = SplitSummary(
        split=split, status="written", utterances=len(records),
        seconds=round(sum(r.num_samples for r in records) / SAMPLE_RATE, 3),
        skipped={r: n for r, n in counts.items() if n},
        outputs=[str(ws.manifest(split))] + ([str(_skipped_path(ws, split))] if skipped else []),
        normalized=normalized, orphan_transcripts=orphans,
    )
    # Write order: skip list, manifest, then the stamp that marks the split complete.
    ws.data_dir.mkdir(parents=True, exist_ok=True)
    if skipped:
        atomic_write_text(_skipped_path(ws, split), "path\treason\tdetail\n" + "".join(
            f"{p}\t{r}\t{d.replace(chr(9), ' ').replace(chr(10), ' ')}\n" for p, r, d in skipped))
    elif _skipped_path(ws, split).exists():
        _skipped_path(ws, split).unlink()  # stale list from an earlier run
    write_manifest(ws.manifest(split), records)
    atomic_write_text(_stamp_path(ws, split), json.dumps({"fingerprint": fingerprint, "summary": asdict(summary)},
                                                         indent=1))
    if skipped:
        console.print(f"[yellow]{split}: skipped {len(skipped)} file(s), see {_skipped_path(ws, split)}[/]")
    return summary


def update_dictionary(ws: Workspace) -> Optional[Path]:
    """Rewrite data/dict.ltr.txt from the text of every manifest in data/ (unchanged content is not rewritten).

    fairseq order and specials (`Vocab.librispeech()`) whenever the letters fit it,
    otherwise letters by frequency. Counts are letter counts, as in fairseq's file.
    """
    from collections import Counter

    counts: Counter = Counter()
    texts = []
    for m in sorted(ws.data_dir.glob("*.jsonl")):
        for r in read_manifest(m):
            if r.text:
                texts.append(r.text)
                counts.update(to_letters(r.text).split())
    if not texts:
        return None
    vocab = Vocab.from_texts(texts)
    content = "".join(f"{s} {counts.get(s, 0)}\n" for s in vocab.symbols)
    path = ws.dictionary
    if not path.exists() or path.read_text(encoding="utf-8") != content:
        vocab.save(path, dict(counts))
    return path


def _finish(ws: Workspace, command: str, splits: list[SplitSummary], labeled: bool,
            notes: Optional[list[str]] = None) -> PrepareSummary:
    dictionary = None
    if labeled:
        if any(s.status == "written" for s in splits) or not ws.dictionary.exists():
            dictionary = update_dictionary(ws)
        else:
            dictionary = ws.dictionary
    notes = list(notes or [])
    for s in splits:
        if s.orphan_transcripts:
            notes.append(f"{s.split}: {s.orphan_transcripts} transcript line(s) have no audio file (ignored)")
    return PrepareSummary(command, splits, str(dictionary) if dictionary else None, notes, str(ws.root))


# --------------------------------------------------------------------------- librispeech


def _resolve_root(root: Optional[Path | str], env: str, what: str, example: str) -> Path:
    if root is None:
        root = os.environ.get(env)
        if not root:
            raise PrepareError(f"no {what} root given: pass --root {example} or set ${env}")
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise PrepareError(f"{what} root {path} is not a directory: pass --root {example}")
    return path


def _split_list(splits: Optional[Sequence[str]]) -> list[str]:
    """--splits may be repeated or comma-separated."""
    return [x.strip() for s in splits or () for x in s.split(",") if x.strip()]


def librispeech_root(root: Optional[Path | str]) -> Path:
    """The `LibriSpeech/` directory from --root (itself or its parent) or $D2V_LIBRISPEECH."""
    path = _resolve_root(root, ENV_LIBRISPEECH, "LibriSpeech", "/path/to/LibriSpeech")
    if (path / "LibriSpeech").is_dir():
        path = path / "LibriSpeech"
    return path


def prepare_librispeech(
    ws: Workspace,
    root: Optional[Path | str] = None,
    splits: Optional[Sequence[str]] = None,
    resample: bool = False,
    strict: bool = False,
    workers: int = 0,
    command: str = "librispeech",
) -> PrepareSummary:
    """Manifests for LibriSpeech splits: data/<split>.jsonl + data/dict.ltr.txt.

    `splits`: names of split directories (the 7 standard ones or any other, e.g. the
    synthetic corpus's `train`); default: every standard split present.
    """
    root = librispeech_root(root)
    splits = _split_list(splits)
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    if splits:
        missing = [s for s in splits if not (root / s).is_dir()]
        if missing:
            raise PrepareError(f"split(s) {', '.join(missing)} not found in {root} "
                               f"(found: {', '.join(present) or 'no directories'})")
        todo = list(dict.fromkeys(splits))
    else:
        todo = [s for s in LIBRISPEECH_SPLITS if s in present]
        if not todo:
            raise PrepareError(
                f"no LibriSpeech split in {root} (found: {', '.join(present) or 'no directories'}); "
                f"expected some of {', '.join(LIBRISPEECH_SPLITS)}, or name yours with --splits"
            )
    opts = _Options(command, labeled=True, vocab=Vocab.librispeech(), resample=resample, strict=strict)
    results = []
    for split in todo:
        items, index = _walk_libri_tree([root / split])
        results.append(_prepare_split(ws, split, items, opts, index.stat_files(), index.orphans(), workers))
    return _finish(ws, command, results, labeled=True)


# --------------------------------------------------------------------------- libri-light limited


def prepare_librilight_limited(
    ws: Workspace,
    root: Optional[Path | str] = None,
    fold: int = 0,
    resample: bool = False,
    strict: bool = False,
    workers: int = 0,
) -> PrepareSummary:
    """train-10min (= 1h/<fold>), train-1h (= 1h/*) and train-10h (= 1h/* + 9h/*) from librispeech_finetuning/."""
    path = _resolve_root(root, "D2V_LIBRILIGHT_LIMITED", "Libri-light limited", "/path/to/librispeech_finetuning")
    if not (path / "1h").is_dir() and (path / "librispeech_finetuning").is_dir():
        path = path / "librispeech_finetuning"
    if not (path / "1h").is_dir():
        raise PrepareError(f"{path} has no 1h/ directory: pass --root /path/to/librispeech_finetuning "
                           f"(it holds 1h/ and 9h/)")
    folds = sorted((p for p in (path / "1h").iterdir() if p.is_dir()), key=lambda p: _id_key(p.name))
    fold_dir = path / "1h" / str(fold)
    if not fold_dir.is_dir():
        raise PrepareError(f"no fold {fold} in {path / '1h'} (folds: {', '.join(p.name for p in folds)}); "
                           f"pass --fold with one of them")
    nine = path / "9h"
    if not nine.is_dir():
        raise PrepareError(f"{path} has no 9h/ directory, needed for train-10h")
    subsets = {"train-10min": [fold_dir], "train-1h": folds, "train-10h": folds + [nine]}
    opts = _Options("librilight-limited", labeled=True, vocab=Vocab.librispeech(), resample=resample, strict=strict)
    results = []
    for split, dirs in subsets.items():
        items, index = _walk_libri_tree(dirs)
        results.append(_prepare_split(ws, split, items, opts, index.stat_files(), index.orphans(), workers))
    return _finish(ws, "librilight-limited", results, labeled=True)


# --------------------------------------------------------------------------- libri-light unlabeled


def vad_segments(vad: Sequence[Sequence[float]], num_samples: int, max_seconds: float,
                 sample_rate: int = SAMPLE_RATE) -> list[tuple[int, int]]:
    """(offset, length) in samples: consecutive VAD chunks grouped into segments of at most `max_seconds`.

    A segment runs from its first chunk's onset to its last chunk's offset, so the
    pauses between its chunks are kept. (fairseq/libri-light `cut_by_vad.py` instead
    stitches the chunks together and drops the silence; we keep it because segments
    are read in place, without re-encoding, as offset + length into the original file.)
    A chunk longer than `max_seconds` is split into equal pieces shorter than the maximum.
    """
    max_len = int(max_seconds * sample_rate)
    if max_len <= 0:
        raise PrepareError(f"--max-seconds must be positive, got {max_seconds}")
    chunks = []
    for pair in vad:
        if len(pair) != 2:
            raise PrepareError(f"voice_activity entry {pair!r} is not [onset, offset]")
        on = max(0, int(round(float(pair[0]) * sample_rate)))
        off = min(num_samples, int(round(float(pair[1]) * sample_rate)))
        if off > on:
            chunks.append((on, off))
    chunks.sort()
    segments: list[tuple[int, int]] = []
    start = end = None
    for on, off in chunks:
        if start is not None and off - start <= max_len and on >= end:
            end = off
            continue
        if start is not None:
            segments.append((start, end - start))
        if off - on > max_len:
            pieces = -(-(off - on) // max_len)
            bounds = np.linspace(on, off, pieces + 1).round().astype(int)
            segments += [(int(a), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
            start = end = None
        else:
            start, end = on, off
    if start is not None:
        segments.append((start, end - start))
    return segments


def prepare_librilight(
    ws: Workspace,
    root: Optional[Path | str] = None,
    subset: Literal["small", "medium", "large"] = "small",
    max_seconds: float = 30.0,
    resample: bool = False,
    strict: bool = False,
    workers: int = 0,
) -> PrepareSummary:
    """Unlabeled Libri-light `<subset>/<speaker>/<book>/<file>.flac` + `.json`, cut by VAD into segments.

    Manifest `librilight-<subset>`: one Record per segment with `offset`/`num_samples`
    into the original file and text "".
    """
    if subset not in LIBRILIGHT_SUBSETS:
        raise PrepareError(f"unknown Libri-light subset {subset!r}; choose one of {', '.join(LIBRILIGHT_SUBSETS)}")
    path = _resolve_root(root, "D2V_LIBRILIGHT", "Libri-light", "/path/to/librilight (the directory holding small/)")
    if not (path / subset).is_dir() and path.name == subset:
        path = path.parent
    sub = path / subset
    if not sub.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise PrepareError(f"no {subset}/ in {path} (found: {', '.join(found) or 'no directories'}); pass --root "
                           f"the directory that holds {subset}/")
    items = []
    json_files = []
    for e in _walk(sub, frozenset({".flac"})):
        rel = Path(e.path).relative_to(sub)
        item = _stat_item(e, "-".join(rel.with_suffix("").parts))
        item.speaker = rel.parts[0] if len(rel.parts) > 1 else ""
        meta = Path(e.path).with_suffix(".json")
        try:
            st = meta.stat()
            json_files.append((str(meta), st.st_size, st.st_mtime_ns))
            data = json.loads(meta.read_text(encoding="utf-8"))
            item.vad = data["voice_activity"]
            item.speaker = str(data.get("speaker", item.speaker))
            if not isinstance(item.vad, list):
                raise TypeError("voice_activity is not a list")
        except FileNotFoundError:
            item.problem = ("bad-vad", f"no {meta.name} next to the audio")
        except (OSError, ValueError, KeyError, TypeError) as e:
            item.problem = ("bad-vad", f"cannot use {meta.name}: {type(e).__name__}: {e}")
        items.append(item)
    items.sort(key=lambda it: _id_key(it.id))
    split = f"librilight-{subset}"
    opts = _Options("librilight", labeled=False, vocab=None, resample=resample, strict=strict,
                    extra={"max_seconds": max_seconds})

    def segment(item: Item, num_samples: int) -> list[tuple[int, int]]:
        segs = vad_segments(item.vad, num_samples, max_seconds)
        if not segs:
            raise PrepareError("no voice activity inside the audio")
        return segs

    result = _prepare_split(ws, split, items, opts, json_files, 0, workers, segment=segment)
    return _finish(ws, "librilight", [result], labeled=False)


# --------------------------------------------------------------------------- any folder


def audio_extensions() -> frozenset[str]:
    """File suffixes of the formats this libsndfile can read."""
    exts = {"." + k.lower() for k in sf.available_formats()}
    if ".ogg" in exts:
        exts |= {".oga", ".opus"}
    if ".aiff" in exts:
        exts |= {".aif", ".aifc"}
    if ".nist" in exts:
        exts.add(".sph")
    if ".mpeg" in exts:
        exts.add(".mp3")
    return frozenset(exts - {".raw"})


PATH_COLUMNS = ("path", "file", "file_name", "filename", "audio", "audio_path", "audio_file")
TEXT_COLUMNS = ("text", "transcript", "transcription", "sentence", "sentences", "label", "words")


def read_transcript_table(path: Path, root: Path) -> dict[Path, str]:
    """`path,text` rows (CSV or TSV, delimiter detected, header optional) -> {absolute audio path: text}."""
    try:
        raw = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"cannot read transcripts file {path}: {e}") from e
    lines = [ln for ln in raw.splitlines() if ln.strip()]
    if not lines:
        raise PrepareError(f"transcripts file {path} is empty")
    # The first delimiter, in order of preference, that every one of the first lines has.
    delim = next((d for d in ("\t", ",", "|", ";") if all(d in ln for ln in lines[:20])), None)
    if delim is None:
        raise PrepareError(f"{path}: expected two columns 'path<TAB or comma>text', found no delimiter in {lines[0]!r}")
    # TSV: no quoting (Common Voice-style text has unbalanced quotes); CSV: standard quoting.
    reader = csv.reader(io.StringIO("\n".join(lines)), delimiter=delim,
                        quoting=csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL)
    rows = list(reader)
    head = [c.strip().lower() for c in rows[0]]
    path_col: Optional[int] = None
    if any(c in PATH_COLUMNS for c in head):
        path_col = next(i for i, c in enumerate(head) if c in PATH_COLUMNS)
        text_col = next((i for i, c in enumerate(head) if c in TEXT_COLUMNS), 1 if path_col == 0 else 0)
        rows = rows[1:]
    out = {}
    for row in rows:
        if path_col is None:
            # No header: path, then text; an unquoted delimiter inside the text splits it, so rejoin.
            if len(row) < 2:
                continue
            p, text = row[0], delim.join(row[1:])
        else:
            if len(row) <= max(path_col, text_col):
                continue
            p, text = row[path_col], row[text_col]
        audio = Path(p.strip()).expanduser()
        out[(audio if audio.is_absolute() else root / audio).resolve()] = text
    return out


def prepare_folder(
    ws: Workspace,
    root: Path | str,
    split: Optional[str] = None,
    transcripts: Optional[Path | str] = None,
    resample: bool = False,
    keep_text: bool = False,
    strict: bool = False,
    workers: int = 0,
) -> PrepareSummary:
    """Any folder of audio: transcripts from `<file>.txt` sidecars or a `path,text` table.

    Transcripts are normalized to the letter vocabulary (upper case, punctuation but
    apostrophes removed) unless `keep_text`; then the dictionary is built from the
    text as it is. A folder with no transcripts at all gives an unlabeled manifest.
    `split` defaults to the folder's name.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise PrepareError(f"{root} is not a directory: pass the folder that holds the audio files")
    split = split or root.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", split):
        raise PrepareError(f"split name {split!r} must be letters, digits, '.', '_' or '-'; pass --split NAME")
    table_texts: Optional[dict[Path, str]] = None
    other_files = []
    if transcripts is not None:
        tpath = Path(transcripts).expanduser().resolve()
        table_texts = read_transcript_table(tpath, root)
        st = tpath.stat()
        other_files.append((str(tpath), st.st_size, st.st_mtime_ns))

    items: list[Item] = []
    seen: dict[str, int] = {}
    prefix = len(str(root)) + 1
    rels: dict[str, str] = {}
    # The workspace may sit inside the folder: never pick up our own resampled audio.
    for e in _walk(root, audio_extensions(), exclude=ws.root):
        rel = e.path[prefix:].replace(os.sep, "/")
        stem, ext = os.path.splitext(rel)
        utt_id = re.sub(r"\s+", "_", stem)
        if utt_id in seen:
            utt_id = f"{utt_id}-{ext.lstrip('.').lower()}"
        seen[utt_id] = 1
        item = _stat_item(e, utt_id)
        rels[utt_id] = rel
        item.speaker = rel.split("/", 1)[0] if "/" in rel else ""
        if table_texts is not None:
            item.text = table_texts.get(item.path)
            if item.text is None:  # the table may name it through a symlink
                item.text = table_texts.get(item.path.resolve())
        else:
            sidecar = item.path.with_suffix(".txt")
            try:
                item.text = " ".join(sidecar.read_text(encoding="utf-8").split())
                st = sidecar.stat()
                other_files.append((str(sidecar), st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                pass
            except (OSError, UnicodeDecodeError) as err:
                item.problem = ("no-transcript", f"cannot read {sidecar.name}: {err}")
        items.append(item)
    if not items:
        raise PrepareError(f"no audio files in {root} (looked for {', '.join(sorted(audio_extensions()))})")
    items.sort(key=lambda it: rels[it.id])
    labeled = any(it.text is not None for it in items)
    if not keep_text:
        for it in items:
            if it.text is not None:
                norm = normalize_text(it.text)
                it.normalized = norm != it.text
                it.text = norm
    orphans = len(set(table_texts) - {it.path for it in items}) if table_texts is not None else 0
    opts = _Options("folder", labeled=labeled, vocab=None if keep_text else Vocab.librispeech(),
                    resample=resample, strict=strict, extra={"keep_text": keep_text})
    result = _prepare_split(ws, split, items, opts, other_files, orphans, workers)
    notes = [] if labeled else [f"{split}: no transcripts found, so the manifest is unlabeled (pretraining only)"]
    if result.normalized:
        notes.append(f"{split}: {result.normalized} transcript(s) changed by normalization (--keep-text keeps them)")
    return _finish(ws, "folder", [result], labeled=labeled, notes=notes)


# --------------------------------------------------------------------------- synthetic


def default_synthetic_dir(ws: Workspace) -> Path:
    return ws.root / "corpus" / "synthetic"


def prepare_synthetic(
    ws: Workspace,
    out: Optional[Path | str] = None,
    size: Literal["demo", "tiny"] = "demo",
    seed: int = 0,
    strict: bool = False,
    workers: int = 0,
) -> PrepareSummary:
    """Generate the synthetic corpus (d2vcli.synthetic) and prepare its five splits."""
    from d2vcli import synthetic
    from d2vcli.ui import progress

    if size not in synthetic.SIZES:
        raise PrepareError(f"unknown synthetic corpus size {size!r}; pass --size with one of {', '.join(synthetic.SIZES)}")
    out = Path(out) if out is not None else default_synthetic_dir(ws)
    try:
        with progress() as bar:
            info = synthetic.generate_corpus(out, size=size, seed=seed, progress=bar)
    except FileExistsError as e:
        raise PrepareError(str(e)) from e
    summary = prepare_librispeech(ws, info.root, splits=synthetic.SPLITS, strict=strict, workers=workers,
                                  command="synthetic")
    summary.notes.append(f"corpus: {info.root} (size {size}, seed {seed})")
    summary.notes.append(f"LM text: {info.lm_text}")
    return summary


# --------------------------------------------------------------------------- fairseq


def fairseq_name(split: str) -> str:
    """fairseq's configs name splits with underscores (valid_subset: dev_other)."""
    return split.replace("-", "_")


def _known_split_names() -> dict[str, str]:
    from d2vcli.synthetic import SPLITS as SYN

    names = LIBRISPEECH_SPLITS + LIMITED_SPLITS + SYN + tuple(f"librilight-{s}" for s in LIBRILIGHT_SUBSETS)
    return {fairseq_name(n): n for n in names}


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(path, text)
    return True


def fairseq_export(ws: Workspace, out: Path | str, splits: Optional[Sequence[str]] = None) -> PrepareSummary:
    """Write fairseq's files: <name>.tsv (root line, then relpath<TAB>num_samples), .ltr, .wrd, dict.ltr.txt.

    .ltr/.wrd are written when every record of the split has text. Files whose
    content would not change are not rewritten (the split reports "up to date").
    """
    out = Path(out).expanduser().resolve()
    splits = _split_list(splits)
    if not splits:
        splits = sorted(p.stem for p in ws.data_dir.glob("*.jsonl")) if ws.data_dir.exists() else []
        if not splits:
            raise PrepareError(f"no manifests in {ws.data_dir}; run a `d2v prepare` command first or pass --workdir")
    results = []
    for split in splits:
        records = read_manifest(ws.require_manifest(split))
        if not records:
            raise PrepareError(f"manifest {ws.manifest(split)} is empty; nothing to export")
        segmented = [r for r in records if r.offset]
        if segmented:
            raise PrepareError(
                f"split '{split}' holds segments of longer files (e.g. {segmented[0].id} at offset "
                f"{segmented[0].offset}); fairseq's .tsv has no offsets, so it cannot be exported"
            )
        base = os.path.commonpath([os.path.dirname(r.path) for r in records])
        tsv = base + "\n" + "".join(f"{os.path.relpath(r.path, base)}\t{r.num_samples}\n" for r in records)
        name = fairseq_name(split)
        files = {out / f"{name}.tsv": tsv}
        if all(r.text for r in records):
            files[out / f"{name}.ltr"] = "".join(to_letters(r.text) + "\n" for r in records)
            files[out / f"{name}.wrd"] = "".join(r.text + "\n" for r in records)
        changed = [_write_if_changed(p, t) for p, t in files.items()]
        results.append(SplitSummary(
            split=split, status="written" if any(changed) else "up to date", utterances=len(records),
            seconds=round(sum(r.seconds for r in records), 3), outputs=[str(p) for p in files],
        ))
    dictionary = None
    if ws.dictionary.exists():
        dictionary = out / "dict.ltr.txt"
        _write_if_changed(dictionary, ws.dictionary.read_text(encoding="utf-8"))
    return PrepareSummary("fairseq-export", results, str(dictionary) if dictionary else None,
                          [f"fairseq data dir: {out} (task.data={out})"], str(ws.root))


def prepare_fairseq_import(
    ws: Workspace,
    src: Path | str,
    splits: Optional[Sequence[str]] = None,
    resample: bool = False,
    strict: bool = False,
    workers: int = 0,
) -> PrepareSummary:
    """Manifests from a fairseq data dir (<name>.tsv, optional .ltr or .wrd labels, dict.ltr.txt).

    Names with underscores that are known splits map back (dev_other -> dev-other).
    The speaker comes from the file name when it looks like LibriSpeech (<spk>-<ch>-<utt>).
    """
    src = Path(src).expanduser().resolve()
    if not src.is_dir():
        raise PrepareError(f"{src} is not a directory: pass the fairseq data dir holding <split>.tsv files")
    names = _split_list(splits) or sorted(p.stem for p in src.glob("*.tsv"))
    if not names:
        raise PrepareError(f"no .tsv files in {src}")
    vocab = Vocab.load(src / "dict.ltr.txt") if (src / "dict.ltr.txt").exists() else Vocab.librispeech()
    known = _known_split_names()
    results = []
    labeled_any = False
    for name in names:
        name = fairseq_name(name) if fairseq_name(name) in known else name
        tsv = src / f"{name}.tsv"
        if not tsv.exists():
            raise PrepareError(f"no {tsv.name} in {src} (have: {', '.join(p.name for p in sorted(src.glob('*.tsv')))})")
        lines = tsv.read_text(encoding="utf-8").splitlines()
        if not lines:
            raise PrepareError(f"{tsv} is empty; its first line must be the audio root directory")
        base = Path(lines[0].strip())
        rows = [ln.split("\t") for ln in lines[1:] if ln.strip()]
        labels: Optional[list[str]] = None
        label_file = None
        for ext in ("ltr", "wrd"):
            p = src / f"{name}.{ext}"
            if p.exists():
                raw = p.read_text(encoding="utf-8").splitlines()
                if len(raw) != len(rows):
                    raise PrepareError(f"{p} has {len(raw)} lines but {tsv.name} has {len(rows)} rows; "
                                       f"they must match line by line")
                labels = [from_letters(x) if ext == "ltr" else " ".join(x.split()) for x in raw]
                label_file = p
                break
        other = [(str(tsv), tsv.stat().st_size, tsv.stat().st_mtime_ns)]
        if label_file is not None:
            other.append((str(label_file), label_file.stat().st_size, label_file.stat().st_mtime_ns))
        items = []
        for k, row in enumerate(rows):
            audio = (base / row[0]).resolve()
            stem = audio.name.rsplit(".", 1)[0]
            try:
                st = audio.stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
            item = Item(id=stem, path=audio, size=size, mtime_ns=mtime,
                        speaker=stem.split("-")[0] if re.fullmatch(r"\d+-\d+-\d+", stem) else "",
                        text=labels[k] if labels is not None else None)
            if size < 0:
                item.problem = ("unreadable", f"no such file (row {k + 2} of {tsv.name})")
            items.append(item)
        split = known.get(name, name)
        labeled_any |= labels is not None
        opts = _Options("fairseq-import", labeled=labels is not None, vocab=vocab, resample=resample, strict=strict)
        results.append(_prepare_split(ws, split, items, opts, other, 0, workers))
    return _finish(ws, "fairseq-import", results, labeled=labeled_any)
