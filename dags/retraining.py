"""
Retrain the model on a window of validated data and promote it only if it beats the champion.

A run trains on one explicit window of days: a scheduled run on the window that ends with its data
interval (`training.window_days` of the config), a triggered run on `window_start`..`window_end`
(end exclusive) of its configuration, which is checked against a JSON schema before any work.

Tasks, each a thin call into the `closedloop` package:

- `validate_window`: every landed partition the window needs is validated with the Great Expectations
  suite of the data contract; a partition that breaks a blocking rule is quarantined and the run stops.
- `materialise_features`: applies the Feast definitions and materialises the window into the online store.
- `build_training_set`: point-in-time-correct join of the customer features onto every labelled
  transaction, time-based train / validation / holdout split, written as Parquet.
- `train_model`: XGBoost with early stopping, on the GPU when one is usable; run, lineage and model in MLflow.
  It runs on the queue `CLOSEDLOOP_TRAINING_QUEUE` (`gpu` where a GPU worker listens; every other task stays
  on `default`) and, on Kubernetes, in the pod of `CLOSEDLOOP_TRAINING_POD_TEMPLATE`. With `training.engine:
  dask` it trains on a Dask cluster (`CLOSEDLOOP_DASK_SCHEDULER`, or a local one) for sets beyond one
  machine's memory.
- `register_model`: a model version with its lineage and drift reference (a re-run finds its own version).
- `evaluate_gate`: the labels' plausibility first (share in the contract's band, no model below chance:
  else "labels suspect", see docs/explanation/GATE.md), then candidate and champion scored on the same holdout; the
  decision goes to the version's tags.
- `promote_or_reject`: moves the `champion` alias (compare-and-set) or keeps the candidate as rejected.

One run at a time (`max_active_runs=1`). Every task has an execution timeout and is retried with
exponential backoff (`CLOSEDLOOP_TASK_RETRIES`, `CLOSEDLOOP_RETRY_DELAY_SECONDS`,
`CLOSEDLOOP_TASK_TIMEOUT_MINUTES`); a retried `train_model` marks the MLflow run a killed try left
behind as an orphan, and a retried `register_model` finds the version it already made.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task

from closedloop.adapters.airflow.links import mlflow_run_task, model_version_task, validation_task
from closedloop.adapters.airflow.models import ModelDags, for_each_model
from closedloop.adapters.airflow.notifier import ClosedloopNotifier, send_alert
from closedloop.adapters.airflow.orchestration import (
    DEFAULT_ARGS,
    conf_of,
    documented,
    run_stage,
    time_schedule,
    timeout,
    training_task_args,
)
from closedloop.adapters.airflow.params import run_params
from closedloop.core.runconf import RETRAINING, check


def build(m: ModelDags) -> None:
    """The DAG of model ``m``."""

    @dag(
        dag_id=m.dag_id("retraining"),
        schedule=time_schedule("@weekly"),
        start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
        catchup=False,
        max_active_runs=1,
        default_args=DEFAULT_ARGS,
        **documented(__doc__),
        tags=m.tags("training"),
        params=run_params(RETRAINING),
    )
    def retraining():
        @validation_task(on_failure_callback=ClosedloopNotifier("validation_failed", severity="error"))
        def validate_window() -> dict:
            """Validate every partition of the run's window; bad partitions are quarantined and fail the run."""
            from closedloop.core.runconf import resolve_window
            from closedloop.stages import retraining as stages
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            run_stage(check, conf_of(ctx), RETRAINING)  # before any work: one line, no retry
            rt = Runtime.from_env(m.name)
            window = run_stage(resolve_window, conf_of(ctx), *_interval(ctx, rt))
            return run_stage(stages.validate, rt, window)

        @task
        def materialise_features(validated: dict) -> dict:
            """Apply the Feast definitions and materialise the window into the online store."""
            from closedloop.stages import retraining as stages
            from closedloop.stages.runtime import Runtime

            return run_stage(stages.materialise, Runtime.from_env(m.name), _window(validated))

        @task
        def build_training_set(validated: dict, materialised: dict) -> dict:
            """Point-in-time-correct training set of the window, written as Parquet (its URI goes on)."""
            from closedloop.core.runconf import split_override
            from closedloop.stages import retraining as stages
            from closedloop.stages.runtime import Runtime

            split = run_stage(split_override, conf_of(get_current_context()))
            return run_stage(stages.build_training_set, Runtime.from_env(m.name), _window(validated), split)

        @mlflow_run_task(**training_task_args())
        def train_model(training_set: dict, validated: dict) -> dict:
            """Train XGBoost and log the run, its lineage and the model to MLflow."""
            from closedloop.stages import retraining as stages
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            lineage = {"dag_run_id": ctx["run_id"], "reason": conf_of(ctx).get("reason", ""),
                       "window": f"{validated['window']['start']}..{validated['window']['end']}",
                       "validation": validated}
            return run_stage(stages.train, Runtime.from_env(m.name), training_set, lineage)

        @model_version_task(execution_timeout=timeout(minutes=10))
        def register_model(trained: dict, validated: dict) -> dict:
            """Register the model version (a retry finds the version it already made)."""
            from closedloop.stages import retraining as stages
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            conf = conf_of(ctx)
            extra = {"closedloop.dag_run_id": ctx["run_id"]}
            if conf.get("reason"):
                extra["closedloop.trigger_reason"] = conf["reason"][:4000]
            for key, value in (conf.get("trigger") or {}).items():
                extra[f"closedloop.trigger_{key}"] = str(value)[:4000]
            return run_stage(stages.register, Runtime.from_env(m.name), trained, _window(validated), extra)

        @task
        def evaluate_gate(registered: dict, training_set: dict) -> dict:
            """Check the labels' plausibility, score candidate and champion on the same holdout and decide."""
            from closedloop.core.runconf import labels_override
            from closedloop.stages import retraining as stages
            from closedloop.stages.runtime import Runtime

            override = run_stage(labels_override, conf_of(get_current_context()))
            return run_stage(stages.evaluate_gate, Runtime.from_env(m.name), registered, training_set, override)

        @model_version_task(execution_timeout=timeout(minutes=10))
        def promote_or_reject(decision: dict) -> dict:
            """Move `champion` to the candidate (compare-and-set) or keep it as rejected with the reason."""
            from closedloop.stages import retraining as stages
            from closedloop.stages.alerts import gate_alert
            from closedloop.stages.runtime import Runtime

            ctx = get_current_context()
            done = run_stage(stages.promote_or_reject, Runtime.from_env(m.name), decision,
                             f"retraining:{ctx['run_id']}")
            send_alert(gate_alert(done), ctx)
            return done

        validated = validate_window()
        materialised = materialise_features(validated)
        training_set = build_training_set(validated, materialised)
        trained = train_model(training_set, validated)
        registered = register_model(trained, validated)
        promote_or_reject(evaluate_gate(registered, training_set))


    def _interval(ctx, rt) -> tuple:
        """The scheduled window: ``window_days`` ending at the end of the data interval (triggered runs: none)."""
        from datetime import timedelta

        run = ctx.get("dag_run")
        end = ctx.get("data_interval_end")
        if end is None or str(getattr(run, "run_type", "")).lower().endswith("manual"):
            return None, None
        days = rt.settings.config.typed.training.window_days
        return end - timedelta(days=days), end


    def _window(validated: dict):
        from closedloop.core.runconf import Window, parse_day

        return Window(parse_day(validated["window"]["start"]), parse_day(validated["window"]["end"]))


    retraining()


for_each_model("retraining", build)
