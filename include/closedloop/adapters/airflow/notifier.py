"""The DAG layer's alerts: an Airflow notifier that writes closedloop's alert file and, if configured, Slack or mail.

Imported by ``dags/`` only (Airflow's task SDK at import time, nothing heavy). :class:`ClosedloopNotifier`
is an ``on_failure_callback`` (``ClosedloopNotifier("validation_failed")``: the summary is the failure's own
message, which names the file and the rule) and is also called from inside tasks with a summary
(:func:`send`). It always appends to ``$CLOSEDLOOP_HOME/alerts/alerts.jsonl`` (:mod:`closedloop.stages.alerts`), then:

- ``CLOSEDLOOP_ALERTS=slack``: the Slack provider's ``SlackWebhookNotifier`` on the connection
  ``CLOSEDLOOP_SLACK_WEBHOOK`` (type ``slackwebhook``: the webhook token in its password, or the whole URL);
- ``CLOSEDLOOP_ALERTS=email``: the SMTP provider's ``SmtpNotifier`` to ``CLOSEDLOOP_ALERT_EMAIL`` over
  ``CLOSEDLOOP_SMTP_CONN_ID`` (the sender is the connection's ``from_email`` extra).

Both providers are dependencies of closedloop; tests/integration/test_alert_delivery.py delivers through
them to a local webhook and a local SMTP server.

A channel that fails is logged, never raised: the alert is in the file, and the task's own outcome stands. A bad
channel setting (``CLOSEDLOOP_ALERTS=pager``, ``slack`` without a connection id...) is read here, when an alert is
delivered, and raised after the alert is in the file: the task that alerts (or its failure callback) fails with
the setting's one-line message; every other task runs.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk.bases.notifier import BaseNotifier

from closedloop.adapters.airflow.models import model_of
from closedloop.core.errors import ConfigError, first_line
from closedloop.core.settings import AlertSettings, Settings
from closedloop.stages.alerts import make_alert, write_alert

log = logging.getLogger(__name__)


def _one_line(exc: BaseException | None, limit: int = 2000) -> str:
    """The whole message on one line (a validation failure lists its rules on the lines after the first)."""
    return " | ".join(line.strip() for line in str(exc or "").splitlines() if line.strip())[:limit]


class ClosedloopNotifier(BaseNotifier):
    """Write an alert of ``kind`` (see :data:`closedloop.stages.alerts.KINDS`) and deliver it to the configured
    channel."""

    template_fields = ()  # summaries are plain text (they may hold braces), never Jinja

    def __init__(self, kind: str, summary: str = "", *, severity: str = "warning",
                 details: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.kind, self.summary, self.severity, self.details = kind, summary, severity, details or {}

    def notify(self, context: Any) -> None:
        dag = context.get("dag")
        model = model_of(dag)
        settings = Settings.from_env(model=model)
        ti = context.get("ti") or context.get("task_instance")
        exc = context.get("exception")
        summary = self.summary or _one_line(exc) or f"{self.kind} in {getattr(ti, 'task_id', 'a task')}"
        details = dict(self.details)
        if exc is not None:
            details.setdefault("error", f"{type(exc).__name__}: {first_line(exc, 1000)}")
        alert = make_alert(self.kind, summary, severity=self.severity, details=details, model=model or settings.model,
                           dag_id=getattr(dag, "dag_id", None) or getattr(ti, "dag_id", None),
                           run_id=context.get("run_id") or getattr(ti, "run_id", None),
                           task_id=getattr(ti, "task_id", None))
        write_alert(settings, alert)
        try:
            channel = AlertSettings.from_env()
        except ConfigError as bad:  # deterministic: said once, in the log and as the task's (or callback's) error
            log.error("alert %s written to the file but not delivered: %s", alert["kind"], bad)
            raise
        try:
            _deliver(channel, alert, context)
        except Exception as exc2:  # the alert is in the file; a channel outage must not fail the task
            log.error("alert %s written to the file but not delivered to %s: %s", alert["kind"], channel.channel,
                      first_line(exc2, 1000))


def _text(alert: dict[str, Any]) -> str:
    where = " / ".join(x for x in (alert.get("dag_id"), alert.get("task_id"), alert.get("run_id")) if x)
    model = f" [{alert['model']}]" if alert.get("model") else ""
    return (f"[closedloop {alert['severity']}]{model} {alert['kind']}: {alert['summary']}"
            + (f" ({where})" if where else ""))


def _deliver(settings: AlertSettings, alert: dict[str, Any], context: Any) -> None:
    if settings.channel == "slack":
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        SlackWebhookNotifier(slack_webhook_conn_id=settings.slack_conn_id, text=_text(alert)).notify(context)
    elif settings.channel == "email":
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        model = f" {alert['model']}" if alert.get("model") else ""
        SmtpNotifier(to=list(settings.emails), smtp_conn_id=settings.smtp_conn_id,
                     subject=f"[closedloop{model}] {alert['kind']}: {alert['summary'][:120]}",
                     html_content=f"<pre>{_text(alert)}</pre>").notify(context)


def send_alert(alert: dict[str, Any] | None, context: Any) -> None:
    """Deliver an alert built by :mod:`closedloop.stages.alerts` (``drift_alert``, ``gate_alert``...); None: nothing."""
    if alert is not None:
        send(alert["kind"], alert["summary"], context, severity=alert["severity"], details=alert["details"])


def send(kind: str, summary: str, context: Any, *, severity: str = "warning",
         details: dict[str, Any] | None = None) -> None:
    """Raise an alert from inside a task (drift detected, promoted, rejected, data missing)."""
    ClosedloopNotifier(kind, summary, severity=severity, details=details).notify(context)
