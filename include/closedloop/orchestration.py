"""The DAG layer's adapter: default task arguments and the mapping of package errors to Airflow.

Imported by ``dags/`` only (the core modules never import Airflow). Light at import time: Airflow's
SDK and the package's errors, nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from airflow.sdk.exceptions import AirflowFailException

from closedloop.errors import PermanentError

T = TypeVar("T")

OWNER = "closedloop"

DEFAULT_ARGS: dict[str, Any] = {
    "owner": OWNER,
    "retries": 2,
    "retry_delay": timedelta(seconds=20),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(minutes=60),
}


def run_stage(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a package stage; a deterministic failure fails the task at once, anything else is retried."""
    try:
        return fn(*args, **kwargs)
    except PermanentError as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def documented(module_doc: str | None) -> dict[str, str]:
    """``doc_md`` (the DAG file's Markdown docstring) and ``description`` (its first sentence)."""
    doc = (module_doc or "").strip()
    first = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    sentence = first.split(". ", 1)[0].rstrip(".") + "."
    return {"doc_md": doc, "description": sentence}
