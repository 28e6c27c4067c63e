"""Score calibration, CBPE estimates, realised metrics and the bands of closedloop.stages.performance."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from closedloop.core.errors import ConfigError
from closedloop.stages.performance import (
    Band,
    PerformanceReference,
    ScoreCalibrator,
    band,
    calibrate_reference,
    chunk_bounds,
    estimate,
    estimate_average_precision,
    estimate_roc_auc,
    fit_calibrator,
    judge_window,
    out_of_fold_probabilities,
    realised,
)


def _world(n: int, seed: int, rate: float = 0.05, signal: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores (a monotone distortion of a logit) and labels drawn from the true probabilities."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(0.0, signal, n) + math.log(rate / (1 - rate)) - signal**2 / 4
    p = 1.0 / (1.0 + np.exp(-logit))
    y = (rng.random(n) < p).astype(np.int64)
    scores = p**0.4  # over-confident, uncalibrated but rank-preserving
    return scores, y


# -- calibration -------------------------------------------------------------------------------------
def test_the_calibrator_reproduces_sklearn_isotonic_and_survives_json():
    scores, y = _world(20_000, 1)
    cal = fit_calibrator(scores, y)
    assert cal.method == "isotonic" and cal.rows == len(y)
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, y)
    probe = np.r_[np.linspace(-0.5, 1.5, 101), scores[:500]]
    np.testing.assert_allclose(cal.apply(probe), iso.predict(probe), atol=1e-12)
    again = ScoreCalibrator.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert again == cal
    assert len(json.dumps(cal.to_dict())) < 100_000  # small enough to travel with a model version


def test_calibrated_probabilities_match_the_observed_rate_out_of_sample():
    scores, y = _world(60_000, 2)
    cal = fit_calibrator(scores[:30_000], y[:30_000])
    p = cal.apply(scores[30_000:])
    held = y[30_000:]
    assert abs(p.mean() - held.mean()) < 0.005
    assert abs(scores[30_000:].mean() - held.mean()) > 0.1  # the raw scores were not probabilities
    top = p > np.quantile(p, 0.9)
    assert abs(p[top].mean() - held[top].mean()) < 0.03


def test_too_few_positives_give_the_identity_and_say_so():
    cal = fit_calibrator([0.1, 0.2, 0.9, 0.3], [0, 0, 1, 0])
    assert cal.method == "identity" and "positive" in cal.reason
    np.testing.assert_allclose(cal.apply([-1.0, 0.4, 2.0]), [0.0, 0.4, 1.0])


@pytest.mark.parametrize("bad", [{"method": "spline", "x": [0.0], "y": [0.0]},
                                 {"method": "isotonic", "x": [], "y": []},
                                 {"method": "isotonic", "x": [0.0, 1.0], "y": [0.5]},
                                 {"method": "isotonic", "x": [1.0, 0.0], "y": [0.1, 0.2]},
                                 {"x": [0.0], "y": [0.0]}])
def test_a_broken_calibrator_is_refused(bad):
    with pytest.raises(ConfigError):
        ScoreCalibrator.from_dict(bad)


def test_out_of_fold_probabilities_are_not_fitted_on_their_own_rows():
    scores, y = _world(10_000, 3)
    oof = out_of_fold_probabilities(scores, y, folds=5)
    block = slice(0, 2000)
    refit = fit_calibrator(scores[2000:], y[2000:]).apply(scores[block])
    np.testing.assert_allclose(oof[block], refit)
    assert not np.allclose(oof, fit_calibrator(scores, y).apply(scores))


# -- CBPE ------------------------------------------------------------------------------------------------
def test_with_exact_probabilities_the_estimate_is_the_expected_realised_metric():
    """CBPE's ROC AUC on the true probabilities matches the mean realised AUC of label draws from them."""
    rng = np.random.default_rng(4)
    p = 1.0 / (1.0 + np.exp(-rng.normal(-2.5, 1.5, 5000)))
    draws = [(rng.random(len(p)) < p).astype(int) for _ in range(200)]
    mean_auc = np.mean([roc_auc_score(y, p) for y in draws])
    mean_ap = np.mean([average_precision_score(y, p) for y in draws])
    assert estimate_roc_auc(p) == pytest.approx(mean_auc, abs=0.003)
    assert estimate_average_precision(p) == pytest.approx(mean_ap, abs=0.01)


def test_estimates_handle_ties_like_the_realised_metric():
    p = np.array([0.9, 0.9, 0.5, 0.5, 0.5, 0.1, 0.1])
    # rows with a tied score form one step of the curve: the estimate equals the realised AUC of a
    # labelling whose positives in each tie group are the expected (fractional) count, i.e. weights
    y = np.r_[np.ones(len(p)), np.zeros(len(p))]
    s = np.r_[p, p]
    w = np.r_[p, 1 - p]
    assert estimate_roc_auc(p) == pytest.approx(roc_auc_score(y, s, sample_weight=w))
    assert estimate_average_precision(p) == pytest.approx(average_precision_score(y, s, sample_weight=w))


