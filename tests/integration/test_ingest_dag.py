"""The ingest DAG with ``dag.test()``: a good day is curated and served online, a bad day is quarantined."""

from __future__ import annotations

from datetime import date

import pytest

from closedloop.generate import GeneratorConfig, make_bad
from closedloop.ingest import read_marker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(generated_home, airflow_db, dagbag):
    config = GeneratorConfig(start=date(2026, 5, 1), days=4, customers=120, transactions_per_day=300, seed=8)
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

    # the online store serves the customer's latest features (materialised for that day, never "now")
    last = curated.sort_values(c.event_timestamp).iloc[-1]
    online = rt.store.get_online_features(features=rt.defs.service,
                                          entity_rows=[{c.entity: int(last[c.entity])}]).to_dict()
    feats = rt.lake.read_parquet(rt.lake.partition("curated", c.feature_view, day))
    expected = feats[feats[c.entity] == last[c.entity]].sort_values(c.event_timestamp).iloc[-1]
    assert online["txn_count_7d"][0] == expected["txn_count_7d"]

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

    # the supplier re-delivers a corrected file: it goes through
    rt.lake.write_parquet(good, uri)
    dr = dag.test(run_conf={"day": day.isoformat()})
    assert dr.state == "success", _states(dr)
    assert rt.lake.exists(rt.lake.partition("curated", c.feature_view, day))


def test_a_bad_run_configuration_is_refused(world):
    _, dag = world
    dr = dag.test(run_conf={"day": "2026-05-01", "dya": "x"})
    assert dr.state == "failed"
