"""Progressive delivery: a candidate that passed the offline gate reaches traffic step by step.

``rollout.mode`` of the model's configuration (:class:`closedloop.core.config_model.RolloutSection`):

- ``direct``: the gate's promotion moves ``champion`` at once (as before rollouts).
- ``shadow``: the candidate becomes the ``challenger``; ``closedloop serve`` scores it beside the champion on
  ``serving.shadow_share`` of requests and logs its scores (``served/shadow/``) without answering with them.
- ``canary``: the candidate gets the ``canary`` alias and ``rollout.steps[0]`` of traffic (a sticky split by a
  hash of the entity, in serving); the canary's requests are scored by the champion too, so that both arms are
  compared on the same requests.

The ``rollout`` DAG (daily, and after each curated day, when labels arrive) calls :func:`evaluate` then
:func:`apply`. :func:`evaluate` reads the served log of the rollout's days, checks the guardrails on every
request of the candidate's arm (its error rate, p99 latency, missing online features, and its scores against the
champion's on the same requests: a broken model shows before any label), then compares the per-row loss of the
two arms on the same labelled requests with an always-valid sequential test (:mod:`closedloop.stages.rollout_test`:
valid at every daily look, where a t-test peeked at daily would not be) and decides:

- ``rollback``: a guardrail breached, the candidate worse, or undecided at ``max_days`` with
  ``on_no_decision: rollback``: the alias is removed, all traffic back to the champion within one poll interval;
- ``ramp``: the candidate better and its step baked ``min_days_per_step``: the next share;
- ``promote``: the candidate better at the last step (share 1.0), or in shadow: ``champion`` moves to it;
- ``hold``: nothing yet (the evidence, the step's baking time).

Each decision is appended to the promotion history with its figures and alerted through the notifier. Batch
scoring and drift monitoring keep using the champion's scores throughout.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from closedloop.core.errors import PromotionConflict
from closedloop.core.lake import days_between
from closedloop.core.served import ARM_CANARY, SERVED, SHADOW, read_served
from closedloop.stages import rollout_test
from closedloop.stages.registry import (
    CHAMPION,
    Rollout,
    alias_version,
    end_rollout,
    ramp_rollout,
    reject,
    rollout_state,
    start_rollout,
)

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.core.config_model import RolloutSection
    from closedloop.stages.runtime import Runtime

log = logging.getLogger(__name__)

ACTIONS = ("none", "hold", "ramp", "promote", "rollback")
ARM, CHAMPION_SCORE, LATENCY, CANARY_ERROR = "arm", "champion_score", "latency_ms", "canary_error"


def begin(rt: Runtime, version: str, champion: str | None, reason: str, actor: str) -> dict[str, Any] | None:
    """Start the rollout of a candidate the gate passed, when the model's mode says so; None for ``direct`` or
    a first model (no champion to compare with: it is promoted directly)."""
    policy = rt.settings.config.typed.rollout
    if policy.mode == "direct" or champion is None:
        return None
    running = rollout_state(rt.client, rt.model_name)
    if running is not None and running.version != str(version):  # one rollout at a time: this one waits
        why = (f"a {running.mode} rollout of version {running.version} is in progress (since {running.started_at}); "
               "retrain again once it has ended")
        reject(rt.client, rt.model_name, version, f"rollout_in_progress: {why}")
        return {"action": "rejected", "outcome": "rollout_in_progress", "model": rt.model_name, "version": version,
                "champion": champion, "reason": why}
    share = policy.steps[0] if policy.mode == "canary" else 0.0
    started = start_rollout(rt.client, rt.settings, rt.model_name, version, mode=policy.mode, share=share,
                            champion=champion, reason=reason, actor=actor)
    return {"action": "rollout_started", "model": rt.model_name, "version": version, "champion": champion,
            "mode": policy.mode, "share": started.share, "reason": reason}


def check_policy(policy: RolloutSection) -> None:
    """Refuse (ValueError naming the key) steps that are not increasing shares ending with 1.0, or a level
    outside (0, 1)."""
    steps = list(policy.steps)
    if not steps or steps[-1] != 1.0 or any(not 0 < s <= 1 for s in steps) or steps != sorted(set(steps)):
        raise ValueError(f"rollout.steps={steps}: increasing shares in (0, 1], ending with 1.0")
    if not 0 < policy.alpha < 1:
        raise ValueError(f"rollout.alpha={policy.alpha}: a level in (0, 1)")


# -- the rollout's requests -----------------------------------------------------------------------------
def _served_since(rt: Runtime, kind: str, start: date, today: date) -> pd.DataFrame:
    """The served log of ``kind`` (answers or shadow scores) of the days ``start..today``, one frame (empty when
    nothing was logged)."""
    import pandas as pd

    frames = [f for f in (read_served(rt.lake, d, kind) for d in days_between(start, today + timedelta(days=1)))
              if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _started(rollout: Rollout, attr: str = "started_at") -> date:
    return datetime.fromisoformat(getattr(rollout, attr)).astimezone(UTC).date()


def candidate_rows(rt: Runtime, rollout: Rollout, today: date) -> pd.DataFrame:
    """The requests the candidate scored since the rollout began, each with both arms' scores.

    Canary: the served log's rows of arm ``canary`` from the candidate version (their ``score`` the canary's,
    ``champion_score`` the champion's on the same request), and those it failed to score (``canary_error``).
    Shadow: the challenger's logged scores of the candidate version joined, on the row key, with the champion's
    answers of the same requests.
    """
    c = rt.contract
    frame = _served_since(rt, SERVED if rollout.mode == "canary" else SHADOW, _started(rollout), today)
    if frame.empty:
        return frame
    ours = frame["model_version"].astype(str) == rollout.version
    if rollout.mode == "canary":
        if ARM not in frame.columns:
            return frame.iloc[0:0]
        # the canary's answers, and the requests it should have answered but failed to score (answered by the
        # champion, logged with canary_error): what its error rate counts
        failed = frame[CANARY_ERROR].eq(True) if CANARY_ERROR in frame.columns else False
        return frame[((frame[ARM] == ARM_CANARY) & ours) | failed].reset_index(drop=True)
    frame = frame[ours]
    answers = _served_since(rt, SERVED, _started(rollout), today)
    if answers.empty:
        return answers
    answers = answers[[c.row_key, "score"]].rename(columns={"score": CHAMPION_SCORE})
    frame = frame.drop(columns=[CHAMPION_SCORE], errors="ignore")  # the answer is the champion's score
    return frame.merge(answers.drop_duplicates(c.row_key), on=c.row_key, how="inner")


LOOK = "__look"


def attach_labels(rt: Runtime, rows: pd.DataFrame, since: date) -> pd.DataFrame:
    """``rows`` with the latest curated label of each request (None where none arrived yet) and the look it
    counts from (``__look``: the days from ``since`` to the label partition's day: a daily look sees the labels
    curated until its day)."""
    import pandas as pd

    c = rt.contract
    days = [d for d in rt.lake.list_days("curated", "labels") if d >= since]
    if rows.empty or not days:
        return rows.assign(**{c.label: None, LOOK: 0})
    parts = []
    for d in days:
        part = rt.lake.read_parquet(rt.lake.partition("curated", "labels", d), columns=[c.row_key, c.label])
        parts.append(part.assign(**{LOOK: (d - since).days}))
    labels = pd.concat(parts, ignore_index=True).drop_duplicates(c.row_key, keep="last")
    return rows.merge(labels, on=c.row_key, how="left")


def expected_days(test: dict[str, Any], policy: RolloutSection, days: int) -> dict[str, Any]:
    """When the test should decide on a difference of ``rollout.min_effect``, at the candidate's labelled traffic
    and positive rate so far (:func:`closedloop.stages.rollout_test.expected_days_to_decision`); empty before
    there are two labelled rows with a positive among them."""
    rows, positives, sd = test.get("rows", 0), test.get("positives", 0), test.get("sd_difference")
    if rows < 2 or not positives or not sd:
        return {}
    return rollout_test.expected_days_to_decision(
        policy.min_effect, sd, rows / days, positives / rows, policy.alpha, policy.min_effect ** 2,
        min_rows=policy.min_rows, min_positives=policy.min_positives).to_dict()


def judge(labelled: pd.DataFrame, label: str, policy: RolloutSection) -> dict[str, Any]:
    """The sequential test on the labelled requests of both arms, each counted from the look its label arrived
    in (:func:`closedloop.stages.rollout_test.sequential_test`), as plain JSON with a one-line ``summary``."""
    test_policy = rollout_test.RolloutTestPolicy(alpha=policy.alpha, min_effect=policy.min_effect,
                                                 min_rows=policy.min_rows, min_positives=policy.min_positives,
                                                 loss=policy.loss)
    if labelled.empty:
        return {"decision": "continue", "rows": 0, "positives": 0,
                "summary": f"no labelled request of the candidate yet (at least {policy.min_rows} rows and "
                           f"{policy.min_positives} positives before any decision)"}
    result = rollout_test.sequential_test(labelled[label].to_numpy(dtype=float), labelled["score"].to_numpy(),
                                          labelled[CHAMPION_SCORE].to_numpy(), labelled[LOOK].to_numpy(dtype="int64"),
                                          test_policy).to_dict()
    decision = {rollout_test.CANARY_WORSE: "candidate_worse", rollout_test.CANARY_BETTER: "candidate_better"}.get(
        result["decision"], "continue")
    diff = result.get("mean_difference")
    auc = (result.get("roc_auc_canary"), result.get("roc_auc_champion"))
    summary = (f"{result['rows']} labelled requests, {result['positives']} positive; mean {policy.loss} difference "
               f"{diff:+.4f} (candidate - champion), always-valid p = {result['p_value']:.3g}"
               if diff is not None else result["reason"])
    if None not in auc:
        summary += f"; ROC AUC {auc[0]:.4f} vs {auc[1]:.4f}"
    return {**result, "decision": decision, "test_decision": result["decision"], "summary": summary}


# -- guardrails -----------------------------------------------------------------------------------------
def guardrails(rt: Runtime, rows: pd.DataFrame, policy: RolloutSection) -> dict[str, Any]:
    """The candidate's guardrail figures on every request of its arm, and the breaches (none: an empty list)."""
    g = policy.guardrails
    c = rt.contract
    n = len(rows)
    figures: dict[str, Any] = {"requests": n}
    if n == 0:
        return {**figures, "breaches": []}
    errors = int(rows[CANARY_ERROR].fillna(False).astype(bool).sum()) if CANARY_ERROR in rows.columns else 0
    served = n - errors
    figures["error_rate"] = errors / n
    feats = [f for f in c.entity_features if f in rows.columns]
    missing = rows[feats].isna().any(axis=1) if feats else None
    figures["missing_feature_rate"] = float(missing.mean()) if missing is not None else 0.0
    if LATENCY in rows.columns and rows[LATENCY].notna().any():
        figures["p99_latency_ms"] = float(np.nanpercentile(rows[LATENCY].astype(float), 99))
    ok = rows[~rows[CANARY_ERROR].fillna(False).astype(bool)] if CANARY_ERROR in rows.columns else rows
    pair = ok[["score", CHAMPION_SCORE]].dropna() if CHAMPION_SCORE in ok.columns else ok.iloc[0:0]
    figures["mean_score_shift"] = float((pair["score"] - pair[CHAMPION_SCORE]).abs().mean()) if len(pair) else None
    breaches = []
    if figures["error_rate"] > g.max_error_rate:
        breaches.append(f"error rate {figures['error_rate']:.2%} > {g.max_error_rate:.2%} ({errors} of {n} "
                        "requests the candidate failed to score)")
    if figures["missing_feature_rate"] > g.max_missing_feature_rate:
        breaches.append(f"missing online features on {figures['missing_feature_rate']:.2%} of requests > "
                        f"{g.max_missing_feature_rate:.2%}")
    if figures.get("p99_latency_ms") is not None and figures["p99_latency_ms"] > g.max_p99_latency_ms:
        breaches.append(f"p99 latency {figures['p99_latency_ms']:.0f} ms > {g.max_p99_latency_ms:.0f} ms")
    if figures["mean_score_shift"] is not None and figures["mean_score_shift"] > g.max_mean_score_shift:
        breaches.append(f"scores differ from the champion's on the same requests by {figures['mean_score_shift']:.3f} "
                        f"on average > {g.max_mean_score_shift}")
    figures["served_by_candidate"] = served
    return {**figures, "breaches": breaches}


