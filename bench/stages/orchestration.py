"""Orchestration: what the real Airflow scheduler adds between tasks and between DAGs (run once, not per size).

On a fresh copy of the world (``airflow_env.fresh_copy``) with its own Airflow home under
``.bench/orchestration/`` (the project's embedded configuration: SQLite, LocalExecutor, parallelism 2), the
project's stack (``closedloop.devtools.stack.AirflowStack``: API server, scheduler, dag-processor; no triggerer, as
nothing here defers) runs the closed loop once, from one trigger:

    ingest (the world's last day) --Asset--> batch_scoring --Asset--> drift_monitoring --trigger--> retraining

Quick mode (CI: it only has to work, fast) starts the chain at drift_monitoring, triggered for the last day,
the window's predictions written beforehand by the project's scoring in this process while the stack starts,
and stops once the triggered retraining's first task has started.

The copy's configuration differs from the world's in the drift policy only (drift at any share, one window
confirms, no cooldown, a window judged from 100 rows, a retraining on the world's days), so that the decision
is always "retrain": the decision's outcome is not what is measured, the hand-off is.

Figures, from the task instances' start and end dates in Airflow's database (the floor is 0 by
definition, printed ``-``):
- ``task end -> next start (median|max)``: for each task with upstreams, its start minus the last end of its
  upstream tasks, within the runs of ingest, drift_monitoring and (full sizes) retraining; median and max.
- ``drift decision -> retraining start``: the end of ``decide_retraining`` to the start of the triggered
  retraining run's first task.
- ``asset <DAG> -> <DAG>``: the end of the task that emits an Asset to the start of the
  first task of the DAG it schedules (ingest -> batch_scoring, batch_scoring -> drift_monitoring).
In quick mode the hand-offs are drift_monitoring's only, and there are no Asset lines; full sizes wait for
the retraining run to succeed and add its start-to-end time as a line of its own. Peak memory: the whole stack's
process tree (this process, every Airflow component and task process), summed.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import statistics
import threading
import warnings
from pathlib import Path
from typing import Any

import airflow_env
from common import CONFIG, Result, World

from closedloop.devtools.demo import _has_dag  # the demo's own check that the DAGs are parsed

STAGE = "orchestration"
DAGS = ("ingest", "batch_scoring", "drift_monitoring", "retraining")
# the drift policy of the copy: every judged window is drift, confirmed, out of any cooldown. The fixed rules
# (calibration off): with the champion's calibrated thresholds a quiet world's window is no drift, and the chain
# stopped at decide_retraining (the stage then waited out its hour for a retraining that never came)
POLICY = {"drift_share_threshold": 0.0, "confirm_windows": 1, "cooldown_hours": 0, "min_rows": 100,
          "calibration": {"enabled": False}}


def run(w: World, quick: bool) -> list[Result]:
    w.champion()
    home = airflow_env.fresh_copy(w, STAGE)
    config = _config(home.parent, w)
    env = airflow_env.airflow_env(home, config, CLOSEDLOOP_SCHEDULES="manual",
                                  AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32))
    af_home = airflow_env.prepare_airflow(home, env, parallelism=2)
    for var in [v for v in os.environ if v.startswith("AIRFLOW__")]:
        del os.environ[var]  # the stack's processes start from this environment plus ``env``
    day = w.days[-1]
    timeout = 600 if quick else 3600
    prescored: list[BaseException] = []
    scorer = threading.Thread(target=_prescore, args=(home, config, w.days[-2:], prescored))
    if quick:  # the chain starts at drift_monitoring: its window's predictions are written here meanwhile
        scorer.start()

    from closedloop.devtools.stack import AirflowStack

    signal.signal(signal.SIGTERM, _exit)  # a terminated stage still stops the stack (the context manager)
    stack = AirflowStack(af_home, env, port=_free_port(), components=("api-server", "scheduler", "dag-processor"))
    with airflow_env.TreePeak(os.getpid(), interval=0.2) as peak, stack:
        dags = ("drift_monitoring", "retraining") if quick else DAGS
        stack.wait(lambda: all(_has_dag(stack, d) for d in dags), 300, "the DAGs to be parsed")
        if quick:
            scorer.join()
            if prescored:
                raise prescored[0]
            stack.trigger("drift_monitoring", {"day": day.isoformat()}, run_id="bench_drift")
        else:
            stack.trigger("ingest", {"day": day.isoformat()}, run_id="bench_ingest")
        retraining = _wait_retraining(stack, timeout, finish=not quick)
        stack.stop(timeout=9 if quick else 30)  # quick: the retraining's first task is cut short, no need to wait
    return _results(w, af_home, retraining, peak.peak_mib, quick)


def _prescore(home: Path, config: Path, days: list[Any], errors: list[BaseException]) -> None:
    """Quick mode: the predictions of ``days`` in the copy, through the project's scoring (not timed)."""
    try:
        os.environ.update({"CLOSEDLOOP_HOME": str(home), "CLOSEDLOOP_CONFIG": str(config)})
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from closedloop.stages import scoring
        from closedloop.stages.runtime import Runtime

        rt = Runtime.from_env()
        for d in days:
            scoring.score_day(rt, d)
    except BaseException as exc:  # raised in the main thread
        errors.append(exc)


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _config(root: Path, w: World) -> Path:
    """The bench configuration with :data:`POLICY` and a retraining window of the world's days."""
    import yaml

    raw = yaml.safe_load(CONFIG.read_text())
    raw["dataset"]["schema"] = str((CONFIG.parent / raw["dataset"]["schema"]).resolve())
    raw["monitoring"] = {**raw["monitoring"], **POLICY, "retrain_window_days": w.n_days}
    path = root / "closedloop.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _wait_retraining(stack: Any, timeout: float, finish: bool) -> dict[str, Any]:
    """The drift-triggered retraining run once its first task started (``finish``: once it succeeded)."""
    found: dict[str, Any] = {}

    def ready() -> bool:
        for dag_id in DAGS:
            failed = [r["dag_run_id"] for r in stack.runs(dag_id) if r["state"] == "failed"]
            if failed:
                raise RuntimeError(f"{dag_id} run(s) {failed} failed; see {stack.airflow_home / 'logs'}")
        runs = stack.runs("retraining")
        if not runs:
            return False
        found.update(runs[-1])
        if finish:
            return found["state"] == "success"
        tis = stack.api("GET", f"/dags/retraining/dagRuns/{found['dag_run_id']}/taskInstances")["task_instances"]
        return any(t["start_date"] for t in tis)

    stack.wait(ready, timeout, "the drift-triggered retraining run" + (" to succeed" if finish else " to start"))
    return found


