"""A seeded, labelled card-fraud data set, written as daily Parquet partitions in the landing zone.

Customers have persistent traits (spend level, channel and merchant mix, card age, credit limit, share
of foreign use, time-of-day habits); each day they make a Poisson number of transactions. A small share
of cards get compromised at a random moment and then see a burst of fraudulent transactions over a few
hours (larger amounts, card-not-present, foreign, far from home, at night, risky merchants), plus some
isolated fraud; a share of fraud looks like the customer's usual spending. The label is therefore
learnable from the transaction fields and the customer's recent behaviour, but noisy.

Column names come from the data contract. The card-fraud columns the simulator knows (``amount``,
``merchant_category``, ``channel``, ...) get realistic values; any other declared column gets plausible
values drawn by dtype, with a weak relation to the label.

Drift knobs (events at or after ``drift_start``): ``covariate_drift`` scales amounts and distances by
``1 + x`` and moves hours and channels; ``new_categories`` brings a merchant category the contract does
not know; ``concept_drift`` changes what fraud looks like (domestic, chip, daytime, usual amounts);
``label_noise`` flips a share of all labels.

Structure (``structure``, 1 by default, 0 for independent days): the world the days share, as real daily
data has it. A day-level exogenous factor (think weather, paydays, local events: an AR(1) series with unit
variance and day-to-day persistence) moves the day's volume, the amounts and distances of legitimate
transactions and the share bought online; the day of the week moves amounts, the merchant mix (leisure at
weekends) and the hours (later at weekends); the hour of the day moves amounts and the share bought online
(at night); the everyday purchases' categories follow the day of the week (each day its errand: groceries,
pharmacy, fuel, restaurants at weekends) and the day factor (out on high days, home errands on low ones) while
their amounts and merchant risk stay, an input that swings while the model barely uses it, as real data have
many. ``structure`` scales all these effects; fraud keeps its own pattern. Two days are therefore no
longer independent draws of one distribution: a two-day window differs from a four-week reference by more
than sampling noise, as it does on real data.

Every random component draws from its own stream of one :class:`numpy.random.SeedSequence`, so a knob
changes only what it is about: the same seed with and without ``label_noise`` gives the same
transactions, and the transactions before ``drift_start`` do not depend on the drift knobs.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from closedloop.core.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import pandas as pd

    from closedloop.core.lake import Lake
    from closedloop.core.schema import Column, DataContract

log = logging.getLogger(__name__)

# -- the card-fraud vocabulary the simulator knows ---------------------------------------------------
CHANNELS = ("chip", "contactless", "online", "atm", "phone")
CATEGORIES = ("grocery", "fuel", "restaurant", "retail", "electronics", "travel", "entertainment",
              "online_services", "health", "cash")
NEW_CATEGORY = "crypto_exchange"
KNOWN_COLUMNS = ("amount", "merchant_category", "channel", "hour_of_day", "distance_from_home_km",
                 "merchant_risk_score", "is_foreign", "card_age_days", "credit_limit")

_CHIP, _CONTACTLESS, _ONLINE, _ATM, _PHONE = range(5)
_CASH = CATEGORIES.index("cash")
_NEW = len(CATEGORIES)  # code of NEW_CATEGORY

_CHANNEL_MIX = (0.34, 0.36, 0.20, 0.05, 0.05)
# usual merchant mix over the non-cash categories (cash goes with the atm channel)
_CATEGORY_MIX = (0.26, 0.10, 0.16, 0.15, 0.04, 0.03, 0.07, 0.10, 0.09)
_CATEGORY_AMOUNT = (1.0, 1.3, 0.8, 1.4, 3.5, 5.0, 1.0, 0.5, 1.1, 2.2, 1.5)
_CATEGORY_RISK = (0.08, 0.12, 0.10, 0.12, 0.22, 0.18, 0.14, 0.25, 0.06, 0.18, 0.45)
# share of transactions per hour of the day (few at night)
_HOURS = (0.6, 0.4, 0.3, 0.25, 0.25, 0.4, 0.9, 1.8, 3.0, 4.0, 4.5, 5.0,
          5.8, 5.5, 5.0, 4.8, 5.0, 5.6, 6.0, 5.5, 4.6, 3.6, 2.4, 1.3)
_FRAUD_HOURS = (3.0, 3.5, 3.5, 3.0, 2.5, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0,
                1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.4, 1.6, 2.0, 2.5, 3.0)
_FRAUD_CHANNEL = (0.10, 0.15, 0.50, 0.15, 0.10)
_FRAUD_CATEGORY = (0.02, 0.02, 0.03, 0.20, 0.28, 0.12, 0.08, 0.25, 0.00)
_DRIFTED_CATEGORY = (0.30, 0.30, 0.15, 0.20, 0.0, 0.0, 0.0, 0.0, 0.05)
_WEEKDAY = (0.95, 0.95, 0.97, 1.0, 1.15, 1.13, 0.85)  # Monday first; averages to 1

_BURST_SHARE = 0.75        # share of fraud that comes in bursts after a compromise
_BURST_EXTRA = 2.5         # burst size is 2 + Poisson(_BURST_EXTRA)
_STEALTH_SHARE = 0.25      # share of fraud that looks like the customer's usual spending
_NULL_SHARE = 0.01         # missing distance_from_home_km / merchant_risk_score
_NEW_CATEGORY_SHARE = 0.03  # share of post-drift rows in NEW_CATEGORY (x3 for fraud) with new_categories

_US_HOUR = 3_600_000_000
_US_DAY = 24 * _US_HOUR
_EPOCH = date(1970, 1, 1)

BAD_KINDS = ("missing_column", "wrong_type", "null_key", "duplicate_key", "label_out_of_domain",
             "timestamp_outside_partition", "empty")

# -- structure: the day-level factor, the weekly and the daily cycles (scaled by ``structure``) ------------------
_DAY_PERSISTENCE = 0.8      # AR(1) coefficient of the day factor (unit variance)
_DAY_VOLUME = 0.20          # log-volume per unit of the day factor
_DAY_AMOUNT = 0.22          # log-amount of legitimate transactions per unit of the day factor
_DAY_DISTANCE = 0.25        # log-distance from home per unit of the day factor
_DAY_ONLINE = 0.10          # share of in-person purchases moved online per unit below 0 (online ones back above)
_WEEKDAY_AMOUNT = (-0.06, -0.08, -0.05, 0.0, 0.08, 0.20, 0.10)   # log-amount by weekday, Monday first
_WEEKEND_LEISURE = (0.0, 0.0, 0.0, 0.02, 0.10, 0.28, 0.22)        # share of purchases redrawn from the leisure mix
_LEISURE_MIX = (0.0, 0.0, 0.40, 0.25, 0.0, 0.10, 0.25, 0.0, 0.0)  # over the non-cash categories
_WEEKEND_LATE = (0.0, 0.0, 0.0, 0.0, 0.15, 0.35, 0.25)            # share of transactions two hours later
_HOUR_AMOUNT = (-0.25, -0.3, -0.3, -0.3, -0.3, -0.25, -0.15, -0.1, -0.05, 0.0, 0.0, 0.05,
                0.1, 0.05, 0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.15, 0.1, 0.0, -0.1)  # log-amount by hour
_HOUR_ONLINE = (0.25, 0.3, 0.3, 0.3, 0.3, 0.2, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0,
                0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.1, 0.15, 0.2)      # share moved online by hour
# the everyday purchases (in person at groceries, fuel, restaurants, pharmacies: categories fraud rarely uses) change
# category with the day: each day of the week a share goes to its errand, and per unit of the day factor a share
# goes out (fuel, restaurants) on high days, to home errands (groceries, pharmacy) on low ones. Only the category
# moves (the purchase's amount and merchant risk stay): an input that swings while the model barely uses it
_EVERYDAY = (0, 1, 2, 8)                                          # grocery, fuel, restaurant, health
_WEEKLY_ERRANDS = 0.25                                           # share of everyday purchases made as the day's errand
_WEEKDAY_ERRAND = (0, 0, 8, 1, 2, 2, 2)  # Monday first: groceries, groceries, pharmacy, fuel, restaurants (Fri-Sun)
_DAY_ERRANDS = 0.12                                              # share per unit of the day factor
_ERRANDS_OUT = (0.0, 0.45, 0.55, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)   # over the non-cash categories: fuel, restaurant
_ERRANDS_HOME = (0.65, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.35)  # grocery, health

# new streams go at the end: a SeedSequence child depends only on its index, so the others stay as they were
_STREAMS = ("customers", "days", "fraud", "drift", "nulls", "noise", "labels", "structure", "errands")


@dataclass(frozen=True)
class GeneratorConfig:
    """What to simulate: the period, the population, the seed and the drift knobs."""

    start: date                       # first day (UTC)
    days: int = 30
    customers: int = 2000
    transactions_per_day: int = 3000  # average
    seed: int = 42
    fraud_rate: float = 0.01          # target share of positives
    covariate_drift: float = 0.0      # 0 = none; >0 shifts/rescales features from drift_start on
    new_categories: bool = False      # from drift_start on, an unknown merchant category appears
    concept_drift: float = 0.0        # 0 = none; 1 = what fraud looks like changed completely
    drift_start: date | None = None   # default: no drift
    label_noise: float = 0.0          # share of labels flipped at random (degraded labels)
    structure: float = 1.0            # strength of the day factor and the weekly/daily cycles (0: none)

    def __post_init__(self) -> None:
        if isinstance(self.start, datetime) or not isinstance(self.start, date):
            raise ConfigError(f"generator start={self.start!r}: give a date")
        if self.days < 1 or self.customers < 1 or self.transactions_per_day <= 0:
            raise ConfigError("generator: days, customers and transactions_per_day must be positive")
        if not 0.0 <= self.fraud_rate < 0.5:
            raise ConfigError(f"generator fraud_rate={self.fraud_rate}: must be in [0, 0.5)")
        if self.covariate_drift < 0.0:
            raise ConfigError(f"generator covariate_drift={self.covariate_drift}: must be >= 0")
        if not 0.0 <= self.concept_drift <= 1.0:
            raise ConfigError(f"generator concept_drift={self.concept_drift}: must be in [0, 1]")
        if not 0.0 <= self.label_noise <= 0.5:
            raise ConfigError(f"generator label_noise={self.label_noise}: must be in [0, 0.5]")
        if not 0.0 <= self.structure <= 3.0:
            raise ConfigError(f"generator structure={self.structure}: must be in [0, 3] (1 = realistic, 0 = none)")
        if self.drift_start is not None and (
            isinstance(self.drift_start, datetime) or not isinstance(self.drift_start, date)
        ):
            raise ConfigError(f"generator drift_start={self.drift_start!r}: give a date or None")

    @property
    def end(self) -> date:
        """The first day after the period."""
        return self.start + timedelta(days=self.days)


@dataclass(frozen=True)
class GeneratedData:
    """The simulated data: every transaction (label columns included) and the labels."""

    transactions: pd.DataFrame
    labels: pd.DataFrame


@dataclass(frozen=True)
class _Customers:
    """Persistent traits of the customers (arrays indexed by customer)."""

    spend: Any          # typical ticket size
    activity: Any       # transactions per day
    channel_cum: Any    # cumulative channel mix, (n, 5)
    category_cum: Any   # cumulative merchant mix over the non-cash categories, (n, 9)
    foreign: Any        # share of foreign use
    owl: Any            # shift of the customer's hours
    card_age: Any       # card age on the first day
    credit_limit: Any


# -- helpers -----------------------------------------------------------------------------------------
def _day_number(d: date) -> int:
    return (d - _EPOCH).days


def _pick(rng: np.random.Generator, cum: np.ndarray) -> np.ndarray:
    """One index per row of ``cum`` (cumulative probabilities per row)."""
    u = rng.random(cum.shape[0])
    return (u[:, None] >= cum[:, :-1]).sum(axis=1)


def _beta_mean(rng: np.random.Generator, mean: np.ndarray, k: float) -> np.ndarray:
    """Beta draws with the given means and concentration ``k``."""
    return rng.beta(mean * k, (1.0 - mean) * k)


def _probs(weights: tuple[float, ...]) -> np.ndarray:
    import numpy as np

    w = np.asarray(weights, dtype=float)
    return w / w.sum()


def _customers(rng: np.random.Generator, n: int, transactions_per_day: float) -> _Customers:
    import numpy as np

    spend = np.exp(rng.normal(np.log(35.0), 0.6, n))
    activity = rng.gamma(1.5, 1.0, n)
    activity *= transactions_per_day / activity.sum()
    channel = rng.dirichlet(8.0 * _probs(_CHANNEL_MIX), n)
    category = rng.dirichlet(6.0 * _probs(_CATEGORY_MIX), n)
    foreign = rng.beta(0.6, 25.0, n)
    owl = rng.choice(np.array([-1, 0, 0, 0, 0, 1, 2, 3]), n)
    card_age = rng.integers(30, 3650, n)
    limit = spend * 60.0 * np.exp(rng.normal(0.0, 0.35, n))
    limit = np.clip(np.round(limit, -2), 500.0, 50_000.0)
    return _Customers(spend=spend, activity=activity, channel_cum=np.cumsum(channel, axis=1),
                      category_cum=np.cumsum(category, axis=1), foreign=foreign, owl=owl,
                      card_age=card_age, credit_limit=limit)


def _usual(rng: np.random.Generator, cust: np.ndarray, c: _Customers) -> dict[str, np.ndarray]:
    """Transaction fields drawn from the customers' usual behaviour."""
    import numpy as np

    m = len(cust)
    amount_mult = np.asarray(_CATEGORY_AMOUNT)
    channel = _pick(rng, c.channel_cum[cust])
    category = _pick(rng, c.category_cum[cust])
    category = np.where(channel == _ATM, _CASH, category)
    amount = c.spend[cust] * amount_mult[category] * np.exp(rng.normal(0.0, 0.7, m))
    amount = np.where(channel == _ATM, np.maximum(20.0, np.round(amount / 20.0) * 20.0), amount)
    foreign_p = c.foreign[cust] * np.where(channel == _ONLINE, 2.0, 1.0)
    is_foreign = rng.random(m) < foreign_p
    distance = np.where(is_foreign, rng.lognormal(np.log(900.0), 0.8, m), rng.lognormal(np.log(4.0), 1.1, m))
    risk = _beta_mean(rng, np.asarray(_CATEGORY_RISK)[category], 14.0)
    return {"channel": channel, "category": category, "amount": amount, "is_foreign": is_foreign,
            "distance": distance, "risk": risk}


