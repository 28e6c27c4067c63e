"""The DAG layer's adapter: default task arguments and the mapping of package errors to Airflow.

Imported by ``dags/`` only (the core modules never import Airflow). Light at import time: Airflow's
SDK and the package's errors, nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from airflow.sdk import Asset
from airflow.sdk.exceptions import AirflowFailException

import closedloop.adapters.airflow.secrets  # noqa: F401  (registers Airflow's log masker: every DAG imports this module)
from closedloop.core.errors import ConfigError, PermanentError
from closedloop.core.settings import Scheduling

if TYPE_CHECKING:
    from closedloop.core.settings import Settings

T = TypeVar("T")

OWNER = "closedloop"

# The Assets that chain each model's DAGs (ingest -> batch_scoring -> drift_monitoring (-> retraining, by
# trigger)) are the model's: closedloop.adapters.airflow.models.ModelDags. Their events carry the day in `extra`.

MAX_RETRY_DELAY = timedelta(minutes=10)
# Airflow 3 reads retry_exponential_backoff as a multiplier: True is 1, a constant delay, so say 2.
BACKOFF = 2.0


def task_defaults(settings: Settings | Scheduling | None = None) -> dict[str, Any]:
    """Every task's default arguments: retries with exponential backoff, and an execution timeout.

    From the settings (``CLOSEDLOOP_TASK_RETRIES``, ``CLOSEDLOOP_RETRY_DELAY_SECONDS``,
    ``CLOSEDLOOP_TASK_TIMEOUT_MINUTES``): a transient failure (a service down, a killed worker) is retried
    after about 20 s, 40 s, ... at most 10 minutes; a task that hangs is stopped after an hour and retried.
    Parsing reads only these (:class:`Scheduling`): a bad setting of another kind fails the tasks that need
    it, not the import of the DAGs.
    """
    s = settings or Scheduling.from_env()
    return {
        "owner": OWNER,
        "retries": s.task_retries,
        "retry_delay": timedelta(seconds=s.retry_delay_seconds),
        "retry_exponential_backoff": BACKOFF,
        "max_retry_delay": MAX_RETRY_DELAY,
        "execution_timeout": timedelta(minutes=s.task_timeout_minutes),
    }


DEFAULT_ARGS: dict[str, Any] = task_defaults()


def timeout(minutes: float) -> timedelta:
    """A task's own execution timeout: ``minutes``, never above the configured default.

    For tasks that only talk to a service (registering, moving an alias): a hung call fails fast and is
    retried instead of holding a worker for the default hour.
    """
    return min(timedelta(minutes=minutes), DEFAULT_ARGS["execution_timeout"])


def run_stage(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a package stage; a deterministic failure fails the task at once, anything else is retried.

    A result holding a NaN or infinite number fails the task at once too: it cannot cross XCom (JSON), and
    a retry would compute the same value again (stages make undefined metrics None, with a reason).
    """
    try:
        result = fn(*args, **kwargs)
    except PermanentError as exc:  # a refused configuration: its one line, without a chained traceback
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from (None if isinstance(exc, ConfigError) else exc)
    bad = non_finite(result)
    if bad:
        name = getattr(fn, "__name__", str(fn))
        raise AirflowFailException(f"{name} returned non-finite number(s) at {', '.join(bad[:5])}: "
                                   "not JSON, so not a task result; the stage must report them as None with a reason")
    return result


def non_finite(value: Any, path: str = "result") -> list[str]:
    """Where ``value`` (dicts, lists, numbers) holds a NaN or an infinite float: paths such as ``result['x']``."""
    import math

    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{path}[{k!r}]")]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{path}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [path]
    return []


def documented(module_doc: str | None) -> dict[str, str]:
    """``doc_md`` (the DAG file's Markdown docstring) and ``description`` (its first sentence)."""
    doc = (module_doc or "").strip()
    first = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    sentence = first.split(". ", 1)[0].rstrip(".") + "."
    return {"doc_md": doc, "description": sentence}


def conf_of(context: Any) -> dict[str, Any]:
    """The run's configuration as given by whoever triggered it (empty for scheduled runs)."""
    run = context.get("dag_run")
    return dict(getattr(run, "conf", None) or {})


def days_from_events(context: Any, asset: Asset) -> list[str]:
    """The days named in ``extra["day"]`` of the asset events that triggered this run, sorted."""
    events = (context.get("triggering_asset_events") or {}).get(asset, [])
    return sorted({str(e.extra["day"]) for e in events if (e.extra or {}).get("day")})


def active_runs(dag_id: str) -> int:
    """How many runs of ``dag_id`` are queued or running (asked through the Task SDK, not the DB)."""
    from airflow.sdk import get_current_context

    ti = get_current_context()["ti"]
    return int(ti.get_dr_count(dag_id=dag_id, states=["queued", "running"]))


def training_task_args(settings: Settings | Scheduling | None = None) -> dict[str, Any]:
    """The ``train_model`` task's placement: its executor queue and, on Kubernetes, its pod template.

    ``queue`` is ``CLOSEDLOOP_TRAINING_QUEUE`` (``default`` unless set: ``gpu`` sends training to the Celery
    worker that owns the GPU); ``executor_config`` names ``CLOSEDLOOP_TRAINING_POD_TEMPLATE`` when set, a plain
    dict the KubernetesExecutor reads (``pod_template_file``) and every other executor ignores, so that parsing
    imports nothing from Kubernetes. Every other task keeps the defaults.
    """
    s = settings or Scheduling.from_env()
    args: dict[str, Any] = {"queue": s.training_queue}
    if s.training_pod_template:
        args["executor_config"] = {"pod_template_file": s.training_pod_template}
    return args


def time_schedule(schedule: Any, fallback: Any = None) -> Any:
    """``schedule``, unless time-based schedules are off (``CLOSEDLOOP_SCHEDULES=manual``): then ``fallback``."""
    return schedule if Scheduling.from_env().time_schedules else fallback
