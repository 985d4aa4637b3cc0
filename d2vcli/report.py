"""`d2v report RUN`: one HTML page with a run's training curves and, once `d2v evaluate` has scored it, its WER.

    d2v report RUN                      # prints <workdir>/runs/RUN/report/index.html
    from d2vcli.report import write_report; path = write_report(ws, "RUN")

Reads `<workdir>/runs/<RUN>/metrics.jsonl` (one line per logged update; fine-tuning adds one
per validation, with `<split>/wer`, `<split>/cer`, ... keys) and `config.yaml`, and writes
`runs/<RUN>/report/index.html` with the PNG figures it links by relative path, so the folder
can be copied or zipped as a whole. Plotted when present:

* every run: training loss, learning rate, gradient norm, throughput (audio s/s);
* pretraining: target and prediction std (with the collapse thresholds from the config), EMA
  decay, and any other monitor (a key naming std, var, share, ratio or monitor);
* fine-tuning: validation WER, CER, loss and empty-hypothesis share, one line per split;
* with `<workdir>/decode/<RUN>/wer.json`: the WER/CER table, and the worst utterances with
  their alignments from the `errs-<split>-<tag>.txt` files next to it.

Figures need matplotlib, the optional extra `pip install 'd2vcli[report]'`.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from d2vcli.errors import UserError
from d2vcli.fileio import atomic_write_text
from d2vcli.workspace import Workspace

INSTALL_HINT = "pip install 'd2vcli[report]'"

# Train-row keys that are bookkeeping, not curves worth a figure.
BOOKKEEPING = {"step", "epoch", "sample_size", "skipped", "wall"}
# Train-row keys with a figure of their own after loss, lr and the monitors: key -> (file stem, title, y label).
KNOWN = {
    "gnorm": ("gnorm", "Gradient norm", "L2 norm (before clipping)"),
    "ema_decay": ("ema-decay", "EMA teacher decay", "decay"),
    "audio_s_per_s": ("throughput", "Throughput", "audio seconds per second"),
    "loss_scale": ("loss-scale", "fp16 loss scale", "scale"),
    "max_mem_gb": ("memory", "Peak GPU memory", "GiB"),
}
# The engine divides the summed loss by the task's sample_size: masked frames or utterances.
LOSS_UNIT = {"pretraining": "regression loss per masked frame", "fine-tuning": "CTC loss per utterance"}
SPREAD = ("std", "var")  # keys grouped into the target / prediction spread figure
MONITOR = ("share", "ratio", "monitor")  # other monitors: one figure each
VALID_TITLES = {
    "wer": ("Validation WER", "WER (%)"),
    "cer": ("Validation CER", "CER (%)"),
    "loss": ("Validation loss", "CTC loss per utterance"),
    "empty": ("Validation: empty hypotheses", "share of utterances"),
}


class ReportError(UserError):
    """A run that cannot be reported (missing, nothing logged yet, matplotlib absent); the message says why."""


@dataclass
class Series:
    label: str
    key: str  # in metrics.jsonl
    steps: list[float]
    values: list[float]


@dataclass
class FigureSpec:
    stem: str  # the PNG's file name without .png
    title: str
    ylabel: str
    series: list[Series]
    hlines: list[tuple[float, str, str]] = field(default_factory=list)  # (y, label, series label): dashed, its colour
    markers: bool = False  # few points (validations): mark each one

    @property
    def file(self) -> str:
        return f"{self.stem}.png"


@dataclass
class WorstUtterance:
    uid: str
    sub: int
    dele: int
    ins: int
    ref_words: int
    alignment: str

    @property
    def errors(self) -> int:
        return self.sub + self.dele + self.ins


# ============================================================================ reading


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl. A torn last line (a run killed mid-write) is dropped, as on resume."""
    if not path.is_file():
        raise ReportError(f"{path} does not exist: the run has not logged an update yet "
                          "(it logs every train.log_every updates)")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break
            raise ReportError(f"{path}:{i}: not a JSON line ({e}); the file is damaged") from e
        if isinstance(row, dict) and _is_number(row.get("step")):
            rows.append(row)
    if not rows:
        raise ReportError(f"{path} is empty: the run has not logged an update yet (it logs every "
                          "train.log_every updates); run `d2v report` again once it has")
    return rows


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training rows, validation rows): validation rows are those with `<split>/<metric>` keys."""
    train, valid = [], []
    for row in rows:
        if "skipped_file" in row:  # the engine's note of an unreadable audio file, not a metric
            continue
        (valid if any("/" in k for k in row) else train).append(row)
    return train, valid


def read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: not valid YAML: {e}") from e
    return data if isinstance(data, dict) else {}


def run_kind(config: dict, valid: list[dict]) -> str:
    """Fine-tuning for a run initialized from a checkpoint or that validated, else pretraining."""
    if (config.get("finetune") or {}).get("init") or valid:
        return "fine-tuning"
    return "pretraining"


def _ref_words(alignment: str) -> int:
    """Reference words in an `A (B->C) (D->*) (*->E)` alignment: all but the insertions."""
    return sum(1 for token in alignment.split() if not token.startswith("(*->"))


def read_alignments(path: Path) -> list[WorstUtterance]:
    """The per-utterance alignments of an errs-<split>-<tag>.txt written by `d2v evaluate`."""
    out: list[WorstUtterance] = []
    inside = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("PER-UTTERANCE ALIGNMENTS"):
            inside = True
            continue
        if not inside:
            continue
        if not line.strip():
            break
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        counts = parts[1].split()
        if len(counts) != 3 or not all(c.isdigit() for c in counts):
            continue
        alignment = parts[2] if len(parts) > 2 else ""
        out.append(WorstUtterance(parts[0], int(counts[0]), int(counts[1]), int(counts[2]), _ref_words(alignment),
                                  alignment))
    return out


def worst_utterances(path: Path, n: int) -> list[WorstUtterance]:
    """The `n` utterances with the most errors (then the highest WER) in an errs- file."""
    utts = read_alignments(path)
    utts.sort(key=lambda u: (-u.errors, -u.errors / max(u.ref_words, 1), u.uid))
    return [u for u in utts if u.errors][:n]


# ============================================================================ figures


def _finite(steps: list, values: list) -> tuple[list[float], list[float]]:
    pairs = [(s, v) for s, v in zip(steps, values) if _is_number(v) and math.isfinite(v)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _series(rows: list[dict], key: str, label: Optional[str] = None) -> Series:
    steps, values = _finite([r["step"] for r in rows if key in r], [r[key] for r in rows if key in r])
    return Series(label or key, key, steps, values)


def _stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "metric"


def plan_figures(train: list[dict], valid: list[dict], config: dict, kind: str) -> list[FigureSpec]:
    """Which figures the rows support, in page order; keys absent from the log get no figure."""
    train_keys = [k for k in dict.fromkeys(k for r in train for k in r)
                  if k not in BOOKKEEPING and any(_is_number(r.get(k)) for r in train)]
    figures: list[FigureSpec] = []
    objective = config.get("objective") or {}

    def add(spec: FigureSpec) -> None:
        if any(s.steps for s in spec.series):
            figures.append(spec)

    if "loss" in train_keys:
        add(FigureSpec("train-loss", "Training loss", LOSS_UNIT.get(kind, "loss"), [_series(train, "loss")]))
    if "lr" in train_keys:
        add(FigureSpec("train-lr", "Learning rate", "learning rate", [_series(train, "lr")]))
    # A ratio or share (teacher_var_ratio) is a monitor of its own scale, not a spread to overlay.
    spread = [k for k in train_keys if any(w in k for w in SPREAD) and not any(w in k for w in MONITOR)]
    if spread:
        lines = []
        for key, limit in (("target_std", "min_target_std"), ("pred_std", "min_pred_std")):
            if key in spread and _is_number(objective.get(limit)):
                lines.append((float(objective[limit]), f"objective.{limit} (collapse below)", key))
        only_std = all("std" in k for k in spread)
        add(FigureSpec("train-spread", "Target and prediction std" if only_std else "Target and prediction spread",
                       "std over frames, mean over channels" if only_std else "value",
                       [_series(train, k) for k in spread], hlines=lines))
    monitors = [k for k in train_keys if k not in spread and any(w in k for w in MONITOR)]
    for key in monitors:
        add(FigureSpec(f"train-monitor-{_stem(key)}", f"Monitor: {key}", key, [_series(train, key)]))
    for key in KNOWN:
        if key in train_keys:
            stem, title, ylabel = KNOWN[key]
            add(FigureSpec(f"train-{stem}", title, ylabel, [_series(train, key)]))
    covered = {"loss", "lr", *KNOWN, *spread, *monitors}
    for key in train_keys:
        if key not in covered:
            add(FigureSpec(f"train-other-{_stem(key)}", key, key, [_series(train, key)]))

    by_metric: dict[str, list[str]] = {}
    for key in dict.fromkeys(k for r in valid for k in r if "/" in k):
        metric = key.rsplit("/", 1)[1]
        by_metric.setdefault(metric, []).append(key)
    order = {m: i for i, m in enumerate(VALID_TITLES)}  # known metrics first, then as logged
    for metric, keys in sorted(by_metric.items(), key=lambda kv: order.get(kv[0], len(order))):
        title, ylabel = VALID_TITLES.get(metric, (f"Validation {metric}", metric))
        add(FigureSpec(f"valid-{_stem(metric)}", title, ylabel,
                       [_series(valid, k, k.rsplit("/", 1)[0]) for k in keys], markers=True))
    return figures


def _matplotlib():
    """matplotlib's Figure and Agg canvas, imported on use: it is an optional extra (`d2vcli[report]`),
    and no other command should pay for its import."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ReportError(f"d2v report draws its figures with matplotlib, which is not installed here: "
                          f"{INSTALL_HINT}") from e
    return Figure, FigureCanvasAgg


