"""docs/reference/dags.md is generated from the DAG files (their docstrings and tasks) and the run configurations of
closedloop.core.runconf; it must be the committed file (tests/dags/test_dag_reference_matches.py checks what it reads
against Airflow's DagBag)."""

from __future__ import annotations

from closedloop.core.runconf import RUN_CONFS
from closedloop.devtools import dag_reference


def test_the_committed_reference_is_current():
    assert dag_reference.TARGET.exists(), f"docs/reference/dags.md missing: run {dag_reference.COMMAND}"
    assert dag_reference.TARGET.read_text() == dag_reference.render(), (
        f"docs/reference/dags.md is stale (a DAG file's docstring or tasks, or a run configuration, changed): run "
        f"{dag_reference.COMMAND} and commit the result")


def test_every_dag_file_and_run_configuration_is_in_the_reference():
    text = dag_reference.render()
    stems = {p.stem for p in dag_reference.DAGS.glob("*.py") if not p.name.startswith("_")}
    assert stems == {p.stem for p in dag_reference.dag_files()}
    for stem in stems:
        assert f"\n## {stem}\n" in text
    for name, conf in RUN_CONFS.items():
        assert name in stems, name
        for field in conf.fields:
            assert f"| `{field.name}` |" in text

