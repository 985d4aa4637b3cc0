"""The data2vec 2.0 audio model: encode only the visible frames, decode the masked ones with a conv decoder.

Efficient Self-supervised Learning with Contextualized Target Representations for Vision, Speech
and Language (Baevski et al., 2022, arXiv 2212.07525), §3; reference implementation fairseq
`examples/data2vec/models/data2vec2.py` with `modalities/{base,audio,modules}.py` (snapshot
3d262bb, `data2vec_multi`). docs/recipe2.md lists the recipe and every deliberate difference.

The conv front end (feature extractor, its LayerNorm and projection), the positional conv and
the post-LN layers are data2vec 1.0's (`models/audio.py`, `models/encoder.py`). What 2.0 adds,
in the order of the data flow (A = utterances, M = clones, T = frames, T_k = kept frames):

    waveform (A, S)
      -> feature_extractor, feature_norm, feature_proj     (A, T, D), once per utterance: the teacher's input
      -> repeat_interleave(M)                               (A*M, T, D), one mask per clone
      -> ContextEncoder (the part the EMA teacher averages)
           gather the kept frames' content                  (A*M, T_k, D)
           + PositionalConv(masked frames zeroed), gathered
           LayerNorm -> dropout -> prenet layers -> layers, with symmetric ALiBi on the ORIGINAL positions
      -> ConvDecoder: kept frames back in place, N(0, 0.01) noise at masked ones, grouped convs, Linear -> D
      -> pred = decoder output at the masked frames          (N_masked, D)

For fine-tuning and inference (`Data2VecForCTC` wraps the same backbone) nothing is removed: the
full sequence runs through the ContextEncoder with ALiBi over all frames; fine-tuning masks fill
frames with N(0, 0.01) noise (fairseq's `encoder_zero_mask=False` at fine-tuning), not a learned vector.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2vcli.models.audio import Data2VecAudio, FeatureExtractor, PositionalConv, PosConvBlock
from d2vcli.models.encoder import LayerStack

MASK_NOISE_STD = 0.01  # fairseq mask_noise_std: the decoder's mask tokens and fine-tuning's masked frames


# --------------------------------------------------------------------------- 0. which frames are kept


def kept_indices(time_mask: Tensor) -> Tensor:
    """(N, T) bool, True = masked, the same count in every row -> (N, T_k) kept positions, ascending.

    fairseq takes `mask.argsort(1)[:, :T - mask[0].sum()]` (unstable, row 0's count for all rows);
    the order of the kept frames inside a row does not change the result (attention is permutation
    equivariant and the ALiBi bias is gathered along), so a stable sort keeps them in time order.
    """
    counts = time_mask.sum(1)
    if bool((counts != counts[0]).any()):
        raise ValueError("every row of a data2vec 2.0 mask must mask the same number of frames")
    keep = time_mask.shape[1] - int(counts[0])
    return torch.argsort(time_mask.to(torch.uint8), dim=1, stable=True)[:, :keep]


def restore_masked(x: Tensor, time_mask: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """x (N, T_k, D) at the kept positions (in order), time_mask (N, T) -> (N, T, D) with N(0, 0.01) at the masked.

    The decoders' input (fairseq `decoder_input`: mask tokens are noise, not a learned vector, and
    carry no position); the image decoder (models/vision2.py) uses it too.
    """
    N, T = time_mask.shape
    noise = torch.randn((N, T, x.shape[-1]), generator=generator, device=x.device, dtype=x.dtype)
    return (noise * MASK_NOISE_STD).masked_scatter(~time_mask.unsqueeze(-1), x)


# --------------------------------------------------------------------------- 1. ALiBi


def alibi_slopes(num_heads: int) -> list[float]:
    """The ALiBi head slopes (Press et al., 2022; fairseq `get_slopes`): 12 heads -> 2^-1..2^-8, 2^-0.5..2^-3.5."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_2(closest) + power_of_2(2 * closest)[0::2][: num_heads - closest]


def alibi_bias(positions: Tensor, slopes: Tensor, scale: Tensor) -> Tensor:
    """positions (N, L) original frame indices -> (N, H, L, L) fp32 bias slope_h * -|i - j| * max(scale_h, 0).

    fairseq builds this at the full length T and gathers rows and columns of the kept frames;
    computing it from the kept frames' original positions gives the same numbers (the
    distances are small integers, exact in fp32) without the (T, T) intermediate.
    """
    p = positions.float()
    distance = (p[:, :, None] - p[:, None, :]).abs()  # (N, L, L)
    bias = -distance[:, None] * slopes.float()[None, :, None, None]  # (N, H, L, L)
    return bias * scale.float().clamp_min(0)[None, :, None, None]


