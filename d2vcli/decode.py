"""Decoding: CTC emissions computed once and cached, then greedy and lexicon + KenLM beam search.

    d2v decode [RUN_OR_CKPT] [--splits dev-clean dev-other] [--lm 4gram.bin] [--tune] [--workers N]
    from d2vcli.decode import decode; result = decode(ws, cfg.decode, lm="4gram.bin")

With no checkpoint the newest fine-tuned run of the workspace is used (its best.pt); with no
splits, the dev/test manifests present; `--lm` is a path or a file name in <workdir>/lm/ (by
default the LM `d2v prepare lm` built, if any); the lexicon defaults to <workdir>/lm/lexicon.txt.

Pipeline, and the reasons for it:

1. **Emissions, once.** The acoustic model runs over each split in length-sorted batches (on
   the GPU when there is one), with the waveform normalization stored in the checkpoint
   (never a flag the user can get wrong). The log-probabilities are written as one float16
   (frames, V) array per split (`decode/<run>/emissions-<split>-<key>.npy`, utterances back
   to back) plus a JSON index. The key hashes the checkpoint's bytes and the manifest's, so
   any later decode, tuning run or `d2v evaluate` with other LM settings reads the cache and
   never reruns the model; a new checkpoint or manifest recomputes.
2. **Greedy** (always, tag "greedy"): per-frame argmax, repeats collapsed, blanks dropped.
   Pure numpy: it needs neither flashlight nor KenLM.
3. **Beam search** (tag "lm"): flashlight-text's `LexiconDecoder` (CTC criterion, max not
   log-add, a trie of lexicon spellings smeared with each word's unigram score, as fairseq's
   `W2lKenLMDecoder`), with KenLM through `flashlight.lib.text.decoder.kenlm.KenLM`. Options
   (config section `decode`) default to fairseq's: beam 50, beam threshold 50, beam_size_token
   = vocabulary size, lm_weight 2, word_score -1, sil_weight 0, unk_weight -inf. Blank is
   index 0 (`<s>`), silence is `|`.
   A letter-level KenLM (`d2v prepare lm --unit letter`, vocabulary of letters and `|`) selects
   `LexiconFreeDecoder`, which can spell words outside any lexicon; `--lexicon-free` without an
   LM runs the same search with flashlight's `ZeroLM` (tag "beam"): a CTC prefix beam search
   whose result is close to greedy. A word LM cannot be used lexicon-free (the lexicon-free
   decoder queries the LM once per letter), which is an error that says so.
4. **Parallel workers.** Beam search is single-threaded C++, so `decode.workers` processes
   (default: one per core) each build the decoder once and take chunks of utterances. Workers
   get only (offset, length) rows and read the float16 cache through a memory map, so memory
   stays flat however large the split; results (words and a score) are small.
5. **Tuning** (`--tune`): lm_weight, word_score and sil_weight are searched on a dev split
   (default dev-other) over the cached emissions, all trials in parallel, with a smaller
   beam (`decode.tune_beam`); the default setting is always trial 0, so tuning never picks
   something worse than the default on the tuning split. The result goes to
   `decode/<run>/tuned.json` and later decodes with the same LM use it (and say so).

**Emissions fed to flashlight are log-probabilities** (log_softmax), as in fairseq's
training-time KenLM validation. fairseq's offline infer.py feeds raw logits instead
(data2vec-reference P6), so its tuned LM weights do not carry over exactly: the logits differ
from log-probs by a per-frame constant, which the beam search's threshold and the LM weight
both see. Log-probs make the acoustic and LM scores commensurable and the scores per-frame
normalized, which is what the LM weight is meant to balance.

`sil_weight` is honoured (fairseq's training-time decoding overwrites it with 0, P7).

Outputs per split in <workdir>/decode/<run>/: `ref-<split>.txt`, `hyp-<split>-<tag>.txt`
(sclite trn format, `TEXT (utterance-id)`: `sclite -r ref-X.txt -h hyp-X-lm.txt -i rm`) and
`scores-<split>-<tag>.tsv` (id, decoder score, reference words, word errors).
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from d2vcli.audio import SAMPLE_RATE
from d2vcli.errors import UserError
from d2vcli.config import DecodeConfig
from d2vcli.fileio import atomic_open, atomic_write_text
from d2vcli.lm.formats import (
    LMError, check_lexicon_against_lm, dictionary_case, is_letter_lm, load_kenlm, read_lexicon, resolve_lm,
    workspace_lm,
)
from d2vcli.vocab import BLANK, SPECIALS, WORD_SEP, Vocab

EMISSIONS_VERSION = 1
Mode = Literal["lexicon", "lexicon_free"]

FLASHLIGHT_FIX = "pip install flashlight-text"
KENLM_FIX = "pip install --force-reinstall flashlight-text kenlm"


class DecodeError(UserError):
    """A decoding request that cannot run; the message says what to change."""


class MissingDependency(DecodeError):
    """An optional package that beam search needs is missing; raised before any work starts."""


# ============================================================================ optional dependencies


def require_flashlight(need_kenlm: bool) -> None:
    """Import flashlight-text (and its KenLM binding) now, so a missing piece fails at startup
    with the fix, not halfway through a run as a NameError (user-pain P1, P2)."""
    try:
        import flashlight.lib.text.decoder as fl  # noqa: F401
        import flashlight.lib.text.dictionary  # noqa: F401
    except ImportError as e:
        raise MissingDependency(
            f"LM beam search needs flashlight-text, which cannot be imported ({e}). Fix: {FLASHLIGHT_FIX} "
            "(greedy decoding works without it: pass --no-lm). `d2v doctor` checks the whole decoding stack."
        ) from None
    if need_kenlm:
        try:
            from flashlight.lib.text.decoder.kenlm import KenLM  # noqa: F401
        except ImportError as e:
            raise MissingDependency(
                f"flashlight-text was built without KenLM support ({str(e).strip().splitlines()[0]}). "
                f"Fix: {KENLM_FIX}. `d2v doctor` checks the whole decoding stack."
            ) from None


# ============================================================================ options and results


@dataclass(frozen=True)
class BeamOptions:
    """flashlight decoder options; defaults are fairseq's `FlashlightDecoderConfig`."""

    beam: int = 50
    beam_threshold: float = 50.0
    beam_size_token: int = 0  # 0: the whole vocabulary
    lm_weight: float = 2.0
    word_score: float = -1.0
    sil_weight: float = 0.0
    unk_weight: float = -math.inf

    @classmethod
    def from_config(cls, c: DecodeConfig) -> "BeamOptions":
        return cls(c.beam, c.beam_threshold, c.beam_size_token, c.lm_weight, c.word_score, c.sil_weight,
                   c.unk_weight)