def _fraudulent(rng: np.random.Generator, cust: np.ndarray, c: _Customers) -> dict[str, np.ndarray]:
    """Transaction fields of classic card fraud: card-not-present, foreign, far away, large, risky."""
    import numpy as np

    m = len(cust)
    channel = rng.choice(len(CHANNELS), size=m, p=_probs(_FRAUD_CHANNEL))
    category = rng.choice(len(_FRAUD_CATEGORY), size=m, p=_probs(_FRAUD_CATEGORY))
    category = np.where(channel == _ATM, _CASH, category)
    level = np.maximum(c.spend[cust] * 2.5, 80.0)
    amount = level * np.sqrt(np.asarray(_CATEGORY_AMOUNT)[category]) * np.exp(rng.normal(0.0, 0.8, m))
    amount = np.where(channel == _ATM, np.maximum(20.0, np.round(amount / 20.0) * 20.0), amount)
    is_foreign = rng.random(m) < 0.45
    far = rng.random(m) < 0.6
    domestic = np.where(far, rng.lognormal(np.log(120.0), 1.0, m), rng.lognormal(np.log(4.0), 1.1, m))
    distance = np.where(is_foreign, rng.lognormal(np.log(2000.0), 0.9, m), domestic)
    risk = _beta_mean(rng, np.minimum(0.85, np.asarray(_CATEGORY_RISK)[category] + 0.25), 10.0)
    return {"channel": channel, "category": category, "amount": amount, "is_foreign": is_foreign,
            "distance": distance, "risk": risk}


