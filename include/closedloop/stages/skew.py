"""Training/serving skew: what the service served against what the offline path gives for the same rows.

For a sample of one day's served predictions (``served/transactions/<day>/``, written by
:mod:`closedloop.adapters.serving`), the customer features the service got from the online store are compared
with what Feast's offline store holds for the same customer at the moment the online store describes
when the transaction is served (:func:`online_moment`): the close of the day before the transaction's
event day, since ingest and materialisation run per day. At that moment the point-in-time join picks
the customer's closing row (:mod:`closedloop.stages.aggregates`), its state after its last ingested
transaction, which is also what a training set or batch scoring gives for a transaction at that moment;
so an online store that leaves out the customer's last transaction (a row describing the state before
it) is flagged, as is a bad materialisation, a feature changed in one path or a stale store. The served
score is compared with the batch score of the same row (the served version, the logged request fields
and the offline features, through :func:`closedloop.stages.training.predict`).

A row mismatches when a feature differs by more than ``skew.feature_tolerance`` (absolute, or relative
to the offline value when that is larger than 1) or the score by more than ``skew.score_tolerance``;
the check fails when the share of mismatching rows exceeds ``skew.max_mismatch_share``.

The report, ``reports/skew/<day>.json`` in the lake (one per served day, rewritten by a re-run), is what
a Model health page reads: ``day``, ``served_rows``, ``sampled``, ``passed``, ``reasons``,
``mismatch_share``, ``feature_mismatch_share``, ``score_mismatch_share``, ``score_max_abs_diff``,
``features`` (per feature: ``mismatches``, ``max_abs_diff``, ``served_missing``, ``offline_missing``),
``examples`` (up to 10 mismatching rows), ``model_versions`` and ``policy``. The figures also go to the
``closedloop-skew`` MLflow experiment, one run per day.
"""

from __future__ import annotations

import logging
from datetime import date
from typing import TYPE_CHECKING, Any

from pydantic import model_validator

from closedloop.core.config_model import SkewSection
from closedloop.core.errors import ConfigError, NoDataError, PermanentError
from closedloop.core.served import read_served, served_uri
from closedloop.stages.features import historical_features
from closedloop.stages.registry import ensure_experiment, load_booster
from closedloop.stages.scoring import version_info
from closedloop.stages.training import predict

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.stages.runtime import Runtime

log = logging.getLogger(__name__)

EXPERIMENT = "closedloop-skew"
TAG = "closedloop."


class SkewError(PermanentError):
    """Served features or scores differ from the offline path beyond tolerance."""


class SkewPolicy(SkewSection):
    """The ``skew:`` section of the configuration: its keys, types and defaults are
    :class:`~closedloop.core.config_model.SkewSection`'s, its ranges are checked here (ConfigError)."""

    @model_validator(mode="after")
    def _ranges(self) -> SkewPolicy:
        if (self.sample_rows < 1 or self.feature_tolerance < 0 or self.score_tolerance < 0
                or not 0 <= self.max_mismatch_share <= 1):
            raise ConfigError(f"skew: {self}: sample_rows >= 1, tolerances >= 0, max_mismatch_share in [0, 1]")
        return self

    @classmethod
    def from_typed(cls, section: SkewSection) -> SkewPolicy:
        """The configuration's typed ``skew`` section (``Config.typed.skew``), its ranges checked."""
        return cls.model_validate(section.model_dump())


def report_uri(rt: Runtime, day: date) -> str:
    return rt.lake.uri("reports", "skew", f"{day.isoformat()}.json")


def online_moment(event_time: pd.Series) -> pd.Series:
    """The moment whose state the online store serves a transaction of ``event_time`` with.

    The stamp of the closing rows of the day before the event's UTC day (its last microsecond): ingest
    and materialisation work per day, so the features served during a day are each customer's state
    after its transactions up to the end of the day before (never the same day's earlier ones).
    """
    import pandas as pd

    return pd.to_datetime(event_time, utc=True).dt.floor("D") - pd.Timedelta(microseconds=1)


def offline_view(rt: Runtime, served: pd.DataFrame) -> tuple[pd.DataFrame, Any]:
    """The offline features of the served rows (as of :func:`online_moment` of each event) and their batch scores."""
    import numpy as np
    import pandas as pd

    c = rt.contract
    keys = served[[c.row_key, c.entity]].copy()
    keys[c.event_timestamp] = online_moment(served[c.event_timestamp])
    offline = historical_features(rt.store, rt.defs, keys, c)  # every row back once, in order
    frame = pd.concat([served[c.transaction_features].reset_index(drop=True),
                       offline[c.entity_features].reset_index(drop=True)], axis=1)
    frame.index = served.index
    scores = np.full(len(served), np.nan)
    for version, rows in served.groupby(served["model_version"].astype(str)).groups.items():
        booster = load_booster(version_info(rt.client, rt.model_name, version)["model_uri"])
        pos = served.index.get_indexer(rows)
        scores[pos] = predict(booster, frame.iloc[pos], c)
    return frame, scores


