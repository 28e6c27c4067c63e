"""Faults that only the real scheduler can show: a killed task retried, two runs at once, a run re-run.

One Airflow stack (scheduler, dag-processor, triggerer, API server) on its own home and database, small
data, and three ``retraining`` runs:

1. two runs on overlapping windows are triggered at the same moment; the training task of whichever
   trains first SIGKILLs itself right after its MLflow run was created (the test hook of
   ``tests/support/faults.py``, once), so the scheduler has to retry it;
2. the last of them is cleared and re-run whole;
3. a third run, on a new window, whose training task is killed with its supervising worker (nothing is
   left to report, the ``kill_train_tree`` hook) on its last try: the scheduler's task-instance heartbeat
   timeout, short here, ends the try and the DAG run fails; a new DAG run on the same window (same lineage)
   marks the MLflow run the killed try left RUNNING.

Retries wait a second (``CLOSEDLOOP_RETRY_DELAY_SECONDS``), every wait polls with a bounded timeout.
What the lineage key hashes besides the data is frozen for the module (a copy of the configuration and
the schema, no git commit): others commit and edit this checkout while it runs, and a new commit or
configuration is rightly a new lineage, a new model version.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest
from support import faults

pytestmark = pytest.mark.integration

START = date(2026, 7, 1)
W1 = {"window_start": (START + timedelta(days=6)).isoformat(), "window_end": (START + timedelta(days=13)).isoformat()}
W2 = {"window_start": (START + timedelta(days=7)).isoformat(), "window_end": (START + timedelta(days=14)).isoformat()}
W3 = {"window_start": (START + timedelta(days=8)).isoformat(), "window_end": (START + timedelta(days=15)).isoformat()}
KILLED = "faults_w3_killed"
TIMEOUT = 900
# [scheduler] task_instance_heartbeat_timeout (default 300 s) and its check interval (default 10 s); the
# task's supervisor heartbeats every [workers] min_heartbeat_interval (5 s), so 30 s leaves a healthy task
# five late heartbeats of slack on a loaded machine before the scheduler would fail it
HEARTBEAT_TIMEOUT = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The stack, and the two retraining runs triggered at once and finished: ``(rt, stack, marker, runs)``."""
    from closedloop.devtools.airflow_home import airflow_home, write_config
    from closedloop.devtools.generate import GeneratorConfig, generate
    from closedloop.devtools.stack import AirflowStack
    from closedloop.stages.runtime import Runtime

    root = tmp_path_factory.mktemp("faults-scheduler")
    marker = root / "kill_train_once.marker"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLOSEDLOOP_HOME", str(root / "closedloop"))
        mp.setenv("CLOSEDLOOP_CONFIG", str(_frozen_config(root)))
        rt = Runtime.from_env()
        generate(GeneratorConfig(start=START, days=16, customers=300, transactions_per_day=800, seed=21,
                                 fraud_rate=0.03), rt.lake, rt.contract)
        af_home = airflow_home(rt.settings)
        write_config(rt.settings, parallelism=2)
        # this module's own Airflow: its own home and database, not the session's
        for var in [v for v in os.environ if v.startswith("AIRFLOW__")]:
            mp.delenv(var)
        mp.setenv("AIRFLOW_HOME", str(af_home))
        subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                       capture_output=True, timeout=300, env=os.environ.copy())
        env = {"CLOSEDLOOP_HOME": str(rt.settings.home), "CLOSEDLOOP_SCHEDULES": "manual",
               "CLOSEDLOOP_CONFIG": str(rt.settings.config_path), "GIT_DIR": str(root / "no-git"),
               "CLOSEDLOOP_RETRY_DELAY_SECONDS": "1",
               **faults.environment(f"kill_train_once:{marker},kill_train_tree:{KILLED}"),
               "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False", "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
               "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
               "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2", "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
               "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
               "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2"}
        with AirflowStack(af_home, env, port=_free_port()) as stack:
            stack.wait(lambda: _has_dag(stack, "retraining"), 180, "the retraining DAG to be parsed")
            ids = [stack.trigger("retraining", {**W1, "reason": "fault test: first"}, run_id="faults_w1"),
                   stack.trigger("retraining", {**W2, "reason": "fault test: second"}, run_id="faults_w2")]
            runs = [stack.wait_run("retraining", run_id, TIMEOUT) for run_id in ids]
            yield rt, stack, marker, sorted(runs, key=lambda r: r["start_date"])


def _frozen_config(root: Path) -> Path:
    """A copy of the configuration whose schema is a copy too (its relative path made absolute)."""
    import shutil

    import yaml

    from closedloop.core.settings import Settings

    config = Settings.from_env().config
    schema = shutil.copy(config.schema_path, root / config.schema_path.name)
    raw = {**config.raw, "dataset": {**config.raw["dataset"], "schema": str(schema)}}
    path = root / "closedloop.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _has_dag(stack, dag_id: str) -> bool:
    try:
        stack.api("GET", f"/dags/{dag_id}")
        return True
    except Exception:
        return False


