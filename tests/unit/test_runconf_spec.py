"""Run configurations defined once (closedloop.core.runconf): the cross-field rules and unknown keys that no single
Param can refuse, strings bounded by MLflow's limits, each refused by ``check`` in one line without a chained
traceback, before any work; and a fuzz of run configurations against the definitions."""

from __future__ import annotations

from datetime import date, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.core import runconf
from closedloop.core.errors import ConfigError
from closedloop.core.runconf import (
    MAX_DAY,
    MAX_WINDOW_DAYS,
    MIN_DAY,
    RETRAINING,
    RUN_CONFS,
    TRIGGER_KEY_MAX,
    TRIGGER_TAG_PREFIX,
    Window,
    check,
    resolve_window,
    split_override,
)

W = {"window_start": "2026-03-01", "window_end": "2026-03-29"}

# (case, conf, what the one-line message names) — each reproduced from issue 20's new-user trial
REFUSED = [
    ("a trigger key of 300 characters (MLflow's tag-key limit, where register_model failed after training)",
     {**W, "trigger": {"k" * 300: "x"}}, "trigger"),
    ("a trigger key that is not a valid MLflow tag key", {**W, "trigger": {"a/../b": "x"}}, "trigger"),
    ("a trigger value beyond what the version tag keeps", {**W, "trigger": {"by": "x" * 5000}}, "trigger/by"),
    ("a reason beyond its bound", {**W, "reason": "r" * 2001}, "reason"),
    ("validation_days without holdout_days (was refused only at build_training_set)",
     {**W, "validation_days": 2}, "validation_days needs holdout_days"),
    ("a window starting in year 1 (was an OverflowError, retried)",
     {"window_start": "0001-01-01", "window_end": "0001-01-08"}, "outside 2000-01-01..2100-12-31"),
    ("a window ending in year 9999", {"window_start": "2026-01-01", "window_end": "9999-12-31"}, "outside"),
    ("a reversed window", {"window_start": "2026-03-29", "window_end": "2026-03-01"}, "is empty"),
    ("an empty window", {"window_start": "2026-03-01", "window_end": "2026-03-01"}, "is empty"),
    ("a window wider than two years", {"window_start": "2020-01-01", "window_end": "2026-01-01"},
     f"at most {MAX_WINDOW_DAYS}"),
    ("a holdout that does not fit inside the window",
     {"window_start": "2026-03-01", "window_end": "2026-03-04", "holdout_days": 2, "validation_days": 1},
     "holdout must lie inside the window"),
    ("only one end of the window", {"window_start": "2026-03-01"}, "give both"),
    ("an unknown key (the trigger form and REST accept it)", {**W, "windw_end": "2026-04-01"}, "'windw_end'"),
]


@pytest.mark.parametrize(("case", "conf", "message"), REFUSED, ids=[c[0][:40] for c in REFUSED])
def test_a_bad_retraining_conf_is_refused_in_one_line(case, conf, message, reliability):
    with pytest.raises(ConfigError) as err:
        check(conf, RETRAINING)
    text = str(err.value)
    assert message in text and text.startswith("retraining run configuration refused: "), text
    assert "\n" not in text and len(text) < 1200, text
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)
    with pytest.raises(ConfigError):  # the window the first task resolves is refused the same way
        resolve_window(conf)
    reliability.record("config", f"retraining conf: {case}",
                       "refused by runconf.check, the first step of validate_window: ConfigError in one line "
                       "naming the key, no chained traceback, no retry")


@pytest.mark.parametrize("dag_id", ["ingest", "batch_scoring", "drift_monitoring", "skew_check"])
def test_a_day_in_year_1_or_an_unknown_key_is_refused(dag_id, reliability):
    for conf, message in (({"day": "0001-01-01"}, "outside"), ({"day": "2026-01-01", "dya": 1}, "'dya'")):
        with pytest.raises(ConfigError, match=message) as err:
            check(conf, RUN_CONFS[dag_id])
        assert "\n" not in str(err.value)
    reliability.record("config", f"{dag_id} conf: a day in year 1, an unknown key",
                       "refused by runconf.check, the first step of the first task: one-line ConfigError")


def test_a_rollback_conf_needs_a_reason():
    with pytest.raises(ConfigError, match="'reason' is a required property"):
        check({"version": "3"}, RUN_CONFS["rollback"])
    assert check({"reason": "bad model", "version": "v3"}, RUN_CONFS["rollback"])["version"] == "v3"


def test_what_is_accepted_still_works():
    assert check(W, RETRAINING) == W
    assert resolve_window({**W, "holdout_days": 7, "validation_days": 7}) == Window(date(2026, 3, 1), date(2026, 3, 29))
    assert split_override({**W, "holdout_days": 7, "validation_days": 7}) == {"holdout_days": 7, "validation_days": 7}
    longest = "k" * TRIGGER_KEY_MAX
    assert check({**W, "trigger": {longest: 1, "dag_id": "drift_monitoring"}}, RETRAINING)
    # a scheduled run's interval too small for the asked holdout is refused the same way
    with pytest.raises(ConfigError, match="holdout must lie inside"):
        resolve_window({"holdout_days": 7}, date(2026, 3, 1), date(2026, 3, 4))


