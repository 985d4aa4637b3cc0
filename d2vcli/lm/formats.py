"""The files of <workdir>/lm/ and how they are read and checked: ARPA, lexicon, KenLM binary.

    lexicon.txt   flashlight lexicon, one spelling a line: `WORD<TAB>W O R D |`. The word is
                  written exactly as in the LM (it is looked up there); the spelling uses the
                  letter dictionary's case and ends with the word boundary `|` (fairseq README:
                  "the word should match the case of the n-gram language model, while the
                  spelling should match the case of the token dictionary").

The case checks stop the classic silent 100 % WER: an LM in lower case with an upper-case
dictionary (the wav2letter recipe lower-cases the LibriSpeech ARPA; fairseq's dictionary is
upper case) decodes without any error and scores about 100 % WER, so a case mismatch is an
error here, with the fix (`--match-case`) in the message.

Decoders find the LM with `resolve_lm` (the --lm option) and `workspace_lm` (the one `d2v
prepare lm` last built, from lm/report.json).
"""

from __future__ import annotations

import gzip
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Literal, Optional

from d2vcli.errors import UserError
from d2vcli.vocab import SPECIALS, WORD_SEP, Vocab

LM_SPECIAL_WORDS = ("<s>", "</s>", "<unk>")

Case = Literal["upper", "lower", "mixed", "uncased"]


class LMError(UserError):
    """An LM resource that cannot be used (or built); the message says how to fix it."""


# --------------------------------------------------------------------------- ARPA