@dataclass
class Hyp:
    words: list[str]
    score: float
    path: Optional[np.ndarray] = None  # (T,) best token per frame, when asked for

    @property
    def text(self) -> str:
        return " ".join(self.words)


@dataclass(frozen=True)
class SearchSpec:
    """Everything needed to build a beam-search decoder in any process (picklable)."""

    tokens: tuple[str, ...]      # index -> symbol, specials first (Vocab.tokens)
    mode: Mode
    lm: Optional[str]            # KenLM binary or ARPA; None = ZeroLM (lexicon-free only)
    lexicon: Optional[str]

    @property
    def tag(self) -> str:
        return "lm" if self.lm else "beam"


# ============================================================================ greedy


def greedy_path(lp: np.ndarray) -> np.ndarray:
    """(T, V) scores -> (T,) best token per frame."""
    return np.asarray(lp).argmax(axis=-1)


def collapse(path: np.ndarray) -> np.ndarray:
    """CTC: merge repeats, drop blanks."""
    path = np.asarray(path)
    if path.size == 0:
        return path
    keep = np.ones(len(path), dtype=bool)
    keep[1:] = path[1:] != path[:-1]
    out = path[keep]
    return out[out != BLANK]


def greedy_decode(lp: np.ndarray, vocab: Vocab, with_path: bool = False) -> Hyp:
    """Viterbi-free greedy decoding; score = sum over frames of the best log-probability."""
    lp = np.asarray(lp, dtype=np.float32)
    path = greedy_path(lp)
    score = float(lp[np.arange(len(path)), path].sum()) if len(path) else 0.0
    words = vocab.decode(collapse(path).tolist()).split()
    return Hyp(words, score, path if with_path else None)


# ============================================================================ beam search


