"""fairseq's data2vec 1.0 audio pretraining update on CPU, timed: the peer of bench_pretrain.py's `cmp` case.

    /tmp/fs310/bin/python benchmarks/fairseq_peer.py '{"embed_dim": 256, ...}'   # or the spec on stdin

Runs under a Python that has fairseq 0.12.2 (recipe: the docstring of bench_pretrain.py); it never
imports d2vcli. The spec (a JSON object, made by `bench_pretrain.peer_spec` from our resolved config)
names the model, the batch shape, the update count, the threads and the seed; the output is one line
`RESULT {json}` with the median seconds per update after 2 warm-up updates and audio-seconds/second.

One update is what fairseq's trainer does per update on one CPU process, in fp32, called directly
instead of through fairseq-train (fairseq/trainer.py `Trainer.train_step`,
fairseq/tasks/fairseq_task.py `FairseqTask.train_step`):

1. `optimizer.zero_grad()`;
2. `model.set_num_updates(u)`: the EMA teacher step (examples/data2vec/models/data2vec_audio.py;
   the first call builds the teacher), before the forward as in fairseq;
3. the `model` criterion (fairseq/criterions/model_criterion.py): the model's forward, which draws
   fairseq's own span mask (fairseq/data/data_utils.py `compute_mask_indices`), runs the teacher on
   the unmasked features and returns the regression loss and the masked-frame count;
4. `optimizer.backward(loss)`, `multiply_grads(1 / sample_size)`, `clip_grad_norm(clip_norm)` (the
   norm is computed even when clip_norm is 0), `optimizer.step()` with FairseqAdam (fairseq/optim/adam.py:
   on CPU its own decoupled-weight-decay Adam), and the tri-stage `lr_scheduler.step_update`.

A fresh random batch (B, S) of N(0, 1) "audio" is drawn each update inside the timed region, as the
in-memory loader of bench_pretrain.py does for ours; there is no padding (fairseq's audio_pretraining
crops a batch to one length and sends no padding_mask).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

WARMUP = 2  # updates left out of the median (the first builds the EMA teacher)
MIN_SCHEDULE = 1000  # updates the lr schedule spans at least (see build)


def fairseq_model_args(spec: dict) -> dict:
    """Data2VecAudioConfig fields (examples/data2vec/models/data2vec_audio.py and Wav2Vec2Config in
    fairseq/models/wav2vec/wav2vec2.py) for the spec; fairseq's data2vec base recipe
    (examples/data2vec/config/audio/pretraining/base_librispeech.yaml) for everything not named there."""
    depth = spec["pos_conv_depth"]
    norms = {"instance": "instance_norm_target_layer", "layer": "layer_norm_target_layer",
             "batch": "batch_norm_target_layer"}
    if spec["layer_target_norm"] not in norms and spec["layer_target_norm"] != "none":
        raise ValueError(f"layer_target_norm {spec['layer_target_norm']!r} has no fairseq equivalent")
    if spec["final_target_norm"] not in ("none", "instance", "layer"):
        raise ValueError(f"final_target_norm {spec['final_target_norm']!r} has no fairseq equivalent")
    args = {
        "extractor_mode": "layer_norm", "conv_bias": False, "layer_norm_first": False, "activation_fn": "gelu",
        "conv_feature_layers": repr([tuple(layer) for layer in spec["conv_layers"]]),
        "encoder_embed_dim": spec["embed_dim"], "encoder_layers": spec["num_layers"],
        "encoder_attention_heads": spec["num_heads"], "encoder_ffn_embed_dim": spec["ffn_dim"],
        "dropout": spec["dropout"], "attention_dropout": spec["attention_dropout"],
        "activation_dropout": spec["activation_dropout"], "dropout_input": spec["dropout_input"],
        "dropout_features": 0.0, "encoder_layerdrop": spec["layerdrop"],
        "feature_grad_mult": spec["feature_grad_mult"],
        # fairseq's positional conv kernel is max(3, conv_pos // pos_conv_depth): conv_pos = k x depth gives k.
        "pos_conv_depth": depth, "conv_pos": spec["pos_conv_kernel"] * depth,
        "conv_pos_groups": spec["pos_conv_groups"],
        "mask_prob": spec["mask_prob"], "mask_length": spec["mask_length"],
        "require_same_masks": spec["require_same_masks"], "mask_dropout": 0.0, "mask_channel_prob": 0.0,
        "average_top_k_layers": spec["average_top_k_layers"], "loss_beta": spec["loss_beta"],
        "loss_scale": spec["loss_scale"], "ema_decay": spec["ema_decay"], "ema_end_decay": spec["ema_end_decay"],
        "ema_anneal_end_step": spec["ema_anneal_end_step"], "max_update": spec["max_update"],
        "ema_transformer_only": True, "ema_layers_only": True,
        "instance_norm_targets": spec["final_target_norm"] == "instance",
        "layer_norm_targets": spec["final_target_norm"] == "layer",
    }
    for name, field in norms.items():
        args[field] = spec["layer_target_norm"] == name
    return args


def build(spec: dict):
    """(model, criterion, optimizer, lr_scheduler), as fairseq's train.py builds them."""
    import torch
    from fairseq.criterions.model_criterion import ModelCriterion
    from fairseq.examples.data2vec.models.data2vec_audio import Data2VecAudioConfig, Data2VecAudioModel
    from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
    from fairseq.optim.lr_scheduler.tri_stage_lr_scheduler import TriStageLRSchedule, TriStageLRScheduleConfig

    model = Data2VecAudioModel(Data2VecAudioConfig(**fairseq_model_args(spec)))
    criterion = ModelCriterion(None, loss_weights={}, log_keys=["ema_decay", "target_var", "pred_var"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = FairseqAdam(FairseqAdamConfig(adam_betas=str(tuple(spec["betas"])), adam_eps=spec["eps"],
                                              weight_decay=spec["weight_decay"], lr=[spec["lr"]], tpu=False), params)
    # fairseq's tri-stage schedule divides by its decay-stage length, which int(max_update x ratio) rounds
    # to 0 in a 10-update run: it spans at least MIN_SCHEDULE updates (the lr value costs nothing).
    scheduler = TriStageLRSchedule(TriStageLRScheduleConfig(
        phase_ratio=tuple(spec["phase_ratio"]), init_lr_scale=spec["init_lr_scale"],
        final_lr_scale=spec["final_lr_scale"], max_update=max(spec["max_update"], MIN_SCHEDULE),
        lr=[spec["lr"]]), optimizer)
    torch.nn.Module.train(model)
    return model, criterion, optimizer, scheduler


def run(spec: dict) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    np.random.seed(spec["seed"])  # fairseq's compute_mask_indices draws from numpy's global RNG
    model, criterion, optimizer, scheduler = build(spec)
    g = torch.Generator().manual_seed(0)
    batch, samples = spec["batch"], spec["samples"]
    times = []
    for update in range(WARMUP + spec["steps"]):
        t = time.perf_counter()
        sample = {"id": torch.arange(batch), "net_input": {"source": torch.randn(batch, samples, generator=g)}}
        optimizer.zero_grad()
        model.train()
        model.set_num_updates(update)  # EMA step (the first call makes the teacher)
        loss, sample_size, logging = criterion(model, sample)
        optimizer.backward(loss)
        optimizer.multiply_grads(1.0 / (sample_size or 1.0))
        grad_norm = optimizer.clip_grad_norm(spec["clip_norm"])
        if not torch.isfinite(grad_norm).all():
            raise FloatingPointError("gradients are Nan/Inf")
        optimizer.step()
        scheduler.step_update(update + 1)
        float(logging["loss"])  # the trainer's logging reads the loss back
        times.append(time.perf_counter() - t)
    update_s = statistics.median(times[WARMUP:])
    return {
        "peer": "fairseq", "threads": torch.get_num_threads(), "update_s": update_s,
        "audio_s_per_s": batch * samples / 16000 / update_s,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "masked_frames": int(sample_size), "loss": float(logging["loss"]) / sample_size,
        "versions": {"fairseq": __import__("fairseq").__version__, "torch": torch.__version__,
                     "python": sys.version.split()[0]},
    }


def main() -> None:
    text = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()
    print("RESULT " + json.dumps(run(json.loads(text))))


if __name__ == "__main__":
    main()
