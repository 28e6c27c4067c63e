"""Ingest: validate a landed daily partition, then curate it or quarantine it.

A partition that breaks a blocking rule moves to ``quarantine/`` with its validation report and
:class:`~closedloop.core.errors.DataValidationError` names the file, each failed rule, its column and
sample values. A valid one (warnings included) is written to ``curated/`` with, for transactions, its
entity-feature rows (one per event, the state before it, and one closing row per customer active that
day, the state after the day: see :mod:`closedloop.stages.aggregates`); a marker with the validation result is
written last and makes the step idempotent: a partition whose landed content is unchanged is not
validated again (its feature rows are rewritten only when an older version wrote them without closing rows).

Arrival order does not matter: the lookback days of a transactions day that wait in landing are curated
first, and a day curated after later ones (late, released, re-delivered) recomputes its customers' rows of
the later days its lookback reaches (:func:`recompute_dependents`). A re-delivery whose content differs from
the curated copy is a new version; the previous curated copy is kept under ``curated/_versions/``
(:func:`version_uri`, :func:`version_of`) and the marker's ``versions`` records each change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn

from closedloop.core.errors import ConfigError, DataValidationError, NoDataError
from closedloop.core.lake import KINDS, Lake
from closedloop.core.runconf import INGEST, check, parse_day
from closedloop.stages.aggregates import compute_entity_features
from closedloop.stages.feast_store import apply_definitions, materialize_window
from closedloop.stages.validation import (
    BLOCK,
    READABLE_RULE,
    WARN,
    Finding,
    ValidationResult,
    exact_duplicates,
    sample_values,
    validate_partition,
)

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.core.schema import DataContract
    from closedloop.stages.runtime import Runtime

log = logging.getLogger(__name__)

# what a transactions partition's feature rows hold (recorded in its marker): event rows and closing rows.
# A partition curated before closing rows existed gets its feature rows rewritten, without validating again.
FEATURE_ROWS = "events+closing"


@dataclass
class IngestOutcome:
    """What happened to one partition."""

    kind: str
    day: str
    status: str  # curated | already_curated | quarantined | missing
    uri: str
    sha256: str = ""
    rows: int = 0
    warnings: list[str] = field(default_factory=list)
    report_uri: str = ""
    version: int = 1  # the delivery's number: 2 and more for a re-delivery that differed (see ``versions``)
    change: dict[str, Any] | None = None  # a re-delivery: rows added, removed, changed against the previous one
    curated_first: list[str] = field(default_factory=list)  # lookback days landed, not curated: curated first
    recomputed: list[str] = field(default_factory=list)  # later days whose feature rows were recomputed

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def marker_uri(lake: Lake, kind: str, day: date) -> str:
    return lake.partition("curated", f"_validation/{kind}", day, suffix=".json")


def read_marker(lake: Lake, kind: str, day: date) -> dict[str, Any] | None:
    """The validation marker of a curated partition, or None when it is not curated."""
    uri = marker_uri(lake, kind, day)
    return lake.read_json(uri) if lake.exists(uri) else None


def normalise(df: pd.DataFrame, contract: DataContract, kind: str) -> pd.DataFrame:
    """Cast a validated partition to the contract's types (categories as strings, timestamps UTC).

    Applies the lossless repairs validation records as ``normalise`` findings: exact repeats of a row are
    dropped, timestamps of another zone become UTC; columns the contract does not know are left out.
    """
    import pandas as pd

    repeats = exact_duplicates(df, contract.row_key)
    if repeats is not None and repeats.any():
        df = df.loc[~repeats.to_numpy()]
    cols = contract.landing_columns if kind == "transactions" else contract.label_columns
    out = df[list(cols)].copy()
    for name, dtype in cols.items():
        if dtype == "timestamp":
            out[name] = pd.to_datetime(out[name], utc=True).astype("datetime64[ns, UTC]")
        elif dtype in ("string", "category"):
            out[name] = out[name].astype("string").astype(object)
        elif dtype == "int64":
            out[name] = out[name].astype("int64")
        elif dtype == "float64":
            out[name] = out[name].astype("float64")
        elif dtype == "bool":
            out[name] = out[name].astype(bool)
    return out


def _history(lake: Lake, contract: DataContract, day: date,
             cache: dict[date, pd.DataFrame] | None = None) -> tuple[pd.DataFrame | None, list[str]]:
    """Curated transactions of the lookback period before ``day`` (context for aggregates).

    ``cache`` (day -> frame) spares re-reading the same days when a whole window is ingested in order.
    """
    import pandas as pd

    first = day - contract.lookback
    days = [d for d in lake.list_days("curated", "transactions") if first <= d < day]
    if not days:
        return None, []
    cols = [contract.entity, contract.event_timestamp,
            *sorted({a.column for a in contract.aggregates if a.column})]
    cache = {} if cache is None else cache
    for d in days:
        if d not in cache:
            cache[d] = lake.read_parquet(lake.partition("curated", "transactions", d), columns=cols)
    for d in [d for d in cache if d < first]:
        del cache[d]
    return pd.concat([cache[d] for d in days], ignore_index=True), [d.isoformat() for d in days]


def write_entity_features(lake: Lake, contract: DataContract, day: date, frame: pd.DataFrame,
                          history_cache: dict[date, pd.DataFrame] | None = None) -> list[str]:
    """Write the feature-view partition of ``day`` from its curated transactions; returns the history days used."""
    history, history_days = _history(lake, contract, day, history_cache)
    feats = compute_entity_features(frame, contract, history, closing_rows=True)
    lake.write_parquet(feats, lake.partition("curated", contract.feature_view, day))
    return history_days


def _upgrade_features(lake: Lake, contract: DataContract, kind: str, day: date, marker: dict[str, Any],
                      history_cache: dict[date, pd.DataFrame] | None) -> None:
    """Rewrite the feature rows of a partition curated by an older version (no closing rows); marker updated."""
    if kind != "transactions" or not contract.aggregates or marker.get("feature_rows") == FEATURE_ROWS:
        return
    curated = lake.partition("curated", kind, day)
    if not lake.exists(curated):
        return
    log.info("%s: feature rows written before closing rows existed; rewriting them", curated)
    history_days = write_entity_features(lake, contract, day, lake.read_parquet(curated), history_cache)
    lake.write_json(marker_uri(lake, kind, day), {**marker, "feature_rows": FEATURE_ROWS,
                                                  "history_days": history_days})


# -- versions: a re-delivery that differs from its curated copy -------------------------------------------
VERSIONS = "_versions"  # curated/_versions/<kind>/<day>_<sha12>.parquet (and .json): superseded deliveries
KEEP_RECORDS = 20  # recomputation records kept in a marker (the newest)


def version_uri(lake: Lake, kind: str, day: date, sha: str, suffix: str = ".parquet") -> str:
    """Where the curated copy of the ``kind`` delivery of ``day`` whose landed file hashed ``sha`` is kept once a
    re-delivery supersedes it: outside Feast's source (``curated/<feature view>/``), so no reader sees two."""
    return lake.uri("curated", VERSIONS, kind, f"{day.isoformat()}_{sha[:12]}{suffix}")