class BeamSearcher:
    """A flashlight decoder over one LM (and lexicon); build once per process, decode many utterances."""

    def __init__(self, spec: SearchSpec):
        from flashlight.lib.text.decoder import SmearingMode, Trie, ZeroLM

        self.spec = spec
        self.num_tokens = len(spec.tokens)
        index = {t: i for i, t in enumerate(spec.tokens)}
        self.sil = index[WORD_SEP]
        self._decoders: dict[BeamOptions, object] = {}
        if spec.mode == "lexicon":
            from flashlight.lib.text.decoder.kenlm import KenLM
            from flashlight.lib.text.dictionary import create_word_dict, load_words

            lexicon = load_words(spec.lexicon)
            self.word_dict = create_word_dict(lexicon)
            self.lm = KenLM(spec.lm, self.word_dict)
            self.unk_word = self.word_dict.get_index("<unk>")
            self.trie = Trie(self.num_tokens, self.sil)
            start = self.lm.start(False)
            for word, spellings in lexicon.items():
                word_idx = self.word_dict.get_index(word)
                _, score = self.lm.score(start, word_idx)
                for spelling in spellings:
                    self.trie.insert([index[t] for t in spelling], word_idx, score)
            self.trie.smear(SmearingMode.MAX)
        else:
            if spec.lm:
                from flashlight.lib.text.decoder.kenlm import KenLM
                from flashlight.lib.text.dictionary import Dictionary

                token_dict = Dictionary()
                for t in spec.tokens:
                    token_dict.add_entry(t)
                self.lm = KenLM(spec.lm, token_dict)
            else:
                self.lm = ZeroLM()

    def _decoder(self, o: BeamOptions):
        dec = self._decoders.get(o)
        if dec is None:
            from flashlight.lib.text.decoder import (
                CriterionType, LexiconDecoder, LexiconDecoderOptions, LexiconFreeDecoder, LexiconFreeDecoderOptions,
            )

            token_beam = o.beam_size_token or self.num_tokens
            if self.spec.mode == "lexicon":
                opts = LexiconDecoderOptions(
                    beam_size=o.beam, beam_size_token=token_beam, beam_threshold=o.beam_threshold,
                    lm_weight=o.lm_weight, word_score=o.word_score, unk_score=o.unk_weight, sil_score=o.sil_weight,
                    log_add=False, criterion_type=CriterionType.CTC)
                dec = LexiconDecoder(opts, self.trie, self.lm, self.sil, BLANK, self.unk_word, [], False)
            else:
                opts = LexiconFreeDecoderOptions(
                    beam_size=o.beam, beam_size_token=token_beam, beam_threshold=o.beam_threshold,
                    lm_weight=o.lm_weight if self.spec.lm else 0.0, sil_score=o.sil_weight, log_add=False,
                    criterion_type=CriterionType.CTC)
                dec = LexiconFreeDecoder(opts, self.lm, self.sil, BLANK, [])
            if len(self._decoders) > 64:
                self._decoders.clear()
            self._decoders[o] = dec
        return dec

    def decode(self, lp: np.ndarray, options: BeamOptions, with_path: bool = False) -> Hyp:
        """(T, V) log-probabilities -> the best hypothesis."""
        em = np.ascontiguousarray(lp, dtype=np.float32)
        T, V = em.shape
        if V != self.num_tokens:
            raise DecodeError(f"emissions have {V} outputs but the dictionary has {self.num_tokens} tokens")
        if T == 0:
            return Hyp([], 0.0, np.zeros(0, dtype=np.int64) if with_path else None)
        best = self._decoder(options).decode(em.ctypes.data, T, V)[0]
        path = np.asarray(best.tokens[1:-1], dtype=np.int64)  # flashlight pads the path with one frame each side
        if self.spec.mode == "lexicon":
            words = [self.word_dict.get_entry(w) for w in best.words if w >= 0]
        else:
            letters = [self.spec.tokens[i] for i in collapse(path) if i >= len(SPECIALS)]
            words = "".join(letters).replace(WORD_SEP, " ").split()
        return Hyp(words, float(best.score), path if with_path else None)


# Worker-process state: one searcher and the memory maps it has opened.
_SEARCHER: Optional[BeamSearcher] = None
_MAPS: dict[str, np.ndarray] = {}


def _init_worker(spec: SearchSpec) -> None:
    global _SEARCHER
    _SEARCHER = BeamSearcher(spec)


def _run_chunk(task: tuple) -> tuple[int, list[tuple[int, list[str], float]]]:
    """One task: decode rows (index, offset, length) of a cached split with one option set."""
    data_path, rows, options, key = task
    data = _MAPS.get(data_path)
    if data is None:
        data = _MAPS[data_path] = np.load(data_path, mmap_mode="r")
    assert _SEARCHER is not None
    out = []
    for i, off, n in rows:
        hyp = _SEARCHER.decode(np.asarray(data[off:off + n], dtype=np.float32), options)
        out.append((i, hyp.words, hyp.score))
    return key, out


def _mp_context():
    """fork where the platform has it: workers start in milliseconds and a plain script that calls
    `decode()` needs no `if __name__ == "__main__":` guard (spawn re-imports the main module).
    Forking after torch has run is safe here because workers only touch numpy and flashlight,
    never torch or OpenMP. $D2V_MP_START (fork, forkserver, spawn) overrides it."""
    method = os.environ.get("D2V_MP_START") or ("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    return mp.get_context(method)


def default_workers(requested: int = 0) -> int:
    if requested > 0:
        return requested
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class BeamPool:
    """Beam search in `workers` processes (1: in this process). Use as a context manager.

    The pool persists across splits and tuning trials, so each worker builds the decoder
    (KenLM load + lexicon trie) once.
    """

    def __init__(self, spec: SearchSpec, workers: int = 0):
        self.spec = spec
        self.workers = default_workers(workers)
        self._executor: Optional[ProcessPoolExecutor] = None

    def __enter__(self) -> "BeamPool":
        if self.workers > 1:
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=_mp_context(),
                initializer=_init_worker, initargs=(self.spec,))
        else:
            _init_worker(self.spec)
        return self

    def __exit__(self, *exc) -> None:
        global _SEARCHER
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        else:
            _SEARCHER = None
            _MAPS.clear()

    def _chunks(self, em: "Emissions") -> list[list[tuple[int, int, int]]]:
        # Longest utterances first, so the slowest chunks do not finish last; chunks small enough
        # to balance the workers (about 8 per worker) and big enough to amortize the round trip.
        order = np.argsort(-em.lengths, kind="stable")
        size = max(1, min(32, math.ceil(len(order) / (self.workers * 8))))
        rows = [(int(i), int(em.offsets[i]), int(em.lengths[i])) for i in order]
        return [rows[k:k + size] for k in range(0, len(rows), size)]

    def run(self, em: "Emissions", options: Sequence[BeamOptions], description: str = "beam search"
            ) -> list[list[Hyp]]:
        """Decode every utterance of `em` with each option set; returns hyps[option][utterance]."""
        from d2vcli.ui import progress

        chunks = self._chunks(em)
        out: list[list[Optional[Hyp]]] = [[None] * len(em) for _ in options]
        tasks = [(str(em.data_path), chunk, o, k) for k, o in enumerate(options) for chunk in chunks]
        total_frames = int(em.lengths.sum()) * len(options)
        with progress() as bar:
            task_id = bar.add_task(description, total=total_frames)
            if self._executor is None:
                results = (_run_chunk(t) for t in tasks)
            else:
                futures = [self._executor.submit(_run_chunk, t) for t in tasks]
                results = (f.result() for f in as_completed(futures))
            for k, rows in results:
                for i, words, score in rows:
                    out[k][i] = Hyp(words, score)
                bar.advance(task_id, sum(int(em.lengths[i]) for i, _, _ in rows))
        return out  # type: ignore[return-value]