# --------------------------------------------------------------------------- 2. the context encoder


class ContextEncoder(nn.Module):
    """Positional conv + ALiBi + input LayerNorm + prenet and main post-LN layers: what the EMA teacher averages.

    Args: embed_dim, num_heads, ffn_dim; num_layers (main blocks, the target layers) and
    prenet_depth (extra blocks before them, never targets; 0 for base); dropout (attention output,
    FFN output and after the input LayerNorm: fairseq's encoder_dropout, post_mlp_drop and
    prenet_dropout, all 0.1 in the recipe and overridden together at fine-tuning); layerdrop (main
    and prenet blocks alike, as fine-tuning's override sets them); dropout_input (before the main
    blocks); the positional conv's depth, kernel and groups.
    """

    def __init__(self, embed_dim: int, num_layers: int, num_heads: int, ffn_dim: int, dropout: float,
                 attention_dropout: float, activation_dropout: float, dropout_input: float, layerdrop: float,
                 prenet_depth: int, pos_conv_depth: int, pos_conv_kernel: int, pos_conv_groups: int,
                 layer_norm_eps: float, init_std: float = 0.02):
        super().__init__()
        self.pos_conv = PositionalConv(embed_dim, pos_conv_depth, pos_conv_kernel, pos_conv_groups)
        self.register_buffer("alibi_slopes", torch.tensor(alibi_slopes(num_heads)), persistent=False)
        self.alibi_scale = nn.Parameter(torch.ones(num_heads))  # learned per head, shared by all layers
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps)  # post-LN model: the input LayerNorm
        self.dropout = nn.Dropout(dropout)
        self.prenet = LayerStack(prenet_depth, embed_dim, num_heads, ffn_dim, dropout, attention_dropout,
                                 activation_dropout, layer_norm_eps, layerdrop, init_std)
        self.dropout_input = nn.Dropout(dropout_input)
        self.layers = LayerStack(num_layers, embed_dim, num_heads, ffn_dim, dropout, attention_dropout,
                                 activation_dropout, layer_norm_eps, layerdrop, init_std)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, time_mask: Optional[Tensor] = None,
                return_layer_results: bool = False) -> tuple[Tensor, Optional[list[Tensor]]]:
        """x (N, T, D) features, padding_mask (N, T) True = padding, time_mask (N, T) True = removed.

        -> (x (N, T_k, D) at the kept frames in time order (all frames without a mask),
            [FFN output (N, T_k, D) of each main layer that ran] or None).
        """
        N, T, D = x.shape
        if padding_mask is not None:
            x = x.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        if time_mask is None:
            x = x + self.pos_conv(x)
            positions = torch.arange(T, device=x.device).expand(N, T)
        else:
            positions = kept_indices(time_mask)  # (N, T_k)
            index = positions.unsqueeze(-1).expand(-1, -1, D)
            content = x.gather(1, index)  # the kept frames' content, taken before the zeroing
            pos = self.pos_conv(x.masked_fill(time_mask.unsqueeze(-1), 0.0))  # on the full, zero-masked sequence
            x = content + pos.gather(1, index)  # (N, T_k, D)
            if padding_mask is not None:
                padding_mask = padding_mask.gather(1, positions)
        bias = alibi_bias(positions, self.alibi_slopes, self.alibi_scale)  # (N, H, T_k, T_k) fp32
        x = self.dropout(self.norm(x))
        x, _ = self.prenet(x, padding_mask, attn_bias=bias)
        x = self.dropout_input(x)
        return self.layers(x, padding_mask, return_layer_results=return_layer_results, attn_bias=bias)


# --------------------------------------------------------------------------- 3. the backbone


