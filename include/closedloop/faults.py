"""A test hook: faults injected on purpose, named by ``CLOSEDLOOP_FAULT`` (empty, and inert, in production).

The fault tests need a real crash at a precise point of a real task run by the real scheduler; this is
the one place that makes one. ``settings`` reads the variable, the stage passes it here with the name
of the point it has reached, and nothing else in the package knows about faults.

Faults (``<name>:<marker file>``):

- ``kill_train_once:<marker>``: the training task's process SIGKILLs itself right after its MLflow run
  was created, once: the marker file is created first (atomically), so the retry, which finds it,
  goes through. It proves that a killed try is retried, leaves no duplicate, and its orphan run is
  marked as one.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)

# fault name -> the point of the code where it strikes
POINTS = {"kill_train_once": "train_run_created"}


def inject(spec: str, point: str) -> None:
    """Strike the fault ``spec`` names if it belongs to ``point`` and its marker does not exist yet."""
    if not spec:
        return
    name, _, marker = spec.partition(":")
    if POINTS.get(name) != point or not marker:
        return
    try:
        fd = os.open(Path(marker), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # struck once already: this is the retry
    os.write(fd, f"{name} struck process {os.getpid()} at {point}\n".encode())
    os.close(fd)
    log.warning("test hook CLOSEDLOOP_FAULT=%s: SIGKILL to this process at %s", name, point)
    os.kill(os.getpid(), signal.SIGKILL)
