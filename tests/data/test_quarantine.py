"""Quarantine operations through the CLI, on a real lake with a partition that real validation rejected."""

from __future__ import annotations

import json
from datetime import date

import pandas as pd
import pytest
from typer.testing import CliRunner

from closedloop.cli import app
from closedloop.core.errors import DataValidationError
from closedloop.devtools.generate import GeneratorConfig, generate, make_bad
from closedloop.stages.ingest import ingest_partition, read_marker
from closedloop.stages.quarantine import release_record_uri, report_uri

DAY = date(2026, 5, 2)
RULE = "expect_column_values_to_not_be_null"


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def quarantined(runtime, tmp_path):
    """A lake whose transactions of DAY broke a blocking rule (null keys) and were quarantined by ingest."""
    rt = runtime
    generate(GeneratorConfig(start=date(2026, 5, 1), days=2, customers=50, transactions_per_day=150, seed=5),
             rt.lake, rt.contract)
    landing = rt.lake.partition("landing", "transactions", DAY)
    good = rt.lake.read_parquet(landing)
    fixed = tmp_path / "fixed.parquet"
    good.to_parquet(fixed, index=False)
    rt.lake.write_parquet(make_bad(good, "null_key", rt.contract, seed=1), landing)
    with pytest.raises(DataValidationError):
        ingest_partition(rt.lake, rt.contract, "transactions", DAY)
    return rt, good, fixed


def _released(rt) -> dict | None:
    uri = release_record_uri(rt.lake, "transactions", DAY)
    return rt.lake.read_json(uri) if rt.lake.exists(uri) else None


def test_list_and_show_name_the_partition_and_its_blocking_rules(quarantined, reliability):
    rt, _, _ = quarantined
    text = cli("quarantine", "list")
    assert text.exit_code == 0, text.output
    assert "transactions" in text.stdout and DAY.isoformat() in text.stdout
    assert f"{RULE}(transaction_id)" in text.stdout
    assert rt.lake.partition("quarantine", "transactions", DAY) in text.stdout

    listed = json.loads(cli("quarantine", "list", "--json").stdout)
    assert len(listed) == 1
    entry = listed[0]
    report = rt.lake.read_json(report_uri(rt.lake, "transactions", DAY))
    assert (entry["kind"], entry["day"], entry["status"]) == ("transactions", DAY.isoformat(), "quarantined")
    assert entry["rows"] == report["rows"] and entry["sha256"] == report["sha256"]
    assert entry["quarantined_at"] == report["validated_at"]
    assert [(b["rule"], b["column"]) for b in entry["blocking"]] == [(RULE, "transaction_id")]

    shown = cli("quarantine", "show", "transactions", DAY.isoformat())
    assert shown.exit_code == 0 and report["summary"] in shown.stdout
    assert json.loads(cli("quarantine", "show", "transactions", DAY.isoformat(), "--json").stdout) == report
    reliability.record("quarantine", "list and show a partition quarantined for null keys",
                       "listed with its file, rows, hash, time and the blocking rule and column; show prints the "
                       "report's summary, --json the whole report")


