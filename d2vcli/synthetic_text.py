"""A generated text corpus with real structure, for the text demo and tests: numpy only, made in seconds.

    generate_text_corpus("corpus/synthetic-text", size="demo", seed=0)

A small English-like grammar with three kinds of dependency a model must track:

- **subject-verb number agreement across an attractor**: "the king who sees the girls sleeps":
  the main verb agrees with "king", not with the nearer "girls" (relative clauses put a noun of
  either number between subject and verb, so the local bigram "girls sleeps" is grammatical);
- **pronoun gender and number**: a pronoun (he / she / it / they) refers to a noun of the previous
  clause with its gender and number (masculine, feminine, neuter nouns; plurals are "they"), and
  its verb agrees with the pronoun;
- **paired connectives**: "if ... , then ...", "either ... , or ...", "neither ... , nor ...": the
  closing word is fixed by the opener, several words earlier.

Unlabeled documents (3 to 7 sentences, only grammatical) are the pretraining pool. Two labeled
tasks, in the layout `d2v prepare glue` reads (a folder with `d2v-task.json` and train/dev/test .tsv):

- AGREEMENT (single sentence, CoLA-like): 1 = grammatical, 0 = exactly one violation (the main
  verb's number flipped, the pronoun's gender or number wrong, or the closing connective swapped).
  Both classes use the same words in the same proportions, so no single token gives the label.
- REFERENT (sentence pair, entailment-like): sentence 1 names two entities and continues with a
  pronoun that fits exactly one of them ("the king sees the queens . they sing ."); sentence 2
  claims one of them did it ("the queens sing"); 1 = it is the pronoun's referent. Both entities
  appear in sentence 1, so the label needs the pronoun's features matched to the right noun.

Layout (`<out>/corpus.json` holds the parameters and counts; an identical corpus is reused):

    <out>/text/pool.txt              documents, one sentence per line, an empty line between documents
    <out>/glue/AGREEMENT/{train,dev,test}.tsv + d2v-task.json
    <out>/glue/REFERENT/{train,dev,test}.tsv + d2v-task.json

Every document and example comes from its own numpy Generator seeded by (seed, part, index), so
the corpus is the same on every machine; it is written into a temporary sibling and renamed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from d2vcli.fileio import build_stamped_dir

FORMAT_VERSION = 2

# (singular, plural, gender); gender picks the singular pronoun. Gender is lexical (16 nouns each), so a
# classifier must know each noun's gender: the unlabeled pool teaches it (pronouns refer back), a few hundred
# labeled examples hardly do.
_M = "king boy farmer wizard prince monk uncle knight sailor baron duke priest father brother nephew husband"
_F = ("queen girl witch:witches lady:ladies princess:princesses nun aunt nurse widow duchess:duchesses bride mother "
      "sister niece wife:wives actress:actresses")
_N = "dog robot horse cat car tree stone clock lamp boat river hammer cloud wheel drum bell"


def _nouns(words: str, gender: str) -> tuple[tuple[str, str, str], ...]:
    pairs = [w.split(":") if ":" in w else (w, w + "s") for w in words.split()]
    return tuple((sg, pl, gender) for sg, pl in pairs)


NOUNS = _nouns(_M, "m") + _nouns(_F, "f") + _nouns(_N, "n")
PRONOUNS = {"m": "he", "f": "she", "n": "it", "pl": "they"}
INTRANSITIVE = (("sleeps", "sleep"), ("runs", "run"), ("sings", "sing"), ("laughs", "laugh"), ("waits", "wait"))
TRANSITIVE = (("sees", "see"), ("likes", "like"), ("follows", "follow"), ("helps", "help"), ("finds", "find"))
ADJECTIVES = ("old", "small", "happy", "tall", "quiet")
ADVERBS = ("today", "again", "quietly", "at night")
CONNECTIVES = (("if", "then"), ("either", "or"), ("neither", "nor"))
Size = Literal["demo", "tiny"]


@dataclass(frozen=True)
class TextCorpusSize:
    documents: int
    train: int  # labeled examples per task
    dev: int
    test: int


SIZES = {"demo": TextCorpusSize(3000, 400, 300, 600), "tiny": TextCorpusSize(120, 40, 20, 20)}
TASKS = ("AGREEMENT", "REFERENT")
LABEL_NAMES = {"AGREEMENT": ["ungrammatical", "grammatical"], "REFERENT": ["other", "referent"]}


@dataclass
class TextCorpusInfo:
    root: str
    text_files: list[str]
    glue_dir: str
    size: str
    seed: int
    version: int
    documents: int
    examples: dict[str, dict[str, int]]


# ----------------------------------------------------------------------------- the grammar


@dataclass
class Entity:
    noun: int
    plural: bool

    @property
    def word(self) -> str:
        return NOUNS[self.noun][1 if self.plural else 0]

    @property
    def pronoun_class(self) -> str:
        return "pl" if self.plural else NOUNS[self.noun][2]


def _entity(rng: np.random.Generator, avoid: Optional[set[str]] = None, plural_p: float = 0.5) -> Entity:
    while True:
        e = Entity(int(rng.integers(len(NOUNS))), bool(rng.random() < plural_p))
        if avoid is None or e.pronoun_class not in avoid:
            return e


def _np(rng: np.random.Generator, e: Entity) -> list[str]:
    adj = [ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]] if rng.random() < 0.3 else []
    return ["the", *adj, e.word]


def _verb(pair: tuple[str, str], plural: bool) -> str:
    return pair[1 if plural else 0]


def clause(rng: np.random.Generator, flip_main: bool = False, relative: Optional[bool] = None
           ) -> tuple[list[str], list[Entity]]:
    """One clause and the entities it names (subject first). `flip_main` gives the main verb the wrong number."""
    subj = _entity(rng)
    words = _np(rng, subj)
    ents = [subj]
    if relative if relative is not None else rng.random() < 0.5:
        other = Entity(int(rng.integers(len(NOUNS))), not subj.plural if rng.random() < 0.7 else subj.plural)
        verb = TRANSITIVE[int(rng.integers(len(TRANSITIVE)))]
        if rng.random() < 0.5:  # subject relative: "who sees the girls", the verb agrees with the head
            words += ["who", _verb(verb, subj.plural), *_np(rng, other)]
        else:  # object relative: "that the girls see", the verb agrees with the inner subject
            words += ["that", *_np(rng, other), _verb(verb, other.plural)]
        ents.append(other)
    plural = subj.plural != flip_main
    if rng.random() < 0.5:
        words.append(_verb(INTRANSITIVE[int(rng.integers(len(INTRANSITIVE)))], plural))
    else:
        obj = _entity(rng)
        words += [_verb(TRANSITIVE[int(rng.integers(len(TRANSITIVE)))], plural), *_np(rng, obj)]
        ents.append(obj)
    if rng.random() < 0.3:
        words.append(ADVERBS[int(rng.integers(len(ADVERBS)))])
    return words, ents


def pronoun_clause(rng: np.random.Generator, referent: Entity) -> list[str]:
    """'she sings': the pronoun of `referent` and an agreeing verb."""
    cls = referent.pronoun_class
    verb = INTRANSITIVE[int(rng.integers(len(INTRANSITIVE)))]
    return [PRONOUNS[cls], _verb(verb, cls == "pl")]


def _unique_referent(rng: np.random.Generator, ents: list[Entity]) -> Optional[Entity]:
    counts: dict[str, int] = {}
    for e in ents:
        counts[e.pronoun_class] = counts.get(e.pronoun_class, 0) + 1
    unique = [e for e in ents if counts[e.pronoun_class] == 1]
    return unique[int(rng.integers(len(unique)))] if unique else None


def sentence(rng: np.random.Generator, previous: Optional[list[Entity]]) -> tuple[list[str], list[Entity]]:
    """A grammatical sentence: a clause, a connective pair of clauses, or a pronoun continuing `previous`."""
    r = rng.random()
    if previous is not None and r < 0.35:
        ref = _unique_referent(rng, previous)
        if ref is not None:
            return pronoun_clause(rng, ref) + ["."], [ref]
    if r < 0.65:
        words, ents = clause(rng)
        return words + ["."], ents
    opener, closer = CONNECTIVES[int(rng.integers(len(CONNECTIVES)))]
    a, ea = clause(rng, relative=False)
    b, eb = clause(rng, relative=False)
    return [opener, *a, ",", closer, *b, "."], ea + eb


def document(rng: np.random.Generator) -> list[str]:
    lines, previous = [], None
    for _ in range(int(rng.integers(3, 8))):
        words, previous = sentence(rng, previous)
        lines.append(" ".join(words))
    return lines


# ----------------------------------------------------------------------------- the labeled tasks


def agreement_example(rng: np.random.Generator, label: int) -> str:
    """A grammatical (1) sentence, or one with exactly one violation (0) of one of the three kinds."""
    kind = int(rng.integers(3))
    bad = label == 0
    if kind == 0:  # verb agreement across a relative clause
        words, _ = clause(rng, flip_main=bad, relative=True)
        return " ".join(words + ["."])
    if kind == 1:  # pronoun agreement with the previous clause
        # The pronoun is drawn first, from the same distribution in both classes (a frequent "they"
        # must not give the label away); the clause is then drawn until it has exactly one noun the
        # pronoun fits (grammatical) or none (a violation, not merely another referent).
        cls = "pl" if rng.random() < 0.5 else ("m", "f", "n")[int(rng.integers(3))]
        while True:
            words, ents = clause(rng, relative=False)
            fits = sum(e.pronoun_class == cls for e in ents)
            if fits == (0 if bad else 1):
                break
        verb = INTRANSITIVE[int(rng.integers(len(INTRANSITIVE)))]
        return " ".join(words + [".", PRONOUNS[cls], _verb(verb, cls == "pl"), "."])
    opener, closer = CONNECTIVES[int(rng.integers(len(CONNECTIVES)))]
    if bad:
        closer = [c for _, c in CONNECTIVES if c != closer][int(rng.integers(len(CONNECTIVES) - 1))]
    a, _ = clause(rng, relative=False)
    b, _ = clause(rng, relative=False)
    return " ".join([opener, *a, ",", closer, *b, "."])


def referent_example(rng: np.random.Generator, label: int) -> tuple[str, str]:
    """(premise naming two entities + a pronoun fitting one, claim about one of them): 1 = the referent.
    Entities are mostly singular, so the pronoun (he / she / it) is resolved by the nouns' gender."""
    first = _entity(rng, plural_p=0.25)
    second = _entity(rng, avoid={first.pronoun_class}, plural_p=0.25)
    verb = TRANSITIVE[int(rng.integers(len(TRANSITIVE)))]
    premise = [*_np(rng, first), _verb(verb, first.plural), *_np(rng, second), "."]
    ref, other = (first, second) if rng.random() < 0.5 else (second, first)
    act = INTRANSITIVE[int(rng.integers(len(INTRANSITIVE)))]
    premise += [PRONOUNS[ref.pronoun_class], _verb(act, ref.plural), "."]
    claimed = ref if label == 1 else other
    return " ".join(premise), " ".join(["the", claimed.word, _verb(act, claimed.plural)])


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """n labels, balanced (half each, the odd one random), in random order."""
    labels = np.array([i % 2 for i in range(n)])
    if n % 2:
        labels[-1] = int(rng.integers(2))
    return rng.permutation(labels)


