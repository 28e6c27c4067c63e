"""Drift thresholds calibrated on the reference's own variability (the approach NannyML documents).

A fixed threshold (a normed Wasserstein distance of 0.1, say) says nothing about how much a two-day
window of *this* data moves when nothing has changed: inputs with daily, weekly or shared day-level
swings exceed it on quiet days, others never come near it. Here the thresholds come from the
champion's own training window, cut into chunks the size of a monitoring window:

- the window's rows (time-ordered, with the model's out-of-sample scores) are cut into chunks of
  ``window_days`` days: disjoint chunks when at least ``min_chunks`` fit, otherwise one chunk per
  start day (as monitoring slides its window by one day); each chunk keeps the rows a monitoring
  window would have (all of them, sampled down to the policy's ``sample_rows``);
- each chunk is compared with the reference sample *without that chunk's days*, with the same
  statistic monitoring reports: Evidently's own stattest function (``wasserstein`` normed by the
  reference's standard deviation, ``jensenshannon`` over the union of categories) called directly on
  the prepared columns, without building a report (checked equal to the report's figures by a test);
- each column's threshold is ``mean + std_multiplier * std`` of its chunk statistics (never below the
  largest one seen, nor below ``MIN_THRESHOLD``);
- each chunk is compared with the reference without its days *and* ``gap_days`` days on each side
  (default: ``window_days``): a monitored window shares no day with the reference, nor the persistent
  day-level conditions of the days around it;
- the decision statistic itself is calibrated the same way: the root of the importance-weighted (total
  gain) mean, over the features the decision uses, of each feature's squared excess over its chunks' mean in
  their standard deviations (:func:`aggregate`); its threshold is set on the chunks' aggregates, which
  controls the overall false-alarm rate, not only each feature's;
- beside it, the *peak*: the largest excess among the features the model relies on most (at least
  ``peak_min_importance`` of its total gain), with its own threshold set on the chunks' peaks (:func:`peak`),
  never below ``std_multiplier`` (a feature's own calibrated threshold).
  A feature the model relies on moving far past anything its chunks showed decides alone, even when the
  features that did not move dilute it in the weighted aggregate.

Too short a window (fewer than ``min_chunks`` chunks) gives a :class:`Calibration` of mode ``fixed``
whose ``why`` says so; the decision then uses the policy's fixed thresholds and reports it.

Pure functions: no MLflow, no lake. Training computes the calibration and logs it next to the
reference (``reference/thresholds.json``); monitoring reads it back with the reference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError, model_validator

from closedloop.core.config_model import CalibrationSection
from closedloop.core.errors import ConfigError
from closedloop.stages import performance
from closedloop.stages.drift_policy import DriftPolicy, _clean, _kinds, _prepared, _sample

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.core.schema import DataContract

log = logging.getLogger(__name__)

MODE_CALIBRATED = "calibrated"
MODE_FIXED = "fixed"
MIN_THRESHOLD = 1e-3
# the decision statistic (:func:`aggregate`) its calibrated threshold was computed for
AGGREGATE_STATISTIC = "weighted_rms_excess"
# the peak (:func:`peak`) its calibrated threshold was computed for
PEAK_STATISTIC = "max_excess"
# sources of a feature's threshold
SOURCE_CALIBRATED = "calibrated"
SOURCE_FIXED = "fixed"        # the policy's fixed threshold (schema ``drift: {calibrate: false}``, or fixed mode)
SOURCE_OWN = "own"            # the schema's ``drift: {threshold: x}`` (or a monitoring.key_features entry)
SOURCE_EXCLUDED = "excluded"  # schema ``drift: {exclude: true}``: measured and reported, not used


class CalibrationSettings(CalibrationSection):
    """``monitoring.calibration`` of the configuration: its keys, types and defaults are
    :class:`~closedloop.core.config_model.CalibrationSection`'s, its ranges are checked here (ConfigError)."""

    @model_validator(mode="after")
    def _ranges(self) -> CalibrationSettings:
        if self.min_chunks < 2:
            raise ConfigError(f"monitoring.calibration.min_chunks={self.min_chunks}: must be >= 2")
        if self.std_multiplier < 0:
            raise ConfigError(f"monitoring.calibration.std_multiplier={self.std_multiplier}: must be >= 0")
        if self.gap_days is not None and self.gap_days < 0:
            raise ConfigError(f"monitoring.calibration.gap_days={self.gap_days}: must be >= 0")
        if not 0.0 <= self.min_importance < 1.0:
            raise ConfigError(f"monitoring.calibration.min_importance={self.min_importance}: must be in [0, 1)")
        if not 0.0 < self.peak_min_importance <= 1.0:
            raise ConfigError(f"monitoring.calibration.peak_min_importance={self.peak_min_importance}: must be in "
                              "(0, 1] (1: no feature decides alone)")
        return self

    @classmethod
    def from_config(cls, cfg: CalibrationSection | dict[str, Any] | None) -> CalibrationSettings:
        """The typed section (``Config.typed.monitoring.calibration``), or its dict as
        ``MonitoringSection.model_dump()`` gives it (None: every default), its ranges checked."""
        if isinstance(cfg, CalibrationSection):
            cfg = cfg.model_dump()
        try:
            return cls.model_validate(dict(cfg or {}))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: "
                                 + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"])
                                 for e in exc.errors())
            raise ConfigError(f"monitoring.calibration: {problems}") from None


