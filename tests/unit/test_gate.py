"""The gate's decision rule, case by case, and the paired bootstrap it relies on."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

from closedloop.core.errors import ConfigError
from closedloop.stages.gate import (
    INSUFFICIENT,
    PROMOTE,
    REJECT,
    Interval,
    Scores,
    _resample_counts,
    _weighted_metric,
    bootstrap_interval,
    decide,
    gate_policy,
)

# the point-estimate rule alone: no bootstrap, no floor (explicitly: the defaults are the shipped file's, strict)
POLICY = {"primary_metric": "roc_auc", "margin": 0.002, "guards": {"pr_auc": 0.02, "log_loss": 0.01},
          "min_holdout_positives": 20, "bootstrap": {"resamples": 0}, "floor": None}
BOOT = {**POLICY, "bootstrap": {"resamples": 1000, "confidence": 0.95, "seed": 0}, "floor": 0.6}
CHAMP = {"roc_auc": 0.90, "pr_auc": 0.50, "log_loss": 0.05, "positives": 100}


def _cand(**kw):
    return {**CHAMP, **kw}


def _gain_interval(lower: float, upper: float) -> Interval:
    return Interval("roc_auc", "gain", lower, upper, 1000, 0.95, 0)


@pytest.mark.parametrize(
    ("candidate", "champion", "outcome", "why"),
    [
        (_cand(), None, PROMOTE, "no champion"),
        (_cand(roc_auc=0.91), CHAMP, PROMOTE, "exceeds the margin"),
        (_cand(), CHAMP, REJECT, "does not exceed"),  # a tie is not a win
        (_cand(roc_auc=0.902), CHAMP, REJECT, "does not exceed"),  # exactly the margin is not enough
        (_cand(roc_auc=0.85), CHAMP, REJECT, "does not exceed"),
        (_cand(roc_auc=0.95, pr_auc=0.45), CHAMP, REJECT, "guard pr_auc"),
        (_cand(roc_auc=0.95, log_loss=0.07), CHAMP, REJECT, "guard log_loss"),
        (_cand(roc_auc=0.95, pr_auc=0.49, log_loss=0.055), CHAMP, PROMOTE, "guards within tolerance"),
        (_cand(roc_auc=0.99, positives=5), CHAMP, INSUFFICIENT, "fewer than the 20"),
        (_cand(roc_auc=float("nan")), CHAMP, INSUFFICIENT, "undefined"),
    ],
)
def test_decide(candidate, champion, outcome, why):
    d = decide(candidate, champion, POLICY, candidate_version="2", champion_version="1" if champion else None)
    assert d.outcome == outcome
    assert why in d.reason
    assert d.promote == (outcome == PROMOTE)
    assert d.to_dict()["candidate_version"] == "2"
    assert d.interval is None  # no bootstrap section: no interval


def test_lower_is_better_metric_as_primary():
    policy = {**POLICY, "primary_metric": "log_loss", "guards": {}}
    better = decide(_cand(log_loss=0.04), CHAMP, policy, candidate_version="2", champion_version="1")
    worse = decide(_cand(log_loss=0.06), CHAMP, policy, candidate_version="2", champion_version="1")
    assert better.outcome == PROMOTE and worse.outcome == REJECT


# -- the interval rule -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lower", "outcome", "why"),
    [
        (-0.005, REJECT, "lower bound does not"),  # the point gain (+0.01) exceeds the margin, the bound does not
        (0.002, REJECT, "lower bound does not"),   # a bound of exactly the margin is not enough
        (0.004, PROMOTE, "with its lower bound"),
    ],
)
def test_the_intervals_lower_bound_must_clear_the_margin(lower, outcome, why):
    d = decide(_cand(roc_auc=0.91), CHAMP, BOOT, candidate_version="2", champion_version="1",
               interval=_gain_interval(lower, 0.02))
    assert d.outcome == outcome and why in d.reason
    assert d.interval == {"metric": "roc_auc", "of": "gain", "lower": lower, "upper": 0.02, "resamples": 1000,
                          "confidence": 0.95, "seed": 0}


def _noisy_pair(seed: int, n: int = 3000, positives: int = 30, lift: float = 0.15):
    """A champion and a noisy copy of it that is a little better on average: per-row scores."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n, int)
    y[:positives] = 1
    champ = rng.normal(0, 1, n) + 1.5 * y
    cand = champ + rng.normal(0, 0.6, n) + lift * y

    def sig(s):
        return 1 / (1 + np.exp(-s))

    return y, sig(cand), sig(champ)