def test_the_ranking_comes_from_the_raw_scores_when_given():
    # calibrated probabilities tie two rows that the raw scores tell apart
    p = np.array([0.2, 0.2, 0.8])
    s = np.array([0.1, 0.3, 0.9])
    assert estimate_roc_auc(p, s) != estimate_roc_auc(p)


def test_no_expected_class_gives_nan_and_unknown_metrics_are_refused():
    assert math.isnan(estimate_roc_auc(np.zeros(10)))
    assert math.isnan(estimate_average_precision(np.zeros(10)))
    assert math.isnan(realised("roc_auc", np.linspace(0, 1, 10), np.zeros(10)))
    with pytest.raises(ConfigError):
        estimate("f1", np.full(3, 0.5))
    with pytest.raises(ConfigError):
        realised("f1", np.full(3, 0.5), [0, 1, 0])
    with pytest.raises(ValueError, match="0 or 1"):
        realised("roc_auc", [0.1, 0.2], [0, 2])


def test_realised_is_sklearns_metric():
    scores, y = _world(3000, 5)
    assert realised("roc_auc", scores, y) == roc_auc_score(y, scores)
    assert realised("average_precision", scores, y) == average_precision_score(y, scores)


# -- bands ------------------------------------------------------------------------------------------------
def test_band_is_mean_plus_minus_width_std_and_widens_for_small_windows():
    b = band([0.8, 0.82, 0.84, float("nan")], width=3.0, chunk_rows=1000)
    assert b.chunks == 3 and b.mean == pytest.approx(0.82) and b.std == pytest.approx(0.02)
    assert (b.lower, b.upper) == pytest.approx((0.76, 0.88))
    assert b.below(0.75) and not b.below(0.77) and not b.below(float("nan"))
    assert b.contains(0.8) and not b.contains(0.9)
    wide = b.for_rows(250)
    assert wide.std == pytest.approx(0.04) and wide.mean == b.mean
    assert b.for_rows(5000) == b
    assert Band.from_dict(json.loads(json.dumps(b.to_dict()))) == b
    with pytest.raises(ValueError):
        band([0.8])


def test_chunk_bounds_are_contiguous_and_cover_every_row():
    assert chunk_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert chunk_bounds(2, 3) == []
    assert chunk_bounds(10, 4, stride_rows=2) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert chunk_bounds(10, 4, stride_rows=4) == [(0, 4), (4, 10)]  # no overlap asked: disjoint


def test_a_short_reference_slides_its_chunks_when_told_how():
    """Fourteen days of a two-day window's rows make 7 disjoint chunks; sliding by a day's rows makes 13."""
    scores, y = _world(14_000, 9)
    ref = calibrate_reference(scores, y, chunk_rows=2000, stride_rows=1000)
    assert ref.layout == "sliding by 1000 rows" and ref.reason == ""
    assert ref.realised is not None and ref.realised.chunks == 13
    assert PerformanceReference.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    assert calibrate_reference(scores, y, chunk_rows=2000).realised is None
    assert calibrate_reference(scores[:10_000], y[:10_000], chunk_rows=2000, stride_rows=1000).realised is None


def test_the_reference_bands_hold_windows_of_the_same_world():
    """Chunks of a stable world fall inside the reference's bands; a degraded one falls below."""
    scores, y = _world(60_000, 6)
    ref = calibrate_reference(scores[:40_000], y[:40_000], chunk_rows=2000)
    assert ref.estimated is not None and ref.realised is not None and ref.reason == ""
    assert ref.realised.chunks == 20
    assert abs(ref.reference_estimated - ref.reference_realised) < 0.01
    again = PerformanceReference.from_dict(json.loads(json.dumps(ref.to_dict())))
    assert again == ref
    held_s, held_y = scores[40_000:], y[40_000:]
    inside = [judge_window(ref, held_s[a:a + 2000], held_y[a:a + 2000]) for a in range(0, 20_000, 2000)]
    assert sum(w.estimated_drop or w.realised_drop for w in inside) <= 1
    # the same scores with labels from a world that has moved on: half the positives are now random rows
    rng = np.random.default_rng(7)
    worse = held_y.copy()
    worse[rng.random(len(worse)) < 0.5 * held_y.mean()] = 1
    worse[(held_y == 1) & (rng.random(len(worse)) < 0.5)] = 0
    drops = [judge_window(ref, held_s[a:a + 2000], worse[a:a + 2000]).realised_drop for a in range(0, 20_000, 2000)]
    assert sum(drops) >= 9


def test_a_short_reference_gives_no_band_and_says_why():
    scores, y = _world(5000, 8)
    ref = calibrate_reference(scores, y, chunk_rows=1000)
    assert ref.estimated is None and ref.realised is None and "fewer than 10" in ref.reason
    window = judge_window(ref, scores[:1000])
    assert math.isnan(window.realised) and not window.estimated_drop and not window.realised_drop
    assert window.to_dict()["realised"] is None
