"""Drift monitoring: compare a window of predictions with the champion's reference, decide, explain.

:func:`measure_window` builds the Evidently report of a window (features and scores, and quality where
labels have arrived), keeps its HTML and JSON in the lake and its figures in MLflow (the
``closedloop-monitoring`` experiment, one run per window); :func:`decide_retraining` applies the
policy, the cooldown and the de-duplication, and returns the configuration of the retraining run to
start, with the reason, or why not.
"""

from __future__ import annotations

import logging
import tempfile
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from closedloop.errors import NoDataError
from closedloop.runconf import Window

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.runtime import Runtime

log = logging.getLogger(__name__)

EXPERIMENT = "closedloop-monitoring"
TAG = "closedloop."


def monitoring_window(end: date, days: int) -> Window:
    """The ``days`` days ending with ``end`` (exclusive)."""
    return Window(end - timedelta(days=days), end)


def champion_reference(rt: Runtime, champ: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, float]]:
    """The champion's drift reference (a sample of its training set) and its holdout quality."""
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=champ["run_id"], artifact_path="reference/sample.parquet",
                                                   dst_path=tmp, tracking_uri=rt.settings.mlflow_tracking_uri)
        reference = pd.read_parquet(path)
    metrics = rt.client.get_run(champ["run_id"]).data.metrics
    return reference, {"roc_auc": metrics.get("holdout_roc_auc", float("nan")),
                       "pr_auc": metrics.get("holdout_pr_auc", float("nan"))}