# -- the decision ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutDecision:
    action: str
    why: str
    rollout: dict[str, Any] | None
    figures: dict[str, Any]
    next_step: int | None = None
    next_share: float | None = None
    day: str | None = None  # the day judged: a ramp's step starts then (a replayed day as a live one)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def decide(rollout: Rollout | None, guard: dict[str, Any], test: dict[str, Any], policy: RolloutSection,
           today: date) -> RolloutDecision:
    """What to do today: the rules of the module's docstring, in that order (guardrails, the test, baking, the
    deadline)."""
    if rollout is None:
        return RolloutDecision("none", "no rollout in progress", None, {})
    figures = {"guardrails": guard, "test": test}
    r = rollout.to_dict()
    if guard["breaches"]:
        return RolloutDecision("rollback", "guardrail: " + "; ".join(guard["breaches"]), r, figures)
    days_in = (today - _started(rollout)).days
    verdict = test.get("decision")
    if verdict == "candidate_worse":
        return RolloutDecision("rollback", f"the candidate's {policy.loss} is worse than the champion's on the same "
                               f"requests ({test.get('summary')})", r, figures)
    if verdict == "candidate_better":
        if rollout.mode == "shadow" or rollout.step >= len(policy.steps) - 1:
            return RolloutDecision("promote", f"the candidate's {policy.loss} is better on the same requests "
                                   f"({test.get('summary')})", r, figures)
        baked = (today - _started(rollout, "step_started_at")).days
        if baked < policy.min_days_per_step:
            return RolloutDecision("hold", f"better so far; step {rollout.step} ({rollout.share:g} of traffic) bakes "
                                   f"{policy.min_days_per_step} day(s), {baked} done", r, figures)
        nxt = rollout.step + 1
        return RolloutDecision("ramp", f"better on the same requests ({test.get('summary')}): "
                               f"{rollout.share:g} -> {policy.steps[nxt]:g} of traffic", r, figures, nxt,
                               policy.steps[nxt])
    if days_in >= policy.max_days:
        action = "rollback" if policy.on_no_decision == "rollback" else "promote"
        return RolloutDecision(action, f"undecided after {days_in} days (rollout.max_days {policy.max_days}): "
                               f"on_no_decision is {policy.on_no_decision} ({test.get('summary')})", r, figures)
    return RolloutDecision("hold", f"no decision yet ({test.get('summary')})", r, figures)


