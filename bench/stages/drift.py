"""Drift: the monitoring task vs per-column tests computed with numpy/scipy on the same data.

At size N the window is the world's whole window of predictions (N rows: every day scored; days the
scoring stage has not scored yet are scored first, untimed, by ``scoring.score_day``), read by the
monitoring code itself (``monitoring.read_window``, labels merged). The reference is
``min(N/10, 100k)`` rows of the training set's train split, drawn as the train task draws the champion's
reference sample (``train.sample(n, random_state=0)``; the champion's own sample is
``reference_sample_rows``=5000 rows): ``monitoring.champion_reference`` is wrapped to return it with the
champion's holdout quality (its download still happens and is timed).

The project's figure is ``closedloop.stages.monitoring.measure_window`` on that window: the champion, the
reference, the window read, ``drift.measure`` (Evidently, one ``ValueDrift`` per feature with the
configured tests, the window sampled to ``monitoring.sample_rows``), the decision, the HTML and JSON
report in the lake and the MLflow run (Evidently and MLflow imported, and the MLflow store opened, before
the clock). It runs on a copy of the world's MLflow store (under the world's
``bench-tmp/``), and the window's report folder is removed afterwards when the world did not have it.

The floor reads the same prediction partitions (the model's columns) and computes, per column with
numpy/scipy on ALL the rows (no sampling), what the configured tests compute: the Wasserstein distance
normed by the reference's standard deviation (``scipy.stats.wasserstein_distance / max(std, 0.001)``, as
Evidently's ``wasserstein``) for numeric columns, the Jensen-Shannon distance of the category
frequencies (``scipy.spatial.distance.jensenshannon``, as Evidently's ``jensenshannon``) for categorical
ones. Those full figures, through the project's own ``drift.decide``, are the full computation's
decision that the sampled one is checked against; the largest difference of a column's statistic is
printed (the sampling's error).

``python bench/stages/drift.py --scenarios ROWS`` measures the sampling policy on the generator's drift
scenarios (docs/explanation/drift-sampling.md).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import CONFIG, START, Measurement, Result, World, measure, timed_into

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.core.schema import DataContract
    from closedloop.stages.drift import DriftFigures, DriftPolicy

STAGE = "drift"
REFERENCE_MAX = 100_000


# -- the full computation (the floor) -------------------------------------------------------------------
def column_statistic(ref: Any, cur: Any, kind: str) -> float | None:
    """The configured test's statistic of one column on all its non-missing values (None: no values)."""
    import numpy as np
    import pandas as pd
    from scipy.spatial.distance import jensenshannon
    from scipy.stats import wasserstein_distance

    if kind == "numeric":
        r = np.asarray(ref, dtype=np.float64)
        c = np.asarray(cur, dtype=np.float64)
        r, c = r[np.isfinite(r)], c[np.isfinite(c)]
        if not len(r) or not len(c):
            return None
        return float(wasserstein_distance(r, c) / max(float(np.std(r)), 0.001))
    r = pd.Series(ref).dropna()
    c = pd.Series(cur).dropna()
    if r.empty or c.empty:
        return None
    rc, cc = r.value_counts(), c.value_counts()
    keys = rc.index.union(cc.index)
    p = rc.reindex(keys, fill_value=0).to_numpy() / len(r)
    q = cc.reindex(keys, fill_value=0).to_numpy() / len(c)
    return float(jensenshannon(p, q))


def full_figures(reference: pd.DataFrame, current: pd.DataFrame, contract: DataContract,
                 policy: DriftPolicy, score_column: str = "score") -> DriftFigures:
    """The figures :func:`closedloop.stages.drift.measure` gives, computed on all rows with numpy/scipy (no quality)."""
    from closedloop.stages.drift import DriftFigures, _kinds

    kinds = _kinds(contract)
    per_feature: dict[str, dict[str, Any]] = {}
    for name, kind in kinds.items():
        method = policy.numeric_stattest if kind == "numeric" else policy.categorical_stattest
        threshold = policy.numeric_threshold if kind == "numeric" else policy.categorical_threshold
        score = column_statistic(reference[name], current[name], kind)
        per_feature[name] = {"stattest": method, "score": score, "threshold": threshold,
                             "drifted": score is not None and score >= threshold}
    prediction = None
    if score_column in reference.columns and score_column in current.columns:
        score = column_statistic(reference[score_column], current[score_column], "numeric")
        prediction = {"stattest": policy.numeric_stattest, "score": score, "threshold": policy.prediction_threshold,
                      "drifted": score is not None and score >= policy.prediction_threshold}
    drifted = [n for n, r in per_feature.items() if r["drifted"]]
    return DriftFigures(reference_rows=len(reference), current_rows=len(current), sampled_rows=len(current),
                        per_feature=per_feature, drift_share=len(drifted) / len(per_feature),
                        drifted_features=drifted, prediction=prediction)


