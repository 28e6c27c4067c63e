"""Behaviour of a small trained model: learns the signal, respects its threshold, handles the unknown."""

from __future__ import annotations

from datetime import date

import numpy as np
import pytest
import xgboost as xgb

from closedloop.core.settings import Settings
from closedloop.devtools.generate import GeneratorConfig, simulate
from closedloop.stages.aggregates import compute_entity_features
from closedloop.stages.features import time_split
from closedloop.stages.training import choose_device, feature_frame, fit, predict

CONFIG = {
    "params": {"objective": "binary:logistic", "eval_metric": ["aucpr", "logloss"], "tree_method": "hist",
               "max_depth": 4, "learning_rate": 0.1, "seed": 7, "nthread": 2},
    "num_boost_round": 150, "early_stopping_rounds": 20, "target_fpr": 0.01,
}


@pytest.fixture(scope="module")
def splits(contract):
    data = simulate(GeneratorConfig(start=date(2026, 1, 1), days=21, customers=400, transactions_per_day=900,
                                    seed=21), contract)
    tx = data.transactions
    feats = compute_entity_features(tx, contract)
    frame = tx.merge(feats, on=[contract.entity, contract.event_timestamp], how="left")
    return time_split(frame, contract, {"train": 0.7, "validation": 0.15, "holdout": 0.15})


@pytest.fixture(scope="module")
def trained(splits, contract):
    return fit(splits["train"], splits["validation"], contract, CONFIG, "cpu")


def test_the_model_learns_the_fraud_signal(trained, splits, contract):
    from sklearn.metrics import roc_auc_score

    booster, _ = trained
    holdout = splits["holdout"]
    assert roc_auc_score(holdout[contract.label], predict(booster, holdout, contract)) > 0.85


def test_threshold_meets_the_target_fpr_on_validation(trained, splits, contract):
    booster, threshold = trained
    val = splits["validation"]
    scores = booster.predict(xgb.DMatrix(feature_frame(val, contract)), iteration_range=(0, booster.best_iteration + 1))
    assert (scores[val[contract.label].to_numpy() == 0] >= threshold).mean() <= CONFIG["target_fpr"]


def test_training_is_deterministic(trained, splits, contract):
    again, threshold = fit(splits["train"], splits["validation"], contract, CONFIG, "cpu")
    np.testing.assert_array_equal(predict(again, splits["holdout"], contract),
                                  predict(trained[0], splits["holdout"], contract))
    assert threshold == trained[1]


def test_unknown_categories_and_missing_values_score_without_error(trained, splits, contract):
    booster, _ = trained
    odd = splits["holdout"].head(50).copy()
    odd["merchant_category"] = "crypto_exchange"
    odd["distance_from_home_km"] = np.nan
    x = feature_frame(odd, contract)
    assert x["merchant_category"].isna().all()
    scores = predict(booster, odd, contract)
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()


def test_device_is_chosen_not_assumed():
    device, why = choose_device("cpu")
    assert (device, why) == ("cpu", "CLOSEDLOOP_DEVICE=cpu")
    device, why = choose_device("auto")
    assert device in {"cpu", "cuda"} and why
    # without a GPU (this machine, CI) asking for cuda trains on the CPU and says why
    if device == "cpu":
        assert choose_device("cuda")[0] == "cpu"
    assert Settings.from_env({"CLOSEDLOOP_DEVICE": "cpu"}).device == "cpu"
