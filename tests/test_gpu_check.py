"""benchmarks/gpu_check.py, the prepared GPU check, run end to end as its CPU dry run; and the FLOP count behind its MFU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from d2vcli import config as cfgmod
from d2vcli.flops import flops_per_audio_second, peak_flops, student_forward_flops
from d2vcli.models.audio import Data2VecForPretraining, build_backbone

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_dry_run_runs_every_check_and_writes_both_reports(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(tmp_path / "report")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "report.json").read_text())
    status = {c["name"]: c["status"] for c in doc["checks"]}
    for name in ("env", "hf_encoder", "sdpa", "precision", "checkpointing", "fused_adamw", "torchrun",
                 "throughput 1.0 base", "throughput 1.0 large"):
        assert status[name] == "pass", (name, [c for c in doc["checks"] if c["name"] == name])
    assert status["compile 1.0 base"] == "skipped"  # CUDA only, reported as such
    assert doc["mode"] == "cpu dry run" and doc["failed"] == [] and doc["format"] == 2
    details = {c["name"]: c["details"] for c in doc["checks"]}
    precision = details["precision"]["1.0 base"]
    assert precision["bf16"]["loss_rel"] < doc["tolerances"]["loss_bf16"] and "skipped on CPU" in precision["fp16"]
    assert details["sdpa"]["no padding"]["math"]["ran"] and details["sdpa"]["no padding"]["default_ops"]
    rows = doc["throughput"]
    assert {r["variant"] for r in rows} >= {"eager", "eager + act. ckpt"}
    assert all(r["audio_s_per_s"] > 0 and r["gflop_per_audio_s"] > 0 and r["mfu"] is None for r in rows)
    # Images and text: each case ran the real pretraining on generated inputs and reports its rate and FLOPs.
    for name in ("throughput vision 1.0 base", "throughput vision 2.0 base", "throughput text 1.0 base"):
        assert status[name] == "pass", (name, [c for c in doc["checks"] if c["name"] == name])
    other = {r["model"]: r for r in doc["throughput_images_text"]}
    assert set(other) == {"vision 1.0 base (vision-tiny)", "vision 2.0 base (vision2-tiny)",
                          "text 1.0 base (text-tiny)"}
    assert [other[m]["unit"] for m in sorted(other)] == ["tokens", "images", "images"]
    assert all(r["per_s"] > 0 and r["gflop_per_unit"] > 0 and r["mfu"] is None and r["update_s"] > 0
               for r in other.values())
    assert other["vision 2.0 base (vision2-tiny)"]["batch"] == "4 images x 4 clones"
    assert [c["name"] for c in doc["checks"]][-3:] == ["throughput vision 1.0 base", "throughput vision 2.0 base",
                                                       "throughput text 1.0 base"]  # last: skipped first
    page = (tmp_path / "report.md").read_text()
    assert "| torchrun | pass |" in page and "## Pretraining throughput" in page
    assert "## Pretraining throughput, images and text" in page and "images/s" in page and "tokens/s" in page
    assert "all checks passed or skipped" in page


def test_a_check_outside_its_tolerance_fails_the_run_and_is_named(tmp_path, monkeypatch, capsys):
    gpu_check = _load_gpu_check()
    monkeypatch.setitem(gpu_check.TOL, "loss_bf16", 0.0)
    rc = gpu_check.main(["--cpu", "--only", "precision,fused_adamw", "--out", str(tmp_path / "r")])
    assert rc == 1
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["failed"] == ["precision"]
    assert "bf16 loss" in next(c["summary"] for c in doc["checks"] if c["name"] == "precision")
    assert "FAILED: precision" in capsys.readouterr().err and "FAILED: precision" in (tmp_path / "r.md").read_text()


def test_a_check_that_does_not_fit_the_budget_is_skipped(tmp_path):
    gpu_check = _load_gpu_check()
    assert gpu_check.main(["--cpu", "--only", "torchrun", "--budget", "2", "--out", str(tmp_path / "r")]) == 0
    check = json.loads((tmp_path / "r.json").read_text())["checks"][0]
    assert check["status"] == "skipped" and "budget" in check["summary"]


def test_the_flop_count_matches_torch_flop_counter():
    """The analytic forward count (docs/gpu.md) against FlopCounterMode on the real model, math SDPA
    (so the attention products are visible to the counter as matmuls)."""
    cfg = cfgmod.resolve("pretrain", preset="speech-tiny")
    model = Data2VecForPretraining(build_backbone(cfg.model)).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(torch.randn(2, 32000))
    assert counter.get_total_flops() == pytest.approx(2 * student_forward_flops(32000, cfg.model, 1.0), rel=1e-3)


def test_base_update_flops_and_peaks():
    base = cfgmod.resolve("pretrain", preset="speech-base")
    # 15.6 s crops: student fwd+bwd 3 x 15.3 GF + teacher transformer 10.4 GF (performance notes: about 55).
    assert flops_per_audio_second(250_000, base.model, base.masking) / 1e9 == pytest.approx(56.0, abs=0.5)
    large = cfgmod.resolve("pretrain", preset="speech-large")
    assert flops_per_audio_second(250_000, large.model, large.masking) / 1e9 == pytest.approx(153.6, abs=1)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989.4e12 and peak_flops("Some GPU") is None


def test_a_check_that_overruns_its_budget_is_stopped_and_reported(tmp_path):
    """The watchdog: a hung check (a stuck kernel or compile) ends the run at its budget, report written, exit 1."""
    code = f"""
import sys, time, types
from pathlib import Path
sys.path.insert(0, {str(SCRIPT.parent)!r})
import torch, gpu_check
args = types.SimpleNamespace(budget=60, only=[], md=Path({str(tmp_path / 'r.md')!r}),
                             json=Path({str(tmp_path / 'r.json')!r}))
run = gpu_check.Run(args, torch.device("cpu"))
run.run_check("quick", 5, lambda allowed: ("fine", {{}}))
run.run_check("hang", 1, lambda allowed: time.sleep(60))
print("not reached")
"""
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "not reached" not in proc.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [(c["name"], c["status"]) for c in doc["checks"]] == [("quick", "pass"), ("hang", "fail")]
    assert "timed out" in doc["checks"][1]["summary"] and doc["failed"] == ["hang"]
