"""CTC emissions, computed once per checkpoint and manifest and cached on disk.

The acoustic model runs over a split in length-sorted batches, with the waveform normalization
stored in the checkpoint, and its log-probabilities are written as one float16 (frames, V)
array per split (`decode/<run>/emissions-<split>-<key>.npy`, utterances back to back) plus a
JSON index. The key hashes the checkpoint's bytes and the manifest's, so later decodes, tuning
runs and `d2v evaluate` read the cache; a new checkpoint or manifest recomputes.

An utterance whose audio cannot be read is left out of the split (it has no emissions, so it is
not decoded or scored) and named, with the reason, when it is met and whenever the cache is
read (`Emissions.skipped`). The index remembers each such file's size and mtime: once the file
is fixed or replaced, the cache is stale and the split is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from d2vcli.audio import SAMPLE_RATE, AudioError
from d2vcli.models.loading import load_ctc_model
from d2vcli.data import Item, collate_pad, load_audio
from d2vcli.decode.errors import DecodeError
from d2vcli.fileio import atomic_write_text
from d2vcli.manifest import num_frames, read_manifest
from d2vcli.models.audio import receptive_field
from d2vcli.ui import console, progress
from d2vcli.vocab import Vocab

EMISSIONS_VERSION = 1


@dataclass
class Emissions:
    """One split's log-probabilities on disk: a float16 (frames, V) .npy, utterances back to back,
    described by a JSON index (ids, lengths, references, the cache key)."""

    split: str
    index_path: Path
    data_path: Path
    key: str
    ids: list[str]
    refs: list[str]
    lengths: np.ndarray   # (N,) frames per utterance
    offsets: np.ndarray   # (N,) first row of each utterance
    tokens: list[str]
    frame_seconds: float
    audio_seconds: float
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why its audio could not be read
    rows: int = 0  # rows of the array (0: the sum of `lengths`); skipped utterances keep theirs unused
    _data: Optional[np.ndarray] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            self._data = np.load(self.data_path, mmap_mode="r")
        return self._data

    def __getitem__(self, i: int) -> np.ndarray:
        """(T, V) float32 log-probabilities of utterance i."""
        off, n = int(self.offsets[i]), int(self.lengths[i])
        return np.asarray(self.data[off:off + n], dtype=np.float32)


def emissions_index_path(out_dir: Path, split: str) -> Path:
    return Path(out_dir) / f"emissions-{split}.json"


class EmissionsWriter:
    """Fill a split's emission array utterance by utterance (any order), then publish it atomically."""

    def __init__(self, out_dir: Path, split: str, key: str, ids: Sequence[str], refs: Sequence[str],
                 lengths: Sequence[int], tokens: Sequence[str], frame_seconds: float, audio_seconds: float):
        self.out_dir, self.split, self.key = Path(out_dir), split, key
        self.ids, self.refs, self.tokens = list(ids), list(refs), list(tokens)
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.frame_seconds, self.audio_seconds = frame_seconds, audio_seconds
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.final = self.out_dir / f"emissions-{split}-{key[:16]}.npy"
        self.tmp = self.out_dir / f".emissions-{split}-{key[:16]}.{os.getpid()}.tmp.npy"
        rows = max(1, int(self.lengths.sum()))
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float16, shape=(rows, len(tokens)))
        self.written = np.zeros(len(self.ids), dtype=bool)
        self.skipped: dict[int, tuple[str, str]] = {}  # utterance -> (path, reason)

    def skip(self, i: int, path: str, reason: str) -> None:
        """Leave utterance i out: its audio could not be read."""
        self.skipped[i] = (str(path), reason)
        self.written[i] = True

    def write(self, i: int, lp: np.ndarray) -> None:
        n = int(self.lengths[i])
        if lp.shape != (n, len(self.tokens)):
            raise DecodeError(f"utterance {self.ids[i]}: expected ({n}, {len(self.tokens)}) log-probs, got {lp.shape}")
        self.array[self.offsets[i]:self.offsets[i] + n] = lp
        self.written[i] = True

    def close(self) -> Emissions:
        if not self.written.all():
            missing = [self.ids[i] for i in np.flatnonzero(~self.written)[:3]]
            raise DecodeError(f"emissions for {self.split} are incomplete (e.g. {missing})")
        if len(self.skipped) == len(self.ids):
            raise DecodeError(f"{self.split}: the audio of every utterance is unreadable, e.g. "
                              f"{next(iter(self.skipped.values()))[1]}")
        self.array.flush()
        rows = int(self.array.shape[0])
        del self.array
        os.replace(self.tmp, self.final)
        keep = [i for i in range(len(self.ids)) if i not in self.skipped]
        index = {
            "version": EMISSIONS_VERSION, "key": self.key, "split": self.split, "data": self.final.name,
            "tokens": self.tokens, "frame_seconds": self.frame_seconds, "audio_seconds": self.audio_seconds,
            "ids": [self.ids[i] for i in keep], "refs": [self.refs[i] for i in keep],
            "lengths": self.lengths[keep].tolist(), "offsets": self.offsets[keep].tolist(), "rows": rows,
            "skipped": [{"path": path, "reason": reason, "identity": _file_identity(path)}
                        for path, reason in self.skipped.values()],
        }
        index_path = emissions_index_path(self.out_dir, self.split)
        atomic_write_text(index_path, json.dumps(index) + "\n")
        for old in self.out_dir.glob(f"emissions-{self.split}-*.npy"):
            if old != self.final:
                old.unlink(missing_ok=True)
        return load_emissions(self.out_dir, self.split, self.key)  # type: ignore[return-value]

    def abort(self) -> None:
        if hasattr(self, "array"):
            del self.array
        self.tmp.unlink(missing_ok=True)


