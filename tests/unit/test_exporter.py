"""The loop's exporter on hand-made states: every model's series in one exposition, each labelled with its
model, and a model whose configuration is refused reduced to ``closedloop_model_config_ok 0`` (the real world,
scraped by a real Prometheus: tests/integration/test_model_health.py)."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from closedloop.adapters import exporter


def _state(model: str, version: int, *, drift: bool) -> dict:
    return {"model": model, "versions": {"champion": version, "canary": 0}, "canary_share": 0.0,
            "drift": {"share": 0.5, "share_threshold": 0.3, "decision": "retrain", "window_end": 1.7e9}
            if drift else None,
            "performance": {}, "ingest": {"transactions": {"newest_day": None, "last_run_at": None,
                                                           "quarantined": 2}}}


def _samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_one_exposition_holds_every_models_series_and_which_configurations_load():
    body = exporter.render([_state("card_fraud", 3, drift=True), _state("churn", 0, drift=False)],
                           {"card_fraud": True, "churn": True, "broken": False})
    got = _samples(body)
    assert got[("closedloop_model_version", (("arm", "champion"), ("model", "card_fraud")))] == 3
    assert got[("closedloop_model_version", (("arm", "champion"), ("model", "churn")))] == 0
    assert got[("closedloop_quarantined_partitions", (("kind", "transactions"), ("model", "churn")))] == 2
    # what a model has not measured is absent, not 0
    assert {dict(k)["model"] for n, k in got if n == "closedloop_drift_share"} == {"card_fraud"}
    assert {dict(k)["model"]: v for (n, k), v in got.items() if n == "closedloop_model_config_ok"} == {
        "card_fraud": 1, "churn": 1, "broken": 0}
    assert [n for n, k in got if dict(k)["model"] == "broken"] == ["closedloop_model_config_ok"]
    # one state as before: its model's configuration loads
    assert _samples(exporter.render(_state("card_fraud", 3, drift=False)))[
        ("closedloop_model_config_ok", (("model", "card_fraud"),))] == 1


def test_exposition_models_skips_a_refused_model_and_fails_on_any_other_error(monkeypatch):
    built = []

    def loop_state(rt):
        if rt == "down":
            raise OSError("the lake is unreachable")
        built.append(rt)
        return _state(rt, 1, drift=False)

    monkeypatch.setattr(exporter, "loop_state", loop_state)
    models = [{"name": "a", "error": None}, {"name": "broken", "error": "closedloop.yaml: refused"},
              {"name": "b", "error": None}]
    got = _samples(exporter.exposition_models(lambda name: name, models))
    assert built == ["a", "b"]  # no Runtime is built for the refused one
    assert {dict(k)["model"]: v for (n, k), v in got.items() if n == "closedloop_model_config_ok"} == {
        "a": 1, "broken": 0, "b": 1}
    with pytest.raises(OSError, match="unreachable"):
        exporter.exposition_models(lambda name: name, [{"name": "down", "error": None}])
