"""Training: the retraining DAG's train task vs bare ``xgboost.train`` on the same matrix and parameters.

The project's figure is ``closedloop.stages.retraining.train`` (-> ``training.train_and_log``): the training set's
parts read, the matrices built, XGBoost fitted with early stopping, the threshold, the metrics on the
validation and holdout splits, the reference sample and statistics, the plots, and everything logged to
MLflow with the model. It runs against a fresh MLflow store under the world's ``bench-tmp/`` (so it
trains for real instead of reusing the champion's run of the same lineage, and leaves the world as it
was); the store is created and the heavy modules imported before the clock starts.

Inside that one timed call, the fit (``training.fit``), the plots (``training._log_plots``) and the model
upload (``mlflow.xgboost.log_model``) are timed through wrappers, and printed on lines of their own.

The floor is ``xgboost.train`` with the configuration's parameters (``device=cpu``, ``nthread`` 2),
``num_boost_round`` and early stopping on the same validation set, on the same float64 matrices
(``training.feature_frame`` of the splits, built before the clock): the DMatrix construction and the
training. Both must grow the same number of trees (checked, and printed in the notes).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from common import Measurement, Result, World, frame_mib, measure, timed_into

STAGE = "training"


def _fresh_store(w: World) -> str:
    """An empty MLflow store of this process under the world's bench-tmp/ (its path)."""
    tmp = w.home / "bench-tmp" / f"training-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["CLOSEDLOOP_MLFLOW_ARTIFACTS"] = str(tmp / "artifacts")
    return str(tmp)


def run(w: World, quick: bool) -> list[Result]:
    import mlflow
    import mlflow.models.signature  # imported before the clock: a task's import cost is not the stage's
    import mlflow.xgboost
    import xgboost as xgb

    from closedloop.core.plots import _pyplot
    from closedloop.stages import retraining, training
    from closedloop.stages.features import read_training_split
    from closedloop.stages.registry import ensure_experiment

    ts = w.training_set()
    tmp = _fresh_store(w)
    try:
        rt = w.runtime()
        cfg = rt.settings.config
        ensure_experiment(rt.client, rt.settings, cfg.typed.model.experiment)  # the store's tables, once
        _pyplot()
        c = rt.contract
        tcfg = cfg.typed.training

        # -- the project: the train task, with its fit, plots and model upload timed from inside ------------
        parts: dict[str, Measurement] = {}
        boosters: list[Any] = []
        fit, log_plots, log_model = training.fit, training._log_plots, mlflow.xgboost.log_model

        def fit_kept(*a: Any, **kw: Any) -> Any:
            booster, threshold = fit(*a, **kw)
            boosters.append(booster)
            return booster, threshold

        training.fit = timed_into(parts, "fit", fit_kept)
        training._log_plots = timed_into(parts, "plots", log_plots)
        mlflow.xgboost.log_model = timed_into(parts, "upload", log_model)
        try:
            task = measure(lambda: retraining.train(rt, ts, {"dag_run_id": f"bench-{os.getpid()}"}))
        finally:
            training.fit, training._log_plots, mlflow.xgboost.log_model = fit, log_plots, log_model
        if task.result.get("reused"):
            raise RuntimeError("the train task reused a run: the fresh MLflow store was not used")
        project_trees = boosters[0].num_boosted_rounds()
        project_best = int(boosters[0].best_iteration)

        # -- the floor: xgboost.train on the same matrices and parameters ------------------------------------
        train = read_training_split(rt.lake, ts["uri"], "train")
        validation = read_training_split(rt.lake, ts["uri"], "validation")
        holdout_rows = int(ts["rows"]["holdout"])
        data_mib = frame_mib(train) + frame_mib(validation) + frame_mib(read_training_split(rt.lake, ts["uri"],
                                                                                            "holdout"))
        x_train = training.feature_frame(train, c).to_numpy()
        y_train = train[c.label].to_numpy()
        x_val = training.feature_frame(validation, c).to_numpy()
        y_val = validation[c.label].to_numpy()
        n_train = len(train)
        del train, validation
        params = {**tcfg.params, "device": "cpu"}

        def bare() -> Any:
            dtrain = xgb.DMatrix(x_train, label=y_train)
            dval = xgb.DMatrix(x_val, label=y_val)
            return xgb.train(params, dtrain, num_boost_round=tcfg.num_boost_round,
                             evals=[(dval, "validation")], early_stopping_rounds=tcfg.early_stopping_rounds,
                             verbose_eval=False)

        floor = measure(bare)
        floor_trees, floor_best = floor.result.num_boosted_rounds(), int(floor.result.best_iteration)
        if (floor_trees, floor_best) != (project_trees, project_best):
            raise RuntimeError(f"not the same training: the train task grew {project_trees} trees (best "
                               f"{project_best}), xgboost.train {floor_trees} (best {floor_best})")
        trees = f"{project_trees} trees (best iteration {project_best}) both"
        nthread = params.get("nthread")
        fit_m = parts["fit"]
        out = [
            Result.of(STAGE, "train task", w.rows, task, floor, data_mib, work_rows=n_train,
                      notes=f"read+fit+metrics+plots+MLflow; floor: DMatrix+xgboost.train, nthread {nthread}; "
                            f"{trees}"),
            Result.of(STAGE, "  fit (training.fit)", w.rows, fit_m, floor, data_mib, work_rows=n_train,
                      notes="matrices from the frames + xgboost.train + validation scores + threshold"),
            Result.of(STAGE, "  plots", w.rows, parts["plots"], None, None, work_rows=holdout_rows,
                      notes="ROC, PR, confusion, importance PNGs logged to the run"),
            Result.of(STAGE, "  model upload (log_model)", w.rows, parts["upload"], None, None,
                      notes="mlflow.xgboost.log_model: signature, input example, model files"),
        ]
        rest = task.seconds - fit_m.seconds - parts["plots"].seconds - parts["upload"].seconds
        out.append(Result.of(STAGE, "  rest (read, metrics, logging)", w.rows, Measurement(rest, task.peak_mib),
                             None, None, notes="the task less the three lines above (peak: the task's)"))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.pop("CLOSEDLOOP_MLFLOW_ARTIFACTS", None)
