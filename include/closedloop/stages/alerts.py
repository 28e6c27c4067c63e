"""Alerts: what an operator must hear about, as JSON lines under ``$CLOSEDLOOP_HOME/alerts/``.

Every alert is one line of ``alerts/alerts.jsonl``: ``at`` (UTC), ``kind`` (one of :data:`KINDS`),
``severity``, ``summary`` (one sentence that names the thing and the way out), ``details``, the ``model`` it is
about and the Airflow ``dag_id`` / ``run_id`` / ``task_id`` that raised it. The file is always written, whatever else is
configured, so no alert is lost to a Slack or SMTP outage; ``CLOSEDLOOP_ALERTS`` (:mod:`closedloop.core.settings`)
adds a channel, delivered by :class:`closedloop.adapters.airflow.notifier.ClosedloopNotifier` through Airflow's
notifiers.

:func:`missing_arrivals` is the "no data arrived" check: the days whose landed transactions are missing
although the day ended more than ``alerts.landing_delay_hours`` ago. This module imports no Airflow.
"""

from __future__ import annotations

import fcntl
import json
import logging
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from closedloop.core.lake import Lake
    from closedloop.core.settings import Settings

log = logging.getLogger(__name__)

KINDS = ("validation_failed", "drift_detected", "promoted", "rejected", "data_missing", "task_failed", "skew_detected",
         "labels_suspect", "data_redelivered", "rollout_started", "rollout_ramped", "rolled_back")
SEVERITIES = ("info", "warning", "error")
ALERTS_FILE = "alerts.jsonl"


def alerts_path(settings: Settings) -> Path:
    """``$CLOSEDLOOP_HOME/alerts/alerts.jsonl``."""
    return settings.home / "alerts" / ALERTS_FILE


