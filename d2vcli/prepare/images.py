"""`d2v prepare images ROOT`: an ImageNet-style or ImageFolder tree into image manifests.

    d2v prepare images /data/imagenet [--splits train,val] [--strict] [--min-side 32]
    d2v prepare images /data/my-classes --split train     # ROOT itself holds the class folders

Layout: if ROOT has a folder named like a split (train, val, validation, test, dev), every
folder of ROOT is a split and holds one folder per class (`train/<class>/...`, files found
recursively inside the class folder); otherwise ROOT itself is one split (named by --split,
default ROOT's name) whose folders are the classes. ImageNet's validation images must sit in
class folders too (the usual `valprep.sh` layout).

Outputs, under `<workdir>/data/images/` (apart from the speech manifests, whose readers expect
audio records):

    <split>.jsonl        one line per image: id, path, class, label, width, height, mode, format, tiny
    classes.txt          one class name per line; line k is label k. Written by the first prepare;
                         later splits must use its classes (a new one is an error, never a silent renumbering)
    skipped-<split>.tsv  path, reason, detail of every file left out
    <split>.stamp.json   the inputs' fingerprint: an unchanged split is "up to date" and not read again

The pipeline is speech prepare's (`pipeline.py`, `outputs.py`): the walk follows symlinks once
per directory; the headers are scanned in parallel (PIL reads the header, and a JPEG or PNG must
end with its end marker, so a truncated copy is found here, not hours into training; other formats
are decoded in full); every write is atomic; one process at a time holds a split's lock; temp
files of killed runs are removed; `--strict` makes any skip an error and a split with nothing
left is always one. Zero-byte, unreadable, truncated and non-image files are skipped; grayscale,
palette and CMYK images are kept, counted and converted to RGB when loaded (their `mode` is in
the manifest); images whose shorter side is under `min_side` are kept and flagged `tiny`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

from PIL import Image, UnidentifiedImageError

from d2vcli.fileio import atomic_write_jsonl, atomic_write_text, remove_stale_temps
from d2vcli.locks import hold, hold_waiting
from d2vcli.prepare.pipeline import map_in_batches, split_list, walk_audio
from d2vcli.prepare.result import PrepareError, Skip
from d2vcli.ui import console, progress, table
from d2vcli.workspace import Workspace

STAMP_VERSION = 1
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLIT_NAMES = frozenset({"train", "val", "validation", "test", "dev", "valid"})
# Bytes read at the end of a JPEG/PNG for its end marker; writers may pad a little after it.
TAIL_BYTES = 4096
POOL_MIN_FILES = 2048
MIN_SIDE = 32
CLASSES_WAIT_S = 120.0  # how long a prepare waits for another one's classes.txt check (a moment at most)
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})
ImageSkipReason = Literal["empty", "unreadable", "truncated", "not-image", "no-class", "symlink-loop",
                          "duplicate-dir"]


class _AnyName(frozenset):
    """The walk's extension filter, letting every file through: non-image files are listed, not ignored."""

    def __contains__(self, item) -> bool:
        return True


def images_dir(ws: Workspace) -> Path:
    return ws.data_dir / "images"


def image_manifest(ws: Workspace, split: str) -> Path:
    return images_dir(ws) / f"{split}.jsonl"


def classes_path(ws: Workspace) -> Path:
    return images_dir(ws) / "classes.txt"


# --------------------------------------------------------------------------- results


@dataclass
class ImageSplitSummary:
    split: str
    status: Literal["written", "up to date"]
    images: int
    classes: int
    skipped: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)  # "grayscale"/"cmyk"/"other" -> images converted at load
    tiny: int = 0
    outputs: list[str] = field(default_factory=list)


@dataclass
class ImagePrepareSummary:
    command: str
    splits: list[ImageSplitSummary]
    classes_file: str
    notes: list[str] = field(default_factory=list)
    dictionary: Optional[str] = None  # the speech summaries' field; images have classes_file instead

    def split(self, name: str) -> ImageSplitSummary:
        return next(s for s in self.splits if s.split == name)

    def table(self):
        rows = []
        for s in self.splits:
            skipped = ", ".join(f"{n} {r}" for r, n in sorted(s.skipped.items())) or "0"
            conv = ", ".join(f"{n} {m}" for m, n in sorted(s.converted.items())) or "0"
            rows.append([s.split, s.status, s.images, s.classes, skipped, conv, s.tiny, "\n".join(s.outputs)])
        return table(f"d2v prepare {self.command}", ["split", "status", "images", "classes", "skipped",
                                                     "to RGB", "tiny", "outputs"], rows)