# ============================================================================ emissions cache


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
        self.array.flush()
        del self.array
        os.replace(self.tmp, self.final)
        index = {
            "version": EMISSIONS_VERSION, "key": self.key, "split": self.split, "data": self.final.name,
            "tokens": self.tokens, "frame_seconds": self.frame_seconds, "audio_seconds": self.audio_seconds,
            "ids": self.ids, "refs": self.refs, "lengths": self.lengths.tolist(),
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
    lengths = np.asarray(idx["lengths"], dtype=np.int64)
    em = Emissions(idx["split"], index_path, data_path, idx["key"], idx["ids"], idx["refs"], lengths,
                   np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64), idx["tokens"],
                   float(idx["frame_seconds"]), float(idx["audio_seconds"]))
    try:
        if em.data.shape != (max(1, int(lengths.sum())), len(em.tokens)):
            return None
    except (ValueError, OSError):
        return None
    return em


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


def frame_seconds_of(conv_layers) -> float:
    stride = 1
    for _, _, s in conv_layers:
        stride *= int(s)
    return stride / SAMPLE_RATE


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def compute_emissions(model, vocab: Vocab, normalize: bool, records, out_dir: Path, split: str, key: str,
                      device=None, batch_size: int = 8) -> Emissions:
    """Run the CTC model over `records` (length-sorted batches) and cache the log-probabilities."""
    import torch

    from d2vcli.data import Item, collate_pad, load_audio
    from d2vcli.manifest import num_frames
    from d2vcli.ui import progress

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
    from concurrent.futures import ThreadPoolExecutor

    def load(batch):  # audio of the next batch is read while the model runs on this one
        return [Item(records[i].id, load_audio(records[i], normalize)) for i in batch]

    try:
        with ThreadPoolExecutor(1) as io_pool, progress() as bar, torch.inference_mode():
            task = bar.add_task(f"emissions {split}", total=len(records))
            pending = io_pool.submit(load, batches[0]) if batches else None
            for b, batch in enumerate(batches):
                items = pending.result()
                pending = io_pool.submit(load, batches[b + 1]) if b + 1 < len(batches) else None
                col = collate_pad(items)
                pad = col["padding_mask"]
                out = model(col["source"].to(device), padding_mask=pad.to(device) if bool(pad.any()) else None)
                lp = torch.log_softmax(out["logits"].float(), dim=-1).cpu().numpy()  # (B, T, V)
                for row, i in enumerate(batch):
                    n = lengths[i]
                    if lp.shape[1] < n:
                        raise DecodeError(f"model gave {lp.shape[1]} frames for {records[i].id}, expected {n}")
                    writer.write(i, lp[row, :n])
                bar.advance(task, len(batch))
        return writer.close()
    except BaseException:
        writer.abort()
        raise


# ============================================================================ checkpoints and runs


def peek_kind(path: Path) -> Optional[str]:
    """A checkpoint's kind without reading its tensors (memory-mapped load)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable files are simply not candidates
        return None
    return state.get("kind") if isinstance(state, dict) else None


def find_ctc_checkpoint(ws, ref: Optional[str | Path] = None) -> Path:
    """`ref` (path, run dir or run name), else the newest fine-tuned run's best.pt (or last.pt)."""
    if ref:
        return ws.find_checkpoint(str(ref))
    candidates = []
    if ws.runs_dir.exists():
        for d in ws.runs_dir.iterdir():
            for name in ("best.pt", "last.pt"):
                if (d / name).is_file():
                    candidates.append(d / name)
                    break
    candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for p in candidates:
        if peek_kind(p) == "ctc":
            from d2vcli.ui import err_console

            # Said on stderr so `d2v transcribe` output stays clean; with several runs, the newest
            # may not be the one the user means.
            err_console.print(f"no model given: using the newest fine-tuned run '{p.parent.name}' ({p}); "
                              f"name another run to choose", markup=False, highlight=False, soft_wrap=True)
            return p.resolve()
    raise FileNotFoundError(
        f"no fine-tuned (CTC) run in {ws.runs_dir}. Fine-tune one with `d2v finetune`, import one with "
        "`d2v import`, or pass a checkpoint: `d2v decode path/to/best.pt`."
    )


