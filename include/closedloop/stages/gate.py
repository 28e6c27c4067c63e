"""The promotion gate: decide whether a candidate replaces the champion.

The gate decides; the registry acts. :func:`decide` is a pure function of the two models' metrics on
the same holdout (and of their per-row scores, for the paired bootstrap); :func:`evaluate_gate` scores
both models, records the decision in the candidate's version tags and a decision report in its MLflow
run, and returns it for the promote task. See ``docs/explanation/GATE.md`` for the policy and its measured power.

The rule, in order:

1. The primary metric must be defined on the holdout (both classes present), else "insufficient evidence".
   Plausibility comes before any comparison (:func:`plausibility`): a holdout (or window) whose positive
   share is surely outside the contract's ``label.expected_share.block``, or a champion or candidate whose
   ROC AUC interval lies wholly below chance (0.5), is "labels suspect": nothing moves, an alert goes out,
   the reasons go on the version (an operator's ``labels_override``, with who and why, skips these two
   checks and is recorded). A candidate whose ROC AUC interval reaches chance, judged against no champion
   or a champion that shows no skill on this holdout either, is "insufficient evidence": the holdout's
   labels say nothing about the inputs.
2. With no champion yet (the registry has never promoted one), the candidate becomes the champion.
3. With an unusable champion (gone, unloadable, trained on another schema: :class:`ChampionCheck`)
   nothing can be compared: the candidate must clear the absolute ``floor`` on its own, point estimate
   and bootstrap bound both; the alias still moves only by the registry's compare-and-set.
4. With a champion, fewer than ``min_holdout_positives`` positives is "insufficient evidence" (the
   champion stays); otherwise the candidate's gain on the primary metric must exceed ``margin`` (a tie
   is never a win), the lower bound of the paired bootstrap interval of the gain must exceed it too, and
   no guard metric may worsen by more than its tolerance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from closedloop.core.config_model import GateSection
from closedloop.core.errors import ConfigError, TransientError, error_line
from closedloop.core.labels import judge_share
from closedloop.core.metrics import DIRECTIONS, classification_metrics, json_safe
from closedloop.core.plots import comparison_plot, log_pngs
from closedloop.stages import registry
from closedloop.stages.features import read_training_split
from closedloop.stages.registry import CHAMPION, TAG, alias_version, history
from closedloop.stages.training import predict

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import pandas as pd
    from mlflow import MlflowClient

    from closedloop.core.labels import ShareVerdict
    from closedloop.core.lake import Lake
    from closedloop.core.schema import DataContract
    from closedloop.core.settings import Settings

log = logging.getLogger(__name__)

PROMOTE, REJECT, INSUFFICIENT = "promote", "reject", "insufficient_evidence"
LABELS_SUSPECT = "labels_suspect"
CHANCE_AUC = 0.5  # a model's ROC AUC when its scores say nothing about the labels
_EPS = 1e-9  # metric differences below this are rounding, not evidence
_CLIP = 1e-7  # scores are clipped as classification_metrics clips them, so both see the same ties
_CHUNK = 1 << 19  # resampling weights held at once (b x rows): small enough to stay in cache
BOOTSTRAP_METRICS = ("roc_auc", "pr_auc", "log_loss")


# -- the paired bootstrap ------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval.

    ``of`` says what it bounds: ``"gain"`` (candidate minus champion on ``metric``, oriented so that
    positive means the candidate is better, also for lower-is-better metrics) or ``"candidate"`` (the
    candidate's own ``metric``, used against the floor when there is no champion to compare with).
    """

    metric: str
    of: str
    lower: float
    upper: float
    resamples: int
    confidence: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate_policy(policy: GateSection | Mapping[str, Any]) -> GateSection:
    """The gate's policy, typed: the configuration's ``gate`` section (``Config.typed.gate``) as it is, or a mapping
    (a test's, a benchmark's) validated by the same model, every omitted key given the model's default;
    ConfigError naming each bad key."""
    if isinstance(policy, GateSection):
        return policy
    try:
        return GateSection.model_validate(dict(policy))
    except ValidationError as exc:
        problems = "; ".join(f"gate.{'.'.join(str(p) for p in e['loc'])}: "
                             + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"]) for e in exc.errors())
        raise ConfigError(problems) from None


def bootstrap_settings(policy: GateSection | Mapping[str, Any]) -> tuple[int, float, int]:
    """``(resamples, confidence, seed)`` of the policy's ``bootstrap`` section, checked (resamples 0: disabled)."""
    policy = gate_policy(policy)
    boot = policy.bootstrap
    resamples, confidence, seed = boot.resamples, boot.confidence, boot.seed
    if resamples < 0 or not 0.0 < confidence < 1.0:
        raise ConfigError(f"gate.bootstrap {boot.model_dump()!r}: resamples must be >= 0 (0 disables the bootstrap) "
                          "and confidence strictly between 0 and 1")
    if resamples and policy.primary_metric not in BOOTSTRAP_METRICS:
        raise ConfigError(f"gate.bootstrap: no bootstrap for primary metric {policy.primary_metric!r}; use one "
                          f"of {list(BOOTSTRAP_METRICS)} or set gate.bootstrap.resamples to 0")
    return resamples, confidence, seed


def _resample_counts(rng: np.random.Generator, k: int, b: int) -> np.ndarray:
    """``b`` rows of multinomial resampling counts of ``k`` rows (how often each row is drawn): shape ``(b, k)``."""
    import numpy as np

    draws = rng.integers(0, k, size=(b, k)) + (np.arange(b) * k)[:, None]
    return np.bincount(draws.ravel(), minlength=b * k).reshape(b, k)


def _weighted_metric(metric: str, y: np.ndarray, scores: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function of resampling weights giving ``metric`` of ``(y, scores)`` under each row of them.

    The function takes ``wpos`` (``(b, positives)``) and ``wneg`` (``(b, negatives)``), weights of the
    positive and negative rows in the rows' order, and returns shape ``(b,)``. The sort is done here,
    once, whatever the number of resamples: ROC AUC counts, for every positive, the weight of negatives
    scored below it (ties count half) from a cumulative sum over the negatives in score order; average
    precision sums, over distinct scores from the top, each group's positive weight times the precision
    there (as scikit-learn's ``average_precision_score``); log loss is a weighted mean.
    """
    import numpy as np

    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if metric == "log_loss":
        loss_pos, loss_neg = -np.log(scores[pos]), -np.log1p(-scores[neg])
        return lambda wpos, wneg: (wpos @ loss_pos + wneg @ loss_neg) / (wpos.sum(axis=1) + wneg.sum(axis=1))
    if metric == "roc_auc":
        order = np.argsort(scores[neg], kind="stable")
        neg_sorted = scores[neg][order]
        lo = np.searchsorted(neg_sorted, scores[pos], side="left")
        hi = np.searchsorted(neg_sorted, scores[pos], side="right")

        def auc(wpos: np.ndarray, wneg: np.ndarray) -> np.ndarray:
            cum = np.zeros((wneg.shape[0], len(neg) + 1), dtype=wneg.dtype)
            np.cumsum(wneg[:, order], axis=1, out=cum[:, 1:])
            below = cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo])
            return (wpos * below).sum(axis=1) / (wpos.sum(axis=1) * cum[:, -1])

        return auc
    if metric == "pr_auc":
        order = np.argsort(-scores, kind="stable")
        s = scores[order]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        is_pos = y[order] == 1
        # where each row of the score order comes from in [positives..., negatives...]
        source = np.empty(len(y), dtype=np.int64)
        source[pos], source[neg] = np.arange(len(pos)), len(pos) + np.arange(len(neg))
        source = source[order]

        def average_precision(wpos: np.ndarray, wneg: np.ndarray) -> np.ndarray:
            ws = np.concatenate([wpos, wneg], axis=1)[:, source]
            tp = np.add.reduceat(ws * is_pos, starts, axis=1)
            ctp, call = np.cumsum(tp, axis=1), np.cumsum(np.add.reduceat(ws, starts, axis=1), axis=1)
            precision = np.divide(ctp, call, out=np.zeros(ctp.shape), where=call > 0)
            return (tp * precision).sum(axis=1) / ctp[:, -1]

        return average_precision
    raise ConfigError(f"no bootstrap for metric {metric!r}: use one of {list(BOOTSTRAP_METRICS)}")


def bootstrap_interval(y: Any, candidate: Any, champion: Any | None = None, *, metric: str, resamples: int,
                       confidence: float, seed: int) -> Interval:
    """Percentile interval of ``metric``'s gain (candidate over champion), or of the candidate's metric alone.

    Paired: each resample reweights the same holdout rows for both models, so what the two models
    share (the hard rows, the easy rows) cancels and only their difference is left to vary. Vectorised
    over resamples in chunks (see ``bench/gate_power.py`` for timings).
    """
    import numpy as np

    if resamples < 1:
        raise ValueError(f"bootstrap_interval: resamples={resamples}, need at least 1")
    y = np.asarray(y).astype(int)
    cand = np.clip(np.asarray(candidate, dtype=float), _CLIP, 1 - _CLIP)
    champ = None if champion is None else np.clip(np.asarray(champion, dtype=float), _CLIP, 1 - _CLIP)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        nan = float("nan")
        return Interval(metric, "candidate" if champ is None else "gain", nan, nan, resamples, confidence, seed)
    rng = np.random.default_rng(seed)
    sign = 1.0 if DIRECTIONS[metric] else -1.0
    chunk = max(1, min(resamples, _CHUNK // len(y)))
    of_candidate = _weighted_metric(metric, y, cand)
    of_champion = None if champ is None else _weighted_metric(metric, y, champ)
    values = []
    for start in range(0, resamples, chunk):
        # positives and negatives are resampled apart (stratified): every resample keeps the holdout's
        # class counts, so ROC AUC is defined in each and the class balance does not wobble
        b = min(chunk, resamples - start)
        wpos, wneg = _resample_counts(rng, len(pos), b), _resample_counts(rng, len(neg), b)
        v = of_candidate(wpos, wneg)
        values.append(v if of_champion is None else sign * (v - of_champion(wpos, wneg)))
    stats = np.concatenate(values)
    lower, upper = np.quantile(stats, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(metric, "candidate" if champ is None else "gain", float(lower), float(upper), resamples,
                    confidence, seed)


# -- the decision --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """The gate's verdict on one candidate.

    ``champion_version`` is what ``champion`` pointed at when the gate looked (None when no alias):
    promotion is a compare-and-set against it. ``champion_problem`` says why the champion could not be
    compared (gone, unloadable, other schema); ``interval`` is the bootstrap interval the rule used.
    """

    outcome: str  # promote | reject | insufficient_evidence | labels_suspect
    reason: str
    candidate_version: str
    champion_version: str | None
    candidate: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] = field(default_factory=dict)
    interval: dict[str, Any] | None = None
    champion_problem: str | None = None
    plausibility: dict[str, Any] | None = None  # what plausibility() found (suspicions, chance intervals)
    override: dict[str, Any] | None = None  # the operator's labels_override ({by, why}) when one was given

    @property
    def promote(self) -> bool:
        return self.outcome == PROMOTE

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: undefined (NaN, infinite) metrics become None, with the reason under ``undefined``."""
        return json_safe(asdict(self))


@dataclass(frozen=True)
class Scores:
    """Per-row scores of both models on the same holdout rows (``champion`` None without a usable one)."""

    y: Any
    candidate: Any
    champion: Any | None = None


def _loss(metric: str, candidate: float, champion: float) -> float:
    """How much worse the candidate is on ``metric`` (negative when better)."""
    return champion - candidate if DIRECTIONS[metric] else candidate - champion


def _ci(interval: Interval) -> str:
    sign = "+" if interval.of == "gain" else ""
    return f"{interval.confidence:.0%} CI [{interval.lower:{sign}.4f}, {interval.upper:{sign}.4f}]"


def chance_interval(y: Any, scores: Any, policy: GateSection | Mapping[str, Any]) -> Interval | None:
    """An interval of one model's own ROC AUC on the holdout, for the chance checks (None: one class only).

    The union of two intervals at the gate's confidence: the stratified bootstrap's (1000 resamples even
    when the gain's bootstrap is off) and the point estimate plus or minus the ROC AUC's standard error
    under no skill (Mann-Whitney: ``sqrt((P + N + 1) / (12 P N))``). With a handful of positives the
    bootstrap keeps resampling the same few rows and its interval is far too narrow (one positive: a single
    point); the null's standard error is not, so that a lucky ranking of three positives is no evidence.
    """
    from statistics import NormalDist

    import numpy as np
    from sklearn.metrics import roc_auc_score

    resamples, confidence, seed = bootstrap_settings(policy)
    y = np.asarray(y).astype(int)
    p, n = int((y == 1).sum()), int((y == 0).sum())
    if p == 0 or n == 0:
        return None
    boot = bootstrap_interval(y, scores, metric="roc_auc", resamples=resamples or 1000, confidence=confidence,
                              seed=seed)
    auc = float(roc_auc_score(y, np.clip(np.asarray(scores, dtype=float), _CLIP, 1 - _CLIP)))
    half = NormalDist().inv_cdf((1 + confidence) / 2) * math.sqrt((p + n + 1) / (12 * p * n))
    return Interval("roc_auc", "candidate", min(boot.lower, auc - half), max(boot.upper, auc + half),
                    boot.resamples, confidence, seed)


def plausibility(policy: GateSection | Mapping[str, Any], scores: Scores | None,
                 label_checks: list[ShareVerdict] | None = None) -> dict[str, Any]:
    """What the holdout says about its own labels, before any comparison of the two models.

    ``suspect`` lists the reasons to distrust the labels (a share check at ``block`` level, a model whose
    ROC AUC interval lies wholly below chance); ``no_skill`` says the candidate's interval reaches chance
    and so does the champion's (or there is no champion to compare with); ``intervals`` holds each model's
    ROC AUC interval. Without per-row scores only the share checks can be judged.
    """
    suspect = [v.message for v in (label_checks or []) if v.level == "block"]
    intervals: dict[str, dict[str, Any] | None] = {}
    no_skill = False
    if scores is not None:
        ci = {"candidate": chance_interval(scores.y, scores.candidate, policy)}
        if scores.champion is not None:
            ci["champion"] = chance_interval(scores.y, scores.champion, policy)
        for who, interval in ci.items():
            intervals[who] = interval.to_dict() if interval else None
            if interval is not None and interval.upper < CHANCE_AUC:
                suspect.append(f"the {who} scores below chance on the holdout: ROC AUC {_ci(interval)} lies wholly "
                               f"under {CHANCE_AUC} (inverted or mismatched labels?)")
        reaches = [v is None or v.lower <= CHANCE_AUC for v in ci.values()]
        no_skill = all(reaches)
    return {"suspect": suspect, "no_skill": no_skill, "intervals": intervals,
            "label_share": [v.to_dict() for v in (label_checks or [])]}


def override_note(override: dict[str, Any] | None) -> str:
    return f"labels_override by {override.get('by')}: {override.get('why')}" if override else ""


def decide(candidate: dict[str, float], champion: dict[str, float] | None, policy: GateSection | Mapping[str, Any], *,
           candidate_version: str, champion_version: str | None, scores: Scores | None = None,
           interval: Interval | None = None, champion_problem: str | None = None,
           label_checks: list[ShareVerdict] | None = None, override: dict[str, Any] | None = None) -> Decision:
    """Apply the gate policy (the module docstring's rule) to the metrics of both models on one holdout.

    ``champion`` is None when there is no usable champion; ``champion_problem`` then says why (None:
    there has never been one, and the candidate is the first champion). With
    ``gate.bootstrap.resamples`` > 0 the rule needs an interval: pass ``interval`` (computed by
    :func:`bootstrap_interval`) or the per-row ``scores`` to compute it from; the bootstrap is seeded,
    so the same inputs always give the same decision. ``policy`` is the typed ``gate`` section (or a mapping that
    :func:`gate_policy` types).
    """
    policy = gate_policy(policy)
    primary = policy.primary_metric
    if primary not in DIRECTIONS:
        raise ConfigError(f"gate.primary_metric {primary!r}: use one of {list(DIRECTIONS)}")
    higher = DIRECTIONS[primary]
    margin = policy.margin
    resamples, confidence, seed = bootstrap_settings(policy)
    checks = plausibility(policy, scores, label_checks)
    args = {"candidate_version": candidate_version, "champion_version": champion_version,
            "candidate": candidate, "champion": champion or {}, "champion_problem": champion_problem,
            "plausibility": checks, "override": dict(override) if override else None}

    def verdict(outcome: str, reason: str, ci: Interval | None = None) -> Decision:
        if override and checks["suspect"]:
            reason += f" [{override_note(override)}; overridden: {'; '.join(checks['suspect'])}]"
        return Decision(outcome, reason, interval=ci.to_dict() if ci else None, **args)

    def need_interval(of: str) -> Interval | None:
        if not resamples:
            return None
        if interval is not None and interval.of == of:
            return interval
        if scores is None or (of == "gain" and scores.champion is None):
            raise TypeError(f"decide: gate.bootstrap is on; pass the {of} interval or the per-row scores")
        return bootstrap_interval(scores.y, scores.candidate, scores.champion if of == "gain" else None,
                                  metric=primary, resamples=resamples, confidence=confidence, seed=seed)

    c = candidate.get(primary, math.nan)
    if c is None or math.isnan(c):
        return verdict(INSUFFICIENT, f"{primary} undefined on the holdout (one class only): nothing moves")
    if checks["suspect"] and not override:
        return verdict(LABELS_SUSPECT, "labels suspect, nothing moves: " + "; ".join(checks["suspect"])
                       + ". If the relationship really changed, re-run with labels_override {by, why} or use "
                       "`closedloop promote --force`")
    if checks["no_skill"] and not (champion is None and champion_problem):  # an unusable champion: the floor judges
        who = "the candidate's" + ("" if champion is None else " and the champion's")
        return verdict(INSUFFICIENT, f"{who} ROC AUC interval reaches chance ({CHANCE_AUC}) on this holdout: its "
                       "labels show no relation to the inputs (too few positives, or unrelated labels); nothing "
                       "moves")

    if champion is None and not champion_problem:
        return verdict(PROMOTE, "no champion yet: the first valid candidate becomes champion")
    if champion is None:
        floor = policy.floor
        problem = f"champion unusable: {champion_problem}"
        if floor is None:  # replacing a broken champion needs some absolute evidence
            return verdict(REJECT, f"{problem}; no gate.floor is configured to judge the candidate alone: "
                           "nothing moves, fix or roll back the champion")
        ci = need_interval("candidate")
        bound = c if ci is None else (ci.lower if higher else ci.upper)
        clears = (c >= floor and bound >= floor) if higher else (c <= floor and bound <= floor)
        where = f"{primary} {c:.4f}" + (f" ({_ci(ci)})" if ci else "")
        if not clears:
            return verdict(REJECT, f"{problem}: {where} does not clear the floor {floor}: nothing moves", ci)
        return verdict(PROMOTE, f"{problem}: {where} clears the floor {floor}", ci)

    positives = candidate.get("positives", math.inf)
    if positives < policy.min_holdout_positives:
        return verdict(INSUFFICIENT, f"holdout has {positives:.0f} positives, fewer than the "
                       f"{policy.min_holdout_positives} needed to judge: champion kept")
    k = champion.get(primary, math.nan)
    if k is None or math.isnan(k):
        return verdict(INSUFFICIENT, f"champion's {primary} undefined on the holdout: champion kept")
    gain = c - k if higher else k - c  # not -_loss(): a tie must read +0.0000, not -0.0000
    ci = need_interval("gain")
    where = f"{primary} {c:.4f} vs champion {k:.4f}: gain {gain:+.4f}" + (f" ({_ci(ci)})" if ci else "")
    if gain <= margin + _EPS:  # a tie (or a gain of exactly the margin, up to rounding) is not a win
        return verdict(REJECT, f"{where} does not exceed the margin {margin}", ci)
    if ci is not None and ci.lower <= margin + _EPS:
        return verdict(REJECT, f"{where} exceeds the margin {margin} but the interval's lower bound does not: "
                       "the gain may be noise", ci)
    for metric, tolerance in policy.guards.items():
        loss = _loss(metric, candidate.get(metric, math.nan), champion.get(metric, math.nan))
        if math.isnan(loss) or loss > float(tolerance) + _EPS:
            return verdict(REJECT, f"{primary} improves by {gain:+.4f} but guard {metric} worsens by {loss:.4f} "
                           f"(tolerance {tolerance})", ci)
    return verdict(PROMOTE, f"{where} exceeds the margin {margin}" + (" with its lower bound" if ci else "")
                   + ", guards within tolerance", ci)


# -- the champion, as the gate finds it ----------------------------------------------------------
@dataclass(frozen=True)
class ChampionCheck:
    """What the gate found behind the ``champion`` alias.

    ``version`` is the alias's target (None without alias), ``scores`` the champion's scores on the
    holdout when it could be used, ``problem`` why it could not (None: usable, or there never was one).
    """

    version: str | None
    scores: Any | None = None
    threshold: float = 0.5
    problem: str | None = None


def _deterministic(exc: BaseException) -> bool:
    """Whether a failure to load or score the champion says something about the champion (not the network).

    A missing or corrupt artifact, an unknown version, a model that does not fit the matrix: those
    are the champion's. A refused or timed-out connection is not, and must not let a candidate in
    on the floor alone: it raises TransientError so that the task is retried.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionError | TimeoutError) or type(seen).__module__.startswith(
                ("requests", "urllib3", "botocore.exceptions")):
            return False
        seen = seen.__cause__ or seen.__context__
    return True


def _missing_champion(client: MlflowClient, name: str) -> str | None:
    """Why there is no champion alias although there was a champion (None: there never was one)."""
    from mlflow.exceptions import MlflowException

    aliases = client.get_registered_model(name).aliases or {}
    if CHAMPION in aliases:
        return f"the champion alias points at version {aliases[CHAMPION]}, which cannot be read"
    moves = history(client, name, limit=1)
    if not moves or not moves[0].get("to_version"):
        return None
    last = moves[0]["to_version"]
    try:
        client.get_model_version(name, last)
    except MlflowException:
        return f"version {last}, the last one promoted, is gone (deleted) and the champion alias with it"
    return f"the champion alias was removed (version {last}, the last one promoted, still exists)"


def inspect_champion(client: MlflowClient, name: str, contract: DataContract, holdout: pd.DataFrame) -> ChampionCheck:
    """The champion's scores on ``holdout``, or why it cannot be compared with a candidate of ``contract``.

    Deterministic problems (the version or its artifact gone, a corrupt model file, another schema or
    feature list) come back as ``problem``; an unreachable server raises TransientError instead.
    """
    import numpy as np
    from mlflow.exceptions import MlflowException

    version = alias_version(client, name, CHAMPION)
    if version is None:
        try:
            problem = _missing_champion(client, name)
        except MlflowException as exc:
            if not _deterministic(exc):
                raise TransientError(f"{name}: could not read the registry ({error_line(exc)}); retried") from exc
            problem = None  # no registered model yet: there never was a champion
        return ChampionCheck(None, problem=problem)

    def fail(what: str) -> ChampionCheck:
        return ChampionCheck(version, problem=f"version {version} {what}")

    try:
        mv = client.get_model_version(name, version)
        run_tags, params = {}, {}
        if mv.run_id:
            try:
                run = client.get_run(mv.run_id)
                run_tags, params = run.data.tags, run.data.params
            except MlflowException as exc:
                if not _deterministic(exc):
                    raise
        schema = mv.tags.get(f"{TAG}schema_sha256") or run_tags.get(f"{TAG}schema_sha256")
        if not schema:
            return fail("has no closedloop.schema_sha256 tag: which schema it was trained on is unknown")
        if schema != contract.sha256:
            return fail(f"was trained on another schema (schema_sha256 {schema[:12]}, the candidate's contract "
                        f"{contract.sha256[:12]})")
        features = run_tags.get(f"{TAG}features")
        if features is not None and features != ",".join(contract.model_features):
            return fail(f"was trained on other features ({features[:200]})")
        booster = registry.load_booster(mv.source)
    except Exception as exc:
        if not _deterministic(exc):
            raise TransientError(f"{name} v{version}: could not reach the champion ({error_line(exc)}); "
                                 "the task is retried") from exc
        return fail(f"could not be loaded ({error_line(exc)})")
    if booster.num_features() != len(contract.model_features):
        return fail(f"expects {booster.num_features()} features, the contract has {len(contract.model_features)}")
    try:
        scores = predict(booster, holdout, contract)
    except Exception as exc:
        return fail(f"could not score the holdout ({error_line(exc)})")
    if not np.isfinite(scores).all():
        return fail("gives non-finite scores on the holdout")
    raw = params.get("decision_threshold") or mv.tags.get(f"{TAG}decision_threshold") or 0.5
    return ChampionCheck(version, scores=scores, threshold=float(raw))


# -- the task's function ---------------------------------------------------------------------------
def label_checks(contract: DataContract, holdout_y: Any, training_set: dict[str, Any] | None = None
                 ) -> list[ShareVerdict]:
    """The window-level share checks: the holdout's labels, and the whole window's (all splits) when known."""
    import numpy as np

    y = np.asarray(holdout_y)
    positive = max(contract.label_values)
    checks = [judge_share(int((y == positive).sum()), len(y), contract.label_share, "the holdout's labels")]
    if training_set and training_set.get("rows") and training_set.get("positives"):
        checks.append(judge_share(sum(int(v) for v in training_set["positives"].values()),
                                  sum(int(v) for v in training_set["rows"].values()), contract.label_share,
                                  "the window's labels"))
    return checks


def evaluate_gate(settings: Settings, client: MlflowClient, lake: Lake, contract: DataContract, *,
                  name: str, candidate_version: str, training_set_uri: str,
                  training_set: dict[str, Any] | None = None, override: dict[str, Any] | None = None) -> Decision:
    """Score candidate and current champion on the candidate's holdout and record the decision.

    Never moves an alias: a champion problem is a decision (recorded, with the reason), not a crash,
    and the promote task acts on it through the registry's compare-and-set. ``training_set`` (its
    description) adds the whole window's label share to the plausibility checks; ``override`` is the
    operator's ``labels_override`` ({by, why}).
    """
    policy = settings.config.typed.gate
    bootstrap_settings(policy)  # a bad bootstrap section fails here, before any scoring
    holdout = read_training_split(lake, training_set_uri, "holdout")
    y = holdout[contract.label].to_numpy()
    cand_mv = client.get_model_version(name, candidate_version)
    cand_threshold = float(client.get_run(cand_mv.run_id).data.params["decision_threshold"])
    cand_scores = predict(registry.load_booster(cand_mv.source), holdout, contract)
    cand_metrics = classification_metrics(y, cand_scores, cand_threshold)

    if alias_version(client, name, CHAMPION) == candidate_version:  # a re-run of the run that promoted it
        log.info("%s v%s is already the champion", name, candidate_version)
        return Decision(PROMOTE, "already the champion", candidate_version, candidate_version, cand_metrics,
                        cand_metrics)
    champ = inspect_champion(client, name, contract, holdout)
    champ_metrics = None if champ.scores is None else classification_metrics(y, champ.scores, champ.threshold)
    decision = decide(cand_metrics, champ_metrics, policy, candidate_version=candidate_version,
                      champion_version=champ.version, scores=Scores(y, cand_scores, champ.scores),
                      champion_problem=champ.problem, label_checks=label_checks(contract, y, training_set),
                      override=override)
    record_decision(client, name, decision, cand_mv.run_id)
    log_comparison(client, cand_mv.run_id, y, {f"candidate v{candidate_version}": cand_scores}
                   | ({} if champ.scores is None else {f"champion v{champ.version}": champ.scores}),
                   candidate_version)
    log.info("gate for %s v%s: %s (%s)", name, candidate_version, decision.outcome, decision.reason)
    return decision


def log_comparison(client: MlflowClient, run_id: str, y: Any, curves: dict[str, Any], candidate_version: str
                   ) -> None:
    """``gate/comparison_v<N>.png``: the ROC curves the gate compared, logged next to its decision.

    A plot is an aid, not the decision: a failure to draw or log it is logged and the gate goes on.
    """
    try:
        log_pngs(client, run_id, {f"comparison_v{candidate_version}.png": comparison_plot(y, curves)}, "gate")
    except Exception as exc:  # the decision is recorded already; the plot is optional
        log.warning("gate comparison plot of v%s not logged: %s", candidate_version, error_line(exc))


def record_decision(client: MlflowClient, name: str, decision: Decision, run_id: str) -> None:
    """The decision in the candidate version's tags (``closedloop.decision*``, ``closedloop.gate.*``) and run."""
    tags = {
        f"{TAG}decision": decision.outcome,
        f"{TAG}decision_reason": decision.reason[:4000],
        f"{TAG}compared_with": decision.champion_version or "none",
    }
    for m in ("roc_auc", "pr_auc", "log_loss"):
        for who, values in (("champion", decision.champion), ("candidate", decision.candidate)):
            value = values.get(m)
            if isinstance(value, float | int) and math.isfinite(value):
                tags[f"{TAG}gate.{who}_{m}"] = f"{value:.6f}"
            elif m in values:
                tags[f"{TAG}gate.{who}_{m}"] = "undefined"
    checks = decision.plausibility or {}
    if checks.get("suspect"):
        tags[f"{TAG}gate.labels_suspect"] = "; ".join(checks["suspect"])[:4000]
    if decision.override:
        tags[f"{TAG}gate.override_by"] = str(decision.override.get("by"))[:250]
        tags[f"{TAG}gate.override_why"] = str(decision.override.get("why"))[:4000]
    if decision.interval and decision.interval.get("lower") is not None:
        ci = decision.interval
        tags.update({f"{TAG}gate.ci_metric": ci["metric"], f"{TAG}gate.ci_of": ci["of"],
                     f"{TAG}gate.ci_lower": f"{ci['lower']:.6f}", f"{TAG}gate.ci_upper": f"{ci['upper']:.6f}",
                     f"{TAG}gate.ci_resamples": str(ci["resamples"]),
                     f"{TAG}gate.ci_confidence": str(ci["confidence"]), f"{TAG}gate.ci_seed": str(ci["seed"])})
    if decision.champion_problem:
        tags[f"{TAG}gate.champion_problem"] = decision.champion_problem[:4000]
    for key, value in tags.items():
        client.set_model_version_tag(name, decision.candidate_version, key, value)
    client.log_dict(run_id, decision.to_dict(), f"gate/decision_v{decision.candidate_version}.json")
