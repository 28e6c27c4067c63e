"""
Judge the model's rollout on live traffic, then ramp it, promote it, hold it or roll it back.

A candidate that passed the retraining gate under `rollout.mode: canary` serves a share of traffic (the `canary`
alias, a sticky split by entity in `closedloop serve`), under `shadow` it is scored beside the champion (the
`challenger` alias). This DAG runs daily and after each curated day (labels arrive with it), or for a given
`day` in a triggered run's configuration. With no rollout in progress it does nothing.

- `evaluate_rollout`: reads the requests the candidate scored since the rollout began (both arms' scores on the
  same requests); the guardrails first (error rate, p99 latency, missing online features, the candidate's
  scores against the champion's), then the per-row loss of both arms on the same labelled requests with an
  always-valid sequential test (valid at every daily look), ROC AUC beside it; decides ramp, hold, promote or
  roll back by the `rollout:` policy of the model's configuration.
- `apply_decision`: carries it out as a compare-and-set on the rollout it judged (the next share on the canary's
  version, or the alias removed: all traffic back to the champion within one poll of the service; a promotion
  moves `champion`), appends it to the promotion history with its figures and alerts.
See docs/explanation/ROLLOUT.md.
"""

from __future__ import annotations

import logging

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, get_current_context, task

from closedloop.adapters.airflow.models import ModelDags, for_each_model
from closedloop.adapters.airflow.notifier import send_alert
from closedloop.adapters.airflow.orchestration import (
    DEFAULT_ARGS,
    conf_of,
    days_from_events,
    documented,
    run_stage,
    time_schedule,
)
from closedloop.adapters.airflow.params import run_params
from closedloop.core.runconf import ROLLOUT, check


def build(m: ModelDags) -> None:
    """The DAG of model ``m``."""

    @dag(
        dag_id=m.dag_id("rollout"),
        schedule=time_schedule(
            AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 7 * * *", timezone="UTC"), assets=[m.curated]),
            fallback=[m.curated],
        ),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        **documented(__doc__),
        tags=m.tags("delivery"),
        params=run_params(ROLLOUT),
    )
    def rollout():
        @task
        def evaluate_rollout() -> dict:
            """Guardrails and the sequential test on the same requests; the decision (nothing changed yet)."""
            from closedloop.stages import rollout as stages
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            run_stage(check, conf_of(ctx), ROLLOUT)  # before any work: one line, no retry
            day = run_stage(stages.run_day, conf_of(ctx), days_from_events(ctx, m.curated),
                            ctx.get("data_interval_end"))
            decision = run_stage(stages.evaluate, Runtime.from_env(m.name), day)
            logging.getLogger(__name__).info("rollout decision for %s: %s: %s", day, decision["action"],
                                             decision["why"])
            return decision

        @task
        def apply_decision(decision: dict) -> dict:
            """Ramp, promote or roll back (compare-and-set), record it in the history and alert."""
            from closedloop.stages import rollout as stages
            from closedloop.stages.alerts import rollout_alert
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            done = run_stage(stages.apply, Runtime.from_env(m.name), decision, f"rollout:{ctx['run_id']}")
            send_alert(rollout_alert(done), ctx)
            return done

        apply_decision(evaluate_rollout())

    rollout()


for_each_model("rollout", build)
