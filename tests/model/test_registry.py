"""promote(): compare-and-set on the champion alias, previous/retired, history; and the orphan marking of training
runs across DAG runs; on a real MLflow store."""

from __future__ import annotations

import threading

import pytest

from closedloop.core.errors import PromotionConflict
from closedloop.stages.registry import CHAMPION, PREVIOUS, alias_version, history, promote, status


@pytest.fixture
def registry(runtime, tmp_path):
    client = runtime.client
    name = "toy"
    client.create_registered_model(name)
    src = tmp_path / "model"
    src.mkdir()
    for _ in range(4):
        client.create_model_version(name, source=str(src))
    return runtime, client, name


def test_promotions_move_champion_and_previous_and_keep_history(registry):
    rt, client, name = registry
    promote(client, rt.settings, name, "1", expected_champion=None, reason="first", actor="test")
    promote(client, rt.settings, name, "2", expected_champion="1", reason="better", actor="test")
    promote(client, rt.settings, name, "3", expected_champion="2", reason="better again", actor="test")
    assert alias_version(client, name, CHAMPION) == "3"
    assert alias_version(client, name, PREVIOUS) == "2"
    statuses = {v["version"]: v["status"] for v in status(client, rt.settings, name)["versions"]}
    assert statuses == {"3": "champion", "2": "previous", "1": "retired", "4": None}
    moves = [(h["from_version"], h["to_version"], h["reason"], h["actor"]) for h in history(client, name)]
    assert moves == [("2", "3", "better again", "test"), ("1", "2", "better", "test"), (None, "1", "first", "test")]


def test_a_stale_decision_changes_nothing(registry):
    rt, client, name = registry
    promote(client, rt.settings, name, "1", expected_champion=None, reason="first")
    with pytest.raises(PromotionConflict, match="champion is version 1"):
        promote(client, rt.settings, name, "2", expected_champion=None, reason="decided before v1 won")
    assert alias_version(client, name, CHAMPION) == "1"
    assert len(history(client, name)) == 1


def test_two_racing_promotions_one_wins(registry, reliability):
    rt, client, name = registry
    promote(client, rt.settings, name, "1", expected_champion=None, reason="first")
    outcomes: list[str] = []

    def race(version: str) -> None:
        try:
            promote(client, rt.settings, name, version, expected_champion="1", reason=f"race {version}")
            outcomes.append("won")
        except PromotionConflict:
            outcomes.append("lost")

    threads = [threading.Thread(target=race, args=(v,)) for v in ("2", "3")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["lost", "won"]
    assert alias_version(client, name, CHAMPION) in {"2", "3"}
    assert len(history(client, name)) == 2
    reliability.record("champion", "two promotions race from the same expected champion (v1), in two threads",
                       "one moved the champion, the other got PromotionConflict and changed nothing; one history "
                       "entry for the move")


def test_a_run_left_running_by_another_dag_run_of_the_same_lineage_is_marked(tmp_path):
    from mlflow import MlflowClient

    from closedloop.stages.training import mark_orphans, reusable

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    killed = client.create_run(exp, tags={"closedloop.lineage_key": "k1", "closedloop.dag_run_id": "manual__1"})
    other = client.create_run(exp, tags={"closedloop.lineage_key": "k2", "closedloop.dag_run_id": "manual__1b"})
    assert mark_orphans(client, exp, "manual__2", "k1") == [killed.info.run_id]
    run = client.get_run(killed.info.run_id)
    assert run.info.status == "FAILED" and run.data.tags["closedloop.orphan"] == "true"
    assert "found by manual__2" in run.data.tags["closedloop.orphan_reason"]
    assert client.get_run(other.info.run_id).info.status == "RUNNING"  # another lineage: left alone
    assert mark_orphans(client, exp, "manual__3", "k1") == []  # marked once
    assert not reusable(client.get_run(killed.info.run_id))
