"""Progressive delivery through the real ``rollout`` DAG (``dag.test()``): simulated canary rollouts on a real
MLflow registry and lake, where the canary is worse (rolled back, alerted, the champion serves all traffic),
equal (held, then decided by ``on_no_decision``) and better (ramped step by step, then promoted), and one whose
canary fails to score (a guardrail rolls it back before any label).

Each simulated day writes what ``closedloop serve`` logs for the canary's requests at the current share (the
canary's score and the champion's on the same request) and the day's labels; the probabilities come from a
latent risk, each arm's score is that risk seen through its own noise (the worse arm, the noisier).
"""

from __future__ import annotations

import shutil
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from closedloop.core.served import SERVED, SHADOW, served_uri
from closedloop.core.settings import DEFAULT_MODELS
from closedloop.stages.registry import (
    CANARY,
    CHALLENGER,
    CHAMPION,
    alias_version,
    end_rollout,
    history,
    promote,
    rollout_state,
    start_rollout,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DAY0 = date(2026, 3, 2)
POLICY = """
rollout:
  mode: canary
  steps: [0.1, 0.5, 1.0]
  min_days_per_step: 1
  max_days: 4
  on_no_decision: rollback
  min_rows: 500
  min_positives: 20
  guardrails: {max_mean_score_shift: 0.5}
"""


@pytest.fixture
def world(home: Path, tmp_path: Path, monkeypatch, airflow_db):
    """card_fraud alone in a models folder, under a canary policy; champion v1, a rollout of v2 begun on DAY0;
    the rollout DAG parsed from that folder."""
    from airflow.dag_processing.dagbag import DagBag

    from closedloop.stages.runtime import Runtime

    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS / "card_fraud", models / "card_fraud")
    config = models / "card_fraud" / "closedloop.yaml"
    config.write_text(config.read_text() + POLICY)
    monkeypatch.setenv("CLOSEDLOOP_MODELS", str(models))
    rt = Runtime.from_env()
    client, name = rt.client, rt.model_name
    client.create_registered_model(name)
    src = tmp_path / "artifact"
    src.mkdir()
    for _ in range(2):
        client.create_model_version(name, source=str(src))
    promote(client, rt.settings, name, "1", expected_champion=None, reason="first", actor="test")
    start_rollout(client, rt.settings, name, "2", mode="canary", share=0.1, champion="1", reason="passed the gate",
                  actor="test", at=f"{DAY0}T00:00:00+00:00")
    dag = DagBag(dag_folder=str(REPO / "dags")).get_dag("rollout")
    assert dag is not None
    return rt, dag


def _serve_day(rt, day: date, share: float, canary_noise: float, *, seed: int, errors: float = 0.0) -> None:
    """Log one day of the canary's requests at ``share`` of 20000, with both arms' scores, and their labels."""
    c = rt.contract
    rng = np.random.default_rng(seed)
    n = int(20000 * share)
    logit = rng.normal(-3.2, 1.3, n)
    y = rng.random(n) < 1 / (1 + np.exp(-logit))
    champion = 1 / (1 + np.exp(-(logit + rng.normal(0, 1.0, n))))
    canary = 1 / (1 + np.exp(-(logit + rng.normal(0, canary_noise, n))))
    ids = [f"{day}-{i}" for i in range(n)]
    at = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    failed = rng.random(n) < errors
    served = pd.DataFrame({c.row_key: ids, c.entity: rng.integers(1, 5000, n), c.event_timestamp: at,
                           "score": np.where(failed, champion, canary), "decision": 0,
                           "model_version": np.where(failed, "1", "2"), "arm": np.where(failed, "champion", "canary"),
                           "champion_score": champion, "champion_version": "1", "canary_error": failed,
                           "latency_ms": rng.gamma(2.0, 4.0, n)})
    rt.lake.write_parquet(served, f"{served_uri(rt.lake, SERVED, day)}/part-00000.parquet")
    labels = pd.DataFrame({c.row_key: ids, c.label: y.astype("int64"),
                           c.label_timestamp: at + timedelta(hours=6)})
    rt.lake.write_parquet(labels, rt.lake.partition("curated", "labels", day))


def _run(dag, day: date) -> dict:
    dr = dag.test(run_conf={"day": day.isoformat()})
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert dr.state == "success", states
    return dr.get_task_instance("apply_decision").xcom_pull(task_ids="apply_decision")


def _share(rt) -> float:
    version = alias_version(rt.client, rt.model_name, CANARY)
    return float(rt.client.get_model_version(rt.model_name, version).tags["closedloop.canary_share"]) if version else 0


def test_a_better_canary_is_ramped_then_promoted(world):
    rt, dag = world
    actions = []
    for i in range(8):
        day = DAY0 + timedelta(days=i)
        _serve_day(rt, day, _share(rt), canary_noise=0.2, seed=i)
        done = _run(dag, day)
        actions.append((done["action"], done.get("share")))
        if done["action"] == "promote":
            break
    assert [a for a, _ in actions if a != "hold"] == ["ramp", "ramp", "promote"], actions
    assert [s for a, s in actions if a == "ramp"] == [0.5, 1.0]
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "2"
    assert alias_version(rt.client, rt.model_name, CANARY) is None
    kinds = [h["kind"] for h in history(rt.client, rt.model_name)]
    assert kinds[:3] == ["rollout_promotion_canary", "rollout_ramp_1", "rollout_ramp_0.5"], kinds