def _results(w: World, af_home: Path, retraining: dict[str, Any], peak: float, quick: bool) -> list[Result]:
    tis = airflow_env.task_runs(af_home)
    by_dag: dict[str, list[airflow_env.TaskRun]] = {}
    for t in tis:
        by_dag.setdefault(t.dag_id, []).append(t)
    retrain_run = retraining["dag_run_id"]
    pairs: list[tuple[str, float]] = []
    measured = ["drift_monitoring", "retraining"] if not quick else ["drift_monitoring"]
    if not quick:
        measured.insert(0, "ingest")
    for dag_id in measured:
        runs = [t for t in by_dag.get(dag_id, []) if dag_id != "retraining" or t.run_id == retrain_run]
        ups = airflow_env.upstreams(af_home, dag_id)
        pairs += [(f"{dag_id}: {name}", s) for name, s in airflow_env.handoffs(runs, ups)]
    if not pairs:
        raise RuntimeError(f"no task hand-offs found in {af_home / 'airflow.db'}")

    def task(dag_id: str, task_id: str, run_id: str | None = None) -> airflow_env.TaskRun:
        hits = [t for t in by_dag.get(dag_id, []) if t.task_id == task_id and (run_id is None or t.run_id == run_id)]
        if not hits or (hits[-1].start is None):
            raise RuntimeError(f"{dag_id}.{task_id} has no recorded start in {af_home / 'airflow.db'}")
        return hits[-1]

    first = min((t for t in by_dag["retraining"] if t.run_id == retrain_run and t.start), key=lambda t: t.start)
    decided = task("drift_monitoring", "decide_retraining")
    assets = [] if quick else [
        ("ingest -> batch_scoring", task("ingest", "materialise_features"), task("batch_scoring", "score_day")),
        ("scoring -> drift_monitoring", task("batch_scoring", "score_day"),
         task("drift_monitoring", "measure_drift")),
    ]
    seconds = [s for _, s in pairs]
    worst = max(pairs, key=lambda p: p[1])
    where = ", ".join(measured)
    rows = w.rows

    def line(case: str, figure: float, notes: str) -> Result:
        return Result(STAGE, case, rows, figure, None, peak, None, None, notes=notes)

    out = [
        line("task end -> next start (median)", statistics.median(seconds),
             f"median of {len(seconds)} hand-offs in the runs of {where}; floor 0; real scheduler, LocalExecutor, "
             f"parallelism 2, SQLite; peak = whole stack"),
        line("task end -> next start (max)", worst[1], f"max: {worst[0]}; floor 0"),
        line("drift decision -> retraining start", (first.start - decided.end).total_seconds(),
             f"decide_retraining end -> {first.task_id} start of {retrain_run}; floor 0"),
    ]
    for name, before, after in assets:
        out.append(line(f"asset {name}", (after.start - before.end).total_seconds(),
                        f"{before.task_id} end -> {after.task_id} start; floor 0"))
    if not quick:
        out.append(line("retraining run (scheduler)", _seconds(retraining),
                        f"the triggered run {retrain_run}, start to end (for end_to_end's dags test figure)"))
    return out


def _seconds(run: dict[str, Any]) -> float:
    start, end = airflow_env._when(run.get("start_date")), airflow_env._when(run.get("end_date"))
    return (end - start).total_seconds() if start and end else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