class Data2Vec2Audio(nn.Module):
    """The data2vec 2.0 audio encoder (student): waveform -> contextualized frames (B, T, D).

    The same constructor arguments as `Data2VecAudio` plus `prenet_depth`; the conv front end,
    its frame arithmetic and `feature_grad_mult` are 1.0's. There is no mask embedding.
    """

    def __init__(self, conv_layers: Sequence[Sequence[int]], embed_dim: int = 768, num_layers: int = 12,
                 num_heads: int = 12, ffn_dim: int = 3072, dropout: float = 0.1, attention_dropout: float = 0.1,
                 activation_dropout: float = 0.0, dropout_input: float = 0.0, layerdrop: float = 0.05,
                 pos_conv_depth: int = 5, pos_conv_kernel: int = 19, pos_conv_groups: int = 16,
                 feature_grad_mult: float = 1.0, layer_norm_eps: float = 1e-5, init_std: float = 0.02,
                 prenet_depth: int = 0):
        super().__init__()
        self.conv_layers = tuple(tuple(int(v) for v in layer) for layer in conv_layers)
        self.embed_dim = embed_dim
        self.feature_grad_mult = feature_grad_mult
        channels = self.conv_layers[-1][0]
        self.feature_extractor = FeatureExtractor(self.conv_layers)
        self.feature_norm = nn.LayerNorm(channels, eps=layer_norm_eps)
        self.feature_proj = nn.Linear(channels, embed_dim)  # PyTorch default init, as fairseq's reset_parameters
        self.encoder = ContextEncoder(embed_dim, num_layers, num_heads, ffn_dim, dropout, attention_dropout,
                                      activation_dropout, dropout_input, layerdrop, prenet_depth, pos_conv_depth,
                                      pos_conv_kernel, pos_conv_groups, layer_norm_eps, init_std)

    @property
    def transformer(self) -> ContextEncoder:
        """1.0's name for the part with `.norm` and `.layers` (what `d2vcli.load(...).embed` hooks into)."""
        return self.encoder

    # The conv front end is 1.0's to the letter: the same functions, not copies.
    num_frames = Data2VecAudio.num_frames
    frame_padding_mask = Data2VecAudio.frame_padding_mask
    conv_features = Data2VecAudio.conv_features
    extract_features = Data2VecAudio.extract_features

    def forward(self, source: Tensor, padding_mask: Optional[Tensor] = None, time_mask: Optional[Tensor] = None,
                channel_mask: Optional[Tensor] = None, return_layer_results: bool = False) -> dict:
        """The full sequence (fine-tuning, inference): the same inputs and outputs as `Data2VecAudio.forward`.

        time_mask (B, T) True = frame replaced by N(0, 0.01) noise; channel_mask (B, D) True = zeroed.
        """
        conv = self.conv_features(source)
        features = self.feature_proj(self.feature_norm(conv))  # (B, T, D)
        frame_pad = self.frame_padding_mask(padding_mask, features.shape[1])
        x = features
        if time_mask is not None:
            noise = torch.randn_like(x) * MASK_NOISE_STD
            x = torch.where(time_mask.unsqueeze(-1), noise, x)
        if channel_mask is not None:
            x = x.masked_fill(channel_mask.unsqueeze(1), 0.0)
        x, layer_results = self.encoder(x, frame_pad, return_layer_results=return_layer_results)
        return {"x": x, "padding_mask": frame_pad, "features": features, "conv_features": conv,
                "layer_results": layer_results}


# --------------------------------------------------------------------------- 4. the decoder


