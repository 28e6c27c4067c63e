"""The ingest DAG with ``dag.test()``: a good day is curated and served online, a bad day is quarantined."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from closedloop.devtools.generate import GeneratorConfig, make_bad
from closedloop.stages.aggregates import compute_entity_features, day_close
from closedloop.stages.alerts import read_alerts
from closedloop.stages.ingest import read_marker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(generated_home, airflow_db, dagbag):
    config = GeneratorConfig(start=date(2026, 5, 1), days=8, customers=120, transactions_per_day=300, seed=8)
    with generated_home("ingest", config) as rt:
        yield rt, dagbag.get_dag("ingest")


def _states(dr):
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def test_a_good_day_is_curated_materialised_and_announced(world):
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session

    rt, dag = world
    for day in ("2026-05-01", "2026-05-02"):
        dr = dag.test(run_conf={"day": day})
        assert dr.state == "success", _states(dr)
    c = rt.contract
    day = date(2026, 5, 2)
    curated = rt.lake.read_parquet(rt.lake.partition("curated", "transactions", day))
    landed = rt.lake.read_parquet(rt.lake.partition("landing", "transactions", day))
    assert len(curated) == len(landed)
    assert read_marker(rt.lake, "transactions", day)["sha256"] == rt.lake.sha256(
        rt.lake.partition("landing", "transactions", day))

    # the online store serves the customer's latest features (materialised for that day, never "now"): the
    # closing row of the day, its state after the day's transactions, its last one included
    last = curated.sort_values(c.event_timestamp).iloc[-1]
    online = rt.store.get_online_features(features=rt.defs.service,
                                          entity_rows=[{c.entity: int(last[c.entity])}]).to_dict()
    feats = rt.lake.read_parquet(rt.lake.partition("curated", c.feature_view, day))
    expected = feats[feats[c.entity] == last[c.entity]].sort_values(c.event_timestamp).iloc[-1]
    assert expected[c.event_timestamp] == day_close(day)
    for name in c.entity_features:
        assert online[name][0] == pytest.approx(expected[name], nan_ok=True), name
    both = pd.concat([rt.lake.read_parquet(rt.lake.partition("curated", "transactions", d))
                      for d in (date(2026, 5, 1), day)])
    mine = both[(both[c.entity] == last[c.entity]) & (both[c.event_timestamp] > day_close(day) - pd.Timedelta("1D"))]
    assert online["txn_count_1d"][0] == len(mine) > 0  # the last transaction of the day is counted
    assert online["seconds_since_last_txn"][0] == pytest.approx(
        (day_close(day) - last[c.event_timestamp]).total_seconds())

    with create_session() as session:
        events = session.query(AssetEvent).filter(AssetEvent.source_dag_id == "ingest").all()
    assert len(events) >= 2


def test_rerunning_a_day_validates_nothing_again(world):
    rt, dag = world
    before = read_marker(rt.lake, "transactions", date(2026, 5, 1))
    dr = dag.test(run_conf={"day": "2026-05-01"})
    assert dr.state == "success"
    assert read_marker(rt.lake, "transactions", date(2026, 5, 1)) == before
    xcom = dr.get_task_instance("validate_partitions").xcom_pull(task_ids="validate_partitions")
    assert {p["status"] for p in xcom["partitions"]} == {"already_curated"}


def test_feature_rows_written_without_closing_rows_are_rewritten_without_validating_again(world):
    """A lake curated before closing rows existed: rerunning a day rewrites its feature rows, nothing else."""
    from closedloop.stages.ingest import FEATURE_ROWS, marker_uri

    rt, dag = world
    c = rt.contract
    day = date(2026, 5, 2)
    feats_uri = rt.lake.partition("curated", c.feature_view, day)
    marker = read_marker(rt.lake, "transactions", day)
    tx = rt.lake.read_parquet(rt.lake.partition("curated", "transactions", day))
    history = rt.lake.read_parquet(rt.lake.partition("curated", "transactions", date(2026, 5, 1)))
    rt.lake.write_parquet(compute_entity_features(tx, c, history), feats_uri)  # what the older version wrote
    rt.lake.write_json(marker_uri(rt.lake, "transactions", day), {k: v for k, v in marker.items()
                                                                  if k != "feature_rows"})
    dr = dag.test(run_conf={"day": day.isoformat()})
    assert dr.state == "success", _states(dr)
    again = read_marker(rt.lake, "transactions", day)
    assert again["feature_rows"] == FEATURE_ROWS and again["validated_at"] == marker["validated_at"]
    expected = compute_entity_features(tx, c, history, closing_rows=True)
    pd.testing.assert_frame_equal(rt.lake.read_parquet(feats_uri), expected)
    assert (expected[c.event_timestamp] == day_close(day)).sum() == tx[c.entity].nunique()


def test_a_bad_day_is_quarantined_and_a_fixed_one_goes_through(world):
    rt, dag = world
    c = rt.contract
    day = date(2026, 5, 3)
    uri = rt.lake.partition("landing", "transactions", day)
    good = rt.lake.read_parquet(uri)
    rt.lake.write_parquet(make_bad(good, "missing_column", c), uri)
    dr = dag.test(run_conf={"day": day.isoformat()})
    assert dr.state == "failed"
    assert _states(dr)["validate_partitions"] == "failed"
    assert _states(dr)["materialise_features"] == "upstream_failed"
    report = rt.lake.read_json(rt.lake.partition("quarantine", "transactions", day, ".validation.json"))
    assert report["passed"] is False and uri in report["summary"]
    assert not rt.lake.exists(rt.lake.partition("curated", c.feature_view, day))
    # the task's on_failure_callback (closedloop.adapters.airflow.notifier) wrote an alert that names the file and
    # the rule
    alerts = [a for a in read_alerts(rt.settings, "validation_failed") if a["run_id"] == dr.run_id]
    assert len(alerts) == 1, alerts
    alert = alerts[0]
    assert (alert["dag_id"], alert["task_id"], alert["severity"]) == ("ingest", "validate_partitions", "error")
    assert uri in alert["summary"] and "column" in alert["summary"], alert["summary"]

    # the supplier re-delivers a corrected file: it goes through
    rt.lake.write_parquet(good, uri)
    dr = dag.test(run_conf={"day": day.isoformat()})
    assert dr.state == "success", _states(dr)
    assert rt.lake.exists(rt.lake.partition("curated", c.feature_view, day))


def _deliver_bytes(rt, kind, day, data: bytes) -> str:
    uri = rt.lake.partition("landing", kind, day)
    rt.lake.write_bytes(uri, data)
    return uri


@pytest.mark.parametrize(("name", "day", "kind", "breaker", "outcome"), [
    ("truncated Parquet", date(2026, 5, 4), "transactions", lambda b, df: b[: len(b) // 2], "rejected"),
    ("CSV where Parquet is expected", date(2026, 5, 5), "labels", lambda b, df: df.to_csv(index=False).encode(),
     "rejected"),
    ("non-UTC timestamps", date(2026, 5, 6), "transactions", None, "normalised"),
    ("unknown category", date(2026, 5, 7), "transactions", None, "warned"),
])
def test_representative_bad_input_through_the_dag(world, reliability, name, day, kind, breaker, outcome):
    import io

    rt, dag = world
    c = rt.contract
    uri = rt.lake.partition("landing", kind, day)
    good_bytes = rt.lake.read_bytes(uri)
    good = rt.lake.read_parquet(uri)
    if name == "non-UTC timestamps":
        bad = good.assign(**{c.event_timestamp: good[c.event_timestamp].dt.tz_convert("Asia/Tokyo")})
        rt.lake.write_parquet(bad, uri)
    elif name == "unknown category":
        bad = good.copy()
        bad.loc[bad.index[::10], "merchant_category"] = "crypto_exchange"
        rt.lake.write_parquet(bad, uri)
    else:
        buf = io.BytesIO(good_bytes)
        _deliver_bytes(rt, kind, day, breaker(buf.getvalue(), good))

    dr = dag.test(run_conf={"day": day.isoformat()})
    states = _states(dr)
    if outcome == "rejected":
        assert dr.state == "failed" and states["validate_partitions"] == "failed", states
        assert states["materialise_features"] == "upstream_failed"
        report = rt.lake.read_json(rt.lake.partition("quarantine", kind, day, ".validation.json"))
        assert "readable_parquet" in report["summary"] and uri in report["summary"]
        assert not rt.lake.exists(rt.lake.partition("curated", kind, day))
        rt.lake.write_bytes(uri, good_bytes)  # the corrected delivery
        dr = dag.test(run_conf={"day": day.isoformat()})
        assert dr.state == "success", _states(dr)
        assert rt.lake.exists(rt.lake.partition("curated", kind, day))
        text = "ingest run failed at validate_partitions, materialise_features not run; quarantined; the corrected " \
               "file went through the next run"
    else:
        assert dr.state == "success", states
        marker = read_marker(rt.lake, kind, day)
        notes = marker["normalisations"] if outcome == "normalised" else marker["warnings"]
        rule = "timestamps_normalised_to_utc" if outcome == "normalised" else "expect_column_values_to_be_in_set"
        assert any(n.startswith(rule) for n in notes), notes
        assert rt.lake.exists(rt.lake.partition("curated", c.feature_view, day))
        text = f"ingest run succeeded; {outcome} ({rule}) recorded in the validation marker; features materialised"
    reliability.record("bad-input-dag", f"{name} (ingest DAG)", text)


def test_a_bad_run_configuration_is_refused(world):
    _, dag = world
    dr = dag.test(run_conf={"day": "2026-05-01", "dya": "x"})
    assert dr.state == "failed"


@pytest.fixture(scope="module")
def late_world(generated_home, airflow_db, dagbag):
    config = GeneratorConfig(start=date(2026, 5, 1), days=5, customers=40, transactions_per_day=120, seed=9)
    with generated_home("ingest-late", config) as rt:
        yield rt, dagbag.get_dag("ingest")


def _online(rt, entities) -> pd.DataFrame:
    c = rt.contract
    rows = rt.store.get_online_features(features=rt.defs.service,
                                        entity_rows=[{c.entity: int(e)} for e in entities]).to_df()
    return rows[[c.entity, *c.entity_features]]


def test_a_late_day_is_curated_recomputed_and_materialised_by_one_run(late_world, reliability):
    """05-02 lands after 05-03..05-05 were curated and materialised: one ingest run of 05-02 curates it,
    recomputes its customers' rows of the later days (as if ingested in order) and materialises them."""
    from support.corruption import corrupted, differences

    from closedloop.stages.ingest import ingest_partition, materialise_day

    rt, dag = late_world
    c, lake = rt.contract, rt.lake
    late = date(2026, 5, 2)
    later = [date(2026, 5, d) for d in (3, 4, 5)]
    uri = lake.partition("landing", "transactions", late)
    data = lake.read_bytes(uri)
    lake.delete(uri)
    for d in (date(2026, 5, 1), *later):
        ingest_partition(lake, c, "transactions", d)
    materialise_day(rt, later[-1])
    lake.write_bytes(uri, data)
    entities = sorted(lake.read_parquet(uri)[c.entity].unique())
    before = _online(rt, entities)

    dr = dag.test(run_conf={"day": late.isoformat()})
    assert dr.state == "success", _states(dr)
    ingested = dr.get_task_instance("validate_partitions").xcom_pull(task_ids="validate_partitions")
    assert ingested["partitions"][0]["recomputed"] == [d.isoformat() for d in later]
    assert ingested["features_changed"] == [late.isoformat(), *(d.isoformat() for d in later)]
    materialised = dr.get_task_instance("materialise_features").xcom_pull(task_ids="materialise_features")
    assert materialised["end"].startswith("2026-05-06")
    for d in later:
        assert read_marker(lake, "transactions", d)["recomputed"][-1]["after"] == late.isoformat()

    # every later day's rows are those of in-order ingest; the online store serves each customer's newest
    curated = {d: lake.read_parquet(lake.partition("curated", "transactions", d)) for d in [late, *later]}
    curated[date(2026, 5, 1)] = lake.read_parquet(lake.partition("curated", "transactions", date(2026, 5, 1)))
    keys = [c.entity, c.event_timestamp]
    rows = differences(
        pd.concat([compute_entity_features(curated[d], c, pd.concat([curated[x] for x in curated if x < d]),
                                           closing_rows=True) for d in later], ignore_index=True),
        pd.concat([lake.read_parquet(lake.partition("curated", c.feature_view, d)) for d in later],
                  ignore_index=True), keys)
    feats = pd.concat([lake.read_parquet(lake.partition("curated", c.feature_view, d)) for d in [late, *later]])
    newest = feats.sort_values(keys).groupby(c.entity).tail(1)
    newest = newest[newest[c.entity].isin(entities)][[c.entity, *c.entity_features]]
    after = _online(rt, entities)
    online = differences(newest, after, [c.entity])
    assert rows[0] == 0 and online[0] == 0, (rows, online)
    assert differences(before, after, [c.entity])[0] > 0  # the run changed what is served
    reliability.record(
        "integrity", "a day landed after the three days that follow it were curated and materialised (ingest DAG)",
        f"one run curated it, recomputed its {len(entities)} customers' rows of the 3 later days and materialised "
        f"them; {rows[1]} later feature rows compared with in-order computation, {online[1]} online rows with "
        "each customer's newest", corrupted=corrupted(feature_rows=rows, online_store=online))

    # the day after it re-delivered with 15 rows missing: one run versions it, alerts, recomputes and serves
    redelivered = later[0]
    r_uri = lake.partition("landing", "transactions", redelivered)
    removed = lake.read_parquet(r_uri).iloc[:15]
    lake.write_parquet(lake.read_parquet(r_uri).iloc[15:], r_uri)
    dr = dag.test(run_conf={"day": redelivered.isoformat()})
    assert dr.state == "success", _states(dr)
    alerts = [a for a in read_alerts(rt.settings, "data_redelivered") if a["run_id"] == dr.run_id]
    assert len(alerts) == 1 and "15 removed" in alerts[0]["summary"], alerts
    assert alerts[0]["details"]["recomputed"] == [d.isoformat() for d in later[1:]]
    assert read_marker(lake, "transactions", redelivered)["version"] == 2
    touched = sorted(removed[c.entity].unique())
    feats = pd.concat([lake.read_parquet(lake.partition("curated", c.feature_view, d)) for d in [late, *later]])
    newest = feats.sort_values(keys).groupby(c.entity).tail(1)
    newest = newest[newest[c.entity].isin(touched)][[c.entity, *c.entity_features]]
    assert differences(newest, _online(rt, touched), [c.entity])[0] == 0