def run_name(ws, checkpoint: Path) -> str:
    """decode/<run>/: the run's name for checkpoints inside runs/, else the file's stem."""
    checkpoint = Path(checkpoint).resolve()
    try:
        rel = checkpoint.relative_to(ws.runs_dir.resolve())
        return rel.parts[0]
    except ValueError:
        return checkpoint.stem


def default_splits(ws) -> list[str]:
    """The dev and test manifests present, dev first (dev-clean, dev-other, test-clean, test-other)."""
    if not ws.data_dir.exists():
        return []
    names = sorted(p.stem for p in ws.data_dir.glob("*.jsonl"))
    return [n for n in names if n.startswith(("dev", "valid"))] + [n for n in names if n.startswith("test")]


# ============================================================================ tuning


@dataclass
class Trial:
    lm_weight: float
    word_score: float
    sil_weight: float
    wer: float = math.nan
    errors: int = 0

    def options(self, base: BeamOptions, beam: Optional[int] = None) -> BeamOptions:
        return replace(base, lm_weight=self.lm_weight, word_score=self.word_score, sil_weight=self.sil_weight,
                       beam=beam or base.beam)


@dataclass
class TuneResult:
    split: str
    beam: int
    search: str
    trials: list[Trial]

    @property
    def default(self) -> Trial:
        return self.trials[0]

    @property
    def best(self) -> Trial:
        return min(self.trials, key=lambda t: (t.wer, t.errors))

    def table(self, limit: int = 20):
        from d2vcli.ui import table

        ranked = sorted(range(len(self.trials)), key=lambda k: (self.trials[k].wer, k))
        shown = ranked[:limit] + ([0] if 0 not in ranked[:limit] else [])
        rows = []
        for rank, k in enumerate(shown, 1):
            t = self.trials[k]
            mark = "best" if k == ranked[0] else ("default" if k == 0 else "")
            rows.append((ranked.index(k) + 1, f"{t.lm_weight:.3f}", f"{t.word_score:.3f}", f"{t.sil_weight:.3f}",
                         f"{t.wer:.2f}", mark))
        return table(f"LM tuning on {self.split}: {len(self.trials)} trials ({self.search}), beam {self.beam}",
                     ["rank", "lm_weight", "word_score", "sil_weight", "WER", ""], rows)


def search_space(cfg: DecodeConfig, trials: int, search: str, seed: int = 0) -> list[Trial]:
    """Trial 0 is the configured setting; then a grid or uniform random samples in the ranges."""
    out = [Trial(cfg.lm_weight, cfg.word_score, cfg.sil_weight)]
    ranges = (cfg.tune_lm_weight, cfg.tune_word_score, cfg.tune_sil_weight)
    if search == "grid":
        per_dim = max(2, int(math.floor((max(trials - 1, 8)) ** (1 / 3) + 1e-9)))
        axes = [np.linspace(lo, hi, per_dim) for lo, hi in ranges]
        for a in axes[0]:
            for b in axes[1]:
                for c in axes[2]:
                    out.append(Trial(float(a), float(b), float(c)))
    else:
        rng = np.random.default_rng(seed)
        for _ in range(max(0, trials - 1)):
            out.append(Trial(*(float(rng.uniform(lo, hi)) for lo, hi in ranges)))
    return out


def tune_lm(pool: BeamPool, em: Emissions, base: BeamOptions, cfg: DecodeConfig, trials: Optional[int] = None,
            search: Optional[str] = None, beam: Optional[int] = None) -> TuneResult:
    """Search lm_weight / word_score / sil_weight on cached emissions; every trial runs in the pool."""
    from d2vcli.evaluate import word_errors

    search = search or cfg.tune_search
    beam = beam or cfg.tune_beam
    cands = search_space(cfg, trials or cfg.tune_trials, search)
    hyps = pool.run(em, [t.options(base, beam) for t in cands], description=f"tuning on {em.split}")
    for t, hs in zip(cands, hyps):
        counts = word_errors(em.refs, [h.text for h in hs])
        t.wer, t.errors = counts.rate, counts.errors
    return TuneResult(em.split, beam, search, cands)


def _lm_identity(path: Optional[Path]) -> Optional[list]:
    if path is None:
        return None
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def save_tuned(out_dir: Path, result: TuneResult, spec: SearchSpec) -> Path:
    path = Path(out_dir) / "tuned.json"
    best = result.best
    payload = {
        "lm": spec.lm, "lm_identity": _lm_identity(Path(spec.lm)) if spec.lm else None, "lexicon": spec.lexicon,
        "split": result.split, "beam": result.beam, "search": result.search,
        "best": asdict(best), "default": asdict(result.default), "trials": [asdict(t) for t in result.trials],
    }
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    return path


