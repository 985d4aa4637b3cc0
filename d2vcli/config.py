"""One typed config tree for every d2v command.

Defaults are the data2vec 1.0 base recipe for LibriSpeech 960 h (fairseq
`examples/data2vec/config/audio/pretraining/base_librispeech.yaml`, see
docs/librispeech.md). Precedence, lowest first:

    dataclass defaults  ->  --preset NAME (d2vcli/presets/NAME.yaml)  ->  --config FILE.yaml  ->  --set a.b=c

Unknown keys and wrong types are errors that name the key and suggest the
nearest valid one. Derived values (gradient accumulation, EMA decay at step t,
...) are computed in code where they are used, never interpolated here.

Run `d2v config show [--preset NAME]` to see every field with its doc.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, Optional

from d2vcli import config_checks
# Merging, YAML and --set parsing, writing and field listings live in config_io.py, the cross-field checks
# of Config.validate in config_checks.py. config_io's names are names of this module too (cfgmod.merge,
# cfgmod.to_dict, C.ConfigError, ...): that is how the rest of d2vcli, the tests and benchmarks call them.
from d2vcli.config_io import ConfigError, _suggest, load_yaml, merge, parse_set
from d2vcli.config_io import changes, field_docs, save, to_dict, to_yaml  # noqa: F401 - re-exported, see above

# Package data (pyproject package-data), so a wheel install has them too. For a package installed
# as files (wheel, editable, source tree) this is a pathlib.Path, which load_yaml relies on.
PRESETS_DIR = files("d2vcli") / "presets"


def f(default: Any, doc: str):
    """A dataclass field with a docstring that `d2v config show` prints."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


ConvLayers = tuple[tuple[int, int, int], ...]
BASE_CONV_LAYERS: ConvLayers = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


# --------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    train_splits: tuple[str, ...] = f(
        ("train-clean-100", "train-clean-360", "train-other-500"),
        "Manifests in the workspace's data/ to train on (names as written by `d2v prepare`).",
    )
    valid_splits: tuple[str, ...] = f(("dev-other",), "Manifests used for validation.")
    max_tokens: int = f(3_800_000, "Samples per device per micro-batch (batch size x length after cropping/padding).")
    min_sample_size: int = f(32_000, "Utterances shorter than this many samples are skipped (2 s).")
    max_sample_size: int = f(320_000, "Longer utterances are randomly cropped to this many samples (20 s); pretraining only.")
    normalize: Optional[bool] = f(
        True,
        "Normalize each waveform to zero mean and unit variance (data2vec was pretrained with it). "
        "Fine-tuning: null (the default) = the pretrained checkpoint's setting, which is enforced.",
    )
    num_workers: int = f(4, "DataLoader worker processes per device.")
    length_buckets: int = f(
        0,
        "Round every batch's length to one of this many fixed lengths, evenly spaced between the shortest "
        "and the longest (capped) utterance, so a compiled graph (train.compile) is reused: pretraining crops "
        "down to the bucket, fine-tuning pads up to it (the cost is printed at start). 0 = off (exact lengths).",
    )
    max_bad_files: int = f(
        10,
        "Unreadable audio files (truncated, corrupt, not 16 kHz) a training run skips, naming each in the log "
        "and the summary, before it stops with the list; 0 = stop at the first one.",
    )
    images_per_batch: int = f(
        128, "Images: images per device per micro-batch (the recipe's 128 per GPU for ViT-B); "
        "train.images_per_update and the world size give the accumulation.")
    min_crop_scale: float = f(
        0.08, "Images: smallest area share RandomResizedCrop keeps (the recipe's scale 0.08 to 1).")
    tokens_per_sample: int = f(
        512, "Text: tokens per block, <s> included (data2vec text's tokens_per_sample 512: fairseq's "
        "TokenBlockDataset of 511 plus a prepended <s>; docs/text-data.md). `d2v prepare text` cuts blocks to it.")
    text_tokens_per_batch: int = f(
        8192, "Text: padded tokens (batch size x longest block) per device per micro-batch (the recipe's "
        "max_tokens 8192 per GPU); train.tokens_per_update and the world size give the accumulation.")
    text_dir: Optional[str] = f(
        None, "Text: folder of the token shards (spm.model, train.bin, ...); null = <workdir>/data/text.")
    text_sequences_per_batch: int = f(
        32, "Text fine-tuning: labeled records per device per micro-batch; train.sequences_per_update and the "
        "world size give the accumulation.")


