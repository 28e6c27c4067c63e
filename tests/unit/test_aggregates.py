"""Customer aggregates: computed strictly from earlier events (no leakage), checked against brute force; the
closing rows of each day: the state after the day's events, for the online store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from closedloop.stages.aggregates import compute_entity_features, day_close


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


def _brute(events: pd.DataFrame, contract, entity, at, *, inclusive: bool = False) -> dict[str, float]:
    """The aggregates of ``entity`` at ``at`` over ``[at - window, at)`` (``inclusive``: ``[at - window, at]``)."""
    ent, ts = contract.entity, contract.event_timestamp
    out = {}
    for agg in contract.aggregates:
        before = events[ts] <= at if inclusive else events[ts] < at
        past = events[(events[ent] == entity) & before & (events[ts] >= at - agg.window)]
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


def test_closing_rows_hold_the_state_after_each_day_and_leave_event_rows_unchanged(events, contract):
    """One closing row per customer and active day, stamped at the day's last microsecond, equal to brute force
    over [T - window, T] (the day's events included); the event rows are those computed without closing rows."""
    ent, ts = contract.entity, contract.event_timestamp
    plain = compute_entity_features(events, contract)
    feats = compute_entity_features(events, contract, closing_rows=True)
    assert not feats.duplicated([ent, ts]).any()
    active = events.assign(_day=events[ts].dt.date)[[ent, "_day"]].drop_duplicates()
    assert len(feats) == len(plain) + len(active)

    key = [ent, ts]
    event_rows = feats.merge(plain[key], on=key)
    pd.testing.assert_frame_equal(event_rows, plain)

    closing = feats.merge(plain[key], on=key, how="left", indicator=True)
    closing = closing[closing["_merge"] == "left_only"].drop(columns="_merge")
    expected_stamps = sorted((e, day_close(d)) for e, d in active.itertuples(index=False))
    assert sorted(zip(closing[ent], closing[ts], strict=True)) == expected_stamps
    for _, row in closing.sample(40, random_state=2).iterrows():
        at = row[ts]
        day_events = events[(events[ent] == row[ent]) & (events[ts].dt.date == at.date())]
        assert len(day_events) and day_events[ts].max() < at < pd.Timestamp(at.date() + pd.Timedelta(days=1), tz="UTC")
        expected = _brute(events, contract, row[ent], at, inclusive=True)
        assert row["txn_count_1d"] >= len(day_events)  # the day's own events are counted
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), name
        # the customer's latest row at the close (what materialisation keeps) is the closing row
        upto = feats[(feats[ent] == row[ent]) & (feats[ts] <= at)]
        assert upto[ts].max() == at


def test_day_by_day_with_history_equals_the_whole_period(events, contract):
    """Ingest computes each day with the earlier days as history: the union equals one computation of all."""
    ts = contract.event_timestamp
    whole = compute_entity_features(events, contract, closing_rows=True)
    days = []
    for day in sorted(events[ts].dt.date.unique()):
        today = events[events[ts].dt.date == day]
        days.append(compute_entity_features(today, contract, history=events[events[ts].dt.date < day],
                                            closing_rows=True))
    by_day = pd.concat(days, ignore_index=True).sort_values([contract.entity, ts], kind="stable")
    pd.testing.assert_frame_equal(by_day.reset_index(drop=True), whole, check_exact=False, rtol=1e-9)


def test_string_keys_give_the_same_rows_sorted_by_the_key(events, contract):
    """A contract may key its entity by strings: the same aggregates, rows sorted by the string, then time.

    The names are chosen so that their order differs from the integer order and from first appearance.
    """
    ent, ts = contract.entity, contract.event_timestamp
    name = {i: f"cust-{(7 * i) % 15:02d}" for i in events[ent].unique()}
    as_ints = compute_entity_features(events, contract, closing_rows=True)
    as_strings = compute_entity_features(events.assign(**{ent: events[ent].map(name)}), contract, closing_rows=True)
    expected = as_ints.assign(**{ent: as_ints[ent].map(name)}).sort_values([ent, ts], kind="stable")
    assert list(as_strings[ent]) == sorted(as_strings[ent])
    pd.testing.assert_frame_equal(as_strings, expected.reset_index(drop=True))


def test_an_event_at_the_close_keeps_its_own_row(events, contract):
    ent, ts = contract.entity, contract.event_timestamp
    late = events.iloc[:1].copy()
    late[ts] = day_close(late[ts].iloc[0].date())
    feats = compute_entity_features(pd.concat([events, late], ignore_index=True), contract, closing_rows=True)
    assert not feats.duplicated([ent, ts]).any()
    row = feats[(feats[ent] == late[ent].iloc[0]) & (feats[ts] == late[ts].iloc[0])].iloc[0]
    earlier = pd.concat([events, late])
    expected = _brute(earlier, contract, row[ent], row[ts])  # before the event: its own row, not the close
    for name, value in expected.items():
        assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), name


def test_no_events_no_rows(events, contract):
    assert compute_entity_features(events.iloc[:0], contract, closing_rows=True).empty
