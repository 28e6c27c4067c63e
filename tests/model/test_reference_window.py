"""The drift reference training logs is the same as it was before its costs were cut (issue 23f).

``training.reference_window`` (the window with cross-fitted out-of-sample scores) and
``calibration.reference_calibration`` (the chunks' statistics, thresholds and the performance band) were made
cheaper at 1M rows: the window's matrix is a float32 array instead of a float64 frame, the sort is skipped when
the splits are already in time order, the chunks' days are datetime64 values instead of Timestamp objects, and
only each chunk's (sampled) rows are prepared. Each test below recomputes the figures the way the code did before
(the oracles are that code, kept here) on a small simulated window and requires them exactly equal.
"""

from __future__ import annotations

import itertools
from datetime import date
from typing import Any

import numpy as np
import pandas as pd
import pytest

from closedloop.core.schema import DataContract, load_contract
from closedloop.core.settings import DEFAULT_CONFIG, Config
from closedloop.devtools.generate import GeneratorConfig, simulate
from closedloop.stages import calibration, performance
from closedloop.stages.aggregates import compute_entity_features
from closedloop.stages.drift_policy import DriftPolicy, _prepared, _sample
from closedloop.stages.training import (
    CROSS_FIT_MAX_ROWS,
    feature_frame,
    fit,
    hyperparameters,
    reference_window,
    trimmed,
)


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    cfg = Config.load(DEFAULT_CONFIG)
    contract = load_contract(cfg.schema_path)
    tcfg = cfg.typed.training.model_copy(update={"num_boost_round": 20})
    config = GeneratorConfig(start=date(2026, 1, 5), days=28, customers=150, transactions_per_day=300, seed=5)
    tx = simulate(config, contract).transactions
    features = compute_entity_features(tx, contract)
    frame = tx.merge(features, on=[contract.entity, contract.event_timestamp], how="left", validate="many_to_one")
    frame = frame.sort_values(contract.event_timestamp, kind="stable").reset_index(drop=True)
    n = len(frame)
    train, validation, holdout = (frame.iloc[: int(0.7 * n)], frame.iloc[int(0.7 * n): int(0.85 * n)],
                                  frame.iloc[int(0.85 * n):])
    booster, _ = fit(train, validation, contract, tcfg, "cpu")
    rounds = booster.best_iteration + 1
    window = reference_window(train, validation, holdout, contract, tcfg, rounds, "cpu")
    reference = window.sample(n=2000, random_state=0).sort_index()
    return {"cfg": cfg, "contract": contract, "tcfg": tcfg, "splits": (train, validation, holdout), "rounds": rounds,
            "window": window, "reference": reference,
            "importance": trimmed(booster).get_score(importance_type="total_gain")}


def window_as_before(train: pd.DataFrame, validation: pd.DataFrame, holdout: pd.DataFrame, contract: DataContract,
                     config: Any, rounds: int, blocks: int = 4) -> pd.DataFrame:
    """``reference_window`` as it was: always sorted, a float64 feature frame, DMatrix of frames."""
    import xgboost as xgb

    columns = [contract.event_timestamp, contract.label, *contract.model_features]
    window = pd.concat([f[columns] for f in (train, validation, holdout)], ignore_index=True)
    window = window.sort_values(contract.event_timestamp, kind="stable").reset_index(drop=True)
    scores = np.full(len(window), np.nan)
    params = {**hyperparameters(config)["params"], "device": "cpu"}
    bounds = np.linspace(0, len(window), blocks + 1).astype(int)
    x = feature_frame(window, contract)
    y = window[contract.label].to_numpy()
    rng = np.random.default_rng(0)
    for a, b in itertools.pairwise(bounds):
        rest = np.r_[0:a, b:len(window)]
        if len(rest) > CROSS_FIT_MAX_ROWS:
            rest = np.sort(rng.choice(rest, size=CROSS_FIT_MAX_ROWS, replace=False))
        if b <= a or len(np.unique(y[rest])) < 2:
            continue
        model = xgb.train(params, xgb.DMatrix(x.iloc[rest], label=y[rest]), num_boost_round=int(rounds),
                          verbose_eval=False)
        scores[a:b] = model.predict(xgb.DMatrix(x.iloc[a:b]))
    window["score"] = scores
    return window