def _metrics(y, scores):
    return {"roc_auc": roc_auc_score(y, scores), "pr_auc": average_precision_score(y, scores),
            "log_loss": log_loss(y, np.clip(scores, 1e-7, 1 - 1e-7)), "positives": float(y.sum())}


def test_a_point_gain_past_the_margin_with_a_wide_interval_is_rejected(reliability):
    y, cand, champ = _noisy_pair(seed=0)
    c, k = _metrics(y, cand), _metrics(y, champ)
    d = decide(c, k, {**BOOT, "guards": {}}, candidate_version="2", champion_version="1",
               scores=Scores(y, cand, champ))
    gain = c["roc_auc"] - k["roc_auc"]
    assert gain > 0.02  # the point estimate alone would promote
    assert d.outcome == REJECT and "lower bound does not" in d.reason
    assert d.interval["lower"] < 0.002 < d.interval["upper"]
    reliability.record("gate", "candidate whose point gain (over +0.02 ROC AUC) exceeds the margin on 30 positives, "
                       "with a paired bootstrap interval that reaches below it",
                       "rejected: the 95% interval's lower bound is below the margin 0.002; champion kept")


def test_a_clear_gain_on_enough_positives_is_promoted():
    y, cand, champ = _noisy_pair(seed=0, n=20000, positives=400, lift=1.0)
    d = decide(_metrics(y, cand), _metrics(y, champ), {**BOOT, "guards": {}}, candidate_version="2",
               champion_version="1", scores=Scores(y, cand, champ))
    assert d.outcome == PROMOTE, d.reason
    assert d.interval["lower"] > 0.002


def test_identical_models_tie_with_a_zero_interval():
    y, _, champ = _noisy_pair(seed=1)
    m = _metrics(y, champ)
    d = decide(m, m, BOOT, candidate_version="2", champion_version="1", scores=Scores(y, champ, champ))
    assert d.outcome == REJECT and "does not exceed the margin" in d.reason
    assert (d.interval["lower"], d.interval["upper"]) == (0.0, 0.0)


def test_better_on_the_primary_metric_but_past_a_guard_is_rejected(reliability):
    d = decide(_cand(roc_auc=0.95, pr_auc=0.45), CHAMP, BOOT, candidate_version="2", champion_version="1",
               interval=_gain_interval(0.03, 0.07))
    assert d.outcome == REJECT and "guard pr_auc worsens by 0.0500 (tolerance 0.02)" in d.reason
    reliability.record("gate", "candidate better on ROC AUC (+0.05, interval clear of the margin) but 0.05 worse "
                       "on PR AUC (tolerance 0.02)", "rejected by the pr_auc guard; champion kept")


def test_the_bootstrap_needs_its_inputs():
    with pytest.raises(TypeError, match="pass the gain interval or the per-row scores"):
        decide(_cand(roc_auc=0.95), CHAMP, BOOT, candidate_version="2", champion_version="1")


@pytest.mark.parametrize(
    ("bootstrap", "match"),
    [
        ({"resamples": -1}, "resamples must be >= 0"),
        ({"resamples": 100, "confidence": 1.0}, "confidence strictly between"),
        ({"resamples": "many"}, r"gate\.bootstrap\.resamples: Input should be a valid integer"),
        ({"resample": 10}, r"gate\.bootstrap\.resample: unknown key"),
    ],
)
def test_a_bad_bootstrap_section_is_refused(bootstrap, match):
    with pytest.raises(ConfigError, match=match):
        decide(_cand(), CHAMP, {**POLICY, "bootstrap": bootstrap}, candidate_version="2", champion_version="1")


def test_a_policy_that_omits_keys_gets_the_strict_defaults():
    """Only primary_metric is required; the rest defaults to the shipped configuration's strict values."""
    policy = gate_policy({"primary_metric": "roc_auc"})
    assert (policy.margin, policy.min_holdout_positives, policy.floor) == (0.002, 20, None)
    assert (policy.bootstrap.resamples, policy.bootstrap.confidence, policy.guards) == (
        1000, 0.95, {"pr_auc": 0.02, "log_loss": 0.01})
    with pytest.raises(TypeError, match=r"gate\.bootstrap is on"):  # the interval is needed: no point-estimate win
        decide(_cand(roc_auc=0.95), CHAMP, {"primary_metric": "roc_auc"}, candidate_version="2", champion_version="1")
    d = decide(_cand(roc_auc=0.9015), CHAMP, {"primary_metric": "roc_auc", "bootstrap": {"resamples": 0}},
               candidate_version="2", champion_version="1")
    assert d.outcome == REJECT and "does not exceed the margin 0.002" in d.reason
    with pytest.raises(ConfigError, match=r"no bootstrap for primary metric 'recall_at_fpr'; use one of .* or set "
                       r"gate\.bootstrap\.resamples to 0"):
        decide(_cand(recall_at_fpr=0.5), CHAMP, {"primary_metric": "recall_at_fpr"}, candidate_version="2",
               champion_version="1")