@dataclass
class ModelConfig:
    conv_layers: ConvLayers = f(BASE_CONV_LAYERS, "Feature encoder blocks as (channels, kernel, stride).")
    embed_dim: int = f(768, "Transformer width D.")
    num_layers: int = f(12, "Transformer layers.")
    num_heads: int = f(12, "Attention heads.")
    ffn_dim: int = f(3072, "Hidden size of the feed-forward block.")
    dropout: float = f(0.1, "Dropout on the transformer input and after attention and FFN.")
    attention_dropout: float = f(0.1, "Dropout on attention probabilities.")
    activation_dropout: float = f(0.0, "Dropout after the FFN activation.")
    dropout_input: float = f(0.0, "Dropout on the projected features, before masking.")
    layerdrop: float = f(0.05, "Probability of skipping each transformer layer in training.")
    pos_conv_depth: int = f(5, "Layers of the convolutional positional embedding.")
    pos_conv_kernel: int = f(19, "Kernel of each positional conv layer (fairseq: max(3, conv_pos // depth) = 95 // 5).")
    pos_conv_groups: int = f(16, "Groups of each positional conv layer.")
    feature_grad_mult: float = f(1.0, "Gradient scale into the conv feature encoder; 0 freezes it.")
    layer_norm_eps: float = f(1e-5, "LayerNorm epsilon.")
    init_std: float = f(0.02, "Std of the BERT init of the transformer's Linear layers (reference 0.02); only "
                        "initialization. Small widths need more: speech-tiny uses 0.07 = 0.02 x sqrt(768 / 64).")
    version: Literal[1, 2] = f(
        1, "data2vec version: 1 (data2vec 1.0: mask embedding, every frame encoded, Linear head) or 2 (data2vec "
        "2.0: only unmasked frames encoded, ALiBi with a learned scale per head, conv decoder; docs/recipe2.md).")
    prenet_depth: int = f(0, "data2vec 2.0: layers before the main ones (their outputs are never targets; "
                          "base 0, large 8).")
    decoder_dim: int = f(384, "data2vec 2.0 pretraining: channels of the conv decoder (base 384, large 768).")
    decoder_layers: int = f(4, "data2vec 2.0 pretraining: conv decoder blocks.")
    decoder_kernel: int = f(7, "data2vec 2.0 pretraining: kernel of each decoder conv.")
    decoder_groups: int = f(16, "data2vec 2.0 pretraining: groups of each decoder conv.")
    decoder_dropout: float = f(0.1, "data2vec 2.0 pretraining: dropout on the encoder output entering the decoder.")


# The ModelConfig fields fine-tuning may change (fairseq's `arg_overrides` in
# fairseq/models/wav2vec/wav2vec2_asr.py); all others are the architecture, which a checkpoint
# fixes and a resumed run may not change.
REGULARIZATION_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "dropout_input", "layerdrop",
                         "feature_grad_mult", "decoder_dropout")
ARCHITECTURE_FIELDS = tuple(fl.name for fl in dataclasses.fields(ModelConfig) if fl.name not in REGULARIZATION_FIELDS)


@dataclass
class MaskingConfig:
    mask_prob: float = f(0.65, "Probability of each frame starting a masked span (expected coverage about 49%).")
    mask_length: int = f(10, "Length of each masked span, in frames.")
    min_masks: int = f(1, "Minimum number of spans per utterance.")
    require_same_masks: bool = f(True, "Every row of a batch gets the same number of masked frames.")
    mask_channel_prob: float = f(0.0, "Probability of each channel starting a masked channel span (fine-tuning).")
    mask_channel_length: int = f(64, "Length of each masked channel span.")
    mask_prob_adjust: float = f(
        0.0, "data2vec 2.0 block masks: extra share of block centres drawn before each row is corrected to exactly "
        "floor(mask_prob x frames) masked frames (base 0.05, large 0.1).")
    clone_batch: int = f(1, "data2vec 2.0: masked copies of each utterance (M); the conv encoder and the teacher "
                         "run once per utterance (base 8, large 12).")
    block_patches: int = f(120, "Images: patches BEiT's block masking masks per image at most (120 of 196).")
    block_min_patches: int = f(16, "Images: smallest block, in patches.")
    block_min_aspect: float = f(0.3, "Images: block aspect ratios lie between this and its inverse.")
    inverse_mask: bool = f(
        False, "data2vec 2.0 images: the 2-D blocks mark the patches that stay visible, 1 - mask_prob of them "
        "(the image recipe: true, mask_prob 0.8, mask_length 3 = 3x3 blocks).")
    leave_unmasked_prob: float = f(
        0.0, "Text: share of the chosen tokens left as they are (still predicted); 0 in the data2vec text "
        "recipe, 0.1 in BERT's 80/10/10. mask_prob (0.35) and mask_length (4) set the spans.")
    random_token_prob: float = f(
        0.0, "Text: share of the chosen tokens replaced by a random token (still predicted); 0 in the recipe, "
        "0.1 in BERT's 80/10/10.")


