"""The data2vec 2.0 text student: encode only the kept tokens, predict every token with a conv decoder.

Efficient Self-supervised Learning with Contextualized Target Representations for Vision, Speech
and Language (Baevski et al., 2022, arXiv 2212.07525), §3; reference implementation fairseq
`examples/data2vec/models/data2vec2.py` with `modalities/text.py` and the recipe
`examples/data2vec/config/v2/base_text_only_task.yaml` (docs/text.md, "data2vec 2.0").

The token embedding front end (fairseq `TextLocalEncoder`: tokens + learned positions + LayerNorm +
dropout) and the post-LN layers are data2vec 1.0 text's `TextEncoder` (models/text.py), unchanged,
so a 2.0 checkpoint's `encoder.*` is a 1.0 encoder (fine-tuning, HF export). The decoder is
audio 2.0's `ConvDecoder` with text's options. In the order of the data flow (A = sequences,
M = clones, T = tokens, T_k = kept tokens):

    tokens (A, T)
      -> encoder.embed: tokens + positions, LayerNorm, dropout   (A, T, D): the teacher's input too
      -> repeat_interleave(M)                                     (A*M, T, D), one mask per clone
      -> gather the kept tokens                                   (A*M, T_k, D); positions are already in
      -> encoder.layers (post-LN, no final norm)                  (A*M, T_k, D)
      -> ConvDecoder: input dropout, kept tokens back in place, N(0, 0.01) noise at the masked ones,
         5 x [Conv1d(D, D, 9) -> LayerNorm (no affine) -> GELU] without residual,
         Linear(D, 2D) -> GELU -> Linear(2D, D)                   (A*M, T, D)
      -> pred = decoder output at the masked tokens               (N_masked, D)

fairseq's text context encoder is the identity at `prenet_depth: 0` (the embedding LayerNorm plays
the input norm's part), so nothing sits between the gather and the layers. Padded positions get
the 1.0 encoder's treatment: their embeddings are zeroed and they are masked out of attention.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from d2vcli.models.audio2 import ConvDecoder, kept_indices
from d2vcli.models.text import TextConfig, TextEncoder


class Data2Vec2TextPretrainModel(nn.Module):
    """The student: `encoder` (1.0's TextEncoder) and `decoder`; M masked clones per sequence."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.encoder = TextEncoder(cfg)
        # fairseq Decoder1d for text: no residual, a two-layer projection (ratio 2); PyTorch default init.
        self.decoder = ConvDecoder(cfg.embed_dim, cfg.decoder_dim, cfg.decoder_layers, cfg.decoder_kernel,
                                   cfg.decoder_groups, cfg.decoder_dropout, residual=False, projection_layers=2)

    def local_features(self, tokens: Tensor, padding_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """tokens (A, T) -> (embeddings (A, T, D) with dropout applied and pads zeroed, padding mask or None)."""
        if padding_mask is None:
            padding_mask = tokens.eq(self.encoder.cfg.pad_id)
        if not padding_mask.any():
            padding_mask = None
        x = self.encoder.embed(tokens)  # (A, T, D)
        if padding_mask is not None:
            x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        return x, padding_mask

    def forward(self, tokens: Tensor, padding_mask: Optional[Tensor], mask: Tensor,
                generator: Optional[torch.Generator] = None) -> dict:
        """tokens (A, T); mask (A*M, T) True = masked, the same count per row, sample-major.

        -> dict(pred (N_masked, D) in `mask` order, features (A, T, D) the teacher's input (the same
        dropout-perturbed embeddings, once per sequence), padding_mask (A, T) | None, clones M,
        encoded (A*M, T_k, D) the encoder output at the kept tokens).
        """
        features, pad = self.local_features(tokens, padding_mask)  # (A, T, D)
        clones = mask.shape[0] // features.shape[0]
        if clones * features.shape[0] != mask.shape[0] or mask.shape[1] != features.shape[1]:
            raise ValueError(f"mask {tuple(mask.shape)} does not fit {features.shape[0]} sequences of "
                             f"{features.shape[1]} tokens")
        x = features.repeat_interleave(clones, 0)  # (A*M, T, D)
        kept = kept_indices(mask)  # (A*M, T_k), ascending
        x = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (A*M, T_k, D)
        kept_pad = pad.repeat_interleave(clones, 0).gather(1, kept) if pad is not None else None
        if kept_pad is not None and not kept_pad.any():
            kept_pad = None
        encoded, _ = self.encoder.layers(x, kept_pad)  # (A*M, T_k, D)
        decoded = self.decoder(encoded, mask, generator)  # (A*M, T, D)
        return {"pred": decoded[mask], "features": features, "padding_mask": pad, "clones": clones,
                "encoded": encoded}
