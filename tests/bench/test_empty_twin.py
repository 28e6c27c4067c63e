"""The empty twin of a DAG (``bench/empty_twin.py``, the end_to_end stage's measure of Airflow's own overhead)
has the real DAG's structure: its task ids, dependencies, XCom inputs and mapped instances, every task a
Python task (``EmptyOperator`` never runs). Parsing only: the stage runs the twin in ``make bench-quick``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import empty_twin  # noqa: E402

pytestmark = pytest.mark.bench


def _parse(folder: Path):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(folder))
    assert not bag.import_errors, bag.import_errors
    return bag


def _twin(tmp_path: Path, dag_id: str, folder: Path):
    twin_id = f"{dag_id}_empty"
    (tmp_path / "twin").mkdir()
    (tmp_path / "twin" / f"{twin_id}.py").write_text(empty_twin.render(empty_twin.describe(dag_id, folder), twin_id))
    return _parse(tmp_path / "twin").dags[twin_id]


def _inputs(task) -> list[str]:
    from airflow.sdk.definitions.xcom_arg import XComArg

    return sorted({op.task_id for op, _ in XComArg.iter_xcom_references([task.op_args, task.op_kwargs])})


def test_the_retraining_dags_twin_has_its_structure(tmp_path):
    real = _parse(REPO / "dags").dags["retraining"]
    twin = _twin(tmp_path, "retraining", REPO / "dags")
    assert sorted(twin.task_ids) == sorted(real.task_ids)
    for task_id in real.task_ids:
        r, t = real.get_task(task_id), twin.get_task(task_id)
        assert t.upstream_task_ids == r.upstream_task_ids, task_id
        assert _inputs(t) == _inputs(r), task_id
        assert t.trigger_rule == r.trigger_rule, task_id
        assert type(t).__name__ == "_PythonDecoratedOperator", task_id


MAPPED = '''
import pendulum
from airflow.sdk import dag, task


@task
def one(x=None):
    return [1, 2]


@dag(dag_id="mapped", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
def mapped():
    first = one()
    fanned = one.expand(x=[1, 2, 3])
    first >> fanned
    {extra}


mapped()
'''


def test_a_task_mapped_over_literals_keeps_its_instances(tmp_path):
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "mapped.py").write_text(MAPPED.format(extra=""))
    structure = empty_twin.describe("mapped", tmp_path / "dags")
    assert {t["task_id"]: t["map_length"] for t in structure["tasks"]} == {"one": None, "one__1": 3}
    twin = _twin(tmp_path, "mapped", tmp_path / "dags")
    assert twin.get_task("one__1").upstream_task_ids == {"one"}
    again = empty_twin.describe("mapped_empty", tmp_path / "twin")
    assert {t["task_id"]: t["map_length"] for t in again["tasks"]} == {"one": None, "one__1": 3}


def test_a_task_mapped_over_an_upstreams_output_is_refused(tmp_path):
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "mapped.py").write_text(MAPPED.format(extra="one.expand(x=first)"))
    with pytest.raises(SystemExit, match="mapped over another task's output"):
        empty_twin.describe("mapped", tmp_path / "dags")
