"""Extra links of the tasks that produce something, and the TaskFlow decorators whose operators carry them.

DAG layer only (imports Airflow). In Airflow 3 a task's extra links come from its operator class: the worker
calls each link's ``get_link`` when the task ends and keeps the URL as an XCom (key ``_link_<class name>``);
the API server only reads that XCom back, so the link classes need no plugin registration. Each link builds
its URL from the task's own return value (its ``return_value`` XCom) with the plain functions below:

- "MLflow run": ``run_id`` (train, register) or ``mlflow_run_id`` (drift) -> ``<MLflow UI>/#/runs/<id>``;
- "MLflow model version": ``model`` and ``version`` (register, promote / reject) ->
  ``<MLflow UI>/#/models/<model>/versions/<version>``;
- "Drift report": ``window`` -> the Evidently HTML the Model health page serves,
  ``/closedloop/reports/drift/<start>_<end>/report.html``;
- "Validation report": ``window`` (retraining) or ``day`` (ingest) -> the window's validation records,
  ``/closedloop/reports/validation/<start>_<end>.json``.

The report links end with ``?model=<name>``, the model of the task's DAG (its ``model:<name>`` tag): the page
serves each model's reports from that model's lake.

The MLflow UI is ``CLOSEDLOOP_MLFLOW_UI_URL`` (settings); the reports are under Airflow's ``[api] base_url``
(a path from the UI's root when unset). A link whose task returned nothing (it failed) or without an MLflow UI
is empty, and the UI shows it disabled.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit, urlunsplit

from airflow.providers.standard.decorators.python import _PythonDecoratedOperator
from airflow.sdk import BaseOperatorLink
from airflow.sdk.bases.decorator import task_decorator_factory

from closedloop.adapters.airflow.models import model_of
from closedloop.core.settings import Settings, check_mlflow_ui_url

if TYPE_CHECKING:
    from airflow.sdk import BaseOperator
    from airflow.sdk.types import TaskInstanceKey

REPORTS_ROUTE = "/closedloop/reports/"  # plugins/model_health.py: URL_PREFIX + its report route


# -- the URLs, from a task's return value ---------------------------------------------------------------------
def mlflow_run_url(ui: str, result: Any) -> str:
    run_id = _get(result, "run_id") or _get(result, "mlflow_run_id")
    return f"{ui.rstrip('/')}/#/runs/{quote(str(run_id), safe='')}" if ui and run_id else ""


def model_version_url(ui: str, result: Any) -> str:
    model, version = _get(result, "model"), _get(result, "version")
    if not (ui and model and version):
        return ""
    return f"{ui.rstrip('/')}/#/models/{quote(str(model), safe='')}/versions/{quote(str(version), safe='')}"


def drift_report_url(base: str, result: Any, model: str | None = None) -> str:
    window = _window(result)
    return (f"{base.rstrip('/')}{REPORTS_ROUTE}drift/{window[0]}_{window[1]}/report.html{_model_query(model)}"
            if window else "")


def validation_report_url(base: str, result: Any, model: str | None = None) -> str:
    window = _window(result)
    return (f"{base.rstrip('/')}{REPORTS_ROUTE}validation/{window[0]}_{window[1]}.json{_model_query(model)}"
            if window else "")


def _model_query(model: str | None) -> str:
    """``?model=<name>``: the page serves the reports of the model it names (its default model's without)."""
    return f"?model={quote(model, safe='')}" if model else ""


def _model_of(operator: Any) -> str | None:
    """The model of the operator's DAG (:func:`closedloop.adapters.airflow.models.model_of`); None outside one."""
    try:
        dag = operator.dag
    except Exception:  # an operator not (yet) in a DAG
        return None
    return model_of(dag)


def _get(result: Any, key: str) -> Any:
    return result.get(key) if isinstance(result, dict) else None


def _window(result: Any) -> tuple[str, str] | None:
    """``(start, end)`` of a result's ``window``, or of its ``day`` (one day); None when it names neither."""
    try:
        window = _get(result, "window")
        if isinstance(window, dict):
            start, end = date.fromisoformat(window["start"]), date.fromisoformat(window["end"])
        elif _get(result, "day"):
            start = date.fromisoformat(str(result["day"]))
            end = start + timedelta(days=1)
        else:
            return None
    except (KeyError, TypeError, ValueError):
        return None
    return start.isoformat(), end.isoformat()


# -- the link classes -------------------------------------------------------------------------------------------
def mlflow_ui_url(explicit: str | None, tracking_uri: str) -> str:
    """The MLflow UI's base URL for links: ``explicit`` when set, else an ``http(s)`` tracking URI without any
    ``user:password@``; empty when neither gives one (a ``sqlite:`` store has no UI to link)."""
    url = check_mlflow_ui_url(explicit)
    if url:
        return url
    if not tracking_uri.startswith(("http://", "https://")):
        return ""
    parts = urlsplit(tracking_uri)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def _mlflow_ui() -> str:
    s = Settings.deployment()  # MLflow's store is every model's
    return mlflow_ui_url(s.mlflow_ui_url, s.mlflow_tracking_uri)


def _airflow_base() -> str:
    from airflow.configuration import conf

    return conf.get("api", "base_url", fallback="") or ""


class _ResultLink(BaseOperatorLink):
    """A link built from the task's return value by ``url(base, result)``."""

    name = ""
    per_model = False  # url takes the model of the task's DAG too
    url: Callable[..., str]
    base: Callable[[], str]

    def get_link(self, operator: BaseOperator, *, ti_key: TaskInstanceKey) -> str:
        from airflow.sdk.execution_time.xcom import XCom  # the configured XCom backend

        result = XCom.get_value(ti_key=ti_key, key="return_value")
        if result is None:
            return ""
        if type(self).per_model:  # the report of this task's model, whichever the page shows by default
            return type(self).url(type(self).base(), result, _model_of(operator))
        return type(self).url(type(self).base(), result)


class MlflowRunLink(_ResultLink):
    name = "MLflow run"
    url = staticmethod(mlflow_run_url)
    base = staticmethod(_mlflow_ui)


class MlflowModelVersionLink(_ResultLink):
    name = "MLflow model version"
    url = staticmethod(model_version_url)
    base = staticmethod(_mlflow_ui)


class DriftReportLink(_ResultLink):
    name = "Drift report"
    url = staticmethod(drift_report_url)
    per_model = True
    base = staticmethod(_airflow_base)


class ValidationReportLink(_ResultLink):
    name = "Validation report"
    url = staticmethod(validation_report_url)
    per_model = True
    base = staticmethod(_airflow_base)


# -- the operators and their TaskFlow decorators ----------------------------------------------------------------
class MlflowRunOperator(_PythonDecoratedOperator):
    """A TaskFlow task that logs an MLflow run (train_model)."""

    custom_operator_name = "@mlflow_run_task"
    operator_extra_links = (MlflowRunLink(),)


class ModelVersionOperator(_PythonDecoratedOperator):
    """A TaskFlow task that makes or moves a model version (register_model, promote_or_reject)."""

    custom_operator_name = "@model_version_task"
    operator_extra_links = (MlflowModelVersionLink(),)


class DriftReportOperator(_PythonDecoratedOperator):
    """A TaskFlow task that writes an Evidently drift report and its MLflow run (measure_drift)."""

    custom_operator_name = "@drift_report_task"
    operator_extra_links = (DriftReportLink(), MlflowRunLink())


class ValidationReportOperator(_PythonDecoratedOperator):
    """A TaskFlow task that validates partitions (validate_window, validate_partitions)."""

    custom_operator_name = "@validation_task"
    operator_extra_links = (ValidationReportLink(),)


def _decorator(operator_class: type[_PythonDecoratedOperator]) -> Callable[..., Any]:
    def decorator(python_callable: Callable | None = None, **kwargs: Any) -> Any:
        return task_decorator_factory(python_callable, decorated_operator_class=operator_class, **kwargs)

    decorator.__doc__ = f"``@task`` whose operator is :class:`{operator_class.__name__}` (its extra links)."
    return decorator


mlflow_run_task = _decorator(MlflowRunOperator)
model_version_task = _decorator(ModelVersionOperator)
drift_report_task = _decorator(DriftReportOperator)
validation_task = _decorator(ValidationReportOperator)