def test_the_bounds_are_the_installed_mlflow_limits():
    from mlflow.utils import validation

    assert runconf.MLFLOW_TAG_KEY_MAX == validation.MAX_MODEL_REGISTRY_TAG_KEY_LENGTH
    assert runconf.MLFLOW_RUN_TAG_VALUE_MAX == validation.MAX_TAG_VAL_LENGTH
    assert max(runconf.TEXT_MAX, runconf.TRIGGER_VALUE_MAX) <= validation.MAX_TAG_VAL_LENGTH
    # the longest trigger key the definition admits is a valid model-version tag key
    validation._validate_model_version_tag(TRIGGER_TAG_PREFIX + "k" * TRIGGER_KEY_MAX, "x")
    validation._validate_model_version_tag(TRIGGER_TAG_PREFIX + "a.b-c_D9", "x")


def test_run_stage_fails_a_refused_conf_at_once_with_its_line():
    from airflow.sdk.exceptions import AirflowFailException

    from closedloop.adapters.airflow.orchestration import run_stage

    with pytest.raises(AirflowFailException) as err:
        run_stage(check, {**W, "validation_days": 1}, RETRAINING)
    assert str(err.value) == ("ConfigError: retraining run configuration refused: validation_days needs "
                              "holdout_days (the validation days lie before the holdout)")
    assert err.value.__cause__ is None and err.value.__suppress_context__


# -- fuzz: run configurations against the definitions ------------------------------------------------------------

_days = st.one_of(
    st.dates(min_value=date(1, 1, 1), max_value=date(9999, 12, 31)).map(date.isoformat),
    st.dates(min_value=date(2025, 1, 1), max_value=date(2027, 1, 1)).map(date.isoformat),
    st.text(max_size=12), st.integers(), st.none(), st.just(""))
_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 40), st.floats(allow_nan=True), st.text(max_size=30),
                    st.dictionaries(st.text(max_size=300), st.one_of(st.text(max_size=50), st.integers()), max_size=3))
_confs = st.fixed_dictionaries({}, optional={
    "window_start": _days, "window_end": _days, "holdout_days": _values, "validation_days": _values,
    "reason": _values, "trigger": _values, "labels_override": _values,
}).flatmap(lambda conf: st.dictionaries(st.sampled_from(["windw", "day", "reason"]), _values, max_size=1).map(
    lambda extra: {**conf, **extra}))
# half the examples name a window near the bounds: a start, then a width from reversed to beyond the maximum
_windows = st.tuples(st.dates(min_value=date(1999, 12, 1), max_value=date(2101, 1, 31)),
                     st.integers(-3, MAX_WINDOW_DAYS + 3)).map(
    lambda sw: {"window_start": sw[0].isoformat(), "window_end": (sw[0] + timedelta(days=sw[1])).isoformat()})
_confs = st.one_of(_confs, st.tuples(_confs, _windows).map(lambda cw: {**cw[0], **cw[1]}))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conf=_confs)
def test_fuzz_a_conf_check_accepts_is_valid_by_every_rule(conf):
    try:
        accepted = check(conf, RETRAINING)
    except ConfigError as exc:  # refused: a ConfigError in one line, never another exception
        assert "\n" not in str(exc) and exc.__cause__ is None
        return
    assert set(accepted) <= {f.name for f in RETRAINING.fields}
    given_ = {k: v for k, v in accepted.items() if v not in (None, "")}
    if given_.get("validation_days"):
        assert given_.get("holdout_days")
    for key, _ in (given_.get("trigger") or {}).items():
        assert len(TRIGGER_TAG_PREFIX + key) <= runconf.MLFLOW_TAG_KEY_MAX
    interval = (date(2026, 1, 1), date(2026, 3, 1))
    window = resolve_window(accepted, *interval)  # never raises for an accepted conf
    assert MIN_DAY <= window.start < window.end <= MAX_DAY
    width = (window.end - window.start).days
    assert width <= MAX_WINDOW_DAYS
    assert width > int(given_.get("holdout_days") or 0) + int(given_.get("validation_days") or 0)
    assert window.end - timedelta(days=MAX_WINDOW_DAYS) > date.min  # the window arithmetic cannot overflow


@settings(max_examples=100, deadline=None)
@given(dag_id=st.sampled_from(sorted(RUN_CONFS)), conf=st.dictionaries(
    st.sampled_from(["day", "version", "reason", "force", "other"]), st.one_of(_days, _values), max_size=4))
def test_fuzz_every_definition_refuses_only_with_config_error(dag_id, conf):
    try:
        check(conf, RUN_CONFS[dag_id])
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    day = conf.get("day")
    if day not in (None, ""):
        assert MIN_DAY <= date.fromisoformat(day) <= MAX_DAY
