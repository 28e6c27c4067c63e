"""Statistical behaviour of closedloop.stages.drift with Evidently on simulated card-fraud data.

The set-up (seed 11, 400 customers, 2500 transactions a day):

- one simulated period per scenario: 30 warm-up days (the customer aggregates' 30-day lookback, so the
  reference does not see half-empty aggregates), 14 reference days, then 40 days cut into 20 two-day
  windows (4500-5800 rows and 18-77 positives each). Drift starts with the first window. The same seed
  gives the same transactions before ``drift_start`` whatever the knobs (checked on the keys, amounts,
  categories and labels: with ``concept_drift`` the null masks of distance_from_home_km and
  merchant_risk_score before drift_start do shift, because ``simulate`` draws both masks from one stream
  whose length is the total row count), so the reference and the model are shared by all scenarios.
- reference: 5000 rows sampled from the 14 reference days, scored by the model.
- model: XGBoost with the repo's training parameters (at most 150 rounds) trained on reference days 0-9,
  early-stopped on days 10-11; its ROC AUC on days 12-13 is the reference quality.
- every window carries the model's score and the labels, so every rule of the policy is in play.
- the policy is the repo's (``monitoring:`` of models/card_fraud/closedloop.yaml); ``RECOMMENDED`` is the repo's
  with the two changes these measurements argue for (see the tests of no drift and of new categories).

Measured with the repo policy (20 windows each): no drift 0/20 windows flagged; covariate_drift=0.5
20/20; new_categories 4/20 (20 %: below the 90 % target, see test_new_categories_are_detected);
concept_drift=1 quality rule 20/20; covariate_drift=0.15 (near the threshold) 2/20. With RECOMMENDED:
0/20, 20/20, 20/20, 20/20, 1/20. One window takes about 1.1 s (Evidently's per-column rendering is most
of it), so each scenario test takes about 20-25 s.

These figures are those of the FIXED policy on independent days (``structure=0``, the generator before its
day-of-week, hour and day-level cycles): they check the statistics engine and the fixed rules in the world they
were designed for. On the structured generator (the default) the fixed rules alarm on most stable windows (18, 14
and 12 of 20 on seeds 11-13, as real daily data does to them): that world is judged by the calibrated policy in
``tests/data/test_drift_calibration.py``, which also asserts the fixed policy's false alarms there.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import Counter
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from closedloop.core.lake import Lake
from closedloop.core.metrics import classification_metrics
from closedloop.core.schema import DataContract
from closedloop.core.settings import DEFAULT_CONFIG, Config
from closedloop.devtools.generate import NEW_CATEGORY, GeneratorConfig, simulate
from closedloop.stages.aggregates import compute_entity_features
from closedloop.stages.drift import DriftFigures, DriftPolicy, decide, measure, save_report
from closedloop.stages.training import fit, predict

START = date(2026, 1, 5)
SEED = 11
CUSTOMERS = 400
PER_DAY = 2500
WARMUP_DAYS = 30
REFERENCE_DAYS = 14
# independent days: see the module docstring (the structured world is test_drift_calibration's)
STRUCTURE = 0.0
WINDOWS = 20
REFERENCE_ROWS = 5000
DRIFT_START = START + timedelta(days=WARMUP_DAYS + REFERENCE_DAYS)

SCENARIOS: dict[str, dict[str, Any]] = {
    "none": {},
    "covariate": {"covariate_drift": 0.5},
    "new_categories": {"new_categories": True},
    "concept": {"concept_drift": 1.0},
    "near_threshold": {"covariate_drift": 0.15},
}


def repo_policy() -> DriftPolicy:
    return DriftPolicy.from_config(Config.load(DEFAULT_CONFIG).raw["monitoring"])


def recommended(policy: DriftPolicy) -> DriftPolicy:
    """The repo policy with what these measurements recommend: merchant_category as a key feature at a
    Jensen-Shannon distance of 0.07, and a quality drop of 0.08 instead of 0.05."""
    return dataclasses.replace(policy, key_features={**policy.key_features, "merchant_category": 0.07},
                               quality_drop=0.08)


@dataclasses.dataclass
class World:
    contract: DataContract
    policy: DriftPolicy
    window_days: int
    booster: Any
    reference: pd.DataFrame
    reference_quality: dict[str, float]
    pre_drift: pd.DataFrame  # the no-drift frame before drift_start, to check the other scenarios against


def simulated(contract: DataContract, window_days: int, **knobs: Any) -> pd.DataFrame:
    """Transactions with their customer features and a ``day`` column (0 = START)."""
    days = WARMUP_DAYS + REFERENCE_DAYS + WINDOWS * window_days
    config = GeneratorConfig(start=START, days=days, customers=CUSTOMERS, transactions_per_day=PER_DAY, seed=SEED,
                             drift_start=DRIFT_START if knobs else None, structure=STRUCTURE, **knobs)
    tx = simulate(config, contract).transactions
    features = compute_entity_features(tx, contract)
    frame = tx.merge(features, on=[contract.entity, contract.event_timestamp], how="left", validate="many_to_one")
    assert len(frame) == len(tx)
    frame["day"] = (frame[contract.event_timestamp] - pd.Timestamp(START, tz="UTC")).dt.days
    return frame


def days(frame: pd.DataFrame, first: int, n: int) -> pd.DataFrame:
    return frame[(frame["day"] >= first) & (frame["day"] < first + n)]


@pytest.fixture(scope="module")
def world(contract: DataContract) -> World:
    policy = repo_policy()
    window_days = policy.window_days
    frame = simulated(contract, window_days)
    ref_days = days(frame, WARMUP_DAYS, REFERENCE_DAYS)
    train = days(frame, WARMUP_DAYS, 10)
    validation = days(frame, WARMUP_DAYS + 10, 2)
    holdout = days(frame, WARMUP_DAYS + 12, 2)
    training = Config.load(DEFAULT_CONFIG).typed.training.model_copy(
        update={"num_boost_round": 150, "early_stopping_rounds": 20})
    booster, threshold = fit(train, validation, contract, training, "cpu")
    quality = classification_metrics(holdout[contract.label].to_numpy(), predict(booster, holdout, contract),
                                     threshold)
    reference = ref_days.sample(n=REFERENCE_ROWS, random_state=0).reset_index(drop=True)
    reference["score"] = predict(booster, reference, contract)
    pre_drift = frame[frame["day"] < WARMUP_DAYS + REFERENCE_DAYS].reset_index(drop=True)
    return World(contract=contract, policy=policy, window_days=window_days, booster=booster, reference=reference,
                 reference_quality={"roc_auc": quality["roc_auc"]}, pre_drift=pre_drift)


_MEASURED: dict[str, list[DriftFigures]] = {}


def measured(world: World, scenario: str) -> list[DriftFigures]:
    """The figures of the scenario's 20 windows (computed once per module)."""
    if scenario not in _MEASURED:
        c = world.contract
        frame = simulated(c, world.window_days, **SCENARIOS[scenario])
        # the same world until drift_start (the null masks may differ: see the module docstring)
        before = frame[frame["day"] < WARMUP_DAYS + REFERENCE_DAYS].reset_index(drop=True)
        same = [c.row_key, c.entity, c.event_timestamp, c.label, "amount", "merchant_category", "channel"]
        pd.testing.assert_frame_equal(before[same], world.pre_drift[same])
        frame["score"] = predict(world.booster, frame, c)
        out = []
        for i in range(WINDOWS):
            window = days(frame, WARMUP_DAYS + REFERENCE_DAYS + i * world.window_days, world.window_days)
            _, figures = measure(world.reference, window, c, world.policy, reference_quality=world.reference_quality,
                                 label_column=c.label, seed=i)
            out.append(figures)
        _MEASURED[scenario] = out
    return _MEASURED[scenario]


