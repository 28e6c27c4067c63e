"""Drift monitoring: measure a window of predictions against the champion's reference, and decide.

Three layers, kept apart so that the policy can be tested without any statistics:

- :func:`measure` runs one Evidently report over the model's features (and the score column when both
  frames have it) with a FIXED statistical test and threshold per column, taken from the policy
  (Evidently would otherwise pick the test from the sample size and switch method at 1000 rows), and
  extracts the figures (:class:`DriftFigures`) from Evidently's results. With labels it adds the
  model's quality on the window (ROC AUC, PR AUC) and its drop below the reference.
- :func:`decide` is the pure policy (:class:`DriftPolicy`, the ``monitoring:`` section of the
  configuration): no verdict below ``min_rows``; drift when the share of drifted features reaches
  ``drift_share_threshold``, when a key feature's score reaches its own threshold, when the score
  distribution drifts, or when ROC AUC drops more than ``quality_drop`` (only with enough labelled
  positives). Every verdict carries sentences with the figures that led to it.
- :func:`save_report` / :func:`prune_reports` keep the HTML report and the figures in the lake under
  ``reports/drift/<start>_<end>/``; :func:`in_cooldown` and :func:`trigger_run_id` are what the DAG needs
  to start (at most) one retraining per window.

Evidently 0.7 API used: ``Report([ValueDrift(column=..., method=..., threshold=...), ...],
include_tests=True).run(current_data=Dataset.from_pandas(..., data_definition=DataDefinition(...)),
reference_data=...)``. Each ``ValueDrift`` value is the column's drift score; its test (``FAIL`` when the
stattest reports drift, i.e. score >= threshold for distances) is the column's drift flag.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from closedloop.core.errors import ConfigError
from closedloop.stages import performance
from closedloop.stages.calibration import SOURCE_OWN, Calibration, aggregate, contribution, peak, statistic
from closedloop.stages.drift_policy import DriftPolicy, _clean, _kinds, _prepared, _sample

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.core.lake import Lake
    from closedloop.core.schema import DataContract

log = logging.getLogger(__name__)

REPORTS_DIR = ("reports", "drift")
REPORT_HTML = "report.html"
REPORT_JSON = "figures.json"

# rule names (DriftDecision.fired)
RULE_SHARE = "drift_share"
RULE_KEY = "key_feature"
RULE_PREDICTION = "prediction"
RULE_QUALITY = "quality"
RULE_INPUTS = "input_drift"                  # calibrated: importance-weighted drift of the model's inputs
RULE_PEAK = "input_peak"                     # calibrated: one of the inputs the model relies on most, far out
RULE_ESTIMATED = "estimated_performance"     # calibrated: CBPE estimate below its band
RULE_REALISED = "realised_performance"       # calibrated: realised metric below its band


# -- the figures ---------------------------------------------------------------------------------------
@dataclass
class DriftFigures:
    """What :func:`measure` found, JSON-safe through :meth:`to_dict`."""

    reference_rows: int
    current_rows: int
    sampled_rows: int
    per_feature: dict[str, dict[str, Any]]  # name -> {"stattest", "score", "threshold", "drifted"}
    drift_share: float
    drifted_features: list[str]
    prediction: dict[str, Any] | None = None  # {"stattest", "score", "threshold", "drifted"}
    quality: dict[str, Any] | None = None     # {"rows", "positives", "roc_auc", "pr_auc", "reference_roc_auc", "drop"}
    # estimated (CBPE) and realised performance with their bands: see :func:`performance_figures`
    performance: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DriftFigures:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


def _quality(current: pd.DataFrame, score_column: str, label_column: str,
             reference_quality: dict[str, Any] | None) -> dict[str, Any]:
    """ROC AUC / PR AUC of the score on the labelled rows of ``current`` (all of them, not sampled)."""
    import numpy as np
    import pandas as pd
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = pd.to_numeric(current[label_column], errors="coerce")
    scores = pd.to_numeric(current[score_column], errors="coerce")
    keep = labels.notna() & scores.notna()
    y = labels[keep].to_numpy().astype(int)
    s = scores[keep].to_numpy(dtype=float)
    both = len(np.unique(y)) == 2
    roc = float(roc_auc_score(y, s)) if both else None
    pr = float(average_precision_score(y, s)) if both else None
    ref = (reference_quality or {}).get("roc_auc")
    ref = float(ref) if ref is not None and math.isfinite(float(ref)) else None
    return {"rows": len(y), "positives": int((y == 1).sum()), "roc_auc": roc, "pr_auc": pr,
            "reference_roc_auc": ref, "drop": (ref - roc) if ref is not None and roc is not None else None}


def measure(reference: pd.DataFrame, current: pd.DataFrame, contract: DataContract, policy: DriftPolicy, *,
            score_column: str = "score", reference_quality: dict[str, Any] | None = None,
            label_column: str | None = None, seed: int = 0,
            thresholds: dict[str, float] | None = None, report: bool = True) -> tuple[Any, DriftFigures]:
    """Measure drift of ``current`` against ``reference``; returns ``(evidently snapshot, figures)``.

    One Evidently ``ValueDrift`` per model feature, with the policy's fixed stattest and threshold for
    its kind (numeric: ``numeric_stattest``/``numeric_threshold``; category, bool and string columns:
    ``categorical_stattest``/``categorical_threshold``), plus one for ``score_column`` (numeric stattest,
    ``prediction_threshold``) when both frames have it. Frames larger than ``policy.sample_rows`` are
    sampled down to it first (deterministically, from ``seed``). Scores and drift flags are read from
    Evidently's results. With ``label_column`` in ``current`` (rows with a null label ignored), the
    quality of the score on the whole window and its drop below ``reference_quality["roc_auc"]``.
    ``thresholds`` (column -> threshold, the score column included) replace the policy's fixed ones: the
    calibrated thresholds of :mod:`closedloop.stages.calibration`, so that Evidently's report and flags show them.
    With ``report=False`` no report is built (the snapshot is None): each column's score is the same
    Evidently stattest function called directly (:func:`closedloop.stages.calibration.statistic`), about twenty
    times faster; for loops over many windows (calibration, evaluation).
    """
    import time

    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    started = time.perf_counter()
    kinds = _kinds(contract)
    missing = {side: sorted(set(kinds) - set(frame.columns))
               for side, frame in (("reference", reference), ("current", current))}
    if missing["reference"] or missing["current"]:
        raise ValueError(f"drift: model features missing from the frames: {missing}")
    with_score = score_column in reference.columns and score_column in current.columns
    if with_score and score_column in kinds:
        raise ValueError(f"drift: score column {score_column!r} is also a model feature")
    columns = dict(kinds)
    if with_score:
        columns[score_column] = "numeric"

    ref = _prepared(_sample(reference, policy.sample_rows, seed + 1), columns)
    cur = _prepared(_sample(current, policy.sample_rows, seed), columns)

    def test_of(name: str) -> tuple[str, float]:
        method = policy.numeric_stattest if columns[name] == "numeric" else policy.categorical_stattest
        if thresholds and thresholds.get(name) is not None:
            return method, float(thresholds[name])
        if name == score_column and with_score:
            return policy.numeric_stattest, policy.prediction_threshold
        if columns[name] == "numeric":
            return policy.numeric_stattest, policy.numeric_threshold
        return policy.categorical_stattest, policy.categorical_threshold

    # a column with no value on one side cannot be tested: all-missing in a non-empty window is drift
    # (a broken feed); all-missing in the reference, or an empty frame, cannot be judged
    untestable: dict[str, dict[str, Any]] = {}
    for name in columns:
        ref_empty, cur_empty = bool(ref[name].isna().all()), bool(cur[name].isna().all())
        if ref_empty or cur_empty:
            method, threshold = test_of(name)
            if len(ref) == 0 or len(cur) == 0:
                note = "the " + ("reference" if len(ref) == 0 else "current window") + " has no rows"
            else:
                note = "no values in the " + ("reference" if ref_empty else "current window")
            untestable[name] = {"stattest": method, "score": None, "threshold": threshold,
                                "drifted": cur_empty and not ref_empty and len(cur) > 0, "note": note}
    tested = [c for c in columns if c not in untestable]
    definition = DataDefinition(numerical_columns=[c for c in tested if columns[c] == "numeric"],
                                categorical_columns=[c for c in tested if columns[c] == "categorical"])
    if report:
        metrics = [ValueDrift(column=c, method=test_of(c)[0], threshold=test_of(c)[1]) for c in tested]
        snapshot = Report(metrics, include_tests=True).run(
            current_data=Dataset.from_pandas(cur[tested], data_definition=definition),
            reference_data=Dataset.from_pandas(ref[tested], data_definition=definition),
        )
        results = _value_drift_results(snapshot)
    else:
        snapshot = None
        results = {}
        for c in tested:
            method, threshold = test_of(c)
            score = statistic(ref[c], cur[c], columns[c], method)
            results[c] = {"stattest": method, "score": score, "threshold": float(threshold),
                          "drifted": score is not None and score >= threshold}
    per_column = {**results, **untestable}
    absent = set(columns) - set(per_column)
    if absent:
        raise RuntimeError(f"drift: Evidently returned no result for {sorted(absent)}")
    per_feature = {name: per_column[name] for name in kinds}
    drifted = [name for name, r in per_feature.items() if r["drifted"]]
    quality = None
    if label_column is not None and label_column in current.columns:
        if score_column in current.columns:
            quality = _quality(current, score_column, label_column, reference_quality)
        else:
            log.warning("labels in %r but no score column %r: quality not measured", label_column, score_column)
    figures = DriftFigures(
        reference_rows=len(reference),
        current_rows=len(current),
        sampled_rows=len(cur),
        per_feature=per_feature,
        drift_share=len(drifted) / len(per_feature) if per_feature else 0.0,
        drifted_features=drifted,
        prediction=per_column[score_column] if with_score else None,
        quality=quality,
    )
    log.info("drift measured on %d/%d current rows vs %d reference rows in %.1f s: %d/%d features drifted "
             "(%s)%s%s", len(cur), len(current), len(ref), time.perf_counter() - started, len(drifted),
             len(per_feature), ", ".join(drifted) or "none",
             f"; score {figures.prediction['score']:.3f}" if with_score and figures.prediction["score"] is not None
             else "",
             f"; ROC AUC {quality['roc_auc']}" if quality else "")
    return snapshot, figures


def _value_drift_results(snapshot: Any) -> dict[str, dict[str, Any]]:
    """Column -> {"stattest", "score", "threshold", "drifted"} from the snapshot's ValueDrift metrics and tests."""
    d = snapshot.dict()
    status: dict[str, str] = {}
    for test in d["tests"]:
        metric_id = (test.get("metric_config") or {}).get("metric_id")
        if metric_id is not None:
            status[metric_id] = str(getattr(test["status"], "value", test["status"]))
    out: dict[str, dict[str, Any]] = {}
    for metric in d["metrics"]:
        config = metric.get("config") or {}
        if not str(config.get("type", "")).endswith(":ValueDrift"):
            continue
        if metric["id"] not in status:
            raise RuntimeError(f"drift: Evidently gave no drift test for {metric['metric_name']}")
        value = metric["value"]
        out[config["column"]] = {
            "stattest": config["method"],
            "score": float(value) if value is not None else None,
            "threshold": float(config["threshold"]),
            "drifted": status[metric["id"]] == "FAIL",
        }
    return out


