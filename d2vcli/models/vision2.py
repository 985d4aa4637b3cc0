"""The data2vec 2.0 image model: encode only the visible patches of each masked clone, decode the rest.

Efficient Self-supervised Learning with Contextualized Target Representations for Vision, Speech
and Language (Baevski et al., 2022, arXiv 2212.07525), §3; reference implementation fairseq
`examples/data2vec/models/data2vec2.py` with `modalities/{base,images,modules}.py` (snapshot
3d262bb, `data2vec_multi`, modality IMAGE). docs/images.md ("data2vec 2.0") lists the recipe and
every deliberate difference.

The blocks are data2vec 2.0 audio's post-LN layers (`models/encoder.py`'s LayerStack, the FFN
output returned as the target), the patch embedding is 1.0 vision's (`models/vision.py`), and the
decoder input is audio's (`models/audio2.py`: kept positions in place, N(0, 0.01) noise at the
masked ones). In the order of the data flow (A = images, M = clones, P = patches, P_k = visible):

    images (A, C, H, W)
      -> PatchEmbed + fixed 2-D sin-cos positions          (A, P, D), once per image: the teacher's input
      -> repeat_interleave(M), keep each clone's visible     (A*M, P_k, D)
      -> [CLS; patches] (CLS has no position)                (A*M, 1+P_k, D)
      -> LayerNorm -> dropout -> prenet blocks -> main blocks (post-LN, no final norm)
      -> ConvDecoder2d: CLS dropped, visible patches back on the grid, noise elsewhere,
         grouped Conv2d -> LayerNorm over channels (no affine) -> GELU, residual, Linear -> D
      -> pred = decoder output at the masked patches         (N_masked, D); cls = x[:, 0] (A*M, D)

Fine-tuning (`Data2Vec2VisionForImageClassification`) runs the same encoder on all patches,
without a mask and without the decoder, and classifies the mean of the patch tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from d2vcli.models.audio import CONV_LN_EPS
from d2vcli.models.audio2 import kept_indices, restore_masked
from d2vcli.models.encoder import LayerStack
from d2vcli.models.vision import PatchEmbed, VisionConfig


# --------------------------------------------------------------------------- 1. fixed positions


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """positions (L,) -> (L, dim): [sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (dim/2)) (MAE's table)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None, :]  # (L, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_positions_2d(dim: int, rows: int, cols: int) -> Tensor:
    """(rows * cols, dim) fp32 table in PatchEmbed's row-major patch order.

    fairseq/MAE `get_2d_sincos_pos_embed` builds its grid with `meshgrid(w, h)`, so the FIRST half
    of the channels encodes the column (w) index and the second half the row index.
    """
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    col_half = sincos_1d(dim // 2, c.reshape(-1))
    row_half = sincos_1d(dim // 2, r.reshape(-1))
    return torch.cat([col_half, row_half], dim=1).float()


def drop_path_rates(rate: float, prenet: int, depth: int) -> tuple[list[float], list[float]]:
    """Stochastic depth per block as fine-tuning spreads it (fairseq `mae_image_classification.py`).

    dpr = linspace(0, rate, depth) over the MAIN blocks; the prenet gets linspace(dpr[0], dpr[prenet-1])
    and the main blocks linspace(dpr[prenet], dpr[-1]) (ViT-B, 0.1: prenet 0 .. 0.011, main 0.022 .. 0.1).
    """
    def linspace(a: float, b: float, n: int) -> list[float]:  # plain floats: the model is built on meta too
        return [a + (b - a) * i / (n - 1) for i in range(n)] if n > 1 else [a] * n

    dpr = linspace(0.0, rate, depth)
    if not dpr:
        return [0.0] * prenet, []
    prenet_rates = linspace(dpr[0], dpr[min(prenet, depth) - 1], prenet) if prenet else []
    return prenet_rates, linspace(dpr[min(prenet, depth - 1)], dpr[-1], depth)


# --------------------------------------------------------------------------- 2. the encoder


class Vision2Encoder(nn.Module):
    """Patch embedding, positions, CLS, input LayerNorm, prenet and main blocks: what the EMA teacher averages.

    The teacher is an EMA of this whole module (fairseq `ema_local_encoder: true`): the patch
    embedding and CLS token are averaged, the fixed position table is recomputed, not learned.
    `drop_path` is spread over the blocks as fine-tuning does (0 in pretraining).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # on the flattened (D, C*P*P) view, as MAE/timm
        # Recomputed from the grid (requires_grad False in fairseq), so not saved.
        self.register_buffer("positions", sincos_positions_2d(D, *cfg.grid)[None], persistent=False)  # (1, P, D)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D))  # N(0, 1): init_extra_token_zero false
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)  # post-LN model: the input LayerNorm
        self.dropout = nn.Dropout(cfg.dropout)
        prenet_rates, main_rates = drop_path_rates(cfg.drop_path, cfg.prenet_depth, cfg.num_layers)
        args = (D, cfg.num_heads, cfg.ffn_dim, cfg.dropout, cfg.attention_dropout, 0.0, cfg.layer_norm_eps, 0.0,
                cfg.init_std)
        self.prenet = LayerStack(cfg.prenet_depth, *args, drop_path=prenet_rates)
        self.layers = LayerStack(cfg.num_layers, *args, drop_path=main_rates)

    def embed(self, images: Tensor) -> Tensor:
        """images (A, C, H, W) -> (A, P, D) patch embeddings with their positions."""
        return self.patch_embed(images) + self.positions.to(images.dtype)

    def forward(self, images: Tensor, mask: Optional[Tensor] = None,
                return_layer_results: bool = False) -> tuple[Tensor, Optional[list[Tensor]]]:
        """images (A, C, H, W); mask (A*M, P) True = masked, sample-major (image 0's M clones first), or None.

        -> (x (A*M, 1+P_k, D) after the last main block, CLS first, visible patches in grid order
            (all P patches and M = 1 without a mask), [FFN output (.., 1+P_k, D) per main block] or None).
        """
        x = self.embed(images)  # (A, P, D), positions added before cloning and masking
        if mask is not None:
            clones = mask.shape[0] // x.shape[0]
            if clones * x.shape[0] != mask.shape[0]:
                raise ValueError(f"mask has {mask.shape[0]} rows, not a multiple of {x.shape[0]} images")
            kept = kept_indices(mask)  # (A*M, P_k)
            x = x.repeat_interleave(clones, 0).gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (N, 1+P_k, D)
        x = self.dropout(self.norm(x))
        x, _ = self.prenet(x)
        return self.layers(x, return_layer_results=return_layer_results)


# --------------------------------------------------------------------------- 3. the decoder


class ConvDecoder2d(nn.Module):
    """CLS dropped, visible patches back on the grid with noise elsewhere, `layers` grouped conv blocks, Linear.

    Each block is Conv2d(k, padding k//2, groups) -> LayerNorm over channels (no affine) -> GELU,
    plus a residual when its input and output widths match: every block in the recipe, whose
    decoder width equals D (fairseq `Decoder2d`; ViT-B: 6 blocks of 768 channels, kernel 3, 16 groups).
    """

    def __init__(self, embed_dim: int, dim: int, layers: int, kernel: int, groups: int, grid: tuple[int, int],
                 input_dropout: float = 0.0):
        super().__init__()
        self.grid = grid
        self.input_dropout = input_dropout
        self.blocks = nn.ModuleList(nn.Conv2d(embed_dim if i == 0 else dim, dim, kernel, padding=kernel // 2,
                                              groups=groups) for i in range(layers))
        self.proj = nn.Linear(dim, embed_dim)  # PyTorch default init, as fairseq's reset_parameters

    def forward(self, x: Tensor, mask: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """x (N, 1+P_k, D) encoder output, mask (N, P) -> (N, P, D) predictions for every patch."""
        full = restore_masked(F.dropout(x[:, 1:], self.input_dropout, self.training), mask, generator)  # (N, P, D)
        N, P, D = full.shape
        h = full.transpose(1, 2).reshape(N, D, *self.grid)  # (N, D, rows, cols)
        residual = h
        for conv in self.blocks:
            h = conv(h)  # (N, dim, rows, cols)
            h = F.layer_norm(h.permute(0, 2, 3, 1), (h.shape[1],), eps=CONV_LN_EPS).permute(0, 3, 1, 2)
            h = F.gelu(h)
            if residual.shape[1] == h.shape[1]:
                h = h + residual
            residual = h
        return self.proj(h.flatten(2).transpose(1, 2))  # (N, P, D)


# --------------------------------------------------------------------------- 4. the models


class Data2Vec2VisionForPretraining(nn.Module):
    """The student: `encoder` on each clone's visible patches, `decoder` predicting the masked ones."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.encoder = Vision2Encoder(cfg)
        self.decoder = ConvDecoder2d(cfg.embed_dim, cfg.decoder_dim, cfg.decoder_layers, cfg.decoder_kernel,
                                     cfg.decoder_groups, cfg.grid)

    def forward(self, images: Tensor, mask: Tensor, generator: Optional[torch.Generator] = None) -> dict:
        """images (A, C, H, W), mask (A*M, P) True = masked, sample-major.

        -> dict(pred (N_masked, D) in `mask` order, cls (A*M, D) the last block's CLS output, clones M).
        """
        x, _ = self.encoder(images, mask)  # (A*M, 1+P_k, D)
        decoded = self.decoder(x, mask, generator)  # (A*M, P, D)
        return {"pred": decoded[mask], "cls": x[:, 0], "clones": mask.shape[0] // images.shape[0]}


class Data2Vec2VisionForImageClassification(nn.Module):
    """Fine-tuning: the encoder on all patches, mean of the patch tokens (CLS excluded) -> `fc_norm` -> `head`.

    fairseq `mae_image_classification.py` (the recipe's pooling; its head is truncated normal 0.02,
    bias 0). The same attribute names as 1.0's classifier, so evaluation and prediction use either.
    """

    def __init__(self, cfg: VisionConfig, num_classes: int, init_std: float = 0.02):
        super().__init__()
        self.encoder = Vision2Encoder(cfg)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=init_std)
        nn.init.zeros_(self.head.bias)

    def features(self, images: Tensor) -> Tensor:
        x, _ = self.encoder(images)  # (B, 1+P, D)
        return self.fc_norm(x[:, 1:].mean(1))  # (B, D)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))  # (B, num_classes) logits


def vision2_base() -> VisionConfig:
    """ViT-B/16 as data2vec 2.0 pretrains it: 2 prenet + 10 main blocks, a 6-block 768-wide decoder, kernel 3."""
    return VisionConfig(version=2, num_layers=10, prenet_depth=2, drop_path=0.0, attention_dropout=0.0,
                        decoder_dim=768, decoder_layers=6, decoder_kernel=3, decoder_groups=16)


def vision2_large() -> VisionConfig:
    """ViT-L/16: D 1024, 24 main blocks, no prenet, a 3-block 1024-wide decoder, kernel 5."""
    return VisionConfig(version=2, embed_dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, prenet_depth=0,
                        drop_path=0.0, attention_dropout=0.0, decoder_dim=1024, decoder_layers=3, decoder_kernel=5,
                        decoder_groups=16)

