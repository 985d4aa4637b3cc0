"""`d2v doctor`: check the decoding stack on this machine and print the exact fix for each failure.

    d2v doctor [--build-tools]
    python -c "from d2vcli.doctor import run_checks; print(run_checks())"

Checks, in the order things are needed: Python, torch (and CUDA/bf16), soundfile, the
flashlight-text decoder, its KenLM binding, the `kenlm` Python module, the KenLM tools
lmplz/build_binary (found, or buildable here: `d2v prepare lm` builds them on first use;
`--build-tools` builds them now), and finally a tiny end-to-end decode: a 3-word bigram LM and
its lexicon are written to a temporary directory, CTC emissions with deliberate letter
confusions are constructed for a sentence, and the lexicon beam search must return the
sentence's words (greedy decoding of the same emissions misspells them).

The same import checks guard `d2v decode --lm` at startup (`decode.search.require_flashlight`), so
a missing optional piece never shows up later as a NameError.

The third-party imports (torch, soundfile, flashlight-text, kenlm) stay inside the checks: a
failed import is what a check reports, so it must happen there, not when this module loads.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal

import numpy as np

from d2vcli.decode.search import FLASHLIGHT_FIX, KENLM_FIX, BeamOptions, BeamSearcher, SearchSpec, greedy_decode
from d2vcli.decode.simulate import simulate_emissions
from d2vcli.lm.formats import LMError
from d2vcli.lm.kenlm_tools import APT_FIX, find_kenlm_tools, kenlm_build_problems, kenlm_cache_dir, locate_kenlm_tools
from d2vcli.ui import table
from d2vcli.vocab import Vocab

Status = Literal["ok", "warn", "fail", "info"]

TINY_WORDS = ("SPEECH", "TO", "TEXT")


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def table(self):
        style = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]", "info": "info"}
        return table("d2v doctor", ["check", "status", "details", "fix"],
                     [(c.name, style[c.status], c.detail, c.fix) for c in self.checks])


def _python() -> Check:
    v = sys.version_info
    ok = v >= (3, 10)
    return Check("python", "ok" if ok else "fail", f"{platform.python_version()} ({sys.executable})",
                 "" if ok else "use Python 3.10 or newer")


def _torch() -> Check:
    try:
        import torch
    except ImportError as e:
        return Check("torch", "fail", str(e), "pip install torch (CPU or CUDA build from pytorch.org)")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16 (fp16 is used)"
        return Check("torch", "ok", f"{torch.__version__}, CUDA {torch.version.cuda}: {name}, {bf16}")
    return Check("torch", "ok", f"{torch.__version__}, CPU only (no CUDA device visible)")


def _soundfile() -> Check:
    try:
        import soundfile as sf
    except (ImportError, OSError) as e:
        return Check("soundfile", "fail", str(e), "pip install soundfile (and apt-get install libsndfile1)")
    formats = sf.available_formats()
    missing = [f for f in ("FLAC", "WAV") if f not in formats]
    if missing:
        return Check("soundfile", "fail", f"libsndfile {sf.__libsndfile_version__} lacks {', '.join(missing)}",
                     "pip install --force-reinstall soundfile (its wheels bundle a full libsndfile)")
    extra = "MP3" if "MP3" in formats else "no MP3 (libsndfile < 1.1)"
    return Check("soundfile", "ok", f"libsndfile {sf.__libsndfile_version__}: FLAC, WAV, OGG, {extra}")


def _flashlight() -> Check:
    try:
        import flashlight.lib.text.decoder as fl
        import flashlight.lib.text.dictionary  # noqa: F401
    except ImportError as e:
        return Check("flashlight-text", "fail", f"cannot import flashlight.lib.text ({e})", FLASHLIGHT_FIX)
    needed = ("LexiconDecoder", "LexiconDecoderOptions", "LexiconFreeDecoder", "Trie", "SmearingMode",
              "CriterionType", "ZeroLM")
    absent = [n for n in needed if not hasattr(fl, n)]
    if absent:
        return Check("flashlight-text", "fail", f"missing {', '.join(absent)}",
                     "pip install --upgrade flashlight-text")
    try:
        v = version("flashlight-text")
    except Exception:  # noqa: BLE001 - the version is only informative
        v = "unknown version"
    return Check("flashlight-text", "ok", f"{v}: LexiconDecoder, LexiconFreeDecoder, Trie")


def _flashlight_kenlm() -> Check:
    try:
        from flashlight.lib.text.decoder.kenlm import KenLM  # noqa: F401
    except ImportError as e:
        return Check("flashlight KenLM", "fail", str(e).strip().splitlines()[0] if str(e).strip() else repr(e),
                     KENLM_FIX)
    return Check("flashlight KenLM", "ok", "flashlight.lib.text.decoder.kenlm.KenLM")


def _kenlm_module() -> Check:
    try:
        import kenlm
    except ImportError as e:
        return Check("kenlm (Python)", "fail", str(e), "pip install kenlm")
    if not hasattr(kenlm, "Model"):
        return Check("kenlm (Python)", "fail", f"{getattr(kenlm, '__file__', 'kenlm')} has no Model class",
                     "pip uninstall kenlm && pip install kenlm")
    return Check("kenlm (Python)", "ok", "kenlm.Model (LM validation and perplexity)")


def _kenlm_tools(build: bool) -> Check:
    tools = locate_kenlm_tools()
    if tools is None and build:
        try:
            tools = find_kenlm_tools(build=True)
        except LMError as e:
            return Check("lmplz, build_binary", "fail", str(e).splitlines()[0], APT_FIX)
    if tools is not None:
        return Check("lmplz, build_binary", "ok", f"{tools.lmplz.parent} ({tools.source})")
    problems = kenlm_build_problems()
    if problems:
        return Check("lmplz, build_binary", "fail",
                     "not on PATH or in the cache, and cannot be built here: " + "; ".join(problems), APT_FIX)
    return Check("lmplz, build_binary", "warn",
                 f"not built yet; `d2v prepare lm` builds them into {kenlm_cache_dir()} on first use (1-2 minutes)",
                 "d2v doctor --build-tools (builds them now)")


def _tiny_arpa() -> str:
    """A bigram ARPA over SPEECH / TO / TEXT that strongly prefers the sentence in that order."""
    uni = {"<unk>": -2.0, "<s>": -99.0, "</s>": -0.6, "SPEECH": -0.6, "TO": -0.6, "TEXT": -0.6}
    bi = {("<s>", "SPEECH"): -0.05, ("SPEECH", "TO"): -0.05, ("TO", "TEXT"): -0.05, ("TEXT", "</s>"): -0.05}
    lines = ["\\data\\", f"ngram 1={len(uni)}", f"ngram 2={len(bi)}", "", "\\1-grams:"]
    lines += [f"{p}\t{w}\t{-0.3 if w not in ('</s>', '<unk>') else 0}" for w, p in uni.items()]
    lines += ["", "\\2-grams:"] + [f"{p}\t{a} {b}" for (a, b), p in bi.items()] + ["", "\\end\\", ""]
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_stderr():
    """KenLM prints an ARPA-loading banner on fd 2; the check's result says what matters."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _end_to_end() -> Check:
    vocab = Vocab.librispeech()
    sentence = " ".join(TINY_WORDS)
    try:
        with tempfile.TemporaryDirectory(prefix="d2v-doctor-") as tmp:
            arpa = Path(tmp) / "tiny.arpa"
            arpa.write_text(_tiny_arpa())
            lexicon = Path(tmp) / "lexicon.txt"
            lexicon.write_text("".join(f"{w}\t{' '.join(w)} |\n" for w in TINY_WORDS))
            rng = np.random.default_rng(0)
            lp = simulate_emissions(sentence, vocab, rng, confusions={"E": "I", "T": "D", "P": "B"},
                                    confusion_prob=1.0)
            greedy = greedy_decode(lp, vocab).text
            with _quiet_stderr():
                searcher = BeamSearcher(SearchSpec(tuple(vocab.tokens), "lexicon", str(arpa), str(lexicon)))
            hyp = searcher.decode(lp, BeamOptions())
    except Exception as e:  # noqa: BLE001 - any failure here is what the check reports
        return Check("end-to-end decode", "fail", f"{type(e).__name__}: {e}",
                     "fix the failures above, then: pip install --force-reinstall flashlight-text kenlm")
    if hyp.text != sentence:
        return Check("end-to-end decode", "fail", f"expected {sentence!r}, the LM decoder gave {hyp.text!r}",
                     "pip install --force-reinstall flashlight-text kenlm")
    return Check("end-to-end decode", "ok",
                 f"3-word LM + lexicon: beam search {hyp.text!r} (greedy on the same emissions: {greedy!r})")


def run_checks(build_tools: bool = False) -> DoctorReport:
    checks = [_python(), _torch(), _soundfile(), _flashlight(), _flashlight_kenlm(), _kenlm_module(),
              _kenlm_tools(build_tools)]
    if all(c.status == "ok" for c in checks if c.name in ("flashlight-text", "flashlight KenLM")):
        checks.append(_end_to_end())
    else:
        checks.append(Check("end-to-end decode", "fail", "skipped: flashlight-text or its KenLM binding is missing",
                            "fix the flashlight checks above"))
    return DoctorReport(checks)
