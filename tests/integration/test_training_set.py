"""The training set from Feast: point-in-time correct, no labelled row lost or duplicated."""

from __future__ import annotations

import hashlib
from datetime import date

import pandas as pd
import pytest

from closedloop.core.runconf import Window
from closedloop.devtools.generate import GeneratorConfig, generate
from closedloop.stages import retraining as stages
from closedloop.stages.aggregates import compute_entity_features
from closedloop.stages.features import (
    SPLITS,
    build_training_set,
    frame_sha256,
    historical_features,
    read_labelled_window,
    read_training_split,
    time_split,
)
from closedloop.stages.offline import point_in_time_features

WINDOW = Window(date(2026, 1, 1), date(2026, 1, 11))


@pytest.fixture
def landed(runtime):
    """Small generated data, plus two transactions that share customer and instant with another."""
    generate(GeneratorConfig(start=date(2026, 1, 1), days=12, customers=150, transactions_per_day=250, seed=11),
             runtime.lake, runtime.contract)
    c = runtime.contract
    day = date(2026, 1, 5)
    tx_uri = runtime.lake.partition("landing", "transactions", day)
    tx = runtime.lake.read_parquet(tx_uri)
    twins = tx.iloc[:2].copy()
    twins[c.row_key] = ["twin-a", "twin-b"]
    runtime.lake.write_parquet(pd.concat([tx, twins], ignore_index=True), tx_uri)
    label_day = date(2026, 1, 9)
    lb_uri = runtime.lake.partition("landing", "labels", label_day)
    labels = runtime.lake.read_parquet(lb_uri)
    extra = labels.iloc[:2].copy()
    extra[c.row_key] = ["twin-a", "twin-b"]
    extra[c.label] = [1, 0]
    extra[c.label_timestamp] = pd.Timestamp("2026-01-09 12:00", tz="UTC")
    runtime.lake.write_parquet(pd.concat([labels, extra], ignore_index=True), lb_uri)
    return runtime


def test_training_set_keeps_every_labelled_row_with_point_in_time_features(landed):
    rt, c = landed, landed.contract
    stages.validate(rt, WINDOW)
    stages.materialise(rt, WINDOW)
    ts = stages.build_training_set(rt, WINDOW)

    frames = {s: read_training_split(rt.lake, ts["uri"], s) for s in SPLITS}
    full = pd.concat(frames.values(), ignore_index=True)
    assert ts["rows"] == {s: len(f) for s, f in frames.items()}

    # every labelled transaction of the window, exactly once (Feast's file store would collapse the twins)
    curated = rt.lake.read_parquet_many([rt.lake.partition("curated", "transactions", d)
                                         for d in pd.date_range("2026-01-01", "2026-01-10").date])
    labels = rt.lake.read_parquet_many([rt.lake.partition("curated", "labels", d)
                                        for d in rt.lake.list_days("curated", "labels")])
    expected_ids = set(curated[c.row_key]) & set(labels[c.row_key])
    assert full[c.row_key].is_unique
    assert set(full[c.row_key]) == expected_ids
    assert {"twin-a", "twin-b"} <= set(full[c.row_key])
    assert ts["unlabelled_rows"] == len(curated) - len(expected_ids)

    # time-based split: train before validation before holdout
    assert frames["train"][c.event_timestamp].max() <= frames["validation"][c.event_timestamp].min()
    assert frames["validation"][c.event_timestamp].max() <= frames["holdout"][c.event_timestamp].min()

    # the feature view also holds each customer's closing row of each active day (the online store's state
    # after the day); the point-in-time join of a real transaction never picks one
    view = rt.lake.read_parquet_many([rt.lake.partition("curated", c.feature_view, d)
                                      for d in pd.date_range("2026-01-01", "2026-01-10").date])
    closes = view[view[c.event_timestamp] == view[c.event_timestamp].dt.floor("D") + pd.Timedelta("1D")
                  - pd.Timedelta("1us")]
    assert len(closes) == len(curated.assign(d=curated[c.event_timestamp].dt.date)[[c.entity, "d"]]
                              .drop_duplicates()) > 0
    assert not view.duplicated([c.entity, c.event_timestamp]).any()

    # point in time: Feast's features equal the aggregates recomputed from all events before each row
    expected = compute_entity_features(curated, c)
    merged = full.merge(expected, on=[c.entity, c.event_timestamp], suffixes=("", "_expected"))
    assert len(merged) == len(full)
    for name in c.entity_features:
        pd.testing.assert_series_equal(merged[name], merged[f"{name}_expected"], check_names=False)
    assert (full["txn_count_7d"] > 0).any()

    # deterministic: building again gives the same set at the same place
    again = stages.build_training_set(rt, WINDOW)
    assert again["data_sha256"] == ts["data_sha256"] and again["uri"] == ts["uri"]

    # a large window goes to Feast in chunks of (entity, time) pairs: the same features, row for row
    grace = rt.settings.config.typed.ingest.label_grace_days
    labelled, _, _ = read_labelled_window(rt.lake, c, WINDOW.start, WINDOW.end, grace)
    whole = historical_features(rt.store, rt.defs, labelled, c)
    assert len(labelled) > 2 * 97
    pd.testing.assert_frame_equal(historical_features(
        rt.store, rt.defs, labelled, c, pit_join={"calls": 10**9, "min_rows": 97, "max_rows": 97}), whole)

    # the training set's features come from closedloop.stages.offline's bounded read of the view's source: the same
    # rows as Feast's get_historical_features (the twins included), so the same split and lineage hash as a
    # training set joined by Feast
    pd.testing.assert_frame_equal(point_in_time_features(rt.store, rt.defs, labelled, c), whole, check_exact=True)
    columns = [c.row_key, c.entity, c.event_timestamp, *c.model_features, c.label]
    split = rt.settings.config.typed.training.split.model_dump(exclude_none=True)
    by_feast = time_split(whole[columns], c, split)
    for s in SPLITS:
        pd.testing.assert_frame_equal(by_feast[s].reset_index(drop=True), frames[s], check_exact=True)
    digest = hashlib.sha256()
    for s in SPLITS:
        digest.update(frame_sha256(by_feast[s]).encode())
    assert digest.hexdigest() == ts["data_sha256"]

    # training.pit_join sizes Feast's calls where the bounded read does not apply; the training set is the same
    small = build_training_set(rt.store, rt.defs, rt.lake, c, WINDOW.start, WINDOW.end, label_grace_days=grace,
                               split=split, pit_join={"calls": 7, "min_rows": 1})
    assert small.data_sha256 == ts["data_sha256"] and small.uri == ts["uri"]
