"""Label sanity from the contract, explicit metrics, JSON-safe task results."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from closedloop.core.errors import ContractError
from closedloop.core.labels import ShareBand, judge_share, parse_share_band, wilson_interval
from closedloop.core.metrics import classification_metrics, explicit_metrics, json_safe
from closedloop.core.schema import load_contract
from closedloop.core.settings import DEFAULT_CONFIG, REPO_ROOT, Config
from closedloop.stages.gate import LABELS_SUSPECT, Scores, decide

BAND = ShareBand(block=(0.0002, 0.5), warn=(0.0005, 0.1), min_rows=200, confidence=0.999)


def test_wilson_interval_matches_the_textbook_formula():
    lo, hi = wilson_interval(10, 100, 0.95)
    assert lo == pytest.approx(0.0552, abs=1e-3) and hi == pytest.approx(0.1744, abs=1e-3)
    assert wilson_interval(0, 0, 0.95) == (0.0, 1.0)
    assert wilson_interval(0, 300, 0.999)[0] == 0.0


@pytest.mark.parametrize("positives, rows, level", [
    (15, 1500, "ok"),          # 1 %: honest
    (0, 300, "ok"),            # a small honest day of a rare class: the interval reaches the band
    (0, 2000, "warn"),         # no positive in 2000 rows: below the warning band, not surely below the blocking one
    (1480, 1500, "block"),     # inverted
    (150, 150, "ok"),          # all positive but fewer than min_rows: not judged
    (600, 2000, "warn"),       # 30 %: unusual, not impossible
    (1100, 2000, "block"),     # 55 %: surely above 50 %
])
def test_the_share_is_judged_with_an_interval_and_a_minimum_row_count(positives, rows, level):
    verdict = judge_share(positives, rows, BAND)
    assert verdict.level == level, verdict.message
    json.dumps(verdict.to_dict(), allow_nan=False)


def test_shipped_schemas_declare_their_expected_share():
    for path in (REPO_ROOT / "models/card_fraud/schema.yaml", REPO_ROOT / "models/churn/schema.yaml",
                 REPO_ROOT / "examples/flights/schema.yaml"):
        band = load_contract(path).label_share
        assert band is not None and band.block and band.warn and band.block[0] <= band.warn[0], path


@pytest.mark.parametrize("spec, message", [
    ({"block": [0.5, 0.1]}, "not a band of shares"),
    ({"block": "wide"}, "write the band as [low, high]"),
    ({"block": [0.01, 0.2], "warn": [0.001, 0.1]}, "must lie inside the blocking band"),
    ({"blok": [0.01, 0.2]}, "unknown key(s) ['blok']"),
    ({"block": [0.01, 0.2], "confidence": 1.5}, "confidence=1.5"),
])
def test_a_bad_expected_share_is_refused_with_its_key(spec, message):
    with pytest.raises(ContractError, match=r"label\.expected_share") as err:
        parse_share_band({"expected_share": spec}, {}, "schema.yaml")
    assert message in str(err.value)


def test_older_schemas_keep_their_warning_shares_and_block_nothing():
    band = parse_share_band({}, {"warn": {"min_positive_share": 0.001, "max_positive_share": 0.3}}, "s.yaml")
    assert band.block is None and band.warn == (0.001, 0.3)
    assert judge_share(2000, 2000, band).level == "warn"


def test_undefined_metrics_are_none_with_a_reason():
    m = classification_metrics(np.zeros(50), np.linspace(0, 1, 50), 0.5)
    assert math.isnan(m["roc_auc"])
    out = explicit_metrics(m)
    assert out["roc_auc"] is None and out["undefined"]["roc_auc"] == "one class only in the labels"
    assert out["undefined"]["recall_at_fpr"] == "no positive labels" and out["log_loss"] == m["log_loss"]
    safe = json_safe({"metrics": m, "x": [float("inf"), np.float32(1.5), np.int64(3)]})
    assert safe["x"] == [None, 1.5, 3] and safe["metrics"]["pr_auc"] is None
    json.dumps(safe, allow_nan=False)


def test_a_non_finite_task_result_fails_at_once_instead_of_being_retried():
    from airflow.sdk.exceptions import AirflowFailException

    from closedloop.adapters.airflow.orchestration import non_finite, run_stage

    assert non_finite({"a": [1.0, {"b": float("nan")}]}) == ["result['a'][1]['b']"]
    with pytest.raises(AirflowFailException, match=r"non-finite number\(s\) at result\['m'\]"):
        run_stage(lambda: {"m": float("nan")})
    assert run_stage(lambda: {"m": None}) == {"m": None}


def _policy():
    return Config.load(DEFAULT_CONFIG).typed.gate


def test_the_gate_distrusts_a_model_far_below_chance_and_the_override_says_who():
    rng = np.random.default_rng(0)
    y = (rng.random(4000) < 0.03).astype(int)
    good = np.clip(0.2 + 0.5 * y + rng.normal(0, 0.15, len(y)), 0.001, 0.999)
    cand_m, champ_m = classification_metrics(y, good, 0.5), classification_metrics(y, 1 - good, 0.5)
    args = {"candidate_version": "2", "champion_version": "1", "scores": Scores(y, good, 1 - good)}
    d = decide(cand_m, champ_m, _policy(), **args)
    assert d.outcome == LABELS_SUSPECT and "the champion scores below chance" in d.reason
    forced = decide(cand_m, champ_m, _policy(), override={"by": "alice", "why": "relationship inverted"}, **args)
    assert forced.outcome == "promote" and "labels_override by alice: relationship inverted" in forced.reason
    assert forced.to_dict()["override"] == {"by": "alice", "why": "relationship inverted"}


def test_a_holdout_share_out_of_the_band_is_suspect_even_without_scores():
    y = np.ones(1000, dtype=int)
    y[:10] = 0
    scores = np.linspace(0, 1, 1000)
    m = classification_metrics(y, scores, 0.5)
    d = decide(m, m, _policy(), candidate_version="2", champion_version="1",
               label_checks=[judge_share(int(y.sum()), len(y), BAND, "the holdout's labels")])
    assert d.outcome == LABELS_SUSPECT and "the holdout's labels: 990 positive(s)" in d.reason


def test_a_runconf_override_needs_who_and_why():
    from closedloop.core.errors import ConfigError
    from closedloop.core.runconf import labels_override

    assert labels_override({"window_start": None}) is None
    assert labels_override({"labels_override": {"by": " alice ", "why": "the label meaning flipped"}}) == {
        "by": "alice", "why": "the label meaning flipped"}
    with pytest.raises(ConfigError, match="labels_override"):
        labels_override({"labels_override": {"by": "alice"}})
