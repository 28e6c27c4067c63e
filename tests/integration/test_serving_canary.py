"""The canary split of online scoring: the real app (uvicorn on a loopback port, its alias poller every 0.3 s) on a
real Feast SQLite online store and a real MLflow registry whose ``canary`` alias and ``closedloop.canary_share``
tag the tests move with the registry's own functions (what the rollout DAG calls).

The champion is trained through the package's stages on a small generated world (as tests/integration/
test_serving.py does, whose server and request helpers this module reuses). The canary is a real, different
model: the champion's first quarter of trees, logged to MLflow as its own version. Two broken canaries: one
whose feature names are not the contract's (it loads, and fails when it scores) and one whose artifacts are
missing (it never loads).

2000 entities the online store knows are scored with the same request fields, so the shares are measured on
2000 distinct entities through the app, not on the hash function alone.
"""

from __future__ import annotations

import math
import time

import httpx
import pandas as pd
import pytest
from test_serving import AUTH, LIVE, START, TRAIN, Server, _app, _requests

from closedloop.core.served import ARM_CANARY, ARM_CHAMPION, arm_bucket, read_served, with_arms
from closedloop.devtools.generate import GeneratorConfig
from closedloop.stages import retraining as stages
from closedloop.stages.registry import CANARY_SHARE_TAG, canary, clear_canary, set_canary

pytestmark = pytest.mark.integration

POLL = 0.3  # serving.poll_seconds of this module's server
# a change in the registry reaches traffic within one poll interval; the slack covers the poll's own MLflow
# queries and a canary's load on a shared two-core machine
WITHIN_ONE_POLL = POLL + 1.5
CUSTOMERS = 2300  # about nine in ten are active in the window: at least 2000 entities in the online store
ENTITIES = 2000


