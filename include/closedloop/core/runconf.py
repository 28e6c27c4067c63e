"""Run configurations: one definition per DAG, from which its trigger form and its run-time check are built.

Each DAG's ``conf`` is described once, as a :class:`RunConf` of :class:`Field` s. From it come both the Params
of the DAG file (``closedloop.adapters.airflow.params.run_params``: the trigger form, which Airflow validates one
Param at a time and which accepts unknown keys) and the JSON schema that :func:`check` applies at run time,
together with what no single Param can say: unknown keys, the window's order and width, ``validation_days``
needs ``holdout_days``, the holdout inside the window, dates between :data:`MIN_DAY` and :data:`MAX_DAY`.
:func:`check` is the first step of each DAG's first task; it raises :class:`ConfigError` with one line, without
a chained traceback. Every string is bounded by where it goes (MLflow's tag limits, see :data:`TRIGGER_KEY_MAX`).
The window is explicit: a scheduled run trains on its data interval, a triggered one names it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from closedloop.core.errors import ConfigError, first_line

# Dates a run configuration may name (year 1 or 9999 would overflow the window arithmetic).
MIN_DAY = date(2000, 1, 1)
MAX_DAY = date(2100, 12, 31)
MAX_WINDOW_DAYS = 731  # two years of daily partitions: beyond that a window is a typo, not a training set
MAX_SPLIT_DAYS = 14  # holdout_days, validation_days

# MLflow's limits (mlflow/utils/validation.py of the installed MLflow 3.x; tests/unit/test_runconf_spec.py checks
# them against it, as importing mlflow here would cost seconds at every check): a model-version tag key has at most
# MAX_MODEL_REGISTRY_TAG_KEY_LENGTH = 250 characters of [/\w.\- :] and no path tricks; a run tag value at most
# MAX_TAG_VAL_LENGTH = 8000 (model-version tag values 100000).
MLFLOW_TAG_KEY_MAX = 250
MLFLOW_RUN_TAG_VALUE_MAX = 8000
TRIGGER_TAG_PREFIX = "closedloop.trigger_"  # register_model tags the version with closedloop.trigger_<key>
TRIGGER_KEY_MAX = MLFLOW_TAG_KEY_MAX - len(TRIGGER_TAG_PREFIX)
TEXT_MAX = 2000  # reason, why: run tag closedloop.reason, version tags and the promotion history (cut at 4000)
TRIGGER_VALUE_MAX = 4000  # register_model cuts trigger values at 4000 too


@dataclass(frozen=True)
class Field:
    """One key of a run configuration: its JSON type, default, form title and description, JSON-schema bounds."""

    name: str
    type: str  # a JSON type: string, integer, boolean, object
    title: str
    description: str
    default: Any = None
    nullable: bool = True  # None (an empty form field) stands for "not given"
    required: bool = False  # no default: the form and the run-time check both demand it
    bounds: dict[str, Any] = field(default_factory=dict)  # JSON-schema keywords: format, minimum, maxLength, ...

    def schema(self) -> dict[str, Any]:
        """The JSON schema of this key (the same for its Param and for the run-time check)."""
        return {"type": ["null", self.type] if self.nullable else self.type, "title": self.title, **self.bounds}


Rule = Callable[[dict[str, Any]], None]  # a cross-field rule: raises ConfigError (conf: the given, non-empty keys)


@dataclass(frozen=True)
class RunConf:
    """The run configuration of one DAG: its keys and its cross-field rules."""

    title: str
    fields: tuple[Field, ...]
    rules: tuple[Rule, ...] = ()

    def field(self, name: str) -> Field:
        return next(f for f in self.fields if f.name == name)

    def schema(self) -> dict[str, Any]:
        """The JSON schema of the whole ``conf``: every key's schema, no unknown key, the required ones."""
        out: dict[str, Any] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": self.title,
            "type": "object",
            "additionalProperties": False,
            "properties": {f.name: {**f.schema(), "description": f.description} for f in self.fields},
        }
        required = [f.name for f in self.fields if f.required]
        if required:
            out["required"] = required
        return out


def _day(name: str, title: str, description: str) -> Field:
    return Field(name, "string", title, description, bounds={"format": "date", "maxLength": 10})


def _given(conf: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in conf.items() if v not in (None, "")}


