"""Search over CTC emissions: greedy best path, flashlight-text beam search, and the worker pool.

Greedy decoding is pure numpy and needs neither flashlight nor KenLM; it is also what
fine-tuning validation uses (`greedy_batch`), so validation WER and `d2v decode` greedy WER
come from the same code. Beam search runs flashlight-text's `LexiconDecoder` or
`LexiconFreeDecoder`; `BeamPool` spreads it over worker processes that each build the decoder
once.

This module does not import torch: the beam-search workers import it, and a spawned worker
should not pay for torch. Tensors are accepted by duck typing (`.detach()`).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional, Sequence

import numpy as np

from d2vcli.config import DecodeConfig
from d2vcli.decode.errors import DecodeError, MissingDependency
from d2vcli.ui import progress
from d2vcli.vocab import BLANK, SPECIALS, WORD_SEP, Vocab

if TYPE_CHECKING:  # for annotations only: emissions.py imports torch, which the workers avoid
    from d2vcli.decode.emissions import Emissions

Mode = Literal["lexicon", "lexicon_free"]

FLASHLIGHT_FIX = "pip install flashlight-text"
KENLM_FIX = "pip install --force-reinstall flashlight-text kenlm"


# ============================================================================ optional dependencies


def require_flashlight(need_kenlm: bool) -> None:
    """Import flashlight-text (and its KenLM binding) now, so a missing piece fails at startup
    with the fix, not halfway through a run as a NameError."""
    # The imports are the check itself, so they run here at call time, not at module import.
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


def _numpy(x) -> np.ndarray:
    """A numpy array from an array-like or a torch tensor on any device."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def greedy_path(scores) -> np.ndarray:
    """(..., T, V) scores -> (..., T) best token per frame (the first maximum on ties).

    A torch tensor is reduced on its own device, so only the path is copied to the host.
    """
    if hasattr(scores, "detach"):
        return _numpy(scores.detach().argmax(-1))
    return np.asarray(scores).argmax(axis=-1)


def collapse(path: np.ndarray, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """CTC: merge repeats, drop blanks, and drop frames where `valid` is False (padding).

    Repeats are merged over the whole path, padded frames included, before those are dropped.
    """
    path = np.asarray(path)
    if path.size == 0:
        return path
    keep = np.ones(len(path), dtype=bool)
    keep[1:] = path[1:] != path[:-1]
    keep &= path != BLANK
    if valid is not None:
        keep &= np.asarray(valid, dtype=bool)
    return path[keep]


def greedy_decode(lp: np.ndarray, vocab: Vocab, with_path: bool = False) -> Hyp:
    """Viterbi-free greedy decoding; score = sum over frames of the best log-probability."""
    lp = np.asarray(lp, dtype=np.float32)
    path = greedy_path(lp)
    score = float(lp[np.arange(len(path)), path].sum()) if len(path) else 0.0
    words = vocab.decode(collapse(path).tolist()).split()
    return Hyp(words, score, path if with_path else None)


def greedy_batch(scores, frame_pad=None) -> list[list[int]]:
    """Best paths of a padded batch: (B, T, V) scores (numpy, or torch on any device) and
    (B, T) padding (True = padding, or None) -> one collapsed token-id list per utterance.

    `Vocab.decode` turns each list into the words, as `greedy_decode` does.
    """
    paths = greedy_path(scores)  # (B, T)
    if frame_pad is None:
        return [collapse(p).tolist() for p in paths]
    valid = ~_numpy(frame_pad).astype(bool)
    return [collapse(p, v).tolist() for p, v in zip(paths, valid)]


# ============================================================================ beam search


class BeamSearcher:
    """A flashlight decoder over one LM (and lexicon); build once per process, decode many utterances."""

    # flashlight-text is optional (greedy decoding works without it), so it is imported where the
    # decoder is built; `require_flashlight` has already turned a missing piece into a clear error.
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
            from flashlight.lib.text.decoder import (  # optional dependency, see __init__
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


# ============================================================================ worker pool


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
