"""``make airflow`` as docs/getting-started.md says it, from a fresh home: the Makefile target itself, in the
background.

No Airflow variable of the test session reaches it (no ``AIRFLOW_HOME``, no ``AIRFLOW__*``) and the venv is not
on the PATH: what a new clone has. The home gets a small generated data set first (``closedloop generate``, as a
user would), then ``make airflow AIRFLOW_PORT=<free port>`` runs in its own process group; the test waits on the
health endpoint, logs in with headless Chromium (Debian's ``chromium``; ``make browser`` installs it) with the
password the target printed, triggers ``ingest`` from the trigger form with a day, and sees the run succeed (every
task process of the standalone stack must share the home's JWT secret for that). The process group is stopped at
the end (SIGINT, SIGTERM, SIGKILL) and nothing is left on the port.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support.services import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DAY = "2026-03-02"


def _chromium() -> str:
    import shutil

    path = shutil.which("chromium")
    if path is None:
        msg = "chromium is not on the PATH: `make browser` installs Debian's package (the test skips without it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _user_env(home: Path) -> dict[str, str]:
    """The environment of a user's shell: no Airflow settings of this session, the venv not on the PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and not k.startswith("CLOSEDLOOP_")}
    venv = str(REPO / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p.rstrip("/") != venv)
    env["CLOSEDLOOP_HOME"] = str(home)
    env["CLOSEDLOOP_DEVICE"] = "cpu"
    return env


def _stop_group(proc: subprocess.Popen, grace: float = 5) -> None:
    """Ctrl-C (SIGINT to the whole group, as a terminal sends it), then SIGTERM, then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.3)
        if not _group_alive(proc.pid):
            break
    proc.wait(timeout=10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies still count as members: only live processes matter
    out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True, check=False)
    return any(s and not s.startswith("Z") for s in out.stdout.split())


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"`make airflow` exited ({proc.returncode}) while waiting for {what}:\n"
                        + log.read_text(errors="replace")[-4000:])
        if predicate():
            return
        time.sleep(1)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n" + log.read_text(errors="replace")[-4000:])


def test_make_airflow_serves_the_ui_and_a_run_triggered_from_the_form_succeeds(tmp_path):
    import httpx
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    home = tmp_path / "home"
    env = _user_env(home)
    subprocess.run([str(REPO / ".venv" / "bin" / "closedloop"), "generate", "--start", "2026-03-01", "--days", "3",
                    "--customers", "200", "--transactions-per-day", "300"], env=env, cwd=REPO, check=True,
                   capture_output=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "make-airflow.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["make", "airflow", f"AIRFLOW_PORT={port}"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def healthy() -> bool:
            try:
                r = httpx.get(f"{url}/api/v2/monitor/health", timeout=2)
                body = r.json()
                return r.status_code == 200 and all(body[c]["status"] == "healthy"
                                                    for c in ("metadatabase", "scheduler", "triggerer"))
            except (httpx.HTTPError, KeyError, ValueError, TypeError):
                return False

        _wait(healthy, 240, "the health endpoint", proc, log)
        printed = re.search(r"Airflow login: user (\S+), password (\S+)", log.read_text())
        assert printed, log.read_text()[-2000:]
        user, password = printed.groups()
        assert f"Airflow UI: http://localhost:{port}" in log.read_text()
        token = httpx.post(f"{url}/auth/token", json={"username": user, "password": password},
                           timeout=10).json()["access_token"]
        api = httpx.Client(base_url=f"{url}/api/v2", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        _wait(lambda: api.get("/dags/ingest").status_code == 200, 180, "the ingest DAG to be parsed", proc, log)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless=new"])
            page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
            page.set_default_timeout(30_000)
            try:
                page.goto(f"{url}/dags/ingest")
                page.wait_for_url(lambda u: "/auth/login" in u)
                page.locator("input[name=username]").fill(user)
                page.locator("input[name=password]").fill(password)
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_url(lambda u: "/auth/login" not in u)
                page.get_by_role("button", name="Trigger Dag").click()
                form = page.get_by_role("dialog")
                form.locator("input#element_day").fill(DAY)
                form.get_by_role("button", name="Trigger", exact=True).click()
                page.wait_for_url(lambda u: "/dags/ingest/runs/" in u)
                run_id = page.url.split("/dags/ingest/runs/", 1)[1].split("/")[0]
                from urllib.parse import unquote

                run_id = unquote(run_id)
                run: dict = {}

                def finished() -> bool:
                    run.update(api.get(f"/dags/ingest/dagRuns/{run_id}").json())
                    return run.get("state") in {"success", "failed"}

                _wait(finished, 300, f"the ingest run {run_id}", proc, log)
                tasks = api.get(f"/dags/ingest/dagRuns/{run_id}/taskInstances").json()["task_instances"]
                states = {t["task_id"]: t["state"] for t in tasks}
                assert run["state"] == "success", (states, log.read_text(errors="replace")[-3000:])
                assert run["conf"] == {"day": DAY} and run["triggered_by"] == "ui"
                assert states == {"validate_partitions": "success", "materialise_features": "success"}
                page.reload()
                page.get_by_text("Success").first.wait_for()
            finally:
                browser.close()
    finally:
        _stop_group(proc)
    assert not _listening(port), f"something still serves port {port} after `make airflow` was stopped"
    secret = home / "airflow" / "jwt_secret"
    assert oct(secret.stat().st_mode & 0o777) == "0o600" and len(secret.read_text().strip()) >= 32