def compare(served: pd.DataFrame, offline: pd.DataFrame, batch_scores: Any, features: list[str], row_key: str,
            policy: SkewPolicy) -> dict[str, Any]:
    """The skew figures of served rows against their offline features and batch scores."""
    import numpy as np

    bad_rows = np.zeros(len(served), dtype=bool)
    per_feature: dict[str, Any] = {}
    examples: list[dict[str, Any]] = []
    for f in features:
        a = served[f].to_numpy(dtype="float64")
        b = offline[f].to_numpy(dtype="float64")
        both_nan = np.isnan(a) & np.isnan(b)
        diff = np.abs(a - b)
        ok = both_nan | (diff <= policy.feature_tolerance * np.maximum(1.0, np.abs(b)))
        bad = ~ok
        bad_rows |= bad
        finite = diff[~np.isnan(diff)]
        per_feature[f] = {"mismatches": int(bad.sum()), "max_abs_diff": float(finite.max()) if len(finite) else 0.0,
                          "served_missing": int(np.isnan(a).sum()), "offline_missing": int(np.isnan(b).sum())}
        for i in np.flatnonzero(bad)[: max(0, 10 - len(examples))]:
            examples.append({row_key: str(served[row_key].iloc[i]), "feature": f,
                             "served": None if np.isnan(a[i]) else float(a[i]),
                             "offline": None if np.isnan(b[i]) else float(b[i])})
    feature_rows = int(bad_rows.sum())
    s = served["score"].to_numpy(dtype="float64")
    sdiff = np.abs(s - np.asarray(batch_scores, dtype="float64"))
    score_bad = ~(sdiff <= policy.score_tolerance)  # NaN (no batch score) counts as a mismatch
    any_bad = bad_rows | score_bad
    n = max(len(served), 1)
    share = float(any_bad.sum()) / n
    reasons = []
    if share > policy.max_mismatch_share:
        worst = sorted(per_feature, key=lambda f: -per_feature[f]["mismatches"])[:3]
        reasons.append(f"{int(any_bad.sum())} of {len(served)} sampled rows ({share:.2%}) differ from the offline "
                       f"path, more than skew.max_mismatch_share={policy.max_mismatch_share:.2%}; features most "
                       f"often different: " + ", ".join(f"{f} ({per_feature[f]['mismatches']})" for f in worst)
                       + f"; scores different: {int(score_bad.sum())}")
    return {
        "sampled": len(served), "passed": not reasons, "reasons": reasons, "mismatch_share": share,
        "feature_mismatch_rows": feature_rows, "feature_mismatch_share": feature_rows / n,
        "score_mismatch_rows": int(score_bad.sum()), "score_mismatch_share": float(score_bad.sum()) / n,
        "score_max_abs_diff": float(np.nanmax(sdiff)) if np.isfinite(sdiff).any() else None,
        "features": per_feature, "examples": examples, "policy": policy.model_dump(),
    }


def measure_day(rt: Runtime, day: date, *, dag_run_id: str = "") -> dict[str, Any]:
    """Sample ``day``'s served predictions, compare them with the offline path, keep the report (lake, MLflow)."""
    import mlflow

    policy = SkewPolicy.from_typed(rt.settings.config.typed.skew)
    served = read_served(rt.lake, day)
    if served.empty:
        raise NoDataError(f"{served_uri(rt.lake, 'transactions', day)}: no served predictions logged that day; "
                          "nothing to compare (is closedloop serve running and writing to this lake?)")
    sample = served.sample(n=min(policy.sample_rows, len(served)), random_state=day.toordinal()).reset_index(drop=True)
    offline, batch = offline_view(rt, sample)
    report = {"day": day.isoformat(), "served_rows": len(served),
              "model_versions": sorted(sample["model_version"].astype(str).unique().tolist()),
              **compare(sample, offline, batch, rt.contract.entity_features, rt.contract.row_key, policy)}
    report["report_uri"] = rt.lake.write_json(report_uri(rt, day), report)

    exp_id = ensure_experiment(rt.client, rt.settings, EXPERIMENT)
    existing = rt.client.search_runs([exp_id], filter_string=f"tags.`{TAG}day` = '{day.isoformat()}'", max_results=1)
    run_id = existing[0].info.run_id if existing else None
    tags = {f"{TAG}day": day.isoformat(), f"{TAG}passed": str(report["passed"]).lower(),
            f"{TAG}report_json": report["report_uri"], f"{TAG}dag_run_id": dag_run_id,
            f"{TAG}reasons": "; ".join(report["reasons"])[:4000]}
    metrics = {"skew_sampled": float(report["sampled"]), "skew_mismatch_share": report["mismatch_share"],
               "skew_feature_mismatch_share": report["feature_mismatch_share"],
               "skew_score_mismatch_share": report["score_mismatch_share"],
               **{f"skew_mismatches_{f}": float(v["mismatches"]) for f, v in report["features"].items()}}
    if report["score_max_abs_diff"] is not None:
        metrics["skew_score_max_abs_diff"] = report["score_max_abs_diff"]
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=f"skew {day}",
                          tags=tags) as run:
        mlflow.set_tags(tags)
        mlflow.log_metrics(metrics, step=day.toordinal())
        mlflow.log_dict(report, "skew/report.json")
    report["mlflow_run_id"] = run.info.run_id
    log.info("skew on %s: %s (%d rows sampled, %.2f%% mismatching)", day, "ok" if report["passed"] else "FAILED",
             report["sampled"], 100 * report["mismatch_share"])
    return report


def check(report: dict[str, Any]) -> dict[str, Any]:
    """Raise SkewError (the task fails and alerts) when the report is beyond tolerance; else a summary."""
    if not report["passed"]:
        raise SkewError(f"training/serving skew on {report['day']}: " + "; ".join(report["reasons"])
                        + f". Report: {report['report_uri']}; compare the online store with the offline store "
                          "(was the online store materialised from the same lake, after the day before was "
                          "ingested? does it hold each customer's closing row, its state after its last "
                          "transaction? was a feature changed in one path?)")
    return {"day": report["day"], "passed": True, "mismatch_share": report["mismatch_share"]}
