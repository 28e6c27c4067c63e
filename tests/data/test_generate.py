"""The synthetic card-fraud generator: determinism, the data contract, realism and the drift knobs."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pytest
import yaml

from closedloop.core.errors import ConfigError
from closedloop.core.lake import Lake
from closedloop.core.schema import DataContract, load_contract
from closedloop.core.settings import REPO_ROOT
from closedloop.devtools.generate import (
    BAD_KINDS,
    NEW_CATEGORY,
    GeneratedData,
    GeneratorConfig,
    generate,
    make_bad,
    simulate,
)
from closedloop.stages.aggregates import compute_entity_features

SCHEMA = REPO_ROOT / "models/card_fraud/schema.yaml"
START = date(2024, 3, 1)
# ~17k transactions: big enough for stable rates and AUCs, small enough for a fast test
BASE = GeneratorConfig(start=START, days=21, customers=500, transactions_per_day=800, seed=7)
DRIFT_START = START + timedelta(days=14)
DRIFTING = GeneratorConfig(start=START, days=28, customers=600, transactions_per_day=1000, seed=11,
                           drift_start=DRIFT_START)


@pytest.fixture(scope="module")
def contract() -> DataContract:
    return load_contract(SCHEMA)


@pytest.fixture(scope="module")
def base(contract: DataContract) -> GeneratedData:
    return simulate(BASE, contract)


@pytest.fixture(scope="module")
def drifting(contract: DataContract) -> GeneratedData:
    return simulate(DRIFTING, contract)


# -- helpers -----------------------------------------------------------------------------------------
def _utc(d: date) -> pd.Timestamp:
    return pd.Timestamp(d, tz="UTC")


def _model_frame(tx: pd.DataFrame, contract: DataContract) -> pd.DataFrame:
    """Transactions with their customer aggregates and categoricals encoded as the contract declares."""
    feats = compute_entity_features(tx, contract)
    df = tx.merge(feats, on=[contract.entity, contract.event_timestamp], how="left", validate="many_to_one")
    assert len(df) == len(tx)
    for name, cats in contract.categorical.items():
        df[name] = pd.Categorical(df[name], categories=list(cats))
    return df


def _fit(df: pd.DataFrame, mask: pd.Series, contract: DataContract):
    import xgboost as xgb

    dtrain = xgb.DMatrix(df.loc[mask, contract.model_features], label=df.loc[mask, contract.label],
                         enable_categorical=True)
    params = {"objective": "binary:logistic", "tree_method": "hist", "max_depth": 4, "learning_rate": 0.1,
              "nthread": 2, "seed": 0, "max_cat_to_onehot": 1}
    return xgb.train(params, dtrain, num_boost_round=100)


def _auc(booster, df: pd.DataFrame, mask: pd.Series, contract: DataContract) -> float:
    import xgboost as xgb
    from sklearn.metrics import roc_auc_score

    scores = booster.predict(xgb.DMatrix(df.loc[mask, contract.model_features], enable_categorical=True))
    return float(roc_auc_score(df.loc[mask, contract.label], scores))


def _check_dtypes(frame: pd.DataFrame, declared: dict[str, str], contract: DataContract) -> None:
    assert list(frame.columns) == list(declared)
    for name, dtype in declared.items():
        s = frame[name]
        if dtype == "timestamp":
            assert str(s.dtype) == "datetime64[ns, UTC]", name
        elif dtype in {"string", "category"}:
            assert s.dtype == object or pd.api.types.is_string_dtype(s), name
            assert not isinstance(s.dtype, pd.CategoricalDtype), name
            assert s.dropna().map(type).eq(str).all(), name
            if dtype == "category":
                assert set(s.dropna()) <= set(contract.column(name).categories), name
        else:
            assert str(s.dtype) == dtype, name


# -- determinism -------------------------------------------------------------------------------------
def test_same_seed_gives_identical_frames(contract: DataContract, base: GeneratedData) -> None:
    again = simulate(BASE, contract)
    pd.testing.assert_frame_equal(base.transactions, again.transactions, check_exact=True)
    pd.testing.assert_frame_equal(base.labels, again.labels, check_exact=True)


def test_different_seed_gives_different_frames(contract: DataContract, base: GeneratedData) -> None:
    other = simulate(replace(BASE, seed=BASE.seed + 1), contract).transactions
    assert not other.equals(base.transactions)
    n = min(len(other), len(base.transactions))
    assert not np.allclose(other["amount"].to_numpy()[:n], base.transactions["amount"].to_numpy()[:n])


# -- the contract ------------------------------------------------------------------------------------
def test_frames_follow_the_contract(contract: DataContract, base: GeneratedData) -> None:
    tx = base.transactions
    declared = {**contract.landing_columns, contract.label: "int64", contract.label_timestamp: "timestamp"}
    _check_dtypes(tx, declared, contract)
    _check_dtypes(base.labels, contract.label_columns, contract)
    assert tx[contract.row_key].is_unique
    assert tx[contract.row_key].str.fullmatch(r"t\d+").all()
    assert set(tx[contract.label].unique()) <= set(contract.label_values)
    for col in contract.columns:
        if not col.nullable:
            assert tx[col.name].notna().all(), col.name
        lo, hi = col.block.get("min"), col.block.get("max")
        if lo is not None:
            assert tx[col.name].min() >= lo, col.name
        if hi is not None:
            assert tx[col.name].max() <= hi, col.name
    ts = tx[contract.event_timestamp]
    assert ts.is_monotonic_increasing
    assert ts.min() > _utc(BASE.start) and ts.max() < _utc(BASE.end)
    assert (ts.dt.hour == tx["hour_of_day"]).all()
    assert set(base.labels[contract.row_key]) == set(tx[contract.row_key])


def test_label_delays_and_rates(contract: DataContract, base: GeneratedData) -> None:
    tx = base.transactions
    y = tx[contract.label]
    assert 0.005 <= y.mean() <= 0.02
    delay_days = (tx[contract.label_timestamp] - tx[contract.event_timestamp]).dt.total_seconds() / 86400
    assert delay_days[y == 0].between(1, 7).all()
    assert delay_days[y == 1].between(2, 25).all()
    assert delay_days[y == 1].median() > delay_days[y == 0].median()


def test_nulls_only_where_nullable_and_rare(contract: DataContract, base: GeneratedData) -> None:
    tx = base.transactions
    for col in contract.columns:
        share = tx[col.name].isna().mean()
        if col.nullable and col.name in {"distance_from_home_km", "merchant_risk_score"}:
            assert 0.003 <= share <= 0.03, col.name
        else:
            assert share == 0.0, col.name


def test_write_landing_partitions(tmp_path, contract: DataContract) -> None:
    config = replace(BASE, days=5, customers=300, transactions_per_day=400)
    lake = Lake(root="file://" + str(tmp_path))
    data = simulate(config, contract)
    uris = generate(config, lake, contract)
    assert len(uris) == len(set(uris))

    event_days = lake.list_days("landing", "transactions")
    assert event_days == [config.start + timedelta(days=i) for i in range(config.days)]
    parts = []
    for day in event_days:
        uri = lake.partition("landing", "transactions", day)
        assert uri in uris
        part = lake.read_parquet(uri)
        _check_dtypes(part, contract.landing_columns, contract)  # no label columns
        ts = part[contract.event_timestamp]
        assert (ts > _utc(day)).all() and (ts < _utc(day + timedelta(days=1))).all()
        parts.append(part)
    landed = pd.concat(parts, ignore_index=True)
    assert landed[contract.row_key].is_unique
    expected = data.transactions[list(contract.landing_columns)]
    pd.testing.assert_frame_equal(landed, expected, check_exact=True)

    label_days = lake.list_days("landing", "labels")
    assert label_days[-1] > event_days[-1]  # labels keep arriving after the last event day
    labels = []
    for day in label_days:
        part = lake.read_parquet(lake.partition("landing", "labels", day))
        _check_dtypes(part, contract.label_columns, contract)
        assert (part[contract.label_timestamp].dt.floor("D") == _utc(day)).all()
        labels.append(part)
    labels = pd.concat(labels, ignore_index=True)
    assert labels[contract.row_key].is_unique
    assert set(labels[contract.row_key]) == set(landed[contract.row_key])  # every label has its event
    assert len(uris) == len(event_days) + len(label_days)


# -- realism -----------------------------------------------------------------------------------------
def test_fraud_looks_different_but_not_separable(base: GeneratedData, contract: DataContract) -> None:
    tx = base.transactions
    fraud, legit = tx[tx[contract.label] == 1], tx[tx[contract.label] == 0]
    assert fraud["amount"].median() > 1.5 * legit["amount"].median()
    assert fraud["is_foreign"].mean() > 3 * legit["is_foreign"].mean()
    assert (fraud["channel"] == "online").mean() > (legit["channel"] == "online").mean()
    night = tx["hour_of_day"] < 6
    assert night[fraud.index].mean() > 2 * night[legit.index].mean()
    # noisy: legitimate transactions are foreign, at night and large too
    assert legit["is_foreign"].sum() > len(fraud) and night[legit.index].sum() > len(fraud)
    # fewer transactions at night than during the day
    assert night.mean() < 6 / 24


def test_baseline_is_learnable_but_noisy(base: GeneratedData, contract: DataContract) -> None:
    df = _model_frame(base.transactions, contract)
    cut = _utc(BASE.start + timedelta(days=int(BASE.days * 0.7)))
    train = df[contract.event_timestamp] < cut
    assert df.loc[~train, contract.label].sum() >= 30
    auc = _auc(_fit(df, train, contract), df, ~train, contract)
    # measured 0.94 for this seed and 0.89-0.98 over seeds 0-9 of this configuration (about 0.96 with
    # 90k rows): a learnable but noisy label; the band leaves a margin on both sides
    assert 0.80 <= auc <= 0.99


# -- drift knobs -------------------------------------------------------------------------------------
def _pre(tx: pd.DataFrame, contract: DataContract) -> pd.DataFrame:
    return tx[tx[contract.event_timestamp] < _utc(DRIFT_START)].reset_index(drop=True)


def _post(tx: pd.DataFrame, contract: DataContract) -> pd.DataFrame:
    return tx[tx[contract.event_timestamp] >= _utc(DRIFT_START)].reset_index(drop=True)


def test_drift_knobs_leave_earlier_days_alone(contract: DataContract, drifting: GeneratedData) -> None:
    knobs = replace(DRIFTING, covariate_drift=0.5, new_categories=True, concept_drift=1.0)
    drifted = simulate(knobs, contract).transactions
    pd.testing.assert_frame_equal(_pre(drifted, contract), _pre(drifting.transactions, contract))
    assert not _post(drifted, contract).equals(_post(drifting.transactions, contract))


def test_no_drift_without_drift_start(contract: DataContract, drifting: GeneratedData) -> None:
    knobs = replace(DRIFTING, drift_start=None, covariate_drift=0.5, new_categories=True, concept_drift=1.0)
    pd.testing.assert_frame_equal(simulate(knobs, contract).transactions, drifting.transactions)


@pytest.mark.parametrize("structure", [0.0, 1.0])
def test_covariate_drift_scales_amounts(contract: DataContract, structure: float) -> None:
    """Without structure the days are independent draws, so the period before drift_start is the
    baseline; with it (the default) the day factor moves two-week means too (measured: the no-drift
    run's mean amount after drift_start is 0.87 of the one before), so the baseline is the same period
    of the same seed without the knob."""
    x = 0.5
    base = simulate(replace(DRIFTING, structure=structure), contract).transactions
    tx = simulate(replace(DRIFTING, covariate_drift=x, structure=structure), contract).transactions
    pre, post = _pre(tx, contract), _post(tx, contract)
    if structure == 0.0:
        base_ratio = _post(base, contract)["amount"].mean() / pre["amount"].mean()
        assert 0.9 <= base_ratio <= 1.1
        baseline = pre
    else:
        pd.testing.assert_frame_equal(_pre(base, contract), pre)  # the knob leaves the days before it alone
        baseline = _post(base, contract)
    ratio = post["amount"].mean() / baseline["amount"].mean()
    assert (1 + x) * 0.9 <= ratio <= (1 + x) * 1.1
    dist = post["distance_from_home_km"].median() / baseline["distance_from_home_km"].median()
    assert (1 + x) * 0.85 <= dist <= (1 + x) * 1.15
    online_base, online_post = (baseline["channel"] == "online").mean(), (post["channel"] == "online").mean()
    assert online_post > online_base + 0.1
    # the hour profile moves later: a clear change in its distribution (with structure, on Monday to Thursday,
    # whose hours the weekend's late nights leave alone: measured 0.108 there, 0.098 over all days)
    if structure:
        baseline = baseline[baseline[contract.event_timestamp].dt.dayofweek < 4]
        post = post[post[contract.event_timestamp].dt.dayofweek < 4]
    hours_base = baseline["hour_of_day"].value_counts(normalize=True).sort_index()
    hours_post = post["hour_of_day"].value_counts(normalize=True).reindex(hours_base.index, fill_value=0.0)
    assert (hours_post - hours_base).abs().sum() / 2 > 0.1  # total variation distance


def test_new_categories_appear_after_drift_start(contract: DataContract, drifting: GeneratedData) -> None:
    known = set(contract.column("merchant_category").categories)
    tx = simulate(replace(DRIFTING, new_categories=True), contract).transactions
    unknown_post = ~_post(tx, contract)["merchant_category"].isin(known)
    assert 0.02 <= unknown_post.mean() <= 0.06
    assert set(_post(tx, contract)["merchant_category"][unknown_post]) == {NEW_CATEGORY}
    assert _pre(tx, contract)["merchant_category"].isin(known).all()
    assert drifting.transactions["merchant_category"].isin(known).all()


def test_concept_drift_breaks_the_pre_drift_model(contract: DataContract, drifting: GeneratedData) -> None:
    aucs = {}
    for level, data in ((0.0, drifting), (1.0, simulate(replace(DRIFTING, concept_drift=1.0), contract))):
        df = _model_frame(data.transactions, contract)
        before = df[contract.event_timestamp] < _utc(DRIFT_START)
        aucs[level] = _auc(_fit(df, before, contract), df, ~before, contract)
        assert 0.005 <= df.loc[~before, contract.label].mean() <= 0.02
    # measured over seeds 0-7 of this configuration: 0.92-0.96 without drift, 0.51-0.74 with
    # concept_drift=1 (a loss of 0.20-0.41); the thresholds leave a margin
    assert aucs[0.0] >= 0.85
    assert aucs[0.0] - aucs[1.0] >= 0.15


def test_label_noise_flips_that_share(contract: DataContract, drifting: GeneratedData) -> None:
    noise = 0.05
    noisy = simulate(replace(DRIFTING, label_noise=noise), contract).transactions
    clean = drifting.transactions
    label_cols = [contract.label, contract.label_timestamp]
    pd.testing.assert_frame_equal(noisy.drop(columns=label_cols), clean.drop(columns=label_cols))
    flipped = noisy[contract.label] != clean[contract.label]
    assert noise * 0.85 <= flipped.mean() <= noise * 1.15
    assert ((clean[contract.label] == 1) & flipped).any() and ((clean[contract.label] == 0) & flipped).any()
    # flipped on every day, not only after a drift
    assert flipped[noisy[contract.event_timestamp] < _utc(DRIFT_START)].mean() > noise * 0.8


# -- bad data ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_make_bad(kind: str, contract: DataContract, base: GeneratedData) -> None:
    tx = base.transactions
    day = tx[tx[contract.event_timestamp] < _utc(START + timedelta(days=1))]
    frame = base.labels.iloc[:500] if kind == "label_out_of_domain" else day[list(contract.landing_columns)]
    before = frame.copy()
    bad = make_bad(frame, kind, contract, seed=3)
    pd.testing.assert_frame_equal(frame, before)  # a copy, the input is untouched
    assert bad is not frame
    if kind == "missing_column":
        missing = set(contract.landing_columns) - set(bad.columns)
        assert len(missing) == 1 and missing <= {c.name for c in contract.columns}
    elif kind == "wrong_type":
        changed = [c for c in frame.columns if bad[c].dtype != frame[c].dtype]
        assert len(changed) == 1 and contract.landing_columns[changed[0]] in {"int64", "float64"}
    elif kind == "null_key":
        assert bad[contract.row_key].isna().sum() >= 1
    elif kind == "duplicate_key":
        assert bad[contract.row_key].duplicated().sum() >= 1
    elif kind == "label_out_of_domain":
        assert not bad[contract.label].isin(contract.label_values).all()
        assert str(bad[contract.label].dtype) == "int64"
    elif kind == "timestamp_outside_partition":
        ts = bad[contract.event_timestamp]
        outside = (ts < _utc(START)) | (ts >= _utc(START + timedelta(days=1)))
        assert 1 <= outside.sum() < len(bad)
    elif kind == "empty":
        assert len(bad) == 0 and list(bad.columns) == list(frame.columns)
    if kind != "empty":
        assert len(bad) == len(frame)


def test_make_bad_refuses_unknown_kinds(contract: DataContract, base: GeneratedData) -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        make_bad(base.transactions, "gremlins", contract)


# -- other schemas and configuration -------------------------------------------------------------------
def test_other_schema_gets_values_by_dtype(tmp_path, contract: DataContract) -> None:
    raw = yaml.safe_load(SCHEMA.read_text())
    raw["name"] = "card_fraud_wide"
    raw["keys"]["entity"].update(name="card_id", dtype="string")
    raw["event_timestamp"] = "ts"
    raw["label"].update(name="label", timestamp="labelled_at")
    extra = [{"name": f"v{i}", "dtype": "float64", "nullable": i % 2 == 0} for i in range(1, 21)]
    extra += [
        {"name": "terminal_type", "dtype": "int64", "nullable": False, "block": {"min": 1, "max": 4}},
        {"name": "segment", "dtype": "category", "nullable": True, "categories": ["a", "b", "c"]},
        {"name": "device_id", "dtype": "string", "nullable": False, "role": "attribute"},
        {"name": "channel", "dtype": "category", "nullable": False, "categories": ["web", "app"]},
    ]
    raw["columns"] = [c for c in raw["columns"] if c["name"] != "channel"] + extra
    for c in raw["columns"]:
        if c["name"] == "distance_from_home_km":
            c["nullable"] = False  # a known column declared not nullable gets no nulls
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(raw))
    wide = load_contract(path)

    data = simulate(replace(BASE, days=7, customers=300, transactions_per_day=400), wide)
    tx = data.transactions
    declared = {**wide.landing_columns, wide.label: "int64", wide.label_timestamp: "timestamp"}
    _check_dtypes(tx, declared, wide)
    _check_dtypes(data.labels, wide.label_columns, wide)
    assert tx["terminal_type"].between(1, 4).all()
    assert tx["merchant_risk_score"].isna().any() and tx["distance_from_home_km"].notna().all()
    assert set(tx["channel"]) <= {"web", "app"}  # a known name with other categories: drawn by dtype
    for col in wide.columns:
        if not col.nullable:
            assert tx[col.name].notna().all(), col.name
    assert tx[[f"v{i}" for i in range(2, 21, 2)]].isna().to_numpy().any()
    assert 0.005 <= tx[wide.label].mean() <= 0.02
    pd.testing.assert_frame_equal(tx, simulate(replace(BASE, days=7, customers=300,
                                                       transactions_per_day=400), wide).transactions)


@pytest.mark.parametrize(
    "changes",
    [{"days": 0}, {"customers": 0}, {"fraud_rate": 0.7}, {"concept_drift": 1.5}, {"label_noise": -0.1},
     {"covariate_drift": -1.0}, {"structure": -0.5}, {"structure": 4.0}],
)
def test_config_is_checked(changes: dict) -> None:
    with pytest.raises(ConfigError):
        GeneratorConfig(**{"start": START, **changes})


# -- structure: the day factor and the weekly and daily cycles ------------------------------------------------
STRUCTURED = GeneratorConfig(start=date(2024, 1, 1), days=70, customers=400, transactions_per_day=600, seed=3)


@pytest.fixture(scope="module")
def structured(contract: DataContract) -> dict[float, pd.DataFrame]:
    return {s: simulate(replace(STRUCTURED, structure=s), contract).transactions for s in (0.0, 1.0)}


def _daily(tx: pd.DataFrame, contract: DataContract) -> pd.DataFrame:
    legit = tx[tx[contract.label] == 0]
    day = legit[contract.event_timestamp].dt.floor("D")
    return pd.DataFrame({"rows": legit.groupby(day).size(), "log_amount": np.log(legit["amount"]).groupby(day).mean(),
                         "online": (legit["channel"] == "online").groupby(day).mean()})


def _lag1(x: pd.Series) -> float:
    return float(np.corrcoef(x.to_numpy()[:-1], x.to_numpy()[1:])[0, 1])


def test_the_day_factor_makes_days_alike_and_moves_several_inputs(contract, structured) -> None:
    """Measured (70 days, the weekly cycle removed): day-to-day correlation of the mean log-amount 0.66 with
    structure (0.21 without); its spread 0.22 (0.04); daily volume and online share move with it
    (correlations 0.94 and -0.84); the daily volume's spread 0.18 against Poisson's 0.04."""
    days_on, days_off = _daily(structured[1.0], contract), _daily(structured[0.0], contract)
    weekday = days_on.index.dayofweek
    # remove the weekly cycle to see the day factor
    resid = days_on["log_amount"] - days_on["log_amount"].groupby(weekday).transform("mean")
    assert _lag1(resid) > 0.45
    assert abs(_lag1(days_off["log_amount"] - days_off["log_amount"].groupby(days_off.index.dayofweek)
                     .transform("mean"))) < 0.35
    assert days_on["log_amount"].std() > 3 * days_off["log_amount"].std()
    rows_resid = np.log(days_on["rows"]) - np.log(days_on["rows"]).groupby(weekday).transform("mean")
    assert np.corrcoef(resid, rows_resid)[0, 1] > 0.6
    assert rows_resid.std() > 2 / np.sqrt(days_on["rows"].mean())
    online_resid = days_on["online"] - days_on["online"].groupby(weekday).transform("mean")
    assert np.corrcoef(resid, online_resid)[0, 1] < -0.5


def test_weekly_and_daily_cycles(contract, structured) -> None:
    """Weekends: more leisure, larger amounts, later hours; nights: more online. Measured with structure
    (without): leisure share +0.108 (+0.005), mean log-amount +0.27 (+0.01), share before 4 am +0.019
    (-0.002), online share at 1-4 am +0.21 (-0.01)."""
    on, off = structured[1.0], structured[0.0]
    for tx, expect in ((on, True), (off, False)):
        legit = tx[tx[contract.label] == 0]
        dow = legit[contract.event_timestamp].dt.dayofweek
        weekend, weekdays = legit[dow >= 5], legit[dow <= 2]
        leisure = {"restaurant", "entertainment", "travel", "retail"}
        share = weekend["merchant_category"].isin(leisure).mean() - weekdays["merchant_category"].isin(leisure).mean()
        amount = np.log(weekend["amount"]).mean() - np.log(weekdays["amount"]).mean()
        late = (weekend["hour_of_day"] < 4).mean() - (weekdays["hour_of_day"] < 4).mean()
        night = legit["hour_of_day"].between(1, 4)
        online = (legit.loc[night, "channel"] == "online").mean() - (legit.loc[~night, "channel"] == "online").mean()
        assert (share > 0.06, amount > 0.12, late > 0.01, online > 0.1) == (expect,) * 4, (share, amount, late, online)


def test_structure_zero_is_the_world_of_independent_days(contract, structured) -> None:
    """Structure draws from its own stream: without it the transactions are those of independent days, and
    the days before a drift knob's start stay the same with it on."""
    off = structured[0.0]
    again = simulate(replace(STRUCTURED, structure=0.0, covariate_drift=0.5, drift_start=date(2024, 3, 1)),
                     contract).transactions
    pre = off[off[contract.event_timestamp] < _utc(date(2024, 3, 1))]
    pd.testing.assert_frame_equal(again.iloc[:len(pre)], pre)
    assert len(structured[1.0]) != len(off)  # the day factor moves the volume


def test_structure_draws_do_not_move_with_the_fraud_count(contract) -> None:
    """Concept drift changes how many fraud rows there are (bursts spread over more time, some cut at the
    period's end); the structure's draws are the legitimate rows' own, so the days before drift_start
    stay the same."""
    config = replace(STRUCTURED, seed=5)  # a seed where concept drift changes the row count (by one)
    drift_start = config.start + timedelta(days=40)
    drifted = simulate(replace(config, concept_drift=1.0, drift_start=drift_start), contract).transactions
    base = simulate(config, contract).transactions
    assert len(drifted) != len(base)
    cut = _utc(drift_start)
    # the columns the structure moves (the fraud rows' null masks and the label delays are drawn over all
    # rows and do shift, as tests/data/test_drift_statistics.py notes: not the structure's doing)
    same = [contract.row_key, contract.entity, contract.event_timestamp, contract.label, "amount",
            "merchant_category", "channel", "hour_of_day"]
    pd.testing.assert_frame_equal(drifted.loc[drifted[contract.event_timestamp] < cut, same].reset_index(drop=True),
                                  base.loc[base[contract.event_timestamp] < cut, same].reset_index(drop=True))


def test_the_errands_move_only_the_category(contract, structured, monkeypatch) -> None:
    """The everyday purchases' categories follow the day of the week and the day factor; nothing else moves
    with them (the amounts, merchant risk, channels, hours and labels are those of the world without them).
    Measured (seed 3, 70 days): among the legitimate everyday purchases, the groceries' share 0.22 higher on
    Monday-Tuesday than Friday-Sunday, the restaurants' 0.25 lower (0.00 and 0.00 at structure 0)."""
    from closedloop.devtools import generate

    on = structured[1.0]
    monkeypatch.setattr(generate, "_WEEKLY_ERRANDS", 0.0)
    monkeypatch.setattr(generate, "_DAY_ERRANDS", 0.0)
    without = simulate(replace(STRUCTURED, structure=1.0), contract).transactions
    others = [c for c in on.columns if c != "merchant_category"]
    pd.testing.assert_frame_equal(on[others], without[others])
    assert (on["merchant_category"] != without["merchant_category"]).mean() > 0.05
    everyday = {"grocery", "fuel", "restaurant", "health"}
    moved = on["merchant_category"] != without["merchant_category"]
    assert on.loc[moved, "merchant_category"].isin(everyday).all()
    assert without.loc[moved, "merchant_category"].isin(everyday).all()
    assert (on.loc[moved, contract.label] == 0).all()
    for tx, expect in ((on, True), (structured[0.0], False)):
        legit = tx[(tx[contract.label] == 0) & tx["merchant_category"].isin(everyday)]
        dow = legit[contract.event_timestamp].dt.dayofweek
        early, weekend = legit[dow <= 1]["merchant_category"], legit[dow >= 4]["merchant_category"]
        grocery = (early == "grocery").mean() - (weekend == "grocery").mean()
        restaurant = (early == "restaurant").mean() - (weekend == "restaurant").mean()
        assert (grocery > 0.1, restaurant < -0.1) == (expect, expect), (grocery, restaurant)
