"""Batch scoring: a day's validated transactions scored by the champion, kept as a predictions partition.

``predictions/<day>.parquet`` holds, per transaction: its id, entity and timestamp, the model's features
(what monitoring compares with the champion's reference), the score, the decision at the champion's
stored threshold and the model version. Re-scoring a day rewrites the same partition.
"""

from __future__ import annotations

import logging
from datetime import date
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from closedloop.core.errors import NoDataError, PermanentError
from closedloop.stages.features import apply_definitions
from closedloop.stages.ingest import ingest_partition
from closedloop.stages.offline import point_in_time_features
from closedloop.stages.registry import CHAMPION, alias_version, load_booster
from closedloop.stages.training import predict_inplace

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from closedloop.stages.runtime import Runtime

log = logging.getLogger(__name__)

SCORE, DECISION, VERSION = "score", "decision", "model_version"


def champion(rt: Runtime) -> dict[str, Any]:
    """The champion's version, model URI and decision threshold; PermanentError when there is none.

    The alias is looked up on every call (a promotion is seen at once); what a version is (its model,
    run and threshold) never changes, so it is read once per process and version.
    """
    version = alias_version(rt.client, rt.model_name, CHAMPION)
    if version is None:
        raise PermanentError(f"{rt.model_name} has no champion yet: run the retraining DAG first")
    key = (rt.client.tracking_uri, rt.client._registry_uri, rt.model_name, str(version))
    if key not in _VERSIONS:
        _VERSIONS[key] = version_info(rt.client, rt.model_name, version)
    return dict(_VERSIONS[key])


_VERSIONS: dict[tuple[str, ...], dict[str, Any]] = {}  # a registered version's description, per process
_APPLIED: set[tuple[str, str]] = set()  # (Feast registry, contract hash) applied by this process


def version_info(client: MlflowClient, name: str, version: str) -> dict[str, Any]:
    """A version's model URI, run and decision threshold (stored with its training run)."""
    mv = client.get_model_version(name, version)
    run = client.get_run(mv.run_id)
    return {"version": str(version), "model_uri": mv.source, "run_id": mv.run_id,
            "threshold": float(run.data.params["decision_threshold"]),
            "artifact_uri": run.info.artifact_uri}


@lru_cache(maxsize=4)
def _booster(model_uri: str) -> Any:
    """The booster logged at ``model_uri``, loaded once per process (a logged model never changes; the
    champion's alias is still looked up for every day, so a promotion between days is seen)."""
    return load_booster(model_uri)


def score_day(rt: Runtime, day: date) -> dict[str, Any]:
    """Score the curated transactions of ``day`` (validating them first when needed) with the champion."""
    c = rt.contract
    ingest_partition(rt.lake, c, "transactions", day)  # a no-op when the day is already curated
    tx = rt.lake.read_parquet(rt.lake.partition("curated", "transactions", day))
    if tx.empty:
        raise NoDataError(f"{rt.lake.partition('curated', 'transactions', day)}: no transactions to score")
    champ = champion(rt)
    from feast.errors import FeatureViewNotFoundException

    applied = (str(rt.store.config.registry.path), rt.contract.sha256)
    if applied not in _APPLIED:  # the same definitions again change nothing: once per process and registry
        apply_definitions(rt.store, rt.defs)
        _APPLIED.add(applied)
    try:
        frame = point_in_time_features(rt.store, rt.defs, tx, c)  # Feast's rules, read in the day's range
    except FeatureViewNotFoundException:  # the registry was replaced since: apply again
        apply_definitions(rt.store, rt.defs)
        frame = point_in_time_features(rt.store, rt.defs, tx, c)
    scores = predict_inplace(_booster(champ["model_uri"]), frame, c)
    out = frame[[c.row_key, c.entity, c.event_timestamp, *c.model_features]].copy()
    out[SCORE] = scores.astype("float64")
    out[DECISION] = (out[SCORE] >= champ["threshold"]).astype("int64")
    out[VERSION] = champ["version"]
    uri = rt.lake.partition("predictions", "transactions", day)
    rt.lake.write_parquet(out, uri)
    flagged = int(out[DECISION].sum())
    log.info("scored %d transactions of %s with %s v%s: %d flagged", len(out), day, rt.model_name,
             champ["version"], flagged)
    return {"day": day.isoformat(), "uri": uri, "rows": len(out), "flagged": flagged,
            "model_version": champ["version"], "threshold": champ["threshold"]}