# -- the decision ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftDecision:
    """The verdict on one window."""

    judged: bool          # False when the window is too small: no verdict
    drift: bool
    reasons: list[str]    # sentences with the figures: which rule fired, or why not
    fired: list[str] = field(default_factory=list)  # rules that fired: drift_share, key_feature:<name>, ...

    def to_dict(self) -> dict[str, Any]:
        return {"judged": self.judged, "drift": self.drift, "reasons": list(self.reasons), "fired": list(self.fired)}


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def performance_figures(current: pd.DataFrame, reference: dict[str, Any] | None, *, score_column: str = "score",
                        label_column: str | None = None) -> dict[str, Any] | None:
    """Estimated (CBPE on the calibrated scores of every row) and realised (labelled rows) performance of the
    window, with the bands of ``reference`` (a :class:`closedloop.stages.performance.PerformanceReference` as a dict)
    widened to the window's row counts. None without a reference or a score column."""
    import numpy as np
    import pandas as pd

    if reference is None or score_column not in current.columns:
        return None
    ref = performance.PerformanceReference.from_dict(reference)
    scores = pd.to_numeric(current[score_column], errors="coerce").to_numpy(dtype=float)
    scores = scores[np.isfinite(scores)]
    out: dict[str, Any] = {"metric": ref.metric, "rows": len(scores), "estimated": None, "estimated_band": None,
                           "reference_estimated": ref.reference_estimated, "reference_realised": ref.reference_realised,
                           "realised": None, "realised_band": None, "labelled_rows": 0, "positives": 0,
                           "calibrator": ref.calibrator.method, "band_reason": ref.reason}
    if len(scores):
        out["estimated"] = performance.estimate(ref.metric, ref.calibrator.apply(scores), scores)
        if ref.estimated is not None:
            out["estimated_band"] = ref.estimated.for_rows(len(scores)).to_dict()
    if label_column is not None and label_column in current.columns:
        labels = pd.to_numeric(current[label_column], errors="coerce")
        s = pd.to_numeric(current[score_column], errors="coerce")
        keep = (labels.notna() & s.notna()).to_numpy()
        y = labels.to_numpy()[keep].astype(int)
        out["labelled_rows"], out["positives"] = int(keep.sum()), int((y == 1).sum())
        if len(np.unique(y)) == 2:
            out["realised"] = performance.realised(ref.metric, s.to_numpy()[keep].astype(float), y)
            if ref.realised is not None:
                out["realised_band"] = ref.realised.for_rows(int(keep.sum())).to_dict()
    return _clean(out)


