"""Validation of a landed daily partition against its data contract.

The checks derive from :class:`closedloop.core.schema.DataContract`: :func:`build_suite` turns the contract into a
Great Expectations (1.x) :class:`~great_expectations.ExpectationSuite` whose expectations carry their severity
in ``meta["severity"]``:

- ``block`` (the partition must not be used): every contract column present, the row key and non-nullable
  columns not null, the row key unique, label values in their domain, event (label) timestamps inside the
  partition's day, the ``block`` ranges of the columns, at least ``checks.block.min_rows`` rows;
- ``warn`` (let the data through, tell the operator): the ``warn`` ranges of the columns, their
  ``warn.max_null_share``, category values outside the declared categories, a feature column holding one
  value only (from :data:`CONSTANT_MIN_ROWS` rows on), and for labels the positive share outside
  ``label.expected_share.warn`` (only from :data:`POSITIVE_SHARE_MIN_ROWS` rows on); a positive share
  surely outside ``label.expected_share.block`` blocks (``label_share_implausible``, :mod:`closedloop.core.labels`).

Two lossless repairs are ``normalise`` findings (the data goes through, repaired, and the repair is recorded):
timestamps with a time zone other than UTC are converted to UTC, and rows that repeat another row exactly (a
batch delivered twice into one file) are dropped. :func:`closedloop.stages.ingest.normalise` applies them.

Column types are checked with pandas before GX runs (rule ``expect_column_values_to_be_in_type_list``): a
column of the wrong type would make GX's value checks crash or compare nonsense, so its value checks are
skipped and the type problem is reported instead. Infinite values in a number column are blocking
(``finite_values``: no model can use them). A column the contract does not know is a warning
(``unexpected_column``; it is dropped when curated); a file that is not readable Parquet is one blocking
finding (``readable_parquet``).

Nothing here raises for bad data: :func:`validate_partition` returns a :class:`ValidationResult`;
quarantining the file and failing the task is the caller's business.

The module is imported at DAG parse time: great_expectations (several seconds to import) and pandas are
imported inside the functions.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from closedloop.core.errors import first_line
from closedloop.core.labels import BLOCK_RULE, judge_share
from closedloop.core.schema import DataContract

if TYPE_CHECKING:
    import great_expectations as gx
    import pandas as pd

    from closedloop.core.lake import Lake

KINDS = ("transactions", "labels")
BLOCK = "block"
WARN = "warn"
NORMALISE = "normalise"
SAMPLE_SIZE = 10
# GX returns the first PARTIAL_COUNT offending values of each failed expectation; the sample is the first
# SAMPLE_SIZE distinct ones among them.
PARTIAL_COUNT = 20
# Below this many label rows the positive share is too noisy to warn about.
POSITIVE_SHARE_MIN_ROWS = 1000
# Below this many rows a feature column with a single value may be chance, not a broken feed.
CONSTANT_MIN_ROWS = 1000

TYPE_RULE = "expect_column_values_to_be_in_type_list"
UNEXPECTED_COLUMN_RULE = "unexpected_column"
DUPLICATE_COLUMN_RULE = "unique_column_names"
READABLE_RULE = "readable_parquet"
FINITE_RULE = "finite_values"
UTC_RULE = "timestamps_normalised_to_utc"
EXACT_DUPLICATES_RULE = "exact_duplicate_rows_dropped"


# -- results ---------------------------------------------------------------------------------------
@dataclass
class Finding:
    """One failed rule."""

    rule: str  # a GX expectation type, or one of the pandas-side rules above
    column: str | None
    severity: str  # "block" | "warn" | "normalise"
    message: str
    unexpected_count: int = 0
    sample: list = field(default_factory=list)  # up to SAMPLE_SIZE offending values, JSON-safe

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        where = f" on column {self.column!r}" if self.column is not None else ""
        text = f"{self.rule}{where}: {self.message}"
        if self.sample:
            text += f" Sample: {', '.join(_show(v) for v in self.sample)}."
        return text


@dataclass
class ValidationResult:
    """The outcome of validating one partition."""

    uri: str
    kind: str
    day: str  # ISO date
    rows: int
    sha256: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when no blocking rule failed (warnings let the data through)."""
        return not self.blocking

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == BLOCK]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARN]

    @property
    def normalised(self) -> list[Finding]:
        """The lossless repairs the curated partition gets (see the module docstring)."""
        return [f for f in self.findings if f.severity == NORMALISE]

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "kind": self.kind,
            "day": self.day,
            "rows": self.rows,
            "sha256": self.sha256,
            "passed": self.passed,
            "blocking": len(self.blocking),
            "warnings": len(self.warnings),
            "normalised": len(self.normalised),
            "findings": [f.to_dict() for f in self.findings],
        }

    def summary(self) -> str:
        """A message for the operator: the file, each failed rule with its column and samples, what to do."""
        state = "FAILED" if not self.passed else "passed"
        lines = [
            f"Validation of {self.kind} partition {self.day} {state}: {self.uri}",
            f"({self.rows} rows, sha256 {self.sha256[:16] or 'n/a'}; "
            f"{len(self.blocking)} blocking problem(s), {len(self.warnings)} warning(s)"
            + (f", {len(self.normalised)} repair(s))" if self.normalised else ")"),
        ]
        if self.blocking:
            lines.append("Blocking problems:")
            lines += [f"  - {f.describe()}" for f in self.blocking]
        if self.warnings:
            lines.append("Warnings (the data is let through):")
            lines += [f"  - {f.describe()}" for f in self.warnings]
        if self.normalised:
            lines.append("Normalised (lossless repairs applied to the curated data, recorded here):")
            lines += [f"  - {f.describe()}" for f in self.normalised]
        if not self.passed:
            lines.append(
                f"What to do: this file must not be used as it is. Fix the file and re-deliver it for "
                f"{self.day} (it is validated again when it lands), or, if the data is right after all, "
                f"release it from quarantine (and correct the data contract so that it accepts such data)."
            )
        elif self.warnings:
            lines.append(
                "What to do: nothing is required; check whether the warnings show a real change in the data "
                "(drift, an upstream problem) or a contract that needs updating."
            )
        return "\n".join(lines)


