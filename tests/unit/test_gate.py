"""The gate's decision rule, case by case."""

from __future__ import annotations

import pytest

from closedloop.gate import INSUFFICIENT, PROMOTE, REJECT, decide

POLICY = {"primary_metric": "roc_auc", "margin": 0.002, "guards": {"pr_auc": 0.02, "log_loss": 0.01},
          "min_holdout_positives": 20}
CHAMP = {"roc_auc": 0.90, "pr_auc": 0.50, "log_loss": 0.05, "positives": 100}


def _cand(**kw):
    return {**CHAMP, **kw}


@pytest.mark.parametrize(
    ("candidate", "champion", "outcome", "why"),
    [
        (_cand(), None, PROMOTE, "no champion"),
        (_cand(roc_auc=0.91), CHAMP, PROMOTE, "exceeds the margin"),
        (_cand(), CHAMP, REJECT, "does not exceed"),  # a tie is not a win
        (_cand(roc_auc=0.902), CHAMP, REJECT, "does not exceed"),  # exactly the margin is not enough
        (_cand(roc_auc=0.85), CHAMP, REJECT, "does not exceed"),
        (_cand(roc_auc=0.95, pr_auc=0.45), CHAMP, REJECT, "guard pr_auc"),
        (_cand(roc_auc=0.95, log_loss=0.07), CHAMP, REJECT, "guard log_loss"),
        (_cand(roc_auc=0.95, pr_auc=0.49, log_loss=0.055), CHAMP, PROMOTE, "guards within tolerance"),
        (_cand(roc_auc=0.99, positives=5), CHAMP, INSUFFICIENT, "fewer than the 20"),
        (_cand(roc_auc=float("nan")), CHAMP, INSUFFICIENT, "undefined"),
    ],
)
def test_decide(candidate, champion, outcome, why):
    d = decide(candidate, champion, POLICY, candidate_version="2", champion_version="1" if champion else None)
    assert d.outcome == outcome
    assert why in d.reason
    assert d.promote == (outcome == PROMOTE)
    assert d.to_dict()["candidate_version"] == "2"


def test_lower_is_better_metric_as_primary():
    policy = {**POLICY, "primary_metric": "log_loss", "guards": {}}
    better = decide(_cand(log_loss=0.04), CHAMP, policy, candidate_version="2", champion_version="1")
    worse = decide(_cand(log_loss=0.06), CHAMP, policy, candidate_version="2", champion_version="1")
    assert better.outcome == PROMOTE and worse.outcome == REJECT
