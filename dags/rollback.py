"""
Roll the model back: give the `champion` alias to the previous champion, or to a named version.

Triggered by hand only. The form asks for the `version` (empty: the version the `previous` alias
points at, the champion before the current one) and the `reason`, which is required; `force` allows a
version the promotion gate rejected. The whole configuration is checked against a JSON schema (no
unknown keys) before any work.

One task, `roll_back_champion`, calls `closedloop.stages.rollback.rollback_run`: the move goes through the
registry's compare-and-set `promote()` like every promotion, the old champion becomes `previous`, and
the promotion history records a `rollback` with the reason, this run's id and the user who triggered
the run. Refused, with nothing changed: no previous version, an unknown version, the current champion,
a rejected version without `force`, and a plain rollback right after a rollback. A retry finds the
rollback its own run made and does not move the champion twice. `closedloop rollback` does the same
from a shell.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task

from closedloop.adapters.airflow.models import ModelDags, for_each_model
from closedloop.adapters.airflow.orchestration import DEFAULT_ARGS, conf_of, documented, run_stage
from closedloop.adapters.airflow.params import run_params
from closedloop.core.runconf import ROLLBACK, check


def build(m: ModelDags) -> None:
    """The DAG of model ``m``."""

    @dag(
        dag_id=m.dag_id("rollback"),
        schedule=None,
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        **documented(__doc__),
        tags=m.tags("registry"),
        params=run_params(ROLLBACK),
    )
    def rollback():
        @task
        def roll_back_champion() -> dict:
            """Check the run configuration, then move `champion` back through the registry's compare-and-set."""
            from closedloop.stages.rollback import rollback_run, triggering_actor
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            run_stage(check, conf_of(ctx), ROLLBACK)  # before any work: one line, no retry
            return run_stage(rollback_run, Runtime.from_env(m.name), conf_of(ctx),
                             actor=triggering_actor(ctx.get("dag_run")), request=ctx["run_id"])

        roll_back_champion()


    rollback()


for_each_model("rollback", build)
