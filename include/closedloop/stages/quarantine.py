"""Quarantine operations: list, inspect and release the partitions that validation rejected.

:func:`closedloop.stages.ingest.quarantine` moves a partition that broke a blocking rule to
``quarantine/<kind>/<day>.parquet`` with its report ``<day>.validation.json``. An operator then either fixes
the file in place, or brings a corrected file, and *releases* it: the partition goes back to ``landing/``
and through :func:`closedloop.stages.ingest.ingest_partition` again, with the same rules, so a release can never
let through what a delivery could not. A re-delivery of a curated day that was quarantined is released as a
new version of the day (the curated copy kept, as for any re-delivery); a quarantined delivery older than
the curated copy is stale and is not released over it. A release that passes is recorded in
``quarantine/_released/<kind>/<day>.json`` (who, why, when, the old report, the old and new hashes) and the
quarantine files are removed; one that fails leaves the partition quarantined with the new report. A
quarantined file replaced by ``--file`` is kept under ``quarantine/_replaced/<kind>/`` (nothing is thrown
away). A release is a late delivery like any other, through the same ingest: the days after it whose
lookback holds it get their feature rows recomputed (``recomputed`` in the record), and an ingest run of the
day materialises them (materialisation of an older day extends to what the online store holds). Releasing is
safe to repeat: a released partition is reported as such, and an interrupted release (curated, not yet
recorded) is finished by the next attempt.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from closedloop.core.errors import ConfigError, DataValidationError, NoDataError
from closedloop.core.lake import KINDS, Lake
from closedloop.stages.ingest import ingest_partition, read_marker

if TYPE_CHECKING:
    from closedloop.core.schema import DataContract

log = logging.getLogger(__name__)

REPORT_SUFFIX = ".validation.json"
RELEASED = "_released"
REPLACED = "_replaced"


# -- where things are --------------------------------------------------------------------------------
def partition_uri(lake: Lake, kind: str, day: date) -> str:
    return lake.partition("quarantine", kind, day)


def report_uri(lake: Lake, kind: str, day: date) -> str:
    return lake.partition("quarantine", kind, day, suffix=REPORT_SUFFIX)


def release_record_uri(lake: Lake, kind: str, day: date) -> str:
    return lake.uri("quarantine", RELEASED, kind, f"{day.isoformat()}.json")


def check_kind(kind: str) -> str:
    """``kind`` when it is a partition kind of the lake; a ConfigError naming the kinds otherwise."""
    if kind not in KINDS:
        raise ConfigError(f"unknown partition kind {kind!r}: use one of {', '.join(KINDS)}")
    return kind


def parse_day(value: str | date) -> date:
    """A day given on the command line (YYYY-MM-DD); a ConfigError saying the format otherwise."""
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"day {value!r} is not a date: give it as YYYY-MM-DD") from None


def _days_in(lake: Lake, zone_parts: tuple[str, ...], suffixes: tuple[str, ...]) -> set[date]:
    """Days named by the files ``<day><suffix>`` directly under ``zone_parts`` (no error when absent)."""
    base = lake.local_path(lake.uri(*zone_parts))
    if not lake.fs.exists(base):
        return set()
    days: set[date] = set()
    for path in lake.fs.ls(base, detail=False):
        name = str(path).rsplit("/", 1)[-1]
        for suffix in suffixes:
            if name.endswith(suffix):
                with contextlib.suppress(ValueError):  # not a partition of ours
                    days.add(date.fromisoformat(name[: -len(suffix)]))
    return days


def quarantined_days(lake: Lake, kind: str) -> list[date]:
    """Days of ``kind`` with a quarantined file or a quarantine report, sorted."""
    return sorted(_days_in(lake, ("quarantine", kind), (".parquet", REPORT_SUFFIX)))


def released_days(lake: Lake, kind: str) -> list[date]:
    return sorted(_days_in(lake, ("quarantine", RELEASED, kind), (".json",)))


# -- reading ---------------------------------------------------------------------------------------------
def _blocking(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"rule": f.get("rule"), "column": f.get("column"), "message": f.get("message"),
             "unexpected_count": f.get("unexpected_count", 0)}
            for f in report.get("findings", []) if f.get("severity") == "block"]


def _modified(lake: Lake, uri: str) -> str | None:
    """When the object at ``uri`` was last written (ISO, UTC), where the filesystem says."""
    try:
        info = lake.fs.info(lake.local_path(uri))
    except (FileNotFoundError, OSError):
        return None
    stamp = info.get("mtime") or info.get("LastModified") or info.get("updated")
    if isinstance(stamp, int | float):
        return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")
    return str(stamp) if stamp else None


def entry(lake: Lake, kind: str, day: date) -> dict[str, Any]:
    """What is known about the quarantined ``kind`` partition of ``day`` (report summary included)."""
    uri, rep_uri = partition_uri(lake, kind, day), report_uri(lake, kind, day)
    report = lake.read_json(rep_uri) if lake.exists(rep_uri) else {}
    what = lake.entry_kind(uri)  # a folder, link or socket is quarantined as it was delivered: never read
    has_file = what != "missing"
    file_sha = lake.sha256(uri) if what == "file" else None

    marker = read_marker(lake, kind, day)
    return {
        "kind": kind, "day": day.isoformat(), "status": "quarantined",
        "uri": uri if has_file else None, "report_uri": rep_uri if report else None,
        "rows": report.get("rows"), "sha256": report.get("sha256") or None,
        # the operator may have fixed the file in place since it was validated
        "file_changed_since_report": bool(file_sha and report.get("sha256") and file_sha != report["sha256"]),
        "quarantined_at": report.get("validated_at") or _modified(lake, rep_uri if report else uri),
        "blocking": _blocking(report),
        "summary": report.get("summary"),
        # a later delivery of the same day went through: this quarantined copy is stale
        "superseded_by_curated": bool(marker and marker.get("sha256") != file_sha
                                      and not _redelivery(marker, report)),
        **({"entry": what} if what not in ("file", "missing") else {}),
    }


def _released_entry(lake: Lake, kind: str, day: date) -> dict[str, Any]:
    record = lake.read_json(release_record_uri(lake, kind, day))
    last = record["releases"][-1]
    return {"kind": kind, "day": day.isoformat(), "status": "released", "uri": last.get("curated_uri"),
            "rows": last.get("rows"), "sha256": last.get("new_sha256"),
            "quarantined_at": last.get("old_report", {}).get("validated_at"),
            "blocking": _blocking(last.get("old_report", {})), "released_at": last.get("released_at"),
            "released_by": last.get("actor"), "release_reason": last.get("reason"),
            "releases": len(record["releases"])}


def list_quarantine(lake: Lake, *, include_released: bool = False) -> list[dict[str, Any]]:
    """Every quarantined partition (and, with ``include_released``, the released ones), by kind and day."""
    out: list[dict[str, Any]] = []
    for kind in KINDS:
        held = quarantined_days(lake, kind)
        out += [entry(lake, kind, d) for d in held]
        if include_released:
            out += [_released_entry(lake, kind, d) for d in released_days(lake, kind) if d not in held]
    return sorted(out, key=lambda e: (e["kind"], e["day"], e["status"]))


def _nothing_there(lake: Lake, kind: str, day: date) -> str:
    """The message for a day that holds no quarantined partition: what does exist instead."""
    held = [d.isoformat() for d in quarantined_days(lake, kind)]
    where = f"quarantined {kind} days: {', '.join(held)}" if held else f"no {kind} partition is quarantined"
    others = {k: len(quarantined_days(lake, k)) for k in KINDS if k != kind}
    more = "".join(f"; {n} {k} partition(s) are" for k, n in others.items() if n)
    if more:
        more += " quarantined (closedloop quarantine list)"
    if lake.exists(release_record_uri(lake, kind, day)):
        last = lake.read_json(release_record_uri(lake, kind, day))["releases"][-1]
        return (f"{kind} {day} is not quarantined: it was released at {last['released_at']} by {last['actor']} "
                f"({last['reason']}); {where}{more}")
    return f"nothing is quarantined for {kind} {day}: {where}{more}"


def show(lake: Lake, kind: str, day: str | date) -> dict[str, Any]:
    """The quarantine entry of ``kind``/``day`` with its full validation report under ``report``."""
    kind, d = check_kind(kind), parse_day(day)
    if d not in quarantined_days(lake, kind):
        raise NoDataError(_nothing_there(lake, kind, d))
    rep_uri = report_uri(lake, kind, d)
    return {**entry(lake, kind, d), "report": lake.read_json(rep_uri) if lake.exists(rep_uri) else None}


# -- release ----------------------------------------------------------------------------------------------
def _redelivery(marker: dict[str, Any], report: dict[str, Any]) -> bool:
    """Whether the quarantined delivery came after the curated one (a re-delivery that failed validation): its
    release is then a new version of the day, as a re-delivery that passes is; one quarantined before the
    curated delivery is stale."""
    return bool(report.get("validated_at") and marker.get("validated_at")
                and str(report["validated_at"]) > str(marker["validated_at"]))


def release(lake: Lake, contract: DataContract, kind: str, day: str | date, *, reason: str,
            actor: str | None = None, fixed_file: str | Path | None = None) -> dict[str, Any]:
    """Validate the quarantined (or the corrected) partition again and, if it passes, curate it.

    ``fixed_file`` (a local path) replaces the quarantined file; without it the quarantined file, fixed
    in place, is used. Returns the release record with ``status`` ``released`` or ``already_released``.
    Raises DataValidationError (the partition stays quarantined, with the new report) when it still
    breaks a blocking rule, ConfigError/NoDataError for a request that cannot be carried out.
    """
    kind, d = check_kind(kind), parse_day(day)
    if not (reason or "").strip():
        raise ConfigError("a release needs a reason (--reason): say what was wrong and what was fixed")
    actor = actor or getpass.getuser()
    q_uri, rep_uri = partition_uri(lake, kind, d), report_uri(lake, kind, d)
    landing = lake.partition("landing", kind, d)
    data = None
    if fixed_file is not None:
        path = Path(fixed_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"--file {path}: no such file; give the corrected Parquet file of {kind} {d}")
        data = path.read_bytes()
    if not lake.exists(q_uri) and not lake.exists(rep_uri):
        # done before? the same request again is answered with its record, anything else is refused
        record_uri = release_record_uri(lake, kind, d)
        marker = read_marker(lake, kind, d)
        if lake.exists(record_uri) and marker is not None:
            last = lake.read_json(record_uri)["releases"][-1]
            if marker.get("sha256") == last["new_sha256"] and (
                    data is None or hashlib.sha256(data).hexdigest() == last["new_sha256"]):
                log.info("%s %s was already released at %s", kind, d, last["released_at"])
                return {**last, "status": "already_released"}
        raise NoDataError(_nothing_there(lake, kind, d))

    q_what = lake.entry_kind(q_uri)
    if q_what not in ("file", "missing") and data is None:
        raise ConfigError(f"{q_uri} is a {q_what}, not a Parquet file: it cannot be released as it is; give the "
                          f"corrected day as one Parquet file with --file")
    if data is None and lake.exists(q_uri):
        data = lake.read_bytes(q_uri)
    elif data is None:
        raise NoDataError(f"{kind} {d}: only the report {rep_uri} is in quarantine, the file itself is missing; "
                          "give the corrected file with --file")
    new_sha = hashlib.sha256(data).hexdigest()
    if lake.exists(landing) and lake.sha256(landing) != new_sha:
        raise ConfigError(f"{landing}: another delivery of {kind} {d} has landed and waits for ingest; ingest it "
                          "(trigger the ingest DAG for that day) or remove it before releasing the quarantined one")
    marker = read_marker(lake, kind, d)
    q_report = lake.read_json(rep_uri) if lake.exists(rep_uri) else {}
    if marker is not None and marker.get("sha256") != new_sha and not _redelivery(marker, q_report):
        raise ConfigError(f"{kind} {d} is already curated from another delivery (sha256 {marker['sha256'][:12]}); "
                          f"the quarantined copy is stale and is not released over it: {q_uri}")

    old_report = lake.read_json(rep_uri) if lake.exists(rep_uri) else {}
    replaced_uri = None
    if fixed_file is not None and q_what not in ("file", "missing"):  # keep the folder (link, ...) replaced
        replaced_uri = lake.uri("quarantine", REPLACED, kind, f"{d.isoformat()}-{q_what}")
        if lake.entry_kind(replaced_uri) != "missing":
            lake.delete(replaced_uri, recursive=True)
        lake.move_entry(q_uri, replaced_uri)
        lake.write_bytes(q_uri, data)
    elif fixed_file is not None and lake.exists(q_uri):
        old_sha = lake.sha256(q_uri)
        if old_sha != new_sha:  # keep what is replaced
            replaced_uri = lake.uri("quarantine", REPLACED, kind, f"{d.isoformat()}-{old_sha[:12]}.parquet")
            lake.copy(q_uri, replaced_uri)
            lake.write_bytes(q_uri, data)
    log.info("releasing %s %s (sha256 %s) for validation again", kind, d, new_sha[:12])
    lake.write_bytes(landing, data)
    try:
        outcome = ingest_partition(lake, contract, kind, d)
    except DataValidationError as exc:
        # ingest quarantined it again (file and new report): it stays where it was
        raise DataValidationError(
            f"release of {kind} {d} refused: it still breaks blocking rules and stays quarantined.\n{exc}",
            report_uri=exc.report_uri, quarantine_uri=exc.quarantine_uri) from exc

    record = {
        "kind": kind, "day": d.isoformat(), "released_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "actor": actor, "reason": reason.strip(), "file": str(fixed_file) if fixed_file is not None else None,
        "old_sha256": old_report.get("sha256"), "new_sha256": new_sha, "old_report": old_report,
        "rows": outcome.rows, "warnings": outcome.warnings, "curated_uri": lake.partition("curated", kind, d),
        "replaced_uri": replaced_uri, "version": outcome.version, "curated_first": outcome.curated_first,
        "recomputed": outcome.recomputed,
    }
    record_uri = release_record_uri(lake, kind, d)
    earlier = lake.read_json(record_uri)["releases"] if lake.exists(record_uri) else []
    if earlier and (earlier[-1]["old_sha256"], earlier[-1]["new_sha256"]) == (record["old_sha256"], new_sha):
        record = earlier[-1]  # recorded by an attempt interrupted before its clean-up: not twice
    else:
        lake.write_json(record_uri, {"kind": kind, "day": d.isoformat(), "releases": [*earlier, record]})
    lake.delete(q_uri)
    lake.delete(rep_uri)
    log.info("%s %s released by %s: %s", kind, d, actor, reason)
    return {**record, "status": "released"}
