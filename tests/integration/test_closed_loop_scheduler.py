"""End to end with the real scheduler: drift causes a retraining run, started by the scheduler, that
completes and promotes.

The whole stack (scheduler, dag-processor, triggerer, API server) runs on its own Airflow home and
database, on small data; days are driven by triggers with explicit dates, and every wait polls run
states with a bounded timeout (no fixed sleeps).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_drift_starts_a_retraining_that_promotes(tmp_path, monkeypatch):
    from closedloop.devtools.airflow_home import airflow_home, write_config
    from closedloop.devtools.demo import DemoPlan, run_demo
    from closedloop.stages.runtime import Runtime

    home = tmp_path / "closedloop"
    monkeypatch.setenv("CLOSEDLOOP_HOME", str(home))
    rt = Runtime.from_env()
    af_home = airflow_home(rt.settings)
    write_config(rt.settings, parallelism=2)
    # this test's own Airflow: its own home and database, not the session's (dag.test runs live there)
    for var in [v for v in os.environ if v.startswith("AIRFLOW__")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AIRFLOW_HOME", str(af_home))
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                   capture_output=True, timeout=300, env=os.environ.copy())

    lines: list[str] = []
    # small data; a higher fraud rate so that a one-day holdout has enough positives for the gate to judge
    # 12 history days: the first champion's window holds the 11 daily chunks its calibrated thresholds need
    plan = DemoPlan(warmup_days=7, history_days=12, normal_days=1, drift_days=2, customers=400,
                    transactions_per_day=1200, fraud_rate=0.03)
    port = _free_port()
    summary = run_demo(rt, plan, port=port, say=lines.append, timeout=600)
    text = "\n".join(lines)

    assert summary["champion_before"] == "1", text
    assert summary["champion_after"] != summary["champion_before"], text
    drift_runs = [r for r in summary["runs"] if r["dag_id"] == "retraining" and r["run_id"].startswith("drift__")]
    assert drift_runs and drift_runs[-1]["state"] == "success", text
    assert all(r["state"] == "success" for r in summary["runs"]), text
    normal = [m for m in summary["monitoring"] if m["window"].endswith(plan.drift_start.isoformat())]
    assert normal and normal[0]["drift"] == "false", text  # the window of normal days only

    champ = rt.client.get_model_version(rt.model_name, summary["champion_after"])
    assert champ.tags["closedloop.trigger_dag_id"] == "drift_monitoring"
    assert champ.tags["closedloop.trigger_report_uri"].endswith("report.html")
    assert champ.tags["closedloop.trigger_reason"].startswith("drift")
    # stopped cleanly: nothing of this stack still serves its port
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