# -- the suite -------------------------------------------------------------------------------------
def _columns(contract: DataContract, kind: str) -> dict[str, str]:
    if kind == "transactions":
        return contract.landing_columns
    if kind == "labels":
        return contract.label_columns
    raise ValueError(f"kind {kind!r} is not one of {KINDS}")


def _not_null_columns(contract: DataContract, kind: str) -> list[str]:
    if kind == "labels":
        return list(contract.label_columns)
    cols = [contract.row_key, contract.entity, contract.event_timestamp]
    return cols + [c.name for c in contract.columns if not c.nullable and c.name not in cols]


def _time_column(contract: DataContract, kind: str) -> str:
    return contract.label_timestamp if kind == "labels" else contract.event_timestamp


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(date(day.year, day.month, day.day), time(), tzinfo=UTC)
    return start, start + timedelta(days=1)


def build_suite(contract: DataContract, kind: str, day: date) -> gx.ExpectationSuite:
    """The GX suite of ``kind`` partitions of ``day``, derived from ``contract``.

    Each expectation's ``meta`` holds ``severity`` (``block`` | ``warn``) and ``rule`` (the rule in words);
    ``meta["min_rows"]``, where present, skips the expectation on smaller partitions. Column types are not
    in the suite: :func:`validate_frame` checks them with pandas first.
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.expectations.metadata_types import FailureSeverity

    columns = _columns(contract, kind)
    start, end = _day_bounds(day)
    exps: list[Any] = []

    def add(cls: Any, severity: str, rule: str, min_rows: int | None = None, **kwargs: Any) -> None:
        meta: dict[str, Any] = {"severity": severity, "rule": rule}
        if min_rows:
            meta["min_rows"] = min_rows
        exps.append(
            cls(
                **kwargs,
                meta=meta,
                severity=FailureSeverity.CRITICAL if severity == BLOCK else FailureSeverity.WARNING,
                catch_exceptions=True,
            )
        )

    for name, dtype in columns.items():
        add(gxe.ExpectColumnToExist, BLOCK, f"the contract requires this column (type {dtype})", column=name)
    min_rows = int((contract.checks.get("block") or {}).get("min_rows", 1))
    add(gxe.ExpectTableRowCountToBeBetween, BLOCK, f"a partition needs at least {min_rows} row(s)",
        min_value=min_rows)
    for name in _not_null_columns(contract, kind):
        add(gxe.ExpectColumnValuesToNotBeNull, BLOCK, "values must not be null", column=name)
    add(gxe.ExpectColumnValuesToBeUnique, BLOCK, "the row key must be unique", column=contract.row_key)
    add(gxe.ExpectColumnValuesToBeBetween, BLOCK,
        f"timestamps must lie in the partition's day [{_show(start)}, {_show(end)})",
        column=_time_column(contract, kind), min_value=start, max_value=end, strict_max=True)

    if kind == "labels":
        values = list(contract.label_values)
        add(gxe.ExpectColumnValuesToBeInSet, BLOCK, f"labels must be one of {values}",
            column=contract.label, value_set=values)
        lo, hi = contract.label_share.warn if contract.label_share and contract.label_share.warn else (None, None)
        if (lo is not None or hi is not None) and set(values) <= {0, 1}:
            # For 0/1 labels the mean is the positive share.
            add(gxe.ExpectColumnMeanToBeBetween, WARN,
                f"the positive share should lie in [{_show(lo)}, {_show(hi)}]",
                min_rows=POSITIVE_SHARE_MIN_ROWS, column=contract.label,
                min_value=None if lo is None else float(lo), max_value=None if hi is None else float(hi))
    else:
        for col in contract.columns:
            block_range = _range(col.block)
            if block_range:
                add(gxe.ExpectColumnValuesToBeBetween, BLOCK,
                    f"values must lie in [{_show(block_range[0])}, {_show(block_range[1])}]",
                    column=col.name, min_value=block_range[0], max_value=block_range[1])
            warn_range = _range(col.warn)
            if warn_range and warn_range != block_range:
                add(gxe.ExpectColumnValuesToBeBetween, WARN,
                    f"values are expected in [{_show(warn_range[0])}, {_show(warn_range[1])}]",
                    column=col.name, min_value=warn_range[0], max_value=warn_range[1])
            share = col.warn.get("max_null_share")
            if share is not None:
                add(gxe.ExpectColumnProportionOfNonNullValuesToBeBetween, WARN,
                    f"at most {_pct(float(share))} of the values should be null",
                    min_rows=1, column=col.name, min_value=1.0 - float(share))
            if col.role == "feature":
                add(gxe.ExpectColumnUniqueValueCountToBeBetween, WARN,
                    "a feature should not hold a single value (a constant column is a broken feed or a default "
                    "filled in upstream)", min_rows=CONSTANT_MIN_ROWS, column=col.name, min_value=2)
            if col.dtype == "category":
                add(gxe.ExpectColumnValuesToBeInSet, WARN,
                    f"values are expected among the declared categories {list(col.categories)}",
                    column=col.name, value_set=list(col.categories))

    return gx.ExpectationSuite(
        name=f"{contract.name}.{kind}",
        expectations=exps,
        meta={
            "contract": contract.name,
            "contract_version": contract.version,
            "contract_sha256": contract.sha256,
            "kind": kind,
            "day": day.isoformat(),
        },
    )


def _range(spec: dict[str, Any]) -> tuple[Any, Any] | None:
    lo, hi = spec.get("min"), spec.get("max")
    return None if lo is None and hi is None else (lo, hi)


# -- pandas-side structure checks -------------------------------------------------------------------
def _is_utc(tz: Any) -> bool:
    import pandas as pd

    # A zone with no offset in winter nor in summer is UTC for all practical purposes (UTC, Etc/UTC, ...).
    return all(pd.Timestamp(f"2000-{m}-01", tz=tz).utcoffset() == timedelta(0) for m in ("01", "07"))


def _fits(value: Any, dtype: str) -> bool:
    """Whether one Python value (of an object column) is a value of the contract type ``dtype``."""
    import numpy as np

    if isinstance(value, bool | np.bool_):
        return dtype == "bool"
    if dtype in ("string", "category"):
        return isinstance(value, str)
    if dtype == "int64":
        return isinstance(value, int | np.integer)
    if dtype == "float64":
        return isinstance(value, int | float | np.integer | np.floating)
    return False


def _outside_int64(s: pd.Series) -> pd.Series | None:
    """The values of an integer-like column that int64 cannot hold (unsigned, float or Python ints)."""
    import numpy as np
    from pandas.api import types as pdt

    lo, hi = -(2**63), 2**63 - 1
    if pdt.is_unsigned_integer_dtype(s.dtype):
        return s[s.to_numpy() > np.uint64(hi)]
    if pdt.is_float_dtype(s.dtype):
        v = s.to_numpy(dtype="float64", na_value=np.nan)
        return s[(v < -(2.0**63)) | (v >= 2.0**63)]
    if s.dtype == object:
        non_null = s.dropna()
        return non_null[[isinstance(x, int | np.integer) and not isinstance(x, bool | np.bool_)
                         and not lo <= int(x) <= hi for x in non_null]]
    return None


_WANTED = {"string": "strings", "category": "strings (category labels)", "int64": "integers",
           "float64": "numbers", "bool": "booleans"}


def _type_problem(s: pd.Series, dtype: str) -> tuple[str, int, list] | None:
    """``(message, offending count, sample)`` when ``s`` cannot hold ``dtype`` values, else None."""
    import pandas as pd
    from pandas.api import types as pdt

    inferred = pdt.infer_dtype(s, skipna=True) if s.dtype == object else None
    if inferred == "empty":  # no non-null value: nothing contradicts the type (null checks judge the rest)
        return None

    if dtype == "timestamp":
        if isinstance(s.dtype, pd.DatetimeTZDtype):
            return None  # another zone names the same instants: validate_frame normalises it to UTC
        if pdt.is_datetime64_dtype(s.dtype):
            problem = ("has naive timestamps (no time zone) where the contract requires timezone-aware UTC "
                       "timestamps")
        else:
            problem = f"has type {s.dtype} where the contract requires timezone-aware UTC timestamps"
        non_null = s.dropna()
        return problem, len(non_null), sample_values(non_null)

    if dtype in ("string", "category"):
        if isinstance(s.dtype, pd.CategoricalDtype):
            ok = pdt.infer_dtype(s.dtype.categories, skipna=True) in ("string", "empty")
        else:
            ok = inferred == "string" if s.dtype == object else isinstance(s.dtype, pd.StringDtype)
    elif dtype == "int64":
        # pandas holds an integer column with nulls as float64: whole numbers with nulls are integers with
        # nulls (the null checks report the nulls).
        ok = pdt.is_integer_dtype(s.dtype) or (
            pdt.is_float_dtype(s.dtype) and bool(s.isna().any()) and bool((s.dropna() % 1 == 0).all())
        )
        outside = _outside_int64(s) if ok or s.dtype == object else None
        if outside is not None and len(outside):
            return (f"holds {len(outside)} value(s) outside the int64 range [-2^63, 2^63 - 1] of the contract "
                    f"(stored, they would wrap to other numbers)", len(outside), sample_values(outside))
    elif dtype == "float64":
        ok = pdt.is_integer_dtype(s.dtype) or pdt.is_float_dtype(s.dtype)  # bool is neither
    elif dtype == "bool":
        ok = pdt.is_bool_dtype(s.dtype)
    else:  # the contract loader only admits the types above
        raise ValueError(f"unknown contract dtype {dtype!r}")
    if ok:
        return None

    non_null = s.dropna()
    if s.dtype == object:  # judge value by value: report only the values of the wrong kind
        bad = non_null[[not _fits(x, dtype) for x in non_null]]
        if bad.empty:  # an object column that holds only values of the right kind
            return None
        kinds = ", ".join(sorted({type(x).__name__ for x in bad}))
        return (f"holds {kinds} values where the contract declares {dtype} ({_WANTED[dtype]})",
                len(bad), sample_values(bad))
    return (f"has type {s.dtype} where the contract declares {dtype} ({_WANTED[dtype]})",
            len(non_null), sample_values(non_null))


# -- validation ------------------------------------------------------------------------------------
def validate_frame(
    df: pd.DataFrame,
    contract: DataContract,
    kind: str,
    day: date,
    *,
    uri: str = "<frame>",
    sha256: str = "",
) -> ValidationResult:
    """Validate the ``kind`` partition of ``day`` held in ``df``; never raises for bad data."""
    columns = _columns(contract, kind)
    findings: list[Finding] = []
    result = ValidationResult(uri=uri, kind=kind, day=day.isoformat(), rows=len(df), sha256=sha256,
                              findings=findings)

    names = [str(c) for c in df.columns]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        for name in sorted(duplicated):
            findings.append(Finding(DUPLICATE_COLUMN_RULE, name, BLOCK,
                                    f"the file has {names.count(name)} columns named {name!r}; column names "
                                    f"must be unique.", names.count(name)))
        df = df.loc[:, [n not in duplicated for n in names]]
    unusable: set[str] = set(duplicated)
    if any(not isinstance(c, str) for c in df.columns):
        df = df.rename(columns=str)  # a copy: the caller's frame is never modified

    key = contract.row_key if contract.row_key in df.columns else None
    repeats = exact_duplicates(df, key)
    if repeats is not None and repeats.any():
        findings.append(Finding(
            EXACT_DUPLICATES_RULE, key, NORMALISE,
            f"{int(repeats.sum())} row(s) repeat another row of the file exactly (every column equal); the "
            f"repeats are dropped. The sample lists their {key or 'row positions'}.", int(repeats.sum()),
            sample_values(df.loc[repeats, key] if key else repeats[repeats].index.to_series())))
        df = df.loc[~repeats.to_numpy()]

    for name in df.columns:
        if name not in columns:
            findings.append(Finding(UNEXPECTED_COLUMN_RULE, name, WARN,
                                    f"column {name!r} is not in the data contract {contract.name!r} (v"
                                    f"{contract.version}); it is not validated. Add it to the contract or "
                                    f"stop sending it."))
    for name, dtype in columns.items():
        if name not in df.columns:
            continue
        problem = _type_problem(df[name], dtype)
        if problem:
            message, count, sample = problem
            findings.append(Finding(TYPE_RULE, name, BLOCK, f"column {name!r} {message}.", count,
                                    sample))
            unusable.add(name)
        elif dtype == "timestamp" and not _is_utc(df[name].dtype.tz):
            zone = df[name].dtype.tz
            df = df.assign(**{name: df[name].dt.tz_convert("UTC")})
            findings.append(Finding(UTC_RULE, name, NORMALISE,
                                    f"column {name!r} has timestamps in time zone {zone}; they are converted to "
                                    f"UTC (the same instants).", int(df[name].notna().sum())))
        elif dtype == "float64":
            infinite = _infinite(df[name])
            if infinite.any():
                findings.append(Finding(FINITE_RULE, name, BLOCK,
                                        f"column {name!r} holds {int(infinite.sum())} infinite value(s): values "
                                        f"must be finite numbers (or null where the column is nullable).",
                                        int(infinite.sum()), sample_values(df.loc[infinite.to_numpy(), name])))
    if kind == "labels" and contract.label in df.columns and contract.label not in unusable:
        findings.extend(_label_share_findings(df[contract.label], contract))
    frame = _gx_frame(df, columns, unusable)
    present = set(frame.columns)

    suite = build_suite(contract, kind, day)
    runnable = []
    for exp in suite.expectations:
        column = getattr(exp, "column", None)
        if exp.expectation_type == "expect_column_to_exist":
            if column in duplicated:
                continue  # reported above
        elif column is not None and (column not in present or column in unusable):
            continue  # missing (reported by expect_column_to_exist) or unusable (reported above)
        if (exp.meta or {}).get("min_rows", 0) > len(df):
            continue
        runnable.append(exp)

    if runnable:
        findings.extend(_run_gx(frame, suite, runnable, contract, kind))
    order = {BLOCK: 0, WARN: 1, NORMALISE: 2}
    findings.sort(key=lambda f: order.get(f.severity, 2))
    return result


def _label_share_findings(labels: pd.Series, contract: DataContract) -> list[Finding]:
    """A blocking finding when the day's positive share is surely outside ``label.expected_share.block``."""
    known = labels[labels.isin(list(contract.label_values))]
    verdict = judge_share(int((known == max(contract.label_values)).sum()), len(known), contract.label_share,
                          "this label day")
    if verdict.level != "block":
        return []
    return [Finding(BLOCK_RULE, contract.label, BLOCK, verdict.message + ".", verdict.positives)]


