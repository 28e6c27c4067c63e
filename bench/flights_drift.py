"""Drift decisions on a real data set: the NYC 2013 flights replayed through closedloop's monitoring.

``python bench/flights_drift.py`` lands the whole year (examples/flights/load.py) in a lake under a
temporary home, reads it back, computes the plane aggregates as ingest does, and replays the year day by
day with the package's functions (no DAG runs): a champion trained on January's first 28 days; each day
the two-day window ending that day is scored by the champion, measured against its reference
(``closedloop.stages.drift.measure``) and judged by the policy; ``confirm_windows`` consecutive drifted windows
outside the cooldown trigger a retraining on the last ``retrain_window_days`` days (the last day held out),
judged by the gate (``closedloop.stages.gate.decide``) against the champion on that holdout and promoted or
rejected. Two replays per policy:

- **fixed champion**: the January champion judges every window of the year, nothing is retrained: the
  false alarms over quiet windows and the detection of the season's shifts;
- **closed loop**: the same with retraining: the candidates triggered and promoted.

A window is *stable* when the champion's realised ROC AUC on it lies inside its band: the mean +/- 3
standard deviations of the realised ROC AUC over chunks of a window's size of the champion's training
window, scored out of sample (time-blocked cross-fitting, ``closedloop.stages.performance``). A drift verdict on
a stable window is a false alarm.

The statistics are Evidently's stattest functions called directly (``measure(report=False)``: the same
figures as the HTML report, without building it). Writes the table (Markdown) to ``--out`` (default
docs/explanation/flights-drift.md) and, with ``--records``, every window and retraining as JSON. The fixed-champion
replay takes about 10 minutes on two shared cores; each retraining of the closed loop about a minute
(training, the gate's bootstrap and, when promoted, the cross-fitted reference), so a policy that alarms
every other day needs hours for the year: ``--loop-last-day`` cuts the closed loop short (the table says
so), ``--policies`` and ``--previous`` replay one policy and keep the other's records.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from closedloop.core.lake import Lake
from closedloop.core.metrics import classification_metrics
from closedloop.core.schema import DataContract, load_contract
from closedloop.core.settings import REPO_ROOT, Config
from closedloop.stages import performance
from closedloop.stages.aggregates import compute_entity_features
from closedloop.stages.drift import DriftPolicy, decide, in_cooldown, measure
from closedloop.stages.features import time_split
from closedloop.stages.gate import Scores
from closedloop.stages.gate import decide as gate_decide
from closedloop.stages.training import fit, predict, reference_window, trimmed

log = logging.getLogger("flights_drift")

EXAMPLE = REPO_ROOT / "examples" / "flights"
FIRST_DAY = date(2013, 1, 1)
CHAMPION_DAYS = 28
SUMMER = date(2013, 6, 1)


def _loader() -> Any:
    spec = importlib.util.spec_from_file_location("flights_load", EXAMPLE / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def landed_frame(contract: DataContract, root: Path) -> pd.DataFrame:
    """Land the whole year in a lake under ``root``, read it back and add the plane aggregates."""
    lake = Lake(root="file://" + str(root / "lake"))
    started = time.perf_counter()
    uris = _loader().land(lake, contract)
    log.info("landed %d partitions in %.0f s", len(uris), time.perf_counter() - started)
    events = lake.read_parquet_many([lake.partition("landing", "transactions", d)
                                     for d in lake.list_days("landing", "transactions")])
    labels = lake.read_parquet_many([lake.partition("landing", "labels", d)
                                     for d in lake.list_days("landing", "labels")])
    frame = events.merge(labels, on=contract.row_key, how="left", validate="one_to_one")
    features = compute_entity_features(frame, contract)
    frame = frame.merge(features, on=[contract.entity, contract.event_timestamp], how="left", validate="many_to_one")
    frame["day"] = frame[contract.event_timestamp].dt.tz_convert("UTC").dt.date
    return frame.sort_values([contract.event_timestamp, contract.row_key], kind="stable").reset_index(drop=True)


def days(frame: pd.DataFrame, start: date, end: date) -> pd.DataFrame:
    return frame[(frame["day"] >= start) & (frame["day"] < end)]


@dataclasses.dataclass
class Champion:
    """A model version as monitoring knows it."""

    version: int
    window: tuple[date, date]
    booster: Any
    threshold: float
    parts: dict[str, pd.DataFrame]       # its train, validation and holdout splits
    reference: pd.DataFrame              # the drift reference, as training kept it before calibration
    reference_quality: dict[str, float]
    performance: performance.PerformanceReference | None = None
    oos: pd.DataFrame | None = None      # the training window with out-of-sample scores
    calibration: Any = None              # (closedloop.stages.calibration.Calibration, its reference), calibrated policy

    def calibrate(self, contract: DataContract, config: Config, window_rows: int) -> Champion:
        """Once the version is champion: its training window scored out of sample (time-blocked
        cross-fitting, ``closedloop.stages.training.reference_window``, as training does) and the performance band
        on it (``closedloop.stages.performance``), which says which windows are stable."""
        if self.oos is None:
            rounds = int(self.booster.num_boosted_rounds())
            self.oos = reference_window(self.parts["train"], self.parts["validation"], self.parts["holdout"],
                                        contract, config.typed.training, rounds, "cpu")
            scored = self.oos[self.oos["score"].notna()]
            self.performance = performance.calibrate_reference(scored["score"].to_numpy(),
                                                               scored[contract.label].to_numpy(), window_rows)
        return self


def train_champion(frame: pd.DataFrame, contract: DataContract, config: Config, start: date, end: date,
                   version: int, split: dict[str, Any]) -> tuple[Champion, dict[str, Any]]:
    training = config.typed.training
    window = days(frame, start, end)
    parts = time_split(window, contract, split)
    booster, threshold = fit(parts["train"], parts["validation"], contract, training, "cpu")
    booster = trimmed(booster)
    hold = parts["holdout"]
    hold_y, hold_s = hold[contract.label].to_numpy(), predict(booster, hold, contract)
    metrics = classification_metrics(hold_y, hold_s, threshold)
    reference = parts["train"].sample(n=min(len(parts["train"]), int(training.get("reference_sample_rows", 5000))),
                                      random_state=0)
    champ = Champion(version=version, window=(start, end), booster=booster, threshold=threshold, parts=parts,
                     reference=reference, reference_quality={"roc_auc": metrics["roc_auc"]})
    return champ, {"holdout": hold, "metrics": metrics, "y": hold_y, "scores": hold_s}


# a policy judges a scored window against a champion: (drift, fired rules, figures worth keeping)
Judge = Callable[[Champion, pd.DataFrame, int], tuple[bool, list[str], dict[str, Any]]]


def fixed_policy(contract: DataContract, config: Config) -> Judge:
    """The policy before calibration: fixed thresholds (``closedloop.stages.drift.decide`` without a calibration)
    on Evidently's statistics, against a sample of the train split without scores (what training kept)."""
    policy = DriftPolicy.from_config(config.raw["monitoring"])

    def judge(champ: Champion, window: pd.DataFrame, seed: int) -> tuple[bool, list[str], dict[str, Any]]:
        _, figures = measure(champ.reference, window, contract, policy, reference_quality=champ.reference_quality,
                             label_column=contract.label, seed=seed, report=False)
        decision = decide(figures, policy)
        return decision.drift, list(decision.fired), {"drift_share": figures.drift_share,
                                                      "drifted": figures.drifted_features,
                                                      "judged": decision.judged}
    return judge


