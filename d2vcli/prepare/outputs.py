"""What `d2v prepare` writes into the workspace, and the guards that keep it from losing data.

A split's files are `data/<split>.jsonl` (the manifest), `data/skipped-<split>.tsv`,
`data/<split>.stamp.json` and, with --resample, `data/audio/<split>/`; the workspace's shared
file is `data/dict.ltr.txt`. The guards:

- **locks** (`d2vcli.locks.hold`): one process at a time prepares a split (`data/.<split>.lock`,
  held from the up-to-date check to the last write; a second one is refused and told who holds
  it), and one at a time checks and writes the dictionary (`data/.dict.ltr.txt.lock`, held
  briefly, so a concurrent prepare of another split waits for it instead of failing);
- **leftovers**: temp files of a killed earlier run in the directories a split writes are
  removed when it starts (`fileio.remove_stale_temps`: only our naming, only dead writers);
- **no empty manifest**: a split with no usable utterance is an error naming the cause and the
  skip list; an existing manifest stays as it was;
- **--strict**: any skip is an error; the skip list is written so every problem is visible;
- **the dictionary is never changed behind the user's back**: the first labeled split creates
  it; after that a split whose text has characters outside it is an error (before its manifest
  is written) that names the characters and the fix. Its counts are refreshed only while its
  symbols, which define the label indices, stay exactly as they are.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional, Sequence

from d2vcli.audio import SAMPLE_RATE
from d2vcli.fileio import atomic_write_text, remove_stale_temps
from d2vcli.locks import hold, hold_waiting
from d2vcli.manifest import Record, read_manifest, write_manifest
from d2vcli.prepare.result import SKIP_REASONS, PrepareError, PrepareSummary, Skip, SplitSummary
from d2vcli.ui import console
from d2vcli.vocab import Vocab, to_letters
from d2vcli.workspace import Workspace

# How long a split waits for another process's dictionary check and write (a few seconds at most).
DICTIONARY_WAIT_S = 120.0


def stamp_path(ws: Workspace, split: str) -> Path:
    return ws.data_dir / f"{split}.stamp.json"


def skipped_path(ws: Workspace, split: str) -> Path:
    return ws.data_dir / f"skipped-{split}.tsv"


def converted_dir(ws: Workspace, split: str) -> Path:
    """Where --resample writes the split's 16 kHz mono FLAC files."""
    return ws.data_dir / "audio" / split


# --------------------------------------------------------------------------- locks and leftovers


def hold_split(ws: Workspace, split: str):
    """The lock on one split's files, for the whole prepare of it (a second prepare is refused)."""
    return hold(ws.data_dir / f".{split}.lock", f"prepare of split '{split}'")


@contextlib.contextmanager
def hold_dictionary(ws: Workspace, wait_s: float = DICTIONARY_WAIT_S) -> Iterator[None]:
    """The lock on data/dict.ltr.txt. Other holders keep it for a moment only, so wait for them."""
    with hold_waiting(ws.data_dir / ".dict.ltr.txt.lock", "update of the letter dictionary", wait_s):
        yield


def clean_leftovers(ws: Workspace, split: str) -> None:
    """Remove the temp files that killed runs left in data/ and the split's converted audio."""
    removed = remove_stale_temps(ws.data_dir) + remove_stale_temps(converted_dir(ws, split), recursive=True)
    if removed:
        console.print(f"removed {len(removed)} temp file(s) left by an interrupted earlier run "
                      f"(e.g. {removed[0].name})")


# --------------------------------------------------------------------------- refusals


def _skip_rows(skipped: Sequence[Skip]) -> str:
    return "path\treason\tdetail\n" + "".join(
        f"{p}\t{r}\t{d.replace(chr(9), ' ').replace(chr(10), ' ')}\n" for p, r, d in skipped)


def _count_lines(path: Path) -> int:
    try:
        with open(path, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.strip())
    except OSError:
        return 0


