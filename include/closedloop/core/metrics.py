"""Model quality metrics shared by training, the gate and monitoring."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# metric name -> True when higher is better
DIRECTIONS: dict[str, bool] = {
    "roc_auc": True,
    "pr_auc": True,
    "log_loss": False,
    "recall_at_fpr": True,
}


def threshold_at_fpr(y: np.ndarray, scores: np.ndarray, target_fpr: float) -> float:
    """The lowest score threshold whose false-positive rate on ``(y, scores)`` is at most ``target_fpr``."""
    import numpy as np

    negatives = np.sort(scores[y == 0])[::-1]
    if len(negatives) == 0:
        return 0.5
    k = int(np.floor(target_fpr * len(negatives)))
    # scores strictly above the (k+1)-th highest negative flag at most k negatives
    return float(np.nextafter(negatives[min(k, len(negatives) - 1)], np.inf))


def classification_metrics(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """ROC AUC, PR AUC (average precision), log loss, and recall / FPR / precision at ``threshold``."""
    import numpy as np
    from sklearn.metrics import average_precision_score, log_loss, roc_auc_score

    y = np.asarray(y).astype(int)
    scores = np.clip(np.asarray(scores, dtype=float), 1e-7, 1 - 1e-7)
    both = len(np.unique(y)) == 2
    pred = scores >= threshold
    pos, neg = y == 1, y == 0
    return {
        "roc_auc": float(roc_auc_score(y, scores)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, scores)) if both else float("nan"),
        "log_loss": float(log_loss(y, scores, labels=[0, 1])),
        "recall_at_fpr": float(pred[pos].mean()) if pos.any() else float("nan"),
        "fpr_at_threshold": float(pred[neg].mean()) if neg.any() else float("nan"),
        "precision_at_threshold": float(y[pred].mean()) if pred.any() else float("nan"),
        "rows": float(len(y)),
        "positives": float(pos.sum()),
    }


_UNDEFINED_WHY = {
    "roc_auc": "one class only in the labels",
    "pr_auc": "one class only in the labels",
    "recall_at_fpr": "no positive labels",
    "fpr_at_threshold": "no negative labels",
    "precision_at_threshold": "no row scored at or above the decision threshold",
}


def explicit_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with every NaN or infinite value made None, and why under ``undefined`` (name -> reason).

    What crosses a task boundary (XCom, JSON reports) must be JSON: a NaN is not, and "undefined" says
    more than a number that is not one.
    """
    out: dict[str, Any] = {}
    undefined: dict[str, str] = dict(metrics.get("undefined") or {})
    for name, value in metrics.items():
        if name == "undefined":
            continue
        if isinstance(value, float | int) and not isinstance(value, bool) and not math.isfinite(value):
            out[name] = None
            undefined.setdefault(name, _UNDEFINED_WHY.get(name, f"not a finite number ({value})"))
        else:
            out[name] = value
    if undefined:
        out["undefined"] = undefined
    return out


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinite floats replaced by None and numpy scalars made Python ones, recursively.

    Dicts that hold metrics (a ``roc_auc`` or ``log_loss`` key) go through :func:`explicit_metrics`, so that an
    undefined metric carries its reason.
    """
    import numpy as np

    if isinstance(value, dict):
        if any(k in value for k in ("roc_auc", "log_loss")) and all(isinstance(k, str) for k in value):
            value = explicit_metrics(value)
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
