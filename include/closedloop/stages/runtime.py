"""The collaborators a stage needs, built once from settings: lake, contract, Feast, MLflow."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from closedloop.core.lake import Lake
from closedloop.core.schema import DataContract, load_contract
from closedloop.core.secrets import mask_secrets
from closedloop.core.settings import Settings
from closedloop.stages.features import build_definitions, feature_store
from closedloop.stages.registry import mlflow_client

if TYPE_CHECKING:
    from feast import FeatureStore
    from mlflow import MlflowClient

    from closedloop.stages.features import FeastDefinitions


def library_logs_at_their_level() -> None:
    """Let MLflow's log records reach the root logger with their own level.

    On import MLflow gives its ``mlflow`` logger a handler of its own on stderr and stops propagation; an Airflow
    task records every stderr line at ERROR, so each MLflow INFO line showed as an error in the task log. With
    ``MLFLOW_CONFIGURE_LOGGING=false`` (before the import) or the handler removed (after it) the records go
    through the task's logging at their level: INFO stays INFO.
    """
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    if "mlflow" in sys.modules:
        logger = logging.getLogger("mlflow")
        logger.handlers = [h for h in logger.handlers if not isinstance(h, logging.StreamHandler)]
        logger.propagate = True


@dataclass
class Runtime:
    """Settings plus lazily built clients; pass one to the stage functions."""

    settings: Settings

    @classmethod
    def from_env(cls, model: str | None = None) -> Runtime:
        """The runtime of ``model`` (a task names its DAG's model; default: :func:`closedloop.core.settings.
        select_model`)."""
        mask_secrets()  # every task builds its Runtime first: its logs never show what closedloop reads
        library_logs_at_their_level()
        rt = cls(Settings.from_env(model=model))
        rt.settings.ensure_dirs()
        return rt

    @cached_property
    def lake(self) -> Lake:
        return Lake(self.settings.lake_uri, self.settings.storage_options)

    @cached_property
    def contract(self) -> DataContract:
        return load_contract(self.settings.config.schema_path)

    @cached_property
    def defs(self) -> FeastDefinitions:
        endpoint = (self.settings.storage_options.get("client_kwargs") or {}).get("endpoint_url")
        return build_definitions(self.contract, self.settings.lake_uri, endpoint)

    @cached_property
    def store(self) -> FeatureStore:
        return feature_store(self.settings)

    @cached_property
    def client(self) -> MlflowClient:
        return mlflow_client(self.settings)

    @property
    def model_name(self) -> str:
        return self.settings.config.model_name
