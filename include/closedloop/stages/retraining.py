"""The retraining stages, one function per task of the ``retraining`` DAG.

Each takes a :class:`~closedloop.stages.runtime.Runtime` and small JSON-safe values, and returns a small
JSON-safe dict (URIs, ids, versions, metrics) for the next task: data never travels through XCom.
"""

from __future__ import annotations

import logging
from typing import Any

from closedloop.core.runconf import Window
from closedloop.stages import rollout
from closedloop.stages.features import apply_definitions, materialize_window
from closedloop.stages.features import build_training_set as build
from closedloop.stages.gate import evaluate_gate as gate
from closedloop.stages.ingest import ingest_window
from closedloop.stages.registry import TAG, promote, reject, service_errors
from closedloop.stages.registry import register as reg
from closedloop.stages.runtime import Runtime
from closedloop.stages.training import train_and_log

log = logging.getLogger(__name__)


def validate(rt: Runtime, window: Window) -> dict[str, Any]:
    """Validate (and curate) every partition the window needs; quarantine and raise on blocking problems."""
    grace = rt.settings.config.typed.ingest.label_grace_days
    outcomes = ingest_window(rt.lake, rt.contract, window.start, window.end, label_grace_days=grace)
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    warnings = {f"{o.kind}/{o.day}": o.warnings for o in outcomes if o.warnings}
    return {"window": window.to_dict(), "partitions": len(outcomes), "by_status": counts, "warnings": warnings}


def materialise(rt: Runtime, window: Window) -> dict[str, Any]:
    """Apply the Feast definitions and materialise the window (with the configured overlap)."""
    apply_definitions(rt.store, rt.defs)
    overlap = rt.settings.config.typed.ingest.materialize_overlap_days
    newest = max(rt.lake.list_days("curated", rt.contract.feature_view), default=None)  # the high-water mark's cap
    lo, hi = materialize_window(rt.store, rt.defs, window.start, window.end, overlap, newest=newest)
    return {"feature_view": rt.defs.view.name, "start": lo.isoformat(), "end": hi.isoformat()}


def build_training_set(rt: Runtime, window: Window, split: dict[str, int] | None = None) -> dict[str, Any]:
    """Write the point-in-time-correct training set of the window; returns its description.

    ``split`` may hold day-based overrides from the run's configuration (``holdout_days``, ``validation_days``).
    """
    typed = rt.settings.config.typed
    ts = build(rt.store, rt.defs, rt.lake, rt.contract, window.start, window.end,
               label_grace_days=typed.ingest.label_grace_days,
               split={**typed.training.split.model_dump(exclude_none=True), **(split or {})},
               part_rows=typed.training.part_rows, pit_join=typed.training.pit_join)
    return ts.to_dict()


def train(rt: Runtime, training_set: dict[str, Any], lineage: dict[str, Any]) -> dict[str, Any]:
    """Train and log to MLflow (reusing the run of an identical earlier training)."""
    return train_and_log(rt.settings, rt.lake, rt.contract, training_set, lineage=lineage,
                         run_name=run_name(rt.model_name, str(lineage.get("window", "")))).to_dict()


def run_name(model: str, window: str) -> str:
    """What a training run is: ``train card_fraud 2026-03-01..03-29`` (the end's year left out when the same)."""
    start, _, end = window.partition("..")
    if end[:5] == start[:5] and len(end) == 10:
        end = end[5:]
    return f"train {model} {start}..{end}" if start and end else f"train {model}"


def register(rt: Runtime, trained: dict[str, Any], window: Window, extra_tags: dict[str, str] | None = None
             ) -> dict[str, Any]:
    """Register the trained model as a version (idempotent on its lineage key).

    An unreachable MLflow server raises TransientError naming it, after MLflow's own retries with
    backoff; nothing is half-done (no version, no alias moved) and the task's retry completes the work.
    """
    with service_errors(rt.client, f"reading training run {trained['run_id']}"):
        run = rt.client.get_run(trained["run_id"])
    tags = {
        f"{TAG}window": str(window),
        f"{TAG}decision_threshold": f"{trained['threshold']:.8f}",
        f"{TAG}device": trained["device"],
        f"{TAG}reference_uri": f"{run.info.artifact_uri}/reference",
        **{k: v for k, v in run.data.tags.items()
           if k.startswith(TAG) and k.split(".", 1)[1] in {
               "data_sha256", "schema", "schema_sha256", "config_sha256", "git_commit", "lock_sha256",
               "training_set", "dag_run_id"}},
        **(extra_tags or {}),
    }
    version, created = reg(rt.client, rt.model_name, model_uri=trained["model_uri"], run_id=trained["run_id"],
                           lineage_key=trained["lineage_key"], tags=tags)
    return {"model": rt.model_name, "version": version, "created": created, "run_id": trained["run_id"]}


def evaluate_gate(rt: Runtime, registered: dict[str, Any], training_set: dict[str, Any],
                  override: dict[str, str] | None = None) -> dict[str, Any]:
    """The gate's decision for the registered candidate (``override``: the run's ``labels_override``)."""
    decision = gate(rt.settings, rt.client, rt.lake, rt.contract, name=rt.model_name,
                    candidate_version=registered["version"], training_set_uri=training_set["uri"],
                    training_set=training_set, override=override)
    return decision.to_dict()


def promote_or_reject(rt: Runtime, decision: dict[str, Any], actor: str = "retraining") -> dict[str, Any]:
    """Act on the decision: move ``champion`` (compare-and-set), or start its rollout (``rollout.mode`` shadow or
    canary: :mod:`closedloop.stages.rollout`), or keep the candidate as rejected."""
    version = decision["candidate_version"]
    if decision["outcome"] == "promote":
        started = rollout.begin(rt, version, decision["champion_version"], decision["reason"], actor)
        if started is not None:  # rollout.mode shadow or canary: the rollout DAG decides from live traffic
            return started
        move = promote(rt.client, rt.settings, rt.model_name, version,
                       expected_champion=decision["champion_version"], reason=decision["reason"], actor=actor)
        return {"action": "promoted" if move.kind != "noop" else "already_champion", **move.to_dict()}
    reject(rt.client, rt.model_name, version, f"{decision['outcome']}: {decision['reason']}")
    return {"action": "rejected", "model": rt.model_name, "version": version, "reason": decision["reason"],
            "champion": decision["champion_version"], "outcome": decision["outcome"]}
