"""Validation: the project's GX suite against the same rules checked with plain pandas/pyarrow.

Two cases, because "validating N rows" is done two ways:

- ``daily partitions``: what the retraining DAG's validate task does, ``validate_partition`` on each landed
  transactions file of the window (read, hash, the pandas-side checks, the GX suite), summed over the days;
- ``one frame``: the window's rows as one partition through ``validate_frame`` (the same function), their
  timestamps moved into one day (untimed) so that the frame is a valid day of N rows: the cost of N rows in
  one GX batch, which is what the issue's "1M rows in under 5 s" is about.

The floor checks the same rules: the pandas-side ones of ``validate_frame`` (unique column names, column types
from the Arrow schema, finite numbers, exact repeated rows) and every expectation of the suite ``build_suite``
derives from the contract (interpreted from the suite's own configurations, not a list written here), with
numpy/pandas on the same frame, counting offenders and keeping the first ones as GX's sample does.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

from common import Result, World, frame_mib, measure

STAGE = "validation"
PARTIAL = 20  # offending values kept per failed rule (validation.PARTIAL_COUNT)


# -- the floor ------------------------------------------------------------------------------------
def suite_rules(contract: Any, day: Any) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(expectation type, kwargs, meta) of every expectation of the project's suite for ``day``."""
    from closedloop.stages.validation import build_suite

    return [(e.configuration.type, dict(e.configuration.kwargs), dict(e.configuration.meta or {}))
            for e in build_suite(contract, "transactions", day).expectations]


def _arrow_type_ok(t: Any, dtype: str) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if dtype in ("string", "category"):
        return pa.types.is_string(t) or pa.types.is_large_string(t)
    if dtype == "int64":
        return pa.types.is_integer(t)
    if dtype == "float64":
        return pa.types.is_integer(t) or pa.types.is_floating(t)
    if dtype == "bool":
        return pa.types.is_boolean(t)
    if dtype == "timestamp":
        return pa.types.is_timestamp(t) and t.tz is not None
    return False


def check_rules(table: Any, df: Any, columns: dict[str, str], rules: list,
                key: str) -> list[tuple[str, str | None, int, list]]:
    """The failed rules of ``df`` (its Arrow ``table`` for the types): (rule, column, offenders, first offenders)."""
    import numpy as np
    import pandas as pd

    failed: list[tuple[str, str | None, int, list]] = []
    names = list(df.columns)
    if len(set(names)) != len(names):
        failed.append(("unique_column_names", None, len(names) - len(set(names)), []))
    unusable = set()
    for name, dtype in columns.items():
        if name in df.columns and not _arrow_type_ok(table.schema.field(name).type, dtype):
            failed.append(("type", name, len(df), []))
            unusable.add(name)
        elif name in df.columns and dtype == "float64":
            bad = np.isinf(df[name].to_numpy(dtype="float64", na_value=np.nan))
            if bad.any():
                failed.append(("finite_values", name, int(bad.sum()), df[name][bad].head(PARTIAL).tolist()))
    if key in df.columns:  # an exact repeat repeats its key: compare whole rows only where keys repeat
        same_key = df[key].duplicated(keep=False).to_numpy()
        repeats = int(df[same_key].duplicated(keep="first").sum()) if same_key.any() else 0
    else:
        repeats = int(df.duplicated(keep="first").sum())
    if repeats:
        failed.append(("exact_duplicate_rows", None, repeats, []))

    n = len(df)
    for rule, kw, meta in rules:
        col = kw.get("column")
        if meta.get("min_rows", 0) > n or (col is not None and (col not in df.columns or col in unusable)):
            if rule == "expect_column_to_exist" and col not in df.columns:
                failed.append((rule, col, 0, []))
            continue
        s = df[col] if col is not None else None
        bad = None
        ok = True
        if rule == "expect_column_to_exist":
            continue
        if rule == "expect_table_row_count_to_be_between":
            ok = (kw.get("min_value") is None or n >= kw["min_value"]) and (
                kw.get("max_value") is None or n <= kw["max_value"])
        elif rule == "expect_column_values_to_not_be_null":
            bad = s.isna().to_numpy()
        elif rule == "expect_column_values_to_be_unique":
            bad = (s.duplicated(keep=False) & s.notna()).to_numpy()
        elif rule == "expect_column_values_to_be_between":
            lo, hi = kw.get("min_value"), kw.get("max_value")
            if isinstance(s.dtype, pd.DatetimeTZDtype):
                v = s.array.asi8
                lo = None if lo is None else pd.Timestamp(lo).value
                hi = None if hi is None else pd.Timestamp(hi).value
                present = s.notna().to_numpy()
            else:
                v = s.to_numpy(dtype="float64", na_value=np.nan)
                present = ~np.isnan(v)
            bad = np.zeros(n, dtype=bool)
            if lo is not None:
                bad |= (v <= lo) if kw.get("strict_min") else (v < lo)
            if hi is not None:
                bad |= (v >= hi) if kw.get("strict_max") else (v > hi)
            bad &= present
        elif rule == "expect_column_values_to_be_in_set":
            bad = (~s.isin(kw["value_set"]) & s.notna()).to_numpy()
        elif rule == "expect_column_proportion_of_non_null_values_to_be_between":
            share = float(s.notna().mean()) if n else 0.0
            ok = (kw.get("min_value") is None or share >= kw["min_value"]) and (
                kw.get("max_value") is None or share <= kw["max_value"])
        elif rule == "expect_column_unique_value_count_to_be_between":
            distinct = s.nunique(dropna=True)
            ok = (kw.get("min_value") is None or distinct >= kw["min_value"]) and (
                kw.get("max_value") is None or distinct <= kw["max_value"])
        elif rule == "expect_column_mean_to_be_between":
            mean = float(s.mean())
            ok = (kw.get("min_value") is None or mean >= kw["min_value"]) and (
                kw.get("max_value") is None or mean <= kw["max_value"])
        else:
            raise NotImplementedError(f"the floor does not know {rule}: add it (the suite grew a rule)")
        if bad is not None:
            count = int(bad.sum())
            if count:
                failed.append((rule, col, count, s[bad].head(PARTIAL).tolist()))
        elif not ok:
            failed.append((rule, col, n, []))
    return failed