def save_emissions(out_dir: Path, split: str, arrays: Sequence[np.ndarray], ids: Sequence[str],
                   refs: Sequence[str], tokens: Sequence[str], key: str = "constructed",
                   frame_seconds: float = 0.02) -> Emissions:
    """Cache given (T, V) log-probability arrays as a split (tests, benchmarks, other acoustic models)."""
    lengths = [len(a) for a in arrays]
    w = EmissionsWriter(out_dir, split, key, ids, refs, lengths, tokens, frame_seconds,
                        audio_seconds=sum(lengths) * frame_seconds)
    try:
        for i, a in enumerate(arrays):
            w.write(i, np.asarray(a))
        return w.close()
    except BaseException:
        w.abort()
        raise


def load_emissions(out_dir: Path, split: str, key: Optional[str] = None) -> Optional[Emissions]:
    """The cached emissions of `split`, or None when absent, stale (other key) or damaged."""
    index_path = emissions_index_path(out_dir, split)
    if not index_path.exists():
        return None
    try:
        idx = json.loads(index_path.read_text())
    except ValueError:
        return None
    if idx.get("version") != EMISSIONS_VERSION or (key is not None and idx.get("key") != key):
        return None
    data_path = Path(out_dir) / idx["data"]
    if not data_path.exists():
        return None
    skipped = idx.get("skipped") or []
    if any(_file_identity(s["path"]) != s.get("identity") for s in skipped):
        return None  # an unreadable file was fixed or replaced since: recompute the split
    lengths = np.asarray(idx["lengths"], dtype=np.int64)
    offsets = (np.asarray(idx["offsets"], dtype=np.int64) if "offsets" in idx
               else np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64))
    rows = int(idx.get("rows") or max(1, int(lengths.sum())))
    em = Emissions(idx["split"], index_path, data_path, idx["key"], idx["ids"], idx["refs"], lengths,
                   offsets, idx["tokens"], float(idx["frame_seconds"]), float(idx["audio_seconds"]),
                   skipped={s["path"]: s["reason"] for s in skipped}, rows=rows)
    try:
        if em.data.shape != (rows, len(em.tokens)):
            return None
    except (ValueError, OSError):
        return None
    return em


# ============================================================================ cache keys


def _file_identity(path: str) -> list:
    """[size, mtime_ns] of a file, or [] when it is gone: what marks a skipped file as changed."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    return [st.st_size, st.st_mtime_ns]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_fingerprint(path: Path, memo_dir: Path) -> str:
    """sha256 of the checkpoint's bytes, memoized by (path, size, mtime) so it is hashed once."""
    path = Path(path).resolve()
    st = path.stat()
    identity = [str(path), st.st_size, st.st_mtime_ns]
    memo = Path(memo_dir) / "checkpoint.json"
    if memo.exists():
        try:
            m = json.loads(memo.read_text())
            if m.get("identity") == identity:
                return m["sha256"]
        except ValueError:
            pass
    digest = sha256_file(path)
    atomic_write_text(memo, json.dumps({"identity": identity, "sha256": digest}) + "\n")
    return digest