def _drifted(rng: np.random.Generator, cust: np.ndarray, c: _Customers) -> dict[str, np.ndarray]:
    """Transaction fields of fraud after a concept drift: a cloned card used at home, by day."""
    import numpy as np

    m = len(cust)
    channel = np.where(rng.random(m) < 0.5, _CHIP, _CONTACTLESS)
    category = rng.choice(len(_DRIFTED_CATEGORY), size=m, p=_probs(_DRIFTED_CATEGORY))
    amount = c.spend[cust] * np.asarray(_CATEGORY_AMOUNT)[category] * np.exp(rng.normal(0.3, 0.5, m))
    is_foreign = np.zeros(m, dtype=bool)
    distance = rng.lognormal(np.log(35.0), 0.5, m)
    risk = _beta_mean(rng, np.asarray(_CATEGORY_RISK)[category], 14.0)
    return {"channel": channel, "category": category, "amount": amount, "is_foreign": is_foreign,
            "distance": distance, "risk": risk}


def _legit_day(rng: np.random.Generator, c: _Customers, weekday: int, volume: float = 1.0) -> dict[str, np.ndarray]:
    """The legitimate transactions of one day (offsets in microseconds from midnight); ``volume``
    multiplies the day's expected count (the day factor)."""
    import numpy as np

    counts = rng.poisson(c.activity * _WEEKDAY[weekday] * volume)
    cust = np.repeat(np.arange(len(counts)), counts)
    hour = (rng.choice(24, size=len(cust), p=_probs(_HOURS)) + c.owl[cust]) % 24
    frac = rng.random(len(cust))
    fields = _usual(rng, cust, c)
    fields.update(cust=cust, hour=hour, frac=frac)
    return fields


