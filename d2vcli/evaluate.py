"""WER and CER: our own Levenshtein alignment, corpus totals, and the evaluation artefacts.

    d2v evaluate [RUN_OR_CKPT] [--splits dev-clean dev-other ...] [--lm 4gram.bin | --no-lm]
    from d2vcli.evaluate import evaluate; result = evaluate(ws); console.print(result.table())

`evaluate` decodes (through `d2vcli.decode.decode`, so cached emissions are reused) and scores
every split greedy and with the LM side by side. It writes, in <workdir>/decode/<run>/:

    recogs-<split>-<tag>.txt   reference and hypothesis per utterance
    errs-<split>-<tag>.txt     the %WER line, an alignment per utterance with its S/D/I counts,
                               and the most frequent substitutions, deletions and insertions
    wer-summary-<tag>.txt      WER and CER per split
    wer.json                   everything above as numbers

Scoring follows fairseq's infer.py (data2vec-reference §7): both sides are split on
whitespace, with no case folding or punctuation stripping (the transcripts are already
normalized by `d2v prepare`); the distance is unit-cost Levenshtein; the corpus WER is
sum(errors) / sum(reference words), never an average of per-utterance rates. CER is the same
over the characters of the whitespace-normalized sentence, spaces included. Both agree exactly
with jiwer's `wer`/`cer` on such text (tests/test_evaluate.py checks it). On text with runs of
several spaces jiwer's CER counts every space and ours counts one.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np

from d2vcli.fileio import atomic_open, atomic_write_text

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


# ============================================================================ artefacts and results


@dataclass
class SplitScore:
    split: str
    tag: str
    utterances: int
    words: ErrorCounts
    chars: ErrorCounts
    empty_hyps: int = 0
    repeats: int = 0  # hypotheses with the same word twice in a row where the reference has none

    def to_dict(self) -> dict:
        return {"utterances": self.utterances, "wer": round(self.words.rate, 4), "cer": round(self.chars.rate, 4),
                "words": self.words.to_dict(), "chars": self.chars.to_dict(detailed=False),
                "empty_hyps": self.empty_hyps,
                "repeats": self.repeats}


@dataclass
class EvalResult:
    """WER/CER per split and decoding tag ("greedy", "lm", ...), and where the artefacts are."""

    run: str
    out_dir: Path
    scores: dict[tuple[str, str], SplitScore] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def splits(self) -> list[str]:
        return list(dict.fromkeys(s for s, _ in self.scores))

    @property
    def tags(self) -> list[str]:
        return list(dict.fromkeys(t for _, t in self.scores))

    def wer(self, split: str, tag: str = "greedy") -> float:
        return self.scores[(split, tag)].words.rate

    def cer(self, split: str, tag: str = "greedy") -> float:
        return self.scores[(split, tag)].chars.rate

    def table(self):
        """A rich table: one row per split, WER and CER per tag side by side."""
        from d2vcli.ui import table

        tags = self.tags
        cols = ["split", "utts"] + [f"{t} {m}" for t in tags for m in ("WER", "CER")]
        rows = []
        for s in self.splits:
            first = next(self.scores[(s, t)] for t in tags if (s, t) in self.scores)
            row = [s, first.utterances]
            for t in tags:
                sc = self.scores.get((s, t))
                row += [f"{sc.words.rate:.2f}", f"{sc.chars.rate:.2f}"] if sc else ["", ""]
            rows.append(row)
        return table(f"WER / CER (%) - {self.run}", cols, rows)

    def to_dict(self) -> dict:
        out: dict = {}
        for (s, t), sc in self.scores.items():
            out.setdefault(s, {})[t] = sc.to_dict()
        return out


def _top(counter: Counter, n: int = 20) -> list[tuple[int, str]]:
    return [(c, k) for k, c in counter.most_common(n)]


def write_split_artefacts(out_dir: Path, split: str, tag: str, ids: Sequence[str], refs: Sequence[str],
                          hyps: Sequence[str]) -> SplitScore:
    """Score one (split, tag) and write recogs-/errs- files; returns the totals."""
    sc = score(refs, hyps)
    with atomic_open(out_dir / f"recogs-{split}-{tag}.txt") as fh:
        for uid, ref, hyp in zip(ids, refs, hyps):
            fh.write(f"{uid}:\tref={ref.split()}\n{uid}:\thyp={hyp.split()}\n")
    subs, dels, ins = Counter(), Counter(), Counter()
    for a in sc.alignments:
        for op, r, h in a.ops:
            if op == "S":
                subs[f"{r} -> {h}"] += 1
            elif op == "D":
                dels[r] += 1
            elif op == "I":
                ins[h] += 1
    w = sc.words
    with atomic_open(out_dir / f"errs-{split}-{tag}.txt") as fh:
        fh.write(f"%WER {w.rate:.2f} [ {w.errors} / {w.ref}, {w.ins} ins, {w.dele} del, {w.sub} sub ]\n")
        fh.write(f"%CER {sc.chars.rate:.2f} [ {sc.chars.errors} / {sc.chars.ref} ]\n\n")
        fh.write("PER-UTTERANCE ALIGNMENTS: id  S D I  alignment  (ref->hyp, * = nothing)\n")
        for uid, a in zip(ids, sc.alignments):
            fh.write(f"{uid}\t{a.count('S')} {a.count('D')} {a.count('I')}\t{a.render()}\n")
        for title, counter in (("SUBSTITUTIONS: count ref -> hyp", subs), ("DELETIONS: count ref", dels),
                               ("INSERTIONS: count hyp", ins)):
            fh.write(f"\n{title}\n")
            for c, k in _top(counter):
                fh.write(f"{c}\t{k}\n")
    repeats = 0
    for ref, hyp in zip(refs, hyps):
        hw, rw = hyp.split(), ref.split()
        if any(a == b for a, b in zip(hw, hw[1:])) and not any(a == b for a, b in zip(rw, rw[1:])):
            repeats += 1
    return SplitScore(split, tag, len(ids), sc.words, sc.chars, sum(1 for h in hyps if not h.strip()), repeats)


def _case(texts: Sequence[str]) -> str:
    from d2vcli.lm.formats import word_case

    return word_case(w for t in texts for w in t.split())


def score_decoded(decoded) -> EvalResult:
    """Score a `decode.DecodeResult` and write the evaluation artefacts next to its outputs."""
    result = EvalResult(decoded.run, decoded.out_dir)
    for (split, tag), sh in decoded.outputs.items():
        sc = write_split_artefacts(decoded.out_dir, split, tag, sh.ids, sh.refs, sh.hyps)
        result.scores[(split, tag)] = sc
        hyp_case, ref_case = _case(sh.hyps), _case(sh.refs)
        if hyp_case in ("upper", "lower") and ref_case in ("upper", "lower") and hyp_case != ref_case:
            result.warnings.append(
                f"{split} {tag}: hypotheses are {hyp_case} case but references are {ref_case} case, so nothing "
                "matches. Rebuild the LM and lexicon in the references' case (`d2v prepare lm ... --match-case`).")
        if sc.empty_hyps > 0.5 * sc.utterances:
            result.warnings.append(f"{split} {tag}: {sc.empty_hyps}/{sc.utterances} hypotheses are empty "
                                   "(the model emits only blanks: is it trained?)")
    for split in result.splits:
        g, lm = result.scores.get((split, "greedy")), result.scores.get((split, "lm"))
        if g and lm and lm.words.rate > g.words.rate:
            result.warnings.append(
                f"{split}: LM decoding is worse than greedy ({lm.words.rate:.2f} vs {g.words.rate:.2f} % WER"
                f"{f', {lm.repeats} hypotheses with repeated words' if lm.repeats else ''}). Tune the LM weight and "
                "word score on a dev split (`d2v decode --tune`) or check that the LM matches the domain.")
    for tag in result.tags:
        lines = ["split\tutterances\tWER\tCER\terrors\tref_words\tsub\tdel\tins"]
        for split in result.splits:
            sc = result.scores.get((split, tag))
            if sc:
                w = sc.words
                lines.append(f"{split}\t{sc.utterances}\t{w.rate:.2f}\t{sc.chars.rate:.2f}\t{w.errors}\t{w.ref}\t"
                             f"{w.sub}\t{w.dele}\t{w.ins}")
        atomic_write_text(decoded.out_dir / f"wer-summary-{tag}.txt", "\n".join(lines) + "\n")
    atomic_write_text(decoded.out_dir / "wer.json", json.dumps(
        {"run": decoded.run, "checkpoint": str(decoded.checkpoint) if decoded.checkpoint else None,
         "lm": str(decoded.lm) if decoded.lm else None,
         "options": decoded.options_dict(), "splits": result.to_dict()}, indent=1) + "\n")
    return result


def evaluate(ws, cfg=None, checkpoint=None, splits: Optional[Sequence[str]] = None, lm="auto", **decode_kwargs):
    """Decode (reusing cached emissions) and score: WER and CER per split, greedy and LM side by side.

    Arguments are those of `d2vcli.decode.decode`. Returns an `EvalResult`; print `result.table()`.
    """
    from d2vcli.decode import decode

    decoded = decode(ws, cfg, checkpoint=checkpoint, splits=splits, lm=lm, **decode_kwargs)
    return score_decoded(decoded)


def print_result(result: EvalResult) -> None:
    from d2vcli.ui import console

    console.print(result.table())
    for w in result.warnings:
        console.print(f"[bold yellow]warning:[/] {w}")
    console.print(f"artefacts: {result.out_dir} (recogs-*, errs-*, wer-summary-*, wer.json)")
