"""Transcribe audio files with a fine-tuned CTC model, greedy or with the LM, optionally with word times.

    d2v transcribe talk.mp3 call.wav [--model RUN_OR_CKPT] [--lm 4gram.bin | --no-lm] [--timestamps] [--out F]
    from d2vcli.transcribe import transcribe; [t.text for t in transcribe(["a.flac"], ws)]

Any file soundfile reads works (WAV, FLAC, OGG, MP3 with libsndfile >= 1.1, ...), at any sample
rate (resampled to 16 kHz with `d2vcli.audio`'s band-limited resampler) and any channel count
(averaged to mono). The waveform normalization stored in the checkpoint is applied to the
whole file.

Long files run through the model in windows of about `chunk_seconds` that are cut on the
model's frame grid: each window covers a whole number of frames plus the conv receptive
field, and the next starts exactly one window of frames later, so frame t of the file is
always at t x 20 ms and the windows' frames simply concatenate. (Each window's transformer
sees only that window, so a word cut by a boundary may be misrecognized.)

Word timestamps come from the CTC alignment: the best path of the greedy or beam search,
one token per 20 ms frame (total conv stride 320 samples at 16 kHz, computed from the
checkpoint's architecture). A word starts at the first frame of its first letter and ends
after the last frame of its last letter.

Arguments may be directories: their audio files (the suffixes `d2v prepare folder` accepts), found
recursively, in sorted order. A file that cannot be read does not stop the batch: it is listed in
`Transcripts.failures` (path and reason) and the rest are transcribed.

Output (stdout or --out FILE): `PATH<TAB>TEXT` per file, with --timestamps followed by one
`<TAB>START<TAB>END<TAB>WORD` line per word (seconds); a --out file ending in .json gets a JSON
list instead.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from d2vcli.audio import AudioError, read_audio, to_mono_16k
from d2vcli.checkpoint import find_ctc_checkpoint, run_name
from d2vcli.models.loading import load_ctc_model
from d2vcli.config import DecodeConfig
from d2vcli.data import normalize_waveform
from d2vcli.decode.emissions import frame_seconds_of, resolve_device
from d2vcli.decode.run import build_search_spec
from d2vcli.decode.search import BeamOptions, BeamSearcher, Hyp, greedy_decode
from d2vcli.decode.timings import WordTiming, word_timings
from d2vcli.decode.tuning import load_tuned
from d2vcli.errors import UserError
from d2vcli.fileio import atomic_write_text
from d2vcli.lm.formats import resolve_lm, workspace_lm
from d2vcli.manifest import num_frames
from d2vcli.models.audio import receptive_field
from d2vcli.prepare.folder import audio_extensions
from d2vcli.prepare.pipeline import walk_audio
from d2vcli.ui import err_console as console  # stdout carries the transcripts
from d2vcli.vocab import Vocab
from d2vcli.workspace import Workspace


MIN_CHUNK_SECONDS = 1.0  # shorter windows give the transformer almost no context and only cost time


class TranscribeError(UserError):
    """No file could be transcribed, or a setting is impossible; the message names the files."""


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str


class Transcripts(list):
    """The transcripts of the files that could be read, in input order; `failures` lists the others."""

    def __init__(self, items=(), failures=()):
        super().__init__(items)
        self.failures: list[Failure] = list(failures)


def expand_inputs(audio: Sequence[Path | str]) -> tuple[list[Path], list[Failure]]:
    """The files to transcribe (directories replaced by the audio inside them) and the inputs that are not there."""
    files, failures = [], []
    exts = audio_extensions()
    for p in map(Path, audio):
        if p.is_dir():
            skips = []  # loops and repeated links are walked once; unlistable directories are failures
            inside = sorted(Path(e.path) for e in walk_audio(p, exts, skips))
            failures.extend(Failure(path, f"{reason}: {detail}") for path, reason, detail in skips
                            if reason not in ("symlink-loop", "duplicate-dir"))
            if not inside:
                failures.append(Failure(str(p), "a directory with no audio files in it (searched recursively for "
                                                f"{', '.join(sorted(exts))})"))
            files.extend(inside)
        elif p.is_file():
            files.append(p)
        else:
            failures.append(Failure(str(p), "audio file not found"))
    return files, failures


@dataclass
class Transcript:
    path: str
    text: str
    seconds: float            # audio duration
    sample_rate: int          # of the file, before resampling
    channels: int
    words: Optional[list[WordTiming]] = field(default=None)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.words is None:
            d.pop("words")
        return d


def frame_windows(num_samples: int, conv_layers, chunk_seconds: float, sample_rate: int = 16_000
                  ) -> list[tuple[int, int]]:
    """(start, end) sample windows whose frames tile the file's frame grid exactly."""
    rf, hop = receptive_field(conv_layers)
    frames_per_window = max(1, int(chunk_seconds * sample_rate) // hop)
    step = frames_per_window * hop
    windows = []
    start = 0
    while True:
        end = min(num_samples, start + step + rf - hop)
        windows.append((start, end))
        if end >= num_samples:
            break
        start += step
    return windows


def transcribe(
    audio: Sequence[Path | str],
    ws=None,
    model: Optional[str | Path] = None,
    lm: Optional[str | Path] = "auto",
    lexicon: Optional[str | Path] = None,
    lexicon_free: bool = False,
    cfg: Optional[DecodeConfig] = None,
    timestamps: bool = False,
    use_tuned: bool = True,
    chunk_seconds: float = 30.0,
    trust: bool = False,
    device: str = "auto",
) -> Transcripts:
    """Transcribe files and directories of audio; `model` is a checkpoint, run directory or run name
    (default: newest fine-tuned run).

    `lm` as in `decode.run.decode`: "auto" (the workspace LM, if any), a path/name, or None (greedy).
    Files that cannot be read are returned in `.failures`; if none can be, TranscribeError.
    """
    ws = ws if ws is not None else Workspace.resolve(None)
    cfg = cfg or DecodeConfig()
    if not chunk_seconds >= MIN_CHUNK_SECONDS:  # also refuses NaN
        raise TranscribeError(f"chunk_seconds must be at least {MIN_CHUNK_SECONDS:g}, got {chunk_seconds}")
    files, failures = expand_inputs(audio)
    if not files:  # before loading the model: nothing to do
        raise TranscribeError(_no_file(failures))
    ckpt = find_ctc_checkpoint(ws, model)
    net, vocab, normalize, _ = load_ctc_model(ckpt, trust=trust)
    search = build_search(ws, ckpt, vocab, lm, lexicon, lexicon_free, cfg, use_tuned)
    dev = resolve_device(device)
    net.to(dev)

    out = []
    for path in files:
        t0 = time.perf_counter()
        try:
            wav, sr = read_audio(path)
        except AudioError as e:  # only reading is the file's fault; a model error is a bug and stops the batch
            failures.append(Failure(str(path), str(e)))
            console.print(f"skipped {path}: {e}", markup=False)
            continue
        t = transcribe_waveform(net, wav, sr, normalize, search, path=str(path), chunk_seconds=chunk_seconds,
                                device=dev, timestamps=timestamps)
        out.append(t)
        if len(files) > 1:
            console.print(f"{path}: {t.seconds:.1f} s of audio in {time.perf_counter() - t0:.2f} s", markup=False)
    if not out:
        raise TranscribeError(_no_file(failures))
    return Transcripts(out, failures)


def _no_file(failures: Sequence[Failure]) -> str:
    return "no file could be transcribed:\n" + "\n".join(f"  {f.path}: {f.reason}" for f in failures)


# ----------------------------------------------------------------------------- the pieces (also d2vcli.api's)


@dataclass
class Search:
    """How (T, V) log-probabilities become words: greedy, or flashlight beam search with its options."""

    vocab: Vocab
    searcher: Optional[BeamSearcher] = None
    options: Optional[BeamOptions] = None

    def decode(self, lp: np.ndarray, with_path: bool = False) -> Hyp:
        if self.searcher is not None:
            return self.searcher.decode(lp, self.options, with_path=with_path)
        return greedy_decode(lp, self.vocab, with_path=with_path)


def build_search(ws, checkpoint: Path, vocab: Vocab, lm: Optional[str | Path] = "auto",
                 lexicon: Optional[str | Path] = None, lexicon_free: bool = False,
                 cfg: Optional[DecodeConfig] = None, use_tuned: bool = True) -> Search:
    """The decoder `d2v transcribe` uses for `checkpoint`: greedy without an LM, else the beam search with
    the config's LM weights, or the tuned ones of decode/<run>/tuned.json when `use_tuned` and they exist."""
    cfg = cfg or DecodeConfig()
    lm_path = workspace_lm(ws) if lm == "auto" else resolve_lm(ws, lm)
    spec = build_search_spec(ws, vocab, lm_path, lexicon, lexicon_free)
    if spec is None:
        return Search(vocab)
    options = BeamOptions.from_config(cfg)
    if use_tuned and (t := load_tuned(ws.decode_dir / run_name(ws, checkpoint), spec)) is not None:
        b = t["best"]
        options = replace(options, lm_weight=b["lm_weight"], word_score=b["word_score"], sil_weight=b["sil_weight"])
        console.print(f"using tuned LM weights from {ws.decode_dir / run_name(ws, checkpoint) / 'tuned.json'}")
    return Search(vocab, BeamSearcher(spec), options)


def model_input(wav: np.ndarray, sr: int, normalize: bool) -> np.ndarray:
    """(S,) or (S, C) audio at any rate -> the float32 16 kHz mono waveform the model sees (normalized
    over the whole file when the checkpoint was trained so)."""
    x = to_mono_16k(wav, sr)
    return normalize_waveform(x) if normalize and len(x) else x


def transcribe_waveform(net, wav: np.ndarray, sr: int, normalize: bool, search: Search, *, path: str = "",
                        chunk_seconds: float = 30.0, device=None, timestamps: bool = False) -> Transcript:
    """One waveform (as `read_audio` returns it) through the CTC model and the search."""
    device = device if device is not None else next(net.parameters()).device
    channels = 1 if wav.ndim == 1 else wav.shape[1]
    x = model_input(wav, sr, normalize)
    conv_layers = net.backbone.conv_layers
    lp = _log_probs(net, x, conv_layers, chunk_seconds, device)
    hyp = search.decode(lp, with_path=timestamps)
    words = None
    if timestamps:
        words = word_timings(hyp.path, search.vocab.tokens, frame_seconds_of(conv_layers), hyp.words)
    return Transcript(path, hyp.text, round(len(x) / 16_000, 3), sr, channels, words)


def windowed_frames(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, conv_layers, chunk_seconds: float,
                    device, dim: int) -> np.ndarray:
    """(T, dim) float32: `fn` ((1, S) window -> (1, T_w, dim) per-frame outputs) over a whole 16 kHz
    waveform, window by window on the file's frame grid (`frame_windows`), frames concatenated."""
    rf, _ = receptive_field(conv_layers)
    parts = []
    if len(x) >= rf:  # shorter than one frame: nothing to compute
        with torch.inference_mode():
            for start, end in frame_windows(len(x), conv_layers, chunk_seconds):
                if end - start < rf:
                    continue
                src = torch.from_numpy(np.ascontiguousarray(x[start:end])).unsqueeze(0).to(device)
                parts.append(fn(src)[0].float().cpu().numpy())
    out = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
    return out[:num_frames(len(x), conv_layers)]


def _log_probs(net, x: np.ndarray, conv_layers, chunk_seconds: float, device) -> np.ndarray:
    """(T, V) float32 log-probabilities for a whole normalized 16 kHz waveform, window by window."""
    return windowed_frames(lambda src: torch.log_softmax(net(src)["logits"].float(), dim=-1), x, conv_layers,
                           chunk_seconds, device, net.proj.out_features)


def format_transcripts(transcripts: Sequence[Transcript], timestamps: bool) -> str:
    lines = []
    for t in transcripts:
        lines.append(f"{t.path}\t{t.text}")
        if timestamps and t.words:
            lines.extend(f"\t{w.start:.2f}\t{w.end:.2f}\t{w.word}" for w in t.words)
    return "\n".join(lines) + "\n"


def write_transcripts(transcripts: Sequence[Transcript], out: Path, timestamps: bool) -> None:
    out = Path(out)
    if out.suffix == ".json":
        atomic_write_text(out, json.dumps([t.to_dict() for t in transcripts], indent=1, ensure_ascii=False) + "\n")
    else:
        atomic_write_text(out, format_transcripts(transcripts, timestamps))