@dataclass
class VisionModelConfig:
    """The ViT of `modality: images` (d2vcli.models.vision.VisionConfig, whose fields these are; the
    defaults are its ViT-B/16 as data2vec 1.0 vision pretrains it)."""

    image_size: int = f(224, "Input height and width in pixels (square; 224 in the paper).")
    patch_size: int = f(16, "Side of one square patch in pixels (224/16: a 14x14 grid of 196 patches).")
    in_channels: int = f(3, "Colour channels of the input (RGB).")
    embed_dim: int = f(768, "Width D of the ViT (ViT-B 768, ViT-L 1024).")
    num_layers: int = f(12, "Transformer blocks (ViT-B 12, ViT-L 24).")
    num_heads: int = f(12, "Attention heads (ViT-B 12, ViT-L 16).")
    ffn_dim: int = f(3072, "Hidden width of each block's MLP (4 x D).")
    layer_norm_eps: float = f(1e-6, "LayerNorm epsilon (BEiT 1e-6).")
    layer_scale_init: float = f(1e-4, "Initial layer scale gamma (base 1e-4, large 1e-5; 0 disables it).")
    rel_pos_bias: Literal["shared", "per-layer"] = f(
        "shared", "Relative position bias: one table for all blocks (the recipe) or one per block.")
    drop_path: float = f(0.25, "Stochastic depth of the last block, rising linearly from 0 (base 0.25, large 0.2).")
    attention_dropout: float = f(0.05, "Dropout on the attention probabilities (base 0.05, large 0.15).")
    dropout: float = f(0.0, "Dropout after the attention projection and the MLP (0 in the recipe).")
    init_std: float = f(0.02, "Std of the truncated-normal init of Linear, Conv, CLS and mask token.")
    image_mean: tuple[float, float, float] = f(
        (0.485, 0.456, 0.406), "Per-channel mean subtracted from [0, 1] pixels (ImageNet statistics).")
    image_std: tuple[float, float, float] = f(
        (0.229, 0.224, 0.225), "Per-channel std the pixels are divided by (ImageNet statistics).")
    prenet_depth: int = f(0, "data2vec 2.0 (model.version 2): blocks before the num_layers main ones, never "
                          "targets (ViT-B 2, ViT-L 0).")
    decoder_dim: int = f(768, "data2vec 2.0 pretraining: channels of the 2-D conv decoder (ViT-B 768, ViT-L 1024).")
    decoder_layers: int = f(6, "data2vec 2.0 pretraining: conv decoder blocks (ViT-B 6, ViT-L 3).")
    decoder_kernel: int = f(3, "data2vec 2.0 pretraining: kernel of each decoder conv, odd (ViT-B 3, ViT-L 5).")
    decoder_groups: int = f(16, "data2vec 2.0 pretraining: groups of each decoder conv.")