def _window_rule(conf: dict[str, Any]) -> None:
    """window_start and window_end given together, the window wide enough for the held-out days, at most 731 days."""
    if ("window_start" in conf) != ("window_end" in conf):
        raise ConfigError("give both window_start and window_end (YYYY-MM-DD, end exclusive)")
    if "window_start" in conf:
        window_rules(Window(parse_day(conf["window_start"]), parse_day(conf["window_end"])), conf)


def _split_rule(conf: dict[str, Any]) -> None:
    """validation_days needs holdout_days."""
    if conf.get("validation_days") and not conf.get("holdout_days"):
        raise ConfigError("validation_days needs holdout_days (the validation days lie before the holdout)")


def window_rules(window: Window, conf: dict[str, Any]) -> None:
    """The window's width against the split's needs and the sane maximum (dates are in range already)."""
    width = (window.end - window.start).days
    if width > MAX_WINDOW_DAYS:
        raise ConfigError(f"window {window} is {width} days wide: at most {MAX_WINDOW_DAYS}")
    held = int(conf.get("holdout_days") or 0) + int(conf.get("validation_days") or 0)
    if held and width <= held:
        raise ConfigError(f"window {window} is {width} day(s) wide: holdout_days + validation_days = {held} leave "
                          "no day to train on (the holdout must lie inside the window)")


RETRAINING = RunConf("retraining run configuration", (
    _day("window_start", "Window start", "First day of the training window (YYYY-MM-DD, inclusive). "
                                         "Empty on scheduled runs: the data interval decides."),
    _day("window_end", "Window end", "Day after the last day of the window (YYYY-MM-DD, exclusive)."),
    Field("reason", "string", "Reason", "Why this run was started (recorded on the MLflow run and the version).",
          default="", bounds={"maxLength": TEXT_MAX}),
    Field("holdout_days", "integer", "Holdout days",
          "Hold out the window's last N days instead of the configured fractions.",
          bounds={"minimum": 1, "maximum": MAX_SPLIT_DAYS}),
    Field("validation_days", "integer", "Validation days",
          "With holdout days: validate on the N days before the holdout.",
          bounds={"minimum": 1, "maximum": MAX_SPLIT_DAYS}),
    Field("trigger", "object", "Trigger",
          "Who started the run ({key: value}: a monitoring run, a person); each key becomes a version tag "
          f"{TRIGGER_TAG_PREFIX}<key>.",
          bounds={"maxProperties": 20,
                  "propertyNames": {"pattern": "^[A-Za-z0-9_.-]+$", "minLength": 1, "maxLength": TRIGGER_KEY_MAX},
                  "additionalProperties": {"type": ["string", "number", "boolean", "null"],
                                           "maxLength": TRIGGER_VALUE_MAX}}),
    Field("labels_override", "object", "Labels override",
          "Only when the relationship really inverted: {\"by\": who, \"why\": why} lets the gate compare models "
          "it finds 'labels suspect' (recorded on the version). See docs/explanation/GATE.md.",
          bounds={"additionalProperties": False, "required": ["by", "why"],
                  "properties": {"by": {"type": "string", "minLength": 1, "maxLength": 200, "pattern": "\\S"},
                                 "why": {"type": "string", "minLength": 10, "maxLength": TEXT_MAX}}}),
), rules=(_window_rule, _split_rule))

INGEST = RunConf("ingest run configuration", (
    _day("day", "Day", "The day to ingest (YYYY-MM-DD). Empty on scheduled runs: the data interval decides."),))
BATCH_SCORING = RunConf("batch_scoring run configuration", (
    _day("day", "Day", "The day to score (YYYY-MM-DD). Empty when ingest started the run: its event names the day."),))
DRIFT_MONITORING = RunConf("drift_monitoring run configuration", (
    _day("day", "Last day of the window",
         "YYYY-MM-DD. Empty when scoring started the run: its event names the day."),))
SKEW_CHECK = RunConf("skew_check run configuration", (
    _day("day", "Served day", "YYYY-MM-DD. Empty for scheduled runs: the day before the run's interval end."),))
ROLLOUT = RunConf("rollout run configuration", (
    _day("day", "Day", "Judge the rollout on the requests served and the labels curated until this day (YYYY-MM-DD, "
                       "inclusive). Empty: the day of the run's data interval end, or today."),))

