"""Pretraining throughput through the real engine: audio-seconds/second, peak memory, EMA cost, conv passes.

    python benchmarks/bench_pretrain.py                          # tiny and base on CPU (+ GPU when present)
    python benchmarks/bench_pretrain.py --device cuda --configs base,large --steps 12
    python benchmarks/bench_pretrain.py --configs tiny,tiny2,base,base2   # data2vec 1.0 and 2.0 side by side

`tiny2`/`base2` are data2vec 2.0 (presets speech2-tiny / speech2-base) with the same encoder size
and the same unique audio per update as `tiny`/`base`, so their audio-s/s compare directly (2.0
encodes each utterance's visible frames M times). The forward-time shares split each case's
training time into the conv front end, the student encoder (transformer / context encoder), the
head (1.0's final_proj, 2.0's conv decoder) and the teacher; backward time is not split.

Each (config, device) case runs in its own subprocess, so peak memory is that case's alone.
A case is `engine.train` over an in-memory loader of random "audio" crops (no disk I/O, so the
number is the model + engine; the real data loader runs in worker processes beside it), with
`train.log_every=1`: the throughput is the median over the updates after the first two (warm-up)
of the engine's own audio_s_per_s. On top of that it reports:

- EMA: the time of one `EMATeacher.step` (median of 20, after warm-up) as a fraction of an update;
- conv passes per micro-batch: forward calls of the conv feature encoder counted with a hook (1 means
  the teacher reuses the student's features and adds no conv-encoder pass), and teacher passes;
- MFU on GPU: achieved FLOP/s over the GPU's dense bf16 peak, with the update's FLOPs counted from
  the architecture by `d2vcli.flops` (formula in docs/gpu.md; about 56 GFLOP per audio-second for
  base and 154 for large at 15.6 s crops).
- `--threads 1,2` runs every case once per thread count, one after the other, and prints the speed-up
  of each count over the first (on a shared machine the ratio is only as good as the load is steady).

fairseq comparison (issue 16: our update >= 1.5x fairseq's on CPU). The `cmp` case is a 4 x 256
transformer (4 heads, FFN 1024) over data2vec's conv layout with 128 channels, the speech-base
recipe otherwise (top-K 4 = all layers, LayerDrop 0, dropout 0.1 / attention 0.1 / activation 0),
one micro-batch of 4 x 5 s per update. With `--fairseq-python` each of its runs is followed by
`fairseq_peer.py` under that Python, which builds fairseq 0.12.2's own `Data2VecAudioModel`
(examples/data2vec/models/data2vec_audio.py, shipped in the pip package as `fairseq.examples`) from
`peer_spec` of our resolved config, and times what fairseq's trainer does per update
(fairseq/trainer.py `train_step`, fairseq/tasks/fairseq_task.py `train_step`: EMA step in
`set_num_updates`, the `model` criterion's forward with fairseq's `compute_mask_indices`, backward,
grads x 1/sample_size, grad norm, FairseqAdam step, tri-stage lr); a table prints threads, both
audio-s/s, their ratio, both parameter counts (equal: 3.91M) and both last updates' masked-frame
counts (of 4 x 249 frames; random draws of the same mask distribution, so close but not equal).
Both medians leave out 2 warm-up updates.

    python benchmarks/bench_pretrain.py --configs cmp --device cpu --threads 1,2 \
        --fairseq-python /tmp/fs310/bin/python --steps 8

The fairseq venv (fairseq 0.12.2 does not import on Python 3.11: a mutable dataclass default;
omegaconf 2.0.6's metadata needs pip < 24.1; torch comes from PyPI, 2.14.1 like ours):

    /root/.pyenv/versions/3.10.13/bin/python -m venv /tmp/fs310
    /tmp/fs310/bin/pip install "pip<24.1"
    /tmp/fs310/bin/pip install torch==2.14.1 fairseq==0.12.2

Differences between the two setups, none of which is a model or batch difference:
- ours goes through `engine.train` (progress bar, metrics every 10th update with the log-step collapse
  monitors, which fall out of the median); its update time is the gap between consecutive EMA steps.
  fairseq's loop is the trainer's per-update work without fairseq-train's metrics aggregation and
  progress logging, which can only favour fairseq;
- fairseq steps the EMA before the forward, ours after the optimizer step: one step per update in both;
- fairseq pads the transformer input to a multiple of 2 frames (`required_seq_len_multiple`; 249 -> 250
  here, with a key padding mask), ours does not (docs in d2vcli/models/audio.py);
- fairseq's masks come from numpy's global RNG, ours from the batch's own stream: the same algorithm and
  mask count (require_same_masks); fairseq's lr schedule spans at least 1,000 updates (its tri-stage
  divides by the decay length, 0 in a 10-update run), which changes no cost;
- FairseqAdam on CPU is fairseq's own per-parameter Adam (fairseq/optim/adam.py; FusedAdam is CUDA
  only), ours torch's fused AdamW: an implementation difference the ratio is meant to include;
- fairseq runs on Python 3.10, ours on 3.11, both fp32 on the same torch.

CPU cases use small batches (a few seconds of audio) so they finish in a few minutes on 2 cores. On a
shared machine pass --threads 1: idle OpenMP threads spinning against other processes can make
2-thread runs several times slower than 1-thread ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from d2vcli.data import Batch
from d2vcli.flops import flops_per_audio_second, peak_flops
from engine_bench import RandomBatches, peak_mem_gb, train_rows, worker_result


# (preset, samples per crop, max_tokens) per device.
CASES = {
    ("tiny", "cpu"): ("speech-tiny", 64_000, 384_000),
    ("base", "cpu"): ("speech-base", 64_000, 64_000),
    ("tiny", "cuda"): ("speech-tiny", 250_000, 3_800_000),
    ("base", "cuda"): ("speech-base", 250_000, 3_800_000),  # 15.6 s crops: LibriSpeech's typical batch
    ("large", "cuda"): ("speech-large", 250_000, 1_200_000),
    ("tiny2", "cpu"): ("speech2-tiny", 64_000, 384_000),
    ("base2", "cpu"): ("speech2-base", 64_000, 64_000),
    ("tiny2", "cuda"): ("speech2-tiny", 250_000, 3_800_000),
    ("base2", "cuda"): ("speech2-base", 250_000, 1_000_000),  # the recipe's 1M samples per GPU
    ("cmp", "cpu"): ("speech-base", 80_000, 320_000),  # 4 x 5 s: the fairseq comparison (below)
}

# Cases that also run fairseq's update (fairseq_peer.py) when --fairseq-python is given, and their
# model: issue 16's 4 x 256 transformer (4 heads, FFN 1024) over data2vec's conv layout with 128
# channels; the rest is the speech-base recipe, top-K clamped to the 4 layers, LayerDrop off.
CMP_CONV = [[128, 10, 5]] + [[128, 3, 2]] * 4 + [[128, 2, 2]] * 2
CASE_OVERRIDES = {
    "cmp": [f"model.conv_layers={json.dumps(CMP_CONV)}", "model.embed_dim=256", "model.num_layers=4",
            "model.num_heads=4", "model.ffn_dim=1024", "model.layerdrop=0.0", "objective.average_top_k_layers=4"],
}
PEER_CASES = ("cmp",)
WARMUP = 2  # updates left out of every median (fairseq_peer.WARMUP too)
PEER_SCRIPT = Path(__file__).resolve().with_name("fairseq_peer.py")
SKIP_NOTE = ("fairseq comparison skipped: pass --fairseq-python PATH (a Python with fairseq 0.12.2; "
             "recipe in the docstring of benchmarks/bench_pretrain.py)")


class ForwardTimer:
    """Wall time spent inside named modules' forward calls (synchronized on GPU)."""

    def __init__(self, device: str):
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.total: dict[str, float] = {}
        self.start: dict[str, float] = {}

    def attach(self, name: str, module: torch.nn.Module) -> None:
        self.total[name] = 0.0

        def pre(*_):
            self.sync()
            self.start[name] = time.perf_counter()

        def post(*_):
            self.sync()
            self.total[name] += time.perf_counter() - self.start[name]

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)


