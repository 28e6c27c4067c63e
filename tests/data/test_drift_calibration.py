"""The calibrated drift decision against today's fixed policy, on the generator, three seeds.

Each seed simulates one world (400 customers, 2500 transactions a day): 30 warm-up days (the customer
aggregates' lookback), a 24-day training window, then 40 days cut into 20 two-day windows. The model is
trained as ``training.fit_in_process`` does (time-ordered 70/15/15 split, the repo's parameters, at most
150 rounds); the reference is the whole window with out-of-sample scores from time-blocked cross-fitting
(``training.reference_window``), its thresholds and performance band calibrated as training logs them
(``calibration.reference_calibration``: 12 disjoint two-day chunks). Every window carries its labels and
the model's scores, so every rule is in play. Figures use ``measure(report=False)``: the same Evidently
stattest functions without the report (``test_fast_figures_equal_the_report``), so the module stays fast.

Measured (see the asserts for the bounds): the fixed policy alarms on most stable windows of the
structured generator, the calibrated decision on at most one in twenty; the strong scenarios
(covariate_drift=0.5, concept_drift=1.0) are flagged in every window by both.
"""

from __future__ import annotations

import dataclasses
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from closedloop import calibration
from closedloop.aggregates import compute_entity_features
from closedloop.drift import DriftPolicy, decide, measure, performance_figures
from closedloop.generate import GeneratorConfig, simulate
from closedloop.metrics import classification_metrics
from closedloop.schema import DataContract, load_contract
from closedloop.settings import DEFAULT_CONFIG, Config
from closedloop.training import fit, predict, reference_window, trimmed

START = date(2026, 1, 5)
SEEDS = (11, 12, 13)
CUSTOMERS = 400
PER_DAY = 2500
WARMUP_DAYS = 30
REFERENCE_DAYS = 24
WINDOWS = 20
WINDOW_DAYS = 2
REFERENCE_ROWS = 5000
DRIFT_START = START + timedelta(days=WARMUP_DAYS + REFERENCE_DAYS)
SCENARIOS: dict[str, dict[str, Any]] = {
    "none": {},
    "covariate": {"covariate_drift": 0.5},
    "concept": {"concept_drift": 1.0},
}


@dataclasses.dataclass
class World:
    seed: int
    contract: DataContract
    monitoring: dict[str, Any]
    policy: DriftPolicy
    booster: Any
    reference: pd.DataFrame
    reference_quality: dict[str, float]
    calibration: calibration.Calibration


def simulated(contract: DataContract, seed: int, **knobs: Any) -> pd.DataFrame:
    days = WARMUP_DAYS + REFERENCE_DAYS + WINDOWS * WINDOW_DAYS
    config = GeneratorConfig(start=START, days=days, customers=CUSTOMERS, transactions_per_day=PER_DAY, seed=seed,
                             drift_start=DRIFT_START if knobs else None, **knobs)
    tx = simulate(config, contract).transactions
    features = compute_entity_features(tx, contract)
    frame = tx.merge(features, on=[contract.entity, contract.event_timestamp], how="left", validate="many_to_one")
    frame["day"] = (frame[contract.event_timestamp] - pd.Timestamp(START, tz="UTC")).dt.days
    return frame


def days(frame: pd.DataFrame, first: int, n: int) -> pd.DataFrame:
    return frame[(frame["day"] >= first) & (frame["day"] < first + n)]


_WORLDS: dict[int, World] = {}
_FRAMES: dict[tuple[int, str], pd.DataFrame] = {}


def world(seed: int) -> World:
    if seed not in _WORLDS:
        cfg = Config.load(DEFAULT_CONFIG)
        contract = load_contract(cfg.schema_path)
        monitoring = cfg.raw["monitoring"]
        policy = DriftPolicy.from_config(monitoring)
        tcfg = {**cfg.training, "num_boost_round": min(80, int(cfg.training["num_boost_round"]))}
        frame = simulated(contract, seed)
        _FRAMES[(seed, "none")] = frame
        ref_days = days(frame, WARMUP_DAYS, REFERENCE_DAYS).sort_values(contract.event_timestamp, kind="stable")
        n = len(ref_days)
        train, validation, holdout = (ref_days.iloc[: int(0.7 * n)], ref_days.iloc[int(0.7 * n): int(0.85 * n)],
                                      ref_days.iloc[int(0.85 * n):])
        booster, threshold = fit(train, validation, contract, tcfg, "cpu")
        model = trimmed(booster)
        quality = classification_metrics(holdout[contract.label].to_numpy(), predict(model, holdout, contract),
                                         threshold)
        window = reference_window(train, validation, holdout, contract, tcfg, booster.best_iteration + 1, "cpu")
        reference = window.sample(n=REFERENCE_ROWS, random_state=0).sort_index()
        importance = model.get_score(importance_type="gain")
        cal = calibration.reference_calibration(window, reference, contract, monitoring, importance)
        _WORLDS[seed] = World(seed=seed, contract=contract, monitoring=monitoring, policy=policy, booster=model,
                              reference=reference, reference_quality={"roc_auc": quality["roc_auc"]}, calibration=cal)
    return _WORLDS[seed]


