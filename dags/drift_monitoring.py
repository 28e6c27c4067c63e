"""
Compare recent predictions with the champion's training reference and start retraining on drift.

Runs when `batch_scoring` announces new predictions (the `closedloop_predictions` Asset), daily as a
safety net, or for a given `day` (the last day of the window) in a triggered run's configuration.
The window is the `monitoring.window_days` days ending with that day.

- `measure_drift`: Evidently compares the window's features and scores with the reference saved with
  the champion's model version (its training window, with out-of-sample scores), one statistical test
  per column at the threshold calibrated with that version (fixed ones, said so, for a version without);
  CBPE estimates its ROC AUC before labels arrive, the labels that have arrived give the realised one,
  and earlier windows are re-judged on labels that arrived since. A low-traffic window is widened
  backwards. The HTML report and JSON figures go to `reports/drift/` in the lake and to the
  `closedloop-monitoring` experiment in MLflow (one run per window end). See docs/explanation/DRIFT.md.
- `decide_retraining`: the policy (importance-weighted input drift, prediction drift, estimated and
  realised performance against their calibrated bands, a late realised drop), a cooldown, and no new
  retraining while one is queued or running. Without drift the run stops here and what follows is
  skipped.
- `trigger_retraining`: starts `retraining` with the window to train on, the reason and the report,
  under a run id made from the window, so the same window can never start two runs.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, get_current_context, task

from closedloop.adapters.airflow.links import drift_report_task
from closedloop.adapters.airflow.models import ModelDags, for_each_model
from closedloop.adapters.airflow.notifier import send_alert
from closedloop.adapters.airflow.orchestration import (
    DEFAULT_ARGS,
    active_runs,
    conf_of,
    days_from_events,
    documented,
    run_stage,
    time_schedule,
)
from closedloop.adapters.airflow.params import run_params
from closedloop.core.runconf import DRIFT_MONITORING, check


def build(m: ModelDags) -> None:
    """The DAG of model ``m``."""

    @dag(
        dag_id=m.dag_id("drift_monitoring"),
        schedule=time_schedule(
            AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 6 * * *", timezone="UTC"), assets=[m.predictions]),
            fallback=[m.predictions],
        ),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        **documented(__doc__),
        tags=m.tags("monitoring"),
        render_template_as_native_obj=True,
        params=run_params(DRIFT_MONITORING),
    )
    def drift_monitoring():
        @drift_report_task
        def measure_drift() -> dict:
            """Measure drift on the window and keep the report (lake and MLflow)."""
            from closedloop.stages import monitoring
            from closedloop.stages.ingest import resolve_days
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            run_stage(check, conf_of(ctx), DRIFT_MONITORING)  # before any work: one line, no retry
            rt = Runtime.from_env(m.name)
            days = days_from_events(ctx, m.predictions)
            if not days and not conf_of(ctx).get("day") and ctx.get("data_interval_end") is not None:
                days = [(ctx["data_interval_end"] - timedelta(days=1)).date().isoformat()]
            last = run_stage(resolve_days, conf_of(ctx), days)[-1]
            window_days = rt.settings.config.monitoring.window_days
            window = monitoring.monitoring_window(last + timedelta(days=1), window_days)
            return run_stage(monitoring.measure_window, rt, window, dag_run_id=ctx["run_id"])

        @task.short_circuit
        def decide_retraining(measured: dict) -> dict | bool:
            """Apply the drift policy, the cooldown and de-duplication; skip what follows unless retraining."""
            from closedloop.stages import monitoring
            from closedloop.stages.alerts import drift_alert
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            decision = run_stage(monitoring.decide_retraining, Runtime.from_env(m.name), measured,
                                 active_retrainings=active_runs(m.dag_id("retraining")),
                                 monitoring_run_id=ctx["run_id"])
            logging.getLogger(__name__).info("decision: %s: %s", "retrain" if decision["retrain"] else "no retraining",
                                             decision["why"])
            send_alert(drift_alert(decision), ctx)
            return decision if decision["retrain"] else False

        decide_retraining(measure_drift()) >> TriggerDagRunOperator(
            task_id="trigger_retraining",
            trigger_dag_id=m.dag_id("retraining"),
            trigger_run_id="{{ ti.xcom_pull(task_ids='decide_retraining')['run_id'] }}",
            conf="{{ ti.xcom_pull(task_ids='decide_retraining')['conf'] }}",
            skip_when_already_exists=True,
            wait_for_completion=False,
            doc_md="Start `retraining` on the window that includes the drifted days, with the reason and the report.",
        )


    drift_monitoring()


for_each_model("drift_monitoring", build)