def exact_duplicates(df: pd.DataFrame, key: str | None = None) -> pd.Series | None:
    """Which rows repeat an earlier row exactly (every column equal); None when the values cannot be compared.

    With ``key`` (the row key, when the frame has it) only the rows whose key repeats are compared column
    by column: a row that repeats another exactly repeats its key, so the answer is the same, and a file
    whose keys are unique (the usual case) costs one hashed column instead of all of them.
    """
    import pandas as pd

    if df.empty:
        return None
    try:
        if key is None or key not in df.columns or list(df.columns).count(key) != 1:
            return df.duplicated(keep="first")
        same_key = df[key].duplicated(keep=False).to_numpy()
        repeats = pd.Series(False, index=df.index)
        if same_key.any():
            repeats.iloc[same_key.nonzero()[0]] = df.loc[same_key].duplicated(keep="first").to_numpy()
        return repeats
    except TypeError:  # unhashable values (lists, dicts): a type finding reports the column
        return None


def _infinite(s: pd.Series) -> pd.Series:
    import numpy as np
    import pandas as pd

    values = s.to_numpy(dtype="float64", na_value=np.nan)
    return pd.Series(np.isinf(values), index=s.index)


def _gx_frame(df: pd.DataFrame, columns: dict[str, str], unusable: set[str]) -> pd.DataFrame:
    """The frame GX validates: the contract's columns only, string columns as pandas categoricals.

    A new, consolidated frame with a 0-based RangeIndex (so that GX's unexpected index lists are row
    positions). GX copies the whole frame for each column check (it filters out the nulls first), so
    fewer columns and small categorical codes instead of Python strings make it about twice as fast
    (the values GX reports are the same strings). The categories are left in order of appearance
    (``factorize`` without sorting): sorting a million distinct row keys took longer than GX's checks.
    """
    import pandas as pd

    data = {}
    for name, dtype in columns.items():
        if name not in df.columns:
            continue
        s = df[name]
        if dtype in ("string", "category") and name not in unusable and not isinstance(
            s.dtype, pd.CategoricalDtype
        ):
            codes, uniques = pd.factorize(s, sort=False)
            data[name] = pd.Categorical.from_codes(codes, categories=pd.Index(uniques, dtype=object))
            continue
        data[name] = s.array
    return pd.DataFrame(data, index=pd.RangeIndex(len(df)))


