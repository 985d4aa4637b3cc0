"""`d2v prepare folder`: any folder of audio, with transcripts from sidecar files or a CSV/TSV listing.

    d2v prepare folder /data/my-audio [--split NAME] [--transcripts FILE.csv] [--resample] [--keep-text]
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Optional

import soundfile as sf

from d2vcli.prepare.outputs import finish
from d2vcli.prepare.pipeline import Item, SplitOptions, prepare_split, stat_item, walk_audio
from d2vcli.prepare.result import PrepareError, PrepareSummary, Skip
from d2vcli.vocab import Vocab, normalize_text
from d2vcli.workspace import Workspace

PATH_COLUMNS = ("path", "file", "file_name", "filename", "audio", "audio_path", "audio_file")
TEXT_COLUMNS = ("text", "transcript", "transcription", "sentence", "sentences", "label", "words")


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


def _walk_folder(ws: Workspace, root: Path, table_texts: Optional[dict[Path, str]],
                 other_files: list[tuple[str, int, int]], skips: list[Skip], used: set[Path]) -> list[Item]:
    """Every audio file under `root`, sorted by relative path, with its transcript (from the table, whose
    keys found are added to `used`, or a `<file>.txt` sidecar, whose stat is appended to `other_files`);
    the walk's skips are appended to `skips`."""
    items: list[Item] = []
    seen: dict[str, int] = {}
    prefix = len(str(root)) + 1
    rels: dict[str, str] = {}
    # The workspace may sit inside the folder: never pick up our own resampled audio.
    for e in walk_audio(root, audio_extensions(), skips, exclude=ws.root):
        rel = e.path[prefix:].replace(os.sep, "/")
        stem, ext = os.path.splitext(rel)
        utt_id = re.sub(r"\s+", "_", stem)
        if utt_id in seen:
            utt_id = f"{utt_id}-{ext.lstrip('.').lower()}"
        seen[utt_id] = 1
        item = stat_item(e, utt_id)
        rels[utt_id] = rel
        item.speaker = rel.split("/", 1)[0] if "/" in rel else ""
        if table_texts is not None:
            for key in (item.path, item.path.resolve()):  # the table may name it through a symlink
                if key in table_texts:
                    item.text = table_texts[key]
                    used.add(key)
                    break
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
    if not items and not skips:
        raise PrepareError(f"no audio files in {root} (looked for {', '.join(sorted(audio_extensions()))})")
    items.sort(key=lambda it: rels[it.id])
    return items


def _missing_audio(table_texts: dict[Path, str], used: set[Path], table: Path, root: Path) -> list[Skip]:
    """A "no-audio" skip row for every listed file that is not among the audio found under `root`."""
    out = []
    for path in sorted(set(table_texts) - used):
        why = ("is not an audio file under the folder" if path.exists() else "does not exist")
        out.append((str(path), "no-audio", f"listed in {table.name} but {why} ({root})"))
    return out


def _normalize_texts(items: list[Item]) -> None:
    """Transcripts to the letter vocabulary's form, marking the items whose text changed."""
    for it in items:
        if it.text is not None:
            norm = normalize_text(it.text)
            it.normalized = norm != it.text
            it.text = norm


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

    skips: list[Skip] = []
    used: set[Path] = set()
    items = _walk_folder(ws, root, table_texts, other_files, skips, used)
    labeled = any(it.text is not None for it in items) or table_texts is not None
    if not keep_text:
        _normalize_texts(items)
    if table_texts is not None:
        skips += _missing_audio(table_texts, used, Path(transcripts), root)
    opts = SplitOptions("folder", labeled=labeled, vocab=None if keep_text else Vocab.librispeech(),
                        resample=resample, strict=strict, extra={"keep_text": keep_text})
    result = prepare_split(ws, split, items, opts, other_files, skips, workers, source=str(root))
    notes = [] if labeled else [f"{split}: no transcripts found, so the manifest is unlabeled (pretraining only)"]
    if result.normalized:
        notes.append(f"{split}: {result.normalized} transcript(s) changed by normalization (--keep-text keeps them)")
    return finish(ws, "folder", [result], labeled=labeled, notes=notes)
