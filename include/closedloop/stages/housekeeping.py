"""Housekeeping: prune what only grows (old reports, served logs, predictions, training sets, monitoring runs,
Airflow's own tables), never what a model version's lineage needs.

:func:`protected` reads the registry: the training sets of the versions that hold the ``champion``,
``previous`` or ``challenger`` alias, their reference artifacts, and the curated days of the champion's
training window. :func:`plan` lists what is older than the ``housekeeping`` section of the configuration
allows (by the day in the name of each partition or folder, not by file times) and drops anything
:func:`is_protected` says is referenced; :func:`apply` deletes the plan. Drift reports are pruned by
:func:`closedloop.stages.drift.prune_reports` (``monitoring.keep_reports``), runs of the ``closedloop-monitoring``
experiment by :func:`prune_monitoring_runs`, and Airflow's tables by :func:`clean_airflow_db`
(``airflow db clean``). Curated partitions, the quarantine and landing zones are never pruned here; the
superseded deliveries a re-delivery kept (``curated/_versions/``, :func:`closedloop.stages.ingest.version_uri`) are,
``keep_versions_days`` after they were superseded, unless their day lies in the champion's training window.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from closedloop.core.errors import ConfigError, TransientError
from closedloop.stages.drift import DriftPolicy, prune_reports
from closedloop.stages.ingest import list_versions, read_marker
from closedloop.stages.monitoring import EXPERIMENT
from closedloop.stages.registry import TAG

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from closedloop.core.lake import Lake
    from closedloop.core.settings import Settings
    from closedloop.stages.runtime import Runtime

log = logging.getLogger(__name__)

PROTECTED_ALIASES = ("champion", "previous", "challenger")
SERVED_KINDS = ("transactions", "shadow")


def policy(settings: Settings) -> dict[str, int]:
    """The ``housekeeping`` section of the configuration (typed, its defaults filled in:
    :class:`closedloop.core.config_model.HousekeepingSection`), each at least 1 day."""
    out = settings.config.typed.housekeeping.model_dump()
    for key, days in out.items():
        if days < 1:
            raise ConfigError(f"housekeeping.{key}={days} in {settings.config_path}: keep at least 1 day")
    return out


@dataclass
class Protected:
    """What registered versions' lineage references (see the module doc)."""

    versions: dict[str, str] = field(default_factory=dict)      # alias -> version
    training_sets: set[str] = field(default_factory=set)         # URIs (folders)
    references: set[str] = field(default_factory=set)            # artifact URIs
    curated_window: tuple[date, date] | None = None              # the champion's [start, end)

    def to_dict(self) -> dict[str, Any]:
        window = self.curated_window
        return {"versions": self.versions, "training_sets": sorted(self.training_sets),
                "references": sorted(self.references),
                "curated_window": None if window is None else [window[0].isoformat(), window[1].isoformat()]}


def _window(text: str | None) -> tuple[date, date] | None:
    start, sep, end = (text or "").partition("..")
    try:
        return (date.fromisoformat(start), date.fromisoformat(end)) if sep else None
    except ValueError:
        return None


def protected(client: MlflowClient, name: str) -> Protected:
    """The lineage of the versions holding :data:`PROTECTED_ALIASES` of model ``name``."""
    from mlflow.exceptions import MlflowException

    out = Protected()
    for alias in PROTECTED_ALIASES:
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            continue
        out.versions[alias] = str(mv.version)
        tags = mv.tags or {}
        if tags.get(f"{TAG}training_set"):
            out.training_sets.add(tags[f"{TAG}training_set"].rstrip("/"))
        if tags.get(f"{TAG}reference_uri"):
            out.references.add(tags[f"{TAG}reference_uri"])
        if alias == "champion":
            out.curated_window = _window(tags.get(f"{TAG}window"))
    return out