def _fixed_rules(figures: DriftFigures, policy: DriftPolicy, fired: list[str], reasons: list[str]) -> None:
    """The policy's fixed rules: drift share, key features, score drift at a fixed threshold, quality drop."""
    n = len(figures.per_feature)
    k = len(figures.drifted_features)
    listed = ", ".join(figures.drifted_features) or "none"
    if n and figures.drift_share >= policy.drift_share_threshold:
        fired.append(RULE_SHARE)
        reasons.append(f"drift share {figures.drift_share:.3f} ({k}/{n} features: {listed}) reaches "
                       f"drift_share_threshold={policy.drift_share_threshold}")
    else:
        reasons.append(f"drift share {figures.drift_share:.3f} ({k}/{n} features: {listed}) is below "
                       f"drift_share_threshold={policy.drift_share_threshold}")
    _key_rules(figures, policy.key_features, fired, reasons)
    _prediction_rule(figures, fired, reasons)

    q = figures.quality
    if q is None:
        reasons.append("quality not measured: no labels")
    elif q.get("positives", 0) < policy.min_labelled_positives:
        reasons.append(f"quality not judged: {q.get('positives', 0)} labelled positives, fewer than "
                       f"min_labelled_positives={policy.min_labelled_positives}")
    elif q.get("drop") is None:
        reasons.append(f"quality not judged: ROC AUC {_f(q.get('roc_auc'))} on the window, reference "
                       f"{_f(q.get('reference_roc_auc'))}")
    elif q["drop"] > policy.quality_drop:
        fired.append(RULE_QUALITY)
        reasons.append(f"ROC AUC {_f(q['roc_auc'])} on {q['rows']} labelled rows ({q['positives']} positives) is "
                       f"{q['drop']:.3f} below the reference {_f(q['reference_roc_auc'])}: more than "
                       f"quality_drop={policy.quality_drop}")
    else:
        reasons.append(f"ROC AUC {_f(q['roc_auc'])} on {q['rows']} labelled rows ({q['positives']} positives) is "
                       f"within quality_drop={policy.quality_drop} of the reference {_f(q['reference_roc_auc'])}")
    _performance_rules(figures, policy, fired, reasons, act=False)


