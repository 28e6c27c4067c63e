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

from closedloop.core.errors import NoDataError
from closedloop.core.lake import days_between
from closedloop.core.runconf import Window
from closedloop.stages import calibration, drift
from closedloop.stages.calibration import aggregate as weighted
from closedloop.stages.calibration import peak as peak_of
from closedloop.stages.ingest import read_marker
from closedloop.stages.registry import ensure_experiment
from closedloop.stages.scoring import SCORE, champion

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.stages.calibration import Calibration
    from closedloop.stages.drift import DriftPolicy
    from closedloop.stages.runtime import Runtime

log = logging.getLogger(__name__)

EXPERIMENT = "closedloop-monitoring"
TAG = "closedloop."


def monitoring_window(end: date, days: int) -> Window:
    """The ``days`` days ending with ``end`` (exclusive)."""
    return Window(end - timedelta(days=days), end)


def champion_reference(rt: Runtime, champ: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, float]]:
    """The champion's drift reference (a sample of its training window) and its holdout quality."""
    import mlflow
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=champ["run_id"], artifact_path="reference/sample.parquet",
                                                   dst_path=tmp, tracking_uri=rt.settings.mlflow_tracking_uri)
        reference = pd.read_parquet(path)
    metrics = rt.client.get_run(champ["run_id"]).data.metrics
    return reference, {"roc_auc": metrics.get("holdout_roc_auc", float("nan")),
                       "pr_auc": metrics.get("holdout_pr_auc", float("nan"))}


def champion_calibration(rt: Runtime, champ: dict[str, Any]) -> Calibration:
    """The thresholds logged with the champion's version (``reference/thresholds.json``); the policy's fixed
    ones, saying why, for a version trained before they existed, and while the configuration turns calibration
    off (``monitoring.calibration.enabled: false`` means the fixed rules, whatever the champion was trained
    with)."""
    import json

    import mlflow

    monitoring = rt.settings.config.monitoring.model_dump()  # typed, defaults filled in
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(run_id=champ["run_id"],
                                                       artifact_path="reference/thresholds.json", dst_path=tmp,
                                                       tracking_uri=rt.settings.mlflow_tracking_uri)
            logged = calibration.Calibration.from_dict(json.loads(Path(path).read_text()))
        if not calibration.CalibrationSettings.from_config(rt.settings.config.monitoring.calibration).enabled:
            policy = drift.DriftPolicy.from_config(monitoring)
            return calibration.fixed(policy, rt.contract, "calibration disabled (monitoring.calibration.enabled: "
                                     f"false): champion v{champ['version']}'s calibrated thresholds are not used",
                                     logged.weights, window_days=logged.window_days or policy.window_days)
        return logged
    except (OSError, ValueError, mlflow.exceptions.MlflowException) as exc:
        policy = drift.DriftPolicy.from_config(monitoring)
        log.warning("champion v%s has no readable reference/thresholds.json (%s): fixed thresholds", champ["version"],
                    exc)
        return calibration.fixed(policy, rt.contract, f"champion v{champ['version']} was logged without calibrated "
                                 "thresholds (reference/thresholds.json)", window_days=policy.window_days)


def used_thresholds(cal: Calibration) -> dict[str, float]:
    """Column -> threshold the decision uses (the score column included): what Evidently's report shows."""
    out = {n: float(f["threshold"]) for n, f in cal.features.items() if f.get("threshold") is not None}
    if cal.prediction and cal.prediction.get("threshold") is not None:
        out[SCORE] = float(cal.prediction["threshold"])
    return out


