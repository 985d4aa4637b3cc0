"""WER and CER: our own Levenshtein alignment and corpus totals.

    from d2vcli.scoring import score, wer; wer(refs, hyps)  # percent

Scoring follows fairseq's `examples/speech_recognition/infer.py`: both sides are split on
whitespace, with no case folding or punctuation stripping (the transcripts are already
normalized by `d2v prepare`); the distance is unit-cost Levenshtein; the corpus WER is
sum(errors) / sum(reference words), never an average of per-utterance rates. CER is the same
over the characters of the whitespace-normalized sentence, spaces included. Both agree exactly
with jiwer's `wer`/`cer` on such text (tests/test_evaluate.py checks it). On text with runs of
several spaces jiwer's CER counts every space and ours counts one.

`d2v decode`, `d2v evaluate`, LM tuning and fine-tuning validation all score with this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np

Op = Literal["C", "S", "D", "I"]  # correct, substitution, deletion (ref only), insertion (hyp only)


# ============================================================================ alignment


def _ids(ref: Sequence[str], hyp: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    table: dict[str, int] = {}
    r = np.fromiter((table.setdefault(t, len(table)) for t in ref), dtype=np.int64, count=len(ref))
    h = np.fromiter((table.setdefault(t, len(table)) for t in hyp), dtype=np.int64, count=len(hyp))
    return r, h


def _distance_matrix(r: np.ndarray, h: np.ndarray) -> np.ndarray:
    """(len(r)+1, len(h)+1) Levenshtein table, one numpy pass per reference token.

    Within a row the insertion chain d[j] = min(t[j], d[j-1] + 1) is a running minimum:
    d[j] = j + min_{k<=j}(t[k] - k), which np.minimum.accumulate computes without a Python loop.
    """
    n, m = len(r), len(h)
    d = np.empty((n + 1, m + 1), dtype=np.int64)
    d[0] = np.arange(m + 1)
    j = np.arange(m + 1)
    for i in range(1, n + 1):
        t = np.empty(m + 1, dtype=np.int64)
        t[0] = i
        t[1:] = np.minimum(d[i - 1, 1:] + 1, d[i - 1, :-1] + (h != r[i - 1]))
        d[i] = np.minimum.accumulate(t - j) + j
    return d


def edit_distance(ref: Sequence[str], hyp: Sequence[str]) -> int:
    """Unit-cost Levenshtein distance between two token sequences (no alignment).

    Myers' bit-parallel algorithm (Hyyrö's formulation for global distance): one column of the
    DP table is a pair of bit vectors over the reference, updated with a dozen integer operations
    per hypothesis token, so character-level distances of long sentences cost microseconds.
    """
    m = len(ref)
    if m == 0:
        return len(hyp)
    peq: dict[str, int] = {}
    for i, tok in enumerate(ref):
        peq[tok] = peq.get(tok, 0) | (1 << i)
    full = (1 << m) - 1
    top = 1 << (m - 1)
    pv, mv, dist = full, 0, m
    for tok in hyp:
        eq = peq.get(tok, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & full)
        mh = pv & xh
        if ph & top:
            dist += 1
        elif mh & top:
            dist -= 1
        ph = ((ph << 1) | 1) & full
        mh = (mh << 1) & full
        pv = mh | (~(xv | ph) & full)
        mv = ph & xv
    return dist


@dataclass
class Alignment:
    """A minimum-edit alignment: (op, ref token or None, hyp token or None) in order."""

    ops: list[tuple[Op, Optional[str], Optional[str]]]

    def count(self, op: Op) -> int:
        return sum(1 for o, _, _ in self.ops if o == op)

    @property
    def errors(self) -> int:
        return sum(1 for o, _, _ in self.ops if o != "C")

    def render(self) -> str:
        """icefall/Kaldi style: `A (B->C) (D->*) (*->E)`."""
        out = []
        for op, a, b in self.ops:
            if op == "C":
                out.append(a)
            else:
                out.append(f"({a if a is not None else '*'}->{b if b is not None else '*'})")
        return " ".join(out)


def align(ref: Sequence[str], hyp: Sequence[str]) -> Alignment:
    """Levenshtein alignment with backtrace. Ties prefer match/substitution, then deletion."""
    ref, hyp = list(ref), list(hyp)
    if not ref or not hyp:
        return Alignment([("D", a, None) for a in ref] + [("I", None, b) for b in hyp])
    r, h = _ids(ref, hyp)
    d = _distance_matrix(r, h)
    ops: list[tuple[Op, Optional[str], Optional[str]]] = []
    i, j = len(ref), len(hyp)
    while i > 0 or j > 0:
        if i > 0 and j > 0 and d[i, j] == d[i - 1, j - 1] + (r[i - 1] != h[j - 1]):
            ops.append(("C" if r[i - 1] == h[j - 1] else "S", ref[i - 1], hyp[j - 1]))
            i, j = i - 1, j - 1
        elif i > 0 and d[i, j] == d[i - 1, j] + 1:
            ops.append(("D", ref[i - 1], None))
            i -= 1
        else:
            ops.append(("I", None, hyp[j - 1]))
            j -= 1
    ops.reverse()
    return Alignment(ops)


def words_of(text: str) -> list[str]:
    return text.split()


def chars_of(text: str) -> list[str]:
    """Characters of the whitespace-normalized sentence (single spaces between words)."""
    return list(" ".join(text.split()))


# ============================================================================ corpus totals


@dataclass
class ErrorCounts:
    """Corpus totals of one unit (words or characters); sub/dele/ins only where alignments were made."""

    ref: int = 0
    errors: int = 0
    sub: int = 0
    dele: int = 0
    ins: int = 0

    @property
    def rate(self) -> float:
        """Errors / reference units, in percent (0 for an empty reference set with no hypothesis)."""
        if self.ref == 0:
            return 0.0 if self.errors == 0 else 100.0
        return 100.0 * self.errors / self.ref

    def add(self, a: Alignment, ref_len: int) -> None:
        self.ref += ref_len
        self.errors += a.errors
        self.sub += a.count("S")
        self.dele += a.count("D")
        self.ins += a.count("I")

    def add_distance(self, distance: int, ref_len: int) -> None:
        self.ref += ref_len
        self.errors += distance

    def to_dict(self, detailed: bool = True) -> dict:
        d = {"rate": round(self.rate, 4), "errors": self.errors, "ref": self.ref}
        if detailed:
            d.update({"sub": self.sub, "del": self.dele, "ins": self.ins})
        return d


def wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus word error rate in percent."""
    return score(refs, hyps).words.rate


