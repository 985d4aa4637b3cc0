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
