"""Customer aggregates: computed strictly from earlier events (no leakage), checked against brute force."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from closedloop.aggregates import compute_entity_features


@pytest.fixture
def events(contract) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    n = 400
    ts = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(rng.uniform(0, 20 * 86400, n).round(), unit="s")
    frame = pd.DataFrame({
        contract.entity: rng.integers(1, 15, n).astype("int64"),
        contract.event_timestamp: ts,
        "amount": rng.lognormal(3, 1, n),
        "is_foreign": rng.integers(0, 2, n).astype("int64"),
    })
    # same customer, same instant: both must see neither
    key = [contract.entity, contract.event_timestamp]
    frame.loc[1, key] = frame.loc[0, key]
    return frame


def _brute(events: pd.DataFrame, contract, entity, at) -> dict[str, float]:
    ent, ts = contract.entity, contract.event_timestamp
    out = {}
    for agg in contract.aggregates:
        past = events[(events[ent] == entity) & (events[ts] < at) & (events[ts] >= at - agg.window)]
        if agg.function == "count":
            out[agg.name] = float(len(past))
        elif agg.function == "time_since_last":
            out[agg.name] = (at - past[ts].max()).total_seconds() if len(past) else np.nan
        elif agg.function == "sum":
            out[agg.name] = float(past[agg.column].sum())
        else:
            vals = past[agg.column]
            out[agg.name] = float(getattr(vals, agg.function)()) if len(vals) else np.nan
    return out


def test_aggregates_match_brute_force_over_strictly_earlier_events(events, contract):
    feats = compute_entity_features(events, contract)
    assert len(feats) == len(events.drop_duplicates([contract.entity, contract.event_timestamp]))
    for _, row in feats.sample(60, random_state=1).iterrows():
        expected = _brute(events, contract, row[contract.entity], row[contract.event_timestamp])
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), name


def test_an_event_never_sees_itself(events, contract):
    """Changing an event's own amount changes none of its features (it does change later events')."""
    before = compute_entity_features(events, contract)
    changed = events.copy()
    first = changed.sort_values(contract.event_timestamp).index[0]
    changed.loc[first, "amount"] = 1e9
    after = compute_entity_features(changed, contract)
    key = [contract.entity, contract.event_timestamp]
    row = tuple(events.loc[first, key])
    b = before.set_index(key).loc[row]
    a = after.set_index(key).loc[row]
    pd.testing.assert_series_equal(a, b)
    later = after[(after[contract.entity] == row[0]) & (after[contract.event_timestamp] > row[1])]
    if len(later):
        assert later["amount_max_30d"].max() == 1e9


def test_history_is_context_only(events, contract):
    ts = contract.event_timestamp
    cut = pd.Timestamp("2026-01-11", tz="UTC")
    early, late = events[events[ts] < cut], events[events[ts] >= cut]
    whole = compute_entity_features(events, contract)
    split = compute_entity_features(late, contract, history=early)
    assert len(split) == len(late.drop_duplicates([contract.entity, ts]))
    merged = split.merge(whole, on=[contract.entity, ts], suffixes=("", "_whole"))
    assert len(merged) == len(split)
    for agg in contract.aggregates:
        np.testing.assert_allclose(merged[agg.name], merged[f"{agg.name}_whole"], equal_nan=True)
