"""Model quality metrics shared by training, the gate and monitoring."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
