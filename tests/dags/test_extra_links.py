"""Extra links: the producing tasks carry them, they survive serialization, and their URLs are right.

The URL functions get the very dicts the stages return (their shapes are built here from the stages' own
``to_dict``/return code paths in tests/integration/test_retraining_dag.py, which checks the train task's link
on a real run); the serialized DAG is the one the API server reads.
"""

from __future__ import annotations

import pytest

from closedloop.adapters.airflow import links
from closedloop.core.settings import Settings

EXPECTED = {
    ("retraining", "validate_window"): {"Validation report"},
    ("retraining", "train_model"): {"MLflow run"},
    ("retraining", "register_model"): {"MLflow model version"},
    ("retraining", "promote_or_reject"): {"MLflow model version"},
    ("drift_monitoring", "measure_drift"): {"Drift report", "MLflow run"},
    ("ingest", "validate_partitions"): {"Validation report"},
}


def test_producing_tasks_carry_their_links(dagbag):
    for (dag_id, task_id), names in EXPECTED.items():
        task = dagbag.get_dag(dag_id).get_task(task_id)
        assert {link.name for link in task.operator_extra_links} == names, (dag_id, task_id)
        assert task.python_callable.__doc__, "still a TaskFlow task"
    # the other tasks have none of closedloop's (trigger_retraining keeps Airflow's own "Triggered DAG")
    for dag_id in ("retraining", "drift_monitoring", "ingest"):
        for task in dagbag.get_dag(dag_id).tasks:
            if (dag_id, task.task_id) not in EXPECTED:
                assert not any(isinstance(link, links._ResultLink) for link in task.operator_extra_links), \
                    (dag_id, task.task_id)


def test_links_survive_serialization(dagbag):
    """The API server's DAG: the links by name, read back from the XCom key the worker writes."""
    from airflow.serialization.serialized_objects import DagSerialization

    for dag_id in ("retraining", "drift_monitoring", "ingest"):
        dag = dagbag.get_dag(dag_id)
        restored = DagSerialization.from_dict(DagSerialization.to_dict(dag))
        for (d, task_id), names in EXPECTED.items():
            if d != dag_id:
                continue
            served = {link.name: link.xcom_key for link in restored.get_task(task_id).operator_extra_links}
            made = {link.name: link.xcom_key for link in dag.get_task(task_id).operator_extra_links}
            assert set(served) == names and served == made, (dag_id, task_id, served)


TRAINED = {"run_id": "4f1c2b0a9e8d4c7b", "model_uri": "models:/m-abc", "lineage_key": "k", "device": "cpu",
           "threshold": 0.5, "metrics": {"auc": 0.9}, "reused": False}
REGISTERED = {"model": "closedloop fraud", "version": "3", "created": True, "run_id": "4f1c2b0a9e8d4c7b"}
PROMOTED = {"action": "promoted", "model": "closedloop-fraud", "version": "3", "previous": "2", "reason": "r",
            "actor": "a", "at": "t", "kind": "promotion"}
MEASURED = {"window": {"start": "2026-05-12", "end": "2026-05-19"}, "mlflow_run_id": "abc123",
            "report": {"html": "file:///x/report.html", "json": "file:///x/figures.json"}}
VALIDATED = {"window": {"start": "2026-04-01", "end": "2026-04-29"}, "partitions": 56, "by_status": {}}
INGESTED = {"day": "2026-05-03", "partitions": [{"kind": "transactions", "day": "2026-05-03"}]}


def test_urls_from_the_stages_results():
    ui = "http://mlflow.example:5000/"
    assert links.mlflow_run_url(ui, TRAINED) == "http://mlflow.example:5000/#/runs/4f1c2b0a9e8d4c7b"
    assert links.mlflow_run_url(ui, MEASURED) == "http://mlflow.example:5000/#/runs/abc123"
    assert links.model_version_url(ui, REGISTERED) == ("http://mlflow.example:5000/#/models/closedloop%20fraud"
                                                       "/versions/3")
    assert links.model_version_url(ui, PROMOTED).endswith("/#/models/closedloop-fraud/versions/3")
    assert links.drift_report_url("", MEASURED) == "/closedloop/reports/drift/2026-05-12_2026-05-19/report.html"
    assert links.drift_report_url("https://airflow.example/", MEASURED) == (
        "https://airflow.example/closedloop/reports/drift/2026-05-12_2026-05-19/report.html")
    assert links.validation_report_url("", VALIDATED) == "/closedloop/reports/validation/2026-04-01_2026-04-29.json"
    assert links.validation_report_url("", INGESTED) == "/closedloop/reports/validation/2026-05-03_2026-05-04.json"


