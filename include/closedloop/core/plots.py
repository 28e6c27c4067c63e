"""Diagnostic plots logged to MLflow: what a model looks like on its holdout, and the gate's comparison.

:func:`model_plots` renders a trained model's ROC and precision-recall curves, its confusion matrix at
the decision threshold and its feature importance (gain); :func:`comparison_plot` renders candidate
and champion ROC curves on the gate's shared holdout. Both return PNG bytes by artifact name, and
:func:`log_pngs` logs them to a run under ``plots/``. matplotlib is imported inside the functions, with
the Agg backend (no display), and the figures are small: the four plots take a fraction of a second.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

PLOTS_DIR = "plots"
MODEL_PLOTS = ("roc_curve.png", "precision_recall_curve.png", "confusion_matrix.png", "feature_importance.png")
TOP_FEATURES = 20


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    _pyplot().close(fig)
    return buf.getvalue()


def _two_classes(y: Any) -> bool:
    import numpy as np

    return len(np.unique(np.asarray(y))) == 2


def _no_curve(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"{what}: undefined\n(the holdout has one class only)", ha="center", va="center")


def model_plots(y: Any, scores: Any, threshold: float, importance: dict[str, float]) -> dict[str, bytes]:
    """The four plots of a model on ``(y, scores)``: ``{file name: PNG bytes}`` (names in :data:`MODEL_PLOTS`)."""
    import numpy as np
    from sklearn.metrics import auc, confusion_matrix, precision_recall_curve, roc_curve

    plt = _pyplot()
    y = np.asarray(y).astype(int)
    scores = np.asarray(scores, dtype=float)
    out: dict[str, bytes] = {}

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if _two_classes(y):
        fpr, tpr, _ = roc_curve(y, scores)
        ax.plot(fpr, tpr, label=f"ROC AUC {auc(fpr, tpr):.4f}")
        pred = scores >= threshold
        ax.scatter([pred[y == 0].mean()], [pred[y == 1].mean()], color="red", zorder=3,
                   label=f"threshold {threshold:.4f}")
        ax.legend(loc="lower right")
    else:
        _no_curve(ax, "ROC")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate (recall)", title="ROC curve (holdout)")
    out["roc_curve.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if _two_classes(y):
        precision, recall, _ = precision_recall_curve(y, scores)
        ax.plot(recall, precision, label=f"base rate {y.mean():.4f}")
        ax.legend(loc="upper right")
    else:
        _no_curve(ax, "precision-recall")
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall curve (holdout)", ylim=(0, 1.02))
    out["precision_recall_curve.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4, 4))
    cm = confusion_matrix(y, (scores >= threshold).astype(int), labels=[0, 1])
    ax.imshow(cm, cmap="Blues")
    for (i, j), n in np.ndenumerate(cm):
        ax.text(j, i, f"{n:,}", ha="center", va="center", color="black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["legit", "fraud"], yticklabels=["legit", "fraud"],
           xlabel="predicted", ylabel="actual", title=f"Confusion matrix at {threshold:.4f}")
    out["confusion_matrix.png"] = _png(fig)

    top = sorted(importance.items(), key=lambda kv: kv[1], reverse=True)[:TOP_FEATURES]
    fig, ax = plt.subplots(figsize=(6, max(2.5, 0.3 * len(top) + 1)))
    if top:
        names, gains = zip(*reversed(top), strict=True)
        ax.barh(names, gains)
    else:
        ax.text(0.5, 0.5, "no split used any feature", ha="center", va="center")
    ax.set(xlabel="gain", title="Feature importance (gain)")
    fig.tight_layout()
    out["feature_importance.png"] = _png(fig)
    return out


def comparison_plot(y: Any, curves: dict[str, Any]) -> bytes:
    """ROC curves of several models' scores on the same holdout ``y`` (label -> scores), as PNG bytes."""
    import numpy as np
    from sklearn.metrics import auc, roc_curve

    plt = _pyplot()
    y = np.asarray(y).astype(int)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if _two_classes(y):
        for label, scores in curves.items():
            fpr, tpr, _ = roc_curve(y, np.asarray(scores, dtype=float))
            ax.plot(fpr, tpr, label=f"{label}: ROC AUC {auc(fpr, tpr):.4f}")
        ax.legend(loc="lower right")
    else:
        _no_curve(ax, "ROC")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="Gate: ROC on the shared holdout")
    return _png(fig)


def log_pngs(client: MlflowClient, run_id: str, pngs: dict[str, bytes], artifact_path: str = PLOTS_DIR) -> None:
    """Log ``{file name: PNG bytes}`` to ``run_id`` under ``artifact_path`` (one upload)."""
    with tempfile.TemporaryDirectory(prefix="closedloop-plots-") as tmp:
        for name, data in pngs.items():
            (Path(tmp) / name).write_bytes(data)
        client.log_artifacts(run_id, tmp, artifact_path=artifact_path)
