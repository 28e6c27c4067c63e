"""Fixtures of the production-configuration tests: closedloop configured by environment onto real services.

``prod_env`` points closedloop at them the way a deployment does, through the environment only: the lake
on ``s3://`` (moto), Feast's online store on Redis and its registry on Postgres, MLflow on a tracking
server (Postgres backend, artifacts on S3). See tests/support/services.py for how each is provided.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support import services


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server for the session (buckets are per test)."""
    with services.moto_server() as server:
        yield server


@pytest.fixture
def bucket(s3, monkeypatch):
    """A fresh bucket, with the environment that makes boto3, s3fs and MLflow talk to moto."""
    for key, value in services.AWS_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3.endpoint)
    with s3.bucket() as name:
        yield name


@pytest.fixture
def postgres():
    """A factory of fresh Postgres databases (``postgresql://...``), all dropped at the end of the test."""
    import contextlib

    with contextlib.ExitStack() as stack:
        yield lambda prefix="cl_test": stack.enter_context(services.postgres_database(prefix))


@pytest.fixture
def redis_url():
    with services.redis_database() as url:
        yield url


@pytest.fixture
def prod_env(home: Path, s3, bucket, redis_url, postgres, monkeypatch):
    """closedloop configured onto the services by environment (MLflow stays embedded: see ``mlflow_env``)."""
    env = {
        "CLOSEDLOOP_LAKE_URI": f"s3://{bucket}/lake",
        "CLOSEDLOOP_S3_ENDPOINT_URL": s3.endpoint,
        "CLOSEDLOOP_ONLINE_STORE": "redis",
        "CLOSEDLOOP_REDIS_URL": redis_url,
        "CLOSEDLOOP_FEAST_REGISTRY": postgres("cl_feast"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def mlflow_env(prod_env, s3, bucket, postgres, tmp_path, monkeypatch):
    """An MLflow tracking server on its own Postgres database with artifacts on S3, selected by environment."""
    artifacts = f"s3://{bucket}/mlflow"
    with services.mlflow_server(postgres("cl_mlflow"), artifacts, s3.endpoint, tmp_path / "mlflow-server.log") as srv:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
        monkeypatch.setenv("CLOSEDLOOP_MLFLOW_ARTIFACTS", artifacts)
        yield srv
