"""`d2v prepare librilight`: unlabeled Libri-light, cut into segments by its voice activity.

    d2v prepare librilight --root /data/librilight --subset small [--max-seconds 30]

Each `<subset>/<speaker>/<book>/<file>.flac` has a `<file>.json` next to it whose
`voice_activity` lists [onset, offset] chunks in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from d2vcli.audio import SAMPLE_RATE
from d2vcli.prepare.outputs import finish
from d2vcli.prepare.pipeline import (
    Item, Segmenter, SplitOptions, id_key, prepare_split, resolve_root, stat_item, walk_audio,
)
from d2vcli.prepare.result import PrepareError, PrepareSummary, Skip
from d2vcli.workspace import Workspace

LIBRILIGHT_SUBSETS = ("small", "medium", "large")


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


def _vad_segmenter(max_seconds: float) -> Segmenter:
    """The `segment` step of the pipeline: an item's VAD segments; none inside the audio skips it."""

    def segment(item: Item, num_samples: int) -> list[tuple[int, int]]:
        segs = vad_segments(item.vad, num_samples, max_seconds)
        if not segs:
            raise PrepareError("no voice activity inside the audio")
        return segs

    return segment


def _walk_subset(sub: Path) -> tuple[list[Item], list[tuple[str, int, int]], list[Skip]]:
    """The subset's audio files with their VAD read from the `.json` next to each, those json files,
    and the walk's skips."""
    items = []
    json_files = []
    skips: list[Skip] = []
    for e in walk_audio(sub, frozenset({".flac"}), skips):
        rel = Path(e.path).relative_to(sub)
        item = stat_item(e, "-".join(rel.with_suffix("").parts))
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
    items.sort(key=lambda it: id_key(it.id))
    return items, json_files, skips


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
    path = resolve_root(root, "D2V_LIBRILIGHT", "Libri-light", "/path/to/librilight (the directory holding small/)")
    if not (path / subset).is_dir() and path.name == subset:
        path = path.parent
    sub = path / subset
    if not sub.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise PrepareError(f"no {subset}/ in {path} (found: {', '.join(found) or 'no directories'}); pass --root "
                           f"the directory that holds {subset}/")
    items, json_files, skips = _walk_subset(sub)
    split = f"librilight-{subset}"
    opts = SplitOptions("librilight", labeled=False, vocab=None, resample=resample, strict=strict,
                        extra={"max_seconds": max_seconds})
    result = prepare_split(ws, split, items, opts, json_files, skips, workers, segment=_vad_segmenter(max_seconds),
                           source=str(sub))
    return finish(ws, "librilight", [result], labeled=False)
