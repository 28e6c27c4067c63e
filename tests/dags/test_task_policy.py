"""The tasks' retry and timeout policy: configurable, with a real exponential backoff and a timeout everywhere."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from closedloop.adapters.airflow.orchestration import task_defaults
from closedloop.core.errors import ConfigError
from closedloop.core.settings import Settings


def _settings(**env: str) -> Settings:
    return Settings.from_env({"CLOSEDLOOP_HOME": "/nonexistent-closedloop-home", **env})


def test_the_production_defaults():
    args = task_defaults(_settings())
    assert args["retries"] == 2
    assert args["retry_delay"] == timedelta(seconds=20)
    assert args["execution_timeout"] == timedelta(minutes=60)
    assert args["max_retry_delay"] == timedelta(minutes=10)
    # Airflow 3 reads it as a multiplier: True would be 1, a constant delay
    assert args["retry_exponential_backoff"] is not True and args["retry_exponential_backoff"] >= 2


def test_retries_delay_and_timeout_come_from_the_environment():
    args = task_defaults(_settings(CLOSEDLOOP_TASK_RETRIES="4", CLOSEDLOOP_RETRY_DELAY_SECONDS="1.5",
                                   CLOSEDLOOP_TASK_TIMEOUT_MINUTES="5"))
    assert args["retries"] == 4
    assert args["retry_delay"] == timedelta(seconds=1.5)
    assert args["execution_timeout"] == timedelta(minutes=5)


@pytest.mark.parametrize("name", ["CLOSEDLOOP_TASK_RETRIES", "CLOSEDLOOP_RETRY_DELAY_SECONDS",
                                  "CLOSEDLOOP_TASK_TIMEOUT_MINUTES"])
@pytest.mark.parametrize("value", ["-1", "soon"])
def test_a_bad_value_is_refused_with_its_name(name, value):
    with pytest.raises(ConfigError, match=name):
        _settings(**{name: value})


def test_retry_delays_grow_exponentially_on_the_scheduler(dagbag):
    """What the scheduler computes for the retraining DAG's tasks: each retry waits longer, up to the cap."""
    from airflow.models.taskinstance import TaskInstance

    dag = dagbag.get_dag("retraining")
    task = dag.get_task("train_model")
    assert task.execution_timeout is not None
    assert dag.get_task("register_model").execution_timeout <= task.execution_timeout
    ti = TaskInstance(task=task, run_id="policy", dag_version_id=None)
    ti.end_date = datetime(2026, 1, 1, tzinfo=UTC)
    delays = []
    for try_number in range(1, 8):
        ti.try_number = try_number
        delays.append((ti.next_retry_datetime() - ti.end_date).total_seconds())
    base = task.retry_delay.total_seconds()
    assert base <= delays[0] <= 2 * base
    assert delays[2] > delays[0]
    assert max(delays) <= task.max_retry_delay.total_seconds()
