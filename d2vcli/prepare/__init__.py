"""`d2v prepare`: turn a corpus on disk into manifests in the workspace's data/ directory.

    d2v prepare librispeech --root /data/LibriSpeech [--splits dev-clean ...]
    d2v prepare librilight-limited --root /data/librispeech_finetuning [--fold 0]
    d2v prepare librilight --root /data/librilight --subset small [--max-seconds 30]
    d2v prepare folder /data/my-audio [--split NAME] [--transcripts FILE.csv] [--resample] [--keep-text]
    d2v prepare synthetic [--out DIR]
    d2v prepare fairseq-export --out DIR [--splits ...]
    d2v prepare fairseq-import DIR [--splits ...]

Each subcommand is one library function (`prepare_librispeech`, ...) in the module of its
corpus, that takes a `Workspace` and returns a `PrepareSummary`; the CLI only prints it.
Every function is pure and idempotent, and the corpus modules differ only in how they walk
their layout: the rest is the shared per-split pipeline in `pipeline.py`.
"""

from d2vcli.prepare.fairseq import fairseq_export, prepare_fairseq_import
from d2vcli.prepare.folder import prepare_folder
from d2vcli.prepare.librilight import prepare_librilight
from d2vcli.prepare.librilight_limited import prepare_librilight_limited
from d2vcli.prepare.librispeech import prepare_librispeech
from d2vcli.prepare.result import PrepareError, PrepareSummary, SplitSummary
from d2vcli.prepare.synthetic import prepare_synthetic

__all__ = [
    "PrepareError", "PrepareSummary", "SplitSummary", "fairseq_export", "prepare_fairseq_import", "prepare_folder",
    "prepare_librilight", "prepare_librilight_limited", "prepare_librispeech", "prepare_synthetic",
]
