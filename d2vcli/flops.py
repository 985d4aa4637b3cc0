"""Model FLOPs of a data2vec pretraining update, counted from the architecture (for MFU).

Used by benchmarks/gpu_check.py and benchmarks/bench_pretrain.py; the formula is documented in
docs/gpu.md. One multiply-add is 2 FLOPs; only the matrix products are counted (convolutions,
linear layers, the two attention products), not norms, activations or the EMA step, which is the
usual convention for MFU (PaLM, arXiv 2204.02311 appendix B). Backward = 2 x forward.

Per utterance of S samples, T frames after the conv encoder (model fields as in config.ModelConfig):

    conv encoder      sum over blocks l: 2 C_in,l C_l k_l T_l
    feature proj      2 C D T
    positional conv   depth x 2 D (D / groups) k T
    each layer        2 T (4 D^2 + 2 D F) + 4 T^2 D         q, k, v, out, fc1, fc2 + QK^T and AV
    final_proj (1.0)  2 D^2 T_masked
    decoder (2.0)     2 D Dd T + layers x 2 Dd (Dd / g) k T + 2 Dd D T   per clone, every frame

data2vec 1.0 update = 3 x student forward (conv encoder included unless frozen) + the teacher's
forward of the transformer (positional conv + layers; it reuses the student's conv features).
data2vec 2.0 update (model.version 2, M = masking.clone_batch clones, keep = 1 - mask_prob) =
3 x conv encoder once + teacher forward (positional conv + prenet + layers on all T frames) +
M x 3 x (positional conv on all T frames + prenet + layers on keep x T frames + decoder).

Images (ViT, `vision` section; N = (H/P)^2 patches, one CLS token, so T = N + 1 tokens):

    patch embedding   2 (C P^2) D N
    each block        layer_flops(N + 1, D, F)                 the same six products and QK^T, AV
    norm + lm_head    2 D^2 N (1.0: every patch is predicted, the loss keeps the masked ones)
    conv decoder (2.0)  sum over blocks: 2 (C_in / g) Dd k^2 N, then 2 Dd D N, per clone, every patch

data2vec 1.0 image update = 3 x (patch embedding + blocks on N + 1 + lm_head) + the teacher's
forward (patch embedding + blocks on N + 1; an EMA of the whole model, its heads unused).
data2vec 2.0 image update (M clones, V visible patches per clone, the mask's exact count) =
3 x patch embedding (once per image) + M x 3 x (prenet + blocks on V + 1 + decoder) + the teacher
(patch embedding + prenet + blocks on N + 1, once per image).

Text (RoBERTa encoder, `text` section; T tokens of the padded sequence, `<s>` included): the
embeddings are table look-ups (no FLOPs), each layer is layer_flops(T, D, F), the regression head
(Linear D -> 2D, GELU, Linear 2D -> D) is 8 D^2 T on every position.
data2vec 1.0 text update = 3 x (layers + head) + the teacher's forward (layers).
"""

from __future__ import annotations

from dataclasses import dataclass


