"""The trigger form of a DAG, built from its run configuration's one definition (:mod:`closedloop.core.runconf`).

``params=run_params(RETRAINING)``: one Param per key, with the same JSON schema (type, bounds, format, title)
and default that the run-time check (:func:`closedloop.core.runconf.check`) applies, so the two cannot diverge.
Airflow validates each Param on its own and accepts unknown keys; the cross-field rules and the unknown keys are
refused by ``check`` as the first step of the DAG's first task.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param

from closedloop.core.runconf import Field, RunConf


def param(f: Field) -> Param:
    """The Param of one key: its schema and default (none when the key is required)."""
    if f.required:  # no default: the form asks for it and a REST trigger without it is refused
        return Param(description=f.description, **f.schema())
    return Param(f.default, description=f.description, **f.schema())


def run_params(spec: RunConf) -> dict[str, Any]:
    """The ``params`` of a DAG: one Param per key of ``spec``, in its order."""
    return {f.name: param(f) for f in spec.fields}