# the multiplier of thresholds logged without one (std_multiplier 0: fixed thresholds, or an older file)
DEFAULT_STD_MULTIPLIER = CalibrationSection().std_multiplier


@dataclass
class Calibration:
    """The thresholds a champion's drift decisions use, and where they come from (JSON-safe)."""

    mode: str                       # calibrated | fixed
    why: str                        # one sentence: how they were obtained, or why fixed
    window_days: int = 0
    chunks: int = 0
    chunk_rows: int = 0             # median rows of a chunk (what a monitoring window holds)
    reference_rows: int = 0
    std_multiplier: float = 0.0
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    prediction: dict[str, Any] | None = None
    aggregate: dict[str, Any] | None = None
    peak: dict[str, Any] | None = None                       # the peak's threshold and features (None: not set)
    weights: dict[str, float] = field(default_factory=dict)  # normalised importance of the decision's features
    reported_only: list[str] = field(default_factory=list)   # features the decision does not act on
    performance: dict[str, Any] | None = None               # the band of the estimated/realised metric
    chunk_statistics: dict[str, list[float | None]] = field(default_factory=dict)  # column -> one per chunk

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        out = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        agg = out.aggregate
        if out.calibrated and agg and agg.get("statistic") != AGGREGATE_STATISTIC and out.chunk_statistics:
            # thresholds logged before the decision statistic changed (a weighted mean of ratios): the aggregate's
            # threshold is recomputed on the chunks' statistics kept with them, so it matches what decide() computes
            n = len(next(iter(out.chunk_statistics.values())))
            values = [aggregate({c: v[i] for c, v in out.chunk_statistics.items()}, out) for i in range(n)]
            out.aggregate = {**agg, **_band([v for v in values if v is not None],
                                                                out.std_multiplier or DEFAULT_STD_MULTIPLIER),
                             "statistic": AGGREGATE_STATISTIC}
            out.why += "; the input drift's threshold recomputed on the chunks for the current statistic"
        if out.calibrated and out.peak is None and out.chunk_statistics and out.weights:
            # thresholds logged before the peak rule: its threshold is set on the chunks' statistics kept with them
            # (the decision's weights stand for the shares of the model's total gain)
            least = CalibrationSettings().peak_min_importance
            top = [n for n, w in out.weights.items() if w >= least]
            out.peak = _peak_band(out.chunk_statistics, out, top, least)
            if out.peak is not None:
                out.why += "; the input peak's threshold computed on the chunks kept with them"
        return out

    @property
    def calibrated(self) -> bool:
        return self.mode == MODE_CALIBRATED

    def for_rows(self, rows: int) -> Calibration:
        """The thresholds for a window of ``rows`` rows: a distance's chunk-to-chunk spread (and its level under
        no drift) shrinks as 1/sqrt(rows), so a window with fewer rows than the chunks gets its calibrated
        thresholds scaled up by sqrt(chunk_rows / rows), never down; the ``why`` says so."""
        import copy
        import math

        if not self.calibrated or rows <= 0 or not self.chunk_rows or rows >= self.chunk_rows:
            return self
        factor = math.sqrt(self.chunk_rows / rows)
        out = copy.deepcopy(self)
        for f in out.features.values():
            if f.get("source") in (SOURCE_CALIBRATED, SOURCE_OWN) and f.get("threshold") is not None and \
                    f.get("mean") is not None:
                f["threshold"] = float(f["threshold"]) * factor
                f["mean"] = float(f["mean"]) * factor
                if f.get("std") is not None:
                    f["std"] = float(f["std"]) * factor
        if out.prediction and out.prediction.get("threshold") is not None:
            out.prediction["threshold"] = float(out.prediction["threshold"]) * factor
        out.why += (f"; thresholds scaled by {factor:.2f} for a window of {rows} rows (chunks: {self.chunk_rows})")
        return out

    def threshold(self, name: str) -> float | None:
        f = self.features.get(name)
        return None if f is None else f.get("threshold")