@pytest.fixture(scope="module")
def world(generated_home):
    """A champion (version 1) and three canary candidates: a real smaller model (2), one that fails when it scores
    (3) and one whose artifacts are missing (4); the entities the online store holds; a server of the app."""
    import mlflow
    import mlflow.xgboost

    from closedloop.stages.registry import load_booster, promote
    from closedloop.stages.scoring import version_info

    config = GeneratorConfig(start=START, days=(LIVE - START).days + 1, customers=CUSTOMERS, transactions_per_day=700,
                             seed=11, fraud_rate=0.02, structure=0.0)
    with generated_home("serving_canary", config) as rt:
        stages.validate(rt, TRAIN)
        stages.materialise(rt, TRAIN)
        ts = stages.build_training_set(rt, TRAIN)
        trained = stages.train(rt, ts, {"dag_run_id": "fixture"})
        registered = stages.register(rt, trained, TRAIN)
        promote(rt.client, rt.settings, rt.model_name, registered["version"], expected_champion=None,
                reason="fixture", actor="test")
        client, name = rt.client, rt.model_name
        info = version_info(client, name, registered["version"])
        champion = load_booster(info["model_uri"])
        smaller = champion[: max(1, champion.num_boosted_rounds() // 4)]
        renamed = champion.copy()
        renamed.feature_names = [f"{f}_v0" for f in champion.feature_names]
        experiment = client.get_run(info["run_id"]).info.experiment_id
        versions = {}
        for label, booster in (("smaller", smaller), ("renamed", renamed)):
            with mlflow.start_run(experiment_id=experiment, run_name=f"canary {label}") as run:
                mlflow.log_param("decision_threshold", info["threshold"])
                logged = mlflow.xgboost.log_model(booster, name="model")
            versions[label] = client.create_model_version(name, source=logged.model_uri,
                                                          run_id=run.info.run_id).version
        missing = rt.settings.home / "no-such-model"
        versions["missing"] = client.create_model_version(name, source=str(missing), run_id=run.info.run_id).version
        versions = {k: str(v) for k, v in versions.items()}
        assert versions == {"smaller": "2", "renamed": "3", "missing": "4"}

        c = rt.contract
        online = rt.store.get_online_features(features=rt.defs.service, entity_rows=[
            {c.entity: e} for e in range(CUSTOMERS + 1)]).to_dict()
        known = [e for i, e in enumerate(online[c.entity])
                 if any(online[f][i] is not None for f in c.entity_features)]
        assert len(known) >= ENTITIES, len(known)
        live = rt.lake.read_parquet(rt.lake.partition("landing", "transactions", LIVE))
        template = _requests(rt, live.head(1))[0]
        app = _app(rt, shadow_share=0.0, poll_seconds=POLL)
        with Server(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
            yield CanaryWorld(rt, versions, known[:ENTITIES], template, app, srv, http)
        clear_canary(client, name)


class CanaryWorld:
    """The module's world and server, with the moves a test makes: score entities, move the canary, read /metrics."""

    def __init__(self, rt, versions, entities, template, app, srv, http):
        self.rt, self.versions, self.entities, self.template = rt, versions, entities, template
        self.app, self.srv, self.http = app, srv, http
        self.sent = 0

    @property
    def name(self) -> str:
        return self.rt.model_name

    def score(self, entities: list) -> dict:
        """Score one transaction per entity (the template's request fields); {entity: prediction}."""
        c = self.rt.contract
        out = {}
        for i in range(0, len(entities), 100):  # serving.max_batch of _app
            batch = []
            for e in entities[i:i + 100]:
                self.sent += 1
                batch.append({**self.template, c.row_key: f"canary-test-{self.sent}", c.entity: int(e)})
            r = self.http.post("/score", json={"transactions": batch}, headers=AUTH)
            assert r.status_code == 200, r.text
            body = r.json()
            for e, p in zip(entities[i:i + 100], body["predictions"], strict=True):
                out[e] = {**p, "version": p.get("model_version", body["model_version"])}
        return out

    def canary_entities(self, entities: list | None = None) -> set:
        """The entities the canary answered (their predictions carry the canary's version)."""
        answers = self.score(entities or self.entities)
        return {e for e, p in answers.items() if p["version"] != "1"}

    def ready(self) -> dict:
        return self.http.get("/ready").json()

    def set(self, version: str | None, share: float = 0.0) -> float:
        """Move the canary in the registry (None: remove it) and wait until the service follows; the seconds it
        took after the registry's write."""
        if version is None:
            clear_canary(self.rt.client, self.name)
        else:
            set_canary(self.rt.client, self.name, version, share)
        moved = time.monotonic()
        expected = (version, share if version is not None else 0.0)
        while (r := self.ready())["canary_version"] != expected[0] or r["canary_share"] != expected[1]:
            assert time.monotonic() - moved < 30, f"the service did not follow the canary {expected}: {r}"
            time.sleep(0.02)
        return time.monotonic() - moved

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        text = self.http.get("/metrics", headers=AUTH).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        raise AssertionError(f"{name}{labels} not on /metrics")


def _binomial_band(n: int, p: float, sd: float = 4.0) -> tuple[float, float]:
    """The count of successes out of n at rate p, within ``sd`` standard deviations (a 4-sd band: a false alarm
    about once in 16 000 for a fair split)."""
    half = sd * math.sqrt(n * p * (1 - p))
    return n * p - half, n * p + half


# -- the split function ----------------------------------------------------------------------------
def test_the_bucket_is_stable_uniform_and_salted_by_model():
    entities = list(range(2000))
    buckets = [arm_bucket("card_fraud", e) for e in entities]
    # pinned: a changed hash would move customers between arms in the middle of a rollout
    assert arm_bucket("card_fraud", 17) == 0.5010020765060403
    assert arm_bucket("card_fraud", 17) == arm_bucket("card_fraud", "17")  # the entity as the log or a request has it
    assert all(0.0 <= b < 1.0 for b in buckets)
    lo, hi = _binomial_band(2000, 0.25)
    assert lo <= sum(b < 0.25 for b in buckets) <= hi
    # another model's split is independent: its canary at 25 % overlaps this one's about 25 % x 25 %
    other = {e for e in entities if arm_bucket("churn", e) < 0.25}
    mine = {e for e, b in zip(entities, buckets, strict=True) if b < 0.25}
    lo, hi = _binomial_band(2000, 0.25 * 0.25)
    assert lo <= len(mine & other) <= hi


def test_the_registry_reads_the_canary_and_refuses_a_bad_share(world):
    client, name, v = world.rt.client, world.name, world.versions["smaller"]
    assert canary(client, name) is None
    with pytest.raises(ValueError, match="between 0 and 1"):
        set_canary(client, name, v, 1.5)
    set_canary(client, name, v, 0.3)
    assert canary(client, name) == (v, 0.3)
    for bad in ("lots", "1.2", "-0.1", "nan"):  # set by hand: the canary gets no traffic, never an error
        client.set_model_version_tag(name, v, CANARY_SHARE_TAG, bad)
        assert canary(client, name) == (v, 0.0)
    clear_canary(client, name)
    clear_canary(client, name)  # idempotent
    assert canary(client, name) is None


# -- the split through the app -----------------------------------------------------------------------
def test_no_canary_no_split(world):
    world.set(None)
    assert world.canary_entities() == set()
    assert world.ready()["canary_loaded"] is False


def test_shares_over_2000_entities_follow_the_hash(world):
    """At share 0.25 the canary answers the entities whose bucket is below 0.25, and no other: about a quarter
    of them (4-sd binomial band), each prediction with the canary's version and its own score."""
    n = len(world.entities)
    assert n == ENTITIES
    world.set(world.versions["smaller"], 0.25)
    answers = world.score(world.entities)
    in_canary = {e for e, p in answers.items() if p["version"] == world.versions["smaller"]}
    assert in_canary == {e for e in world.entities if arm_bucket(world.name, e) < 0.25}
    lo, hi = _binomial_band(n, 0.25)
    assert lo <= len(in_canary) <= hi, (len(in_canary), n)
    assert {p["version"] for p in answers.values()} == {"1", world.versions["smaller"]}


def test_an_entity_stays_in_its_arm_across_requests_and_polls(world):
    world.set(world.versions["smaller"], 0.25)
    first = world.canary_entities()
    again = world.canary_entities()
    time.sleep(3 * POLL)  # the poller has run again (nothing changed)
    after_polls = world.canary_entities()
    assert first == again == after_polls and first
    one = world.entities[:7] * 3  # the same entities within one request, repeated
    answers = world.score(one)
    assert {e for e, p in answers.items() if p["version"] != "1"} == first & set(one)


def test_ramping_only_moves_entities_from_champion_to_canary(world):
    n = len(world.entities)
    seen = {}
    for share in (0.1, 0.25, 0.5, 1.0):
        world.set(world.versions["smaller"], share)
        seen[share] = world.canary_entities()
        lo, hi = _binomial_band(n, share)
        assert lo <= len(seen[share]) <= hi or share == 1.0, (share, len(seen[share]))
    assert seen[0.1] <= seen[0.25] <= seen[0.5] <= seen[1.0] == set(world.entities)
    assert seen[0.1] and seen[0.1] < seen[0.5]


def test_a_share_change_and_the_alias_removed_reach_traffic_within_one_poll(world):
    v = world.versions["smaller"]
    world.set(v, 0.1)
    took = {"share 0.1 -> 0.5": world.set(v, 0.5)}
    assert len(world.canary_entities()) > 0.4 * len(world.entities)
    took["alias removed"] = world.set(None)
    assert world.canary_entities() == set()  # all traffic back to the champion
    took["alias set at 0.5"] = world.set(v, 0.5)  # a new canary: loaded, then swapped in
    assert all(t <= WITHIN_ONE_POLL for t in took.values()), took
    assert world.metric("closedloop_serve_canary_share") == 0.5
    assert world.metric("closedloop_serve_model_version", alias="canary") == float(v)
    world.set(None)
    assert world.metric("closedloop_serve_canary_share") == 0.0
    assert world.metric("closedloop_serve_model_version", alias="canary") == 0.0


@pytest.mark.parametrize("broken", ["renamed", "missing"])
def test_a_failing_canary_leaves_the_answer_to_the_champion_and_is_counted(world, broken, reliability):
    """A canary that raises while scoring (its features are not the contract's) or that cannot be loaded (its
    artifacts are missing): every request is answered (200) by the champion, the failures are counted."""
    share = 0.5
    world.set(world.versions[broken], share)
    assert world.ready()["canary_loaded"] is (broken == "renamed")
    expected = {e for e in world.entities if arm_bucket(world.name, e) < share}
    errors = world.metric("closedloop_serve_arm_errors_total", arm=ARM_CANARY)
    answered = world.metric("closedloop_serve_arm_transactions_total", arm=ARM_CANARY)
    first = world.sent + 1
    answers = world.score(world.entities)
    assert {p["version"] for p in answers.values()} == {"1"}
    world.app.state.scorer.served.flush()
    c = world.rt.contract
    log = read_served(world.rt.lake, pd.Timestamp.now(tz="UTC").date())
    mine = log[log[c.row_key].isin([f"canary-test-{k}" for k in range(first, world.sent + 1)])]
    assert len(mine) == len(world.entities) and set(mine["arm"]) == {ARM_CHAMPION}
    assert set(mine.loc[mine["canary_error"], c.entity]) == expected
    assert world.metric("closedloop_serve_arm_errors_total", arm=ARM_CANARY) == errors + len(expected)
    assert world.metric("closedloop_serve_arm_transactions_total", arm=ARM_CANARY) == answered
    world.set(None)
    case = {"renamed": "a canary version that loads but raises when it scores (its feature names are not the "
                       "contract's), at share 0.5 of live traffic",
            "missing": "a canary version whose model artifacts are missing (it never loads), at share 0.5 of live "
                       "traffic"}[broken]
    reliability.record("fault", case, "every request answered 200 by the champion; each transaction the canary "
                       "should have answered counted in closedloop_serve_arm_errors_total{arm=\"canary\"} and "
                       "logged with arm champion and canary_error true", "nothing")


def test_per_arm_metrics(world):
    world.set(world.versions["smaller"], 0.25)
    before = {a: world.metric("closedloop_serve_arm_transactions_total", arm=a) for a in (ARM_CHAMPION, ARM_CANARY)}
    canary_before = world.metric("closedloop_serve_arm_score_count", arm=ARM_CANARY)
    in_canary = world.canary_entities()
    n = len(world.entities)
    after = {a: world.metric("closedloop_serve_arm_transactions_total", arm=a) for a in (ARM_CHAMPION, ARM_CANARY)}
    assert after[ARM_CANARY] - before[ARM_CANARY] == len(in_canary)
    assert after[ARM_CHAMPION] - before[ARM_CHAMPION] == n - len(in_canary)
    assert world.metric("closedloop_serve_arm_score_count", arm=ARM_CANARY) - canary_before == len(in_canary)
    for arm in (ARM_CHAMPION, ARM_CANARY):
        assert world.metric("closedloop_serve_arm_request_seconds_count", arm=arm) > 0
    assert world.metric("closedloop_serve_arm_errors_total", arm=ARM_CHAMPION) == 0
    assert world.metric("closedloop_serve_transactions_total") >= sum(after.values())  # the old names still count
    world.set(None)


# -- the served log ---------------------------------------------------------------------------------
def test_the_served_log_carries_the_arm_and_the_champions_score(world):
    """Every row names its arm; a canary row has the canary's score and version with the champion's beside them
    (scored on the same request); a champion row's champion_score is its score; a failed canary's rows are the
    champion's, flagged. The skew check still passes on the day (each row against its own version)."""
    from closedloop.stages import skew
    from closedloop.stages.registry import load_booster
    from closedloop.stages.scoring import version_info
    from closedloop.stages.training import predict

    rt, v = world.rt, world.versions["smaller"]
    world.set(v, 0.25)
    world.canary_entities()
    world.set(world.versions["renamed"], 0.25)
    world.canary_entities(world.entities[:200])
    world.set(None)
    world.app.state.scorer.served.flush()
    today = pd.Timestamp.now(tz="UTC").date()
    log = read_served(rt.lake, today)
    assert set(log["arm"]) == {ARM_CHAMPION, ARM_CANARY}
    assert set(log["champion_version"]) == {"1"}
    canary_rows, champion_rows = log[log["arm"] == ARM_CANARY], log[log["arm"] == ARM_CHAMPION]
    assert set(canary_rows["model_version"]) == {v} and set(champion_rows["model_version"]) == {"1"}
    assert (champion_rows["champion_score"] == champion_rows["score"]).all()
    assert (canary_rows["score"] != canary_rows["champion_score"]).mean() > 0.99  # two different models
    assert not canary_rows["canary_error"].any()
    failed = log[log["canary_error"]]
    assert len(failed) > 0 and set(failed["arm"]) == {ARM_CHAMPION} and set(failed["model_version"]) == {"1"}
    # (the failing canaries of the tests above ran at share 0.5)
    assert all(arm_bucket(world.name, e) < 0.5 for e in failed[rt.contract.entity])

    # the logged scores are each version's batch scores of the logged row
    c = rt.contract
    sample = canary_rows.head(50).reset_index(drop=True)
    for column, version in (("score", v), ("champion_score", "1")):
        booster = load_booster(version_info(rt.client, rt.model_name, version)["model_uri"])
        assert sample[column].to_numpy() == pytest.approx(predict(booster, sample[c.model_features], c), abs=1e-6)

    report = skew.measure_day(rt, today)
    assert report["passed"], report["reasons"]
    assert v in report["model_versions"]


def test_rows_logged_before_the_split_read_as_the_champions():
    old = pd.DataFrame({"score": [0.1, 0.9], "model_version": ["3", "3"]})
    got = with_arms(old)
    assert got["arm"].tolist() == [ARM_CHAMPION] * 2 and got["champion_score"].tolist() == [0.1, 0.9]
    assert got["champion_version"].tolist() == ["3", "3"] and not got["canary_error"].any()
    mixed = pd.concat([old, pd.DataFrame({"score": [0.5], "model_version": ["4"], "arm": [ARM_CANARY],
                                          "champion_score": [0.2], "champion_version": ["3"],
                                          "canary_error": [False]})], ignore_index=True)
    got = with_arms(mixed)
    assert got["arm"].tolist() == [ARM_CHAMPION, ARM_CHAMPION, ARM_CANARY]
    assert got["champion_score"].tolist() == [0.1, 0.9, 0.2]



def test_a_service_killed_mid_ramp_comes_back_on_the_registrys_ramp(world, tmp_path, reliability):
    """``closedloop serve`` as its own process, killed (SIGKILL) while the canary serves 0.25; the rollout ramps to
    0.5 meanwhile; a new process serves the new share at once, with the same customers in the canary (the split
    lives in the registry and the hash, nothing in the dead process). What the dead process had not flushed to
    the served log is its only loss; what it did log is intact."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from test_serving import TOKEN

    rt, v = world.rt, world.versions["smaller"]
    world.set(v, 0.25)
    env = {**os.environ, "CLOSEDLOOP_SERVE_TOKEN": TOKEN}
    cli = str(Path(sys.executable).parent / "closedloop")

    def start() -> tuple[subprocess.Popen, httpx.Client]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with open(tmp_path / f"serve-{port}.log", "w") as err:  # the child keeps its own descriptor
            proc = subprocess.Popen([cli, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / f"serve-{port}.log").read_text()[-3000:]
            try:
                if http.get("/ready").json().get("canary_version") == v:
                    return proc, http
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, "closedloop serve did not get ready"
            time.sleep(0.25)

    entities = world.entities[:400]

    def canary_of(http: httpx.Client, tag: str) -> set:
        c = rt.contract
        batch = [{**world.template, c.row_key: f"killed-{tag}-{e}", c.entity: int(e)} for e in entities]
        out = set()
        for i in range(0, len(batch), 100):
            r = http.post("/score", json={"transactions": batch[i:i + 100]}, headers=AUTH)
            assert r.status_code == 200, r.text
            out |= {e for e, p in zip(entities[i:i + 100], r.json()["predictions"], strict=True)
                    if p.get("model_version") == v}
        return out

    proc, http = start()
    before = canary_of(http, "before")
    os.killpg(proc.pid, signal.SIGKILL)  # no shutdown, no flush
    proc.wait(timeout=30)
    set_canary(rt.client, world.name, v, 0.5)  # the rollout ramps while the service is down
    proc, http = start()
    try:
        assert http.get("/ready").json()["canary_share"] == 0.5
        after = canary_of(http, "after")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # a clean stop: flushes its log
        proc.wait(timeout=60)
    expected = {e for e in entities if arm_bucket(world.name, e) < 0.5}
    assert before == {e for e in entities if arm_bucket(world.name, e) < 0.25} and after == expected
    assert before <= after  # the ramp only moved customers to the canary, across the restart
    from datetime import UTC, datetime, timedelta

    today = datetime.now(UTC).date()  # the served log's day is the day it was served
    days = [read_served(rt.lake, d) for d in (today - timedelta(days=1), today)]
    logged = with_arms(pd.concat([d for d in days if not d.empty], ignore_index=True))
    logged = logged[logged[rt.contract.row_key].str.startswith("killed-")]
    kept_before = logged[logged[rt.contract.row_key].str.startswith("killed-before-")]
    assert len(logged[logged[rt.contract.row_key].str.startswith("killed-after-")]) == len(entities)
    assert not logged[rt.contract.row_key].duplicated().any()
    for _, row in kept_before.iterrows():  # what was logged before the kill is what was answered
        assert (row["arm"] == ARM_CANARY) == (row[rt.contract.entity] in before)
    reliability.record("fault", "closedloop serve killed (SIGKILL) mid-ramp, the canary ramped from 0.25 to 0.5 "
                       "while it was down", "the new process serves 0.5 at once, the same customers stay in the "
                       "canary (the split is the registry's share and the entity's hash)",
                       f"the served-log rows not yet flushed by the killed process ({len(entities) - len(kept_before)}"
                       f" of {len(entities)} here; serving.log_flush_seconds bounds them): the rollout judges fewer "
                       "requests, none wrongly", corrupted="nothing")
