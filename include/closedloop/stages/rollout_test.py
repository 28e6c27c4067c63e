"""The rollout's outcome test: is the canary worse or better than the champion on the same requests?

A canary model version serves a share of live traffic and the champion scores the same requests in shadow, so every
labelled canary request gives a paired per-row loss difference ``d_i = loss_canary_i - loss_champion_i``
(:func:`paired_differences`; per-row log loss, or the Brier score; positive means the canary is worse). The rollout
looks at the differences once a day, as labels arrive, and must be allowed to stop at any look: a fixed-horizon
t-test repeated daily inflates its false-positive rate far above its level
(``docs/explanation/rollout-test.md`` measures it).

The test is the mixture sequential probability ratio test (mSPRT) for the mean ``theta`` of ``d`` (Robbins' normal
mixture; Johari, Pekelis and Walsh, "Always Valid Inference: Continuous Monitoring of A/B Tests", Operations
Research 2022, arXiv:1512.04922). Against ``H0: theta = 0`` the normal likelihood ratio mixed over
``theta ~ N(0, tau2)`` is, after ``n`` rows with mean ``dbar`` and variance ``s2`` (plugged in from the rows seen)::

    Lambda_n = sqrt(s2 / (s2 + n tau2)) * exp(n^2 tau2 dbar^2 / (2 s2 (s2 + n tau2)))

Under ``H0`` it is a nonnegative martingale, so by Ville's inequality ``P(sup_n Lambda_n >= 1/alpha) <= alpha``:
the always-valid p-value ``p_k = min(p_{k-1}, 1 / Lambda_{n_k})`` (``p_0 = 1``) may be read at every look, never
increases, and stopping at the first look where ``p_k <= alpha`` keeps the false-positive rate at most ``alpha``
over all looks, however many. The mixture is symmetric, so the test is two-sided; the sign of ``dbar`` at that
look says which way: ``"canary_worse"`` or ``"canary_better"``; before it, ``"continue"``. The same inequality
inverted gives an always-valid confidence sequence for ``theta`` (:attr:`RolloutTestResult.interval`). With the
variance plugged in the guarantee is asymptotic (exact for a known variance); the minimum sample below keeps the
plug-in from acting on a handful of rows, and the measured A/A rates in ``docs/explanation/rollout-test.md`` are the
check.

**The mixing variance.** ``tau2`` says which effects the test is tuned for. At a given ``n`` and ``z^2 = n dbar^2 /
s2``, ``log Lambda_n`` is largest for ``n tau2 / s2 = z^2 - 1``; when the true mean is ``delta`` that is ``tau2 =
delta^2 - s2 / n``, about ``delta^2`` once the effect is detectable. So ``tau2 = min_effect^2``, with
``min_effect`` the smallest difference in mean per-row loss worth acting on (:attr:`RolloutTestPolicy.min_effect`;
0.01 by default, in the loss's units: a log loss worse by 0.01 nats per row, the tolerance the promotion gate gives
log loss as a guard). A larger effect is still detected, a little later than with its own ``tau2``; a smaller one
later still, but never falsely: ``tau2`` moves power, not validity.

**The minimum sample.** No decision before ``min_rows`` rows and ``min_positives`` positive labels (the looks
before it keep ``p = 1``): log-loss differences are heavy-tailed and carried mostly by the positives, and the
plug-in variance needs enough of them.

ROC AUC of each arm on the same rows is reported beside the decision (it does not take part in it: a rank metric
is blind to calibration, which a loss sees). :func:`expected_days_to_decision` states how long a rollout of a
model's traffic and positive rate needs for a given effect. Pure functions: numpy, scipy and scikit-learn are
imported inside them; nothing here knows Airflow, MLflow or serving.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from closedloop.core.errors import PermanentError
from closedloop.core.metrics import json_safe

if TYPE_CHECKING:
    import numpy as np

LOG_LOSS, BRIER = "log_loss", "brier"
LOSSES = (LOG_LOSS, BRIER)
CANARY_WORSE, CANARY_BETTER, CONTINUE = "canary_worse", "canary_better", "continue"
CLIP = 1e-7  # scores are clipped to [CLIP, 1 - CLIP] for log loss, as closedloop.core.metrics clips them
_VAR_FLOOR = 1e-18  # the plug-in variance of identical arms (all d = 0) is 0: floored so that the ratio is defined


class RolloutInputError(PermanentError, ValueError):
    """Labels or scores the test cannot use (lengths, labels not 0/1, scores outside [0, 1] or NaN): deterministic."""


@dataclass(frozen=True)
class RolloutTestPolicy:
    """The test's settings. ``tau2`` None: ``min_effect ** 2`` (module docstring, "The mixing variance")."""

    alpha: float = 0.05
    min_effect: float = 0.01
    tau2: float | None = None
    min_rows: int = 1000
    min_positives: int = 50
    loss: str = LOG_LOSS
    clip: float = CLIP

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 < self.alpha < 1.0:
            problems.append(f"alpha {self.alpha!r} must be strictly between 0 and 1")
        if not (math.isfinite(self.min_effect) and self.min_effect > 0):
            problems.append(f"min_effect {self.min_effect!r} must be a positive number")
        if self.tau2 is not None and not (math.isfinite(self.tau2) and self.tau2 > 0):
            problems.append(f"tau2 {self.tau2!r} must be a positive number (or None: min_effect ** 2)")
        if self.min_rows < 2 or self.min_positives < 0:
            problems.append(f"min_rows {self.min_rows!r} must be >= 2 and min_positives {self.min_positives!r} >= 0")
        if self.loss not in LOSSES:
            problems.append(f"loss {self.loss!r} must be one of {list(LOSSES)}")
        if not 0.0 < self.clip < 0.5:
            problems.append(f"clip {self.clip!r} must be strictly between 0 and 0.5")
        if problems:
            raise RolloutInputError("rollout test policy: " + "; ".join(problems))

    @property
    def mixing_variance(self) -> float:
        """``tau2``: given, or ``min_effect ** 2``."""
        return self.tau2 if self.tau2 is not None else self.min_effect ** 2