def _key_rules(figures: DriftFigures, key_features: dict[str, float], fired: list[str], reasons: list[str]) -> None:
    for name, threshold in key_features.items():
        r = figures.per_feature.get(name)
        if r is None:
            reasons.append(f"key feature {name} was not measured")
            continue
        score = r.get("score")
        if score is None:
            if r.get("drifted"):
                fired.append(f"{RULE_KEY}:{name}")
                reasons.append(f"key feature {name} drifted: {r.get('note', 'no score')}")
            else:
                reasons.append(f"key feature {name} has no score: {r.get('note', 'not tested')}")
        elif score >= threshold:
            fired.append(f"{RULE_KEY}:{name}")
            reasons.append(f"key feature {name}: {r.get('stattest')} {score:.3f} reaches its threshold {threshold}")
        else:
            reasons.append(f"key feature {name}: {r.get('stattest')} {score:.3f} is below its threshold {threshold}")


def _prediction_rule(figures: DriftFigures, fired: list[str], reasons: list[str], what: str = "") -> None:
    p = figures.prediction
    if p is None:
        reasons.append("prediction drift not measured: no score column on both sides")
    elif p.get("drifted"):
        fired.append(RULE_PREDICTION)
        reasons.append(f"the score distribution drifted: {p.get('stattest')} {_f(p.get('score'))} reaches "
                       f"{what}{_f(p.get('threshold'))}")
    else:
        reasons.append(f"the score distribution is stable: {p.get('stattest')} {_f(p.get('score'))} is below "
                       f"{what}{_f(p.get('threshold'))}")


