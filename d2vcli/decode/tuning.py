"""LM-weight tuning: lm_weight, word_score and sil_weight searched on a dev split's cached emissions.

All trials run in the beam-search pool with a smaller beam (`decode.tune_beam`). The
configured setting is always trial 0, so tuning never picks something worse than the default
on the tuning split. The result goes to `decode/<run>/tuned.json`, and later decodes with the
same LM file (unchanged) and lexicon use it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from d2vcli.config import DecodeConfig
from d2vcli.decode.emissions import Emissions
from d2vcli.decode.search import BeamOptions, BeamPool, SearchSpec
from d2vcli.fileio import atomic_write_text
from d2vcli.scoring import word_errors
from d2vcli.ui import table


@dataclass
class Trial:
    lm_weight: float
    word_score: float
    sil_weight: float
    wer: float = math.nan
    errors: int = 0

    def options(self, base: BeamOptions, beam: Optional[int] = None) -> BeamOptions:
        return replace(base, lm_weight=self.lm_weight, word_score=self.word_score, sil_weight=self.sil_weight,
                       beam=beam or base.beam)


@dataclass
class TuneResult:
    split: str
    beam: int
    search: str
    trials: list[Trial]

    @property
    def default(self) -> Trial:
        return self.trials[0]

    @property
    def best(self) -> Trial:
        return min(self.trials, key=lambda t: (t.wer, t.errors))

    def table(self, limit: int = 20):
        ranked = sorted(range(len(self.trials)), key=lambda k: (self.trials[k].wer, k))
        shown = ranked[:limit] + ([0] if 0 not in ranked[:limit] else [])
        rows = []
        for rank, k in enumerate(shown, 1):
            t = self.trials[k]
            mark = "best" if k == ranked[0] else ("default" if k == 0 else "")
            rows.append((ranked.index(k) + 1, f"{t.lm_weight:.3f}", f"{t.word_score:.3f}", f"{t.sil_weight:.3f}",
                         f"{t.wer:.2f}", mark))
        return table(f"LM tuning on {self.split}: {len(self.trials)} trials ({self.search}), beam {self.beam}",
                     ["rank", "lm_weight", "word_score", "sil_weight", "WER", ""], rows)


def search_space(cfg: DecodeConfig, trials: int, search: str, seed: int = 0) -> list[Trial]:
    """Trial 0 is the configured setting; then a grid or uniform random samples in the ranges."""
    out = [Trial(cfg.lm_weight, cfg.word_score, cfg.sil_weight)]
    ranges = (cfg.tune_lm_weight, cfg.tune_word_score, cfg.tune_sil_weight)
    if search == "grid":
        per_dim = max(2, int(math.floor((max(trials - 1, 8)) ** (1 / 3) + 1e-9)))
        axes = [np.linspace(lo, hi, per_dim) for lo, hi in ranges]
        for a in axes[0]:
            for b in axes[1]:
                for c in axes[2]:
                    out.append(Trial(float(a), float(b), float(c)))
    else:
        rng = np.random.default_rng(seed)
        for _ in range(max(0, trials - 1)):
            out.append(Trial(*(float(rng.uniform(lo, hi)) for lo, hi in ranges)))
    return out


def tune_lm(pool: BeamPool, em: Emissions, base: BeamOptions, cfg: DecodeConfig, trials: Optional[int] = None,
            search: Optional[str] = None, beam: Optional[int] = None) -> TuneResult:
    """Search lm_weight / word_score / sil_weight on cached emissions; every trial runs in the pool."""
    search = search or cfg.tune_search
    beam = beam or cfg.tune_beam
    cands = search_space(cfg, trials or cfg.tune_trials, search)
    hyps = pool.run(em, [t.options(base, beam) for t in cands], description=f"tuning on {em.split}")
    for t, hs in zip(cands, hyps):
        counts = word_errors(em.refs, [h.text for h in hs])
        t.wer, t.errors = counts.rate, counts.errors
    return TuneResult(em.split, beam, search, cands)


def _lm_identity(path: Optional[Path]) -> Optional[list]:
    if path is None:
        return None
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def save_tuned(out_dir: Path, result: TuneResult, spec: SearchSpec) -> Path:
    path = Path(out_dir) / "tuned.json"
    best = result.best
    payload = {
        "lm": spec.lm, "lm_identity": _lm_identity(Path(spec.lm)) if spec.lm else None, "lexicon": spec.lexicon,
        "split": result.split, "beam": result.beam, "search": result.search,
        "best": asdict(best), "default": asdict(result.default), "trials": [asdict(t) for t in result.trials],
    }
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    return path


def load_tuned(out_dir: Path, spec: SearchSpec) -> Optional[dict]:
    """tuned.json if it was made for this LM (same file, unchanged) and lexicon."""
    path = Path(out_dir) / "tuned.json"
    if not path.exists():
        return None
    try:
        t = json.loads(path.read_text())
    except ValueError:
        return None
    if t.get("lm") != spec.lm or t.get("lexicon") != spec.lexicon:
        return None
    if spec.lm and t.get("lm_identity") != _lm_identity(Path(spec.lm)):
        return None
    return t
