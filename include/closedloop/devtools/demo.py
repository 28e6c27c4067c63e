"""The closed-loop demo: the whole loop on the embedded defaults, driven by the real Airflow scheduler.

1. History (30 days, about 210k transactions, after a 14-day warm-up that gives every customer a
   past): ``retraining`` validates and ingests it and promotes the first champion.
2. Normal days: each is ingested; the scheduler runs ``batch_scoring`` and ``drift_monitoring`` on
   the Asset events, which find no drift and retrain nothing.
3. A new regime (covariate and concept drift): monitoring detects it and starts ``retraining`` by
   itself; the candidate trains on data that includes the new regime, is judged on its last day,
   beats the stale champion there and is promoted.
4. A summary: each DAG run with its state and duration, the champion before and after, the drift
   figures and report paths, and how to open the UI.

Simulated days are driven with explicit dates (triggers with ``{"day": ...}``), never by waiting on
the clock: the stack runs with ``CLOSEDLOOP_SCHEDULES=manual``.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from closedloop.devtools.airflow_home import airflow_home
from closedloop.devtools.generate import GeneratorConfig, generate
from closedloop.devtools.stack import AirflowStack
from closedloop.stages.monitoring import EXPERIMENT
from closedloop.stages.registry import CHAMPION, alias_version, status
from closedloop.stages.runtime import Runtime

log = logging.getLogger(__name__)

DAGS = ["ingest", "batch_scoring", "drift_monitoring", "retraining"]


@dataclass(frozen=True)
class DemoPlan:
    start: date = date(2026, 2, 1)
    warmup_days: int = 14
    history_days: int = 30
    normal_days: int = 2
    drift_days: int = 3
    customers: int = 3500
    transactions_per_day: int = 7000
    seed: int = 42
    fraud_rate: float = 0.01
    covariate_drift: float = 0.6
    concept_drift: float = 1.0

    @property
    def history_start(self) -> date:
        """The first day of the first champion's training window: the warm-up feeds its customer features."""
        return self.start + timedelta(days=self.warmup_days)

    @property
    def drift_start(self) -> date:
        return self.history_start + timedelta(days=self.history_days + self.normal_days)

    @property
    def days(self) -> int:
        return self.warmup_days + self.history_days + self.normal_days + self.drift_days


def _duration(run: dict[str, Any]) -> float | None:
    if not run.get("start_date") or not run.get("end_date"):
        return None
    fmt = datetime.fromisoformat
    return (fmt(run["end_date"].replace("Z", "+00:00")) - fmt(run["start_date"].replace("Z", "+00:00"))).total_seconds()


