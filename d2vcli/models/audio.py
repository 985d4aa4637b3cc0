"""The data2vec 1.0 audio model: conv feature encoder, positional conv, the shared transformer, two heads.

data2vec: A General Framework for Self-supervised Learning in Speech, Vision and Language
(Baevski et al., 2022, arXiv 2202.03555). The network is wav2vec 2.0's (arXiv 2006.11477)
with data2vec's settings: a LayerNorm in every conv block, a 5-layer convolutional
positional embedding and a post-LN transformer. Reference implementation: fairseq
`examples/data2vec/models/data2vec_audio.py` + `fairseq/models/wav2vec/wav2vec2.py`
(snapshot 3d262bb); Hugging Face `Data2VecAudioModel` computes the same function, and
`tests/test_model.py` checks that ours matches it to 1e-5 with mapped weights.

The classes below follow the data flow of the paper (Fig. 1 / Sec. 3):

    waveform (B, S)
      -> FeatureExtractor       conv blocks (conv -> fp32 LayerNorm -> GELU), 20 ms frames
      -> feature_norm + feature_proj   LayerNorm(C) and Linear(C -> D): the teacher's input
      -> mask_emb               masked frames are replaced by one learned vector (student only)
      -> Transformer            x + PositionalConv(x) -> LayerNorm -> LayerStack (models/encoder.py)
      -> heads                  Data2VecForPretraining.final_proj | Data2VecForCTC.proj

Only the audio front end (waveform -> frames, the positional conv) and the heads live here; the
layers themselves are the modality-neutral `d2vcli.models.encoder`. Build a backbone from a
config with `build_backbone(cfg.model)`. Frame arithmetic of the conv stack (`conv_output_length`,
`receptive_field`) is defined here once, for ints and tensors alike.

Deliberate differences from fairseq (none changes a number):
- fairseq pads the transformer input to a multiple of 2 frames and masks the pad as
  padding (`required_seq_len_multiple`). Masked keys contribute nothing, so we skip it.
- The mask embedding is written with `torch.where` instead of fairseq's in-place
  index_put, so the unmasked features (the teacher's input) never need a defensive clone.
- LayerDrop draws from torch's RNG (fairseq: numpy's), so `torch.manual_seed` fixes it.
Precision (autocast) and distribution (DDP) are applied by the engine,
never here; the only precision choices in this file are the fp32 islands fairseq has.
"""

from __future__ import annotations

from typing import Optional, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2vcli.models.encoder import LayerStack

CONV_LN_EPS = 1e-5  # conv-block and positional-conv LayerNorms: eps fixed in fairseq and HF alike


# --------------------------------------------------------------------------- 0. frame arithmetic

Length = TypeVar("Length", int, Tensor)


def conv_output_length(num_samples: Length, conv_layers: Sequence[Sequence[int]]) -> Length:
    """Frames the conv encoder makes from `num_samples`: floor((L - k) / s) + 1 per block, at least 0.

    Works on a Python int (manifests, window planning) and on an int tensor of any shape (the
    model's frame padding). With the base stack (total stride 320): 2 s -> 99 frames, 20 s -> 999.
    """
    length = num_samples
    for _, kernel, stride in conv_layers:
        length = (length - kernel) // stride + 1  # once <= 0 it stays <= 0, so clamping at the end suffices
    return length.clamp(min=0) if isinstance(length, Tensor) else max(0, length)


