"""The data contract: one declarative schema file per data set.

Everything that depends on the shape of the data derives from :class:`DataContract`: the landing
columns and their types, the blocking and warning checks (see :mod:`closedloop.stages.validation`), the
customer aggregates and the Feast definitions (see :mod:`closedloop.stages.features`) and the model's
feature list (:attr:`DataContract.model_features`).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from closedloop.core.errors import ContractError
from closedloop.core.labels import ShareBand, parse_share_band

DTYPES = {"string", "int64", "float64", "category", "bool"}
AGG_FUNCTIONS = {"count", "sum", "mean", "std", "max", "min", "time_since_last"}
_WINDOW = re.compile(r"^(\d+)([dh])$")


def parse_window(text: str) -> timedelta:
    """Parse a window such as ``7d`` or ``12h``."""
    m = _WINDOW.match(str(text))
    if not m:
        raise ContractError(f"window {text!r}: write it as <number>d or <number>h")
    n, unit = int(m.group(1)), m.group(2)
    return timedelta(days=n) if unit == "d" else timedelta(hours=n)


@dataclass(frozen=True)
class Column:
    """A column of the landing data."""

    name: str
    dtype: str
    role: str = "feature"  # feature | attribute
    nullable: bool = True
    categories: tuple[str, ...] = ()
    block: dict[str, Any] = field(default_factory=dict)
    warn: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    drift: dict[str, Any] = field(default_factory=dict)  # see _drift_settings


@dataclass(frozen=True)
class Aggregate:
    """A customer feature: ``function`` of ``column`` over the entity's events in ``window`` before each event."""

    name: str
    function: str
    window: timedelta
    column: str | None = None
    description: str = ""
    drift: dict[str, Any] = field(default_factory=dict)  # see _drift_settings


@dataclass(frozen=True)
class DataContract:
    """A parsed schema file."""

    name: str
    description: str
    version: int
    row_key: str
    entity: str
    entity_dtype: str
    entity_description: str
    event_timestamp: str
    label: str
    label_values: tuple[int, ...]
    label_timestamp: str
    columns: tuple[Column, ...]
    feature_view: str
    ttl: timedelta
    lookback: timedelta
    aggregates: tuple[Aggregate, ...]
    checks: dict[str, Any]
    path: Path | None = None
    sha256: str = ""
    label_share: ShareBand | None = None  # label.expected_share (closedloop.core.labels)

    # -- derived views -------------------------------------------------------------------------
    @property
    def transaction_features(self) -> list[str]:
        """Request-time features: landing columns with ``role: feature``."""
        return [c.name for c in self.columns if c.role == "feature"]

    @property
    def entity_features(self) -> list[str]:
        """Customer features served by Feast."""
        return [a.name for a in self.aggregates]

    @property
    def model_features(self) -> list[str]:
        """The model's inputs, in order."""
        return self.transaction_features + self.entity_features

    @property
    def categorical(self) -> dict[str, tuple[str, ...]]:
        """Categorical columns and their declared categories."""
        return {c.name: c.categories for c in self.columns if c.dtype == "category"}

    @property
    def landing_columns(self) -> dict[str, str]:
        """Every column a transaction partition must have, with its declared type."""
        cols = {self.row_key: "string", self.entity: self.entity_dtype, self.event_timestamp: "timestamp"}
        cols.update({c.name: c.dtype for c in self.columns})
        return cols

    @property
    def label_columns(self) -> dict[str, str]:
        """Every column a label partition must have."""
        return {self.row_key: "string", self.label: "int64", self.label_timestamp: "timestamp"}

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    @property
    def drift_settings(self) -> dict[str, dict[str, Any]]:
        """Model features with a ``drift:`` setting in the schema: ``exclude``, ``threshold``, ``calibrate``."""
        out = {c.name: c.drift for c in self.columns if c.role == "feature" and c.drift}
        out.update({a.name: a.drift for a in self.aggregates if a.drift})
        return out

    @property
    def feature_refs(self) -> list[str]:
        """Feast feature references (``view:feature``) of the entity features."""
        return [f"{self.feature_view}:{a.name}" for a in self.aggregates]


