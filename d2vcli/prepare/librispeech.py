"""`d2v prepare librispeech`: LibriSpeech splits, and the LibriSpeech tree layout other corpora share.

    d2v prepare librispeech --root /data/LibriSpeech [--splits dev-clean ...]

A LibriSpeech-shaped tree is `.../<spk>/<chapter>/<spk>-<chapter>-<utt>.flac` with one
`<spk>-<chapter>.trans.txt` per chapter (`walk_libri_tree`); the Libri-light limited set and
the synthetic corpus use the same layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from d2vcli.prepare.outputs import finish
from d2vcli.prepare.pipeline import (
    Item, SplitOptions, id_key, prepare_split, resolve_root, split_list, stat_item, walk_audio,
)
from d2vcli.prepare.result import PrepareError, PrepareSummary, Skip
from d2vcli.vocab import Vocab
from d2vcli.workspace import Workspace

ENV_LIBRISPEECH = "D2V_LIBRISPEECH"
LIBRISPEECH_SPLITS = (
    "dev-clean", "dev-other", "test-clean", "test-other", "train-clean-100", "train-clean-360", "train-other-500",
)


class TranscriptIndex:
    """LibriSpeech `<spk>-<chapter>.trans.txt` files, each parsed once, looked up by utterance id."""

    def __init__(self) -> None:
        self.files: dict[Path, tuple[dict[str, str], str]] = {}
        self.used: dict[Path, set[str]] = {}

    def lookup(self, audio: Path, utt_id: str) -> tuple[Optional[str], str]:
        parts = utt_id.split("-")
        if len(parts) < 3:
            return None, f"file name {audio.name} is not <speaker>-<chapter>-<utterance>"
        trans = audio.parent / f"{parts[0]}-{parts[1]}.trans.txt"
        if trans not in self.files:
            self.files[trans] = self._parse(trans)
            self.used[trans] = set()
        lines, error = self.files[trans]
        if error:
            return None, error
        if utt_id not in lines:
            return None, f"{trans.name} has no line for {utt_id}"
        self.used[trans].add(utt_id)
        return lines[utt_id], ""

    @staticmethod
    def _parse(trans: Path) -> tuple[dict[str, str], str]:
        try:
            raw = trans.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}, f"no transcript file {trans}"
        except (OSError, UnicodeDecodeError) as e:
            return {}, f"cannot read {trans}: {e}"
        lines = {}
        for line in raw.splitlines():
            parts = line.strip().split(maxsplit=1)
            if parts:
                lines[parts[0]] = " ".join(parts[1].split()) if len(parts) > 1 else ""
        return lines, ""

    def orphans(self) -> list[Skip]:
        """A "no-audio" skip row for every transcript line whose audio file does not exist."""
        return [(str(p.parent / f"{utt}.flac"), "no-audio", f"{p.name} has a line for {utt} but there is no audio file")
                for p, (lines, err) in self.files.items() if not err
                for utt in sorted(set(lines) - self.used[p])]

    def stat_files(self) -> list[tuple[str, int, int]]:
        out = []
        for p in self.files:
            try:
                st = p.stat()
                out.append((str(p), st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((str(p), -1, -1))
        return out


def walk_libri_tree(dirs: Sequence[Path]) -> tuple[list[Item], TranscriptIndex, list[Skip]]:
    """LibriSpeech-shaped trees (`.../<spk>/<chapter>/<spk>-<chapter>-<utt>.flac` + trans.txt): the items,
    their transcripts, and the skips of the walk with the transcript lines that have no audio."""
    index = TranscriptIndex()
    items = []
    skips: list[Skip] = []
    for d in dirs:
        for e in walk_audio(d, frozenset({".flac"}), skips):
            utt_id = e.name[: -len(".flac")]
            item = stat_item(e, utt_id)
            item.speaker = utt_id.split("-")[0]
            item.text, detail = index.lookup(item.path, utt_id)
            if item.text is None:
                item.problem = ("no-transcript", detail)
            items.append(item)
    items.sort(key=lambda it: id_key(it.id))
    return items, index, skips + index.orphans()


def librispeech_root(root: Optional[Path | str]) -> Path:
    """The `LibriSpeech/` directory from --root (itself or its parent) or $D2V_LIBRISPEECH."""
    path = resolve_root(root, ENV_LIBRISPEECH, "LibriSpeech", "/path/to/LibriSpeech")
    if (path / "LibriSpeech").is_dir():
        path = path / "LibriSpeech"
    return path


def prepare_librispeech(
    ws: Workspace,
    root: Optional[Path | str] = None,
    splits: Optional[Sequence[str]] = None,
    resample: bool = False,
    strict: bool = False,
    workers: int = 0,
    command: str = "librispeech",
) -> PrepareSummary:
    """Manifests for LibriSpeech splits: data/<split>.jsonl + data/dict.ltr.txt.

    `splits`: names of split directories (the 7 standard ones or any other, e.g. the
    synthetic corpus's `train`); default: every standard split present.
    """
    root = librispeech_root(root)
    splits = split_list(splits)
    present = sorted(p.name for p in root.iterdir() if p.is_dir())
    if splits:
        missing = [s for s in splits if not (root / s).is_dir()]
        if missing:
            raise PrepareError(f"split(s) {', '.join(missing)} not found in {root} "
                               f"(found: {', '.join(present) or 'no directories'})")
        todo = list(dict.fromkeys(splits))
    else:
        todo = [s for s in LIBRISPEECH_SPLITS if s in present]
        if not todo:
            raise PrepareError(
                f"no LibriSpeech split in {root} (found: {', '.join(present) or 'no directories'}); "
                f"expected some of {', '.join(LIBRISPEECH_SPLITS)}, or name yours with --splits"
            )
    opts = SplitOptions(command, labeled=True, vocab=Vocab.librispeech(), resample=resample, strict=strict)
    results = []
    for split in todo:
        items, index, skips = walk_libri_tree([root / split])
        results.append(prepare_split(ws, split, items, opts, index.stat_files(), skips, workers,
                                     source=str(root / split)))
    return finish(ws, command, results, labeled=True)