# -- the statistic, as Evidently computes it -------------------------------------------------------------
def statistic(reference: pd.Series, current: pd.Series, kind: str, stattest: str) -> float | None:
    """Evidently's drift score of one column: its registered stattest function on the values Evidently's
    ``ValueDrift`` passes it (infinite and missing values dropped). None when a side has no value."""
    import numpy as np
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType

    ref = reference.replace([-np.inf, np.inf], np.nan).dropna()
    cur = current.replace([-np.inf, np.inf], np.nan).dropna()
    if ref.empty or cur.empty:
        return None
    ctype = ColumnType.Numerical if kind == "numeric" else ColumnType.Categorical
    test = get_stattest(ref, cur, ctype, stattest)
    return float(test(ref, cur, ctype, None).drift_score)


def decision_settings(contract: DataContract, policy: DriftPolicy) -> dict[str, dict[str, Any]]:
    """Per model feature: ``exclude``, ``threshold`` (own, or None), ``calibrate`` from the schema's
    ``drift:`` settings. (``monitoring.key_features`` belong to the fixed rules: numbers chosen without the
    data's own variability, they would fire on every quiet window of a feature that swings by nature.)"""
    out: dict[str, dict[str, Any]] = {}
    schema = getattr(contract, "drift_settings", {}) or {}
    for name in contract.model_features:
        s = dict(schema.get(name) or {})
        own = s.get("threshold")
        out[name] = {"exclude": bool(s.get("exclude", False)), "threshold": own,
                     "calibrate": bool(s.get("calibrate", True))}
    return out


def importance_weights(importance: dict[str, float], features: list[str]) -> dict[str, float]:
    """Gain importance of ``features`` normalised to sum to one (unused features 0; uniform without any)."""
    raw = {f: max(0.0, float(importance.get(f, 0.0) or 0.0)) for f in features}
    total = sum(raw.values())
    if total <= 0:
        return {f: 1.0 / len(features) for f in features} if features else {}
    return {f: v / total for f, v in raw.items()}


def contribution(name: str, score: float | None, calibration: Calibration) -> float:
    """How far ``name``'s statistic lies past what its chunks showed, in their standard deviations:
    max(0, (score - chunks' mean) / chunks' std), so a feature at its calibrated threshold counts
    ``std_multiplier``. A feature with a threshold but no chunk spread (fixed, ``calibrate: false``) counts
    ``std_multiplier x score / threshold``; a feature without a score counts as at its threshold (a broken feed
    is not silence)."""
    k = calibration.std_multiplier or DEFAULT_STD_MULTIPLIER
    f = calibration.features.get(name) or {}
    if score is None:
        return k
    mean, std = f.get("mean"), f.get("std")
    if f.get("source") in (SOURCE_CALIBRATED, SOURCE_OWN) and mean is not None and std is not None:
        return max(0.0, (float(score) - float(mean)) / max(float(std), MIN_THRESHOLD))
    thr = f.get("threshold") or MIN_THRESHOLD
    return k * float(score) / max(float(thr), MIN_THRESHOLD)