def render_png(spec: FigureSpec, path: Path) -> None:
    """One figure as a PNG, with the Agg canvas (no display, no pyplot global state)."""
    Figure, FigureCanvasAgg = _matplotlib()
    fig = Figure(figsize=(6.4, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = {}
    for s in spec.series:
        [line] = ax.plot(s.steps, s.values, label=s.label, linewidth=1.4, marker="o" if spec.markers else None,
                         markersize=4)
        colours[s.label] = line.get_color()
    for y, label, of in spec.hlines:
        ax.axhline(y, linestyle="--", linewidth=1.0, color=colours.get(of, "grey"), alpha=0.8, label=label)
    values = [v for s in spec.series for v in s.values]
    # Losses and loss scales span decades; a log axis keeps the late, small values readable.
    if values and min(values) > 0 and max(values) / min(values) > 50 and spec.stem in (
            "train-loss", "train-loss-scale", "valid-loss"):
        ax.set_yscale("log")
    ax.set_title(spec.title)
    ax.set_xlabel("update")
    ax.set_ylabel(spec.ylabel)
    ax.grid(True, alpha=0.3)
    if len(spec.series) > 1 or spec.hlines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")


# ============================================================================ the page

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(600px, 1fr)); gap: 1em; }
figure { margin: 0; } figure img { width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
.ali { font-family: ui-monospace, monospace; font-size: 0.88em; }
.err { color: #b00020; font-weight: 600; } .note { color: #555; }
"""


def _e(x) -> str:
    return html.escape(str(x))


def _table(header: Optional[list[str]], rows: list[list], numeric: set[int] = frozenset()) -> str:
    out = ["<table>"] + (["<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"] if header else [])
    for row in rows:
        cells = (f"<td class='num'>{c}</td>" if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def _fmt(v, digits: int = 4) -> str:
    if _is_number(v):
        return f"{v:.{digits}g}" if isinstance(v, float) else str(v)
    return "" if v is None else str(v)


def _pct(v) -> str:
    return f"{v:.2f}" if _is_number(v) else ""


def _seconds(s: float) -> str:
    h, rem = divmod(int(round(s)), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def _summary(run: str, kind: str, train: list[dict], valid: list[dict], config: dict) -> str:
    rows = [["run", _e(run)], ["kind", kind]]
    if train:
        last = train[-1]
        max_updates = (config.get("train") or {}).get("max_updates")
        of = f" of {max_updates}" if max_updates else ""
        rows.append(["updates", f"{last['step']}{of} (log lines {len(train)}, first at update {train[0]['step']})"])
        for key, label in (("loss", "last training loss"), ("lr", "last learning rate")):
            if _is_number(last.get(key)):
                rows.append([label, _fmt(last[key])])
        speeds = [r["audio_s_per_s"] for r in train if _is_number(r.get("audio_s_per_s"))]
        if speeds:
            rows.append(["mean throughput", f"{sum(speeds) / len(speeds):.1f} audio s/s"])
        if _is_number(last.get("wall")):
            rows.append(["training time", _seconds(last["wall"])])
        if _is_number(last.get("skipped")):
            rows.append(["skipped updates (non-finite)", str(last["skipped"])])
    if valid:
        metric = (config.get("finetune") or {}).get("best_metric")
        best = [r["best"] for r in valid if _is_number(r.get("best"))]
        if best:
            rows.append([f"best {_e(metric) if metric else 'validation'}", _fmt(best[-1])])
        rows.append(["validations", f"{len(valid)} (last at update {valid[-1]['step']})"])
    return _table(None, rows)


def _figures_html(figures: list[FigureSpec]) -> str:
    items = [f"<figure><img src='{_e(f.file)}' alt='{_e(f.title)}'><figcaption>{_e(f.title)}: "
             f"{_e(', '.join(s.key for s in f.series))}</figcaption></figure>" for f in figures]
    return "<div class='figures'>\n" + "\n".join(items) + "\n</div>"


def _alignment_html(alignment: str) -> str:
    return " ".join(f"<span class='err'>{_e(t)}</span>" if re.fullmatch(r"\(.+->.+\)", t) else _e(t)
                    for t in alignment.split())


def _decode_html(decode_dir: Path, worst: int) -> str:
    path = decode_dir / "wer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return f"<p class='note'>{_e(path)} could not be read ({_e(e)}); re-run `d2v evaluate`.</p>"
    splits = data.get("splits") or {}
    rows = []
    for split, tags in splits.items():
        for tag, sc in tags.items():
            w = sc.get("words") or {}
            c = sc.get("chars") or {}
            rows.append([_e(split), _e(tag), _fmt(sc.get("utterances")), _pct(sc.get("wer")), _pct(sc.get("cer")),
                         f"{_fmt(w.get('errors'))} / {_fmt(w.get('ref'))}",
                         _fmt(w.get("sub")), _fmt(w.get("del")), _fmt(w.get("ins")),
                         f"{_fmt(c.get('errors'))} / {_fmt(c.get('ref'))}"])
    parts = [f"<p class='note'>From {_e(path)}; checkpoint {_e(data.get('checkpoint') or '?')}, "
             f"LM {_e(data.get('lm') or 'none (greedy only)')}.</p>",
             _table(["split", "decoding", "utterances", "WER %", "CER %", "word errors / ref words", "sub", "del",
                     "ins", "char errors / ref chars"], rows, numeric={2, 3, 4, 5, 6, 7, 8, 9})]
    scored = [(split, tag) for split, tags in splits.items() for tag in tags] if worst > 0 else []
    for split, tag in scored:
        errs = decode_dir / f"errs-{split}-{tag}.txt"
        if not errs.is_file():
            continue
        utts = worst_utterances(errs, worst)
        parts.append(f"<h3>Worst utterances: {_e(split)}, {_e(tag)}</h3>")
        if not utts:
            parts.append("<p class='note'>No errors.</p>")
            continue
        utt_rows = [[_e(u.uid), str(u.errors), f"{u.sub} {u.dele} {u.ins}", str(u.ref_words),
                     f"{100.0 * u.errors / max(u.ref_words, 1):.0f}",
                     f"<span class='ali'>{_alignment_html(u.alignment)}</span>"] for u in utts]
        parts.append(_table(["utterance", "errors", "S D I", "ref words", "WER %",
                             "alignment (ref->hyp, * = nothing)"], utt_rows, numeric={1, 3, 4}))
    return "\n".join(parts)


def render_html(run: str, kind: str, train: list[dict], valid: list[dict], config: dict,
                figures: list[FigureSpec], decode_dir: Path, config_text: str, worst: int) -> str:
    body = [f"<h1>d2v report: {_e(run)}</h1>", _summary(run, kind, train, valid, config)]
    body.append("<h2>Training</h2>")
    body.append(_figures_html([f for f in figures if f.stem.startswith("train-")]) if train else
                "<p class='note'>No training lines in metrics.jsonl.</p>")
    valid_figures = [f for f in figures if f.stem.startswith("valid-")]
    if valid_figures:
        body += ["<h2>Validation</h2>", _figures_html(valid_figures)]
    body.append("<h2>Decoding</h2>")
    if (decode_dir / "wer.json").is_file():
        body.append(_decode_html(decode_dir, worst))
    else:
        body.append(f"<p class='note'>Not evaluated yet: `d2v evaluate {_e(run)}` writes {_e(decode_dir)}/wer.json, "
                    "and the next `d2v report` shows it here.</p>")
    body.append("<h2>Config</h2>")
    body.append(f"<details><summary>config.yaml</summary><pre>{_e(config_text)}</pre></details>" if config_text
                else "<p class='note'>The run has no config.yaml.</p>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>d2v report: {_e(run)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_report(ws: Workspace, run: str, worst: int = 10) -> Path:
    """Write <workdir>/runs/<run>/report/index.html and its figures; returns the page's path."""
    run_dir = ws.run_dir(run)
    if not run_dir.is_dir():
        runs = sorted(d.name for d in ws.runs_dir.iterdir() if d.is_dir()) if ws.runs_dir.is_dir() else []
        have = (f"Runs in {ws.runs_dir}: {', '.join(runs)}." if runs else
                f"There are no runs in {ws.runs_dir}: `d2v pretrain` or `d2v finetune` makes one (or pass --workdir).")
        raise ReportError(f"no run '{run}' in this workspace. {have}")
    rows = read_metrics(run_dir / "metrics.jsonl")
    train, valid = split_rows(rows)
    config = read_config(run_dir)
    kind = run_kind(config, valid)
    figures = plan_figures(train, valid, config, kind)
    _matplotlib()  # fail on a missing extra before anything is written
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.png"):  # figures of an earlier report that this one may not redraw
        old.unlink()
    for spec in figures:
        render_png(spec, out / spec.file)
    config_path = run_dir / "config.yaml"
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else ""
    page = render_html(run, kind, train, valid, config, figures, ws.decode_dir / run,
                       config_text, worst)
    atomic_write_text(out / "index.html", page)
    return out / "index.html"