def _performance_rules(figures: DriftFigures, policy: DriftPolicy, fired: list[str], reasons: list[str], *,
                       act: bool) -> None:
    """Estimated and realised performance against their bands; rules only when ``act`` (calibrated)."""
    perf = figures.performance
    if perf is None:
        reasons.append("estimated performance not available: the champion has no score calibrator "
                       "(trained before calibration, or by an engine that keeps no scored window)")
        return
    metric = {"roc_auc": "ROC AUC", "average_precision": "average precision"}.get(str(perf.get("metric")), "ROC AUC")
    est, band = perf.get("estimated"), perf.get("estimated_band")
    if est is None:
        reasons.append(f"estimated {metric} not available: no scored rows")
    elif band is None:
        reasons.append(f"estimated {metric} {_f(est)} (CBPE; reference {_f(perf.get('reference_estimated'))}); "
                       f"no band: {perf.get('band_reason') or 'not calibrated'}")
    elif est < band["lower"] and act:
        fired.append(RULE_ESTIMATED)
        reasons.append(f"estimated {metric} {_f(est)} (CBPE) is below its calibrated band "
                       f"[{_f(band['lower'])}, {_f(band['upper'])}]")
    else:
        where = "inside" if band["lower"] <= est <= band["upper"] else ("below" if est < band["lower"] else "above")
        reasons.append(f"estimated {metric} {_f(est)} (CBPE) is {where} its band [{_f(band['lower'])}, "
                       f"{_f(band['upper'])}]" + ("" if act or where != "below" else " (reported: fixed policy)"))
    if not act:
        return
    real, rband = perf.get("realised"), perf.get("realised_band")
    positives = int(perf.get("positives") or 0)
    if real is None:
        reasons.append(f"realised {metric} not measured: {perf.get('labelled_rows', 0)} labelled rows, "
                       f"{positives} positives")
    elif positives < policy.min_labelled_positives:
        reasons.append(f"realised {metric} {_f(real)} not judged: {positives} labelled positives, fewer than "
                       f"min_labelled_positives={policy.min_labelled_positives}")
    elif rband is None:
        reasons.append(f"realised {metric} {_f(real)}; no band: {perf.get('band_reason') or 'not calibrated'}")
    elif real < rband["lower"]:
        fired.append(RULE_REALISED)
        reasons.append(f"realised {metric} {_f(real)} on {perf['labelled_rows']} labelled rows ({positives} "
                       f"positives) is below its calibrated band [{_f(rband['lower'])}, {_f(rband['upper'])}]")
    else:
        reasons.append(f"realised {metric} {_f(real)} on {perf['labelled_rows']} labelled rows ({positives} "
                       f"positives) is not below its band [{_f(rband['lower'])}, {_f(rband['upper'])}]")