def rate(figures: list[DriftFigures], policy: DriftPolicy, rule: str | None = None) -> float:
    """Share of windows flagged as drift (or in which ``rule`` fired)."""
    decisions = [decide(f, policy) for f in figures]
    assert all(d.judged for d in decisions)
    hits = [d.drift if rule is None else any(r == rule or r.startswith(rule + ":") for r in d.fired)
            for d in decisions]
    return float(np.mean(hits))


def fired(figures: list[DriftFigures], policy: DriftPolicy) -> dict[str, int]:
    return dict(Counter(r for f in figures for r in decide(f, policy).fired))


def scores(figures: list[DriftFigures], feature: str) -> np.ndarray:
    return np.array([f.per_feature[feature]["score"] for f in figures])


# -- the scenarios ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_no_drift_false_alarm_rate(world: World) -> None:
    """No drift: measured 0/20 windows flagged. Largest drift share 2/17 (txn_count_1d and amount_sum_1d
    move with the weekday mix), key features at most 0.045 (amount) and 0.042 (merchant_risk_score), score
    0.010-0.038, ROC AUC from 0.042 below to 0.053 above the reference 0.932.

    The quality rule is the noisy one: over 6 other data seeds its own false-alarm rate on two-day windows
    (~50 positives) was 0-15 % (mean ~6 %), on one-day windows (~25 positives) 3-17 %; with quality_drop=0.08
    it was 0-5 % and 3-7 %, while concept drift still drops ROC AUC by 0.14-0.33.
    """
    figures = measured(world, "none")
    fa = rate(figures, world.policy)
    assert fa <= 0.10, f"false-alarm rate {fa:.0%} with the repo policy: {fired(figures, world.policy)}"
    assert rate(figures, world.policy, "drift_share") == 0.0
    assert max(f.drift_share for f in figures) < world.policy.drift_share_threshold
    fa_rec = rate(figures, recommended(world.policy))
    assert fa_rec <= 0.10, f"false-alarm rate {fa_rec:.0%} with the recommended policy"
    labelled = [f.quality["positives"] >= world.policy.min_labelled_positives for f in figures if f.quality]
    assert len(labelled) == WINDOWS and np.mean(labelled) >= 0.9  # the quality rule was in play


