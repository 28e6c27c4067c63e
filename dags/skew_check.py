"""
Compare what online scoring served with what the offline path gives for the same rows, daily.

Runs daily on the previous day's served predictions (`served/transactions/<day>/`, written by
`closedloop serve`), or for a given `day` in a triggered run's configuration. A scheduled run on a day
nothing was served (no scoring service running) is skipped, not failed; a day asked for fails.

- `measure_skew`: samples `skew.sample_rows` served predictions of the day; for each, the customer
  features Feast's offline store holds at the close of the day before the transaction's (the customer's
  state after its last ingested transaction, what the online store serves that day) and the batch
  score of the same row with the served model version; the JSON report goes to `reports/skew/<day>.json`
  in the lake (what the Model health page reads) and to the `closedloop-skew` experiment in MLflow.
- `check_skew`: fails (no retry: an alert) when the share of rows whose features or score differ beyond
  the `skew:` tolerances of the configuration exceeds `skew.max_mismatch_share`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from closedloop.adapters.airflow.models import ModelDags, for_each_model
from closedloop.adapters.airflow.notifier import ClosedloopNotifier
from closedloop.adapters.airflow.orchestration import DEFAULT_ARGS, conf_of, documented, run_stage, time_schedule
from closedloop.adapters.airflow.params import run_params
from closedloop.core.errors import NoDataError
from closedloop.core.runconf import SKEW_CHECK, check


def build(m: ModelDags) -> None:
    """The DAG of model ``m``."""

    @dag(
        dag_id=m.dag_id("skew_check"),
        schedule=time_schedule("30 6 * * *"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        **documented(__doc__),
        tags=m.tags("serving", "monitoring"),
        params=run_params(SKEW_CHECK),
    )
    def skew_check():
        @task
        def measure_skew() -> dict:
            """Compare a sample of the day's served predictions with the offline path; keep the report."""
            from closedloop.stages import skew
            from closedloop.stages.ingest import resolve_days
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            run_stage(check, conf_of(ctx), SKEW_CHECK)  # before any work: one line, no retry
            days = []
            if not conf_of(ctx).get("day") and ctx.get("data_interval_end") is not None:
                days = [(ctx["data_interval_end"] - timedelta(days=1)).date().isoformat()]
            day = run_stage(resolve_days, conf_of(ctx), days)[-1]
            try:
                return run_stage(skew.measure_day, Runtime.from_env(m.name), day, dag_run_id=ctx["run_id"])
            except AirflowFailException as exc:
                if isinstance(exc.__cause__, NoDataError) and not conf_of(ctx).get("day"):
                    raise AirflowSkipException(f"nothing served on {day} (no scoring service running?)") from exc
                raise

        @task(on_failure_callback=ClosedloopNotifier("skew_detected", severity="error"))
        def check_skew(report: dict) -> dict:
            """Fail (an alert, no retry) when served features or scores differ beyond the `skew:` tolerances."""
            from closedloop.stages import skew

            return run_stage(skew.check, report)

        check_skew(measure_skew())


    skew_check()


for_each_model("skew_check", build)
