"""The workspace: where every stage writes and where later stages look.

Location: --workdir, else $D2V_WORKDIR, else ./d2v-work. Layout:

    <workdir>/
      data/            manifests <split>.jsonl, dict.ltr.txt, skipped-<split>.tsv, fairseq/ exports
      lm/              KenLM binary (*.bin), lexicon.txt, lm report
      runs/<name>/     config.yaml, checkpoints (last.pt, best.pt, step-N.pt), metrics.jsonl, tensorboard/
      decode/<run>/    emissions cache, hypotheses, references, scores, WER summaries

This is what lets `d2v pretrain --preset speech-large` and `d2v decode --lm 4gram.bin`
work without more flags: they find manifests and runs here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ENV_WORKDIR = "D2V_WORKDIR"
DEFAULT_WORKDIR = "d2v-work"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, workdir: Optional[Path | str] = None) -> "Workspace":
        root = workdir or os.environ.get(ENV_WORKDIR) or DEFAULT_WORKDIR
        return cls(Path(root).expanduser().resolve())

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def lm_dir(self) -> Path:
        return self.root / "lm"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def decode_dir(self) -> Path:
        return self.root / "decode"

    def manifest(self, split: str) -> Path:
        return self.data_dir / f"{split}.jsonl"

    def require_manifest(self, split: str) -> Path:
        path = self.manifest(split)
        if not path.exists():
            have = sorted(p.stem for p in self.data_dir.glob("*.jsonl")) if self.data_dir.exists() else []
            hint = f" Prepared splits here: {', '.join(have)}." if have else ""
            raise FileNotFoundError(
                f"no manifest for split '{split}' at {path}.{hint} Run `d2v prepare librispeech` "
                f"(or another `d2v prepare` subcommand) with --workdir {self.root}, or pick splits with "
                f"--set data.train_splits=[...]"
            )
        return path

    @property
    def dictionary(self) -> Path:
        return self.data_dir / "dict.ltr.txt"

    def run_dir(self, name: str) -> Path:
        return self.runs_dir / name
