"""Run configurations: JSON-schema validation with no unknown keys, explicit windows."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from closedloop.core.errors import ConfigError
from closedloop.core.runconf import INGEST_CONF_SCHEMA, RETRAINING_CONF_SCHEMA, Window, resolve_window, validate_conf


def test_triggered_window_from_conf():
    w = resolve_window({"window_start": "2026-01-01", "window_end": "2026-01-15", "reason": "drift"})
    assert w == Window(date(2026, 1, 1), date(2026, 1, 15))


def test_scheduled_window_from_interval():
    start = datetime(2026, 1, 1, tzinfo=UTC)
    end = datetime(2026, 1, 8, tzinfo=UTC)
    assert resolve_window({}, start, end) == Window(date(2026, 1, 1), date(2026, 1, 8))


def test_trigger_form_nulls_mean_absent():
    start = datetime(2026, 1, 1, tzinfo=UTC)
    end = datetime(2026, 1, 8, tzinfo=UTC)
    conf = {"window_start": None, "window_end": None, "reason": ""}
    assert resolve_window(conf, start, end) == Window(date(2026, 1, 1), date(2026, 1, 8))


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"window_start": "2026-01-01", "window_end": "2026-01-15", "windw": 3}, "Additional properties"),
        ({"window_start": "2026-13-01", "window_end": "2026-01-15"}, "is not a 'date'"),
        ({"window_start": 20260101, "window_end": "2026-01-15"}, "is not of type"),
        ({"window_start": "2026-01-15", "window_end": "2026-01-15"}, "is empty"),
        ({"window_start": "2026-01-15", "window_end": "2026-01-01"}, "is empty"),
        ({"window_start": "2026-01-15"}, "give both"),
        ({}, "needs window_start and window_end"),
    ],
)
def test_bad_conf_is_refused_before_any_work(conf, message):
    with pytest.raises(ConfigError, match=message):
        resolve_window(conf)


def test_every_problem_is_named():
    with pytest.raises(ConfigError) as err:
        validate_conf({"a": 1, "window_start": 3}, RETRAINING_CONF_SCHEMA)
    assert "window_start" in str(err.value) and "'a'" in str(err.value)


def test_ingest_conf_schema():
    assert validate_conf({"day": "2026-01-02"}, INGEST_CONF_SCHEMA) == {"day": "2026-01-02"}
    with pytest.raises(ConfigError):
        validate_conf({"days": "2026-01-02"}, INGEST_CONF_SCHEMA)


def test_split_override():
    from closedloop.core.runconf import split_override

    assert split_override({"window_start": "2026-01-01", "window_end": "2026-01-15"}) == {}
    assert split_override({"holdout_days": 1}) == {"holdout_days": 1}
    assert split_override({"holdout_days": 2, "validation_days": 1}) == {"holdout_days": 2, "validation_days": 1}
    with pytest.raises(ConfigError, match="needs holdout_days"):
        split_override({"validation_days": 1})
    with pytest.raises(ConfigError):
        split_override({"holdout_days": 0})
