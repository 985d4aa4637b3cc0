"""Decoding: greedy and lexicon + KenLM beam search, parallel workers, tuning, the emissions cache.

Beam search is checked on constructed emissions (CTC posteriors built from the reference
letters with noise and deliberate letter confusions, `decode.simulate.simulate_emissions`); the
pipeline (checkpoint -> cached emissions -> outputs) on an untrained tiny CTC model.

Run: python -m pytest -q tests/test_decode.py
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from d2vcli.cli import app
from d2vcli.config import Config, DecodeConfig
from d2vcli.decode.emissions import load_emissions, save_emissions
from d2vcli.decode.errors import DecodeError, MissingDependency
from d2vcli.decode.run import build_search_spec, decode
from d2vcli.decode.search import BeamOptions, BeamPool, greedy_decode
from d2vcli.decode.simulate import simulate_emissions
from d2vcli.decode.timings import word_timings
from d2vcli.decode.tuning import tune_lm
from d2vcli.doctor import run_checks
from d2vcli.evaluate import evaluate
from d2vcli.lm.formats import LMError
from d2vcli.lm.prepare import prepare_lm
from d2vcli.scoring import wer
from d2vcli.manifest import read_manifest
from d2vcli.models.audio import Data2VecForCTC
from d2vcli.vocab import Vocab
from d2vcli.workspace import Workspace

# Letter pairs a weak acoustic model confuses (the synthetic corpus makes M/N and D/T close on purpose).
CONFUSIONS = {"M": "N", "N": "M", "D": "T", "T": "D", "B": "D", "E": "I", "O": "U"}
SPLITS = ("dev-clean", "dev-other", "test-clean", "test-other")


@pytest.fixture(scope="module")
def constructed(synthetic_workspace, tmp_path_factory):
    """(vocab, Emissions) for the 32 dev/test transcripts, with 40 % of confusable letters confused."""
    ws = synthetic_workspace
    vocab = Vocab.load(ws.dictionary)
    records = [r for s in SPLITS for r in read_manifest(ws.manifest(s))]
    rng = np.random.default_rng(0)
    arrays = [simulate_emissions(r.text, vocab, rng, CONFUSIONS, confusion_prob=0.4) for r in records]
    em = save_emissions(tmp_path_factory.mktemp("constructed"), "constructed", arrays, [r.id for r in records],
                        [r.text for r in records], vocab.tokens)
    return vocab, em


def _greedy(vocab, em):
    return [greedy_decode(em[i], vocab).text for i in range(len(em))]


def _scratch(tmp_path, src: Workspace) -> Workspace:
    ws = Workspace.resolve(tmp_path / "ws")
    shutil.copytree(src.data_dir, ws.data_dir)
    return ws


def test_lm_decoding_lowers_wer_against_greedy(constructed, synthetic_workspace, synthetic_lm):
    vocab, em = constructed
    greedy = wer(em.refs, _greedy(vocab, em))
    spec = build_search_spec(synthetic_workspace, vocab, synthetic_workspace.lm_dir / "4gram.bin")
    assert spec.mode == "lexicon" and spec.lexicon.endswith("lexicon.txt")
    with BeamPool(spec, workers=1) as pool:
        hyps = pool.run(em, [BeamOptions()])[0]
    lm = wer(em.refs, [h.text for h in hyps])
    assert greedy > 30.0  # the confusions make greedy misspell most sentences
    assert lm < greedy / 4


def test_parallel_workers_give_the_same_hypotheses_as_one(constructed, synthetic_workspace, synthetic_lm):
    vocab, em = constructed
    spec = build_search_spec(synthetic_workspace, vocab, synthetic_workspace.lm_dir / "4gram.bin")
    options = [BeamOptions(beam=20, lm_weight=1.0, word_score=0.5), BeamOptions(beam=8, sil_weight=-1.0)]
    with BeamPool(spec, workers=1) as pool:
        one = pool.run(em, options)
    with BeamPool(spec, workers=2) as pool:
        two = pool.run(em, options)
    for a, b in zip(one, two):
        assert [h.words for h in a] == [h.words for h in b]
        assert [h.score for h in a] == [h.score for h in b]


def test_tuning_improves_on_a_bad_default_and_never_does_worse(constructed, synthetic_workspace, synthetic_lm):
    vocab, em = constructed
    spec = build_search_spec(synthetic_workspace, vocab, synthetic_workspace.lm_dir / "4gram.bin")
    bad = DecodeConfig(lm_weight=0.5, word_score=5.0, sil_weight=-8.0)
    with BeamPool(spec, workers=2) as pool:
        result = tune_lm(pool, em, BeamOptions.from_config(bad), bad, trials=8, search="random", beam=15)
    default, best = result.default, result.best
    assert (default.lm_weight, default.word_score, default.sil_weight) == (0.5, 5.0, -8.0)
    assert len(result.trials) == 8 and best.wer <= min(t.wer for t in result.trials)
    assert best.wer < default.wer - 10  # this default inserts and splits words badly
    lo, hi = bad.tune_lm_weight
    assert all(lo <= t.lm_weight <= hi for t in result.trials[1:])
    grid = tune_lm(BeamPool(spec, 1).__enter__(), em, BeamOptions.from_config(bad), bad, trials=9, search="grid",
                   beam=8)
    assert len(grid.trials) == 1 + 8 and grid.best.wer <= grid.default.wer


def test_lexicon_free_decoding_with_a_letter_lm_and_without_an_lm(constructed, synthetic_workspace, kenlm_tools,
                                                                   tmp_path):
    vocab, em = constructed
    ws = _scratch(tmp_path, synthetic_workspace)
    letter = prepare_lm(ws, text=synthetic_workspace.root / "corpus" / "synthetic" / "lm-text.txt", order=6,
                        unit="letter", memory="64M", discount_fallback="always")
    greedy = _greedy(vocab, em)
    spec = build_search_spec(ws, vocab, letter.lm)
    assert spec.mode == "lexicon_free" and spec.lexicon is None
    with BeamPool(spec, workers=1) as pool:
        hyps = pool.run(em, [BeamOptions(lm_weight=1.0, word_score=0.0)])[0]
    assert wer(em.refs, [h.text for h in hyps]) < wer(em.refs, greedy) / 2
    # No LM: the best CTC path under max (not log-add) is the greedy path.
    zero = build_search_spec(ws, vocab, None, lexicon_free=True)
    assert zero.lm is None and zero.tag == "beam"
    with BeamPool(zero, workers=1) as pool:
        assert [h.text for h in pool.run(em, [BeamOptions()])[0]] == greedy
    with pytest.raises(DecodeError, match="word LM; lexicon-free decoding needs a letter LM"):
        build_search_spec(synthetic_workspace, vocab, synthetic_workspace.lm_dir / "4gram.bin", lexicon_free=True)


def test_word_timings_follow_the_ctc_path():
    vocab = Vocab(tuple("|HITO"))
    t = {s: i for i, s in enumerate(vocab.tokens)}
    # frames: _ H H _ I | | _ T O O O |
    path = [0, t["H"], t["H"], 0, t["I"], t["|"], t["|"], 0, t["T"], t["O"], t["O"], t["O"], t["|"]]
    timings = word_timings(np.array(path), vocab.tokens, 0.02)
    assert [(w.word, w.start, w.end) for w in timings] == [("HI", 0.02, 0.1), ("TO", 0.16, 0.24)]
    relabeled = word_timings(np.array(path), vocab.tokens, 0.02, words=["HEY", "TWO"])
    assert [w.word for w in relabeled] == ["HEY", "TWO"]


def _copy_run(ws: Workspace, checkpoint, name: str):
    dst = ws.run_dir(name) / "best.pt"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(checkpoint, dst)
    return dst


def test_emissions_are_cached_and_the_model_is_not_rerun(synthetic_workspace, synthetic_lm, random_ctc_checkpoint,
                                                         monkeypatch):
    ws = synthetic_workspace
    ckpt = _copy_run(ws, random_ctc_checkpoint, "ctc-cache-test")
    first = decode(ws, checkpoint="ctc-cache-test", splits=["dev-clean"], lm=None)
    assert first.model_runs == 1 and first.options is None and list(first.outputs) == [("dev-clean", "greedy")]
    out = ws.decode_dir / "ctc-cache-test"
    assert (out / "hyp-dev-clean-greedy.txt").exists() and (out / "ref-dev-clean.txt").exists()
    scores = (out / "scores-dev-clean-greedy.tsv").read_text().splitlines()
    assert scores[0] == "id\tscore\twords\terrors" and len(scores) == 1 + len(first.emissions["dev-clean"])

    def no_model(*args, **kwargs):
        raise AssertionError("the acoustic model ran although the emissions are cached")

    with monkeypatch.context() as m:
        m.setattr(Data2VecForCTC, "forward", no_model)
        again = decode(ws, checkpoint="ctc-cache-test", splits=["dev-clean"], lm="4gram.bin", workers=1)
    assert again.model_runs == 0 and again.mode == "lexicon"
    assert again.outputs[("dev-clean", "greedy")].hyps == first.outputs[("dev-clean", "greedy")].hyps
    assert (out / "hyp-dev-clean-lm.txt").exists() and (out / "scores-dev-clean-lm.tsv").exists()

    # A different checkpoint at the same path invalidates the cache.
    state = torch.load(ckpt, weights_only=True)
    state["model"]["proj.bias"] = state["model"]["proj.bias"] + 1.0
    torch.save(state, ckpt)
    changed = decode(ws, checkpoint="ctc-cache-test", splits=["dev-clean"], lm=None)
    assert changed.model_runs == 1
    assert len(list(out.glob("emissions-dev-clean-*.npy"))) == 1  # the stale array was replaced, not kept


def test_tuned_values_are_saved_and_used_by_the_next_decode(synthetic_workspace, synthetic_lm, random_ctc_checkpoint):
    ws = synthetic_workspace
    _copy_run(ws, random_ctc_checkpoint, "ctc-tune-test")
    cfg = DecodeConfig(tune_trials=4, tune_beam=8, beam=8)
    tuned = decode(ws, cfg, checkpoint="ctc-tune-test", splits=["dev-clean"], lm="4gram.bin", tune=True)
    best = tuned.tuned.best
    assert tuned.tuned.split == "dev-other" and (ws.decode_dir / "ctc-tune-test" / "tuned.json").exists()
    assert (tuned.options.lm_weight, tuned.options.word_score) == (best.lm_weight, best.word_score)
    assert best.wer <= tuned.tuned.default.wer
    later = decode(ws, cfg, checkpoint="ctc-tune-test", splits=["dev-clean"], lm="4gram.bin")
    assert later.tuned_from is not None and later.options == tuned.options
    ignored = decode(ws, cfg, checkpoint="ctc-tune-test", splits=["dev-clean"], lm="4gram.bin", use_tuned=False)
    assert ignored.tuned_from is None and ignored.options == BeamOptions.from_config(cfg)


def test_missing_flashlight_fails_at_startup_and_greedy_still_works(synthetic_workspace, synthetic_lm,
                                                                    random_ctc_checkpoint, monkeypatch):
    ws = synthetic_workspace
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "flashlight.lib.text.decoder", None)  # makes the import fail
        m.setattr(Data2VecForCTC, "forward", lambda *a, **k: pytest.fail("model ran before the check"))
        with pytest.raises(MissingDependency, match="pip install flashlight-text"):
            decode(ws, checkpoint="ctc-random", splits=["test-clean"], lm="4gram.bin")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "flashlight.lib.text.decoder", None)
        m.setitem(sys.modules, "kenlm", None)
        greedy = decode(ws, checkpoint="ctc-random", splits=["test-clean"], lm=None)
    assert list(greedy.outputs) == [("test-clean", "greedy")]


def test_decode_errors_are_clear(synthetic_workspace, synthetic_lm, random_ctc_checkpoint, tmp_path):
    ws = synthetic_workspace
    with pytest.raises(LMError, match="language model not found: nope.bin"):
        decode(ws, checkpoint="ctc-random", splits=["dev-clean"], lm="nope.bin")
    lower = tmp_path / "lexicon.txt"
    lower.write_text("".join(line.split("\t")[0].lower() + "\t" + line.split("\t")[1]
                             for line in (ws.lm_dir / "lexicon.txt").read_text().splitlines(keepends=True)))
    with pytest.raises(LMError, match="case mismatch"):
        decode(ws, checkpoint="ctc-random", splits=["dev-clean"], lm="4gram.bin", lexicon=lower)
    with pytest.raises(FileNotFoundError, match="no manifest for split 'dev-nope'"):
        decode(ws, checkpoint="ctc-random", splits=["dev-nope"], lm=None)
    with pytest.raises(DecodeError, match="--tune searches LM weights"):
        decode(ws, checkpoint="ctc-random", splits=["dev-clean"], lm=None, tune=True)


def test_cli_decode_with_only_lm_uses_the_newest_run_and_all_dev_test_splits(synthetic_workspace, synthetic_lm,
                                                                             random_ctc_checkpoint, tmp_path):
    ws = _scratch(tmp_path, synthetic_workspace)
    ws.lm_dir.mkdir()
    for name in ("4gram.bin", "lexicon.txt"):
        shutil.copy2(synthetic_workspace.lm_dir / name, ws.lm_dir / name)
    old = _copy_run(ws, random_ctc_checkpoint, "older-ctc")
    new = _copy_run(ws, random_ctc_checkpoint, "newer-ctc")
    pre = ws.run_dir("newest-pretrain") / "best.pt"
    pre.parent.mkdir(parents=True)
    torch.save({"format_version": 1, "kind": "pretrain"}, pre)
    os.utime(old, (1e9, 1e9))
    os.utime(new, (2e9, 2e9))
    os.utime(pre, (3e9, 3e9))
    res = CliRunner().invoke(app, ["decode", "--lm", "4gram.bin", "-w", str(ws.root), "--workers", "2"])
    assert res.exit_code == 0, res.output
    out = ws.decode_dir / "newer-ctc"
    for split in SPLITS:
        for tag in ("greedy", "lm"):
            assert (out / f"hyp-{split}-{tag}.txt").exists()
        assert load_emissions(out, split) is not None
    assert not (ws.decode_dir / "older-ctc").exists()
    missing = CliRunner().invoke(app, ["decode", "--lm", "other.bin", "-w", str(ws.root)])
    assert missing.exit_code == 2 and "language model not found" in missing.output


def test_doctor_passes_here_with_an_end_to_end_decode(kenlm_tools):
    report = run_checks()
    assert report.ok, [(c.name, c.detail) for c in report.checks if c.status == "fail"]
    e2e = next(c for c in report.checks if c.name == "end-to-end decode")
    assert e2e.status == "ok" and "'SPEECH TO TEXT'" in e2e.detail
    tools = next(c for c in report.checks if c.name == "lmplz, build_binary")
    assert tools.status == "ok"
    assert CliRunner().invoke(app, ["doctor"]).exit_code == 0


def test_doctor_names_the_fix_for_a_missing_decoder(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashlight.lib.text.decoder", None)
    monkeypatch.setitem(sys.modules, "flashlight.lib.text.decoder.kenlm", None)
    report = run_checks()
    by_name = {c.name: c for c in report.checks}
    assert not report.ok
    assert by_name["flashlight-text"].status == "fail"
    assert by_name["flashlight-text"].fix == "pip install flashlight-text"
    assert by_name["flashlight KenLM"].status == "fail" and "pip install" in by_name["flashlight KenLM"].fix
    assert by_name["end-to-end decode"].status == "fail" and "skipped" in by_name["end-to-end decode"].detail
    assert by_name["kenlm (Python)"].status == "ok"


def test_lm_beats_greedy_with_the_finetuned_model_on_the_synthetic_test_sets(synthetic_workspace, synthetic_lm,
                                                                            finetuned_tiny):
    """The real pipeline: the tiny fine-tuned model, the 4-gram from the corpus's LM text, and the
    synthetic test splits. Lexicon + LM beam search must beat greedy decoding on every one."""
    result = evaluate(synthetic_workspace, Config().decode, checkpoint=finetuned_tiny,
                      splits=["test-clean", "test-other"], lm="auto", use_tuned=False)
    for split in ("test-clean", "test-other"):
        greedy, lm = result.wer(split, "greedy"), result.wer(split, "lm")
        assert lm < greedy, f"{split}: 4-gram WER {lm:.1f} is not below greedy WER {greedy:.1f}"
