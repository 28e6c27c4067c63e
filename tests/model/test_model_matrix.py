"""The model matrix (issue 23): the vectorised ``training.model_matrix`` against the per-column pandas matrix it
replaced, and the scores of training, batch scoring and online scoring between the old and the new path.

``old_feature_frame`` is the matrix every model was trained and scored on before (a copy of the code that
``model_matrix`` replaced); the new path must give the same matrix values, the same trained model (byte for
byte) and the same score on every row.
"""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from closedloop.adapters.serving import LoadedModel, score_frame
from closedloop.core.metrics import threshold_at_fpr
from closedloop.devtools.generate import GeneratorConfig, simulate
from closedloop.stages import model as matrix
from closedloop.stages.aggregates import compute_entity_features
from closedloop.stages.features import time_split
from closedloop.stages.model import category_codes, feature_frame, model_matrix, predict, predict_inplace
from closedloop.stages.training import fit

CONFIG = {
    "params": {"objective": "binary:logistic", "eval_metric": ["aucpr", "logloss"], "tree_method": "hist",
               "max_depth": 4, "learning_rate": 0.1, "subsample": 0.9, "seed": 7, "nthread": 1},
    "num_boost_round": 60, "early_stopping_rounds": 20, "target_fpr": 0.01,
}


def old_feature_frame(frame: pd.DataFrame, contract) -> pd.DataFrame:
    """The model matrix before issue 23, verbatim: per column, categoricals through astype(string) -> object."""
    x = pd.DataFrame(index=frame.index)
    for name in contract.model_features:
        if name in contract.categorical:
            cats = contract.categorical[name]
            codes = pd.Categorical(frame[name].astype("string").astype(object), categories=list(cats)).codes
            x[name] = np.where(codes < 0, np.nan, codes).astype("float64")
        else:
            x[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    return x


def old_fit(train: pd.DataFrame, validation: pd.DataFrame, contract, config) -> tuple[xgb.Booster, float]:
    """``training.fit`` before issue 23: DMatrix of the old matrix (a float64 DataFrame)."""
    params = {**config["params"], "device": "cpu"}
    dtrain = xgb.DMatrix(old_feature_frame(train, contract), label=train[contract.label].to_numpy())
    dval = xgb.DMatrix(old_feature_frame(validation, contract), label=validation[contract.label].to_numpy())
    booster = xgb.train(params, dtrain, num_boost_round=config["num_boost_round"], evals=[(dval, "validation")],
                        early_stopping_rounds=config["early_stopping_rounds"], verbose_eval=False)
    scores = booster.predict(dval, iteration_range=(0, booster.best_iteration + 1))
    return booster, threshold_at_fpr(validation[contract.label].to_numpy(), scores, config["target_fpr"])


@pytest.fixture(scope="module")
def splits(contract):
    data = simulate(GeneratorConfig(start=date(2026, 1, 1), days=14, customers=300, transactions_per_day=700,
                                    seed=23), contract)
    tx = data.transactions
    frame = tx.merge(compute_entity_features(tx, contract), on=[contract.entity, contract.event_timestamp],
                     how="left")
    return time_split(frame, contract, {"train": 0.7, "validation": 0.15, "holdout": 0.15})


@pytest.fixture(scope="module")
def odd(splits, contract):
    """Holdout rows with what the matrix must map as before: unknown categories, missing values of every kind,
    categoricals as pandas categorical and string dtypes, numbers as text, integers, booleans, nullable types."""
    frame = splits["holdout"].copy().reset_index(drop=True)
    n = len(frame)
    rng = np.random.default_rng(5)
    cat_names = list(contract.categorical)
    first, second = cat_names[0], cat_names[-1]
    values = frame[first].astype(object).to_numpy()
    pick = rng.random(n)
    values[pick < 0.05] = "not_a_declared_category"
    values[(pick >= 0.05) & (pick < 0.08)] = None
    values[(pick >= 0.08) & (pick < 0.10)] = np.nan
    values[(pick >= 0.10) & (pick < 0.11)] = pd.NA
    # a copy of a declared category that is another object (identity-based grouping must still map it)
    values[(pick >= 0.11) & (pick < 0.13)] = "".join(list(str(contract.categorical[first][0])))
    values[(pick >= 0.13) & (pick < 0.14)] = 7  # not text at all: outside the categories, as before
    frame[first] = values
    frame[second] = frame[second].astype("category")
    if len(cat_names) > 2:
        frame[cat_names[1]] = frame[cat_names[1]].astype("string")
    numeric = [f for f in contract.model_features if f not in contract.categorical]
    as_text = frame[numeric[0]].astype(object)
    as_text[pick < 0.1] = "twelve"
    frame[numeric[0]] = as_text
    frame[numeric[1]] = frame[numeric[1]].round().astype("Int64")
    frame.loc[pick > 0.95, numeric[1]] = pd.NA
    frame[numeric[2]] = frame[numeric[2]].astype("float32")
    frame[numeric[3]] = frame[numeric[3]] > frame[numeric[3]].median()
    frame[numeric[4]] = np.arange(n, dtype=np.int64) * 104_729
    return frame


@pytest.fixture(scope="module")
def models(splits, contract):
    return (old_fit(splits["train"], splits["validation"], contract, CONFIG),
            fit(splits["train"], splits["validation"], contract, CONFIG, "cpu"))


def test_the_matrix_is_the_old_one_on_every_row(splits, odd, contract):
    for frame in (splits["train"], odd):
        old = old_feature_frame(frame, contract)
        np.testing.assert_array_equal(model_matrix(frame, contract), old.to_numpy(np.float32))
        np.testing.assert_array_equal(model_matrix(frame, contract, dtype="float64"), old.to_numpy())
        pd.testing.assert_frame_equal(feature_frame(frame, contract), old)
    x = model_matrix(odd, contract)
    assert x.dtype == np.float32 and x.flags.c_contiguous and x.shape == (len(odd), len(contract.model_features))
    first = list(contract.model_features).index(next(iter(contract.categorical)))
    assert np.isnan(x[:, first]).any() and not np.isnan(x[:, first]).all()


def test_blocks_and_threads_fill_every_cell(odd, contract, monkeypatch):
    old = old_feature_frame(odd, contract).to_numpy(np.float32)
    monkeypatch.setattr(matrix, "_BLOCK_ROWS", 97)  # many blocks, a ragged last one
    monkeypatch.setattr(matrix, "_PARALLEL_ROWS", 100)  # the threaded copy
    np.testing.assert_array_equal(model_matrix(odd, contract), old)
    np.testing.assert_array_equal(model_matrix(odd.head(1), contract), old[:1])
    assert model_matrix(odd.head(0), contract).shape == (0, len(contract.model_features))


def test_category_codes_follow_the_declared_order():
    cats = ("b", "a", "c")
    col = pd.Series(["a", "c", None, "z", "b", np.nan, "a"], dtype=object)
    np.testing.assert_array_equal(category_codes(col, cats), np.array([1, 2, np.nan, np.nan, 0, np.nan, 1],
                                                                      dtype=np.float32))
    np.testing.assert_array_equal(category_codes(col.astype("category"), cats, "float64"),
                                  category_codes(col, cats, "float64"))


def test_training_gives_the_same_model_and_threshold(models):
    (old, old_threshold), (new, new_threshold) = models
    assert new.save_raw("json") == old.save_raw("json")
    assert new.feature_names == old.feature_names and new.feature_types == old.feature_types
    assert new_threshold == old_threshold


def test_batch_scores_are_the_old_ones_on_every_row(models, splits, odd, contract):
    booster = models[0][0]
    for frame in (splits["holdout"], odd):
        old = old_feature_frame(frame, contract)
        before_batch = booster.inplace_predict(old)  # scoring.score_day before issue 23
        before_predict = booster.predict(xgb.DMatrix(old))  # training.predict before issue 23
        np.testing.assert_array_equal(predict_inplace(booster, frame, contract), before_batch)
        np.testing.assert_array_equal(predict(booster, frame, contract), before_predict)
        np.testing.assert_array_equal(before_batch, before_predict)


def test_online_scores_are_the_old_ones_on_every_row(models, odd, contract):
    booster = models[0][0]
    model = LoadedModel(name="m", alias="champion", version="1", threshold=0.5, booster=booster)
    rows = odd.head(150)  # about 20 rows of each odd kind
    old = booster.inplace_predict(old_feature_frame(rows, contract))
    online = np.concatenate([score_frame(model, rows.iloc[[i]], contract) for i in range(len(rows))])
    np.testing.assert_array_equal(online, old.astype("float64"))


def test_a_model_of_other_features_is_refused(models, splits, contract):
    booster = models[0][0].copy()
    booster.feature_names = [f"x{i}" for i in range(len(contract.model_features))]
    with pytest.raises(ValueError, match="feature_names mismatch"):
        predict_inplace(booster, splits["holdout"].head(3), contract)


class _HostArray(np.ndarray):
    """A NumPy array with CuPy's ``set`` (host -> device copy): the device assembly's logic, without a GPU."""

    def set(self, host: np.ndarray) -> None:
        self[...] = host


class _HostCupy:
    """The three CuPy calls ``_device_matrix`` makes, on host memory (this machine has no GPU; bench/gpu_train.py
    checks the real device matrix against the host one on a GPU)."""

    @staticmethod
    def empty(shape, dtype):
        return np.empty(shape, dtype=dtype).view(_HostArray)

    @staticmethod
    def ascontiguousarray(x):
        return np.ascontiguousarray(x)


@pytest.mark.parametrize("threads", [1, 3])
def test_the_device_assembly_gives_the_host_matrix(odd, contract, threads):
    columns = [category_codes(odd[n], contract.categorical[n]) if n in contract.categorical
               else matrix._numeric_values(odd[n]) for n in contract.model_features]
    x = matrix._device_matrix(_HostCupy, columns, len(odd), "float32", threads)
    assert x.flags.c_contiguous
    np.testing.assert_array_equal(x, model_matrix(odd, contract))


def test_the_request_matrix_is_model_matrix_on_what_a_request_carries(models, splits, contract):
    """Online scoring builds its matrix from the request's dicts and the fetched features without pandas
    (serving.RequestMatrix): the same values and scores as model_matrix on the same rows in a frame, for
    the values a validated request can hold (text or None categoricals, unknown categories, integers,
    booleans, floats and None numbers) and features missing in the online store."""
    from closedloop.adapters.serving import RequestMatrix, score_matrix
    from closedloop.stages.model import model_matrix

    booster = models[1][0]
    rows = splits["holdout"].head(200).reset_index(drop=True)
    request = [f for f in contract.model_features if f not in contract.entity_features]
    transactions = rows[request].astype(object).where(rows[request].notna(), None).to_dict("records")
    rng = np.random.default_rng(9)
    cats, nums = list(contract.categorical), [f for f in request if f not in contract.categorical]
    for i, t in enumerate(transactions):
        pick = rng.random()
        if pick < 0.1:
            t[cats[0]] = "not_a_declared_category"
        elif pick < 0.2:
            t[cats[-1]] = None
        elif pick < 0.3:
            t[nums[0]] = None
        elif pick < 0.4:
            t[nums[1]] = int(i)
        elif pick < 0.5:
            t[nums[-1]] = bool(i % 2)
    feats = rows[list(contract.entity_features)].to_numpy(dtype=np.float64)
    feats[::7, 0] = np.nan
    feats[::11, :] = np.nan
    frame = pd.concat([pd.DataFrame(transactions), pd.DataFrame(feats, columns=list(contract.entity_features))],
                      axis=1)
    matrix = RequestMatrix.of(contract)
    x = matrix.build(transactions, feats)
    np.testing.assert_array_equal(x, model_matrix(frame, contract))
    model = LoadedModel(name="m", alias="champion", version="1", threshold=0.5, booster=booster)
    np.testing.assert_array_equal(score_matrix(model, x, matrix.names), score_frame(model, frame, contract))