@pytest.mark.slow
def test_covariate_drift_is_detected(world: World) -> None:
    """covariate_drift=0.5: measured 20/20 windows flagged: amount 0.28-0.35 against 0.1 in every window,
    the drift share rule in 19/20 (amount, channel, hour, distance, the amount aggregates), the quality rule
    in 2/20."""
    figures = measured(world, "covariate")
    power = rate(figures, world.policy)
    assert power >= 0.90, f"detection power {power:.0%}: {fired(figures, world.policy)}"
    assert rate(figures, world.policy, "key_feature") >= 0.90
    assert rate(figures, recommended(world.policy)) >= 0.90
    assert np.median(scores(figures, "amount")) > 3 * world.policy.key_features["amount"]


@pytest.mark.slow
def test_new_categories_are_detected(world: World) -> None:
    """new_categories: 3 % of the window's rows are in a merchant category the contract does not know.

    Measured: merchant_category's Jensen-Shannon distance is 0.100-0.113 in every window (no drift: 0.015-
    0.025 here, at most 0.054 on 1000-row windows), i.e. right at the categorical threshold of 0.1, and
    merchant_category is not a key feature, so only the merchant_risk_score key rule can see it (0.063-0.114
    against 0.1): the repo policy flags 4/20 windows (20 %), far below the 90 % target. With merchant_category
    a key feature at 0.07 (RECOMMENDED) it flags 20/20, with no extra false alarm on the no-drift windows.
    """
    figures = measured(world, "new_categories")
    js = scores(figures, "merchant_category")
    quiet = scores(measured(world, "none"), "merchant_category")
    assert js.min() > 2 * quiet.max(), (js, quiet)
    repo = rate(figures, world.policy)
    if repo < 0.90:
        warnings.warn(f"the repo's monitoring policy detects an unknown merchant category in only {repo:.0%} of "
                      f"windows (Jensen-Shannon {js.min():.3f}-{js.max():.3f} against 0.1): make merchant_category "
                      "a key feature at 0.07", UserWarning, stacklevel=1)
    power = rate(figures, recommended(world.policy))
    assert power >= 0.90, f"detection power {power:.0%} with the recommended policy"
    assert rate(measured(world, "none"), recommended(world.policy), "key_feature:merchant_category") == 0.0


@pytest.mark.slow
def test_concept_drift_fires_the_quality_rule(world: World) -> None:
    """concept_drift=1 (fraud turns domestic, chip, daytime, usual amounts): the features barely move, the
    model's ROC AUC falls. Measured: the quality rule fired in 20/20 windows (ROC AUC 0.14-0.33 below the
    reference 0.932, 21-77 positives a window); no feature rule fired (score drift 0.060-0.073)."""
    figures = measured(world, "concept")
    quality = rate(figures, world.policy, "quality")
    drops = [f.quality["drop"] for f in figures]
    assert quality >= 0.80, f"quality rule fired in {quality:.0%} of windows, drops {drops}"
    assert rate(figures, recommended(world.policy), "quality") >= 0.80
    assert np.median(drops) > 2 * world.policy.quality_drop


