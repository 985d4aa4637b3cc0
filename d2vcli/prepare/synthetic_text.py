"""`d2v prepare synthetic-text`: generate the synthetic text corpus (`d2vcli.synthetic_text`) and prepare it.

    d2v prepare synthetic-text [--out DIR] [--size demo|tiny] [--seed 0]

The pool goes through `prepare_text` (a small BPE vocabulary: the grammar has about 100 words) and
the two labeled tasks through `prepare_glue`, so the workspace is ready for
`d2v pretrain --preset text-tiny` and a fine-tune on AGREEMENT or REFERENT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from d2vcli.prepare.glue import prepare_glue
from d2vcli.prepare.synthetic import generate_for_prepare
from d2vcli.prepare.text import TextPrepareSummary, prepare_text
from d2vcli.synthetic_text import SIZES, generate_text_corpus
from d2vcli.workspace import Workspace

SYNTHETIC_VOCAB = 384  # every word of the grammar becomes one piece (1.0 piece per word on the demo pool)
SYNTHETIC_TOKENS_PER_SAMPLE = 128  # a document is at most about 100 tokens


def default_synthetic_text_dir(ws: Workspace) -> Path:
    return ws.root / "corpus" / "synthetic-text"


def prepare_synthetic_text(
    ws: Workspace,
    out: Optional[Path | str] = None,
    size: Literal["demo", "tiny"] = "demo",
    seed: int = 0,
    workers: int = 0,
    force: bool = False,
) -> TextPrepareSummary:
    """Generate the synthetic text corpus, then prepare its pool (text) and its tasks (glue)."""
    out = Path(out) if out is not None else default_synthetic_text_dir(ws)
    info = generate_for_prepare(generate_text_corpus, out, size, seed, SIZES, "synthetic text corpus")
    summary = prepare_text(ws, info.text_files, vocab_size=SYNTHETIC_VOCAB, model_type="bpe", valid_fraction=0.05,
                           tokens_per_sample=SYNTHETIC_TOKENS_PER_SAMPLE, workers=workers, command="synthetic-text",
                           force=force)
    glue = prepare_glue(ws, info.glue_dir)
    summary.glue = glue
    summary.notes += glue.notes
    summary.notes.append(f"corpus: {info.root} (size {size}, seed {seed}); pretrain on data/text, fine-tune on "
                         f"data/glue/AGREEMENT or data/glue/REFERENT")
    return summary