def load_tuned(out_dir: Path, spec: SearchSpec) -> Optional[dict]:
    """tuned.json if it was made for this LM (same file, unchanged) and lexicon."""
    path = Path(out_dir) / "tuned.json"
    if not path.exists():
        return None
    try:
        t = json.loads(path.read_text())
    except ValueError:
        return None
    if t.get("lm") != spec.lm or t.get("lexicon") != spec.lexicon:
        return None
    if spec.lm and t.get("lm_identity") != _lm_identity(Path(spec.lm)):
        return None
    return t


# ============================================================================ the decode command


@dataclass
class SplitOutput:
    split: str
    tag: str
    ids: list[str]
    refs: list[str]
    hyps: list[str]
    scores: list[float]
    audio_seconds: float
    decode_seconds: float

    @property
    def rtf(self) -> float:
        return self.decode_seconds / self.audio_seconds if self.audio_seconds else math.nan


@dataclass
class DecodeResult:
    run: str
    checkpoint: Optional[Path]
    out_dir: Path
    lm: Optional[Path] = None
    lexicon: Optional[Path] = None
    mode: str = "greedy"
    options: Optional[BeamOptions] = None
    tuned: Optional[TuneResult] = None
    tuned_from: Optional[Path] = None
    outputs: dict[tuple[str, str], SplitOutput] = field(default_factory=dict)
    emissions: dict[str, Emissions] = field(default_factory=dict)
    model_runs: int = 0  # splits whose emissions had to be computed (0 = all from the cache)

    def options_dict(self) -> Optional[dict]:
        return asdict(self.options) if self.options else None

    def table(self):
        from d2vcli.evaluate import word_errors
        from d2vcli.ui import table

        rows = []
        for (split, tag), o in self.outputs.items():
            rows.append((split, tag, len(o.ids), f"{word_errors(o.refs, o.hyps).rate:.2f}",
                         f"{o.audio_seconds / 60:.1f}",
                         f"{o.decode_seconds:.2f}", f"{o.rtf:.4f}", f"{len(o.ids) / max(o.decode_seconds, 1e-9):.1f}"))
        return table(f"decode {self.run}", ["split", "tag", "utts", "WER", "audio min", "decode s", "RTF", "utt/s"],
                     rows)


def build_search_spec(ws, vocab: Vocab, lm_path: Optional[Path], lexicon: Optional[Path | str] = None,
                      lexicon_free: bool = False) -> Optional[SearchSpec]:
    """Validate the LM stack up front (imports, files, case) and describe the beam search, or None (greedy)."""
    if lm_path is None and not lexicon_free:
        return None
    require_flashlight(need_kenlm=lm_path is not None)
    tokens = tuple(vocab.tokens)
    if lm_path is None:
        return SearchSpec(tokens, "lexicon_free", None, None)
    model = load_kenlm(lm_path)
    if is_letter_lm(model):
        known = sum(s in model for s in vocab.symbols)
        if known < len(vocab.symbols) / 2:
            raise LMError(
                f"the letter LM {lm_path} knows only {known} of the {len(vocab.symbols)} dictionary symbols "
                f"({dictionary_case(vocab)} case): it was built for another alphabet or case. Rebuild it with "
                "`d2v prepare lm --unit letter --text CORPUS`.")
        return SearchSpec(tokens, "lexicon_free", str(lm_path), None)
    if lexicon_free:
        raise DecodeError(
            f"{lm_path} is a word LM; lexicon-free decoding needs a letter LM (built with `d2v prepare lm --unit "
            "letter`) or none. Drop --lexicon-free to use the word LM with the lexicon.")
    lex_path = Path(lexicon) if lexicon else ws.lm_dir / "lexicon.txt"
    lex = read_lexicon(lex_path, vocab)
    check_lexicon_against_lm(lex, lm_path, vocab)
    return SearchSpec(tokens, "lexicon", str(lm_path), str(lex_path.resolve()))


def write_outputs(out_dir: Path, o: SplitOutput) -> None:
    """ref-<split>.txt, hyp-<split>-<tag>.txt (sclite trn) and scores-<split>-<tag>.tsv."""
    from d2vcli.evaluate import edit_distance

    with atomic_open(out_dir / f"ref-{o.split}.txt") as fh:
        for uid, ref in zip(o.ids, o.refs):
            fh.write(f"{ref} ({uid})\n")
    with atomic_open(out_dir / f"hyp-{o.split}-{o.tag}.txt") as fh:
        for uid, hyp in zip(o.ids, o.hyps):
            fh.write(f"{hyp} ({uid})\n")
    with atomic_open(out_dir / f"scores-{o.split}-{o.tag}.tsv") as fh:
        fh.write("id\tscore\twords\terrors\n")
        for uid, ref, hyp, s in zip(o.ids, o.refs, o.hyps, o.scores):
            rw = ref.split()
            fh.write(f"{uid}\t{s:.4f}\t{len(rw)}\t{edit_distance(rw, hyp.split())}\n")


