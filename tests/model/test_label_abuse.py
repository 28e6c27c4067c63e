"""A catalogue of label abuse against the gate and the label checks, with real components.

Models trained on generated data and logged to a real MLflow store, registered, judged by the gate
(``closedloop.stages.retraining.evaluate_gate``) and acted on by ``promote_or_reject``; label days judged by
``validate_frame``. Each case is a ``RELIABILITY.md`` row of the ``labels`` area, recorded after its
assertions: none may end in a promotion the labels do not justify. The cases that must go through the
real DAG (windows with no positives, a handful, unrelated labels) are in
``tests/integration/test_label_abuse_dag.py``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from support.training_sets import write_training_set

from closedloop.core.runconf import Window
from closedloop.devtools.generate import GeneratorConfig, simulate
from closedloop.stages import retraining
from closedloop.stages.aggregates import compute_entity_features
from closedloop.stages.alerts import gate_alert
from closedloop.stages.features import SPLITS, time_split
from closedloop.stages.registry import CHAMPION, alias_version, history, promote
from closedloop.stages.rollback import promote_manually
from closedloop.stages.runtime import Runtime
from closedloop.stages.training import train_and_log
from closedloop.stages.validation import validate_frame

WINDOW = Window(date(2026, 3, 1), date(2026, 3, 22))


@dataclass
class Named(Runtime):
    name: str = "card_fraud"

    @property
    def model_name(self) -> str:
        return self.name


@dataclass
class World:
    rt: Runtime
    parts: dict[str, dict[str, pd.DataFrame]]  # the splits of each variant of the window
    sets: dict[str, dict[str, Any]]
    models: dict[str, dict[str, Any]]
    tmp: Path

    def named(self, name: str) -> Named:
        return Named(self.rt.settings, name=name)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("label-abuse")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLOSEDLOOP_HOME", str(tmp / "closedloop"))
        for var in ("CLOSEDLOOP_LAKE_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                    "CLOSEDLOOP_MLFLOW_ARTIFACTS", "CLOSEDLOOP_FEAST_REGISTRY", "CLOSEDLOOP_CONFIG"):
            mp.delenv(var, raising=False)
        rt = Runtime.from_env()
        c = rt.contract
        tx = simulate(GeneratorConfig(start=WINDOW.start, days=21, customers=500, transactions_per_day=1200,
                                      seed=8, structure=0.0), c).transactions
        frame = tx.merge(compute_entity_features(tx, c), on=[c.entity, c.event_timestamp], how="left")
        clean = time_split(frame, c, {"train": 0.7, "validation": 0.15, "holdout": 0.15})
        rng = np.random.default_rng(1)

        def relabel(fn, splits=SPLITS) -> dict[str, pd.DataFrame]:
            return {s: p.assign(**{c.label: fn(p[c.label].to_numpy())}) if s in splits else p
                    for s, p in clean.items()}

        hold = clean["holdout"]
        positives = np.flatnonzero(hold[c.label].to_numpy() == 1)
        parts = {
            "clean": clean,
            "inverted": relabel(lambda y: 1 - y),
            "inverted_training": relabel(lambda y: 1 - y, ("train", "validation")),
            "shuffled": relabel(lambda y: rng.permutation(y)),
            # the holdout's rows carry the labels of another window's rows (a join on the wrong key)
            "foreign": {**clean, "holdout": hold.assign(
                **{c.label: rng.permutation(clean["train"][c.label].to_numpy())[: len(hold)]})},
            "one_class": {**clean, "holdout": hold.assign(**{c.label: 0})},
            "handful": {**clean, "holdout": hold.drop(hold.index[positives[3:]])},
            "tiny": {**clean, "holdout": pd.concat([hold.iloc[positives[:1]],
                                                    hold[hold[c.label] == 0].head(39)])},
        }
        sets = {k: write_training_set(rt, k, p) for k, p in parts.items()}

        def train(ts: str) -> dict[str, Any]:
            return train_and_log(rt.settings, rt.lake, c, sets[ts], lineage={"reason": "label abuse"}).to_dict()

        models = {"good": train("clean"), "inverted": train("inverted"), "shuffled": train("shuffled")}
        yield World(rt, parts, sets, models, tmp)


def _register(rt: Named, trained: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    return retraining.register(rt, {**trained, **overrides}, WINDOW)


def _gate(rt: Named, registered: dict[str, Any], world: World, holdout: str, override=None) -> tuple[dict, dict]:
    decision = retraining.evaluate_gate(rt, registered, world.sets[holdout], override)
    json.dumps(decision, allow_nan=False)  # what crosses XCom
    return decision, retraining.promote_or_reject(rt, decision, "test")


def _champion(rt: Named, world: World, model: str = "good") -> str:
    registered = _register(rt, world.models[model])
    decision, _ = _gate(rt, registered, world, "clean")
    assert decision["outcome"] == "promote", decision["reason"]
    return registered["version"]


def _tags(rt: Named, version: str) -> dict[str, str]:
    return rt.client.get_model_version(rt.model_name, version).tags


def _kept(rt: Named, champion: str | None, decision: dict, action: dict, outcome: str) -> None:
    assert decision["outcome"] == outcome, decision["reason"]
    assert action["action"] == "rejected"
    assert alias_version(rt.client, rt.model_name, CHAMPION) == champion
    tags = _tags(rt, decision["candidate_version"])
    assert tags["closedloop.status"] == "rejected" and tags["closedloop.decision"] == outcome


def test_an_inverted_window_is_labels_suspect_not_a_promotion(world, reliability):
    """The reported case: inverted labels make the champion look far below chance on the holdout."""
    rt = world.named("inverted_window")
    champion = _champion(rt, world)
    registered = _register(rt, world.models["inverted"])
    decision, action = _gate(rt, registered, world, "inverted")
    _kept(rt, champion, decision, action, "labels_suspect")
    assert decision["candidate"]["roc_auc"] > 0.8 and decision["champion"]["roc_auc"] < 0.2  # the old trap
    assert "the champion scores below chance" in decision["reason"]
    assert "the holdout's labels" in decision["reason"]  # its share (about 99 %) is out of the band too
    assert "closedloop.gate.labels_suspect" in _tags(rt, registered["version"])
    alert = gate_alert(action)
    assert alert["kind"] == "labels_suspect" and alert["severity"] == "error"
    reliability.record("labels", "the window's labels inverted (training and holdout)",
                       f"labels_suspect: the champion scores below chance and the holdout's share is out of "
                       f"the contract's band; an error alert; champion v{champion} kept")


def test_the_operator_override_is_recorded_with_who_and_why(world, reliability):
    rt = world.named("inverted_override")
    champion = _champion(rt, world)
    registered = _register(rt, world.models["inverted"])
    override = {"by": "alice", "why": "the label semantics really flipped on 2026-03-01 (ticket 42)"}
    decision, action = _gate(rt, registered, world, "inverted", override)
    assert decision["outcome"] == "promote" and action["action"] == "promoted", decision["reason"]
    assert "labels_override by alice" in decision["reason"]
    tags = _tags(rt, registered["version"])
    assert tags["closedloop.gate.override_by"] == "alice" and "ticket 42" in tags["closedloop.gate.override_why"]
    assert "champion scores below chance" in tags["closedloop.gate.labels_suspect"]
    assert "labels_override by alice" in history(rt.client, rt.model_name, limit=1)[0]["reason"]
    reliability.record("labels", "inverted window promoted on purpose (labels_override {by, why} in the run "
                       "configuration)", f"promoted over v{champion}, the override and the overridden "
                       "suspicions on the version and in the history")


def test_a_candidate_trained_on_inverted_labels_is_suspect_on_an_honest_holdout(world, reliability):
    rt = world.named("inverted_training")
    champion = _champion(rt, world)
    registered = _register(rt, world.models["inverted"])
    decision, action = _gate(rt, registered, world, "clean")
    _kept(rt, champion, decision, action, "labels_suspect")
    assert "the candidate scores below chance" in decision["reason"]
    reliability.record("labels", "candidate trained on inverted labels, judged on an honest holdout",
                       f"labels_suspect: the candidate scores below chance; champion v{champion} kept")


def test_forcing_a_suspect_version_by_hand_is_recorded(world, reliability):
    rt = world.named("forced")
    champion = _champion(rt, world)
    registered = _register(rt, world.models["inverted"])
    _gate(rt, registered, world, "inverted")
    result = promote_manually(rt.client, rt.settings, rt.model_name, registered["version"],
                              reason="labels really inverted, checked with the fraud team", actor="bob", force=True)
    assert "[forced: the gate found the labels suspect]" in result.reason
    tags = _tags(rt, registered["version"])
    assert tags["closedloop.forced_by"] == "bob" and "fraud team" in tags["closedloop.forced_reason"]
    assert history(rt.client, rt.model_name, limit=1)[0]["actor"] == "bob"
    reliability.record("labels", "a labels_suspect version promoted by hand (`closedloop promote --force`)",
                       f"moved from v{champion} only with --force; who and why on the version and in the history")


@pytest.mark.parametrize("champion_first", [True, False], ids=["champion", "no-champion"])
def test_shuffled_labels_are_insufficient_evidence(world, champion_first, reliability):
    rt = world.named(f"shuffled_{champion_first}")
    champion = _champion(rt, world) if champion_first else None
    registered = _register(rt, world.models["shuffled"])
    decision, action = _gate(rt, registered, world, "shuffled")
    _kept(rt, champion, decision, action, "insufficient_evidence")
    assert "reaches chance" in decision["reason"]
    against = f"against champion v{champion}" if champion else "with no champion yet (the first-champion rule)"
    reliability.record("labels", f"the window's labels shuffled (unrelated to the inputs), {against}",
                       "insufficient_evidence: no model beats chance on the holdout; nothing promoted")


def test_labels_of_another_window_are_insufficient_evidence(world, reliability):
    rt = world.named("foreign")
    champion = _champion(rt, world)
    registered = _register(rt, world.models["good"], lineage_key="foreign-holdout")
    decision, action = _gate(rt, registered, world, "foreign")
    _kept(rt, champion, decision, action, "insufficient_evidence")
    reliability.record("labels", "the holdout's rows carry the labels of another window's rows",
                       f"insufficient_evidence: neither model beats chance on them; champion v{champion} kept")


@pytest.mark.parametrize("holdout, case, needle", [
    ("one_class", "a holdout with one class only (no positives)", "undefined on the holdout"),
    ("handful", "a holdout with 3 positives", "holdout has 3 positives"),
    ("tiny", "a tiny holdout (40 rows, 1 positive)", "reaches chance"),
])
def test_near_empty_holdouts_are_insufficient_evidence(world, holdout, case, needle, reliability):
    rt = world.named(f"near_empty_{holdout}")
    champion = _champion(rt, world)
    registered = _register(rt, world.models["good"], lineage_key=f"near-empty-{holdout}")
    decision, action = _gate(rt, registered, world, holdout)
    _kept(rt, champion, decision, action, "insufficient_evidence")
    assert needle in decision["reason"]
    if holdout == "one_class":  # undefined metrics are explicit: None, with the reason
        assert decision["candidate"]["roc_auc"] is None
        assert decision["candidate"]["undefined"]["roc_auc"] == "one class only in the labels"
    reliability.record("labels", case, f"insufficient_evidence; champion v{champion} kept; no NaN reaches XCom")


def test_a_gone_champion_and_an_inverted_window_do_not_let_the_floor_promote(world, reliability):
    """With the champion's artifacts deleted, the candidate is judged alone against the floor: an inverted
    window's candidate scores 0.9+ on its own inverted holdout, and only the label checks stop it."""
    import mlflow

    rt = world.named("gone_champion")
    copy = world.tmp / "gone-champion"
    shutil.copytree(mlflow.artifacts.download_artifacts(artifact_uri=world.models["good"]["model_uri"],
                                                        dst_path=str(world.tmp / "gone-download")), copy)
    champion = _register(rt, world.models["good"], model_uri=str(copy), lineage_key="gone-copy")["version"]
    promote(rt.client, rt.settings, rt.model_name, champion, expected_champion=None, reason="setup", actor="test")
    shutil.rmtree(copy)
    registered = _register(rt, world.models["inverted"])
    decision, action = _gate(rt, registered, world, "inverted")
    _kept(rt, champion, decision, action, "labels_suspect")
    assert "could not be loaded" in decision["champion_problem"]
    assert decision["candidate"]["roc_auc"] > 0.6  # the floor alone would have let it in
    reliability.record("labels", "the champion's artifacts deleted and the window's labels inverted",
                       f"labels_suspect (the holdout's share is out of the band) before the floor rule; "
                       f"alias left on v{champion}")


