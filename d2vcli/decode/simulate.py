"""Constructed CTC emissions for checks without an acoustic model (`d2v doctor`, tests, benchmarks)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from d2vcli.vocab import BLANK, Vocab


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
