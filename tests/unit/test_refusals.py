"""Run configurations, URIs and paths that are refused before any work, with a message naming the problem."""

from __future__ import annotations

import pytest

from closedloop.core.errors import ConfigError
from closedloop.core.lake import Lake
from closedloop.core.runconf import resolve_window
from closedloop.core.settings import Settings, check_uri
from closedloop.stages.features import read_training_split
from closedloop.stages.ingest import resolve_day

CONFS = [
    ("retraining conf with an unknown key", lambda: resolve_window(
        {"window_start": "2026-01-01", "window_end": "2026-01-15", "windw": 3}), "Additional properties"),
    ("retraining conf with a wrong type", lambda: resolve_window(
        {"window_start": 20260101, "window_end": "2026-01-15"}), "is not of type"),
    ("retraining conf with an empty window", lambda: resolve_window(
        {"window_start": "2026-01-15", "window_end": "2026-01-01"}), "is empty"),
    ("path traversal in a retraining window date", lambda: resolve_window(
        {"window_start": "2026-01-01/../../etc", "window_end": "2026-01-15"}), "is not a 'date'"),
    ("path traversal in an ingest day", lambda: resolve_day({"day": "../../etc/passwd"}), "is not a 'date'"),
    ("ingest conf with an unknown key", lambda: resolve_day({"day": "2026-01-01", "path": "/etc"}),
     "Additional properties"),
]


@pytest.mark.parametrize(("name", "call", "message"), CONFS, ids=[c[0] for c in CONFS])
def test_a_bad_run_configuration_is_refused(name, call, message, reliability):
    with pytest.raises(ConfigError, match=message) as err:
        call()
    assert "refused" in str(err.value) or "is empty" in str(err.value)
    reliability.record("config", name, f"refused before any work: ConfigError naming the key ({message})")


@pytest.mark.parametrize("part", ["../outside", "/etc/passwd", "landing/../../x"])
def test_lake_paths_cannot_climb_out(tmp_path, part, reliability):
    lake = Lake(f"file://{tmp_path}/lake")
    with pytest.raises(ValueError, match=r"climbs out of the lake|absolute"):
        lake.uri("landing", part)
    reliability.record("config", f"lake path part {part!r}", "refused: absolute or climbs out of the lake")


def _env(tmp_path, **extra):
    return {"CLOSEDLOOP_HOME": str(tmp_path / "home"), **extra}


@pytest.mark.parametrize(("name", "extra", "message"), [
    ("lake URI with a scheme that is not allowed", {"CLOSEDLOOP_LAKE_URI": "ftp://host/lake"}, "scheme 'ftp'"),
    ("lake URI outside the allowed roots", {"CLOSEDLOOP_LAKE_URI": "s3://other-bucket/lake",
                                            "CLOSEDLOOP_ALLOWED_ROOTS": "s3://closedloop-lake,s3://closedloop-mlflow"},
     "outside the allowed roots"),
    ("lake URI that climbs out of an allowed root", {"CLOSEDLOOP_LAKE_URI": "s3://closedloop-lake/../x",
                                                     "CLOSEDLOOP_ALLOWED_ROOTS": "s3://closedloop-lake/prod"},
     "outside the allowed roots"),
    ("MLflow artifact root outside the allowed roots", {"CLOSEDLOOP_MLFLOW_ARTIFACTS": "/srv/elsewhere",
                                                         "CLOSEDLOOP_LAKE_URI": "s3://closedloop-lake/lake",
                                                         "CLOSEDLOOP_ALLOWED_ROOTS": "s3://closedloop-lake"},
     "CLOSEDLOOP_MLFLOW_ARTIFACTS"),
])
def test_storage_outside_the_allowed_roots_is_refused(tmp_path, name, extra, message, reliability):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(_env(tmp_path, **extra))
    reliability.record("config", name, "refused when the settings are read, before any task runs")


def test_allowed_roots_admit_what_lies_under_them(tmp_path):
    s = Settings.from_env(_env(tmp_path, CLOSEDLOOP_LAKE_URI="s3://closedloop-lake/prod/lake",
                               CLOSEDLOOP_MLFLOW_ARTIFACTS="s3://closedloop-lake/prod/mlflow",
                               CLOSEDLOOP_ALLOWED_ROOTS="s3://closedloop-lake/prod"))
    assert s.lake_uri == "s3://closedloop-lake/prod/lake"
    assert s.check_uri("s3://closedloop-lake/prod/lake/./reports/x.json", "report") == (
        "s3://closedloop-lake/prod/lake/reports/x.json")
    default = Settings.from_env(_env(tmp_path))  # the embedded default: everything under the home
    assert default.check_uri(default.lake_uri + "/landing", "landing") == default.lake_uri + "/landing"
    with pytest.raises(ConfigError):
        check_uri("s3://closedloop-lake/prodx", ["s3://closedloop-lake/prod"], "a sibling with the same prefix")


def test_a_training_set_uri_outside_the_lake_is_refused(tmp_path, reliability):
    lake = Lake(f"file://{tmp_path}/lake")
    for uri in (f"file://{tmp_path}/elsewhere/ts", f"{lake.uri('training_sets')}/../../../etc"):
        with pytest.raises(ConfigError, match="training set URI"):
            read_training_split(lake, uri, "holdout")
    reliability.record("config", "a training-set URI outside the lake handed to a task",
                       "refused before reading: ConfigError naming the URI and the allowed root")
