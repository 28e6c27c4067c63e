"""What docs/reference/dags.md reads from the DAG files without importing them is what Airflow parses: for card_fraud's
DAGs (ids: the files' stems), the same doc_md, the same tasks, the same task docs."""

from __future__ import annotations

import pytest

from closedloop.devtools import dag_reference


@pytest.mark.parametrize("path", dag_reference.dag_files(), ids=lambda p: p.stem)
def test_the_reference_reads_what_airflow_parses(dagbag, path):
    read = dag_reference.read(path)
    dag = dagbag.get_dag(read.dag_id)
    assert dag is not None, read.dag_id
    assert (dag.doc_md or "").strip() == read.doc
    assert {t.task_id for t in read.tasks} == set(dag.task_ids), read.dag_id
    for task in read.tasks:
        parsed = dag.get_task(task.task_id)
        doc = parsed.doc_md or parsed.doc or getattr(getattr(parsed, "python_callable", None), "__doc__", None)
        assert " ".join((doc or "").split()) == task.doc, (read.dag_id, task.task_id)
