"""The RoBERTa-style text encoder that data2vec 1.0 text trains, and its two heads (docs/text.md).

data2vec paper (arXiv 2202.03555) §4.3 "Natural language processing": a BERT/RoBERTa base
encoder over byte-level BPE tokens. The recipe is fairseq `examples/data2vec/models/data2vec_text.py`
on `fairseq/models/transformer/transformer_encoder.py` (`TransformerEncoder(return_fc=True)`),
read top to bottom:

    TextEmbeddings     token embedding (no sqrt(D) scale) + learned positions from pad+1
                       (fairseq `make_positions`), then LayerNorm and dropout
    TextEncoder        the embeddings, then `models/encoder.py`'s post-LN LayerStack (GELU); the
                       per-layer FFN outputs before dropout, residual and LN are the layer results
    TextRegressionHead Linear D->2D, GELU, Linear 2D->D (`head_layers: 2`): predicts the targets
    TextClassificationHead  RoBERTa's head on `<s>`: dropout, dense D->D, tanh, dropout, out_proj
    Data2VecTextPretrainModel  encoder + regression head (the student)
    TextClassifier     encoder + classification head (GLUE fine-tuning)

The transformer layers are the audio 1.0 encoder's (post-LN, q/k/v/out with biases, GELU, FFN
output returned), so they are reused unchanged. Token ids follow fairseq/RoBERTa: 0 `<s>`, 1 `<pad>`,
2 `</s>`, 3 `<unk>`, ..., `<mask>` last. Parameter names are our own (fairseq-like); the Hugging Face
`Data2VecText*` map lives in `d2vcli/interop_text.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from d2vcli.models.encoder import BERT_INIT_STD, LayerStack, init_bert_params


@dataclass
class TextConfig:
    """A text encoder's architecture; the defaults are RoBERTa base as data2vec 1.0 text pretrains it
    (fairseq `examples/data2vec/config/text/pretraining/base.yaml`, the RoBERTa dictionary + `<mask>`)."""

    vocab_size: int = 50265
    """Rows of the token embedding, `<mask>` included (RoBERTa's GPT-2 BPE dictionary + `<mask>`: 50265)."""
    max_positions: int = 512
    """Longest sequence in tokens, `<s>` included; the position table has max_positions + pad_id + 1 rows (514)."""
    embed_dim: int = 768
    """Width D of the transformer."""
    num_layers: int = 12
    """Transformer layers."""
    num_heads: int = 12
    """Attention heads."""
    ffn_dim: int = 3072
    """Hidden width of each layer's FFN (4 x D)."""
    dropout: float = 0.1
    """Dropout after the embeddings, the attention projection and the FFN."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    activation_dropout: float = 0.0
    """Dropout after the FFN's GELU (0 in the recipe)."""
    layerdrop: float = 0.0
    """Probability of skipping a whole layer in training (0 in the recipe)."""
    layer_norm_eps: float = 1e-5
    """LayerNorm epsilon (fairseq 1e-5; Hugging Face's default 1e-12 differs)."""
    pad_id: int = 1
    """Id of `<pad>`: padded positions are masked out of attention and have no position."""
    mask_id: int = 50264
    """Id of `<mask>`, the token that replaces masked positions (the dictionary's last entry in RoBERTa)."""
    init_std: float = BERT_INIT_STD
    """Std of the N(0, std) init of embeddings and Linear layers (fairseq `init_bert_params`: 0.02)."""
    pooler_dropout: float = 0.0
    """Dropout inside the classification head (fairseq RoBERTa `pooler_dropout` 0.0)."""
    version: int = 1
    """data2vec generation the pretraining model is built for: 1 (regression head on every token) or 2
    (only the kept tokens encoded, a conv decoder; models/text2.py). The encoder is the same for both."""
    decoder_dim: int = 768
    """data2vec 2.0: channels of the conv decoder (fairseq Decoder1d `decoder_dim`, text base 768)."""
    decoder_layers: int = 5
    """data2vec 2.0: conv decoder blocks (text base 5)."""
    decoder_kernel: int = 9
    """data2vec 2.0: kernel of each decoder conv (text base 9, padding 4)."""
    decoder_groups: int = 1
    """data2vec 2.0: groups of each decoder conv (text base 1: full convolutions)."""
    decoder_dropout: float = 0.1
    """data2vec 2.0: dropout on the encoder output before the decoder (`input_dropout` 0.1)."""

    @property
    def position_rows(self) -> int:
        return self.max_positions + self.pad_id + 1

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for name in ("pad_id", "mask_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary (size {self.vocab_size})")
        if self.pad_id == self.mask_id:
            raise ValueError(f"pad_id and mask_id are both {self.pad_id}")
        if self.max_positions < 2:
            raise ValueError(f"max_positions must be at least 2, got {self.max_positions}")
        if self.version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {self.version}")
        if self.version == 2 and (self.decoder_layers < 1 or self.decoder_dim % self.decoder_groups
                                  or self.embed_dim % self.decoder_groups):
            raise ValueError(f"the decoder needs at least 1 layer and embed_dim {self.embed_dim} and decoder_dim "
                             f"{self.decoder_dim} divisible by decoder_groups {self.decoder_groups}")


def text_base() -> TextConfig:
    """RoBERTa base as data2vec 1.0 text pretrains it: 12 layers of 768, 12 heads, FFN 3072, 512 positions."""
    return TextConfig()


def text_tiny(vocab_size: int = 1000, mask_id: Optional[int] = None) -> TextConfig:
    """A CPU-sized encoder for tests and the demo: 2 layers of width 64, 4 heads, 128 positions."""
    return TextConfig(vocab_size=vocab_size, mask_id=vocab_size - 1 if mask_id is None else mask_id,
                      max_positions=128, embed_dim=64, num_layers=2, num_heads=4, ffn_dim=256)


ARCHITECTURES = {"text-base": text_base, "text-tiny": text_tiny}


def make_positions(tokens: Tensor, pad_id: int) -> Tensor:
    """(B, T) token ids -> (B, T) position ids: pad_id + 1, pad_id + 2, ... over the non-pad tokens, pad_id
    at pads (fairseq `utils.make_positions`, HF `create_position_ids_from_input_ids`). Pads inside a row
    do not advance the count."""
    real = tokens.ne(pad_id).long()
    return torch.cumsum(real, dim=1) * real + pad_id


# --------------------------------------------------------------------------- the front end


class TextEmbeddings(nn.Module):
    """Token embedding + learned position embedding, then LayerNorm and dropout (no sqrt(D) scale:
    `no_scale_embedding: true`; `layernorm_embedding: true`)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        D = cfg.embed_dim
        self.pad_id = cfg.pad_id
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D, padding_idx=cfg.pad_id)
        self.embed_positions = nn.Embedding(cfg.position_rows, D, padding_idx=cfg.pad_id)
        self.layernorm_embedding = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) int64
        if tokens.shape[1] > self.embed_positions.num_embeddings - self.pad_id - 1:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_positions "
                             f"{self.embed_positions.num_embeddings - self.pad_id - 1}")
        x = self.embed_tokens(tokens) + self.embed_positions(make_positions(tokens, self.pad_id))  # (B, T, D)
        return self.dropout(self.layernorm_embedding(x))


# --------------------------------------------------------------------------- the encoder


class TextEncoderOutput(NamedTuple):
    x: Tensor  # (B, T, D) after the last layer (post-LN: no final norm)
    layer_results: Optional[list[Tensor]]  # per layer (B, T, D): FFN output before dropout, residual, LN
    padding_mask: Optional[Tensor]  # (B, T) True = pad, None when nothing is padded


class TextEncoder(nn.Module):
    """Embeddings and the post-LN transformer layers (`embed`, `layers`); BERT init everywhere."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = TextEmbeddings(cfg)
        self.layers = LayerStack(cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout,
                                 cfg.attention_dropout, cfg.activation_dropout, cfg.layer_norm_eps, cfg.layerdrop,
                                 init_std=cfg.init_std)
        # fairseq `init_bert_params` also covers the embeddings (it overrides the positions' D^-0.5 init);
        # the padding rows start at zero.
        for emb in (self.embed.embed_tokens, self.embed.embed_positions):
            nn.init.normal_(emb.weight, mean=0.0, std=cfg.init_std)
            with torch.no_grad():
                emb.weight[cfg.pad_id].zero_()

    def forward(self, tokens: Tensor, padding_mask: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                return_layer_results: bool = True) -> TextEncoderOutput:
        """tokens (B, T) int64; padding_mask (B, T) True = pad (None: taken from tokens == pad_id, as fairseq);
        mask (B, T) True = masked (those ids become mask_id before embedding) -> TextEncoderOutput."""
        if mask is not None:
            tokens = tokens.masked_fill(mask, self.cfg.mask_id)
        if padding_mask is None:
            padding_mask = tokens.eq(self.cfg.pad_id)
        if not padding_mask.any():
            padding_mask = None
        x = self.embed(tokens)  # (B, T, D)
        if padding_mask is not None:
            # fairseq zeroes padded positions' embeddings before the layers; they are never attended to.
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        x, layer_results = self.layers(x, padding_mask, return_layer_results=return_layer_results)
        return TextEncoderOutput(x, layer_results, padding_mask)


# --------------------------------------------------------------------------- heads


class TextRegressionHead(nn.Sequential):
    """Linear D->2D, GELU, Linear 2D->D (`head_layers: 2`); an nn.Sequential, so its keys are `0.*` and `2.*`
    like fairseq's `regression_head`."""

    def __init__(self, dim: int, init_std: float = BERT_INIT_STD):
        super().__init__(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.apply(lambda m: init_bert_params(m, init_std))


class TextClassificationHead(nn.Module):
    """RoBERTa's sentence head on the `<s>` token: dropout, dense D->D, tanh, dropout, out_proj D->C."""

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0, init_std: float = BERT_INIT_STD):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, num_classes)
        self.apply(lambda m: init_bert_params(m, init_std))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        h = torch.tanh(self.dense(self.dropout(x[:, 0])))  # (B, D): <s>
        return self.out_proj(self.dropout(h))  # (B, C)


# --------------------------------------------------------------------------- models


class Data2VecTextPretrainModel(nn.Module):
    """The student: `encoder` and `regression_head` predicting the teacher's targets at every position."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.encoder = TextEncoder(cfg)
        self.regression_head = TextRegressionHead(cfg.embed_dim, cfg.init_std)

    def forward(self, tokens: Tensor, padding_mask: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        """-> predictions (B, T, D) for every position; the loss keeps the masked ones."""
        x = self.encoder(tokens, padding_mask, mask, return_layer_results=False).x
        return self.regression_head(x)


class TextClassifier(nn.Module):
    """The fine-tuning model: `encoder` and `classifier` (num_classes logits; 1 output = regression)."""

    def __init__(self, cfg: TextConfig, num_classes: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError("a text classifier needs num_classes >= 1 (1 = regression)")
        self.encoder = TextEncoder(cfg)
        self.classifier = TextClassificationHead(cfg.embed_dim, num_classes, cfg.pooler_dropout, cfg.init_std)

    def forward(self, tokens: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """-> (B, num_classes) logits (B, 1 for a regression task)."""
        return self.classifier(self.encoder(tokens, padding_mask, return_layer_results=False).x)