_INDEX = "closedloop_index"  # meta key naming an expectation in _run_gx's first pass


def _run_gx(frame: pd.DataFrame, suite: Any, expectations: list[Any], contract: DataContract,
            kind: str) -> list[Finding]:
    """The findings of GX's run of ``expectations`` on ``frame``.

    Two passes over one batch: every expectation with ``BOOLEAN_ONLY`` results (pass or fail, none of the
    unexpected lists and value counts of a ``SUMMARY``: about a third of the time, on a partition of a few
    thousand rows as on a million), then only the failed ones again with ``SUMMARY`` results, which the
    findings are made of. A failed expectation gives the same result either way: same configuration, same
    batch. The batch is validated directly (``Batch.validate``): nothing is stored in the context.
    """
    import great_expectations as gx
    from great_expectations.data_context import project_manager, set_context
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )
    from great_expectations.exceptions import DataContextRequiredError

    # A fresh in-memory context per call (about 20 ms): nothing (cached batches, execution engines,
    # stored results) carries over from one partition to the next. get_context() makes it the process's
    # current context; the previous one is put back afterwards, which also lets this one (and the frame its
    # execution engine holds) be garbage collected.
    try:
        previous = project_manager.get_current_project()
    except DataContextRequiredError:
        previous = None
    try:
        context = gx.get_context(
            mode="ephemeral",
            project_config=DataContextConfig(
                store_backend_defaults=InMemoryStoreBackendDefaults(),
                progress_bars=ProgressBarsConfig(globally=False),
                analytics_enabled=False,
            ),
        )
        batch = (
            context.data_sources.add_pandas("closedloop")
            .add_dataframe_asset(f"{contract.name}_{kind}")
            .add_batch_definition_whole_dataframe("partition")
            .get_batch(batch_parameters={"dataframe": frame})
        )

        def run(exps: list[Any], result_format: dict[str, Any], tag: bool = False) -> list[Any]:
            copies = [e.copy() for e in exps]
            if tag:  # GX lists the results in its own order (failed graphs first): name each expectation
                for i, e in enumerate(copies):
                    e.meta = {**(e.meta or {}), _INDEX: i}
            run_suite = gx.ExpectationSuite(name=suite.name, expectations=copies, meta=suite.meta)
            return list(batch.validate(run_suite, result_format=result_format).results)

        first = run(expectations, {"result_format": "BOOLEAN_ONLY"}, tag=True)
        failed = sorted(res.expectation_config.meta[_INDEX] for res in first if not res.success)
        outcome = run([expectations[i] for i in failed],
                      {"result_format": "SUMMARY", "partial_unexpected_count": PARTIAL_COUNT}) if failed else []
    finally:
        set_context(previous)
    return [_finding(res, frame, contract) for res in outcome if not res.success]


