"""Scoring: the batch_scoring task vs read + ``inplace_predict`` + write.

N scored rows at size N: the window's every day (28, a week in quick mode) is scored, as the
batch_scoring DAG's task does for a backfill of those days: one Runtime, then
``closedloop.stages.scoring.score_day`` per day (the curated day read, its customer features fetched point in
time from Feast's registered source, read in the day's range by ``closedloop.stages.offline``, the champion
looked up and loaded, the scores, the predictions partition written).
The days' rows sum to the world's size. The heavy modules (Feast, MLflow with its SQL stores, XGBoost,
scikit-learn) are imported before the clock; the Runtime, its MLflow client and Feast store are the task's. The
predictions go where the task writes them (the world's ``predictions/``): re-scoring a day rewrites
the same partition with the same content, so later stages (drift reads them) see the same world.

The floor does, per day, the same reads and write without the orchestration, Feast and MLflow: it reads
the same curated day and the already-joined customer features of its rows (the features the project's
run joined, saved before the clock in the curated day's row order under the world's ``bench-tmp/``),
puts the model's columns in a float matrix (categoricals as codes of the contract's categories), scores
with ``Booster.inplace_predict`` (the champion's booster, loaded once) and writes the same predictions
columns to a parquet file.
"""

from __future__ import annotations

import os
import shutil

from common import Result, World, measure

STAGE = "scoring"


def run(w: World, quick: bool) -> list[Result]:
    import feast  # noqa: F401  (imports before the clock: a task's import cost is not the stage's)
    import mlflow.store.model_registry.sqlalchemy_store  # (MLflow's SQL stores: 1.3 s of imports)
    import mlflow.store.tracking.sqlalchemy_store
    import mlflow.xgboost  # noqa: F401
    import numpy as np
    import pandas as pd
    import sklearn.base  # noqa: F401  (what loading an XGBoost model imports)
    import xgboost  # noqa: F401

    from closedloop.stages import scoring
    from closedloop.stages.registry import load_booster
    from closedloop.stages.runtime import Runtime

    w.champion()
    w.runtime()
    days = w.days

    def project() -> int:
        rt = Runtime.from_env()
        return sum(scoring.score_day(rt, d)["rows"] for d in days)

    task = measure(project)
    scored = task.result

    # -- the floor's inputs, before its clock: the curated days' rows with their joined features ------------
    rt = Runtime.from_env()
    c = rt.contract
    tmp = w.home / "bench-tmp" / f"scoring-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "features").mkdir(parents=True)
    (tmp / "predictions").mkdir()
    try:
        data_mib = 0.0
        for d in days:
            curated = rt.lake.read_parquet(rt.lake.partition("curated", "transactions", d))
            pred = rt.lake.read_parquet(rt.lake.partition("predictions", "transactions", d))
            joined = curated[[c.row_key]].merge(pred[[c.row_key, *c.entity_features]], on=c.row_key, how="left",
                                                validate="one_to_one")
            joined.to_parquet(tmp / "features" / f"{d}.parquet", index=False)
            data_mib += (curated.memory_usage(deep=True).sum() + joined.memory_usage(deep=True).sum()) / 2**20
        champ = scoring.champion(rt)
        booster = load_booster(champ["model_uri"])
        threshold, version = champ["threshold"], champ["version"]
        features = c.model_features
        categories = {n: list(c.categorical[n]) for n in features if n in c.categorical}

        def bare() -> int:
            rows = 0
            for d in days:
                tx = pd.read_parquet(rt.lake.local_path(rt.lake.partition("curated", "transactions", d)))
                feats = pd.read_parquet(tmp / "features" / f"{d}.parquet")
                frame = pd.concat([tx, feats.drop(columns=[c.row_key])], axis=1)
                x = np.empty((len(frame), len(features)), dtype=np.float64)
                for j, name in enumerate(features):
                    if name in categories:
                        codes = pd.Categorical(frame[name], categories=categories[name]).codes
                        x[:, j] = np.where(codes < 0, np.nan, codes)
                    else:
                        x[:, j] = frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
                scores = booster.inplace_predict(x)
                out = frame[[c.row_key, c.entity, c.event_timestamp, *features]].copy()
                out["score"] = scores.astype("float64")
                out["decision"] = (out["score"] >= threshold).astype("int64")
                out["model_version"] = version
                out.to_parquet(tmp / "predictions" / f"{d}.parquet", index=False)
                rows += len(out)
            return rows

        floor = measure(bare)
        if floor.result != scored:
            raise RuntimeError(f"the floor scored {floor.result} rows, the task {scored}")
        # the same scores: the floor's predictions against the task's, on the last day
        last = days[-1]
        mine = pd.read_parquet(tmp / "predictions" / f"{last}.parquet")
        theirs = rt.lake.read_parquet(rt.lake.partition("predictions", "transactions", last))
        both = mine[[c.row_key, "score"]].merge(theirs[[c.row_key, "score"]], on=c.row_key, suffixes=("", "_task"))
        diff = float(np.abs(both["score"] - both["score_task"]).max()) if len(both) else 0.0
        if len(both) != len(theirs) or diff > 1e-6:
            raise RuntimeError(f"the floor's scores differ from the task's: {len(both)}/{len(theirs)} rows "
                               f"matched, max abs difference {diff}")
        per_day = f"{len(days)} days, {scored / task.seconds:,.0f} rows/s vs {scored / floor.seconds:,.0f}"
        return [Result.of(STAGE, "score every day (score_day)", w.rows, task, floor, data_mib, work_rows=scored,
                          notes=f"{per_day}; point-in-time features read in the day's range "
                                f"(closedloop.stages.offline) + champion per day; floor: read day + joined features, "
                                f"inplace_predict, write "
                                f"(same scores, max diff {diff:.1e})")]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