def run_day(conf: dict[str, Any], curated: list[str], interval_end: datetime | None) -> date:
    """The day a rollout run judges: ``day`` of its configuration, else the newest curated day that started it,
    else the day of its data interval's end (a scheduled run), else today (UTC)."""
    if conf.get("day"):
        return date.fromisoformat(str(conf["day"]))
    if curated:
        return date.fromisoformat(max(curated))
    return interval_end.date() if interval_end is not None else datetime.now(UTC).date()


def evaluate(rt: Runtime, today: date) -> dict[str, Any]:
    """Measure the rollout in progress on the requests up to ``today`` and decide (nothing is changed here)."""
    policy = rt.settings.config.typed.rollout
    check_policy(policy)
    rollout = rollout_state(rt.client, rt.model_name)
    if rollout is None:
        return decide(None, {}, {}, policy, today).to_dict()
    rows = candidate_rows(rt, rollout, today)
    guard = guardrails(rt, rows, policy)
    labelled = attach_labels(rt, rows, _started(rollout))
    if len(labelled):
        labelled = labelled[labelled[rt.contract.label].notna()]
    if CANARY_ERROR in labelled.columns:
        labelled = labelled[~labelled[CANARY_ERROR].fillna(False).astype(bool)]
    test = judge(labelled, rt.contract.label, policy)
    test["expected"] = expected_days(test, policy, max((today - _started(rollout)).days + 1, 1))
    if test["decision"] == "continue" and test["expected"].get("days") is not None:
        test["summary"] += (f"; at this traffic a difference of {policy.min_effect} would be decided about day "
                            f"{test['expected']['days']:.0f} of the rollout")
    return {**decide(rollout, guard, test, policy, today).to_dict(), "day": today.isoformat()}