def _read_arrow(rt: Runtime, uris: list[str], columns: list[str] | None = None) -> Any:
    """The parquet partitions at ``uris`` as one Arrow table (concatenated without copying)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for uri in uris:
        with rt.lake.fs.open(rt.lake.local_path(uri), "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables, promote_options="default")


def read_window(rt: Runtime, window: Window) -> tuple[pd.DataFrame, list[str]]:
    """Predictions of the window's days, with labels that arrived before its end; and the days read.

    Read, filtered and joined in Arrow (one conversion to pandas at the end): for a million-row window
    this is faster than concatenating pandas frames and merging on the string row key. Only what
    monitoring judges is read (row key, the model's features, score; label): the partitions' other columns
    would only cost converting them. The rows keep the partitions' order; a row's label is the last one
    (in day order) that arrived in time.
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    from closedloop.lake import days_between
    from closedloop.scoring import SCORE

    c = rt.contract
    days = [d for d in days_between(window.start, window.end)
            if rt.lake.exists(rt.lake.partition("predictions", "transactions", d))]
    if not days:
        raise NoDataError(f"no predictions for {window}: run batch_scoring for those days first")
    current = _read_arrow(rt, [rt.lake.partition("predictions", "transactions", d) for d in days],
                          columns=[c.row_key, *c.model_features, SCORE])
    cutoff = datetime.combine(window.end, time(0), tzinfo=UTC)
    label_days = [d for d in rt.lake.list_days("curated", "labels") if window.start <= d < window.end]
    labels = None
    if label_days:
        labels = _read_arrow(rt, [rt.lake.partition("curated", "labels", d) for d in label_days],
                             columns=[c.row_key, c.label, c.label_timestamp])
        ts = labels[c.label_timestamp]
        labels = labels.filter(pc.less(ts, pa.scalar(cutoff).cast(ts.type)))
    if labels is not None and labels.num_rows:
        # the last label of each row key (in partition order), as drop_duplicates(keep="last")
        labels = labels.append_column("__order", pa.array(np.arange(labels.num_rows)))
        last = labels.group_by(c.row_key).aggregate([("__order", "max")])["__order_max"]
        labels = labels.take(last).select([c.row_key, c.label])
        current = current.append_column("__row", pa.array(np.arange(current.num_rows)))
        joined = current.join(labels, keys=c.row_key, join_type="left outer", use_threads=True)
        del current, labels  # one copy of the window at a time
        joined = joined.take(pc.sort_indices(joined["__row"])).drop_columns(["__row"])
        frame = joined.to_pandas(self_destruct=True, split_blocks=True)
        del joined
        return frame, [d.isoformat() for d in days]
    frame = current.to_pandas()
    frame[c.label] = pd.NA
    return frame, [d.isoformat() for d in days]


def validation_notes(rt: Runtime, window: Window) -> dict[str, list[str]]:
    """The warnings and repairs validation recorded for the window's curated partitions, by partition.

    Data let through with a warning is exactly what monitoring must look at: the monitoring run carries them.
    """
    from closedloop.ingest import read_marker
    from closedloop.lake import days_between

    notes: dict[str, list[str]] = {}
    for d in days_between(window.start, window.end):
        for kind in ("transactions", "labels"):
            marker = read_marker(rt.lake, kind, d)
            if marker and (marker.get("warnings") or marker.get("normalisations")):
                notes[f"{kind}/{d.isoformat()}"] = [*marker.get("warnings", []),
                                                    *(f"normalised: {n}" for n in marker.get("normalisations", []))]
    return notes


def measure_window(rt: Runtime, window: Window, *, dag_run_id: str = "") -> dict[str, Any]:
    """Measure drift on ``window``; keep the reports; log the figures to MLflow. Returns a summary."""
    import mlflow

    from closedloop import drift
    from closedloop.registry import ensure_experiment
    from closedloop.scoring import champion

    policy = drift.DriftPolicy.from_config(rt.settings.config.raw["monitoring"])
    champ = champion(rt)
    reference, ref_quality = champion_reference(rt, champ)
    current, days = read_window(rt, window)
    snapshot, figures = drift.measure(reference, current, rt.contract, policy, reference_quality=ref_quality,
                                      label_column=rt.contract.label)
    decision = drift.decide(figures, policy)
    notes = validation_notes(rt, window)
    uris = drift.save_report(snapshot, figures, decision, rt.lake, window.start, window.end)
    pruned = drift.prune_reports(rt.lake, policy.keep_reports)

    exp_id = ensure_experiment(rt.client, rt.settings, EXPERIMENT)
    existing = rt.client.search_runs([exp_id], filter_string=f"tags.`{TAG}window` = '{window}'", max_results=1)
    tags = {f"{TAG}window": str(window), f"{TAG}champion_version": champ["version"],
            f"{TAG}report_html": uris["html"], f"{TAG}report_json": uris["json"],
            f"{TAG}drift": str(decision.drift).lower(), f"{TAG}judged": str(decision.judged).lower(),
            f"{TAG}reasons": "; ".join(decision.reasons)[:4000], f"{TAG}dag_run_id": dag_run_id}
    step = window.end.toordinal()
    metrics = {"drift_share": figures.drift_share, "current_rows": float(figures.current_rows),
               "validation_warnings": float(sum(len(v) for v in notes.values())),
               **{f"drift_{k}": float(v["score"]) for k, v in figures.per_feature.items()}}
    if figures.prediction:
        metrics["drift_score_prediction"] = float(figures.prediction["score"])
    if figures.quality:
        metrics.update({f"quality_{k}": float(v) for k, v in figures.quality.items() if isinstance(v, int | float)})
    run_id = existing[0].info.run_id if existing else None
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=f"drift {window}",
                          tags=tags) as run:
        mlflow.set_tags(tags)
        mlflow.log_metrics(metrics, step=step)
        with tempfile.TemporaryDirectory() as tmp:
            for name, uri in uris.items():
                local = Path(tmp) / f"report.{name}"
                local.write_bytes(rt.lake.read_bytes(uri))
                mlflow.log_artifact(str(local), artifact_path="drift")
        mlflow.log_dict(notes, "drift/validation_notes.json")
    log.info("drift on %s: %s (%s)", window, decision.drift, "; ".join(decision.reasons))
    return {"window": window.to_dict(), "days": days, "champion_version": champ["version"],
            "figures": figures.to_dict(), "decision": decision.to_dict(), "report": uris,
            "mlflow_run_id": run.info.run_id, "pruned_reports": len(pruned), "validation_notes": notes}