def _tries(stack, run_id: str) -> dict[str, int]:
    tis = stack.api("GET", f"/dags/retraining/dagRuns/{run_id}/taskInstances")["task_instances"]
    return {t["task_id"]: t["try_number"] for t in tis}


def _training_runs(rt, filter_string: str = "") -> list:
    exp = rt.client.get_experiment_by_name(rt.settings.config.raw["model"]["experiment"])
    return rt.client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=100)


def _versions(rt) -> dict[str, dict[str, str]]:
    return {str(v.version): dict(v.tags) for v in rt.client.search_model_versions(f"name = '{rt.model_name}'")}


def test_a_killed_training_task_is_retried_and_leaves_no_duplicate(world, reliability):
    rt, stack, marker, runs = world
    assert all(r["state"] == "success" for r in runs), runs
    assert marker.exists(), "the fault never struck"
    killed, other = runs[0]["dag_run_id"], runs[1]["dag_run_id"]  # the first to train met the fault
    assert _tries(stack, killed)["train_model"] == 2
    assert set(_tries(stack, other).values()) == {1}

    orphans = _training_runs(rt, "tags.`closedloop.orphan` = 'true'")
    assert len(orphans) == 1
    orphan = orphans[0]
    assert orphan.info.status == "FAILED"
    assert orphan.data.tags["closedloop.dag_run_id"] == killed
    assert killed in orphan.data.tags["closedloop.orphan_reason"]
    finished = _training_runs(rt, f"tags.`closedloop.dag_run_id` = '{killed}' and attributes.status = 'FINISHED'")
    assert len(finished) == 1
    assert finished[0].data.tags["closedloop.lineage_key"] == orphan.data.tags["closedloop.lineage_key"]

    versions = _versions(rt)
    of_lineage = [v for v, tags in versions.items()
                  if tags["closedloop.lineage_key"] == orphan.data.tags["closedloop.lineage_key"]]
    assert len(of_lineage) == 1
    assert rt.client.get_model_version(rt.model_name, of_lineage[0]).run_id == finished[0].info.run_id
    reliability.record(
        "fault", "training task's process SIGKILLed right after its MLflow run was created (real scheduler)",
        "Airflow retried the task and the DAG run succeeded; 1 model version for the lineage, from the retry's "
        "run; the killed try's MLflow run tagged closedloop.orphan=true and terminated FAILED")


def test_two_runs_triggered_at_once_are_serialised_with_one_promotion_per_decision(world, reliability):
    from closedloop.stages.registry import CHAMPION, alias_version, history

    rt, _, _, runs = world
    first, second = runs
    assert first["end_date"] <= second["start_date"], runs  # max_active_runs=1: one after the other

    versions = _versions(rt)
    assert len(versions) == 2 == len({t["closedloop.lineage_key"] for t in versions.values()})
    by_run = {t["closedloop.dag_run_id"]: v for v, t in versions.items()}
    v1, v2 = by_run[first["dag_run_id"]], by_run[second["dag_run_id"]]
    assert versions[v1]["closedloop.decision"] == "promote" and versions[v1]["closedloop.compared_with"] == "none"
    # the second decision saw the first's outcome: it was judged against the champion the first promoted
    assert versions[v2]["closedloop.compared_with"] == v1
    moves = history(rt.client, rt.model_name)
    promoted = [v for v in (v1, v2) if versions[v]["closedloop.decision"] == "promote"]
    assert sorted(m["to_version"] for m in moves) == sorted(promoted)  # one promotion per promote decision
    assert alias_version(rt.client, rt.model_name, CHAMPION) == promoted[-1]
    reliability.record(
        "fault", "two retraining runs triggered at the same moment (real scheduler)",
        "max_active_runs=1 ran them one after the other; the second's gate judged against the champion the first "
        "promoted; one promotion per promote decision, the champion is the last one promoted")


def test_a_finished_run_cleared_and_rerun_whole_creates_nothing_new(world, reliability):
    from closedloop.stages.registry import CHAMPION, alias_version, history

    rt, stack, _, runs = world
    last = runs[-1]["dag_run_id"]
    versions, moves = _versions(rt), history(rt.client, rt.model_name)
    champion = alias_version(rt.client, rt.model_name, CHAMPION)
    trained = len(_training_runs(rt))
    tries = _tries(stack, last)

    stack.api("POST", f"/dags/retraining/dagRuns/{last}/clear", json={"dry_run": False})
    stack.wait(lambda: _tries(stack, last)["promote_or_reject"] > tries["promote_or_reject"]
               and stack.api("GET", f"/dags/retraining/dagRuns/{last}")["state"] in {"success", "failed"},
               TIMEOUT, f"the cleared run {last} to finish again")
    assert stack.api("GET", f"/dags/retraining/dagRuns/{last}")["state"] == "success"
    assert set(_versions(rt)) == set(versions)
    assert len(history(rt.client, rt.model_name)) == len(moves)
    assert alias_version(rt.client, rt.model_name, CHAMPION) == champion
    assert len(_training_runs(rt)) == trained  # the finished training run was reused
    reliability.record(
        "fault", "a finished retraining run cleared and re-run whole (real scheduler)",
        "the re-run succeeded reusing its training run and model version; no new version, no second promotion, "
        "champion unchanged")