def test_a_still_bad_release_stays_quarantined_and_a_corrected_file_goes_through(quarantined, tmp_path,
                                                                                  reliability):
    rt, good, fixed = quarantined
    q_uri = rt.lake.partition("quarantine", "transactions", DAY)
    original_sha = rt.lake.sha256(q_uri)

    # released as it is: the same rules reject it again
    again = cli("quarantine", "release", "transactions", DAY.isoformat(), "--reason", "looks fine to me")
    assert again.exit_code == 1
    assert "still breaks blocking rules and stays quarantined" in again.stderr and RULE in again.stderr
    assert rt.lake.exists(q_uri) and read_marker(rt.lake, "transactions", DAY) is None
    assert _released(rt) is None

    # a "corrected" file that is still bad (duplicated keys): quarantined with the new report
    still_bad = tmp_path / "still_bad.parquet"
    make_bad(good, "duplicate_key", rt.contract, seed=2).to_parquet(still_bad, index=False)
    refused = cli("quarantine", "release", "transactions", DAY.isoformat(), "--reason", "re-sent",
                  "--file", str(still_bad))
    assert refused.exit_code == 1 and "expect_column_values_to_be_unique" in refused.stderr
    report = rt.lake.read_json(report_uri(rt.lake, "transactions", DAY))
    assert report["passed"] is False
    assert [f["rule"] for f in report["findings"] if f["severity"] == "block"] == ["expect_column_values_to_be_unique"]
    assert rt.lake.sha256(q_uri) == rt.lake.sha256(f"file://{still_bad}")
    kept = rt.lake.uri("quarantine", "_replaced", "transactions", f"{DAY.isoformat()}-{original_sha[:12]}.parquet")
    assert rt.lake.sha256(kept) == original_sha  # what was replaced is kept
    assert read_marker(rt.lake, "transactions", DAY) is None

    # the right file goes through: curated, recorded, quarantine emptied
    ok = cli("quarantine", "release", "transactions", DAY.isoformat(), "--reason", "supplier re-sent the day",
             "--file", str(fixed), "--actor", "ops-alice")
    assert ok.exit_code == 0, ok.output
    marker = read_marker(rt.lake, "transactions", DAY)
    assert marker is not None and marker["sha256"] == rt.lake.sha256(f"file://{fixed}")
    assert len(rt.lake.read_parquet(rt.lake.partition("curated", "transactions", DAY))) == len(good)
    assert rt.lake.exists(rt.lake.partition("curated", rt.contract.feature_view, DAY))
    record = _released(rt)["releases"]
    assert len(record) == 1
    assert (record[0]["actor"], record[0]["reason"]) == ("ops-alice", "supplier re-sent the day")
    assert record[0]["old_report"]["findings"][0]["rule"] == "expect_column_values_to_be_unique"
    assert record[0]["new_sha256"] == marker["sha256"]
    assert not rt.lake.exists(q_uri) and not rt.lake.exists(report_uri(rt.lake, "transactions", DAY))
    assert json.loads(cli("quarantine", "list", "--json").stdout) == []
    reliability.record("quarantine", "release of a quarantined file as it is, then of a corrected file that is "
                       "still bad (duplicated keys)",
                       "refused with the validation summary and a non-zero exit; the partition stays quarantined "
                       "with the new report, the replaced file is kept")
    reliability.record("quarantine", "release with a corrected file",
                       "validated again with the same rules, curated with its features; who, why, the old report "
                       "and the new hash recorded; the quarantine files removed")


def test_a_release_after_a_fix_in_place_is_recorded_and_safe_to_repeat(quarantined, monkeypatch, reliability):
    rt, good, _ = quarantined
    monkeypatch.setenv("LOGNAME", "ops-bob")
    monkeypatch.setenv("USER", "ops-bob")
    q_uri = rt.lake.partition("quarantine", "transactions", DAY)
    old_sha = rt.lake.sha256(q_uri)
    rt.lake.write_parquet(good, q_uri)  # the operator repairs the file where it lies
    assert json.loads(cli("quarantine", "list", "--json").stdout)[0]["file_changed_since_report"] is True

    ok = cli("quarantine", "release", "transactions", DAY.isoformat(), "--reason", "null keys restored from source",
             "--json")
    assert ok.exit_code == 0, ok.output
    out = json.loads(ok.stdout)
    assert out["status"] == "released" and out["actor"] == "ops-bob" and out["file"] is None
    assert out["old_sha256"] == old_sha and out["new_sha256"] == rt.lake.sha256(q_uri.replace("quarantine", "landing"))
    assert read_marker(rt.lake, "transactions", DAY)["sha256"] == out["new_sha256"]

    for _ in range(2):  # repeating the release changes nothing
        again = cli("quarantine", "release", "transactions", DAY.isoformat(), "--reason", "again", "--json")
        assert again.exit_code == 0, again.output
        assert json.loads(again.stdout)["status"] == "already_released"
    assert len(_released(rt)["releases"]) == 1
    assert json.loads(cli("quarantine", "list", "--json").stdout) == []
    listed = json.loads(cli("quarantine", "list", "--all", "--json").stdout)
    assert [(e["status"], e["released_by"], e["release_reason"]) for e in listed] == [
        ("released", "ops-bob", "null keys restored from source")]
    shown = cli("quarantine", "show", "transactions", DAY.isoformat())
    assert shown.exit_code == 1 and "was released at" in shown.stderr and "ops-bob" in shown.stderr
    reliability.record("quarantine", "release after the operator fixed the quarantined file in place, repeated "
                       "twice",
                       "curated once, recorded with the login name as actor and the reason; the repeats answer "
                       "'already released' and change nothing")