def get_emissions(ws, checkpoint: Path, splits: Sequence[str], out_dir: Path, batch_size: int = 8,
                  trust: bool = False, device: str = "auto") -> tuple[dict[str, Emissions], int]:
    """Cached emissions for each split, computing (and caching) the missing or stale ones.

    Returns ({split: Emissions}, number of splits the model had to run on). The model is
    loaded only if some split is missing.
    """
    from d2vcli.ui import console

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
        from d2vcli.checkpoint import load_ctc_model
        from d2vcli.manifest import read_manifest

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
    return {s: out[s] for s in splits}, len(todo)


def decode(
    ws,
    cfg: Optional[DecodeConfig] = None,
    checkpoint: Optional[str | Path] = None,
    splits: Optional[Sequence[str]] = None,
    lm: Optional[str | Path] = "auto",
    lexicon: Optional[str | Path] = None,
    lexicon_free: bool = False,
    tune: bool = False,
    trials: Optional[int] = None,
    search: Optional[Literal["random", "grid"]] = None,
    tune_beam: Optional[int] = None,
    use_tuned: bool = True,
    workers: Optional[int] = None,
    trust: bool = False,
    device: str = "auto",
) -> DecodeResult:
    """Decode dev/test splits with a fine-tuned CTC model: greedy always, beam search with an LM.

    `lm`: "auto" (the LM `d2v prepare lm` built, if any), a path or a name in <workdir>/lm/,
    or None (greedy only). Everything is validated before the model runs. See the module doc.
    """
    from d2vcli.ui import console

    cfg = cfg or DecodeConfig()
    ckpt = find_ctc_checkpoint(ws, checkpoint)
    run = run_name(ws, ckpt)
    out_dir = ws.decode_dir / run
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = list(splits) if splits else default_splits(ws)
    if not splits:
        raise FileNotFoundError(f"no dev or test manifests in {ws.data_dir}; run `d2v prepare` or pass --splits")
    for s in splits:
        ws.require_manifest(s)

    # Resolve and validate the whole LM stack before any model work.
    if lm == "auto":
        lm_path = workspace_lm(ws)
        if lm_path is not None:
            console.print(f"using the workspace LM {lm_path} (built by `d2v prepare lm`; --no-lm for greedy only)")
    else:
        lm_path = resolve_lm(ws, lm)
    vocab = _checkpoint_vocab(ckpt, trust)
    spec = build_search_spec(ws, vocab, lm_path, lexicon, lexicon_free)
    tune_split = cfg.tune_split
    if tune:
        if spec is None:
            raise DecodeError("--tune searches LM weights: give an LM (--lm) or build one with `d2v prepare lm`")
        ws.require_manifest(tune_split)

    needed = list(dict.fromkeys(splits + ([tune_split] if tune else [])))
    emissions, model_runs = get_emissions(ws, ckpt, needed, out_dir, cfg.batch_size, trust, device)
    result = DecodeResult(run, ckpt, out_dir, lm_path, Path(spec.lexicon) if spec and spec.lexicon else None,
                          spec.mode if spec else "greedy", emissions=emissions, model_runs=model_runs)

    for split in splits:
        em = emissions[split]
        t0 = time.perf_counter()
        hyps = [greedy_decode(em[i], vocab) for i in range(len(em))]
        _record(result, em, split, "greedy", hyps, time.perf_counter() - t0)

    if spec is not None:
        options = BeamOptions.from_config(cfg)
        n_workers = default_workers(cfg.workers if workers is None else workers)
        with BeamPool(spec, n_workers) as pool:
            if tune:
                tuned = tune_lm(pool, emissions[tune_split], options, cfg, trials, search, tune_beam)
                result.tuned = tuned
                path = save_tuned(out_dir, tuned, spec)
                console.print(tuned.table())
                b = tuned.best
                console.print(f"best on {tuned.split} (beam {tuned.beam}): lm_weight={b.lm_weight:.3f} "
                              f"word_score={b.word_score:.3f} sil_weight={b.sil_weight:.3f} -> WER {b.wer:.2f} "
                              f"(default {tuned.default.wer:.2f}); saved to {path}")
                options = b.options(options)
            elif use_tuned and (t := load_tuned(out_dir, spec)) is not None:
                best = t["best"]
                options = replace(options, lm_weight=best["lm_weight"], word_score=best["word_score"],
                                  sil_weight=best["sil_weight"])
                result.tuned_from = out_dir / "tuned.json"
                console.print(f"using tuned LM weights from {result.tuned_from} ({t['split']} WER {best['wer']:.2f}): "
                              f"lm_weight={best['lm_weight']:.3f} word_score={best['word_score']:.3f} "
                              f"sil_weight={best['sil_weight']:.3f}")
            result.options = options
            for split in splits:
                em = emissions[split]
                t0 = time.perf_counter()
                hyps = pool.run(em, [options], description=f"{spec.tag} {split}")[0]
                _record(result, em, split, spec.tag, hyps, time.perf_counter() - t0)
    for o in result.outputs.values():
        write_outputs(out_dir, o)
    return result