def _no_retry_left(stack, run_id: str, task_id: str) -> None:
    """Make the first try of ``task_id`` in ``run_id`` its last: ``max_tries`` 0, as for a task declared with
    ``retries=0``, written in this module's own Airflow database (the retries of the DAG come from the
    environment at parse time, the same for every run; the first run of this module needs its retry)."""
    import sqlite3

    with sqlite3.connect(stack.airflow_home / "airflow.db", timeout=60) as db:
        changed = db.execute("UPDATE task_instance SET max_tries = 0 WHERE dag_id = 'retraining' AND run_id = ? "
                             "AND task_id = ? AND try_number <= 1 AND (state IS NULL OR state IN ('scheduled', "
                             "'queued'))", (run_id, task_id)).rowcount
    assert changed == 1, f"{task_id} of {run_id} had started already"


def test_a_run_killed_on_its_last_try_ends_and_the_next_run_of_its_lineage_marks_the_orphan(world, reliability):
    """A training try killed with its supervisor (SIGKILL, nothing left to report) and no retry left: the
    scheduler's heartbeat timeout fails the try and the DAG run ends ``failed``, not ``running`` forever;
    the MLflow run it left RUNNING is marked (orphan tag, FAILED) by a new DAG run on the same window."""
    rt, stack, _, _ = world
    stack.trigger("retraining", {**W3, "reason": "fault test: killed on its last try"}, run_id=KILLED)
    stack.wait(lambda: "train_model" in stack.task_states("retraining", KILLED), 60, f"the task instances of {KILLED}")
    _no_retry_left(stack, KILLED, "train_model")
    run = stack.wait_run("retraining", KILLED, TIMEOUT)
    assert run["state"] == "failed", run
    tis = {t["task_id"]: t for t in
           stack.api("GET", f"/dags/retraining/dagRuns/{KILLED}/taskInstances")["task_instances"]}
    assert (tis["train_model"]["state"], tis["train_model"]["try_number"]) == ("failed", 1)
    assert tis["register_model"]["state"] == "upstream_failed"
    # ended by the scheduler's heartbeat timeout: the task's supervisor was dead, it reported nothing
    events = stack.api("GET", "/eventLogs", params={"dag_id": "retraining", "run_id": KILLED,
                                                    "event": "heartbeat timeout"})["event_logs"]
    assert [e["task_id"] for e in events] == ["train_model"], events
    left = _training_runs(rt, f"tags.`closedloop.dag_run_id` = '{KILLED}'")
    assert [r.info.status for r in left] == ["RUNNING"]  # the killed try's run, not yet found
    assert "closedloop.orphan" not in left[0].data.tags

    later = stack.trigger("retraining", {**W3, "reason": "fault test: after the killed run"},
                          run_id="faults_w3_later")
    assert stack.wait_run("retraining", later, TIMEOUT)["state"] == "success"
    orphan = rt.client.get_run(left[0].info.run_id)
    assert orphan.info.status == "FAILED"
    assert orphan.data.tags["closedloop.orphan"] == "true"
    reason = orphan.data.tags["closedloop.orphan_reason"]
    assert KILLED in reason and later in reason, reason
    finished = _training_runs(rt, f"tags.`closedloop.dag_run_id` = '{later}' and attributes.status = 'FINISHED'")
    assert len(finished) == 1
    assert finished[0].data.tags["closedloop.lineage_key"] == orphan.data.tags["closedloop.lineage_key"]
    assert "closedloop.orphan" not in finished[0].data.tags
    reliability.record(
        "fault", "training task killed with its supervising worker (SIGKILL) on its last try, then a new DAG run "
                 "on the same window (real scheduler)",
        f"the scheduler's heartbeat timeout ({HEARTBEAT_TIMEOUT} s here) failed the try and the DAG run ended "
        "failed; the new run of the same lineage tagged the killed run closedloop.orphan=true, terminated it "
        "FAILED, trained and succeeded")


def test_the_api_refuses_requests_without_a_valid_login(world, reliability):
    """The embedded Airflow's REST API needs the token flow: no token or a wrong password get 401, a forged token
    403 (Airflow's answer to a JWT it cannot verify)."""
    import httpx

    _, stack, _, _ = world
    assert httpx.get(f"{stack.url}/api/v2/dags", timeout=10).status_code == 401
    forged = {"Authorization": "Bearer eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiJhZG1pbiJ9.forged"}
    assert httpx.get(f"{stack.url}/api/v2/dags", headers=forged, timeout=10).status_code == 403
    wrong = httpx.post(f"{stack.url}/auth/token", json={"username": "admin", "password": "admin"}, timeout=10)
    assert wrong.status_code == 401
    assert httpx.post(f"{stack.url}/api/v2/dags/retraining/dagRuns", json={"logical_date": None},
                      timeout=10).status_code == 401
    assert stack.api("GET", "/dags/retraining")["dag_id"] == "retraining"  # the generated password works
    reliability.record("security", "the Airflow REST API without a valid login",
                       "401 for no token, the default password admin/admin and an anonymous trigger; 403 for a "
                       "forged token")