def _conv_frames(num_samples: int, conv_layers) -> list[int]:
    frames, length = [], num_samples
    for _, kernel, stride in conv_layers:
        length = max(0, (length - kernel) // stride + 1)
        frames.append(length)
    return frames


def conv_encoder_flops(num_samples: int, conv_layers) -> float:
    """Forward FLOPs of the conv feature encoder on one utterance."""
    total, in_channels = 0.0, 1
    for (channels, kernel, _), t in zip(conv_layers, _conv_frames(num_samples, conv_layers)):
        total += 2.0 * in_channels * channels * kernel * t
        in_channels = channels
    return total


def layer_flops(frames: int, dim: int, ffn_dim: int) -> float:
    """Forward FLOPs of one transformer layer on a sequence of `frames`."""
    return 2.0 * frames * (4 * dim * dim + 2 * dim * ffn_dim) + 4.0 * frames * frames * dim


def pos_conv_flops(frames: int, model) -> float:
    return model.pos_conv_depth * 2.0 * model.embed_dim * (model.embed_dim / model.pos_conv_groups) * \
        model.pos_conv_kernel * frames


@dataclass(frozen=True)
class UpdateFlops:
    """FLOPs of one pretraining step on one utterance, by part (forward + backward where trained)."""

    conv_encoder: float
    transformer: float  # student (x3) and teacher (x1) positional conv + layers + feature projection
    head: float  # final_proj (1.0) or the conv decoder (2.0), x3

    @property
    def total(self) -> float:
        return self.conv_encoder + self.transformer + self.head


def student_forward_flops(num_samples: int, model, masked_share: float = 0.0) -> float:
    """Forward FLOPs of the data2vec 1.0 student + final_proj on one utterance (final_proj at
    `masked_share` of the frames; 1.0 = every frame, as an unmasked forward projects)."""
    t = _conv_frames(num_samples, model.conv_layers)[-1]
    c, d = model.conv_layers[-1][0], model.embed_dim
    return (conv_encoder_flops(num_samples, model.conv_layers) + 2.0 * c * d * t + pos_conv_flops(t, model)
            + model.num_layers * layer_flops(t, d, model.ffn_dim) + 2.0 * d * d * t * masked_share)


def update_flops(num_samples: int, model, masking) -> UpdateFlops:
    """One pretraining step's FLOPs on one utterance of `num_samples` samples (crop length)."""
    t = _conv_frames(num_samples, model.conv_layers)[-1]
    c, d, f = model.conv_layers[-1][0], model.embed_dim, model.ffn_dim
    trained = 3.0 if model.feature_grad_mult > 0 else 1.0
    conv = trained * conv_encoder_flops(num_samples, model.conv_layers)
    proj = 3.0 * 2.0 * c * d * t
    if getattr(model, "version", 1) == 2:
        m = max(1, getattr(masking, "clone_batch", 1))
        kept = round(t * (1.0 - masking.mask_prob))
        depth = model.num_layers + getattr(model, "prenet_depth", 0)
        teacher = pos_conv_flops(t, model) + depth * layer_flops(t, d, f)
        student = m * 3.0 * (pos_conv_flops(t, model) + depth * layer_flops(kept, d, f))
        dd, k, g = model.decoder_dim, model.decoder_kernel, model.decoder_groups
        decoder = m * 3.0 * (2.0 * d * dd * t + model.decoder_layers * 2.0 * dd * (dd / g) * k * t + 2.0 * dd * d * t)
        return UpdateFlops(conv, proj + teacher + student, decoder)
    # data2vec 1.0: the expected masked share of the span masks (about 49 % with 0.65 / 10).
    share = 1.0 - (1.0 - masking.mask_prob / masking.mask_length) ** masking.mask_length
    layers = model.num_layers * layer_flops(t, d, f) + pos_conv_flops(t, model)
    return UpdateFlops(conv, proj + 3.0 * layers + layers, 3.0 * 2.0 * d * d * t * share)


def patch_embed_flops(vision) -> float:
    """Forward FLOPs of the ViT patch embedding on one image."""
    n = (vision.image_size // vision.patch_size) ** 2
    return 2.0 * vision.in_channels * vision.patch_size ** 2 * vision.embed_dim * n


def visible_patches(vision, masking) -> int:
    """Patches each data2vec 2.0 clone encodes: the 2-D block mask's exact count (objective.masking)."""
    n = (vision.image_size // vision.patch_size) ** 2
    if masking.inverse_mask:
        return int(n * (1.0 - masking.mask_prob))
    return n - int(n * masking.mask_prob)


def conv_decoder_2d_flops(vision) -> float:
    """Forward FLOPs of the data2vec 2.0 image decoder on one clone (every patch of the grid)."""
    n = (vision.image_size // vision.patch_size) ** 2
    dd, k, g = vision.decoder_dim, vision.decoder_kernel, vision.decoder_groups
    convs = sum(2.0 * ((vision.embed_dim if i == 0 else dd) / g) * dd * k * k * n for i in range(vision.decoder_layers))
    return convs + 2.0 * dd * vision.embed_dim * n


def vision_update_flops(vision, masking, version: int | None = None) -> UpdateFlops:
    """One image pretraining step's FLOPs on one image (`vision` config section, `masking` section;
    `version` is model.version, else the section's own, else 1). UpdateFlops' fields here: patch
    embedding, transformer blocks (student x3 and teacher), head (lm_head or the conv decoder)."""
    n = (vision.image_size // vision.patch_size) ** 2
    d, f = vision.embed_dim, vision.ffn_dim
    embed = patch_embed_flops(vision)
    depth = vision.num_layers + getattr(vision, "prenet_depth", 0)
    if (version or getattr(vision, "version", 1)) == 2:
        m = max(1, masking.clone_batch)
        student = m * 3.0 * depth * layer_flops(visible_patches(vision, masking) + 1, d, f)
        teacher = depth * layer_flops(n + 1, d, f)
        return UpdateFlops(4.0 * embed, student + teacher, m * 3.0 * conv_decoder_2d_flops(vision))
    blocks = depth * layer_flops(n + 1, d, f)
    return UpdateFlops(4.0 * embed, 4.0 * blocks, 3.0 * 2.0 * d * d * n)


def text_update_flops(tokens: int, text) -> UpdateFlops:
    """One text pretraining step's FLOPs on one sequence of `tokens` (padded length, `<s>` included).
    UpdateFlops' fields here: embeddings (look-ups: 0), layers (student x3 and teacher), regression head."""
    d = text.embed_dim
    layers = text.num_layers * layer_flops(tokens, d, text.ffn_dim)
    return UpdateFlops(0.0, 4.0 * layers, 3.0 * 8.0 * d * d * tokens)


def flops_per_audio_second(num_samples: int, model, masking, sample_rate: int = 16_000) -> float:
    """Training FLOPs per second of (unique) audio at crop length `num_samples`."""
    return update_flops(num_samples, model, masking).total / (num_samples / sample_rate)


# Dense bf16/fp16 tensor-core peaks (FLOP/s) by name fragment, most specific first (NVIDIA data sheets:
# H100 SXM 989.4 TF, H200 the same chip, A100 312, L40S 362, A10 125, V100 125 fp16).
PEAK_BF16 = (("H200", 989.4e12), ("H100 PCIe", 756e12), ("H100", 989.4e12), ("A100", 312e12),
             ("L40S", 362e12), ("A10", 125e12), ("V100", 125e12))


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None when it is not in PEAK_BF16."""
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)
