"""GLUE's metrics against scikit-learn and scipy, the implementations GLUE's own scoring uses."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from d2vcli import glue_metrics as gm


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_equal_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    classes = 2 if seed < 3 else 3
    y = rng.integers(classes, size=200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(classes, size=200))
    assert gm.accuracy(p, y) == pytest.approx(skm.accuracy_score(y, p), abs=1e-12)
    assert gm.matthews_corrcoef(p, y) == pytest.approx(skm.matthews_corrcoef(y, p), abs=1e-12)
    if classes == 2:
        assert gm.f1(p, y) == pytest.approx(skm.f1_score(y, p), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_correlations_equal_scipys_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, size=300) * 1.0  # STS-B-like scores 0..5 with many ties
    p = y + rng.normal(0, 1.5, size=300)
    p[:40] = np.round(p[:40])  # ties in the predictions too
    assert gm.pearson(p, y) == pytest.approx(scipy.stats.pearsonr(p, y)[0], abs=1e-12)
    assert gm.spearman(p, y) == pytest.approx(scipy.stats.spearmanr(p, y)[0], abs=1e-12)


def test_degenerate_predictions_score_zero_like_scikit_learn():
    y = np.array([0, 1, 1, 0, 1])
    constant = np.zeros(5, dtype=int)
    assert gm.matthews_corrcoef(constant, y) == skm.matthews_corrcoef(y, constant) == 0.0
    assert gm.f1(constant, y) == skm.f1_score(y, constant, zero_division=0) == 0.0
    assert gm.pearson(np.ones(5), y) == 0.0


def test_task_scores_are_percent_and_primary_is_glues_mean_of_the_pair():
    y, p = [1, 0, 1, 1], [1, 0, 0, 1]
    s = gm.task_scores("acc_and_f1", p, y)
    assert s["accuracy"] == pytest.approx(75.0) and s["f1"] == pytest.approx(100 * skm.f1_score(y, p))
    assert s["primary"] == pytest.approx((s["accuracy"] + s["f1"]) / 2)
    r = gm.task_scores("pearson_spearman", [0.1, 0.4, 0.35, 0.8], [0, 1, 2, 3])
    assert r["primary"] == pytest.approx((r["pearson"] + r["spearman"]) / 2)
    assert gm.task_scores("mcc", y, y)["primary"] == pytest.approx(100.0)


def test_bad_inputs_are_user_errors_that_say_what_is_wrong():
    with pytest.raises(gm.MetricError, match="3 predictions for 2 labels"):
        gm.accuracy([0, 1, 1], [0, 1])
    with pytest.raises(gm.MetricError, match="no labelled examples"):
        gm.task_scores("acc", [], [])
    with pytest.raises(gm.MetricError, match="unknown GLUE metric 'bleu'"):
        gm.task_scores("bleu", [0], [0])
