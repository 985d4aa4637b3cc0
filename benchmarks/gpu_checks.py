"""The checks of benchmarks/gpu_check.py: each takes the run and its time allowance and returns
(one-line summary, details), raises Skip when it does not apply here, or CheckFailed naming the
number outside its tolerance. The runner, the budget and the report are in gpu_check.py; what each
check compares is in docs/gpu.md.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import io
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from d2vcli import config as cfgmod  # noqa: E402
from d2vcli import pretrain as pretrain_mod  # noqa: E402
from d2vcli.data import Batch  # noqa: E402
from d2vcli.fileio import read_jsonl  # noqa: E402
from d2vcli.flops import flops_per_audio_second, peak_flops  # noqa: E402
from d2vcli.manifest import Record, write_manifest  # noqa: E402
from d2vcli.schedule import build_optimizer  # noqa: E402
from d2vcli.speedups import set_activation_checkpointing  # noqa: E402
from d2vcli.workspace import Workspace  # noqa: E402

if TYPE_CHECKING:
    from gpu_check import Run


# Tolerances (relative to the fp32 reference on the same batch and weights).
TOL = {"loss_bf16": 2e-2, "loss_fp16": 5e-3, "gnorm_bf16": 5e-2, "gnorm_fp16": 2e-2, "hf_fp32": 1e-4,
       "sdpa_fp32": 1e-4, "sdpa_bf16": 2e-2, "ckpt_grad": 1e-4, "adamw": 1e-5}

# Per-size settings. GPU: the recipe's per-GPU batch (max_tokens) with 15.6 s crops; CPU: tiny.
GPU_CASES = {
    "1.0 base": ("speech-base", [], 250_000),
    "1.0 large": ("speech-large", [], 250_000),
    "2.0 base": ("speech2-base", [], 250_000),
}
CPU_CASES = {
    "1.0 base": ("speech-tiny", ["data.max_tokens=64000"], 16_000),
    "1.0 large": ("speech-tiny", ["data.max_tokens=64000", "model.num_layers=6",
                                  "train.activation_checkpointing=true"], 16_000),
    "2.0 base": ("speech2-tiny", ["data.max_tokens=64000"], 16_000),
}


class Skip(Exception):
    """A check that does not apply here (no CUDA, no 2.0 preset, not enough budget left)."""


class CheckFailed(Exception):
    """A check ran and its result is outside the tolerance; the message says which number."""


# ----------------------------------------------------------------------------- shared pieces


def cases(run: Run) -> dict:
    table = CPU_CASES if run.cpu else GPU_CASES
    return {k: v for k, v in table.items() if v[0] in cfgmod.PRESETS}


def case_config(run: Run, label: str, extra: list[str]) -> cfgmod.Config:
    preset, overrides, _ = cases(run)[label] if label in cases(run) else (None, [], 0)
    if preset is None:
        raise Skip(f"preset for {label} does not exist in this version of d2v")
    return cfgmod.resolve("pretrain", preset=preset, overrides=overrides + extra)


def make_task(cfg, device):
    """The pretraining task of the config's data2vec version (2.0 exists once d2vcli.pretrain has make_task)."""
    factory = getattr(pretrain_mod, "make_task", None)
    return factory(cfg, device) if factory else pretrain_mod.PretrainTask(cfg, device)


