"""DAGs per model: each model of the folder gets its DAGs; a broken model is an import error of its own DAGs only.

Parsing runs in a subprocess (a fresh interpreter, as Airflow's DAG processor) on a copy of the shipped
``models/`` with one model broken; a real ``dag.test()`` then runs the healthy model's DAG beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from closedloop.core.settings import DEFAULT_MODELS

REPO = Path(__file__).resolve().parents[2]
KINDS = sorted(p.stem for p in (REPO / "dags").glob("*.py") if not p.name.startswith("_"))

_PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()}, "dags": sorted(bag.dag_ids),
                  "tags": {d: sorted(bag.dags[d].tags) for d in bag.dag_ids}}))
"""


def _parse(models: Path, tmp_path: Path) -> dict:
    env = {**os.environ, "CLOSEDLOOP_MODELS": str(models),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////nonexistent-closedloop-dir/airflow.db"}
    env.pop("CLOSEDLOOP_CONFIG", None)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(REPO / "dags")], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def models(tmp_path: Path) -> Path:
    shutil.copytree(DEFAULT_MODELS, tmp_path / "models")
    return tmp_path / "models"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def test_every_model_gets_its_dags_tagged_with_it(models: Path, tmp_path: Path):
    report = _parse(models, tmp_path)
    assert report["errors"] == {}
    assert report["dags"] == sorted([*KINDS, *(f"churn.{k}" for k in KINDS)])
    assert all("model:churn" in report["tags"][f"churn.{k}"] and "model:card_fraud" in report["tags"][k]
               for k in KINDS)


def test_a_broken_configuration_is_an_import_error_of_its_own_dags_only(models: Path, tmp_path: Path, reliability):
    _edit(models / "churn" / "closedloop.yaml", "margin: 0.002", "margin: lots")
    report = _parse(models, tmp_path)
    assert report["dags"] == KINDS  # card_fraud's DAGs all load
    assert sorted(Path(f).stem for f in report["errors"]) == KINDS  # one import error per DAG file, churn's
    for error in report["errors"].values():
        assert error.startswith("ConfigError: model churn: "), error
        assert f"{models / 'churn' / 'closedloop.yaml'}" in error and "gate.margin='lots'" in error, error
        assert "\n" not in error  # one line in the UI's import errors
    reliability.record("config", "one model's configuration broken (churn: gate.margin='lots') among two models",
                       f"an import error naming the file and key for each of churn's {len(KINDS)} DAGs; card_fraud's "
                       f"{len(KINDS)} DAGs load", "nothing")


def test_a_broken_schema_names_the_schema_file(models: Path, tmp_path: Path, reliability):
    _edit(models / "churn" / "schema.yaml", "dtype: float64", "dtype: decimal")
    report = _parse(models, tmp_path)
    assert report["dags"] == KINDS
    assert all("churn/schema.yaml" in e and "decimal" in e for e in report["errors"].values()), report["errors"]
    reliability.record("config", "one model's schema broken (churn: a column of dtype decimal) among two models",
                       "an import error naming the schema file and column for churn's DAGs only; card_fraud's load",
                       "nothing")


def test_two_models_cannot_both_keep_the_root_layout(models: Path, tmp_path: Path, reliability):
    _edit(models / "churn" / "closedloop.yaml", "  experiment: churn-training\n",
          "  experiment: churn-training\n  namespaced: false\n")
    report = _parse(models, tmp_path)
    assert report["dags"] == KINDS  # card_fraud (first by name) keeps the ids; churn's would collide
    assert all("model.namespaced=false: the model 'card_fraud' keeps the root layout already" in e
               for e in report["errors"].values()), report["errors"]
    reliability.record("config", "two models both claim the root layout (model.namespaced: false)",
                       "the second (churn) refused with an import error naming the key; card_fraud keeps its DAG ids",
                       "nothing")


def test_the_other_models_run_beside_a_broken_one(models: Path, home: Path, monkeypatch, airflow_db):
    """card_fraud (the root model) broken: churn's housekeeping still parses and runs, on churn's own state, and
    its alerts say they are about churn."""
    from airflow.dag_processing.dagbag import DagBag

    from closedloop.core.settings import Settings
    from closedloop.stages.alerts import read_alerts

    _edit(models / "card_fraud" / "closedloop.yaml", "margin: 0.002", "margin: lots")
    monkeypatch.setenv("CLOSEDLOOP_MODELS", str(models))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert sorted(bag.dag_ids) == sorted(f"churn.{k}" for k in KINDS)
    dr = bag.get_dag("churn.housekeeping").test()
    assert dr.state == "success", {ti.task_id: ti.state for ti in dr.get_task_instances()}
    alerts = read_alerts(Settings.from_env(model="churn"), "data_missing")
    assert alerts and {a["model"] for a in alerts} == {"churn"}
    assert {a["dag_id"] for a in alerts} == {"churn.housekeeping"}
