"""The evaluate command: decode, score, and write the plain-text evaluation artefacts.

    d2v evaluate [RUN_OR_CKPT] [--splits dev-clean dev-other ...] [--lm 4gram.bin | --no-lm]
    from d2vcli.evaluate import evaluate; result = evaluate(ws); console.print(result.table())

`evaluate` decodes (through `d2vcli.decode.run.decode`, so cached emissions are reused) and scores
every split greedy and with the LM side by side (WER and CER as `d2vcli.scoring` defines them).
It writes, in <workdir>/decode/<run>/:

    recogs-<split>-<tag>.txt   reference and hypothesis per utterance
    errs-<split>-<tag>.txt     the %WER line, an alignment per utterance with its S/D/I counts,
                               and the most frequent substitutions, deletions and insertions
    wer-summary-<tag>.txt      WER and CER per split
    wer.json                   everything above as numbers
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from d2vcli.decode.run import DecodeResult, decode
from d2vcli.fileio import atomic_open, atomic_write_text
from d2vcli.lm.formats import word_case
from d2vcli.scoring import ErrorCounts, score
from d2vcli.ui import console, table


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
    return word_case(w for t in texts for w in t.split())


def score_decoded(decoded: DecodeResult) -> EvalResult:
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

    Arguments are those of `d2vcli.decode.run.decode`. Returns an `EvalResult`; print `result.table()`.
    """
    decoded = decode(ws, cfg, checkpoint=checkpoint, splits=splits, lm=lm, **decode_kwargs)
    return score_decoded(decoded)


def print_result(result: EvalResult) -> None:
    console.print(result.table())
    for w in result.warnings:
        console.print(f"[bold yellow]warning:[/] {w}")
    console.print(f"artefacts: {result.out_dir} (recogs-*, errs-*, wer-summary-*, wer.json)")