def compare(sampled: DriftFigures, full: DriftFigures, policy: DriftPolicy) -> dict[str, Any]:
    """Decision with and without sampling (quality taken from the sampled figures: it is never sampled), and
    the largest absolute difference of a column's statistic."""
    import dataclasses

    from closedloop.stages.drift import decide

    full = dataclasses.replace(full, quality=sampled.quality)
    a, b = decide(sampled, policy), decide(full, policy)
    diffs = {n: abs(r["score"] - full.per_feature[n]["score"]) for n, r in sampled.per_feature.items()
             if r["score"] is not None and full.per_feature[n]["score"] is not None}
    if sampled.prediction and full.prediction and sampled.prediction["score"] is not None:
        diffs["(score)"] = abs(sampled.prediction["score"] - full.prediction["score"])
    worst = max(diffs, key=diffs.__getitem__) if diffs else None
    # how close the full statistics came to a threshold that decides (a column's own, a key feature's)
    limits = [(n, r["score"], t) for n, r in full.per_feature.items() if r["score"] is not None
              for t in {r["threshold"], policy.key_features.get(n, r["threshold"])}]
    closest = min(limits, key=lambda x: abs(x[1] - x[2])) if limits else None
    return {"closest": f"{closest[0]} {closest[1]:.3f} vs {closest[2]}" if closest else "",
            "same": (a.drift, sorted(a.fired)) == (b.drift, sorted(b.fired)), "sampled": a.fired, "full": b.fired,
            "sampled_drift": a.drift, "full_drift": b.drift, "max_diff": diffs[worst] if worst else 0.0,
            "worst": worst, "flags_same": sampled.drifted_features == full.drifted_features}


# -- the stage ------------------------------------------------------------------------------------------
def _scored(w: World, rt: Any) -> None:
    """Every day of the world's window has its predictions (untimed; the scoring stage usually did it)."""
    from closedloop.stages import scoring

    for d in w.days:
        if not rt.lake.exists(rt.lake.partition("predictions", "transactions", d)):
            scoring.score_day(rt, d)


def _mlflow_copy(w: World) -> Path:
    """A copy of the world's MLflow store for this process: the monitoring run goes there."""
    tmp = w.home / "bench-tmp" / f"drift-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(w.home / "mlflow" / "mlflow.db", tmp / "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["CLOSEDLOOP_MLFLOW_ARTIFACTS"] = str(tmp / "artifacts")
    return tmp


