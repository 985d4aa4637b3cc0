"""Decoding speed: d2v's parallel flashlight lexicon beam search vs pyctcdecode on the same
emissions, the same KenLM 4-gram, the same beam, the same LM weight and word score.

    python benchmarks/bench_decode.py                      # beams 50 and 500, 1 and 2 workers
    python benchmarks/bench_decode.py --utts 200 --beams 50,500,1500 --workers 1,2,4

Setup (cached under $D2V_CACHE/bench-decode or ~/.cache/d2vcli/bench-decode, built once):
- a pseudo-language of `--vocab` words (random spellings over the LibriSpeech letters, Zipf
  frequencies, each word with its own Zipf-weighted successors, so an n-gram LM has real
  structure) and 200,000 sentences of it;
- a 4-gram KenLM binary estimated on them with `d2v prepare lm` (lmplz + build_binary) and its
  lexicon (the LM's unigrams, pyctcdecode gets the same list as `unigrams`).
Test set: `--utts` new sentences from the same language (12-30 words, about 5-12 s of "audio" at
20 ms per frame), turned into CTC log-probabilities by `decode.simulate.simulate_emissions` with noise and
letter confusions (greedy WER about 40 %).

Each decoder decodes the whole set; the time is the wall clock of the decode itself, with the
decoder and any worker pool already built (both build once per process and are reused).
RTF = decode seconds / audio seconds (lower is faster); utt/s is throughput. The last column is
pyctcdecode's time over ours for the same beam and worker count. Goal: >= 5x at equal or better WER.

Pruning differs between the two, so d2v runs twice:
- "d2v default": fairseq's flashlight defaults (beam threshold 50, every token considered at
  every frame): at a large beam almost nothing is pruned, so all `beam` hypotheses are kept;
- "d2v pruned": pruning matched to pyctcdecode's defaults: beam threshold 10 (= its
  beam_prune_logp -10) and the 8 best tokens per frame (its token_min_logp -5 keeps a handful);
pyctcdecode always runs its defaults. The speedup column compares each d2v row with pyctcdecode
at the same beam and worker count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from d2vcli.decode.emissions import save_emissions  # noqa: E402
from d2vcli.decode.search import BeamOptions, BeamPool, SearchSpec, greedy_decode  # noqa: E402
from d2vcli.decode.simulate import simulate_emissions  # noqa: E402
from d2vcli.scoring import wer  # noqa: E402
from d2vcli.lm.kenlm_tools import kenlm_cache_dir  # noqa: E402
from d2vcli.lm.prepare import prepare_lm  # noqa: E402
from d2vcli.vocab import LIBRISPEECH_LETTERS, Vocab  # noqa: E402
from d2vcli.workspace import Workspace  # noqa: E402

LETTERS = [c for c in LIBRISPEECH_LETTERS if c not in "|'"]
CONFUSIONS = {"M": "N", "N": "M", "D": "T", "T": "D", "B": "P", "P": "B", "E": "I", "I": "E", "O": "U", "S": "Z"}


class Language:
    """A Zipfian vocabulary with word-specific successor preferences (a sparse bigram chain)."""

    def __init__(self, vocab_size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        letter_p = 1.0 / (1.0 + np.arange(len(LETTERS))) ** 0.8
        letter_p /= letter_p.sum()
        words: set[str] = set()
        while len(words) < vocab_size:
            n = int(rng.integers(2, 10))
            words.add("".join(rng.choice(LETTERS, size=n, p=letter_p)))
        self.words = sorted(words)
        rng.shuffle(self.words)
        unigram = 1.0 / (1.0 + np.arange(vocab_size)) ** 1.0
        self.unigram_cdf = np.cumsum(unigram / unigram.sum())
        self.successors = np.searchsorted(self.unigram_cdf, rng.random((vocab_size, 24)))
        w = 1.0 / (1.0 + np.arange(24)) ** 1.2
        self.successor_cdf = np.cumsum(w / w.sum())

    def sentence(self, rng: np.random.Generator, lo: int, hi: int) -> str:
        n = int(rng.integers(lo, hi + 1))
        u = rng.random((n, 3))
        fresh = np.minimum(np.searchsorted(self.unigram_cdf, u[:, 0]), len(self.words) - 1)
        succ = np.minimum(np.searchsorted(self.successor_cdf, u[:, 1]), 23)
        k = int(fresh[0])
        out = [k]
        for i in range(1, n):
            k = int(self.successors[k, succ[i]]) if u[i, 2] < 0.75 else int(fresh[i])
            out.append(k)
        return " ".join(self.words[i] for i in out)


def build_lm(cache: Path, vocab_size: int) -> Workspace:
    ws = Workspace.resolve(cache / f"lm-v{vocab_size}")
    if (ws.lm_dir / "4gram.bin").exists() and (ws.lm_dir / "lexicon.txt").exists():
        return ws
    lang = Language(vocab_size)
    rng = np.random.default_rng(1)
    ws.data_dir.mkdir(parents=True, exist_ok=True)
    Vocab.librispeech().save(ws.dictionary)
    text = ws.root / "lm-text.txt"
    with open(text, "w") as fh:
        for _ in range(200_000):
            fh.write(lang.sentence(rng, 4, 20) + "\n")
    prepare_lm(ws, text=text, order=4, memory="1G")
    return ws


def build_emissions(out: Path, vocab_size: int, n: int, seed: int = 2):
    lang = Language(vocab_size)
    rng = np.random.default_rng(seed)
    vocab = Vocab.librispeech()
    refs = [lang.sentence(rng, 12, 30) for _ in range(n)]
    arrays = [simulate_emissions(r, vocab, rng, CONFUSIONS, confusion_prob=0.25) for r in refs]
    return vocab, save_emissions(out, "bench", arrays, [f"utt{i:04d}" for i in range(n)], refs, vocab.tokens)


def pyctc_labels(vocab: Vocab) -> list[str]:
    """Our token order for pyctcdecode: blank "", word boundary " ", unused specials as control chars."""
    labels = ["", "\x01", "\x02", "\x03"] + list(vocab.symbols)
    labels[labels.index("|")] = " "
    return labels


_PYCTC = None


def _pyctc_init(labels, lm_path, unigrams, alpha, beta):
    global _PYCTC
    from pyctcdecode import build_ctcdecoder

    _PYCTC = build_ctcdecoder(labels, kenlm_model_path=lm_path, unigrams=unigrams, alpha=alpha, beta=beta)


def _pyctc_decode(args):
    lp, beam = args
    return _PYCTC.decode(lp, beam_width=beam)


def run_ours(spec: SearchSpec, em, beam: int, workers: int, lm_weight: float, word_score: float,
             threshold: float = 50.0, tokens: int = 0):
    options = BeamOptions(beam=beam, beam_threshold=threshold, beam_size_token=tokens, lm_weight=lm_weight,
                          word_score=word_score)
    with BeamPool(spec, workers) as pool:
        pool.run(em, [options], description="warm-up")  # workers started and decoders built
        t0 = time.perf_counter()
        hyps = pool.run(em, [options], description=f"d2v beam {beam} x{workers}")[0]
        seconds = time.perf_counter() - t0
    return [h.text for h in hyps], seconds


def run_pyctc(ws: Workspace, vocab: Vocab, em, beam: int, workers: int, lm_weight: float, word_score: float):
    import logging

    logging.getLogger("pyctcdecode").setLevel(logging.ERROR)
    unigrams = [line.split("\t")[0] for line in open(ws.lm_dir / "lexicon.txt", encoding="utf-8")]
    args = (pyctc_labels(vocab), str(ws.lm_dir / "4gram.bin"), unigrams, lm_weight, word_score)
    items = [(em[i], beam) for i in range(len(em))]
    if workers == 1:
        _pyctc_init(*args)
        _pyctc_decode(items[0])  # warm-up (lazy LM state)
        t0 = time.perf_counter()
        texts = [_pyctc_decode(it) for it in items]
        return texts, time.perf_counter() - t0
    with mp.get_context("fork").Pool(workers, initializer=_pyctc_init, initargs=args) as pool:
        pool.map(_pyctc_decode, items[:workers])  # warm-up
        t0 = time.perf_counter()
        texts = pool.map(_pyctc_decode, items, chunksize=max(1, len(items) // (workers * 8)))
        return texts, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--utts", type=int, default=120)
    p.add_argument("--beams", default="50,500")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--vocab", type=int, default=20_000)
    p.add_argument("--lm-weight", type=float, default=1.0)
    p.add_argument("--word-score", type=float, default=1.0)
    p.add_argument("--skip-pyctcdecode", action="store_true")
    p.add_argument("--json", type=Path, help="Also write the rows here.")
    args = p.parse_args()

    os.environ.setdefault("D2V_PROGRESS", "0")
    cache = kenlm_cache_dir().parent / "bench-decode"
    t0 = time.perf_counter()
    ws = build_lm(cache, args.vocab)
    vocab, em = build_emissions(cache / "emissions", args.vocab, args.utts)
    audio = em.audio_seconds
    print(f"setup {time.perf_counter() - t0:.1f} s: {len(em)} utterances, {audio / 60:.1f} min of audio, "
          f"{args.vocab} words, LM {ws.lm_dir / '4gram.bin'}")
    greedy = [greedy_decode(em[i], vocab).text for i in range(len(em))]
    print(f"greedy WER {wer(em.refs, greedy):.2f}")
    spec = SearchSpec(tuple(vocab.tokens), "lexicon", str(ws.lm_dir / "4gram.bin"), str(ws.lm_dir / "lexicon.txt"))

    rows = []
    variants = [("d2v default", 50.0, 0), ("d2v pruned", 10.0, 8)]
    for beam in (int(b) for b in args.beams.split(",")):
        for workers in (int(w) for w in args.workers.split(",")):
            group = []
            for name, threshold, tokens in variants:
                texts, s = run_ours(spec, em, beam, workers, args.lm_weight, args.word_score, threshold, tokens)
                group.append({"decoder": name, "beam": beam, "workers": workers, "seconds": s,
                              "wer": wer(em.refs, texts)})
            if not args.skip_pyctcdecode:
                texts, s = run_pyctc(ws, vocab, em, beam, workers, args.lm_weight, args.word_score)
                for r in group:
                    r["speedup"] = s / r["seconds"]
                group.append({"decoder": "pyctcdecode", "beam": beam, "workers": workers, "seconds": s,
                              "wer": wer(em.refs, texts)})
            rows += group
            print(json.dumps(group), file=sys.stderr, flush=True)  # progress; the table below is the result

    from d2vcli.ui import console, table

    out = []
    for r in rows:
        out.append((r["decoder"], r["beam"], r["workers"], f"{r['wer']:.2f}", f"{r['seconds']:.2f}",
                    f"{r['seconds'] / audio:.5f}", f"{len(em) / r['seconds']:.1f}",
                    f"{r['speedup']:.1f}x" if "speedup" in r else ""))
    console.print(table(f"decoding {len(em)} utterances ({audio / 60:.1f} min), {args.vocab}-word 4-gram, "
                        f"lm_weight {args.lm_weight}, word_score {args.word_score}",
                        ["decoder", "beam", "workers", "WER", "seconds", "RTF", "utt/s", "vs pyctcdecode"], out))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
