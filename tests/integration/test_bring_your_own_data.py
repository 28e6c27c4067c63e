"""Bring your own data, as docs/how-to/bring-your-own-data.md tells a user: another model is a folder of models/, a
schema and a config.

In a fresh ``CLOSEDLOOP_HOME`` beside card_fraud, ``closedloop generate --model churn`` writes churn events
(columns from the model's schema) under churn's own lake prefix, churn's real ``churn.retraining`` DAG
(``dag.test()``) validates, materialises, builds the training set, trains, registers and promotes a ``churn``
champion, and churn's Feast project holds the churn definitions, named as the schema says. A churn label
partition without its label column is blocked by validation and quarantined; no new version follows.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from closedloop.core.settings import REPO_ROOT
from closedloop.stages.registry import CHAMPION, alias_version

pytestmark = pytest.mark.integration

CONFIG = REPO_ROOT / "models" / "churn" / "closedloop.yaml"
FIRST = {"window_start": "2026-01-01", "window_end": "2026-01-08", "reason": "first churn model"}
BAD = {"window_start": "2026-01-08", "window_end": "2026-01-10", "reason": "a broken label partition"}


@pytest.fixture(scope="module")
def churn(tmp_path_factory, airflow_db, dagbag):
    """A fresh home, with generated churn events, and churn's retraining DAG."""
    from closedloop.cli import app
    from closedloop.stages.runtime import Runtime

    home = tmp_path_factory.mktemp("byod") / "closedloop"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLOSEDLOOP_HOME", str(home))
        mp.delenv("CLOSEDLOOP_CONFIG", raising=False)
        mp.setenv("CLOSEDLOOP_MODEL", "churn")  # what --model sets: restored when the module's tests end
        result = CliRunner().invoke(app, ["generate", "--model", "churn", "--start", "2026-01-01", "--days", "32",
                                          "--customers", "300", "--transactions-per-day", "800",
                                          "--fraud-rate", "0.05", "--seed", "5"])
        assert result.exit_code == 0, result.output
        rt = Runtime.from_env("churn")
        assert rt.contract.name == "churn" and rt.model_name == "churn"
        assert rt.settings.lake_uri.endswith("/lake/models/churn")  # its own prefix of the deployment's lake
        yield rt, dagbag.get_dag("churn.retraining")


def _run(dag, conf):
    dr = dag.test(run_conf=conf)
    return dr, {ti.task_id: ti.state for ti in dr.get_task_instances()}


def _versions(rt):
    return sorted(int(v.version) for v in rt.client.search_model_versions(f"name = '{rt.model_name}'"))


def test_1_generated_data_has_the_schema_columns(churn):
    rt, _ = churn
    day = rt.lake.list_days("landing", "transactions")[0]
    frame = rt.lake.read_parquet(rt.lake.partition("landing", "transactions", day))
    assert list(frame.columns) == list(rt.contract.landing_columns)
    assert {"event_id", "account_id", "event_time", "session_minutes", "plan"} <= set(frame.columns)
    assert set(frame["plan"]) <= {"free", "basic", "pro", "team"}
    labels = rt.lake.read_parquet(rt.lake.partition("landing", "labels", rt.lake.list_days("landing", "labels")[0]))
    assert list(labels.columns) == ["event_id", "churned", "churn_known_at"]


def test_1b_closedloop_env_carries_the_model(churn):
    """``eval "$(closedloop env --model churn)"`` keeps the model for the feast and airflow CLIs of a later shell,
    and the deployment's lake (not churn's prefix, which a later process derives again)."""
    from closedloop.cli import app

    rt, _ = churn
    result = CliRunner().invoke(app, ["env", "--model", "churn"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert {'export CLOSEDLOOP_MODEL="churn"', f'export CLOSEDLOOP_MODELS="{CONFIG.parent.parent}"',
            'export CLOSEDLOOP_FEAST_PROJECT="closedloop_churn"',
            f'export CLOSEDLOOP_LAKE_URI="{rt.settings.lake_root}"'} <= set(lines), lines
    assert not any(line.startswith("export CLOSEDLOOP_CONFIG=") for line in lines)


def test_2_retraining_dag_promotes_a_churn_champion(churn):
    rt, dag = churn
    dr, states = _run(dag, FIRST)
    assert dr.state == "success", states
    assert _versions(rt) == [1]
    assert alias_version(rt.client, "churn", CHAMPION) == "1"
    mv = rt.client.get_model_version("churn", "1")
    assert mv.tags["closedloop.decision"] == "promote"
    run = rt.client.get_run(mv.run_id)
    assert run.data.tags["closedloop.schema"] == "churn"
    exp = rt.client.get_experiment(run.info.experiment_id)
    assert exp.name == "churn-training"
    metrics = run.data.metrics
    assert {"holdout_roc_auc", "holdout_pr_auc", "holdout_log_loss"} <= set(metrics), sorted(metrics)
    assert 0.5 < metrics["holdout_roc_auc"] <= 1.0


def test_3_feast_holds_the_churn_definitions(churn):
    rt, _ = churn
    store = rt.store
    views = {v.name: v for v in store.list_feature_views()}
    assert set(views) == {"account_usage"}
    assert [f.name for f in views["account_usage"].features] == [a.name for a in rt.contract.aggregates]
    assert {f.name for f in views["account_usage"].features} == {
        "events_7d", "minutes_sum_7d", "minutes_mean_14d", "tickets_max_14d", "seconds_since_last_event"}
    # the entity is the schema's entity key without its "_id"; its join key is the column itself
    assert [(e.name, e.join_key) for e in store.list_entities()] == [("account", "account_id")]
    assert views["account_usage"].entities == ["account"]
    assert [s.name for s in store.list_feature_services()] == ["churn_model"]


def test_4_a_label_partition_without_its_label_column_is_blocked(churn):
    from datetime import date

    from closedloop.stages.quarantine import list_quarantine

    rt, dag = churn
    day = date(2026, 1, 9)
    uri = rt.lake.partition("landing", "labels", day)
    rt.lake.write_parquet(rt.lake.read_parquet(uri).drop(columns=["churned"]), uri)
    before = _versions(rt)
    dr, states = _run(dag, BAD)
    assert dr.state == "failed", states
    assert states["validate_window"] == "failed", states
    assert _versions(rt) == before
    assert alias_version(rt.client, "churn", CHAMPION) == "1"
    held = [q for q in list_quarantine(rt.lake) if q["kind"] == "labels" and q["day"] == day.isoformat()]
    assert held, list_quarantine(rt.lake)
    assert {(b["rule"], b["column"]) for b in held[0]["blocking"]} >= {("expect_column_to_exist", "churned")}, held