def _exception_message(info: Any) -> str | None:
    if not info:
        return None
    if isinstance(info, dict) and info.get("raised_exception"):
        return str(info.get("exception_message"))
    if isinstance(info, dict):  # {metric id: ExceptionInfo} when a metric failed
        for v in info.values():
            if isinstance(v, dict) and v.get("raised_exception"):
                return str(v.get("exception_message"))
    return None


def _finding(res: Any, df: pd.DataFrame, contract: DataContract) -> Finding:
    config = res.expectation_config
    rule = config.type
    kwargs = config.kwargs
    meta = config.meta or {}
    severity = meta.get("severity", BLOCK)
    column = kwargs.get("column")
    what = meta.get("rule", rule)
    r = dict(res.result or {})
    subject = f"column {column!r}" if column is not None else "the partition"

    error = _exception_message(res.exception_info)
    if error is not None:
        return Finding(rule, column, severity,
                       f"{subject}: the check ({what}) could not be evaluated: {error}.")

    if rule == "expect_column_to_exist":
        return Finding(rule, column, severity, f"column {column!r} is missing: {what}.")
    if rule == "expect_table_row_count_to_be_between":
        n = r.get("observed_value", len(df))
        return Finding(rule, None, severity, f"the partition has {n} row(s): {what}.")
    if rule == "expect_column_proportion_of_non_null_values_to_be_between":
        share = 1.0 - float(r.get("observed_value") or 0.0)
        nulls = int(df[column].isna().sum())
        return Finding(rule, column, severity,
                       f"{subject} is {_pct(share)} null ({nulls} of {len(df)} values): {what}.", nulls)
    if rule == "expect_column_mean_to_be_between":
        share = float(r.get("observed_value") or 0.0)
        return Finding(rule, column, severity, f"the positive share of {subject} is {_pct(share)}: {what}.",
                       round(share * len(df)), [])
    if rule == "expect_column_unique_value_count_to_be_between":
        n = int(r.get("observed_value") or 0)
        sample = sample_values(df[column].dropna().unique()[:1]) if n else []
        return Finding(rule, column, severity, f"{subject} holds {n} distinct value(s) in {len(df)} rows: {what}.",
                       len(df), sample)

    count = int(r.get("unexpected_count") or 0)
    total = int(r.get("element_count") or len(df))
    share = f"{count} of {total} rows ({_pct(count / total) if total else 'n/a'})"
    if rule == "expect_column_values_to_not_be_null":
        positions = [int(i) for i in (r.get("partial_unexpected_index_list") or [])]
        key = contract.row_key
        if column != key and key in df.columns:
            ids = [v for v in _json_safe(df[key].iloc[positions].tolist()) if v is not None][:SAMPLE_SIZE]
            return Finding(rule, column, severity, f"{subject} is null in {share}: {what}. The sample lists "
                           f"the {key} of offending rows.", count, ids)
        return Finding(rule, column, severity, f"{subject} is null in {share}: {what}. The sample lists the "
                       f"positions (0-based) of offending rows in the file.", count, positions[:SAMPLE_SIZE])
    values = r.get("partial_unexpected_list") or []
    sample = sample_values(values)
    if rule == "expect_column_values_to_be_unique":
        return Finding(rule, column, severity, f"{subject} has duplicated values in {share}: {what}.", count,
                       sample)
    if rule == "expect_column_values_to_be_in_set" and column in df.columns:  # name every new value
        known = set(kwargs.get("value_set") or [])
        new = sorted({str(v) for v in df[column].dropna().unique() if v not in known})
        return Finding(rule, column, severity, f"{subject} holds new value(s) {', '.join(map(repr, new[:20]))}"
                       f"{' ...' if len(new) > 20 else ''} in {share}: {what}.", count, sample)
    return Finding(rule, column, severity, f"{subject} breaks the rule in {share}: {what}.", count, sample)


