"""`d2v prepare lm`: KenLM tools, binary + lexicon, the validation report and its case/OOV checks.

Run: python -m pytest -q tests/test_lm.py   (the first run on a machine builds lmplz/build_binary, 1-2 min)
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess

import pytest

from d2vcli.lm import kenlm_tools
from d2vcli.lm.formats import (
    LMError, check_lexicon_against_lm, is_letter_lm, load_kenlm, read_arpa_unigrams, read_lexicon, resolve_lm,
    workspace_lm,
)
from d2vcli.lm.kenlm_tools import find_kenlm_tools
from d2vcli.lm.prepare import prepare_lm
from d2vcli.vocab import Vocab
from d2vcli.workspace import Workspace


def scratch_workspace(tmp_path, src: Workspace) -> Workspace:
    """A workspace with copies of the synthetic manifests and dictionary (the shared one stays untouched)."""
    ws = Workspace.resolve(tmp_path / "ws")
    shutil.copytree(src.data_dir, ws.data_dir)
    return ws


def lm_text(ws: Workspace):
    return ws.root / "corpus" / "synthetic" / "lm-text.txt"


def test_prepare_lm_from_text_builds_binary_lexicon_and_report(synthetic_workspace, synthetic_lm):
    r = synthetic_lm
    lm_dir = synthetic_workspace.lm_dir
    assert r.lm == str(lm_dir / "4gram.bin") and (lm_dir / "4gram.bin").stat().st_size > 0
    assert r.order == 4 and r.ngram_counts[4] > 0
    # The synthetic corpus is too small for Kneser-Ney discount estimation: the fallback is used and explained.
    assert r.discount_fallback and any("discount" in n for n in r.notes)
    # Lexicon: every LM word (no <s>, </s>, <unk>) spelled in the dictionary's letters, ending with |.
    vocab = Vocab.load(synthetic_workspace.dictionary)
    lex = read_lexicon(lm_dir / "lexicon.txt", vocab)
    model = load_kenlm(r.lm)
    assert len(lex.words) == r.lexicon_words == r.vocabulary - 3 and all(w in model for w in lex.words)
    assert ("HORSE", ["H", "O", "R", "S", "E", "|"]) in lex.entries
    assert all("\t" in line for line in (lm_dir / "lexicon.txt").read_text().splitlines())
    # Validation: case agreement, dev OOV (the grammar is closed: 0) and a finite perplexity per dev split.
    assert (r.lm_case, r.lexicon_case, r.dictionary_case) == ("upper", "upper", "upper")
    assert sorted(d.split for d in r.dev) == ["dev-clean", "dev-other"]
    for d in r.dev:
        assert d.words > 0 and d.oov_words == 0
        assert 1.0 < d.perplexity < 80.0  # ~80-word vocabulary; a broken LM would be near or above it
    saved = json.loads((lm_dir / "report.json").read_text())
    assert saved["lm"] == r.lm and saved["dev"][0]["oov_rate"] == 0.0
    assert workspace_lm(synthetic_workspace) == lm_dir / "4gram.bin"


def _lower_case_arpa(src: Workspace, tmp_path):
    """The synthetic LM re-estimated and written as a lower-case ARPA (the wav2letter recipe's LM)."""
    arpa = tmp_path / "lower.arpa.gz"
    text = tmp_path / "lower.txt"
    text.write_text(lm_text(src).read_text().lower())
    tools = find_kenlm_tools()
    raw = subprocess.run([str(tools.lmplz), "-o", "3", "-S", "64M", "--discount_fallback", "--text", str(text),
                          "-T", str(tmp_path) + "/"], capture_output=True, check=True).stdout
    with gzip.open(arpa, "wb") as fh:
        fh.write(raw)
    return arpa


def test_lower_case_arpa_is_an_error_with_the_fix_and_match_case_fixes_it(synthetic_workspace, synthetic_lm,
                                                                          tmp_path):
    ws = scratch_workspace(tmp_path, synthetic_workspace)
    arpa = _lower_case_arpa(synthetic_workspace, tmp_path)
    assert read_arpa_unigrams(arpa).order == 3
    ws.lm_dir.mkdir(parents=True)
    (ws.lm_dir / "lexicon.txt").write_text("KEEP\tK E E P |\n")
    with pytest.raises(LMError) as e:
        prepare_lm(ws, arpa=arpa)
    msg = str(e.value)
    assert "case mismatch" in msg and "lower case" in msg and "upper case" in msg and "--match-case" in msg
    assert "100 % WER" in msg
    # Nothing was written or replaced.
    assert sorted(p.name for p in ws.lm_dir.iterdir()) == ["lexicon.txt"]
    assert (ws.lm_dir / "lexicon.txt").read_text() == "KEEP\tK E E P |\n"

    r = prepare_lm(ws, arpa=arpa, match_case=True)
    assert r.lm_case == "upper" and r.lexicon_case == "upper" and r.order == 3
    assert any("--match-case" in n for n in r.notes)
    lex = read_lexicon(ws.lm_dir / "lexicon.txt", Vocab.load(ws.dictionary))
    assert "HORSE" in lex.words and all(w.isupper() for w in lex.words)
    assert all(d.oov_words == 0 for d in r.dev)


def test_words_outside_the_dictionary_are_skipped_and_counted(synthetic_workspace, synthetic_lm, tmp_path):
    ws = scratch_workspace(tmp_path, synthetic_workspace)
    words = tmp_path / "words.txt"
    words.write_text("HORSE\nCAFÉ\nX-RAY\nQUIZ\nlake\n")
    r = prepare_lm(ws, arpa=_lower_case_arpa(synthetic_workspace, tmp_path), words=words, match_case=True)
    # É and - are not in the synthetic dictionary (nor, perhaps, Q and Z); --match-case upper-cases `lake`.
    vocab = Vocab.load(ws.dictionary)
    lex = read_lexicon(ws.lm_dir / "lexicon.txt", vocab)
    expected_skipped = {w for w in ("CAFÉ", "X-RAY", "QUIZ") if any(c not in vocab.symbols for c in w)}
    assert r.skipped_words == len(expected_skipped) and set(r.skipped_examples) == expected_skipped
    assert "HORSE" in lex.words
    assert ("LAKE", ["L", "A", "K", "E", "|"]) in lex.entries
    assert any("not in the LM" in n for n in r.notes)


def test_lexicon_validation_names_the_line_and_the_fix(synthetic_workspace, tmp_path):
    vocab = Vocab.load(synthetic_workspace.dictionary)
    bad = tmp_path / "lexicon.txt"
    bad.write_text("HORSE\tH O R S E |\nhorse\th o r s e |\n")
    with pytest.raises(LMError, match=r"lexicon.txt:2: the spelling of 'horse'.*`d2v prepare lm`"):
        read_lexicon(bad, vocab)
    with pytest.raises(LMError, match="lexicon not found"):
        read_lexicon(tmp_path / "missing.txt", vocab)


def test_decode_time_check_catches_a_lexicon_in_the_wrong_case(synthetic_workspace, synthetic_lm, tmp_path):
    vocab = Vocab.load(synthetic_workspace.dictionary)
    lower = tmp_path / "lexicon.txt"
    lower.write_text("".join(f"{w.lower()}\t{' '.join(w)} |\n" for w in ("HORSE", "LAKE", "HARBOR")))
    with pytest.raises(LMError, match="case mismatch"):
        check_lexicon_against_lm(read_lexicon(lower, vocab), synthetic_lm.lm, vocab)
    good = tmp_path / "good.txt"
    good.write_text("".join(f"{w}\t{' '.join(w)} |\n" for w in ("HORSE", "LAKE", "HARBOR")))
    check_lexicon_against_lm(read_lexicon(good, vocab), synthetic_lm.lm, vocab)


def test_missing_lm_error_names_the_path_and_how_to_build_one(tmp_path):
    ws = Workspace.resolve(tmp_path / "ws")
    with pytest.raises(LMError) as e:
        resolve_lm(ws, "4gram.bin")
    msg = str(e.value)
    assert "4gram.bin" in msg and str(ws.lm_dir / "4gram.bin") in msg
    assert "d2v prepare lm --text" in msg and "d2v prepare lm --arpa" in msg


def test_letter_lm_for_lexicon_free_decoding(synthetic_workspace, kenlm_tools, tmp_path):
    ws = scratch_workspace(tmp_path, synthetic_workspace)
    corpus = tmp_path / "lm-text.txt.gz"  # compressed corpora are read directly
    corpus.write_bytes(gzip.compress(lm_text(synthetic_workspace).read_bytes()))
    r = prepare_lm(ws, text=corpus, order=6, unit="letter", memory="64M")
    assert r.unit == "letter" and r.lexicon is None and r.lm.endswith("letter-6gram.bin")
    model = load_kenlm(r.lm)
    assert is_letter_lm(model) and "H" in model and "HORSE" not in model
    assert all(d.perplexity < 20 for d in r.dev)  # letters are far more predictable than words


def test_bad_inputs_are_clear_errors(synthetic_workspace, tmp_path):
    ws = scratch_workspace(tmp_path, synthetic_workspace)
    with pytest.raises(LMError, match="exactly one of --arpa"):
        prepare_lm(ws)
    with pytest.raises(LMError, match="text corpus not found"):
        prepare_lm(ws, text=tmp_path / "nope.txt")
    not_arpa = tmp_path / "x.arpa"
    not_arpa.write_text("hello\n")
    with pytest.raises(LMError, match="not an ARPA"):
        prepare_lm(ws, arpa=not_arpa)


def test_unbuildable_tools_error_lists_the_debian_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("D2V_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(kenlm_tools.shutil, "which", lambda name: None)  # no lmplz, no cmake, no compiler
    with pytest.raises(LMError) as e:
        find_kenlm_tools(build=True)
    msg = str(e.value)
    assert "cmake is not installed" in msg
    for pkg in ("cmake", "libboost-program-options-dev", "libboost-system-dev", "libboost-thread-dev",
                "libboost-test-dev", "zlib1g-dev", "libbz2-dev", "liblzma-dev"):
        assert pkg in msg
    assert not (tmp_path / "cache" / "kenlm" / "bin").exists()


def test_kenlm_tools_are_cached_and_run(kenlm_tools):
    assert kenlm_tools.source in ("path", "cache", "built")
    again = find_kenlm_tools(build=False)
    assert again.lmplz == kenlm_tools.lmplz and again.build_binary == kenlm_tools.build_binary
    out = subprocess.run([str(kenlm_tools.build_binary)], capture_output=True, text=True)
    assert "probing" in out.stdout + out.stderr