def aggregate(scores: dict[str, float | None], calibration: Calibration) -> float | None:
    """The decision statistic, the importance-weighted input drift: the root of the importance-weighted mean of
    the squared :func:`contribution` of the decision's features (each feature's excess over its chunks' mean,
    in their standard deviations). Squaring lets a feature the model relies on moving far outside its range
    count even when its weight is modest (a mean of ratios to the thresholds dilutes it among the features that
    did not move); the weights keep a feature the model barely uses from deciding. None when no feature is in
    the decision."""
    if not calibration.weights:
        return None
    total = sum(w * contribution(name, scores.get(name), calibration) ** 2 for name, w in calibration.weights.items())
    return math.sqrt(total)


def peak(scores: dict[str, float | None], calibration: Calibration) -> tuple[float, str] | None:
    """The peak of the input drift: the largest :func:`contribution` among the features the model relies on most
    (``calibration.peak['features']``), with its feature's name; None without such features (or a calibration
    from before the peak existed)."""
    names = (calibration.peak or {}).get("features") or []
    if not names:
        return None
    return max((contribution(n, scores.get(n), calibration), n) for n in names)


def _peak_band(chunk_statistics: dict[str, list[float | None]], calibration: Calibration, features: list[str],
               min_importance: float) -> dict[str, Any] | None:
    """The peak's threshold over ``features`` from the chunks' statistics (one list per column); None without
    features or chunks."""
    if not features or not chunk_statistics:
        return None
    n = len(next(iter(chunk_statistics.values())))
    probe = Calibration(mode=MODE_CALIBRATED, why="", features=calibration.features, weights=calibration.weights,
                        std_multiplier=calibration.std_multiplier, peak={"features": features})
    peaks = [p[0] for p in (peak({c: v[i] for c, v in chunk_statistics.items()}, probe) for i in range(n)) if p]
    k = calibration.std_multiplier or DEFAULT_STD_MULTIPLIER
    band = _band(peaks, k)
    if band["threshold"] is not None:
        # never looser than each feature's own rule (``k`` std past its chunks' mean): with a dozen chunks the
        # peak's spread is underestimated, and the largest of several features passes k more often than one
        band["threshold"] = max(band["threshold"], k)
    return {**band, "features": features, "min_importance": min_importance, "statistic": PEAK_STATISTIC}


def _band(values: list[float], k: float) -> dict[str, Any]:
    import numpy as np

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"threshold": None, "mean": None, "std": None, "max": None, "n": 0}
    mean, std, top = float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, float(v.max())
    return {"threshold": max(mean + k * std, top, MIN_THRESHOLD), "mean": mean, "std": std, "max": top,
            "n": int(v.size)}


def chunk_starts(days: list[Any], window_days: int, min_chunks: int) -> tuple[list[int], str]:
    """Indices into ``days`` (sorted distinct days) where chunks start, and how they were laid out."""
    n = len(days)
    disjoint = list(range(0, n - window_days + 1, window_days))
    if len(disjoint) >= min_chunks:
        return disjoint, "disjoint"
    return list(range(0, max(0, n - window_days + 1))), "sliding by one day"


def fixed(policy: DriftPolicy, contract: DataContract, why: str, importance: dict[str, float] | None = None,
          window_days: int = 0) -> Calibration:
    """The policy's fixed thresholds, saying ``why`` they are used."""
    kinds = _kinds(contract)
    features = {}
    for name, kind in kinds.items():
        thr = policy.numeric_threshold if kind == "numeric" else policy.categorical_threshold
        features[name] = {"stattest": policy.numeric_stattest if kind == "numeric" else policy.categorical_stattest,
                          "threshold": thr, "source": SOURCE_FIXED}
    return Calibration(mode=MODE_FIXED, why=why, window_days=window_days, features=features,
                       prediction={"stattest": policy.numeric_stattest, "threshold": policy.prediction_threshold,
                                   "source": SOURCE_FIXED},
                       weights=importance_weights(importance or {}, list(kinds)))


