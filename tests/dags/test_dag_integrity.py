"""DAG integrity and policy: every DAG loads, is documented, owned, tagged, retried; parsing is cheap."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAG_FILES = sorted(p for p in (REPO / "dags").glob("*.py") if not p.name.startswith("_"))
# the shipped models (models/): card_fraud keeps the root layout (DAG ids as the files' stems), churn is namespaced
NAMESPACED = ("churn",)
DAG_IDS = sorted({p.stem for p in DAG_FILES} | {f"{m}.{p.stem}" for m in NAMESPACED for p in DAG_FILES})
HEAVY = ("xgboost", "mlflow", "feast", "great_expectations", "evidently", "pandas", "sklearn", "numpy", "dask")


def test_dagbag_has_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert sorted(dagbag.dag_ids) == DAG_IDS


def test_airflow_cli_reports_no_import_errors(airflow_db):
    out = subprocess.run([str(Path(sys.executable).parent / "airflow"), "dags", "list-import-errors", "-l",
                          "-o", "json"], capture_output=True, text=True, env=os.environ.copy(), timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1] or "[]") == []


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_dag_policy(dagbag, dag_id: str):
    dag = dagbag.get_dag(dag_id)
    model, _, stem = dag_id.rpartition(".")
    assert dag is not None, f"dags/{stem}.py must define the DAG {dag_id!r} (dag_id: the file's stem, per model)"
    assert "closedloop" in dag.tags
    assert f"model:{model or 'card_fraud'}" in dag.tags
    assert dag.doc_md and dag.doc_md.strip(), "the module docstring is the DAG's doc_md"
    assert dag.description and dag.description.endswith("."), "the first sentence is the description"
    assert dag.max_active_runs == 1
    assert dag.catchup is False
    for task in dag.tasks:
        assert task.owner == "closedloop", task.task_id
        assert task.retries >= 1, task.task_id
        assert task.execution_timeout is not None, task.task_id
        assert task.doc_md or task.doc or getattr(task, "python_callable", None).__doc__, task.task_id


def test_retraining_tasks_are_named_for_what_they_do(dagbag):
    dag = dagbag.get_dag("retraining")
    order = ["validate_window", "materialise_features", "build_training_set", "train_model", "register_model",
             "evaluate_gate", "promote_or_reject"]
    assert set(dag.task_ids) == set(order)
    for upstream, downstream in itertools.pairwise(order):
        assert downstream in dag.get_task(upstream).get_flat_relative_ids(upstream=False)


_PARSE_PROBE = """
import json, sys, socket
calls = []
real_connect = socket.socket.connect
def guard(self, *a, **k):
    calls.append(repr(a))
    raise OSError("no connections at parse time")
socket.socket.connect = guard
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy})
print(json.dumps({{"errors": {{k: str(v) for k, v in bag.import_errors.items()}}, "dags": sorted(bag.dag_ids),
                  "heavy": heavy, "connections": calls}}))
"""


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.stem)
def test_parsing_is_cheap(path: Path, tmp_path: Path):
    """A DAG file imports no heavy library and opens no connection; it parses without a metadata DB."""
    env = os.environ.copy()
    # an unreachable metadata database: any lookup at parse time would fail
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = "sqlite:////nonexistent-closedloop-dir/airflow.db"
    probe = _PARSE_PROBE.format(heavy=set(HEAVY))
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, env=env,
                         timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    assert report["dags"] == sorted([path.stem, *(f"{m}.{path.stem}" for m in NAMESPACED)])
    assert report["heavy"] == [], f"heavy imports at parse time: {report['heavy']}"
    assert report["connections"] == []


def test_a_bad_setting_of_another_kind_breaks_no_dag_import(tmp_path: Path):
    """Parsing reads only the scheduling settings: a bad alert channel, online store or Dask address fails the
    tasks that read them (with its message), not the import of every DAG."""
    from closedloop.core.errors import ConfigError
    from closedloop.core.settings import AlertSettings, Settings

    env = os.environ.copy()
    env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = "sqlite:////nonexistent-closedloop-dir/airflow.db"
    bad = {"CLOSEDLOOP_ALERTS": "pager", "CLOSEDLOOP_ONLINE_STORE": "memcached",
           "CLOSEDLOOP_DASK_SCHEDULER": "dask-scheduler"}
    env.update(bad)
    out = subprocess.run([sys.executable, "-c", _PARSE_PROBE.format(heavy=set(HEAVY)), str(REPO / "dags")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    assert report["dags"] == DAG_IDS
    # every task reads its settings whatever the alert channel says; the alerting gets the message (and fails at
    # once: ConfigError is permanent), tests/integration/test_alert_delivery.py runs it
    pager = {**os.environ, "CLOSEDLOOP_ALERTS": "pager"}
    assert Settings.from_env(pager).config_path.exists()
    with pytest.raises(ConfigError, match="CLOSEDLOOP_ALERTS='pager'"):
        AlertSettings.from_env(pager)
    # a bad scheduling setting still fails the import, where it is needed, with its name
    env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////nonexistent-closedloop-dir/airflow.db",
           "CLOSEDLOOP_TRAINING_QUEUE": "g p u"}
    out = subprocess.run([sys.executable, "-c", _PARSE_PROBE.format(heavy=set(HEAVY)), str(REPO / "dags")],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    errors = json.loads(out.stdout.strip().splitlines()[-1])["errors"]
    assert errors and all("CLOSEDLOOP_TRAINING_QUEUE" in e for e in errors.values()), errors


def test_no_deprecated_airflow_surface():
    for path in DAG_FILES:
        text = path.read_text()
        for banned in ("airflow.decorators", "schedule_interval", "days_ago", "airflow.datasets",
                       "airflow.operators.", "datetime.now(", "/tmp"):
            assert banned not in text, f"{path.name} uses {banned}"
