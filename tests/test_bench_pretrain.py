"""benchmarks/bench_pretrain.py's fairseq comparison: the spec handed to benchmarks/fairseq_peer.py
describes our `cmp` case's model and batch, and the comparison is skipped with a note without fairseq."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_pretrain  # noqa: E402  (benchmarks/ is not a package)
import fairseq_peer  # noqa: E402

from d2vcli.models.audio import conv_output_length, parameter_count  # noqa: E402
from d2vcli.models.loading import build_model  # noqa: E402
from d2vcli.ui import table  # noqa: E402


def _cmp_spec(steps=8, threads=2):
    cfg, batch, samples = bench_pretrain.case_config("cmp", "cpu", steps)
    return cfg, batch, samples, bench_pretrain.peer_spec(cfg, batch, samples, steps, threads)


def test_peer_spec_builds_fairseq_the_model_and_batch_of_our_cmp_case():
    cfg, batch, samples, spec = _cmp_spec()
    args = fairseq_peer.fairseq_model_args(spec)
    m = cfg.model
    # Issue 16's model: 4 x 256, 4 heads, FFN 1024, data2vec's conv layout at 128 channels, top-K = all 4.
    assert [tuple(c) for c in ast.literal_eval(args["conv_feature_layers"])] == [tuple(c) for c in m.conv_layers]
    assert list(m.conv_layers) == [(128, 10, 5)] + [(128, 3, 2)] * 4 + [(128, 2, 2)] * 2
    assert (args["encoder_embed_dim"], args["encoder_layers"], args["encoder_attention_heads"],
            args["encoder_ffn_embed_dim"]) == (m.embed_dim, m.num_layers, m.num_heads, m.ffn_dim) == (256, 4, 4, 1024)
    assert args["average_top_k_layers"] == cfg.objective.average_top_k_layers == 4
    assert args["encoder_layerdrop"] == m.layerdrop == 0.0
    assert (args["dropout"], args["attention_dropout"], args["activation_dropout"], args["dropout_input"]) == \
        (m.dropout, m.attention_dropout, m.activation_dropout, m.dropout_input)
    # fairseq's positional conv kernel is max(3, conv_pos // depth) (fairseq/models/wav2vec/wav2vec2.py).
    assert max(3, args["conv_pos"] // args["pos_conv_depth"]) == m.pos_conv_kernel
    assert (args["pos_conv_depth"], args["conv_pos_groups"]) == (m.pos_conv_depth, m.pos_conv_groups)
    assert args["instance_norm_target_layer"] and not args["layer_norm_target_layer"]
    assert (args["mask_prob"], args["mask_length"], args["require_same_masks"]) == \
        (cfg.masking.mask_prob, cfg.masking.mask_length, cfg.masking.require_same_masks)
    assert (args["ema_decay"], args["ema_end_decay"], args["ema_anneal_end_step"]) == \
        (cfg.objective.ema_decay, cfg.objective.ema_end_decay, cfg.objective.ema_anneal_end_step)
    # The same batch: one micro-batch per update of 4 x 5 s crops, the peer timing as many updates.
    assert (spec["batch"], spec["samples"]) == (batch, samples) == (4, 80_000)
    assert batch * samples == cfg.data.max_tokens and cfg.train.batch_seconds == batch * samples / 16000
    assert cfg.train.max_updates == spec["steps"] + bench_pretrain.WARMUP and fairseq_peer.WARMUP == bench_pretrain.WARMUP
    assert spec["threads"] == 2
    # Our model built from that config: fairseq 0.12.2's Data2VecAudioModel for this spec has 3,914,496
    # parameters (fairseq_peer.py's params_m, measured in the venv of bench_pretrain's docstring).
    model = build_model("pretrain", m)
    assert len(model.backbone.transformer.layers) == 4
    assert parameter_count(model) == 3_914_496
    assert model.backbone.num_frames(samples) == conv_output_length(samples, m.conv_layers) == 249


def test_peer_rejects_target_norms_fairseq_lacks():
    *_, spec = _cmp_spec()
    with pytest.raises(ValueError, match="no fairseq equivalent"):
        fairseq_peer.fairseq_model_args(dict(spec, final_target_norm="batch"))


def test_peer_script_imports_without_d2vcli_or_torch():
    # It runs under fairseq's Python 3.10 venv, where d2vcli is not installed.
    code = "import sys; import fairseq_peer; print(sorted(m for m in sys.modules if m.split('.')[0] in ('d2vcli', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"}, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _printed(results, peers, fairseq_python):
    buf = io.StringIO()
    bench_pretrain.print_comparison(Console(file=buf, width=200), table, results, peers, fairseq_python)
    return buf.getvalue()


OURS = [{"config": "cmp", "threads": t, "audio_s_per_s": s, "update_s": 20 / s, "params_m": 3.914496,
         "masked_frames": 420,
         "batch": "4 x 5.0 s"} for t, s in ((1, 15.0), (2, 24.0))]
PEERS = {"cmp": {t: {"threads": t, "audio_s_per_s": s, "update_s": 20 / s, "params_m": 3.914496,
                     "masked_frames": 416,
                     "versions": {"fairseq": "0.12.2", "torch": "2.14.1", "python": "3.10.13"}}
                 for t, s in ((1, 10.0), (2, 16.0))}}


def test_comparison_is_skipped_with_a_note_without_fairseq_python():
    text = _printed(OURS, {}, None)
    assert text.strip() == bench_pretrain.SKIP_NOTE and "--fairseq-python" in text
    assert _printed([dict(OURS[0], config="tiny")], {}, None) == ""  # no cmp case ran: nothing to say


def test_comparison_table_has_both_speeds_and_their_ratio_per_thread_count():
    rows = bench_pretrain.comparison_rows(OURS, PEERS["cmp"])
    assert [r[:4] for r in rows] == [("1", "15.00", "10.00", "1.50x"), ("2", "24.00", "16.00", "1.50x")]
    assert rows[0][-1] == "420 / 416"  # both runs' masked frames: the same mask settings in use
    text = _printed(OURS, PEERS, "/tmp/python")
    assert "fairseq 0.12.2" in text and "1.50x" in text
    assert "no fairseq result" in _printed(OURS, {}, "/tmp/python")


def test_missing_fairseq_python_is_refused_before_any_case_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_pretrain.py", "--configs", "cmp", "--fairseq-python", "/nonexistent/python"])
    with pytest.raises(SystemExit) as exc:
        bench_pretrain.main()
    assert exc.value.code == 2 and "/nonexistent/python" in capsys.readouterr().err
