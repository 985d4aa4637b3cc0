"""The image front end and the BEiT-style ViT that data2vec 1.0 vision trains (docs/images.md).

data2vec paper (arXiv 2202.03555) §4.1 "Computer vision": a ViT whose input is 16x16 patches,
trained with BEiT's block masking. The recipe is the BEiT codebase in
`facebookresearch/data2vec_vision/beit` (`modeling_cyclical.py`, `modeling_finetune.py`),
read top to bottom:

    PatchEmbed             Conv2d(C, D, P, stride P): (B, C, H, W) -> (B, N, D), N = (H/P)(W/P)
    RelativePositionBias   one learned (num_rel, heads) table shared by every block; no absolute positions
    Attention              qkv without a bias, separate q_bias and v_bias (k has none), bias added to the logits
    Block                  pre-LN with layer scale: x + DropPath(g1 * Attn(LN1 x)), then the same with the MLP
    VisionTransformer      patches -> mask token where masked -> [CLS; patches] -> blocks (end-of-block outputs)
    Data2VecVisionForPretraining   + final LayerNorm + `lm_head` regression head
    Data2VecVisionForImageClassification   + mean of the patch tokens -> `fc_norm` -> `head`

The layers are not `models/encoder.py`'s: that transformer is post-LN with a k bias and no
position bias (data2vec audio); BEiT's is pre-LN with layer scale and a relative position bias
added to every attention. Parameter names follow the BEiT repo, so its checkpoints load by name
and the Hugging Face `Data2VecVision*` map is one table (`d2vcli/interop_vision.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from d2vcli.models.encoder import DropPath  # shared with the data2vec 2.0 layers

# ImageNet statistics: the BEiT repo normalizes pretraining inputs with these
# (`--imagenet_default_mean_and_std`); its fine-tuning commands use (0.5, 0.5, 0.5) for both.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class VisionConfig:
    """A ViT's architecture; the defaults are `beit_base_patch16_224` as data2vec 1.0 pretrains it."""

    image_size: int = 224
    """Input height and width in pixels (square images; 224 in the paper)."""
    patch_size: int = 16
    """Side of one square patch in pixels: 224/16 gives a 14x14 grid of 196 patches."""
    in_channels: int = 3
    """Colour channels of the input (RGB)."""
    embed_dim: int = 768
    """Width D of the transformer (ViT-B 768, ViT-L 1024)."""
    num_layers: int = 12
    """Transformer blocks (ViT-B 12, ViT-L 24)."""
    num_heads: int = 12
    """Attention heads (ViT-B 12, ViT-L 16)."""
    ffn_dim: int = 3072
    """Hidden width of each block's MLP (4 x D)."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon (BEiT 1e-6; Hugging Face's default 1e-12 differs)."""
    layer_scale_init: float = 1e-4
    """Initial value of the per-channel layer scale gamma_1/gamma_2 (base 1e-4, large 1e-5; 0 disables it)."""
    rel_pos_bias: Literal["shared", "per-layer"] = "shared"
    """Relative position bias: one table for all blocks (the data2vec recipe) or one per block (BEiT fine-tuning)."""
    drop_path: float = 0.25
    """Stochastic depth rate of the last block, rising linearly from 0 (pretraining base 0.25, large 0.2)."""
    attention_dropout: float = 0.05
    """Dropout on the attention probabilities (pretraining base 0.05, large 0.15)."""
    dropout: float = 0.0
    """Dropout after the attention projection and the MLP (0 in the recipe)."""
    init_std: float = 0.02
    """Std of the truncated-normal init of Linear, Conv, CLS and mask token."""
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted from [0, 1] pixels before the model (ImageNet statistics)."""
    image_std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel std the pixels are divided by after the mean (ImageNet statistics)."""
    version: int = 1
    """data2vec version: 1 (this file's BEiT ViT) or 2 (models/vision2.py: post-LN blocks, fixed sin-cos
    positions, only visible patches encoded, conv decoder; layer_scale_init and rel_pos_bias unused)."""
    prenet_depth: int = 0
    """data2vec 2.0: blocks before the `num_layers` main ones, never targets (ViT-B 2, ViT-L 0)."""
    decoder_dim: int = 768
    """data2vec 2.0 pretraining: channels of the 2-D conv decoder (ViT-B 768, ViT-L 1024)."""
    decoder_layers: int = 6
    """data2vec 2.0 pretraining: conv decoder blocks (ViT-B 6, ViT-L 3)."""
    decoder_kernel: int = 3
    """data2vec 2.0 pretraining: kernel of each decoder conv, odd (ViT-B 3, ViT-L 5)."""
    decoder_groups: int = 16
    """data2vec 2.0 pretraining: groups of each decoder conv."""

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of patches."""
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.rel_pos_bias not in ("shared", "per-layer"):
            raise ValueError(f"rel_pos_bias must be 'shared' or 'per-layer', got {self.rel_pos_bias!r}")
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {self.version!r}")
        if self.version == 2:
            if self.embed_dim % 4:
                raise ValueError(f"embed_dim {self.embed_dim} must be a multiple of 4 (the 2-D sin-cos positions)")
            if self.embed_dim % self.decoder_groups or self.decoder_dim % self.decoder_groups:
                raise ValueError(f"embed_dim {self.embed_dim} and decoder_dim {self.decoder_dim} must be divisible "
                                 f"by decoder_groups {self.decoder_groups}")
            if self.decoder_layers < 1 or self.decoder_kernel % 2 == 0:
                raise ValueError("decoder_layers must be at least 1 and decoder_kernel odd")


def vision_base() -> VisionConfig:
    """ViT-B/16 as data2vec 1.0 pretrains it (BEiT `beit_base_patch16_224`, README command)."""
    return VisionConfig()


def vision_large() -> VisionConfig:
    """ViT-L/16: base with D 1024, 24 blocks, 16 heads, layer scale 1e-5, drop path 0.2, attention dropout 0.15."""
    return VisionConfig(embed_dim=1024, num_layers=24, num_heads=16, ffn_dim=4096, layer_scale_init=1e-5,
                        drop_path=0.2, attention_dropout=0.15)


def vision_tiny() -> VisionConfig:
    """A CPU-sized ViT for tests and the demo: 32x32 images of 4x4 patches (an 8x8 grid), 4 blocks of width 64."""
    return VisionConfig(image_size=32, patch_size=4, embed_dim=64, num_layers=4, num_heads=4, ffn_dim=256,
                        layer_scale_init=0.1, drop_path=0.0, attention_dropout=0.0)


ARCHITECTURES = {"vision-base": vision_base, "vision-large": vision_large, "vision-tiny": vision_tiny}


# --------------------------------------------------------------------------- the front end


class PatchEmbed(nn.Module):
    """Non-overlapping P x P patches, each linearly projected to D (a strided convolution)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:  # (B, C, H, W)
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, N, D), patches in row-major order


