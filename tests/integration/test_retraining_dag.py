"""The retraining DAG end to end with ``dag.test()`` on a fresh home.

One story on one data set, in order: a first window (a week, with 5 % of its labels wrong) promotes
version 1; a later window whose older days have badly degraded labels (35 % wrong, as after a broken
label backfill) gives a candidate that is rejected on the window's clean holdout while the champion
stays; a genuinely better candidate (three clean weeks) is promoted; a blocking-bad partition lands
in quarantine and creates no feature rows and no model version; re-running a window creates nothing
new.
"""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import pytest

from closedloop.devtools.generate import GeneratorConfig, make_bad
from closedloop.stages.alerts import read_alerts
from closedloop.stages.registry import CHAMPION, PREVIOUS, alias_version, history, load_booster

pytestmark = pytest.mark.integration

FIRST = {"window_start": "2026-01-01", "window_end": "2026-01-08"}
DEGRADED = {"window_start": "2026-02-01", "window_end": "2026-02-22"}
BETTER = {"window_start": "2026-01-08", "window_end": "2026-02-01"}
BAD_DAY = date(2026, 2, 23)
BAD = {"window_start": "2026-02-23", "window_end": "2026-02-25"}
CANARY = "canary-secret-7f3e9c2a"
MLFLOW_UI = "http://mlflow.test:5000"


@pytest.fixture(scope="module")
def world(generated_home, airflow_db, dagbag):
    """A fresh closedloop home with 58 days of generated data, and the retraining DAG."""
    config = GeneratorConfig(start=date(2026, 1, 1), days=58, customers=400, transactions_per_day=1000, seed=3,
                             fraud_rate=0.03)
    with generated_home("retraining", config) as rt, pytest.MonkeyPatch.context() as mp:
        # a canary secret in the environment of every run: test_6 checks it never reaches MLflow
        mp.setenv("CLOSEDLOOP_CANARY_SECRET_TOKEN", CANARY)
        mp.setenv("CLOSEDLOOP_MLFLOW_UI_URL", MLFLOW_UI)  # the tasks' extra links point there
        _degrade_labels(rt, date(2026, 1, 1), date(2026, 1, 8), share=0.01, seed=1)
        yield rt, dagbag.get_dag("retraining")


def _run(dag, conf):
    dr = dag.test(run_conf=conf)
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    return dr, states


def _links(dag, dr) -> dict[tuple[str, str], str]:
    """Every extra link of the run's tasks as the API server reads it: the serialized DAG's links, from XCom."""
    from airflow.serialization.serialized_objects import DagSerialization

    served = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    out = {}
    for ti in dr.get_task_instances():
        task = served.get_task(ti.task_id)
        for link in task.operator_extra_links:
            out[(ti.task_id, link.name)] = link.get_link(task, ti_key=ti.key)
    return out


def _versions(rt):
    return sorted(int(v.version) for v in rt.client.search_model_versions(f"name = '{rt.model_name}'"))


def _degrade_labels(rt, start: date, end: date, share: float, seed: int = 0) -> None:
    """Flip ``share`` of the labels of transactions that happened in ``[start, end)``."""
    c = rt.contract
    tx_ids = set()
    for d in rt.lake.list_days("landing", "transactions"):
        if start <= d < end:
            tx_ids |= set(rt.lake.read_parquet(rt.lake.partition("landing", "transactions", d))[c.row_key])
    rng = np.random.default_rng(seed)
    for d in rt.lake.list_days("landing", "labels"):
        uri = rt.lake.partition("landing", "labels", d)
        labels = rt.lake.read_parquet(uri)
        hit = labels[c.row_key].isin(tx_ids).to_numpy() & (rng.random(len(labels)) < share)
        if hit.any():
            labels.loc[hit, c.label] = 1 - labels.loc[hit, c.label]
            rt.lake.write_parquet(labels, uri)


