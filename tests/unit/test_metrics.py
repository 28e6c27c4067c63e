"""Metrics and the decision threshold."""

from __future__ import annotations

import numpy as np
import pytest

from closedloop.core.metrics import classification_metrics, threshold_at_fpr


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.2])
def test_threshold_respects_target_fpr(fpr):
    rng = np.random.default_rng(0)
    y = (rng.random(5000) < 0.05).astype(int)
    scores = np.clip(rng.normal(0.3 + 0.4 * y, 0.15), 0, 1)
    t = threshold_at_fpr(y, scores, fpr)
    achieved = (scores[y == 0] >= t).mean()
    assert achieved <= fpr + 1e-12
    # and it is the lowest such threshold: one notch lower breaks the target (unless nothing to gain)
    lower = np.sort(scores[y == 0])[::-1][int(np.floor(fpr * (y == 0).sum()))]
    assert (scores[y == 0] >= lower).mean() > fpr or fpr == 0.0


def test_metrics_on_perfect_and_random_scores():
    y = np.array([0] * 90 + [1] * 10)
    perfect = classification_metrics(y, y.astype(float), threshold=0.5)
    assert perfect["roc_auc"] == 1.0 and perfect["recall_at_fpr"] == 1.0 and perfect["fpr_at_threshold"] == 0.0
    flat = classification_metrics(y, np.full(100, 0.1), threshold=0.5)
    assert flat["roc_auc"] == 0.5 and flat["recall_at_fpr"] == 0.0
    assert flat["positives"] == 10 and flat["rows"] == 100


def test_single_class_gives_nan_not_a_crash():
    m = classification_metrics(np.zeros(10, dtype=int), np.linspace(0, 1, 10), threshold=0.5)
    assert np.isnan(m["roc_auc"]) and np.isnan(m["recall_at_fpr"])