def random_audio(batch: int, samples: int, pin: bool) -> RandomBatches:
    """Fixed-size random crops, endless (in place of data.BatchLoader); pinned for a CUDA run."""

    def make(g: torch.Generator, index: int) -> Batch:
        source = torch.randn(batch, samples, generator=g)
        if pin:
            source = source.pin_memory()
        return Batch(source=source, padding_mask=None, ids=[], num_samples=source.numel(), epoch=1, index=index)

    return RandomBatches(make)


def case_config(name: str, device: str, steps: int):
    """(resolved pretrain Config, batch, samples per crop) of a case. A peer case runs WARMUP more
    updates than `steps` and keeps the default log_every (see run_case); the others log every update."""
    from d2vcli import config as C

    preset, samples, max_tokens = CASES[(name, device)]
    batch = max_tokens // samples
    peer = name in PEER_CASES
    cfg = C.resolve("pretrain", preset=preset, overrides=[
        f"data.max_tokens={max_tokens}", f"train.batch_seconds={batch * samples / 16000}",
        f"train.max_updates={steps + WARMUP if peer else steps}", f"train.save_every={10 * (steps + WARMUP)}",
        f"train.device={'cuda' if device == 'cuda' else 'cpu'}", *([] if peer else ["train.log_every=1"]),
        *CASE_OVERRIDES.get(name, []),
    ])
    return cfg, batch, samples


