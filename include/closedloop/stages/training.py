"""Training: XGBoost on the training set, device chosen at run time, everything logged to MLflow."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from closedloop.core.config_model import TrainingSection
from closedloop.core.metrics import classification_metrics, json_safe, threshold_at_fpr
from closedloop.core.plots import log_pngs, model_plots
from closedloop.core.settings import REPO_ROOT
from closedloop.stages import calibration
from closedloop.stages.dask_training import fit_on_dask
from closedloop.stages.drift import DriftPolicy
from closedloop.stages.features import read_training_split
from closedloop.stages.model import (
    Fitted,
    category_codes,
    cuda_device_count,
    dmatrix,
    feature_frame,
    model_matrix,
    on_device,
    predict,
    predict_inplace,
    to_device,
    trimmed,
)
from closedloop.stages.registry import ensure_experiment, mlflow_client

if TYPE_CHECKING:
    import pandas as pd
    import xgboost as xgb
    from mlflow import MlflowClient

    from closedloop.core.lake import Lake
    from closedloop.core.schema import DataContract
    from closedloop.core.settings import Settings

log = logging.getLogger(__name__)

# the model's inputs and fitted form (closedloop.stages.model), importable from here as before
__all__ = ["Fitted", "category_codes", "cuda_device_count", "dmatrix", "feature_frame", "model_matrix", "on_device",
           "predict", "predict_inplace", "to_device", "trimmed"]

TAG = "closedloop."


def choose_device(requested: str = "auto") -> tuple[str, str]:
    """Pick where XGBoost trains: ``(device, why)``.

    XGBoost with ``device="cuda"`` and no usable GPU does not fail, it warns and trains on the CPU,
    so the choice is made here, from the build and the driver, and recorded with the run.
    """
    import xgboost as xgb

    if requested == "cpu":
        return "cpu", "CLOSEDLOOP_DEVICE=cpu"
    built = bool(xgb.build_info().get("USE_CUDA"))
    gpus = cuda_device_count() if built else 0
    if built and gpus > 0:
        return "cuda", f"{gpus} CUDA device(s) visible and xgboost built with CUDA"
    why = "xgboost built without CUDA" if not built else "no CUDA device visible"
    if requested == "cuda":
        log.warning("CLOSEDLOOP_DEVICE=cuda but %s: training on the CPU", why)
    return "cpu", why


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str
    lineage_key: str
    device: str
    threshold: float
    metrics: dict[str, float]
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (it crosses XCom): undefined metrics are None with their reason under ``undefined``."""
        return json_safe(dict(self.__dict__))


