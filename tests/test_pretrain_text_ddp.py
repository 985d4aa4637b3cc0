"""DDP text pretraining: torchrun with 2 processes equals 1 process accumulating 2 micro-batches.

Same per-update losses, masked-token counts, gradient norms and EMA decays, and the same student and teacher weights after the
updates: the masks come from each batch's own RNG stream (so they do not depend on the rank that reads
the batch), rank r reads micro-batch r of each update, and the engine sums losses and masked-token counts
over ranks before dividing. Dropout is off (each process draws its own dropout masks).

Run: python -m pytest -q tests/test_pretrain_text_ddp.py
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from d2vcli import checkpoint as ckpt
from d2vcli import config as C
from d2vcli.fileio import read_jsonl
from d2vcli.pretrain import pretrain
from d2vcli.workspace import Workspace

# text-tiny at width 32, 2 micro-batches of at most 512 tokens per update, no dropout.
TINY_SET = ["text.embed_dim=32", "text.ffn_dim=64", "text.num_heads=2", "text.dropout=0.0",
            "text.attention_dropout=0.0", "data.text_tokens_per_batch=512", "train.tokens_per_update=1024",
            "train.max_updates=3", "train.log_every=1", "train.save_every=3", "schedule.warmup_updates=1"]
# The update's numbers. target_std / pred_std are left out: like fairseq's compute_var they pool the
# variance over the ranks' micro-batches but average it over accumulated ones, so they differ slightly
# (2e-4 relative here) between 2 ranks and 1 process accumulating 2 micro-batches.
COMPARED = ("loss", "sample_size", "gnorm", "lr", "ema_decay")


def update_rows(run_dir) -> list[dict]:
    return [{k: r[k] for k in COMPARED if k in r} for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def text_ws(tmp_path_factory):
    """A workspace with the tiny synthetic text corpus prepared (120 documents)."""
    from d2vcli.prepare.synthetic_text import prepare_synthetic_text

    ws = Workspace.resolve(tmp_path_factory.mktemp("text-ddp") / "ws")
    prepare_synthetic_text(ws, size="tiny", workers=1)
    return ws


def test_two_processes_match_one_process_with_accumulation(text_ws):
    one = pretrain(C.resolve("pretrain", preset="text-tiny", overrides=TINY_SET), text_ws, name="text-ddp-one")
    assert one.status == "done" and one.step == 3, one.message
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "d2vcli", "pretrain", "--preset", "text-tiny", "--name", "text-ddp-two",
           "--workdir", str(text_ws.root)]
    for item in TINY_SET:
        cmd += ["--set", item]
    env = dict(os.environ, OMP_NUM_THREADS="1", D2V_PROGRESS="0")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1024 tokens/update = 2 CPU processes x 512 tokens x 1 accumulation" in proc.stdout, proc.stdout[-2000:]

    a, b = update_rows(one.run_dir), update_rows(text_ws.run_dir("text-ddp-two"))
    assert len(a) == len(b) == 3 and set(a[0]) == set(COMPARED)
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6)
    sa = ckpt.load_checkpoint(one.checkpoint)
    sb = ckpt.load_checkpoint(text_ws.run_dir("text-ddp-two") / "last.pt")
    assert sa[ckpt.STEP_KEY] == sb[ckpt.STEP_KEY] == 3
    for key in (ckpt.MODEL_KEY, ckpt.TEACHER_KEY):
        assert set(sa[key]) == set(sb[key])
        for name in sa[key]:
            torch.testing.assert_close(sb[key][name], sa[key][name], rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
    # The updates moved the student: its encoder is no longer the teacher's EMA copy of the same weights.
    student = {n[len("encoder."):]: v for n, v in sa[ckpt.MODEL_KEY].items() if n.startswith("encoder.")}
    moved = [n for n, v in sa[ckpt.TEACHER_KEY].items() if not n.startswith("embed.") and not torch.equal(v, student[n])]
    assert moved
