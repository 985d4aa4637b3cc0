"""The Python API's model: a d2v checkpoint loaded once, then used to transcribe or embed audio.

    import d2vcli
    model = d2vcli.load("finetune-10h")                  # run name, run directory or checkpoint file
    model.transcribe("a.wav").text                       # greedy; lm="4gram.bin" or "auto" for the LM
    [t.text for t in model.transcribe(["a.wav", "b.flac"])]
    model.transcribe(wave, sample_rate=44_100)           # a numpy array, (S,) or (S, C) as soundfile reads
    model.embed("a.wav", layer=8)                        # (T, D) float32, one row per 20 ms frame
    d2vcli.load("vision-ft-tiny").predict("cat.jpg", top_k=3).top   # an image classifier: [(class, prob), ...]

Everything goes through the code `d2v transcribe` runs: `checkpoint.find_checkpoint` and
`models.loading.load_model` (vocabulary and waveform normalization from the checkpoint),
`audio.read_audio` + `to_mono_16k` (soxr) + `data.normalize_waveform`, the frame-grid windows of
`transcribe.windowed_frames`, and `transcribe.build_search` (greedy, or the lexicon + KenLM beam
search with tuned weights when decode/<run>/tuned.json has them). So `model.transcribe(paths)`
gives exactly the text `d2v transcribe PATHS --model RUN --no-lm` prints. An image classifier
("vision-cls") predicts through `predict.predict_images`, the code of `d2v predict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from d2vcli.audio import AudioError, read_audio
from d2vcli.checkpoint import find_checkpoint, find_ctc_checkpoint
from d2vcli.config import DecodeConfig
from d2vcli.decode.emissions import resolve_device
from d2vcli.errors import UserError
from d2vcli.models.loading import load_model
from d2vcli.predict import Prediction, classifier_from, predict_images
from d2vcli.transcribe import Transcript, build_search, model_input, transcribe_waveform, windowed_frames
from d2vcli.vocab import Vocab
from d2vcli.workspace import Workspace

Audio = Union[str, Path, np.ndarray]

ARRAY_PATH = "<array>"  # Transcript.path of audio given as an array


class APIError(UserError):
    """A call the loaded model cannot serve (wrong kind, missing sample rate, layer out of range)."""


def load(path_or_run: Optional[str | Path] = None, workdir: Optional[str | Path] = None,
         trust_checkpoint: bool = False, device: str = "auto") -> "Model":
    """Load a d2v checkpoint for inference.

    `path_or_run`: a checkpoint file, a run directory, or a run name in the workspace (best.pt,
    else last.pt); None = the newest fine-tuned run, as `d2v transcribe` picks it. `workdir` is
    the workspace (default as the CLI: $D2V_WORKDIR, else ./d2v-work); it is where run names, LM
    names and tuned LM weights are looked up. `trust_checkpoint` allows files that need full
    unpickling (the CLI's --trust-checkpoint). `device`: auto, cpu, cuda or cuda:N.
    Both kinds load: "pretrain" checkpoints can `embed`, "ctc" ones can also `transcribe`.
    """
    ws = Workspace.resolve(workdir)
    path = find_checkpoint(ws, path_or_run) if path_or_run else find_ctc_checkpoint(ws)
    loaded = load_model(path, trust=trust_checkpoint)
    model = Model(loaded.model.to(resolve_device(device)), loaded.kind, loaded.vocab, loaded.normalize, path, ws)
    if loaded.kind == "vision-cls":
        model._classifier = classifier_from(loaded, path)
    return model


@dataclass(eq=False)
class Model:
    """A loaded checkpoint (in eval mode). Build it with `d2vcli.load`."""

    network: nn.Module       # Data2VecForCTC ("ctc") or Data2VecForPretraining ("pretrain")
    kind: str
    vocab: Optional[Vocab]   # ctc only
    normalize: bool          # the waveform normalization the model was trained with, applied to every input
    checkpoint: Path
    workspace: Workspace
    _searches: dict = field(default_factory=dict, repr=False)
    _classifier: Optional[object] = field(default=None, repr=False)  # predict.ImageClassifier, vision-cls only

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.network.backbone.transformer.layers)

    @property
    def embed_dim(self) -> int:
        return self.network.backbone.embed_dim

    # ------------------------------------------------------------------------- transcribe

    def transcribe(self, audio: Audio | Sequence[Audio], lm: Optional[str | Path] = None, *,
                   sample_rate: Optional[int] = None, lexicon: Optional[str | Path] = None,
                   lexicon_free: bool = False, decode: Optional[DecodeConfig] = None, use_tuned: bool = True,
                   timestamps: bool = False, chunk_seconds: float = 30.0) -> Transcript | list[Transcript]:
        """Transcribe a file, an array, or a list of them: one `Transcript` (.text, .seconds, .words
        with `timestamps`) per input, a list for a list.

        `lm`: None = greedy; "auto" = the LM `d2v prepare lm` built in the workspace; else a KenLM
        file (a path or a name in <workdir>/lm/), with `lexicon` (default <workdir>/lm/lexicon.txt)
        or `lexicon_free`. `decode` holds the beam options (default: DecodeConfig(), overridden by
        the run's tuned.json unless `use_tuned` is False). `sample_rate` is required for arrays.
        """
        self._audio_only("transcribe")
        if self.kind != "ctc":
            raise APIError(
                f"{self.checkpoint} is a pretrained (kind '{self.kind}') checkpoint: it has no letter head, so it "
                f"cannot transcribe. Fine-tune it first (`d2v finetune --init {self.checkpoint}`) and load the "
                f"fine-tuned run, or use .embed() for its representations.")
        key = (None if lm is None else str(lm), None if lexicon is None else str(lexicon), lexicon_free,
               repr(decode), use_tuned)
        search = self._searches.get(key)
        if search is None:
            search = self._searches[key] = build_search(self.workspace, self.checkpoint, self.vocab, lm, lexicon,
                                                        lexicon_free, decode, use_tuned)
        return self._each(audio, sample_rate, lambda wav, sr, path: transcribe_waveform(
            self.network, wav, sr, self.normalize, search, path=path, chunk_seconds=chunk_seconds,
            device=self.device, timestamps=timestamps))

    # ------------------------------------------------------------------------- embed

    def embed(self, audio: Audio | Sequence[Audio], layer: Optional[int] = None, *,
              sample_rate: Optional[int] = None, chunk_seconds: float = 30.0) -> np.ndarray | list[np.ndarray]:
        """The encoder's hidden states: float32 (T, D) per input (one row per frame, 20 ms apart for
        the base conv stack), a list for a list.

        `layer` counts like Hugging Face's `hidden_states`: 0 is the transformer's input (features
        + positional conv, after its LayerNorm), k in 1..num_layers the output of layer k, None
        (or -1) the last layer; negative values count from the end. A pretrain checkpoint gives
        the student's states. Long inputs run in `chunk_seconds` windows like `transcribe`.
        """
        self._audio_only("embed")
        layer = self._layer_index(layer)
        backbone = self.network.backbone
        dim = self.embed_dim

        def hidden(src: torch.Tensor) -> torch.Tensor:  # (1, S) -> (1, T, D)
            if layer == self.num_layers:
                return backbone(src)["x"]
            captured = []
            # A hook reads the state inside the real forward pass, so this cannot drift from the model.
            module = backbone.transformer.norm if layer == 0 else backbone.transformer.layers[layer - 1]
            handle = module.register_forward_hook(
                lambda _m, _inp, out: captured.append(out if layer == 0 else out[0]))
            try:
                backbone(src)
            finally:
                handle.remove()
            return captured[0]

        conv_layers = backbone.conv_layers
        return self._each(audio, sample_rate, lambda wav, sr, path: windowed_frames(
            hidden, model_input(wav, sr, self.normalize), conv_layers, chunk_seconds, self.device, dim))

    def _audio_only(self, what: str) -> None:
        if self.kind in ("vision-pretrain", "vision-cls"):
            raise APIError(f"{self.checkpoint} is an image model (kind '{self.kind}'): .{what}() takes audio; "
                           f"use .predict() on an image classifier")

    def _layer_index(self, layer: Optional[int]) -> int:
        n = self.num_layers
        if layer is None:
            return n
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or not -(n + 1) <= layer <= n:
            raise APIError(f"layer must be an integer in 0..{n} (or -{n + 1}..-1 from the end), got {layer!r}: "
                           f"this model has {n} transformer layers")
        return int(layer) % (n + 1)

    # ------------------------------------------------------------------------- predict (images)

    def predict(self, image, top_k: int = 5) -> Prediction | list[Prediction]:
        """The top-k classes of an image (a path or a PIL image) or a list of them: a `Prediction`
        (.path, .top = [(class, probability), ...], most probable first) per input, a list for a list."""
        if self._classifier is None:
            raise APIError(f"{self.checkpoint} is a '{self.kind}' checkpoint, not an image classifier: predict "
                           f"needs a fine-tuned image model (`d2v finetune --preset vision-ft-*`)")
        if top_k < 1:
            raise APIError(f"top_k must be at least 1, got {top_k}")
        single = not isinstance(image, (list, tuple))
        out = predict_images(self._classifier, [image] if single else list(image), top_k)
        return out[0] if single else out

    # ------------------------------------------------------------------------- inputs

    def _each(self, audio, sample_rate: Optional[int], fn):
        """Apply fn(wav, sr, path) to one input or to each of a list; arrays need `sample_rate`."""
        single = isinstance(audio, (str, Path, np.ndarray)) or hasattr(audio, "__array__")
        items = [audio] if single else list(audio)
        out = [fn(*_read(item, sample_rate)) for item in items]
        return out[0] if single else out


def _read(item: Audio, sample_rate: Optional[int]) -> tuple[np.ndarray, int, str]:
    """(waveform as read_audio returns it, its sample rate, the Transcript path) of a path or an array."""
    if isinstance(item, (str, Path)):
        if not Path(item).is_file():
            raise AudioError(f"audio file not found: {item}")
        wav, sr = read_audio(item)
        return wav, sr, str(item)
    if sample_rate is None:
        raise APIError("audio given as an array needs its rate: pass sample_rate=, e.g. sample_rate=16000")
    wav = np.asarray(item, dtype=np.float32)
    if wav.ndim not in (1, 2):
        raise APIError(f"an audio array must be (samples,) or (samples, channels), got shape {wav.shape}")
    return wav, int(sample_rate), ARRAY_PATH
