"""The rollout's outcome test (closedloop.stages.rollout_test): losses, the mSPRT's always-valid p-value and
decisions, the minimum sample, the expected days to a decision, and refused input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from closedloop.stages.rollout_test import (
    BRIER,
    CANARY_BETTER,
    CANARY_WORSE,
    CONTINUE,
    LOG_LOSS,
    RolloutInputError,
    RolloutTestPolicy,
    expected_days_to_decision,
    paired_differences,
    per_row_losses,
    sequential_test,
)

DAYS, PER_DAY = 28, 400


def _rollout(seed: int, canary_noise: float = 0.0, same_noise: float = 0.0, days: int = DAYS, per_day: int = PER_DAY,
             rate: float = 0.2):
    """Labels, champion and canary scores and each row's look: a champion of moderate skill; the canary is the
    champion with ``canary_noise`` added on the logit scale (worse), and both arms get independent logit noise of
    sd ``same_noise`` (equally good, not identical)."""
    rng = np.random.default_rng(seed)
    n = days * per_day
    y = (rng.random(n) < rate).astype(np.int64)
    logit = np.log(rate / (1 - rate)) + 1.2 * (y - rate) / 0.4 + rng.normal(0, 1.0, n)
    champion = logit + rng.normal(0, same_noise, n)
    canary = logit + rng.normal(0, same_noise, n) + rng.normal(0, canary_noise, n)
    look = np.repeat(np.arange(days), per_day)
    return y, 1 / (1 + np.exp(-canary)), 1 / (1 + np.exp(-champion)), look


def test_losses_on_a_hand_computed_example():
    y = [1, 0, 1, 0]
    p = [0.8, 0.8, 1.0, 0.0]
    log = per_row_losses(y, p, LOG_LOSS)
    clip = 1e-7
    assert log == pytest.approx([-math.log(0.8), -math.log(0.2), -math.log(1 - clip), -math.log(1 - clip)])
    assert per_row_losses(y, p, BRIER) == pytest.approx([0.04, 0.64, 0.0, 0.0])
    # a score of exactly 0 for a positive costs -log(clip), not infinity
    assert per_row_losses([1], [0.0])[0] == pytest.approx(-math.log(clip))
    d = paired_differences([1, 0], [0.5, 0.5], [0.8, 0.2])
    assert d == pytest.approx([math.log(0.8 / 0.5), math.log(0.8 / 0.5)])  # the canary is worse on both rows


def test_the_p_value_never_increases_across_looks():
    for seed in range(5):
        y, canary, champion, look = _rollout(seed, same_noise=0.5)
        result = sequential_test(y, canary, champion, look)
        path = np.array(result.p_values)
        assert len(path) == DAYS and (np.diff(path) <= 0).all() and 0 < path.min() <= 1
        assert result.p_value == path[-1]


def test_identical_arms_never_decide():
    for seed in range(5):
        y, _, champion, look = _rollout(seed)
        result = sequential_test(y, champion, champion, look)
        assert result.decision == CONTINUE and result.p_value == 1.0 and result.mean_difference == 0.0


def test_equally_good_arms_do_not_decide_in_a_seeded_batch():
    results = [sequential_test(*_rollout(seed, same_noise=0.5)[:3], _rollout(seed)[3]) for seed in range(20)]
    assert [r.decision for r in results] == [CONTINUE] * 20
    assert all(r.interval[0] < 0 < r.interval[1] for r in results)


def test_a_clearly_worse_canary_is_rolled_back_and_a_better_one_found():
    y, canary, champion, look = _rollout(1, canary_noise=1.0)
    worse = sequential_test(y, canary, champion, look)
    assert worse.decision == CANARY_WORSE and worse.p_value <= 0.05
    assert worse.decided_at_look is not None and worse.decided_at_look < DAYS // 2
    assert worse.mean_difference > 0 and worse.interval[0] > 0
    assert worse.roc_auc_canary < worse.roc_auc_champion
    better = sequential_test(y, champion, canary, look)  # the arms swapped
    assert better.decision == CANARY_BETTER and better.decided_at_look == worse.decided_at_look


def test_the_minimum_sample_holds():
    y, canary, champion, look = _rollout(1, canary_noise=1.0)
    # plenty of evidence on day 0, but 400 rows < 1000: no decision before the third look (1200 rows)
    result = sequential_test(y, canary, champion, look, RolloutTestPolicy(min_rows=1000, min_positives=0))
    assert result.p_values[:2] == (1.0, 1.0) and result.decided_at_look == 2
    # too few positives: never decided, and the reason says why
    few = sequential_test(y, canary, champion, look, RolloutTestPolicy(min_rows=100, min_positives=10**6))
    assert few.decision == CONTINUE and set(few.p_values) == {1.0} and "minimum sample" in few.reason


def test_the_brier_score_decides_the_same_way():
    y, canary, champion, look = _rollout(1, canary_noise=1.0)
    result = sequential_test(y, canary, champion, look, RolloutTestPolicy(loss=BRIER, min_effect=0.005))
    assert result.decision == CANARY_WORSE and result.loss == BRIER
    assert result.canary_loss == pytest.approx(np.mean((canary - y) ** 2))


def test_the_decision_is_kept_and_the_result_is_plain_json():
    y, canary, champion, look = _rollout(2, canary_noise=1.0)
    result = sequential_test(y, canary, champion, look)
    out = result.to_dict()
    assert json.loads(json.dumps(out, allow_nan=False)) == out
    assert out["decision"] == CANARY_WORSE and out["roc_auc_difference"] < 0
    # one class only: the ROC AUCs are None with a reason, not NaN
    flat = sequential_test(np.zeros(2000), np.full(2000, 0.1), np.full(2000, 0.2),
                           policy=RolloutTestPolicy(min_positives=0)).to_dict()
    assert flat["roc_auc_canary"] is None and flat["undefined"]["roc_auc_canary"] == "one class only in the labels"
    assert flat["decision"] == CANARY_BETTER  # 0.1 is the better score for all-negative labels, on every row
    json.dumps(flat, allow_nan=False)


def test_expected_days_to_decision():
    approx = expected_days_to_decision(0.01, 0.15, 500, 0.2, tau2=1e-4)
    assert approx.limited_by == "evidence" and approx.days is not None and 1 <= approx.days <= 60
    sim = expected_days_to_decision(0.01, 0.15, 500, 0.2, tau2=1e-4, method="simulation", simulations=500,
                                    horizon_days=120)
    assert sim.decided_share > 0.9 and abs(sim.days - approx.days) <= max(3, 0.5 * approx.days)
    # a rare positive class: the minimum of positives bounds it
    rare = expected_days_to_decision(0.05, 0.15, 500, 0.001, min_positives=50)
    assert rare.limited_by == "min_positives" and rare.days == 100
    none = expected_days_to_decision(0.0, 0.15, 500, 0.2).to_dict()
    assert none["days"] is None and "no effect" in none["reason"]
    # more traffic decides sooner
    assert expected_days_to_decision(0.01, 0.15, 5000, 0.2).days < approx.days


@pytest.mark.parametrize(("labels", "canary", "champion", "message"), [
    ([0, 1, 1], [0.1, 0.2], [0.1, 0.2, 0.3], "length mismatch: labels has 3, canary_scores has 2"),
    ([0, 2], [0.1, 0.2], [0.1, 0.2], "labels: 1 of 2 are not 0 or 1"),
    ([0, float("nan")], [0.1, 0.2], [0.1, 0.2], "labels: 1 of 2 are not 0 or 1"),
    ([0, 1], [0.1, 1.5], [0.1, 0.2], "canary scores: 1 of 2 are outside [0, 1]"),
    ([0, 1], [0.1, 0.2], [-0.1, 0.2], "champion scores: 1 of 2 are outside [0, 1]"),
    ([0, 1], [0.1, float("nan")], [0.1, 0.2], "canary scores: 1 of 2 are NaN"),
    ([], [], [], "no rows"),
    (["a", "b"], [0.1, 0.2], [0.1, 0.2], "labels: not numbers"),
    ([0, 1], [0.1, None], [0.1, 0.2], "canary scores: 1 of 2 are NaN"),
])
def test_bad_input_is_refused(labels, canary, champion, message):
    with pytest.raises(ValueError, match="^" + message.replace("[", r"\[").replace("]", r"\]")) as err:
        sequential_test(labels, canary, champion)
    assert isinstance(err.value, RolloutInputError)
    with pytest.raises(ValueError):
        paired_differences(labels, canary, champion)


def test_bad_looks_and_policies_are_refused():
    with pytest.raises(ValueError, match="looks has 1 rows, labels 2"):
        sequential_test([0, 1], [0.1, 0.2], [0.1, 0.2], looks=[0])
    with pytest.raises(ValueError, match="looks: give non-negative integers"):
        sequential_test([0, 1], [0.1, 0.2], [0.1, 0.2], looks=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"alpha 1\.5 must be strictly between 0 and 1"):
        RolloutTestPolicy(alpha=1.5)
    with pytest.raises(ValueError, match="loss 'auc' must be one of"):
        RolloutTestPolicy(loss="auc")