def test_no_bootstrap_for_a_threshold_metric():
    policy = {**BOOT, "primary_metric": "recall_at_fpr"}
    with pytest.raises(ConfigError, match="no bootstrap for primary metric 'recall_at_fpr'"):
        decide(_cand(recall_at_fpr=0.5), CHAMP, policy, candidate_version="2", champion_version="1")


def test_resamples_zero_disables_the_interval():
    policy = {**BOOT, "bootstrap": {"resamples": 0}}
    d = decide(_cand(roc_auc=0.91), CHAMP, policy, candidate_version="2", champion_version="1")
    assert d.outcome == PROMOTE and d.interval is None


# -- no usable champion: the floor ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("auc", "interval", "outcome", "why"),
    [
        (0.90, (0.85, 0.95), PROMOTE, "roc_auc 0.9000 (95% CI [0.8500, 0.9500]) clears the floor 0.6"),
        (0.65, (0.55, 0.75), REJECT, "does not clear the floor 0.6"),  # the bound, not the point, fails
        (0.55, (0.50, 0.62), REJECT, "does not clear the floor 0.6"),
    ],
)
@pytest.mark.parametrize("problem", ["version 1 could not be loaded (XGBoostError: ...)",
                                     "version 1 was trained on another schema"])
def test_an_unusable_champion_is_replaced_only_by_a_candidate_that_clears_the_floor(auc, interval, outcome, why,
                                                                                     problem):
    ci = Interval("roc_auc", "candidate", *interval, 1000, 0.95, 0)
    d = decide(_cand(roc_auc=auc), None, BOOT, candidate_version="2", champion_version="1", interval=ci,
               champion_problem=problem)
    assert d.outcome == outcome and why in d.reason, d.reason
    assert d.reason.startswith(f"champion unusable: {problem}")
    assert d.champion_problem == problem
    assert d.champion_version == "1"  # the compare-and-set expects what the gate saw


def test_the_first_champion_needs_no_floor():
    # nothing to keep: an empty registry serves nothing (and a first window may be noisy, see docs/explanation/GATE.md)
    d = decide(_cand(roc_auc=0.55), None, BOOT, candidate_version="1", champion_version=None)
    assert d.outcome == PROMOTE and d.reason.startswith("no champion yet") and d.interval is None


def test_the_floor_is_computed_from_the_candidates_scores():
    y, cand, _ = _noisy_pair(seed=2)
    d = decide(_metrics(y, cand), None, BOOT, candidate_version="2", champion_version=None, scores=Scores(y, cand),
               champion_problem="version 1, the last one promoted, is gone")
    assert d.outcome == PROMOTE and d.interval["of"] == "candidate"
    assert d.interval["lower"] < roc_auc_score(y, cand) < d.interval["upper"]


def test_a_broken_champion_without_a_floor_is_not_replaced_blindly():
    d = decide(_cand(roc_auc=0.99), None, POLICY, candidate_version="2", champion_version="1",
               champion_problem="version 1 could not be loaded")
    assert d.outcome == REJECT and "no gate.floor is configured" in d.reason


def test_a_floor_is_a_ceiling_for_a_lower_is_better_metric():
    policy = {**POLICY, "primary_metric": "log_loss", "guards": {}, "floor": 0.1}
    args = {"candidate_version": "2", "champion_version": "1", "champion_problem": "version 1 is broken"}
    assert decide(_cand(log_loss=0.05), None, policy, **args).promote
    assert not decide(_cand(log_loss=0.2), None, policy, **args).promote