def lineage_key(training_set: dict[str, Any], contract: DataContract, settings: Settings) -> str:
    """What makes a model version: the data, the schema, the configuration and the code."""
    parts = [training_set["data_sha256"], contract.sha256, settings.config.sha256(), git_commit(),
             file_sha256(REPO_ROOT / "uv.lock")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def hyperparameters(config: TrainingSection | Mapping[str, Any]) -> dict[str, Any]:
    """``params``, ``num_boost_round``, ``early_stopping_rounds`` and ``target_fpr`` of the typed ``training``
    section, or of a mapping that holds them (a test's or a benchmark's own)."""
    if isinstance(config, TrainingSection):
        return {"params": dict(config.params), "num_boost_round": config.num_boost_round,
                "early_stopping_rounds": config.early_stopping_rounds, "target_fpr": config.target_fpr}
    return dict(config)


def fit(train: pd.DataFrame, validation: pd.DataFrame, contract: DataContract,
        config: TrainingSection | Mapping[str, Any], device: str) -> tuple[xgb.Booster, float]:
    """Train with early stopping on ``validation``; returns the booster and its decision threshold.

    ``config``: the typed ``training`` section (``Config.typed.training``) or a mapping of its hyperparameters
    (:func:`hyperparameters`)."""
    import xgboost as xgb

    config = hyperparameters(config)
    params = dict(config["params"])
    params["device"] = device
    max_bin = params.get("max_bin")
    dtrain = dmatrix(train, contract, device=device, max_bin=max_bin)
    dval = dmatrix(validation, contract, device=device, ref=dtrain, max_bin=max_bin)
    booster = xgb.train(
        params, dtrain, num_boost_round=int(config["num_boost_round"]),
        evals=[(dval, "validation")], early_stopping_rounds=int(config["early_stopping_rounds"]),
        verbose_eval=False,
    )
    val_scores = booster.predict(dval, iteration_range=(0, booster.best_iteration + 1))
    threshold = threshold_at_fpr(validation[contract.label].to_numpy(), val_scores, float(config["target_fpr"]))
    return booster, threshold


def fit_in_process(lake: Lake, uri: str, contract: DataContract, config: TrainingSection, device: str) -> Fitted:
    """The ``local`` engine: the three splits read into this process, :func:`fit`, metrics on whole frames.

    ``config`` is the configuration's typed ``training`` section (``Config.typed.training``)."""
    train = read_training_split(lake, uri, "train")
    validation = read_training_split(lake, uri, "validation")
    holdout = read_training_split(lake, uri, "holdout")
    booster, threshold = fit(train, validation, contract, config, device)
    model = trimmed(booster)
    model.set_param({"device": "cpu"})  # served and evaluated anywhere
    hold_y, hold_scores = holdout[contract.label].to_numpy(), predict(model, holdout, contract)
    holdout_metrics = classification_metrics(hold_y, hold_scores, threshold)
    val_metrics = classification_metrics(validation[contract.label].to_numpy(),
                                         predict(model, validation, contract), threshold)
    window = reference_window(train, validation, holdout, contract, config, booster.best_iteration + 1, device)
    want = min(len(window), config.reference_sample_rows)
    ref = window.sample(n=want, random_state=0).sort_index()
    return Fitted(engine="local", model=model, best_iteration=int(booster.best_iteration), threshold=threshold,
                  validation_metrics=val_metrics, holdout_metrics=holdout_metrics, reference_sample=ref,
                  reference_stats=reference_stats(train, contract), example=holdout.head(5),
                  holdout_y=hold_y, holdout_scores=hold_scores, reference_window=window)


CROSS_FIT_BLOCKS = 4
CROSS_FIT_MAX_ROWS = 200_000  # training rows per cross-fitted model (sampled above it): a few seconds each


def reference_window(train: pd.DataFrame, validation: pd.DataFrame, holdout: pd.DataFrame, contract: DataContract,
                     config: TrainingSection | Mapping[str, Any], rounds: int, device: str, *,
                     blocks: int = CROSS_FIT_BLOCKS,
                     score_column: str = "score") -> pd.DataFrame:
    """The whole training window, time-ordered, with an out-of-sample score for every row.

    Time-blocked cross-fitting: the window is cut into ``blocks`` contiguous blocks of time; each block is
    scored by a model trained, with the champion's parameters and its number of rounds (no early stopping),
    on the other blocks (sampled down to ``CROSS_FIT_MAX_ROWS`` rows). The scores are what the champion's
    scores on unseen data look like: the reference of prediction drift and of the performance estimate.
    """
    import numpy as np
    import pandas as pd
    import xgboost as xgb

    columns = [contract.event_timestamp, contract.label, *contract.model_features]
    window = pd.concat([f[columns] for f in (train, validation, holdout)], ignore_index=True)
    if not window[contract.event_timestamp].is_monotonic_increasing:  # the splits are in time order: no copy then
        window = window.sort_values(contract.event_timestamp, kind="stable").reset_index(drop=True)
    scores = np.full(len(window), np.nan)
    params = {**hyperparameters(config)["params"], "device": device}
    bounds = np.linspace(0, len(window), blocks + 1).astype(int)
    # the model matrix as XGBoost stores it (float32: a float64 frame gives the same trees and scores), no frame
    x = model_matrix(window, contract)
    y = window[contract.label].to_numpy()
    rng = np.random.default_rng(0)
    for a, b in itertools.pairwise(bounds):
        rest = np.r_[0:a, b:len(window)]
        if len(rest) > CROSS_FIT_MAX_ROWS:
            rest = np.sort(rng.choice(rest, size=CROSS_FIT_MAX_ROWS, replace=False))
        if b <= a or len(np.unique(y[rest])) < 2:
            continue
        model = xgb.train(params, xgb.DMatrix(x[rest], label=y[rest]), num_boost_round=int(rounds),
                          verbose_eval=False)
        scores[a:b] = model.predict(xgb.DMatrix(x[a:b]))
    window[score_column] = scores
    return window


def reference_stats(frame: pd.DataFrame, contract: DataContract) -> dict[str, Any]:
    """Per-feature statistics of the training data: the drift reference's summary."""
    stats: dict[str, Any] = {}
    for name in contract.model_features:
        s = frame[name]
        if name in contract.categorical:
            stats[name] = {"kind": "categorical",
                           "frequencies": s.astype(str).value_counts(normalize=True).round(6).to_dict(),
                           "null_share": float(s.isna().mean())}
        else:
            q = s.quantile([0.01, 0.25, 0.5, 0.75, 0.99])
            stats[name] = {"kind": "numeric", "mean": float(s.mean()), "std": float(s.std()),
                           "quantiles": {str(k): float(v) for k, v in q.items()},
                           "null_share": float(s.isna().mean())}
    return stats


def train_and_log(settings: Settings, lake: Lake, contract: DataContract, training_set: dict[str, Any], *,
                  lineage: dict[str, Any], run_name: str = "train") -> TrainResult:
    """Train on a written training set and log everything to MLflow; a re-run reuses its finished run.

    ``lineage`` carries what the caller knows (dag_run id, validation results); the rest is added here.
    Runs that an earlier, killed or failed try of the same DAG run left unfinished are marked as orphans
    first (:func:`mark_orphans`).
    """
    import mlflow
    import xgboost as xgb
    from mlflow.models import infer_signature

    client = mlflow_client(settings)
    cfg = settings.config
    key = lineage_key(training_set, contract, settings)
    exp_id = ensure_experiment(client, settings, cfg.typed.model.experiment)
    mark_orphans(client, exp_id, str(lineage["dag_run_id"]) if lineage.get("dag_run_id") else None, key)
    found = [r for r in client.search_runs(
        [exp_id], filter_string=f"tags.`{TAG}lineage_key` = '{key}' and status = 'FINISHED'", max_results=20)
        if reusable(r)]
    if found:
        run = found[0]
        log.info("run %s already trained this lineage (%s): reusing it", run.info.run_id, key)
        return TrainResult(run_id=run.info.run_id, model_uri=run.data.tags[f"{TAG}model_uri"], lineage_key=key,
                           device=run.data.tags.get(f"{TAG}device", "cpu"),
                           threshold=float(run.data.params["decision_threshold"]),
                           metrics={k.removeprefix("holdout_"): v for k, v in run.data.metrics.items()
                                    if k.startswith("holdout_")}, reused=True)

    uri = training_set["uri"]
    device, why = choose_device(settings.device)
    tcfg = cfg.typed.training
    if tcfg.engine == "dask":
        fitted = fit_on_dask(lake, uri, contract, tcfg, device, scheduler=settings.dask_scheduler,
                             train_rows=int(training_set["rows"]["train"]))
    else:
        fitted = fit_in_process(lake, uri, contract, tcfg, device)
    model, threshold = fitted.model, fitted.threshold
    holdout_metrics, val_metrics = fitted.holdout_metrics, fitted.validation_metrics
    importance = model.get_score(importance_type="gain")

    tags = {
        f"{TAG}lineage_key": key,
        f"{TAG}device": device,
        f"{TAG}device_reason": why,
        f"{TAG}engine": fitted.engine,
        f"{TAG}training_set": uri,
        f"{TAG}data_sha256": training_set["data_sha256"],
        f"{TAG}schema": contract.name,
        f"{TAG}schema_sha256": contract.sha256,
        f"{TAG}config_sha256": cfg.sha256(),
        f"{TAG}git_commit": git_commit(),
        f"{TAG}lock_sha256": file_sha256(REPO_ROOT / "uv.lock"),
        f"{TAG}features": ",".join(contract.model_features),
        **{f"{TAG}{k}": str(v) for k, v in lineage.items() if isinstance(v, str | int | float)},
    }
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags) as run:
        mlflow.log_params({f"xgb_{k}": v for k, v in tcfg.params.items()})
        mlflow.log_params({
            "num_boost_round": tcfg.num_boost_round, "early_stopping_rounds": tcfg.early_stopping_rounds,
            "best_iteration": fitted.best_iteration, "decision_threshold": threshold,
            "target_fpr": tcfg.target_fpr, "device": device, "engine": fitted.engine,
            **{f"rows_{k}": v for k, v in training_set["rows"].items()},
            **{f"positives_{k}": v for k, v in training_set["positives"].items()},
        })
        mlflow.log_metrics({f"holdout_{k}": v for k, v in holdout_metrics.items()})
        mlflow.log_metrics({f"validation_{k}": v for k, v in val_metrics.items()})
        mlflow.log_dict(importance, "feature_importance.json")
        mlflow.log_dict({"training_set": training_set, **lineage, "tags": tags}, "lineage.json")
        mlflow.log_dict(fitted.reference_stats, "reference/stats.json")
        _log_frame(fitted.reference_sample, "reference/sample.parquet")
        if cfg.typed.monitoring is not None:  # without a monitoring policy there is nothing to calibrate
            mlflow.log_dict(reference_thresholds(fitted, contract, cfg.typed.monitoring.model_dump(),
                                              model.get_score(importance_type="total_gain")),
                            "reference/thresholds.json")
        x_example = feature_frame(fitted.example, contract)
        signature = infer_signature(x_example, model.predict(xgb.DMatrix(x_example)))
        info = mlflow.xgboost.log_model(
            model, name="model", signature=signature, input_example=x_example,
            pip_requirements=[f"xgboost=={xgb.__version__}", f"mlflow=={mlflow.__version__}"],
            metadata={"decision_threshold": threshold, "features": contract.model_features,
                      "schema": contract.name, "schema_sha256": contract.sha256},
        )
        mlflow.set_tag(f"{TAG}model_uri", info.model_uri)
        run_id = run.info.run_id
        if fitted.holdout_y is not None:
            _log_plots(client, run_id, fitted, importance)
    log.info("trained on %s (%s engine) in run %s: holdout %s", device, fitted.engine, run_id,
             json.dumps(holdout_metrics))
    return TrainResult(run_id=run_id, model_uri=info.model_uri, lineage_key=key, device=device,
                       threshold=threshold, metrics=holdout_metrics)


