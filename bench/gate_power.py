"""The promotion gate's measured power and false-promotion rate on the generator's scenarios.

For each seed, one generated data set per world (a stable one, and one whose fraud changes character on
day 28: ``concept_drift``), a champion trained on an older, smaller window (days 26-28), and candidates
judged against it on the same holdout (the last 7 days, as ``holdout_days: 7`` would hold out):

- better, more data: trained on days 0-35 (17 times the rows, up to the holdout; on this generator a
  model stops improving at about a week of data, so only a champion of two days leaves it room: about
  +0.03 ROC AUC on average, from -0.01 to +0.06 by seed);
- better, drift learnt: in the drifted world, trained on days 26-35 (a week of the new regime);
- equivalent: the champion's own data and settings, another XGBoost seed;
- worse, fewer rounds: the champion's data, 5 boosting rounds;
- worse, degraded labels: the champion's data with 20 % of its training labels flipped.

Every candidate goes through :func:`closedloop.stages.gate.decide` with the gate section of
``models/card_fraud/closedloop.yaml`` (margin, guards, paired bootstrap) and the plausibility checks (each
model's ROC AUC against chance, the holdout's label share against the contract's band), and once more with
the bootstrap off (the point rule alone), to show what the interval buys. Usage::

    .venv/bin/python bench/gate_power.py [--quick] [--seeds N] [--per-day N] [--confidence C] [--structure S]

Prints a Markdown table (docs/explanation/GATE.md quotes it) and the bootstrap's time.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from datetime import date, timedelta
from typing import Any

import numpy as np
import pandas as pd

from closedloop.core.labels import judge_share
from closedloop.core.metrics import classification_metrics
from closedloop.core.schema import DataContract, load_contract
from closedloop.core.settings import DEFAULT_CONFIG, Config
from closedloop.devtools.generate import GeneratorConfig, simulate
from closedloop.stages.aggregates import compute_entity_features
from closedloop.stages.gate import LABELS_SUSPECT, PROMOTE, Scores, bootstrap_interval, decide
from closedloop.stages.training import fit, predict

START = date(2026, 1, 1)
DAYS = 42
DRIFT_DAY = 28
CHAMPION_WINDOW = (26, 28)
HOLDOUT = (35, 42)
SCENARIOS = {
    "better: more data": ("stable", "more_data"),
    "better: drift learnt": ("drifted", "drift_learnt"),
    "equivalent: another seed": ("stable", "other_seed"),
    "worse: 5 boosting rounds": ("stable", "few_rounds"),
    "worse: 20 % labels flipped": ("stable", "noisy_labels"),
}


def world(contract: DataContract, seed: int, drifted: bool, customers: int, per_day: int,
          structure: float = 1.0) -> pd.DataFrame:
    """One generated data set with the customer features joined, as a training set holds them."""
    config = GeneratorConfig(start=START, days=DAYS, customers=customers, transactions_per_day=per_day, seed=seed,
                             structure=structure,
                             concept_drift=1.0 if drifted else 0.0,
                             drift_start=START + timedelta(days=DRIFT_DAY) if drifted else None)
    tx = simulate(config, contract).transactions
    feats = compute_entity_features(tx, contract)
    return tx.merge(feats, on=[contract.entity, contract.event_timestamp], how="left")


def days(frame: pd.DataFrame, contract: DataContract, lo: int, hi: int) -> pd.DataFrame:
    """The rows of days ``[lo, hi)`` counted from the first generated day."""
    ts = frame[contract.event_timestamp]
    first = pd.Timestamp(START).tz_localize(ts.dt.tz)
    return frame[(ts >= first + pd.Timedelta(days=lo)) & (ts < first + pd.Timedelta(days=hi))]


def train(frame: pd.DataFrame, contract: DataContract, training: dict[str, Any], seed: int, **changes: Any):
    """Fit on ``frame`` with a seeded random 15 % validation share (as a holdout_days split does)."""
    val = frame.sample(frac=0.15, random_state=seed)
    cfg = {**training, **changes, "params": {**training["params"], **changes.get("params", {})}}
    return fit(frame.drop(val.index), val, contract, cfg, "cpu")


def candidates(stable: pd.DataFrame, drifted: pd.DataFrame, contract: DataContract, training: dict[str, Any],
               seed: int) -> dict[str, tuple[Any, Any]]:
    """The champion of each world and every candidate, as ``name -> (booster, threshold)``."""
    champ_days = days(stable, contract, *CHAMPION_WINDOW)
    rng = np.random.default_rng(seed)
    noisy = champ_days.copy()
    flip = rng.random(len(noisy)) < 0.2
    noisy.loc[flip, contract.label] = 1 - noisy.loc[flip, contract.label]
    seeded = {"params": {"seed": 7 + seed}}
    return {
        "champion_stable": train(champ_days, contract, training, seed, **seeded),
        "champion_drifted": train(days(drifted, contract, *CHAMPION_WINDOW), contract, training, seed, **seeded),
        "more_data": train(days(stable, contract, 0, HOLDOUT[0]), contract, training, seed, **seeded),
        "drift_learnt": train(days(drifted, contract, CHAMPION_WINDOW[0], HOLDOUT[0]), contract, training, seed,
                              **seeded),
        "other_seed": train(champ_days, contract, training, seed, params={"seed": 1007 + seed}),
        "few_rounds": train(champ_days, contract, training, seed, num_boost_round=5, **seeded),
        "noisy_labels": train(noisy, contract, training, seed, **seeded),
    }


def judge(policy: dict[str, Any], holdout: pd.DataFrame, contract: DataContract, champion, candidate
          ) -> dict[str, Any]:
    y = holdout[contract.label].to_numpy()
    champ_scores, cand_scores = predict(champion[0], holdout, contract), predict(candidate[0], holdout, contract)
    champ_m = classification_metrics(y, champ_scores, champion[1])
    cand_m = classification_metrics(y, cand_scores, candidate[1])
    scores = Scores(y, cand_scores, champ_scores)
    shares = [judge_share(int(y.sum()), len(y), contract.label_share, "the holdout's labels")]
    gated = decide(cand_m, champ_m, policy, candidate_version="2", champion_version="1", scores=scores,
                   label_checks=shares)
    point = decide(cand_m, champ_m, {**policy, "bootstrap": {"resamples": 0}}, candidate_version="2",
                   champion_version="1")
    return {"gated": gated.outcome == PROMOTE, "point": point.outcome == PROMOTE,
            "insufficient": gated.outcome == "insufficient_evidence", "suspect": gated.outcome == LABELS_SUSPECT,
            "gain": cand_m[policy["primary_metric"]] - champ_m[policy["primary_metric"]],
            "lower": (gated.interval or {}).get("lower", float("nan")), "positives": int(y.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 seeds (about 15 s on 2 cores)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 50, about a minute; quick 10)")
    parser.add_argument("--per-day", type=int, default=1000,
                        help="transactions a day (default 1000: about 70 positives in the holdout)")
    parser.add_argument("--confidence", type=float, help="override gate.bootstrap.confidence")
    parser.add_argument("--structure", type=float, default=GeneratorConfig.structure,
                        help="the generator's day-level structure (default: the generator's own, 1; 0: independent "
                             "days, as the figures before 2026-12-04's structured generator)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*only positive or negative samples")  # a 2-day validation share
    n_seeds = args.seeds or (10 if args.quick else 50)
    customers, per_day = round(400 * args.per_day / 1000), args.per_day

    config = Config.load(DEFAULT_CONFIG)
    contract = load_contract(config.schema_path)
    policy = config.typed.gate.model_dump()  # a dict: --confidence changes it
    if args.confidence:
        policy["bootstrap"] = {**policy["bootstrap"], "confidence": args.confidence}
    training = {**config.typed.training.model_dump(), "params": {**config.typed.training.params, "nthread": 2}}

    t0 = time.perf_counter()
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in SCENARIOS}
    holdout_rows = []
    for seed in range(n_seeds):
        frames = {"stable": world(contract, seed, False, customers, per_day, args.structure),
                  "drifted": world(contract, seed, True, customers, per_day, args.structure)}
        models = candidates(frames["stable"], frames["drifted"], contract, training, seed)
        for name, (kind, model) in SCENARIOS.items():
            holdout = days(frames[kind], contract, *HOLDOUT)
            holdout_rows.append(len(holdout))
            rows[name].append(judge(policy, holdout, contract, models[f"champion_{kind}"], models[model]))
    elapsed = time.perf_counter() - t0

    boot = policy.get("bootstrap", {})
    print(f"gate: {policy['primary_metric']}, margin {policy['margin']}, guards {policy.get('guards')}, "
          f"bootstrap {boot}, min_holdout_positives {policy.get('min_holdout_positives')}")
    print(f"{n_seeds} seeds, {customers} customers, {per_day} transactions/day, {DAYS} days, generator structure "
          f"{args.structure:g}; champion on days "
          f"{CHAMPION_WINDOW[0]}-{CHAMPION_WINDOW[1]}, holdout days {HOLDOUT[0]}-{HOLDOUT[1]} "
          f"({int(np.median(holdout_rows))} rows, median)\n")
    print("| candidate | promoted by the gate | promoted by the point rule alone | median gain (ROC AUC) "
          "| median interval lower bound | median holdout positives |")
    print("|---|---|---|---|---|---|")
    for name, results in rows.items():
        n = len(results)
        gated = sum(r["gated"] for r in results)
        point = sum(r["point"] for r in results)
        insufficient = sum(r["insufficient"] for r in results)
        suspect = sum(r["suspect"] for r in results)
        extra = (f" ({insufficient} insufficient evidence)" if insufficient else "") + (
            f" ({suspect} labels suspect)" if suspect else "")
        print(f"| {name} | {gated}/{n} ({gated / n:.0%}){extra} | {point}/{n} ({point / n:.0%}) "
              f"| {np.median([r['gain'] for r in results]):+.4f} | {np.nanmedian([r['lower'] for r in results]):+.4f} "
              f"| {int(np.median([r['positives'] for r in results]))} |")

    y = np.zeros(50_000, dtype=int)
    y[:500] = 1
    rng = np.random.default_rng(0)
    a, b = rng.random(50_000) + 0.5 * y, rng.random(50_000) + 0.6 * y
    t1 = time.perf_counter()
    bootstrap_interval(y, b / 2, a / 2, metric="roc_auc", resamples=1000, confidence=0.95, seed=0)
    boot_s = time.perf_counter() - t1
    print(f"\nbootstrap of ROC AUC, 1000 resamples of 50 000 rows: {boot_s:.2f} s; whole run {elapsed:.0f} s "
          f"on {platform.machine()} {platform.system()}, CPU")


if __name__ == "__main__":
    main()