# --------------------------------------------------------------------------- walking


@dataclass
class _File:
    path: str
    cls: str
    rel: str  # relative to the split folder, without extension: the image's id
    size: int
    mtime_ns: int


def find_splits(root: Path, split: Optional[str], exclude: Optional[Path] = None) -> dict[str, Path]:
    """{split name: folder}: ROOT's folders (but `exclude`, the workspace) when one is named like a
    split, else ROOT itself."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and (exclude is None or p.resolve() != Path(exclude).resolve()))
    if any(p.name.lower() in SPLIT_NAMES for p in folders):
        if split is not None:
            raise PrepareError(f"{root} holds split folders ({', '.join(p.name for p in folders)}); --split names "
                               f"the one split of a folder of class folders. Use --splits to choose among them")
        return {p.name: p for p in folders}
    name = split or root.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise PrepareError(f"split name {name!r} must be letters, digits, '.', '_' or '-'; pass --split NAME")
    return {name: root}


def walk_split(folder: Path, skips: list[Skip], exclude: Optional[Path] = None) -> list[_File]:
    """Every file under the split's class folders (outside `exclude`, the workspace), sorted; files
    outside a class folder and non-image files are appended to `skips`."""
    files: list[_File] = []
    prefix = len(str(folder)) + 1
    for e in walk_audio(folder, _AnyName(), skips, exclude=exclude):
        rel = e.path[prefix:].replace(os.sep, "/")
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # .DS_Store, editor files, our own temp files
        if "/" not in rel:
            skips.append((e.path, "no-class", "not inside a class folder; move it into <split>/<class>/"))
            continue
        if os.path.splitext(e.name)[1].lower() not in IMAGE_EXTENSIONS:
            skips.append((e.path, "not-image", f"not an image file name ({', '.join(sorted(IMAGE_EXTENSIONS))})"))
            continue
        st = e.stat()
        files.append(_File(e.path, rel.split("/", 1)[0], os.path.splitext(rel)[0], st.st_size, st.st_mtime_ns))
    files.sort(key=lambda f: f.rel)
    return files


# --------------------------------------------------------------------------- the header scan


@dataclass(frozen=True)
class ImageHeader:
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str = ""
    error: str = ""  # "reason: detail", "" when usable


def _tail_ok(path: str, fmt: str) -> bool:
    with open(path, "rb") as fh:
        fh.seek(max(0, os.path.getsize(path) - TAIL_BYTES))
        tail = fh.read()
    if fmt == "JPEG":
        return b"\xff\xd9" in tail
    return b"IEND" in tail[-64:]  # PNG: the IEND chunk closes the file (its CRC follows)


def read_image_header(path: str) -> ImageHeader:
    """Size, mode and format of one image, or why it is unusable."""
    try:
        if os.path.getsize(path) == 0:
            return ImageHeader(error="empty: zero-byte file")
        with Image.open(path) as im:
            w, h, mode, fmt = im.width, im.height, im.mode, im.format or ""
            if fmt in ("JPEG", "PNG"):
                if not _tail_ok(path, fmt):
                    return ImageHeader(w, h, mode, fmt, f"truncated: the {fmt} data stops before its end marker "
                                                        "(an interrupted copy or download)")
            else:
                im.load()  # formats without a cheap end check are decoded in full
    except UnidentifiedImageError:
        return ImageHeader(error="unreadable: not an image PIL can read (corrupt, or another file type)")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        text = str(e).strip() or type(e).__name__
        reason = "truncated" if "truncated" in text.lower() else "unreadable"
        return ImageHeader(error=f"{reason}: {text}")
    if w <= 0 or h <= 0:
        return ImageHeader(w, h, mode, fmt, "empty: the image has no pixels")
    return ImageHeader(w, h, mode, fmt)


def _read_headers(paths: list[str]) -> list[ImageHeader]:
    return [read_image_header(p) for p in paths]


def scan_images(paths: Sequence[str], workers: int = 0, on_progress=None, batch: int = 256) -> list[ImageHeader]:
    """The headers of `paths`, in order; a process pool from POOL_MIN_FILES files on (0 workers = all cores)."""
    return map_in_batches(_read_headers, paths, workers, "process", on_progress, batch, min_pool=POOL_MIN_FILES)


# --------------------------------------------------------------------------- classes


def read_classes(ws: Workspace) -> Optional[list[str]]:
    path = classes_path(ws)
    if not path.exists():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@contextlib.contextmanager
def hold_classes(ws: Workspace, wait_s: float = CLASSES_WAIT_S) -> Iterator[None]:
    """The lock on classes.txt. Other prepares hold it for a moment only (a read and maybe one write), so
    wait for them, as speech prepare waits for the letter dictionary."""
    with hold_waiting(images_dir(ws) / ".classes.lock", "update of the image classes file", wait_s):
        yield


def settle_classes(ws: Workspace, found: dict[str, list[str]]) -> list[str]:
    """classes.txt: created from every split's classes (sorted) if absent; else every split must fit it."""
    existing = read_classes(ws)
    union = sorted({c for names in found.values() for c in names})
    if existing is None:
        atomic_write_text(classes_path(ws), "".join(f"{c}\n" for c in union))
        return union
    for split, names in found.items():
        new = sorted(set(names) - set(existing))
        if new:
            shown = ", ".join(new[:10]) + (" ..." if len(new) > 10 else "")
            raise PrepareError(
                f"split '{split}' has class folders that are not in {classes_path(ws)}: {shown}. Its line numbers "
                f"are the labels of every split and model prepared here, so d2v does not renumber them. Fix: "
                f"prepare this tree in another --workdir, or delete {classes_path(ws)} and prepare every split "
                f"again (classifiers trained on the old labels will not match).")
    return existing


