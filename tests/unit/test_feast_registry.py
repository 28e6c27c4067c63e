"""Feast's registry by configuration: a file on a laptop (or s3://), the SQL registry on Postgres in production.

``feature_repo/feature_store.yaml`` takes the whole ``registry`` mapping from the settings; these tests render
it as ``features.feature_store`` does and hand it to Feast's own ``RepoConfig``.
"""

from __future__ import annotations

import string

import pytest
import yaml

from closedloop.core.errors import ConfigError
from closedloop.core.settings import Settings
from closedloop.stages.feast_config import feast_env


def rendered(settings: Settings) -> dict:
    text = (settings.feast_repo / "feature_store.yaml").read_text()
    return yaml.safe_load(string.Template(text).safe_substitute(feast_env(settings)))


def settings(tmp_path, registry: str | None = None) -> Settings:
    env = {"CLOSEDLOOP_HOME": str(tmp_path)}
    if registry is not None:
        env["CLOSEDLOOP_FEAST_REGISTRY"] = registry
    return Settings.from_env(env)


def test_a_file_under_the_home_by_default(tmp_path):
    assert rendered(settings(tmp_path))["registry"] == {"registry_type": "file",
                                                       "path": str(tmp_path / "feast" / "registry.db")}


def test_an_s3_registry_file(tmp_path):
    assert rendered(settings(tmp_path, "s3://bucket/feast/registry.db"))["registry"] == {
        "registry_type": "file", "path": "s3://bucket/feast/registry.db"}


@pytest.mark.parametrize("url", ["postgresql://feast:pw123@db:5432/feast", "postgres://feast:pw123@db:5432/feast",
                                 "postgresql+psycopg2://feast:pw123@db:5432/feast"])
def test_a_database_url_selects_the_sql_registry_with_psycopg2(tmp_path, url):
    from feast.repo_config import RepoConfig

    s = settings(tmp_path, url)
    section = rendered(s)["registry"]
    assert section["registry_type"] == "sql"
    assert section["path"] == "postgresql+psycopg2://feast:pw123@db:5432/feast"
    assert 0 < section["cache_ttl_seconds"] <= 60  # tasks see a view another task applied within a minute
    config = RepoConfig(**rendered(s))  # what Feast is given is what it accepts
    assert config.registry.registry_type == "sql"
    assert config.registry.path == section["path"]  # not rewritten to psycopg 3 (not installed)
    assert config.registry.sqlalchemy_config_kwargs == {"pool_pre_ping": True}
    assert "pw123" not in repr(s)


@pytest.mark.parametrize(("url", "says"), [
    ("mysql://feast@db/feast", "not a database URL Feast can use"),
    ("postgresql://", "not a database URL Feast can use"),
])
def test_an_unusable_database_is_refused_before_any_work(tmp_path, url, says):
    with pytest.raises(ConfigError, match=says):
        settings(tmp_path, url)