def run_demo(rt: Runtime, plan: DemoPlan, *, port: int = 8080, say: Callable[[str], None] = print,
             timeout: float = 900) -> dict[str, Any]:
    """Run the story of the module docstring; returns the summary it prints."""
    t0 = time.monotonic()
    say(f"[{0:5.0f}s] generating {plan.days} days from {plan.start} ({plan.transactions_per_day}/day, "
        f"new regime from {plan.drift_start})")
    generate(GeneratorConfig(start=plan.start, days=plan.days, customers=plan.customers,
                             transactions_per_day=plan.transactions_per_day, seed=plan.seed,
                             fraud_rate=plan.fraud_rate,
                             covariate_drift=plan.covariate_drift, concept_drift=plan.concept_drift,
                             new_categories=True, drift_start=plan.drift_start), rt.lake, rt.contract)
    env = {"CLOSEDLOOP_HOME": str(rt.settings.home), "CLOSEDLOOP_SCHEDULES": "manual",
           "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False", "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
           "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2", "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10"}

    def stamp(msg: str) -> None:
        say(f"[{time.monotonic() - t0:5.0f}s] {msg}")

    stack = AirflowStack(airflow_home(rt.settings), env, port=port)
    stamp("starting the Airflow scheduler, dag-processor, triggerer and API server")
    with stack:
        stack.wait(lambda: all(_has_dag(stack, d) for d in DAGS), 180, "the DAGs to be parsed")
        stamp(f"Airflow is up at {stack.url}")

        end = plan.history_start + timedelta(days=plan.history_days)
        run_id = stack.trigger("retraining", {"window_start": plan.history_start.isoformat(),
                                              "window_end": end.isoformat(),
                                              "reason": "demo: first champion from the history"})
        run = stack.wait_run("retraining", run_id, timeout)
        stamp(f"retraining on the history {plan.history_start}..{end}: {run['state']}")
        champion_before = alias_version(rt.client, rt.model_name, CHAMPION)
        stamp(f"champion: version {champion_before}")

        for i in range(plan.normal_days + plan.drift_days):
            day = end + timedelta(days=i)
            label = "normal day" if day < plan.drift_start else "new regime"
            stack.trigger("ingest", {"day": day.isoformat()})
            stack.wait_idle(DAGS, timeout)
            stamp(f"{day} ({label}): {_last_decision(rt, EXPERIMENT)}")
        champion_after = alias_version(rt.client, rt.model_name, CHAMPION)
        runs = {d: stack.runs(d) for d in DAGS}
    summary = {
        "seconds": round(time.monotonic() - t0, 1),
        "champion_before": champion_before, "champion_after": champion_after,
        "runs": [{"dag_id": d, "run_id": r["dag_run_id"], "state": r["state"], "seconds": _duration(r),
                  "type": r.get("run_type")} for d in DAGS for r in runs[d]],
        "monitoring": _monitoring_rows(rt, EXPERIMENT),
        "status": status(rt.client, rt.settings, rt.model_name),
    }
    _print_summary(summary, say, stack)
    return summary


def _has_dag(stack: Any, dag_id: str) -> bool:
    try:
        stack.api("GET", f"/dags/{dag_id}")
        return True
    except Exception:
        return False


def _monitoring_rows(rt: Runtime, experiment: str) -> list[dict[str, Any]]:
    exp = rt.client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    rows = []
    for r in rt.client.search_runs([exp.experiment_id], order_by=["tags.`closedloop.window` ASC"]):
        t = r.data.tags
        rows.append({"window": t.get("closedloop.window"), "drift": t.get("closedloop.drift"),
                     "drift_share": r.data.metrics.get("drift_share"), "champion": t.get("closedloop.champion_version"),
                     "triggered": t.get("closedloop.triggered_run_id"), "report": t.get("closedloop.report_html"),
                     "reasons": t.get("closedloop.reasons")})
    return rows


def _last_decision(rt: Runtime, experiment: str) -> str:
    rows = _monitoring_rows(rt, experiment)
    if not rows:
        return "no monitoring run"
    r = rows[-1]
    share = f"{r['drift_share']:.2f}" if r["drift_share"] is not None else "?"
    trig = f", started retraining {r['triggered']}" if r["triggered"] else ""
    return f"monitoring {r['window']}: drift={r['drift']} (share {share}){trig}"


def _print_summary(summary: dict[str, Any], say: Callable[[str], None], stack: Any) -> None:
    say("")
    say("== DAG runs ==")
    for r in summary["runs"]:
        secs = f"{r['seconds']:.0f} s" if r["seconds"] is not None else "-"
        say(f"  {r['dag_id']:<17} {r['state'] or '-':<8} {secs:>6}  {r['run_id']}")
    say("== drift monitoring ==")
    for m in summary["monitoring"]:
        say(f"  {m['window']}  drift={m['drift']:<5}  share={m['drift_share'] or 0:.2f}  "
            f"champion v{m['champion']}  {('-> ' + m['triggered']) if m['triggered'] else ''}")
        say(f"      report: {m['report']}")
    say(f"== champion: version {summary['champion_before']} -> version {summary['champion_after']} ==")
    for h in summary["status"]["history"]:
        say(f"  {h['at']}  v{h['from_version'] or '-'} -> v{h['to_version']}  by {h['actor']}: {h['reason']}")
    say(f"== finished in {summary['seconds']:.0f} s ==")
    make = "make airflow" if stack.port == 8080 else f"make airflow AIRFLOW_PORT={stack.port}"
    say(f"Open the UI with `{make}` (http://localhost:{stack.port}, user admin, password printed there).")