def peer_spec(cfg, batch: int, samples: int, steps: int, threads: int) -> dict:
    """What fairseq_peer.py builds and times: our resolved config's model, masking, objective, optimizer
    and schedule, the batch shape, the update count (after WARMUP), the threads and the seed."""
    m, mk, obj, opt, sch = cfg.model, cfg.masking, cfg.objective, cfg.optim, cfg.schedule
    if sch.kind != "tri_stage" or mk.min_masks != 1 or mk.mask_channel_prob or m.version != 1:
        raise ValueError("the fairseq peer reproduces the data2vec 1.0 recipe only (tri_stage, min_masks 1, "
                         "no channel masking)")
    return {
        "conv_layers": [list(layer) for layer in m.conv_layers], "embed_dim": m.embed_dim,
        "num_layers": m.num_layers, "num_heads": m.num_heads, "ffn_dim": m.ffn_dim, "dropout": m.dropout,
        "attention_dropout": m.attention_dropout, "activation_dropout": m.activation_dropout,
        "dropout_input": m.dropout_input, "layerdrop": m.layerdrop, "feature_grad_mult": m.feature_grad_mult,
        "pos_conv_depth": m.pos_conv_depth, "pos_conv_kernel": m.pos_conv_kernel,
        "pos_conv_groups": m.pos_conv_groups,
        "mask_prob": mk.mask_prob, "mask_length": mk.mask_length, "require_same_masks": mk.require_same_masks,
        "average_top_k_layers": obj.average_top_k_layers, "layer_target_norm": obj.layer_target_norm,
        "final_target_norm": obj.final_target_norm, "loss_beta": obj.loss_beta, "loss_scale": obj.loss_scale,
        "ema_decay": obj.ema_decay, "ema_end_decay": obj.ema_end_decay,
        "ema_anneal_end_step": obj.ema_anneal_end_step,
        "lr": opt.lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay,
        "clip_norm": opt.clip_norm, "phase_ratio": list(sch.phase_ratio), "init_lr_scale": sch.init_lr_scale,
        "final_lr_scale": sch.final_lr_scale, "max_update": cfg.train.max_updates,
        "batch": batch, "samples": samples, "steps": steps, "threads": threads, "seed": cfg.train.seed,
    }


def run_peer(fairseq_python: str, spec: dict, console) -> Optional[dict]:
    """fairseq's update for `spec` in its own Python (fairseq_peer.py): its RESULT, or None if it failed."""
    return worker_result([fairseq_python, str(PEER_SCRIPT), json.dumps(spec)],
                         f"fairseq peer ({spec['threads']} thr)", console)


def comparison_rows(ours: list[dict], peers: dict[int, dict]) -> list[tuple[str, ...]]:
    """One row per thread count: threads, ours and fairseq's audio-s/s, the ratio, both s/update and params."""
    rows = []
    for r in ours:
        p = peers.get(r["threads"])
        if p is None:
            continue
        rows.append((str(r["threads"]), f"{r['audio_s_per_s']:.2f}", f"{p['audio_s_per_s']:.2f}",
                     f"{r['audio_s_per_s'] / p['audio_s_per_s']:.2f}x", f"{r['update_s']:.3f}",
                     f"{p['update_s']:.3f}", f"{r['params_m']:.3f}M / {p['params_m']:.3f}M",
                     f"{r.get('masked_frames', '-')} / {p.get('masked_frames', '-')}"))
    return rows


