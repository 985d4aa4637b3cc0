"""Manifests: one JSON line per utterance, written by `d2v prepare`, read by every later stage.

    {"id": "1272-128104-0000", "path": "/abs/path.flac", "num_samples": 93680,
     "sample_rate": 16000, "speaker": "1272", "text": "MISTER QUILTER IS ..."}

`text` is "" for unlabeled audio (pretraining). Optional `offset` (samples) marks a
segment of a longer file (Libri-light VAD segments).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from d2vcli.audio import SAMPLE_RATE
from d2vcli.config import BASE_CONV_LAYERS
from d2vcli.errors import UserError
from d2vcli.fileio import atomic_write_jsonl, read_jsonl


class ManifestError(UserError):
    """A manifest line that is not a record; the message names the file and line."""


@dataclass(frozen=True)
class Record:
    id: str
    path: str
    num_samples: int
    sample_rate: int = SAMPLE_RATE
    speaker: str = ""
    text: str = ""
    offset: int = 0

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate


def num_frames(num_samples: int, conv_layers=None) -> int:
    """Frames the conv feature encoder makes from `num_samples` (`models.audio.conv_output_length`);
    `conv_layers` defaults to the base stack (2 s -> 99 frames, 20 s -> 999)."""
    # Imported here, not at the top: `d2v prepare` reads and writes manifests and must not pay torch's import.
    from d2vcli.models.audio import conv_output_length

    return conv_output_length(int(num_samples), conv_layers or BASE_CONV_LAYERS)


def write_manifest(path: Path, records: list[Record]) -> int:
    return atomic_write_jsonl(Path(path), (asdict(r) for r in records))


def require_utterances(path: Path, split: str) -> Path:
    """`path`, if it holds at least one record. Scoring or training on an empty split would report
    a perfect "WER 0.00" or train on nothing, so it is an error naming the manifest and the fix."""
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        if any(line.strip() for line in fh):
            return path
    raise ManifestError(
        f"split '{split}' has no utterances: {path} is empty. Re-run `d2v prepare` for it (see "
        f"{path.with_name(f'skipped-{split}.tsv')} for what it skipped), or leave it out of --splits."
    )


def read_manifest(path: Path) -> list[Record]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest not found: {path}. Run `d2v prepare` first.")
    out = []
    for i, row in enumerate(read_jsonl(path), 1):
        try:
            out.append(Record(**row))
        except TypeError as e:
            raise ManifestError(f"{path}: line {i} is not a d2v manifest record ({e})") from e
    return out