@dataclass
class TextModelConfig:
    """The encoder of `modality: text` (d2vcli.models.text.TextConfig, whose fields these are; the defaults
    are RoBERTa base as data2vec 1.0 text pretrains it). Token ids come from the corpus's tokenizer."""

    vocab_size: int = f(0, "Token embedding rows, <mask> included; 0 = the prepared corpus's tokenizer "
                        "(data/text/spm.model). The RoBERTa dictionary + <mask> is 50265.")
    mask_id: int = f(-1, "Id of <mask>; -1 = the tokenizer's.")
    pad_id: int = f(1, "Id of <pad> (the fairseq/RoBERTa convention: 0 <s>, 1 <pad>, 2 </s>, 3 <unk>).")
    max_positions: int = f(512, "Longest sequence, <s> included; the position table has max_positions + 2 rows "
                           "(fairseq's 514).")
    embed_dim: int = f(768, "Width D of the transformer.")
    num_layers: int = f(12, "Transformer layers.")
    num_heads: int = f(12, "Attention heads.")
    ffn_dim: int = f(3072, "Hidden width of each layer's FFN (4 x D).")
    dropout: float = f(0.1, "Dropout after the embeddings, the attention projection and the FFN.")
    attention_dropout: float = f(0.1, "Dropout on the attention probabilities.")
    activation_dropout: float = f(0.0, "Dropout after the FFN's GELU.")
    layerdrop: float = f(0.0, "Probability of skipping each layer in training (0 in the recipe).")
    layer_norm_eps: float = f(1e-5, "LayerNorm epsilon (fairseq 1e-5; Hugging Face's default 1e-12 differs).")
    init_std: float = f(0.02, "Std of the N(0, std) init of embeddings and Linear layers (init_bert_params).")
    pooler_dropout: float = f(0.0, "Fine-tuning: dropout inside the classification head (RoBERTa's 0.0).")
    decoder_dim: int = f(768, "data2vec 2.0 (model.version 2): channels of the conv decoder (text base 768).")
    decoder_layers: int = f(5, "data2vec 2.0: conv decoder blocks, Conv1d -> LayerNorm -> GELU, no residual (5).")
    decoder_kernel: int = f(9, "data2vec 2.0: kernel of each decoder conv (text base 9).")
    decoder_groups: int = f(1, "data2vec 2.0: groups of each decoder conv (text base 1).")
    decoder_dropout: float = f(0.1, "data2vec 2.0: dropout on the encoder output before the decoder (0.1).")


@dataclass
class ObjectiveConfig:
    average_top_k_layers: int = f(8, "Targets average the teacher's top K layer FFN outputs.")
    layer_target_norm: Literal["instance", "layer", "batch", "none"] = f(
        "instance", "Normalization of each target layer before averaging (instance = over time, per channel)."
    )
    final_target_norm: Literal["instance", "layer", "none"] = f("none", "Normalization of the averaged target.")
    loss_beta: float = f(0.0, "0 = squared error; > 0 = smooth L1 with this beta.")
    loss_scale: Optional[float] = f(None, "Loss multiplier; null means 1/sqrt(D).")
    ema_decay: float = f(0.999, "Teacher EMA decay at update 0.")
    ema_end_decay: float = f(0.9999, "Teacher EMA decay after the anneal.")
    ema_anneal_end_step: int = f(30_000, "Updates over which the decay goes linearly from ema_decay to ema_end_decay.")
    min_target_std: float = f(0.1, "Collapse guard: stop (with a checkpoint) if the target std falls below this.")
    min_pred_std: float = f(0.01, "Collapse guard: stop (with a checkpoint) if the prediction std falls below this.")
    min_conv_time_share: float = f(
        0.02, "Collapse guard: stop if the time-varying share of the conv features' energy falls below this "
        "(speech-tiny: 0.43 at init, 0.006 collapsed; 0 disables). Checked on log steps.")
    max_position_share: float = f(
        0.5, "Collapse guard: stop if frame position explains more than this share of the target variance "
        "(chance-corrected R²; healthy about 0, collapsed speech-tiny 0.84; 1 disables). Checked on log steps.")
    min_teacher_var_ratio: float = f(
        10.0, "Collapse guard: stop if a target layer's variance over time falls below this multiple of the "
        "instance-norm eps 1e-5 (at 10, 1/11 of each normalized target is residue; 0 disables). Log steps.")
    collapse_check_after: int = f(5_000, "Updates before the collapse guards are armed.")
    cls_loss: float = f(
        0.0, "data2vec 2.0 images: weight of the CLS loss (the CLS output regresses the mean patch target; "
        "0.01 in the recipe, scaled like fairseq's by the micro-batch's masked-patch count; docs/images.md).")
    text_teacher_input: Literal["unmasked", "masked-only"] = f(
        "unmasked", "Text: what the EMA teacher reads: the unmasked sequence (the paper) or only the masked "
        "tokens, the others as padding (the released fairseq code, issue #4881; docs/text.md).")
    teacher_ema_embeddings: bool = f(
        False, "Text: average the embeddings (tokens, positions, their LayerNorm) into the teacher like its layers "
        "instead of copying the student's every step (the recipe copies them, fairseq ema_transformer_layers_only; "
        "text-tiny averages them: docs/text.md).")