def random_batch(cfg, samples: int, device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    batch = max(1, cfg.data.max_tokens // samples)
    source = torch.randn(batch, samples, generator=g)
    return Batch(source=source, padding_mask=None, ids=[f"r{i}" for i in range(batch)], num_samples=source.numel(),
                 epoch=1, index=seed).to(device)


def corpus(run: Run, samples: int, count: int) -> Workspace:
    """A workspace whose `train` split holds `count` utterances of generated audio, `samples` long each."""
    root = run.tmp / f"ws-{samples}-{count}"
    ws = Workspace.resolve(root)
    if ws.manifest("train").exists():
        return ws
    rng = np.random.default_rng(0)
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        # Noise with a slow envelope, so frames differ in energy as speech does.
        env = 0.05 + 0.5 * np.abs(np.sin(np.linspace(0, 20 * np.pi, samples) + i))
        wav = (0.1 * rng.standard_normal(samples) * env).astype(np.float32)
        path = audio / f"u{i:04d}.wav"
        sf.write(path, wav, 16000, subtype="PCM_16")
        records.append(Record(id=f"u{i:04d}", path=str(path), num_samples=samples, speaker="s"))
    ws.data_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(ws.manifest("train"), records)
    return ws


@contextlib.contextmanager
def quiet(run: Run):
    """Keep d2v's own console output (config summaries, progress) in the run's log, not on the screen."""
    buf = io.StringIO()
    os.environ["D2V_PROGRESS"] = "0"
    with contextlib.redirect_stdout(buf):
        yield buf
    run.log.write(buf.getvalue())


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ----------------------------------------------------------------------------- the checks


def check_env(run: Run, allowed: float):
    dev = run.device
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or 'unknown'})"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    run.meta.update({
        "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda if dev.type == "cuda" else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit.stdout.strip() or "unknown", "peak_bf16_flops": peak_flops(gpu) if dev.type == "cuda" else None,
        "threads": torch.get_num_threads(), "python": platform.python_version(),
    })
    present = {label: preset in cfgmod.PRESETS for label, (preset, _, _) in GPU_CASES.items()}
    details = {"presets": present, "bf16_supported": dev.type == "cuda" and torch.cuda.is_bf16_supported()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        details.update(memory_gb=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
    note = "" if present["2.0 base"] else "; speech2-base absent: 2.0 cases skipped"
    return f"{gpu}, torch {torch.__version__}{note}", details


def check_hf_encoder(run: Run, allowed: float):
    from bench_encoder import build_pair, timed_pair

    dev = run.device.type
    size = "tiny" if run.cpu else "base"
    ours, hf = build_pair(size, dev)
    seconds = 2.0 if run.cpu else 10.0
    batch = 2 if run.cpu else 8
    x = torch.randn(batch, int(seconds * 16000), device=dev)
    rows = {}
    with no_tf32(), torch.inference_mode():
        diff = (ours(x)["x"] - hf(x).last_hidden_state).abs().max().item()
    rows["fp32_max_abs_diff"] = diff
    precisions = ["fp32"] if run.cpu else ["fp32", "bf16"]
    for p in precisions:
        ac = torch.autocast(dev, dtype=torch.bfloat16, enabled=p == "bf16")

        def run_ours():
            with torch.inference_mode(), ac:
                return ours(x)["x"]

        def run_hf():
            with torch.inference_mode(), ac:
                return hf(x).last_hidden_state

        (o, _, oo), (h, _, ho) = timed_pair([run_ours, run_hf], 1, 2 if run.cpu else 5, dev)
        rows[p] = {"d2v_s": o, "hf_s": h, "hf_over_d2v": h / o,
                   "max_abs_diff": (oo.float() - ho.float()).abs().max().item()}
    if diff > TOL["hf_fp32"]:
        raise CheckFailed(f"fp32 encoder output differs from HF by {diff:.2e} > {TOL['hf_fp32']:.0e}")
    fastest = rows[precisions[-1]]
    return (f"{size}, {batch} x {seconds:g} s: fp32 max |diff| {diff:.1e}; {precisions[-1]} d2v "
            f"{fastest['hf_over_d2v']:.2f}x HF's speed (goal 1.3x)"), rows


@contextlib.contextmanager
def _silent_fds():
    """The profiler's C++ side prints start/stop lines on the process's stdout/stderr; drop them."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def _backend_ops(fn) -> list[str]:
    """The SDPA kernels a call ran (`flash_attention`, `efficient_attention`, ...; profiler op names):
    `F.scaled_dot_product_attention` picks one of them, and that choice is what the check reports."""
    from torch.profiler import ProfilerActivity, profile

    with _silent_fds(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return sorted(n.removeprefix("aten::_scaled_dot_product_") for n in names
                  if n.startswith("aten::_scaled_dot_product_"))


def check_sdpa(run: Run, allowed: float):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from d2vcli.models.audio import build_backbone

    dev = run.device
    cfg = case_config(run, "1.0 base", [])
    torch.manual_seed(0)
    model = build_backbone(cfg.model).to(dev).eval()
    samples = 16_000 if run.cpu else 160_000
    x = torch.randn(2 if run.cpu else 4, samples, device=dev)
    pad = torch.zeros_like(x, dtype=torch.bool)
    pad[0, samples * 3 // 4:] = True
    dtype = torch.float32 if run.cpu else torch.bfloat16
    tol = TOL["sdpa_fp32"] if run.cpu else TOL["sdpa_bf16"]

    def forward(padding=None):
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(x, padding)["x"].float()

    backends = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    details, problems = {"dtype": str(dtype)}, []
    for case, padding in (("no padding", None), ("padding mask", pad)):
        with sdpa_kernel(SDPBackend.MATH):
            ref = forward(padding)
        scale = ref.abs().max().item()
        row = {}
        for name, backend in backends.items():
            try:
                with sdpa_kernel(backend):  # only this kernel is allowed: it ran, or this raises
                    out = forward(padding)
                err = (out - ref).abs().max().item() / scale
                row[name] = {"ran": True, "rel_max_diff": err}
                if err > tol:
                    problems.append(f"{name} ({case}) differs from math by {err:.1e} > {tol:.0e}")
            except RuntimeError as e:
                row[name] = {"ran": False, "why": str(e).strip().splitlines()[0][:200]}
        row["default_ops"] = _backend_ops(lambda: forward(padding))
        details[case] = row
    if not run.cpu:
        # bf16 without a mask is what pretraining crops are: flash and memory-efficient must both work.
        for name in ("flash", "efficient"):
            if not details["no padding"][name]["ran"]:
                problems.append(f"{name} SDPA kernel unavailable without padding: {details['no padding'][name]['why']}")
        if not details["padding mask"]["efficient"]["ran"]:
            problems.append("memory-efficient SDPA unavailable with a padding mask (fine-tuning's path)")
    if problems:
        raise CheckFailed("; ".join(problems))
    ran = {case: [n for n in backends if details[case][n]["ran"]] for case in ("no padding", "padding mask")}
    default = {case: ",".join(details[case]["default_ops"]) or "math (decomposed)" for case in ran}
    return (f"ran: {', '.join(ran['no padding'])} (no padding), {', '.join(ran['padding mask'])} (padding); "
            f"default: {default['no padding']} / {default['padding mask']}; max rel diff vs math <= {tol:.0e}"), details


def _step(task, batch, dtype, scaler=None, tries: int = 1):
    """One training step (forward + backward) -> (loss, grad norm, grads, scale); fp16 retries on overflow."""
    dev = batch.source.device
    for _ in range(tries):
        task.model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = task.train_step(task.model, batch, 0)
        loss = out.loss
        (scaler.scale(loss) if scaler is not None else loss).backward()
        grads = [p.grad.float() / (scaler.get_scale() if scaler is not None else 1.0)
                 for p in task.model.parameters() if p.grad is not None]
        gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if scaler is None or np.isfinite(gnorm):
            return loss.item(), gnorm, grads, scaler.get_scale() if scaler is not None else None
        scaler.update(scaler.get_scale() / 2)  # what GradScaler.update does after an overflow
    raise CheckFailed(f"fp16 gradients overflowed {tries} times in a row down to scale {scaler.get_scale():g}")


def _quiet_cfg(cfg):
    return cfgmod.merge(cfg, {"model": {"dropout": 0.0, "attention_dropout": 0.0, "layerdrop": 0.0,
                                        "dropout_input": 0.0}})


def check_precision(run: Run, allowed: float):
    from d2vcli.engine import FP16_INIT_SCALE

    dev = run.device
    out, problems = {}, []
    for label in cases(run):
        if label == "1.0 large":
            continue  # the same code as base; precision is checked once per model version
        cfg = _quiet_cfg(case_config(run, label, []))
        samples = cases(run)[label][2]
        torch.manual_seed(0)
        task = make_task(cfg, dev)
        batch = random_batch(cfg, samples, dev)
        with no_tf32():
            ref_loss, ref_norm, ref_grads, _ = _step(task, batch, None)
        res = {"batch": list(batch.source.shape), "fp32": {"loss": ref_loss, "gnorm": ref_norm}}
        variants = [("bf16", torch.bfloat16, None)]
        if dev.type == "cuda":
            variants.append(("fp16", torch.float16, torch.amp.GradScaler("cuda", init_scale=FP16_INIT_SCALE)))
        for name, dtype, scaler in variants:
            loss, norm, grads, scale = _step(task, batch, dtype, scaler, tries=20)
            cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in grads]),
                                                        torch.cat([g.flatten() for g in ref_grads]), dim=0).item()
            res[name] = {"loss": loss, "gnorm": norm, "loss_rel": rel(loss, ref_loss), "gnorm_rel": rel(norm, ref_norm),
                         "grad_cosine": cos, "loss_scale": scale}
            if rel(loss, ref_loss) > TOL[f"loss_{name}"]:
                problems.append(f"{label} {name} loss {loss:.5g} vs fp32 {ref_loss:.5g} (rel {rel(loss, ref_loss):.1e})")
            if rel(norm, ref_norm) > TOL[f"gnorm_{name}"]:
                problems.append(f"{label} {name} grad norm {norm:.5g} vs fp32 {ref_norm:.5g}")
        if dev.type != "cuda":
            res["fp16"] = "skipped on CPU (fp16 autocast + GradScaler needs CUDA)"
        out[label] = res
        del task
    if problems:
        raise CheckFailed("; ".join(problems))
    summary = "; ".join(f"{k}: bf16 loss rel {v['bf16']['loss_rel']:.1e}" +
                        (f", fp16 {v['fp16']['loss_rel']:.1e} (scale {v['fp16']['loss_scale']:g})"
                         if isinstance(v.get("fp16"), dict) else ", fp16 skipped on CPU") for k, v in out.items())
    return summary, out


def check_checkpointing(run: Run, allowed: float):
    dev = run.device
    out, problems = {}, []
    for label in cases(run):
        if label == "1.0 large":
            continue  # the same layers as base
        cfg = case_config(run, label, ["model.dropout=0.1"])
        torch.manual_seed(0)
        task = make_task(cfg, dev)
        batch = random_batch(cfg, cases(run)[label][2], dev)
        with no_tf32():
            stacks = set_activation_checkpointing(task.model, False)
            _, n0, g0, _ = _step(task, batch, None)
            set_activation_checkpointing(task.model, True)
            _, n1, g1, _ = _step(task, batch, None)
        worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item() for a, b in zip(g1, g0))
        out[label] = {"max_rel_diff": worst, "gnorm": [n0, n1], "layer_stacks": stacks}
        if worst > TOL["ckpt_grad"]:
            problems.append(f"{label}: gradients with activation checkpointing differ by {worst:.1e} (rel) > "
                            f"{TOL['ckpt_grad']:.0e}")
        del task
    if problems:
        raise CheckFailed("; ".join(problems))
    return "same gradients with and without, dropout on: " + "; ".join(
        f"{k} max rel diff {v['max_rel_diff']:.1e}" for k, v in out.items()), out


def check_fused_adamw(run: Run, allowed: float):
    dev = run.device
    cfg = case_config(run, "1.0 base", [])
    torch.manual_seed(0)
    task = make_task(cfg, dev)
    engine_opt = build_optimizer(task.model.parameters(), cfg.optim, dev)
    engine_fused = bool(engine_opt.param_groups[0].get("fused"))
    if dev.type == "cuda" and not engine_fused:
        raise CheckFailed("the engine's AdamW is not fused on CUDA")
    params = [p.detach().clone() for p in task.model.parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    results, times = {}, {}
    for kind in ("foreach", "fused"):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        try:
            opt = torch.optim.AdamW(ps, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                    weight_decay=cfg.optim.weight_decay, **{kind: True})
        except RuntimeError as e:
            raise Skip(f"fused AdamW unavailable on {dev.type}: {e}") from None
        ts = []
        for _ in range(3):
            for p, g in zip(ps, grads):
                p.grad = g
            sync(dev)
            t = time.perf_counter()
            opt.step()
            sync(dev)
            ts.append(time.perf_counter() - t)
        results[kind], times[kind] = ps, statistics.median(ts)
    worst = max(((a - b).abs().max()).item() for a, b in zip(results["fused"], results["foreach"]))
    details = {"engine_fused": engine_fused, "max_abs_diff": worst, "step_ms": {k: 1e3 * v for k, v in times.items()},
               "params": sum(p.numel() for p in params)}
    if worst > TOL["adamw"]:
        raise CheckFailed(f"fused AdamW differs from foreach by {worst:.1e} > {TOL['adamw']:.0e}")
    where = f"the engine uses it on {dev.type}" if engine_fused else f"the engine uses foreach on {dev.type}"
    return (f"3 steps equal foreach (max |diff| {worst:.1e}); {1e3 * times['fused']:.1f} ms vs "
            f"{1e3 * times['foreach']:.1f} ms per step; {where}"), details


def check_torchrun(run: Run, allowed: float):
    label = "1.0 base"
    preset, overrides, samples = cases(run)[label]
    ws = corpus(run, samples, 8 if run.cpu else 32)
    tokens = 64_000 if run.cpu else 3_800_000
    sets = overrides + [f"data.max_tokens={tokens}", f"train.batch_seconds={tokens / 16000}", "train.save_every=1",
                        "train.log_every=1", "data.train_splits=[train]", f"data.min_sample_size={min(samples, 32000)}",
                        "data.num_workers=2", f"data.max_sample_size={samples}",
                        "train.compile=off"]  # compiling twice would take most of the budget; `compile` checks it
    env = dict(os.environ, D2V_PROGRESS="0", COLUMNS="400", OMP_NUM_THREADS="1" if run.cpu else os.environ.get("OMP_NUM_THREADS", "4"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    outputs = []
    for updates, extra in ((1, []), (2, ["--resume"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "d2vcli",
               "pretrain", "--preset", preset, "--name", "torchrun", "--workdir", str(ws.root), *extra]
        for item in sets + [f"train.max_updates={updates}"]:
            cmd += ["--set", item]
        left = max(5.0, allowed - (time.monotonic() - run._check_start))
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left, cwd=ROOT)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"torchrun ({updates} update(s)) did not finish in {left:.0f} s") from None
        text = proc.stdout + proc.stderr
        run.log.write(text)
        outputs.append(text[-3000:])
        if proc.returncode:
            raise CheckFailed(f"torchrun exit {proc.returncode} at {'resume' if extra else 'first run'}: "
                              f"{text.strip().splitlines()[-1] if text.strip() else ''}")
    backend = "gloo" if run.cpu else "nccl"
    first, second = (" ".join(o.split()) for o in outputs)
    problems = [msg for ok, msg in (
        (f"distributed: {backend} process group" in first, f"no {backend} process group in the first run"),
        ("finished 1 updates" in first, "the first run did not finish its update"),
        ("resumed from" in second and "at update 1" in second, "the second run did not resume from update 1"),
        ("finished 2 updates" in second, "the resumed run did not finish update 2"),
    ) if not ok]
    rows = read_jsonl(ws.run_dir("torchrun") / "metrics.jsonl")
    steps = [r["step"] for r in rows if "loss" in r]
    if steps != [1, 2]:
        problems.append(f"metrics.jsonl has update lines {steps}, not [1, 2]")
    if problems:
        raise CheckFailed("; ".join(problems))
    return (f"{backend} process group + DDP, 1 update, checkpoint, resume, update 2 "
            f"(loss {rows[-1]['loss']:.4g})"), {"tail": [o[-1200:] for o in outputs]}


def throughput_case(run: Run, label: str, variant: str, sets: list[str], updates: int) -> dict:
    """One `pretrain()` run on generated audio; the median audio-s/s of its updates after the warm-up ones."""
    preset, overrides, samples = cases(run)[label]
    cfg0 = cfgmod.resolve("pretrain", preset=preset, overrides=overrides)
    tokens = cfg0.data.max_tokens
    batch = max(1, tokens // samples)
    ws = corpus(run, samples, batch * (updates + 1))
    cfg = cfgmod.resolve("pretrain", preset=preset, overrides=overrides + sets + [
        "data.train_splits=[train]", f"data.min_sample_size={min(samples, 32000)}", f"data.max_sample_size={samples}",
        f"train.batch_seconds={batch * samples / 16000}", f"train.max_updates={updates}", "train.log_every=1",
        f"train.save_every={100 * updates}", "data.num_workers=2" if run.cpu else "data.num_workers=6",
        f"train.device={run.device.type}",
    ])
    name = re.sub(r"[^a-z0-9]+", "-", f"{label}-{variant}".lower()).strip("-")
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = {"model": f"{label} ({preset})", "variant": variant, "batch": f"{batch} x {samples / 16000:.1f} s"}
    try:
        with quiet(run) as out:
            result = pretrain_mod.pretrain(cfg, ws, name=name)
    except torch.cuda.OutOfMemoryError:
        row["note"] = f"out of memory (at {torch.cuda.max_memory_allocated() / 2**30:.0f} GB)"
        run.throughput.append(row)
        gc.collect()  # the traceback's frames hold the dead run's tensors
        torch.cuda.empty_cache()
        return row
    if result.status != "done":
        raise CheckFailed(f"{label} {variant}: pretraining ended '{result.status}': {result.message}")
    warn = [ln for ln in out.getvalue().splitlines() if ln.startswith("warning: torch.compile failed")]
    rows = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if "audio_s_per_s" in r]
    warm = 3 if len(rows) > 4 else 1
    speed = statistics.median(r["audio_s_per_s"] for r in rows[warm:]) if len(rows) > warm else rows[-1]["audio_s_per_s"]
    gflop = flops_per_audio_second(samples, cfg.model, cfg.masking) / 1e9
    peak = run.meta.get("peak_bf16_flops")
    row.update(audio_s_per_s=speed, update_s=batch * samples / 16000 / speed, gflop_per_audio_s=gflop,
               peak_gb=max((r.get("max_mem_gb", 0.0) for r in rows), default=None) if run.device.type == "cuda" else None,
               mfu=speed * gflop * 1e9 / peak if peak else None, first_update_s=rows[0].get("wall"),
               note=("compile failed, eager: " + warn[0][30:90]) if warn else "")
    run.throughput.append(row)
    shutil.rmtree(result.run_dir, ignore_errors=True)  # checkpoints of big models fill the disk otherwise
    return row


def check_throughput(run: Run, label: str, variants: list[tuple[str, list[str]]]):
    def check(allowed: float):
        if label not in cases(run):
            raise Skip(f"{label}: its preset does not exist in this version of d2v")
        updates = 3 if run.cpu else 12
        rows, skipped = [], []
        for variant, sets, on_cpu in variants:
            if run.cpu and not on_cpu:
                why = ("compile is measured on GPU only" if "train.compile=on" in sets else
                       "it changes bf16/fp16 only" if "train.fused_alibi=true" in sets else "GPU memory is the point")
                skipped.append(f"{variant}: skipped on CPU ({why})")
                continue
            if run.left() < (90 if "train.compile=on" in sets else 20):
                skipped.append(f"{variant}: not enough budget left")
                continue
            rows.append(throughput_case(run, label, variant, sets, updates))
        if not rows:
            raise Skip("; ".join(skipped))
        text = "; ".join(f"{r['variant']} {r.get('audio_s_per_s', 0):.0f} audio-s/s" +
                         (f", {r['peak_gb']:.1f} GB" if r.get("peak_gb") else "") +
                         (f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else "") +
                         (f" ({r['note']})" if r.get("note") else "") for r in rows)
        return text + ("; " + "; ".join(skipped) if skipped else ""), {"rows": rows, "skipped": skipped}
    return check