def version_of(lake: Lake, kind: str, day: date, sha: str) -> str:
    """The curated copy of the ``kind`` delivery of ``day`` whose landed file hashed ``sha`` (the hash a training
    set's lineage names): the current partition, or the kept version; NoDataError when housekeeping pruned it."""
    marker = read_marker(lake, kind, day)
    if marker is not None and marker.get("sha256") == sha:
        return lake.partition("curated", kind, day)
    uri = version_uri(lake, kind, day, sha)
    if lake.exists(uri):
        return uri
    kept = [v["sha256"][:12] for v in (marker or {}).get("versions", [])]
    raise NoDataError(f"{kind} {day}: no curated copy of the delivery {sha[:12]} (current: "
                      f"{(marker or {}).get('sha256', 'none')[:12]}; kept versions: {', '.join(kept) or 'none'}); "
                      f"housekeeping.keep_versions_days may have pruned it")


def row_changes(old: pd.DataFrame, new: pd.DataFrame, key: str, sample: int = 5) -> dict[str, Any]:
    """Rows added, removed and changed (same ``key``, another value in a shared column) from ``old`` to ``new``.

    Keys repeated on either side (not a curated partition's case: validation refuses them) are compared as
    whole rows: what is in one only counts as added or removed."""
    import pandas as pd

    if not (old[key].is_unique and new[key].is_unique):
        cols = [c for c in new.columns if c in old.columns]
        h_old = pd.util.hash_pandas_object(old[cols], index=False)
        h_new = pd.util.hash_pandas_object(new[cols], index=False)
        added_rows, removed_rows = new[~h_new.isin(h_old).to_numpy()], old[~h_old.isin(h_new).to_numpy()]
        return {"rows_before": len(old), "rows_after": len(new), "added": len(added_rows),
                "removed": len(removed_rows), "changed": 0,
                "sample_added": [str(k) for k in added_rows[key].iloc[:sample]],
                "sample_removed": [str(k) for k in removed_rows[key].iloc[:sample]], "sample_changed": []}
    a, b = old.set_index(key), new.set_index(key)
    added, removed = b.index.difference(a.index), a.index.difference(b.index)
    common = b.index.intersection(a.index)
    cols = [c for c in b.columns if c in a.columns]
    x, y = a.loc[common, cols], b.loc[common, cols]
    same = (x == y) | (x.isna() & y.isna())
    changed = common[~same.all(axis=1).to_numpy()]
    return {"rows_before": len(old), "rows_after": len(new), "added": len(added), "removed": len(removed),
            "changed": len(changed), "sample_added": [str(k) for k in added[:sample]],
            "sample_removed": [str(k) for k in removed[:sample]],
            "sample_changed": [str(k) for k in changed[:sample]]}