def print_comparison(out, table, results: list[dict], peers: dict[str, dict[int, dict]],
                     fairseq_python: Optional[str]) -> None:
    """The ours-vs-fairseq table of each peer case that ran, or the one-line note when it was skipped."""
    cases = [name for name in PEER_CASES if any(r["config"] == name for r in results)]
    if cases and not fairseq_python:
        out.print(SKIP_NOTE)
    for name in cases if fairseq_python else []:
        ours = [r for r in results if r["config"] == name]
        rows = comparison_rows(ours, peers.get(name, {}))
        if not rows:
            out.print(f"{name}: no fairseq result (the peer failed; its output is above)")
            continue
        p = next(iter(peers[name].values()))
        v = p["versions"]
        out.print(table(f"{name}: pretraining update, ours vs fairseq {v['fairseq']} (torch {v['torch']}, "
                        f"Python {v['python']}), CPU fp32, {ours[0]['batch']}",
                        ["threads", "ours audio-s/s", "fairseq audio-s/s", "ours / fairseq", "ours s/update",
                         "fairseq s/update", "params ours / fairseq", "masked frames, last update"], rows))


def run_case(name: str, device: str, steps: int) -> dict:
    from d2vcli.distributed import DistInfo
    from d2vcli.models.audio import parameter_count
    from d2vcli.pretrain import make_task

    cfg, batch, samples = case_config(name, device, steps)
    dev = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    info = DistInfo(0, 1, 0, dev)
    torch.manual_seed(0)
    task = make_task(cfg, dev)
    v2 = cfg.model.version == 2
    timer = ForwardTimer(device)
    timer.attach("conv", task.model.backbone.feature_extractor)
    timer.attach("encoder", task.model.backbone.encoder if v2 else task.model.backbone.transformer)
    timer.attach("head", task.model.decoder if v2 else task.model.final_proj)
    timer.attach("teacher", task.teacher.module)
    conv_calls, teacher_calls = [0], [0]
    task.model.backbone.feature_extractor.register_forward_hook(lambda *a: conv_calls.__setitem__(0, conv_calls[0] + 1))
    task.teacher.module.register_forward_hook(lambda *a: teacher_calls.__setitem__(0, teacher_calls[0] + 1))
    # A peer case times each update as the gap between consecutive EMA steps (the engine's after_update),
    # so it can keep the default log_every: with log_every=1 the log-step collapse monitors, which a
    # real run computes every 10th update and fairseq never, would be in every update.
    update_ends: list[float] = []
    masked = [0]  # masked frames of the last micro-batch (fairseq_peer reports its own)
    if name in PEER_CASES:
        after_update, train_step = task.after_update, task.train_step

        def counted_train_step(model, batch, step):
            out = train_step(model, batch, step)
            masked[0] = int(out.sample_size)
            return out

        task.train_step = counted_train_step

        def timed_after_update(step: int) -> dict:
            out = after_update(step)
            update_ends.append(time.perf_counter())
            return out

        task.after_update = timed_after_update
    loader = random_audio(batch, samples, pin=device == "cuda")
    rows, train_s = train_rows(cfg, task, loader, info, f"bench {name}")
    micro = loader.index
    if update_ends:
        gaps = [b - a for a, b in zip(update_ends, update_ends[1:])][WARMUP - 1:]  # updates WARMUP.. on
        update_s = statistics.median(gaps)
        audio_per_s = batch * samples / 16000 / update_s
    else:
        speeds = [r["audio_s_per_s"] for r in rows[WARMUP:]] or [rows[-1]["audio_s_per_s"]]
        audio_per_s = statistics.median(speeds)
        update_s = batch * samples / 16000 / audio_per_s

    # EMA step alone (what after_update adds to every update).
    for _ in range(3):
        task.teacher.step(0.999)
    times = []
    for _ in range(20):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        task.teacher.step(0.999)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    ema_s = statistics.median(times)

    out = {
        "config": name, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "params_m": parameter_count(task.model) / 1e6, "batch": f"{batch} x {samples / 16000:.1f} s",
        "audio_s_per_s": audio_per_s, "update_s": update_s, "ema_ms": ema_s * 1e3,
        "ema_fraction": ema_s / update_s, "conv_per_micro": conv_calls[0] / micro,
        "teacher_per_micro": teacher_calls[0] / micro, "threads": torch.get_num_threads(),
        "version": cfg.model.version, "clones": cfg.masking.clone_batch if v2 else 1,
        "share": {k: v / train_s for k, v in timer.total.items()},
    }
    out["peak_mem_gb"] = peak_mem_gb(device)
    if name in PEER_CASES:
        out["peer_spec"] = peer_spec(cfg, batch, samples, steps, torch.get_num_threads())
        out["masked_frames"] = masked[0]
    peak = peak_flops(out["device"]) if device == "cuda" else None
    if peak:
        out["mfu"] = audio_per_s * flops_per_audio_second(samples, cfg.model, cfg.masking) / peak
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,tiny2,base,base2")
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    ap.add_argument("--steps", type=int, default=0, help="updates per case (default: 5 on CPU, 12 on GPU)")
    ap.add_argument("--threads", default="0",
                    help="torch intra-op threads on CPU, or a list (1,2) to compare them (default: torch's)")
    ap.add_argument("--fairseq-python", metavar="PATH",
                    help="a Python with fairseq 0.12.2: the cmp case also times fairseq's update, per thread count")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    thread_counts = [int(t) for t in str(args.threads).split(",")]
    if args.worker:
        if thread_counts[0]:
            torch.set_num_threads(thread_counts[0])
        name, device = args.worker
        print("RESULT " + json.dumps(run_case(name, device, args.steps or (12 if device == "cuda" else 5))))
        return

    from d2vcli.ui import console, table

    if args.fairseq_python and not Path(args.fairseq_python).is_file():
        ap.error(f"--fairseq-python {args.fairseq_python}: no such file; make the venv as the docstring says")
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        devices.remove("cuda")
    results: list[dict] = []
    peers: dict[str, dict[int, dict]] = {}
    for device in devices:
        for name in args.configs.split(","):
            if (name, device) not in CASES:
                continue
            for threads in (thread_counts if device == "cpu" else thread_counts[:1]):
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, device, "--steps",
                       str(args.steps), "--threads", str(threads)]
                result = worker_result(cmd, f"{name} on {device}", console)
                if result is not None:
                    results.append(result)
                    if args.fairseq_python and "peer_spec" in result:  # right after ours: the same load
                        peer = run_peer(args.fairseq_python, result["peer_spec"], console)
                        if peer is not None:
                            peers.setdefault(name, {})[result["threads"]] = peer
    by_name = {(r["config"], r["device"], r.get("threads")): r for r in results}

    def vs_1_0(r: dict) -> str:  # 2.0's unique audio-s/s over 1.0's of the same size, same run and threads
        peer = (by_name.get((r["config"].removesuffix("2"), r["device"], r.get("threads")))
                if r["version"] == 2 else None)
        return f"{r['audio_s_per_s'] / peer['audio_s_per_s']:.2f}x" if peer else "-"

    def shares(r: dict) -> str:
        return " / ".join(f"{100 * r['share'][k]:.0f}" for k in ("conv", "encoder", "head", "teacher"))

    rows = [(r["config"], f"{r['version']}.0 (M={r['clones']})",
             f"{r['device']} ({r['threads']} thr)" if r["device"] == "cpu" else r["device"], f"{r['params_m']:.1f}M",
             r["batch"], f"{r['audio_s_per_s']:.1f}", vs_1_0(r), f"{r['update_s']:.3f}", f"{r['peak_mem_gb']:.2f}",
             f"{r['ema_ms']:.2f} ({100 * r['ema_fraction']:.3g}%)",
             f"{r['conv_per_micro']:.0f} / {r['teacher_per_micro']:.0f}", shares(r),
             f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-") for r in results]
    from rich.console import Console

    wide = Console(width=max(console.width, 190), highlight=False)  # a readable table in logs too
    wide.print(table("d2v pretraining throughput (engine, random audio)",
                     ["config", "data2vec", "device", "params", "micro-batch", "unique audio-s/s", "vs 1.0",
                      "s/update", "peak GB", "EMA ms (% of update)", "conv / teacher passes per micro-batch",
                      "fwd % conv / encoder / head / teacher", "MFU"], rows))
    for r in results:
        first = next(q for q in results if q["config"] == r["config"] and q["device"] == r["device"])
        if r is not first:
            wide.print(f"{r['config']} on {r['device']}: {r['threads']} threads {r['audio_s_per_s'] / first['audio_s_per_s']:.2f}x "
                       f"the speed of {first['threads']}")
    print_comparison(wide, table, results, peers, args.fairseq_python)
    for r in results:  # the raw numbers, on stderr: stdout (docs/benchmarks.md) has them once, in the table
        print(json.dumps(r), file=sys.stderr)


if __name__ == "__main__":
    main()
