"""GLUE's task metrics, numpy only: what `d2v evaluate` reports and what picks a text run's best.pt.

The definitions are GLUE's (Wang et al., 2019, "GLUE: A Multi-Task Benchmark and Analysis Platform
for Natural Language Understanding", section 3 and table 1) as the reference implementations compute
them: accuracy; F1 of the positive class (label 1) for MRPC and QQP; the Matthews correlation
coefficient for CoLA; Pearson and Spearman correlation for STS-B. fairseq's data2vec 2.0 GLUE configs
select checkpoints by the mean of the pair (`acc_and_f1`, `pearson_and_spearman`); `primary` is that
number, in percent like the GLUE leaderboard. The test suite checks every metric against scikit-learn
and scipy.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from d2vcli.errors import UserError

Metric = Literal["acc", "acc_and_f1", "mcc", "pearson_spearman"]
METRICS: tuple[str, ...] = ("acc", "acc_and_f1", "mcc", "pearson_spearman")


class MetricError(UserError):
    """Predictions and labels that no metric can score (lengths differ, nothing to score)."""


def _pair(preds: Sequence, labels: Sequence, dtype) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds, dtype=dtype).ravel(), np.asarray(labels, dtype=dtype).ravel()
    if p.shape != y.shape:
        raise MetricError(f"{p.size} predictions for {y.size} labels: every labelled example needs one prediction")
    if p.size == 0:
        raise MetricError("no labelled examples to score: the split is empty or has no labels (GLUE's test "
                          "splits are unlabelled; score dev instead)")
    return p, y


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    p, y = _pair(preds, labels, np.int64)
    return float(np.mean(p == y))


def f1(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class; 0 when nothing is predicted or labelled positive (scikit-learn's convention)."""
    p, y = _pair(preds, labels, np.int64)
    tp = int(np.sum((p == positive) & (y == positive)))
    fp = int(np.sum((p == positive) & (y != positive)))
    fn = int(np.sum((p != positive) & (y == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """The multiclass MCC (Gorodkin's R_K) from the confusion matrix; 0 when either side is constant."""
    p, y = _pair(preds, labels, np.int64)
    classes = np.union1d(p, y)
    pi, yi = np.searchsorted(classes, p), np.searchsorted(classes, y)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (yi, pi), 1.0)
    t, pk = confusion.sum(axis=1), confusion.sum(axis=0)  # per class: labelled, predicted
    c, s = np.trace(confusion), confusion.sum()
    denom = np.sqrt((s * s - pk @ pk) * (s * s - t @ t))
    return 0.0 if denom == 0 else float((c * s - t @ pk) / denom)


def pearson(preds: Sequence[float], labels: Sequence[float]) -> float:
    p, y = _pair(preds, labels, np.float64)
    pc, yc = p - p.mean(), y - y.mean()
    denom = np.sqrt((pc @ pc) * (yc @ yc))
    return 0.0 if denom == 0 else float(pc @ yc / denom)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their mean rank, as Spearman's coefficient needs."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # mean of the 1-based ranks a+1 .. b
    return ranks


def spearman(preds: Sequence[float], labels: Sequence[float]) -> float:
    p, y = _pair(preds, labels, np.float64)
    return pearson(_average_ranks(p), _average_ranks(y))


def task_scores(metric: Metric, preds: Sequence, labels: Sequence) -> dict[str, float]:
    """Every number GLUE reports for the task, in percent, plus `primary` (what selects best.pt)."""
    if metric == "acc":
        scores = {"accuracy": accuracy(preds, labels)}
        primary = scores["accuracy"]
    elif metric == "acc_and_f1":
        scores = {"accuracy": accuracy(preds, labels), "f1": f1(preds, labels)}
        primary = (scores["accuracy"] + scores["f1"]) / 2
    elif metric == "mcc":
        scores = {"mcc": matthews_corrcoef(preds, labels)}
        primary = scores["mcc"]
    elif metric == "pearson_spearman":
        scores = {"pearson": pearson(preds, labels), "spearman": spearman(preds, labels)}
        primary = (scores["pearson"] + scores["spearman"]) / 2
    else:
        raise MetricError(f"unknown GLUE metric {metric!r}: use one of {', '.join(METRICS)}")
    return {**{k: 100.0 * v for k, v in scores.items()}, "primary": 100.0 * primary}
