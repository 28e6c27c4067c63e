"""DAGs per model: every DAG file builds its DAG once for each model of the deployment.

The models are the folders of ``CLOSEDLOOP_MODELS`` (``models/<name>/closedloop.yaml`` and its schema;
:func:`closedloop.core.settings.model_entries`), or the one file of ``CLOSEDLOOP_CONFIG``. This is Airflow's
dynamic DAG generation from configuration files: ``for_each_model("ingest", build)`` at the bottom of
``dags/ingest.py`` calls ``build(model)`` for each model whose configuration and schema load, and ``build`` makes
that model's DAG (id ``<name>.ingest``, or ``ingest`` for the model with the root layout), its tasks working on
that model only (``Runtime.from_env(model.name)``).

A model whose configuration (or schema) is refused gets, in place of its DAG, one that Airflow refuses to put in
its DAG bag: its timetable's ``validate()`` (the hook Airflow calls when it bags a DAG) raises the configuration's
one-line error, naming the file and the key. Airflow shows it as an import error of the DAG file; the other
models' DAGs of the same file load and run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pendulum
from airflow.sdk import DAG, Asset
from airflow.sdk.bases.timetable import BaseTimetable

from closedloop.core.errors import ConfigError, PermanentError
from closedloop.core.settings import ModelEntry, check_model, model_entries

MODEL_TAG = "model:"


@dataclass(frozen=True)
class ModelDags:
    """What a DAG file needs of one model: its name, its DAG ids and the Assets that chain its DAGs."""

    entry: ModelEntry

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def namespaced(self) -> bool:
        return self.entry.namespaced

    def dag_id(self, kind: str) -> str:
        """``<name>.<kind>`` when namespaced, ``kind`` for the root layout."""
        return self.entry.dag_id(kind)

    def tags(self, *kinds: str) -> list[str]:
        """The DAG's tags: ``closedloop``, its kinds and ``model:<name>`` (the UI filters DAGs by it; the
        notifier reads the model of an alert from it)."""
        return ["closedloop", *kinds, f"{MODEL_TAG}{self.name}"]

    def _asset(self, what: str) -> Asset:
        if not self.namespaced:  # a single-model home's Assets, kept
            return Asset(name=f"closedloop_{what}", uri=f"closedloop://lake/{what}", group="closedloop")
        return Asset(name=f"{self.name}.closedloop_{what}", uri=f"closedloop://{self.name}/lake/{what}",
                     group="closedloop")

    @property
    def curated(self) -> Asset:
        """Emitted by ingest when a day is curated; batch scoring follows it."""
        return self._asset("curated")

    @property
    def predictions(self) -> Asset:
        """Emitted by batch scoring; drift monitoring follows it."""
        return self._asset("predictions")


def model_of(dag: Any) -> str | None:
    """The model a DAG is for: its ``model:<name>`` tag (every DAG built here carries one); None without a DAG or
    a tag."""
    for tag in getattr(dag, "tags", None) or ():
        if str(tag).startswith(MODEL_TAG):
            return str(tag)[len(MODEL_TAG):]
    return None


class RefusedModelConfig(BaseTimetable):
    """The timetable of a broken model's DAG: :meth:`validate` raises the configuration's error when Airflow bags
    the DAG, so the DAG never loads and the DAG file shows the error as an import error."""

    can_be_scheduled = False

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def validate(self) -> None:
        raise ConfigError(self.problem)


def for_each_model(kind: str, build: Callable[[ModelDags], Any]) -> list[str]:
    """Call ``build`` for each model whose configuration loads; a DAG refused with the error for each other one.

    At most one model keeps the root layout (``model.namespaced: false``): a second one is refused (its DAG ids
    would be the first one's). Returns the names of the models built.
    """
    built: list[str] = []
    root: str | None = None
    for entry in model_entries():
        try:
            check_model(entry)
            if not entry.namespaced:
                if root is not None:
                    raise ConfigError(f"{entry.config_path}: model.namespaced=false: the model {root!r} keeps the "
                                      "root layout already; one model of a deployment at most may (remove the key)")
                root = entry.name
        except (PermanentError, ValueError, OSError) as exc:  # ConfigError, ContractError, an unreadable file
            problem = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            with DAG(dag_id=entry.dag_id(kind), schedule=RefusedModelConfig(f"model {entry.name}: {problem}"),
                     start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
                     tags=["closedloop", f"{MODEL_TAG}{entry.name}"]):
                pass  # leaving the block registers the DAG with the file's bag, as `@dag` does
            continue
        build(ModelDags(entry))
        built.append(entry.name)
    return built