def _touched_entities(old: pd.DataFrame | None, new: pd.DataFrame, contract: DataContract) -> set[Any]:
    """The entities whose events differ between two versions of a day (every entity of ``new`` when first):
    those of the rows that are in exactly one of them, compared on every shared column."""
    import pandas as pd

    ent = contract.entity
    if old is None:
        return set(new[ent].unique())
    cols = [c for c in new.columns if c in old.columns]
    both = pd.concat([old[cols], new[cols]], ignore_index=True)
    once = ~pd.util.hash_pandas_object(both, index=False).duplicated(keep=False).to_numpy()
    return set(both.loc[once, ent].unique())


def _archive(lake: Lake, kind: str, day: date, marker: dict[str, Any]) -> str:
    """Keep the curated copy named by ``marker`` (and the marker) as a version; repeatable (kept once)."""
    uri = version_uri(lake, kind, day, marker["sha256"])
    if not lake.exists(uri):
        lake.copy(lake.partition("curated", kind, day), uri)
    lake.write_json(version_uri(lake, kind, day, marker["sha256"], ".json"),
                    {k: v for k, v in marker.items() if k != "versions"})
    return uri


def list_versions(lake: Lake) -> list[tuple[str, date, str, str]]:
    """Every kept version: ``(kind, day, sha12, URI)``, by kind and day."""
    out = []
    for kind in KINDS:
        base = lake.uri("curated", VERSIONS, kind)
        if not lake.exists(base):
            continue
        for path in lake.fs.ls(lake.local_path(base), detail=False):
            name = str(path).rstrip("/").rsplit("/", 1)[-1]
            stem, _, sha = name.removesuffix(".parquet").partition("_")
            if name.endswith(".parquet") and sha:
                try:
                    out.append((kind, date.fromisoformat(stem), sha, f"{base}/{name}"))
                except ValueError:
                    continue
    return sorted(out)


# -- arrival order: curate the lookback first, recompute the days after a late or changed one --------------
def _landed_stat(lake: Lake, uri: str) -> str:
    """Size and modification time of a landed file: unchanged, its content need not be hashed again."""
    try:
        info = lake.fs.info(lake.local_path(uri))
    except (FileNotFoundError, OSError):
        return ""
    return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('updated')}"


def _waiting(lake: Lake, kind: str, day: date) -> bool:
    """Whether the landed ``kind`` partition of ``day`` is not curated as it is (never, or another delivery).

    A file whose size and time are those the marker recorded is the one curated (no hash needed); otherwise
    its hash decides."""
    landing = lake.partition("landing", kind, day)
    marker = read_marker(lake, kind, day)
    if lake.entry_kind(landing) != "file":
        return marker is None and lake.entry_kind(landing) != "missing"
    if marker is None:
        return True
    if marker.get("landed_stat") and marker["landed_stat"] == _landed_stat(lake, landing):
        return False
    return marker.get("sha256") != lake.sha256(landing)


def _curate_lookback(lake: Lake, contract: DataContract, day: date, history_cache: dict[date, pd.DataFrame] | None,
                     id_index: CuratedIds | None) -> tuple[list[str], list[str]]:
    """Ingest the transactions days of ``day``'s lookback that landed but are not curated (as landed), oldest first,
    so that ``day`` is never computed on a partial history. Returns (days curated, warnings for days quarantined:
    those are not data, and their release recomputes ``day``)."""
    first = day - contract.lookback
    done, warnings = [], []
    for d in [d for d in lake.list_days("landing", "transactions") if first <= d < day]:
        if not _waiting(lake, "transactions", d):
            continue
        log.warning("%s: lookback day %s landed but is not curated: curating it first", day, d)
        try:
            ingest_partition(lake, contract, "transactions", d, history_cache, id_index=id_index)
            done.append(d.isoformat())
        except DataValidationError as exc:
            warnings.append(f"lookback_curated_first(transactions): lookback day {d} was quarantined "
                            f"({exc.report_uri}); {day} is computed without it and recomputed when it is released")
    return done, warnings