@pytest.mark.slow
def test_small_covariate_drift_is_mostly_not_flagged(world: World) -> None:
    """covariate_drift=0.15, just under what the policy flags: amount's normed Wasserstein distance is
    0.063-0.108 (median 0.078; 0.015-0.045 without drift); 2/20 windows flagged (the amount key rule once,
    the quality rule once), and the drift share reached 5/17, one feature short of 0.3. (covariate_drift=0.05
    is lost in the noise here: amount 0.018-0.043, 0/20 flagged; 0.2 is flagged in 18/20.)"""
    figures = measured(world, "near_threshold")
    flagged = rate(figures, world.policy)
    assert flagged <= 0.25, f"{flagged:.0%} of windows flagged: {fired(figures, world.policy)}"
    amount, quiet = scores(figures, "amount"), scores(measured(world, "none"), "amount")
    threshold = world.policy.key_features["amount"]
    assert np.median(amount) > max(quiet.max(), 0.5 * threshold)  # the drift is there, near the threshold ...
    assert np.median(amount) < threshold  # ... but mostly below it


# -- how measure works --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_flags_and_scores_come_from_evidently(world: World) -> None:
    """Each drift flag agrees with its score and threshold (distances: drift when score >= threshold), and
    the columns are the model's features with the fixed stattest of their kind."""
    c = world.contract
    for figures in measured(world, "covariate")[:5]:
        assert list(figures.per_feature) == c.model_features
        for name, r in figures.per_feature.items():
            kind = "jensenshannon" if name in c.categorical else "wasserstein"
            assert r["stattest"] == kind, name
            assert r["threshold"] == 0.1
            assert r["drifted"] == (r["score"] >= r["threshold"]), (name, r)
        assert figures.drifted_features == [n for n, r in figures.per_feature.items() if r["drifted"]]
        assert figures.drift_share == len(figures.drifted_features) / len(c.model_features)
        assert figures.prediction is not None and figures.prediction["threshold"] == world.policy.prediction_threshold
        assert figures.sampled_rows == figures.current_rows < world.policy.sample_rows


@pytest.mark.parametrize("rows", [300, 900, 1100, 5000])
def test_the_stattest_is_fixed_whatever_the_size(world: World, rows: int) -> None:
    """Evidently picks K-S / chi-square up to 1000 rows and Wasserstein / Jensen-Shannon above; the policy
    pins them per column, so the method never switches."""
    current = world.reference.sample(n=rows, random_state=rows, replace=rows > len(world.reference))
    reference = world.reference.sample(n=min(rows, len(world.reference)), random_state=1)
    _, figures = measure(reference, current, world.contract, world.policy)
    assert {r["stattest"] for n, r in figures.per_feature.items() if n in world.contract.categorical} == {
        "jensenshannon"}
    assert {r["stattest"] for n, r in figures.per_feature.items() if n not in world.contract.categorical} == {
        "wasserstein"}
    assert figures.prediction["stattest"] == "wasserstein"