def test_a_worse_canary_is_rolled_back_and_alerted(world):
    from closedloop.stages.alerts import read_alerts

    rt, dag = world
    for i in range(4):
        day = DAY0 + timedelta(days=i)
        _serve_day(rt, day, _share(rt), canary_noise=2.5, seed=100 + i)
        done = _run(dag, day)
        if done["action"] != "hold":
            break
    assert done["action"] == "rollback" and "worse" in done["why"], done
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "1"
    assert alias_version(rt.client, rt.model_name, CANARY) is None  # serving's next poll: all traffic to v1
    alerts = read_alerts(rt.settings, "rolled_back")
    assert alerts and alerts[-1]["details"]["version"] == "2" and alerts[-1]["model"] == "card_fraud"
    assert rt.client.get_model_version(rt.model_name, "2").tags["closedloop.status"] == "rolled_back"


def test_an_equal_canary_is_held_then_decided_by_the_rule(world):
    rt, dag = world
    actions = []
    for i in range(6):
        day = DAY0 + timedelta(days=i)
        _serve_day(rt, day, _share(rt), canary_noise=1.0, seed=200 + i)
        done = _run(dag, day)
        actions.append(done["action"])
        if done["action"] != "hold":
            break
    assert actions[:-1] == ["hold"] * (len(actions) - 1) and len(actions) == 5, actions  # max_days 4
    assert actions[-1] == "rollback" and "undecided after 4 days" in done["why"], done
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "1"


def test_a_canary_that_fails_to_score_is_rolled_back_by_its_guardrail(world, reliability):
    rt, dag = world
    _serve_day(rt, DAY0, _share(rt), canary_noise=0.2, seed=300, errors=0.05)
    done = _run(dag, DAY0)
    assert done["action"] == "rollback" and "error rate" in done["why"], done
    assert alias_version(rt.client, rt.model_name, CANARY) is None
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "1"
    reliability.record("rollback", "a canary that fails to score 5 % of its requests (answered by the champion)",
                       "rolled back by its error-rate guardrail at the first look, before any label; alerted; the "
                       "champion serves all traffic", "nothing")


def test_a_better_challenger_in_shadow_is_promoted(world):
    """Shadow: the challenger answers nothing; its logged scores are paired with the champion's answers of the
    same requests by row key."""
    rt, dag = world
    end_rollout(rt.client, rt.settings, rollout_state(rt.client, rt.model_name), promoted=False, reason="redo",
                actor="test")
    start_rollout(rt.client, rt.settings, rt.model_name, "2", mode="shadow", share=0.0, champion="1",
                  reason="passed the gate", actor="test", at=f"{DAY0}T00:00:00+00:00")
    assert alias_version(rt.client, rt.model_name, CHALLENGER) == "2"
    c = rt.contract
    for i in range(3):
        day = DAY0 + timedelta(days=i)
        _serve_day(rt, day, 0.2, canary_noise=0.2, seed=400 + i)  # the canary's columns, re-cut below
        logged = rt.lake.read_parquet(f"{served_uri(rt.lake, SERVED, day)}/part-00000.parquet")
        answers = logged.assign(score=logged["champion_score"], model_version="1", arm="champion")
        rt.lake.write_parquet(answers.drop(columns=["champion_score", "champion_version", "canary_error"]),
                              f"{served_uri(rt.lake, SERVED, day)}/part-00000.parquet")
        shadow = logged[[c.row_key, c.entity, c.event_timestamp, "score", "decision"]].assign(model_version="2")
        rt.lake.write_parquet(shadow, f"{served_uri(rt.lake, SHADOW, day)}/part-00000.parquet")
        done = _run(dag, day)
        if done["action"] != "hold":
            break
    assert done["action"] == "promote" and done["mode"] == "shadow", done
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "2"
    assert alias_version(rt.client, rt.model_name, CHALLENGER) is None



def test_the_page_the_exporter_and_status_show_the_rollout(world):
    from typer.testing import CliRunner

    from closedloop.cli import app
    from closedloop.stages.health import gather, loop_state, render_page

    rt, _ = world
    data = gather(rt)
    assert data["rollout"]["version"] == "2" and data["rollout"]["share"] == 0.1
    state = loop_state(rt, data)
    assert state["versions"] == {"champion": 1, "canary": 2} and state["canary_share"] == 0.1
    page = render_page(data)
    assert "<h2>Rollout</h2>" in page and "0.1 of traffic (step 0)" in page
    out = CliRunner().invoke(app, ["status"])
    assert out.exit_code == 0, out.output
    assert "rollout: version 2 (canary) serves 0.1 of traffic (step 0) against champion version 1" in out.output


def test_a_rollout_stopped_by_hand_gives_all_traffic_back(world):
    from typer.testing import CliRunner

    from closedloop.cli import app

    rt, _ = world
    out = CliRunner().invoke(app, ["rollout-stop", "--reason", "a bad feeling", "--actor", "oncall"])
    assert out.exit_code == 0, out.output
    assert "rollout of v2 stopped; champion v1 serves all traffic" in out.output
    assert alias_version(rt.client, rt.model_name, CANARY) is None
    last = history(rt.client, rt.model_name)[0]
    assert (last["kind"], last["actor"], last["reason"]) == ("rollout_rollback_canary", "oncall",
                                                            "stopped by hand: a bad feeling")
    again = CliRunner().invoke(app, ["rollout-stop", "--reason", "twice"])
    assert again.exit_code == 1 and "no rollout in progress" in again.output