def open_text(path: Path) -> IO[str]:
    """Open a text file, transparently gunzipping *.gz."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


@dataclass
class ArpaInfo:
    order: int
    counts: dict[int, int]      # n -> number of n-grams
    unigrams: list[str]         # the vocabulary, in file order (with <s>, </s>, <unk> if present)


def read_arpa_unigrams(path: Path) -> ArpaInfo:
    """The header counts and the 1-gram vocabulary of an ARPA file (.arpa or .arpa.gz).

    Stops reading at the 2-gram section, so this is fast even for the 1.3 GB LibriSpeech 4-gram.
    """
    counts: dict[int, int] = {}
    unigrams: list[str] = []
    section = None
    with open_text(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            if line == "\\data\\":
                section = "data"
                continue
            m = re.match(r"\\(\d+)-grams:$", line)
            if m:
                n = int(m.group(1))
                if n > 1:
                    break
                section = "1"
                continue
            if line == "\\end\\":
                break
            if section == "data":
                m = re.match(r"ngram (\d+)\s*=\s*(\d+)", line)
                if m:
                    counts[int(m.group(1))] = int(m.group(2))
            elif section == "1":
                parts = line.split()
                if len(parts) >= 2:
                    unigrams.append(parts[1])
    if not counts or not unigrams:
        raise LMError(f"{path} is not an ARPA language model (no \\data\\ header or no \\1-grams: section)")
    return ArpaInfo(order=max(counts), counts=counts, unigrams=unigrams)


def recase_arpa(src: Path, dst: Path, case: Case, info: ArpaInfo) -> Path:
    """Rewrite every word of an ARPA in `case`; refuses if two unigrams would collide."""
    conv = str.upper if case == "upper" else str.lower
    seen: dict[str, str] = {}
    for w in info.unigrams:
        if w in LM_SPECIAL_WORDS:
            continue
        c = conv(w)
        if c in seen and seen[c] != w:
            raise LMError(
                f"--match-case cannot convert {src}: {seen[c]!r} and {w!r} both become {c!r}. "
                "Re-estimate the LM from case-normalized text instead (`d2v prepare lm --text CORPUS`)."
            )
        seen[c] = w
    specials = {conv(s): s for s in LM_SPECIAL_WORDS}
    with open_text(src) as fin, open(dst, "w", encoding="utf-8") as fout:
        in_ngrams = False
        for line in fin:
            s = line.rstrip("\n")
            if s.startswith("\\"):
                in_ngrams = bool(re.match(r"\\\d+-grams:", s))
                fout.write(line)
                continue
            if not in_ngrams or not s.strip():
                fout.write(line)
                continue
            parts = s.split("\t")
            if len(parts) >= 2:
                words = [specials.get(conv(w), conv(w)) if w not in LM_SPECIAL_WORDS else w
                         for w in parts[1].split(" ")]
                parts[1] = " ".join(words)
                fout.write("\t".join(parts) + "\n")
            else:
                fout.write(line)
    return dst


# --------------------------------------------------------------------------- case


def word_case(words: Iterable[str]) -> Case:
    """The case of a vocabulary: "upper"/"lower" when at least 99 % of the cased words are, else "mixed"."""
    upper = lower = mixed = 0
    for w in words:
        if w in LM_SPECIAL_WORDS or w in SPECIALS:
            continue
        if w.isupper():
            upper += 1
        elif w.islower():
            lower += 1
        elif any(c.isalpha() for c in w) and w.upper() != w.lower():
            mixed += 1
    cased = upper + lower + mixed
    if cased == 0:
        return "uncased"
    if upper >= 0.99 * cased:
        return "upper"
    if lower >= 0.99 * cased:
        return "lower"
    return "mixed"


def dictionary_case(vocab: Vocab) -> Case:
    return word_case(s for s in vocab.symbols if s != WORD_SEP)


def spell(word: str, symbols: frozenset[str], case: Case) -> Optional[list[str]]:
    """The word's letters in the dictionary's case, or None if a letter is not in the dictionary."""
    out = []
    for c in word:
        if c not in symbols:
            c = c.upper() if case == "upper" else c.lower() if case == "lower" else c
            if c not in symbols:
                return None
        out.append(c)
    return out


# --------------------------------------------------------------------------- lexicon


@dataclass
class Lexicon:
    """A flashlight lexicon: (word, spelling tokens ending with `|`) pairs; a word may repeat."""

    path: Path
    entries: list[tuple[str, list[str]]]

    @property
    def words(self) -> set[str]:
        return {w for w, _ in self.entries}


def read_lexicon(path: Path, vocab: Vocab) -> Lexicon:
    """Read and validate a lexicon against the letter dictionary (every token must be in it).

    fairseq asserts the same thing; a spelling token outside the dictionary would map to <unk>
    and the word could never be decoded (fairseq issue #4040).
    """
    path = Path(path)
    if not path.exists():
        raise LMError(
            f"lexicon not found: {path}. `d2v prepare lm` writes one next to the LM "
            "(or pass --lexicon FILE with lines `WORD<TAB>W O R D |`)."
        )
    symbols = set(vocab.symbols)
    entries: list[tuple[str, list[str]]] = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise LMError(f"{path}:{i}: expected `WORD<TAB>W O R D |`, got {line.strip()!r}")
            word, spelling = parts[0], parts[1:]
            bad = [t for t in spelling if t not in symbols]
            if bad:
                raise LMError(
                    f"{path}:{i}: the spelling of {word!r} uses {', '.join(map(repr, sorted(set(bad))))}, which "
                    f"the letter dictionary does not have ({''.join(vocab.symbols)}). Rebuild the lexicon with "
                    "`d2v prepare lm` (it spells words in the dictionary's letters and case)."
                )
            entries.append((word, spelling))
    if not entries:
        raise LMError(f"lexicon {path} is empty")
    return Lexicon(path, entries)


def write_lexicon(path: Path, entries: list[tuple[str, list[str]]]) -> None:
    """One `WORD<TAB>S P E L L I N G |` line per entry, in order."""
    with open(path, "w", encoding="utf-8") as fh:
        for w, spelling in entries:
            fh.write(f"{w}\t{' '.join(spelling)}\n")


def unigram_words(lexicon: Lexicon) -> list[str]:
    """Distinct lexicon words in file order (pyctcdecode's `unigrams`)."""
    return list(dict.fromkeys(w for w, _ in lexicon.entries))


def case_mismatch_message(lm_case: Case, dict_case: Case, what: str, fix: str) -> Optional[str]:
    """The error for LM/lexicon words whose case differs from the dictionary's (None if they agree)."""
    if lm_case in ("uncased",) or dict_case == "uncased" or lm_case == dict_case:
        return None
    return (
        f"case mismatch: {what} is {lm_case} case but the letter dictionary (and so every reference "
        f"transcript) is {dict_case} case. The decoder would output {lm_case}-case words that never match "
        f"the references: about 100 % WER with no error anywhere. Fix: {fix}"
    )


def check_lexicon_against_lm(lexicon: Lexicon, lm_path: Path, vocab: Vocab) -> None:
    """Decode-time check that the lexicon's words are the LM's words and in the transcripts' case.

    Raises LMError with the fix when they are not. Loads the LM lazily (mmap), so it is cheap.
    """
    dict_case = dictionary_case(vocab)
    lex_case = word_case(w for w, _ in lexicon.entries)
    msg = case_mismatch_message(
        lex_case, dict_case, f"the lexicon {lexicon.path}",
        "rebuild the LM and lexicon in the dictionary's case: `d2v prepare lm --arpa LM.arpa --match-case` "
        "(or `--text CORPUS`, which is normalized to upper case).",
    )
    if msg:
        raise LMError(msg)
    model = load_kenlm(lm_path)
    sample = sorted(lexicon.words)[:: max(1, len(lexicon.words) // 2000)]
    known = sum(w in model for w in sample)
    if known < 0.5 * len(sample):
        swapped = sum((w.lower() in model) or (w.upper() in model) for w in sample)
        if swapped > known:
            raise LMError(
                f"case mismatch: the words of {lexicon.path} are {lex_case} case but the LM {lm_path} knows "
                f"them only in another case ({known}/{len(sample)} sampled words found as written). Every word "
                "would score as <unk>. Fix: rebuild both with `d2v prepare lm ... --match-case`."
            )
        raise LMError(
            f"the lexicon {lexicon.path} and the LM {lm_path} barely share a vocabulary ({known}/{len(sample)} "
            "sampled lexicon words are in the LM). Use the lexicon `d2v prepare lm` built for this LM."
        )


# --------------------------------------------------------------------------- the KenLM binary


def load_kenlm(path: Path):
    """kenlm.Model with lazy mmap loading (a multi-GB binary opens instantly)."""
    try:
        # On use, not at module level: kenlm is a compiled extension whose absence (or a
        # different package of that name) must be this LMError with the fix, not an import
        # failure of every module that reads lexicons.
        import kenlm
    except ImportError as e:
        raise LMError(f"the kenlm Python module is not installed ({e}). Fix: pip install kenlm") from None
    if not hasattr(kenlm, "Model"):
        raise LMError("the installed `kenlm` module has no Model class (a different package named kenlm). "
                      "Fix: pip uninstall kenlm && pip install kenlm")
    config = kenlm.Config()
    config.load_method = kenlm.LoadMethod.LAZY
    try:
        return kenlm.Model(str(path), config)
    except (OSError, RuntimeError, ValueError) as e:
        raise LMError(f"cannot load the language model {path}: {e}. Rebuild it with `d2v prepare lm`.") from None


def is_letter_lm(model) -> bool:
    """A letter LM (for lexicon-free decoding) has the word boundary `|` in its vocabulary."""
    return WORD_SEP in model


# --------------------------------------------------------------------------- where the LM is


def resolve_lm(ws, lm: Optional[Path | str]) -> Optional[Path]:
    """`--lm` as a path, or a file name inside <workdir>/lm/. None stays None."""
    if lm is None or str(lm) == "":
        return None
    p = Path(lm).expanduser()
    for cand in (p, ws.lm_dir / p.name, ws.lm_dir / p):
        if cand.is_file():
            return cand.resolve()
    raise LMError(
        f"language model not found: {lm} (looked for the path and for {ws.lm_dir / p.name}). Build one with "
        f"`d2v prepare lm --text CORPUS.txt --order 4 -w {ws.root}` or convert an ARPA with "
        f"`d2v prepare lm --arpa 4-gram.arpa.gz -w {ws.root}`."
    )


def workspace_lm(ws) -> Optional[Path]:
    """The LM that `d2v prepare lm` last built in this workspace (from lm/report.json), if any."""
    report = ws.lm_dir / "report.json"
    if not report.exists():
        return None
    try:
        path = Path(json.loads(report.read_text())["lm"])
    except (ValueError, KeyError):
        return None
    return path if path.is_file() else None