def test_report_links_name_the_model_of_their_dag(dagbag, monkeypatch):
    """One deployment, many models: a report link opens the report of its task's model (``?model=``, from the DAG's
    ``model:<name>`` tag), not the page's default model's."""
    from airflow.sdk.execution_time.xcom import XCom

    assert links.drift_report_url("", MEASURED, "churn") == (
        "/closedloop/reports/drift/2026-05-12_2026-05-19/report.html?model=churn")
    assert links.validation_report_url("", INGESTED, "churn").endswith("2026-05-03_2026-05-04.json?model=churn")
    results = {"measure_drift": MEASURED, "validate_partitions": INGESTED}
    monkeypatch.setattr(XCom, "get_value", classmethod(lambda cls, *, ti_key, key: results[ti_key]))
    for dag_id, model in (("drift_monitoring", "card_fraud"), ("churn.drift_monitoring", "churn")):
        task = dagbag.get_dag(dag_id).get_task("measure_drift")
        link = next(lk for lk in task.operator_extra_links if lk.name == "Drift report")
        assert link.get_link(task, ti_key="measure_drift").endswith(f"report.html?model={model}"), dag_id
        mlflow = next(lk for lk in task.operator_extra_links if lk.name == "MLflow run")
        assert "?model=" not in mlflow.get_link(task, ti_key="measure_drift")
    task = dagbag.get_dag("churn.ingest").get_task("validate_partitions")
    link = next(lk for lk in task.operator_extra_links if lk.name == "Validation report")
    assert link.get_link(task, ti_key="validate_partitions").endswith(".json?model=churn")


@pytest.mark.parametrize("fn, ui, result", [
    (links.mlflow_run_url, "", TRAINED),                  # no MLflow UI (a sqlite store): no link
    (links.mlflow_run_url, "http://m", {"x": 1}),
    (links.model_version_url, "http://m", {"model": "m"}),
    (links.drift_report_url, "", {"window": {"start": "nope", "end": "2026-01-01"}}),
    (links.validation_report_url, "", None),
    (links.validation_report_url, "", "not a dict"),
])
def test_no_url_without_what_it_needs(fn, ui, result):
    assert fn(ui, result) == ""


def test_report_links_open_what_the_model_health_page_serves(runtime):
    """The links' paths under the plugin's route: the page serves a drift report and a validation report there."""
    import importlib.util
    import json
    from datetime import date
    from pathlib import Path

    from closedloop.stages import health
    from closedloop.stages.ingest import marker_uri

    spec = importlib.util.spec_from_file_location(
        "model_health_plugin", Path(__file__).resolve().parents[2] / "plugins" / "model_health.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    assert links.REPORTS_ROUTE == plugin.URL_PREFIX + "/reports/"

    lake = runtime.lake
    lake.write_bytes(lake.uri("reports", "drift", "2026-05-12_2026-05-19", "report.html"), b"<html>drift</html>")
    body, media = health.report_bytes(runtime, links.drift_report_url("", MEASURED).removeprefix(links.REPORTS_ROUTE))
    assert body == b"<html>drift</html>" and media.startswith("text/html")

    # a curated partition's validation record and a quarantined one's report, inside the window; one outside
    lake.write_json(marker_uri(lake, "transactions", date(2026, 4, 1)), {"summary": "ok", "warnings": ["w"]})
    lake.write_json(lake.partition("quarantine", "labels", date(2026, 4, 28), suffix=".validation.json"),
                    {"summary": "labels 2026-04-28: bad"})
    lake.write_json(marker_uri(lake, "transactions", date(2026, 4, 29)), {"summary": "outside"})
    path = links.validation_report_url("", VALIDATED).removeprefix(links.REPORTS_ROUTE)
    body, media = health.report_bytes(runtime, path)
    report = json.loads(body)
    assert media == "application/json" and report["window"] == VALIDATED["window"]
    assert [(p["kind"], p["day"], p["status"], p["record"]["summary"]) for p in report["partitions"]] == [
        ("transactions", "2026-04-01", "curated", "ok"),
        ("labels", "2026-04-28", "quarantined", "labels 2026-04-28: bad")]
    with pytest.raises(health.ReportNotFound, match=r"no partition of 2026-05-03\.\.2026-05-04 was validated"):
        health.report_bytes(runtime, links.validation_report_url("", INGESTED).removeprefix(links.REPORTS_ROUTE))
    for bad in ("validation/2026-04-02_2026-04-01.json", "validation/2020-01-01_2026-01-01.json",
                "validation/../x.json"):
        with pytest.raises(health.ReportNotFound, match="not a report this page serves"):
            health.report_bytes(runtime, bad)


def test_mlflow_ui_setting(tmp_path):
    assert links.mlflow_ui_url(None, "http://user:pw123@mlflow:5000/") == "http://mlflow:5000"
    assert links.mlflow_ui_url("", "sqlite:////tmp/mlflow.db") == ""
    assert links.mlflow_ui_url("https://mlflow.example/", "http://mlflow:5000") == "https://mlflow.example"
    s = Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path), "CLOSEDLOOP_MLFLOW_UI_URL": "http://localhost:5000"})
    assert s.mlflow_ui_url == "http://localhost:5000"
    with pytest.raises(Exception, match="CLOSEDLOOP_MLFLOW_UI_URL='mlflow:5000': expected an http"):
        links.mlflow_ui_url("mlflow:5000", "")
    with pytest.raises(Exception, match="CLOSEDLOOP_MLFLOW_UI_URL='mlflow:5000': expected an http"):
        Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path), "CLOSEDLOOP_MLFLOW_UI_URL": "mlflow:5000"})
