"""The cross-field checks `Config.validate` runs: combinations of values that are each valid on their own
(a field's key and type are checked when it is merged, config_io.py) but cannot run together.

Each check returns a message naming the fields and what to change; `Config.validate` raises them all
at once as one ConfigError. The functions read a `d2vcli.config.Config` by attribute and import nothing
of d2vcli, so config.py can call them without an import cycle.
"""

from __future__ import annotations

from typing import Any, Optional


def config_problems(cfg: Any, command: Optional[str] = None) -> list[str]:
    """Every impossible combination in `cfg`, for `command`. The image objective's settings (top-K, block
    masks) are not checked for `d2v finetune`, which ignores them."""
    problems = []
    m = cfg.model
    if m.embed_dim % m.num_heads:
        problems.append(f"model.embed_dim ({m.embed_dim}) must be divisible by model.num_heads ({m.num_heads})")
    if m.embed_dim % m.pos_conv_groups:
        problems.append(
            f"model.embed_dim ({m.embed_dim}) must be divisible by model.pos_conv_groups ({m.pos_conv_groups})"
        )
    images = cfg.modality == "images"
    layers, section = (cfg.vision.num_layers, "vision") if images else (m.num_layers, "model")
    if cfg.modality == "text":
        layers, section = cfg.text.num_layers, "text"
    if not 1 <= cfg.objective.average_top_k_layers <= layers and not (images and command == "finetune"):
        problems.append(
            f"objective.average_top_k_layers ({cfg.objective.average_top_k_layers}) must be between 1 and "
            f"{section}.num_layers ({layers})"
        )
    if images:
        problems.extend(_vision_problems(cfg, masking=command != "finetune" and m.version == 1))
    if images and m.version == 2 and command != "finetune":
        problems.extend(_vision2_problems(cfg))
    if cfg.finetune.encoder_lr_scale <= 0:
        problems.append(f"finetune.encoder_lr_scale ({cfg.finetune.encoder_lr_scale}) must be positive; to keep "
                        f"the encoder fixed, set finetune.freeze_updates to train.max_updates")
    if cfg.data.text_sequences_per_batch < 1 or cfg.train.sequences_per_update < 1:
        problems.append("data.text_sequences_per_batch and train.sequences_per_update must be at least 1")
    if cfg.data.tokens_per_sample < 2 or cfg.data.text_tokens_per_batch < 1 or cfg.train.tokens_per_update < 1:
        problems.append("data.tokens_per_sample must be at least 2, data.text_tokens_per_batch and "
                        "train.tokens_per_update at least 1")
    if not 0 <= cfg.masking.mask_prob < 1:
        problems.append("masking.mask_prob must be in [0, 1)")
    if cfg.data.max_tokens < cfg.data.min_sample_size:
        problems.append(
            f"data.max_tokens ({cfg.data.max_tokens}) is smaller than data.min_sample_size "
            f"({cfg.data.min_sample_size}): no utterance would fit in a batch"
        )
    if cfg.schedule.kind == "tri_stage" and abs(sum(cfg.schedule.phase_ratio) - 1) > 1e-6:
        problems.append(f"schedule.phase_ratio {cfg.schedule.phase_ratio} must sum to 1")
    if m.version == 2:
        if cfg.masking.clone_batch < 1:
            problems.append("masking.clone_batch must be at least 1")
        if m.decoder_dim % m.decoder_groups or m.embed_dim % m.decoder_groups:
            problems.append(f"model.embed_dim ({m.embed_dim}) and model.decoder_dim ({m.decoder_dim}) must be "
                            f"divisible by model.decoder_groups ({m.decoder_groups})")
        if m.decoder_layers < 1:
            problems.append("model.decoder_layers must be at least 1")
    if cfg.modality == "text":
        problems.extend(_text_problems(cfg))
    if cfg.train.batch_seconds <= 0:
        problems.append("train.batch_seconds must be positive")
    if cfg.data.length_buckets < 0:
        problems.append(f"data.length_buckets ({cfg.data.length_buckets}) must be 0 (off) or a count of lengths")
    return problems