class ConvDecoder(nn.Module):
    """Kept frames back in place, noise at the masked ones, `layers` grouped conv blocks, a projection to D.

    Each block is Conv1d(k, groups) -> LayerNorm (no affine) -> GELU (1.0's positional conv block),
    with a residual when its input and output widths match and `residual` is on: the first block
    narrows D to `dim` and has none (fairseq `Decoder1d`, base audio: 4 blocks of 384 channels,
    kernel 7, 16 groups). `projection_layers` 1 is one Linear(dim -> D) (audio); 2 is
    Linear(dim -> ratio x dim) -> GELU -> Linear(-> D) (fairseq `projection_layers`, `projection_ratio`:
    data2vec 2.0 text, whose 5 blocks of 768 channels, kernel 9, 1 group have no residual at all).
    """

    def __init__(self, embed_dim: int, dim: int, layers: int, kernel: int, groups: int, input_dropout: float,
                 residual: bool = True, projection_layers: int = 1, projection_ratio: float = 2.0):
        super().__init__()
        self.input_dropout = input_dropout
        self.residual = residual
        self.blocks = nn.ModuleList(PosConvBlock(embed_dim if i == 0 else dim, kernel, groups, out_dim=dim)
                                    for i in range(layers))
        if projection_layers == 1:
            self.proj = nn.Linear(dim, embed_dim)
        else:  # an nn.Sequential: keys proj.0, proj.2 ... like fairseq's
            hidden, widths = int(dim * projection_ratio), []
            for i in range(projection_layers - 1):
                widths += [nn.Linear(dim if i == 0 else hidden, hidden), nn.GELU()]
            self.proj = nn.Sequential(*widths, nn.Linear(hidden, embed_dim))

    def forward(self, x: Tensor, time_mask: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """x (N, T_k, D) encoder output at the kept frames (time order), time_mask (N, T) -> (N, T, D).

        `generator` draws the mask tokens (the pretraining task keys it by the batch, so resumed and
        distributed runs draw the same noise); None uses torch's global RNG.
        """
        full = restore_masked(F.dropout(x, self.input_dropout, self.training), time_mask, generator)  # (N, T, D)
        h = full.transpose(1, 2).unsqueeze(2)  # (N, D, 1, T): the blocks' channels-last layout
        residual = h
        for block in self.blocks:
            h = block(h)
            if self.residual and residual.shape[1] == h.shape[1]:
                h = h + residual
            residual = h
        return self.proj(h[:, :, 0, :].transpose(1, 2))  # (N, T, D)


# --------------------------------------------------------------------------- 5. the pretraining model


class Data2Vec2ForPretraining(nn.Module):
    """Student (`backbone`) + `decoder`: M masked clones per utterance, only kept frames encoded."""

    def __init__(self, backbone: Data2Vec2Audio, decoder: ConvDecoder):
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, source: Tensor, padding_mask: Optional[Tensor], time_mask: Tensor,
                generator: Optional[torch.Generator] = None) -> dict:
        """source (A, S); time_mask (A*M, T) True = masked, sample-major (utterance 0's M clones first).

        -> dict(pred (N_masked, D) in `time_mask` order, features (A, T, D) unmasked (the teacher's
        input), conv_features (A, T, C), padding_mask (A, T) | None, kept (A*M, T_k) positions).
        """
        conv = self.backbone.conv_features(source)
        features = self.backbone.feature_proj(self.backbone.feature_norm(conv))  # (A, T, D), once per utterance
        frame_pad = self.backbone.frame_padding_mask(padding_mask, features.shape[1])
        clones = time_mask.shape[0] // features.shape[0]
        if clones * features.shape[0] != time_mask.shape[0]:
            raise ValueError(f"time_mask has {time_mask.shape[0]} rows, not a multiple of {features.shape[0]}")
        x = features.repeat_interleave(clones, 0)  # (A*M, T, D)
        pad = frame_pad.repeat_interleave(clones, 0) if frame_pad is not None else None
        x, _ = self.backbone.encoder(x, pad, time_mask=time_mask)  # (A*M, T_k, D)
        decoded = self.decoder(x, time_mask, generator)  # (A*M, T, D)
        return {"pred": decoded[time_mask], "features": features, "conv_features": conv, "padding_mask": frame_pad,
                "clones": clones}


# --------------------------------------------------------------------------- builders


def build_backbone2(model_cfg) -> Data2Vec2Audio:
    """A `config.ModelConfig` with version 2 (or anything with its fields) -> Data2Vec2Audio."""
    c = model_cfg
    return Data2Vec2Audio(
        conv_layers=c.conv_layers, embed_dim=c.embed_dim, num_layers=c.num_layers, num_heads=c.num_heads,
        ffn_dim=c.ffn_dim, dropout=c.dropout, attention_dropout=c.attention_dropout,
        activation_dropout=c.activation_dropout, dropout_input=c.dropout_input, layerdrop=c.layerdrop,
        pos_conv_depth=c.pos_conv_depth, pos_conv_kernel=c.pos_conv_kernel, pos_conv_groups=c.pos_conv_groups,
        feature_grad_mult=c.feature_grad_mult, layer_norm_eps=c.layer_norm_eps, init_std=c.init_std,
        prenet_depth=c.prenet_depth,
    )


def build_decoder2(model_cfg) -> ConvDecoder:
    c = model_cfg
    return ConvDecoder(c.embed_dim, c.decoder_dim, c.decoder_layers, c.decoder_kernel, c.decoder_groups,
                       c.decoder_dropout)