def task_rows(task: str, split_index: int, n: int, seed: int) -> list[tuple]:
    labels = _labels(np.random.default_rng([seed, 100 + split_index, len(task)]), n)
    rows = []
    for i, label in enumerate(labels):
        rng = np.random.default_rng([seed, 1 + TASKS.index(task), split_index, i])
        if task == "AGREEMENT":
            rows.append((agreement_example(rng, int(label)), int(label)))
        else:
            rows.append((*referent_example(rng, int(label)), int(label)))
    return rows


# ----------------------------------------------------------------------------- the corpus


def _stamp_params(size: str, seed: int) -> dict:
    return {"version": FORMAT_VERSION, "size": size, "seed": seed, "sizes": asdict(SIZES[size])}


def generate_text_corpus(out_dir: Path | str, size: Size = "demo", seed: int = 0, progress=None) -> TextCorpusInfo:
    """Generate the corpus under `out_dir` (an identical existing one is reused; a folder that is not
    one of ours is never touched). `progress` is an optional rich Progress."""
    if size not in SIZES:
        raise ValueError(f"unknown synthetic text corpus size {size!r}; choose one of {', '.join(SIZES)}")
    sz = SIZES[size]
    out = Path(out_dir).expanduser().resolve()

    def build(tmp: Path) -> dict:
        task = progress.add_task("generating synthetic text", total=sz.documents + 2) if progress is not None else None
        (tmp / "text").mkdir(parents=True)
        with open(tmp / "text" / "pool.txt", "w", encoding="utf-8") as fh:
            for d in range(sz.documents):
                fh.write("\n".join(document(np.random.default_rng([seed, 0, d]))) + "\n\n")
                if task is not None:
                    progress.advance(task)
        examples: dict[str, dict[str, int]] = {}
        for name in TASKS:
            folder = tmp / "glue" / name
            folder.mkdir(parents=True)
            pair = name == "REFERENT"
            header = "sentence1\tsentence2\tlabel\n" if pair else "sentence\tlabel\n"
            examples[name] = {}
            for k, (split, n) in enumerate((("train", sz.train), ("dev", sz.dev), ("test", sz.test))):
                rows = task_rows(name, k, n, seed)
                (folder / f"{split}.tsv").write_text(header + "".join("\t".join(map(str, r)) + "\n" for r in rows),
                                                     encoding="utf-8")
                examples[name][split] = n
            (folder / "d2v-task.json").write_text(json.dumps(
                {"kind": "classification", "label_names": LABEL_NAMES[name],
                 "metric": "mcc" if name == "AGREEMENT" else "acc"}, indent=1))
            if task is not None:
                progress.advance(task)
        return asdict(TextCorpusInfo(root=str(out), text_files=[str(out / "text" / "pool.txt")],
                                     glue_dir=str(out / "glue"), size=size, seed=seed, version=FORMAT_VERSION,
                                     documents=sz.documents, examples=examples))

    return TextCorpusInfo(**build_stamped_dir(out, _stamp_params(size, seed), "synthetic text corpus", build))
