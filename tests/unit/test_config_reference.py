"""docs/reference/configuration.md is generated from the typed configuration model and the settings' docstring; it
must be the committed file, and it must name every environment variable core.settings reads."""

from __future__ import annotations

import re
from pathlib import Path

from closedloop.core import settings
from closedloop.devtools import config_reference


def test_the_committed_reference_is_current():
    assert config_reference.TARGET.exists(), f"docs/reference/configuration.md missing: run {config_reference.COMMAND}"
    assert config_reference.TARGET.read_text() == config_reference.render(), (
        f"docs/reference/configuration.md is stale (the configuration model or the environment variables of "
        f"core/settings.py changed): run {config_reference.COMMAND} and commit the result")


def test_every_environment_variable_read_is_documented():
    source = Path(settings.__file__).read_text()
    read = set(re.findall(r"\"((?:CLOSEDLOOP|MLFLOW)_[A-Z0-9_]+)\"", source))
    documented = {n for names, _ in config_reference.environment() for n in names}
    assert read and not read - documented, f"read by core/settings.py but not documented: {sorted(read - documented)}"


def test_every_key_of_the_model_is_in_the_reference():
    text = config_reference.render()
    for key in ("dataset.schema", "training.pit_join.max_rows", "monitoring.calibration.gap_days",
                "housekeeping.keep_versions_days", "gate.bootstrap.resamples"):
        assert f"| `{key}` |" in text
