"""Injected faults at the function level: a dying MLflow server, an interrupted materialisation, monitoring
while a retraining is active.

The faults are real: a real ``mlflow server`` process is SIGKILLed in the middle of a registration, and a
materialisation running in its own process is SIGKILLed after its first batch reached the online store.
The faults that need the scheduler (a killed task retried, two runs at once) are in
``test_faults_scheduler.py``. MLflow's HTTP retries are short here (``tests/conftest.py``), so a dead
server costs seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import pytest

from closedloop.core.errors import TransientError
from closedloop.core.runconf import Window
from closedloop.stages import retraining as stages


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        try:
            s.connect(("127.0.0.1", port))
            return True
        except OSError:
            return False


# -- the fault hook of the scheduler tests, on its own -------------------------------------------------
_TRAINING_RUN = """
import sys, mlflow
mlflow.set_tracking_uri(sys.argv[1])
with mlflow.start_run(run_name="other"):  # not a training run: no fault strikes
    pass
with mlflow.start_run(run_name="train", tags={"closedloop.lineage_key": "k"}):  # as training.train_and_log does
    mlflow.log_param("logged", 1)  # after the point where the faults strike
"""


def test_the_fault_hook_strikes_right_after_a_training_run_is_created(tmp_path):
    """``support.faults`` as ``test_faults_scheduler.py`` uses it, in a plain process: its environment alone
    makes the process die right after the training run was created (once), or refuse where no Airflow worker
    supervises it; production code knows nothing of it."""
    from mlflow import MlflowClient
    from support import faults

    uri, marker = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "kill_train_once.marker"

    def run(spec: str, **extra: str) -> subprocess.CompletedProcess:
        env = {**os.environ, **faults.environment(spec), **extra}
        return subprocess.run([sys.executable, "-c", _TRAINING_RUN, uri], env=env, capture_output=True, text=True,
                              timeout=300)

    def runs() -> list:
        return sorted(MlflowClient(uri).search_runs(["0"]), key=lambda r: r.info.start_time)

    killed = run(f"kill_train_once:{marker}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert marker.exists()
    other, train = runs()
    assert (other.info.run_name, other.info.status) == ("other", "FINISHED")
    assert (train.info.run_name, train.info.status, train.data.params) == ("train", "RUNNING", {})
    assert train.data.tags["closedloop.lineage_key"] == "k"

    retried = run(f"kill_train_once:{marker}")  # the marker is there: struck once already
    assert retried.returncode == 0, retried.stderr[-3000:]
    assert runs()[-1].info.status == "FINISHED" and runs()[-1].data.params == {"logged": "1"}

    refused = run("kill_train_tree:a-run", AIRFLOW_CTX_DAG_RUN_ID="a-run")  # its parent is no Airflow worker
    assert refused.returncode == 1 and "refuses to strike" in refused.stderr, refused.stderr[-3000:]
    assert runs()[-1].info.status == "FAILED"


# -- the MLflow server dies during registration ------------------------------------------------------
class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with its own SQLite store, killed with SIGKILL on demand."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> None:
        import httpx

        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        with open(self.root / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not up after {timeout} s")

    def kill(self) -> None:
        """SIGKILL the server's whole process group (uvicorn and its job runner) and wait for the port to close."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc = None
        deadline = time.monotonic() + 30
        while _answers(self.port) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow-server", _free_port())
    server.start()
    yield server
    server.kill()


def _log_tiny_model(rt) -> dict:
    """A trained run as ``train_model`` hands it on: a two-tree booster logged to the server."""
    import mlflow
    import numpy as np
    import xgboost as xgb

    from closedloop.stages.registry import ensure_experiment

    exp_id = ensure_experiment(rt.client, rt.settings, rt.settings.config.typed.model.experiment)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3))
    booster = xgb.train({"objective": "binary:logistic", "nthread": 1}, xgb.DMatrix(x, label=x[:, 0] > 0), 2)
    key = "fault-test-lineage"
    with mlflow.start_run(experiment_id=exp_id, tags={"closedloop.lineage_key": key, "closedloop.device": "cpu",
                                                      "closedloop.dag_run_id": "fault-test"}) as run:
        info = mlflow.xgboost.log_model(booster, name="model", pip_requirements=["xgboost"])
    return {"run_id": run.info.run_id, "model_uri": info.model_uri, "lineage_key": key, "threshold": 0.5,
            "device": "cpu"}


