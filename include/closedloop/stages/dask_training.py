"""The ``dask`` training engine: XGBoost on a Dask cluster, for training sets larger than one machine's memory.

Selected by ``training.engine: dask`` in the configuration. The cluster is the Dask scheduler at
``CLOSEDLOOP_DASK_SCHEDULER`` or, when that is empty, a ``LocalCluster`` started for the task with
``training.dask.local_cluster`` (its keyword arguments; on the GPU, at most one worker per visible device)
and closed with it. The workers of a remote cluster run closedloop's image (they call
:func:`closedloop.stages.model.feature_frame`), reach the lake with the same credentials as the Airflow workers
and, for ``device=cuda``, hold one GPU each (dask-cuda). The GPU path has not been run here (no GPU).

What it does, so that the outcome is judged exactly as the ``local`` engine's:

- each split's Parquet parts are read by ``dask.dataframe`` (one partition per part or row group) and turned
  into the model's matrix partition by partition by the same :func:`~closedloop.stages.model.feature_frame`
  (identical categorical encoding);
- ``xgboost.dask.train`` on a ``DaskQuantileDMatrix`` of the train split, early stopping on the validation
  split (its ``DaskQuantileDMatrix`` shares the train split's bins), the same parameters and rounds;
- validation and holdout are scored partition by partition on the workers (``xgboost.dask.inplace_predict``);
  only their labels and scores (two numbers a row) come back, never their feature columns, and go through the
  same :func:`~closedloop.core.metrics.threshold_at_fpr` and :func:`~closedloop.core.metrics.classification_metrics`;
- the reference statistics are computed by Dask over the whole train split, the reference sample is a seeded
  sample of it;
- the result is a plain ``xgboost.Booster``, trimmed at its best iteration and set to the CPU, which the
  caller logs, registers and gates like any other.

What it cannot promise: bit-identical trees. The histogram bins come from a sketch merged across workers
and row subsampling draws per worker, so the model differs slightly from the ``local`` engine's on the same
data (tests/model/test_dask_engine.py bounds the difference).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from closedloop.core.config_model import LocalClusterSection
from closedloop.core.metrics import classification_metrics, threshold_at_fpr
from closedloop.stages.features import training_split_parts
from closedloop.stages.model import Fitted, cuda_device_count, feature_frame, trimmed

if TYPE_CHECKING:
    import dask.dataframe as dd
    import numpy as np
    import pandas as pd
    from distributed import Client

    from closedloop.core.config_model import TrainingSection
    from closedloop.core.lake import Lake
    from closedloop.core.schema import DataContract

log = logging.getLogger(__name__)

@contextlib.contextmanager
def dask_client(scheduler: str = "", local_cluster: LocalClusterSection | None = None) -> Iterator[Client]:
    """A Dask client on the scheduler at ``scheduler``, or on a LocalCluster that lives as long as the block.

    ``local_cluster`` is ``training.dask.local_cluster`` of the configuration (default: the model's: small, and
    threads, no worker processes to spawn under an Airflow task); its unset keys are left to Dask.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler, timeout="60s") as client:
            yield client
        return
    given = (local_cluster or LocalClusterSection()).model_dump()
    kwargs = {**{k: v for k, v in given.items() if v is not None}, "dashboard_address": None}
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        yield client


def read_split(lake: Lake, uri: str, split: str) -> dd.DataFrame:
    """One split of a training set as a Dask frame over its Parquet parts (nothing is read yet)."""
    import dask.dataframe as dd

    return dd.read_parquet(training_split_parts(lake, uri, split), storage_options=lake.storage_options or None)


def _matrix_and_label(frame: pd.DataFrame, contract: DataContract) -> pd.DataFrame:
    return feature_frame(frame, contract).assign(**{contract.label: frame[contract.label].to_numpy()})


def model_matrix(frame: dd.DataFrame, contract: DataContract) -> tuple[dd.DataFrame, dd.Series]:
    """The model's input matrix and the label of a Dask frame: :func:`feature_frame` applied to each partition.

    Both come out of one ``map_partitions``, so that they have the same partitions: reading the label
    column alone, Dask would fuse small Parquet parts into fewer partitions than the features have, which
    xgboost.dask refuses.
    """
    both = frame.map_partitions(_matrix_and_label, contract, meta=_matrix_and_label(frame._meta, contract))
    return both[list(contract.model_features)], both[contract.label]