@dataclass
class OptimConfig:
    lr: float = f(5e-4, "Peak learning rate.")
    betas: tuple[float, float] = f((0.9, 0.98), "Adam betas.")
    eps: float = f(1e-6, "Adam epsilon.")
    weight_decay: float = f(0.01, "Decoupled (AdamW) weight decay, applied to all parameters as in fairseq's recipe (docs/recipe.md).")
    no_decay_1d: bool = f(
        False, "Exempt biases, norms, other 1-D parameters and cls_token from weight decay (the BEiT recipe "
        "of data2vec vision); false = decay everything (fairseq's audio recipe).")
    clip_norm: float = f(0.0, "Gradient clipping max norm; 0 disables it.")


@dataclass
class ScheduleConfig:
    kind: Literal["tri_stage", "cosine", "polynomial", "constant"] = f(
        "tri_stage", "Learning-rate schedule (polynomial: linear warmup, then linear decay to 0, RoBERTa's GLUE "
        "fine-tuning).")
    phase_ratio: tuple[float, float, float] = f(
        (0.03, 0.9, 0.07), "tri_stage: fractions of max_updates for warmup, hold and exponential decay."
    )
    init_lr_scale: float = f(0.01, "tri_stage: warmup starts at lr x this.")
    final_lr_scale: float = f(0.01, "tri_stage: decay ends at lr x this.")
    warmup_updates: int = f(0, "cosine and polynomial: linear warmup updates from 0 to lr.")


