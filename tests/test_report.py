"""`d2v report RUN`: an HTML page whose figures exist, are real PNGs, and carry the expected titles.

Run: python -m pytest -q tests/test_report.py
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from matplotlib.image import imread
from typer.testing import CliRunner

from d2vcli import config as cfgmod
from d2vcli.cli import app
from d2vcli.evaluate import score_decoded
from d2vcli.report import ReportError, read_metrics, worst_utterances, write_report
from d2vcli.workspace import Workspace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def _figures(page: Path) -> dict[str, str]:
    """{png file: its title} for every figure of the page; each PNG must exist and decode."""
    html = page.read_text()
    found = dict(re.findall(r"<figure><img src='([^']+)' alt='([^']+)'><figcaption>", html))
    assert found, "the page has no figures"
    for src in found:
        png = page.parent / src
        assert not Path(src).is_absolute() and png.is_file(), f"{src} is missing"
        assert png.read_bytes()[:8] == PNG_MAGIC
        pixels = imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels.std() > 0.01, f"{src} is blank"
    return found


def _copy_run(src: Path, ws: Workspace, name: str) -> Path:
    dst = ws.run_dir(name)
    dst.mkdir(parents=True)
    for f in ("metrics.jsonl", "config.yaml"):
        shutil.copy2(src / f, dst / f)
    return dst


def _write_run(ws: Workspace, name: str, command: str, rows: list[dict], overrides: list[str] = ()) -> Path:
    run_dir = ws.run_dir(name)
    run_dir.mkdir(parents=True)
    cfg = cfgmod.resolve(command, overrides=list(overrides))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfgmod.to_dict(cfg), sort_keys=False))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir


def test_pretraining_report_of_a_real_run(pretrained_tiny, tmp_path):
    ws = Workspace.resolve(tmp_path / "w")
    _copy_run(pretrained_tiny.parent, ws, "pt")
    page = write_report(ws, "pt")
    assert page == ws.run_dir("pt") / "report" / "index.html"
    titles = set(_figures(page).values())
    assert {"Training loss", "Learning rate", "Target and prediction std", "EMA teacher decay", "Gradient norm",
            "Throughput"} <= titles
    assert not any(t.startswith("Validation") for t in titles)
    html = page.read_text()
    assert "pretraining" in html and "Not evaluated yet" in html and "d2v evaluate pt" in html
    assert "<summary>config.yaml</summary>" in html


def _finetune_rows() -> list[dict]:
    rows = []
    for step in range(10, 201, 10):
        rows.append({"step": step, "epoch": 1 + step // 100, "loss": 300.0 / step, "lr": 1e-3 * min(1, step / 50),
                     "gnorm": 5.0, "sample_size": 3.0, "audio_s_per_s": 250.0 + step, "skipped": 0,
                     "wall": step * 0.05})
        if step % 100 == 0:
            rows.append({"step": step, "dev-clean/wer": 90.0 - step / 10, "dev-clean/cer": 60.0 - step / 10,
                         "dev-clean/loss": 80.0, "dev-clean/empty": 0.0, "dev-other/wer": 95.0 - step / 10,
                         "dev-other/cer": 65.0 - step / 10, "dev-other/loss": 85.0, "dev-other/empty": 0.125,
                         "best": 95.0 - step / 10})
    return rows


def _evaluate_by_hand(ws: Workspace, run: str) -> Path:
    """The artefacts `d2v evaluate` writes (wer.json, errs-, recogs-, wer-summary-), from known hypotheses."""
    out = ws.decode_dir / run
    out.mkdir(parents=True)
    refs = ["THE CAT SAT", "A DOG RAN FAST", "HELLO WORLD", "ONE TWO THREE FOUR"]
    hyps = {"greedy": ["THE CAT SAT", "A FROG RAN", "HELLO", "WON TOO THREE FOR MORE"],
            "lm": ["THE CAT SAT", "A DOG RAN FAST", "HELLO WORLD", "ONE TWO THREE FOR"]}
    outputs = {("dev-clean", tag): SimpleNamespace(ids=[f"utt-{i}" for i in range(4)], refs=refs, hyps=h)
               for tag, h in hyps.items()}
    decoded = SimpleNamespace(run=run, out_dir=out, outputs=outputs, checkpoint=ws.run_dir(run) / "best.pt",
                              lm=ws.lm_dir / "4gram.bin", options_dict=lambda: None)
    score_decoded(decoded)
    return out


def test_finetuning_report_has_validation_curves_and_the_wer_table(tmp_path):
    ws = Workspace.resolve(tmp_path / "w")
    _write_run(ws, "ft", "finetune", _finetune_rows(), ["finetune.init=pt", "finetune.best_metric=dev-other/wer"])
    decode_dir = _evaluate_by_hand(ws, "ft")
    page = write_report(ws, "ft", worst=2)
    titles = _figures(page)
    assert {"Training loss", "Learning rate", "Gradient norm", "Throughput", "Validation WER", "Validation CER",
            "Validation loss", "Validation: empty hypotheses"} <= set(titles.values())
    assert "Target and prediction std" not in titles.values()
    html = page.read_text()
    assert "fine-tuning" in html and "best dev-other/wer" in html
    # The WER table, straight from wer.json.
    wer = json.loads((decode_dir / "wer.json").read_text())["splits"]["dev-clean"]
    for tag in ("greedy", "lm"):
        assert f"<td>{tag}</td>" in html and f"{wer[tag]['wer']:.2f}" in html
    # Worst utterances: the 4-error one first, at most --worst of them, alignments with the errors marked.
    assert "Worst utterances: dev-clean, greedy" in html and "Worst utterances: dev-clean, lm" in html
    greedy = html.split("Worst utterances: dev-clean, greedy", 1)[1].split("<h3>", 1)[0]
    assert greedy.index("utt-3") < greedy.index("utt-1") and "utt-2" not in greedy  # 4, then 2 errors; worst=2
    assert "<span class='err'>(ONE-&gt;WON)</span>" in greedy and "<span class='err'>(*-&gt;" in greedy
    [u3, u1] = worst_utterances(decode_dir / "errs-dev-clean-greedy.txt", 2)
    assert (u3.uid, u3.errors, u3.ref_words, u1.uid, u1.ref_words) == ("utt-3", 4, 4, "utt-1", 4)


def test_other_monitor_keys_get_figures(tmp_path):
    ws = Workspace.resolve(tmp_path / "w")
    rows = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "target_var": 0.5, "pred_var": 0.4, "mask_share": 0.5,
             "code_ratio": 0.1 * s, "new_thing": float(s)} for s in range(1, 21)]
    _write_run(ws, "pt", "pretrain", rows)
    titles = set(_figures(write_report(ws, "pt")).values())
    assert {"Training loss", "Target and prediction spread", "Monitor: mask_share", "Monitor: code_ratio",
            "new_thing"} <= titles


def test_cli_report_of_a_real_finetuning_run_prints_the_page(finetuned_tiny, tmp_path):
    ws = Workspace.resolve(tmp_path / "w")
    _copy_run(finetuned_tiny.parent, ws, "ft")
    res = runner.invoke(app, ["report", "ft", "--workdir", str(ws.root)])
    assert res.exit_code == 0, res.output
    page = Path(res.output.strip())
    assert page == ws.run_dir("ft") / "report" / "index.html"
    titles = set(_figures(page).values())
    assert {"Training loss", "Validation WER", "Validation CER"} <= titles


def test_a_missing_run_names_the_runs_there(tmp_path):
    ws = Workspace.resolve(tmp_path / "w")
    _write_run(ws, "alpha", "pretrain", [{"step": 1, "loss": 1.0}])
    (ws.runs_dir / "beta").mkdir()
    res = runner.invoke(app, ["report", "gamma", "--workdir", str(ws.root)])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "no run 'gamma'" in res.output and "alpha, beta" in res.output
    with pytest.raises(ReportError, match="no runs in"):
        write_report(Workspace.resolve(tmp_path / "empty"), "x")


def test_empty_or_missing_metrics_are_clear_errors(tmp_path):
    ws = Workspace.resolve(tmp_path / "w")
    run_dir = _write_run(ws, "pt", "pretrain", [])
    with pytest.raises(ReportError, match=r"metrics.jsonl is empty: the run has not logged an update yet"):
        write_report(ws, "pt")
    (run_dir / "metrics.jsonl").unlink()
    res = runner.invoke(app, ["report", "pt", "--workdir", str(ws.root)])
    assert res.exit_code == 2 and "metrics.jsonl does not exist" in res.output


def test_a_torn_last_line_is_dropped_but_damage_inside_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ReportError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(path)


def test_without_matplotlib_the_error_names_the_extra(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    ws = Workspace.resolve(tmp_path / "w")
    _write_run(ws, "pt", "pretrain", [{"step": s, "loss": 1.0} for s in (1, 2)])
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ReportError, match=re.escape("pip install 'd2vcli[report]'")):
        write_report(ws, "pt")
    assert not (ws.run_dir("pt") / "report").exists()


def test_a_rerun_replaces_the_figures(tmp_path):
    ws = Workspace.resolve(tmp_path / "w")
    run_dir = _write_run(ws, "pt", "pretrain", [{"step": s, "loss": 1.0 / s, "gnorm": 1.0} for s in range(1, 5)])
    write_report(ws, "pt")
    assert (run_dir / "report" / "train-gnorm.png").is_file()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                   for s in range(1, 5)))
    write_report(ws, "pt")
    assert sorted(p.name for p in (run_dir / "report").iterdir()) == ["index.html", "train-loss.png"]
    assert np.asarray(imread(run_dir / "report" / "train-loss.png")).size > 0