# -- inputs and per-row losses --------------------------------------------------------------------
def _labels(labels: Any) -> np.ndarray:
    import numpy as np

    try:
        y = np.asarray(labels, dtype=float).ravel()
    except (TypeError, ValueError) as exc:
        raise RolloutInputError(f"labels: not numbers ({exc}); give the binary label column as 0 and 1") from None
    bad = ~np.isin(y, (0.0, 1.0))  # NaN is not in (0, 1) either
    if bad.any():
        first = y[bad][0]
        raise RolloutInputError(f"labels: {int(bad.sum())} of {len(y)} are not 0 or 1 (the first: {first!r} at row "
                                f"{int(np.flatnonzero(bad)[0])}); give the binary label column")
    return y


def _scores(scores: Any, name: str) -> np.ndarray:
    import numpy as np

    try:
        p = np.asarray(scores, dtype=float).ravel()
    except (TypeError, ValueError) as exc:
        raise RolloutInputError(f"{name} scores: not numbers ({exc}); give probabilities in [0, 1]") from None
    nan = np.isnan(p)
    if nan.any():
        raise RolloutInputError(f"{name} scores: {int(nan.sum())} of {len(p)} are NaN (the first at row "
                                f"{int(np.flatnonzero(nan)[0])}); every labelled request needs both arms' scores")
    bad = (p < 0.0) | (p > 1.0)
    if bad.any():
        raise RolloutInputError(f"{name} scores: {int(bad.sum())} of {len(p)} are outside [0, 1] (the first: "
                                f"{p[bad][0]!r} at row {int(np.flatnonzero(bad)[0])}); give probabilities")
    return p


def _same_length(**arrays: Any) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise RolloutInputError("length mismatch: " + ", ".join(f"{k} has {v}" for k, v in lengths.items())
                                + " rows; give one value per labelled request in each")
    if not next(iter(lengths.values())):
        raise RolloutInputError("no rows: the test needs labelled requests scored by both arms")