# --------------------------------------------------------------------------- one split


def _fingerprint(files: list[_File], walk_skips: list[Skip], classes: list[str], opts: dict) -> str:
    h = hashlib.sha256(json.dumps({"version": STAMP_VERSION, "classes": classes, **opts}, sort_keys=True).encode())
    for f in files:
        h.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\n".encode())
    for row in sorted(walk_skips):
        h.update(("\0".join(row) + "\n").encode())
    return h.hexdigest()


def _skip_rows(skipped: Sequence[Skip]) -> str:
    return "path\treason\tdetail\n" + "".join(
        f"{p}\t{r}\t{d.replace(chr(9), ' ').replace(chr(10), ' ')}\n" for p, r, d in skipped)


def _converted_kind(mode: str) -> Optional[str]:
    if mode == "RGB":
        return None
    if mode in GRAYSCALE_MODES:
        return "grayscale"
    return "cmyk" if mode == "CMYK" else "other"


def prepare_image_split(ws: Workspace, split: str, files: list[_File], walk_skips: list[Skip], classes: list[str],
                        strict: bool, min_side: int, workers: int) -> ImageSplitSummary:
    """Fingerprint, scan, validate and write one split (see the module docstring)."""
    out_dir = images_dir(ws)
    stamp = out_dir / f"{split}.stamp.json"
    skipped_file = out_dir / f"skipped-{split}.tsv"
    fp = _fingerprint(files, walk_skips, classes, {"strict": strict, "min_side": min_side})
    with hold(out_dir / f".{split}.lock", f"prepare of image split '{split}'"):
        removed = remove_stale_temps(out_dir)
        if removed:
            console.print(f"removed {len(removed)} temp file(s) left by an interrupted earlier run")
        try:
            saved = json.loads(stamp.read_text())
            if saved.get("fingerprint") == fp and image_manifest(ws, split).exists():
                return ImageSplitSummary(**{**saved["summary"], "status": "up to date"})
        except (OSError, ValueError, TypeError):
            pass
        with progress() as bar:
            task = bar.add_task(f"scan {split}", total=len(files))
            headers = scan_images([f.path for f in files], workers, lambda n: bar.advance(task, n))
        label = {c: i for i, c in enumerate(classes)}
        records, skipped = [], list(walk_skips)
        converted: Counter = Counter()
        tiny = 0
        for f, h in zip(files, headers):
            if h.error:
                reason, _, detail = h.error.partition(": ")
                skipped.append((f.path, reason, detail))
                continue
            kind = _converted_kind(h.mode)
            if kind:
                converted[kind] += 1
            small = min(h.width, h.height) < min_side
            tiny += small
            records.append({"id": f.rel, "path": f.path, "class": f.cls, "label": label[f.cls], "width": h.width,
                            "height": h.height, "mode": h.mode, "format": h.format, "tiny": small})
        if skipped and (strict or not records):
            atomic_write_text(skipped_file, _skip_rows(skipped))
        kept = image_manifest(ws, split)
        kept_note = f"{kept} from an earlier run was kept" if kept.exists() else "no manifest was written"
        if strict and skipped:
            path, reason, detail = skipped[0]
            raise PrepareError(f"--strict: {path} would be skipped ({reason}: {detail}); {len(skipped)} problem(s) "
                               f"in split '{split}', all listed in {skipped_file}. Fix them or drop --strict "
                               f"({kept_note}).")
        if not records:
            cause = (f"all {len(files)} image file(s) were skipped (see {skipped_file})" if skipped
                     else "no image files were found in its class folders")
            raise PrepareError(f"split '{split}' would be empty: {cause}. An empty manifest would train on nothing, "
                               f"so it is not written ({kept_note}). Fix the input and re-run.")
        if skipped:
            atomic_write_text(skipped_file, _skip_rows(skipped))
        elif skipped_file.exists():
            skipped_file.unlink()  # a stale list from an earlier run
        atomic_write_jsonl(kept, records)
        summary = ImageSplitSummary(
            split=split, status="written", images=len(records), classes=len({r["class"] for r in records}),
            skipped=dict(Counter(r for _, r, _ in skipped)), converted=dict(converted), tiny=tiny,
            outputs=[str(kept)] + ([str(skipped_file)] if skipped else []))
        atomic_write_text(stamp, json.dumps({"fingerprint": fp, "summary": asdict(summary)}, indent=1))
    if skipped:
        console.print(f"[yellow]{split}: skipped {len(skipped)} file(s), see {skipped_file}[/]")
    return summary


