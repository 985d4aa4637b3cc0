"""fairseq's data layout, out and in: `d2v prepare fairseq-export` and `d2v prepare fairseq-import`.

    d2v prepare fairseq-export --out DIR [--splits ...]
    d2v prepare fairseq-import DIR [--splits ...]

A fairseq data dir (fairseq examples/wav2vec/wav2vec_manifest.py and libri_labels.py) holds
`<name>.tsv` (the audio root on the first line, then `relpath<TAB>num_samples`), the labels
`<name>.ltr` (letters, `|` between words) and `<name>.wrd` (words), and `dict.ltr.txt`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

from d2vcli.fileio import atomic_write_text, remove_stale_temps
from d2vcli.manifest import read_manifest
from d2vcli.prepare.librilight import LIBRILIGHT_SUBSETS
from d2vcli.prepare.librilight_limited import LIMITED_SPLITS
from d2vcli.prepare.librispeech import LIBRISPEECH_SPLITS
from d2vcli.prepare.outputs import finish
from d2vcli.prepare.pipeline import Item, SplitOptions, prepare_split, split_list
from d2vcli.prepare.result import PrepareError, PrepareSummary, SplitSummary
from d2vcli.synthetic import SPLITS as SYNTHETIC_SPLITS
from d2vcli.vocab import Vocab, from_letters, to_letters
from d2vcli.workspace import Workspace


def fairseq_name(split: str) -> str:
    """fairseq's configs name splits with underscores (valid_subset: dev_other)."""
    return split.replace("-", "_")


def _known_split_names() -> dict[str, str]:
    names = (LIBRISPEECH_SPLITS + LIMITED_SPLITS + SYNTHETIC_SPLITS
             + tuple(f"librilight-{s}" for s in LIBRILIGHT_SUBSETS))
    return {fairseq_name(n): n for n in names}


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    atomic_write_text(path, text)
    return True


# --------------------------------------------------------------------------- export


def fairseq_export(ws: Workspace, out: Path | str, splits: Optional[Sequence[str]] = None) -> PrepareSummary:
    """Write fairseq's files: <name>.tsv (root line, then relpath<TAB>num_samples), .ltr, .wrd, dict.ltr.txt.

    .ltr/.wrd are written when every record of the split has text. Files whose
    content would not change are not rewritten (the split reports "up to date").
    """
    out = Path(out).expanduser().resolve()
    remove_stale_temps(out)  # what a killed earlier export left
    splits = split_list(splits)
    if not splits:
        splits = sorted(p.stem for p in ws.data_dir.glob("*.jsonl")) if ws.data_dir.exists() else []
        if not splits:
            raise PrepareError(f"no manifests in {ws.data_dir}; run a `d2v prepare` command first or pass --workdir")
    results = []
    for split in splits:
        results.append(_export_split(ws, out, split))
    dictionary = None
    if ws.dictionary.exists():
        dictionary = out / "dict.ltr.txt"
        _write_if_changed(dictionary, ws.dictionary.read_text(encoding="utf-8"))
    return PrepareSummary("fairseq-export", results, str(dictionary) if dictionary else None,
                          [f"fairseq data dir: {out} (task.data={out})"], str(ws.root))


def _export_split(ws: Workspace, out: Path, split: str) -> SplitSummary:
    """One manifest as <name>.tsv, plus .ltr and .wrd when every record has text."""
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
    return SplitSummary(
        split=split, status="written" if any(changed) else "up to date", utterances=len(records),
        seconds=round(sum(r.seconds for r in records), 3), outputs=[str(p) for p in files],
    )


# --------------------------------------------------------------------------- import


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
    names = split_list(splits) or sorted(p.stem for p in src.glob("*.tsv"))
    if not names:
        raise PrepareError(f"no .tsv files in {src}")
    vocab = Vocab.load(src / "dict.ltr.txt") if (src / "dict.ltr.txt").exists() else Vocab.librispeech()
    known = _known_split_names()
    results = []
    labeled_any = False
    for name in names:
        name = fairseq_name(name) if fairseq_name(name) in known else name
        items, labeled, other = _read_fairseq_split(src, name)
        labeled_any |= labeled
        opts = SplitOptions("fairseq-import", labeled=labeled, vocab=vocab, resample=resample, strict=strict)
        results.append(prepare_split(ws, known.get(name, name), items, opts, other, (), workers,
                                     source=str(src / f"{name}.tsv")))
    return finish(ws, "fairseq-import", results, labeled=labeled_any)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not a UTF-8 text file (byte {e.start}); a fairseq data dir holds "
                           f"<split>.tsv/.ltr/.wrd text files") from None


def _read_labels(src: Path, name: str, tsv: Path, rows: int) -> tuple[Optional[list[str]], Optional[Path]]:
    """The transcripts from <name>.ltr, else <name>.wrd (None, None if neither exists), and that file."""
    for ext in ("ltr", "wrd"):
        p = src / f"{name}.{ext}"
        if p.exists():
            raw = _read_text(p).splitlines()
            if len(raw) != rows:
                raise PrepareError(f"{p} has {len(raw)} lines but {tsv.name} has {rows} rows; "
                                   f"they must match line by line")
            return [from_letters(x) if ext == "ltr" else " ".join(x.split()) for x in raw], p
    return None, None


def _read_fairseq_split(src: Path, name: str) -> tuple[list[Item], bool, list[tuple[str, int, int]]]:
    """The items of <name>.tsv with their labels, whether it has labels, and the stats of the files read."""
    tsv = src / f"{name}.tsv"
    if not tsv.exists():
        raise PrepareError(f"no {tsv.name} in {src} (have: {', '.join(p.name for p in sorted(src.glob('*.tsv')))})")
    lines = _read_text(tsv).splitlines()
    if not lines:
        raise PrepareError(f"{tsv} is empty; its first line must be the audio root directory")
    base = Path(lines[0].strip())
    rows = [ln.split("\t") for ln in lines[1:] if ln.strip()]
    labels, label_file = _read_labels(src, name, tsv, len(rows))
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
    return items, labels is not None, other
