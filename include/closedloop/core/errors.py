"""Errors of the closedloop package.

The package never imports Airflow: it raises these, and the DAG layer maps them to "fail now"
(:class:`PermanentError`, no retry can help) or "retry" (:class:`TransientError`).
"""

from __future__ import annotations


class ClosedloopError(Exception):
    """Base class of every error the package raises on purpose."""


class PermanentError(ClosedloopError):
    """A deterministic failure: retrying with the same input gives the same outcome."""


class TransientError(ClosedloopError):
    """A failure that a retry may cure (a service down, a lost connection)."""


class ConfigError(PermanentError):
    """A configuration, schema file or run configuration is invalid."""


class ContractError(PermanentError):
    """A data-contract (schema) file is invalid."""


class DataValidationError(PermanentError):
    """A partition broke a blocking rule of its data contract; it has been quarantined."""

    def __init__(self, message: str, *, report_uri: str | None = None, quarantine_uri: str | None = None):
        super().__init__(message)
        self.report_uri = report_uri
        self.quarantine_uri = quarantine_uri


class NoDataError(PermanentError):
    """The requested window holds no (or not enough) data."""


class PromotionConflict(PermanentError):
    """`champion` no longer points where the promotion decision expected (compare-and-set lost)."""


def first_line(text: object, limit: int = 300) -> str:
    """The first line of ``text`` (an exception's message too) cut at ``limit`` characters; "" for none or blank."""
    s = str(text if text is not None else "").strip()
    return s.splitlines()[0][:limit] if s else ""


def error_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it): an error in one short line."""
    return f"{type(exc).__name__}: {first_line(exc, limit)}"