def recompute_dependents(lake: Lake, contract: DataContract, day: date, entities: set[Any],
                         history_cache: dict[date, pd.DataFrame] | None = None) -> list[str]:
    """Recompute, for ``entities`` only, the feature rows of every curated day whose lookback holds ``day``.

    ``(day, day + lookback]``: the other entities' rows are kept as they are. Each recomputed day's marker
    records it (``recomputed``: after which day, how many entities, when). Returns the days recomputed.
    """
    import pandas as pd

    if not contract.aggregates or not entities:
        return []
    ent, ts = contract.entity, contract.event_timestamp
    cols = [ent, ts, *sorted({a.column for a in contract.aggregates if a.column})]
    keys = pd.Index(list(entities))
    curated_days = lake.list_days("curated", "transactions")
    later = [d for d in curated_days if day < d <= day + contract.lookback
             and read_marker(lake, "transactions", d) is not None
             and lake.exists(lake.partition("curated", contract.feature_view, d))]
    mine_of: dict[date, pd.DataFrame] = {}  # each day's events of ``entities``, read once

    def events_of(d: date) -> pd.DataFrame:
        if d not in mine_of:
            cached = history_cache.get(d) if history_cache is not None else None
            frame = cached if cached is not None else lake.read_parquet(
                lake.partition("curated", "transactions", d), columns=cols)
            mine_of[d] = frame[frame[ent].isin(keys)]
        return mine_of[d]

    if not later:
        return []
    # one computation for every later day: its events are the targets, the other curated days of the period
    # (before the first later day, within its lookback; days between without a marker) the history. A window
    # of a target event never reaches before its own day's lookback, so each row is what a computation of its
    # day alone gives (the same values, summed in another grouping of the tree: equal to a few ulps)
    targets = pd.concat([events_of(d) for d in later], ignore_index=True)
    context = [x for x in curated_days if later[0] - contract.lookback <= x < later[-1] and x not in later]
    history = pd.concat([events_of(x) for x in context], ignore_index=True) if context else None
    new_all = compute_entity_features(targets, contract, history, closing_rows=True) if len(targets) else None
    new_day = None if new_all is None else new_all[ts].dt.tz_convert("UTC").dt.date.to_numpy()
    done = []
    for d in later:
        mine = events_of(d)
        lookback = [x for x in curated_days if d - contract.lookback <= x < d]
        feats_uri = lake.partition("curated", contract.feature_view, d)
        old = lake.read_parquet(feats_uri)
        kept = old[~old[ent].isin(keys)]
        if len(mine):
            new = new_all[new_day == d]
            feats = pd.concat([kept, new], ignore_index=True).sort_values([ent, ts], kind="stable")
        else:
            feats = kept
        if len(mine) or len(kept) != len(old):
            lake.write_parquet(feats.reset_index(drop=True), feats_uri)
        marker = read_marker(lake, "transactions", d) or {}
        record = {"after": day.isoformat(), "entities": int(mine[ent].nunique()),
                  "rows": int(len(feats) - len(kept)), "at": datetime.now(UTC).isoformat(timespec="seconds")}
        lake.write_json(marker_uri(lake, "transactions", d), {
            **marker, "history_days": [x.isoformat() for x in lookback],
            "recomputed": [*marker.get("recomputed", []), record][-KEEP_RECORDS:]})
        log.info("%s: feature rows of %d entit(ies) recomputed after %s changed", d, record["entities"], day)
        done.append(d.isoformat())
    return done


def quarantine(lake: Lake, kind: str, day: date, report: dict[str, Any]) -> tuple[str, str]:
    """Move a landed partition to quarantine with its report; returns (partition URI, report URI).

    What is not a regular file (a folder of parts, a link, a socket) is moved as it is, never read.
    """
    src = lake.partition("landing", kind, day)
    dst = lake.partition("quarantine", kind, day)
    report_uri = lake.partition("quarantine", kind, day, suffix=".validation.json")
    lake.write_json(report_uri, report)
    entry = lake.entry_kind(src)
    if entry == "file":
        lake.move(src, dst)
    elif entry != "missing":
        if lake.entry_kind(dst) != "missing":
            lake.delete(dst, recursive=True)
        lake.move_entry(src, dst)
    return dst, report_uri


def _not_a_file(lake: Lake, uri: str, kind: str, day: date, entry: str) -> Any:
    """The validation result of a landed entry that is not a regular file: unreadable, named, never opened."""
    name = uri.rsplit("/", 1)[-1]
    what = {"directory": "a folder (e.g. Parquet parts written as a dataset)", "symlink": "a symbolic link"}.get(
        entry, f"a {entry}")
    return ValidationResult(uri=uri, kind=kind, day=day.isoformat(), rows=0, sha256="", findings=[Finding(
        READABLE_RULE, None, BLOCK,
        f"{name} in landing is {what}, not a regular Parquet file: it is not read. Deliver the day as one "
        f"Parquet file (e.g. merge the parts with pyarrow.parquet.write_table) named {name}.", 0, [name])])


def _reject(lake: Lake, kind: str, day: date, result: Any) -> NoReturn:
    """Quarantine the landed partition with its validation report and raise DataValidationError."""
    report = result.to_dict()
    report["summary"] = result.summary()
    report["validated_at"] = datetime.now(UTC).isoformat()
    dst, report_uri = quarantine(lake, kind, day, report)
    log.error("%s", report["summary"])
    raise DataValidationError(report["summary"] + f"\nThe partition was moved to {dst}; report: {report_uri}",
                              report_uri=report_uri, quarantine_uri=dst)


