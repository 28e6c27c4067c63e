"""A test hook: faults injected on purpose, named by ``CLOSEDLOOP_FAULT`` (empty, and inert, in production).

The fault tests need a real crash at a precise point of a real task run by the real scheduler; this is
the one place that makes one. ``settings`` reads the variable, the stage passes it here with the name
of the point it has reached, and nothing else in the package knows about faults.

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

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

# fault name -> the point of the code where it strikes
POINTS = {"kill_train_once": "train_run_created", "kill_train_tree": "train_run_created"}


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
    log.warning("test hook CLOSEDLOOP_FAULT=%s: SIGKILL to this process at %s", name, point)
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_tree(name: str, run_id: str, point: str) -> None:
    parent = os.getppid()
    try:
        title = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        title = ""
    if "airflow worker" not in title:
        raise RuntimeError(f"test hook CLOSEDLOOP_FAULT={name}:{run_id} refuses to strike: the parent process "
                           f"{parent} is not an Airflow worker ({title[:200]!r})")
    log.warning("test hook CLOSEDLOOP_FAULT=%s:%s: SIGKILL to the supervising worker %d and to this process at %s",
                name, run_id, parent, point)
    os.kill(parent, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
