"""Faults injected on purpose into the Airflow task processes of the fault tests: a test hook, outside the package.

The fault tests need a real crash at a precise point of a real task run by the real scheduler: right after the
training task's MLflow run was created, before the model is logged and registered. Nothing of the package knows
about faults; this module strikes from outside, in the processes of the Airflow stack a test starts with
:func:`environment` (``CLOSEDLOOP_TEST_FAULTS`` naming the faults, and ``fault_path/`` on ``PYTHONPATH``):

- ``fault_path/sitecustomize.py`` is imported by Python at the start of every interpreter that has that folder on
  its path: each Airflow component the test starts inherits the environment, and on Linux the LocalExecutor's
  workers and the task processes they supervise are forks of the scheduler (multiprocessing's default ``fork``
  start method; ``os.fork`` in ``airflow/sdk/execution_time/supervisor.py``), so they carry what it installed
  there; a component started another way (``exec``, a Celery worker) imports it afresh. With the variable unset
  it does nothing.
- It calls :func:`install`: ``mlflow.start_run`` is wrapped when ``mlflow`` is first imported. The wrapper
  strikes right after the real ``start_run`` returned, for a training run only (the one run that carries the
  ``closedloop.lineage_key`` tag when it is created: ``training.train_and_log``): the point where the package
  used to call this hook itself, the run created and RUNNING, nothing logged to it yet.

Why not the other ways (issue 19): an Airflow listener plugin does run in the task process
(``on_task_instance_running`` is called by ``startup()`` in ``airflow/sdk/execution_time/task_runner.py``, and
``airflow.sdk.listener.get_listener_manager`` loads the plugins folder's listeners there), but it fires before
the task's callable, not when its MLflow run exists, so it would still have to patch MLflow, and the test's
Airflow would have to load another plugins folder than the project's. A generic extension point in production
(an MLflow run-context provider is asked for tags before the run exists) would put a test's need into the
package. This way the stack under test runs with the project's own Airflow configuration, plugins and code.

Faults (``<name>:<argument>``, several separated by commas):

- ``kill_train_once:<marker>``: the training task's process SIGKILLs itself right after its MLflow run
  was created, once: the marker file is created first (atomically), so the retry, which finds it,
  goes through. It proves that a killed try is retried, leaves no duplicate, and its orphan run is
  marked as one.
- ``kill_train_tree:<dag run id>``: in every try of the training task of that DAG run, the process that
  supervises the task (its parent, an Airflow worker: it heartbeats for the task and reports its end) is
  SIGKILLed, then the task's own process: nobody is left to report, as when a worker machine dies. Only
  the scheduler's task-instance heartbeat timeout can end the try. It refuses to strike where the parent is
  not an Airflow worker (``dag.test()``, a test process), so that it never kills anything else.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

ENV = "CLOSEDLOOP_TEST_FAULTS"
SITE = Path(__file__).resolve().parent / "fault_path"  # holds the sitecustomize.py that calls install()
LINEAGE_TAG = "closedloop.lineage_key"  # set when a training run is created, and on no other run

# fault name -> the point of the code where it strikes
POINTS = {"kill_train_once": "train_run_created", "kill_train_tree": "train_run_created"}


def environment(spec: str, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that make the faults of ``spec`` strike in the processes started with them (and in
    their children): ``PYTHONPATH`` with :data:`SITE` first (``env``'s, default this process's, kept after it)."""
    env = os.environ if env is None else env
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(SITE), env.get("PYTHONPATH", "")])), ENV: spec}


def install() -> None:
    """Wrap ``mlflow.start_run`` so that a training run's creation strikes the faults of ``$CLOSEDLOOP_TEST_FAULTS``:
    at once when ``mlflow`` is imported already, else when it is first imported (nothing is imported here)."""
    if "mlflow" in sys.modules:
        _wrap(sys.modules["mlflow"])
    if not any(isinstance(f, _WrapOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _WrapOnImport())


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds ``mlflow`` as the other finders do, and wraps ``start_run`` once its module has run."""

    def __init__(self) -> None:
        self._finding = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "mlflow" or self._finding:
            return None
        self._finding = True
        try:
            spec = importlib.util.find_spec(fullname)  # the other finders (this one answers None meanwhile)
        finally:
            self._finding = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            _wrap(module)

        spec.loader.exec_module = exec_module  # this spec's own loader object
        return spec


def _wrap(mlflow: ModuleType) -> None:
    start_run = mlflow.start_run
    if getattr(start_run, "closedloop_test_faults", False):
        return
    signature = inspect.signature(start_run)

    @functools.wraps(start_run)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        active = start_run(*args, **kwargs)
        if LINEAGE_TAG in (signature.bind_partial(*args, **kwargs).arguments.get("tags") or {}):
            try:
                inject(os.environ.get(ENV, ""), "train_run_created")
            except BaseException:  # a refusal: the run ends FAILED, as when the training's `with` block raises
                active.__exit__(*sys.exc_info())
                raise
        return active

    wrapped.closedloop_test_faults = True  # type: ignore[attr-defined]
    mlflow.start_run = wrapped  # type: ignore[attr-defined]


def inject(spec: str, point: str) -> None:
    """Strike each fault of ``spec`` that belongs to ``point`` (and whose condition holds)."""
    for one in filter(None, (s.strip() for s in spec.split(","))):
        name, _, arg = one.partition(":")
        if POINTS.get(name) != point or not arg:
            continue
        if name == "kill_train_once":
            _kill_once(name, arg, point)
        elif name == "kill_train_tree" and os.environ.get("AIRFLOW_CTX_DAG_RUN_ID") == arg:
            _kill_tree(name, arg, point)


def _kill_once(name: str, marker: str, point: str) -> None:
    try:
        fd = os.open(Path(marker), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # struck once already: this is the retry
    os.write(fd, f"{name} struck process {os.getpid()} at {point}\n".encode())
    os.close(fd)
    log.warning("test hook %s=%s: SIGKILL to this process at %s", ENV, name, point)
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_tree(name: str, run_id: str, point: str) -> None:
    parent = os.getppid()
    try:
        title = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        title = ""
    if "airflow worker" not in title:
        raise RuntimeError(f"test hook {ENV}={name}:{run_id} refuses to strike: the parent process "
                           f"{parent} is not an Airflow worker ({title[:200]!r})")
    log.warning("test hook %s=%s:%s: SIGKILL to the supervising worker %d and to this process at %s",
                ENV, name, run_id, parent, point)
    os.kill(parent, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