def thresholds(cal: calibration.Calibration) -> dict[str, float]:
    out = {n: f["threshold"] for n, f in cal.features.items() if f.get("threshold") is not None}
    if cal.prediction and cal.prediction.get("threshold") is not None:
        out["score"] = cal.prediction["threshold"]
    return out


def verdicts(w: World, scenario: str) -> dict[str, list[Any]]:
    """Fixed and calibrated decisions on the scenario's 20 windows."""
    key = (w.seed, scenario)
    if key not in _FRAMES:
        _FRAMES[key] = simulated(w.contract, w.seed, **SCENARIOS[scenario])
    frame = _FRAMES[key]
    c = w.contract
    frame["score"] = predict(w.booster, frame, c)
    out: dict[str, list[Any]] = {"fixed": [], "calibrated": []}
    for i in range(WINDOWS):
        window = days(frame, WARMUP_DAYS + REFERENCE_DAYS + i * WINDOW_DAYS, WINDOW_DAYS)
        _, fixed = measure(w.reference, window, c, w.policy, reference_quality=w.reference_quality,
                           label_column=c.label, seed=i, report=False)
        out["fixed"].append(decide(fixed, w.policy))
        _, cal = measure(w.reference, window, c, w.policy, reference_quality=w.reference_quality,
                         label_column=c.label, seed=i, report=False, thresholds=thresholds(w.calibration))
        cal.performance = performance_figures(window, w.calibration.performance, label_column=c.label)
        out["calibrated"].append(decide(cal, w.policy, w.calibration))
    return out


def alarms(decisions: list[Any]) -> int:
    assert all(d.judged for d in decisions)
    return sum(d.drift for d in decisions)


@pytest.mark.parametrize("seed", SEEDS)
def test_calibrated_thresholds_hold_on_stable_windows(seed: int) -> None:
    w = world(seed)
    assert w.calibration.calibrated and w.calibration.chunks >= 10, w.calibration.why
    v = verdicts(w, "none")
    fixed, calibrated = alarms(v["fixed"]), alarms(v["calibrated"])
    detail = [d.fired for d in v["calibrated"] if d.drift]
    assert fixed >= 10, f"seed {seed}: the fixed policy alarmed on only {fixed}/20 stable windows"
    assert calibrated <= 1, f"seed {seed}: calibrated alarms on {calibrated}/20 stable windows: {detail}"
    # every decision reports prediction drift and estimated performance
    for d in v["calibrated"] + v["fixed"]:
        assert any(r.startswith("the score distribution is") for r in d.reasons), d.reasons
        assert any(r.startswith("estimated ROC AUC") for r in d.reasons), d.reasons


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scenario", ["covariate", "concept"])
def test_strong_drift_is_still_flagged(seed: int, scenario: str) -> None:
    w = world(seed)
    v = verdicts(w, scenario)
    calibrated = alarms(v["calibrated"])
    assert calibrated == WINDOWS, (f"seed {seed}, {scenario}: calibrated flags {calibrated}/20: "
                                   f"{[d.reasons[:2] for d in v['calibrated'] if not d.drift]}")


def test_fast_figures_equal_the_report() -> None:
    """measure(report=False) gives Evidently's report's figures (the same stattest functions)."""
    w = world(SEEDS[0])
    frame = _FRAMES[(w.seed, "none")]
    window = days(frame, WARMUP_DAYS + REFERENCE_DAYS, WINDOW_DAYS)
    t = thresholds(w.calibration)
    _, slow = measure(w.reference, window, w.contract, w.policy, thresholds=t)
    _, fast = measure(w.reference, window, w.contract, w.policy, thresholds=t, report=False)
    for name, r in slow.per_feature.items():
        assert fast.per_feature[name]["score"] == pytest.approx(r["score"], rel=1e-9, abs=1e-12), name
        assert fast.per_feature[name]["drifted"] == r["drifted"], name
        assert r["threshold"] == pytest.approx(t[name])
    assert fast.prediction["score"] == pytest.approx(slow.prediction["score"], rel=1e-9)


def test_thresholds_travel_as_json_and_the_decision_names_them() -> None:
    w = world(SEEDS[0])
    back = calibration.Calibration.from_dict(w.calibration.to_dict())
    assert back.to_dict() == w.calibration.to_dict()
    assert back.aggregate["threshold"] > 0 and abs(sum(back.weights.values()) - 1.0) < 1e-9
    assert np.isfinite(back.performance["estimated"]["lower"])
    window = days(_FRAMES[(w.seed, "none")], WARMUP_DAYS + REFERENCE_DAYS, WINDOW_DAYS)
    _, f = measure(w.reference, window, w.contract, w.policy, thresholds=thresholds(back), report=False)
    d = decide(f, w.policy, back)
    assert any("calibrated" in r and "chunks" in r for r in d.reasons)
