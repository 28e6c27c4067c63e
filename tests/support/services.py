"""Real services for the production-configuration tests: Postgres, Redis, an S3 stand-in, an MLflow server.

Each test gets its own piece of each service and gives it back: a fresh Postgres database (dropped at the
end), a Redis database number claimed with a lease key (flushed before and after), a bucket on a moto S3
server (emptied and deleted), an MLflow tracking server process on its own database (its process group
stopped). Servers bind 127.0.0.1 on a port picked at run time and are health-waited with short timeouts.

A service that cannot be reached skips the test with the reason, except under ``CI=true``, where it fails
it: CI starts Postgres and Redis (``.ci/run``), so a missing one there is a broken build, not a skip.

Endpoints: ``CLOSEDLOOP_TEST_POSTGRES`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``) and
``CLOSEDLOOP_TEST_REDIS`` (default ``redis://127.0.0.1:6379``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

POSTGRES = os.environ.get("CLOSEDLOOP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("CLOSEDLOOP_TEST_REDIS", "redis://127.0.0.1:6379")
# moto accepts any credentials; these only keep boto3, s3fs, DuckDB and MLflow from looking for real ones
AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def unavailable(service: str, why: object) -> None:
    """Skip (laptop) or fail (``CI=true``) the current test because ``service`` cannot be reached."""
    msg = f"{service} is not reachable ({why}); start it (.ci/run starts Postgres and Redis) or run without CI=true"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """Stop ``proc``'s whole process group: SIGINT, SIGTERM, then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout / 3)
    with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
        os.killpg(proc.pid, signal.SIGKILL)


# -- Postgres ------------------------------------------------------------------------------------
def with_database(url: str, name: str, scheme: str | None = None) -> str:
    parts = urlsplit(url)
    return urlunsplit((scheme or parts.scheme, parts.netloc, f"/{name}", parts.query, ""))


@contextlib.contextmanager
def postgres_database(prefix: str = "cl_test") -> Iterator[str]:
    """A fresh database on the test Postgres (``postgresql://.../<name>``), dropped afterwards."""
    import psycopg2

    try:
        admin = psycopg2.connect(POSTGRES, connect_timeout=3)
    except psycopg2.OperationalError as exc:
        unavailable(f"PostgreSQL at {POSTGRES}", str(exc).strip())
    admin.autocommit = True
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield with_database(POSTGRES, name)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# -- Redis ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def redis_database(lease_seconds: int = 1800) -> Iterator[str]:
    """``redis://host:port/<n>``: a database number no other test holds (a lease key in db 0), flushed."""
    import redis

    base = redis.Redis.from_url(REDIS, socket_connect_timeout=3)
    try:
        base.ping()
        count = int(base.config_get("databases").get("databases", 16))
    except redis.exceptions.RedisError as exc:
        unavailable(f"Redis at {REDIS}", exc)
    token = uuid.uuid4().hex
    db = next((n for n in range(1, count)
               if base.set(f"closedloop-test:lease:{n}", token, nx=True, ex=lease_seconds)), None)
    if db is None:
        unavailable(f"a free Redis database at {REDIS}", f"all {count - 1} are leased")
    client = redis.Redis.from_url(REDIS, db=db)
    try:
        client.flushdb()
        yield f"{REDIS.rstrip('/')}/{db}"
    finally:
        client.flushdb()
        if base.get(f"closedloop-test:lease:{db}") == token.encode():
            base.delete(f"closedloop-test:lease:{db}")
        client.close()
        base.close()


# -- S3 (moto) -----------------------------------------------------------------------------------
@dataclass
class S3:
    """A moto S3 server at ``endpoint``."""

    endpoint: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"])

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    @contextlib.contextmanager
    def bucket(self) -> Iterator[str]:
        """A new bucket, emptied and deleted afterwards."""
        name = f"cl-test-{uuid.uuid4().hex[:12]}"
        s3 = self.client()
        s3.create_bucket(Bucket=name)
        try:
            yield name
        finally:
            for key in self.keys(name):
                s3.delete_object(Bucket=name, Key=key)
            s3.delete_bucket(Bucket=name)


@contextlib.contextmanager
def moto_server() -> Iterator[S3]:
    """moto's S3 server in its own process group on a free port of 127.0.0.1."""
    import httpx

    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, **AWS_ENV})
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            return httpx.get(f"{endpoint}/moto-api/", timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 60, f"moto's S3 server on {endpoint}")
        yield S3(endpoint)
    finally:
        stop_group(proc)


# -- MLflow tracking server ----------------------------------------------------------------------
@dataclass
class MlflowServer:
    url: str
    backend: str
    artifacts: str
    log: Path


@contextlib.contextmanager
def mlflow_server(backend: str, artifact_root: str, s3_endpoint: str, log: Path,
                  timeout: float = 120) -> Iterator[MlflowServer]:
    """``mlflow server`` on the database ``backend`` with artifacts under ``artifact_root`` on S3.

    Clients write artifacts straight to the artifact root (``--no-serve-artifacts``), which is what
    closedloop's experiments name: ``CLOSEDLOOP_MLFLOW_ARTIFACTS``. The job runner is off (it would leave
    consumers behind); the process group is stopped at the end.
    """
    import httpx

    port = free_port()
    env = {**os.environ, **AWS_ENV, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", with_database(backend, urlsplit(backend).path.strip("/"), "postgresql+psycopg2"),
           "--default-artifact-root", artifact_root, "--no-serve-artifacts", "--workers", "1"]
    out = open(log, "ab")  # noqa: SIM115 - kept open for the process's life
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout, f"the MLflow server on {url}")
        yield MlflowServer(url, backend, artifact_root, log)
    finally:
        stop_group(proc)
        out.close()