def _text_problems(cfg: Any) -> list[str]:
    t, mk, problems = cfg.text, cfg.masking, []
    if t.embed_dim % t.num_heads:
        problems.append(f"text.embed_dim ({t.embed_dim}) must be divisible by text.num_heads ({t.num_heads})")
    if t.vocab_size < 0 or (t.vocab_size and not -1 <= t.mask_id < t.vocab_size):
        problems.append(f"text.vocab_size ({t.vocab_size}) must be 0 (the tokenizer's) or hold text.mask_id "
                        f"({t.mask_id})")
    if mk.mask_length < 1:
        problems.append("masking.mask_length must be at least 1")
    if min(mk.leave_unmasked_prob, mk.random_token_prob) < 0 or mk.leave_unmasked_prob + mk.random_token_prob > 1:
        problems.append("masking.leave_unmasked_prob and masking.random_token_prob must be at least 0 and sum "
                        "to at most 1")
    if cfg.model.version == 2:
        if mk.mask_length != 1:
            problems.append(f"masking.mask_length is {mk.mask_length}, but data2vec 2.0 text masks single tokens "
                            f"at random (MAE-style, fairseq mask_length 1): set masking.mask_length=1")
        if t.decoder_layers < 1 or t.decoder_dim % t.decoder_groups or t.embed_dim % t.decoder_groups:
            problems.append(f"text.decoder_layers must be at least 1 and text.embed_dim ({t.embed_dim}) and "
                            f"text.decoder_dim ({t.decoder_dim}) divisible by text.decoder_groups "
                            f"({t.decoder_groups})")
    return problems


def _vision_problems(cfg: Any, masking: bool) -> list[str]:
    v, problems = cfg.vision, []
    if v.image_size % v.patch_size:
        problems.append(f"vision.image_size ({v.image_size}) must be a multiple of vision.patch_size "
                        f"({v.patch_size})")
    if v.embed_dim % v.num_heads:
        problems.append(f"vision.embed_dim ({v.embed_dim}) must be divisible by vision.num_heads ({v.num_heads})")
    patches = (v.image_size // max(1, v.patch_size)) ** 2
    if masking and not 0 < cfg.masking.block_patches < patches:
        problems.append(f"masking.block_patches ({cfg.masking.block_patches}) must be between 1 and "
                        f"{patches - 1} (the image has {patches} patches)")
    if masking and not 0 < cfg.masking.block_min_patches <= cfg.masking.block_patches:
        problems.append("masking.block_min_patches must be between 1 and masking.block_patches")
    if masking and not 0 < cfg.masking.block_min_aspect <= 1:
        problems.append("masking.block_min_aspect must be in (0, 1]")
    if cfg.data.images_per_batch < 1 or cfg.train.images_per_update < 1:
        problems.append("data.images_per_batch and train.images_per_update must be at least 1")
    if not 0 < cfg.data.min_crop_scale <= 1:
        problems.append("data.min_crop_scale must be in (0, 1]")
    return problems


def _vision2_problems(cfg: Any) -> list[str]:
    """data2vec 2.0 images: the 2-D block masks, the decoder, the prenet."""
    v, mk, problems = cfg.vision, cfg.masking, []
    patches = (v.image_size // max(1, v.patch_size)) ** 2
    shown = 1 - mk.mask_prob if mk.inverse_mask else mk.mask_prob
    if mk.mask_length < 1 or mk.clone_batch < 1:
        problems.append("masking.mask_length and masking.clone_batch must be at least 1")
    kept = patches - int(patches * shown) if not mk.inverse_mask else int(patches * shown)
    if not 0 < kept < patches:
        problems.append(f"masking.mask_prob {mk.mask_prob} leaves {kept} of {patches} patches visible; "
                        f"the student needs at least one visible and one masked patch")
    if v.embed_dim % 4:
        problems.append(f"vision.embed_dim ({v.embed_dim}) must be a multiple of 4 (2-D sin-cos positions)")
    if v.embed_dim % v.decoder_groups or v.decoder_dim % v.decoder_groups:
        problems.append(f"vision.embed_dim ({v.embed_dim}) and vision.decoder_dim ({v.decoder_dim}) must be "
                        f"divisible by vision.decoder_groups ({v.decoder_groups})")
    if v.decoder_layers < 1 or v.decoder_kernel % 2 == 0:
        problems.append("vision.decoder_layers must be at least 1 and vision.decoder_kernel odd")
    if v.prenet_depth < 0:
        problems.append("vision.prenet_depth must be 0 or more")
    return problems