def per_row_losses(labels: Any, scores: Any, loss: str = LOG_LOSS, clip: float = CLIP) -> np.ndarray:
    """Each row's loss of ``scores`` against 0/1 ``labels``: log loss ``-(y log p + (1 - y) log(1 - p))`` with ``p``
    clipped to ``[clip, 1 - clip]`` (a score of exactly 0 or 1 would cost infinity), or the Brier score ``(p - y)^2``
    (bounded, not clipped). RolloutInputError on bad input."""
    import numpy as np

    if loss not in LOSSES:
        raise RolloutInputError(f"loss {loss!r} must be one of {list(LOSSES)}")
    y, p = _labels(labels), _scores(scores, "the")
    _same_length(labels=y, scores=p)
    if loss == BRIER:
        return (p - y) ** 2
    p = np.clip(p, clip, 1.0 - clip)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def paired_differences(labels: Any, canary_scores: Any, champion_scores: Any, loss: str = LOG_LOSS,
                       clip: float = CLIP) -> np.ndarray:
    """``loss_canary_i - loss_champion_i`` per row (:func:`per_row_losses`): positive where the canary is worse."""
    y = _labels(labels)
    canary, champion = _scores(canary_scores, "canary"), _scores(champion_scores, "champion")
    _same_length(labels=y, canary_scores=canary, champion_scores=champion)
    return per_row_losses(y, canary, loss, clip) - per_row_losses(y, champion, loss, clip)


# -- the mixture SPRT ------------------------------------------------------------------------------
def log_mixture_ratio(total: float, n: float, variance: float, tau2: float) -> float:
    """``log Lambda_n`` of the normal mixture for ``n`` rows summing to ``total`` (``n dbar``) with plug-in
    ``variance``: ``0.5 log(s2 / (s2 + n tau2)) + total^2 tau2 / (2 s2 (s2 + n tau2))``."""
    s2 = max(variance, _VAR_FLOOR)
    return 0.5 * math.log(s2 / (s2 + n * tau2)) + total * total * tau2 / (2.0 * s2 * (s2 + n * tau2))


def confidence_halfwidth(n: float, variance: float, tau2: float, alpha: float) -> float:
    """The half-width of the always-valid ``1 - alpha`` interval for ``theta`` around ``dbar`` after ``n`` rows
    (``{theta : Lambda_n(theta) < 1/alpha}``): ``sqrt(s2 (s2 + n tau2) / (n^2 tau2) * (2 log(1/alpha) +
    log((s2 + n tau2) / s2)))``."""
    s2 = max(variance, _VAR_FLOOR)
    return math.sqrt(s2 * (s2 + n * tau2) / (n * n * tau2)
                     * (2.0 * math.log(1.0 / alpha) + math.log((s2 + n * tau2) / s2)))


@dataclass(frozen=True)
class RolloutTestResult:
    """The test's state after the last look. ``to_dict()`` gives plain JSON (an undefined figure: None, with the
    reason under ``undefined``).

    ``p_value`` is the always-valid p-value (the minimum over the looks of ``1 / Lambda``); ``decided_at_look``
    the first look (0-based) where it reached ``alpha``, whose direction is ``decision`` (kept at later looks);
    ``mean_difference`` and ``interval`` (always valid at ``1 - alpha``) are in the loss's units per row, canary
    minus champion, on all the rows of the last look (the interval at each look is valid at once with all the
    others, so a decision taken earlier may stand while a later interval reaches 0 again). ``p_values``,
    ``rows_at_look`` and ``positives_at_look`` give each look."""

    decision: str
    reason: str
    p_value: float
    alpha: float
    decided_at_look: int | None
    looks: int
    rows: int
    positives: int
    loss: str
    mean_difference: float | None
    sd_difference: float | None
    interval: tuple[float, float] | None
    canary_loss: float | None
    champion_loss: float | None
    roc_auc_canary: float | None
    roc_auc_champion: float | None
    tau2: float
    min_effect: float
    min_rows: int
    min_positives: int
    p_values: tuple[float, ...]
    rows_at_look: tuple[int, ...]
    positives_at_look: tuple[int, ...]
    undefined: dict[str, str] = field(default_factory=dict)

    @property
    def decided(self) -> bool:
        return self.decision != CONTINUE

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["interval"] = list(self.interval) if self.interval is not None else None
        for name in ("p_values", "rows_at_look", "positives_at_look"):
            out[name] = list(out[name])
        auc = (self.roc_auc_canary, self.roc_auc_champion)
        out["roc_auc_difference"] = auc[0] - auc[1] if None not in auc else None
        if out["roc_auc_difference"] is None:
            out["undefined"].setdefault("roc_auc_difference", "an arm's ROC AUC is undefined")
        return json_safe(out)