def ingest_partition(lake: Lake, contract: DataContract, kind: str, day: date,
                     history_cache: dict[date, pd.DataFrame] | None = None, *, label_grace_days: int = 21,
                     known_ids: dict[date, Any] | None = None, id_index: CuratedIds | None = None
                     ) -> IngestOutcome:
    """Validate and curate (or quarantine) the landed ``kind`` partition of ``day``.

    Raises DataValidationError (after quarantining) on a blocking finding, and NoDataError when the
    partition neither landed nor was curated before. What sits in landing under the partition's name but
    is not a regular file (a folder, a link, a socket) is quarantined as unreadable, never opened. A
    transactions partition whose ids were curated on another day is quarantined naming both days
    (``id_index``: the index of curated ids, shared by the days of a window).
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    landing = lake.partition("landing", kind, day)
    marker = read_marker(lake, kind, day)
    entry = lake.entry_kind(landing)
    if entry not in ("file", "missing"):
        return _reject(lake, kind, day, _not_a_file(lake, landing, kind, day, entry))
    if entry == "missing":
        if marker is not None:
            _upgrade_features(lake, contract, kind, day, marker, history_cache)
            return IngestOutcome(kind, day.isoformat(), "already_curated", marker["uri"], marker["sha256"],
                                 marker["rows"], marker.get("warnings", []))
        report_uri = lake.partition("quarantine", kind, day, suffix=".validation.json")
        if lake.exists(report_uri):
            report = lake.read_json(report_uri)
            raise DataValidationError(report.get("summary", f"{landing}: quarantined"),
                                      report_uri=report_uri, quarantine_uri=lake.partition("quarantine", kind, day))
        raise NoDataError(f"{landing}: no {kind} partition landed for {day} (and none curated)")

    landed_stat = _landed_stat(lake, landing)  # before the hash: a file replaced meanwhile is hashed again later
    sha = lake.sha256(landing)
    if marker is not None and marker.get("sha256") == sha:
        log.info("%s: unchanged since validated (%s), not validated again", landing, sha[:12])
        _upgrade_features(lake, contract, kind, day, marker, history_cache)
        return IngestOutcome(kind, day.isoformat(), "already_curated", landing, sha, marker["rows"],
                             marker.get("warnings", []))

    features = kind == "transactions" and bool(contract.aggregates)
    if kind == "transactions" and id_index is None:
        id_index = CuratedIds(lake, contract)
    curated_first: list[str] = []
    lookback_warnings: list[str] = []
    if features:  # never on a partial history: the lookback's landed days are curated first (before this day's
        # checks, so that the id check sees their ids)
        curated_first, lookback_warnings = _curate_lookback(lake, contract, day, history_cache, id_index)
    result = validate_partition(lake, landing, contract, kind, day)
    if kind == "labels" and result.passed:
        unknown = unknown_label_finding(lake, contract, day, landing, label_grace_days, known_ids)
        if unknown is not None:
            result.findings.append(unknown)
    landed = lake.read_parquet(landing) if result.passed else None
    if kind == "transactions" and landed is not None:
        repeated = id_index.repeated_finding(landed[contract.row_key], day)
        if repeated is not None:
            result.findings.append(repeated)
    if not result.passed:
        _reject(lake, kind, day, result)
    report = {**result.to_dict(), "summary": result.summary(), "validated_at": datetime.now(UTC).isoformat()}

    frame = normalise(landed, contract, kind)
    curated = lake.partition("curated", kind, day)
    previous, versions, change = None, [], None
    if marker is not None and lake.exists(curated):  # a re-delivery that differs: the curated copy is a version
        kept_uri = _archive(lake, kind, day, marker)
        previous = lake.read_parquet(kept_uri)  # not the curated copy: an interrupted attempt may have rewritten it
        change = row_changes(previous, frame, contract.row_key)
        versions = [*marker.get("versions", []), {
            "sha256": marker["sha256"], "rows": marker.get("rows"), "validated_at": marker.get("validated_at"),
            "superseded_at": datetime.now(UTC).isoformat(timespec="seconds"), "uri": kept_uri, "change": change}]
        log.warning("%s: re-delivered and different from its curated copy (%s): %d row(s) added, %d removed, "
                    "%d changed; the previous delivery is kept at %s", landing, marker["sha256"][:12],
                    change["added"], change["removed"], change["changed"], kept_uri)
    lake.write_parquet(frame, curated)
    if history_cache is not None:
        history_cache.pop(day, None)
    if kind == "transactions":
        id_index.add(day, frame[contract.row_key])
    history_days: list[str] = []
    recomputed: list[str] = []
    if features:
        cache = {} if history_cache is None else history_cache  # the lookback read once for both
        history_days = write_entity_features(lake, contract, day, frame, cache)
        recomputed = recompute_dependents(lake, contract, day, _touched_entities(previous, frame, contract), cache)
    warnings = [f"{f.rule}({f.column}): {f.message}" for f in result.warnings] + lookback_warnings
    for w in warnings:
        log.warning("%s: %s", landing, w)
    normalised = [f"{f.rule}({f.column}): {f.message}" for f in result.normalised]
    for n in normalised:
        log.warning("%s: normalised: %s", landing, n)
    lake.write_json(marker_uri(lake, kind, day), {
        **report, "uri": landing, "sha256": sha, "rows": len(frame), "warnings": warnings,
        "normalisations": normalised,
        "curated_uri": curated, "history_days": history_days,
        **({"feature_rows": FEATURE_ROWS} if features else {}),
        "version": len(versions) + 1, "versions": versions, "landed_stat": landed_stat,
        **({"curated_first": curated_first, "recomputed_days": recomputed} if features else {}),
    })
    return IngestOutcome(kind, day.isoformat(), "curated", landing, sha, len(frame), warnings + normalised,
                         version=len(versions) + 1, change=change, curated_first=curated_first,
                         recomputed=recomputed)


REPEATED_IDS_RULE = "row_key_unique_across_days"
ID_INDEX = "_index/transaction_ids"  # curated/_index/transaction_ids/<day>.parquet: fingerprints of its ids


def _fingerprints(ids: Any) -> Any:
    """64-bit hashes of ids (as strings): what the index holds; a hit is confirmed on the ids themselves."""
    import numpy as np
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids, dtype=object).astype(str).astype(object))


class CuratedIds:
    """The ids of every curated transactions partition, as sorted 64-bit fingerprints with their day.

    Each curated day keeps its fingerprints in ``curated/_index/transaction_ids/<day>.parquet`` (8 bytes an
    id, written when the day is curated, built from the curated partition the first time it is missing), so
    that a check reads 8 bytes per curated id once per process, not the ids. Looking up a new day's ids is
    one binary search each in one sorted array (days curated since are searched apart until they
    outgrow a quarter of it); a fingerprint found is confirmed against the ids of the day it names.
    """

    def __init__(self, lake: Lake, contract: DataContract) -> None:
        self.lake, self.contract = lake, contract
        self._loaded: set[date] = set()
        self._base: tuple[Any, Any] | None = None  # (sorted fingerprints, their day ordinals)
        self._recent: list[tuple[Any, int]] = []

    def _index_uri(self, day: date) -> str:
        return self.lake.partition("curated", ID_INDEX, day)

    def _load(self) -> None:
        import numpy as np
        import pandas as pd

        new = []
        for d in self.lake.list_days("curated", "transactions"):
            if d in self._loaded:
                continue
            uri = self._index_uri(d)
            if self.lake.exists(uri):
                fp = self.lake.read_parquet(uri)["fingerprint"].to_numpy(np.uint64)
            else:  # curated before the index existed: build it once
                ids = self.lake.read_parquet(self.lake.partition("curated", "transactions", d),
                                             columns=[self.contract.row_key])[self.contract.row_key]
                fp = np.sort(_fingerprints(ids))
                self.lake.write_parquet(pd.DataFrame({"fingerprint": fp}), uri)
            new.append((fp, d.toordinal()))
            self._loaded.add(d)
        if new:
            self._recent += new
            self._compact(force=self._base is None)

    def _compact(self, force: bool = False) -> None:
        import numpy as np

        recent = sum(len(fp) for fp, _ in self._recent)
        base = 0 if self._base is None else len(self._base[0])
        if not self._recent or not (force or recent > base // 4):
            return
        parts = ([self._base] if self._base is not None else []) + [
            (fp, np.full(len(fp), o, dtype=np.int64)) for fp, o in self._recent]
        fps = np.concatenate([p[0] for p in parts])
        days = np.concatenate([p[1] for p in parts])
        order = np.argsort(fps, kind="stable")
        self._base, self._recent = (fps[order], days[order]), []

    def add(self, day: date, ids: Any) -> None:
        """Record the ids of ``day`` just curated (and write its index file)."""
        import numpy as np
        import pandas as pd

        fp = np.sort(_fingerprints(ids))
        self.lake.write_parquet(pd.DataFrame({"fingerprint": fp}), self._index_uri(day))
        if self._loaded:  # loaded already: keep it current; else the next check loads everything
            self._loaded.add(day)
            self._recent.append((fp, day.toordinal()))
            self._compact()

    def _candidates(self, fp: Any, day: date) -> dict[date, Any]:
        """Day -> mask of ``fp`` whose fingerprint that day (another than ``day``) holds."""
        import numpy as np

        found: dict[date, Any] = {}
        if self._base is not None and len(self._base[0]):
            fps, days = self._base
            pos = np.minimum(np.searchsorted(fps, fp), len(fps) - 1)
            hit = fps[pos] == fp
            # a fingerprint repeated in the base (an id of several days) is seen once here: its first day;
            # the confirmation below reads that day's ids, and the finding names it
            for o in np.unique(days[pos[hit]]):
                if o != day.toordinal():
                    found[date.fromordinal(int(o))] = hit & (days[pos] == o)
        for rfp, o in self._recent:
            if o != day.toordinal():
                mask = np.isin(fp, rfp)
                if mask.any():
                    d = date.fromordinal(o)
                    found[d] = found[d] | mask if d in found else mask
        return found

    def repeated_finding(self, ids: pd.Series, day: date) -> Any:
        """A blocking finding when ids of ``day`` were curated on other days (naming the days and sample ids)."""
        import pandas as pd

        self._load()
        fp = _fingerprints(ids)
        clashes: dict[str, list[Any]] = {}
        total = pd.Series(False, index=range(len(ids)))
        for d, mask in sorted(self._candidates(fp, day).items()):
            cand = ids[mask]
            curated = self.lake.read_parquet(self.lake.partition("curated", "transactions", d),
                                             columns=[self.contract.row_key])[self.contract.row_key]
            same = cand.isin(curated)
            if same.any():
                clashes[d.isoformat()] = sample_values(cand[same.to_numpy()])
                total |= pd.Series(ids.isin(cand[same.to_numpy()]).to_numpy())
        if not clashes:
            return None
        days = "; ".join(f"{d} (e.g. {', '.join(map(str, sample[:3]))})" for d, sample in clashes.items())
        return Finding(REPEATED_IDS_RULE, self.contract.row_key, BLOCK,
                       f"{int(total.sum())} {self.contract.row_key} value(s) of {day} were curated already on "
                       f"another day: {days}. A transaction belongs to one day: remove the repeats from this "
                       f"delivery (or quarantine the other day's partition if it is the wrong one) and deliver "
                       f"it again.", int(total.sum()), sorted({x for s in clashes.values() for x in s})[:10])


UNKNOWN_LABELS_RULE = "labels_of_known_transactions"


def unknown_label_finding(lake: Lake, contract: DataContract, day: date, uri: str, grace_days: int,
                          cache: dict[date, Any] | None = None) -> Any:
    """A warning when labels of ``day`` name transactions that no transactions partition of the grace period holds.

    Judged whatever else sits in landing: transactions of the period still waiting in landing (not curated
    yet) count as known when their file can be read; anything else there (an unreadable file, a folder, a
    link) is named in the message and proves nothing either way.

    Such labels cannot be joined to features (the training set leaves them out); a few are late labels of
    transactions that were quarantined, many are a label feed pointing at the wrong system.
    """
    import pandas as pd

    first = day - timedelta(days=grace_days)
    pending = [d for d in lake.list_days("landing", "transactions")
               if first <= d <= day and read_marker(lake, "transactions", d) is None]
    waiting: list[Any] = []
    unreadable: list[str] = []
    for d in pending:  # transactions of the period not curated yet: their ids count when they can be read
        landed = lake.partition("landing", "transactions", d)
        try:
            if lake.entry_kind(landed) != "file":
                raise OSError(f"a {lake.entry_kind(landed)}, not a file")
            waiting.append(pd.Index(lake.read_parquet(landed, columns=[contract.row_key])[contract.row_key]))
        except Exception as exc:  # judged by its own ingest; here it only cannot vouch for any label
            log.info("%s: not read for the unknown-label check (%s)", landed, exc)
            unreadable.append(d.isoformat())
    labels = lake.read_parquet(uri, columns=[contract.row_key])[contract.row_key]
    cache = {} if cache is None else cache
    # Each curated day's ids are kept as an Index, whose hash table is built once and reused by every
    # label day of the window (concatenating the period's ids per label day rehashed them all: 4.5 s of
    # the 1M-row window's 48 label days). Newest day first: most labels name recent transactions.
    unknown = labels
    for ids in waiting:
        unknown = unknown[~unknown.isin(ids).to_numpy()]
    for d in sorted((d for d in lake.list_days("curated", "transactions") if first <= d <= day), reverse=True):
        if unknown.empty:
            break
        if d not in cache:
            cache[d] = pd.Index(lake.read_parquet(lake.partition("curated", "transactions", d),
                                                  columns=[contract.row_key])[contract.row_key])
        ids = cache[d]
        found = ids.get_indexer(unknown) >= 0 if ids.is_unique else unknown.isin(ids).to_numpy()
        unknown = unknown[~found]
    if unknown.empty:
        return None
    return Finding(UNKNOWN_LABELS_RULE, contract.row_key, WARN,
                   f"{len(unknown)} of {len(labels)} label(s) name transactions that no curated (or landed, "
                   f"readable) transactions partition of [{first}, {day}] holds; they are kept but cannot be used "
                   f"for training." + (f" Unreadable transactions in landing, not judged: {', '.join(unreadable)}."
                                       if unreadable else ""),
                   len(unknown), sample_values(unknown))


def refuse_after_newest(days: list[date], start: date, what: str) -> None:
    """Raise NoDataError, before anything is written, when ``start`` is after the newest landed or curated day.

    A window after the data would curate nothing of its own (only its lookback), materialise an empty
    interval and move the online store's high-water mark to a date no data has reached.
    """
    newest = max(days, default=None)
    if newest is None or start > newest:
        raise NoDataError(f"{what} starts after the newest transactions landed or curated "
                          f"({newest or 'none yet'}): nothing to do, and nothing was written. Pick a window that "
                          f"holds landed days (the files of the lake's landing/transactions/ name them), or deliver "
                          f"the days first.")


def ingest_window(lake: Lake, contract: DataContract, start: date, end: date, *, label_grace_days: int = 0,
                  with_lookback: bool = True) -> list[IngestOutcome]:
    """Ingest every landed partition a window needs, in day order, and report all problems at once.

    Transactions of ``[start - lookback, end)`` (the lookback feeds the customer aggregates) and
    labels of ``[start, end + grace)``. Every bad partition is quarantined before the error is raised.
    """
    first = start - contract.lookback if with_lookback else start
    tx_days = sorted(set(lake.list_days("landing", "transactions")) | set(lake.list_days("curated", "transactions")))
    refuse_after_newest(tx_days, start, f"window {start}..{end}")
    label_days = sorted(set(lake.list_days("landing", "labels")) | set(lake.list_days("curated", "labels")))
    plan = [("transactions", d) for d in tx_days if first <= d < end]
    plan += [("labels", d) for d in label_days if start <= d < end + timedelta(days=label_grace_days)]
    outcomes: list[IngestOutcome] = []
    errors: list[DataValidationError] = []
    cache: dict[date, pd.DataFrame] = {}
    known_ids: dict[date, Any] = {}
    id_index = CuratedIds(lake, contract)
    label_lookback = label_grace_days or contract.lookback.days  # how far back a label's transaction may lie
    for kind, day in plan:
        try:
            outcomes.append(ingest_partition(lake, contract, kind, day, cache, label_grace_days=label_lookback,
                                             known_ids=known_ids, id_index=id_index))
        except DataValidationError as exc:
            errors.append(exc)
            outcomes.append(IngestOutcome(kind, day.isoformat(), "quarantined",
                                          exc.quarantine_uri or "", report_uri=exc.report_uri or ""))
    if errors:
        msg = "\n\n".join(str(e) for e in errors)
        raise DataValidationError(f"{len(errors)} partition(s) of window {start}..{end} failed validation:\n\n{msg}",
                                  report_uri=errors[0].report_uri, quarantine_uri=errors[0].quarantine_uri)
    return outcomes


def resolve_day(conf: dict[str, Any] | None, interval_start: Any = None) -> date:
    """The day an ingest run works on: ``conf["day"]`` when given, else its data interval's start."""
    conf = check(conf, INGEST)
    if conf.get("day"):
        return parse_day(conf["day"])
    if interval_start is None:
        raise ConfigError("ingest run configuration refused: a triggered run needs day (YYYY-MM-DD)")
    return parse_day(interval_start)


