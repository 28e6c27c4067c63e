"""Alerts: the record, the file, the settings that pick a channel, the notifier, the arrival check."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from types import SimpleNamespace

import pandas as pd
import pytest

from closedloop.core.errors import ConfigError
from closedloop.core.settings import AlertSettings, Settings
from closedloop.stages.alerts import (
    alerts_path,
    check_arrivals,
    drift_alert,
    gate_alert,
    make_alert,
    missing_arrivals,
    read_alerts,
    write_alert,
)


def test_alerts_are_json_lines_appended_to_the_home(runtime):
    s = runtime.settings
    first = write_alert(s, make_alert("rejected", "v4 rejected", severity="info", details={"version": "4"}))
    write_alert(s, make_alert("promoted", "v5 is the champion {braces} stay", severity="info"))
    assert first == alerts_path(s) == s.home / "alerts" / "alerts.jsonl"
    lines = first.read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["rejected", "promoted"]
    assert [a["summary"] for a in read_alerts(s, "promoted")] == ["v5 is the champion {braces} stay"]
    assert read_alerts(s, "rejected")[0]["details"] == {"version": "4"}
    with pytest.raises(ValueError, match="alert kind 'oops'"):
        make_alert("oops", "x")
    with pytest.raises(ValueError, match="needs a summary"):
        make_alert("promoted", " ")


def test_channel_settings_are_checked_when_alerts_are_delivered_not_with_the_settings(tmp_path):
    assert AlertSettings.from_env({}).channel == "file"
    with pytest.raises(ConfigError, match="CLOSEDLOOP_ALERTS='pager': use one of file, slack, email"):
        AlertSettings.from_env({"CLOSEDLOOP_ALERTS": "pager"})
    with pytest.raises(ConfigError, match="needs CLOSEDLOOP_SLACK_WEBHOOK"):
        AlertSettings.from_env({"CLOSEDLOOP_ALERTS": "slack"})
    with pytest.raises(ConfigError, match="holds a URL: give the id of an Airflow connection"):
        AlertSettings.from_env({"CLOSEDLOOP_ALERTS": "slack", "CLOSEDLOOP_SLACK_WEBHOOK": "https://hooks.slack.com/x"})
    with pytest.raises(ConfigError, match="needs CLOSEDLOOP_ALERT_EMAIL"):
        AlertSettings.from_env({"CLOSEDLOOP_ALERTS": "email"})
    s = AlertSettings.from_env({"CLOSEDLOOP_ALERTS": "email", "CLOSEDLOOP_ALERT_EMAIL": "a@x.org, b@x.org"})
    assert (s.emails, s.smtp_conn_id) == (("a@x.org", "b@x.org"), "smtp_default")
    # every other task reads its settings whatever the alert channel says
    for bad in ({"CLOSEDLOOP_ALERTS": "pager"}, {"CLOSEDLOOP_ALERTS": "slack"}, {"CLOSEDLOOP_ALERTS": "email"}):
        assert Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path), **bad}).home == tmp_path.resolve()


def _context(exc: BaseException | None = None):
    ti = SimpleNamespace(task_id="validate_partitions", dag_id="ingest", run_id="manual__1")
    return {"ti": ti, "run_id": "manual__1", "exception": exc}


def test_the_notifier_writes_the_failure_it_is_called_for(runtime):
    from airflow.sdk.bases.notifier import BaseNotifier

    from closedloop.adapters.airflow.notifier import ClosedloopNotifier

    notifier = ClosedloopNotifier("validation_failed", severity="error")
    assert isinstance(notifier, BaseNotifier)
    notifier(_context(RuntimeError("Validation of transactions FAILED: file:///lake/x.parquet\n"
                                   "  BLOCKING expect_column_to_exist(amount)")))
    [alert] = read_alerts(runtime.settings)
    assert alert["summary"] == ("Validation of transactions FAILED: file:///lake/x.parquet | "
                                "BLOCKING expect_column_to_exist(amount)")
    assert (alert["dag_id"], alert["task_id"], alert["run_id"]) == ("ingest", "validate_partitions", "manual__1")
    assert alert["details"]["error"].startswith("RuntimeError: Validation of transactions FAILED")


def test_a_channel_that_cannot_deliver_never_loses_the_alert(runtime, monkeypatch, caplog):
    from closedloop.adapters.airflow.notifier import send

    monkeypatch.setenv("CLOSEDLOOP_ALERTS", "slack")
    monkeypatch.setenv("CLOSEDLOOP_SLACK_WEBHOOK", "slack_alerts")
    send("promoted", "v2 is the champion", _context(), severity="info")  # no connection slack_alerts is defined
    assert [a["summary"] for a in read_alerts(runtime.settings)] == ["v2 is the champion"]
    assert "not delivered to slack" in caplog.text and "slack_alerts" in caplog.text


def test_a_bad_channel_setting_fails_the_alerting_with_its_message_after_the_alert_is_filed(runtime, monkeypatch,
                                                                                             caplog):
    from closedloop.adapters.airflow.notifier import ClosedloopNotifier, send

    monkeypatch.setenv("CLOSEDLOOP_ALERTS", "pager")
    with pytest.raises(ConfigError, match="CLOSEDLOOP_ALERTS='pager': use one of file, slack, email") as err:
        send("promoted", "v2 is the champion", _context(), severity="info")
    assert "\n" not in str(err.value) and err.value.__cause__ is None
    with pytest.raises(ConfigError, match="CLOSEDLOOP_ALERTS='pager'"):  # as an on_failure_callback too
        ClosedloopNotifier("validation_failed", severity="error")(_context(RuntimeError("bad file")))
    assert [a["kind"] for a in read_alerts(runtime.settings)] == ["promoted", "validation_failed"]
    assert caplog.text.count("written to the file but not delivered: CLOSEDLOOP_ALERTS='pager'") == 2


def test_drift_and_gate_alerts():
    assert drift_alert({"retrain": False, "why": "no drift"}) is None
    d = drift_alert({"retrain": True, "window": {"start": "2026-03-01", "end": "2026-03-03"}, "run_id": "drift__x",
                     "why": "drift share 0.6", "report": "file:///r.html"})
    assert d["kind"] == "drift_detected" and "2026-03-01..2026-03-03" in d["summary"] and "drift__x" in d["summary"]
    p = gate_alert({"action": "promoted", "model": "m", "version": "3", "previous": "2", "reason": "better"})
    assert p["kind"] == "promoted" and "m v3 is the champion (was v2)" in p["summary"]
    r = gate_alert({"action": "rejected", "model": "m", "version": "4", "champion": "3", "reason": "worse"})
    assert r["kind"] == "rejected" and "champion v3 kept: worse" in r["summary"]
    assert gate_alert({"action": "already_champion"}) is None


def test_missing_arrivals_past_the_delay_are_alerted_once(runtime):
    lake = runtime.lake
    frame = pd.DataFrame({"x": [1]})
    lake.write_parquet(frame, lake.partition("landing", "transactions", date(2026, 3, 9)))
    lake.write_parquet(frame, lake.partition("curated", "transactions", date(2026, 3, 7)))
    now = datetime(2026, 3, 11, 5, 0, tzinfo=UTC)  # 2026-03-10 ended 5 h ago: not yet expected with a 6 h delay
    assert missing_arrivals(lake, now, delay_hours=6, lookback_days=4) == [date(2026, 3, 6), date(2026, 3, 8)]
    later = datetime(2026, 3, 11, 7, 0, tzinfo=UTC)
    assert missing_arrivals(lake, later, delay_hours=6, lookback_days=3) == [date(2026, 3, 8), date(2026, 3, 10)]

    due = check_arrivals(runtime.settings, lake, later, dag_id="housekeeping", run_id="r1")
    assert [a["details"]["day"] for a in due] == ["2026-03-08", "2026-03-10"]
    assert due[0]["severity"] == "error" and "trigger ingest with" in due[0]["summary"]
    write_alert(runtime.settings, due[0])
    again = check_arrivals(runtime.settings, lake, later)
    assert [a["details"]["day"] for a in again] == ["2026-03-10"]  # 03-08 was told already
