"""The loop's state in Prometheus's text format: what ``GET /closedloop/metrics`` of the Airflow plugin serves.

:func:`exposition` renders :func:`closedloop.stages.health.loop_state` (the Model health page's own data, not a second
computation) as gauges, each labelled with the ``model``. ``docs/DASHBOARDS.md`` says what each one means and
why the exporter lives in the Airflow plugin; ``deploy/prometheus/rules.yml`` alerts on them.

A figure the loop has not produced yet (no drift report, no estimate) is absent rather than 0, so that a rule
cannot fire on a value nobody measured; the champion's version is 0 when there is none (as ``closedloop
serve``'s ``closedloop_serve_model_version``). The canary arm and the rollout's share are 0 until progressive
delivery exists (issue 24).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from closedloop.stages.health import loop_state

if TYPE_CHECKING:
    from closedloop.stages.runtime import Runtime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DECISIONS = ("retrain", "no_drift", "not_judged")

# name -> (help, extra label names); every metric also has the label ``model``
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "closedloop_model_version": ("Registry version each arm serves (arm=champion; canary: 0 until progressive "
                                 "delivery exists); 0: none", ("arm",)),
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


def render(state: dict[str, Any]) -> bytes:
    """Prometheus's text exposition format (0.0.4) of the state's samples, through prometheus_client."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry(auto_describe=True)
    gauges = {name: Gauge(name, help_, ["model", *labels], registry=registry)
              for name, (help_, labels) in METRICS.items()}
    for name, labels, value in samples(state):
        gauges[name].labels(**labels).set(value)
    return generate_latest(registry)


def exposition(rt: Runtime) -> bytes:
    """The loop's metrics of ``rt``'s model, ready to serve with :data:`CONTENT_TYPE`."""
    return render(loop_state(rt))
