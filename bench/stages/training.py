"""Training: the retraining DAG's train task vs bare ``xgboost.train`` on the same matrix and parameters.

The project's figure is ``closedloop.stages.retraining.train`` (-> ``training.train_and_log``): the training set's
parts read, the matrices built, XGBoost fitted with early stopping, the threshold, the metrics on the
validation and holdout splits, the reference sample and statistics, the plots, and everything logged to
MLflow with the model. It runs against a fresh MLflow store under the world's ``bench-tmp/`` (so it
trains for real instead of reusing the champion's run of the same lineage, and leaves the world as it
was); the store is created and the heavy modules imported before the clock starts.

Inside that one timed call, the fit (``training.fit``), the drift reference's cross-fit
(``training.reference_window``: the out-of-sample scores of the window, issue 19), the plots
(``training._log_plots``) and the model upload (``mlflow.xgboost.log_model``) are timed through wrappers, and
printed on lines of their own.

The floor is ``xgboost.train`` with the configuration's parameters (``device=cpu``, ``nthread`` 2),
``num_boost_round`` and early stopping on the same validation set, on the same float64 matrices
(``training.feature_frame`` of the splits, built before the clock): the DMatrix construction and the
training. Both must grow the same number of trees (checked, and printed in the notes). The train task's floor
adds the cross-fit's bare work (the same sampled rows, rounds and blocks: ``xgboost.train`` and ``predict`` on
the float32 matrix built before the clock), which the task has done since the drift reference; its notes keep
the ratio to the training floor alone, comparable with the runs before it.
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


def _window_matrix(train: Any, validation: Any, holdout: Any, c: Any) -> tuple[Any, Any]:
    """The training window's float32 model matrix and labels, in time order (as ``reference_window`` builds them)."""
    import pandas as pd

    from closedloop.stages.model import model_matrix

    columns = [c.event_timestamp, c.label, *c.model_features]
    window = pd.concat([f[columns] for f in (train, validation, holdout)], ignore_index=True)
    window = window.sort_values(c.event_timestamp, kind="stable").reset_index(drop=True)
    return model_matrix(window, c), window[c.label].to_numpy()


def _cross_fit_floor(x: Any, y: Any, params: dict[str, Any], rounds: int, blocks: int, max_rows: int) -> None:
    """The drift reference's bare work: per time block, ``xgboost.train`` on the other blocks' rows (the same
    sample of ``max_rows`` as ``training.reference_window``: its seed and order) and ``predict`` of the block."""
    import itertools

    import numpy as np
    import xgboost as xgb

    bounds = np.linspace(0, len(x), blocks + 1).astype(int)
    rng = np.random.default_rng(0)
    for a, b in itertools.pairwise(bounds):
        rest = np.r_[0:a, b:len(x)]
        if len(rest) > max_rows:
            rest = np.sort(rng.choice(rest, size=max_rows, replace=False))
        if b <= a or len(np.unique(y[rest])) < 2:
            continue
        model = xgb.train({**params, "device": "cpu"}, xgb.DMatrix(x[rest], label=y[rest]),
                          num_boost_round=int(rounds), verbose_eval=False)
        model.predict(xgb.DMatrix(x[a:b]))


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

        reference_window = training.reference_window
        cross_fit: dict[str, Any] = {}

        def reference_kept(*a: Any, **kw: Any) -> Any:
            cross_fit.update(rounds=a[5], blocks=kw.get("blocks", training.CROSS_FIT_BLOCKS))
            return reference_window(*a, **kw)

        training.fit = timed_into(parts, "fit", fit_kept)
        training._log_plots = timed_into(parts, "plots", log_plots)
        training.reference_window = timed_into(parts, "reference", reference_kept)
        mlflow.xgboost.log_model = timed_into(parts, "upload", log_model)
        try:
            task = measure(lambda: retraining.train(rt, ts, {"dag_run_id": f"bench-{os.getpid()}"}))
        finally:
            training.fit, training._log_plots, mlflow.xgboost.log_model = fit, log_plots, log_model
            training.reference_window = reference_window
        if task.result.get("reused"):
            raise RuntimeError("the train task reused a run: the fresh MLflow store was not used")
        project_trees = boosters[0].num_boosted_rounds()
        project_best = int(boosters[0].best_iteration)

        # -- the floor: xgboost.train on the same matrices and parameters ------------------------------------
        train = read_training_split(rt.lake, ts["uri"], "train")
        validation = read_training_split(rt.lake, ts["uri"], "validation")
        holdout = read_training_split(rt.lake, ts["uri"], "holdout")
        holdout_rows = len(holdout)
        data_mib = frame_mib(train) + frame_mib(validation) + frame_mib(holdout)
        x_window, y_window = _window_matrix(train, validation, holdout, c)
        del holdout
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
        cross_floor = measure(lambda: _cross_fit_floor(x_window, y_window, training.hyperparameters(tcfg)["params"],
                                                       cross_fit["rounds"], cross_fit["blocks"],
                                                       training.CROSS_FIT_MAX_ROWS))
        floor_trees, floor_best = floor.result.num_boosted_rounds(), int(floor.result.best_iteration)
        if (floor_trees, floor_best) != (project_trees, project_best):
            raise RuntimeError(f"not the same training: the train task grew {project_trees} trees (best "
                               f"{project_best}), xgboost.train {floor_trees} (best {floor_best})")
        trees = f"{project_trees} trees (best iteration {project_best}) both"
        nthread = params.get("nthread")
        fit_m = parts["fit"]
        both = Measurement(floor.seconds + cross_floor.seconds, max(floor.peak_mib, cross_floor.peak_mib))
        out = [
            Result.of(STAGE, "train task", w.rows, task, both, data_mib, work_rows=n_train,
                      notes=f"read+fit+metrics+drift reference+plots+MLflow; floor: DMatrix+xgboost.train, nthread "
                            f"{nthread} ({floor.seconds:.2f} s; {task.seconds / floor.seconds:.2f}x of it alone, the "
                            f"floor before the drift reference) + the drift reference's {cross_fit['blocks']} "
                            f"cross-fitted xgboost.train and predict ({cross_floor.seconds:.2f} s); {trees}"),
            Result.of(STAGE, "  fit (training.fit)", w.rows, fit_m, floor, data_mib, work_rows=n_train,
                      notes="matrices from the frames + xgboost.train + validation scores + threshold"),
            Result.of(STAGE, "  drift reference (cross-fit)", w.rows, parts["reference"], cross_floor, None,
                      notes=f"training.reference_window: {cross_fit['blocks']} models of at most "
                            f"{training.CROSS_FIT_MAX_ROWS:,} rows, {cross_fit['rounds']} rounds, each scoring its "
                            "block; floor: the same sampled rows' DMatrix, xgboost.train and predict"),
            Result.of(STAGE, "  plots", w.rows, parts["plots"], None, None, work_rows=holdout_rows,
                      notes="ROC, PR, confusion, importance PNGs logged to the run"),
            Result.of(STAGE, "  model upload (log_model)", w.rows, parts["upload"], None, None,
                      notes="mlflow.xgboost.log_model: signature, input example, model files"),
        ]
        rest = task.seconds - sum(parts[k].seconds for k in ("fit", "reference", "plots", "upload"))
        out.append(Result.of(STAGE, "  rest (read, metrics, logging)", w.rows, Measurement(rest, task.peak_mib),
                             None, None, notes="the task less the four lines above (peak: the task's)"))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.pop("CLOSEDLOOP_MLFLOW_ARTIFACTS", None)
