"""
Keep the stores from growing without end, and say when a day's data did not arrive.

Runs daily (07:30 UTC); ages count back from the run's logical time, so a re-run deletes the same.
Nothing a registered model version needs is ever deleted: the training sets and
references of the versions holding `champion`, `previous` or `challenger`, and the curated partitions of
the champion's training window, are read from the registry first and left alone. Ages are in the
`housekeeping:` section of the configuration.

- `check_arrivals`: a `data_missing` alert (see docs/how-to/alerts-and-housekeeping.md) for each of the last
  `alerts.lookback_days` days whose transactions have not landed `alerts.landing_delay_hours` after the
  day ended; once per day.
- `prune_lake_and_mlflow`: served logs, prediction partitions and unreferenced training sets past their
  age, drift reports beyond `monitoring.keep_reports`, runs of the `closedloop-monitoring` experiment
  past their age.
- `clean_airflow_db`: `airflow db clean` of Airflow's own tables before `housekeeping.keep_airflow_days`,
  without archive tables.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task

from closedloop.adapters.airflow.models import ModelDags, for_each_model
from closedloop.adapters.airflow.notifier import send_alert
from closedloop.adapters.airflow.orchestration import DEFAULT_ARGS, documented, run_stage, time_schedule


def build(m: ModelDags) -> None:
    """The DAG of model ``m``."""

    @dag(
        dag_id=m.dag_id("housekeeping"),
        schedule=time_schedule("30 7 * * *"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        **documented(__doc__),
        tags=m.tags("housekeeping"),
    )
    def housekeeping():
        @task
        def check_arrivals() -> list:
            """Alert (data_missing) for each recent day whose transactions have not landed past the delay."""
            from closedloop.stages.alerts import check_arrivals as check
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            rt = Runtime.from_env(m.name)
            due = run_stage(check, rt.settings, rt.lake, ctx.get("data_interval_end"), dag_id=m.dag_id("housekeeping"),
                            run_id=ctx["run_id"])
            for alert in due:
                send_alert(alert, ctx)
            return [a["details"]["day"] for a in due]

        @task
        def prune_lake_and_mlflow() -> dict:
            """Delete old served logs, predictions, training sets, drift reports and monitoring runs; never lineage."""
            from closedloop.stages import housekeeping as hk
            from closedloop.stages.runtime import Runtime

            return run_stage(hk.run, Runtime.from_env(m.name), get_current_context().get("data_interval_end"),
                             airflow_db=False)

        @task
        def clean_airflow_db() -> dict:
            """`airflow db clean` of Airflow's tables before the configured age (no archive tables)."""
            from closedloop.core.settings import Settings
            from closedloop.stages import housekeeping as hk

            return run_stage(hk.clean_airflow_tables, Settings.from_env(model=m.name),
                             get_current_context().get("data_interval_end"))

        check_arrivals() >> prune_lake_and_mlflow() >> clean_airflow_db()


    housekeeping()


for_each_model("housekeeping", build)