def _record(result: DecodeResult, em: Emissions, split: str, tag: str, hyps: list[Hyp], seconds: float) -> None:
    result.outputs[(split, tag)] = SplitOutput(split, tag, list(em.ids), list(em.refs), [h.text for h in hyps],
                                               [h.score for h in hyps], em.audio_seconds, seconds)


def _checkpoint_vocab(path: Path, trust: bool) -> Vocab:
    """The checkpoint's dictionary, read without building the model."""
    import torch

    from d2vcli.checkpoint import VOCAB_KEY, load_checkpoint

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - fall back to the full, checked load (clear errors, --trust-checkpoint)
        state = load_checkpoint(path, expect_kind="ctc", trust=trust)
    if not isinstance(state, dict) or state.get("kind") != "ctc":
        state = load_checkpoint(path, expect_kind="ctc", trust=trust)  # raises the kind/format error
    letters = list(state.get(VOCAB_KEY) or [])
    if letters[: len(SPECIALS)] == list(SPECIALS):
        letters = letters[len(SPECIALS):]
    return Vocab(tuple(letters))


def print_result(result: DecodeResult) -> None:
    from d2vcli.ui import console

    console.print(result.table())
    console.print(f"outputs: {result.out_dir} (hyp-*, ref-*, scores-*)")


# ============================================================================ word timings (transcribe)


@dataclass
class WordTiming:
    word: str
    start: float  # seconds
    end: float


def word_timings(path: np.ndarray, tokens: Sequence[str], frame_seconds: float,
                 words: Optional[Sequence[str]] = None) -> list[WordTiming]:
    """Per-word start/end from a CTC frame path: a word spans its first letter's first frame to its
    last letter's last frame (repeated frames of a letter belong to it; blanks and `|` separate).

    `words` (e.g. the LM decoder's words) label the spans when their count matches; else the
    spelled letters do.
    """
    spans: list[tuple[str, int, int]] = []
    letters: list[str] = []
    start = end = -1
    prev = -1
    for t, tok in enumerate(np.asarray(path).tolist()):
        sym = tokens[tok]
        if tok == BLANK or tok < len(SPECIALS):
            prev = tok
            continue
        if sym == WORD_SEP:
            if letters:
                spans.append(("".join(letters), start, end))
                letters = []
            prev = tok
            continue
        if tok == prev:
            end = t  # the same letter continues
        else:
            if not letters:
                start = t
            letters.append(sym)
            end = t
        prev = tok
    if letters:
        spans.append(("".join(letters), start, end))
    labels = list(words) if words is not None and len(words) == len(spans) else [w for w, _, _ in spans]
    return [WordTiming(w, round(s * frame_seconds, 3), round((e + 1) * frame_seconds, 3))
            for w, (_, s, e) in zip(labels, spans)]


# ============================================================================ constructed emissions


def simulate_emissions(text: str, vocab: Vocab, rng: np.random.Generator, confusions: Optional[dict] = None,
                       confusion_prob: float = 0.0, peak: float = 0.85, noise: float = 0.3,
                       frames_per_letter: tuple[int, int] = (2, 5)) -> np.ndarray:
    """CTC log-probabilities (T, V) that a model trained on `text` might emit, for checks without a model.

    Each letter (and the `|` after each word) gets 2-4 frames around its peak, separated by blank
    frames (always between two identical letters, as CTC requires). With probability
    `confusion_prob` a letter that has an entry in `confusions` is emitted as that other letter
    (which gets most of the mass) while the true one keeps a fair share: greedy decoding then
    misspells the word and a lexicon + LM can recover it. Gaussian `noise` is added to the logits.
    Used by `d2v doctor`, the tests and the decoding benchmark.
    """
    confusions = confusions or {}
    V = len(vocab)
    frames: list[np.ndarray] = []

    def frame(main: int, other: Optional[int] = None, share: float = 0.0) -> None:
        p = np.full(V, (1.0 - peak) / (V - 1))
        p[main] = peak - share
        if other is not None:
            p[other] += share
        frames.append(np.log(p) + rng.normal(0.0, noise, V))

    prev = None
    for tok in vocab.encode(text):
        if prev == tok or rng.random() < 0.5:
            for _ in range(int(rng.integers(1, 3))):
                frame(BLANK)
        sym = vocab.tokens[tok]
        wrong = confusions.get(sym)
        shown, hidden, share = tok, None, 0.0
        if wrong is not None and rng.random() < confusion_prob:
            shown, hidden, share = vocab.index(wrong), tok, 0.3  # wrong letter ahead, the true one close behind
        for _ in range(int(rng.integers(*frames_per_letter))):
            frame(shown, hidden, share)
        prev = tok
    frame(BLANK)
    logits = np.stack(frames)
    logits -= logits.max(axis=1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)