def calibrated_policy(contract: DataContract, config: Config) -> Judge:
    """The calibrated policy, as training and monitoring now run it: the reference is a sample of the whole
    training window with its out-of-sample scores, the thresholds are calibrated on the window's own chunks
    (``closedloop.stages.calibration.reference_calibration``, with the model's gain importance), and the decision
    (``closedloop.stages.drift.decide`` with the calibration) acts on importance-weighted input drift, score drift
    and estimated/realised performance against their bands."""
    from closedloop.stages import calibration
    from closedloop.stages.drift import performance_figures
    from closedloop.stages.monitoring import used_thresholds

    raw = config.raw["monitoring"]
    policy = DriftPolicy.from_config(raw)

    def judge(champ: Champion, window: pd.DataFrame, seed: int) -> tuple[bool, list[str], dict[str, Any]]:
        if champ.calibration is None:
            assert champ.oos is not None
            want = min(len(champ.oos), config.typed.training.reference_sample_rows)
            ref = champ.oos.sample(n=want, random_state=0).sort_index()
            importance = champ.booster.get_score(importance_type="total_gain")
            champ.calibration = (calibration.reference_calibration(champ.oos, ref, contract, raw, importance), ref)
        cal, ref = champ.calibration
        cal = cal.for_rows(min(len(window), policy.sample_rows or len(window)))  # as monitoring.measure_window
        _, figures = measure(ref, window, contract, policy, reference_quality=champ.reference_quality,
                             label_column=contract.label, seed=seed, thresholds=used_thresholds(cal), report=False)
        figures.performance = performance_figures(window, cal.performance, label_column=contract.label)
        decision = decide(figures, policy, cal)
        scores = {n: r.get("score") for n, r in figures.per_feature.items()}
        value = calibration.aggregate(scores, cal)
        perf = figures.performance or {}
        return decision.drift, list(decision.fired), {
            "drift_share": figures.drift_share, "drifted": figures.drifted_features, "judged": decision.judged,
            "thresholds": cal.mode, "input_drift": value, "input_threshold": (cal.aggregate or {}).get("threshold"),
            "score_drift": (figures.prediction or {}).get("score"),
            "score_threshold": (cal.prediction or {}).get("threshold"),
            "estimated_band": perf.get("estimated_band") or perf.get("estimated"),
            "top": sorted(((cal.weights[n] * calibration.contribution(n, scores.get(n), cal) ** 2, n)
                           for n in cal.weights), reverse=True)[:3]}
    return judge


