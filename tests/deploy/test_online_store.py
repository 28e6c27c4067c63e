"""Feast's online store by configuration: SQLite on a laptop, Redis in the production stack.

``feature_repo/feature_store.yaml`` takes the whole ``online_store`` mapping from the settings
(``CLOSEDLOOP_ONLINE_STORE``, ``CLOSEDLOOP_REDIS_URL``); these tests render it as ``features.feature_store``
does and check what Feast would be given, and what is refused before any work.
"""

from __future__ import annotations

import string

import pytest
import yaml

from closedloop.core.errors import ConfigError
from closedloop.core.settings import Settings
from closedloop.stages.feast_config import feast_env, feast_redis_connection


def rendered(settings: Settings) -> dict:
    text = (settings.feast_repo / "feature_store.yaml").read_text()
    return yaml.safe_load(string.Template(text).safe_substitute(feast_env(settings)))


def redis_settings(tmp_path, url: str) -> Settings:
    return Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path), "CLOSEDLOOP_ONLINE_STORE": "redis",
                              "CLOSEDLOOP_REDIS_URL": url})


def test_sqlite_under_the_home_by_default(tmp_path):
    settings = Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path)})
    assert settings.online_store == "sqlite"
    assert rendered(settings)["online_store"] == {"type": "sqlite", "path": str(tmp_path / "feast" / "online_store.db")}


def test_the_default_still_builds_feasts_sqlite_store(tmp_path):
    from closedloop.stages.features import feature_store

    store = feature_store(Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path)}))
    assert type(store.config.online_store).__name__ == "SqliteOnlineStoreConfig"


def test_redis_by_configuration(tmp_path):
    settings = redis_settings(tmp_path, "redis://:pw-4711@redis:6379/1")
    assert rendered(settings)["online_store"] == {"type": "redis",
                                                  "connection_string": "redis:6379,db=1,password=pw-4711"}
    assert "pw-4711" not in repr(settings)  # the URL holds a password: never in a logged repr


def test_feast_accepts_the_rendered_redis_store(tmp_path):
    pytest.importorskip("redis", reason="Feast's Redis store is in the production extra only")
    from feast.repo_config import RepoConfig

    config = RepoConfig(**rendered(redis_settings(tmp_path, "redis://:pw@redis:6379/1")))
    assert config.online_store.connection_string == "redis:6379,db=1,password=pw"


@pytest.mark.parametrize(("url", "connection"), [
    ("redis://redis", "redis:6379,db=0"),
    ("redis://cache.internal:6380/3", "cache.internal:6380,db=3"),
    ("rediss://feast:p%40s@cache:6380/2", "cache:6380,db=2,username=feast,password=p@s,ssl=true"),
])
def test_redis_urls_become_feast_connection_strings(url, connection):
    assert feast_redis_connection(url) == connection


@pytest.mark.parametrize(("env", "says"), [
    ({"CLOSEDLOOP_ONLINE_STORE": "dynamodb"}, "use one of sqlite, redis"),
    ({"CLOSEDLOOP_ONLINE_STORE": "redis"}, "needs CLOSEDLOOP_REDIS_URL"),
    ({"CLOSEDLOOP_ONLINE_STORE": "redis", "CLOSEDLOOP_REDIS_URL": "http://redis:6379"}, "expected redis://"),
    ({"CLOSEDLOOP_ONLINE_STORE": "redis", "CLOSEDLOOP_REDIS_URL": "redis://redis/cache"}, "must be a number"),
    ({"CLOSEDLOOP_ONLINE_STORE": "redis", "CLOSEDLOOP_REDIS_URL": "redis://:a%2Cb@redis/1"}, "comma"),
])
def test_a_bad_online_store_is_refused_before_any_work(tmp_path, env, says):
    with pytest.raises(ConfigError, match=says):
        Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path), **env})