def calibrate(window: pd.DataFrame, reference: pd.DataFrame, contract: DataContract, policy: DriftPolicy,
              importance: dict[str, float], *, settings: CalibrationSettings | None = None,
              score_column: str = "score", seed: int = 0) -> Calibration:
    """Thresholds for ``policy``'s statistics from ``window`` (every row of the training window, with an
    event timestamp and, if present, the out-of-sample ``score_column``) against ``reference`` (the sample
    of it that monitoring compares windows with; same columns). See the module docstring."""
    import time

    import numpy as np

    settings = settings or CalibrationSettings()
    started = time.perf_counter()
    kinds = _kinds(contract)
    per_feature = decision_settings(contract, policy)
    days_w = window_days = policy.window_days
    if not settings.enabled:
        return fixed(policy, contract, "calibration disabled (monitoring.calibration.enabled: false)", importance,
                     window_days)
    ts = contract.event_timestamp
    # days as datetime64 values (UTC): a tz-aware column's to_numpy() is an array of Timestamp objects, whose
    # conversion and np.isin cost seconds on a million rows; the days and the rows they select are the same
    wday_v = _utc_days(window[ts])
    rday_v = _utc_days(reference[ts])
    days = np.unique(wday_v)
    starts, layout = chunk_starts(days, days_w, settings.min_chunks)
    gap = days_w if settings.gap_days is None else settings.gap_days
    if len(starts) < settings.min_chunks:
        return fixed(policy, contract,
                     f"the training window spans {len(days)} days: {len(starts)} chunks of {days_w} days, fewer than "
                     f"min_chunks={settings.min_chunks} (train on at least {days_w + settings.min_chunks - 1} days "
                     "for calibrated thresholds)", importance, window_days)
    columns = dict(kinds)
    with_score = score_column in window.columns and score_column in reference.columns
    if with_score:
        columns[score_column] = "numeric"

    def method(kind: str) -> str:
        return policy.numeric_stattest if kind == "numeric" else policy.categorical_stattest

    rprep = _prepared(reference, columns)
    stats: dict[str, list[float | None]] = {c: [] for c in columns}
    rows = []
    for i, s in enumerate(starts):
        chunk_days = days[s:s + days_w]
        in_chunk = np.isin(wday_v, chunk_days)
        # the chunk's rows sampled, then prepared (the same rows and values as preparing first: _prepared works
        # row by row, _sample picks positions): only the rows compared are converted
        cur = _prepared(_sample(window[in_chunk], policy.sample_rows, seed + i), columns)
        # the reference without the chunk's days and ``gap`` days on each side: a monitored window never shares
        # days with the reference, nor the day-level conditions of the days next to it (a day factor persists)
        ref = rprep[~np.isin(rday_v, days[max(0, s - gap):s + days_w + gap])]
        rows.append(len(cur))
        for c, kind in columns.items():
            stats[c].append(statistic(ref[c], cur[c], kind, method(kind)))

    k = settings.std_multiplier
    features: dict[str, dict[str, Any]] = {}
    for name, kind in kinds.items():
        band = _band(stats[name], k)
        ps = per_feature[name]
        entry = {"stattest": method(kind), **band}
        if ps["exclude"]:
            entry["source"] = SOURCE_EXCLUDED
        elif ps["threshold"] is not None:
            entry.update(source=SOURCE_OWN, own_threshold=float(ps["threshold"]))
            if not ps["calibrate"] or band["threshold"] is None:
                entry["threshold"] = policy.numeric_threshold if kind == "numeric" else policy.categorical_threshold
        elif not ps["calibrate"] or band["threshold"] is None:
            entry.update(threshold=policy.numeric_threshold if kind == "numeric" else policy.categorical_threshold,
                         source=SOURCE_FIXED, calibrated_threshold=band["threshold"])
        else:
            entry["source"] = SOURCE_CALIBRATED
        features[name] = entry

    # the decision's features: not excluded, used enough by the model (own-threshold ones too: their own rule
    # adds to the aggregate, it does not replace it)
    candidates = [n for n in kinds if features[n]["source"] != SOURCE_EXCLUDED]
    shares = importance_weights(importance, list(kinds))
    used = [n for n in candidates if shares.get(n, 0.0) >= settings.min_importance]
    reported_only = [n for n in kinds if n not in used]
    weights = importance_weights(importance, used)
    partial = Calibration(mode=MODE_CALIBRATED, why="", features=features, weights=weights, std_multiplier=k)
    aggregates = [aggregate({n: stats[n][i] for n in kinds}, partial) for i in range(len(starts))]
    agg = {**_band([a for a in aggregates if a is not None], k), "features": used, "statistic": AGGREGATE_STATISTIC}
    # the peak: features the model relies on most, each able to decide alone past what the chunks' peaks showed
    top = [n for n in used if shares.get(n, 0.0) >= settings.peak_min_importance]
    peak_band = _peak_band({n: stats[n] for n in kinds}, partial, top, settings.peak_min_importance)
    prediction = {"stattest": policy.numeric_stattest, **_band(stats[score_column], k),
                  "source": SOURCE_CALIBRATED} if with_score else None
    chunk_rows = int(np.median(rows))
    why = (f"calibrated on {len(starts)} chunks of {days_w} days ({layout}, median {chunk_rows} rows) of the "
           f"{len(days)}-day training window, each against the {len(reference)}-row reference without its days "
           f"and {gap} day(s) on each side; "
           f"threshold = mean + {k:g} std of the chunks' statistics")
    out = Calibration(mode=MODE_CALIBRATED, why=why, window_days=days_w, chunks=len(starts), chunk_rows=chunk_rows,
                      reference_rows=len(reference), std_multiplier=k, features=features, prediction=prediction,
                      aggregate=agg, peak=peak_band, weights=weights, reported_only=reported_only,
                      chunk_statistics={c: [None if v is None else round(v, 6) for v in vals]
                                        for c, vals in stats.items()})
    log.info("drift thresholds %s in %.1f s; aggregate threshold %.3f over %d features, peak threshold %s over %s",
             why, time.perf_counter() - started, agg["threshold"] or float("nan"), len(used),
             peak_band and peak_band["threshold"], top)
    return out