def cer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus character error rate in percent."""
    return score(refs, hyps).chars.rate


@dataclass
class Scores:
    """Word and character totals of one (split, tag), plus each utterance's word alignment."""

    words: ErrorCounts
    chars: ErrorCounts
    alignments: list[Alignment]   # word alignments, one per utterance
    utt_errors: list[int]


def score(refs: Sequence[str], hyps: Sequence[str], with_chars: bool = True) -> Scores:
    """Word alignments and totals (with S/D/I), plus character error totals (distance only)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    words, chars = ErrorCounts(), ErrorCounts()
    alignments, utt_errors = [], []
    for ref, hyp in zip(refs, hyps):
        rw, hw = words_of(ref), words_of(hyp)
        a = align(rw, hw)
        words.add(a, len(rw))
        alignments.append(a)
        utt_errors.append(a.errors)
        if with_chars:
            rc = chars_of(ref)
            chars.add_distance(edit_distance(rc, chars_of(hyp)), len(rc))
    return Scores(words, chars, alignments, utt_errors)


def word_errors(refs: Sequence[str], hyps: Sequence[str]) -> ErrorCounts:
    """Corpus word totals without alignments (the fast path, e.g. for LM tuning)."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    total = ErrorCounts()
    for ref, hyp in zip(refs, hyps):
        rw = words_of(ref)
        total.add_distance(edit_distance(rw, words_of(hyp)), len(rw))
    return total
