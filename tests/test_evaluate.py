"""WER/CER scoring (our Levenshtein vs jiwer) and the `d2v evaluate` artefacts.

Run: python -m pytest -q tests/test_evaluate.py
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from d2vcli.decode.run import DecodeResult, SplitOutput
from d2vcli.evaluate import evaluate, score_decoded
from d2vcli.scoring import align, edit_distance, score

jiwer = pytest.importorskip("jiwer")

TRICKY = [
    # (reference, hypothesis)
    ("THE CAT SAT ON THE MAT", ""),                                  # empty hypothesis
    ("A B", "X A Y B Z"),                                            # insertions only
    ("DON'T STOP", "DON’T STOP"),                                    # unicode apostrophe: a different word
    ("IT’S ‘QUOTED’ TEXT", "IT'S QUOTED TEXT"),
    ("NAÏVE CAFÉ RÉSUMÉ", "NAIVE CAFÉ RESUME"),                       # combining-free accents are characters
    ("HELLO WORLD", "HELLO WORLD"),                                  # perfect
    ("ONE TWO THREE FOUR", "FOUR THREE TWO ONE"),                    # reordering
    ("A A A A", "A"),                                                # deletions only
    ("AB CD", "ABCD"),                                               # merged words
]


def _ours(refs, hyps):
    s = score(refs, hyps)
    return s.words.errors, s.words.ref, s.chars.errors, s.chars.ref


@pytest.mark.parametrize("ref,hyp", TRICKY)
def test_single_pair_matches_jiwer(ref, hyp):
    w_err, w_ref, c_err, c_ref = _ours([ref], [hyp])
    assert w_err / w_ref == jiwer.wer(ref, hyp)
    assert c_err / c_ref == jiwer.cer(ref, hyp)


def test_corpus_totals_match_jiwer_exactly():
    rng = np.random.default_rng(0)
    words = ["THE", "A", "CAT", "DOG", "SAT", "RAN", "ON", "MAT", "IT'S", "IT’S", "ÉTÉ"]
    refs, hyps = [], []
    for _ in range(300):
        ref = list(rng.choice(words, size=int(rng.integers(1, 25))))
        hyp = []
        for w in ref:
            r = rng.random()
            if r < 0.1:
                continue  # deletion
            hyp.append(str(rng.choice(words)) if r < 0.25 else w)
            if rng.random() < 0.08:
                hyp.append(str(rng.choice(words)))  # insertion
        refs.append(" ".join(ref))
        hyps.append(" ".join(hyp))
    refs += [r for r, _ in TRICKY]
    hyps += [h for _, h in TRICKY]
    w_err, w_ref, c_err, c_ref = _ours(refs, hyps)
    truth_w = jiwer.process_words(refs, hyps)
    truth_c = jiwer.process_characters(refs, hyps)
    assert w_err == truth_w.substitutions + truth_w.deletions + truth_w.insertions
    assert w_ref == truth_w.hits + truth_w.substitutions + truth_w.deletions
    assert c_err == truth_c.substitutions + truth_c.deletions + truth_c.insertions
    assert w_err / w_ref == jiwer.wer(refs, hyps)
    assert c_err / c_ref == jiwer.cer(refs, hyps)
    # Corpus totals, not the mean of per-utterance rates.
    assert not math.isclose(w_err / w_ref, np.mean([jiwer.wer(r, h) for r, h in zip(refs, hyps)]))


def test_alignment_backtrace_is_a_minimum_edit_script():
    ref, hyp = "A B C D E F".split(), "A X C E F G".split()
    a = align(ref, hyp)
    assert [op for op, _, _ in a.ops] == ["C", "S", "C", "D", "C", "C", "I"]
    assert a.errors == edit_distance(ref, hyp) == 3
    assert a.render() == "A (B->X) C (D->*) E F (*->G)"
    # Replaying the script turns the reference into the hypothesis.
    assert [h for op, _, h in a.ops if op != "D"] == hyp and [r for op, r, _ in a.ops if op != "I"] == ref
    assert align([], ["Q"]).render() == "(*->Q)" and align(["Q"], []).count("D") == 1


def test_evaluate_writes_artefacts_that_agree_with_the_result(synthetic_workspace, synthetic_lm,
                                                              random_ctc_checkpoint):
    result = evaluate(synthetic_workspace, checkpoint="ctc-random", splits=["dev-clean", "test-other"], workers=1)
    assert result.splits == ["dev-clean", "test-other"] and result.tags == ["greedy", "lm"]
    out = result.out_dir
    data = json.loads((out / "wer.json").read_text())
    for split in result.splits:
        for tag in result.tags:
            sc = result.scores[(split, tag)]
            assert data["splits"][split][tag]["wer"] == round(sc.words.rate, 4)
            errs = (out / f"errs-{split}-{tag}.txt").read_text()
            assert errs.startswith(f"%WER {sc.words.rate:.2f} [ {sc.words.errors} / {sc.words.ref},")
            assert "SUBSTITUTIONS" in errs and "DELETIONS" in errs and "INSERTIONS" in errs
            recogs = (out / f"recogs-{split}-{tag}.txt").read_text().splitlines()
            assert len(recogs) == 2 * sc.utterances
            # The hypothesis file decode wrote scores to the same WER with jiwer.
            hyps = [line.rsplit(" (", 1)[0] for line in (out / f"hyp-{split}-{tag}.txt").read_text().splitlines()]
            refs = [line.rsplit(" (", 1)[0] for line in (out / f"ref-{split}.txt").read_text().splitlines()]
            assert math.isclose(100 * jiwer.wer(refs, hyps), sc.words.rate, abs_tol=1e-9)
        summary = (out / "wer-summary-greedy.txt").read_text()
        assert f"{split}\t" in summary
    table = result.table()
    assert [c.header for c in table.columns] == ["split", "utts", "greedy WER", "greedy CER", "lm WER", "lm CER"]


def test_case_mismatch_between_hypotheses_and_references_is_flagged(tmp_path):
    refs = ["THE HORSE RUNS", "A LAKE"]
    decoded = DecodeResult("x", None, tmp_path)
    decoded.outputs[("dev", "greedy")] = SplitOutput("dev", "greedy", ["a", "b"], refs, refs, [0.0, 0.0], 1.0, 0.1)
    decoded.outputs[("dev", "lm")] = SplitOutput("dev", "lm", ["a", "b"], refs, [r.lower() for r in refs],
                                                 [0.0, 0.0], 1.0, 0.1)
    result = score_decoded(decoded)
    assert result.wer("dev", "greedy") == 0.0 and result.wer("dev", "lm") == 100.0
    assert any("lower case but references are upper case" in w for w in result.warnings)
    assert any("worse than greedy" in w for w in result.warnings)
