"""A generated speech-like corpus in LibriSpeech layout, for the demo and the tests.

    d2v prepare synthetic [-w WORKDIR] [--out DIR] [--size demo|tiny] [--seed 0]
    python -c "from d2vcli.synthetic import generate_corpus; generate_corpus('corpus')"

Layout (exactly LibriSpeech's, so `d2v prepare librispeech --splits train ...` reads it):

    <out>/LibriSpeech/SPEAKERS.TXT                       pipe format, like the real one
    <out>/LibriSpeech/<split>/<spk>/<chapter>/<spk>-<chapter>-<utt:04d>.flac   16 kHz mono 16-bit
    <out>/LibriSpeech/<split>/<spk>/<chapter>/<spk>-<chapter>.trans.txt
    <out>/lm-text.txt                                    LM training text, one sentence a line
    <out>/corpus.json                                    the generation parameters (idempotency stamp)

Splits: train, dev-clean, dev-other, test-clean, test-other; every speaker is in one split only.

How the "speech" is made, and why a small CTC model can learn it but not trivially:

* **Letters are phones.** The text uses 16 letters (A B D E G H I K L M N O R S T U, all in the
  LibriSpeech dictionary). Each letter is a 70-110 ms sound with a smooth attack and release.
  Vowels and most consonants are two-formant tones: two sinusoids (plus a weak second
  harmonic of the lower one) whose frequencies come from a 4 x 4 grid whose steps are about
  40 % apart, so each letter has its own (F1, F2) pair. S and H are noise-like: many
  random-phase sinusoids filling a high band (S) or a mid band (H).
* **Two deliberately confusable pairs.** N sits at M's F1 with F2 only 7 % higher, and T at
  D's F1 with F2 7 % higher. The speaker factor below moves all frequencies by up to 12 %,
  so one phone on its own cannot tell M from N or D from T; only context (other phones of
  the same speaker, and the words) can. Greedy CTC decoding therefore makes spelling
  errors like "NAN" for "MAN" that a lexicon and the word 4-gram LM fix, which is what the
  demo's LM-decoding step is meant to show.
* **Speakers.** Each speaker has a frequency factor (F: 1.00-1.12, M: 0.88-1.00; the clean
  condition uses at most +-8 %), a speaking-rate factor that scales durations (0.85-1.15
  clean, 0.80-1.25 other), and a noise level. "other" speakers also get a random spectral
  tilt (a duller channel) and a lower SNR (8-14 dB against 25-35 dB for clean). Half of
  the train speakers are recorded in the clean condition and half in the other condition,
  as LibriSpeech's 960 h mixes both. Per phone, frequencies jitter by about 1.5 % and
  durations and levels vary, so no two utterances of a word are identical.
* **Words and silences.** Letters within a word are separated by short dips (a longer gap
  between two identical letters, so CTC can emit both); words are separated by 80-200 ms of
  near-silence (background noise only); utterances have 100-250 ms of lead-in and tail.
  At 50 frames/s a letter spans 3-7 frames, so every transcript fits its CTC alignment.
* **Text.** Sentences of 2-6 words (1.5-5 s of audio) come from a small grammar over about
  80 words (determiners, people, animals, things, places, adjectives, verbs, prepositions)
  with fixed word-to-word preferences (each verb prefers some objects, each noun some
  adjectives), so a word 4-gram trained on lm-text.txt predicts real structure. The
  grammar is fixed (it does not depend on the seed); the seed picks the samples.
  lm-text.txt holds sentences drawn from the same grammar, so test sentences can also
  occur in it; this mirrors how the LibriSpeech LM corpus relates to its test sets
  (same domain, overlapping sentences possible).

Generation is deterministic for a given (size, seed): each utterance gets its own random
stream derived from (seed, split, speaker, chapter, utterance). It takes a few seconds on
one core for the default "demo" size (about 800 train utterances, 35 minutes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import soundfile as sf

from d2vcli.audio import SAMPLE_RATE
from d2vcli.fileio import build_stamped_dir

SPLITS = ("train", "dev-clean", "dev-other", "test-clean", "test-other")
FORMAT_VERSION = 1
Size = Literal["demo", "tiny"]


@dataclass(frozen=True)
class CorpusSize:
    """How much to generate: speakers x chapters x utterances per split, and LM sentences."""

    train_speakers: int
    eval_speakers: int  # per dev/test split
    chapters_per_speaker: int
    train_utts_per_chapter: int
    eval_utts_per_chapter: int
    lm_sentences: int


SIZES: dict[str, CorpusSize] = {
    # 20 x 2 x 20 = 800 train utterances (~35 min); 4 x 2 x 9 = 72 per dev/test split.
    "demo": CorpusSize(20, 4, 2, 20, 9, 5000),
    # For tests: 32 train utterances, 8 per dev/test split, generated in well under a second.
    "tiny": CorpusSize(4, 2, 1, 8, 4, 300),
}


# --------------------------------------------------------------------------- the "phones"

F1_GRID = (280.0, 390.0, 545.0, 760.0)  # Hz, ~1.4x apart: wider than the +-12 % speaker range
F2_GRID = (1100.0, 1530.0, 2130.0, 2970.0)
CONFUSABLE_SHIFT = 1.07  # N vs M and T vs D: F2 differs by less than the speaker variation


@dataclass(frozen=True)
class Phone:
    kind: Literal["tone", "noise"]
    f1: float  # tone: the two formant frequencies; noise: the band edges
    f2: float
    duration: float  # seconds at speaking rate 1.0


def _tone(i: int, j: int, duration: float, shift: float = 1.0) -> Phone:
    return Phone("tone", F1_GRID[i], F2_GRID[j] * shift, duration)


PHONES: dict[str, Phone] = {
    "A": _tone(3, 1, 0.105),
    "E": _tone(0, 3, 0.100),
    "I": _tone(0, 2, 0.095),
    "O": _tone(2, 0, 0.105),
    "U": _tone(1, 0, 0.100),
    "B": _tone(1, 2, 0.075),
    "D": _tone(2, 2, 0.075),
    "T": _tone(2, 2, 0.075, CONFUSABLE_SHIFT),
    "G": _tone(3, 3, 0.080),
    "K": _tone(1, 3, 0.075),
    "L": _tone(0, 1, 0.085),
    "M": _tone(1, 1, 0.085),
    "N": _tone(1, 1, 0.085, CONFUSABLE_SHIFT),
    "R": _tone(2, 3, 0.085),
    "S": Phone("noise", 4200.0, 6800.0, 0.090),
    "H": Phone("noise", 1300.0, 3000.0, 0.075),
}
LETTERS = "".join(sorted(PHONES))


# --------------------------------------------------------------------------- the language

WORDS: dict[str, tuple[str, ...]] = {
    "DET": ("THE", "A", "HIS", "HER", "ONE", "SOME"),
    "PERSON": ("MAN", "KING", "GIRL", "MAID", "LORD", "BRIDE", "MONK", "HERMIT"),
    "ANIMAL": ("DOG", "HORSE", "BIRD", "GOAT", "MULE", "DEER", "SNAKE", "HOUND", "MOUSE"),
    "THING": ("BOAT", "HOUSE", "STONE", "BREAD", "HAT", "BED", "BELL", "DOOR", "GOLD", "BOOK"),
    "PLACE": ("LAKE", "ROAD", "GARDEN", "HILL", "ISLAND", "MARKET", "DESERT", "HARBOR"),
    "ADJ": ("OLD", "RED", "BIG", "GOOD", "DARK", "SMALL", "TALL", "GREEN", "GOLDEN", "STRANGE"),
    "TVERB": ("SEES", "HOLDS", "TAKES", "SENDS", "BUILDS", "HEARS", "LIKES", "HIDES", "MEETS", "LEADS",
              "BRINGS"),
    "IVERB": ("RUNS", "RESTS", "HIDES", "ROAMS", "SITS", "STANDS", "DRINKS"),
    "PREP": ("IN", "ON", "NEAR", "UNDER", "BESIDE", "BEHIND", "AT"),
    "ADV": ("THEN", "LATER", "SOON"),
    "IS": ("IS",),
}

# (template, weight). Slots name word classes; "OBJ" is a THING or an ANIMAL.
TEMPLATES: tuple[tuple[tuple[str, ...], float], ...] = (
    (("DET", "PERSON", "TVERB", "DET", "OBJ"), 4.0),
    (("DET", "ADJ", "PERSON", "TVERB", "DET", "OBJ"), 2.0),
    (("DET", "PERSON", "TVERB", "DET", "ADJ", "OBJ"), 2.0),
    (("DET", "ANIMAL", "IVERB", "PREP", "DET", "PLACE"), 3.0),
    (("DET", "ANIMAL", "IVERB"), 1.5),
    (("ADV", "DET", "ANIMAL", "IVERB"), 1.0),
    (("DET", "ADJ", "ANIMAL", "IVERB"), 1.5),
    (("ADV", "DET", "PERSON", "TVERB", "DET", "OBJ"), 1.5),
    (("DET", "PERSON", "IVERB", "PREP", "DET", "PLACE"), 2.0),
    (("DET", "THING", "IS", "ADJ"), 1.5),
    (("DET", "PLACE", "IS", "ADJ"), 1.0),
    (("DET", "PERSON", "IVERB"), 1.0),
)


class Grammar:
    """Sentences from TEMPLATES with fixed word-to-word preferences.

    Preferences (verb -> object, noun -> adjective, subject -> verb, preposition ->
    place) are Zipf-like weights over a random permutation drawn once from a fixed
    seed, so the "language" is the same for every corpus seed and an n-gram LM
    trained on one sample generalizes to another.
    """

    LANGUAGE_SEED = 20_231_115

    def __init__(self) -> None:
        rng = np.random.default_rng(self.LANGUAGE_SEED)
        self.objects = WORDS["THING"] + WORDS["ANIMAL"]
        self.template_p = np.array([w for _, w in TEMPLATES]) / sum(w for _, w in TEMPLATES)
        self.pref: dict[tuple[str, str], np.ndarray] = {}

        def zipf(n: int) -> np.ndarray:
            p = 1.0 / (1.0 + np.arange(n)) ** 0.9
            p = p[rng.permutation(n)]
            return p / p.sum()

        for head, dep in [("TVERB", "OBJ"), ("PERSON", "TVERB"), ("PERSON", "IVERB"), ("ANIMAL", "IVERB"),
                          ("IVERB", "PREP"), ("PREP", "PLACE"), ("PLACE", "ADJ")]:
            n_dep = len(self.objects) if dep == "OBJ" else len(WORDS[dep])
            for word in WORDS[head]:
                self.pref[(word, dep)] = zipf(n_dep)
        for word in self.objects + WORDS["PERSON"] + WORDS["ANIMAL"]:
            self.pref[(word, "ADJ")] = zipf(len(WORDS["ADJ"]))

    def _pick(self, rng: np.random.Generator, slot: str, head: str | None) -> str:
        choices = self.objects if slot == "OBJ" else WORDS[slot]
        p = self.pref.get((head, slot)) if head is not None else None
        return choices[rng.choice(len(choices), p=p)] if p is not None else choices[rng.integers(len(choices))]

    def sentence(self, rng: np.random.Generator) -> str:
        template = TEMPLATES[rng.choice(len(TEMPLATES), p=self.template_p)][0]
        words: list[str] = []
        head: str | None = None  # the word the next slot depends on
        for k, slot in enumerate(template):
            nxt = template[k + 1] if k + 1 < len(template) else None
            if slot == "ADJ" and nxt is not None:
                # An adjective is chosen by the noun that follows it: pick the noun first.
                noun = self._pick(rng, nxt, head)
                words.append(self._pick(rng, "ADJ", noun))
                head = noun
                continue
            if words and slot in ("OBJ", "PERSON", "ANIMAL", "THING", "PLACE") and template[k - 1] == "ADJ":
                words.append(head)  # the noun picked for the adjective
                continue
            word = self._pick(rng, slot, head)
            words.append(word)
            if slot in ("PERSON", "ANIMAL", "TVERB", "IVERB", "PREP", "THING", "PLACE"):
                head = word
        return " ".join(words)


# --------------------------------------------------------------------------- synthesis


@dataclass(frozen=True)
class Speaker:
    id: int
    sex: Literal["F", "M"]
    condition: Literal["clean", "other"]
    freq: float  # multiplies every frequency
    rate: float  # multiplies every duration
    snr_db: tuple[float, float]  # per-utterance SNR range
    tilt_hz: float  # "other" channels: corner of a gentle low-pass; 0 = flat


def _make_speaker(rng: np.random.Generator, spk_id: int, sex: str, condition: str) -> Speaker:
    span = 0.08 if condition == "clean" else 0.12
    freq = 1.0 + (rng.uniform(0.0, span) if sex == "F" else -rng.uniform(0.0, span))
    rate = rng.uniform(0.85, 1.15) if condition == "clean" else rng.uniform(0.80, 1.25)
    snr = (25.0, 35.0) if condition == "clean" else (8.0, 14.0)
    tilt = 0.0 if condition == "clean" else rng.uniform(2500.0, 5000.0)
    return Speaker(spk_id, sex, condition, float(freq), float(rate), snr, float(tilt))


def _envelope(n: int, ramp: int) -> np.ndarray:
    env = np.ones(n, np.float32)
    ramp = max(1, min(ramp, n // 2))
    r = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    env[:ramp] = r
    env[n - ramp:] = r[::-1]
    return env


def _phone_audio(letter: str, spk: Speaker, rng: np.random.Generator) -> np.ndarray:
    ph = PHONES[letter]
    dur = ph.duration * spk.rate * rng.uniform(0.9, 1.1)
    n = int(dur * SAMPLE_RATE)
    t = np.arange(n, dtype=np.float32) / SAMPLE_RATE
    two_pi = np.float32(2 * np.pi)
    if ph.kind == "tone":
        f1 = ph.f1 * spk.freq * (1 + rng.normal(0, 0.015))
        f2 = ph.f2 * spk.freq * (1 + rng.normal(0, 0.015))
        p = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
        a2 = rng.uniform(0.5, 0.7)
        x = (np.sin(two_pi * f1 * t + p[0]) + a2 * np.sin(two_pi * f2 * t + p[1])
             + 0.25 * np.sin(two_pi * 2 * f1 * t + p[2]))
        level = rng.uniform(0.25, 0.35)
    else:
        freqs = rng.uniform(ph.f1, ph.f2, 14) * spk.freq
        phases = rng.uniform(0, 2 * np.pi, 14)
        x = np.sin(two_pi * np.outer(freqs, t).astype(np.float32) + phases[:, None].astype(np.float32)).sum(0)
        x /= np.sqrt(7.0)  # unit-ish power like the tones
        level = rng.uniform(0.18, 0.26)
    return (level * x * _envelope(n, int(0.012 * SAMPLE_RATE))).astype(np.float32)


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def synthesize(text: str, spk: Speaker, rng: np.random.Generator) -> np.ndarray:
    """The waveform (float32, 16 kHz, peak below 1) of `text` spoken by `spk`."""
    parts = [_silence(rng.uniform(0.10, 0.25))]
    for w, word in enumerate(text.split()):
        if w:
            parts.append(_silence(rng.uniform(0.08, 0.20)))
        for k, letter in enumerate(word):
            if k:
                gap = 0.040 if word[k - 1] == letter else 0.012
                parts.append(_silence(gap * spk.rate))
            parts.append(_phone_audio(letter, spk, rng))
    parts.append(_silence(rng.uniform(0.10, 0.25)))
    speech = np.concatenate(parts)
    if spk.tilt_hz:
        n_fft = 1 << (len(speech) - 1).bit_length()  # a power of two: arbitrary lengths can be slow
        spec = np.fft.rfft(speech, n_fft)
        freqs = np.fft.rfftfreq(n_fft, 1 / SAMPLE_RATE)
        speech = np.fft.irfft(spec / np.sqrt(1 + (freqs / spk.tilt_hz) ** 2), n_fft)[: len(speech)]
        speech = speech.astype(np.float32)
    power = float(np.mean(speech**2))
    snr = rng.uniform(*spk.snr_db)
    noise = rng.standard_normal(len(speech)).astype(np.float32) * np.float32(np.sqrt(power / 10 ** (snr / 10)))
    wav = speech + noise
    return (wav * (rng.uniform(0.5, 0.9) / max(1e-6, float(np.abs(wav).max())))).astype(np.float32)


def speech_seconds(text: str, spk: Speaker) -> float:
    """Expected duration of `text` for `spk` (used to keep utterances within 1.5-5 s)."""
    letters = sum(PHONES[c].duration for c in text.replace(" ", ""))
    gaps = 0.012 * (len(text.replace(" ", "")) - len(text.split()))
    return (letters + gaps) * spk.rate + 0.14 * (len(text.split()) - 1) + 0.35


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class CorpusInfo:
    """What generate_corpus made (also written as <out>/corpus.json)."""

    root: str  # the LibriSpeech/ directory
    lm_text: str
    size: str
    seed: int
    version: int
    utterances: dict[str, int]
    seconds: dict[str, float]


def _stamp_params(size: str, seed: int) -> dict:
    return {"size": size, "seed": seed, "version": FORMAT_VERSION, "sizes": asdict(SIZES[size])}


def _speaker_ids(rng: np.random.Generator, n: int) -> list[int]:
    # LibriSpeech ids are variable-width integers (19, 103, 1272, ...).
    return [int(x) for x in rng.choice(np.arange(10, 9000), size=n, replace=False)]


def _plan(size: CorpusSize, seed: int) -> dict[str, list[tuple[Speaker, list[int]]]]:
    """Speakers (with their chapter ids) for each split, all distinct."""
    rng = np.random.default_rng([seed, 0])
    counts = {s: size.train_speakers if s == "train" else size.eval_speakers for s in SPLITS}
    ids = iter(_speaker_ids(rng, sum(counts.values())))
    chapters = iter(int(x) for x in rng.choice(np.arange(1000, 200_000), size=sum(counts.values())
                                                 * size.chapters_per_speaker, replace=False))
    plan = {}
    for split in SPLITS:
        speakers = []
        for k in range(counts[split]):
            sex = "F" if k % 2 == 0 else "M"
            if split == "train":
                condition = "clean" if (k // 2) % 2 == 0 else "other"
            else:
                condition = "clean" if split.endswith("clean") else "other"
            spk = _make_speaker(rng, next(ids), sex, condition)
            speakers.append((spk, sorted(next(chapters) for _ in range(size.chapters_per_speaker))))
        plan[split] = speakers
    return plan


def _write_flac(path: Path, wav: np.ndarray) -> None:
    # Compression level 0: encoding dominates generation time at the default level, for ~10 % larger files.
    sf.write(str(path), wav, SAMPLE_RATE, format="FLAC", subtype="PCM_16", compression_level=0.0)


def _speakers_txt(plan, minutes: dict[int, float]) -> str:
    lines = [
        "; Synthetic readers generated by d2vcli.synthetic (LibriSpeech SPEAKERS.TXT format).",
        ";ID  |SEX| SUBSET           |MINUTES| NAME",
    ]
    for split, speakers in plan.items():
        for spk, _ in speakers:
            name = f"Synthetic {spk.condition} reader {spk.id}"
            lines.append(f"{spk.id:<5}| {spk.sex} | {split:<16} | {minutes[spk.id]:5.2f} | {name}")
    return "\n".join(lines) + "\n"


def generate_corpus(
    out_dir: Path | str,
    size: Size = "demo",
    seed: int = 0,
    progress=None,
) -> CorpusInfo:
    """Generate the corpus under `out_dir` (idempotent: an identical existing corpus is reused).

    The corpus is written into a temporary sibling directory and renamed into place
    when complete, so an interrupted run leaves no partial corpus. An existing
    `out_dir` made with other parameters is replaced only if it carries our
    corpus.json stamp; anything else there is an error (we never delete user data).
    `progress` is an optional rich Progress to report on.
    """
    if size not in SIZES:
        raise ValueError(f"unknown synthetic corpus size {size!r}; choose one of {', '.join(SIZES)}")
    out = Path(out_dir).expanduser().resolve()
    info = build_stamped_dir(out, _stamp_params(size, seed), "synthetic corpus",
                             lambda tmp: asdict(_generate_into(tmp, out, SIZES[size], size, seed, progress)))
    return CorpusInfo(**info)


def _generate_into(tmp: Path, out: Path, size: CorpusSize, size_name: str, seed: int, progress) -> CorpusInfo:
    grammar = Grammar()
    plan = _plan(size, seed)
    ls_tmp = tmp / "LibriSpeech"
    total = sum(len(chs) * (size.train_utts_per_chapter if split == "train" else size.eval_utts_per_chapter)
                for split, speakers in plan.items() for _, chs in speakers)
    task = progress.add_task("generating synthetic corpus", total=total) if progress is not None else None
    utterances: dict[str, int] = {}
    seconds: dict[str, float] = {}
    minutes: dict[int, float] = {}
    for s_idx, (split, speakers) in enumerate(plan.items()):
        per_chapter = size.train_utts_per_chapter if split == "train" else size.eval_utts_per_chapter
        utterances[split], seconds[split] = 0, 0.0
        for k, (spk, chapters) in enumerate(speakers):
            minutes[spk.id] = 0.0
            for c, chapter in enumerate(chapters):
                chapter_dir = ls_tmp / split / str(spk.id) / str(chapter)
                chapter_dir.mkdir(parents=True)
                lines = []
                for u in range(per_chapter):
                    rng = np.random.default_rng([seed, 1, s_idx, k, c, u])
                    text = grammar.sentence(rng)
                    while not 1.5 <= speech_seconds(text, spk) <= 4.8:
                        text = grammar.sentence(rng)
                    wav = synthesize(text, spk, rng)
                    utt_id = f"{spk.id}-{chapter}-{u:04d}"
                    _write_flac(chapter_dir / f"{utt_id}.flac", wav)
                    lines.append(f"{utt_id} {text}\n")
                    dur = len(wav) / SAMPLE_RATE
                    utterances[split] += 1
                    seconds[split] += dur
                    minutes[spk.id] += dur / 60
                    if task is not None:
                        progress.advance(task)
                (chapter_dir / f"{spk.id}-{chapter}.trans.txt").write_text("".join(lines))
    (ls_tmp / "SPEAKERS.TXT").write_text(_speakers_txt(plan, minutes))
    lm_rng = np.random.default_rng([seed, 2])
    (tmp / "lm-text.txt").write_text("".join(grammar.sentence(lm_rng) + "\n" for _ in range(size.lm_sentences)))
    return CorpusInfo(
        root=str(out / "LibriSpeech"),
        lm_text=str(out / "lm-text.txt"),
        size=size_name,
        seed=seed,
        version=FORMAT_VERSION,
        utterances=utterances,
        seconds={k: round(v, 3) for k, v in seconds.items()},
    )
