"""Rollouts in the registry: start, ramp and end as compare-and-sets, one rollout per model at a time; on a real
MLflow store."""

from __future__ import annotations

import threading

import pytest

from closedloop.core.errors import PromotionConflict
from closedloop.stages.registry import (
    CANARY,
    CANARY_SHARE_TAG,
    CHALLENGER,
    CHAMPION,
    alias_version,
    end_rollout,
    history,
    promote,
    ramp_rollout,
    rollout_state,
    start_rollout,
)


@pytest.fixture
def registry(runtime, tmp_path):
    client = runtime.client
    name = "toy"
    client.create_registered_model(name)
    src = tmp_path / "model"
    src.mkdir()
    for _ in range(4):
        client.create_model_version(name, source=str(src))
    promote(client, runtime.settings, name, "1", expected_champion=None, reason="first", actor="test")
    return runtime, client, name


def test_a_canary_starts_ramps_and_is_promoted(registry):
    rt, client, name = registry
    r = start_rollout(client, rt.settings, name, "2", mode="canary", share=0.05, champion="1", reason="gate",
                      actor="test")
    assert (r.version, r.mode, r.step, r.share, r.champion) == ("2", "canary", 0, 0.05, "1")
    assert alias_version(client, name, CANARY) == "2"
    assert client.get_model_version(name, "2").tags[CANARY_SHARE_TAG] == "0.05"  # what serving polls
    assert start_rollout(client, rt.settings, name, "2", mode="canary", share=0.05, champion="1", reason="retry",
                         actor="test") == r  # a retried task finds its rollout
    r2 = ramp_rollout(client, rt.settings, r, step=1, share=0.25, reason="better", actor="test")
    assert (r2.step, r2.share) == (1, 0.25)
    assert ramp_rollout(client, rt.settings, r, step=1, share=0.25, reason="retry", actor="test").step == 1
    move = end_rollout(client, rt.settings, r2, promoted=True, reason="better at 1.0", actor="test")
    assert move is not None and move.kind == "rollout_promotion_canary"
    assert (alias_version(client, name, CHAMPION), alias_version(client, name, CANARY)) == ("2", None)
    assert rollout_state(client, name) is None
    assert end_rollout(client, rt.settings, r2, promoted=True, reason="retry", actor="test") is None
    kinds = [h["kind"] for h in history(client, name)]
    assert kinds[:3] == ["rollout_promotion_canary", "rollout_ramp_0.25", "rollout_start_canary"]


def test_a_rollback_returns_all_traffic_to_the_champion(registry):
    rt, client, name = registry
    r = start_rollout(client, rt.settings, name, "2", mode="shadow", share=0.0, champion="1", reason="gate",
                      actor="test")
    assert alias_version(client, name, CHALLENGER) == "2" and r.mode == "shadow"
    move = end_rollout(client, rt.settings, r, promoted=False, reason="worse", actor="test")
    assert move is not None and (move.version, move.previous) == ("1", "2")
    assert (alias_version(client, name, CHAMPION), alias_version(client, name, CHALLENGER)) == ("1", None)
    tags = client.get_model_version(name, "2").tags
    assert tags["closedloop.status"] == "rolled_back" and tags["closedloop.rejected_reason"] == "worse"


def test_two_rollouts_racing_one_runs(registry, reliability):
    rt, client, name = registry
    outcomes: dict[str, str] = {}

    def race(version: str) -> None:
        try:
            start_rollout(client, rt.settings, name, version, mode="canary", share=0.05, champion="1",
                          reason=f"race {version}", actor="test")
            outcomes[version] = "started"
        except PromotionConflict as exc:
            outcomes[version] = str(exc)

    threads = [threading.Thread(target=race, args=(v,)) for v in ("2", "3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    started = [v for v, o in outcomes.items() if o == "started"]
    assert len(started) == 1, outcomes
    loser = ({"2", "3"} - set(started)).pop()
    assert "a rollout of version" in outcomes[loser] and "is in progress" in outcomes[loser]
    assert alias_version(client, name, CANARY) == started[0] and alias_version(client, name, CHAMPION) == "1"
    # two decisions of the same rollout racing: the second finds the step moved
    r = rollout_state(client, name)
    ramp_rollout(client, rt.settings, r, step=1, share=0.25, reason="first decision", actor="test")
    with pytest.raises(PromotionConflict, match="moved to step 1"):
        ramp_rollout(client, rt.settings, r, step=2, share=0.5, reason="stale decision", actor="test")
    reliability.record("champion", "two rollouts racing (two candidates start a canary against the same champion "
                       "at once; then two decisions of one rollout)", "one rollout runs, the other candidate is "
                       "refused naming it; a stale ramp is refused; the champion never moved", "nothing")


@pytest.fixture
def canary_model(home, tmp_path, monkeypatch):
    """card_fraud alone in a models folder with rollout.mode canary, three registered versions."""
    import shutil

    from closedloop.core.settings import DEFAULT_MODELS
    from closedloop.stages.runtime import Runtime

    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS / "card_fraud", models / "card_fraud")
    config = models / "card_fraud" / "closedloop.yaml"
    config.write_text(config.read_text() + "\nrollout: {mode: canary, steps: [0.1, 1.0]}\n")
    monkeypatch.setenv("CLOSEDLOOP_MODELS", str(models))
    rt = Runtime.from_env()
    rt.client.create_registered_model(rt.model_name)
    (tmp_path / "artifact").mkdir()
    for _ in range(3):
        rt.client.create_model_version(rt.model_name, source=str(tmp_path / "artifact"))
    return rt


def _decision(version: str, champion: str | None) -> dict:
    return {"outcome": "promote", "candidate_version": version, "champion_version": champion,
            "reason": f"v{version} beats v{champion} on the holdout"}


def test_the_gate_starts_a_canary_instead_of_promoting(canary_model):
    from closedloop.stages.retraining import promote_or_reject

    rt = canary_model
    first = promote_or_reject(rt, _decision("1", None))  # nothing to compare with: promoted directly
    assert first["action"] == "promoted" and alias_version(rt.client, rt.model_name, CHAMPION) == "1"
    started = promote_or_reject(rt, _decision("2", "1"))
    assert started["action"] == "rollout_started" and (started["mode"], started["share"]) == ("canary", 0.1)
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "1"
    assert alias_version(rt.client, rt.model_name, CANARY) == "2"
    assert promote_or_reject(rt, _decision("2", "1"))["action"] == "rollout_started"  # a retry: the same rollout
    waits = promote_or_reject(rt, _decision("3", "1"))  # one rollout at a time
    assert waits["action"] == "rejected" and waits["outcome"] == "rollout_in_progress", waits
    assert "rollout of version 2 is in progress" in waits["reason"]
    assert rt.client.get_model_version(rt.model_name, "3").tags["closedloop.status"] == "rejected"
    assert alias_version(rt.client, rt.model_name, CANARY) == "2"