def day_factor(rng: np.random.Generator, days: int) -> np.ndarray:
    """The day-level exogenous factor: a stationary AR(1) series of ``days`` values with unit variance and
    persistence :data:`_DAY_PERSISTENCE` (the first ``k`` values do not depend on ``days``)."""
    import numpy as np

    shocks = rng.standard_normal(days)
    z = np.empty(days)
    z[0] = shocks[0]
    keep = np.sqrt(1.0 - _DAY_PERSISTENCE**2)
    for i in range(1, days):
        z[i] = _DAY_PERSISTENCE * z[i - 1] + keep * shocks[i]
    return z


def _structure(rng: np.random.Generator, strength: float, z: np.ndarray, rows: dict[str, np.ndarray],
               legit: np.ndarray, day: np.ndarray) -> None:
    """Apply the day factor ``z`` (per day) and the weekly and daily cycles to the legitimate rows of
    ``rows`` (in place): amounts, distances, the online share, the weekend's leisure mix. Every uniform
    is drawn whatever ``strength``, so the stream stays aligned."""
    import numpy as np

    n = len(legit)
    zd = z[day]
    weekday = rows["weekday"]
    hour = rows["hour"]
    # draws for the legitimate rows only (how many there are does not depend on the fraud or drift knobs),
    # each from its own child stream, so that fraud rows and drift knobs never shift them
    legit_idx = np.flatnonzero(legit)
    streams = rng.spawn(3)
    u_leisure, u_channel, leisure = np.ones(n), np.ones(n), np.zeros(n, dtype=np.int64)
    u_leisure[legit_idx], u_channel[legit_idx] = streams[0].random((2, len(legit_idx)))
    leisure[legit_idx] = streams[1].choice(len(_LEISURE_MIX), size=len(legit_idx), p=_probs(_LEISURE_MIX))
    leisure_risk = np.zeros(n)
    leisure_risk[legit_idx] = _beta_mean(streams[2], np.asarray(_CATEGORY_RISK)[leisure[legit_idx]], 14.0)
    in_person = legit & (rows["channel"] != _ATM) & (rows["channel"] != _ONLINE)
    # the weekend's leisure: a share of in-person purchases go to restaurants, shops, entertainment, travel
    redraw = in_person & (u_leisure < strength * np.asarray(_WEEKEND_LEISURE)[weekday])
    mult = np.asarray(_CATEGORY_AMOUNT)
    ratio = np.where(redraw, mult[leisure] / mult[rows["category"]], 1.0)
    rows["category"] = np.where(redraw, leisure, rows["category"])
    rows["risk"] = np.where(redraw, leisure_risk, rows["risk"])
    # amounts: the day factor, the day of the week, the hour of the day
    log_amount = _DAY_AMOUNT * zd + np.asarray(_WEEKDAY_AMOUNT)[weekday] + np.asarray(_HOUR_AMOUNT)[hour]
    amount = rows["amount"] * ratio * np.exp(strength * log_amount)
    amount = np.where(rows["channel"] == _ATM, np.maximum(20.0, np.round(amount / 20.0) * 20.0), amount)
    rows["amount"] = np.where(legit, amount, rows["amount"])
    rows["distance"] = np.where(legit, rows["distance"] * np.exp(strength * _DAY_DISTANCE * zd), rows["distance"])
    # online: more on low days of the factor and at night; fewer on high days
    to_online = in_person & (u_channel < strength * (_DAY_ONLINE * np.maximum(-zd, 0.0)
                                                     + np.asarray(_HOUR_ONLINE)[hour]))
    off_line = legit & (rows["channel"] == _ONLINE) & (u_channel < strength * _DAY_ONLINE * np.maximum(zd, 0.0))
    rows["channel"] = np.where(to_online, _ONLINE, np.where(off_line, _CONTACTLESS, rows["channel"]))