def _read_arrow(rt: Runtime, uris: list[str], columns: list[str] | None = None) -> Any:
    """The parquet partitions at ``uris`` as one Arrow table (concatenated without copying)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for uri in uris:
        with rt.lake.fs.open(rt.lake.local_path(uri), "rb") as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables, promote_options="default")


def read_window(rt: Runtime, window: Window, *, labels_until: date | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Predictions of the window's days, with labels that arrived before its end (or before ``labels_until``,
    for re-judging a window later); and the days read.

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

    c = rt.contract
    days = [d for d in days_between(window.start, window.end)
            if rt.lake.exists(rt.lake.partition("predictions", "transactions", d))]
    if not days:
        raise NoDataError(f"no predictions for {window}: run batch_scoring for those days first")
    current = _read_arrow(rt, [rt.lake.partition("predictions", "transactions", d) for d in days],
                          columns=[c.row_key, *c.model_features, SCORE])
    until = labels_until or window.end
    cutoff = datetime.combine(until, time(0), tzinfo=UTC)
    label_days = [d for d in rt.lake.list_days("curated", "labels") if window.start <= d < until]
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
    notes: dict[str, list[str]] = {}
    for d in days_between(window.start, window.end):
        for kind in ("transactions", "labels"):
            marker = read_marker(rt.lake, kind, d)
            if marker and (marker.get("warnings") or marker.get("normalisations")):
                notes[f"{kind}/{d.isoformat()}"] = [*marker.get("warnings", []),
                                                    *(f"normalised: {n}" for n in marker.get("normalisations", []))]
    return notes


def widened_window(rt: Runtime, window: Window, min_rows: int, max_days: int) -> tuple[Window, int]:
    """``window``, its start moved back a day at a time (up to ``max_days`` days in all) until its scored days
    hold at least ``min_rows`` rows; and their row count. Rows are counted from the partitions' metadata."""
    import pyarrow.parquet as pq

    def rows(w: Window) -> int:
        total = 0
        for d in days_between(w.start, w.end):
            uri = rt.lake.partition("predictions", "transactions", d)
            if rt.lake.exists(uri):
                with rt.lake.fs.open(rt.lake.local_path(uri), "rb") as f:
                    total += pq.ParquetFile(f).metadata.num_rows
        return total

    n = rows(window)
    while n < min_rows and (window.end - window.start).days < max_days:
        window = Window(window.start - timedelta(days=1), window.end)
        n = rows(window)
    return window, n


def _monitoring_run(rt: Runtime, exp_id: str, window_end: date) -> Any:
    """The monitoring run that judged the window ending with ``window_end`` (one per end day), or None."""
    runs = rt.client.search_runs([exp_id], filter_string=f"tags.`{TAG}window` LIKE '%..{window_end.isoformat()}'",
                                 max_results=1)
    return runs[0] if runs else None


def measure_window(rt: Runtime, window: Window, *, dag_run_id: str = "") -> dict[str, Any]:
    """Measure drift on ``window``; keep the reports; log the figures to MLflow. Returns a summary.

    A window with fewer than ``min_rows`` scored rows is widened backwards (``monitoring.widen_max_days``
    days at most) and the decision says so. A window is judged once for its end day: a re-run updates the
    same MLflow run. The champion's calibrated thresholds (or the fixed ones, saying why) are what Evidently's
    report shows and what the decision uses; earlier windows are re-judged on the labels that have arrived
    since (:func:`rejudge_earlier`).
    """
    import mlflow

    policy = drift.DriftPolicy.from_config(rt.settings.config.monitoring.model_dump())
    asked = window
    window, _ = widened_window(rt, window, policy.min_rows, rt.settings.config.monitoring.widen_max_days)
    champ = champion(rt)
    reference, ref_quality = champion_reference(rt, champ)
    cal = champion_calibration(rt, champ)
    current, days = read_window(rt, window)
    cal = cal.for_rows(min(len(current), policy.sample_rows or len(current)))
    snapshot, figures = drift.measure(reference, current, rt.contract, policy, reference_quality=ref_quality,
                                      label_column=rt.contract.label, thresholds=used_thresholds(cal))
    figures.performance = drift.performance_figures(current, cal.performance, label_column=rt.contract.label)
    decision = drift.decide(figures, policy, cal)
    if window != asked:
        decision.reasons.append(f"window widened from {asked} to {window} ({len(current)} rows): fewer than "
                                f"min_rows={policy.min_rows} in {(asked.end - asked.start).days} day(s)")
    notes = validation_notes(rt, window)
    aggregate, top = None, None
    if cal.calibrated:
        scores = {n: r.get("score") for n, r in figures.per_feature.items()}
        aggregate, top = weighted(scores, cal), peak_of(scores, cal)
    used = {"mode": cal.mode, "why": cal.why, "features": used_thresholds(cal),
            "aggregate": None if cal.aggregate is None else {"value": aggregate, **cal.aggregate},
            "peak": None if not cal.peak or cal.peak.get("threshold") is None else {
                "value": None if top is None else top[0], "feature": None if top is None else top[1],
                "threshold": cal.peak["threshold"], "features": cal.peak.get("features")},
            "weights": cal.weights, "reported_only": cal.reported_only,
            "performance": None if cal.performance is None else {
                k: cal.performance.get(k) for k in ("metric", "estimated", "realised", "reason", "chunk_rows")}}
    uris = drift.save_report(snapshot, figures, decision, rt.lake, window.start, window.end, thresholds=used)
    pruned = drift.prune_reports(rt.lake, policy.keep_reports)

    exp_id = ensure_experiment(rt.client, rt.settings, rt.settings.monitoring_experiment)
    existing = _monitoring_run(rt, exp_id, window.end)
    tags = {f"{TAG}window": str(window), f"{TAG}window_end": window.end.isoformat(),
            f"{TAG}champion_version": champ["version"],
            f"{TAG}report_html": uris["html"], f"{TAG}report_json": uris["json"],
            f"{TAG}drift": str(decision.drift).lower(), f"{TAG}judged": str(decision.judged).lower(),
            f"{TAG}thresholds": cal.mode, f"{TAG}fired": ",".join(decision.fired),
            f"{TAG}reasons": "; ".join(decision.reasons)[:4000], f"{TAG}dag_run_id": dag_run_id}
    step = window.end.toordinal()
    metrics = {"drift_share": figures.drift_share, "current_rows": float(figures.current_rows),
               "validation_warnings": float(sum(len(v) for v in notes.values())),
               **{f"drift_{k}": float(v["score"]) for k, v in figures.per_feature.items() if v["score"] is not None}}
    if aggregate is not None:
        metrics["drift_aggregate"] = float(aggregate)
    if figures.prediction and figures.prediction.get("score") is not None:
        metrics["drift_score_prediction"] = float(figures.prediction["score"])
    if figures.quality:
        metrics.update({f"quality_{k}": float(v) for k, v in figures.quality.items() if isinstance(v, int | float)})
    metrics.update(performance_metrics(figures.performance or {}, ("estimated", "realised")))
    run_id = existing.info.run_id if existing else None
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
    late = rejudge_earlier(rt, exp_id, window, champ, cal, policy)
    log.info("drift on %s: %s (%s)", window, decision.drift, "; ".join(decision.reasons))
    return {"window": window.to_dict(), "days": days, "champion_version": champ["version"],
            "figures": figures.to_dict(), "decision": decision.to_dict(), "report": uris,
            "mlflow_run_id": run.info.run_id, "pruned_reports": len(pruned), "validation_notes": notes,
            "thresholds": {"mode": cal.mode, "why": cal.why}, "late_drops": late}