# --------------------------------------------------------------------------- positions and attention


def relative_position_index(rows: int, cols: int) -> Tensor:
    """(N+1, N+1) indices into the bias table for [CLS; patches] (BEiT's layout).

    Patch pairs index their offset (dr, dc) as (dr + rows - 1) * (2 cols - 1) + (dc + cols - 1); the
    last three rows of the table are CLS->patch, patch->CLS and CLS->CLS.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")).flatten(1)  # (2, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    num_rel = (2 * rows - 1) * (2 * cols - 1) + 3
    index = torch.zeros(rows * cols + 1, rows * cols + 1, dtype=torch.long)
    index[1:, 1:] = (rel[..., 0] + rows - 1) * (2 * cols - 1) + (rel[..., 1] + cols - 1)
    index[0, :] = num_rel - 3
    index[:, 0] = num_rel - 2
    index[0, 0] = num_rel - 1
    return index


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative offset, added to the attention logits (zero at init)."""

    def __init__(self, grid: tuple[int, int], num_heads: int):
        super().__init__()
        rows, cols = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * rows - 1) * (2 * cols - 1) + 3, num_heads))
        # Recomputed from the grid, so not saved: foreign checkpoints' copies are dropped on import.
        self.register_buffer("relative_position_index", relative_position_index(rows, cols), persistent=False)

    def forward(self) -> Tensor:
        T = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(T, T, -1)
        return bias.permute(2, 0, 1).contiguous()  # (H, T, T)


class Attention(nn.Module):
    """Multi-head attention with BEiT's biases: one qkv Linear without bias, learned q and v biases and
    a fixed zero k bias; scaling head_dim^-0.5; an additive position bias (H, T, T)."""

    def __init__(self, dim: int, num_heads: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, position_bias: Tensor) -> Tensor:  # (B, T, D), (H, T, T)
        B, T, D = x.shape
        H = self.num_heads
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D/H)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=position_bias.unsqueeze(0).to(x.dtype),
                                           dropout_p=self.attention_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))  # (B, T, D)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 -> dropout (no dropout after the activation, as in BEiT)."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-LN block with layer scale: x = x + DropPath(g1 * Attn(LN1 x)); x = x + DropPath(g2 * Mlp(LN2 x))."""

    def __init__(self, cfg: VisionConfig, drop_path: float):
        super().__init__()
        D = cfg.embed_dim
        self.norm1 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.attn = Attention(D, cfg.num_heads, cfg.attention_dropout, cfg.dropout)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(D, cfg.ffn_dim, cfg.dropout)
        self.rel_pos_bias = RelativePositionBias(cfg.grid, cfg.num_heads) if cfg.rel_pos_bias == "per-layer" else None
        if cfg.layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((D,), cfg.layer_scale_init))
            self.gamma_2 = nn.Parameter(torch.full((D,), cfg.layer_scale_init))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: Tensor, position_bias: Optional[Tensor]) -> Tensor:  # (B, T, D)
        if self.rel_pos_bias is not None:
            position_bias = self.rel_pos_bias()
        a = self.attn(self.norm1(x), position_bias)
        x = x + self.drop_path(a if self.gamma_1 is None else self.gamma_1 * a)
        f = self.mlp(self.norm2(x))
        return x + self.drop_path(f if self.gamma_2 is None else self.gamma_2 * f)  # (B, T, D): end-of-block