def _calibrated_rules(figures: DriftFigures, policy: DriftPolicy, cal: Calibration, fired: list[str],
                      reasons: list[str]) -> None:
    """The calibrated decision: importance-weighted input drift, own-threshold features, score drift and
    performance, each against the threshold calibrated with the champion; other drift is reported."""
    scores = {n: r.get("score") for n, r in figures.per_feature.items()}
    # a feature with no values left in the window (a broken feed) counts at its threshold in the aggregate
    value = aggregate(scores, cal)
    agg = cal.aggregate or {}
    top = sorted(((cal.weights[n] * contribution(n, scores.get(n), cal) ** 2, n) for n in cal.weights),
                 reverse=True)[:3]
    parts = ", ".join(f"{n} {c:.2f}" for c, n in top)
    if value is None or agg.get("threshold") is None:
        reasons.append("input drift not judged: no feature is in the decision")
    elif value >= agg["threshold"]:
        fired.append(RULE_INPUTS)
        reasons.append(f"importance-weighted input drift {value:.3f} reaches its calibrated threshold "
                       f"{agg['threshold']:.3f} (largest contributions: {parts})")
    else:
        reasons.append(f"importance-weighted input drift {value:.3f} is below its calibrated threshold "
                       f"{agg['threshold']:.3f} (largest contributions: {parts})")
    top_feature = peak(scores, cal)
    peak_thr = (cal.peak or {}).get("threshold")
    if top_feature is None or peak_thr is None:
        reasons.append("input peak not judged: no feature has at least "
                       f"{(cal.peak or {}).get('min_importance', 'peak_min_importance of')} the model's total gain"
                       + ("" if cal.peak else " (thresholds calibrated before the peak rule)"))
    else:
        level, name = top_feature
        verb = "reaches" if level >= peak_thr else "is below"
        if level >= peak_thr:
            fired.append(RULE_PEAK)
        reasons.append(f"input peak: {name} {level:.2f} std past its chunks' mean {verb} the calibrated peak "
                       f"threshold {peak_thr:.2f} (features with at least {cal.peak.get('min_importance')} of the "
                       "model's total gain decide alone)")
    own = {n: f["own_threshold"] for n, f in cal.features.items() if f.get("source") == SOURCE_OWN}
    _key_rules(figures, own, fired, reasons)
    _prediction_rule(figures, fired, reasons, what="its calibrated threshold ")
    reported = [n for n in figures.drifted_features if n not in cal.weights and n not in own]
    if reported:
        reported_text = ", ".join(f"{n} {_f(figures.per_feature[n].get('score'))}" for n in reported)
        reasons.append(f"reported, not acted on (the model barely uses them, or the schema excludes them): "
                       f"{reported_text} past their calibrated thresholds")
    _performance_rules(figures, policy, fired, reasons, act=True)


