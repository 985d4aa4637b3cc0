"""The pipeline every `d2v prepare` corpus shares, one split at a time (`prepare_split`):

1. **walk** the audio files (never the transcript lines: a transcript may list audio
   that is absent) and look up each file's transcript; each corpus module does this with
   `walk_audio` and hands over a list of `Item`s;
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
   the text fits it), in `finish`, which also builds the summary the CLI prints.

Only headers are read, so a FLAC file with an intact header but damaged frames is
found later, when the data loader decodes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Optional, Sequence

import numpy as np
import soundfile as sf
from rich.progress import Progress

from d2vcli.audio import SAMPLE_RATE, AudioError, read_audio, to_mono_16k
from d2vcli.fileio import atomic_open, atomic_write_text
from d2vcli.manifest import Record, num_frames, read_manifest, write_manifest
from d2vcli.prepare.result import PrepareError, PrepareSummary, SplitSummary
from d2vcli.ui import console, progress
from d2vcli.vocab import SPECIALS, WORD_SEP, Vocab, to_letters
from d2vcli.workspace import Workspace

STAMP_VERSION = 1
SkipReason = Literal["unreadable", "empty", "no-transcript", "out-of-vocab", "text-too-long", "bad-vad"]
SKIP_REASONS: tuple[str, ...] = SkipReason.__args__  # type: ignore[attr-defined]
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


def walk_audio(root: Path, exts: frozenset[str], exclude: Optional[Path] = None) -> Iterable[os.DirEntry]:
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


def id_key(utt_id: str):
    """Sort key: numeric parts numerically (LibriSpeech speaker 19 < 103), the rest as text."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[-_/]", utt_id))


def stat_item(e: os.DirEntry, utt_id: str) -> Item:
    """The `Item` for a walked file, without its transcript."""
    st = e.stat()
    # Walks start from resolved roots, so e.path is already absolute (resolving each file is slow).
    return Item(id=utt_id, path=Path(e.path), size=st.st_size, mtime_ns=st.st_mtime_ns)


# --------------------------------------------------------------------------- step 2: fingerprint


def input_fingerprint(items: list[Item], other_files: list[tuple[str, int, int]], opts: SplitOptions) -> str:
    """A hash of everything the split's outputs depend on: the audio files, the other input files, the options."""
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


def up_to_date(ws: Workspace, split: str, fingerprint: str) -> Optional[SplitSummary]:
    """The summary saved with the split's stamp if its fingerprint matches and the manifest exists, else None."""
    try:
        stamp = json.loads(_stamp_path(ws, split).read_text())
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


def scan_split(split: str, items: list[Item], workers: int, bar: Progress) -> list[Header]:
    """Step 3: the headers of the split's audio, with a progress bar."""
    task = bar.add_task(f"scan {split}", total=len(items))
    return scan_headers([it.path for it in items], workers, on_progress=lambda n: bar.advance(task, n))


# --------------------------------------------------------------------------- step 4: sample rate, resampling


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


def check_or_resample(ws: Workspace, split: str, items: list[Item], headers: list[Header], opts: SplitOptions,
                      workers: int, bar: Progress) -> SplitAudio:
    """Step 4: audio that is not 16 kHz mono is an error, or with `opts.resample` is converted
    to 16 kHz mono FLAC under data/audio/<split>/, which the manifest then points to."""
    wrong = [k for k, h in enumerate(headers) if not h.error and (h.sample_rate != SAMPLE_RATE or h.channels != 1)]
    audio_dir = ws.data_dir / "audio" / split
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
        jobs = [(audio.paths[k], str(audio_dir / f"{items[k].id}.flac")) for k in wrong]
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
             ) -> tuple[list[Record], list[tuple[str, str, str]], int]:
    """Step 5: the manifest records, the skipped files as (path, reason, detail), and how many
    kept transcripts text normalization changed."""
    records: list[Record] = []
    skipped: list[tuple[str, str, str]] = []
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


def check_strict(split: str, skipped: list[tuple[str, str, str]], opts: SplitOptions) -> None:
    """With `opts.strict`, the first skipped file is an error (raised before anything is written)."""
    if opts.strict and skipped:
        path, reason, detail = skipped[0]
        raise PrepareError(
            f"--strict: {path} would be skipped ({reason}: {detail}); {len(skipped)} file(s) in split "
            f"'{split}' have problems. Fix them or drop --strict to skip them (nothing was written for '{split}')."
        )


# --------------------------------------------------------------------------- step 6: writing


def summarize_split(ws: Workspace, split: str, records: list[Record], skipped: list[tuple[str, str, str]],
                    normalized: int, orphans: int) -> SplitSummary:
    """The table row of a freshly written split (also saved in its stamp)."""
    counts = {r: 0 for r in SKIP_REASONS}
    for _, reason, _ in skipped:
        counts[reason] += 1
    return SplitSummary(
        split=split, status="written", utterances=len(records),
        seconds=round(sum(r.num_samples for r in records) / SAMPLE_RATE, 3),
        skipped={r: n for r, n in counts.items() if n},
        outputs=[str(ws.manifest(split))] + ([str(_skipped_path(ws, split))] if skipped else []),
        normalized=normalized, orphan_transcripts=orphans,
    )


def write_split(ws: Workspace, split: str, records: list[Record], skipped: list[tuple[str, str, str]],
                fingerprint: str, summary: SplitSummary) -> None:
    """Step 6: the skip list, the manifest, then the stamp that marks the split complete, each atomically."""
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


# --------------------------------------------------------------------------- one split, then the command


def prepare_split(
    ws: Workspace,
    split: str,
    items: list[Item],
    opts: SplitOptions,
    other_files: Sequence[tuple[str, int, int]] = (),
    orphans: int = 0,
    workers: int = 0,
    segment: Optional[Segmenter] = None,
) -> SplitSummary:
    """Steps 2-6 of the module docstring for one split's walked `items`.

    `other_files` (path, size, mtime) are the non-audio inputs (transcripts, VAD files) that
    the fingerprint covers; `orphans` counts transcript lines without audio, for the notes.
    """
    fp = input_fingerprint(items, list(other_files), opts)
    done = up_to_date(ws, split, fp)
    if done is not None:
        return done
    with progress() as bar:
        headers = scan_split(split, items, workers, bar)
        audio = check_or_resample(ws, split, items, headers, opts, workers, bar)
    records, skipped, normalized = validate(items, audio, opts, segment)
    check_strict(split, skipped, opts)
    summary = summarize_split(ws, split, records, skipped, normalized, orphans)
    write_split(ws, split, records, skipped, fp, summary)
    return summary


def update_dictionary(ws: Workspace) -> Optional[Path]:
    """Rewrite data/dict.ltr.txt from the text of every manifest in data/ (unchanged content is not rewritten).

    fairseq order and specials (`Vocab.librispeech()`) whenever the letters fit it,
    otherwise letters by frequency. Counts are letter counts, as in fairseq's file.
    """
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


def finish(ws: Workspace, command: str, splits: list[SplitSummary], labeled: bool,
           notes: Optional[list[str]] = None) -> PrepareSummary:
    """After the splits of a labeled command: the dictionary; for every command: the summary and its notes."""
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