def receptive_field(conv_layers: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(samples one frame sees, samples between frames) of the conv encoder: (400, 320) for base."""
    field, hop = 1, 1
    for _, kernel, stride in conv_layers:
        field += (kernel - 1) * hop
        hop *= stride
    return field, hop


# --------------------------------------------------------------------------- 1. feature encoder


class GradMultiply(torch.autograd.Function):
    """Identity forward, gradient times `scale` backward (fairseq's feature_grad_mult)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back: conv activations on raw audio have a large
    dynamic range, so fairseq keeps this norm out of fp16/bf16 (its Fp32LayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class ConvBlock(nn.Module):
    """Conv1d (no bias) -> LayerNorm over channels (fp32) -> GELU; data2vec's `layer_norm` extractor mode.

    The conv runs as a height-1 conv2d on channels-last memory: oneDNN (CPU) and cuDNN (GPU)
    both take that layout natively, and LayerNorm over channels then reads a contiguous last
    dim, so the two full-size transposes per block that an NCL conv1d needs disappear. The
    weight stays a Conv1d parameter (C, C_in, k), as in fairseq and HF.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, stride=stride, bias=False)
        nn.init.kaiming_normal_(self.conv.weight)
        self.norm = Fp32LayerNorm(out_channels, eps=CONV_LN_EPS)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, 1, L) channels-last -> (B, C, 1, L')
        if x.shape[1] == 1:
            # On the raw waveform the conv is a (k -> C) matmul over strided windows, written straight
            # into channels-last order; oneDNN's conv of one input channel also returned channels-first
            # memory, which cost a full-size copy and a slow strided LayerNorm (about 14 % of a base
            # encoder forward on CPU, benchmarks/bench_encoder.py).
            # The (k, C) weight is made contiguous so that autograd forms its gradient as windows^T @ grad
            # (K = B x L'), not as the transposed grad^T @ windows: 7x faster on CPU for the same numbers.
            windows = x[:, 0, 0, :].unfold(-1, self.conv.kernel_size[0], self.stride)  # (B, L', k)
            x = (windows @ self.conv.weight[:, 0, :].t().contiguous()).unsqueeze(1)  # (B, 1, L', C)
        else:
            x = F.conv2d(x, self.conv.weight.unsqueeze(2), stride=(1, self.stride))
            x = x.permute(0, 2, 3, 1)  # (B, 1, L', C): a view, contiguous in channels-last memory
        x = F.gelu(self.norm(x))
        return x.permute(0, 3, 1, 2)


class FeatureExtractor(nn.Module):
    """Raw waveform -> frame features; the base stack has total stride 320 (20 ms) and a 400-sample field."""

    def __init__(self, conv_layers: Sequence[Sequence[int]]):
        super().__init__()
        blocks, in_channels = [], 1
        for channels, kernel, stride in conv_layers:
            blocks.append(ConvBlock(in_channels, channels, kernel, stride))
            in_channels = channels
        self.blocks = nn.ModuleList(blocks)

    def forward(self, source: Tensor) -> Tensor:  # (B, S) -> (B, T, C)
        x = source[:, None, None, :].contiguous(memory_format=torch.channels_last)  # (B, 1, 1, S)
        for block in self.blocks:
            x = block(x)
        return x[:, :, 0, :].transpose(1, 2)  # (B, T, C), contiguous: channels were last in memory


# --------------------------------------------------------------------------- 2. positional embedding


class PosConvBlock(nn.Module):
    """Conv1d(D, D, k, groups) -> SamePad -> LayerNorm(D, no affine) -> GELU (no weight norm, no inner residual).

    Like ConvBlock, it runs as a height-1 conv2d on channels-last memory, so the (B, T, D)
    activations never need transposing copies.
    """

    def __init__(self, dim: int, kernel: int, groups: int, out_dim: Optional[int] = None):
        super().__init__()
        self.groups = groups
        # out_dim != dim: data2vec 2.0's decoder, whose first block narrows D to the decoder width.
        self.conv = nn.Conv1d(dim, out_dim or dim, kernel, padding=kernel // 2, groups=groups)
        # padding k//2 on both sides makes one extra frame when k is even ("SamePad" drops it).
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x: Tensor) -> Tensor:  # (B, D, 1, T) channels-last -> same
        pad = self.conv.padding[0]
        x = F.conv2d(x, self.conv.weight.unsqueeze(2), self.conv.bias, padding=(0, pad), groups=self.groups)
        if self.trim:
            x = x[..., : -self.trim]
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), eps=CONV_LN_EPS)  # (B, 1, T, D)
        return F.gelu(x).permute(0, 3, 1, 2)


class PositionalConv(nn.Module):
    """The relative positional embedding: a stack of grouped convolutions over time.

    data2vec uses depth 5 with kernel 19 (fairseq: max(3, conv_pos // depth) = 95 // 5),
    a receptive field of 5 x 18 + 1 = 91 frames (1.8 s).
    """

    def __init__(self, dim: int, depth: int, kernel: int, groups: int):
        super().__init__()
        self.blocks = nn.ModuleList(PosConvBlock(dim, kernel, groups) for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        x = x.transpose(1, 2).unsqueeze(2)  # (B, D, 1, T): a channels-last view of the same memory
        for block in self.blocks:
            x = block(x)
        return x[:, :, 0, :].transpose(1, 2)


# --------------------------------------------------------------------------- 3. transformer


class Transformer(nn.Module):
    """x + PositionalConv(x) -> LayerNorm -> dropout -> post-LN layers with LayerDrop.

    This is the part the EMA teacher copies (`EMATeacher(backbone.transformer, ...)`); the
    teacher runs in eval mode, so it never drops layers.
    """

    def __init__(self, embed_dim: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float,
                 attention_dropout: float, activation_dropout: float, layerdrop: float, pos_conv_depth: int,
                 pos_conv_kernel: int, pos_conv_groups: int, layer_norm_eps: float, init_std: float = 0.02):
        super().__init__()
        self.pos_conv = PositionalConv(embed_dim, pos_conv_depth, pos_conv_kernel, pos_conv_groups)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        # BERT init reaches only the stack's Linear layers: the positional convs keep PyTorch's default init.
        self.layers = LayerStack(num_layers, embed_dim, num_heads, ffn_dim, dropout, attention_dropout,
                                 activation_dropout, layer_norm_eps, layerdrop, init_std)

    @property
    def layerdrop(self) -> float:
        """Probability of skipping each layer in training (held by the layer stack)."""
        return self.layers.layerdrop

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                return_layer_results: bool = False) -> tuple[Tensor, Optional[list[Tensor]]]:
        """x (B, T, D), padding_mask (B, T) True = padding -> (x (B, T, D), [ffn_out (B, T, D)] or None).

        Layer results list only the layers that ran (LayerDrop may skip some in training).
        """
        if padding_mask is not None:
            # Zeroed once, before the positional convs; like fairseq and HF, later conv layers
            # see non-zero values in the pad, so a padded row differs slightly from the same
            # clip run alone (transformers#25621). Parity holds given identical padding.
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        x = x + self.pos_conv(x)  # one residual around the whole positional stack
        x = self.dropout(self.norm(x))  # post-LN model: normalize before the first layer
        return self.layers(x, padding_mask, return_layer_results=return_layer_results)


# --------------------------------------------------------------------------- 4. the backbone


class Data2VecAudio(nn.Module):
    """The data2vec audio encoder (student): waveform -> contextualized frames (B, T, D).

    Args (names as in `config.ModelConfig`):
        conv_layers: feature encoder blocks as (channels, kernel, stride).
        embed_dim, num_layers, num_heads, ffn_dim: transformer size (base 768/12/12/3072).
        dropout: on the transformer input and after attention and FFN.
        attention_dropout, activation_dropout: on attention probabilities / after the FFN GELU.
        dropout_input: on the projected features, before masking.
        layerdrop: probability of skipping each transformer layer in training.
        pos_conv_depth, pos_conv_kernel, pos_conv_groups: positional conv stack (base 5/19/16).
        feature_grad_mult: gradient scale into the conv encoder; 0 runs it under no_grad (frozen).
        layer_norm_eps: eps of the feature, encoder and layer LayerNorms (the conv ones use 1e-5).
        init_std: std of the BERT init of the transformer's Linear layers (reference 0.02).
    """

    def __init__(self, conv_layers: Sequence[Sequence[int]], embed_dim: int = 768, num_layers: int = 12,
                 num_heads: int = 12, ffn_dim: int = 3072, dropout: float = 0.1, attention_dropout: float = 0.1,
                 activation_dropout: float = 0.0, dropout_input: float = 0.0, layerdrop: float = 0.05,
                 pos_conv_depth: int = 5, pos_conv_kernel: int = 19, pos_conv_groups: int = 16,
                 feature_grad_mult: float = 1.0, layer_norm_eps: float = 1e-5, init_std: float = 0.02):
        super().__init__()
        self.conv_layers = tuple(tuple(int(v) for v in layer) for layer in conv_layers)
        self.embed_dim = embed_dim
        self.feature_grad_mult = feature_grad_mult
        channels = self.conv_layers[-1][0]
        self.feature_extractor = FeatureExtractor(self.conv_layers)
        self.feature_norm = nn.LayerNorm(channels, eps=layer_norm_eps)
        self.feature_proj = nn.Linear(channels, embed_dim)  # default init: it sits outside the transformer
        self.dropout_input = nn.Dropout(dropout_input)
        self.mask_emb = nn.Parameter(torch.empty(embed_dim).uniform_())
        self.transformer = Transformer(embed_dim, num_layers, num_heads, ffn_dim, dropout, attention_dropout,
                                       activation_dropout, layerdrop, pos_conv_depth, pos_conv_kernel,
                                       pos_conv_groups, layer_norm_eps, init_std)

    def num_frames(self, num_samples: Length) -> Length:
        """Frames the conv encoder makes from `num_samples` (an int or any int tensor)."""
        return conv_output_length(num_samples, self.conv_layers)

    def frame_padding_mask(self, padding_mask: Optional[Tensor], num_frames: int) -> Optional[Tensor]:
        """Sample-level padding (B, S) -> frame-level (B, T) from the true lengths; None if nothing is padded."""
        if padding_mask is None or not bool(padding_mask.any()):
            return None
        lengths = self.num_frames((~padding_mask).sum(-1))  # (B,)
        frames = torch.arange(num_frames, device=padding_mask.device)
        return frames.unsqueeze(0) >= lengths.unsqueeze(1)  # (B, T)

    def conv_features(self, source: Tensor) -> Tensor:
        """source (B, S) -> the conv encoder's output (B, T, C), before feature_norm and projection.

        `feature_grad_mult` applies here: 0 runs the encoder under no_grad (frozen)."""
        if self.feature_grad_mult > 0:
            x = self.feature_extractor(source)  # (B, T, C)
            if self.feature_grad_mult != 1.0 and x.requires_grad:
                x = GradMultiply.apply(x, self.feature_grad_mult)
            return x
        with torch.no_grad():  # frozen conv encoder (fine-tuning): no activations kept for backward
            return self.feature_extractor(source)

    def extract_features(self, source: Tensor,
                         padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        """source (B, S), padding_mask (B, S) True = padding -> (features (B, T, D), frame padding (B, T) | None).

        The features are taken after LayerNorm and projection, before dropout_input and
        masking: exactly what the EMA teacher sees.
        """
        x = self.feature_proj(self.feature_norm(self.conv_features(source)))  # (B, T, D)
        return x, self.frame_padding_mask(padding_mask, x.shape[1])

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, time_mask: Optional[Tensor] = None,
                channel_mask: Optional[Tensor] = None, return_layer_results: bool = False) -> dict:
        """Run the student.

        source (B, S) waveform; padding_mask (B, S) True = padding; time_mask (B, T) True = frame
        replaced by `mask_emb`; channel_mask (B, D) True = channel zeroed in every frame.
        Returns dict(x (B, T, D), padding_mask (B, T) | None, features (B, T, D) unmasked,
        conv_features (B, T, C) the conv encoder's output (for the collapse monitors),
        layer_results [FFN output (B, T, D) per layer that ran] | None).
        """
        conv = self.conv_features(source)
        features = self.feature_proj(self.feature_norm(conv))  # (B, T, D)
        frame_pad = self.frame_padding_mask(padding_mask, features.shape[1])
        x = self.dropout_input(features)
        if time_mask is not None:
            x = torch.where(time_mask.unsqueeze(-1), self.mask_emb.to(x.dtype), x)  # (B, T, D)
        if channel_mask is not None:
            x = x.masked_fill(channel_mask.unsqueeze(1), 0.0)
        x, layer_results = self.transformer(x, frame_pad, return_layer_results=return_layer_results)
        return {"x": x, "padding_mask": frame_pad, "features": features, "conv_features": conv,
                "layer_results": layer_results}


# --------------------------------------------------------------------------- 5. heads


class Data2VecForPretraining(nn.Module):
    """Student + `final_proj`, the Linear(D, D) that regresses the teacher's targets at masked frames."""

    def __init__(self, backbone: Data2VecAudio):
        super().__init__()
        self.backbone = backbone
        self.final_proj = nn.Linear(backbone.embed_dim, backbone.embed_dim)

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, time_mask: Optional[Tensor] = None,
                return_layer_results: bool = False) -> dict:
        """The backbone's dict plus `pred`: final_proj at the masked frames, (N_masked, D) in
        `x[time_mask]` order (fairseq projects only those), or at every frame (B, T, D) without a mask."""
        out = self.backbone(source, padding_mask, time_mask=time_mask, return_layer_results=return_layer_results)
        x = out["x"]
        out["pred"] = self.final_proj(x[time_mask] if time_mask is not None else x)
        return out


class Data2VecForCTC(nn.Module):
    """Student + dropout + Linear(D, V) letter head for CTC (fairseq `wav2vec_ctc`).

    `blank` is the CTC blank's index in the vocabulary, the output padded frames are forced to
    (d2vcli.vocab.BLANK, fairseq's <s> = 0). It is an argument, not an import, so that the model
    files depend on torch alone; it is not stored in the state dict.
    """

    def __init__(self, backbone: Data2VecAudio, vocab_size: int, final_dropout: float = 0.0, blank: int = 0):
        super().__init__()
        self.backbone = backbone
        self.blank = blank
        self.final_dropout = nn.Dropout(final_dropout)
        self.proj = nn.Linear(backbone.embed_dim, vocab_size)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, time_mask: Optional[Tensor] = None,
                channel_mask: Optional[Tensor] = None) -> dict:
        """-> dict(logits (B, T, V), padding_mask (B, T) | None).

        Padded frames get logits [0, -inf, ..., -inf] (fairseq `get_logits`): they decode as
        blank whatever the network says. -inf is safe here: log_softmax of such a row is
        [0, -inf, ...] with no NaN, and CTC never reads frames past an utterance's length.
        """
        out = self.backbone(source, padding_mask, time_mask=time_mask, channel_mask=channel_mask)
        logits = self.proj(self.final_dropout(out["x"]))  # (B, T, V)
        frame_pad = out["padding_mask"]
        if frame_pad is not None:
            blank_row = torch.full((logits.shape[-1],), float("-inf"), dtype=logits.dtype, device=logits.device)
            blank_row[self.blank] = 0.0
            logits = torch.where(frame_pad.unsqueeze(-1), blank_row, logits)
        return {"logits": logits, "padding_mask": frame_pad}


# --------------------------------------------------------------------------- builders


def build_backbone(model_cfg) -> Data2VecAudio:
    """A `config.ModelConfig` (or anything with its fields) -> Data2VecAudio."""
    c = model_cfg
    return Data2VecAudio(
        conv_layers=c.conv_layers, embed_dim=c.embed_dim, num_layers=c.num_layers, num_heads=c.num_heads,
        ffn_dim=c.ffn_dim, dropout=c.dropout, attention_dropout=c.attention_dropout,
        activation_dropout=c.activation_dropout, dropout_input=c.dropout_input, layerdrop=c.layerdrop,
        pos_conv_depth=c.pos_conv_depth, pos_conv_kernel=c.pos_conv_kernel, pos_conv_groups=c.pos_conv_groups,
        feature_grad_mult=c.feature_grad_mult, layer_norm_eps=c.layer_norm_eps,
        init_std=c.init_std,
    )


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (base Data2VecForPretraining: 93,754,880, as fairseq's checkpoint)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