def decide(figures: DriftFigures, policy: DriftPolicy, calibration: Calibration | None = None) -> DriftDecision:
    """Apply ``policy`` to ``figures`` (pure), with the champion's ``calibration`` when it has one.

    No verdict when the window (or the reference) has fewer than ``min_rows`` rows. Calibrated
    (:mod:`closedloop.stages.calibration`): drift when the importance-weighted input drift reaches its calibrated
    threshold, a feature with its own threshold (schema ``drift.threshold``, ``monitoring.key_features``)
    reaches it, the score distribution passes its calibrated threshold, the estimated (CBPE) performance
    falls below its band, or the realised one does (with at least ``min_labelled_positives``); drift in
    features the decision does not use is reported. Otherwise the policy's fixed rules: share of drifted
    features >= ``drift_share_threshold``; a key feature's score >= its threshold; the score column drifted
    at ``prediction_threshold``; ROC AUC more than ``quality_drop`` below the reference. The reasons say
    which thresholds were used, which rules fired and, for the others, why they did not.
    """
    if figures.current_rows < policy.min_rows:
        return DriftDecision(judged=False, drift=False, reasons=[
            f"not judged: the window has {figures.current_rows} rows, fewer than min_rows={policy.min_rows}"])
    if figures.reference_rows < policy.min_rows:
        return DriftDecision(judged=False, drift=False, reasons=[
            f"not judged: the reference has {figures.reference_rows} rows, fewer than min_rows={policy.min_rows}"])

    fired: list[str] = []
    reasons: list[str] = []
    if calibration is not None and calibration.calibrated:
        _calibrated_rules(figures, policy, calibration, fired, reasons)
        reasons.append(f"thresholds calibrated with the champion: {calibration.why}")
    else:
        _fixed_rules(figures, policy, fired, reasons)
        reasons.append("thresholds fixed (the policy's): " + (
            calibration.why if calibration is not None else "the champion has no calibrated thresholds"))

    drift = bool(fired)
    reasons.insert(0, "drift: " + ", ".join(fired) if drift else "no drift: no rule fired")
    return DriftDecision(judged=True, drift=drift, reasons=reasons, fired=fired)