def labels_and_scores(client: Client, model: Any, x: dd.DataFrame, y: dd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores of a split, scored partition by partition on the workers (features stay there)."""
    from xgboost import dask as dxgb

    scores = dxgb.inplace_predict(client, model, x)
    labels, scores = client.compute([y, scores], sync=True)
    return labels.to_numpy(), scores.to_numpy()


def reference_stats(frame: dd.DataFrame, contract: DataContract) -> dict[str, Any]:
    """:func:`closedloop.stages.training.reference_stats` computed by Dask over a whole split.

    Means, deviations, frequencies and null shares are exact; Dask's quantiles are approximate.
    """
    import dask

    quantiles = [0.01, 0.25, 0.5, 0.75, 0.99]
    lazy: dict[str, Any] = {}
    for name in contract.model_features:
        s = frame[name]
        if name in contract.categorical:
            lazy[name] = (s.astype(str).value_counts(normalize=True), s.isna().mean())
        else:
            lazy[name] = (s.mean(), s.std(), s.quantile(quantiles), s.isna().mean())
    (done,) = dask.compute(lazy)
    stats: dict[str, Any] = {}
    for name, values in done.items():
        if name in contract.categorical:
            freq, nulls = values
            stats[name] = {"kind": "categorical", "frequencies": freq.round(6).to_dict(), "null_share": float(nulls)}
        else:
            mean, std, q, nulls = values
            stats[name] = {"kind": "numeric", "mean": float(mean), "std": float(std),
                           "quantiles": {str(k): float(v) for k, v in q.items()}, "null_share": float(nulls)}
    return stats


def fit_on_dask(lake: Lake, uri: str, contract: DataContract, config: TrainingSection, device: str, *,
                scheduler: str = "", train_rows: int | None = None) -> Fitted:
    """Train on the training set at ``uri`` on a Dask cluster; see the module's docstring for what it does.

    ``config`` is the configuration's typed ``training`` section (``Config.typed.training``)."""
    from xgboost import dask as dxgb

    local_cluster = config.dask.local_cluster
    if device == "cuda" and not scheduler:
        # XGBoost's GPU collective (NCCL) takes one GPU per worker: a local cluster gets one worker per
        # visible device (a remote cluster is the operator's: dask-cuda starts one worker per GPU)
        local_cluster = local_cluster.model_copy(
            update={"n_workers": max(1, min(local_cluster.n_workers, cuda_device_count()))})
    with dask_client(scheduler, local_cluster) as client:
        frames = {split: read_split(lake, uri, split) for split in ("train", "validation", "holdout")}
        matrices = {split: model_matrix(f, contract) for split, f in frames.items()}
        x = {split: m[0] for split, m in matrices.items()}
        y = {split: m[1] for split, m in matrices.items()}
        log.info("training on Dask (%s): %s partitions of train, %d worker(s)", scheduler or "a local cluster",
                 frames["train"].npartitions, len(client.scheduler_info(n_workers=-1)["workers"]))
        dtrain = dxgb.DaskQuantileDMatrix(client, x["train"], y["train"])
        dval = dxgb.DaskQuantileDMatrix(client, x["validation"], y["validation"], ref=dtrain)
        params = {**config.params, "device": device}
        out = dxgb.train(client, params, dtrain, num_boost_round=config.num_boost_round,
                         evals=[(dval, "validation")], early_stopping_rounds=config.early_stopping_rounds,
                         verbose_eval=False)
        booster = out["booster"]
        model = trimmed(booster)
        model.set_param({"device": "cpu"})  # served and evaluated anywhere
        val_y, val_scores = labels_and_scores(client, model, x["validation"], y["validation"])
        threshold = threshold_at_fpr(val_y, val_scores, config.target_fpr)
        hold_y, hold_scores = labels_and_scores(client, model, x["holdout"], y["holdout"])
        train = frames["train"]
        rows = train_rows if train_rows is not None else int(train.shape[0].compute())
        want = config.reference_sample_rows
        sample = train.sample(frac=min(1.0, want / max(rows, 1)), random_state=0).compute() if rows else train.head(0)
        return Fitted(engine="dask", model=model, best_iteration=int(booster.best_iteration), threshold=threshold,
                      validation_metrics=classification_metrics(val_y, val_scores, threshold),
                      holdout_metrics=classification_metrics(hold_y, hold_scores, threshold),
                      reference_sample=sample.head(want).reset_index(drop=True),
                      reference_stats=reference_stats(train, contract),
                      example=frames["holdout"].head(5, npartitions=-1),
                      holdout_y=hold_y, holdout_scores=hold_scores)
