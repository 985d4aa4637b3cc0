"""Word start and end times from a CTC frame path (`d2v transcribe --timestamps`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from d2vcli.vocab import BLANK, SPECIALS, WORD_SEP


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