def _label_day(world: World, n: int, positives: int) -> pd.DataFrame:
    c = world.rt.contract
    day = pd.Timestamp("2026-03-05", tz="UTC")
    y = np.zeros(n, dtype=np.int64)
    y[:positives] = 1
    return pd.DataFrame({c.row_key: [f"t{i}" for i in range(n)], c.label: y,
                         c.label_timestamp: day + pd.to_timedelta(np.arange(n), unit="s")})


@pytest.mark.parametrize("n, positives, case, blocked", [
    (1500, 1500, "a label day whose labels are all positive (inverted or stuck feed)", True),
    (1500, 1480, "a label day inverted (99 % positives)", True),
    (300, 0, "a small, honest label day of a rare class: 300 rows, no positive", False),
    (150, 150, "a tiny label day all positive, under min_rows (150 < 200)", False),
])
def test_label_days_are_judged_with_a_binomial_interval(world, n, positives, case, blocked, reliability):
    c = world.rt.contract
    result = validate_frame(_label_day(world, n, positives), c, "labels", date(2026, 3, 5))
    found = [f for f in result.blocking if f.rule == "label_share_implausible"]
    assert bool(found) is blocked and result.passed is not blocked
    outcome = ("blocked (label_share_implausible): the share's 99.9 % interval lies outside the contract's band "
               "[0.02 %, 50 %]; the day is quarantined" if blocked else
               "passes: too few rows, or an interval that reaches the band, blocks nothing")
    reliability.record("labels", case, outcome)