def _kept_note(ws: Workspace, split: str) -> str:
    n = _count_lines(ws.manifest(split))
    if n:
        return f"{ws.manifest(split)} ({n} utterances, from an earlier run) was kept"
    return f"no manifest was written for '{split}'"


def refuse_incomplete(ws: Workspace, split: str, num_files: int, records: list[Record], skipped: list[Skip],
                      strict: bool, source: str = "") -> None:
    """Raise before any manifest is written: with `strict`, on any skip; always, when nothing is left.

    The skip list is written first, so the error can point at every problem, not just the first.
    """
    if skipped and (strict or not records):
        ws.data_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(skipped_path(ws, split), _skip_rows(skipped))
    if strict and skipped:
        path, reason, detail = skipped[0]
        raise PrepareError(
            f"--strict: {path} would be skipped ({reason}: {detail}); {len(skipped)} problem(s) in split "
            f"'{split}', all listed in {skipped_path(ws, split)}. Fix them or drop --strict to skip them "
            f"({_kept_note(ws, split)})."
        )
    if records:
        return
    where = f" in {source}" if source else ""
    if not skipped:
        cause = f"no audio files were found{where}"
    else:
        counts = Counter(r for _, r, _ in skipped)
        path, reason, detail = skipped[0]
        what = f"all {num_files} audio file(s){where} were skipped" if num_files else f"no usable audio{where}"
        cause = (f"{what} ({', '.join(f'{n} {r}' for r, n in counts.most_common())}; e.g. {path}: {reason}: "
                 f"{detail}); see {skipped_path(ws, split)}")
    raise PrepareError(
        f"split '{split}' would be empty: {cause}. An empty manifest would train on nothing and score "
        f"'WER 0.00', so it is not written ({_kept_note(ws, split)}). Fix the input and re-run."
    )


# --------------------------------------------------------------------------- the dictionary


def check_dictionary(ws: Workspace, split: str, records: list[Record]) -> None:
    """An error if the split's text has characters outside the existing data/dict.ltr.txt (see the module doc)."""
    if not ws.dictionary.exists():
        return
    vocab = Vocab.load(ws.dictionary)
    unknown: Counter = Counter()
    example = ""
    for r in records:
        bad = vocab.unknown_chars(r.text)
        if bad and not example:
            example = r.id
        unknown.update(bad)
    if not unknown:
        return
    chars = " ".join(repr(c) for c, _ in unknown.most_common(20))
    raise PrepareError(
        f"split '{split}' has characters that are not in the workspace's letter dictionary {ws.dictionary}: "
        f"{chars} (e.g. utterance {example}). Every split and every model fine-tuned here shares that "
        f"dictionary, so d2v does not change it ({_kept_note(ws, split)}). Fix: drop --keep-text if you passed "
        f"it, so the text is normalized like the other splits; or prepare this split in a workspace of its own "
        f"(--workdir); or delete {ws.dictionary} and prepare every split again to build a new one (models "
        f"fine-tuned on the old dictionary will not match it)."
    )


def update_dictionary(ws: Workspace) -> Optional[Path]:
    """Create data/dict.ltr.txt from the text of every manifest in data/ if it does not exist; if it
    does, refresh its letter counts only when its symbols stay exactly the same. Call it holding
    `hold_dictionary`.

    A new dictionary has fairseq's order and specials (`Vocab.librispeech()`) whenever the
    letters fit it, otherwise letters by frequency. Counts are letter counts, as in fairseq's file.
    """
    counts: Counter = Counter()
    texts = []
    for m in sorted(ws.data_dir.glob("*.jsonl")):
        for r in read_manifest(m):
            if r.text:
                texts.append(r.text)
                counts.update(to_letters(r.text).split())
    path = ws.dictionary
    if path.exists():
        old = path.read_text(encoding="utf-8")
        symbols = [line.split()[0] for line in old.splitlines() if line.strip()]
        vocab = Vocab.load(path)
        if symbols != list(vocab.symbols) or not texts:
            return path  # specials or comments of the user's own: leave the file exactly as it is
    elif not texts:
        return None
    else:
        vocab, old = Vocab.from_texts(texts), None
    content = "".join(f"{s} {counts.get(s, 0)}\n" for s in vocab.symbols)
    if content != old:
        vocab.save(path, dict(counts))
    return path