def performance_metrics(perf: dict[str, Any], kinds: tuple[str, ...]) -> dict[str, float]:
    """MLflow metrics of :func:`closedloop.stages.drift.performance_figures`' ``kinds`` (estimated, realised): each
    figure (``realised_roc_auc``) with its calibrated band's edges (``..._lower``, ``..._upper``) when it has one.

    One function for a window's own measurement and its re-judging on late labels, so that a realised figure is
    never recorded without the band its decision used (the champion's, scaled to the window's rows)."""
    out: dict[str, float] = {}
    metric = perf.get("metric", "roc_auc")
    for key in kinds:
        if perf.get(key) is None:
            continue
        out[f"{key}_{metric}"] = float(perf[key])
        band = perf.get(f"{key}_band")
        if band:
            out[f"{key}_{metric}_lower"] = float(band["lower"])
            out[f"{key}_{metric}_upper"] = float(band["upper"])
    return out


def rejudge_earlier(rt: Runtime, exp_id: str, window: Window, champ: dict[str, Any], cal: Calibration,
                    policy: DriftPolicy) -> list[dict[str, Any]]:
    """Re-judge the champion's earlier windows on the labels that arrived until ``window.end``.

    Windows judged by the same champion, ending before ``window`` and whose labels are not yet complete
    (``ingest.label_grace_days`` after their end), at most ``monitoring.rejudge_max_windows`` of them: their
    realised performance is measured again and logged to their MLflow run (step = this window's end) with the
    calibrated band it is judged against (:func:`performance_metrics`), and, once complete, tagged so. A
    realised figure below its calibrated band (with enough labelled positives) is a late drop, returned once
    per window (tagged ``late_drop``) for :func:`decide_retraining`.
    """
    from mlflow.entities import Metric

    if cal.performance is None:
        return []
    grace = rt.settings.config.typed.ingest.label_grace_days
    limit = rt.settings.config.monitoring.rejudge_max_windows
    runs = rt.client.search_runs(
        [exp_id], filter_string=f"tags.`{TAG}champion_version` = '{champ['version']}'",
        order_by=[f"tags.`{TAG}window_end` DESC"], max_results=200)
    late: list[dict[str, Any]] = []
    done = 0
    for r in runs:
        t = r.data.tags
        if (t.get(f"{TAG}labels_complete") == "true" or f"{TAG}window" not in t
                or t.get(f"{TAG}window_end", "") >= window.end.isoformat()):
            continue
        if done >= limit:
            break
        start, _, end = t[f"{TAG}window"].partition("..")
        earlier = Window(date.fromisoformat(start), date.fromisoformat(end))
        try:
            frame, _ = read_window(rt, earlier, labels_until=window.end)
        except NoDataError:
            continue
        done += 1
        perf = drift.performance_figures(frame, cal.performance, label_column=rt.contract.label) or {}
        step = window.end.toordinal()
        metric = perf.get("metric", "roc_auc")
        # the realised figure with the band it is judged against (scaled to the labelled rows), in one batch at
        # one step: the page, the exporter and the alert rule read them together
        logged = {**performance_metrics(perf, ("realised",)), "labelled_rows": float(perf.get("labelled_rows", 0))}
        at = int(datetime.now(UTC).timestamp() * 1000)  # MLflow's own clock for a metric (as log_metric's)
        rt.client.log_batch(r.info.run_id, metrics=[Metric(k, v, at, step) for k, v in logged.items()])
        complete = window.end >= earlier.end + timedelta(days=grace)
        if complete:
            rt.client.set_tag(r.info.run_id, f"{TAG}labels_complete", "true")
        band = perf.get("realised_band")
        positives = int(perf.get("positives") or 0)
        if (band and perf.get("realised") is not None and positives >= policy.min_labelled_positives
                and perf["realised"] < band["lower"] and t.get(f"{TAG}late_drop") != "true"):
            rt.client.set_tag(r.info.run_id, f"{TAG}late_drop", "true")
            late.append({"window": earlier.to_dict(), "realised": perf["realised"], "band": band,
                         "positives": positives, "labelled_rows": perf.get("labelled_rows"),
                         "why": f"realised {metric} {perf['realised']:.3f} of {earlier} on {perf.get('labelled_rows')} "
                                f"labelled rows ({positives} positives), labels until {window.end}, is below its "
                                f"calibrated band [{band['lower']:.3f}, {band['upper']:.3f}]"})
    return late