def prepare_images(ws: Workspace, root: Path | str, splits: Optional[Sequence[str]] = None,
                   split: Optional[str] = None, strict: bool = False, min_side: int = MIN_SIDE,
                   workers: int = 0) -> ImagePrepareSummary:
    """Manifests for the splits of an ImageNet-style tree, or for one ImageFolder (see the module docstring)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise PrepareError(f"{root} is not a directory: pass the folder holding train/<class>/... (or the classes)")
    found = find_splits(root, split, exclude=ws.root)
    wanted = split_list(splits)
    if wanted:
        missing = [s for s in wanted if s not in found]
        if missing:
            raise PrepareError(f"no split folder {', '.join(missing)} in {root} (found: {', '.join(found)})")
        found = {s: found[s] for s in wanted}
    images_dir(ws).mkdir(parents=True, exist_ok=True)
    walked: dict[str, tuple[list[_File], list[Skip]]] = {}
    for name, folder in found.items():
        skips: list[Skip] = []
        walked[name] = (walk_split(folder, skips, exclude=ws.root), skips)
    with hold_classes(ws):
        classes = settle_classes(ws, {s: sorted({f.cls for f in fs}) for s, (fs, _) in walked.items()})
    results = [prepare_image_split(ws, name, fs, skips, classes, strict, min_side, workers)
               for name, (fs, skips) in walked.items()]
    notes = [f"classes: {classes_path(ws)} ({len(classes)} classes; line k is label k)"]
    for s in results:
        if s.tiny:
            notes.append(f"{s.split}: {s.tiny} image(s) have a side under {min_side} px (flagged tiny in the manifest; "
                         f"they are upscaled by the crop)")
        if s.converted:
            notes.append(f"{s.split}: {sum(s.converted.values())} image(s) are not RGB "
                         f"({', '.join(f'{n} {k}' for k, n in sorted(s.converted.items()))}); converted when loaded")
    return ImagePrepareSummary("images", results, str(classes_path(ws)), notes)
