"""The embedded Airflow stack in the background: scheduler, dag-processor, triggerer and API server.

Used by the closed-loop demo and its end-to-end test: only a scheduler runs what spans DAGs (Asset
events, a triggered run). Each component runs in its own process group and is stopped as a group
(SIGINT, then SIGTERM, then SIGKILL), so nothing is left serving the port. Runs are started and
watched through Airflow's REST API with the simple auth manager's token flow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from closedloop.core.errors import TransientError

log = logging.getLogger(__name__)

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
FINISHED = {"success", "failed"}


@dataclass
class AirflowStack:
    """Airflow's components started from ``airflow_home`` with ``env``; use as a context manager."""

    airflow_home: Path
    env: dict[str, str]
    port: int = 8080
    user: str = "admin"
    components: tuple[str, ...] = COMPONENTS  # ("api-server",) serves the UI and the API on runs already made
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _token: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> AirflowStack:
        """Start every component and wait until the API answers healthy."""
        airflow = str(Path(sys.executable).parent / "airflow")
        logs = self.airflow_home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "AIRFLOW_HOME": str(self.airflow_home),
               "AIRFLOW__API__PORT": str(self.port), "AIRFLOW__API__BASE_URL": self.url,
               "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/"}
        for name in self.components:
            out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the process's life
            cmd = [airflow, name] + (["--host", "127.0.0.1", "--port", str(self.port)] if name == "api-server" else [])
            self.procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        self.wait(self.healthy, timeout, "the Airflow API to answer healthy")
        return self

    def stop(self, timeout: float = 30) -> None:
        """Stop every component's whole process group: SIGINT, then SIGTERM, then SIGKILL."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in self.procs.values() if p.poll() is None]
            if not alive:
                break
            for p in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
            deadline = time.monotonic() + timeout / 3
            while time.monotonic() < deadline and any(p.poll() is None for p in alive):
                time.sleep(0.2)
        for p in self.procs.values():  # children that outlived their parent in the group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
        self.procs.clear()

    def __enter__(self) -> AirflowStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- API ---------------------------------------------------------------------------------------
    def healthy(self) -> bool:
        import httpx

        dead = [n for n, p in self.procs.items() if p.poll() is not None]
        if dead:
            raise TransientError(f"Airflow component(s) {dead} exited; see {self.airflow_home / 'logs'}")
        try:
            r = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=2)
            return r.status_code == 200 and r.json()["metadatabase"]["status"] == "healthy"
        except (httpx.HTTPError, KeyError, ValueError):
            return False

    def password(self) -> str:
        """The generated password of the admin user (simple auth manager)."""
        path = self.airflow_home / "simple_auth_manager_passwords.json.generated"
        return json.loads(path.read_text())[self.user]

    def token(self) -> str:
        import httpx

        if self._token is None:
            r = httpx.post(f"{self.url}/auth/token", json={"username": self.user, "password": self.password()},
                           timeout=10)
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        r = httpx.request(method, f"{self.url}/api/v2{path}", headers={"Authorization": f"Bearer {self.token()}"},
                          timeout=30, **kwargs)
        if r.status_code >= 400:
            raise TransientError(f"{method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str | None = None) -> str:
        body: dict[str, Any] = {"logical_date": None, "conf": conf}
        if run_id:
            body["dag_run_id"] = run_id
        return self.api("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100, "order_by": "run_after"})["dag_runs"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        tis = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {t["task_id"]: t["state"] for t in tis}

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str, every: float = 1.0) -> None:
        """Poll ``predicate`` until it holds; TransientError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(every)
        raise TransientError(f"timed out after {timeout:.0f} s waiting for {what}")

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 600) -> dict[str, Any]:
        """Wait for one run to finish; returns it."""
        found: dict[str, Any] = {}

        def done() -> bool:
            run = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            found.update(run)
            return run["state"] in FINISHED

        self.wait(done, timeout, f"{dag_id} run {run_id}")
        return found

    def wait_idle(self, dag_ids: list[str], timeout: float = 600, settle: float = 6.0) -> None:
        """Wait until no run of ``dag_ids`` is queued or running, and none appeared for ``settle`` seconds."""
        quiet_since: list[float] = []

        def idle() -> bool:
            busy = any(r["state"] not in FINISHED for d in dag_ids for r in self.runs(d))
            if busy:
                quiet_since.clear()
                return False
            if not quiet_since:
                quiet_since.append(time.monotonic())
            return time.monotonic() - quiet_since[0] >= settle

        self.wait(idle, timeout, f"{', '.join(dag_ids)} to be idle", every=1.5)
