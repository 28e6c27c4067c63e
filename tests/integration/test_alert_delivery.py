"""Alert delivery for real: Slack and e-mail through Airflow's own notifiers, to local stand-ins.

A tiny DAG run with ``dag.test()``: one task fails with ``on_failure_callback=ClosedloopNotifier(...)``, one
raises an alert from inside the task (:func:`closedloop.adapters.airflow.notifier.send`). The Slack provider's
``SlackWebhookNotifier`` posts to an HTTP server on 127.0.0.1 (the connection's host), the SMTP provider's
``SmtpNotifier`` to an aiosmtpd server on 127.0.0.1 (no TLS, no SSL); both connections come from
``AIRFLOW_CONN_*`` as in production. A channel that cannot be reached is logged and changes nothing else.
"""

from __future__ import annotations

import email
import email.policy
import json
import socket
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from closedloop.stages.alerts import read_alerts

pytestmark = pytest.mark.integration

FAILURE = "Validation of transactions FAILED: file:///lake/landing/transactions/2026-03-03.parquet: column amount"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict]]]:
    """A local Slack incoming webhook: records each JSON body posted, answers 200 ``ok`` as Slack does."""
    received: list[dict] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "body": json.loads(body)})
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def smtp_server() -> Iterator[tuple[int, list]]:
    """A local SMTP server (aiosmtpd) that keeps every message it is given."""
    from aiosmtpd.controller import Controller

    received: list = []

    class Keep:
        async def handle_DATA(self, server, session, envelope):
            received.append(envelope)
            return "250 OK"

    port = _free_port()
    controller = Controller(Keep(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, received
    finally:
        controller.stop()


def _dag(dag_id: str):
    """One task fails (its callback alerts), one succeeds after raising an alert itself, one only works."""
    from airflow.sdk import dag, get_current_context, task
    from airflow.sdk.exceptions import AirflowFailException

    from closedloop.adapters.airflow.notifier import ClosedloopNotifier, send

    @dag(dag_id=dag_id, schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
         default_args={"retries": 0})
    def alerting():
        @task(on_failure_callback=ClosedloopNotifier("validation_failed", severity="error"))
        def validate():
            raise AirflowFailException(FAILURE)

        @task
        def promote():
            send("promoted", "fraud v7 is the champion (was v6)", get_current_context(), severity="info",
                 details={"version": "7"})

        @task
        def work():  # reads its settings and configuration, alerts nothing
            from closedloop.core.settings import Settings

            return Settings.from_env().config.typed.model.name

        validate()
        promote()
        work()

    return alerting()


def _run(dag_id: str, expect: dict[str, str] | None = None):
    """``dag.test()`` runs DAGs of a bundle: write this one to the metadata DB first, as the DAG processor would."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    dag = _dag(dag_id)
    bag = DagBag(collect_dags=False)
    bag.bag_dag(dag)
    sync_bag_to_db(bag, "dags-folder", None)
    try:
        dr = dag.test()
        states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    finally:  # no DAG of this test stays in the session's database (the UI and API tests list the DAGs)
        from airflow.api.common.delete_dag import delete_dag

        delete_dag(dag_id)
    assert states == (expect or {"validate": "failed", "promote": "success", "work": "success"}), states
    return dr


def _file_alerts(home_settings, run_id: str) -> dict[str, dict]:
    return {a["kind"]: a for a in read_alerts(home_settings) if a["run_id"] == run_id}


def test_slack_alerts_reach_the_webhook(runtime, airflow_db, webhook, monkeypatch):
    url, received = webhook
    monkeypatch.setenv("AIRFLOW_CONN_SLACK_ALERTS", json.dumps(
        {"conn_type": "slackwebhook", "host": url, "password": "T000/B000/XXX", "extra": {"timeout": 5}}))
    monkeypatch.setenv("CLOSEDLOOP_ALERTS", "slack")
    monkeypatch.setenv("CLOSEDLOOP_SLACK_WEBHOOK", "slack_alerts")

    dr = _run("alerts_to_slack")

    assert {r["path"] for r in received} == {"/T000/B000/XXX"}
    texts = [r["body"]["text"] for r in received]
    assert len(texts) == 2, texts
    failed = next(t for t in texts if "validation_failed" in t)
    # the model is the DAG's (its model:<name> tag); this test's DAG has none: the deployment's default model
    assert failed.startswith("[closedloop error] [card_fraud] validation_failed: " + FAILURE)
    assert f"alerts_to_slack / validate / {dr.run_id}" in failed
    promoted = next(t for t in texts if "promoted" in t)
    assert "[closedloop info] [card_fraud] promoted: fraud v7 is the champion (was v6)" in promoted
    # and the file has both, as always
    alerts = _file_alerts(runtime.settings, dr.run_id)
    assert alerts["validation_failed"]["summary"] == FAILURE
    assert alerts["promoted"]["details"] == {"version": "7"} and alerts["promoted"]["model"] == "card_fraud"


def test_email_alerts_reach_the_smtp_server(runtime, airflow_db, smtp_server, monkeypatch):
    port, received = smtp_server
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", json.dumps(
        {"conn_type": "smtp", "host": "127.0.0.1", "port": port,
         "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "closedloop@example.org",
                   "timeout": 5, "retry_limit": 0}}))
    monkeypatch.setenv("CLOSEDLOOP_ALERTS", "email")
    monkeypatch.setenv("CLOSEDLOOP_ALERT_EMAIL", "ops@example.org, ml@example.org")
    monkeypatch.setenv("CLOSEDLOOP_SMTP_CONN_ID", "smtp_alerts")

    dr = _run("alerts_by_email")

    assert len(received) == 2, received
    mails = {}
    for envelope in received:
        assert envelope.mail_from == "closedloop@example.org"
        assert sorted(envelope.rcpt_tos) == ["ml@example.org", "ops@example.org"]
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = "".join(part.get_content() for part in msg.walk() if part.get_content_type() == "text/html")
        mails[str(msg["Subject"])] = body
    subjects = sorted(mails)
    assert subjects[0] == "[closedloop card_fraud] promoted: fraud v7 is the champion (was v6)"
    assert subjects[1].startswith("[closedloop card_fraud] validation_failed: Validation of transactions FAILED")
    assert "[closedloop error] [card_fraud] validation_failed: " + FAILURE in mails[subjects[1]]
    assert "alerts_by_email / promote / " + dr.run_id in mails[subjects[0]]
    assert set(_file_alerts(runtime.settings, dr.run_id)) == {"validation_failed", "promoted"}


@pytest.mark.parametrize("channel", ["slack", "email"])
def test_an_unreachable_channel_is_logged_and_changes_nothing_else(runtime, airflow_db, monkeypatch, caplog,
                                                                    channel):
    closed = _free_port()  # nothing listens there
    monkeypatch.setenv("CLOSEDLOOP_ALERTS", channel)
    if channel == "slack":
        monkeypatch.setenv("AIRFLOW_CONN_SLACK_DOWN", json.dumps(
            {"conn_type": "slackwebhook", "host": f"http://127.0.0.1:{closed}", "password": "T000/B000/XXX",
             "extra": {"timeout": 2}}))
        monkeypatch.setenv("CLOSEDLOOP_SLACK_WEBHOOK", "slack_down")
    else:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DOWN", json.dumps(
            {"conn_type": "smtp", "host": "127.0.0.1", "port": closed,
             "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "closedloop@example.org",
                       "timeout": 2, "retry_limit": 0}}))
        monkeypatch.setenv("CLOSEDLOOP_ALERT_EMAIL", "ops@example.org")
        monkeypatch.setenv("CLOSEDLOOP_SMTP_CONN_ID", "smtp_down")

    dr = _run(f"alerts_{channel}_down")  # the promote task still succeeds, validate fails for its own reason

    assert set(_file_alerts(runtime.settings, dr.run_id)) == {"validation_failed", "promoted"}
    for kind in ("validation_failed", "promoted"):
        assert f"alert {kind} written to the file but not delivered to {channel}" in caplog.text, caplog.text


def test_a_bad_channel_setting_fails_only_the_alerting_with_its_message(runtime, airflow_db, monkeypatch, caplog,
                                                                        reliability):
    """CLOSEDLOOP_ALERTS=pager: the task that alerts fails with the setting's message (its alert still filed), the
    failure callback says it in the log, and the task that only works succeeds."""
    monkeypatch.setenv("CLOSEDLOOP_ALERTS", "pager")
    dr = _run("alerts_bad_channel", {"validate": "failed", "promote": "failed", "work": "success"})
    assert set(_file_alerts(runtime.settings, dr.run_id)) == {"validation_failed", "promoted"}
    message = "CLOSEDLOOP_ALERTS='pager': use one of file, slack, email"
    assert caplog.text.count(f"written to the file but not delivered: {message}") == 2, caplog.text[-3000:]
    reliability.record("fault", "a bad alert channel setting (CLOSEDLOOP_ALERTS=pager) in a DAG run",
                       "the task that alerts fails with the one-line ConfigError naming the variable, the failure "
                       "callback logs it; the task that only works succeeds; both alerts are in alerts.jsonl",
                       "nothing")