def is_protected(uri: str, keep: Protected, lake: Lake) -> bool:
    """Whether deleting ``uri`` would remove something ``keep`` references (or a folder holding it)."""
    uri = uri.rstrip("/")
    for ts in keep.training_sets:
        if uri == ts or ts.startswith(uri + "/") or uri.startswith(ts + "/"):
            return True
    if keep.curated_window is not None and uri.startswith(lake.uri("curated") + "/"):
        start, end = keep.curated_window
        day = _day_of(uri.rsplit("/", 1)[-1])
        return day is None or start <= day < end
    return uri == lake.uri("curated") or lake.uri("curated").startswith(uri + "/")


def _day_of(name: str) -> date | None:
    try:
        return date.fromisoformat(name.removesuffix(".parquet")[:10])
    except ValueError:
        return None


def _entries(lake: Lake, *parts: str) -> list[tuple[str, str]]:
    """``(name, uri)`` of the entries of a lake folder (none when it does not exist)."""
    base = lake.uri(*parts)
    if not lake.exists(base):
        return []
    names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in lake.fs.ls(base, detail=False)]
    return [(name, f"{base}/{name}") for name in sorted(names)]


def plan(lake: Lake, today: date, rules: dict[str, int], keep: Protected) -> dict[str, list[str]]:
    """What to delete, by zone: served days, prediction partitions and training sets past their age.

    Served folders and prediction partitions by the day in their name; training sets by the end of
    their window (``<start>_<end>_<hash>``). Anything :func:`is_protected` is left out; entries whose
    name carries no day are never touched.
    """
    doomed: dict[str, list[str]] = {"served": [], "predictions": [], "training_sets": [], "versions": [],
                                    "kept_protected": []}

    def consider(zone: str, uri: str, day: date | None, keep_days: int) -> None:
        if day is None or day >= today - timedelta(days=keep_days):
            return
        (doomed["kept_protected"] if is_protected(uri, keep, lake) else doomed[zone]).append(uri)

    for kind in SERVED_KINDS:
        for name, uri in _entries(lake, "served", kind):
            consider("served", uri, _day_of(name), rules["keep_served_days"])
    for name, uri in _entries(lake, "predictions", "transactions"):
        if name.endswith(".parquet"):
            consider("predictions", uri, _day_of(name), rules["keep_predictions_days"])
    for name, uri in _entries(lake, "training_sets"):
        parts = name.split("_")
        consider("training_sets", uri, _day_of(parts[1]) if len(parts) >= 2 else None,
                 rules["keep_training_sets_days"])
    for _kind, uri, superseded in superseded_versions(lake):
        consider("versions", uri, superseded, rules["keep_versions_days"])
    return {k: sorted(v) for k, v in doomed.items()}


def superseded_versions(lake: Lake) -> list[tuple[str, str, date | None]]:
    """``(kind, URI, day superseded)`` of every kept delivery version; the day comes from the partition's
    marker (its ``versions`` history), else the partition's own day (a version the marker no longer lists)."""
    out = []
    for kind, day, sha, uri in list_versions(lake):
        marker = read_marker(lake, kind, day) or {}
        when = next((v.get("superseded_at") for v in marker.get("versions", [])
                     if str(v.get("sha256", "")).startswith(sha)), None)
        out.append((kind, uri, _day_of(when) if when else day))
    return out


def apply(lake: Lake, doomed: dict[str, list[str]], keep: Protected) -> int:
    """Delete the planned URIs (checking protection once more); returns how many were deleted."""
    n = 0
    for zone, uris in doomed.items():
        if zone == "kept_protected":
            continue
        for uri in uris:
            if is_protected(uri, keep, lake):  # the plan is stale: never delete a referenced path
                log.warning("housekeeping: %s is referenced by a model version now: kept", uri)
                continue
            lake.delete(uri, recursive=True)
            if zone == "versions":  # the version's marker goes with it
                lake.delete(uri.removesuffix(".parquet") + ".json")
            n += 1
    return n


