"""The decode command: validate the whole request up front, then greedy and beam search per split.

    d2v decode [RUN_OR_CKPT] [--splits dev-clean dev-other] [--lm 4gram.bin] [--tune] [--workers N]
    from d2vcli.decode.run import decode; result = decode(ws, cfg.decode, lm="4gram.bin")

With no checkpoint the newest fine-tuned run of the workspace is used (its best.pt); with no
splits, the dev/test manifests present; `--lm` is a path or a file name in <workdir>/lm/ (by
default the LM `d2v prepare lm` built, if any); the lexicon defaults to <workdir>/lm/lexicon.txt.
The pipeline and its reasons are in the package docstring (`d2vcli/decode/__init__.py`).

Outputs per split in <workdir>/decode/<run>/: `ref-<split>.txt`, `hyp-<split>-<tag>.txt`
(sclite trn format, `TEXT (utterance-id)`) and `scores-<split>-<tag>.tsv` (id, decoder score,
reference words, word errors).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

from d2vcli.checkpoint import checkpoint_vocab, find_ctc_checkpoint, run_name
from d2vcli.config import DecodeConfig
from d2vcli.decode.emissions import Emissions, get_emissions
from d2vcli.decode.errors import DecodeError
from d2vcli.decode.search import (
    BeamOptions, BeamPool, Hyp, SearchSpec, default_workers, greedy_decode, require_flashlight,
)
from d2vcli.decode.tuning import TuneResult, load_tuned, save_tuned, tune_lm
from d2vcli.fileio import atomic_open
from d2vcli.lm.formats import (
    LMError, check_lexicon_against_lm, dictionary_case, is_letter_lm, load_kenlm, read_lexicon, resolve_lm,
    workspace_lm,
)
from d2vcli.manifest import require_utterances
from d2vcli.scoring import edit_distance, word_errors
from d2vcli.ui import console, print_config_summary, table
from d2vcli.vocab import Vocab


@dataclass
class SplitOutput:
    split: str
    tag: str
    ids: list[str]
    refs: list[str]
    hyps: list[str]
    scores: list[float]
    audio_seconds: float
    decode_seconds: float

    @property
    def rtf(self) -> float:
        return self.decode_seconds / self.audio_seconds if self.audio_seconds else math.nan


@dataclass
class DecodeResult:
    run: str
    checkpoint: Optional[Path]
    out_dir: Path
    lm: Optional[Path] = None
    lexicon: Optional[Path] = None
    mode: str = "greedy"
    options: Optional[BeamOptions] = None
    tuned: Optional[TuneResult] = None
    tuned_from: Optional[Path] = None
    outputs: dict[tuple[str, str], SplitOutput] = field(default_factory=dict)
    emissions: dict[str, Emissions] = field(default_factory=dict)
    model_runs: int = 0  # splits whose emissions had to be computed (0 = all from the cache)

    def options_dict(self) -> Optional[dict]:
        return asdict(self.options) if self.options else None

    def table(self):
        rows = []
        for (split, tag), o in self.outputs.items():
            rows.append((split, tag, len(o.ids), f"{word_errors(o.refs, o.hyps).rate:.2f}",
                         f"{o.audio_seconds / 60:.1f}",
                         f"{o.decode_seconds:.2f}", f"{o.rtf:.4f}", f"{len(o.ids) / max(o.decode_seconds, 1e-9):.1f}"))
        return table(f"decode {self.run}", ["split", "tag", "utts", "WER", "audio min", "decode s", "RTF", "utt/s"],
                     rows)


def default_splits(ws) -> list[str]:
    """The dev and test manifests present, dev first (dev-clean, dev-other, test-clean, test-other)."""
    if not ws.data_dir.exists():
        return []
    names = sorted(p.stem for p in ws.data_dir.glob("*.jsonl"))
    return [n for n in names if n.startswith(("dev", "valid"))] + [n for n in names if n.startswith("test")]


def build_search_spec(ws, vocab: Vocab, lm_path: Optional[Path], lexicon: Optional[Path | str] = None,
                      lexicon_free: bool = False) -> Optional[SearchSpec]:
    """Validate the LM stack up front (imports, files, case) and describe the beam search, or None (greedy)."""
    if lm_path is None and not lexicon_free:
        return None
    require_flashlight(need_kenlm=lm_path is not None)
    tokens = tuple(vocab.tokens)
    if lm_path is None:
        return SearchSpec(tokens, "lexicon_free", None, None)
    model = load_kenlm(lm_path)
    if is_letter_lm(model):
        known = sum(s in model for s in vocab.symbols)
        if known < len(vocab.symbols) / 2:
            raise LMError(
                f"the letter LM {lm_path} knows only {known} of the {len(vocab.symbols)} dictionary symbols "
                f"({dictionary_case(vocab)} case): it was built for another alphabet or case. Rebuild it with "
                "`d2v prepare lm --unit letter --text CORPUS`.")
        return SearchSpec(tokens, "lexicon_free", str(lm_path), None)
    if lexicon_free:
        raise DecodeError(
            f"{lm_path} is a word LM; lexicon-free decoding needs a letter LM (built with `d2v prepare lm --unit "
            "letter`) or none. Drop --lexicon-free to use the word LM with the lexicon.")
    lex_path = Path(lexicon) if lexicon else ws.lm_dir / "lexicon.txt"
    lex = read_lexicon(lex_path, vocab)
    check_lexicon_against_lm(lex, lm_path, vocab)
    return SearchSpec(tokens, "lexicon", str(lm_path), str(lex_path.resolve()))


def write_outputs(out_dir: Path, o: SplitOutput) -> None:
    """ref-<split>.txt, hyp-<split>-<tag>.txt (sclite trn) and scores-<split>-<tag>.tsv."""
    with atomic_open(out_dir / f"ref-{o.split}.txt") as fh:
        for uid, ref in zip(o.ids, o.refs):
            fh.write(f"{ref} ({uid})\n")
    with atomic_open(out_dir / f"hyp-{o.split}-{o.tag}.txt") as fh:
        for uid, hyp in zip(o.ids, o.hyps):
            fh.write(f"{hyp} ({uid})\n")
    with atomic_open(out_dir / f"scores-{o.split}-{o.tag}.tsv") as fh:
        fh.write("id\tscore\twords\terrors\n")
        for uid, ref, hyp, s in zip(o.ids, o.refs, o.hyps, o.scores):
            rw = ref.split()
            fh.write(f"{uid}\t{s:.4f}\t{len(rw)}\t{edit_distance(rw, hyp.split())}\n")


def decode(
    ws,
    cfg: Optional[DecodeConfig] = None,
    checkpoint: Optional[str | Path] = None,
    splits: Optional[Sequence[str]] = None,
    lm: Optional[str | Path] = "auto",
    lexicon: Optional[str | Path] = None,
    lexicon_free: bool = False,
    tune: bool = False,
    trials: Optional[int] = None,
    search: Optional[Literal["random", "grid"]] = None,
    tune_beam: Optional[int] = None,
    use_tuned: bool = True,
    workers: Optional[int] = None,
    trust: bool = False,
    device: str = "auto",
) -> DecodeResult:
    """Decode dev/test splits with a fine-tuned CTC model: greedy always, beam search with an LM.

    `lm`: "auto" (the LM `d2v prepare lm` built, if any), a path or a name in <workdir>/lm/,
    or None (greedy only). Everything is validated before the model runs. See the module doc.
    """
    cfg = cfg or DecodeConfig()
    ckpt = find_ctc_checkpoint(ws, checkpoint)  # first: a mistyped model is the most specific mistake
    splits = list(splits) if splits else default_splits(ws)
    if not splits:
        raise FileNotFoundError(f"no dev or test manifests in {ws.data_dir}; run `d2v prepare` or pass --splits")
    for s in splits:
        require_utterances(ws.require_manifest(s), s)
    run = run_name(ws, ckpt)
    out_dir = ws.decode_dir / run
    out_dir.mkdir(parents=True, exist_ok=True)

    # Resolve and validate the whole LM stack before any model work.
    if lm == "auto":
        lm_path = workspace_lm(ws)
        if lm_path is not None:
            console.print(f"using the workspace LM {lm_path} (built by `d2v prepare lm`; --no-lm for greedy only)")
    else:
        lm_path = resolve_lm(ws, lm)
    vocab = checkpoint_vocab(ckpt, trust)
    spec = build_search_spec(ws, vocab, lm_path, lexicon, lexicon_free)
    # Printed once the inputs are validated, so an error is not preceded by settings.
    print_config_summary(cfg, DecodeConfig(), "decode config", "the defaults")
    tune_split = cfg.tune_split
    if tune:
        if spec is None:
            raise DecodeError("--tune searches LM weights: give an LM (--lm) or build one with `d2v prepare lm`")
        require_utterances(ws.require_manifest(tune_split), tune_split)

    needed = list(dict.fromkeys(splits + ([tune_split] if tune else [])))
    emissions, model_runs = get_emissions(ws, ckpt, needed, out_dir, cfg.batch_size, trust, device)
    result = DecodeResult(run, ckpt, out_dir, lm_path, Path(spec.lexicon) if spec and spec.lexicon else None,
                          spec.mode if spec else "greedy", emissions=emissions, model_runs=model_runs)

    for split in splits:
        em = emissions[split]
        t0 = time.perf_counter()
        hyps = [greedy_decode(em[i], vocab) for i in range(len(em))]
        _record(result, em, split, "greedy", hyps, time.perf_counter() - t0)

    if spec is not None:
        options = BeamOptions.from_config(cfg)
        n_workers = default_workers(cfg.workers if workers is None else workers)
        with BeamPool(spec, n_workers) as pool:
            if tune:
                tuned = tune_lm(pool, emissions[tune_split], options, cfg, trials, search, tune_beam)
                result.tuned = tuned
                path = save_tuned(out_dir, tuned, spec)
                console.print(tuned.table())
                b = tuned.best
                console.print(f"best on {tuned.split} (beam {tuned.beam}): lm_weight={b.lm_weight:.3f} "
                              f"word_score={b.word_score:.3f} sil_weight={b.sil_weight:.3f} -> WER {b.wer:.2f} "
                              f"(default {tuned.default.wer:.2f}); saved to {path}")
                options = b.options(options)
            elif use_tuned and (t := load_tuned(out_dir, spec)) is not None:
                best = t["best"]
                options = replace(options, lm_weight=best["lm_weight"], word_score=best["word_score"],
                                  sil_weight=best["sil_weight"])
                result.tuned_from = out_dir / "tuned.json"
                console.print(f"using tuned LM weights from {result.tuned_from} ({t['split']} WER {best['wer']:.2f}): "
                              f"lm_weight={best['lm_weight']:.3f} word_score={best['word_score']:.3f} "
                              f"sil_weight={best['sil_weight']:.3f}")
            result.options = options
            for split in splits:
                em = emissions[split]
                t0 = time.perf_counter()
                hyps = pool.run(em, [options], description=f"{spec.tag} {split}")[0]
                _record(result, em, split, spec.tag, hyps, time.perf_counter() - t0)
    for o in result.outputs.values():
        write_outputs(out_dir, o)
    return result


def _record(result: DecodeResult, em: Emissions, split: str, tag: str, hyps: list[Hyp], seconds: float) -> None:
    result.outputs[(split, tag)] = SplitOutput(split, tag, list(em.ids), list(em.refs), [h.text for h in hyps],
                                               [h.score for h in hyps], em.audio_seconds, seconds)


def print_result(result: DecodeResult) -> None:
    console.print(result.table())
    console.print(f"outputs: {result.out_dir} (hyp-*, ref-*, scores-*)")