def _drift_of(rt: Runtime, window: Window) -> bool:
    """Whether monitoring found drift on ``window`` (False when it was not measured)."""
    exp = rt.client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return False
    runs = rt.client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG}window` = '{window}'",
                                 max_results=1)
    return bool(runs) and runs[0].data.tags.get(f"{TAG}drift") == "true"


def last_trigger(rt: Runtime) -> tuple[datetime | None, str | None]:
    """Data time (window end) and run id of the last retraining that monitoring started."""
    exp = rt.client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return None, None
    runs = rt.client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG}triggered_run_id` != ''",
                                 order_by=[f"tags.`{TAG}window` DESC"], max_results=50)
    best: tuple[datetime | None, str | None] = (None, None)
    for r in runs:
        end = date.fromisoformat(r.data.tags[f"{TAG}window"].split("..")[1])
        at = datetime.combine(end, time(0), tzinfo=UTC)
        if best[0] is None or at > best[0]:
            best = (at, r.data.tags[f"{TAG}triggered_run_id"])
    return best


def decide_retraining(rt: Runtime, measured: dict[str, Any], *, active_retrainings: int,
                      monitoring_run_id: str = "") -> dict[str, Any]:
    """Whether to start ``retraining`` for a measured window, and with which configuration.

    No when the window was not judged or showed no drift, when the drift is not yet confirmed by the
    ``confirm_windows - 1`` windows before it, when a retraining is queued or running, or within the
    cooldown after the last drift-triggered one (measured in data time, so backfills and
    simulations behave as production would). The run id is a function of the window: starting the
    same window twice is impossible.
    """
    from closedloop import drift

    policy = drift.DriftPolicy.from_config(rt.settings.config.raw["monitoring"])
    window = Window(date.fromisoformat(measured["window"]["start"]), date.fromisoformat(measured["window"]["end"]))
    decision = measured["decision"]
    base = {"window": window.to_dict(), "report": measured["report"]["html"]}
    if not decision["judged"]:
        return {**base, "retrain": False, "why": "not judged: " + "; ".join(decision["reasons"])}
    if not decision["drift"]:
        return {**base, "retrain": False, "why": "no drift: " + "; ".join(decision["reasons"])}
    confirm = int(rt.settings.config.raw["monitoring"].get("confirm_windows", 1))
    if confirm > 1:
        earlier = [_drift_of(rt, Window(window.start - timedelta(days=k), window.end - timedelta(days=k)))
                   for k in range(1, confirm)]
        if not all(earlier):
            return {**base, "retrain": False,
                    "why": f"drift, not yet confirmed: {confirm} consecutive drifted windows are needed "
                           f"(this one and {confirm - 1} before it); " + "; ".join(decision["reasons"])}
    if active_retrainings > 0:
        return {**base, "retrain": False, "why": f"drift, but {active_retrainings} retraining run(s) queued or running"}
    now = datetime.combine(window.end, time(0), tzinfo=UTC)
    last_at, last_id = last_trigger(rt)
    if drift.in_cooldown(last_at, now, policy):
        return {**base, "retrain": False,
                "why": f"drift, but within the {policy.cooldown_hours} h cooldown after {last_id}"}
    days = int(rt.settings.config.raw["monitoring"].get("retrain_window_days", 14))
    run_id = drift.trigger_run_id(window.start, window.end)
    reason = trigger_reason(decision["reasons"])
    conf = {
        "window_start": (window.end - timedelta(days=days)).isoformat(),
        "window_end": window.end.isoformat(),
        "reason": reason[:2000],
        "holdout_days": 1,
        "trigger": {"dag_id": "drift_monitoring", "run_id": monitoring_run_id,
                    "report_uri": measured["report"]["html"],
                    "drift_share": measured["figures"]["drift_share"]},
    }
    exp = rt.client.get_experiment_by_name(EXPERIMENT)
    runs = rt.client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG}window` = '{window}'",
                                 max_results=1)
    if runs:
        rt.client.set_tag(runs[0].info.run_id, f"{TAG}triggered_run_id", run_id)
    return {**base, "retrain": True, "why": reason, "run_id": run_id, "conf": conf}


def trigger_reason(reasons: list[str]) -> str:
    """The retraining's reason: the decision's reasons, "drift: " said once (the first reason says it already)."""
    reason = "; ".join(reasons)
    return reason if reason.startswith("drift") else "drift: " + reason
