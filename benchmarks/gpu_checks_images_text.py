"""The image and text throughput checks of benchmarks/gpu_check.py: data2vec 1.0 and 2.0 images
(images/s) and data2vec 1.0 text (tokens/s), with peak memory and MFU, on generated inputs.

Like the speech cases (gpu_checks.throughput_case) they run d2v's own pretraining for a few updates
at the recipe's per-GPU batch, one micro-batch per update, and read the rate from metrics.jsonl:

- images: noise images written as JPEG files into an ImageFolder tree, `d2vcli.prepare.images`
  makes the manifest, and `d2vcli.pretrain.pretrain` trains on it (real decoding, augmentation,
  DataLoader workers, the image task, the engine);
- text: random token blocks written as the token shards `d2v prepare text` writes, read by the real
  `TextBlockLoader` and trained by `TextPretrainTask` in `engine.train`. The text-base vocabulary
  (RoBERTa's 50,265 ids) cannot come from a sentencepiece model trained in seconds, so this case
  builds the task with that vocabulary instead of reading a tokenizer; the rest is
  `pretrain_text.pretrain`'s path.

MFU uses d2vcli.flops (vision_update_flops per image, text_update_flops per padded sequence).
"""

from __future__ import annotations

import gc
import json
import re
import shutil
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from d2vcli import config as cfgmod  # noqa: E402
from d2vcli import distributed, engine  # noqa: E402
from d2vcli import pretrain as pretrain_mod  # noqa: E402
from d2vcli.fileio import read_jsonl  # noqa: E402
from d2vcli.flops import text_update_flops, vision_update_flops  # noqa: E402
from d2vcli.prepare.images import image_manifest, prepare_images  # noqa: E402
from d2vcli.pretrain_text import TextPretrainTask, text_arch  # noqa: E402
from d2vcli.run_dir import prepare_run  # noqa: E402
from d2vcli.text_data import BOS, META_VERSION, TextBlockLoader, TokenBlocks, text_dir, token_dtype  # noqa: E402
from d2vcli.workspace import Workspace  # noqa: E402
from gpu_checks import CheckFailed, Skip, quiet  # noqa: E402

if TYPE_CHECKING:
    from gpu_check import Run

# label -> (preset, overrides, per-GPU micro-batch: images, or tokens as sequences x length, text vocabulary).
# GPU: the presets' own per-GPU batches (vision-base 128 images, vision2-base 16 images x 16 clones,
# text-base 8,192 tokens = 16 blocks of 512); CPU: tiny.
GPU_CASES = {
    "vision 1.0 base": ("vision-base", [], 128, None),
    "vision 2.0 base": ("vision2-base", [], 16, None),
    "text 1.0 base": ("text-base", [], 8192, 50265),
}
CPU_CASES = {
    "vision 1.0 base": ("vision-tiny", ["data.images_per_batch=8"], 8, None),
    "vision 2.0 base": ("vision2-tiny", ["data.images_per_batch=4"], 4, None),
    "text 1.0 base": ("text-tiny", ["data.text_tokens_per_batch=512"], 512, 192),
}


def cases(run: Run) -> dict:
    table = CPU_CASES if run.cpu else GPU_CASES
    return {k: v for k, v in table.items() if v[0] in cfgmod.PRESETS}