ROLLBACK = RunConf("rollback run configuration", (
    Field("version", "string", "Version", "The model version to make champion. Empty: the previous champion.",
          default="", bounds={"pattern": "^\\s*v?[0-9]*\\s*$", "maxLength": 20}),
    Field("reason", "string", "Reason", "Why the champion is rolled back (required; recorded in the history).",
          default=None, nullable=False, required=True,
          bounds={"minLength": 1, "maxLength": TEXT_MAX, "pattern": "\\S"}),
    Field("force", "boolean", "Force", "Allow a version that the promotion gate rejected.", default=False,
          nullable=False),
))

RUN_CONFS = {"retraining": RETRAINING, "ingest": INGEST, "batch_scoring": BATCH_SCORING,
             "drift_monitoring": DRIFT_MONITORING, "skew_check": SKEW_CHECK, "rollback": ROLLBACK,
             "rollout": ROLLOUT}

# The JSON schemas (kept under their old names: the stages and tests use them).
RETRAINING_CONF_SCHEMA = RETRAINING.schema()
INGEST_CONF_SCHEMA = INGEST.schema()
ROLLBACK_CONF_SCHEMA = ROLLBACK.schema()


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


def _problem(error: Any) -> str:
    where = "/".join(map(str, error.path)) or "(top level)"
    return f"{where}: {' '.join(str(error.message).split())[:200]}"


def validate_conf(conf: dict[str, Any] | None, schema: dict[str, Any]) -> dict[str, Any]:
    """Check ``conf`` against ``schema``; raise ConfigError naming every problem, in one line."""
    import jsonschema

    if conf is not None and not isinstance(conf, dict):
        raise ConfigError(f"{schema.get('title', 'run configuration')} refused: not a JSON object")
    conf = dict(conf or {})
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    problems = sorted(validator.iter_errors(conf), key=lambda e: [str(p) for p in e.path])
    if problems:
        raise ConfigError(f"{schema.get('title', 'run configuration')} refused: "
                          + "; ".join(_problem(e) for e in problems))
    return conf


def check(conf: dict[str, Any] | None, spec: RunConf) -> dict[str, Any]:
    """The run-time check of a run configuration, before any work: its schema, its dates' range, its cross-field
    rules. Returns ``conf``; raises ConfigError with one line (no chained traceback) naming the problem."""
    conf = validate_conf(conf, spec.schema())
    given = _given(conf)
    try:
        for f in spec.fields:
            if f.bounds.get("format") == "date" and f.name in given:
                day = parse_day(given[f.name])
                if not MIN_DAY <= day <= MAX_DAY:
                    raise ConfigError(f"{f.name} {day} is outside {MIN_DAY}..{MAX_DAY}")
        for rule in spec.rules:
            rule(given)
    except (ConfigError, ValueError, OverflowError) as exc:
        raise ConfigError(f"{spec.title} refused: {first_line(exc, 500)}") from None
    return conf


def parse_day(value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def resolve_window(conf: dict[str, Any] | None, interval_start: Any = None, interval_end: Any = None) -> Window:
    """The training window of a run: from ``conf`` when triggered, from the data interval when scheduled."""
    conf = _given(check(conf, RETRAINING))
    if "window_start" in conf:
        return Window(parse_day(conf["window_start"]), parse_day(conf["window_end"]))
    if interval_start is None or interval_end is None:
        raise ConfigError("retraining run configuration refused: a triggered run needs window_start and "
                          "window_end (YYYY-MM-DD, end exclusive)")
    window = Window(parse_day(interval_start), parse_day(interval_end))
    try:
        window_rules(window, conf)
    except ConfigError as exc:
        raise ConfigError(f"{RETRAINING.title} refused: {exc}") from None
    return window


def split_override(conf: dict[str, Any] | None) -> dict[str, int]:
    """Day-based split settings of a run's configuration (empty: the configured fractions apply)."""
    conf = check(conf, RETRAINING)
    return {k: int(conf[k]) for k in ("holdout_days", "validation_days") if conf.get(k)}


def labels_override(conf: dict[str, Any] | None) -> dict[str, str] | None:
    """The retraining run's ``labels_override`` ({by, why}), checked; None when not given."""
    conf = check(conf, RETRAINING)
    override = conf.get("labels_override")
    return {"by": override["by"].strip(), "why": override["why"].strip()} if override else None
