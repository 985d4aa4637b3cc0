"""The modality-neutral part of data2vec: a post-LN transformer over (B, T, D) embeddings.

data2vec paper (arXiv 2202.03555) §3.1 "Model architecture": every modality embeds its input
(audio: a conv feature encoder; images: patches; text: tokens) and then runs the same standard
Transformer. This file holds that shared part, top to bottom:

    SelfAttention      multi-head attention, padded keys masked
    TransformerLayer   post-LN: LN(x + MHA(x)) -> LN(h + FFN(h)); also returns the FFN output
    init_bert_params   BERT init of the Linear layers
    LayerStack         the layers in order, with LayerDrop and optional activation checkpointing;
                       collects the per-layer FFN outputs that the EMA teacher's targets average

It imports only torch. Layout and parameter names follow fairseq
`fairseq/models/wav2vec/wav2vec2.py` (`TransformerSentenceEncoderLayer`, `layer_norm_first=False`),
which fixes the state-dict keys (`layers.{i}.self_attn.q_proj.weight`, `layers.{i}.fc1.weight`, ...).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn


class SelfAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections (bias) and scaling head_dim^-0.5.

    `F.scaled_dot_product_attention` picks flash/memory-efficient kernels on GPU. Padded keys
    get an additive large-negative bias rather than a boolean mask: a row whose keys are all
    padding (an empty utterance) then gives a uniform softmax instead of NaN.
    """

    # train.fused_alibi (set by the engine, speedups.set_fused_alibi): in bf16/fp16, hand the bias to SDPA in
    # the compute dtype so a fused kernel can take it, instead of forming fp32 logits as fairseq does.
    fused_bias = False

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None) -> Tensor:  # (B, T, D)
        """attn_bias (B, H, T, T) fp32, added to the logits (data2vec 2.0's ALiBi); None for data2vec 1.0."""
        B, T, D = x.shape
        H = self.num_heads

        def heads(t: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, D/H)
            return t.view(B, T, H, D // H).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        dropout_p = self.dropout if self.training else 0.0
        if attn_bias is not None:
            y = self._biased(q, k, v, padding_mask, attn_bias, dropout_p, self.fused_bias)
            return self.out_proj(y.reshape(B, T, D))
        bias = None
        if padding_mask is not None:
            # Built here, not once per batch, because under autocast q's dtype is only known now.
            bias = torch.zeros(B, 1, 1, T, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(padding_mask[:, None, None, :], torch.finfo(q.dtype).min)  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))  # (B, T, D)

    @staticmethod
    def _biased(q: Tensor, k: Tensor, v: Tensor, padding_mask: Optional[Tensor], attn_bias: Tensor,
                dropout_p: float, fused: bool = False) -> Tensor:
        """Attention with an additive fp32 bias -> (B, T, H, D/H).

        fairseq's AltAttention promotes the logits to fp32 before adding ALiBi and takes the
        softmax in fp32 (a bf16 bias of slope x distance would round away the far keys' order),
        so in fp32 the fused kernel computes it and otherwise the logits are formed in fp32 here.
        `fused` (bf16/fp16 only) instead rounds the bias to q's dtype and leaves the whole attention to
        SDPA, whose fused kernels (memory-efficient on CUDA) accept such a bias but not an fp32 one.
        """
        sdpa = fused or q.dtype == torch.float32
        bias = attn_bias.to(q.dtype) if sdpa else attn_bias.float()
        if padding_mask is not None:
            bias = bias.masked_fill(padding_mask[:, None, None, :], torch.finfo(bias.dtype).min)
        if sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        else:
            logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, T, T)
            probs = torch.softmax(logits.float() + bias, dim=-1).type_as(q)
            y = F.dropout(probs, dropout_p) @ v
        return y.transpose(1, 2)


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p, scale the rest by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TransformerLayer(nn.Module):
    """Post-LN layer: h = LN(x + MHA(x)); f = fc2(GELU(fc1(h))); out = LN(h + f).

    `f`, the FFN output before dropout, residual and LayerNorm, is returned too: data2vec's
    targets average it over the teacher's top K layers (fairseq's `layer_result`).
    `drop_path` (data2vec 2.0 image fine-tuning; 0 elsewhere) drops both residual branches per
    sample, as fairseq's AltBlock does before each residual sum.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, attention_dropout: float,
                 activation_dropout: float, layer_norm_eps: float, drop_path: float = 0.0):
        super().__init__()
        self.drop_path = DropPath(drop_path)
        self.self_attn = SelfAttention(dim, num_heads, attention_dropout)
        self.self_attn_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.final_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                attn_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:  # (B, T, D)
        h = self.self_attn_norm(x + self.drop_path(self.dropout(self.self_attn(x, padding_mask, attn_bias))))
        # fairseq computes this GELU in fp32 (`gelu(x.float()).type_as(x)`); a no-op in fp32.
        a = self.fc1(h)
        a = F.gelu(a.float()).type_as(a)  # (B, T, F)
        ffn_out = self.fc2(self.activation_dropout(a))  # (B, T, D): the data2vec target
        out = self.final_norm(h + self.drop_path(self.dropout(ffn_out)))
        return out, ffn_out


BERT_INIT_STD = 0.02


def init_bert_params(module: nn.Module, std: float = BERT_INIT_STD) -> None:
    """BERT init for the transformer (fairseq `init_bert_params`): Linear N(0, std), bias 0; std 0.02
    in the reference. `std` exists for small widths (docs/recipe.md, speech-tiny): with 0.02 a 64-wide
    layer's outputs start about 10x smaller than a 768-wide one's."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class LayerStack(nn.ModuleList):
    """`num_layers` TransformerLayers run in order, each skipped with probability `layerdrop` in training.

    A ModuleList itself, so its layers keep the keys `{i}.self_attn...` under whatever attribute
    holds the stack (the audio model's `transformer.layers`). The layers get BERT init here, once,
    after all of them exist (fairseq re-initializes after building the encoder).

    `checkpointing` (train.activation_checkpointing) recomputes each layer in the backward pass
    instead of keeping its activations: memory per layer drops to its input, compute grows by one
    forward. Non-reentrant checkpointing restores the RNG, so dropout draws the same masks twice.
    """

    def __init__(self, num_layers: int, dim: int, num_heads: int, ffn_dim: int, dropout: float,
                 attention_dropout: float, activation_dropout: float, layer_norm_eps: float, layerdrop: float,
                 init_std: float = BERT_INIT_STD, checkpointing: bool = False,
                 drop_path: Optional[Sequence[float]] = None):
        rates = list(drop_path) if drop_path is not None else [0.0] * num_layers  # one stochastic-depth rate per layer
        super().__init__(
            TransformerLayer(dim, num_heads, ffn_dim, dropout, attention_dropout, activation_dropout, layer_norm_eps,
                             rates[i])
            for i in range(num_layers)
        )
        self.layerdrop = layerdrop
        self.checkpointing = checkpointing
        self.apply(lambda module: init_bert_params(module, init_std))

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                return_layer_results: bool = False,
                attn_bias: Optional[Tensor] = None) -> tuple[Tensor, Optional[list[Tensor]]]:
        """x (B, T, D), padding_mask (B, T) True = padding -> (x (B, T, D), [ffn_out (B, T, D)] or None).

        Layer results list only the layers that ran (LayerDrop may skip some in training).
        attn_bias (B, H, T, T): added to every layer's attention logits (data2vec 2.0's shared ALiBi).
        """
        layer_results = [] if return_layer_results else None
        for layer in self:
            # LayerDrop (fairseq `encoder_layerdrop`): skip the layer when U[0, 1) <= p, in training only.
            if self.training and self.layerdrop > 0 and torch.rand(()).item() <= self.layerdrop:
                continue
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x, ffn_out = torch.utils.checkpoint.checkpoint(layer, x, padding_mask, attn_bias, use_reentrant=False)
            else:
                x, ffn_out = layer(x, padding_mask, attn_bias)
            if layer_results is not None:
                layer_results.append(ffn_out)
        return x, layer_results