def _errands(rng: np.random.Generator, strength: float, z: np.ndarray, rows: dict[str, np.ndarray],
             legit: np.ndarray, day: np.ndarray) -> None:
    """The day of the week and the day factor ``z`` move the category of a share of the legitimate in-person
    everyday purchases (in place): the weekday's errand (:data:`_WEEKDAY_ERRAND`), out (fuel, restaurants) on
    high days, home errands (groceries, pharmacy) on low ones. Only the category moves: an input that swings
    with the day while the model barely uses it. Every draw is made whatever ``strength``, for the legitimate
    rows only (their number does not depend on the fraud or drift knobs)."""
    import numpy as np

    n = len(legit)
    zd = z[day]
    legit_idx = np.flatnonzero(legit)
    u, out, home = np.ones(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    u[legit_idx] = rng.random(len(legit_idx))
    out[legit_idx] = rng.choice(len(_ERRANDS_OUT), size=len(legit_idx), p=_probs(_ERRANDS_OUT))
    home[legit_idx] = rng.choice(len(_ERRANDS_HOME), size=len(legit_idx), p=_probs(_ERRANDS_HOME))
    everyday = (legit & (rows["channel"] != _ATM) & (rows["channel"] != _ONLINE)
                & np.isin(rows["category"], _EVERYDAY))
    by_day = strength * _DAY_ERRANDS * np.abs(zd)
    weekly = strength * _WEEKLY_ERRANDS
    category = np.where(u < by_day, np.where(zd > 0, out, home),
                        np.where(u < by_day + weekly, np.asarray(_WEEKDAY_ERRAND)[rows["weekday"]], rows["category"]))
    rows["category"] = np.where(everyday, category, rows["category"])


def _fraud_events(rng: np.random.Generator, config: GeneratorConfig, c: _Customers, n_legit: int,
                  start_us: int, drift_day: int | None) -> dict[str, np.ndarray]:
    """Fraud: bursts after compromises plus isolated cases; times in microseconds since the epoch."""
    import numpy as np

    n_customers, days = len(c.spend), config.days
    target = config.fraud_rate / (1.0 - config.fraud_rate) * n_legit
    n_bursts = round(target * _BURST_SHARE / (2.0 + _BURST_EXTRA))
    n_single = round(target * (1.0 - _BURST_SHARE))
    n_events = n_bursts + n_single
    # every event (burst or single) starts on a day, at a night-heavy hour or, once drifted, by day
    cust_e = rng.integers(0, n_customers, n_events)
    day_e = rng.integers(0, days, n_events)
    night_hour = rng.choice(24, size=n_events, p=_probs(_FRAUD_HOURS))
    day_hour = rng.integers(9, 17, n_events)
    frac = rng.random(n_events)
    drift_u = rng.random(n_events)
    drifted_e = np.zeros(n_events, dtype=bool)
    if drift_day is not None:
        drifted_e = (day_e >= drift_day) & (drift_u < config.concept_drift)
    hour = np.where(drifted_e, day_hour, night_hour)
    t0 = start_us + day_e.astype(np.int64) * _US_DAY + ((hour + frac) * _US_HOUR).astype(np.int64)

    sizes = np.concatenate([2 + rng.poisson(_BURST_EXTRA, n_bursts), np.ones(n_single, dtype=np.int64)])
    event = np.repeat(np.arange(n_events), sizes)
    first = np.cumsum(sizes) - sizes
    gap_min = rng.exponential(1.0, len(event)) * np.where(drifted_e[event], 90.0, 25.0)
    gap_min[first] = 0.0
    elapsed = np.cumsum(gap_min)
    elapsed -= elapsed[first][event]
    ts = t0[event] + (elapsed * 60e6).astype(np.int64)
    cust = cust_e[event]
    drifted = drifted_e[event]

    fields = _fraudulent(rng, cust, c)
    usual = _usual(rng, cust, c)
    alt = _drifted(rng, cust, c)
    stealth = rng.random(len(cust)) < _STEALTH_SHARE
    for key in fields:
        fields[key] = np.where(drifted, alt[key], np.where(stealth, usual[key], fields[key]))
    fields.update(cust=cust, ts=ts)
    end_us = start_us + days * _US_DAY
    keep = ts < end_us
    return {k: v[keep] for k, v in fields.items()}


def _as_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    import numpy as np

    if dtype == "float64":
        return values.astype(np.float64)
    if dtype == "int64":
        return np.round(values).astype(np.int64)
    if dtype == "bool":
        return values.astype(bool)
    return values.astype(str).astype(object)


def _known_column(col: Column) -> bool:
    """Whether the simulator's own values of ``col`` fit its declaration."""
    if col.name not in KNOWN_COLUMNS:
        return False
    if col.name == "merchant_category":
        return col.dtype == "category" and set(CATEGORIES) <= set(col.categories)
    if col.name == "channel":
        return col.dtype == "category" and set(CHANNELS) <= set(col.categories)
    return col.dtype in {"float64", "int64"}


def _bounds(col: Column) -> tuple[float | None, float | None]:
    lo = col.block.get("min", col.warn.get("min"))
    hi = col.block.get("max", col.warn.get("max"))
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def _generic(col: Column, y: np.ndarray, seed: int) -> np.ndarray:
    """Plausible values of a column the simulator does not know, weakly related to the label ``y``."""
    import numpy as np

    rng = np.random.default_rng([seed, zlib.crc32(col.name.encode())])
    m = len(y)
    lo, hi = _bounds(col)
    effect = rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 0.4)
    if col.dtype == "float64":
        if rng.random() < 0.5:
            values = np.exp(rng.normal(rng.uniform(0.0, 3.0) + effect * y, rng.uniform(0.5, 1.2), m))
        else:
            values = rng.normal(effect * y, 1.0, m) * rng.uniform(0.5, 10.0) + rng.uniform(-5.0, 5.0)
        values = np.clip(values, lo, hi) if (lo is not None or hi is not None) else values
        if col.nullable:
            values = np.where(rng.random(m) < _NULL_SHARE, np.nan, values)
        return values
    if col.dtype == "int64":
        lo_i = int(lo) if lo is not None else 0
        hi_i = int(hi) if hi is not None else lo_i + 100
        values = rng.integers(lo_i, hi_i + 1, m)
        upper = rng.integers((lo_i + hi_i) // 2, hi_i + 1, m)
        return np.where((y == 1) & (rng.random(m) < abs(effect)), upper, values).astype(np.int64)
    if col.dtype == "bool":
        return rng.random(m) < (0.3 + 0.3 * effect * y)
    if col.dtype == "category":
        cats = np.array(col.categories, dtype=object)
        p = rng.dirichlet(np.full(len(cats), 2.0))
        p_pos = rng.dirichlet(np.full(len(cats), 2.0)) * 0.5 + p * 0.5
        values = np.where(y == 1, rng.choice(cats, size=m, p=p_pos), rng.choice(cats, size=m, p=p))
    else:  # string: identifiers
        prefix = col.name[:3]
        values = np.strings.add(prefix, rng.integers(0, 100_000, m).astype(str)).astype(object)
    if col.nullable:
        values = np.where(rng.random(m) < _NULL_SHARE, None, values)
    return values.astype(object)


# -- the simulator -----------------------------------------------------------------------------------
def simulate(config: GeneratorConfig, contract: DataContract) -> GeneratedData:
    """Simulate the transactions and labels of ``config`` with the columns of ``contract``."""
    import numpy as np
    import pandas as pd

    streams = dict(zip(_STREAMS, np.random.SeedSequence(config.seed).spawn(len(_STREAMS)), strict=True))
    customers = _customers(np.random.default_rng(streams["customers"]), config.customers,
                           config.transactions_per_day)
    start_us = _day_number(config.start) * _US_DAY
    drift_day: int | None = None
    if config.drift_start is not None:
        drift_day = (config.drift_start - config.start).days
    elif config.covariate_drift or config.new_categories or config.concept_drift:
        log.warning("drift knobs are set but drift_start is None: no drift is simulated")

    # the day factor (its own stream) and the weekly cycle of the hours
    factor_seq, late_seq, rows_seq = streams["structure"].spawn(3)
    z = day_factor(np.random.default_rng(factor_seq), config.days)
    strength = config.structure
    first_weekday = config.start.weekday()

    # legitimate transactions, day by day (each day has its own random stream)
    parts = []
    for i, seq in enumerate(streams["days"].spawn(config.days)):
        weekday = (first_weekday + i) % 7
        volume = float(np.exp(strength * _DAY_VOLUME * z[i] - 0.5 * (strength * _DAY_VOLUME) ** 2))
        fields = _legit_day(np.random.default_rng(seq), customers, weekday, volume if strength else 1.0)
        fields["day"] = np.full(len(fields["cust"]), i, dtype=np.int64)
        parts.append(fields)
    legit = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    n_legit = len(legit["cust"])

    # weekends: a share of the transactions two hours later (into the night)
    legit_weekday = (first_weekday + legit["day"]) % 7
    late = np.random.default_rng(late_seq).random(n_legit) < strength * np.asarray(_WEEKEND_LATE)[legit_weekday]
    legit["hour"] = np.where(late, (legit["hour"] + 2) % 24, legit["hour"])

    drift_rng = np.random.default_rng(streams["drift"])
    post_legit = legit["day"] >= drift_day if drift_day is not None else np.zeros(n_legit, dtype=bool)
    # covariate drift: later hours for a share of the legitimate transactions
    shift_u = drift_rng.random(n_legit)
    shifted = post_legit & (shift_u < min(1.0, config.covariate_drift))
    legit["hour"] = np.where(shifted, (legit["hour"] + 3) % 24, legit["hour"])
    offset = ((legit["hour"] + legit["frac"]) * _US_HOUR).astype(np.int64)
    legit["ts"] = start_us + legit["day"] * _US_DAY + np.clip(offset, 1_000_000, _US_DAY - 1)

    fraud = _fraud_events(np.random.default_rng(streams["fraud"]), config, customers, n_legit, start_us,
                          drift_day)
    keys = ("cust", "ts", "channel", "category", "amount", "is_foreign", "distance", "risk")
    rows = {k: np.concatenate([legit[k], fraud[k]]) for k in keys}
    y = np.concatenate([np.zeros(n_legit, dtype=np.int64), np.ones(len(fraud["cust"]), dtype=np.int64)])
    ts = rows["ts"]
    ts = np.where(ts % _US_DAY == 0, ts + 1, ts)  # strictly inside the day
    n = len(ts)
    row_day = (ts - start_us) // _US_DAY
    rows["weekday"] = (first_weekday + row_day) % 7
    rows["hour"] = (ts // _US_HOUR) % 24
    _structure(np.random.default_rng(rows_seq), strength, z, rows, y == 0, row_day)
    _errands(np.random.default_rng(streams["errands"]), strength, z, rows, y == 0, row_day)

    # drift after drift_start (all uniforms are drawn whatever the knobs, to keep the streams aligned)
    post = ts >= start_us + drift_day * _US_DAY if drift_day is not None else np.zeros(n, dtype=bool)
    scale = np.where(post, 1.0 + config.covariate_drift, 1.0)
    amount = np.minimum(rows["amount"], customers.credit_limit[rows["cust"]]) * scale
    distance = rows["distance"] * scale
    channel = rows["channel"]
    to_online = (post & (y == 0) & (channel != _ATM) & (channel != _ONLINE)
                 & (drift_rng.random(n) < min(0.6, 0.5 * config.covariate_drift)))
    channel = np.where(to_online, _ONLINE, channel)
    new_u = drift_rng.random(n)
    category = rows["category"]
    if config.new_categories:
        category = np.where(post & (new_u < _NEW_CATEGORY_SHARE * np.where(y == 1, 3.0, 1.0)), _NEW, category)
    new_risk = _beta_mean(drift_rng, np.full(n, _CATEGORY_RISK[_NEW]), 10.0)
    risk = np.where(category == _NEW, new_risk, rows["risk"])

    # legitimate and fraudulent rows draw their nulls from separate streams, so that a knob that changes
    # the number of frauds (concept drift) leaves the legitimate rows' nulls as they were
    legit_rng, fraud_rng = np.random.default_rng(streams["nulls"]).spawn(2)
    null_legit = legit_rng.random((2, n_legit)) < _NULL_SHARE
    null_fraud = fraud_rng.random((2, n - n_legit)) < _NULL_SHARE
    missing = {"distance_from_home_km": np.concatenate([null_legit[0], null_fraud[0]]),
               "merchant_risk_score": np.concatenate([null_legit[1], null_fraud[1]])}

    # event order, ids
    order = np.lexsort((rows["cust"], ts))
    ts, y, cust = ts[order], y[order], rows["cust"][order]
    day = (ts - start_us) // _US_DAY
    known = {
        "amount": np.maximum(0.5, np.round(amount[order], 2)),
        "merchant_category": np.array([*CATEGORIES, NEW_CATEGORY], dtype=object)[category[order]],
        "channel": np.array(CHANNELS, dtype=object)[channel[order]],
        "hour_of_day": (ts // _US_HOUR) % 24,
        "distance_from_home_km": np.round(distance[order], 1),
        "merchant_risk_score": np.round(risk[order], 3),
        "is_foreign": rows["is_foreign"][order].astype(np.int64),
        "card_age_days": customers.card_age[cust] + day,
        "credit_limit": customers.credit_limit[cust],
    }

    # labels: noise, then arrival after a delay (chargebacks take longer)
    flip = np.random.default_rng(streams["noise"]).random(n) < config.label_noise
    observed = np.where(flip, 1 - y, y)
    lab_rng = np.random.default_rng(streams["labels"])
    neg_delay = lab_rng.uniform(1.0, 7.0, n)
    pos_delay = 2.0 + 23.0 * lab_rng.beta(1.3, 3.5, n)
    delay_us = (np.where(observed == 1, pos_delay, neg_delay) * _US_DAY).astype(np.int64)
    neg, pos = min(contract.label_values), max(contract.label_values)

    width = max(10, len(str(n)))
    ids = np.strings.add("t", np.strings.zfill(np.arange(1, n + 1).astype(str), width)).astype(object)
    entity = cust + 1
    if contract.entity_dtype == "string":
        entity = np.strings.add("c", np.strings.zfill(entity.astype(str), 7)).astype(object)
    data: dict[str, Any] = {
        contract.row_key: ids,
        contract.entity: entity,
        contract.event_timestamp: pd.to_datetime(ts * 1000, unit="ns", utc=True),
    }
    for col in contract.columns:
        if _known_column(col):
            values = known[col.name]
            if col.dtype != "category":
                values = _as_dtype(values, col.dtype)
            if col.name in missing and col.nullable and col.dtype == "float64":
                values = np.where(missing[col.name][order], np.nan, values)
            data[col.name] = values
        else:
            data[col.name] = _generic(col, y, config.seed)
    data[contract.label] = np.where(observed == 1, pos, neg).astype(np.int64)
    data[contract.label_timestamp] = pd.to_datetime((ts + delay_us) * 1000, unit="ns", utc=True)
    transactions = pd.DataFrame(data)
    labels = transactions[[contract.row_key, contract.label, contract.label_timestamp]].copy()
    log.info("simulated %d transactions of %d customers over %d days from %s: %.2f%% positive "
             "(%d labels flipped)", n, config.customers, config.days, config.start,
             100.0 * float(observed.mean()) if n else 0.0, int(flip.sum()))
    return GeneratedData(transactions=transactions, labels=labels)


# -- landing -----------------------------------------------------------------------------------------
def write_landing(data: GeneratedData, lake: Lake, contract: DataContract,
                  on_written: Callable[[str, int], None] | None = None) -> list[str]:
    """Write ``landing/transactions/<day>.parquet`` per event day (without the label columns) and
    ``landing/labels/<day>.parquet`` per label-arrival day; return the URIs written.

    ``on_written(uri, rows)`` is called after each file (the CLI's progress)."""
    uris: list[str] = []

    def write(part: pd.DataFrame, uri: str) -> None:
        uris.append(lake.write_parquet(part.reset_index(drop=True), uri))
        if on_written is not None:
            on_written(uri, len(part))

    tx = data.transactions[list(contract.landing_columns)]
    for key, part in tx.groupby(tx[contract.event_timestamp].dt.floor("D"), sort=True):
        write(part, lake.partition("landing", "transactions", key.date()))
    labels = data.labels[list(contract.label_columns)]
    stamp = labels[contract.label_timestamp]
    for key, part in labels.groupby(stamp.dt.floor("D"), sort=True):
        write(part.sort_values([contract.label_timestamp, contract.row_key], kind="stable"),
              lake.partition("landing", "labels", key.date()))
    log.info("wrote %d landing partitions under %s", len(uris), lake.uri("landing"))
    return uris


def generate(config: GeneratorConfig, lake: Lake, contract: DataContract) -> list[str]:
    """Simulate ``config`` and write it to the landing zone of ``lake``; return the URIs written."""
    return write_landing(simulate(config, contract), lake, contract)


# -- bad data, for tests of the blocking checks ---------------------------------------------------------
def make_bad(frame: pd.DataFrame, kind: str, contract: DataContract, seed: int = 0) -> pd.DataFrame:
    """A broken copy of ``frame`` (a transactions partition; a labels partition for
    ``label_out_of_domain``) with the blocking problem ``kind``, one of :data:`BAD_KINDS`."""
    import numpy as np
    import pandas as pd

    if kind not in BAD_KINDS:
        raise ValueError(f"unknown kind of bad data {kind!r}: use one of {BAD_KINDS}")
    bad = frame.copy()
    if kind == "empty":
        return bad.iloc[0:0].copy()
    if len(bad) < 2:
        raise ValueError(f"make_bad({kind!r}) needs a frame of at least two rows")
    rng = np.random.default_rng(seed)
    n_rows = max(1, len(bad) // 100)
    rows = np.sort(rng.choice(len(bad), size=n_rows, replace=False))
    if kind == "missing_column":
        present = [c.name for c in contract.columns if c.name in bad.columns]
        if not present:
            raise ValueError("make_bad('missing_column'): the frame has none of the contract's columns")
        return bad.drop(columns=[present[int(rng.integers(len(present)))]])
    if kind == "wrong_type":
        numeric = [c.name for c in contract.columns
                   if c.dtype in {"float64", "int64"} and c.name in bad.columns]
        target = numeric[int(rng.integers(len(numeric)))] if numeric else contract.entity
        bad[target] = bad[target].astype(str).astype(object)
        return bad
    if kind == "null_key":
        key = bad[contract.row_key].astype(object)
        key.iloc[rows] = None
        bad[contract.row_key] = key
        return bad
    if kind == "duplicate_key":
        sources = (rows + rng.integers(1, len(bad), size=n_rows)) % len(bad)  # never the row itself
        col = bad.columns.get_loc(contract.row_key)
        bad.iloc[rows, col] = bad.iloc[sources, col].to_numpy()
        return bad
    if kind == "label_out_of_domain":
        bad[contract.label] = bad[contract.label].astype(np.int64)
        col = bad.columns.get_loc(contract.label)
        bad.iloc[rows, col] = max(contract.label_values) + 1
        return bad
    # timestamp_outside_partition: move some events past the last day the frame covers
    stamp = pd.to_datetime(bad[contract.event_timestamp], utc=True)
    span = (stamp.max().floor("D") - stamp.min().floor("D")) + pd.Timedelta(days=1)
    stamp.iloc[rows] = stamp.iloc[rows] + span
    bad[contract.event_timestamp] = stamp
    return bad