POLICIES: dict[str, Callable[[DataContract, Config], Judge]] = {
    "fixed": fixed_policy,
    "calibrated": calibrated_policy,
}


def replay(frame: pd.DataFrame, contract: DataContract, config: Config, judge: Judge, *, retrain: bool,
           last_day: date) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Replay the year day by day; returns the per-window records and the retrainings."""
    mon = config.raw["monitoring"]
    policy = DriftPolicy.from_config(mon)
    window_days = int(mon["window_days"])
    confirm = config.monitoring.confirm_windows
    retrain_days = config.monitoring.retrain_window_days
    window_rows = int(len(days(frame, FIRST_DAY, FIRST_DAY + timedelta(days=CHAMPION_DAYS))) / CHAMPION_DAYS
                      * window_days)
    end = FIRST_DAY + timedelta(days=CHAMPION_DAYS)
    split = config.typed.training.split.model_dump(exclude_none=True)
    champ, _ = train_champion(frame, contract, config, FIRST_DAY, end, 1, split)
    champ.calibrate(contract, config, window_rows)
    records: list[dict[str, Any]] = []
    retrainings: list[dict[str, Any]] = []
    streak = 0
    last_trigger = None
    day = end + timedelta(days=window_days)
    while day <= last_day:
        window = days(frame, day - timedelta(days=window_days), day).copy()
        window["score"] = predict(champ.booster, window, contract)
        drift, fired, extra = judge(champ, window, len(records))
        assert champ.performance is not None
        perf = performance.judge_window(champ.performance, window["score"].to_numpy(),
                                        window[contract.label].to_numpy())
        band = perf.realised_band
        stable = band is not None and band.contains(perf.realised)
        streak = streak + 1 if drift else 0
        rec = {"end": day.isoformat(), "rows": len(window), "champion": champ.version, "drift": drift, "fired": fired,
               "realised": perf.realised, "estimated": perf.estimated, "stable": stable,
               "band": None if band is None else [band.lower, band.upper], **extra}
        records.append(rec)
        now = pd.Timestamp(day, tz="UTC").to_pydatetime()
        if retrain and drift and streak >= confirm and not in_cooldown(last_trigger, now, policy):
            last_trigger = now
            cand, held = train_champion(frame, contract, config, day - timedelta(days=retrain_days), day,
                                        champ.version + 1, {**split, "holdout_days": 1})
            hold = held["holdout"]
            champ_scores = predict(champ.booster, hold, contract)
            champ_metrics = classification_metrics(held["y"], champ_scores, champ.threshold)
            decision = gate_decide({**held["metrics"], "positives": float(held["y"].sum())}, champ_metrics,
                                   config.typed.gate, candidate_version=str(cand.version),
                                   champion_version=str(champ.version),
                                   scores=Scores(y=held["y"], candidate=held["scores"], champion=champ_scores))
            retrainings.append({"end": day.isoformat(), "candidate": cand.version, "outcome": decision.outcome,
                                "reason": decision.reason, "fired": fired})
            log.info("%s: retraining -> %s (%s)", day, decision.outcome, decision.reason)
            if decision.outcome == "promote":
                champ = cand.calibrate(contract, config, window_rows)
        day += timedelta(days=1)
    return records, retrainings


def summary(records: list[dict[str, Any]], retrainings: list[dict[str, Any]] | None) -> dict[str, Any]:
    judged = [r for r in records if r.get("judged", True)]
    stable = [r for r in judged if r["stable"]]
    summer = [r for r in judged if SUMMER < date.fromisoformat(r["end"]) <= SUMMER + timedelta(days=14)]
    first_summer = next((r["end"] for r in judged if date.fromisoformat(r["end"]) > SUMMER and r["drift"]), None)
    out = {"windows": len(judged), "flagged": sum(r["drift"] for r in judged), "stable": len(stable),
           "false_alarms": sum(r["drift"] for r in stable),
           "unstable": len(judged) - len(stable),
           "unstable_flagged": sum(r["drift"] for r in judged if not r["stable"]),
           "summer_flagged": sum(r["drift"] for r in summer), "summer_windows": len(summer),
           "first_summer_flag": first_summer}
    if retrainings is not None:
        out["retrainings"] = len(retrainings)
        out["promoted"] = sum(r["outcome"] == "promote" for r in retrainings)
    return out


def monthly(records: list[dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """Per month: windows, flagged, stable."""
    out: dict[str, list[int]] = {}
    for r in records:
        m = out.setdefault(r["end"][:7], [0, 0, 0])
        m[0] += 1
        m[1] += r["drift"]
        m[2] += r["stable"]
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def markdown(results: dict[str, dict[str, Any]], command: str) -> str:
    runs = [f"- {name}: `{res['command']}` ({res['minutes']:.0f} minutes on two shared cores)"
            for name, res in results.items() if res.get("command")]
    lines = ["# Drift decisions on a real data set: the NYC 2013 flights", "",
             f"Written by `{command}` from the replays:", "", *runs, "",
             "The data, the replay and the definitions (a *stable* window: the champion's realised ROC AUC inside",
             "its band; a drift verdict there is a false alarm) are in the script's docstring; the example's",
             "schema and configuration are `examples/flights/`; the calibrated policy is described in",
             "[DRIFT.md](DRIFT.md), the performance bands in [performance-estimation.md](performance-estimation.md).",
             "",
             "| policy | replay | window ends | windows | flagged | stable windows | false alarms (stable flagged) | "
             "unstable flagged | first 14 summer windows flagged | first flagged after 1 June | "
             "retrainings | promoted |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for replay_name in ("fixed champion", "closed loop"):
            s = res[replay_name]["summary"]
            rate = s["false_alarms"] / s["stable"] if s["stable"] else float("nan")
            lines.append(
                f"| {name} | {replay_name} | {s.get('period', '')} | {s['windows']} | {s['flagged']} | {s['stable']} | "
                f"{s['false_alarms']} ({rate:.0%}) | {s['unstable_flagged']} of {s['unstable']} | "
                f"{s['summer_flagged']} of {s['summer_windows']} | {s['first_summer_flag'] or 'none'} | "
                f"{s.get('retrainings', '-')} | {s.get('promoted', '-')} |")
    lines += ["", "Per month, fixed champion (windows / flagged / stable):", "",
              "| month | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    months = monthly(next(iter(results.values()))["fixed champion"]["records"])
    per = {name: monthly(res["fixed champion"]["records"]) for name, res in results.items()}
    for m in months:
        lines.append(f"| {m} | " + " | ".join(f"{per[n][m][0]} / {per[n][m][1]} / {per[n][m][2]}" for n in results)
                     + " |")
    lines += ["", "What fired on the stable windows (false alarms), by rule:", ""]
    for name, res in results.items():
        for replay_name in ("fixed champion", "closed loop"):
            fired = Counter(f for r in res[replay_name]["records"] if r["stable"] and r["drift"] for f in r["fired"])
            lines.append(f"- {name}, {replay_name}: " + (", ".join(f"{k} {v}" for k, v in fired.most_common())
                                                          or "nothing"))
    lines += ["", "Against the targets of issue 15 (stable windows: at most 1 false alarm in 10; the first summer "
              "windows detected; at least half of the triggered candidates promoted):", ""]
    for name, res in results.items():
        for replay_name in ("fixed champion", "closed loop"):
            s = res[replay_name]["summary"]
            rate = s["false_alarms"] / s["stable"] if s["stable"] else float("nan")
            parts = [f"false alarms {rate:.0%} ({'met' if rate <= 0.1 else 'not met'})",
                     f"first 14 summer windows flagged {s['summer_flagged']} of {s['summer_windows']}"]
            if "retrainings" in s:
                share = s["promoted"] / s["retrainings"] if s["retrainings"] else float("nan")
                parts.append(f"promoted {s['promoted']} of {s['retrainings']} ({'met' if share >= 0.5 else 'not met'})")
            lines.append(f"- {name}, {replay_name} ({s.get('period', '')}): " + "; ".join(parts))
    for name, res in results.items():
        lines += ["", f"Retrainings of the closed loop, {name} policy:", ""]
        for r in res["closed loop"]["retrainings"]:
            lines.append(f"- {r['end']}: {', '.join(r['fired'])} -> {r['outcome']}: {r['reason']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "explanation" / "flights-drift.md")
    parser.add_argument("--records", type=Path, default=None,
                        help="JSON of every window and retraining (for --previous; default: not written)")
    parser.add_argument("--last-day", type=date.fromisoformat, default=date(2014, 1, 1),
                        help="the last window's end (exclusive day)")
    parser.add_argument("--loop-last-day", type=date.fromisoformat, default=None,
                        help="the closed loop's last window end (default: --last-day); each retraining costs a minute")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help=f"which of {', '.join(POLICIES)} to replay (comma-separated; empty: none)")
    parser.add_argument("--previous", type=Path, action="append", default=[],
                        help="records JSON of an earlier run: its policies not replayed now are kept in the table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore")
    config = Config.load(EXAMPLE / "closedloop.yaml")
    contract = load_contract(config.schema_path)
    if [n for n in args.policies.split(",") if n]:
        with tempfile.TemporaryDirectory(prefix="flights-drift-") as tmp:
            frame = landed_frame(contract, Path(tmp))
    results: dict[str, dict[str, Any]] = {}
    for previous in args.previous:
        results.update(json.loads(previous.read_text()))
    command = "python bench/flights_drift.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name in [n for n in args.policies.split(",") if n]:
        judge = POLICIES[name](contract, config)
        policy_started = time.perf_counter()
        results[name] = {"command": command.strip()}
        for replay_name, retrain in (("fixed champion", False), ("closed loop", True)):
            t = time.perf_counter()
            last = (args.loop_last_day or args.last_day) if retrain else args.last_day
            records, retrainings = replay(frame, contract, config, judge, retrain=retrain, last_day=last)
            s = summary(records, retrainings if retrain else None)
            s["period"] = f"{records[0]['end']}..{records[-1]['end']}" if records else "none"
            log.info("%s / %s: %s (%.0f s)", name, replay_name, s, time.perf_counter() - t)
            results[name][replay_name] = {"summary": s, "records": records, "retrainings": retrainings}
        results[name]["minutes"] = (time.perf_counter() - policy_started) / 60
    results = {name: results[name] for name in POLICIES if name in results}
    args.out.write_text(markdown(results, command.strip()))
    if args.records is not None:
        args.records.write_text(json.dumps(results, indent=1, default=str))
    log.info("wrote %s%s", args.out, f" and {args.records}" if args.records else "")


if __name__ == "__main__":
    main()