def test_the_cross_fitted_window_is_the_same_as_before(world: dict[str, Any]) -> None:
    c, tcfg, rounds = world["contract"], world["tcfg"], world["rounds"]
    train, validation, holdout = world["splits"]
    expected = window_as_before(train, validation, holdout, c, tcfg, rounds)
    assert world["window"]["score"].notna().all()
    pd.testing.assert_frame_equal(world["window"], expected, check_exact=True)
    # splits out of time order: sorted as before (the same rows, scores and order)
    shuffled = [s.sample(frac=1.0, random_state=1) for s in (train, validation, holdout)]
    pd.testing.assert_frame_equal(reference_window(*shuffled, c, tcfg, rounds, "cpu"),
                                  window_as_before(*shuffled, c, tcfg, rounds), check_exact=True)


def chunk_statistics_as_before(window: pd.DataFrame, reference: pd.DataFrame, contract: DataContract,
                               policy: DriftPolicy, settings: calibration.CalibrationSettings
                               ) -> dict[str, list[float | None]]:
    """The chunks' statistics as ``calibrate`` computed them: Timestamp days, the whole window prepared first."""
    ts = contract.event_timestamp
    wday = pd.to_datetime(window[ts], utc=True).dt.floor("D")
    rday = pd.to_datetime(reference[ts], utc=True).dt.floor("D")
    days = sorted(wday.unique())
    starts, _ = calibration.chunk_starts(days, policy.window_days, settings.min_chunks)
    gap = policy.window_days if settings.gap_days is None else settings.gap_days
    columns = {**calibration._kinds(contract), "score": "numeric"}
    wprep, rprep = _prepared(window, columns), _prepared(reference, columns)
    wday_v, rday_v = wday.to_numpy(), rday.to_numpy()
    stats: dict[str, list[float | None]] = {c: [] for c in columns}
    for i, s in enumerate(starts):
        cur = _sample(wprep[np.isin(wday_v, days[s:s + policy.window_days])], policy.sample_rows, i)
        ref = rprep[~np.isin(rday_v, days[max(0, s - gap):s + policy.window_days + gap])]
        for col, kind in columns.items():
            test = policy.numeric_stattest if kind == "numeric" else policy.categorical_stattest
            stats[col].append(calibration.statistic(ref[col], cur[col], kind, test))
    return stats


@pytest.mark.parametrize("sample_rows", [0, 500])  # every chunk's rows, and chunks sampled down
def test_the_calibration_is_the_same_as_before(world: dict[str, Any], sample_rows: int) -> None:
    c, window, reference = world["contract"], world["window"], world["reference"]
    monitoring = {**world["cfg"].typed.monitoring.model_dump(), "sample_rows": sample_rows}
    policy = DriftPolicy.from_config(monitoring)
    settings = calibration.CalibrationSettings.from_config(monitoring.get("calibration"))
    cal = calibration.reference_calibration(window, reference, c, monitoring, world["importance"])
    assert cal.calibrated and cal.chunks >= settings.min_chunks
    stats = chunk_statistics_as_before(window, reference, c, policy, settings)
    assert cal.chunk_statistics == {col: [None if v is None else round(v, 6) for v in vals]
                                    for col, vals in stats.items()}
    k = settings.std_multiplier
    for name, entry in cal.features.items():  # the unrounded statistics: each band exactly as before
        band = calibration._band(stats[name], k)
        assert {key: entry[key] for key in ("mean", "std", "max", "n")} == \
            {key: band[key] for key in ("mean", "std", "max", "n")}, name
    assert cal.prediction is not None and cal.prediction["threshold"] == calibration._band(stats["score"], k)[
        "threshold"]
    # the performance band: the scored rows and the rows of a day as before
    scored = window[window["score"].notna()]
    per_day = max(1, len(scored) // max(1, len(np.unique(scored[c.event_timestamp].dt.floor("D")))))
    expected = performance.calibrate_reference(scored["score"].to_numpy(), scored[c.label].to_numpy(),
                                               int(cal.chunk_rows or per_day * policy.window_days),
                                               min_chunks=settings.min_chunks,
                                               width=settings.std_multiplier or performance.DEFAULT_WIDTH,
                                               stride_rows=per_day)
    assert cal.performance == expected.to_dict()
