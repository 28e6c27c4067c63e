"""Tests of closedloop.stages.validation: the contract's GX suite against good, broken and drifted partitions."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import date

import numpy as np
import pandas as pd
import pytest

from closedloop.core.lake import Lake
from closedloop.core.schema import DataContract, load_contract
from closedloop.core.settings import REPO_ROOT
from closedloop.stages import validation as v

DAY = date(2024, 3, 10)
N = 200
URI = "s3://bucket/lake/landing/transactions/2024-03-10.parquet"


@pytest.fixture(scope="module")
def contract() -> DataContract:
    return load_contract(REPO_ROOT / "models/card_fraud/schema.yaml")


def _day_start(day: date) -> pd.Timestamp:
    return pd.Timestamp(day.isoformat(), tz="UTC")


def make_transactions(contract: DataContract, day: date = DAY, n: int = N, seed: int = 7) -> pd.DataFrame:
    """A small, deterministic, valid transaction partition built from the contract alone."""
    rng = np.random.default_rng(seed)
    seconds = np.sort(rng.integers(0, 86_400, n))
    data: dict[str, object] = {
        contract.row_key: [f"tx-{day:%Y%m%d}-{i:05d}" for i in range(n)],
        contract.entity: rng.integers(1, 50, n).astype("int64"),
        contract.event_timestamp: _day_start(day) + pd.to_timedelta(seconds, unit="s"),
    }
    for col in contract.columns:
        bounds = col.block or col.warn
        lo, hi = bounds.get("min", 0), bounds.get("max", 100)
        if col.dtype == "category":
            data[col.name] = [col.categories[(i * 7) % len(col.categories)] for i in range(n)]
        elif col.dtype == "int64":
            data[col.name] = rng.integers(lo, hi + 1, n).astype("int64")
        elif col.dtype == "float64":  # well inside the range: x3 leaves it for the top values
            data[col.name] = rng.uniform(lo + 0.1 * (hi - lo), lo + 0.5 * (hi - lo), n)
        elif col.dtype == "bool":
            data[col.name] = rng.integers(0, 2, n).astype(bool)
        else:
            data[col.name] = [f"{col.name}-{i}" for i in range(n)]
    return pd.DataFrame(data)


def make_labels(
    contract: DataContract, day: date = DAY, n: int = N, positive_share: float = 0.05, seed: int = 11
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = np.zeros(n, dtype="int64")
    y[: round(n * positive_share)] = 1
    rng.shuffle(y)
    seconds = np.sort(rng.integers(0, 86_400, n))
    return pd.DataFrame(
        {
            contract.row_key: [f"tx-{i:05d}" for i in range(n)],
            contract.label: y,
            contract.label_timestamp: _day_start(day) + pd.to_timedelta(seconds, unit="s"),
        }
    )


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _find(findings: list[v.Finding], rule: str, column: str | None) -> v.Finding:
    hits = [f for f in findings if f.rule == rule and f.column == column]
    assert hits, f"no {rule} finding on {column!r} in {[(f.rule, f.column) for f in findings]}"
    return hits[0]


# -- good data -------------------------------------------------------------------------------------
def test_good_transactions_pass(contract):
    df = make_transactions(contract)
    result = v.validate_frame(df, contract, "transactions", DAY, uri=URI, sha256="abc")
    assert result.passed, result.summary()
    assert result.findings == []
    assert (result.uri, result.kind, result.day, result.rows, result.sha256) == (
        URI, "transactions", "2024-03-10", N, "abc")
    assert "passed" in result.summary()
    assert "must not be used" not in result.summary()


def test_good_labels_pass(contract):
    result = v.validate_frame(make_labels(contract), contract, "labels", DAY)
    assert result.passed, result.summary()
    assert result.findings == []


def test_input_frame_is_not_modified(contract):
    df = make_transactions(contract)
    df.loc[3, "channel"] = "crypto"
    before = df.copy()
    v.validate_frame(df, contract, "transactions", DAY)
    pd.testing.assert_frame_equal(df, before)


# -- blocking problems -----------------------------------------------------------------------------
def _missing_column(df, c):
    return df.drop(columns=["merchant_risk_score"]), "expect_column_to_exist", "merchant_risk_score", None


def _amount_as_strings(df, c):
    df["amount"] = df["amount"].map("{:.2f}".format)
    return df, v.TYPE_RULE, "amount", df.loc[0, "amount"]


def _null_row_key(df, c):
    df.loc[5, c.row_key] = None
    return df, "expect_column_values_to_not_be_null", c.row_key, 5  # the row's position


def _null_entity(df, c):
    df[c.entity] = df[c.entity].astype("float64")  # how pandas holds an integer column with nulls
    df.loc[6, c.entity] = np.nan
    return df, "expect_column_values_to_not_be_null", c.entity, df.loc[6, c.row_key]


def _null_category(df, c):
    df.loc[8, "merchant_category"] = None
    return df, "expect_column_values_to_not_be_null", "merchant_category", df.loc[8, c.row_key]


def _duplicate_row_key(df, c):
    df.loc[7, c.row_key] = df.loc[3, c.row_key]
    return df, "expect_column_values_to_be_unique", c.row_key, df.loc[3, c.row_key]


def _event_after_day(df, c):
    df.loc[9, c.event_timestamp] = _day_start(DAY) + pd.Timedelta(days=1)  # the next day's first instant
    return df, "expect_column_values_to_be_between", c.event_timestamp, "2024-03-11T00:00:00+00:00"


def _event_before_day(df, c):
    df.loc[0, c.event_timestamp] = _day_start(DAY) - pd.Timedelta(seconds=1)
    return df, "expect_column_values_to_be_between", c.event_timestamp, "2024-03-09T23:59:59+00:00"


def _naive_timestamps(df, c):
    df[c.event_timestamp] = df[c.event_timestamp].dt.tz_localize(None)
    return df, v.TYPE_RULE, c.event_timestamp, df.loc[0, c.event_timestamp].isoformat()


def _empty(df, c):
    return df.iloc[0:0], "expect_table_row_count_to_be_between", None, None


def _hour_out_of_range(df, c):
    df.loc[4, "hour_of_day"] = 24
    return df, "expect_column_values_to_be_between", "hour_of_day", 24


def _is_foreign_out_of_range(df, c):
    df.loc[4, "is_foreign"] = 2
    return df, "expect_column_values_to_be_between", "is_foreign", 2


def _hour_as_float(df, c):
    df["hour_of_day"] = df["hour_of_day"] + 0.5
    return df, v.TYPE_RULE, "hour_of_day", df.loc[0, "hour_of_day"]


def _duplicated_column_name(df, c):
    return pd.concat([df, df[["amount"]]], axis=1), v.DUPLICATE_COLUMN_RULE, "amount", None


def _label_out_of_domain(df, c):
    df.loc[3, c.label] = 2
    return df, "expect_column_values_to_be_in_set", c.label, 2


def _label_null(df, c):
    df[c.label] = df[c.label].astype("float64")
    df.loc[3, c.label] = np.nan
    return df, "expect_column_values_to_not_be_null", c.label, df.loc[3, c.row_key]


def _label_timestamp_outside_day(df, c):
    df.loc[2, c.label_timestamp] = _day_start(DAY) + pd.Timedelta(days=3)
    return df, "expect_column_values_to_be_between", c.label_timestamp, "2024-03-13T00:00:00+00:00"


def _labels_as_strings(df, c):
    df[c.label] = df[c.label].astype(str)
    return df, v.TYPE_RULE, c.label, "0"


BLOCKING: list[tuple[str, Callable]] = [
    ("transactions", _missing_column),
    ("transactions", _amount_as_strings),
    ("transactions", _null_row_key),
    ("transactions", _null_entity),
    ("transactions", _null_category),
    ("transactions", _duplicate_row_key),
    ("transactions", _event_after_day),
    ("transactions", _event_before_day),
    ("transactions", _naive_timestamps),
    ("transactions", _empty),
    ("transactions", _hour_out_of_range),
    ("transactions", _is_foreign_out_of_range),
    ("transactions", _hour_as_float),
    ("transactions", _duplicated_column_name),
    ("labels", _label_out_of_domain),
    ("labels", _label_null),
    ("labels", _label_timestamp_outside_day),
    ("labels", _labels_as_strings),
]


@pytest.mark.parametrize(("kind", "breaker"), BLOCKING, ids=[b.__name__.strip("_") for _, b in BLOCKING])
def test_blocking_problem_is_reported(contract, kind, breaker):
    good = make_transactions(contract) if kind == "transactions" else make_labels(contract)
    bad, rule, column, sample = breaker(good.copy(), contract)
    uri = URI.replace("transactions", kind)

    result = v.validate_frame(bad, contract, kind, DAY, uri=uri)

    assert not result.passed
    finding = _find(result.blocking, rule, column)
    assert finding.severity == "block"
    assert finding.message
    summary = result.summary()
    assert uri in summary
    assert rule in summary
    if column is not None:
        assert f"column {column!r}" in summary
    if sample is not None:
        assert sample in finding.sample
        assert str(sample) in summary
    assert "re-deliver" in summary and "quarantine" in summary
    json.dumps(result.to_dict())  # JSON-safe, samples included


def test_wrong_type_skips_the_value_checks_of_that_column(contract):
    df = make_transactions(contract)
    df["amount"] = "lots"
    result = v.validate_frame(df, contract, "transactions", DAY)
    on_amount = [f for f in result.findings if f.column == "amount"]
    assert [f.rule for f in on_amount] == [v.TYPE_RULE]
    assert on_amount[0].unexpected_count == N
    assert on_amount[0].sample == ["lots"]


def test_a_stray_text_value_in_a_number_column_is_named(contract):
    df = make_transactions(contract)
    df["amount"] = df["amount"].astype(object)
    df.loc[3, "amount"] = "n/a"
    finding = _find(v.validate_frame(df, contract, "transactions", DAY).blocking, v.TYPE_RULE, "amount")
    assert (finding.unexpected_count, finding.sample) == (1, ["n/a"])
    assert "str" in finding.message


def test_null_sample_uses_row_keys_whatever_the_index(contract):
    df = make_transactions(contract)
    df.index = df.index * 10 + 1000
    df.loc[df.index[4], "merchant_category"] = None
    finding = _find(v.validate_frame(df, contract, "transactions", DAY).blocking,
                    "expect_column_values_to_not_be_null", "merchant_category")
    assert finding.sample == [df[contract.row_key].iloc[4]]
    assert finding.unexpected_count == 1


def test_several_problems_are_all_reported(contract):
    df = make_transactions(contract)
    df.loc[1, "hour_of_day"] = -1
    df.loc[2, contract.row_key] = df.loc[1, contract.row_key]
    df = df.drop(columns=["channel"])
    result = v.validate_frame(df, contract, "transactions", DAY)
    assert {(f.rule, f.column) for f in result.blocking} == {
        ("expect_column_values_to_be_between", "hour_of_day"),
        ("expect_column_values_to_be_unique", contract.row_key),
        ("expect_column_to_exist", "channel"),
    }
    assert result.to_dict()["blocking"] == 3


# -- drift: warnings only --------------------------------------------------------------------------
def _amount_x3(df, c):
    df["amount"] = df["amount"] * 3
    return df, "expect_column_values_to_be_between", "amount"


def _unknown_category(df, c):
    df.loc[[3, 9], "channel"] = "crypto_wallet"
    return df, "expect_column_values_to_be_in_set", "channel"


def _too_many_nulls(df, c):
    df.loc[df.index[: N // 5], "distance_from_home_km"] = np.nan  # 20% > max_null_share 5%
    return df, "expect_column_proportion_of_non_null_values_to_be_between", "distance_from_home_km"


def _risk_score_above_range(df, c):
    df.loc[5, "merchant_risk_score"] = 1.7
    return df, "expect_column_values_to_be_between", "merchant_risk_score"


def _extra_column(df, c):
    df["loyalty_tier"] = "gold"
    return df, v.UNEXPECTED_COLUMN_RULE, "loyalty_tier"


DRIFT = [_amount_x3, _unknown_category, _too_many_nulls, _risk_score_above_range, _extra_column]


def test_timestamps_of_another_zone_are_normalised_and_judged_in_utc(contract):
    df = make_transactions(contract)
    c = contract
    df[c.event_timestamp] = df[c.event_timestamp].dt.tz_convert("Europe/Paris")
    # 00:30 in Paris on the next day is 23:30 UTC on the partition's day: inside it
    df.loc[3, c.event_timestamp] = pd.Timestamp("2024-03-11T00:30", tz="Europe/Paris")
    result = v.validate_frame(df, contract, "transactions", DAY)
    assert result.passed, result.summary()
    assert [(f.rule, f.column) for f in result.normalised] == [(v.UTC_RULE, c.event_timestamp)]
    df.loc[4, c.event_timestamp] = pd.Timestamp("2024-03-11T01:30", tz="Europe/Paris")  # 00:30 UTC next day
    result = v.validate_frame(df, contract, "transactions", DAY)
    assert [(f.rule, f.column) for f in result.blocking] == [
        ("expect_column_values_to_be_between", c.event_timestamp)]
    assert result.blocking[0].sample == ["2024-03-11T00:30:00+00:00"]


@pytest.mark.parametrize("drift", DRIFT, ids=[d.__name__.strip("_") for d in DRIFT])
def test_drifted_but_valid_data_passes_with_a_warning(contract, drift):
    df, rule, column = drift(make_transactions(contract), contract)
    result = v.validate_frame(df, contract, "transactions", DAY, uri=URI)
    assert result.passed, result.summary()
    assert result.blocking == []
    finding = _find(result.warnings, rule, column)
    assert finding.severity == "warn"
    summary = result.summary()
    assert URI in summary and rule in summary and f"column {column!r}" in summary
    assert "must not be used" not in summary


def test_warning_details(contract):
    df = make_transactions(contract)
    df["amount"] *= 3
    df.loc[[3, 9], "channel"] = "crypto_wallet"
    df.loc[df.index[: N // 5], "distance_from_home_km"] = np.nan
    result = v.validate_frame(df, contract, "transactions", DAY)
    amount = _find(result.warnings, "expect_column_values_to_be_between", "amount")
    assert amount.unexpected_count == int((df["amount"] > 25_000).sum()) > 0
    assert amount.sample and all(x > 25_000 for x in amount.sample)
    channel = _find(result.warnings, "expect_column_values_to_be_in_set", "channel")
    assert (channel.unexpected_count, channel.sample) == (2, ["crypto_wallet"])
    nulls = _find(result.warnings, "expect_column_proportion_of_non_null_values_to_be_between",
                  "distance_from_home_km")
    assert nulls.unexpected_count == N // 5
    assert "20%" in nulls.message


def test_positive_share_warns_from_1000_rows(contract):
    many = make_labels(contract, n=2000, positive_share=0.3)
    result = v.validate_frame(many, contract, "labels", DAY)
    assert result.passed
    finding = _find(result.warnings, "expect_column_mean_to_be_between", contract.label)
    assert "30%" in finding.message

    few = make_labels(contract, n=200, positive_share=0.3)  # too few rows to judge the share
    assert v.validate_frame(few, contract, "labels", DAY).findings == []


# -- files -----------------------------------------------------------------------------------------
def _csv(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False).encode()


UNREADABLE = {
    "empty_file": lambda df: b"",
    "garbage": lambda df: bytes(range(256)) * 8,
    "csv": _csv,
    "truncated_parquet": lambda df: _parquet(df)[: len(_parquet(df)) // 2],
    "parquet_without_footer": lambda df: _parquet(df)[:-8],
}


@pytest.mark.parametrize("make_bytes", UNREADABLE.values(), ids=UNREADABLE.keys())
def test_unreadable_file_is_one_blocking_finding(contract, tmp_path, make_bytes):
    lake = Lake(root="file://" + str(tmp_path))
    uri = lake.partition("landing", "transactions", DAY)
    data = make_bytes(make_transactions(contract))
    lake.write_bytes(uri, data)

    result = v.validate_partition(lake, uri, contract, "transactions", DAY)

    assert not result.passed
    assert [(f.rule, f.column, f.severity) for f in result.findings] == [(v.READABLE_RULE, None, "block")]
    assert result.rows == 0
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    summary = result.summary()
    assert uri in summary and v.READABLE_RULE in summary and "Parquet" in summary
    json.dumps(result.to_dict())


def test_validate_partition_reads_through_the_lake(contract, tmp_path):
    lake = Lake(root="file://" + str(tmp_path))
    good_uri = lake.partition("landing", "transactions", DAY)
    lake.write_parquet(make_transactions(contract), good_uri)
    result = v.validate_partition(lake, good_uri, contract, "transactions", DAY)
    assert result.passed, result.summary()
    assert result.rows == N and result.uri == good_uri and result.sha256 == lake.sha256(good_uri)

    bad = make_labels(contract)
    bad.loc[0, contract.label] = 5
    bad_uri = lake.partition("landing", "labels", DAY)
    lake.write_parquet(bad, bad_uri)
    result = v.validate_partition(lake, bad_uri, contract, "labels", DAY)
    assert not result.passed
    assert _find(result.blocking, "expect_column_values_to_be_in_set", contract.label).sample == [5]


def test_results_do_not_leak_between_calls(contract):
    good = make_transactions(contract)
    bad = good.copy()
    bad.loc[4, "hour_of_day"] = 99
    first = v.validate_frame(bad, contract, "transactions", DAY)
    assert v.validate_frame(good, contract, "transactions", DAY).findings == []
    again = v.validate_frame(bad, contract, "transactions", DAY)
    assert [f.to_dict() for f in again.findings] == [f.to_dict() for f in first.findings]


def test_the_callers_current_gx_context_is_left_alone(contract):
    import great_expectations as gx
    from great_expectations.data_context import project_manager

    mine = gx.get_context(mode="ephemeral")
    v.validate_frame(make_labels(contract), contract, "labels", DAY)
    assert project_manager.get_current_project() is mine


# -- the suite -------------------------------------------------------------------------------------
def test_suite_is_derived_from_the_contract(contract):
    import great_expectations as gx

    suite = v.build_suite(contract, "transactions", DAY)
    assert isinstance(suite, gx.ExpectationSuite)
    checks = {(e.expectation_type, getattr(e, "column", None), e.meta["severity"])
              for e in suite.expectations}
    assert all(e.meta["severity"] in ("block", "warn") for e in suite.expectations)
    for name in contract.landing_columns:
        assert ("expect_column_to_exist", name, "block") in checks
    assert ("expect_column_values_to_be_unique", contract.row_key, "block") in checks
    assert ("expect_column_values_to_be_between", "hour_of_day", "block") in checks
    assert ("expect_column_values_to_be_between", "amount", "warn") in checks
    assert ("expect_column_values_to_be_in_set", "channel", "warn") in checks
    assert ("expect_table_row_count_to_be_between", None, "block") in checks
    window = next(e for e in suite.expectations
                  if e.expectation_type == "expect_column_values_to_be_between"
                  and e.column == contract.event_timestamp)
    assert window.min_value == _day_start(DAY).to_pydatetime()
    assert window.max_value == _day_start(date(2024, 3, 11)).to_pydatetime()
    assert window.strict_max

    labels = v.build_suite(contract, "labels", DAY)
    in_set = next(e for e in labels.expectations if e.expectation_type == "expect_column_values_to_be_in_set")
    assert (in_set.column, in_set.value_set, in_set.meta["severity"]) == (contract.label, [0, 1], "block")


def test_unknown_kind_is_refused(contract):
    with pytest.raises(ValueError, match="kind"):
        v.validate_frame(make_labels(contract), contract, "refunds", DAY)


def test_module_import_stays_light():
    code = ("import sys, closedloop.stages.validation; "
            "heavy = {'great_expectations', 'pandas'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