@pytest.mark.integration
def test_mlflow_server_dying_during_registration(home, monkeypatch, mlflow_server, caplog, reliability):
    from closedloop.stages.registry import CHAMPION, alias_version
    from closedloop.stages.runtime import Runtime

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    rt = Runtime.from_env()
    assert rt.client.tracking_uri == mlflow_server.uri
    trained = _log_tiny_model(rt)
    window = Window(date(2026, 1, 1), date(2026, 1, 8))

    # the server dies in the middle of the registration: the model exists, the version is being created
    real_create = rt.client.create_model_version

    def die_then_create(*args, **kwargs):
        mlflow_server.kill()
        return real_create(*args, **kwargs)

    caplog.set_level(logging.WARNING, logger="urllib3")
    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp, pytest.raises(TransientError) as failed:
        mp.setattr(rt.client, "create_model_version", die_then_create)
        stages.register(rt, trained, window)
    assert time.monotonic() - started < 60  # MLflow's retries with backoff, bounded: seconds, not minutes
    assert mlflow_server.uri in str(failed.value) and "did not answer" in str(failed.value)
    assert sum("Retrying" in r.getMessage() for r in caplog.records) >= 2  # retried with backoff first

    # while it is down, the task's retry fails the same clear way, at its first call
    with pytest.raises(TransientError, match=re.escape(f"the MLflow server at {mlflow_server.uri} did not answer")):
        stages.register(rt, trained, window)

    # back up: nothing was half-done, and the re-run registers exactly one version
    mlflow_server.start()
    assert rt.client.search_model_versions(f"name = '{rt.model_name}'") == []
    assert alias_version(rt.client, rt.model_name, CHAMPION) is None
    first = stages.register(rt, trained, window)
    again = stages.register(rt, trained, window)
    assert (first["version"], first["created"]) == ("1", True)
    assert (again["version"], again["created"]) == ("1", False)
    versions = rt.client.search_model_versions(f"name = '{rt.model_name}'")
    assert [v.version for v in versions] == ["1"]
    assert versions[0].tags["closedloop.lineage_key"] == trained["lineage_key"]
    assert alias_version(rt.client, rt.model_name, CHAMPION) is None  # registering never moves an alias
    reliability.record(
        "fault", "MLflow server SIGKILLed during registration (between model lookup and version creation), "
        "then down for the retry",
        "MLflow HTTP retries with backoff, then TransientError naming the tracking URI, in seconds; no version, "
        "no alias; after restart the re-run registered exactly 1 version and a second re-run found it")


# -- Feast materialisation interrupted, or run out of order -----------------------------------------
START = date(2026, 5, 1)
WINDOW = Window(START + timedelta(days=4), START + timedelta(days=10))