def _require(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ContractError(f"{where}: missing required key {key!r}")
    return d[key]


def _drift_settings(raw: Any, where: str) -> dict[str, Any]:
    """A feature's ``drift:`` mapping, checked: ``exclude`` (bool: measured and reported, never acted on),
    ``threshold`` (number >= 0: the feature's own rule, drift when its statistic reaches it, instead of a
    calibrated band), ``calibrate`` (bool, default true: false keeps the policy's fixed threshold)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ContractError(f"{where}: drift must be a mapping (exclude, threshold, calibrate)")
    unknown = sorted(set(raw) - {"exclude", "threshold", "calibrate"})
    if unknown:
        raise ContractError(f"{where}: drift: unknown key(s) {unknown}; use exclude, threshold or calibrate")
    out: dict[str, Any] = {}
    for key in ("exclude", "calibrate"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise ContractError(f"{where}: drift.{key}={raw[key]!r}: expected true or false")
            out[key] = raw[key]
    if "threshold" in raw:
        t = raw["threshold"]
        if isinstance(t, bool) or not isinstance(t, int | float) or t < 0:
            raise ContractError(f"{where}: drift.threshold={t!r}: expected a number >= 0")
        out["threshold"] = float(t)
    return out


def load_contract(path: str | Path) -> DataContract:
    """Load and check the schema file at ``path``; errors name the file and the offending key."""
    path = Path(path)
    try:
        text = path.read_bytes()
        raw = yaml.safe_load(text)
    except FileNotFoundError as exc:
        raise ContractError(f"{path}: schema file not found") from exc
    except yaml.YAMLError as exc:
        raise ContractError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ContractError(f"{path}: expected a mapping at the top level")
    where = str(path)
    keys = _require(raw, "keys", where)
    row = _require(keys, "row", f"{where}: keys")
    ent = _require(keys, "entity", f"{where}: keys")
    label = _require(raw, "label", where)
    columns = []
    seen: set[str] = set()
    for i, c in enumerate(_require(raw, "columns", where)):
        cw = f"{where}: columns[{i}]"
        name = _require(c, "name", cw)
        dtype = _require(c, "dtype", cw)
        if dtype not in DTYPES:
            raise ContractError(f"{cw} ({name}): dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if dtype == "category" and not c.get("categories"):
            raise ContractError(f"{cw} ({name}): a category column needs its list of categories")
        if name in seen:
            raise ContractError(f"{cw}: column {name!r} declared twice")
        seen.add(name)
        role = c.get("role", "feature")
        if role not in {"feature", "attribute"}:
            raise ContractError(f"{cw} ({name}): role must be feature or attribute, not {role!r}")
        columns.append(
            Column(
                name=name,
                dtype=dtype,
                role=role,
                nullable=bool(c.get("nullable", True)),
                categories=tuple(str(x) for x in c.get("categories", ())),
                block=dict(c.get("block", {})),
                warn=dict(c.get("warn", {})),
                description=str(c.get("description", "")),
                drift=_drift_settings(c.get("drift"), f"{cw} ({name})"),
            )
        )
    ef = raw.get("entity_features") or {}
    aggregates = []
    for i, a in enumerate(ef.get("aggregates", [])):
        aw = f"{where}: entity_features.aggregates[{i}]"
        fn = _require(a, "function", aw)
        if fn not in AGG_FUNCTIONS:
            raise ContractError(f"{aw}: function {fn!r} is not one of {sorted(AGG_FUNCTIONS)}")
        col = a.get("column")
        if fn not in {"count", "time_since_last"}:
            if not col:
                raise ContractError(f"{aw}: function {fn!r} needs a column")
            if col not in seen:
                raise ContractError(f"{aw}: column {col!r} is not a declared column")
        name = _require(a, "name", aw)
        if name in seen:
            raise ContractError(f"{aw}: feature {name!r} clashes with a column of the same name")
        try:
            window = parse_window(_require(a, "window", aw))
        except ContractError as exc:
            raise ContractError(f"{aw}: {exc}") from exc
        aggregates.append(
            Aggregate(name=name, function=fn, window=window, column=col,
                      description=str(a.get("description", "")), drift=_drift_settings(a.get("drift"), aw))
        )
    lookback = timedelta(days=int(ef.get("lookback_days", 30)))
    if aggregates and max(a.window for a in aggregates) > lookback:
        raise ContractError(f"{where}: entity_features.lookback_days is shorter than the longest window")
    values = tuple(int(v) for v in label.get("values", (0, 1)))
    return DataContract(
        name=str(_require(raw, "name", where)),
        description=str(raw.get("description", "")),
        version=int(raw.get("version", 1)),
        row_key=_require(row, "name", f"{where}: keys.row"),
        entity=_require(ent, "name", f"{where}: keys.entity"),
        entity_dtype=str(ent.get("dtype", "int64")),
        entity_description=str(ent.get("description", "")),
        event_timestamp=str(_require(raw, "event_timestamp", where)),
        label=str(_require(label, "name", f"{where}: label")),
        label_values=values,
        label_timestamp=str(label.get("timestamp", "label_timestamp")),
        columns=tuple(columns),
        feature_view=str(ef.get("view", f"{raw['name']}_entity")),
        ttl=timedelta(days=int(ef.get("ttl_days", 45))),
        lookback=lookback,
        aggregates=tuple(aggregates),
        checks=dict(raw.get("checks", {})),
        path=path.resolve(),
        sha256=hashlib.sha256(text).hexdigest(),
        label_share=parse_share_band(label, dict(raw.get("checks") or {}), where),
    )