def test_a_label_day_delivered_twice_with_contradicting_labels_is_blocked(world, reliability):
    day = _label_day(world, 1200, 12)
    c = world.rt.contract
    twice = pd.concat([day, day.assign(**{c.label: 1 - day[c.label]})], ignore_index=True)
    result = validate_frame(twice, c, "labels", date(2026, 3, 5))
    assert not result.passed
    assert {f.rule for f in result.blocking} >= {"expect_column_values_to_be_unique"}
    reliability.record("labels", "a label day delivered twice in one file, the second copy inverted",
                       "blocked: the row key repeats (and the share is out of the band); quarantined")


def test_labels_beyond_the_grace_period_never_reach_the_window(tmp_path, monkeypatch, reliability):
    """A "correction" landing after the window's grace period (every positive of the window turned 0, as
    many negatives turned 1: the share stays plausible) is curated, but never read into that window."""
    from datetime import timedelta

    from closedloop.devtools.generate import generate
    from closedloop.stages.features import read_labelled_window
    from closedloop.stages.ingest import ingest_window

    monkeypatch.setenv("CLOSEDLOOP_HOME", str(tmp_path / "closedloop"))
    rt = Runtime.from_env()
    c = rt.contract
    start, end, grace = date(2026, 4, 1), date(2026, 4, 5), 3
    generate(GeneratorConfig(start=start, days=12, customers=150, transactions_per_day=300, seed=2), rt.lake, c)
    ingest_window(rt.lake, c, start, end, label_grace_days=grace, with_lookback=False)
    honest, _, _ = read_labelled_window(rt.lake, c, start, end, grace)
    late_day = end + timedelta(days=grace + 2)
    uri = rt.lake.partition("landing", "labels", late_day)
    landed = rt.lake.read_parquet(uri)
    y = honest[c.label].to_numpy()
    flipped = np.concatenate([np.flatnonzero(y == 1), np.flatnonzero(y == 0)[: int(y.sum())]])
    correction = pd.DataFrame({c.row_key: honest[c.row_key].to_numpy()[flipped], c.label: 1 - y[flipped],
                               c.label_timestamp: pd.Timestamp(late_day, tz="UTC") + pd.Timedelta(hours=1)})
    rt.lake.write_parquet(pd.concat([landed[~landed[c.row_key].isin(correction[c.row_key])], correction],
                                    ignore_index=True), uri)
    ingest_window(rt.lake, c, start, late_day + timedelta(days=1), label_grace_days=0, with_lookback=False)

    within, _, _ = read_labelled_window(rt.lake, c, start, end, grace)
    assert within[c.label].tolist() == honest[c.label].tolist()  # the correction is beyond the grace period
    wider, _, _ = read_labelled_window(rt.lake, c, start, end, grace + 5)  # the test can fail: a wider grace reads it
    seen = wider.set_index(c.row_key)[c.label]
    assert (seen.loc[correction[c.row_key]].to_numpy() == correction[c.label].to_numpy()).all()
    reliability.record("labels", "labels of a window landing after its grace period (a late 'correction' that "
                       "inverts its positives)", "never read into the window's training set (curated, but dated "
                       "beyond window end + label_grace_days); the window's labels unchanged")

