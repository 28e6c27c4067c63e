"""Tests of the pure parts of closedloop.stages.drift: the policy, the decision, the cooldown, the run id, and the
reports in the lake (with a stand-in for the Evidently snapshot; the statistics are in tests/data)."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from closedloop.core.errors import ConfigError
from closedloop.core.lake import Lake
from closedloop.core.settings import DEFAULT_CONFIG, Config
from closedloop.stages.drift import (
    DriftDecision,
    DriftFigures,
    DriftPolicy,
    decide,
    in_cooldown,
    list_reports,
    prune_reports,
    save_report,
    trigger_run_id,
)

FEATURES = ["amount", "merchant_category", "channel", "hour_of_day", "distance_from_home_km",
            "merchant_risk_score", "is_foreign", "card_age_days", "credit_limit", "txn_count_1d"]  # 10


# The catalogue below is written for these values (the repo's configuration may move on: it has its own test).
TEST_POLICY = {
    "window_days": 2, "min_rows": 1000, "sample_rows": 100_000,
    "numeric_stattest": "wasserstein", "numeric_threshold": 0.1,
    "categorical_stattest": "jensenshannon", "categorical_threshold": 0.1,
    "drift_share_threshold": 0.3, "key_features": {"amount": 0.1, "merchant_risk_score": 0.1},
    "prediction_threshold": 0.1, "quality_drop": 0.05, "min_labelled_positives": 20,
    "cooldown_hours": 24, "keep_reports": 30,
}


@pytest.fixture(scope="module")
def policy() -> DriftPolicy:
    return DriftPolicy.from_config(TEST_POLICY)


def figures(*, rows: int = 5000, reference_rows: int = 5000, drifted: tuple[str, ...] = (),
            share: float | None = None, scores: dict[str, float] | None = None,
            prediction: dict | None = None, quality: dict | None = None) -> DriftFigures:
    """Figures over FEATURES: every score 0.02 unless given; ``drifted`` features at 0.5."""
    scores = dict(scores or {})
    per_feature = {}
    for name in FEATURES:
        score = scores.get(name, 0.5 if name in drifted else 0.02)
        per_feature[name] = {"stattest": "wasserstein", "score": score, "threshold": 0.1,
                             "drifted": name in drifted}
    return DriftFigures(reference_rows=reference_rows, current_rows=rows, sampled_rows=min(rows, 100_000),
                        per_feature=per_feature, drift_share=len(drifted) / len(FEATURES) if share is None else share,
                        drifted_features=list(drifted), prediction=prediction, quality=quality)


def pred(score: float, drifted: bool) -> dict:
    return {"stattest": "wasserstein", "score": score, "threshold": 0.1, "drifted": drifted}


def qual(drop: float | None, positives: int = 50, reference: float = 0.95) -> dict:
    roc = None if drop is None else reference - drop
    return {"rows": 5000, "positives": positives, "roc_auc": roc, "pr_auc": 0.5, "reference_roc_auc": reference,
            "drop": drop}


# -- the policy from the configuration ---------------------------------------------------------------------
def test_policy_from_the_repo_config() -> None:
    raw = Config.load(DEFAULT_CONFIG).raw["monitoring"]
    policy = DriftPolicy.from_config(raw)
    fields = {f.name for f in dataclasses.fields(DriftPolicy)}
    for key, value in raw.items():
        if key in fields:
            assert getattr(policy, key) == value, key
    assert set(policy.key_features) <= {"amount", "merchant_risk_score", "merchant_category"} | set(FEATURES)
    assert isinstance(policy.min_rows, int) and isinstance(policy.cooldown_hours, float)


def test_policy_key_features_are_model_features(policy: DriftPolicy, contract) -> None:
    policy.check_features(contract)
    bad = dataclasses.replace(policy, key_features={"amount": 0.1, "no_such_feature": 0.1})
    with pytest.raises(ConfigError, match="no_such_feature"):
        bad.check_features(contract)


@pytest.mark.parametrize(("change", "message"), [
    ({"min_rows": None}, "missing required key 'min_rows'"),
    ({"numeric_threshold": "high"}, "numeric_threshold"),
    ({"drift_share_threshold": 1.5}, "drift_share_threshold"),
    ({"min_rows": 10.5}, "whole number"),
    ({"quality_drop": True}, "quality_drop"),
    ({"numeric_stattest": ""}, "numeric_stattest"),
    ({"key_features": ["amount"]}, "key_features"),
    ({"key_features": {"amount": -0.1}}, "key_features.amount"),
    ({"keep_reports": 0}, "keep_reports"),
])
def test_policy_refuses_bad_config(change: dict, message: str) -> None:
    cfg = dict(Config.load(DEFAULT_CONFIG).raw["monitoring"])
    for key, value in change.items():
        if value is None:
            del cfg[key]
        else:
            cfg[key] = value
    with pytest.raises(ConfigError, match=message):
        DriftPolicy.from_config(cfg)


def test_policy_refuses_a_non_mapping() -> None:
    with pytest.raises(ConfigError, match="mapping"):
        DriftPolicy.from_config(["min_rows", 1000])  # type: ignore[arg-type]


# -- the decision ----------------------------------------------------------------------------------------------
# (id, figures, judged, drift, rules fired)
CATALOGUE = [
    ("quiet", figures(), True, False, []),
    ("share-at-threshold", figures(drifted=("hour_of_day", "is_foreign", "credit_limit")), True, True,
     ["drift_share"]),
    ("share-just-below", figures(drifted=("hour_of_day", "is_foreign", "credit_limit"), share=0.2999), True, False,
     []),
    ("share-above", figures(drifted=("hour_of_day", "is_foreign", "credit_limit", "channel")), True, True,
     ["drift_share"]),
    ("two-of-ten-features", figures(drifted=("hour_of_day", "channel")), True, False, []),
    ("key-at-threshold", figures(scores={"amount": 0.1}), True, True, ["key_feature:amount"]),
    ("key-just-below", figures(scores={"amount": 0.0999}), True, False, []),
    ("key-far-above", figures(scores={"merchant_risk_score": 0.4}), True, True, ["key_feature:merchant_risk_score"]),
    ("non-key-feature-alone", figures(drifted=("card_age_days",)), True, False, []),
    ("prediction-drifted", figures(prediction=pred(0.15, True)), True, True, ["prediction"]),
    ("prediction-stable", figures(prediction=pred(0.099, False)), True, False, []),
    ("quality-drop", figures(quality=qual(0.2)), True, True, ["quality"]),
    ("quality-drop-just-above", figures(quality=qual(0.0501)), True, True, ["quality"]),
    ("quality-drop-at-threshold", figures(quality=qual(0.05)), True, False, []),
    ("quality-drop-few-positives", figures(quality=qual(0.3, positives=19)), True, False, []),
    ("quality-drop-enough-positives", figures(quality=qual(0.3, positives=20)), True, True, ["quality"]),
    ("quality-gain", figures(quality=qual(-0.02)), True, False, []),
    ("quality-one-class", figures(quality=qual(None)), True, False, []),
    ("everything", figures(drifted=("amount", "merchant_risk_score", "channel", "hour_of_day"),
                           prediction=pred(0.3, True), quality=qual(0.2)), True, True,
     ["drift_share", "key_feature:amount", "key_feature:merchant_risk_score", "prediction", "quality"]),
    ("too-few-rows", figures(rows=999, drifted=tuple(FEATURES)), False, False, []),
    ("min-rows-exactly", figures(rows=1000, scores={"amount": 0.5}), True, True, ["key_feature:amount"]),
    ("reference-too-small", figures(reference_rows=500, scores={"amount": 0.5}), False, False, []),
    ("empty-window", figures(rows=0), False, False, []),
]


@pytest.mark.parametrize(("figs", "judged", "drift", "fired"), [c[1:] for c in CATALOGUE],
                         ids=[c[0] for c in CATALOGUE])
def test_decide_catalogue(policy: DriftPolicy, figs: DriftFigures, judged: bool, drift: bool,
                          fired: list[str]) -> None:
    decision = decide(figs, policy)
    assert (decision.judged, decision.drift, decision.fired) == (judged, drift, fired)
    assert decision.reasons and all(isinstance(r, str) and r for r in decision.reasons)
    json.dumps(decision.to_dict())
    if drift:
        assert decision.reasons[0].startswith("drift: ")
    elif judged:
        assert decision.reasons[0] == "no drift: no rule fired"


def test_not_judged_says_why_with_the_figures(policy: DriftPolicy) -> None:
    decision = decide(figures(rows=999), policy)
    assert not decision.judged and not decision.drift and not decision.fired
    assert decision.reasons == ["not judged: the window has 999 rows, fewer than min_rows=1000"]
    ref = decide(figures(reference_rows=10), policy)
    assert "the reference has 10 rows" in ref.reasons[0]


def test_reasons_carry_the_figures(policy: DriftPolicy) -> None:
    decision = decide(figures(drifted=("hour_of_day", "is_foreign", "credit_limit"), scores={"amount": 0.123},
                              prediction=pred(0.04, False), quality=qual(0.3, positives=12)), policy)
    text = "\n".join(decision.reasons)
    assert "drift share 0.300 (3/10 features: hour_of_day, is_foreign, credit_limit) reaches" in text
    assert "key feature amount: wasserstein 0.123 reaches its threshold 0.1" in text
    assert "key feature merchant_risk_score: wasserstein 0.020 is below its threshold 0.1" in text
    assert "score distribution is stable: wasserstein 0.040" in text
    assert "12 labelled positives, fewer than min_labelled_positives=20" in text
    quiet = "\n".join(decide(figures(), policy).reasons)
    assert "is below drift_share_threshold=0.3" in quiet
    assert "prediction drift not measured" in quiet and "quality not measured: no labels" in quiet
    q = "\n".join(decide(figures(quality=qual(0.1)), policy).reasons)
    assert "ROC AUC 0.850 on 5000 labelled rows (50 positives) is 0.100 below the reference 0.950" in q


def test_key_feature_edge_cases(policy: DriftPolicy) -> None:
    figs = figures()
    del figs.per_feature["amount"]
    decision = decide(figs, policy)
    assert not decision.drift and any("key feature amount was not measured" in r for r in decision.reasons)
    # a key feature with no value left in the window (a broken feed) is drift
    figs = figures()
    figs.per_feature["amount"] = {"stattest": "wasserstein", "score": None, "threshold": 0.1, "drifted": True,
                                  "note": "no values in the current window"}
    assert decide(figs, policy).fired == ["key_feature:amount"]
    figs.per_feature["amount"]["drifted"] = False
    assert not decide(figs, policy).drift


def test_key_feature_thresholds_are_the_policy_s(policy: DriftPolicy) -> None:
    strict = dataclasses.replace(policy, key_features={"merchant_category": 0.05})
    figs = figures(scores={"merchant_category": 0.06, "amount": 0.5})
    assert decide(figs, strict).fired == ["key_feature:merchant_category"]
    assert decide(figs, policy).fired == ["key_feature:amount"]


def test_decide_is_pure(policy: DriftPolicy) -> None:
    figs = figures(drifted=("amount",), quality=qual(0.2))
    before = json.dumps(figs.to_dict(), sort_keys=True)
    assert decide(figs, policy) == decide(figs, policy)
    assert json.dumps(figs.to_dict(), sort_keys=True) == before


def test_figures_to_dict_is_json_safe() -> None:
    import numpy as np

    figs = figures(scores={"amount": np.float64(0.25)}, quality=qual(0.01))
    figs.per_feature["channel"]["score"] = float("nan")
    figs.quality["roc_auc"] = np.float32(0.9)
    d = figs.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert d["per_feature"]["channel"]["score"] is None
    assert type(d["per_feature"]["amount"]["score"]) is float
    assert math.isclose(d["quality"]["roc_auc"], 0.9, rel_tol=1e-6)
    assert DriftFigures.from_dict(json.loads(text)).per_feature == d["per_feature"]


# -- cooldown and run ids ----------------------------------------------------------------------------------------
NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("last", "expected"), [
    (None, False),
    (NOW - timedelta(hours=1), True),
    (NOW - timedelta(hours=23, minutes=59), True),
    (NOW - timedelta(hours=24), False),
    (NOW - timedelta(days=3), False),
    (NOW + timedelta(hours=2), True),                        # a trigger stamped in the future still blocks
    (datetime(2026, 3, 10, 1, 0), True),                     # naive: taken as UTC
    (datetime(2026, 3, 9, 11, 0), False),
])
def test_in_cooldown(policy: DriftPolicy, last: datetime | None, expected: bool) -> None:
    assert in_cooldown(last, NOW, policy) is expected


def test_no_cooldown_when_zero_hours(policy: DriftPolicy) -> None:
    assert not in_cooldown(NOW, NOW, dataclasses.replace(policy, cooldown_hours=0.0))


def test_trigger_run_id_is_deterministic() -> None:
    a = trigger_run_id(date(2026, 3, 1), date(2026, 3, 3))
    assert a == "drift__2026-03-01_2026-03-03"
    assert a == trigger_run_id(date(2026, 3, 1), date(2026, 3, 3))
    assert trigger_run_id(date(2026, 3, 2), date(2026, 3, 4)) != a
    with pytest.raises(ValueError, match="after the start"):
        trigger_run_id(date(2026, 3, 3), date(2026, 3, 3))
    with pytest.raises(ValueError, match="give a date"):
        trigger_run_id(datetime(2026, 3, 1), date(2026, 3, 3))  # type: ignore[arg-type]


# -- reports in the lake ---------------------------------------------------------------------------------------------
class FakeSnapshot:
    """Stands in for an Evidently snapshot: save_html writes a small page."""

    def __init__(self, text: str = "report") -> None:
        self.text = text

    def save_html(self, filename: str) -> None:
        Path(filename).write_text(f"<html><body>{self.text}</body></html>", encoding="utf-8")


@pytest.fixture
def lake(tmp_path: Path) -> Lake:
    return Lake(root="file://" + str(tmp_path / "lake"))


def test_save_report_writes_both_files(lake: Lake, policy: DriftPolicy) -> None:
    figs = figures(scores={"amount": 0.3}, quality=qual(0.01))
    decision = decide(figs, policy)
    uris = save_report(FakeSnapshot("first"), figs, decision, lake, date(2026, 3, 1), date(2026, 3, 3))
    assert uris == {"html": lake.uri("reports", "drift", "2026-03-01_2026-03-03", "report.html"),
                    "json": lake.uri("reports", "drift", "2026-03-01_2026-03-03", "figures.json")}
    assert b"first" in lake.read_bytes(uris["html"])
    doc = lake.read_json(uris["json"])
    assert doc["window"] == {"start": "2026-03-01", "end": "2026-03-03"}
    assert doc["figures"] == json.loads(json.dumps(figs.to_dict()))
    assert doc["decision"] == decision.to_dict()
    assert doc["decision"]["drift"] is True and doc["decision"]["fired"] == ["key_feature:amount"]
    # idempotent: the same window goes to the same place, overwritten
    again = save_report(FakeSnapshot("second"), figs, decision, lake, date(2026, 3, 1), date(2026, 3, 3))
    assert again == uris
    assert b"second" in lake.read_bytes(uris["html"])
    assert list_reports(lake) == [lake.uri("reports", "drift", "2026-03-01_2026-03-03")]
    files = sorted(p.rsplit("/", 1)[-1] for p in lake.fs.ls(lake.uri("reports", "drift", "2026-03-01_2026-03-03")))
    assert files == ["figures.json", "report.html"]  # no temporary files left behind


def test_decision_round_trips_through_json(policy: DriftPolicy) -> None:
    decision = decide(figures(rows=10), policy)
    assert DriftDecision(**json.loads(json.dumps(decision.to_dict()))) == decision


def test_prune_reports_keeps_the_newest(lake: Lake, policy: DriftPolicy) -> None:
    assert prune_reports(lake, 3) == []  # nothing there yet
    figs = figures()
    decision = decide(figs, policy)
    starts = [date(2026, 3, 1) + timedelta(days=2 * i) for i in range(6)]
    for start in reversed(starts):  # written out of order: age comes from the window, not the write time
        save_report(FakeSnapshot(), figs, decision, lake, start, start + timedelta(days=2))
    # entries that are not report folders are left alone
    lake.write_json(lake.uri("reports", "drift", "index.json"), {"note": "not a report"})
    lake.write_json(lake.uri("reports", "drift", "notes", "x.json"), {})
    names = [f"{s.isoformat()}_{(s + timedelta(days=2)).isoformat()}" for s in starts]
    assert list_reports(lake) == [lake.uri("reports", "drift", n) for n in names]

    deleted = prune_reports(lake, 4)
    assert deleted == [lake.uri("reports", "drift", n) for n in names[:2]]
    assert not any(lake.exists(u) for u in deleted)
    assert list_reports(lake) == [lake.uri("reports", "drift", n) for n in names[2:]]
    assert lake.exists(lake.uri("reports", "drift", "index.json"))
    assert lake.exists(lake.uri("reports", "drift", "notes", "x.json"))

    assert prune_reports(lake, 10) == []
    assert prune_reports(lake, 1) == [lake.uri("reports", "drift", n) for n in names[2:5]]
    assert list_reports(lake) == [lake.uri("reports", "drift", names[5])]
    with pytest.raises(ValueError, match="keep"):
        prune_reports(lake, -1)


def test_newest_is_by_window_end_then_start(lake: Lake, policy: DriftPolicy) -> None:
    figs = figures()
    decision = decide(figs, policy)
    windows = [(date(2026, 3, 1), date(2026, 3, 8)), (date(2026, 3, 5), date(2026, 3, 7)),
               (date(2026, 3, 6), date(2026, 3, 8))]
    for start, end in windows:
        save_report(FakeSnapshot(), figs, decision, lake, start, end)
    assert prune_reports(lake, 2) == [lake.uri("reports", "drift", "2026-03-05_2026-03-07")]
    assert prune_reports(lake, 1) == [lake.uri("reports", "drift", "2026-03-01_2026-03-08")]
