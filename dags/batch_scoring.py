"""
Score each newly ingested day with the champion and keep the predictions that monitoring reads.

Runs when `ingest` announces a curated day (the `closedloop_curated` Asset), or for any past day
given as `day` in a triggered run's configuration (backfills). For the day's validated transactions
it fetches the customer features through Feast (point in time, as in training), scores them with
`models:/<name>@champion`, and writes `predictions/transactions/<day>.parquet`: transaction id,
customer, timestamp, the model's features, score, decision at the champion's stored threshold and
model version. Emits the `closedloop_predictions` Asset with the day in its extra.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task

from closedloop.adapters.airflow.models import ModelDags, for_each_model
from closedloop.adapters.airflow.orchestration import (
    DEFAULT_ARGS,
    conf_of,
    days_from_events,
    documented,
    run_stage,
)
from closedloop.adapters.airflow.params import run_params
from closedloop.core.runconf import BATCH_SCORING, check


def build(m: ModelDags) -> None:
    """The DAG of model ``m``."""

    @dag(
        dag_id=m.dag_id("batch_scoring"),
        schedule=[m.curated],
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        **documented(__doc__),
        tags=m.tags("scoring"),
        params=run_params(BATCH_SCORING),
    )
    def batch_scoring():
        @task(outlets=[m.predictions])
        def score_day() -> list[dict]:
            """Score the day's transactions with the champion and write its predictions partition."""
            from closedloop.stages import scoring
            from closedloop.stages.ingest import resolve_days
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            run_stage(check, conf_of(ctx), BATCH_SCORING)  # before any work: one line, no retry
            days = run_stage(resolve_days, conf_of(ctx), days_from_events(ctx, m.curated))
            rt = Runtime.from_env(m.name)
            results = [run_stage(scoring.score_day, rt, day) for day in days]
            ctx["outlet_events"][m.predictions].extra = {"days": [r["day"] for r in results],
                                                        "day": results[-1]["day"]}
            return results

        score_day()


    batch_scoring()


for_each_model("batch_scoring", build)
