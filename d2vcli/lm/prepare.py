"""`d2v prepare lm`: build the KenLM binary and the lexicon in <workdir>/lm/, and validate them.

    d2v prepare lm --text corpus.txt[.gz] --order 4     # corpus -> lmplz -> ARPA -> build_binary
    d2v prepare lm --arpa 4-gram.arpa.gz                 # an existing ARPA -> build_binary
    d2v prepare lm --text corpus.txt --unit letter --order 6   # a letter LM for lexicon-free decoding

    from d2vcli.lm.prepare import prepare_lm
    report = prepare_lm(Workspace.resolve("d2v-work"), text="corpus.txt", order=4)

Outputs in <workdir>/lm/, each written atomically (a failed or interrupted run leaves what was
there before; the next run removes what a killed one left in its temp directory). One
`d2v prepare lm` at a time writes lm/: a second is refused while `<workdir>/.lm.lock` is held.

    4gram.bin     KenLM binary. `probing` hash by default (fastest lookups; what fairseq and
                  wav2letter use); `--structure trie` is smaller for very large LMs.
    lexicon.txt   flashlight lexicon, `WORD<TAB>W O R D |` (see `d2vcli.lm.formats`).
    report.json   the validation report, also printed as a table.

The validation report covers what makes LM decoding silently useless: the OOV rate of the dev
transcripts against the lexicon, their perplexity under the LM (KenLM Python module), and case
agreement between the LM vocabulary, the lexicon words and the letter dictionary (a mismatch
is an error, see `d2vcli.lm.formats`).

Text corpora get the same normalization as the transcripts (`vocab.normalize_text`: upper
case, punctuation other than apostrophes removed) unless `--no-normalize`. The KenLM programs
come from `d2vcli.lm.kenlm_tools`.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

from d2vcli.fileio import atomic_write_text, remove_stale_temps, temp_dir
from d2vcli.lm.formats import (
    LM_SPECIAL_WORDS, ArpaInfo, Case, LMError, case_mismatch_message, dictionary_case, load_kenlm, open_text,
    read_arpa_unigrams, recase_arpa, spell, word_case, write_lexicon,
)
from d2vcli.lm.kenlm_tools import KenLMTools, find_kenlm_tools
from d2vcli.locks import hold
from d2vcli.manifest import read_manifest
from d2vcli.ui import console, progress, table
from d2vcli.vocab import WORD_SEP, Vocab, normalize_text, to_letters
from d2vcli.workspace import Workspace

# The KenLM inside the flashlight-text and kenlm wheels is compiled with the default maximum order.
KENLM_MAX_ORDER = 6

Unit = Literal["word", "letter"]
DiscountFallback = Literal["auto", "always", "never"]
Structure = Literal["probing", "trie"]

DISCOUNT_FALLBACK_WHY = (
    "lmplz could not estimate modified Kneser-Ney discounts: the corpus is too small or too "
    "repetitive to contain n-grams seen exactly once, twice and three times at every order, which "
    "the estimate needs. Rebuilt with --discount_fallback, which uses fixed discounts (0.5, 1, 1.5) "
    "instead. That is fine for a small or synthetic corpus; for a real LM, give lmplz more text."
)

CASE_FIX = ("rebuild with `--match-case` (converts the LM's words to the dictionary's case), or from a text "
            "corpus with `--text`, which is normalized to upper case like the transcripts.")


# --------------------------------------------------------------------------- the report


@dataclass
class DevStats:
    split: str
    utterances: int
    words: int
    oov_words: int
    perplexity: float

    @property
    def oov_rate(self) -> float:
        return self.oov_words / self.words if self.words else 0.0


@dataclass
class LMReport:
    """What `d2v prepare lm` built and how the result checks out (printed, and saved as report.json)."""

    lm: str
    lexicon: Optional[str]
    unit: str
    order: int
    source: str
    ngram_counts: dict[int, int]
    vocabulary: int
    lexicon_words: int = 0
    skipped_words: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    lm_case: str = "uncased"
    lexicon_case: str = "uncased"
    dictionary_case: str = "uncased"
    discount_fallback: bool = False
    dev: list[DevStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for row, stats in zip(d["dev"], self.dev):
            row["oov_rate"] = stats.oov_rate
        return d

    def table(self):
        rows = [
            ("language model", self.lm, f"{self.unit} {self.order}-gram, "
             + ", ".join(f"{n}-grams {c:,}" for n, c in sorted(self.ngram_counts.items()))),
            ("source", self.source, "--discount_fallback used" if self.discount_fallback else ""),
        ]
        if self.lexicon:
            rows.append(("lexicon", self.lexicon, f"{self.lexicon_words:,} words; {self.skipped_words:,} skipped "
                         "(letters outside the dictionary)"
                         + (f", e.g. {', '.join(self.skipped_examples[:5])}" if self.skipped_examples else "")))
        ok_case = all(c in (self.dictionary_case, "uncased") for c in (self.lm_case, self.lexicon_case))
        rows.append(("case", "ok" if ok_case else "MISMATCH",
                     f"LM {self.lm_case}, lexicon {self.lexicon_case}, dictionary {self.dictionary_case}"))
        for d in self.dev:
            rows.append((f"dev {d.split}", f"OOV {100 * d.oov_rate:.2f} %",
                         f"perplexity {d.perplexity:.1f} over {d.utterances} utterances, {d.words} words"))
        for n in self.notes:
            rows.append(("note", "", n))
        for p in self.problems:
            rows.append(("ERROR", "", p.split(". ")[0] + " (details below)"))
        return table("LM validation", ["check", "result", "details"], rows)


def dev_manifests(ws: Workspace) -> list[Path]:
    """The dev/validation manifests of the workspace (dev-clean, dev-other, valid, ...)."""
    if not ws.data_dir.exists():
        return []
    return sorted(p for p in ws.data_dir.glob("*.jsonl") if p.stem.startswith(("dev", "valid")))


# --------------------------------------------------------------------------- prepare lm


def prepare_lm(
    ws: Workspace,
    arpa: Optional[Path | str] = None,
    text: Optional[Path | str] = None,
    order: int = 4,
    unit: Unit = "word",
    words: Optional[Path | str] = None,
    dictionary: Optional[Path | str] = None,
    name: Optional[str] = None,
    normalize: bool = True,
    match_case: bool = False,
    discount_fallback: DiscountFallback = "auto",
    structure: Structure = "probing",
    memory: str = "20%",
    keep_arpa: bool = False,
) -> LMReport:
    """Build the KenLM binary and lexicon in <workdir>/lm/ and validate them; returns the report.

    Exactly one of `arpa` (convert an existing ARPA) and `text` (estimate an `order`-gram with
    lmplz) is given. `unit="letter"` builds an n-gram over letters and `|` for lexicon-free
    decoding (no lexicon). `words` replaces the LM unigrams as the lexicon's word list.
    `match_case` converts the LM words to the letter dictionary's case (for an ARPA in the
    other case). `discount_fallback="auto"` retries lmplz with --discount_fallback when the
    corpus is too small for Kneser-Ney discounts, and says so.
    Raises LMError (outputs untouched) on a case mismatch or a bad input.
    """
    t0 = time.time()
    _check_arguments(arpa, text, order, unit, words)
    source_path = _source_file(arpa, text)  # the file the user named is checked first
    dict_path = Path(dictionary) if dictionary else ws.dictionary
    vocab = Vocab.load(dict_path)
    ws.lm_dir.mkdir(parents=True, exist_ok=True)
    # The lock sits next to lm/, not in it: lm/ holds only the outputs.
    with hold(ws.root / ".lm.lock", "d2v prepare lm"):
        removed = remove_stale_temps(ws.lm_dir)
        if removed:
            console.print(f"removed {len(removed)} temp file(s) left in {ws.lm_dir} by an interrupted earlier run")
        tmp = temp_dir(ws.lm_dir, "prepare-lm")
        try:
            notes: list[str] = []
            used_fallback = False
            arpa_path = source_path
            if text is not None:
                arpa_path, used_fallback = _estimate_arpa(source_path, tmp, order, unit, vocab, normalize, match_case,
                                                          discount_fallback, memory, notes)
            arpa_path, info, unit = _read_lm_vocabulary(arpa_path, arpa is not None, unit, match_case, vocab, tmp,
                                                        notes)
            report = LMReport(
                lm="", lexicon=None, unit=unit, order=info.order, source=str(source_path),
                ngram_counts=info.counts, vocabulary=len(info.unigrams), lm_case=word_case(info.unigrams),
                dictionary_case=dictionary_case(vocab), discount_fallback=used_fallback, notes=notes,
            )
            # Case and lexicon checks come first: they are cheap and decide whether to build at all.
            lexicon_entries = _check_case_and_lexicon(report, info, words, match_case, vocab, dict_path)
            bin_tmp = _build_binary(report, info, arpa_path, structure, tmp)
            model = load_kenlm(bin_tmp)
            if lexicon_entries:
                write_lexicon(tmp / "lexicon.txt", lexicon_entries)
            _check_on_dev_sets(ws, report, model, {w for w, _ in lexicon_entries})
            _move_into_place(ws, report, name, bin_tmp, tmp / "lexicon.txt" if lexicon_entries else None,
                             arpa_path if keep_arpa and text is not None else None)
            report.seconds = round(time.time() - t0, 2)
            atomic_write_text(ws.lm_dir / "report.json", json.dumps(report.to_dict(), indent=1) + "\n")
            return report
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_arguments(arpa, text, order: int, unit: Unit, words) -> None:
    """The option combinations `prepare_lm` refuses before reading anything."""
    if (arpa is None) == (text is None):
        raise LMError("give exactly one of --arpa FILE (an existing ARPA LM) and --text FILE (a corpus to train on)")
    if unit == "letter" and words is not None:
        raise LMError("--words makes no sense for a letter LM (it has no lexicon)")
    if text is not None and not 2 <= order <= KENLM_MAX_ORDER:
        raise LMError(f"--order must be between 2 and {KENLM_MAX_ORDER}: the KenLM compiled into flashlight-text and "
                      f"the kenlm wheel loads n-grams up to order {KENLM_MAX_ORDER}")


def _source_file(arpa, text) -> Path:
    """The ARPA or the text corpus given, which must be a file."""
    source_path = Path(arpa if arpa is not None else text).expanduser()
    if not source_path.is_file():
        raise LMError(f"{'ARPA file' if arpa is not None else 'text corpus'} not found: {source_path}")
    return source_path


def _estimate_arpa(corpus: Path, tmp: Path, order: int, unit: Unit, vocab: Vocab, normalize: bool,
                   match_case: bool, policy: DiscountFallback, memory: str, notes: list[str]) -> tuple[Path, bool]:
    """An ARPA estimated from the text corpus by lmplz (built first if needed), and whether
    --discount_fallback was used; says why it was, and adds both facts to `notes`."""
    tools = find_kenlm_tools(build=True)
    arpa_path = tmp / "lm.arpa"
    used_fallback = _run_lmplz(tools, corpus, arpa_path, order, unit, vocab, normalize,
                               match_case, dictionary_case(vocab), policy, memory, tmp)
    if used_fallback:
        console.print(f"[yellow]note:[/] {DISCOUNT_FALLBACK_WHY}")
        notes.append("lmplz --discount_fallback: the corpus is too small for Kneser-Ney discount estimates")
    if not normalize:
        notes.append("corpus used as is (--no-normalize)")
    return arpa_path, used_fallback


def _read_lm_vocabulary(arpa_path: Path, given_arpa: bool, unit: Unit, match_case: bool, vocab: Vocab,
                        tmp: Path, notes: list[str]) -> tuple[Path, ArpaInfo, Unit]:
    """The ARPA's header and unigrams, with a given ARPA's words converted to the dictionary's case
    under `match_case` (into a copy in `tmp`, which is returned), and the unit: a given ARPA with
    `|` in its vocabulary is a letter LM."""
    dict_case = dictionary_case(vocab)
    info = read_arpa_unigrams(arpa_path)
    if given_arpa and unit == "word" and WORD_SEP in info.unigrams:
        unit = "letter"
        notes.append("the ARPA's vocabulary contains `|`: treated as a letter LM (lexicon-free decoding)")
    lm_case = word_case(info.unigrams)
    if match_case and given_arpa and lm_case != dict_case and dict_case in ("upper", "lower"):
        arpa_path = recase_arpa(arpa_path, tmp / "recased.arpa", dict_case, info)
        notes.append(f"LM words converted from {lm_case} to {dict_case} case (--match-case)")
        info = read_arpa_unigrams(arpa_path)
    return arpa_path, info, unit


def _check_case_and_lexicon(report: LMReport, info: ArpaInfo, words, match_case: bool, vocab: Vocab,
                            dict_path: Path) -> list[tuple[str, list[str]]]:
    """The lexicon entries of a word LM ([] for a letter LM) after the case checks; on any problem
    the report is printed and LMError raised, before anything is built."""
    lexicon_entries: list[tuple[str, list[str]]] = []
    if report.unit == "word":
        lexicon_entries = _spell_lexicon(report, info, words, match_case, vocab, dict_path)
    else:
        msg = case_mismatch_message(report.lm_case, report.dictionary_case, "the letter LM's vocabulary", CASE_FIX)
        if msg:
            report.problems.append(msg)
    if report.problems:
        console.print(report.table())
        raise LMError("\n".join(report.problems))
    return lexicon_entries


def _spell_lexicon(report: LMReport, info: ArpaInfo, words, match_case: bool, vocab: Vocab,
                   dict_path: Path) -> list[tuple[str, list[str]]]:
    """Every LM word (or every `words` entry) spelled in the dictionary's letters and case, ending
    with `|`; words with other letters are skipped. Counts, case, notes and problems go to `report`."""
    dict_case, lm_case = report.dictionary_case, report.lm_case
    symbols = frozenset(vocab.symbols)
    word_list = _read_word_list(Path(words)) if words else info.unigrams
    if words and match_case and dict_case in ("upper", "lower"):
        word_list = [w.upper() if dict_case == "upper" else w.lower() for w in word_list]
    entries: list[tuple[str, list[str]]] = []
    skipped: list[str] = []
    for w in word_list:
        if w in LM_SPECIAL_WORDS:
            continue
        letters = spell(w, symbols, dict_case)
        if letters is None:
            skipped.append(w)
        else:
            entries.append((w, letters + [WORD_SEP]))
    report.lexicon_words = len(entries)
    report.skipped_words = len(skipped)
    report.skipped_examples = skipped[:10]
    report.lexicon_case = word_case(w for w, _ in entries)
    msg = case_mismatch_message(lm_case, dict_case, "the LM vocabulary", CASE_FIX)
    if msg is None and report.lexicon_case != lm_case:  # only a --words list can differ from the LM
        msg = case_mismatch_message(report.lexicon_case, dict_case, "the lexicon (--words)", CASE_FIX)
    if msg:
        report.problems.append(msg)
    if words and entries:
        lm_vocab = set(info.unigrams)
        missing = sum(w not in lm_vocab for w, _ in entries)
        if missing:
            report.notes.append(f"{missing:,} lexicon words (--words) are not in the LM: they score as <unk>")
    if not entries and not report.problems:
        report.problems.append(
            f"no LM word can be spelled with the letter dictionary {dict_path} "
            f"({''.join(vocab.symbols)}): the LM and the acoustic model use different alphabets."
        )
    return entries


def _build_binary(report: LMReport, info: ArpaInfo, arpa_path: Path, structure: Structure, tmp: Path) -> Path:
    """The KenLM binary of the ARPA, in `tmp` (build_binary -s when the ARPA lacks <s> or </s>)."""
    missing_markers = [m for m in ("<s>", "</s>") if m not in info.unigrams]
    if missing_markers:
        report.notes.append(f"the ARPA has no {' '.join(missing_markers)}: built with build_binary -s")
    tools = find_kenlm_tools(build=True)
    bin_tmp = tmp / "lm.bin"
    _run_build_binary(tools, arpa_path, bin_tmp, structure, bool(missing_markers), tmp)
    return bin_tmp


def _check_on_dev_sets(ws: Workspace, report: LMReport, model, lexicon_words: set[str]) -> None:
    """OOV rate and perplexity of each dev manifest's transcripts, with a note when the OOV rate
    alone bounds the WER high."""
    for manifest in dev_manifests(ws):
        report.dev.append(_dev_stats(manifest, model, lexicon_words, report.unit))
    for d in report.dev:
        if report.unit == "word" and d.oov_rate > 0.2:
            report.notes.append(
                f"{d.split}: {100 * d.oov_rate:.1f} % of the reference words are not in the lexicon; the decoder "
                "cannot output them (expect WER at least that high). Use an LM trained on matching text.")


def _move_into_place(ws: Workspace, report: LMReport, name: Optional[str], bin_tmp: Path,
                     lexicon_tmp: Optional[Path], arpa_tmp: Optional[Path]) -> None:
    """Everything checked: the binary, the lexicon and the ARPA (if kept) renamed into lm/, each
    rename atomic; the report gets their paths."""
    stem = name or (f"{report.order}gram" if report.unit == "word" else f"letter-{report.order}gram")
    if arpa_tmp is not None:
        os.replace(arpa_tmp, ws.lm_dir / f"{stem}.arpa")
    os.replace(bin_tmp, ws.lm_dir / f"{stem}.bin")
    report.lm = str(ws.lm_dir / f"{stem}.bin")
    if lexicon_tmp is not None:
        os.replace(lexicon_tmp, ws.lm_dir / "lexicon.txt")
        report.lexicon = str(ws.lm_dir / "lexicon.txt")


# --------------------------------------------------------------------------- the steps' helpers


def _read_word_list(path: Path) -> list[str]:
    if not path.is_file():
        raise LMError(f"word list not found: {path}")
    with open_text(path) as fh:
        return [line.split()[0] for line in fh if line.strip()]


def _corpus_lines(path: Path, unit: Unit, normalize: bool, match_case: bool, dict_case: Case,
                  on_bytes=None) -> Iterator[str]:
    """The corpus as lmplz should see it: one normalized sentence (or letter sequence) per line."""
    raw = open(path, "rb")
    stream = gzip.open(raw, "rb") if path.suffix == ".gz" else raw
    try:
        for n, bline in enumerate(stream):
            line = bline.decode("utf-8", errors="replace")
            if normalize:
                line = normalize_text(line)
            elif match_case and dict_case in ("upper", "lower"):
                line = line.upper() if dict_case == "upper" else line.lower()
            line = line.strip()
            if not line:
                continue
            if unit == "letter":
                line = to_letters(line)
            if on_bytes is not None and n % 1000 == 0:
                on_bytes(raw.tell())
            yield line
    finally:
        stream.close()
        raw.close()


def _run_lmplz(tools: KenLMTools, corpus: Path, arpa_out: Path, order: int, unit: Unit, vocab: Vocab,
               normalize: bool, match_case: bool, dict_case: Case, policy: DiscountFallback,
               memory: str, tmp: Path) -> bool:
    """Estimate the ARPA; returns whether --discount_fallback was needed."""
    def attempt(fallback: bool) -> tuple[int, str]:
        log_path = tmp / "lmplz.log"
        cmd = [str(tools.lmplz), "-o", str(order), "-S", memory, "-T", str(tmp) + os.sep, "--arpa", str(arpa_out)]
        if fallback:
            cmd.append("--discount_fallback")
        size = corpus.stat().st_size
        with open(log_path, "w") as log, progress() as bar:
            task = bar.add_task(f"lmplz {order}-gram" + (" (discount fallback)" if fallback else ""), total=size)
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
            assert proc.stdin is not None
            try:
                with io.TextIOWrapper(proc.stdin, encoding="utf-8") as sink:
                    for line in _corpus_lines(corpus, unit, normalize, match_case, dict_case,
                                              on_bytes=lambda b: bar.update(task, completed=b)):
                        sink.write(line + "\n")
            except BrokenPipeError:
                pass  # lmplz stopped reading: its exit code and log say why
            code = proc.wait()
            bar.update(task, completed=size)
        return code, log_path.read_text(errors="replace")

    code, log = attempt(policy == "always")
    if code != 0 and "discount_fallback" in log and policy == "auto":
        code, log = attempt(True)
        if code == 0:
            return True
    if code != 0:
        tail = "\n".join(log.strip().splitlines()[-6:])
        hint = ""
        if "discount_fallback" in log:
            hint = ("\nThe corpus is too small for Kneser-Ney discounts: pass --discount-fallback always, "
                    "or use more text.")
        raise LMError(f"lmplz failed on {corpus} (exit {code}):\n{tail}{hint}")
    return policy == "always"


def _run_build_binary(tools: KenLMTools, arpa: Path, out: Path, structure: Structure, skip_markers: bool,
                      tmp: Path) -> None:
    cmd = [str(tools.build_binary)]
    if skip_markers:
        cmd.append("-s")
    if structure == "trie":
        cmd += ["-T", str(tmp) + os.sep]
    cmd += [structure, str(arpa), str(out)]
    with console.status(f"build_binary {structure} {arpa.name}"):
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if res.returncode != 0:
        tail = "\n".join(res.stdout.strip().splitlines()[-6:])
        raise LMError(f"build_binary failed on {arpa} (exit {res.returncode}):\n{tail}")


def _dev_stats(manifest: Path, model, lexicon_words: set[str], unit: Unit) -> DevStats:
    records = [r for r in read_manifest(manifest) if r.text]
    total_log10 = 0.0
    tokens = 0
    words = 0
    oov = 0
    for r in records:
        sent = to_letters(r.text) if unit == "letter" else r.text
        total_log10 += model.score(sent, bos=True, eos=True)
        tokens += len(sent.split()) + 1  # + </s>
        ws_ = r.text.split()
        words += len(ws_)
        if unit == "word":
            oov += sum(w not in lexicon_words for w in ws_)
    ppl = 10 ** (-total_log10 / tokens) if tokens else math.nan
    return DevStats(manifest.stem, len(records), words, oov, round(ppl, 3))


def print_report(report: LMReport) -> None:
    """The validation table and where the outputs were written."""
    console.print(report.table())
    console.print(f"wrote {report.lm}" + (f" and {report.lexicon}" if report.lexicon else "")
                  + f" ({report.seconds:.1f} s)")