# -- the bootstrap itself --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("metric", "reference"),
    [("roc_auc", roc_auc_score), ("pr_auc", average_precision_score), ("log_loss", log_loss)],
)
def test_weighted_metrics_match_scikit_learn_with_ties(metric, reference):
    rng = np.random.default_rng(1)
    n = 3000
    y = (rng.random(n) < 0.05).astype(int)
    scores = np.clip(np.round(rng.random(n) * 0.5 + 0.4 * y, 2), 1e-7, 1 - 1e-7)  # many ties
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    wpos, wneg = _resample_counts(rng, len(pos), 4), _resample_counts(rng, len(neg), 4)
    assert (wpos.sum(axis=1) == len(pos)).all() and (wneg.sum(axis=1) == len(neg)).all()  # stratified
    weights = np.zeros((4, n))
    weights[:, pos], weights[:, neg] = wpos, wneg
    got = _weighted_metric(metric, y, scores)(wpos, wneg)
    np.testing.assert_allclose(got, [reference(y, scores, sample_weight=w) for w in weights], rtol=1e-12)
    unit = _weighted_metric(metric, y, scores)(np.ones((1, len(pos))), np.ones((1, len(neg))))
    np.testing.assert_allclose(unit, [reference(y, scores)], rtol=1e-12)


def test_the_bootstrap_is_seeded_and_oriented():
    y, cand, champ = _noisy_pair(seed=3, n=5000, positives=60, lift=0.8)
    args = {"metric": "roc_auc", "resamples": 300, "confidence": 0.9}
    a = bootstrap_interval(y, cand, champ, seed=0, **args)
    assert a == bootstrap_interval(y, cand, champ, seed=0, **args)
    assert a != bootstrap_interval(y, cand, champ, seed=1, **args)
    swapped = bootstrap_interval(y, champ, cand, seed=0, **args)
    assert swapped.lower == pytest.approx(-a.upper) and swapped.upper == pytest.approx(-a.lower)
    # a lower-is-better metric's gain is still "positive = candidate better": champion's loss - candidate's
    ll = bootstrap_interval(y, cand, champ, seed=0, **{**args, "metric": "log_loss"})
    assert ll.lower < log_loss(y, champ) - log_loss(y, cand) < ll.upper < 0


def test_one_class_gives_an_undefined_interval():
    ci = bootstrap_interval(np.zeros(100), np.full(100, 0.1), metric="roc_auc", resamples=10, confidence=0.95,
                            seed=0)
    assert np.isnan(ci.lower) and np.isnan(ci.upper)


def test_a_thousand_resamples_of_fifty_thousand_rows_are_fast():
    y, cand, champ = _noisy_pair(seed=4, n=50_000, positives=500, lift=0.3)
    t0 = time.perf_counter()
    bootstrap_interval(y, cand, champ, metric="roc_auc", resamples=1000, confidence=0.95, seed=0)
    assert time.perf_counter() - t0 < 10  # about 0.6 s alone on one core; generous for a shared machine


# -- the champion behind the alias: network errors are not champion problems ------------------------
class _Version:
    def __init__(self, contract):
        self.version, self.run_id, self.source = "1", None, "models:/m-1"
        self.tags = {"closedloop.schema_sha256": contract.sha256}


class _Client:
    """Just enough of MlflowClient for inspect_champion: the alias resolves to version 1."""

    def __init__(self, contract):
        self.mv = _Version(contract)

    def get_model_version_by_alias(self, name, alias):
        return self.mv

    def get_model_version(self, name, version):
        return self.mv


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ConnectionError("connection refused"), "transient"),
        (TimeoutError("read timed out"), "transient"),
        (ValueError("Invalid model format"), "version 1 could not be loaded (ValueError: Invalid model format)"),
        (FileNotFoundError("model.ubj"), "version 1 could not be loaded (FileNotFoundError: model.ubj)"),
    ],
)
def test_an_unreachable_store_is_retried_not_taken_for_a_broken_champion(contract, monkeypatch, error, expected):
    import closedloop.stages.registry
    from closedloop.core.errors import TransientError
    from closedloop.stages.gate import inspect_champion

    def load(uri):
        raise error

    monkeypatch.setattr(closedloop.stages.registry, "load_booster", load)
    if expected == "transient":
        with pytest.raises(TransientError, match="could not reach the champion"):
            inspect_champion(_Client(contract), "m", contract, holdout=None)
    else:
        assert inspect_champion(_Client(contract), "m", contract, holdout=None).problem == expected


def test_a_champion_without_a_schema_tag_is_not_compared(contract):
    from closedloop.stages.gate import inspect_champion

    client = _Client(contract)
    client.mv.tags = {}
    check = inspect_champion(client, "m", contract, holdout=None)
    assert check.scores is None and "no closedloop.schema_sha256 tag" in check.problem