def make_alert(kind: str, summary: str, *, severity: str = "warning", details: dict[str, Any] | None = None,
               dag_id: str | None = None, run_id: str | None = None, task_id: str | None = None,
               model: str | None = None) -> dict[str, Any]:
    """One alert record (checked: a known kind and severity, a non-empty summary)."""
    if kind not in KINDS:
        raise ValueError(f"alert kind {kind!r}: use one of {', '.join(KINDS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"alert severity {severity!r}: use one of {', '.join(SEVERITIES)}")
    if not summary.strip():
        raise ValueError("an alert needs a summary")
    return {"at": datetime.now(UTC).isoformat(timespec="seconds"), "kind": kind, "severity": severity,
            "summary": summary.strip(), "details": details or {}, "model": model, "dag_id": dag_id,
            "run_id": run_id, "task_id": task_id}


def write_alert(settings: Settings, alert: dict[str, Any]) -> Path:
    """Append ``alert`` as one JSON line (under a lock: tasks of several processes append at once)."""
    path = alerts_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(alert, sort_keys=True, default=str) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.write(line)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    log.warning("alert %s: %s", alert["kind"], alert["summary"])
    return path


def read_alerts(settings: Settings, kind: str | None = None) -> list[dict[str, Any]]:
    """The alerts written so far, oldest first (``kind`` filters); lines that do not parse are skipped."""
    path = alerts_path(settings)
    if not path.exists():
        return []
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or rec.get("kind") == kind:
            found.append(rec)
    return found


def missing_arrivals(lake: Lake, now: datetime, *, delay_hours: float, lookback_days: int) -> list[date]:
    """Days of the last ``lookback_days`` whose transactions have not landed ``delay_hours`` after the day ended.

    A day counts as arrived when its partition is in ``landing/``, ``curated/`` or ``quarantine/`` (validation
    moves it on). Only days that ended more than ``delay_hours`` before ``now`` are expected.
    """
    latest_expected = (now - timedelta(hours=delay_hours)).date() - timedelta(days=1)
    days = [latest_expected - timedelta(days=i) for i in range(max(0, lookback_days))]
    return sorted(d for d in days
                  if not any(lake.exists(lake.partition(zone, "transactions", d))
                             for zone in ("landing", "curated", "quarantine")))


def check_arrivals(settings: Settings, lake: Lake, now: datetime | None = None, *, dag_id: str | None = None,
                   run_id: str | None = None) -> list[dict[str, Any]]:
    """The ``data_missing`` alerts due at ``now`` (default: the clock): one per missing day, never twice a day."""
    now = now or datetime.now(UTC)
    policy = settings.config.typed.alerts
    missing = missing_arrivals(lake, now, delay_hours=policy.landing_delay_hours, lookback_days=policy.lookback_days)
    told = {a["details"].get("day") for a in read_alerts(settings, "data_missing")}
    alerts = []
    for day in missing:
        if day.isoformat() in told:
            continue
        alerts.append(make_alert(
            "data_missing", f"no transactions landed for {day} at {lake.partition('landing', 'transactions', day)} "
            f"{policy.landing_delay_hours:g} h after the day ended: check the upstream delivery, then "
            f'trigger ingest with {{"day": "{day}"}}', severity="error",
            details={"day": day.isoformat(), "expected": lake.partition("landing", "transactions", day)},
            dag_id=dag_id, run_id=run_id))
    return alerts


def drift_alert(decision: dict[str, Any]) -> dict[str, Any] | None:
    """The ``drift_detected`` alert of a monitoring decision that starts a retraining (None otherwise)."""
    if not decision.get("retrain"):
        return None
    window = decision.get("window") or {}
    return make_alert("drift_detected", f"drift on {window.get('start')}..{window.get('end')}: retraining "
                      f"{decision.get('run_id')} starts ({decision.get('why')}); report: {decision.get('report')}",
                      severity="warning", details={k: decision.get(k) for k in ("window", "report", "run_id", "why")})


def gate_alert(action: dict[str, Any]) -> dict[str, Any] | None:
    """The ``promoted`` / ``rejected`` alert of what promote_or_reject did (None for a re-run's no-op)."""
    if action.get("action") == "promoted":
        return make_alert("promoted", f"{action['model']} v{action['version']} is the champion (was "
                          f"v{action.get('previous') or '-'}): {action.get('reason')}; `closedloop rollback` "
                          "undoes it", severity="info", details=action)
    if action.get("action") == "rollout_started":
        share = f"{action['share']:g} of traffic" if action.get("mode") == "canary" else "in shadow"
        return make_alert("rollout_started", f"{action['model']} v{action['version']} passed the gate and serves "
                          f"{share} beside champion v{action.get('champion')} (rollout.mode {action.get('mode')}); "
                          "the rollout DAG decides from live traffic", severity="info", details=action)
    if action.get("action") == "rejected" and action.get("outcome") == "labels_suspect":
        return make_alert("labels_suspect", f"{action['model']} v{action['version']} not promoted, the labels look "
                          f"broken (champion v{action.get('champion') or '-'} kept): {action.get('reason')}",
                          severity="error", details=action)
    if action.get("action") == "rejected":
        return make_alert("rejected", f"{action['model']} v{action['version']} rejected, champion "
                          f"v{action.get('champion') or '-'} kept: {action.get('reason')}", severity="info",
                          details=action)
    return None


def rollout_alert(done: dict[str, Any]) -> dict[str, Any] | None:
    """The alert of what the rollout DAG did: ramped, promoted, rolled back (None for hold, none or a retry)."""
    action = done.get("action")
    if done.get("already_done") or action not in ("ramp", "promote", "rollback", "conflict"):
        return None
    who = f"{done['model']} v{done['version']}"
    if action == "ramp":
        return make_alert("rollout_ramped", f"{who} now serves {done['share']:g} of traffic: {done['why']}",
                          severity="info", details=done)
    if action == "promote":
        return make_alert("promoted", f"{who} is the champion after its {done['mode']} rollout (was "
                          f"v{done.get('champion') or '-'}): {done['why']}; `closedloop rollback` undoes it",
                          severity="info", details=done)
    if action == "rollback":
        return make_alert("rolled_back", f"{who} rolled back, all traffic to champion v{done.get('champion')}: "
                          f"{done['why']}", severity="warning", details=done)
    return make_alert("rolled_back", f"{who}: the rollout moved meanwhile, nothing changed: {done['why']}",
                      severity="warning", details=done)


def redelivery_alert(partition: dict[str, Any]) -> dict[str, Any] | None:
    """The ``data_redelivered`` alert of an ingest outcome (:class:`closedloop.stages.ingest.IngestOutcome` as a dict)
    whose partition was delivered again with another content; None for any other outcome."""
    c = partition.get("change")
    if not c:
        return None
    return make_alert(
        "data_redelivered", f"{partition['kind']} {partition['day']} was delivered again and differs from its curated "
        f"copy ({c['added']} row(s) added, {c['removed']} removed, {c['changed']} changed): curated as version "
        f"{partition['version']}, the previous one kept under curated/_versions/; later days' features recomputed: "
        f"{', '.join(partition.get('recomputed') or []) or 'none'}. Check with the producer that the change was "
        "intended.", severity="warning",
        details={k: partition.get(k) for k in ("kind", "day", "uri", "sha256", "rows", "version", "change",
                                                "recomputed")})
