"""The pipeline every `d2v prepare` corpus shares, one split at a time (`prepare_split`):

1. **walk** the audio files (never the transcript lines: a transcript may list audio
   that is absent) and look up each file's transcript; each corpus module does this with
   `walk_audio` and hands over a list of `Item`s, plus the skips found while walking (a
   transcript entry without audio, a symlink loop, an unreadable directory or broken link);
2. **fingerprint** the inputs (paths, sizes, mtimes of audio and transcript files, the
   walk's skips, the options and which audio checks ran). If `data/<split>.stamp.json`
   holds the same fingerprint and the manifest exists, the split is "up to date" and
   nothing is read or written. This and every later step hold the split's lock
   (`outputs.hold_split`), and leftovers of killed earlier runs are removed first;
3. **scan** the audio headers in parallel (`scan_headers`: a process pool for large
   inputs; threads measured no faster than one process, see benchmarks/bench_prepare.py)
   and decode each file's last TAIL_FRAMES samples, so a truncated file (header intact,
   frames cut) is found here, not hours into training;
4. check the sample rate: anything other than 16 kHz mono is an error unless
   `resample=True`, which writes 16 kHz mono FLAC under `data/audio/<split>/`, named by
   its source's identity (path, size, mtime), so a changed source is converted again;
5. **validate**: unreadable, truncated or corrupt audio, zero-length audio, a missing
   transcript, characters outside the letter vocabulary, and a transcript with more CTC
   targets (letters plus `|`) than the model has frames are skipped, counted, and listed
   in `data/skipped-<split>.tsv`. `strict=True` makes any skip an error, and a split
   with nothing left is always one (`outputs.refuse_incomplete`);
6. **write** the skip list, the manifest `data/<split>.jsonl` and then the stamp, each
   atomically, so a failure never leaves a half-written split and never touches the
   splits finished before it (`outputs.write_split`, which also guards the shared
   `data/dict.ltr.txt`: see `d2vcli/prepare/outputs.py`). `finish` builds the summary
   the CLI prints.

The tail check finds truncation, the common damage (an interrupted copy or download); a
file damaged in its middle is found only when the data loader decodes it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Optional, Sequence

import numpy as np
import soundfile as sf
from rich.progress import Progress

from d2vcli.audio import SAMPLE_RATE, AudioError, read_audio, to_mono_16k
from d2vcli.fileio import atomic_open
from d2vcli.manifest import Record, num_frames
from d2vcli.prepare.outputs import (
    clean_leftovers, converted_dir, hold_split, refuse_incomplete, stamp_path, summarize_split, write_split,
)
from d2vcli.prepare.result import PrepareError, Skip, SplitSummary
from d2vcli.ui import progress
from d2vcli.vocab import SPECIALS, WORD_SEP, Vocab, to_letters
from d2vcli.workspace import Workspace

# 2: the fingerprint covers the walk's skips and the audio checks (stamps of 1 did not decode the tail).
STAMP_VERSION = 2
# Samples decoded at the end of every file (a few FLAC blocks of 4096): 0 reads headers only.
TAIL_FRAMES = 16384
PoolKind = Literal["process", "thread"]
# `segment(item, num_samples)` -> [(offset, length)]: cuts one file into several records.
Segmenter = Callable[["Item", int], list[tuple[int, int]]]


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


@dataclass
class SplitOptions:
    """What decides a split's output besides its input files; part of the fingerprint."""

    command: str
    labeled: bool
    vocab: Optional[Vocab]  # None: any character but '|' and the specials (keep-text)
    resample: bool
    strict: bool
    extra: dict = field(default_factory=dict)


@dataclass
class SplitAudio:
    """Per item, by position (ids need not be unique across directories, e.g. fairseq imports):
    the file the manifest points to, its length in samples, and why it is unusable ("" if it is not)."""

    paths: list[str]
    lengths: list[int]
    errors: list[str]


# --------------------------------------------------------------------------- inputs