def emissions_key(checkpoint_sha: str, manifest: Path) -> str:
    payload = {"version": EMISSIONS_VERSION, "checkpoint": checkpoint_sha, "manifest": sha256_file(manifest)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ============================================================================ the acoustic model pass


def frame_seconds_of(conv_layers) -> float:
    """Seconds between two frames of the conv encoder (0.02 for the base stack)."""
    return receptive_field(conv_layers)[1] / SAMPLE_RATE


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def compute_emissions(model, vocab: Vocab, normalize: bool, records, out_dir: Path, split: str, key: str,
                      device=None, batch_size: int = 8) -> Emissions:
    """Run the CTC model over `records` (length-sorted batches) and cache the log-probabilities."""
    device = device or resolve_device()
    conv_layers = model.backbone.conv_layers
    lengths = [num_frames(r.num_samples, conv_layers) for r in records]
    too_short = [r.id for r, n in zip(records, lengths) if n <= 0]
    if too_short:
        raise DecodeError(f"{split}: {len(too_short)} utterances are shorter than one frame (e.g. {too_short[0]})")
    writer = EmissionsWriter(out_dir, split, key, [r.id for r in records], [r.text for r in records], lengths,
                             vocab.tokens, frame_seconds_of(conv_layers), sum(r.seconds for r in records))
    order = sorted(range(len(records)), key=lambda i: -records[i].num_samples)
    batches = [order[k:k + batch_size] for k in range(0, len(order), max(1, batch_size))]

    def load(batch):  # audio of the next batch is read while the model runs on this one
        items, readable = [], []
        for i in batch:
            try:
                items.append(Item(records[i].id, load_audio(records[i], normalize)))
                readable.append(i)
            except AudioError as e:
                writer.skip(i, records[i].path, str(e))
        return items, readable

    try:
        with ThreadPoolExecutor(1) as io_pool, progress() as bar, torch.inference_mode():
            task = bar.add_task(f"emissions {split}", total=len(records))
            pending = io_pool.submit(load, batches[0]) if batches else None
            for b in range(len(batches)):
                items, batch = pending.result()  # batch: the indices whose audio could be read
                pending = io_pool.submit(load, batches[b + 1]) if b + 1 < len(batches) else None
                if not items:
                    bar.advance(task, len(batches[b]))
                    continue
                col = collate_pad(items)
                pad = col.padding_mask
                out = model(col.source.to(device), padding_mask=pad.to(device) if bool(pad.any()) else None)
                lp = torch.log_softmax(out["logits"].float(), dim=-1).cpu().numpy()  # (B, T, V)
                for row, i in enumerate(batch):
                    n = lengths[i]
                    if lp.shape[1] < n:
                        raise DecodeError(f"model gave {lp.shape[1]} frames for {records[i].id}, expected {n}")
                    writer.write(i, lp[row, :n])
                bar.advance(task, len(batches[b]))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def get_emissions(ws, checkpoint: Path, splits: Sequence[str], out_dir: Path, batch_size: int = 8,
                  trust: bool = False, device: str = "auto") -> tuple[dict[str, Emissions], int]:
    """Cached emissions for each split, computing (and caching) the missing or stale ones.

    Returns ({split: Emissions}, number of splits the model had to run on). The model is
    loaded only if some split is missing.
    """
    fingerprint = checkpoint_fingerprint(checkpoint, out_dir)
    out: dict[str, Emissions] = {}
    todo = []
    for split in splits:
        manifest = ws.require_manifest(split)
        key = emissions_key(fingerprint, manifest)
        em = load_emissions(out_dir, split, key)
        if em is None:
            todo.append((split, manifest, key))
        else:
            out[split] = em
    if todo:
        model, vocab, normalize, _ = load_ctc_model(checkpoint, trust=trust)
        dev = resolve_device(device)
        model.to(dev)
        console.print(f"computing emissions with {checkpoint} on {dev} (normalize={normalize}, from the checkpoint)")
        for split, manifest, key in todo:
            records = read_manifest(manifest)
            out[split] = compute_emissions(model, vocab, normalize, records, out_dir, split, key, dev, batch_size)
        del model
    else:
        console.print(f"emissions: cached in {out_dir} (the acoustic model is not rerun)")
    for split in splits:
        if out[split].skipped:
            console.print(f"warning: {split}: {len(out[split].skipped)} utterance(s) left out of decoding and "
                          f"scoring, their audio is unreadable: "
                          + "; ".join(f"{p} ({r})" for p, r in list(out[split].skipped.items())[:10])
                          + ". Fix the files (the split is recomputed then), or rebuild the manifest with "
                            "`d2v prepare ... --strict`.", markup=False, highlight=False, soft_wrap=True)
    return {s: out[s] for s in splits}, len(todo)