# -- what the DAG needs to act on a verdict --------------------------------------------------------------
def _utc(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def in_cooldown(last_trigger_at: datetime | None, now: datetime, policy: DriftPolicy) -> bool:
    """Whether a drift-triggered retraining at ``last_trigger_at`` still blocks another one at ``now``
    (naive datetimes are taken as UTC; a trigger in the future blocks)."""
    if last_trigger_at is None or policy.cooldown_hours <= 0:
        return False
    return _utc(now) - _utc(last_trigger_at) < timedelta(hours=policy.cooldown_hours)


def _day(d: date, what: str) -> date:
    if isinstance(d, datetime) or not isinstance(d, date):
        raise ValueError(f"{what}={d!r}: give a date")
    return d


def window_name(window_start: date, window_end: date) -> str:
    """``<start>_<end>`` of a window (end exclusive)."""
    start, end = _day(window_start, "window_start"), _day(window_end, "window_end")
    if end <= start:
        raise ValueError(f"window {start}..{end}: the end must be after the start")
    return f"{start.isoformat()}_{end.isoformat()}"


def trigger_run_id(window_start: date, window_end: date) -> str:
    """The run id of the retraining a window's drift would start: one per window, whatever retries."""
    return f"drift__{window_name(window_start, window_end)}"


# -- reports in the lake --------------------------------------------------------------------------------
def report_uri(lake: Lake, window_start: date, window_end: date) -> str:
    """The folder of a window's report."""
    return lake.uri(*REPORTS_DIR, window_name(window_start, window_end))


def save_report(snapshot: Any, figures: DriftFigures, decision: DriftDecision, lake: Lake,
                window_start: date, window_end: date, thresholds: dict[str, Any] | None = None) -> dict[str, str]:
    """Write ``reports/drift/<start>_<end>/report.html`` (the Evidently report) and ``figures.json``
    (window, figures, decision, and the ``thresholds`` the decision used); the same window always goes to
    the same place."""
    folder = report_uri(lake, window_start, window_end)
    with tempfile.TemporaryDirectory(prefix="closedloop-drift-") as tmp:
        path = Path(tmp) / REPORT_HTML
        snapshot.save_html(str(path))
        html = lake.write_bytes(f"{folder}/{REPORT_HTML}", path.read_bytes())
    doc = {"window": {"start": window_start.isoformat(), "end": window_end.isoformat()},
           "figures": figures.to_dict(), "decision": decision.to_dict(), "thresholds": _clean(thresholds)}
    js = lake.write_json(f"{folder}/{REPORT_JSON}", doc)
    log.info("drift report of %s..%s written to %s", window_start, window_end, folder)
    return {"html": html, "json": js}


def _parse_window(name: str) -> tuple[date, date] | None:
    start, sep, end = name.partition("_")
    if not sep:
        return None
    try:
        return date.fromisoformat(start), date.fromisoformat(end)
    except ValueError:
        return None


def list_reports(lake: Lake) -> list[str]:
    """URIs of the report folders under ``reports/drift/``, oldest window first (other entries ignored)."""
    base = lake.uri(*REPORTS_DIR)
    if not lake.exists(base):
        return []
    found: list[tuple[date, date, str]] = []
    for entry in lake.fs.ls(base, detail=True):
        if entry.get("type") != "directory":
            continue
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        window = _parse_window(name)
        if window is not None:
            found.append((window[1], window[0], name))
    return [lake.uri(*REPORTS_DIR, name) for _, _, name in sorted(found)]


def prune_reports(lake: Lake, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` report folders (by window end, then start); returns the deleted URIs."""
    if keep < 0:
        raise ValueError(f"keep={keep}: must be >= 0")
    reports = list_reports(lake)
    doomed = reports[: max(0, len(reports) - keep)]
    for uri in doomed:
        lake.delete(uri, recursive=True)
    if doomed:
        log.info("pruned %d drift report(s), kept %d", len(doomed), len(reports) - len(doomed))
    return doomed


def find_report(lake: Lake, day: str | None = None) -> dict[str, Any]:
    """The newest drift report, or the one of ``day`` (a day inside its window, or its ``<start>_<end>`` name).

    Returns ``{"window": name, "start", "end", "folder", "html", "json"}`` (URIs). Raises ConfigError naming
    the reports there are (and the way to make one) when none matches.
    """
    reports = list_reports(lake)
    if not reports:
        raise ConfigError(f"no drift report under {lake.uri(*REPORTS_DIR)}: the drift_monitoring DAG writes one "
                          "per window it measures; run it first")
    names = [u.rsplit("/", 1)[-1] for u in reports]
    if day is None:
        chosen = names[-1]
    elif day in names:
        chosen = day
    else:
        try:
            wanted = date.fromisoformat(day)
        except ValueError:
            raise ConfigError(f"--day {day!r} is neither a day (YYYY-MM-DD) nor a report window "
                              f"(<start>_<end>); windows: {', '.join(names)}") from None
        inside = [n for n in names if (w := _parse_window(n)) is not None and w[0] <= wanted < w[1]]
        if not inside:
            raise ConfigError(f"no drift report covers {day}: windows are {', '.join(names)} (end exclusive); "
                              "pick one of them or run drift_monitoring for that day")
        chosen = inside[-1]
    start, end = _parse_window(chosen)  # type: ignore[misc]
    folder = lake.uri(*REPORTS_DIR, chosen)
    return {"window": chosen, "start": start.isoformat(), "end": end.isoformat(), "folder": folder,
            "html": f"{folder}/{REPORT_HTML}", "json": f"{folder}/{REPORT_JSON}"}
