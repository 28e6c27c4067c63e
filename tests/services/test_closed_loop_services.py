"""The closed loop on the production-shaped configuration, driven by the real Airflow scheduler.

Every piece is the production kind, selected by environment only: Airflow on its own Postgres database with
the LocalExecutor (scheduler, dag-processor, triggerer and API server as processes), MLflow as a tracking
server on Postgres with its artifacts on S3, the lake on ``s3://``, Feast's SQL registry on Postgres, its
online store on Redis and its DuckDB offline store reading the curated zone on S3 (S3 is moto's server).

Small data: a first retraining promotes a champion, then one more day is ingested and the scheduler runs
``batch_scoring`` and ``drift_monitoring`` on the Asset events. The outcomes are read where each service
keeps them, not from closedloop's own summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import services

pytestmark = pytest.mark.integration

DAGS = ("ingest", "batch_scoring", "drift_monitoring", "retraining")


def _rows(url: str, sql: str) -> list[tuple]:
    import sqlalchemy as sa

    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg2://", 1))
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql)).all()]
    finally:
        engine.dispose()


def test_the_loop_on_postgres_mlflow_server_s3_and_redis(mlflow_env, prod_env, postgres, s3, bucket, redis_url,
                                                         monkeypatch):
    import redis

    from closedloop.devtools.airflow_home import airflow_home, write_config
    from closedloop.devtools.demo import DemoPlan, run_demo
    from closedloop.stages.registry import CHAMPION, alias_version
    from closedloop.stages.runtime import Runtime

    rt = Runtime.from_env()
    af_home = airflow_home(rt.settings)
    write_config(rt.settings, parallelism=2)
    airflow_db = postgres("cl_airflow")
    # Airflow of its own, in subprocesses: the pytest process's Airflow is fixed on the session's SQLite
    for var in [v for v in os.environ if v.startswith("AIRFLOW__")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AIRFLOW_HOME", str(af_home))
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
                       airflow_db.replace("postgresql://", "postgresql+psycopg2://", 1))
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    migrate = subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], capture_output=True,
                             text=True, timeout=300, env=os.environ.copy())
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]

    lines: list[str] = []
    plan = DemoPlan(warmup_days=3, history_days=8, normal_days=1, drift_days=0, customers=300,
                    transactions_per_day=800, fraud_rate=0.04)
    summary = run_demo(rt, plan, port=services.free_port(), say=lines.append, timeout=420)
    text = "\n".join(lines)
    assert summary["champion_after"] == "1", text

    # Airflow: every run of the loop succeeded, as its Postgres database says
    runs = _rows(airflow_db, "SELECT dag_id, state FROM dag_run")
    assert {d for d, _ in runs} >= set(DAGS), (runs, text)
    assert all(state == "success" for _, state in runs), (runs, text)

    # MLflow: the champion alias is in the tracking server's Postgres, the model's files in the bucket
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "1"
    aliases = _rows(mlflow_env.backend, "SELECT name, alias, version FROM registered_model_aliases")
    assert (rt.model_name, CHAMPION, 1) in aliases
    keys = s3.keys(bucket)
    assert any(k.startswith("mlflow/") and k.endswith("MLmodel") for k in keys), keys

    # the lake on S3: curated partitions of every day, the scored day's predictions, a drift report
    c = rt.contract
    last = plan.drift_start - __import__("datetime").timedelta(days=1)
    for day in (plan.history_start, last):
        assert f"lake/curated/transactions/{day.isoformat()}.parquet" in keys
        assert f"lake/curated/{c.feature_view}/{day.isoformat()}.parquet" in keys
    assert f"lake/predictions/transactions/{last.isoformat()}.parquet" in keys
    assert any(k.startswith("lake/reports/") for k in keys), keys

    # Feast: the view in the SQL registry on Postgres, the features in Redis
    registry = rt.settings.feast_registry
    assert _rows(registry, "SELECT feature_view_name FROM feature_views") == [(c.feature_view,)]
    assert redis.Redis.from_url(redis_url).dbsize() > 0
