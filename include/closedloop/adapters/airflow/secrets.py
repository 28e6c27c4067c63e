"""Airflow's log masker for the secrets closedloop reads (:mod:`closedloop.core.secrets`).

Imported by :mod:`closedloop.adapters.airflow.orchestration` (so by every DAG file) and by the Model health plugin:
in those processes :func:`mask_secrets`, which every
:meth:`Runtime.from_env <closedloop.stages.runtime.Runtime.from_env>` calls, hands each secret to Airflow's
masker, so that a log line, an exception or an XCom holding one shows ``***``.
"""

from __future__ import annotations

from airflow.sdk.log import mask_secret

from closedloop.core.secrets import mask_secrets, register_masker

__all__ = ["mask_secrets"]

register_masker(mask_secret)
