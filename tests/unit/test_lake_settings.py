"""The lake's URIs and I/O, and settings from the environment."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from closedloop.core.errors import ConfigError
from closedloop.core.lake import Lake, days_between
from closedloop.core.settings import REPO_ROOT, Settings
from closedloop.stages.feast_config import feast_env


def test_partition_naming_and_listing(tmp_path):
    lake = Lake(f"file://{tmp_path}/lake")
    frame = pd.DataFrame({"a": [1, 2]})
    for d in (date(2026, 1, 3), date(2026, 1, 1)):
        lake.write_parquet(frame, lake.partition("landing", "transactions", d))
    lake.write_json(lake.partition("quarantine", "transactions", date(2026, 1, 2), ".validation.json"), {"x": 1})
    assert lake.list_days("landing", "transactions") == [date(2026, 1, 1), date(2026, 1, 3)]
    assert lake.list_days("quarantine", "transactions") == []
    assert lake.partition("landing", "labels", date(2026, 1, 1)).endswith("/lake/landing/labels/2026-01-01.parquet")
    pd.testing.assert_frame_equal(lake.read_parquet(lake.partition("landing", "transactions", date(2026, 1, 1))), frame)
    assert not list(Path(tmp_path, "lake", "landing", "transactions").glob(".tmp-*"))


@pytest.mark.parametrize("part", ["../etc", "/etc/passwd", "landing/../../x"])
def test_paths_cannot_leave_the_lake(tmp_path, part):
    with pytest.raises(ValueError, match=r"climbs out|absolute"):
        Lake(f"file://{tmp_path}").uri(part)


def test_move_keeps_content_and_removes_source(tmp_path):
    lake = Lake(f"file://{tmp_path}")
    src, dst = lake.uri("landing", "a.bin"), lake.uri("quarantine", "a.bin")
    lake.write_bytes(src, b"payload")
    sha = lake.sha256(src)
    lake.move(src, dst)
    assert not lake.exists(src) and lake.read_bytes(dst) == b"payload" and lake.sha256(dst) == sha


def test_days_between_is_half_open():
    assert days_between(date(2026, 1, 30), date(2026, 2, 2)) == [date(2026, 1, 30), date(2026, 1, 31), date(2026, 2, 1)]


def test_all_state_under_home_by_default(tmp_path):
    s = Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path / "h")})
    home = str(tmp_path / "h")
    assert s.lake_uri == f"file://{home}/lake"
    assert s.mlflow_tracking_uri == f"sqlite:///{home}/mlflow/mlflow.db"
    assert s.mlflow_artifact_root == f"file://{home}/mlflow/artifacts"
    assert s.feast_registry.startswith(home)
    assert feast_env(s)["CLOSEDLOOP_FEAST_ONLINE_PATH"].startswith(home)
    assert s.config_path == REPO_ROOT / "models" / "card_fraud" / "closedloop.yaml"
    assert s.config.model_name == "card_fraud"


def test_default_home_is_in_the_checkout():
    assert Settings.from_env({}).home == REPO_ROOT / ".closedloop"


def test_environment_overrides(tmp_path):
    s = Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path), "CLOSEDLOOP_LAKE_URI": "s3://bucket/lake/",
                           "MLFLOW_TRACKING_URI": "http://mlflow:5000", "CLOSEDLOOP_DEVICE": "CUDA"})
    assert s.lake_uri == "s3://bucket/lake"
    assert s.mlflow_registry_uri == "http://mlflow:5000"
    assert s.device == "cuda"
    with pytest.raises(ConfigError, match="CLOSEDLOOP_DEVICE"):
        Settings.from_env({"CLOSEDLOOP_DEVICE": "tpu"})


def test_an_mlflow_client_leaves_the_environment_as_it_was(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; a second home in the same process must not
    inherit the first one's store through it."""
    import os

    from closedloop.stages.registry import mlflow_client

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow_client(Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path / "a")}))
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_REGISTRY_URI" not in os.environ
    second = Settings.from_env({**os.environ, "CLOSEDLOOP_HOME": str(tmp_path / "b")})
    assert second.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'b'}/mlflow/mlflow.db"
