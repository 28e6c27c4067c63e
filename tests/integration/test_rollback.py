"""Rollback through the CLI and through the ``rollback`` DAG (``dag.test()``), on a real MLflow registry."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from closedloop.cli import app
from closedloop.stages.registry import CHAMPION, PREVIOUS, alias_version, history, promote, reject, status
from closedloop.stages.rollback import rollback_run

pytestmark = pytest.mark.integration


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def registry(runtime, tmp_path):
    """The configured model with five versions: v1, v2, v3 promoted in turn (v3 champion), v4 rejected."""
    rt, client, name = runtime, runtime.client, runtime.model_name
    client.create_registered_model(name)
    src = tmp_path / "model"
    src.mkdir()
    for _ in range(5):
        client.create_model_version(name, source=str(src))
    for version, expected in (("1", None), ("2", "1"), ("3", "2")):
        promote(client, rt.settings, name, version, expected_champion=expected, reason=f"gate: v{version} won",
                actor="retraining")
    reject(client, name, "4", "gate: loses on PR AUC")
    return rt, client, name


def _aliases(client, name) -> tuple[str | None, str | None]:
    return alias_version(client, name, CHAMPION), alias_version(client, name, PREVIOUS)


def _statuses(rt, client, name) -> dict[str, str | None]:
    return {v["version"]: v["status"] for v in status(client, rt.settings, name)["versions"]}


def test_rollback_to_previous_through_the_cli_is_recorded(registry, reliability):
    rt, client, name = registry
    out = cli("rollback", "--reason", "v3 flags every second payment", "--actor", "ops-carol", "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert (result["status"], result["from_version"], result["to_version"]) == ("rolled_back", "3", "2")
    assert _aliases(client, name) == ("2", "3")
    assert _statuses(rt, client, name)["2"] == "champion" and _statuses(rt, client, name)["3"] == "previous"
    last = history(client, name)[0]
    assert {k: last[k] for k in ("kind", "from_version", "to_version", "actor", "reason")} == {
        "kind": "rollback", "from_version": "3", "to_version": "2", "actor": "ops-carol",
        "reason": "v3 flags every second payment"}
    reliability.record("rollback", "rollback to the previous champion through the CLI",
                       "champion back on the previous version, the rolled-back one holds 'previous'; the history "
                       "records a rollback with who and why")

    # a plain rollback again would re-promote what was just rolled back from: refused
    again = cli("rollback", "--reason", "again")
    assert again.exit_code == 1 and "the last move was a rollback from v3" in again.stderr
    assert _aliases(client, name) == ("2", "3") and len(history(client, name)) == 4

    # a named, retired version is a deliberate choice
    older = cli("rollback", "--to", "1", "--reason", "v2 is wrong as well", "--actor", "ops-carol")
    assert older.exit_code == 0, older.output
    assert "champion v2 -> v1" in older.stdout
    assert _aliases(client, name) == ("1", "2")
    assert history(client, name)[0]["kind"] == "rollback"
    reliability.record("rollback", "a second plain rollback right after a rollback, then a rollback to a named "
                       "older version",
                       "the plain one refused (previous holds the version rolled back from); the named one moves "
                       "the champion and is recorded")


def test_refused_rollbacks_change_nothing(registry, reliability):
    _, client, name = registry
    cases = {
        ("--to", "99"): "has no version '99': versions are v1 (retired), v2 (previous), v3 (champion), "
                        "v4 (rejected), v5 (candidate)",
        ("--to", "3"): "version 3 is already the champion",
        ("--to", "4"): "rejected by the promotion gate; a rollback to it needs --force",
        ("--reason", " "): "a rollback needs a reason",
    }
    for args, message in cases.items():
        reason = () if "--reason" in args else ("--reason", "test")
        out = cli("rollback", *args, *reason)
        assert out.exit_code == 1, (args, out.output)
        assert message in out.stderr, (args, out.stderr)
    assert cli("rollback").exit_code == 2  # --reason is required
    assert _aliases(client, name) == ("3", "2") and len(history(client, name)) == 3

    forced = cli("rollback", "--to", "v4", "--force", "--reason", "v4 only lost on a holiday holdout",
                 "--actor", "ops-dan", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["forced"] is True
    assert _aliases(client, name) == ("4", "3")
    assert history(client, name)[0]["reason"].startswith("v4 only lost on a holiday holdout [forced")
    reliability.record("rollback", "rollback to an unknown version, to the current champion, to a rejected version "
                       "without --force, with an empty reason",
                       "refused naming the versions and their statuses; champion, previous and history unchanged")
    reliability.record("rollback", "rollback to a rejected version with --force",
                       "champion moved, the history reason says it was forced")


def test_no_previous_version_is_refused(runtime, tmp_path, reliability):
    rt, client, name = runtime, runtime.client, runtime.model_name
    out = cli("rollback", "--reason", "no model yet")
    assert out.exit_code == 1 and "no registered versions" in out.stderr
    client.create_registered_model(name)
    client.create_model_version(name, source=str(tmp_path))
    assert "has no champion" in cli("rollback", "--reason", "x").stderr
    promote(client, rt.settings, name, "1", expected_champion=None, reason="first", actor="retraining")
    out = cli("rollback", "--reason", "v1 is bad")
    assert out.exit_code == 1 and "no previous champion to roll back to" in out.stderr
    assert _aliases(client, name) == ("1", None) and len(history(client, name)) == 1
    reliability.record("rollback", "rollback with no registered model, with no champion, with no previous champion",
                       "refused, saying there is nothing to roll back to; nothing changed")


def test_rollback_dag_is_one_manual_task_with_a_form(dagbag):
    dag = dagbag.get_dag("rollback")
    assert dag.task_ids == ["roll_back_champion"]
    assert dag.timetable.can_be_scheduled is False
    assert set(dag.params) == {"version", "reason", "force"}
    assert dag.params.get_param("reason").schema["minLength"] == 1


def test_rollback_through_the_dag_records_the_triggering_user(registry, dagbag, reliability):
    rt, client, name = registry
    dag = dagbag.get_dag("rollback")
    dr = dag.test(run_conf={"version": "", "reason": "v3 degraded after the release", "force": False})
    assert dr.state == "success"
    assert _aliases(client, name) == ("2", "3")
    last = history(client, name)[0]
    # dag.test() runs as the user "dag_test" (DagRun.triggering_user_name); a UI/API trigger gives the login
    assert (last["kind"], last["from_version"], last["to_version"], last["actor"]) == ("rollback", "3", "2",
                                                                                        "dag_test")
    assert last["reason"] == f"v3 degraded after the release [request {dr.run_id}]"
    xcom = dr.get_task_instance("roll_back_champion").xcom_pull(task_ids="roll_back_champion")
    assert xcom["status"] == "rolled_back" and xcom["actor"] == "dag_test"

    # a retried task finds its own rollback and does not move the champion twice
    again = rollback_run(rt, {"reason": "v3 degraded after the release"}, actor="dag_test", request=dr.run_id)
    assert again["status"] == "already_done" and _aliases(client, name) == ("2", "3")
    assert len(history(client, name)) == 4
    reliability.record("rollback", "rollback through the rollback DAG's form, then its task retried",
                       "champion back on the previous version, recorded with the triggering user, the reason and "
                       "the run id; the retry answers 'already done' and moves nothing")


def test_the_dag_refuses_a_bad_configuration_before_any_work(registry, dagbag, reliability):
    from airflow.sdk.exceptions import ParamValidationError

    _, client, name = registry
    dag = dagbag.get_dag("rollback")
    for conf in ({"reason": "x", "verison": "2"}, {"reason": "x", "version": "99"},
                 {"reason": "x", "version": "4"}):
        dr = dag.test(run_conf=conf)
        assert dr.state == "failed", conf
        assert dr.get_task_instance("roll_back_champion").try_number == 1, conf  # failed at once, no retry
    for conf in ({"version": "2"}, {"reason": ""}):
        with pytest.raises(ParamValidationError):
            dag.test(run_conf=conf)
    assert _aliases(client, name) == ("3", "2") and len(history(client, name)) == 3
    reliability.record("rollback", "rollback DAG triggered with an unknown key, an unknown version, a rejected "
                       "version without force, no reason or an empty one",
                       "the run is refused (no reason: Airflow refuses the form; the rest fail at once without "
                       "retry); champion and history unchanged")
