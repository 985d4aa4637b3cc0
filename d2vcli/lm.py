"""Language-model resources for beam-search decoding: the KenLM binary, the letter lexicon, the
KenLM tools that build them, and the checks that stop the classic silent 100 % WER.

    d2v prepare lm --text corpus.txt[.gz] --order 4     # corpus -> lmplz -> ARPA -> build_binary
    d2v prepare lm --arpa 4-gram.arpa.gz                 # an existing ARPA -> build_binary
    d2v prepare lm --text corpus.txt --unit letter --order 8   # a letter LM for lexicon-free decoding

    from d2vcli.lm import prepare_lm
    report = prepare_lm(Workspace.resolve("d2v-work"), text="corpus.txt", order=4)

Outputs in <workdir>/lm/, each written atomically (a failed or interrupted run leaves what was
there before):

    4gram.bin     KenLM binary. `probing` hash by default (fastest lookups; what fairseq and
                  wav2letter use); `--structure trie` is smaller for very large LMs.
    lexicon.txt   flashlight lexicon, one spelling a line: `WORD<TAB>W O R D |`. The word is
                  written exactly as in the LM (it is looked up there); the spelling uses the
                  letter dictionary's case and ends with the word boundary `|` (fairseq README:
                  "the word should match the case of the n-gram language model, while the
                  spelling should match the case of the token dictionary").
    report.json   the validation report, also printed as a table.

The validation report covers what makes LM decoding silently useless: the OOV rate of the dev
transcripts against the lexicon, their perplexity under the LM (KenLM Python module), and case
agreement between the LM vocabulary, the lexicon words and the letter dictionary. An LM in
lower case with an upper-case dictionary (the wav2letter recipe lower-cases the LibriSpeech
ARPA; fairseq's dictionary is upper case) decodes without any error and scores about 100 %
WER, so a case mismatch is an error here, with the fix (`--match-case`) in the message.

Text corpora get the same normalization as the transcripts (`vocab.normalize_text`: upper
case, punctuation other than apostrophes removed) unless `--no-normalize`.

The KenLM programs `lmplz` and `build_binary` are taken from PATH, else from the cache
($D2V_CACHE/kenlm or ~/.cache/d2vcli/kenlm), else built there once from the `kenlm` source
distribution on the package index (cmake + make of just those two targets, about a minute or
two). The Python `kenlm` wheel does not include them.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator, Literal, Optional

from d2vcli.errors import UserError
from d2vcli.fileio import atomic_write_text
from d2vcli.vocab import SPECIALS, WORD_SEP, Vocab, normalize_text, to_letters

# Debian packages needed to build lmplz / build_binary (kenlm BUILDING + its CMakeLists).
APT_PACKAGES = (
    "build-essential", "cmake", "libboost-program-options-dev", "libboost-system-dev",
    "libboost-thread-dev", "libboost-test-dev", "zlib1g-dev", "libbz2-dev", "liblzma-dev",
)
APT_FIX = "sudo apt-get install " + " ".join(APT_PACKAGES)
KENLM_TOOLS = ("lmplz", "build_binary")
ENV_CACHE = "D2V_CACHE"
ENV_KENLM_SOURCE = "D2V_KENLM_SOURCE"  # a kenlm sdist (.tar.gz) or source dir, for offline machines
LM_SPECIAL_WORDS = ("<s>", "</s>", "<unk>")
# The KenLM inside the flashlight-text and kenlm wheels is compiled with the default maximum order.
KENLM_MAX_ORDER = 6

Case = Literal["upper", "lower", "mixed", "uncased"]
Unit = Literal["word", "letter"]
DiscountFallback = Literal["auto", "always", "never"]
Structure = Literal["probing", "trie"]

DISCOUNT_FALLBACK_WHY = (
    "lmplz could not estimate modified Kneser-Ney discounts: the corpus is too small or too "
    "repetitive to contain n-grams seen exactly once, twice and three times at every order, which "
    "the estimate needs. Rebuilt with --discount_fallback, which uses fixed discounts (0.5, 1, 1.5) "
    "instead. That is fine for a small or synthetic corpus; for a real LM, give lmplz more text."
)


class LMError(UserError):
    """An LM resource that cannot be used (or built); the message says how to fix it."""


# ============================================================================ KenLM tools


@dataclass(frozen=True)
class KenLMTools:
    lmplz: Path
    build_binary: Path
    source: Literal["path", "cache", "built"]


def kenlm_cache_dir() -> Path:
    """$D2V_CACHE/kenlm, else ~/.cache/d2vcli/kenlm."""
    base = os.environ.get(ENV_CACHE)
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "d2vcli") / "kenlm"


def _tools_in(bindir: Path) -> Optional[tuple[Path, Path]]:
    paths = [bindir / t for t in KENLM_TOOLS]
    if all(p.is_file() and os.access(p, os.X_OK) for p in paths):
        return paths[0], paths[1]
    return None


def locate_kenlm_tools() -> Optional[KenLMTools]:
    """lmplz and build_binary from PATH or the cache, without building anything."""
    found = [shutil.which(t) for t in KENLM_TOOLS]
    if all(found):
        return KenLMTools(Path(found[0]), Path(found[1]), "path")
    cached = _tools_in(kenlm_cache_dir() / "bin")
    if cached:
        return KenLMTools(cached[0], cached[1], "cache")
    return None


def kenlm_build_problems() -> list[str]:
    """What is missing to build the KenLM tools here (empty: buildable). Used by `d2v doctor`."""
    problems = []
    if not shutil.which("cmake"):
        problems.append("cmake is not installed")
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        problems.append("no C++ compiler (c++, g++ or clang++)")
    if not shutil.which("make"):
        problems.append("make is not installed")
    include_dirs = [Path(p) for p in ("/usr/include", "/usr/local/include", "/opt/homebrew/include")]
    include_dirs += [Path(p) for p in os.environ.get("CPATH", "").split(os.pathsep) if p]
    if os.environ.get("BOOST_ROOT"):
        include_dirs.append(Path(os.environ["BOOST_ROOT"]) / "include")
    for header, what in (("boost/program_options.hpp", "Boost program_options headers"),
                         ("boost/thread.hpp", "Boost thread headers"), ("zlib.h", "zlib headers")):
        if not any((d / header).exists() for d in include_dirs):
            problems.append(f"{what} ({header}) not found")
    return problems


def find_kenlm_tools(build: bool = True) -> KenLMTools:
    """lmplz and build_binary: on PATH, cached, or (with `build`) built into the cache now.

    Concurrent callers (parallel test workers, two shells) wait on a lock file, so the tools
    are built at most once per cache directory.
    """
    tools = locate_kenlm_tools()
    if tools or not build:
        if tools:
            return tools
        raise LMError(
            "the KenLM tools lmplz and build_binary were not found on PATH or in "
            f"{kenlm_cache_dir() / 'bin'}. `d2v prepare lm` builds them automatically; "
            "`d2v doctor` says whether this machine can."
        )
    cache = kenlm_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache / ".build.lock"):
        cached = _tools_in(cache / "bin")  # another process may have built them while we waited
        if cached:
            return KenLMTools(cached[0], cached[1], "cache")
        return build_kenlm_tools(cache)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def build_kenlm_tools(cache: Path) -> KenLMTools:
    """Download the kenlm sdist, then cmake + make `lmplz` and `build_binary` into `cache`/bin.

    Progress is shown as a bar (download, configure, compile percent from make). On failure the
    error names what is missing and the Debian packages to install; the build log is kept.
    """
    from d2vcli.ui import console, progress

    problems = [p for p in kenlm_build_problems() if "not found" not in p]  # headers: cmake decides
    if problems:
        raise LMError(
            "cannot build the KenLM tools (lmplz, build_binary): " + "; ".join(problems) + ".\n"
            f"Install the build dependencies: {APT_FIX}\n"
            "or install lmplz and build_binary yourself (https://github.com/kpu/kenlm) and put them on PATH."
        )
    console.print(f"[bold]Building the KenLM tools[/] (lmplz, build_binary) into {cache} (once per machine)")
    work = Path(tempfile.mkdtemp(prefix="kenlm-build-", dir=cache))
    log_path = cache / "build.log"
    ok = False
    try:
        with progress() as bar, open(log_path, "w") as log:
            task = bar.add_task("kenlm: fetch source", total=100)
            src = _kenlm_source(work, log)
            bar.update(task, completed=5, description="kenlm: configure")
            build = work / "build"
            _run_logged(
                ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 "-DCOMPILE_TESTS=OFF", "-DENABLE_PYTHON=OFF"],
                log, log_path, "configuring kenlm (cmake) failed",
            )
            bar.update(task, completed=10, description="kenlm: compile")
            jobs = str(max(1, os.cpu_count() or 1))
            cmd = ["cmake", "--build", str(build), "--target", "lmplz", "build_binary", "--parallel", jobs]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                m = re.match(r"\[\s*(\d+)%\]", line)
                if m:
                    bar.update(task, completed=10 + 0.9 * int(m.group(1)))
            if proc.wait() != 0:
                raise LMError(_build_failure("compiling kenlm (make) failed", log_path))
            bar.update(task, completed=100)
        bindir = cache / "bin"
        bindir.mkdir(exist_ok=True)
        for tool in KENLM_TOOLS:
            tmp = bindir / f".{tool}.tmp"
            shutil.copy2(build / "bin" / tool, tmp)
            os.replace(tmp, bindir / tool)
        ok = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if ok:
            log_path.unlink(missing_ok=True)
    return KenLMTools(bindir / "lmplz", bindir / "build_binary", "built")


def _kenlm_source(work: Path, log: IO[str]) -> Path:
    """The kenlm source tree: $D2V_KENLM_SOURCE (sdist or dir), else the sdist from the package index."""
    given = os.environ.get(ENV_KENLM_SOURCE)
    if given and Path(given).is_dir():
        return Path(given)
    if given:
        archive = Path(given)
    else:
        # --no-build-isolation: pip only reads the sdist's metadata; with isolation it would
        # build its build requirement `cmake` from source, which takes many minutes.
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
               "--no-build-isolation", "--disable-pip-version-check", "kenlm", "-d", str(work)]
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.write(res.stdout)
        archives = sorted(work.glob("kenlm-*.tar.gz")) + sorted(work.glob("kenlm-*.zip"))
        if res.returncode != 0 or not archives:
            tail = "\n".join(res.stdout.strip().splitlines()[-5:])
            raise LMError(
                "could not download the kenlm source distribution to build lmplz and build_binary "
                f"(`pip download --no-binary :all: --no-deps kenlm` failed):\n{tail}\n"
                f"Without network access, download a kenlm sdist elsewhere and set {ENV_KENLM_SOURCE}=/path/to/"
                "kenlm-X.tar.gz, or install lmplz and build_binary yourself and put them on PATH."
            )
        archive = archives[-1]
    dest = work / "src"
    dest.mkdir()
    if archive.suffix == ".zip":
        import zipfile

        zipfile.ZipFile(archive).extractall(dest)
    else:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python < 3.11.4
                tar.extractall(dest)
    roots = [p for p in dest.iterdir() if (p / "CMakeLists.txt").exists()]
    if not roots:
        raise LMError(f"{archive} does not look like the kenlm source (no CMakeLists.txt)")
    return roots[0]


def _run_logged(cmd: list[str], log: IO[str], log_path: Path, what: str) -> None:
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log.write(res.stdout)
    log.flush()
    if res.returncode != 0:
        raise LMError(_build_failure(what, log_path, res.stdout))


def _build_failure(what: str, log_path: Path, output: str = "") -> str:
    if not output and log_path.exists():
        output = log_path.read_text(errors="replace")
    tail = "\n".join(output.strip().splitlines()[-8:])
    return (
        f"{what}; the KenLM tools lmplz and build_binary could not be built.\n{tail}\n"
        f"Full log: {log_path}\n"
        f"Install the build dependencies and run again: {APT_FIX}\n"
        "(or install lmplz and build_binary yourself and put them on PATH)"
    )


# ============================================================================ reading LMs and lexicons


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


def load_kenlm(path: Path):
    """kenlm.Model with lazy mmap loading (a multi-GB binary opens instantly)."""
    try:
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


# ============================================================================ prepare lm


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
        from d2vcli.ui import table

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


def dev_manifests(ws) -> list[Path]:
    """The dev/validation manifests of the workspace (dev-clean, dev-other, valid, ...)."""
    if not ws.data_dir.exists():
        return []
    return sorted(p for p in ws.data_dir.glob("*.jsonl") if p.stem.startswith(("dev", "valid")))


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


def prepare_lm(
    ws,
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
    from d2vcli.ui import console

    t0 = time.time()
    if (arpa is None) == (text is None):
        raise LMError("give exactly one of --arpa FILE (an existing ARPA LM) and --text FILE (a corpus to train on)")
    if unit == "letter" and words is not None:
        raise LMError("--words makes no sense for a letter LM (it has no lexicon)")
    if text is not None and not 2 <= order <= KENLM_MAX_ORDER:
        raise LMError(f"--order must be between 2 and {KENLM_MAX_ORDER}: the KenLM compiled into flashlight-text and "
                      f"the kenlm wheel loads n-grams up to order {KENLM_MAX_ORDER}")
    dict_path = Path(dictionary) if dictionary else ws.dictionary
    vocab = Vocab.load(dict_path)
    dict_case = dictionary_case(vocab)
    symbols = frozenset(vocab.symbols)
    source_path = Path(arpa if arpa is not None else text).expanduser()
    if not source_path.is_file():
        raise LMError(f"{'ARPA file' if arpa is not None else 'text corpus'} not found: {source_path}")

    ws.lm_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-lm-", dir=ws.lm_dir))
    try:
        notes: list[str] = []
        used_fallback = False
        if text is not None:
            tools = find_kenlm_tools(build=True)
            arpa_path = tmp / "lm.arpa"
            used_fallback = _run_lmplz(tools, source_path, arpa_path, order, unit, vocab, normalize,
                                       match_case, dict_case, discount_fallback, memory, tmp)
            if used_fallback:
                console.print(f"[yellow]note:[/] {DISCOUNT_FALLBACK_WHY}")
                notes.append("lmplz --discount_fallback: the corpus is too small for Kneser-Ney discount estimates")
            if not normalize:
                notes.append("corpus used as is (--no-normalize)")
        else:
            arpa_path = source_path
        info = read_arpa_unigrams(arpa_path)
        if arpa is not None and unit == "word" and WORD_SEP in info.unigrams:
            unit = "letter"
            notes.append("the ARPA's vocabulary contains `|`: treated as a letter LM (lexicon-free decoding)")
        lm_case = word_case(info.unigrams)
        if match_case and arpa is not None and lm_case != dict_case and dict_case in ("upper", "lower"):
            arpa_path = _recase_arpa(arpa_path, tmp / "recased.arpa", dict_case, info)
            notes.append(f"LM words converted from {lm_case} to {dict_case} case (--match-case)")
            info = read_arpa_unigrams(arpa_path)
            lm_case = word_case(info.unigrams)

        report = LMReport(
            lm="", lexicon=None, unit=unit, order=info.order, source=str(source_path),
            ngram_counts=info.counts, vocabulary=len(info.unigrams), lm_case=lm_case,
            dictionary_case=dict_case, discount_fallback=used_fallback, notes=notes,
        )
        stem = name or (f"{info.order}gram" if unit == "word" else f"letter-{info.order}gram")
        bin_final = ws.lm_dir / f"{stem}.bin"
        lex_final = ws.lm_dir / "lexicon.txt"

        # Case and lexicon checks come first: they are cheap and decide whether to build at all.
        fix = ("rebuild with `--match-case` (converts the LM's words to the dictionary's case), or from a text "
               "corpus with `--text`, which is normalized to upper case like the transcripts.")
        lexicon_entries: list[tuple[str, list[str]]] = []
        if unit == "word":
            word_list = _read_word_list(Path(words)) if words else info.unigrams
            if words and match_case and dict_case in ("upper", "lower"):
                word_list = [w.upper() if dict_case == "upper" else w.lower() for w in word_list]
            skipped: list[str] = []
            for w in word_list:
                if w in LM_SPECIAL_WORDS:
                    continue
                letters = spell(w, symbols, dict_case)
                if letters is None:
                    skipped.append(w)
                else:
                    lexicon_entries.append((w, letters + [WORD_SEP]))
            report.lexicon_words = len(lexicon_entries)
            report.skipped_words = len(skipped)
            report.skipped_examples = skipped[:10]
            report.lexicon_case = word_case(w for w, _ in lexicon_entries)
            msg = case_mismatch_message(lm_case, dict_case, "the LM vocabulary", fix)
            if msg is None and report.lexicon_case != lm_case:  # only a --words list can differ from the LM
                msg = case_mismatch_message(report.lexicon_case, dict_case, "the lexicon (--words)", fix)
            if msg:
                report.problems.append(msg)
            if words and lexicon_entries:
                lm_vocab = set(info.unigrams)
                missing = sum(w not in lm_vocab for w, _ in lexicon_entries)
                if missing:
                    report.notes.append(f"{missing:,} lexicon words (--words) are not in the LM: they score as <unk>")
            if not lexicon_entries and not report.problems:
                report.problems.append(
                    f"no LM word can be spelled with the letter dictionary {dict_path} "
                    f"({''.join(vocab.symbols)}): the LM and the acoustic model use different alphabets."
                )
        else:
            msg = case_mismatch_message(lm_case, dict_case, "the letter LM's vocabulary", fix)
            if msg:
                report.problems.append(msg)
        if report.problems:
            console.print(report.table())
            raise LMError("\n".join(report.problems))

        missing_markers = [m for m in ("<s>", "</s>") if m not in info.unigrams]
        if missing_markers:
            report.notes.append(f"the ARPA has no {' '.join(missing_markers)}: built with build_binary -s")
        tools = find_kenlm_tools(build=True)
        bin_tmp = tmp / "lm.bin"
        _run_build_binary(tools, arpa_path, bin_tmp, structure, bool(missing_markers), tmp)
        model = load_kenlm(bin_tmp)

        if lexicon_entries:
            lex_tmp = tmp / "lexicon.txt"
            with open(lex_tmp, "w", encoding="utf-8") as fh:
                for w, spelling in lexicon_entries:
                    fh.write(f"{w}\t{' '.join(spelling)}\n")
        lexicon_words = {w for w, _ in lexicon_entries}
        for manifest in dev_manifests(ws):
            report.dev.append(_dev_stats(manifest, model, lexicon_words, unit))
        for d in report.dev:
            if unit == "word" and d.oov_rate > 0.2:
                report.notes.append(
                    f"{d.split}: {100 * d.oov_rate:.1f} % of the reference words are not in the lexicon; the decoder "
                    "cannot output them (expect WER at least that high). Use an LM trained on matching text.")

        # Everything checked: move the results into place (each rename is atomic).
        if keep_arpa and text is not None:
            os.replace(arpa_path, ws.lm_dir / f"{stem}.arpa")
        os.replace(bin_tmp, bin_final)
        report.lm = str(bin_final)
        if lexicon_entries:
            os.replace(tmp / "lexicon.txt", lex_final)
            report.lexicon = str(lex_final)
        report.seconds = round(time.time() - t0, 2)
        atomic_write_text(ws.lm_dir / "report.json", json.dumps(report.to_dict(), indent=1) + "\n")
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    from d2vcli.ui import progress

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
    from d2vcli.ui import console

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


def _recase_arpa(src: Path, dst: Path, case: Case, info: ArpaInfo) -> Path:
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


def _dev_stats(manifest: Path, model, lexicon_words: set[str], unit: Unit) -> DevStats:
    from d2vcli.manifest import read_manifest

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
    from d2vcli.ui import console

    console.print(report.table())
    console.print(f"wrote {report.lm}" + (f" and {report.lexicon}" if report.lexicon else "")
                  + f" ({report.seconds:.1f} s)")


def unigram_words(lexicon: Lexicon) -> list[str]:
    """Distinct lexicon words in file order (pyctcdecode's `unigrams`)."""
    return list(dict.fromkeys(w for w, _ in lexicon.entries))


__all__ = [
    "APT_FIX", "LMError", "KenLMTools", "find_kenlm_tools", "locate_kenlm_tools", "kenlm_build_problems",
    "kenlm_cache_dir", "prepare_lm", "LMReport", "read_lexicon", "Lexicon", "read_arpa_unigrams",
    "resolve_lm", "workspace_lm", "word_case", "dictionary_case", "check_lexicon_against_lm", "load_kenlm",
    "is_letter_lm", "unigram_words", "print_report",
]