def prune_monitoring_runs(client: MlflowClient, older_than: datetime, experiment: str = EXPERIMENT) -> list[str]:
    """Delete the runs of the monitoring experiment (``closedloop-monitoring``, or a namespaced model's
    ``<model>-monitoring``) that started before ``older_than``."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    cutoff = int(older_than.timestamp() * 1000)
    deleted = []
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=f"attributes.start_time < {cutoff}",
                                  max_results=500, page_token=token)
        for run in page:
            client.delete_run(run.info.run_id)
            deleted.append(run.info.run_id)
        token = page.token
        if not token:
            break
    if deleted:
        log.info("deleted %d monitoring run(s) started before %s", len(deleted), older_than.isoformat())
    return deleted


def airflow_db_clean_command(before: datetime, *, dry_run: bool = False) -> list[str]:
    """``airflow db clean`` of everything before ``before``: no archive tables, no prompt, failures reported."""
    cmd = [str(Path(sys.executable).parent / "airflow"), "db", "clean", "--clean-before-timestamp",
           before.astimezone(UTC).isoformat(timespec="seconds"), "--yes", "--skip-archive",
           "--error-on-cleanup-failure"]
    return [*cmd, "--dry-run"] if dry_run else cmd


def _cli_env() -> dict[str, str]:
    """The environment of the ``airflow`` CLI run from a task.

    Airflow's task supervisor blocks the metadata database in the task process by setting its connection to
    ``airflow-db-not-allowed:///`` in the environment, which a child would inherit; without it the CLI reads
    the connection from the rest of its configuration (``airflow.cfg``, ``..._CMD``, a secrets backend).
    """
    import os

    return {k: v for k, v in os.environ.items()
            if not (k.endswith("__SQL_ALCHEMY_CONN") and v.startswith("airflow-db-not-allowed"))}


def clean_airflow_db(before: datetime, *, dry_run: bool = False, timeout_s: float = 1800) -> dict[str, Any]:
    """Run :func:`airflow_db_clean_command`; a failure raises TransientError with the end of its output."""
    cmd = airflow_db_clean_command(before, dry_run=dry_run)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False, env=_cli_env())
    except subprocess.TimeoutExpired as exc:
        raise TransientError(f"airflow db clean did not finish in {timeout_s:.0f} s: the task is retried; "
                             "clean a smaller range by hand (airflow db clean --clean-before-timestamp ...)") from exc
    if out.returncode != 0:
        raise TransientError(f"airflow db clean exited {out.returncode}: {(out.stderr or out.stdout)[-800:]}")
    return {"before": before.isoformat(), "dry_run": dry_run, "output_tail": (out.stdout or "")[-2000:]}


def clean_airflow_tables(settings: Settings, now: datetime | None = None, *, dry_run: bool = False
                         ) -> dict[str, Any]:
    """:func:`clean_airflow_db` before ``housekeeping.keep_airflow_days`` days ago."""
    now = now or datetime.now(UTC)
    return clean_airflow_db(now - timedelta(days=policy(settings)["keep_airflow_days"]), dry_run=dry_run)


def run(rt: Runtime, now: datetime | None = None, *, airflow_db: bool = True) -> dict[str, Any]:
    """The housekeeping DAG's work on the lake and MLflow (and Airflow's tables unless ``airflow_db=False``)."""
    now = now or datetime.now(UTC)
    rules = policy(rt.settings)
    keep = protected(rt.client, rt.model_name)
    doomed = plan(rt.lake, now.date(), rules, keep)
    deleted = apply(rt.lake, doomed, keep)
    reports = prune_reports(rt.lake, DriftPolicy.from_config(rt.settings.config.monitoring.model_dump()).keep_reports)
    runs = prune_monitoring_runs(rt.client, now - timedelta(days=rules["keep_monitoring_runs_days"]),
                                  rt.settings.monitoring_experiment)
    summary: dict[str, Any] = {
        "protected": keep.to_dict(), "deleted": {k: v for k, v in doomed.items() if k != "kept_protected"},
        "deleted_count": deleted, "kept_protected": doomed["kept_protected"], "pruned_reports": reports,
        "deleted_monitoring_runs": len(runs)}
    if airflow_db:
        summary["airflow_db"] = clean_airflow_tables(rt.settings, now)
    log.info("housekeeping: %d lake path(s), %d report(s), %d monitoring run(s) deleted; %d protected kept",
             deleted, len(reports), len(runs), len(doomed["kept_protected"]))
    return summary
