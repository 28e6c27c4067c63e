"""The catalogue of unusual and bad input: each kind, its expected outcome, a clear message, nothing lost.

Each case delivers one partition (built from a generated, valid day) into a fresh lake whose earlier days
are curated, and ingests it with :func:`closedloop.stages.ingest.ingest_partition` (the validation function and
what the ingest task does with its result). The expected outcome is the specification of the case:

- **rejected**: :class:`DataValidationError` whose message names the file, the rule and the column; the
  file is in quarantine beside its report, landing is empty, nothing is curated and no feature rows exist;
  the corrected file, delivered again, is curated;
- **warned**: curated, the warning recorded in the partition's validation marker (monitoring reads it);
- **normalised**: curated after a lossless repair, recorded in the marker; the curated data is checked;
- **accepted**: curated (or recognised as already curated) with nothing to report.

A handful of these run through the real DAGs in ``tests/integration``.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from closedloop.core.errors import DataValidationError
from closedloop.core.lake import Lake
from closedloop.devtools.generate import GeneratorConfig, generate
from closedloop.stages import validation as v
from closedloop.stages.ingest import ingest_partition, read_marker

START = date(2026, 4, 1)
DAYS = 12
DAY = START + timedelta(days=DAYS - 1)  # the partition every case delivers
REJECTED, WARNED, NORMALISED, ACCEPTED = "rejected", "warned", "normalised", "accepted"


@dataclass(frozen=True)
class Case:
    name: str  # the kind of input, in words
    kind: str  # transactions | labels
    build: Callable  # (good frame, contract) -> DataFrame or bytes
    outcome: str
    rule: str | None = None
    column: str | None = None
    check: Callable | None = None  # (curated frame, good frame, contract) -> None, for normalised cases


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def _set(column: str, values: Callable) -> Callable:
    def build(df, c):
        df[column] = values(df, c)
        return df

    return build


def _rows(column: str, value, every: int = 37, cast: str | None = None) -> Callable:
    """Set ``column`` to ``value`` in every ``every``-th row."""

    def build(df, c):
        if cast:
            df[column] = df[column].astype(cast)
        df.loc[df.index[::every], column] = value
        return df

    return build


def _non_utf8(df, c):
    table = pa.Table.from_pandas(df, preserve_index=False)
    raw = [("caf\xe9".encode("latin-1") if i % 50 == 0 else s.encode()) for i, s in enumerate(df["merchant_category"])]
    i = table.schema.get_field_index("merchant_category")
    table = table.set_column(i, "merchant_category", pa.array(raw, pa.binary()))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _duplicated_column(df, c):
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = pa.Table.from_arrays([*table.columns, table.column("channel")], names=[*table.column_names, "channel"])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _duplicate_keys(df, c):
    df.loc[df.index[1::40], c.row_key] = df[c.row_key].iloc[0::40].to_numpy()[: len(df.index[1::40])]
    return df


def _exact_duplicates(df, c):
    return pd.concat([df, df.iloc[::5]], ignore_index=True)


def _single_class(df, c):
    df[c.label] = 0
    return df


def _ghost_labels(df, c):
    df.loc[df.index[::10], c.row_key] = [f"ghost-{i}" for i in range(len(df.index[::10]))]
    return df


def _same_rows_as(good, curated, c):
    assert len(curated) == len(good)
    assert set(curated[c.row_key]) == set(good[c.row_key])


def _utc_instants(good, curated, c):
    assert str(curated[c.event_timestamp].dt.tz) == "UTC"
    merged = curated.merge(good[[c.row_key, c.event_timestamp]], on=c.row_key, suffixes=("", "_sent"))
    assert len(merged) == len(good)
    assert (merged[c.event_timestamp] == merged[f"{c.event_timestamp}_sent"]).all()


def _extra_column_dropped(good, curated, c):
    assert "loyalty_tier" not in curated.columns and len(curated) == len(good)


TS = "event_timestamp"
CASES = [
    # structure
    Case("missing column", "transactions", lambda df, c: df.drop(columns=["amount"]), REJECTED,
         "expect_column_to_exist", "amount"),
    Case("extra column", "transactions", _set("loyalty_tier", lambda df, c: "gold"), WARNED,
         v.UNEXPECTED_COLUMN_RULE, "loyalty_tier", _extra_column_dropped),
    Case("renamed columns", "transactions",
         lambda df, c: df.rename(columns={"amount": "Amount", "channel": "Channel"}), REJECTED,
         "expect_column_to_exist", "amount"),
    Case("duplicated column name", "transactions", _duplicated_column, REJECTED, v.DUPLICATE_COLUMN_RULE,
         "channel"),
    # types
    Case("numbers as strings", "transactions", _set("amount", lambda df, c: df["amount"].map("{:.2f}".format)),
         REJECTED, v.TYPE_RULE, "amount"),
    Case("booleans where integers are expected", "transactions", _set("is_foreign", lambda df, c: df["is_foreign"] > 0),
         REJECTED, v.TYPE_RULE, "is_foreign"),
    Case("timestamps as strings", "transactions", _set(TS, lambda df, c: df[TS].map(lambda t: t.isoformat())),
         REJECTED, v.TYPE_RULE, TS),
    Case("naive timestamps", "transactions", _set(TS, lambda df, c: df[TS].dt.tz_localize(None)), REJECTED,
         v.TYPE_RULE, TS),
    Case("non-UTC timestamps", "transactions", _set(TS, lambda df, c: df[TS].dt.tz_convert("America/New_York")),
         NORMALISED, v.UTC_RULE, TS, _utc_instants),
    Case("non-UTF-8 text", "transactions", _non_utf8, REJECTED, v.TYPE_RULE, "merchant_category"),
    Case("integer key as float with a null", "transactions", _rows("customer_id", np.nan, cast="float64"),
         REJECTED, "expect_column_values_to_not_be_null", "customer_id"),
    # values
    Case("all-null optional column", "transactions", _set("distance_from_home_km", lambda df, c: np.nan), WARNED,
         "expect_column_proportion_of_non_null_values_to_be_between", "distance_from_home_km"),
    Case("all-null required column", "transactions", _set("merchant_category", lambda df, c: None), REJECTED,
         "expect_column_values_to_not_be_null", "merchant_category"),
    Case("NaN in a required number", "transactions", _rows("amount", np.nan), REJECTED,
         "expect_column_values_to_not_be_null", "amount"),
    Case("infinities", "transactions", _rows("amount", np.inf), REJECTED, v.FINITE_RULE, "amount"),
    Case("negative infinity in an optional number", "transactions", _rows("merchant_risk_score", -np.inf),
         REJECTED, v.FINITE_RULE, "merchant_risk_score"),
    Case("negative amounts", "transactions", _rows("amount", -45.0), WARNED,
         "expect_column_values_to_be_between", "amount"),
    Case("absurd amounts", "transactions", _rows("amount", 1e12), WARNED, "expect_column_values_to_be_between",
         "amount"),
    Case("value outside a hard range", "transactions", _rows("hour_of_day", 24), REJECTED,
         "expect_column_values_to_be_between", "hour_of_day"),
    Case("unknown category", "transactions", _rows("merchant_category", "crypto_exchange"), WARNED,
         "expect_column_values_to_be_in_set", "merchant_category"),
    Case("constant column", "transactions", _set("channel", lambda df, c: "chip"), WARNED,
         "expect_column_unique_value_count_to_be_between", "channel"),
    # keys and rows
    Case("duplicate keys", "transactions", _duplicate_keys, REJECTED, "expect_column_values_to_be_unique",
         "transaction_id"),
    Case("null keys", "transactions", _rows("transaction_id", None), REJECTED, "expect_column_values_to_not_be_null",
         "transaction_id"),
    Case("a batch of exact duplicates", "transactions", _exact_duplicates, NORMALISED, v.EXACT_DUPLICATES_RULE,
         "transaction_id", _same_rows_as),
    # time
    Case("timestamps in the future", "transactions", _rows(TS, pd.Timestamp("2030-01-01", tz="UTC")), REJECTED,
         "expect_column_values_to_be_between", TS),
    Case("timestamps outside the partition", "transactions",
         _set(TS, lambda df, c: df[TS] - pd.Timedelta(days=1)), REJECTED, "expect_column_values_to_be_between", TS),
    # files
    Case("empty file (0 bytes)", "transactions", lambda df, c: b"", REJECTED, v.READABLE_RULE),
    Case("zero rows", "transactions", lambda df, c: df.iloc[0:0], REJECTED, "expect_table_row_count_to_be_between"),
    Case("truncated Parquet", "transactions", lambda df, c: _parquet(df)[: len(_parquet(df)) // 2], REJECTED,
         v.READABLE_RULE),
    Case("corrupt Parquet (bytes flipped)", "transactions",
         lambda df, c: (lambda b: b[:100] + bytes(x ^ 0xFF for x in b[100:400]) + b[400:])(_parquet(df)), REJECTED,
         v.READABLE_RULE),
    Case("CSV where Parquet is expected", "transactions", lambda df, c: df.to_csv(index=False).encode(), REJECTED,
         v.READABLE_RULE),
    # labels
    Case("labels outside {0, 1}", "labels", _rows("is_fraud", 2), REJECTED, "expect_column_values_to_be_in_set",
         "is_fraud"),
    Case("missing labels (null)", "labels", _rows("is_fraud", np.nan, cast="float64"), REJECTED,
         "expect_column_values_to_not_be_null", "is_fraud"),
    Case("labels as words", "labels", _set("is_fraud", lambda df, c: df["is_fraud"].map({0: "no", 1: "yes"})),
         REJECTED, v.TYPE_RULE, "is_fraud"),
    Case("a day with a single class", "labels", _single_class, WARNED, "expect_column_mean_to_be_between",
         "is_fraud"),
    Case("late labels for unknown transactions", "labels", _ghost_labels, WARNED, "labels_of_known_transactions",
         "transaction_id"),
    Case("label timestamps outside the partition", "labels",
         _set("label_timestamp", lambda df, c: df["label_timestamp"] + pd.Timedelta(days=2)), REJECTED,
         "expect_column_values_to_be_between", "label_timestamp"),
]


@pytest.fixture(scope="module")
def template(contract, tmp_path_factory) -> tuple[Path, dict[str, pd.DataFrame]]:
    """A lake whose transactions before DAY are curated, and the valid DAY partitions (set aside)."""
    root = tmp_path_factory.mktemp("catalogue") / "lake"
    lake = Lake(f"file://{root}")
    generate(GeneratorConfig(start=START, days=DAYS + 1, customers=300, transactions_per_day=1500, seed=17), lake,
             contract)
    good = {}
    for kind in ("transactions", "labels"):
        uri = lake.partition("landing", kind, DAY)
        good[kind] = lake.read_parquet(uri)
        lake.delete(uri)
    for d in lake.list_days("landing", "labels"):
        lake.delete(lake.partition("landing", "labels", d))
    for d in lake.list_days("landing", "transactions"):
        if d < DAY:
            ingest_partition(lake, contract, "transactions", d)
        else:
            lake.delete(lake.partition("landing", "transactions", d))
    assert len(good["labels"]) >= v.POSITIVE_SHARE_MIN_ROWS, "the single-class case needs a full-size label day"
    return root, good


def _lake(template, tmp_path) -> Lake:
    root, _ = template
    shutil.copytree(root, tmp_path / "lake")
    return Lake(f"file://{tmp_path / 'lake'}")


def _deliver(lake: Lake, uri: str, payload) -> None:
    if isinstance(payload, bytes):
        lake.write_bytes(uri, payload)
    else:
        lake.write_parquet(payload.reset_index(drop=True), uri)


def test_the_catalogue_is_large_enough():
    assert len({c.name for c in CASES}) == len(CASES) >= 25
    assert {c.outcome for c in CASES} == {REJECTED, WARNED, NORMALISED}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case: Case, template, contract, tmp_path, reliability):
    _, goods = template
    lake = _lake(template, tmp_path)
    if case.kind == "labels":  # the day's transactions are curated before its labels arrive
        _deliver(lake, lake.partition("landing", "transactions", DAY), goods["transactions"])
        ingest_partition(lake, contract, "transactions", DAY)
    good = goods[case.kind].copy()
    uri = lake.partition("landing", case.kind, DAY)
    _deliver(lake, uri, case.build(good.copy(), contract))

    if case.outcome == REJECTED:
        with pytest.raises(DataValidationError) as err:
            ingest_partition(lake, contract, case.kind, DAY)
        message = str(err.value)
        assert uri in message and case.rule in message, message
        if case.column:
            assert f"column {case.column!r}" in message or f"column {case.column!r}" in message.replace('"', "'"), (
                message)
        assert lake.exists(lake.partition("quarantine", case.kind, DAY))
        report = lake.read_json(lake.partition("quarantine", case.kind, DAY, ".validation.json"))
        assert report["passed"] is False and any(f["rule"] == case.rule for f in report["findings"])
        assert not lake.exists(uri)
        assert read_marker(lake, case.kind, DAY) is None
        assert not lake.exists(lake.partition("curated", case.kind, DAY))
        if case.kind == "transactions":
            assert not lake.exists(lake.partition("curated", contract.feature_view, DAY))
        # nothing is lost: the bad file waits in quarantine, and the corrected delivery goes through
        _deliver(lake, uri, good)
        assert ingest_partition(lake, contract, case.kind, DAY).status == "curated"
        outcome = f"rejected: {case.rule}" + (f" on {case.column}" if case.column else "") + \
            "; quarantined with its report; the corrected file was curated"
        reliability.record("bad-input", case.name, outcome)
        return

    result = ingest_partition(lake, contract, case.kind, DAY)
    assert result.status == "curated"
    marker = read_marker(lake, case.kind, DAY)
    notes = marker["warnings"] if case.outcome == WARNED else marker["normalisations"]
    assert any(n.startswith(f"{case.rule}({case.column})") for n in notes), notes
    if case.outcome == WARNED:
        assert not marker["normalisations"]
    curated = lake.read_parquet(lake.partition("curated", case.kind, DAY))
    if case.check:
        case.check(good, curated, contract)
    else:
        assert len(curated) == len(good)
    reliability.record("bad-input", case.name, f"{case.outcome}: {case.rule} on {case.column}; curated, "
                       f"recorded in the validation marker")


def test_a_partition_delivered_twice_is_curated_once(template, contract, tmp_path, reliability):
    _, goods = template
    lake = _lake(template, tmp_path)
    uri = lake.partition("landing", "transactions", DAY)
    _deliver(lake, uri, goods["transactions"])
    assert ingest_partition(lake, contract, "transactions", DAY).status == "curated"
    first = read_marker(lake, "transactions", DAY)
    curated = lake.read_bytes(lake.partition("curated", "transactions", DAY))
    _deliver(lake, uri, goods["transactions"])  # the same content again
    assert ingest_partition(lake, contract, "transactions", DAY).status == "already_curated"
    assert read_marker(lake, "transactions", DAY) == first
    assert lake.read_bytes(lake.partition("curated", "transactions", DAY)) == curated
    reliability.record("bad-input", "a partition delivered twice",
                       "accepted once: the second delivery is recognised by its sha256 and not curated again")


def test_good_days_raise_no_warning(template, contract, tmp_path):
    """The warnings above are not noise: the valid deliveries of the same days raise none."""
    _, goods = template
    lake = _lake(template, tmp_path)
    for kind in ("transactions", "labels"):
        _deliver(lake, lake.partition("landing", kind, DAY), goods[kind])
        outcome = ingest_partition(lake, contract, kind, DAY)
        assert outcome.status == "curated" and outcome.warnings == [], outcome.warnings
