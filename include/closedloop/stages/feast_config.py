"""Feast's configuration from the settings' plain values: the ``registry`` and ``online_store`` sections.

:mod:`closedloop.core.settings` reads ``CLOSEDLOOP_FEAST_REGISTRY``, ``CLOSEDLOOP_ONLINE_STORE`` and
``CLOSEDLOOP_REDIS_URL`` (and refuses a malformed value before any work); this module turns those values into
what Feast wants: the SQLAlchemy URL of a SQL registry, Redis's comma-separated ``connection_string``, and the
``${...}`` values ``feature_repo/feature_store.yaml`` refers to (:func:`feast_env`, rendered by
:func:`closedloop.stages.features.feature_store` and exported by ``closedloop env``). It imports only the core.
"""

from __future__ import annotations

import json
from typing import Any

from closedloop.core.settings import Settings, check_database_registry, is_database_url, redis_url_parts

# A SQL registry is shared by every task process: each re-reads it at most this often (Feast's default is 600 s,
# long enough for a task to miss the feature view another task applied a minute before).
SQL_REGISTRY_CACHE_TTL_SECONDS = 60


def feast_sql_registry_url(url: str) -> str:
    """The SQLAlchemy URL of a ``postgresql://`` registry, with the psycopg2 driver closedloop installs.

    Feast rewrites a bare ``postgresql://`` to psycopg 3, which is not installed (and warns); naming the
    driver keeps one Postgres driver for Airflow, MLflow and Feast.
    """
    check_database_registry(url)
    _, sep, rest = url.partition("://")
    return f"postgresql+psycopg2{sep}{rest}"


def feast_redis_connection(url: str) -> str:
    """Feast's Redis ``connection_string`` (``host:port,db=N,password=...``) for a ``redis://`` URL.

    A URL is what Celery, redis-py and the secret masker understand; Feast wants its own comma-separated
    form, so the password may hold no comma (generate it with ``openssl rand -hex 32``).
    """
    r = redis_url_parts(url)
    fields = [f"{r.host}:{r.port}", f"db={r.db}"]
    if r.username:
        fields.append(f"username={r.username}")
    if r.password:
        fields.append(f"password={r.password}")
    if r.ssl:
        fields.append("ssl=true")
    return ",".join(fields)


def feast_online_store(settings: Settings) -> dict[str, str]:
    """Feast's ``online_store`` section: the SQLite file under the home, or Redis in production."""
    if settings.online_store == "redis":
        return {"type": "redis", "connection_string": feast_redis_connection(settings.redis_url)}
    return {"type": "sqlite", "path": str(settings.feast_dir / "online_store.db")}


def feast_registry_config(settings: Settings) -> dict[str, Any]:
    """Feast's ``registry`` section: a registry file (local or ``s3://``), or the SQL registry on Postgres."""
    if is_database_url(settings.feast_registry):
        return {"registry_type": "sql", "path": feast_sql_registry_url(settings.feast_registry),
                "cache_ttl_seconds": SQL_REGISTRY_CACHE_TTL_SECONDS,
                "sqlalchemy_config_kwargs": {"pool_pre_ping": True}}
    return {"registry_type": "file", "path": settings.feast_registry}


def feast_env(settings: Settings) -> dict[str, str]:
    """The values that ``feature_repo/feature_store.yaml`` refers to as ``${...}``.

    ``CLOSEDLOOP_FEAST_ONLINE_STORE`` and ``CLOSEDLOOP_FEAST_REGISTRY_CONFIG`` are the whole ``online_store``
    and ``registry`` mappings as JSON (which YAML reads as a flow mapping): the store's type decides its
    other keys, and Feast refuses keys it does not know.
    """
    return {
        # the deployment's values, not the model's: a process that reads them derives the model's paths again
        "CLOSEDLOOP_FEAST_REGISTRY": settings.feast_registry_root or settings.feast_registry,
        "CLOSEDLOOP_FEAST_REGISTRY_CONFIG": json.dumps(feast_registry_config(settings)),
        "CLOSEDLOOP_FEAST_ONLINE_PATH": str(settings.feast_dir / "online_store.db"),
        "CLOSEDLOOP_FEAST_ONLINE_STORE": json.dumps(feast_online_store(settings)),
        "CLOSEDLOOP_LAKE_URI": settings.lake_root or settings.lake_uri,
        "CLOSEDLOOP_FEAST_PROJECT": settings.feast_project,
    }