def resolve_root(root: Optional[Path | str], env: str, what: str, example: str) -> Path:
    """A corpus root from --root or $`env`, resolved; an error naming both when neither is a directory."""
    if root is None:
        root = os.environ.get(env)
        if not root:
            raise PrepareError(f"no {what} root given: pass --root {example} or set ${env}")
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise PrepareError(f"{what} root {path} is not a directory: pass --root {example}")
    return path


def split_list(splits: Optional[Sequence[str]]) -> list[str]:
    """--splits may be repeated or comma-separated."""
    return [x.strip() for s in splits or () for x in s.split(",") if x.strip()]


# --------------------------------------------------------------------------- step 1: walking


def walk_audio(root: Path, exts: frozenset[str], skips: list[Skip], exclude: Optional[Path] = None,
               ) -> Iterable[os.DirEntry]:
    """Every file under `root` whose lower-cased suffix is in `exts` (recursive, unsorted), outside `exclude`.

    Symlinks are followed, but each directory (by its device and inode) is walked once: a link
    back to a directory above it (a loop, which the OS would otherwise follow some 40 levels
    deep and end in ELOOP) or a second link to a directory already walked is skipped. Those,
    directories that cannot be listed and links that lead nowhere are appended to `skips`.
    """
    skip_dir = str(exclude) if exclude is not None else None
    st = os.stat(root)
    visited = {(st.st_dev, st.st_ino): str(root)}
    stack = [str(root)]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as err:
            skips.append((d, "unreadable", f"cannot list the directory: {err.strerror or err}"))
            continue
        for e in entries:
            audio_name = os.path.splitext(e.name)[1].lower() in exts
            try:
                is_dir = e.is_dir(follow_symlinks=True)
                wanted = audio_name and not is_dir
                st = e.stat() if is_dir or wanted else None  # follows links; cached for stat_item
            except OSError as err:
                if err.errno == errno.ELOOP:
                    skips.append((e.path, "symlink-loop", f"a symbolic link that leads to itself ({err.strerror})"))
                elif audio_name or not isinstance(err, FileNotFoundError):  # a dangling non-audio link is noise
                    broken = " (a symbolic link to nothing)" if isinstance(err, FileNotFoundError) else ""
                    skips.append((e.path, "unreadable", f"cannot read it: {err.strerror or err}{broken}"))
                continue
            if is_dir:
                if e.path == skip_dir:
                    continue
                key = (st.st_dev, st.st_ino)
                if key in visited:
                    skips.append(_revisit(e.path, d, visited[key]))
                    continue
                visited[key] = e.path
                stack.append(e.path)
            elif wanted:
                yield e


def _revisit(link: str, parent: str, first: str) -> Skip:
    """The skip row for a directory entry that leads to a directory walked already (as `first`)."""
    target, here = os.path.realpath(first), os.path.realpath(parent)
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
        return (link, "symlink-loop", f"links back to {target}, a directory above it (a loop); "
                                      "remove the link or give a root that does not contain it")
    return (link, "duplicate-dir", f"the same directory as {first}, walked already; skipped so its "
                                   "files are not listed twice")