def _utc_days(timestamps: pd.Series) -> Any:
    """The UTC day of each timestamp as ``datetime64[ns]`` values (naive ones taken as UTC)."""
    import pandas as pd

    return pd.to_datetime(timestamps, utc=True).dt.floor("D").dt.tz_localize(None).to_numpy()


def reference_calibration(window: pd.DataFrame, reference: pd.DataFrame, contract: DataContract,
                          monitoring: dict[str, Any], importance: dict[str, float], *,
                          score_column: str = "score") -> Calibration:
    """:func:`calibrate` for the ``monitoring`` section of the configuration, with the performance band
    (:func:`closedloop.stages.performance.calibrate_reference` on the window's out-of-sample scores and labels,
    chunks of a monitoring window's rows) in ``performance``."""
    policy = DriftPolicy.from_config(monitoring)
    settings = CalibrationSettings.from_config(monitoring.get("calibration"))
    out = calibrate(window, reference, contract, policy, importance, settings=settings, score_column=score_column)
    if score_column in window.columns:
        scored = window.loc[window[score_column].notna(), [score_column, contract.label, contract.event_timestamp]]
        per_day = max(1, len(scored) // max(1, scored[contract.event_timestamp].dt.floor("D").nunique(dropna=False)))
        rows = out.chunk_rows or per_day * policy.window_days
        perf = performance.calibrate_reference(scored[score_column].to_numpy(), scored[contract.label].to_numpy(),
                                               int(rows), min_chunks=settings.min_chunks,
                                               width=settings.std_multiplier or performance.DEFAULT_WIDTH,
                                               stride_rows=per_day)
        out.performance = perf.to_dict()
    return out