def _look_index(looks: Any, rows: int) -> np.ndarray:
    import numpy as np

    if looks is None:
        return np.zeros(rows, dtype=np.int64)
    raw = np.asarray(looks).ravel()
    if len(raw) != rows:
        raise RolloutInputError(f"length mismatch: looks has {len(raw)} rows, labels {rows}; give each row the "
                                "look (0, 1, ...: the day its label arrived) from which it counts")
    if raw.dtype.kind not in "iu" or (raw < 0).any():
        raise RolloutInputError("looks: give non-negative integers (the look from which each row counts)")
    return raw.astype(np.int64)


def _auc(y: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else None


def sequential_test(labels: Any, canary_scores: Any, champion_scores: Any, looks: Any = None,
                    policy: RolloutTestPolicy | None = None) -> RolloutTestResult:
    """The mSPRT over the looks so far, from every labelled request scored by both arms.

    ``looks[i]`` is the look (0, 1, ...; for a daily rollout the day since it started on which row ``i``'s label
    arrived) from which row ``i`` counts; look ``k`` sees the rows with ``looks <= k``, and every look up to the
    largest is taken (a look without new rows repeats the previous one's evidence). None: one look with all rows.
    Stateless: the rollout passes all its labelled rows each day and gets the same p-value path back, so a
    re-run gives the same decision. RolloutInputError on bad input.
    """
    import numpy as np

    policy = policy or RolloutTestPolicy()
    y = _labels(labels)
    canary, champion = _scores(canary_scores, "canary"), _scores(champion_scores, "champion")
    _same_length(labels=y, canary_scores=canary, champion_scores=champion)
    look = _look_index(looks, len(y))
    d = per_row_losses(y, canary, policy.loss, policy.clip) - per_row_losses(y, champion, policy.loss, policy.clip)
    n_looks = int(look.max()) + 1
    centre = float(d.mean())  # sums of centred values: no cancellation in the variance
    c = d - centre
    rows = np.cumsum(np.bincount(look, minlength=n_looks))
    pos = np.cumsum(np.bincount(look, weights=y, minlength=n_looks)).round().astype(np.int64)
    s1 = np.cumsum(np.bincount(look, weights=c, minlength=n_looks))
    s2 = np.cumsum(np.bincount(look, weights=c * c, minlength=n_looks))
    tau2, alpha = policy.mixing_variance, policy.alpha

    p, p_values, decided_at, decision = 1.0, [], None, CONTINUE
    for k in range(n_looks):
        n = int(rows[k])
        if n >= policy.min_rows and pos[k] >= policy.min_positives:
            variance = max(float(s2[k] - s1[k] ** 2 / n), 0.0) / (n - 1)
            total = float(s1[k]) + n * centre
            p = min(p, math.exp(-min(log_mixture_ratio(total, n, variance, tau2), 700.0)))
            if decided_at is None and p <= alpha:
                decided_at = k
                decision = CANARY_WORSE if total > 0 else CANARY_BETTER
        p_values.append(p)

    n, positives = int(rows[-1]), int(pos[-1])
    undefined: dict[str, str] = {}
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else None
    interval = None
    if sd is None:
        undefined["sd_difference"] = undefined["interval"] = "one row only"
    else:
        half = confidence_halfwidth(n, sd * sd, tau2, alpha)
        interval = (mean - half, mean + half)
    auc_canary, auc_champion = _auc(y, canary), _auc(y, champion)
    for name, value in (("roc_auc_canary", auc_canary), ("roc_auc_champion", auc_champion)):
        if value is None:
            undefined[name] = "one class only in the labels"
    if decided_at is not None:
        reason = (f"always-valid p = {p_values[decided_at]:.3g} <= alpha {alpha} at look {decided_at} "
                  f"({int(rows[decided_at])} rows): the canary's mean {policy.loss} is "
                  f"{'higher' if decision == CANARY_WORSE else 'lower'} than the champion's")
    elif n < policy.min_rows or positives < policy.min_positives:
        reason = (f"minimum sample not reached: {n} of {policy.min_rows} rows, {positives} of "
                  f"{policy.min_positives} positives")
    else:
        reason = f"always-valid p = {p:.3g} > alpha {alpha}: no difference shown yet"
    return RolloutTestResult(
        decision=decision, reason=reason, p_value=p, alpha=alpha, decided_at_look=decided_at, looks=n_looks,
        rows=n, positives=positives, loss=policy.loss, mean_difference=mean, sd_difference=sd, interval=interval,
        canary_loss=float(per_row_losses(y, canary, policy.loss, policy.clip).mean()),
        champion_loss=float(per_row_losses(y, champion, policy.loss, policy.clip).mean()),
        roc_auc_canary=auc_canary, roc_auc_champion=auc_champion, tau2=tau2, min_effect=policy.min_effect,
        min_rows=policy.min_rows, min_positives=policy.min_positives, p_values=tuple(p_values),
        rows_at_look=tuple(int(r) for r in rows), positives_at_look=tuple(int(q) for q in pos), undefined=undefined)


# -- the expected time to a decision ---------------------------------------------------------------
@dataclass(frozen=True)
class DaysToDecision:
    """How long a rollout needs to decide on an effect. ``days``: looks (whole days) until the decision, by the
    boundary approximation, or the median over simulated rollouts (None with ``reason`` when there is none);
    ``mean_days``: the simulations' mean over those that decided; ``decided_share``: the share of simulated rollouts
    decided within ``horizon_days`` (the approximation: None); ``rows_needed``: rows at the decision (approximation)
    and what bounds it (``limited_by``: ``evidence``, ``min_rows`` or ``min_positives``)."""

    method: str
    days: float | None
    mean_days: float | None
    decided_share: float | None
    rows_needed: int | None
    limited_by: str | None
    effect: float
    sd: float
    daily_rows: float
    positive_rate: float
    alpha: float
    tau2: float
    horizon_days: int | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def rows_for_evidence(effect: float, sd: float, alpha: float, tau2: float) -> float:
    """The rows ``n`` at which ``log Lambda_n`` reaches ``log(1/alpha)`` when the mean difference is exactly
    ``effect`` and its standard deviation ``sd`` (the boundary approximation: the sample mean at its expectation);
    ``inf`` for no effect."""
    from scipy.optimize import brentq

    if effect == 0:
        return math.inf
    s2, target = sd * sd, math.log(1.0 / alpha)

    def excess(n: float) -> float:
        return log_mixture_ratio(abs(effect) * n, n, s2, tau2) - target

    lo, hi = 1.0, 2.0
    while excess(hi) <= 0:  # the excess falls, then grows about linearly: one crossing
        lo, hi = hi, hi * 2.0
    return float(brentq(excess, lo, hi, xtol=0.5))


def expected_days_to_decision(effect: float, sd: float, daily_rows: float, positive_rate: float,
                              alpha: float = 0.05, tau2: float | None = None, *, min_rows: int = 1000,
                              min_positives: int = 50, method: str = "approximation", horizon_days: int = 365,
                              simulations: int = 2000, seed: int = 0) -> DaysToDecision:
    """The time a daily-looking rollout needs to decide when the canary's mean per-row loss differs from the
    champion's by ``effect`` (per-row differences with standard deviation ``sd``), with ``daily_rows`` labelled
    canary requests a day (the model's daily labelled traffic times the canary's share) and ``positive_rate``
    positives among them. ``tau2`` None: ``effect ** 2`` (the test tuned for this effect; with no effect, the
    default policy's ``min_effect ** 2``).

    ``method="approximation"``: the first look at which the rows reach :func:`rows_for_evidence`, ``min_rows`` and
    ``min_positives / positive_rate`` (the typical time: the sample mean near its expectation; about the median).
    ``method="simulation"``: ``simulations`` rollouts of normal differences (per-day sums and sums of squares drawn
    exactly, so cheap at any traffic) looked at daily up to ``horizon_days``, each decided as
    :func:`sequential_test` decides (the minimum of positives taken at its expected row count): the median and mean
    days and the share decided in the horizon. Real losses are heavier-tailed and their gap moves with the season;
    ``docs/explanation/rollout-test.md`` sets both methods beside measured rollouts."""
    import numpy as np

    if not (math.isfinite(effect) and math.isfinite(sd) and sd > 0 and daily_rows > 0 and 0 < positive_rate <= 1):
        raise RolloutInputError(f"expected_days_to_decision: effect {effect!r} must be finite, sd {sd!r} and "
                                f"daily_rows {daily_rows!r} positive, positive_rate {positive_rate!r} in (0, 1]")
    if method not in ("approximation", "simulation"):
        raise RolloutInputError(f"method {method!r} must be 'approximation' or 'simulation'")
    tau2 = tau2 if tau2 is not None else (effect * effect if effect else RolloutTestPolicy().mixing_variance)
    RolloutTestPolicy(alpha=alpha, tau2=tau2, min_rows=min_rows, min_positives=min_positives)  # checks them
    common = {"effect": effect, "sd": sd, "daily_rows": daily_rows, "positive_rate": positive_rate, "alpha": alpha,
              "tau2": tau2}
    floor_rows = max(float(min_rows), min_positives / positive_rate)
    if method == "approximation":
        if effect == 0:
            return DaysToDecision("approximation", None, None, None, None, None, horizon_days=None, **common,
                                  reason=f"no effect: the test decides only by a false positive (at most alpha "
                                         f"{alpha} over all looks)")
        needed = {"evidence": rows_for_evidence(effect, sd, alpha, tau2), "min_rows": float(min_rows),
                  "min_positives": min_positives / positive_rate}
        bound = max(needed, key=needed.__getitem__)
        days = math.ceil(needed[bound] / daily_rows)
        return DaysToDecision("approximation", float(days), None, None, math.ceil(needed[bound]), bound,
                              horizon_days=None, **common,
                              reason=f"the first daily look with {needed[bound]:.0f} rows ({bound})")

    rng = np.random.default_rng(seed)
    per_day = max(round(daily_rows), 1)
    sums = rng.normal(effect * per_day, sd * math.sqrt(per_day), size=(simulations, horizon_days))
    within = sd * sd * rng.chisquare(max(per_day - 1, 1), size=(simulations, horizon_days))
    n = per_day * np.arange(1, horizon_days + 1, dtype=float)
    total = np.cumsum(sums, axis=1)
    day_means = sums / per_day
    # pooled sum of squares about the running mean: within-day + between-day parts
    ss = np.cumsum(within + per_day * day_means ** 2, axis=1) - total ** 2 / n
    variance = np.maximum(ss / (n - 1), _VAR_FLOOR)
    spread = variance + n * tau2
    log_ratio = 0.5 * np.log(variance / spread) + total ** 2 * tau2 / (2 * variance * spread)
    crossed = (log_ratio >= math.log(1.0 / alpha)) & (n >= floor_rows)
    decided = crossed.any(axis=1)
    first = np.argmax(crossed, axis=1) + 1.0
    share = float(decided.mean())
    if not decided.any():
        return DaysToDecision("simulation", None, None, share, None, None, horizon_days=horizon_days, **common,
                              reason=f"no simulated rollout decided within {horizon_days} days")
    median = float(np.median(np.where(decided, first, np.inf)))
    return DaysToDecision(
        "simulation", median if math.isfinite(median) else None, float(first[decided].mean()), share, None, None,
        horizon_days=horizon_days, **common,
        reason=(f"{simulations} simulated rollouts, looked at daily: {share:.1%} decided within {horizon_days} days"
                + ("" if math.isfinite(median) else "; fewer than half decided, so no median")))
