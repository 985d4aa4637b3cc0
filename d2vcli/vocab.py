"""Letter vocabulary and transcript text, compatible with fairseq's dict.ltr.txt.

Index layout (fairseq `Dictionary`): <s>=0 (the CTC blank), <pad>=1, </s>=2, <unk>=3,
then the letters in dict.ltr.txt order, with `|` as the word boundary. For
LibriSpeech this gives the 32 outputs of every released wav2vec 2.0 / data2vec CTC model.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from d2vcli.errors import UserError
from d2vcli.fileio import atomic_write_text

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BLANK, PAD, EOS, UNK = 0, 1, 2, 3
WORD_SEP = "|"
# Order of the published LibriSpeech dict.ltr.txt (fairseq wav2vec).
LIBRISPEECH_LETTERS = tuple("|ETAONIHSRDLUMWCFGYPBVK'XJQZ")

_PUNCT = re.compile(r"[^\w\s']|_", re.UNICODE)
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Upper case, punctuation other than apostrophes removed, whitespace collapsed."""
    text = _PUNCT.sub(" ", text.upper())
    return _SPACES.sub(" ", text).strip()


def to_letters(text: str) -> str:
    """'HELLO WORLD' -> 'H E L L O | W O R L D |' (fairseq .ltr)."""
    words = text.split()
    return " ".join(" ".join(w) + " |" for w in words)


def from_letters(ltr: str) -> str:
    """Inverse of to_letters."""
    return " ".join(ltr.replace(" ", "").replace(WORD_SEP, " ").split())


class VocabError(UserError):
    """A letter dictionary that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Vocab:
    symbols: tuple[str, ...]  # the dictionary letters, without the 4 specials

    @property
    def tokens(self) -> list[str]:
        return list(SPECIALS) + list(self.symbols)

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.symbols)

    @property
    def blank(self) -> int:
        return BLANK

    @property
    def word_sep(self) -> int:
        return self.index(WORD_SEP)

    def index(self, sym: str) -> int:
        try:
            return len(SPECIALS) + self.symbols.index(sym)
        except ValueError:
            raise KeyError(f"symbol {sym!r} is not in the letter dictionary") from None

    def unknown_chars(self, text: str) -> set[str]:
        known = set(self.symbols)
        return {c for c in text.replace(" ", "") if c not in known}

    def encode(self, text: str) -> list[int]:
        """Transcript -> label ids (letters with `|` between and after words)."""
        table = {s: i for i, s in enumerate(self.tokens)}
        out = []
        for tok in to_letters(text).split():
            if tok not in table:
                raise KeyError(f"character {tok!r} in {text!r} is not in the letter dictionary")
            out.append(table[tok])
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Label ids (already CTC-collapsed, blanks removed) -> words."""
        toks = self.tokens
        letters = [toks[i] for i in ids if i >= len(SPECIALS)]
        return " ".join("".join(letters).replace(WORD_SEP, " ").split())

    @classmethod
    def librispeech(cls) -> "Vocab":
        return cls(LIBRISPEECH_LETTERS)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "Vocab":
        """Dictionary ordered by frequency; LibriSpeech text gives the LibriSpeech order's symbol set."""
        counts = Counter()
        for t in texts:
            counts.update(to_letters(t).split())
        if set(counts) <= set(LIBRISPEECH_LETTERS):
            return cls.librispeech()
        return cls(tuple(s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))

    # fairseq dict.ltr.txt: one "SYMBOL COUNT" per line, order defines the index.
    @classmethod
    def load(cls, path: Path) -> "Vocab":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"letter dictionary not found: {path}. Run `d2v prepare` first, or pass --dict.")
        syms = []
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise VocabError(f"{path} is not a letter dictionary (not UTF-8 text at byte {e.start}); it has one "
                             f"'SYMBOL COUNT' line per letter, as `d2v prepare` writes it") from None
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) > 2:
                raise VocabError(f"{path}:{i}: expected 'SYMBOL COUNT', got {line!r}")
            if parts[0] in SPECIALS:
                continue
            syms.append(parts[0])
        if WORD_SEP not in syms:
            raise VocabError(f"{path}: no word-boundary symbol '|' in the dictionary")
        return cls(tuple(syms))

    def save(self, path: Path, counts: dict[str, int] | None = None) -> None:
        counts = counts or {}
        atomic_write_text(Path(path), "".join(f"{s} {counts.get(s, 0)}\n" for s in self.symbols))