def _drift_of(rt: Runtime, window: Window) -> bool:
    """Whether monitoring found drift on the window ending with ``window.end`` (False when not measured)."""
    exp = rt.client.get_experiment_by_name(rt.settings.monitoring_experiment)
    if exp is None:
        return False
    run = _monitoring_run(rt, exp.experiment_id, window.end)
    return run is not None and run.data.tags.get(f"{TAG}drift") == "true"


def last_trigger(rt: Runtime) -> tuple[datetime | None, str | None]:
    """Data time (window end) and run id of the last retraining that monitoring started."""
    exp = rt.client.get_experiment_by_name(rt.settings.monitoring_experiment)
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
    policy = drift.DriftPolicy.from_config(rt.settings.config.monitoring.model_dump())
    window = Window(date.fromisoformat(measured["window"]["start"]), date.fromisoformat(measured["window"]["end"]))
    decision = measured["decision"]
    base = {"window": window.to_dict(), "report": measured["report"]["html"]}
    late = measured.get("late_drops") or []
    late_why = "; ".join(f"late realised drop: {d['why']}" for d in late)
    if not late and not decision["judged"]:
        return {**base, "retrain": False, "why": "not judged: " + "; ".join(decision["reasons"])}
    if not late and not decision["drift"]:
        return {**base, "retrain": False, "why": "no drift: " + "; ".join(decision["reasons"])}
    confirm = rt.settings.config.monitoring.confirm_windows
    if confirm > 1 and not late:
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
    days = rt.settings.config.monitoring.retrain_window_days
    run_id = drift.trigger_run_id(window.start, window.end)
    reason = (trigger_reason([late_why]) + "; this window: " + "; ".join(decision["reasons"]) if late
              else trigger_reason(decision["reasons"]))
    conf = {
        "window_start": (window.end - timedelta(days=days)).isoformat(),
        "window_end": window.end.isoformat(),
        "reason": reason[:2000],
        "holdout_days": 1,
        "trigger": {"dag_id": "drift_monitoring", "run_id": monitoring_run_id,
                    "report_uri": measured["report"]["html"],
                    "drift_share": measured["figures"]["drift_share"]},
    }
    exp = rt.client.get_experiment_by_name(rt.settings.monitoring_experiment)
    judged = _monitoring_run(rt, exp.experiment_id, window.end)
    if judged is not None:
        rt.client.set_tag(judged.info.run_id, f"{TAG}triggered_run_id", run_id)
    return {**base, "retrain": True, "why": reason, "run_id": run_id, "conf": conf}


def trigger_reason(reasons: list[str]) -> str:
    """The retraining's reason: the decision's reasons, "drift: " said once (the first reason says it already)."""
    reason = "; ".join(reasons)
    return reason if reason.startswith("drift") else "drift: " + reason