def test_requests_that_cannot_be_carried_out_are_refused_with_what_exists(quarantined, tmp_path, reliability):
    rt, good, _ = quarantined
    day = DAY.isoformat()
    cases = {
        ("quarantine", "show", "receipts", day): "use one of transactions, labels",
        ("quarantine", "show", "transactions", "2026-05-01"): f"quarantined transactions days: {day}",
        ("quarantine", "show", "labels", day): "1 transactions partition(s) are quarantined",
        ("quarantine", "show", "transactions", "02/05/2026"): "give it as YYYY-MM-DD",
        ("quarantine", "release", "transactions", day, "--reason", "  "): "needs a reason",
        ("quarantine", "release", "transactions", "2026-05-01", "--reason", "x"): f"quarantined transactions days: "
                                                                                  f"{day}",
        ("quarantine", "release", "transactions", day, "--reason", "x", "--file", str(tmp_path / "nope.parquet")):
            "no such file",
    }
    for args, message in cases.items():
        result = cli(*args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    missing_reason = cli("quarantine", "release", "transactions", day)
    assert missing_reason.exit_code == 2 and "--reason" in missing_reason.output

    # a new delivery of the day landed meanwhile: the quarantined copy is not released over it
    rt.lake.write_parquet(good, rt.lake.partition("landing", "transactions", DAY))
    clash = cli("quarantine", "release", "transactions", day, "--reason", "x")
    assert clash.exit_code == 1 and "another delivery" in clash.stderr
    assert rt.lake.exists(rt.lake.partition("quarantine", "transactions", DAY))
    assert read_marker(rt.lake, "transactions", DAY) is None and _released(rt) is None
    reliability.record("quarantine", "show or release of an unknown kind, a day with nothing quarantined, a bad "
                       "date, no or an empty reason, a missing file, a new delivery waiting in landing",
                       "refused with a non-zero exit naming the kinds or the quarantined days and the way out; "
                       "nothing changed")


def test_a_release_recomputes_the_later_days_like_a_late_delivery(runtime, tmp_path, reliability):
    """The release path is a late delivery: the day after it, curated without it, is recomputed as in order."""
    from support.corruption import corrupted, differences

    from closedloop.stages.aggregates import compute_entity_features

    rt, c = runtime, runtime.contract
    generate(GeneratorConfig(start=date(2026, 5, 1), days=3, customers=30, transactions_per_day=80, seed=6),
             rt.lake, c)
    landing = rt.lake.partition("landing", "transactions", DAY)
    good = rt.lake.read_parquet(landing)
    good.to_parquet(tmp_path / "fixed.parquet", index=False)
    rt.lake.write_parquet(make_bad(good, "null_key", c, seed=1), landing)
    for d in (1, 2, 3):
        try:
            ingest_partition(rt.lake, c, "transactions", date(2026, 5, d))
        except DataValidationError:
            assert d == 2
    result = cli("quarantine", "release", "transactions", DAY.isoformat(), "--reason", "keys restored",
                 "--file", str(tmp_path / "fixed.parquet"))
    assert result.exit_code == 0, result.output
    assert "recomputed: 2026-05-03" in result.output
    assert _released(rt)["releases"][-1]["recomputed"] == ["2026-05-03"]
    tx = {d: rt.lake.read_parquet(rt.lake.partition("curated", "transactions", date(2026, 5, d))) for d in (1, 2, 3)}
    expected = compute_entity_features(tx[3], c, pd.concat([tx[1], tx[2]]), closing_rows=True)
    rows = differences(expected, rt.lake.read_parquet(rt.lake.partition("curated", c.feature_view,
                                                                        date(2026, 5, 3))),
                       [c.entity, c.event_timestamp])
    assert rows[0] == 0, rows
    reliability.record("quarantine", "a quarantined day released after the day that follows it was curated",
                       f"the release recomputed 2026-05-03's rows of the released day's customers; {rows[1]} rows "
                       "compared with in-order computation", corrupted=corrupted(feature_rows=rows))


def test_a_bad_redelivery_costs_nothing_and_its_release_is_a_new_version(runtime, tmp_path, reliability):
    """A curated day delivered again broken: quarantined, and nothing curated changes (against the lake before);
    released with a fix, it becomes version 2 of the day, the first kept, the later day recomputed."""
    from support.corruption import corrupted, differences

    from closedloop.stages.ingest import version_of

    rt, c = runtime, runtime.contract
    generate(GeneratorConfig(start=date(2026, 5, 1), days=3, customers=30, transactions_per_day=80, seed=8),
             rt.lake, c)
    for d in (1, 2, 3):
        ingest_partition(rt.lake, c, "transactions", date(2026, 5, d))

    def state():
        read = rt.lake.read_parquet_many
        return (read([rt.lake.partition("curated", "transactions", date(2026, 5, d)) for d in (1, 2, 3)]),
                read([rt.lake.partition("curated", c.feature_view, date(2026, 5, d)) for d in (1, 2, 3)]))

    control = state()
    first = read_marker(rt.lake, "transactions", DAY)["sha256"]
    landing = rt.lake.partition("landing", "transactions", DAY)
    fixed = rt.lake.read_parquet(landing).iloc[12:]
    fixed.to_parquet(tmp_path / "fixed.parquet", index=False)
    rt.lake.write_parquet(make_bad(fixed, "null_key", c, seed=1), landing)
    with pytest.raises(DataValidationError):
        ingest_partition(rt.lake, c, "transactions", DAY)
    treated = state()
    comparisons = {"curated_transactions": differences(control[0], treated[0], [c.row_key]),
                   "feature_rows": differences(control[1], treated[1], [c.entity, c.event_timestamp])}
    assert all(n == 0 for n, _, _ in comparisons.values()), comparisons
    assert read_marker(rt.lake, "transactions", DAY)["sha256"] == first

    result = cli("quarantine", "release", "transactions", DAY.isoformat(), "--reason", "keys restored",
                 "--file", str(tmp_path / "fixed.parquet"))
    assert result.exit_code == 0, result.output
    record = _released(rt)["releases"][-1]
    assert record["version"] == 2 and record["recomputed"] == ["2026-05-03"]
    marker = read_marker(rt.lake, "transactions", DAY)
    assert marker["versions"][0]["sha256"] == first and marker["versions"][0]["change"]["removed"] == 12
    assert len(rt.lake.read_parquet(version_of(rt.lake, "transactions", DAY, first))) == len(fixed) + 12
    reliability.record("integrity", "a curated day re-delivered broken (null keys), then released with a fix",
                       "the broken re-delivery quarantined, the curated day and every feature row unchanged; the "
                       "release curated version 2 (the first kept, 12 rows removed recorded) and recomputed the "
                       "day after", corrupted=corrupted(**comparisons))
