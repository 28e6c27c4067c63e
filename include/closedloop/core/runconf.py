"""Run configurations: the JSON schema of each DAG's ``conf`` and the training window.

Every triggered run's ``conf`` is validated against one JSON schema with no unknown keys, before any
work. The window is explicit: a scheduled run trains on its data interval, a triggered one names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from closedloop.core.errors import ConfigError

RETRAINING_CONF_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "retraining run configuration",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "window_start": {"type": ["string", "null"], "format": "date",
                         "description": "first day of the window (inclusive)"},
        "window_end": {"type": ["string", "null"], "format": "date",
                       "description": "day after the last day (exclusive)"},
        "reason": {"type": ["string", "null"], "maxLength": 2000, "description": "why this run was started"},
        "holdout_days": {"type": ["integer", "null"], "minimum": 1, "maximum": 14,
                         "description": "hold out the window's last N days (default: the configured fractions)"},
        "validation_days": {"type": ["integer", "null"], "minimum": 1, "maximum": 14,
                            "description": "validate on the N days before the holdout"},
        "trigger": {
            "type": "object",
            "description": "who started the run: a monitoring run, a person",
            "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
        },
        "labels_override": {
            "type": ["object", "null"],
            "description": "the gate's 'labels suspect' checks (share out of band, a model below chance) are "
                           "overridden: the relationship really changed; who decided it and why (recorded)",
            "additionalProperties": False,
            "required": ["by", "why"],
            "properties": {"by": {"type": "string", "minLength": 1, "maxLength": 200},
                           "why": {"type": "string", "minLength": 10, "maxLength": 2000}},
        },
    },
}

INGEST_CONF_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "ingest run configuration",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "day": {"type": ["string", "null"], "format": "date",
                "description": "the day to ingest (default: the data interval)"},
    },
}

ROLLBACK_CONF_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "rollback run configuration",
    "type": "object",
    "additionalProperties": False,
    "required": ["reason"],
    "properties": {
        "version": {"type": ["string", "null"], "pattern": "^\\s*v?[0-9]*\\s*$",
                    "description": "the model version to make champion (empty: the previous champion)"},
        "reason": {"type": "string", "minLength": 1, "maxLength": 2000, "pattern": "\\S",
                   "description": "why the champion is rolled back (recorded in the promotion history)"},
        "force": {"type": ["boolean", "null"],
                  "description": "allow a version the promotion gate rejected"},
    },
}


@dataclass(frozen=True)
class Window:
    """A half-open interval of days ``[start, end)``."""

    start: date
    end: date

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ConfigError(f"window {self.start}..{self.end} is empty: window_end must be after window_start")

    def to_dict(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}

    def __str__(self) -> str:
        return f"{self.start.isoformat()}..{self.end.isoformat()}"


def validate_conf(conf: dict[str, Any] | None, schema: dict[str, Any]) -> dict[str, Any]:
    """Check ``conf`` against ``schema``; raise ConfigError naming every problem."""
    import jsonschema

    conf = dict(conf or {})
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    problems = sorted(validator.iter_errors(conf), key=lambda e: list(e.path))
    if problems:
        lines = [f"- {'/'.join(map(str, e.path)) or '(top level)'}: {e.message}" for e in problems]
        raise ConfigError(f"{schema.get('title', 'run configuration')} refused:\n" + "\n".join(lines))
    return conf


def parse_day(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def resolve_window(conf: dict[str, Any] | None, interval_start: Any = None, interval_end: Any = None) -> Window:
    """The training window of a run: from ``conf`` when triggered, from the data interval when scheduled."""
    conf = {k: v for k, v in validate_conf(conf, RETRAINING_CONF_SCHEMA).items() if v not in (None, "")}
    if "window_start" in conf or "window_end" in conf:
        if not ("window_start" in conf and "window_end" in conf):
            raise ConfigError("retraining run configuration refused: give both window_start and window_end")
        return Window(parse_day(conf["window_start"]), parse_day(conf["window_end"]))
    if interval_start is None or interval_end is None:
        raise ConfigError("retraining run configuration refused: a triggered run needs window_start and "
                          "window_end (YYYY-MM-DD, end exclusive)")
    return Window(parse_day(interval_start), parse_day(interval_end))


def split_override(conf: dict[str, Any] | None) -> dict[str, int]:
    """Day-based split settings of a run's configuration (empty: the configured fractions apply)."""
    conf = validate_conf(conf, RETRAINING_CONF_SCHEMA)
    out = {k: int(conf[k]) for k in ("holdout_days", "validation_days") if conf.get(k)}
    if out and "holdout_days" not in out:
        raise ConfigError("retraining run configuration refused: validation_days needs holdout_days")
    return out


def labels_override(conf: dict[str, Any] | None) -> dict[str, str] | None:
    """The retraining run's ``labels_override`` ({by, why}), checked; None when not given."""
    conf = validate_conf(conf, RETRAINING_CONF_SCHEMA)
    override = conf.get("labels_override")
    return {"by": override["by"].strip(), "why": override["why"].strip()} if override else None