def run(w: World, quick: bool) -> list[Result]:
    import evidently  # noqa: F401  (imported before the clock: a task's import cost is not the stage's)
    import mlflow  # noqa: F401
    import pandas as pd

    from closedloop.stages import drift, monitoring
    from closedloop.stages.features import read_training_split
    from closedloop.stages.runtime import Runtime

    w.champion()
    ts = w.training_set()
    _scored(w, w.runtime())
    tmp = _mlflow_copy(w)
    try:
        rt = Runtime.from_env()
        rt.client.search_experiments(max_results=1)  # the copied store opened before the clock
        c = rt.contract
        policy = drift.DriftPolicy.from_config(rt.settings.config.raw["monitoring"])
        window = w.window
        train = read_training_split(rt.lake, ts["uri"], "train")
        reference = train.sample(n=min(len(train), max(1, w.rows // 10), REFERENCE_MAX), random_state=0)
        del train
        report = drift.report_uri(rt.lake, window.start, window.end)
        had_report = rt.lake.exists(report)

        parts: dict[str, Measurement] = {}
        original = {"champion_reference": monitoring.champion_reference, "measure": drift.measure,
                    "save_report": drift.save_report}

        def bigger_reference(rt_: Any, champ: dict[str, Any]) -> Any:
            _, quality = original["champion_reference"](rt_, champ)
            return reference, quality

        monitoring.champion_reference = bigger_reference
        drift.measure = timed_into(parts, "measure", drift.measure)
        drift.save_report = timed_into(parts, "report", drift.save_report)
        try:
            task = measure(lambda: monitoring.measure_window(rt, window, dag_run_id=f"bench-{os.getpid()}"))
        finally:
            monitoring.champion_reference = original["champion_reference"]
            drift.measure, drift.save_report = original["measure"], original["save_report"]
            if not had_report:
                rt.lake.delete(report, recursive=True)
        sampled = drift.DriftFigures.from_dict(task.result["figures"])
        window_rows = sampled.current_rows

        # -- the floor: the same partitions read, every column's statistic on all rows ----------------------
        columns = [*c.model_features, "score"]
        uris = [rt.lake.local_path(rt.lake.partition("predictions", "transactions", d)) for d in w.days]

        def read() -> pd.DataFrame:
            return pd.concat([pd.read_parquet(u, columns=columns) for u in uris], ignore_index=True)

        current = read()
        data_mib = (current.memory_usage(deep=True).sum() + reference.memory_usage(deep=True).sum()) / 2**20
        floor = measure(lambda: full_figures(reference, read(), c, policy))
        tests = measure(lambda: full_figures(reference, current, c, policy))
        cmp = compare(sampled, floor.result, policy)
        if len(current) != window_rows:
            raise RuntimeError(f"the floor read {len(current)} rows, the task {window_rows}")
        ref_rows = len(reference)
        effect = (f"sampled {sampled.sampled_rows:,} of {window_rows:,} rows (sample_rows={policy.sample_rows}): "
                  f"decision {'same' if cmp['same'] else 'DIFFERENT'} as on all rows "
                  f"({'drift ' + ','.join(cmp['full']) if cmp['full_drift'] else 'no drift'}), "
                  f"max |stat diff| {cmp['max_diff']:.4f} ({cmp['worst']})")
        out = [
            Result.of(STAGE, "monitoring task (measure_window)", w.rows, task, floor, data_mib, work_rows=window_rows,
                      notes=f"window {window_rows:,} vs reference {ref_rows:,} rows; floor: read + scipy per "
                            f"column on all rows; {effect}"),
            Result.of(STAGE, "  drift.measure (Evidently)", w.rows, parts["measure"], tests, data_mib,
                      work_rows=sampled.sampled_rows, notes="floor: the per-column statistics alone (all rows)"),
            Result.of(STAGE, "  report (HTML + JSON)", w.rows, parts["report"], None, None,
                      notes="drift.save_report: Evidently's HTML rendered and written"),
        ]
        if not cmp["same"]:
            print(f"!! drift: the sampled decision differs from the full one: {cmp}", flush=True)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        os.environ.pop("CLOSEDLOOP_MLFLOW_ARTIFACTS", None)


# -- the sampling policy on the generator's drift scenarios -----------------------------------------------
SCENARIOS: dict[str, dict[str, Any]] = {  # as tests/data/test_drift_statistics.py builds them
    "none": {},
    "covariate_drift=0.5": {"covariate_drift": 0.5},
    "new_categories": {"new_categories": True},
    "concept_drift=1": {"concept_drift": 1.0},
    "covariate_drift=0.15 (near the threshold)": {"covariate_drift": 0.15},
}
WARMUP_DAYS = 30  # the aggregates' 30-day lookback: the reference does not see half-empty aggregates


def scenarios(per_day: int, reference_days: int, window_days: int, windows: int) -> list[dict[str, Any]]:
    """For each scenario: ``windows`` windows of ``window_days`` days (drift from the first), each judged on
    all its rows and on the policy's sample (:func:`closedloop.stages.drift._sample`, as ``drift.measure`` draws it,
    seeds 0, 1, ...), against a reference of ``min(rows, 100k)`` rows of the ``reference_days`` before.
    Both are computed by :func:`full_figures` (the same scipy functions as Evidently's stattests; on
    unsampled windows the stage checks them against Evidently's figures), decided by ``drift.decide``."""
    import dataclasses
    from datetime import timedelta

    import pandas as pd

    from closedloop.core.metrics import classification_metrics
    from closedloop.core.schema import load_contract
    from closedloop.core.settings import Config
    from closedloop.devtools.generate import GeneratorConfig, simulate
    from closedloop.stages.aggregates import compute_entity_features
    from closedloop.stages.drift import DriftPolicy, _quality, _sample
    from closedloop.stages.training import fit, predict

    config = Config.load(CONFIG)
    contract = load_contract(config.schema_path)
    policy = DriftPolicy.from_config(config.raw["monitoring"])
    drift_start = START + timedelta(days=WARMUP_DAYS + reference_days)
    days = WARMUP_DAYS + reference_days + windows * window_days
    customers = max(100, per_day * 28 // 10)
    booster = reference = quality = None
    out = []
    for name, knobs in SCENARIOS.items():
        gen = GeneratorConfig(start=START, days=days, customers=customers, transactions_per_day=per_day, seed=11,
                              drift_start=drift_start if knobs else None, **knobs)
        tx = simulate(gen, contract).transactions
        frame = tx.merge(compute_entity_features(tx, contract), on=[contract.entity, contract.event_timestamp],
                         how="left", validate="many_to_one")
        day = (frame[contract.event_timestamp] - pd.Timestamp(START, tz="UTC")).dt.days
        if booster is None:  # the no-drift scenario comes first: the model and reference are shared
            ref_days = frame[(day >= WARMUP_DAYS) & (day < WARMUP_DAYS + reference_days)]
            cut = WARMUP_DAYS + reference_days * 0.7
            train, val = ref_days[day[ref_days.index] < cut], ref_days[day[ref_days.index] >= cut]
            booster, threshold = fit(train, val, contract, config.typed.training, "cpu")
            quality = {"roc_auc": classification_metrics(val[contract.label].to_numpy(),
                                                         predict(booster, val, contract), threshold)["roc_auc"]}
            reference = ref_days.sample(n=min(len(ref_days), REFERENCE_MAX), random_state=0).reset_index(drop=True)
            reference["score"] = predict(booster, reference, contract)
        for i in range(windows):
            first = WARMUP_DAYS + reference_days + i * window_days
            window = frame[(day >= first) & (day < first + window_days)].reset_index(drop=True)
            window["score"] = predict(booster, window, contract)
            q = _quality(window, "score", contract.label, quality)
            full = dataclasses.replace(full_figures(reference, window, contract, policy), quality=q)
            sampled = dataclasses.replace(
                full_figures(_sample(reference, policy.sample_rows, i + 1), _sample(window, policy.sample_rows, i),
                             contract, policy), current_rows=len(window), reference_rows=len(reference), quality=q)
            cmp = compare(sampled, full, policy)
            out.append({"scenario": name, "window": i, "rows": len(window), "reference_rows": len(reference), **cmp})
            print(f"{name:<44} window {i}: {len(window):,} rows vs {len(reference):,}; sampled "
                  f"{'drift ' + ','.join(cmp['sampled']) if cmp['sampled_drift'] else 'no drift'}; full "
                  f"{'drift ' + ','.join(cmp['full']) if cmp['full_drift'] else 'no drift'}; "
                  f"{'same' if cmp['same'] else 'DIFFERENT'}; max |stat diff| {cmp['max_diff']:.4f} "
                  f"({cmp['worst']}); closest to a threshold: {cmp['closest']}", flush=True)
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="The drift sampling policy on the generator's drift scenarios")
    p.add_argument("--per-day", type=int, default=100_000, help="transactions a day")
    p.add_argument("--reference-days", type=int, default=2)
    p.add_argument("--window-days", type=int, default=5, help="days per window (the window's rows: x per-day)")
    p.add_argument("--windows", type=int, default=2, help="windows per scenario")
    a = p.parse_args()
    rows = scenarios(a.per_day, a.reference_days, a.window_days, a.windows)
    same = sum(r["same"] for r in rows)
    print(f"\n{same}/{len(rows)} windows: the sampled decision is the full one's; largest |statistic difference| "
          f"{max(r['max_diff'] for r in rows):.4f}", flush=True)