def image_corpus(run: Run, side: int, count: int) -> Workspace:
    """A workspace whose `train` image manifest lists `count` generated side x side JPEGs (one class):
    smooth colour noise, so decoding and augmentation do the work real photos make them do."""
    root = run.tmp / f"images-{side}-{count}"
    ws = Workspace.resolve(root / "ws")
    if image_manifest(ws, "train").exists():
        return ws
    folder = root / "tree" / "train" / "noise"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        coarse = rng.integers(0, 256, (max(2, side // 8), max(2, side // 8), 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((side, side), Image.BILINEAR).save(folder / f"n{i:05d}.jpg", quality=90)
    with quiet(run):
        prepare_images(ws, root / "tree")
    return ws


def text_corpus(run: Run, vocab: int, length: int, count: int) -> Workspace:
    """A workspace whose data/text holds `count` blocks of `length` random ids (no `<s>`, as prepared
    shards hold them), in the layout `d2v prepare text` writes (train.bin, train.idx.npy, meta.json)."""
    root = run.tmp / f"text-{vocab}-{length}-{count}"
    ws = Workspace.resolve(root)
    folder = text_dir(ws)
    if (folder / "meta.json").exists():
        return ws
    folder.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, vocab - 1, count * length)  # no special ids, no <mask> (the last id)
    ids.astype(dtype).tofile(folder / "train.bin")
    np.save(folder / "train.idx.npy", np.arange(count + 1, dtype=np.int64) * length)
    (folder / "meta.json").write_text(json.dumps({"version": META_VERSION, "splits": ["train"],
                                                  "dtype": dtype.name}))
    return ws


def _rate(rows: list[dict], key: str) -> float:
    """The median rate after the warm-up updates (3 when there are more than 4, as the speech cases)."""
    warm = 3 if len(rows) > 4 else 1
    return statistics.median(r[key] for r in rows[warm:]) if len(rows) > warm else rows[-1][key]


def throughput_case(run: Run, label: str, variant: str, sets: list[str], updates: int) -> dict:
    """One pretraining run of `label` on generated inputs -> its throughput row (also appended to the run's)."""
    preset, overrides, batch, vocab = cases(run)[label]
    text = vocab is not None
    common = ["data.train_splits=[train]", f"train.max_updates={updates}", "train.log_every=1",
              f"train.save_every={100 * updates}", f"train.device={run.device.type}"]
    if text:
        cfg = cfgmod.resolve("pretrain", preset=preset, overrides=overrides + sets + common + [
            f"train.tokens_per_update={batch}", f"text.vocab_size={vocab}"])
        length = cfg.data.tokens_per_sample - 1  # full blocks: every sequence is tokens_per_sample long with <s>
        seqs = batch // cfg.data.tokens_per_sample
        ws = text_corpus(run, vocab, length, seqs * (updates + 1))
        unit, key, size = "tokens", "tokens_per_s", f"{seqs} x {length + 1} tokens"
        flop_per_unit = text_update_flops(length + 1, cfg.text).total / (length + 1)
    else:
        workers = "data.num_workers=2" if run.cpu else "data.num_workers=10"
        cfg = cfgmod.resolve("pretrain", preset=preset, overrides=overrides + sets + common + [
            f"train.images_per_update={batch}", workers])
        side = cfg.vision.image_size * 8 // 7  # a little larger than the crop, as photos are
        ws = image_corpus(run, side, batch * (updates + 1))
        clones = f" x {cfg.masking.clone_batch} clones" if cfg.model.version == 2 else ""
        unit, key, size = "images", "images_per_s", f"{batch} images{clones}"
        flop_per_unit = vision_update_flops(cfg.vision, cfg.masking, cfg.model.version).total
    name = re.sub(r"[^a-z0-9]+", "-", f"{label}-{variant}".lower()).strip("-")
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = {"model": f"{label} ({preset})", "variant": variant, "batch": size, "unit": unit}
    try:
        with quiet(run):
            result = _text_pretrain(cfg, ws, name, vocab) if text else pretrain_mod.pretrain(cfg, ws, name=name)
    except torch.cuda.OutOfMemoryError:
        row["note"] = f"out of memory (at {torch.cuda.max_memory_allocated() / 2**30:.0f} GB)"
        run.throughput_images_text.append(row)
        gc.collect()  # the traceback's frames hold the dead run's tensors
        torch.cuda.empty_cache()
        return row
    if result.status != "done":
        raise CheckFailed(f"{label} {variant}: pretraining ended '{result.status}': {result.message}")
    rows = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if key in r]
    if not rows:
        raise CheckFailed(f"{label} {variant}: metrics.jsonl has no {key} lines")
    speed = _rate(rows, key)
    peak = run.meta.get("peak_bf16_flops")
    cuda = run.device.type == "cuda"
    row.update(per_s=speed, update_s=batch / speed, gflop_per_unit=flop_per_unit / 1e9,
               peak_gb=max((r.get("max_mem_gb", 0.0) for r in rows), default=None) if cuda else None,
               mfu=speed * flop_per_unit / peak if peak else None, first_update_s=rows[0].get("wall"), note="")
    run.throughput_images_text.append(row)
    shutil.rmtree(result.run_dir, ignore_errors=True)
    return row


def _text_pretrain(cfg, ws: Workspace, name: str, vocab: int):
    """pretrain_text.pretrain's path with the vocabulary given (no tokenizer file): loader, task, engine."""
    info = distributed.setup(cfg.train.device)
    try:
        blocks = TokenBlocks(text_dir(ws), "train")
        loader = TextBlockLoader(blocks, BOS, cfg.data.text_tokens_per_batch, cfg.train.seed,
                                 tokens_per_sample=cfg.data.tokens_per_sample)
        arch = text_arch(cfg, vocab, vocab - 1)
        run_info = prepare_run(ws, name, cfg, False, info)
        torch.manual_seed(cfg.train.seed)
        task = TextPretrainTask(cfg, info.device, arch)
        return engine.train(cfg, task, loader, run_info, info, description="pretrain",
                            batch=engine.text_batch_unit(cfg))
    finally:
        distributed.teardown()


def check_throughput(run: Run, label: str, variants: list[tuple[str, list[str]]]):
    """The check for one image or text model: each variant's row; skipped when its preset is absent."""
    def check(allowed: float):
        if label not in cases(run):
            raise Skip(f"{label}: its preset does not exist in this version of d2v")
        updates = 3 if run.cpu else 8
        rows = []
        for variant, sets in variants:
            if run.left() < 15:
                break
            rows.append(throughput_case(run, label, variant, sets, updates))
        if not rows:
            raise Skip("not enough budget left")
        unit = rows[0]["unit"]
        return "; ".join(f"{r['variant']} {r.get('per_s', 0):.0f} {unit}/s" +
                         (f", {r['peak_gb']:.1f} GB" if r.get("peak_gb") else "") +
                         (f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else "") +
                         (f" ({r['note']})" if r.get("note") else "") for r in rows), {"rows": rows}
    return check
