"""
Ingest one day of landed data: validate it, curate it, and materialise its customer features.

For the run's day (its data interval, or `day` of a triggered run's configuration), the landed
transactions and labels are validated with the Great Expectations suite of the data contract. A
partition that breaks a blocking rule is moved to `quarantine/` with its report and the run fails,
naming the file, column and rule; a valid one (warnings included) joins `curated/`, the Feast offline
store, and the day is materialised into the online store with an overlap for late data. Emits the
`closedloop_curated` Asset that scoring and monitoring follow.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task

from closedloop.adapters.airflow.links import validation_task
from closedloop.adapters.airflow.models import ModelDags, for_each_model
from closedloop.adapters.airflow.notifier import ClosedloopNotifier
from closedloop.adapters.airflow.orchestration import (
    DEFAULT_ARGS,
    conf_of,
    documented,
    run_stage,
    time_schedule,
)
from closedloop.adapters.airflow.params import run_params
from closedloop.core.runconf import INGEST, check


def build(m: ModelDags) -> None:
    """The DAG of model ``m``."""

    @dag(
        dag_id=m.dag_id("ingest"),
        schedule=time_schedule("@daily"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        **documented(__doc__),
        tags=m.tags("ingest"),
        params=run_params(INGEST),
    )
    def ingest():
        @validation_task(on_failure_callback=ClosedloopNotifier("validation_failed", severity="error"))
        def validate_partitions() -> dict:
            """Validate and curate the day's transactions and labels; quarantine and fail on blocking problems."""
            from closedloop.adapters.airflow.notifier import send_alert
            from closedloop.stages import ingest as stages
            from closedloop.stages.alerts import redelivery_alert
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            run_stage(check, conf_of(ctx), INGEST)  # before any work: one line, no retry
            day = run_stage(stages.resolve_day, conf_of(ctx), ctx.get("data_interval_start"))
            result = run_stage(stages.ingest_day, Runtime.from_env(m.name), day)
            for partition in result["partitions"]:  # a re-delivery that changed a curated day
                send_alert(redelivery_alert(partition), ctx)
            return result

        @task(outlets=[m.curated])
        def materialise_features(ingested: dict) -> dict:
            """Materialise the day and every day whose features it recomputed (with the overlap); announce the day."""
            from closedloop.stages import ingest as stages
            from closedloop.stages.runtime import Runtime

            result = run_stage(stages.materialise_day, Runtime.from_env(m.name), ingested["day"],
                               ingested.get("features_changed"))
            get_current_context()["outlet_events"][m.curated].extra = {"day": ingested["day"]}
            return result

        materialise_features(validate_partitions())


    ingest()


for_each_model("ingest", build)