@dataclass
class TrainConfig:
    max_updates: int = f(400_000, "Optimizer updates.")
    batch_seconds: float = f(
        3800.0,
        "Audio seconds per optimizer update (the recipe: 16 GPUs x 3.8M samples = 3800 s, docs/recipe.md). "
        "Gradient accumulation is derived from this, max_tokens and the world size.",
    )
    images_per_update: int = f(
        2048, "Images: images per optimizer update (the ViT-B recipe: 16 GPUs x 128 = 2048). Gradient "
        "accumulation is derived from this, data.images_per_batch and the world size.",
    )
    tokens_per_update: int = f(
        131_072, "Text: tokens per optimizer update (data2vec text: max_tokens 8192 x 16 GPUs = 131,072, about "
        "256 blocks of 512; docs/text-data.md). Gradient accumulation is derived from this, "
        "data.text_tokens_per_batch and the world size.",
    )
    sequences_per_update: int = f(
        32, "Text fine-tuning: labeled records per optimizer update (fairseq's GLUE batch_size: 16 or 32 "
        "sentences per task, docs/glue.md). Gradient accumulation is derived from this, "
        "data.text_sequences_per_batch and the world size.",
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = f(
        "auto", "auto = bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU."
    )
    seed: int = f(1, "Random seed.")
    log_every: int = f(10, "Updates between metric lines in metrics.jsonl.")
    save_every: int = f(25_000, "Updates between checkpoints.")
    keep_last: int = f(2, "Rolling checkpoints to keep (besides last.pt and best.pt).")
    keep_every: int = f(0, "Also keep every checkpoint whose update is a multiple of this; 0 = none.")
    max_nonfinite: int = f(10, "Stop after this many consecutive non-finite losses.")
    device: str = f("auto", "auto, cpu, cuda or cuda:N.")
    compile: Literal["auto", "on", "off"] = f(
        "auto", "torch.compile the model: auto = on CUDA, off on CPU. A compilation that fails falls back to "
        "eager with a one-line warning. Pair it with data.length_buckets so shapes repeat (docs/gpu.md).",
    )
    activation_checkpointing: bool = f(
        False, "Recompute each transformer layer's activations in the backward pass instead of keeping them "
        "(torch.utils.checkpoint, non-reentrant): a third more transformer compute for about 9x less activation "
        "memory. Needed when data.max_tokens outgrows the GPU (speech-large at 1.9M fits 80 GB without; docs/gpu.md).",
    )
    fused_alibi: bool = f(
        False, "data2vec 2.0 speech in bf16/fp16: give the ALiBi bias to SDPA in that dtype, so a fused attention "
        "kernel (memory-efficient on CUDA) runs; off forms the logits in fp32 first, as fairseq does. The bias is "
        "then rounded to bf16/fp16; no effect in fp32 or without ALiBi (docs/gpu.md).",
    )
    wandb_project: str = f(
        "", "Weights & Biases project to log to as well (rank 0, beside metrics.jsonl and TensorBoard); "
        "empty = off. Needs `pip install wandb`; the W&B run is named after the d2v run.",
    )
    wandb_mode: Literal["online", "offline"] = f(
        "online", "W&B mode: online, or offline (no network; upload later with "
        "`wandb sync runs/<name>/wandb/offline-run-*`)."
    )


@dataclass
class FinetuneConfig:
    init: str = f("", "Pretrained checkpoint (a path, or a run name in the workspace) to start from; "
                  "'scratch' = random weights (the baseline), architecture from finetune.arch_preset and model.*.")
    arch_preset: str = f("", "With init=scratch: the pretrain preset whose model section is the architecture "
                         "(e.g. speech-tiny); model.* settings override it. Empty: the model.* defaults (Base).")
    init_from: Literal["student", "teacher"] = f("student", "Which pretrained weights initialize the encoder.")
    freeze_updates: int = f(0, "Updates during which only the CTC head trains.")
    encoder_lr_scale: float = f(
        1.0, "Speech CTC: the encoder trains at optim.lr x this, the CTC head at optim.lr (1 = one rate for "
        "all, fairseq's recipe). Lets a small model's fresh head learn fast while the pretrained encoder moves "
        "slowly.")
    final_dropout: float = f(0.0, "Dropout before the CTC head.")
    validate_every: int = f(1000, "Updates between validations.")
    validate_after: int = f(0, "No validation before this update.")
    best_metric: str = f("dev-other/wer", "Metric (split/wer or split/cer) that selects best.pt; lower is better.")
    early_stop_patience: int = f(0, "Stop after this many validations without improvement; 0 disables.")
    layer_decay: float = f(
        0.65, "Images: layer-wise lr decay; block i trains at lr x decay^(L - i), the patch embedding at "
        "decay^(L + 1), the head at lr (the BEiT recipe's 0.65).")
    mixup: float = f(0.8, "Images: mixup Beta(alpha, alpha) parameter; 0 = off.")
    cutmix: float = f(1.0, "Images: cutmix Beta(alpha, alpha) parameter; 0 = off. With both on, each batch "
                      "takes one of the two at random (the recipe's switch probability 0.5).")
    label_smoothing: float = f(0.1, "Images: label smoothing of the (mixed) targets.")
    linear_probe: bool = f(False, "Images: freeze the encoder and train only fc_norm and the linear head "
                           "(no mixup, cutmix, drop path or RandAugment).")
    task: str = f("", "Text: the labeled task to fine-tune on, a folder of <workdir>/data/glue/ (RTE, SST-2, "
                  "AGREEMENT...); empty = the only task there.")
    task_schedule: bool = f(
        False, "Text: when finetune.task is a GLUE task, take its batch, warmup, updates, lr and validation "
        "interval from the recipe's per-task table (docs/glue.md), except values given with --set or --config "
        "(applied when `d2v finetune` resolves its config: finetune_text.with_task_schedule).")


@dataclass
class DecodeConfig:
    beam: int = f(50, "Beam size.")
    beam_threshold: float = f(50.0, "Prune hypotheses scoring this far below the best.")
    beam_size_token: int = f(0, "Tokens considered per frame; 0 = the whole vocabulary.")
    lm_weight: float = f(2.0, "KenLM weight.")
    word_score: float = f(-1.0, "Score added per word.")
    sil_weight: float = f(0.0, "Score added per silence (word boundary) token.")
    unk_weight: float = f(float("-inf"), "Score of an unknown word.")
    workers: int = f(0, "Beam-search worker processes; 0 = one per core.")
    batch_size: int = f(8, "Utterances per acoustic-model batch when computing emissions.")
    tune_split: str = f("dev-other", "Split that `d2v decode --tune` tunes lm_weight, word_score and sil_weight on.")
    tune_trials: int = f(64, "Settings tried by --tune (fairseq's Ax sweeps: 64 or 128 trials).")
    tune_search: Literal["random", "grid"] = f("random", "--tune search: uniform random samples or a regular grid.")
    tune_beam: int = f(500, "Beam while tuning (wav2vec 2.0 protocol: tune at 500, test at a larger beam).")
    tune_lm_weight: tuple[float, float] = f((0.0, 5.0), "lm_weight range searched by --tune (fairseq ax.yaml).")
    tune_word_score: tuple[float, float] = f((-5.0, 5.0), "word_score range searched by --tune (fairseq ax.yaml).")
    tune_sil_weight: tuple[float, float] = f((-8.0, 0.0), "sil_weight range searched by --tune (fairseq ax.yaml).")


@dataclass
class Config:
    """Everything a d2v run needs; saved as config.yaml in every run directory."""

    modality: Literal["speech", "images", "text"] = f(
        "speech", "What the run trains on: speech (the `model` section, manifests in data/), images "
        "(the `vision` section, manifests in data/images/ from `d2v prepare images`) or text (the `text` "
        "section, token shards in data/text/ from `d2v prepare text`).")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    vision: VisionModelConfig = field(default_factory=VisionModelConfig)
    text: TextModelConfig = field(default_factory=TextModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def validate(self, command: Optional[str] = None) -> None:
        """Reject impossible combinations with a message that says what to change (config_checks.py holds
        the checks). The image objective's settings (top-K, block masks) are not checked for `d2v finetune`,
        which ignores them."""
        problems = config_checks.config_problems(self, command)
        if problems:
            raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- named recipes


def pretrain_base() -> Config:
    """data2vec 1.0 base, LibriSpeech 960 h: the dataclass defaults."""
    return Config()


def pretrain2_base() -> Config:
    """data2vec 2.0 base, LibriSpeech 960 h (fairseq examples/data2vec/config/v2/base_audio_only_task.yaml).

    The presets speech2-base, speech2-large and speech2-tiny are YAML deltas over this; every value
    and its source is in docs/recipe2.md.
    """
    cfg = Config()
    # 8 GPUs x 1M samples = 8M samples = 500 s of audio per update, before cloning.
    cfg.data = dataclasses.replace(cfg.data, max_tokens=1_000_000)
    cfg.model = dataclasses.replace(cfg.model, version=2, prenet_depth=0, layerdrop=0.05, decoder_dim=384,
                                    decoder_layers=4, decoder_kernel=7, decoder_groups=16, decoder_dropout=0.1)
    cfg.masking = dataclasses.replace(cfg.masking, mask_prob=0.5, mask_length=5, mask_prob_adjust=0.05,
                                      clone_batch=8, min_masks=0, require_same_masks=True)
    cfg.objective = dataclasses.replace(cfg.objective, average_top_k_layers=8, layer_target_norm="instance",
                                        final_target_norm="none", ema_decay=0.999, ema_end_decay=0.99999,
                                        ema_anneal_end_step=75_000)
    cfg.optim = OptimConfig(lr=7.5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01, clip_norm=0.0)
    cfg.schedule = ScheduleConfig(kind="cosine", warmup_updates=8000)
    cfg.train = dataclasses.replace(cfg.train, max_updates=400_000, batch_seconds=500.0)
    return cfg


def finetune_base() -> Config:
    """CTC fine-tuning defaults (fairseq base_100h.yaml with normalize=true, see docs/librispeech.md).

    The architecture comes from the pretrained checkpoint; only regularization
    (dropouts, layerdrop, masking) and the optimization recipe are set here.
    """
    cfg = Config()
    cfg.data = dataclasses.replace(
        cfg.data, train_splits=("train-clean-100",), max_tokens=3_200_000, min_sample_size=0, normalize=None
    )
    cfg.model = dataclasses.replace(
        cfg.model, dropout=0.0, attention_dropout=0.0, activation_dropout=0.1, layerdrop=0.1, feature_grad_mult=0.0
    )
    cfg.masking = dataclasses.replace(cfg.masking, mask_prob=0.65, mask_channel_prob=0.5, min_masks=1,
                                      require_same_masks=True)
    cfg.optim = OptimConfig(lr=3e-5, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0, clip_norm=0.0)
    cfg.schedule = ScheduleConfig(kind="tri_stage", phase_ratio=(0.1, 0.4, 0.5), init_lr_scale=0.01,
                                  final_lr_scale=0.05)
    cfg.train = dataclasses.replace(cfg.train, max_updates=80_000, batch_seconds=1600.0, save_every=1000)
    cfg.finetune = FinetuneConfig(freeze_updates=0, validate_every=1000)
    return cfg


# Explicit list: preset name -> (command it belongs to, YAML file in d2vcli/presets/).
PRESETS: dict[str, tuple[str, str]] = {
    "speech-base": ("pretrain", "speech-base.yaml"),
    "speech-large": ("pretrain", "speech-large.yaml"),
    "speech-tiny": ("pretrain", "speech-tiny.yaml"),
    "vision-base": ("pretrain", "vision-base.yaml"),
    "vision-large": ("pretrain", "vision-large.yaml"),
    "vision-tiny": ("pretrain", "vision-tiny.yaml"),
    "vision2-base": ("pretrain", "vision2-base.yaml"),
    "vision2-large": ("pretrain", "vision2-large.yaml"),
    "vision2-tiny": ("pretrain", "vision2-tiny.yaml"),
    "text-base": ("pretrain", "text-base.yaml"),
    "text-tiny": ("pretrain", "text-tiny.yaml"),
    "text2-base": ("pretrain", "text2-base.yaml"),
    "text2-tiny": ("pretrain", "text2-tiny.yaml"),
    "speech2-base": ("pretrain", "speech2-base.yaml"),
    "speech2-large": ("pretrain", "speech2-large.yaml"),
    "speech2-tiny": ("pretrain", "speech2-tiny.yaml"),
    "finetune-10m": ("finetune", "finetune-10m.yaml"),
    "finetune-1h": ("finetune", "finetune-1h.yaml"),
    "finetune-10h": ("finetune", "finetune-10h.yaml"),
    "finetune-100h": ("finetune", "finetune-100h.yaml"),
    "finetune-960h": ("finetune", "finetune-960h.yaml"),
    "finetune-vox-10m": ("finetune", "finetune-vox-10m.yaml"),
    "finetune-vox-1h": ("finetune", "finetune-vox-1h.yaml"),
    "finetune-vox-10h": ("finetune", "finetune-vox-10h.yaml"),
    "finetune-vox-100h": ("finetune", "finetune-vox-100h.yaml"),
    "finetune-vox-960h": ("finetune", "finetune-vox-960h.yaml"),
    "finetune-tiny": ("finetune", "finetune-tiny.yaml"),
    "vision-ft-base": ("finetune", "vision-ft-base.yaml"),
    "vision-ft-large": ("finetune", "vision-ft-large.yaml"),
    "vision-ft-tiny": ("finetune", "vision-ft-tiny.yaml"),
    "glue-base": ("finetune", "glue-base.yaml"),
    "glue-tiny": ("finetune", "glue-tiny.yaml"),
}

DEFAULTS = {"pretrain": pretrain_base, "finetune": finetune_base}
# Presets that are deltas over another recipe than their command's defaults.
PRESET_BASES = {"speech2-base": pretrain2_base, "speech2-large": pretrain2_base, "speech2-tiny": pretrain2_base}


# --------------------------------------------------------------------------- resolution


def preset_path(name: str) -> Path:
    return PRESETS_DIR / PRESETS[name][1]


def resolve(
    command: str,
    preset: Optional[str] = None,
    config_file: Optional[Path] = None,
    overrides: Optional[list[str]] = None,
    base: Optional[Config] = None,
) -> Config:
    """Build the config for `command` (pretrain/finetune/...): defaults, preset, file, --set."""
    if preset and preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'.{_suggest(preset, list(PRESETS))}")
    if base is not None:
        cfg = base
    elif preset in PRESET_BASES and PRESETS[preset][0] == command:
        cfg = PRESET_BASES[preset]()
    else:
        cfg = DEFAULTS.get(command, Config)()
    if preset:
        owner = PRESETS[preset][0]
        if owner != command and command in DEFAULTS:
            raise ConfigError(f"preset '{preset}' is for `d2v {owner}`, not `d2v {command}`")
        cfg = merge(cfg, load_yaml(preset_path(preset)))
    if config_file:
        cfg = merge(cfg, load_yaml(Path(config_file)))
    for item in overrides or []:
        cfg = merge(cfg, parse_set(item))
    if command != "finetune" and cfg.data.normalize is None:
        raise ConfigError("data.normalize=null means 'as the pretrained checkpoint' and only applies to "
                          "`d2v finetune`; set it to true or false")
    cfg.validate(command)
    return cfg


def from_dict(data: dict, cls: type = Config) -> Any:
    """Inverse of to_dict, strict (used for configs stored in checkpoints)."""
    return merge(cls(), data)


def base_config(command: str, preset: Optional[str] = None) -> Config:
    """What `cfg` is compared against on screen: the command's defaults with the preset applied."""
    return resolve(command, preset=preset) if command in DEFAULTS else Config()
