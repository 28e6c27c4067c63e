"""Housekeeping on a real lake and a real MLflow registry: old things go, lineage of aliased versions stays."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pytest
import yaml

from closedloop.core.errors import ConfigError
from closedloop.core.settings import DEFAULT_CONFIG
from closedloop.stages import housekeeping as hk
from closedloop.stages.drift import list_reports, report_uri
from closedloop.stages.monitoring import EXPERIMENT
from closedloop.stages.registry import TAG, ensure_experiment, promote
from closedloop.stages.runtime import Runtime

pytestmark = pytest.mark.integration

TODAY = date(2026, 9, 1)
NOW = datetime(2026, 9, 1, 8, 0, tzinfo=UTC)


@pytest.fixture
def rt(home, tmp_path, monkeypatch):
    """A runtime whose configuration keeps 30 days of served logs and predictions, 60 of training sets,
    10 of monitoring runs and one drift report."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["dataset"]["schema"] = str((DEFAULT_CONFIG.parent / raw["dataset"]["schema"]).resolve())
    raw["housekeeping"].update(keep_served_days=30, keep_predictions_days=30, keep_training_sets_days=60,
                               keep_monitoring_runs_days=10)
    raw["monitoring"]["keep_reports"] = 1
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CLOSEDLOOP_CONFIG", str(path))
    return Runtime.from_env()


def _ts(lake, start: date, end: date, tag: str) -> str:
    uri = lake.uri("training_sets", f"{start}_{end}_{tag}")
    lake.write_parquet(pd.DataFrame({"x": [1]}), f"{uri}/split=train/part-0.parquet")
    return uri


def _version(client, name: str, src, training_set: str, window: str) -> str:
    mv = client.create_model_version(name, source=str(src), tags={
        f"{TAG}training_set": training_set, f"{TAG}window": window, f"{TAG}reference_uri": f"{src}/reference"})
    return str(mv.version)


def test_old_things_are_pruned_and_lineage_is_kept(rt, tmp_path):
    lake, client, name = rt.lake, rt.client, rt.model_name
    one = pd.DataFrame({"x": [1]})
    old_day, new_day = TODAY - timedelta(days=45), TODAY - timedelta(days=5)
    # training sets, all older than 60 days: three referenced by aliased versions, one by a retired version only
    sets = {k: _ts(lake, date(2026, 1, 1) + timedelta(days=i), date(2026, 2, 1) + timedelta(days=i), k)
            for i, k in enumerate(("prev", "champ", "retired", "chall"))}
    fresh = _ts(lake, date(2026, 8, 1), date(2026, 8, 29), "fresh")
    client.create_registered_model(name)
    src = tmp_path / "model"
    src.mkdir()
    versions = {k: _version(client, name, src, uri, f"2026-01-0{i + 1}..2026-02-0{i + 1}")
                for i, (k, uri) in enumerate(sets.items())}
    promote(client, rt.settings, name, versions["retired"], expected_champion=None, reason="first")
    promote(client, rt.settings, name, versions["prev"], expected_champion=versions["retired"], reason="second")
    promote(client, rt.settings, name, versions["champ"], expected_champion=versions["prev"], reason="third")
    client.set_registered_model_alias(name, "challenger", versions["chall"])

    served = {(kind, d): f"{lake.uri('served', kind, d.isoformat())}/part-0.parquet"
              for kind, d in itertools.product(("transactions", "shadow"), (old_day, new_day))}
    for uri in served.values():
        lake.write_parquet(one, uri)
    preds = {d: lake.partition("predictions", "transactions", d) for d in (old_day, new_day)}
    for uri in preds.values():
        lake.write_parquet(one, uri)
    curated = lake.partition("curated", "transactions", date(2026, 1, 5))  # never a housekeeping matter
    lake.write_parquet(one, curated)
    for start in (date(2026, 8, 1), date(2026, 8, 3), date(2026, 8, 5)):
        lake.write_json(f"{report_uri(lake, start, start + timedelta(days=2))}/figures.json", {})
    exp = ensure_experiment(client, rt.settings, EXPERIMENT)
    old_run = client.create_run(exp, start_time=int((NOW - timedelta(days=20)).timestamp() * 1000)).info.run_id
    new_run = client.create_run(exp, start_time=int((NOW - timedelta(days=2)).timestamp() * 1000)).info.run_id

    keep = hk.protected(client, name)
    assert keep.versions == {"champion": versions["champ"], "previous": versions["prev"],
                             "challenger": versions["chall"]}
    assert keep.training_sets == {sets["champ"], sets["prev"], sets["chall"]}
    assert keep.curated_window == (date(2026, 1, 2), date(2026, 2, 2))
    assert hk.is_protected(curated, keep, lake) and hk.is_protected(lake.uri("training_sets"), keep, lake)

    summary = hk.run(rt, NOW, airflow_db=False)
    assert summary["deleted"] == {
        "served": sorted(lake.uri("served", k, old_day.isoformat()) for k in ("shadow", "transactions")),
        "predictions": [preds[old_day]], "training_sets": [sets["retired"]], "versions": []}
    assert sorted(summary["kept_protected"]) == sorted([sets["champ"], sets["prev"], sets["chall"]])
    for uri in (*sets.values(), fresh, *served.values(), *preds.values()):
        gone = uri in (sets["retired"], preds[old_day]) or f"/{old_day.isoformat()}/" in uri
        assert lake.exists(uri) is not gone, uri
    assert lake.exists(curated)
    assert [u.rsplit("/", 1)[-1] for u in list_reports(lake)] == ["2026-08-05_2026-08-07"]
    assert summary["deleted_monitoring_runs"] == 1
    assert client.get_run(old_run).info.lifecycle_stage == "deleted"
    assert client.get_run(new_run).info.lifecycle_stage == "active"

    # a second run finds nothing more to do
    again = hk.run(rt, NOW, airflow_db=False)
    assert again["deleted_count"] == 0 and again["deleted_monitoring_runs"] == 0 and again["pruned_reports"] == []


