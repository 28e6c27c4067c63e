"""The service fixtures' policy: an unreachable service skips the test on a laptop and fails it under CI=true."""

from __future__ import annotations

import pytest
from _pytest.outcomes import Failed, Skipped
from support import services


@pytest.fixture
def dead_postgres(monkeypatch):
    monkeypatch.setattr(services, "POSTGRES", f"postgresql://postgres@127.0.0.1:{services.free_port()}/postgres")


@pytest.mark.parametrize(("ci", "outcome"), [("", Skipped), ("false", Skipped), ("true", Failed)])
def test_an_unreachable_postgres(dead_postgres, monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    says = r"PostgreSQL at postgresql://postgres@127\.0\.0\.1:\d+/postgres is not reachable"
    with pytest.raises(outcome, match=says), services.postgres_database():
        pass


def test_an_unreachable_redis(monkeypatch):
    monkeypatch.setattr(services, "REDIS", f"redis://127.0.0.1:{services.free_port()}")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(Failed, match=r"Redis at redis://127\.0\.0\.1:\d+ is not reachable"), services.redis_database():
        pass


def test_each_test_gets_its_own_database_and_redis_db_and_gives_them_back():
    import psycopg2
    import redis

    with services.postgres_database() as a, services.postgres_database() as b:
        assert a != b
        psycopg2.connect(a, connect_timeout=3).close()
    with psycopg2.connect(services.POSTGRES) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_database WHERE datname IN (%s, %s)",
                    (a.rsplit("/", 1)[1], b.rsplit("/", 1)[1]))
        assert cur.fetchone()[0] == 0  # dropped
    with services.redis_database() as r1, services.redis_database() as r2:
        assert r1 != r2
        redis.Redis.from_url(r1).set("k", "v")
        assert redis.Redis.from_url(r2).get("k") is None
    assert redis.Redis.from_url(r1).dbsize() == 0  # flushed