_KILLED_MATERIALISATION = """
import os, signal, sys
from feast.infra.online_stores.sqlite import SqliteOnlineStore
from closedloop.stages import retraining as stages
from closedloop.core.runconf import Window, parse_day
from closedloop.stages.runtime import Runtime

real = SqliteOnlineStore.online_write_batch
def write_then_die(self, *args, **kwargs):
    real(self, *args, **kwargs)          # the first batch is committed ...
    os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies before the next
SqliteOnlineStore.online_write_batch = write_then_die
rt = Runtime.from_env()
rt.store.config.materialization_config.online_write_batch_size = 50  # several batches, to die between them
stages.materialise(rt, Window(parse_day(sys.argv[1]), parse_day(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def feast_home(generated_home):
    """A home with ten generated days, the window validated, and a clean materialisation of it."""
    from closedloop.devtools.generate import GeneratorConfig

    config = GeneratorConfig(start=START, days=10, customers=300, transactions_per_day=300, seed=13)
    with generated_home("faults-feast", config) as rt:
        stages.validate(rt, WINDOW)
        stages.materialise(rt, WINDOW)
        yield rt, _online_rows(rt)


def _online_rows(rt) -> list[tuple]:
    """Every row of the SQLite online store: entity key, feature, value, event time (sorted)."""
    with contextlib.closing(sqlite3.connect(rt.settings.feast_dir / "online_store.db")) as db:
        table = f"closedloop_{rt.contract.feature_view}"
        return sorted(db.execute(f"select entity_key, feature_name, value, event_ts from {table}").fetchall())


def _wipe_online(rt) -> None:
    with contextlib.closing(sqlite3.connect(rt.settings.feast_dir / "online_store.db")) as db, db:
        db.execute(f"delete from closedloop_{rt.contract.feature_view}")


@pytest.mark.integration
def test_an_interrupted_materialisation_rerun_equals_a_clean_one(feast_home, reliability):
    rt, clean = feast_home
    entities = {r[0] for r in clean}
    assert len(entities) > 100

    _wipe_online(rt)
    out = subprocess.run([sys.executable, "-c", _KILLED_MATERIALISATION, WINDOW.start.isoformat(),
                          WINDOW.end.isoformat()], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "CLOSEDLOOP_HOME": str(rt.settings.home)})
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    partial = {r[0] for r in _online_rows(rt)}
    assert 0 < len(partial) < len(entities)  # killed half-way: some entities written, not all

    stages.materialise(rt, WINDOW)  # the task's retry: the whole window again
    assert _online_rows(rt) == clean
    reliability.record(
        "fault", "Feast materialisation SIGKILLed after its first online-store batch, then re-run for the window",
        "the killed run left part of the entities in the online store; the re-run made every online feature of "
        "every entity identical to a clean run's")


@pytest.mark.integration
def test_an_older_window_materialised_late_does_not_take_features_back_in_time(feast_home, reliability):
    rt, clean = feast_home
    newer = Window(WINDOW.end - timedelta(days=3), WINDOW.end)
    older = Window(WINDOW.start, WINDOW.start + timedelta(days=2))
    _wipe_online(rt)
    stages.materialise(rt, newer)
    after_newer = dict(((r[0], r[1]), r) for r in _online_rows(rt))

    done = stages.materialise(rt, older)  # a backfill, or an old window retrained, after the newer days
    assert done["end"] == f"{WINDOW.end.isoformat()}T00:00:00+00:00"  # extended to what was already there
    rows = _online_rows(rt)
    assert all(after_newer[(r[0], r[1])] == r for r in rows if (r[0], r[1]) in after_newer)
    assert rows == clean  # every entity holds its newest features, as after one clean run of the whole window
    reliability.record(
        "fault", "an older window materialised after newer days (backfill, old window retrained)",
        "the materialisation was extended to the newest materialised day: no entity's online features went back "
        "in time; the online store equals a clean run of the whole window")


# -- monitoring while a retraining is queued or running ------------------------------------------------
@pytest.mark.parametrize("active", [1, 2])
def test_monitoring_does_not_pile_up_triggers_while_a_retraining_is_active(runtime, active, reliability):
    from closedloop.stages.drift import trigger_run_id
    from closedloop.stages.monitoring import EXPERIMENT, decide_retraining
    from closedloop.stages.registry import ensure_experiment

    rt = runtime
    window = Window(date(2026, 6, 10), date(2026, 6, 12))
    exp_id = ensure_experiment(rt.client, rt.settings, EXPERIMENT)
    confirm = rt.settings.config.monitoring.confirm_windows
    runs = {}
    for k in range(confirm):  # this window and the ones before it drifted: a confirmed regime
        w = Window(window.start - timedelta(days=k), window.end - timedelta(days=k))
        runs[k] = rt.client.create_run(exp_id, tags={"closedloop.window": str(w), "closedloop.drift": "true"})
    measured = {"window": window.to_dict(), "report": {"html": "file:///reports/report.html"},
                "decision": {"judged": True, "drift": True, "reasons": ["drift share 0.6 >= 0.3"]},
                "figures": {"drift_share": 0.6}}

    refused = decide_retraining(rt, measured, active_retrainings=active, monitoring_run_id="monitoring-1")
    assert refused["retrain"] is False
    assert f"{active} retraining run(s) queued or running" in refused["why"]
    assert "closedloop.triggered_run_id" not in rt.client.get_run(runs[0].info.run_id).data.tags

    # the same window once nothing is active: it would start one, so the refusal above was the active run's
    started = decide_retraining(rt, measured, active_retrainings=0, monitoring_run_id="monitoring-2")
    assert started["retrain"] is True and started["run_id"] == trigger_run_id(window.start, window.end)
    reliability.record(
        "fault", "drift confirmed while a retraining is queued or running",
        "monitoring refused to trigger another retraining and said why; with none active it would trigger one")