# --------------------------------------------------------------------------- writing a split


def summarize_split(ws: Workspace, split: str, records: list[Record], skipped: list[Skip],
                    normalized: int) -> SplitSummary:
    """The table row of a freshly written split (also saved in its stamp)."""
    counts = {r: 0 for r in SKIP_REASONS}
    for _, reason, _ in skipped:
        counts[reason] += 1
    return SplitSummary(
        split=split, status="written", utterances=len(records),
        seconds=round(sum(r.num_samples for r in records) / SAMPLE_RATE, 3),
        skipped={r: n for r, n in counts.items() if n},
        outputs=[str(ws.manifest(split))] + ([str(skipped_path(ws, split))] if skipped else []),
        normalized=normalized, orphan_transcripts=counts["no-audio"],
    )


def _prune_converted(ws: Workspace, split: str, records: list[Record]) -> None:
    """Converted audio the new manifest no longer points to (a changed or removed source) is deleted."""
    d = converted_dir(ws, split)
    if not d.is_dir():
        return
    used = {r.path for r in records}
    for f in d.rglob("*.flac"):
        if str(f) not in used:
            f.unlink(missing_ok=True)


def _write_files(ws: Workspace, split: str, records: list[Record], skipped: list[Skip], fingerprint: str,
                 summary: SplitSummary) -> None:
    ws.data_dir.mkdir(parents=True, exist_ok=True)
    if skipped:
        atomic_write_text(skipped_path(ws, split), _skip_rows(skipped))
    elif skipped_path(ws, split).exists():
        skipped_path(ws, split).unlink()  # stale list from an earlier run
    write_manifest(ws.manifest(split), records)
    atomic_write_text(stamp_path(ws, split), json.dumps({"fingerprint": fingerprint, "summary": asdict(summary)},
                                                        indent=1))


def write_split(ws: Workspace, split: str, records: list[Record], skipped: list[Skip], fingerprint: str,
                summary: SplitSummary, labeled: bool) -> None:
    """Step 6: the skip list, the manifest, then the stamp that marks the split complete, each atomically;
    for a labeled split the dictionary check, the writes and the dictionary update are one locked step."""
    if labeled:
        with hold_dictionary(ws):
            check_dictionary(ws, split, records)
            _write_files(ws, split, records, skipped, fingerprint, summary)
            update_dictionary(ws)
    else:
        _write_files(ws, split, records, skipped, fingerprint, summary)
    _prune_converted(ws, split, records)
    if skipped:
        console.print(f"[yellow]{split}: skipped {len(skipped)} file(s), see {skipped_path(ws, split)}[/]")


def finish(ws: Workspace, command: str, splits: list[SplitSummary], labeled: bool,
           notes: Optional[list[str]] = None) -> PrepareSummary:
    """After the splits of a command: the summary the CLI prints, with its notes (and, for a labeled
    command whose splits were all up to date, the dictionary if someone deleted it)."""
    dictionary = None
    if labeled:
        if ws.dictionary.exists():
            dictionary = ws.dictionary
        else:
            with hold_dictionary(ws):
                dictionary = update_dictionary(ws)
    notes = list(notes or [])
    for s in splits:
        if s.orphan_transcripts:
            notes.append(f"{s.split}: {s.orphan_transcripts} transcript line(s) have no audio file "
                         f"(listed as no-audio in {skipped_path(ws, s.split)})")
    return PrepareSummary(command, splits, str(dictionary) if dictionary else None, notes, str(ws.root))