def test_policy_is_checked(rt, tmp_path, monkeypatch):
    raw = yaml.safe_load(rt.settings.config_path.read_text())
    raw["housekeeping"]["keep_served_days"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CLOSEDLOOP_CONFIG", str(bad))
    with pytest.raises(ConfigError, match=r"housekeeping\.keep_served_days=0 .* keep at least 1 day"):
        hk.policy(Runtime.from_env().settings)


def test_airflow_db_clean_runs_on_the_metadata_database(rt, airflow_db):
    cmd = hk.airflow_db_clean_command(NOW)
    assert cmd[1:] == ["db", "clean", "--clean-before-timestamp", "2026-09-01T08:00:00+00:00", "--yes",
                       "--skip-archive", "--error-on-cleanup-failure"]
    out = hk.clean_airflow_tables(rt.settings, NOW, dry_run=True)  # the real CLI, without deleting
    assert out["dry_run"] is True and out["before"].startswith("2026-08-02")


def test_airflow_db_clean_works_from_a_real_task_process(rt, airflow_db, monkeypatch):
    """A task under Airflow's supervisor has the metadata connection replaced by a blocked URL in its
    environment (dag.test() does not): the CLI must not inherit it (under `make airflow` it failed every try)."""
    for key in ("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__SQL_ALCHEMY_CONN"):
        monkeypatch.setenv(key, "airflow-db-not-allowed:///")
    out = hk.clean_airflow_tables(rt.settings, NOW, dry_run=True)
    assert out["dry_run"] is True


def test_housekeeping_dag_checks_arrivals_then_prunes_then_cleans(dagbag):
    dag = dagbag.get_dag("housekeeping")
    order = ["check_arrivals", "prune_lake_and_mlflow", "clean_airflow_db"]
    assert set(dag.task_ids) == set(order)
    for up, down in itertools.pairwise(order):
        assert down in dag.get_task(up).get_flat_relative_ids(upstream=False)


def test_housekeeping_dag_runs_end_to_end(runtime, dagbag):
    """dag.test(): the arrival check alerts the days nothing landed, pruning runs, airflow db clean runs for real."""
    from closedloop.stages.alerts import read_alerts

    dr = dagbag.get_dag("housekeeping").test()
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert dr.state == "success", states
    missing = dr.get_task_instance("check_arrivals").xcom_pull(task_ids="check_arrivals")
    assert len(missing) == 3  # an empty lake: the last lookback_days days are all missing
    assert sorted(a["details"]["day"] for a in read_alerts(runtime.settings, "data_missing")) == sorted(missing)
    pruned = dr.get_task_instance("prune_lake_and_mlflow").xcom_pull(task_ids="prune_lake_and_mlflow")
    assert pruned["deleted_count"] == 0 and pruned["protected"]["versions"] == {}
    cleaned = dr.get_task_instance("clean_airflow_db").xcom_pull(task_ids="clean_airflow_db")
    assert cleaned["dry_run"] is False


def test_superseded_deliveries_are_kept_for_their_retention_then_pruned(rt):
    """A re-delivered day keeps its previous delivery under curated/_versions/ until ``keep_versions_days`` after
    it was superseded, longer when the day lies in the champion's training window; the current copy stays."""
    from closedloop.devtools.generate import GeneratorConfig, generate
    from closedloop.stages.ingest import ingest_partition, read_marker, version_of

    lake, contract = rt.lake, rt.contract
    day = date(2026, 7, 1)
    generate(GeneratorConfig(start=day, days=1, customers=10, transactions_per_day=30, seed=4), lake, contract)
    landing = lake.partition("landing", "transactions", day)
    full = lake.read_parquet(landing)
    lake.write_parquet(full.iloc[5:], landing)  # the first delivery misses rows
    ingest_partition(lake, contract, "transactions", day)
    first = read_marker(lake, "transactions", day)["sha256"]
    lake.write_parquet(full, landing)
    assert ingest_partition(lake, contract, "transactions", day).version == 2
    kept = version_of(lake, "transactions", day, first)
    superseded = date.fromisoformat(read_marker(lake, "transactions", day)["versions"][0]["superseded_at"][:10])
    keep_days = hk.policy(rt.settings)["keep_versions_days"]
    assert keep_days == 365

    inside = hk.plan(lake, superseded + timedelta(days=keep_days), hk.policy(rt.settings), hk.Protected())
    assert inside["versions"] == []
    later = superseded + timedelta(days=keep_days + 1)
    window = hk.Protected(curated_window=(day, day + timedelta(days=1)))
    assert hk.plan(lake, later, hk.policy(rt.settings), window)["kept_protected"] == [kept]
    doomed = hk.plan(lake, later, hk.policy(rt.settings), hk.Protected())
    assert doomed["versions"] == [kept]
    assert hk.apply(lake, doomed, hk.Protected()) == 1
    assert not lake.exists(kept) and not lake.exists(kept.removesuffix(".parquet") + ".json")
    assert len(lake.read_parquet(lake.partition("curated", "transactions", day))) == len(full)