def validate_partition(
    lake: Lake, uri: str, contract: DataContract, kind: str, day: date
) -> ValidationResult:
    """Read the Parquet file at ``uri`` through ``lake`` and validate it.

    A file that cannot be read as Parquet gives one blocking ``readable_parquet`` finding. Nothing is
    raised for bad data; errors of the storage itself (a missing file, a lost connection) propagate.
    """
    import pyarrow.parquet as pq

    _columns(contract, kind)  # reject an unknown kind before reading anything
    data = lake.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    try:
        if not data:
            raise ValueError("the file is empty (0 bytes)")
        # pyarrow's ParquetFile rather than pandas' dataset reader: it reads a file with duplicated column
        # names (which validate_frame then names) instead of failing on it.
        df = pq.ParquetFile(io.BytesIO(data)).read().to_pandas()
    except Exception as exc:  # anything that stops the file being decoded makes it unreadable
        return ValidationResult(
            uri=uri, kind=kind, day=day.isoformat(), rows=0, sha256=digest,
            findings=[Finding(READABLE_RULE, None, BLOCK,
                              f"the file ({len(data)} bytes) cannot be read as Parquet: "
                              f"{type(exc).__name__}: {first_line(str(exc))}.",
                              0, [_first_bytes(data)] if data else [])],
        )
    return validate_frame(df, contract, kind, day, uri=uri, sha256=digest)


# -- helpers ---------------------------------------------------------------------------------------
def _first_bytes(data: bytes) -> str:
    """The file's first bytes as printable text (a hint at what the file really is)."""
    return "".join(ch if ch.isprintable() else "." for ch in data[:40].decode("utf-8", errors="replace"))


def _json_safe(value: Any) -> Any:
    import numpy as np
    import pandas as pd

    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, pd.Timestamp | datetime | date):
        return None if pd.isna(value) else value.isoformat()
    if value is pd.NaT or value is pd.NA:
        return None
    return str(value)


def sample_values(values: Any) -> list:
    """Up to SAMPLE_SIZE distinct values, first seen first, JSON-safe."""
    out: list = []
    seen: set = set()
    for v in itertools.islice(iter(values), PARTIAL_COUNT * 50):
        j = _json_safe(v)
        try:
            k = (type(j).__name__, j)
            if k in seen:
                continue
            seen.add(k)
        except TypeError:
            pass
        out.append(j)
        if len(out) >= SAMPLE_SIZE:
            break
    return out


def _show(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, str):
        return repr(value)
    if value is None:
        return "null"
    return str(value)


def _pct(share: float) -> str:
    return f"{share * 100:.3g}%"
