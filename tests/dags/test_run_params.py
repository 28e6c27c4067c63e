"""The trigger forms (each DAG's Params) and the run-time check agree key by key: both come from one definition
(:mod:`closedloop.core.runconf`), and this proves it on the DAGs as Airflow loads them."""

from __future__ import annotations

import copy

import pytest
from airflow.sdk.exceptions import ParamValidationError

from closedloop.core.runconf import RUN_CONFS


@pytest.mark.parametrize("dag_id", sorted(RUN_CONFS))
def test_params_and_the_run_time_schema_agree(dagbag, dag_id):
    spec = RUN_CONFS[dag_id]
    schema = spec.schema()
    params = dagbag.get_dag(dag_id).params
    assert list(params.keys()) == list(schema["properties"]), "the form and the check have the same keys"
    for name, prop in schema["properties"].items():
        param = params.get_param(name)
        assert {**param.schema, "description": param.description} == prop, name
        field = spec.field(name)
        if field.required:
            assert name in schema.get("required", []) and not param.has_value, name
        else:
            assert param.value == field.default, name


def test_every_dag_with_params_has_a_definition(dagbag):
    # per model: card_fraud's DAG ids are the kinds themselves, churn's are churn.<kind>
    assert {d for d in dagbag.dag_ids if dagbag.get_dag(d).params} == set(RUN_CONFS) | {f"churn.{k}" for k in RUN_CONFS}


def test_the_form_refuses_what_one_param_can_say_and_check_the_rest(dagbag):
    """A 300-character trigger key is refused by the form itself (the bound reaches the Param); an unknown key
    and validation_days without holdout_days pass the form, which is why runconf.check runs first."""
    from closedloop.core.errors import ConfigError
    from closedloop.core.runconf import RETRAINING, check

    window = {"window_start": "2026-03-01", "window_end": "2026-03-29"}
    form = copy.deepcopy(dagbag.get_dag("retraining").params)
    with pytest.raises(ParamValidationError, match="trigger"):
        form.update({"trigger": {"k" * 300: "x"}})
    for conf in ({**window, "windw": 1}, {**window, "validation_days": 2}):
        copy.deepcopy(dagbag.get_dag("retraining").params).update(conf)
        with pytest.raises(ConfigError):
            check(conf, RETRAINING)