def test_1_first_window_promotes_version_1(world):
    rt, dag = world
    dr, states = _run(dag, {**FIRST, "reason": "first model"})
    assert dr.state == "success", states
    assert _versions(rt) == [1]
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "1"
    mv = rt.client.get_model_version(rt.model_name, "1")
    assert mv.tags["closedloop.decision"] == "promote"
    assert mv.tags["closedloop.window"] == "2026-01-01..2026-01-08"
    run = rt.client.get_run(mv.run_id)
    for key in ("closedloop.lineage_key", "closedloop.device", "closedloop.schema_sha256", "closedloop.config_sha256",
                "closedloop.git_commit", "closedloop.lock_sha256", "closedloop.dag_run_id"):
        assert run.data.tags.get(key), key
    assert run.data.tags["closedloop.device"] == "cpu"
    for metric in ("holdout_roc_auc", "holdout_pr_auc", "holdout_log_loss", "holdout_recall_at_fpr"):
        assert metric in run.data.metrics
    artifacts = {a.path for a in rt.client.list_artifacts(mv.run_id)}
    assert {"reference", "lineage.json", "feature_importance.json", "gate", "plots"} <= artifacts
    assert {a.path.rsplit("/", 1)[-1] for a in rt.client.list_artifacts(mv.run_id, "gate")} == {
        "decision_v1.json", "comparison_v1.png"}  # no champion yet: the candidate's curve alone
    # promote_or_reject raised a `promoted` alert through the notifier
    [alert] = [a for a in read_alerts(rt.settings, "promoted") if a["run_id"] == dr.run_id]
    assert alert["task_id"] == "promote_or_reject" and "card_fraud v1 is the champion" in alert["summary"]
    booster = load_booster(f"models:/{rt.model_name}@{CHAMPION}")
    assert booster.num_features() == len(rt.contract.model_features)
    assert history(rt.client, rt.model_name)[0]["to_version"] == "1"
    # the tasks' extra links, as the UI gets them: the MLflow run and version, and the validation report
    from urllib.parse import quote

    from closedloop.stages import health

    links = _links(dag, dr)
    version_url = f"{MLFLOW_UI}/#/models/{quote(rt.model_name, safe='')}/versions/1"
    assert links[("train_model", "MLflow run")] == f"{MLFLOW_UI}/#/runs/{mv.run_id}"
    assert links[("register_model", "MLflow model version")] == version_url
    assert links[("promote_or_reject", "MLflow model version")] == version_url
    validation = links[("validate_window", "Validation report")]
    assert validation == "/closedloop/reports/validation/2026-01-01_2026-01-08.json?model=card_fraud"
    path = validation.removeprefix("/closedloop/reports/").removesuffix("?model=card_fraud")
    body, _ = health.report_bytes(rt, path)
    records = json.loads(body)["partitions"]
    assert {(p["kind"], p["status"]) for p in records} == {("transactions", "curated"), ("labels", "curated")}
    assert [p["day"] for p in records if p["kind"] == "transactions"] == [f"2026-01-0{d}" for d in range(1, 8)]
    assert all(p["record"]["summary"] for p in records)


def test_2_degraded_labels_are_rejected_and_the_champion_stays(world):
    rt, dag = world
    _degrade_labels(rt, date(2026, 2, 1), date(2026, 2, 16), share=0.35)
    dr, states = _run(dag, {**DEGRADED, "reason": "degraded labels"})
    assert dr.state == "success", states
    assert _versions(rt) == [1, 2]
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "1"
    mv = rt.client.get_model_version(rt.model_name, "2")
    assert mv.tags["closedloop.status"] == "rejected"
    assert mv.tags["closedloop.decision"] == "reject"
    assert mv.tags["closedloop.rejected_reason"]
    assert float(mv.tags["closedloop.gate.candidate_roc_auc"]) < float(mv.tags["closedloop.gate.champion_roc_auc"])
    assert len(history(rt.client, rt.model_name)) == 1
    [alert] = [a for a in read_alerts(rt.settings, "rejected") if a["run_id"] == dr.run_id]
    assert "v2 rejected, champion v1 kept" in alert["summary"]