def reference_thresholds(fitted: Fitted, contract: DataContract, monitoring: dict[str, Any],
                         importance: dict[str, float]) -> dict[str, Any]:
    """The drift thresholds and performance band calibrated on the fitted window (fixed, saying why, when the
    engine gave no window): logged next to the reference as ``reference/thresholds.json``."""
    policy = DriftPolicy.from_config(monitoring)
    if fitted.reference_window is None:
        return calibration.fixed(policy, contract, f"the {fitted.engine} engine keeps no scored training window: "
                                 "no calibration", importance, policy.window_days).to_dict()
    return calibration.reference_calibration(fitted.reference_window, fitted.reference_sample, contract, monitoring,
                                             importance).to_dict()


def reusable(run: Any) -> bool:
    """Whether a FINISHED training run may stand for a new training of its lineage.

    Not when it was marked an orphan, has no logged model, or its holdout metrics were not all logged:
    a retry must never hand on a run whose result was poisoned.
    """
    tags, metrics = run.data.tags, run.data.metrics
    return (tags.get(f"{TAG}orphan") != "true" and bool(tags.get(f"{TAG}model_uri"))
            and "decision_threshold" in run.data.params and "holdout_log_loss" in metrics)


def mark_orphans(client: MlflowClient, experiment_id: str, dag_run_id: str | None,
                 lineage: str | None = None) -> list[str]:
    """Mark the unfinished training runs left by earlier tries of DAG run ``dag_run_id`` or of ``lineage``.

    Airflow never runs two tries of one task at once, so a training run of the same DAG run that is not
    FINISHED when a try starts belongs to a try that died (SIGKILL, OOM, timeout) or failed. Matched on the
    DAG run (the lineage key changes with a deployment between the tries) and on the lineage key: a run
    that a killed try of *another* DAG run left RUNNING on the same data, schema, configuration and code is
    found by any later run of that lineage (the retraining DAG runs one run at a time). Each gets
    ``closedloop.orphan=true`` and, if still RUNNING, is terminated as FAILED, so nobody mistakes it for a
    live or usable run (the reuse above only takes FINISHED, unmarked runs). Returns the run ids marked.
    """
    filters = []
    if dag_run_id:
        filters.append(f"tags.`{TAG}dag_run_id` = '{dag_run_id}' and attributes.status != 'FINISHED'")
    if lineage:
        filters.append(f"tags.`{TAG}lineage_key` = '{lineage}' and attributes.status != 'FINISHED'")
    runs = {r.info.run_id: r for f in filters
            for r in client.search_runs([experiment_id], filter_string=f, max_results=100)}
    marked = []
    for r in runs.values():
        if r.data.tags.get(f"{TAG}orphan") == "true":
            continue
        left_by = r.data.tags.get(f"{TAG}dag_run_id")
        if left_by and left_by == dag_run_id:
            why = f"left {r.info.status} by an earlier try of {dag_run_id}, which died or failed; a later try " \
                  "trained again"
        else:
            why = (f"left {r.info.status} by a try of {left_by or 'another run'} (same lineage {lineage}), which "
                   f"died or failed; found by {dag_run_id or 'a later training'} of the same lineage")
        client.set_tag(r.info.run_id, f"{TAG}orphan", "true")
        client.set_tag(r.info.run_id, f"{TAG}orphan_reason", why)
        if r.info.status == "RUNNING":
            client.set_terminated(r.info.run_id, status="FAILED")
        marked.append(r.info.run_id)
    if marked:
        log.warning("marked %d orphan training run(s) of %s / lineage %s: %s", len(marked), dag_run_id, lineage,
                    ", ".join(marked))
    return marked


def _log_plots(client: MlflowClient, run_id: str, fitted: Fitted, importance: dict[str, float]) -> None:
    """ROC, precision-recall, confusion matrix and importance PNGs under the run's ``plots/`` (timed)."""
    import time

    began = time.perf_counter()
    log_pngs(client, run_id, model_plots(fitted.holdout_y, fitted.holdout_scores, fitted.threshold, importance))
    log.info("plots of run %s logged in %.2f s", run_id, time.perf_counter() - began)


def _log_frame(frame: pd.DataFrame, artifact_file: str) -> None:
    import tempfile
    from pathlib import Path

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        frame.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact_file).parent))