def apply(rt: Runtime, decision: dict[str, Any], actor: str) -> dict[str, Any]:
    """Carry out ``decision`` (a compare-and-set on the rollout it was made for: a retry, or a rollout that moved
    meanwhile, changes nothing twice). Returns what was done, for the history's reader and the alert."""
    action, r = decision["action"], decision.get("rollout")
    if action in ("none", "hold") or r is None:
        return {"action": action, "why": decision["why"], "model": rt.model_name}
    rollout = Rollout(**r)
    reason = f"rollout {action}: {decision['why']}"[:4000]
    done: dict[str, Any] = {"action": action, "why": decision["why"], "model": rt.model_name,
                            "version": rollout.version, "champion": rollout.champion, "mode": rollout.mode,
                            "figures": decision["figures"]}
    try:
        if action == "ramp":
            at = f"{decision['day']}T00:00:00+00:00" if decision.get("day") else None
            moved = ramp_rollout(rt.client, rt.settings, rollout, step=decision["next_step"],
                                 share=decision["next_share"], reason=reason, actor=actor, at=at)
            done["share"] = moved.share
        elif action in ("promote", "rollback"):
            move = end_rollout(rt.client, rt.settings, rollout, promoted=action == "promote", reason=reason,
                               actor=actor)
            done["already_done"] = move is None
            done["champion_now"] = alias_version(rt.client, rt.model_name, CHAMPION)
    except PromotionConflict as exc:
        done.update(action="conflict", why=f"{exc} (decided: {action}: {decision['why']})")
    return done
