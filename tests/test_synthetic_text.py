"""The synthetic text corpus: determinism, the grammar's dependencies, the labels (d2vcli/synthetic_text.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from d2vcli.fileio import read_jsonl
from d2vcli.prepare.synthetic_text import prepare_synthetic_text
from d2vcli.synthetic_text import CONNECTIVES, INTRANSITIVE, NOUNS, PRONOUNS, TRANSITIVE, document, \
    generate_text_corpus, task_rows
from d2vcli.text_data import TokenBlocks
from d2vcli.workspace import Workspace

PLURAL_VERBS = {p for _, p in INTRANSITIVE + TRANSITIVE}
SINGULAR_VERBS = {s for s, _ in INTRANSITIVE + TRANSITIVE}
NOUN_CLASS = {**{s: g for s, _, g in NOUNS}, **{p: "pl" for _, p, _ in NOUNS}}
PRONOUN_CLASS = {v: k for k, v in PRONOUNS.items()}
CLOSER = dict(CONNECTIVES)


def files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(tmp_path):
    a = generate_text_corpus(tmp_path / "a", "tiny", seed=3)
    b = generate_text_corpus(tmp_path / "b", "tiny", seed=3)
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    fa.pop("corpus.json"), fb.pop("corpus.json")
    assert fa == fb and a.examples == b.examples
    generate_text_corpus(tmp_path / "c", "tiny", seed=4)
    assert files(tmp_path / "c")["text/pool.txt"] != fa["text/pool.txt"]
    assert generate_text_corpus(tmp_path / "a", "tiny", seed=3) == a  # an identical corpus is reused


def _main_verb_ok(words: list[str]) -> bool:
    """Subject-verb agreement of a plain clause "the (adj) N [who V the (adj) N2 | that the (adj) N2 V] V ...":
    the first verb after the relative clause agrees with the first noun."""
    nouns = [i for i, w in enumerate(words) if w in NOUN_CLASS]
    subj = words[nouns[0]]
    i = nouns[0] + 1
    if i < len(words) and words[i] == "who":
        i = nouns[1] + 1
    elif i < len(words) and words[i] == "that":
        i = nouns[1] + 2
    verb = words[i]
    return (verb in PLURAL_VERBS) == (NOUN_CLASS[subj] == "pl")


def test_pool_grammar_holds(tmp_path):
    pronoun_lines = connective_lines = relative_lines = 0
    for d in range(300):
        lines = [line.split() for line in document(np.random.default_rng([0, 0, d]))]
        for k, w in enumerate(lines):
            if w[0] in PRONOUN_CLASS:  # the pronoun fits exactly one noun of the last sentence naming nouns
                pronoun_lines += 1
                cls = PRONOUN_CLASS[w[0]]
                antecedent = next(x for x in reversed(lines[:k]) if x[0] not in PRONOUN_CLASS)
                assert sum(NOUN_CLASS.get(x) == cls for x in antecedent) == 1, (antecedent, w)
                assert (w[1] in PLURAL_VERBS) == (cls == "pl")
            elif w[0] in CLOSER:
                connective_lines += 1
                comma = w.index(",")
                assert w[comma + 1] == CLOSER[w[0]]
                assert _main_verb_ok(w[1:comma]) and _main_verb_ok(w[comma + 2:])
            else:
                relative_lines += "who" in w or "that" in w
                assert _main_verb_ok(w)
    assert pronoun_lines > 100 and connective_lines > 100 and relative_lines > 100


def _agreement_label(sentence: str) -> int:
    w = sentence.split()
    if w[0] in CLOSER:
        comma = w.index(",")
        return int(w[comma + 1] == CLOSER[w[0]])
    if w.count(".") == 2:
        first = w[:w.index(".")]
        cls = PRONOUN_CLASS[w[w.index(".") + 1]]
        return int(sum(NOUN_CLASS.get(x) == cls for x in first) == 1)
    return int(_main_verb_ok(w[:-1]))


def test_agreement_labels_follow_the_grammar():
    rows = task_rows("AGREEMENT", 0, 600, 0)
    labels = [y for _, y in rows]
    assert abs(sum(labels) - 300) <= 1
    assert all(_agreement_label(s) == y for s, y in rows)


def test_referent_labels_follow_the_pronoun():
    rows = task_rows("REFERENT", 0, 600, 0)
    for premise, claim, y in rows:
        w = premise.split()
        pronoun = w[w.index(".") + 1]
        claimed = claim.split()[1]
        assert claimed in w[:w.index(".")]  # both entities are named in the premise
        assert int(NOUN_CLASS[claimed] == PRONOUN_CLASS[pronoun]) == y
    assert abs(sum(y for *_, y in rows) - 300) <= 1


@pytest.mark.parametrize("task", ["AGREEMENT", "REFERENT"])
def test_no_single_word_gives_the_label(task):
    rows = task_rows(task, 0, 1000, 0)
    y = np.array([r[-1] for r in rows])
    texts = [set(" ".join(r[:-1]).split()) for r in rows]
    best = max(max(((np.array([w in t for t in texts]) == y).mean()), ((np.array([w in t for t in texts]) != y).mean()))
               for w in set().union(*texts))
    assert best < 0.6


def test_prepare_synthetic_text_makes_a_ready_workspace(tmp_path):
    ws = Workspace(tmp_path / "ws")
    s = prepare_synthetic_text(ws, size="tiny", seed=0)
    assert s.status == "written" and s.glue is not None
    blocks = TokenBlocks(ws.data_dir / "text", "train")
    assert len(blocks) > 50 and blocks.sizes.max() < 128
    for task, pair in (("AGREEMENT", False), ("REFERENT", True)):
        meta = json.loads((ws.data_dir / "glue" / task / "task.json").read_text())
        assert meta["num_classes"] == 2 and meta["kind"] == "classification"
        recs = read_jsonl(ws.data_dir / "glue" / task / "train.jsonl")
        assert len(recs) == 40 and all(r["tokens"][0] == 0 and r["label"] in (0, 1) for r in recs)
        assert all((r["tokens"].count(2) == 3) == pair for r in recs)
    again = prepare_synthetic_text(ws, size="tiny", seed=0)
    assert again.status == "up to date" and {x.status for x in again.glue.splits} == {"up to date"}


@pytest.mark.parametrize("task", ["AGREEMENT", "REFERENT"])
def test_word_ngrams_do_not_solve_the_tasks(task):
    """A bag of 1- to 3-grams (scikit-learn logistic regression) trained on the demo's 400 labeled
    examples stays near chance: the label needs the dependency, not a surface pattern."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import LogisticRegression

    train, test = task_rows(task, 0, 400, 0), task_rows(task, 2, 600, 0)
    joined = [" [SEP] ".join(r[:-1]) for r in train + test]
    x = CountVectorizer(ngram_range=(1, 3), token_pattern=r"[^ ]+").fit(joined[:400])
    model = LogisticRegression(max_iter=2000).fit(x.transform(joined[:400]), [r[-1] for r in train])
    assert model.score(x.transform(joined[400:]), [r[-1] for r in test]) < 0.6


def test_a_second_generation_into_the_same_folder_is_refused_and_the_first_corpus_stays(tmp_path):
    from d2vcli.locks import LockError, hold

    out = tmp_path / "corpus"
    first = generate_text_corpus(out, "tiny", seed=3)
    before = files(out)
    # Another process generating there holds the folder's lock: this one is refused with its pid,
    # instead of removing what the other is about to rename into place (it was a FileNotFoundError).
    with hold(tmp_path / ".corpus.lock", "generating the synthetic text corpus"):
        with pytest.raises(LockError, match=r"is locked by pid \d+"):
            generate_text_corpus(out, "tiny", seed=4)
    assert files(out) == before
    assert generate_text_corpus(out, "tiny", seed=3) == first