def ingest_day(rt: Runtime, day: date) -> dict[str, Any]:
    """Validate and curate the transactions and (when they landed) the labels of ``day``.

    ``features_changed``: the days whose feature rows this run wrote (the day, lookback days curated first,
    later days recomputed), which :func:`materialise_day` materialises. A partition re-delivered with another
    content has its ``change`` (the task raises :func:`closedloop.stages.alerts.redelivery_alert` for it).
    """
    grace = rt.settings.config.typed.ingest.label_grace_days
    outcomes = [ingest_partition(rt.lake, rt.contract, "transactions", day)]
    if rt.lake.exists(rt.lake.partition("landing", "labels", day)) or read_marker(rt.lake, "labels", day):
        outcomes.append(ingest_partition(rt.lake, rt.contract, "labels", day, label_grace_days=grace))
    changed = sorted({day.isoformat(), *(d for o in outcomes for d in (*o.curated_first, *o.recomputed))})
    return {"day": day.isoformat(), "partitions": [o.to_dict() for o in outcomes], "features_changed": changed}


def materialise_day(rt: Runtime, day: str | date, changed: list[str] | None = None) -> dict[str, Any]:
    """Apply the Feast definitions and materialise ``[first - overlap, last + 1)`` into the online store.

    ``first`` and ``last``: the earliest and latest of ``day`` and ``changed`` (the days whose feature rows the
    ingest wrote: a late day's recomputed successors); an interval older than what the online store holds is
    extended to its end (:func:`closedloop.stages.feast_store.materialize_window`), so every entity keeps its
    newest row.
    """
    d = parse_day(day)
    days = sorted({d, *(parse_day(x) for x in changed or [])})
    apply_definitions(rt.store, rt.defs)
    overlap = rt.settings.config.typed.ingest.materialize_overlap_days
    newest = max(rt.lake.list_days("curated", rt.contract.feature_view), default=None)
    lo, hi = materialize_window(rt.store, rt.defs, days[0], days[-1] + timedelta(days=1), overlap, newest=newest)
    return {"day": d.isoformat(), "feature_view": rt.defs.view.name, "start": lo.isoformat(), "end": hi.isoformat(),
            "days": [x.isoformat() for x in days]}


def resolve_days(conf: dict[str, Any] | None, event_days: list[str]) -> list[date]:
    """The days a run started by Asset events (or by a person, with ``conf["day"]``) works on."""
    conf = check(conf, INGEST)
    if conf.get("day"):
        return [parse_day(conf["day"])]
    if not event_days:
        raise ConfigError("no day to work on: trigger with {\"day\": \"YYYY-MM-DD\"} or let ingest's event start it")
    return [parse_day(d) for d in event_days]