def floor_partition(data: bytes, columns: dict[str, str], rules: list, key: str) -> tuple[int, list]:
    """Hash, read and check one landed file (what validate_partition does, with plain pyarrow/pandas)."""
    import pyarrow.parquet as pq

    hashlib.sha256(data).hexdigest()
    table = pq.ParquetFile(io.BytesIO(data)).read()
    df = table.to_pandas()
    return len(df), check_rules(table, df, columns, rules, key)


# -- the stage -------------------------------------------------------------------------------------
def run(w: World, quick: bool) -> list[Result]:
    import pandas as pd
    import pyarrow as pa

    from closedloop.stages.validation import validate_frame, validate_partition

    w.ingested()
    rt = w.runtime()
    lake, contract = rt.lake, rt.contract
    columns = contract.landing_columns
    uris = [lake.partition("landing", "transactions", d) for d in w.days]
    frames = [lake.read_parquet(u) for u in uris]
    rows = sum(len(f) for f in frames)
    data_mib = sum(frame_mib(f) for f in frames)
    results: list[Result] = []

    # daily partitions, as the DAG's validate task does them
    def project_days() -> list:
        return [validate_partition(lake, u, contract, "transactions", d) for u, d in zip(uris, w.days, strict=True)]

    validate_frame(frames[0].head(50), contract, "transactions", w.days[0])  # GX's imports and first-use caches
    figure = measure(project_days)
    rules_by_day = {d: suite_rules(contract, d) for d in w.days}  # the suites' rules, derived before timing

    def floor_days() -> list:
        return [floor_partition(lake.read_bytes(u), columns, rules_by_day[d], contract.row_key)
                for u, d in zip(uris, w.days, strict=True)]

    floor = measure(floor_days)
    blocking = sum(len(r.blocking) for r in figure.result)
    floor_failed = sum(len(f) for _, f in floor.result)
    results.append(Result.of(
        STAGE, f"daily partitions ({len(uris)} files)", w.rows, figure, floor, data_mib, work_rows=rows,
        notes=f"validate_partition per landed day, {len(columns)} contract columns; floor: read+sha256+same rules "
              f"in pandas/pyarrow; findings {sum(len(r.findings) for r in figure.result)} vs {floor_failed} "
              f"(blocking {blocking})"))

    # the window as one frame of N rows (timestamps moved into the first day, untimed)
    day = w.days[0]
    one = pd.concat(frames, ignore_index=True)
    ts = contract.event_timestamp
    one[ts] = pd.Timestamp(day, tz="UTC") + (one[ts] - one[ts].dt.floor("D"))
    table = pa.Table.from_pandas(one, preserve_index=False)
    rules = suite_rules(contract, day)
    del frames
    figure = measure(lambda: validate_frame(one, contract, "transactions", day))
    floor = measure(lambda: check_rules(table, one, columns, rules, contract.row_key))
    results.append(Result.of(
        STAGE, "one frame (validate_frame)", w.rows, figure, floor, frame_mib(one), work_rows=len(one),
        notes=f"{len(one)} rows x {len(columns)} cols in one GX batch; floor: same rules in pandas/pyarrow; "
              f"findings {len(figure.result.findings)} vs {len(floor.result)}"))
    return results

