"""The serving and skew sections of the configuration, and the scoring token in the settings."""

from __future__ import annotations

import pytest
import yaml

from closedloop.adapters.serving import ServingConfig
from closedloop.core.errors import ConfigError
from closedloop.core.settings import DEFAULT_CONFIG, Config, Settings
from closedloop.stages.skew import SkewPolicy


def test_the_shipped_configuration_has_valid_serving_and_skew_sections(tmp_path):
    typed = Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path)}).config.typed
    assert ServingConfig.from_typed(typed.serving).max_batch >= 100
    assert 0 < SkewPolicy.from_typed(typed.skew).max_mismatch_share < 1


def _with(section: str, value: dict) -> Config:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    return Config(path=DEFAULT_CONFIG, raw={**raw, section: value})


@pytest.mark.parametrize(("raw", "message"), [
    ({"max_batchs": 10}, r"serving\.max_batchs: unknown key"),
    ({"max_batch": 0}, "max_batch"),
    ({"shadow_share": 1.5}, "shadow_share"),
    ({"poll_seconds": 0}, "poll_seconds"),
])
def test_bad_serving_sections_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message):  # unknown keys when loaded, ranges where applied
        ServingConfig.from_typed(_with("serving", raw).typed.serving)


@pytest.mark.parametrize(("raw", "message"), [
    ({"tolerance": 1}, r"skew\.tolerance: unknown key"),
    ({"max_mismatch_share": 2}, "max_mismatch_share"),
    ({"score_tolerance": -1}, "tolerances"),
])
def test_bad_skew_sections_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        SkewPolicy.from_typed(_with("skew", raw).typed.skew)


def test_the_scoring_token_is_read_but_never_shown(tmp_path):
    s = Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path), "CLOSEDLOOP_SERVE_TOKEN": " tok-123456789 "})
    assert s.serve_token == "tok-123456789" and "tok-123456789" not in repr(s)
    assert Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path)}).serve_token == ""
