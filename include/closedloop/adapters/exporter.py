"""The loop's state in Prometheus's text format: what ``GET /closedloop/metrics`` of the Airflow plugin serves.

:func:`exposition` renders :func:`closedloop.stages.health.loop_state` (the Model health page's own data, not a second
computation) as gauges, each labelled with the ``model``; :func:`exposition_models` does so for every model of the
deployment, and ``closedloop_model_config_ok`` says which models' configurations load (a refused one exports only
that gauge, at 0). ``docs/how-to/DASHBOARDS.md`` says what each one means and
why the exporter lives in the Airflow plugin; ``deploy/prometheus/rules.yml`` alerts on them.

A figure the loop has not produced yet (no drift report, no estimate) is absent rather than 0, so that a rule
cannot fire on a value nobody measured; the champion's version is 0 when there is none (as ``closedloop
serve``'s ``closedloop_serve_model_version``). The canary arm is the rollout's candidate and its share of traffic
(docs/explanation/ROLLOUT.md); 0 and 0 without a rollout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from closedloop.stages.health import loop_state, model_choices

if TYPE_CHECKING:
    from collections.abc import Callable

    from closedloop.stages.runtime import Runtime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DECISIONS = ("retrain", "no_drift", "not_judged")

# name -> (help, extra label names); every metric also has the label ``model``
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "closedloop_model_version": ("Registry version each arm serves (champion; canary: the rollout's "
                                 "candidate); 0: none", ("arm",)),
    "closedloop_rollout_canary_share": ("Share of traffic routed to the canary arm (0: no rollout)", ()),
    "closedloop_drift_share": ("Share of drifted features in the latest monitored window", ()),
    "closedloop_drift_share_threshold": ("The drift policy's share threshold", ()),
    "closedloop_drift_decision": ("The latest window's decision: 1 for the current one (retrain, no_drift, "
                                  "not_judged), 0 for the others", ("decision",)),
    "closedloop_drift_window_end_timestamp_seconds": ("End (exclusive) of the latest monitored window", ()),
    "closedloop_performance_roc_auc": ("Latest ROC AUC of the champion: estimated (CBPE, before labels) or "
                                       "realised (on labels)", ("kind",)),
    "closedloop_performance_roc_auc_band_lower": ("Lower edge of the calibrated band of that ROC AUC",
                                                  ("kind",)),
    "closedloop_performance_window_end_timestamp_seconds": ("End (exclusive) of the window of that ROC AUC",
                                                            ("kind",)),
    "closedloop_ingest_newest_day_timestamp_seconds": ("Start (UTC midnight) of the newest curated day",
                                                       ("kind",)),
    "closedloop_ingest_last_run_timestamp_seconds": ("When ingest last curated or quarantined a partition",
                                                     ("kind",)),
    "closedloop_quarantined_partitions": ("Partitions held in quarantine", ("kind",)),
    "closedloop_model_config_ok": ("1 when the model's configuration (closedloop.yaml and its schema) loads; 0 when "
                                   "it is refused: the model's other series are then absent", ()),
}


def samples(state: dict[str, Any]) -> list[tuple[str, dict[str, str], float]]:
    """The (metric, labels, value) samples of a :func:`closedloop.stages.health.loop_state`; absent figures left out."""
    model = state["model"]
    out: list[tuple[str, dict[str, str], float]] = []

    def add(name: str, value: Any, **labels: str) -> None:
        if value is not None:
            out.append((name, {"model": model, **labels}, float(value)))

    for arm, version in state["versions"].items():
        add("closedloop_model_version", version, arm=arm)
    add("closedloop_rollout_canary_share", state["canary_share"])
    drift = state.get("drift")
    if drift:
        add("closedloop_drift_share", drift["share"])
        add("closedloop_drift_share_threshold", drift["share_threshold"])
        for decision in DECISIONS:
            add("closedloop_drift_decision", int(decision == drift["decision"]), decision=decision)
        add("closedloop_drift_window_end_timestamp_seconds", drift["window_end"])
    for kind, perf in state["performance"].items():
        add("closedloop_performance_roc_auc", perf["roc_auc"], kind=kind)
        add("closedloop_performance_roc_auc_band_lower", perf["band_lower"], kind=kind)
        add("closedloop_performance_window_end_timestamp_seconds", perf["window_end"], kind=kind)
    for kind, ingest in state["ingest"].items():
        add("closedloop_ingest_newest_day_timestamp_seconds", ingest["newest_day"], kind=kind)
        add("closedloop_ingest_last_run_timestamp_seconds", ingest["last_run_at"], kind=kind)
        add("closedloop_quarantined_partitions", ingest["quarantined"], kind=kind)
    return out


def render(states: dict[str, Any] | list[dict[str, Any]], config_ok: dict[str, bool] | None = None) -> bytes:
    """Prometheus's text exposition format (0.0.4) of the samples of one :func:`closedloop.stages.health.loop_state`
    or of several (one per model), through prometheus_client; ``config_ok``: ``closedloop_model_config_ok`` per
    model (default: 1 for each state's model)."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    states = [states] if isinstance(states, dict) else states
    config_ok = {s["model"]: True for s in states} if config_ok is None else config_ok
    registry = CollectorRegistry(auto_describe=True)
    gauges = {name: Gauge(name, help_, ["model", *labels], registry=registry)
              for name, (help_, labels) in METRICS.items()}
    for state in states:
        for name, labels, value in samples(state):
            gauges[name].labels(**labels).set(value)
    for model, ok in config_ok.items():
        gauges["closedloop_model_config_ok"].labels(model=model).set(int(ok))
    return generate_latest(registry)


def exposition(rt: Runtime) -> bytes:
    """The loop's metrics of ``rt``'s model, ready to serve with :data:`CONTENT_TYPE`."""
    return render(loop_state(rt))


def exposition_models(runtime: Callable[[str], Runtime], models: list[dict[str, Any]] | None = None) -> bytes:
    """The loop's metrics of every model of the deployment (``models``: default
    :func:`closedloop.stages.health.model_choices`), each built on ``runtime(name)``, ready to serve.

    A model whose configuration is refused exports ``closedloop_model_config_ok{model=...} 0`` and nothing else,
    the others their series as ever: one broken ``closedloop.yaml`` does not blind the others' alerts. Any other
    failure (MLflow or the lake unreachable) raises: the scrape fails, as it did for one model.
    """
    models = model_choices() if models is None else models
    states, config_ok = [], {}
    for m in models:
        config_ok[m["name"]] = m.get("error") is None
        if config_ok[m["name"]]:
            states.append(loop_state(runtime(m["name"])))
    return render(states, config_ok)