def test_3_a_better_candidate_is_promoted(world):
    rt, dag = world
    dr, states = _run(dag, {**BETTER, "reason": "more, clean data"})
    assert dr.state == "success", states
    assert _versions(rt) == [1, 2, 3]
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "3"
    assert alias_version(rt.client, rt.model_name, PREVIOUS) == "1"
    assert rt.client.get_model_version(rt.model_name, "1").tags["closedloop.status"] == "previous"
    mv = rt.client.get_model_version(rt.model_name, "3")
    assert mv.tags["closedloop.decision"] == "promote"
    assert float(mv.tags["closedloop.gate.candidate_roc_auc"]) > float(mv.tags["closedloop.gate.champion_roc_auc"])
    moves = history(rt.client, rt.model_name)
    assert [(m["from_version"], m["to_version"]) for m in moves] == [("1", "3"), (None, "1")]


def test_4_a_blocking_bad_partition_is_quarantined_and_nothing_downstream_happens(world, reliability):
    rt, dag = world
    c = rt.contract
    uri = rt.lake.partition("landing", "transactions", BAD_DAY)
    rt.lake.write_parquet(make_bad(rt.lake.read_parquet(uri), "null_key", c), uri)
    before = _versions(rt)
    dr, states = _run(dag, {**BAD, "reason": "bad data"})
    assert dr.state == "failed"
    assert states["validate_window"] == "failed"
    assert all(states[t] in ("upstream_failed", None) for t in states if t != "validate_window"), states
    assert rt.lake.exists(rt.lake.partition("quarantine", "transactions", BAD_DAY))
    report = rt.lake.read_json(rt.lake.partition("quarantine", "transactions", BAD_DAY, ".validation.json"))
    assert "expect_column_values_to_not_be_null" in report["summary"] and c.row_key in report["summary"]
    assert not rt.lake.exists(rt.lake.partition("landing", "transactions", BAD_DAY))
    assert not rt.lake.exists(rt.lake.partition("curated", c.feature_view, BAD_DAY))
    assert not rt.lake.exists(rt.lake.partition("curated", "transactions", BAD_DAY))
    assert _versions(rt) == before
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "3"
    reliability.record("bad-input-dag", "null keys in a retraining window (retraining DAG)",
                       "run failed at validate_window, every later task upstream_failed; quarantined with its "
                       "report; no features, no model version; champion kept")


def test_5_rerunning_a_window_creates_nothing_new(world):
    rt, dag = world
    runs_before = len(rt.client.search_runs([rt.client.get_experiment_by_name("closedloop-training").experiment_id]))
    dr, states = _run(dag, {**BETTER, "reason": "re-run"})
    assert dr.state == "success", states
    assert _versions(rt) == [1, 2, 3]
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "3"
    assert len(history(rt.client, rt.model_name)) == 2
    assert rt.client.get_model_version(rt.model_name, "3").tags["closedloop.decision_reason"].startswith("roc_auc")
    runs_after = len(rt.client.search_runs([rt.client.get_experiment_by_name("closedloop-training").experiment_id]))
    assert runs_after == runs_before


def test_6_no_secret_reaches_mlflow(world, reliability):
    """Tags, params and model version tags hold neither the environment's secrets nor passwords in URIs."""
    import re

    rt, _ = world
    userinfo = re.compile(r"://[^/@\s]+:[^/@\s]+@")
    values = []
    for exp in rt.client.search_experiments():
        for run in rt.client.search_runs([exp.experiment_id], max_results=1000):
            values += [*run.data.tags.values(), *run.data.params.values()]
    for mv in rt.client.search_model_versions(f"name = '{rt.model_name}'"):
        values += [*mv.tags.values(), mv.source]
    assert len(values) > 50
    leaks = [v for v in values if CANARY in v or userinfo.search(v)]
    assert not leaks, leaks
    reliability.record("security", "a secret in the environment of a retraining run",
                       "never written to MLflow: no run tag, param or model version tag holds it")
