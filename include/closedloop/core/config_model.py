"""The typed model of the versioned configuration (``models/card_fraud/closedloop.yaml``), one class per section.

:meth:`closedloop.core.settings.Config.load` validates the YAML with :class:`ClosedloopConfig`: an unknown key, a
missing required key or a value of the wrong type is refused when the file is loaded, each one named by its path
(``monitoring.calibration.min_chunks``). Every default of every key lives here, with its description (the
reference ``docs/reference/configuration.md`` is generated from this module:
``python -m closedloop.devtools.config_reference``).

Every default is the value a new user should get: the safe one, the shipped file's (an omitted key is as strict
as the shipped configuration: a gate margin, a bootstrap, guards, two confirming windows of drift).

What is checked here: keys and types (strictly: ``"5"`` is not a number, ``true`` is not a count). The ranges and
the rules between keys (a share between 0 and 1, ``min_rows <= max_rows``, a bootstrap metric...) stay with the
code that applies each section, which states them in its own words: :class:`closedloop.stages.drift.DriftPolicy`,
:class:`closedloop.stages.calibration.CalibrationSettings`, :class:`closedloop.adapters.serving.ServingConfig`,
:class:`closedloop.stages.skew.SkewPolicy`, :func:`closedloop.stages.housekeeping.policy`,
:func:`closedloop.stages.gate.decide`, :func:`closedloop.stages.feast_store.pit_chunk_rows`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A section of the configuration: every key known, every value of its type."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, populate_by_name=True)


# -- dataset and model ------------------------------------------------------------------------------------
class DatasetSection(Section):
    schema_: str = Field(alias="schema", description="The data contract (schema file) of the data set; a relative "
                         "path is taken from the configuration file's folder.")


class ModelSection(Section):
    name: str = Field(description="MLflow registered model name.")
    experiment: str = Field(description="MLflow experiment of the training runs.")
    namespaced: bool | None = Field(None, description="In a folder of models (CLOSEDLOOP_MODELS): whether this "
                                    "model's state is namespaced (DAG ids <name>.<dag>, the lake under "
                                    "models/<name>/, Feast project closedloop_<name>, monitoring experiment "
                                    "<name>-monitoring); false keeps the root layout of a single-model home "
                                    "(DAG ids ingest, retraining..., the lake's root, Feast project closedloop), "
                                    "which one model of a deployment at most may keep. Unset: namespaced. "
                                    "Ignored with CLOSEDLOOP_CONFIG (one model, the root layout).")


# -- ingest ---------------------------------------------------------------------------------------------
class IngestSection(Section):
    materialize_overlap_days: int = Field(1, description="Feast materialises each ingested window with this overlap "
                                          "backwards, for late data.")
    label_grace_days: int = Field(21, description="Labels of a window are read from label partitions up to this "
                                  "many days after its end.")


# -- training -------------------------------------------------------------------------------------------
class SplitSection(Section):
    train: float = Field(description="Share of the window's labelled rows (the earliest, in event-time order) "
                         "that trains.")
    validation: float = Field(description="Share that follows it: early stopping and the decision threshold.")
    holdout: float = Field(description="Share of the latest rows: the gate's evidence.")
    holdout_days: int | None = Field(None, description="Split by whole days instead: the last this many days are "
                                     "held out (a run's configuration sets it for drift-triggered retraining).")
    validation_days: int | None = Field(None, description="With holdout_days: the days before the holdout that "
                                        "validate; unset: a seeded random `validation` share of the rest does.")


class LocalClusterSection(Section):
    model_config = ConfigDict(extra="allow")  # passed to dask.distributed.LocalCluster as keyword arguments

    n_workers: int = Field(2, description="Workers of the LocalCluster (at most one per GPU on CUDA).")
    threads_per_worker: int | None = Field(1, description="Threads per worker (null: Dask's default).")
    processes: bool | None = Field(False, description="Workers as processes (false: threads, no worker processes "
                                   "to spawn under an Airflow task; null: Dask's default).")


class DaskSection(Section):
    local_cluster: LocalClusterSection = Field(
        default_factory=LocalClusterSection,
        description="The LocalCluster started for the task when CLOSEDLOOP_DASK_SCHEDULER is empty (further "
        "keys are passed to dask.distributed.LocalCluster).")


class PitJoinSection(Section):
    calls: int = Field(20, description="Feast's point-in-time join is asked for the window's (entity, time) pairs "
                       "over about this many calls: every call scans the whole feature source (fewer calls, less "
                       "time).")
    min_rows: int = Field(125_000, description="At least this many pairs per call.")
    max_rows: int = Field(1_000_000, description="At most this many pairs per call (a call's memory grows with its "
                          "pairs). The rows are the same whatever the sizes.")


class TrainingSection(Section):
    split: SplitSection = Field(description="Time-based split of the window's labelled rows, in event-time order.")
    target_fpr: float = Field(description="Decision threshold: the score at which this false-positive rate is "
                              "reached on the validation set.")
    num_boost_round: int = Field(description="XGBoost's boosting rounds (at most).")
    early_stopping_rounds: int = Field(description="XGBoost stops after this many rounds without improvement on "
                                       "the validation set.")
    params: dict[str, Any] = Field(description="XGBoost's parameters, passed as they are (the device is added).")
    engine: Literal["local", "dask"] = Field(
        "local", description="Where training runs: `local` (one process, the splits in its memory) or `dask` "
        "(xgboost.dask on a Dask cluster, for training sets larger than one machine's memory: the scheduler at "
        "CLOSEDLOOP_DASK_SCHEDULER, or, when that is empty, a LocalCluster of `dask.local_cluster` started for "
        "the task). Same metrics, threshold, logging, registration and gate either way.")
    dask: DaskSection = Field(default_factory=DaskSection, description="The Dask engine's settings.")
    part_rows: int = Field(500_000, description="Rows per Parquet part of each training split (the partitions a "
                           "Dask cluster reads one by one).")
    pit_join: PitJoinSection = Field(default_factory=PitJoinSection,
                                     description="The sizes of Feast's point-in-time join calls.")
    window_days: int = Field(28, description="Scheduled runs train on this many days ending with their data "
                             "interval.")
    reference_sample_rows: int = Field(5000, description="Rows of the training set kept with the model version as "
                                       "its drift reference.")


# -- gate -----------------------------------------------------------------------------------------------
class BootstrapSection(Section):
    resamples: int = Field(1000, description="Paired bootstrap of the primary metric's gain on the holdout "
                           "(positives and negatives resampled apart); the interval's lower bound must exceed the "
                           "margin too. 0 disables it (needed with a primary metric that has no bootstrap: roc_auc, "
                           "pr_auc and log_loss have one).")
    confidence: float = Field(0.95, description="Confidence of the bootstrap interval.")
    seed: int = Field(0, description="Seed of the resampling.")


class GateSection(Section):
    primary_metric: str = Field(description="The metric the candidate must beat the champion on (e.g. roc_auc, "
                                "higher is better).")
    margin: float = Field(0.002, description="The candidate must beat the champion by at least this much.")
    guards: dict[str, float] = Field(default_factory=lambda: {"pr_auc": 0.02, "log_loss": 0.01}, description="metric: "
                                     "the largest loss tolerated (in the metric's worse direction); `{}`: none.")
    min_holdout_positives: int = Field(20, description="Fewer positives in the holdout: \"insufficient evidence\", "
                                       "champion kept.")
    bootstrap: BootstrapSection = Field(default_factory=BootstrapSection,
                                        description="The bootstrap interval of the primary metric's gain.")
    floor: float | None = Field(None, description="With an unusable champion (deleted, unloadable, trained on "
                                "another schema) nothing can be compared: the candidate replaces it only if it "
                                "reaches this primary metric on its own, point estimate and the interval's worse "
                                "bound both (a ceiling for a lower-is-better metric). Unset (the default): no floor, "
                                "an unusable champion is never replaced by the gate (fix or roll it back). It has no "
                                "default value because it is on the scale of `primary_metric`, which has none "
                                "either: 0.6, right for roc_auc, would be a ceiling almost any log_loss clears.")


# -- monitoring -----------------------------------------------------------------------------------------
class CalibrationSection(Section):
    enabled: bool = Field(True, description="Thresholds calibrated with each champion on its own training window "
                          "(docs/explanation/DRIFT.md); false: the fixed rules of `monitoring`.")
    min_chunks: int = Field(10, description="The window is cut into at least this many chunks of "
                            "`monitoring.window_days` days, each compared with the rest; a window too short for "
                            "them keeps the fixed rules, and the decision says so.")
    std_multiplier: float = Field(3.0, description="A threshold is the chunks' mean + this many standard "
                                  "deviations.")
    min_importance: float = Field(0.02, description="Features under this share of the model's total gain are "
                                  "reported, not acted on.")
    gap_days: int | None = Field(None, description="Days left out of the reference on each side of a chunk "
                                 "(unset: `monitoring.window_days`).")
    peak_min_importance: float = Field(0.1, description="Features with at least this share of the model's total "
                                       "gain also decide alone (the input peak: the largest excess among them, "
                                       "against the chunks' peaks).")


class MonitoringSection(Section):
    window_days: int = Field(2, description="Days of predictions (ending with the run's data interval) compared with "
                             "the champion's reference.")
    min_rows: int = Field(description="Below this many rows in the window, monitoring refuses to judge (and says "
                          "so).")
    sample_rows: int = Field(description="The current window (and a larger reference) is sampled down to this many "
                             "rows before the statistical tests (0: never); docs/explanation/drift-sampling.md.")
    numeric_stattest: str = Field(description="Evidently stattest of every numeric column (fixed: Evidently "
                                  "otherwise switches method at 1000 rows), e.g. wasserstein.")
    numeric_threshold: float = Field(description="Drift threshold of the numeric test.")
    categorical_stattest: str = Field(description="Evidently stattest of every categorical column, e.g. "
                                      "jensenshannon.")
    categorical_threshold: float = Field(description="Drift threshold of the categorical test.")
    drift_share_threshold: float = Field(description="Drift when the share of drifted features reaches this ...")
    key_features: dict[str, float] = Field(default_factory=dict, description="... or when any of these features "
                                           "drifts past its own threshold (feature: threshold).")
    prediction_threshold: float = Field(description="... or when the score distribution drifts past this (same test "
                                        "as numeric features) ...")
    quality_drop: float = Field(description="... or when, with labels, ROC AUC on the window drops more than this "
                                "below the holdout's.")
    min_labelled_positives: int = Field(description="Labelled positives the window needs for its realised quality "
                                        "to count.")
    confirm_windows: int = Field(2, description="Drift must be seen in this many consecutive windows (each one day "
                                 "later) before retraining starts.")
    retrain_window_days: int = Field(14, description="A drift-triggered retraining trains on this many days ending "
                                     "with the drifted window, holding out its last day (the new regime).")
    cooldown_hours: float = Field(description="No second retraining within this many hours (of data time) of the "
                                  "last drift-triggered one.")
    keep_reports: int = Field(description="Past drift reports kept in the lake (older ones are pruned).")
    calibration: CalibrationSection = Field(default_factory=CalibrationSection,
                                            description="Thresholds calibrated with each champion.")
    widen_max_days: int = Field(7, description="A window with fewer than min_rows rows is widened backwards, a day "
                                "at a time, up to this many days.")
    rejudge_max_windows: int = Field(10, description="Earlier windows of the champion re-judged on the labels that "
                                     "arrived since (until their labels are complete).")


# -- serving, skew, alerts, housekeeping ----------------------------------------------------------------
class ServingSection(Section):
    max_batch: int = Field(1000, description="`closedloop serve`: at most this many transactions per POST /score "
                           "(more: 413).")
    poll_seconds: float = Field(30.0, description="How often the service looks where `champion` and `challenger` "
                                "point (a moved alias is picked up this late).")
    shadow_share: float = Field(0.1, description="Share of requests the `challenger` version (when there is one) "
                                "also scores, logged to served/shadow/ only.")
    log_flush_rows: int = Field(5000, description="Served predictions are written to the lake "
                                "(served/transactions/<day>/) per this many rows ...")
    log_flush_seconds: float = Field(10.0, description="... or seconds.")


class SkewSection(Section):
    sample_rows: int = Field(2000, description="The scheduled check samples this many served predictions of the "
                             "day.")
    feature_tolerance: float = Field(1e-6, description="A served feature differs from the offline store's value for "
                                     "the same moment by more than this (absolute, or relative to the offline "
                                     "value, whichever is larger) ...")
    score_tolerance: float = Field(1e-6, description="... or a served score differs from the batch score of the "
                                   "same row by more than this: a mismatch.")
    max_mismatch_share: float = Field(0.01, description="The check fails (and alerts) when the share of mismatching "
                                      "rows exceeds this.")


class AlertsSection(Section):
    landing_delay_hours: float = Field(6.0, description="A day's landed transactions are expected by the end of the "
                                       "day plus this many hours; later, the housekeeping DAG's check_arrivals "
                                       "raises a `data_missing` alert (once per missing day).")
    lookback_days: int = Field(3, description="How many past days check_arrivals looks at.")


class HousekeepingSection(Section):
    keep_served_days: int = Field(90, description="Served (online) predictions older than this many days are "
                                  "deleted.")
    keep_predictions_days: int = Field(90, description="Batch predictions older than this many days are deleted.")
    keep_training_sets_days: int = Field(180, description="Training sets whose window ended longer ago than this, "
                                         "unless a champion/previous/challenger version was trained on it.")
    keep_monitoring_runs_days: int = Field(90, description="Runs of the closedloop-monitoring MLflow experiment "
                                           "older than this many days are deleted.")
    keep_versions_days: int = Field(365, description="Deliveries superseded by a re-delivery (curated/_versions/) "
                                    "longer ago than this are deleted, unless their day lies in the champion's "
                                    "training window.")
    keep_airflow_days: int = Field(30, description="Airflow's own tables (task instances, logs of runs, XComs...) "
                                   "older than this many days: `airflow db clean`.")


# -- progressive delivery -------------------------------------------------------------------------------
class GuardrailsSection(Section):
    max_error_rate: float = Field(0.01, description="The canary's share of requests it failed to score (answered "
                                  "by the champion instead) above this: rolled back.")
    max_missing_feature_rate: float = Field(0.05, description="The share of the canary's requests served without "
                                            "one of their online features above this: rolled back.")
    max_p99_latency_ms: float = Field(250.0, description="The canary's 99th percentile of scoring latency (the "
                                      "served log's latency_ms) above this: rolled back.")
    max_mean_score_shift: float = Field(0.1, description="The mean absolute difference between the canary's and "
                                        "the champion's scores on the same requests above this: rolled back (a "
                                        "broken model before any label says so).")


class RolloutSection(Section):
    mode: Literal["direct", "shadow", "canary"] = Field(
        "direct", description="How a candidate that passed the gate reaches traffic: `direct` moves `champion` at "
        "once; `shadow` makes it the `challenger` (scored beside the champion on serving.shadow_share of requests, "
        "logged only) and the rollout DAG promotes it when the paired comparison on the same requests holds up "
        "once their labels arrive; `canary` gives it the `canary` alias and a share of traffic ramped through "
        "`steps` by the rollout DAG. A first model (no champion yet) is always promoted directly.")
    steps: list[float] = Field(default_factory=lambda: [0.05, 0.25, 0.5, 1.0], description="The canary's traffic "
                               "shares, increasing, ending with 1.0 (all traffic: the next good decision promotes).")
    min_days_per_step: int = Field(1, description="Days a step bakes before it may be ramped (guardrails and the "
                                   "test still roll back at once).")
    max_days: int = Field(28, description="A rollout still undecided after this many days ends by `on_no_decision`.")
    on_no_decision: Literal["rollback", "promote"] = Field(
        "rollback", description="What an undecided rollout does at max_days: `rollback` (no evidence the candidate "
        "is better: the champion stays) or `promote`.")
    alpha: float = Field(0.05, description="The sequential test's level: its false-positive rate over all the daily "
                         "looks of a rollout.")
    loss: Literal["log_loss", "brier"] = Field("log_loss", description="The per-row loss the test compares on the "
                                               "same requests.")
    min_effect: float = Field(0.01, description="The smallest difference in mean per-row loss worth acting on (in "
                              "the loss's units: 0.01 nats of log loss per row); the sequential test's mixing "
                              "variance is its square (docs/explanation/ROLLOUT.md).")
    min_rows: int = Field(2000, description="Labelled requests of the candidate's arm before the test may decide.")
    min_positives: int = Field(20, description="... and positive labels among them.")
    guardrails: GuardrailsSection = Field(default_factory=GuardrailsSection,
                                          description="Checks that roll back at once, before any label.")


# -- the whole file -------------------------------------------------------------------------------------
class ClosedloopConfig(Section):
    """The versioned model and policy configuration. Loaded inside tasks; its hash is part of every model
    version's lineage."""

    dataset: DatasetSection = Field(description="The data set.")
    model: ModelSection = Field(description="The model's names in MLflow.")
    training: TrainingSection = Field(description="How a candidate is trained.")
    gate: GateSection = Field(description="When a candidate replaces the champion.")
    ingest: IngestSection = Field(default_factory=IngestSection, description="Ingest and materialisation.")
    monitoring: MonitoringSection | None = Field(None, description="Drift monitoring (unset: no monitoring, no "
                                                 "calibration at training).")
    serving: ServingSection = Field(default_factory=ServingSection, description="The scoring service.")
    skew: SkewSection = Field(default_factory=SkewSection, description="The training/serving skew check.")
    alerts: AlertsSection = Field(default_factory=AlertsSection, description="Alerts on missing data.")
    housekeeping: HousekeepingSection = Field(default_factory=HousekeepingSection,
                                              description="What is deleted after how long.")
    rollout: RolloutSection = Field(default_factory=RolloutSection,
                                    description="Progressive delivery: how a promotion reaches traffic.")


def known_keys(loc: tuple[str | int, ...]) -> list[str] | None:
    """The keys the section at ``loc`` accepts (None when ``loc`` is not a section: a free-form map)."""
    model: Any = ClosedloopConfig
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            field = next((f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return None
        model = field.annotation
        if getattr(model, "__args__", None):  # X | None
            model = next((a for a in model.__args__ if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    return sorted(f.alias or name for name, f in model.model_fields.items())
