"""Model performance before and after the labels arrive: score calibration, CBPE estimates, realised
figures and the bands they are judged against.

- **Calibration.** A model's scores are rarely probabilities. :func:`fit_calibrator` fits an isotonic
  regression of the labels on *out-of-sample* scores (a calibrator fitted on the model's own training
  scores would be optimistic) and keeps only its breakpoints, a small JSON-safe :class:`ScoreCalibrator`
  that travels with the champion's version (:meth:`ScoreCalibrator.to_dict`, :meth:`ScoreCalibrator.from_dict`).
  :func:`out_of_fold_probabilities` calibrates a time-ordered reference in contiguous folds, each fold by a
  calibrator fitted on the others, for figures computed on the reference itself.
- **Confidence-based performance estimation** (CBPE, as NannyML defines it): with calibrated probabilities
  ``p``, a row scored above a threshold is a true positive with probability ``p`` and a false positive with
  probability ``1 - p``; summing over rows gives the expected confusion matrix at every threshold, hence the
  expected ROC curve (:func:`estimate_roc_auc`) and precision-recall curve
  (:func:`estimate_average_precision`), without a single label. It holds while ``P(label | score)`` holds:
  it follows covariate shift, not concept drift (only :func:`realised` sees that).
- **Bands.** A window's figure is judged against the spread of the same figure over chunks of the
  reference the size of a window (:func:`chunk_performance`, :func:`band`; NannyML's default is the chunks'
  mean +/- 3 standard deviations). :func:`calibrate_reference` does the whole reference step and returns a
  :class:`PerformanceReference`, itself JSON-safe.

Pure functions on NumPy arrays: no Airflow, no MLflow, no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from closedloop.core.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import ArrayLike

Metric = Literal["roc_auc", "average_precision"]
METRICS: tuple[str, ...] = ("roc_auc", "average_precision")
DEFAULT_WIDTH = 3.0        # NannyML's default band: mean +/- 3 standard deviations of the chunks
MIN_CHUNKS = 10            # fewer chunks than this give no band (the caller falls back and says so)
MIN_CLASS_ROWS = 5         # rows of each class a calibrator needs (fewer: the identity, which says so)


# -- calibration ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreCalibrator:
    """A monotone map from a model's scores to probabilities: linear interpolation between breakpoints
    ``(x[i], y[i])``, constant beyond the ends (what sklearn's ``IsotonicRegression`` predicts with
    ``out_of_bounds="clip"``). ``method`` is ``"isotonic"`` or ``"identity"`` (scores kept as they are,
    with ``reason`` saying why)."""

    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    method: str = "identity"
    reason: str = ""
    rows: int = 0

    def __post_init__(self) -> None:
        if self.method not in {"isotonic", "identity"}:
            raise ConfigError(f"score calibrator method={self.method!r}: use 'isotonic' or 'identity'")
        if len(self.x) != len(self.y):
            raise ConfigError(f"score calibrator: {len(self.x)} breakpoints x but {len(self.y)} y")
        if self.method == "isotonic" and not self.x:
            raise ConfigError("score calibrator: an isotonic calibrator needs at least one breakpoint")
        if any(b < a for a, b in zip(self.x, self.x[1:], strict=False)):
            raise ConfigError("score calibrator: breakpoints x must be non-decreasing")

    def apply(self, scores: ArrayLike) -> np.ndarray:
        """Calibrated probabilities of ``scores`` (float64, in [0, 1])."""
        import numpy as np

        s = np.asarray(scores, dtype=np.float64)
        if self.method == "identity":
            return np.clip(s, 0.0, 1.0)
        return np.clip(np.interp(s, np.asarray(self.x), np.asarray(self.y)), 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (plain floats and strings) that :meth:`from_dict` reads back."""
        return {"method": self.method, "x": [float(v) for v in self.x], "y": [float(v) for v in self.y],
                "reason": self.reason, "rows": int(self.rows)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreCalibrator:
        """The calibrator :meth:`to_dict` wrote."""
        try:
            return cls(x=tuple(float(v) for v in data.get("x", ())), y=tuple(float(v) for v in data.get("y", ())),
                       method=str(data["method"]), reason=str(data.get("reason", "")),
                       rows=int(data.get("rows", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"score calibrator: cannot read {dict(data)!r} ({exc})") from exc


def _arrays(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must be 1-d arrays of the same length")
    if np.isnan(s).any():
        raise ValueError("scores hold NaN: score every row before calibrating or judging performance")
    y = y.astype(np.int64)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1 (map the contract's label values first)")
    return s, y


def fit_calibrator(scores: ArrayLike, labels: ArrayLike) -> ScoreCalibrator:
    """An isotonic calibrator of ``scores`` (out-of-sample scores of the model) on ``labels`` (0/1).

    With fewer than :data:`MIN_CLASS_ROWS` rows of either class the identity is returned, its ``reason``
    saying so: the scores are then used as they are."""
    import numpy as np
    from sklearn.isotonic import IsotonicRegression

    s, y = _arrays(scores, labels)
    positives = int(y.sum())
    if min(positives, len(y) - positives) < MIN_CLASS_ROWS:
        return ScoreCalibrator(method="identity", rows=len(y),
                               reason=f"{positives} positive and {len(y) - positives} negative rows: "
                                      f"at least {MIN_CLASS_ROWS} of each are needed to calibrate")
    iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(s, y)
    x_b = np.asarray(iso.X_thresholds_, dtype=np.float64)
    y_b = np.asarray(iso.y_thresholds_, dtype=np.float64)
    return ScoreCalibrator(x=tuple(x_b.tolist()), y=tuple(y_b.tolist()), method="isotonic", rows=len(y))


def _blocks(n: int, folds: int) -> list[np.ndarray]:
    import numpy as np

    return [b for b in np.array_split(np.arange(n), folds) if len(b)]


def out_of_fold_probabilities(scores: ArrayLike, labels: ArrayLike, folds: int = 5) -> np.ndarray:
    """Calibrated probabilities of every row of a time-ordered reference, each contiguous block of rows
    (``folds`` of them) calibrated by a calibrator fitted on the other blocks: figures computed on the
    reference with these are not flattered by calibrating on the same rows."""
    import numpy as np

    s, y = _arrays(scores, labels)
    if folds < 2:
        raise ValueError(f"folds={folds}: at least 2 are needed for out-of-fold calibration")
    out = np.empty(len(s), dtype=np.float64)
    for block in _blocks(len(s), folds):
        rest = np.ones(len(s), dtype=bool)
        rest[block] = False
        out[block] = fit_calibrator(s[rest], y[rest]).apply(s[block])
    return out


# -- estimated and realised metrics ----------------------------------------------------------------------
def _expected_curve(probabilities: ArrayLike, scores: ArrayLike | None) -> tuple[np.ndarray, np.ndarray,
                                                                                 np.ndarray] | None:
    """Expected true and false positives above each distinct threshold (rows ranked by ``scores``,
    ``probabilities`` when None), and the rows above it; None when no positive or no negative is expected."""
    import numpy as np

    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    s = p if scores is None else np.asarray(scores, dtype=np.float64)
    if s.shape != p.shape or p.ndim != 1:
        raise ValueError(f"probabilities {p.shape} and scores {s.shape} must be 1-d arrays of the same length")
    if len(p) == 0 or np.isnan(p).any() or np.isnan(s).any():
        return None
    order = np.argsort(-s, kind="stable")
    s_sorted, p_sorted = s[order], p[order]
    tp = np.cumsum(p_sorted)
    fp = np.cumsum(1.0 - p_sorted)
    if tp[-1] <= 0.0 or fp[-1] <= 0.0:
        return None
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]  # the last row of each tie
    return tp[last], fp[last], (last + 1).astype(np.float64)


def estimate_roc_auc(probabilities: ArrayLike, scores: ArrayLike | None = None) -> float:
    """CBPE's ROC AUC: the area under the expected ROC curve of calibrated ``probabilities``, rows ranked
    by ``scores`` (the model's raw scores; the probabilities when None). NaN when the probabilities
    expect no positive or no negative."""
    import numpy as np

    curve = _expected_curve(probabilities, scores)
    if curve is None:
        return float("nan")
    tp, fp, _ = curve
    tpr = np.r_[0.0, tp / tp[-1]]
    fpr = np.r_[0.0, fp / fp[-1]]
    return float(np.trapezoid(tpr, fpr))


def estimate_average_precision(probabilities: ArrayLike, scores: ArrayLike | None = None) -> float:
    """CBPE's average precision: sum over thresholds of (expected recall gained) x (expected precision),
    as sklearn's ``average_precision_score`` sums the realised ones. NaN when no positive is expected."""
    import numpy as np

    curve = _expected_curve(probabilities, scores)
    if curve is None:
        return float("nan")
    tp, _, rows = curve
    recall = np.r_[0.0, tp / tp[-1]]
    precision = tp / rows
    return float(np.sum(np.diff(recall) * precision))


def estimate(metric: str, probabilities: ArrayLike, scores: ArrayLike | None = None) -> float:
    """The CBPE estimate of ``metric`` (one of :data:`METRICS`) on calibrated ``probabilities``."""
    if metric == "roc_auc":
        return estimate_roc_auc(probabilities, scores)
    if metric == "average_precision":
        return estimate_average_precision(probabilities, scores)
    raise ConfigError(f"performance metric {metric!r}: use one of {METRICS}")


def realised(metric: str, scores: ArrayLike, labels: ArrayLike) -> float:
    """``metric`` (one of :data:`METRICS`) of ``scores`` against their ``labels`` (0/1); NaN when the
    labels hold a single class (the metric is not defined)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    if metric not in METRICS:
        raise ConfigError(f"performance metric {metric!r}: use one of {METRICS}")
    s, y = _arrays(scores, labels)
    positives = int(y.sum())
    if positives == 0 or positives == len(y):
        return float("nan")
    if metric == "roc_auc":
        return float(roc_auc_score(y, s))
    return float(average_precision_score(y, s))


# -- bands over reference chunks ------------------------------------------------------------------------
@dataclass(frozen=True)
class Band:
    """The spread of a figure over ``chunks`` reference chunks of ``chunk_rows`` rows:
    ``mean +/- width * std``. A figure below ``lower`` (or above ``upper``) has left the band."""

    mean: float
    std: float
    width: float = DEFAULT_WIDTH
    chunks: int = 0
    chunk_rows: int = 0

    @property
    def lower(self) -> float:
        return self.mean - self.width * self.std

    @property
    def upper(self) -> float:
        return self.mean + self.width * self.std

    def for_rows(self, rows: int) -> Band:
        """The band for a window of ``rows`` rows: a metric's chunk-to-chunk spread shrinks as
        1/sqrt(rows), so a window with fewer rows than the chunks gets a wider band (never narrower
        than the chunks' own)."""
        if rows <= 0 or self.chunk_rows <= 0 or rows >= self.chunk_rows:
            return self
        return Band(mean=self.mean, std=self.std * math.sqrt(self.chunk_rows / rows), width=self.width,
                    chunks=self.chunks, chunk_rows=self.chunk_rows)

    def below(self, value: float) -> bool:
        """Whether ``value`` is under the band (NaN is never under it)."""
        return not math.isnan(value) and value < self.lower

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies inside the band (NaN does not)."""
        return not math.isnan(value) and self.lower <= value <= self.upper

    def to_dict(self) -> dict[str, Any]:
        return {"mean": float(self.mean), "std": float(self.std), "width": float(self.width),
                "chunks": int(self.chunks), "chunk_rows": int(self.chunk_rows),
                "lower": float(self.lower), "upper": float(self.upper)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Band:
        try:
            return cls(mean=float(data["mean"]), std=float(data["std"]),
                       width=float(data.get("width", DEFAULT_WIDTH)), chunks=int(data.get("chunks", 0)),
                       chunk_rows=int(data.get("chunk_rows", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"performance band: cannot read {dict(data)!r} ({exc})") from exc


def band(values: Sequence[float], *, width: float = DEFAULT_WIDTH, chunk_rows: int = 0) -> Band:
    """The band ``mean +/- width * std`` (sample std, ddof=1) of the finite ``values`` (one per chunk)."""
    import numpy as np

    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) < 2:
        raise ValueError(f"a band needs at least 2 finite values, got {len(v)}")
    if width <= 0:
        raise ConfigError(f"band width={width}: must be > 0")
    return Band(mean=float(v.mean()), std=float(v.std(ddof=1)), width=width, chunks=len(v), chunk_rows=chunk_rows)


@dataclass(frozen=True)
class ChunkPerformance:
    """One chunk's figures: ``rows`` rows, ``positives`` of them positive; ``estimated`` (CBPE) and
    ``realised`` ``metric``."""

    start: int
    rows: int
    positives: int
    metric: str
    estimated: float
    realised: float


def chunk_bounds(n_rows: int, chunk_rows: int, stride_rows: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` of the chunks of ``chunk_rows`` rows in ``n_rows`` time-ordered rows: contiguous
    and disjoint (the remainder, fewer than ``chunk_rows`` rows, goes to the last chunk) or, with
    ``stride_rows`` < ``chunk_rows``, overlapping chunks starting every ``stride_rows`` rows."""
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows={chunk_rows}: must be positive")
    if stride_rows is not None and 0 < stride_rows < chunk_rows:
        return [(a, a + chunk_rows) for a in range(0, n_rows - chunk_rows + 1, stride_rows)]
    count = n_rows // chunk_rows
    bounds = [(i * chunk_rows, (i + 1) * chunk_rows) for i in range(count)]
    if bounds and bounds[-1][1] < n_rows:
        bounds[-1] = (bounds[-1][0], n_rows)
    return bounds


def chunk_performance(scores: ArrayLike, labels: ArrayLike, probabilities: ArrayLike, chunk_rows: int,
                      metric: str = "roc_auc", stride_rows: int | None = None) -> list[ChunkPerformance]:
    """Estimated (from ``probabilities``, rows ranked by ``scores``) and realised ``metric`` of every
    chunk of ``chunk_rows`` rows of a time-ordered reference (:func:`chunk_bounds`)."""
    import numpy as np

    s, y = _arrays(scores, labels)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape != s.shape:
        raise ValueError(f"probabilities {p.shape} and scores {s.shape} must have the same length")
    out = []
    for a, b in chunk_bounds(len(s), chunk_rows, stride_rows):
        out.append(ChunkPerformance(start=a, rows=b - a, positives=int(y[a:b].sum()), metric=metric,
                                    estimated=estimate(metric, p[a:b], s[a:b]),
                                    realised=realised(metric, s[a:b], y[a:b])))
    return out


@dataclass(frozen=True)
class PerformanceReference:
    """What the monitoring of one model version needs to judge performance: the calibrator of its scores,
    its reference figures, and the bands of the estimated and realised ``metric`` over the reference's
    chunks (None, with ``reason``, when the reference is too short for :data:`MIN_CHUNKS` chunks)."""

    metric: str
    calibrator: ScoreCalibrator
    reference_estimated: float
    reference_realised: float
    estimated: Band | None
    realised: Band | None
    chunk_rows: int
    reason: str = ""
    layout: str = "disjoint"   # how the chunks were laid out: disjoint, or sliding (overlapping) when too few

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict that :meth:`from_dict` reads back."""
        return {"metric": self.metric, "calibrator": self.calibrator.to_dict(), "layout": self.layout,
                "reference_estimated": _json_float(self.reference_estimated),
                "reference_realised": _json_float(self.reference_realised),
                "estimated": None if self.estimated is None else self.estimated.to_dict(),
                "realised": None if self.realised is None else self.realised.to_dict(),
                "chunk_rows": int(self.chunk_rows), "reason": self.reason}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerformanceReference:
        try:
            return cls(metric=str(data["metric"]), calibrator=ScoreCalibrator.from_dict(data["calibrator"]),
                       reference_estimated=_from_json_float(data.get("reference_estimated")),
                       reference_realised=_from_json_float(data.get("reference_realised")),
                       estimated=None if data.get("estimated") is None else Band.from_dict(data["estimated"]),
                       realised=None if data.get("realised") is None else Band.from_dict(data["realised"]),
                       chunk_rows=int(data.get("chunk_rows", 0)), reason=str(data.get("reason", "")),
                       layout=str(data.get("layout", "disjoint")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"performance reference: cannot read it ({exc})") from exc


def _json_float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _from_json_float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def calibrate_reference(scores: ArrayLike, labels: ArrayLike, chunk_rows: int, *, metric: str = "roc_auc",
                        width: float = DEFAULT_WIDTH, min_chunks: int = MIN_CHUNKS, folds: int = 5,
                        stride_rows: int | None = None) -> PerformanceReference:
    """The performance reference of a model from its time-ordered reference rows: out-of-sample
    ``scores`` (cross-fitted over the training window) and their ``labels`` (0/1).

    The calibrator is fitted on all rows. The bands come from chunks of ``chunk_rows`` rows (a monitoring
    window's size): disjoint ones when at least ``min_chunks`` fit, otherwise overlapping ones starting
    every ``stride_rows`` rows (a day's rows, as monitoring slides its window by a day; ``layout`` says
    which). The estimates there use out-of-fold calibrated probabilities
    (:func:`out_of_fold_probabilities`), so that the estimated band is not narrowed by calibrating on the
    chunk's own labels. Fewer than ``min_chunks`` chunks with both classes: no bands, ``reason`` says why."""
    import numpy as np

    if metric not in METRICS:
        raise ConfigError(f"performance metric {metric!r}: use one of {METRICS}")
    s, y = _arrays(scores, labels)
    calibrator = fit_calibrator(s, y)
    ref_est = estimate(metric, calibrator.apply(s), s)
    ref_real = realised(metric, s, y)
    n_chunks = len(s) // chunk_rows if chunk_rows > 0 else 0
    layout, stride = "disjoint", None
    if chunk_rows > 0 and n_chunks < min_chunks and stride_rows is not None and 0 < stride_rows < chunk_rows:
        sliding = len(chunk_bounds(len(s), chunk_rows, stride_rows))
        if sliding >= min_chunks:
            layout, stride, n_chunks = f"sliding by {stride_rows} rows", stride_rows, sliding
    if chunk_rows <= 0 or n_chunks < min_chunks:
        return PerformanceReference(metric=metric, calibrator=calibrator, reference_estimated=ref_est,
                                    reference_realised=ref_real, estimated=None, realised=None,
                                    chunk_rows=max(chunk_rows, 0),
                                    reason=f"the reference's {len(s)} rows make {n_chunks} chunks of "
                                           f"{chunk_rows} rows, fewer than {min_chunks}: no calibrated band")
    probabilities = (out_of_fold_probabilities(s, y, folds) if calibrator.method == "isotonic"
                     else calibrator.apply(s))
    chunks = chunk_performance(s, y, probabilities, chunk_rows, metric, stride)
    est = [c.estimated for c in chunks]
    real = [c.realised for c in chunks]
    usable = int(np.isfinite(np.asarray(real, dtype=np.float64)).sum())
    if usable < min_chunks:
        return PerformanceReference(metric=metric, calibrator=calibrator, reference_estimated=ref_est,
                                    reference_realised=ref_real, estimated=None, realised=None,
                                    chunk_rows=chunk_rows,
                                    reason=f"only {usable} of {len(chunks)} reference chunks of {chunk_rows} "
                                           f"rows hold both classes, fewer than {min_chunks}: no calibrated band")
    return PerformanceReference(metric=metric, calibrator=calibrator, reference_estimated=ref_est,
                                reference_realised=ref_real,
                                estimated=band(est, width=width, chunk_rows=chunk_rows),
                                realised=band(real, width=width, chunk_rows=chunk_rows), chunk_rows=chunk_rows,
                                layout=layout)


@dataclass(frozen=True)
class WindowPerformance:
    """One monitoring window's performance: the CBPE estimate always, the realised figure once labels
    are there (NaN before), and whether each has left its band (below its lower edge)."""

    metric: str
    rows: int
    estimated: float
    realised: float
    labelled_rows: int
    estimated_band: Band | None
    realised_band: Band | None

    @property
    def estimated_drop(self) -> bool:
        return self.estimated_band is not None and self.estimated_band.below(self.estimated)

    @property
    def realised_drop(self) -> bool:
        return self.realised_band is not None and self.realised_band.below(self.realised)

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "rows": self.rows, "estimated": _json_float(self.estimated),
                "realised": _json_float(self.realised), "labelled_rows": self.labelled_rows,
                "estimated_band": None if self.estimated_band is None else self.estimated_band.to_dict(),
                "realised_band": None if self.realised_band is None else self.realised_band.to_dict(),
                "estimated_drop": self.estimated_drop, "realised_drop": self.realised_drop}


def judge_window(reference: PerformanceReference, scores: ArrayLike, labels: ArrayLike | None = None
                 ) -> WindowPerformance:
    """Estimate ``reference.metric`` on a window's ``scores`` (the champion's raw scores) and, when
    ``labels`` (0/1, aligned with the scores) are given, realise it; each judged against the reference's
    band scaled to the window's row count (:meth:`Band.for_rows`)."""
    import numpy as np

    s = np.asarray(scores, dtype=np.float64)
    est = estimate(reference.metric, reference.calibrator.apply(s), s)
    real, labelled = float("nan"), 0
    if labels is not None:
        real = realised(reference.metric, s, labels)
        labelled = len(s)
    rows = len(s)
    return WindowPerformance(
        metric=reference.metric, rows=rows, estimated=est, realised=real, labelled_rows=labelled,
        estimated_band=None if reference.estimated is None else reference.estimated.for_rows(rows),
        realised_band=None if reference.realised is None else reference.realised.for_rows(rows))