# --------------------------------------------------------------------------- the encoder


class VisionTransformer(nn.Module):
    """Patches, a learned mask token, a CLS token and the blocks; no final norm (the heads own theirs).

    `checkpointing` (train.activation_checkpointing) recomputes each block in the backward pass
    instead of keeping its activations; non-reentrant checkpointing replays the drop-path draws.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.rel_pos_bias = RelativePositionBias(cfg.grid, cfg.num_heads) if cfg.rel_pos_bias == "shared" else None
        # Plain floats, not torch.linspace: the model is also built on the meta device (loading.expected_state).
        L = cfg.num_layers
        rates = [cfg.drop_path * i / (L - 1) for i in range(L)] if L > 1 else [cfg.drop_path]
        self.blocks = nn.ModuleList(Block(cfg, p) for p in rates)
        self.checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BEiT's init: truncated normal for Linear, Conv, CLS and mask token, then each block's
        attn.proj and mlp.fc2 weights divided by sqrt(2 * layer) (`fix_init_weight`)."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=std)
        nn.init.trunc_normal_(self.mask_token, std=std)
        with torch.no_grad():
            for layer, block in enumerate(self.blocks, 1):
                block.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    def forward(self, images: Tensor, mask: Optional[Tensor] = None,
                return_layer_results: bool = False) -> tuple[Tensor, Optional[list[Tensor]]]:
        """images (B, C, H, W) normalized; mask (B, N) True = masked patch ->
        (x (B, 1+N, D) after the last block, [each block's output (B, 1+N, D)] or None)."""
        x = self.patch_embed(images)  # (B, N, D)
        B, N, _ = x.shape
        if mask is not None:
            w = mask.unsqueeze(-1).type_as(x)  # (B, N, 1)
            x = x * (1 - w) + self.mask_token.expand(B, N, -1).to(x.dtype) * w
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # (B, 1+N, D)
        position_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None  # (H, 1+N, 1+N)
        layer_results = [] if return_layer_results else None
        for block in self.blocks:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, position_bias, use_reentrant=False)
            else:
                x = block(x, position_bias)
            if layer_results is not None:
                layer_results.append(x)  # v1 vision targets are end-of-block outputs
        return x, layer_results


# --------------------------------------------------------------------------- heads


class Data2VecVisionForPretraining(nn.Module):
    """The student: encoder, final LayerNorm, and `lm_head` (D -> D) regressing the teacher's targets."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.encoder = VisionTransformer(cfg)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        nn.init.trunc_normal_(self.lm_head.weight, std=cfg.init_std)
        nn.init.zeros_(self.lm_head.bias)

    def forward(self, images: Tensor, mask: Optional[Tensor] = None, return_layer_results: bool = False):
        """-> predictions (B, N, D) for every patch; the loss keeps the masked ones. With
        `return_layer_results` (the EMA teacher's call): the encoder's (x, [block outputs]), no heads."""
        x, layer_results = self.encoder(images, mask, return_layer_results=return_layer_results)
        if return_layer_results:
            return x, layer_results
        return self.lm_head(self.norm(x)[:, 1:])  # CLS dropped


class Data2VecVisionForImageClassification(nn.Module):
    """The fine-tuning model: mean of the patch tokens (CLS excluded) -> `fc_norm` -> `head` (BEiT
    `use_mean_pooling`); the head starts at truncated normal x `head_init_scale` (0.001 in the recipe)."""

    def __init__(self, cfg: VisionConfig, num_classes: int, head_init_scale: float = 0.001):
        super().__init__()
        self.encoder = VisionTransformer(cfg)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=cfg.init_std)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)

    def features(self, images: Tensor) -> Tensor:
        x, _ = self.encoder(images)
        return self.fc_norm(x[:, 1:].mean(1))  # (B, D)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))  # (B, num_classes) logits