def test_identical_frames_show_no_drift_and_unknown_categories_count(world: World) -> None:
    c = world.contract
    _, same = measure(world.reference, world.reference.copy(), c, world.policy)
    assert all(r["score"] == pytest.approx(0.0, abs=1e-12) for r in same.per_feature.values())
    assert same.drifted_features == [] and same.prediction["score"] == pytest.approx(0.0, abs=1e-12)
    assert not decide(same, world.policy).drift

    current = world.reference.copy()
    rows = np.random.default_rng(0).choice(len(current), size=len(current) // 20, replace=False)
    current.loc[rows, "merchant_category"] = NEW_CATEGORY  # 5 % outside the contract's categories
    _, shifted = measure(world.reference, current, c, world.policy)
    assert shifted.per_feature["merchant_category"]["score"] > 0.1
    assert shifted.drifted_features == ["merchant_category"]


def test_sampling_is_deterministic(world: World) -> None:
    small = dataclasses.replace(world.policy, sample_rows=2000)
    window = days(world.pre_drift, WARMUP_DAYS + 12, world.window_days)
    _, a = measure(world.reference, window, world.contract, small, seed=3)
    _, b = measure(world.reference, window, world.contract, small, seed=3)
    _, other = measure(world.reference, window, world.contract, small, seed=4)
    assert a.to_dict() == b.to_dict()
    assert (a.current_rows, a.sampled_rows, a.reference_rows) == (len(window), 2000, len(world.reference))
    assert a.per_feature != other.per_feature


def test_a_million_rows_are_sampled_down(world: World) -> None:
    """1M-row window against the 5000-row reference: sampled to 100k rows; measured about 3.5 s here
    (5 s against a 100k-row reference). The bound is loose: it catches a lost sampling step (~50 s)."""
    c = world.contract
    source = world.reference
    big = source.iloc[np.resize(np.arange(len(source)), 1_000_000)].reset_index(drop=True)
    started = time.perf_counter()
    _, figures = measure(world.reference, big, c, world.policy, reference_quality=world.reference_quality,
                         label_column=c.label)
    elapsed = time.perf_counter() - started
    assert (figures.current_rows, figures.sampled_rows) == (1_000_000, world.policy.sample_rows)
    assert figures.quality is not None and figures.quality["rows"] == 1_000_000  # quality on every labelled row
    assert elapsed < 30, f"measure took {elapsed:.1f} s on 1M rows"


def test_labels_with_nulls_are_ignored(world: World) -> None:
    c = world.contract
    window = world.reference.copy()
    window[c.label] = window[c.label].astype("float64")
    window.loc[window.index[:1000], c.label] = np.nan
    _, figures = measure(world.reference, window, c, world.policy, reference_quality={"roc_auc": 0.9},
                         label_column=c.label)
    q = figures.quality
    assert q["rows"] == len(window) - 1000
    assert q["positives"] == int(world.reference[c.label].iloc[1000:].sum())
    assert q["drop"] == pytest.approx(0.9 - q["roc_auc"])
    assert 0.5 < q["roc_auc"] <= 1.0 and 0.0 < q["pr_auc"] <= 1.0


def test_save_report_with_a_real_snapshot(world: World, tmp_path) -> None:
    lake = Lake(root="file://" + str(tmp_path / "lake"))
    snapshot, figures = measure(world.reference, world.reference.sample(2000, random_state=5), world.contract,
                                world.policy)
    decision = decide(figures, world.policy)
    uris = save_report(snapshot, figures, decision, lake, date(2026, 3, 1), date(2026, 3, 3))
    html = lake.read_bytes(uris["html"])
    assert len(html) > 100_000 and b"<html" in html[:2000].lower()
    doc = lake.read_json(uris["json"])
    assert doc["decision"]["judged"] is True and doc["figures"]["sampled_rows"] == 2000


def test_awkward_frames(world: World) -> None:
    """An empty window gives figures and no verdict; a key feature with no value left is drift; nullable
    and categorical dtypes are measured like plain ones."""
    c, policy = world.contract, world.policy
    _, empty = measure(world.reference, world.reference.iloc[0:0], c, policy, label_column=c.label)
    assert empty.current_rows == 0 and empty.drifted_features == [] and empty.drift_share == 0.0
    assert all(r["note"] == "the current window has no rows" for r in empty.per_feature.values())
    decision = decide(empty, policy)
    assert not decision.judged and "0 rows" in decision.reasons[0]

    broken = world.reference.copy()
    broken["amount"] = np.nan
    _, figures = measure(world.reference, broken, c, policy)
    assert figures.per_feature["amount"] == {"stattest": "wasserstein", "score": None, "threshold": 0.1,
                                             "drifted": True, "note": "no values in the current window"}
    assert decide(figures, policy).fired == ["key_feature:amount"]

    typed = world.reference.copy()
    typed["amount"] = typed["amount"].astype("Float64")
    typed["hour_of_day"] = typed["hour_of_day"].astype("Int64")
    typed.loc[typed.index[:10], "hour_of_day"] = pd.NA
    typed["channel"] = typed["channel"].astype("category")
    _, figures = measure(world.reference, typed, c, policy)
    assert figures.drifted_features == []
    assert figures.per_feature["amount"]["score"] == pytest.approx(0.0, abs=1e-12)
    assert figures.per_feature["channel"]["score"] == pytest.approx(0.0, abs=1e-12)