def id_key(utt_id: str):
    """Sort key: numeric parts numerically (LibriSpeech speaker 19 < 103), the rest as text."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[-_/]", utt_id))


def stat_item(e: os.DirEntry, utt_id: str) -> Item:
    """The `Item` for a walked file, without its transcript."""
    st = e.stat()
    # Walks start from resolved roots, so e.path is already absolute (resolving each file is slow).
    return Item(id=utt_id, path=Path(e.path), size=st.st_size, mtime_ns=st.st_mtime_ns)


# --------------------------------------------------------------------------- step 2: fingerprint


def audio_checks() -> str:
    """Which checks the scan makes of each file; part of the fingerprint, so a stamp written by
    a run that checked less (an older version, or TAIL_FRAMES 0) is not "up to date"."""
    return f"header+tail{TAIL_FRAMES}" if TAIL_FRAMES > 0 else "header"


def input_fingerprint(items: list[Item], other_files: list[tuple[str, int, int]], opts: SplitOptions,
                      walk_skips: Sequence[Skip] = ()) -> str:
    """A hash of everything the split's outputs depend on: the audio files, the other input files,
    what the walk skipped, the options and the checks."""
    h = hashlib.sha256()
    h.update(json.dumps({
        "version": STAMP_VERSION, "command": opts.command, "labeled": opts.labeled, "resample": opts.resample,
        "strict": opts.strict, "vocab": list(opts.vocab.symbols) if opts.vocab else None, "extra": opts.extra,
        "checks": audio_checks(),
    }, sort_keys=True).encode())
    for it in items:
        h.update(f"{it.path}\0{it.size}\0{it.mtime_ns}\0{it.id}\n".encode())
    for path, size, mtime in sorted(other_files):
        h.update(f"{path}\0{size}\0{mtime}\n".encode())
    for row in sorted(walk_skips):
        h.update(("\0".join(row) + "\n").encode())
    return h.hexdigest()


def up_to_date(ws: Workspace, split: str, fingerprint: str) -> Optional[SplitSummary]:
    """The summary saved with the split's stamp if its fingerprint matches and the manifest exists, else None."""
    try:
        stamp = json.loads(stamp_path(ws, split).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("fingerprint") != fingerprint or not ws.manifest(split).exists():
        return None
    s = SplitSummary(**stamp["summary"])
    s.status = "up to date"
    return s


# --------------------------------------------------------------------------- step 3: header scan


def _read_header(path: str) -> Header:
    try:
        if os.path.getsize(path) == 0:
            return Header(0, 0, 0, "empty: zero-length file")
        with sf.SoundFile(path) as f:
            if f.frames <= 0:
                return Header(f.samplerate, f.channels, f.frames, "empty: no samples")
            return Header(f.samplerate, f.channels, f.frames, _tail_error(f))
    except Exception as e:  # LibsndfileError / RuntimeError / OSError: corrupt, unsupported, unreadable
        return Header(0, 0, 0, f"unreadable: {str(e).strip() or type(e).__name__}")


def _tail_error(f: sf.SoundFile) -> str:
    """"" if the last TAIL_FRAMES samples of the open file decode, else why not.

    The header of a cut FLAC still states the full length, so only decoding shows the damage;
    seeking there is cheap (FLAC seeks by its frame headers), reading the whole file is not.
    """
    if TAIL_FRAMES <= 0:
        return ""
    start = max(0, f.frames - TAIL_FRAMES)
    try:
        f.seek(start)
        got = len(f.read(frames=f.frames - start, dtype="float32"))
    except Exception as e:  # LibsndfileError: "flac decoder lost sync", "psf_fseek() failed", ...
        return (f"unreadable: does not decode to its end ({str(e).strip() or type(e).__name__}); "
                "the file is truncated or corrupt")
    if got != f.frames - start:
        return f"unreadable: truncated: the header says {f.frames} samples but decoding stops at {start + got}"
    return ""


def _read_headers(paths: list[str]) -> list[Header]:
    return [_read_header(p) for p in paths]


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


# Below this many files a pool costs more than it saves (benchmarks/bench_prepare.py: 4,000 cached
# headers take about 0.5 s in one process, and a 2-process pool was slower).
POOL_MIN_FILES = 4096


def map_in_batches(read_batch: Callable[[list[str]], list], paths: Sequence[str | Path], workers: int = 0,
                   pool: PoolKind = "process", on_progress: Optional[Callable[[int], None]] = None,
                   batch: int = 256, min_pool: int = 0) -> list:
    """`read_batch` over `paths` in batches of `batch`, results in order, by `workers` processes or threads
    (0 = all cores). Fewer than `min_pool` (default POOL_MIN_FILES) files are read in this process:
    starting a pool costs more."""
    paths = [str(p) for p in paths]
    workers = workers or default_workers()
    batches = [paths[i: i + batch] for i in range(0, len(paths), batch)]
    out: list = []
    if workers == 1 or len(batches) < 2 or len(paths) < (min_pool or POOL_MIN_FILES):
        results: Iterator = map(read_batch, batches)
        executor = None
    else:
        executor = (ProcessPoolExecutor if pool == "process" else ThreadPoolExecutor)(
            max_workers=min(workers, len(batches)))
        results = executor.map(read_batch, batches)
    try:
        for b, got in zip(batches, results):
            out += got
            if on_progress:
                on_progress(len(b))
    finally:
        if executor is not None:
            executor.shutdown()
    return out


def scan_headers(
    paths: Sequence[str | Path],
    workers: int = 0,
    pool: PoolKind = "process",
    on_progress: Optional[Callable[[int], None]] = None,
    batch: int = 256,
) -> list[Header]:
    """Audio headers of `paths`, in order, read by `workers` processes or threads (0 = all cores).

    Processes, not threads, by default: with threads the Python side of each header read
    holds the GIL, so they measured no faster than one process.
    """
    return map_in_batches(_read_headers, paths, workers, pool, on_progress, batch)


def scan_split(split: str, items: list[Item], workers: int, bar: Progress) -> list[Header]:
    """Step 3: the headers of the split's audio, with a progress bar."""
    task = bar.add_task(f"scan {split}", total=len(items))
    return scan_headers([it.path for it in items], workers, on_progress=lambda n: bar.advance(task, n))


# --------------------------------------------------------------------------- step 4: sample rate, resampling


def converted_name(it: Item) -> str:
    """The converted file's name: the item's id and a hash of its source's identity (path, size,
    mtime in ns), so a different or changed source never reuses an old conversion, whatever the
    modification times say (a copy with `cp -p` or rsync keeps an old mtime)."""
    key = hashlib.sha256(f"{it.path}\0{it.size}\0{it.mtime_ns}\0{SAMPLE_RATE}".encode()).hexdigest()[:16]
    return f"{it.id}.{key}.flac"


def _convert(src: str, dst: str) -> tuple[int, str]:
    """Write `src` as 16 kHz mono FLAC at `dst` (atomically); returns (num_samples, error).

    An existing `dst` is reused: its name is the source's identity and it was written atomically."""
    try:
        with sf.SoundFile(dst) as f:
            if f.samplerate == SAMPLE_RATE and f.channels == 1 and f.frames > 0:
                return f.frames, ""
    except Exception:  # not there yet (or damaged on disk): convert
        pass
    try:
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


def check_or_resample(ws: Workspace, split: str, items: list[Item], headers: list[Header], opts: SplitOptions,
                      workers: int, bar: Progress) -> SplitAudio:
    """Step 4: audio that is not 16 kHz mono is an error, or with `opts.resample` is converted
    to 16 kHz mono FLAC under data/audio/<split>/, which the manifest then points to."""
    wrong = [k for k, h in enumerate(headers) if not h.error and (h.sample_rate != SAMPLE_RATE or h.channels != 1)]
    audio_dir = converted_dir(ws, split)
    if wrong and not opts.resample:
        it, h = items[wrong[0]], headers[wrong[0]]
        raise PrepareError(
            f"{len(wrong)} of {len(items)} audio files in split '{split}' are not 16 kHz mono "
            f"(e.g. {it.path}: {h.sample_rate} Hz, {h.channels} channel{'s' if h.channels > 1 else ''}). "
            f"Pass --resample to convert them to 16 kHz mono FLAC under {audio_dir}/."
        )
    audio = SplitAudio([str(it.path) for it in items], [h.frames for h in headers], [h.error for h in headers])
    if wrong:
        task = bar.add_task(f"resample {split}", total=len(wrong))
        jobs = [(audio.paths[k], str(audio_dir / converted_name(items[k]))) for k in wrong]
        for d in {Path(dst).parent for _, dst in jobs}:
            d.mkdir(parents=True, exist_ok=True)
        results = _resample_all(jobs, workers, lambda n: bar.advance(task, n))
        for k, (_, dst), (n, err) in zip(wrong, jobs, results):
            audio.paths[k], audio.lengths[k], audio.errors[k] = dst, n, err
    return audio


# --------------------------------------------------------------------------- step 5: validation


def _text_problem(text: str, vocab: Optional[Vocab]) -> Optional[tuple[str, str]]:
    if vocab is None:
        bad = {c for c in text.replace(" ", "") if c == WORD_SEP} | {t for t in text.split() if t in SPECIALS}
    else:
        bad = vocab.unknown_chars(text) | ({WORD_SEP} & set(text))
    if bad:
        return "out-of-vocab", f"characters not in the letter dictionary: {' '.join(sorted(map(repr, bad)))}"
    return None


def _item_problem(it: Item, error: str, length: int, opts: SplitOptions, segment: Optional[Segmenter],
                  ) -> tuple[Optional[tuple[str, str]], list[tuple[int, int]]]:
    """Why one item is skipped ((reason, detail) or None), and its (offset, length) pieces if it is not."""
    problem = it.problem
    if error:  # broken audio outranks a missing transcript
        reason, _, detail = error.partition(": ")
        problem = (reason, detail)
    if problem is None and opts.labeled:
        if it.text is None or not it.text.strip():
            problem = ("no-transcript", "empty transcript" if it.text is not None else "no transcript")
        else:
            problem = _text_problem(it.text, opts.vocab)
    pieces = [(0, length)]
    if problem is None and segment is not None:
        try:
            pieces = segment(it, length)
        except PrepareError as e:
            problem = ("bad-vad", str(e))
    if problem is None and opts.labeled:
        targets = len(to_letters(it.text).split())
        frames = num_frames(length)
        if targets > frames:
            problem = ("text-too-long", f"{targets} letters (with '|') but only {frames} frames "
                                        f"({length / SAMPLE_RATE:.2f} s)")
    return problem, pieces


def validate(items: list[Item], audio: SplitAudio, opts: SplitOptions, segment: Optional[Segmenter],
             ) -> tuple[list[Record], list[Skip], int]:
    """Step 5: the manifest records, the skipped files as (path, reason, detail), and how many
    kept transcripts text normalization changed."""
    records: list[Record] = []
    skipped: list[Skip] = []
    normalized = 0
    for k, it in enumerate(items):
        problem, pieces = _item_problem(it, audio.errors[k], audio.lengths[k], opts, segment)
        if problem is not None:
            skipped.append((str(it.path), problem[0], problem[1]))
            continue
        normalized += it.normalized
        for j, (offset, length) in enumerate(pieces):
            records.append(Record(
                id=it.id if segment is None else f"{it.id}-{j:04d}",
                path=audio.paths[k], num_samples=int(length), sample_rate=SAMPLE_RATE,
                speaker=it.speaker, text=it.text if opts.labeled else "", offset=int(offset),
            ))
    return records, skipped, normalized


# --------------------------------------------------------------------------- one split, then the command


def prepare_split(
    ws: Workspace,
    split: str,
    items: list[Item],
    opts: SplitOptions,
    other_files: Sequence[tuple[str, int, int]] = (),
    walk_skips: Sequence[Skip] = (),
    workers: int = 0,
    segment: Optional[Segmenter] = None,
    source: str = "",
) -> SplitSummary:
    """Steps 2-6 of the module docstring for one split's walked `items`.

    `other_files` (path, size, mtime) are the non-audio inputs (transcripts, VAD files) that
    the fingerprint covers; `walk_skips` are the (path, reason, detail) rows the walk found
    (transcript entries without audio as "no-audio", symlink loops, ...), listed with the
    others; `source` says where the audio was looked for, for the messages.
    """
    walk_skips = list(walk_skips)
    fp = input_fingerprint(items, list(other_files), opts, walk_skips)
    with hold_split(ws, split):
        clean_leftovers(ws, split)
        done = up_to_date(ws, split, fp)
        if done is not None:
            return done
        with progress() as bar:
            headers = scan_split(split, items, workers, bar)
            audio = check_or_resample(ws, split, items, headers, opts, workers, bar)
        records, skipped, normalized = validate(items, audio, opts, segment)
        skipped += walk_skips
        refuse_incomplete(ws, split, len(items), records, skipped, opts.strict, source)
        summary = summarize_split(ws, split, records, skipped, normalized)
        write_split(ws, split, records, skipped, fp, summary, opts.labeled)
    return summary

