"""The operator's CLI: ``history``, ``promote`` and ``report`` on a real home (MLflow registry, lake)."""

from __future__ import annotations

import json
from datetime import date

import pytest
from test_rollback import _aliases, cli, registry  # noqa: F401  (the registry fixture: v1..v3 promoted, v4 rejected)

from closedloop.stages.drift import REPORT_HTML, REPORT_JSON, report_uri
from closedloop.stages.registry import history

pytestmark = pytest.mark.integration


def test_history_lists_every_move_newest_first(registry):  # noqa: F811
    out = cli("history", "--json")
    assert out.exit_code == 0, out.output
    moves = json.loads(out.stdout)
    assert [(m["from_version"], m["to_version"], m["kind"]) for m in moves] == [
        ("2", "3", "promotion"), ("1", "2", "promotion"), (None, "1", "promotion")]
    text = cli("history", "--limit", "1")
    assert text.exit_code == 0 and len(text.stdout.strip().splitlines()) == 1
    assert "v2 -> v3  by retraining: gate: v3 won" in text.stdout


def test_history_of_a_model_never_promoted(runtime):
    out = cli("history")
    assert out.exit_code == 0 and "no promotion yet" in out.stdout
    assert json.loads(cli("history", "--json").stdout) == []


def test_manual_promotion_goes_through_the_compare_and_set(registry):  # noqa: F811
    _, client, name = registry
    out = cli("promote", "5", "--reason", "v5 validated offline by the fraud team", "--actor", "ops-erin", "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert (result["status"], result["from_version"], result["to_version"]) == ("promoted", "3", "5")
    assert _aliases(client, name) == ("5", "3")
    last = history(client, name)[0]
    assert {k: last[k] for k in ("kind", "from_version", "to_version", "actor", "reason")} == {
        "kind": "manual", "from_version": "3", "to_version": "5", "actor": "ops-erin",
        "reason": "v5 validated offline by the fraud team"}
    # the version the champion left is listed under 'previous'; the text output says so
    text = cli("promote", "v3", "--reason", "back to v3", "--actor", "ops-erin")
    assert text.exit_code == 0, text.output
    assert "champion v5 -> v3 (manual promotion by ops-erin: back to v3); v5 is now 'previous'" in text.stdout
    assert _aliases(client, name) == ("3", "5")


def test_refused_manual_promotions_change_nothing(registry):  # noqa: F811
    _, client, name = registry
    cases = {
        ("99",): "has no version '99': versions are v1 (retired), v2 (previous), v3 (champion)",
        ("3",): "version 3 is already the champion",
        ("4",): "rejected by the promotion gate; a manual promotion to it needs --force",
    }
    for args, message in cases.items():
        out = cli("promote", *args, "--reason", "test")
        assert out.exit_code == 1, (args, out.output)
        assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
    empty = cli("promote", "5", "--reason", "  ")
    assert empty.exit_code == 1 and "a manual promotion needs a reason" in empty.stderr
    assert cli("promote", "5").exit_code == 2  # --reason is required
    assert _aliases(client, name) == ("3", "2") and len(history(client, name)) == 3

    forced = cli("promote", "4", "--force", "--reason", "the gate's holdout was a holiday", "--json")
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.stdout)["forced"] is True and _aliases(client, name) == ("4", "3")
    assert history(client, name)[0]["reason"].endswith("[forced: the version was rejected by the gate]")


def test_manual_promotion_without_any_version(runtime):
    out = cli("promote", "1", "--reason", "x")
    assert out.exit_code == 1 and "has no registered versions" in out.stderr


def _write_report(lake, start: date, end: date, drift: bool) -> str:
    folder = report_uri(lake, start, end)
    lake.write_bytes(f"{folder}/{REPORT_HTML}", f"<html>{start}..{end}</html>".encode())
    lake.write_json(f"{folder}/{REPORT_JSON}", {
        "window": {"start": start.isoformat(), "end": end.isoformat()}, "figures": {"drift_share": 0.5},
        "decision": {"judged": True, "drift": drift, "reasons": [f"drift share 0.5 ({start})"], "fired": []}})
    return folder


def test_report_finds_the_newest_or_the_named_window(runtime):
    lake = runtime.lake
    out = cli("report")
    assert out.exit_code == 1 and "no drift report under" in out.stderr and "drift_monitoring" in out.stderr
    old = _write_report(lake, date(2026, 3, 1), date(2026, 3, 8), drift=False)
    new = _write_report(lake, date(2026, 3, 8), date(2026, 3, 15), drift=True)
    lake.write_bytes(lake.uri("reports", "drift", "notes.txt"), b"not a report")

    latest = cli("report")
    assert latest.exit_code == 0, latest.output
    assert "2026-03-08_2026-03-15" in latest.stdout and ": DRIFT" in latest.stdout
    assert f"html: {new}/{REPORT_HTML}" in latest.stdout
    assert lake.exists(f"{new}/{REPORT_HTML}")

    named = json.loads(cli("report", "--day", "2026-03-03", "--json").stdout)
    assert named["window"] == "2026-03-01_2026-03-08" and named["folder"] == old
    assert named["decision"]["drift"] is False and named["figures"] == {"drift_share": 0.5}
    by_name = cli("report", "--day", "2026-03-01_2026-03-08", "--html")
    assert by_name.exit_code == 0 and by_name.stdout.strip() == "<html>2026-03-01..2026-03-08</html>"

    missing = cli("report", "--day", "2026-04-01")
    assert missing.exit_code == 1
    assert "no drift report covers 2026-04-01: windows are 2026-03-01_2026-03-08, 2026-03-08_2026-03-15" \
        in missing.stderr
    assert "neither a day" in cli("report", "--day", "last-week").stderr
    both = cli("report", "--html", "--json")
    assert both.exit_code == 2 and "exclude each other" in both.stderr
