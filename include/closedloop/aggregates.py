"""Customer features: aggregates over each customer's events, free of leakage, and its state after each day.

Event rows. For every event ``e`` of entity ``c`` at time ``t``, each aggregate is computed over the
events of ``c`` with timestamps in ``[t - window, t)``: strictly before ``t``, so an event never sees
itself (nor another event at the very same instant). The row describing ``e`` is stamped ``t``;
Feast's point-in-time join at ``t`` then picks exactly that row (training sets, batch scoring).

Closing rows (``closing_rows=True``, what ingest writes). For every entity active on a UTC day, one more
row stamped at that day's last microsecond ``T`` (:func:`day_close`): the aggregates over the events in
``[T - window, T]``, so the day's events included, ``time_since_last`` measured from ``T``. ``T`` is
after every event of the day and before the next day, so the point-in-time join of a real event still
picks that event's own row, while the latest row of an entity (what materialisation puts in the online
store, and what an offline lookup at a later moment finds) describes its state AFTER its most recent
ingested transaction: online scoring sees the same history as training and batch scoring would for a
transaction at that moment. An entity whose last event of a day is at ``T`` itself keeps that event's row
(no two rows share entity and timestamp); with microsecond timestamps that needs an event in the day's
very last microsecond.

Vectorised: events sorted by (entity, time) with one lexsort of integer codes; for each query (an event,
or a day's close) the bounds of its window are found by a binary search on one packed (entity, time rank)
key, sums and counts come from cumulative sums, maxima and minima from a sparse table, so the cost grows
as n log n, whatever the number of entities.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import date

    import numpy as np
    import pandas as pd

    from closedloop.schema import DataContract

log = logging.getLogger(__name__)

_DAY_NS = 86_400 * 10**9
_US_NS = 1_000


def day_close(day: date) -> pd.Timestamp:
    """The stamp of ``day``'s closing rows: its last microsecond (UTC), after every event of the day."""
    import pandas as pd

    return pd.Timestamp(day, tz="UTC") + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)


def _entity_time_order(entities: pd.Series, times_ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stable order by entity value, then time (one lexsort of integer codes), and the entity codes."""
    import numpy as np
    import pandas as pd

    codes = pd.factorize(entities, sort=True)[0].astype(np.int64)  # in the order of the entity's values
    return np.lexsort((times_ns, codes)), codes


def _first_at_or_after(codes: np.ndarray, tsu: np.ndarray, q_codes: np.ndarray,
                       q_ts: list[np.ndarray]) -> list[np.ndarray]:
    """For each query, the first position (in the arrays sorted by entity, then time) of its entity with time
    ``>=`` its time; a query after every event of its entity gets the position after the entity's last event.

    One answer per array of ``q_ts`` (the same entities ``q_codes`` each). Times are replaced by their rank
    among all event and query times (one sort), so that ``(entity, rank)`` packs into one increasing int64
    key and every query is one binary search: the first key ``>=`` the query's is the entity's first event
    at or after that time, or the next entity's first event, which is the position after this one's last.
    """
    import numpy as np

    times = np.sort(np.concatenate([tsu, *q_ts]))  # a time's rank: its first position here (equal times, equal rank)
    span = len(times) + 1
    if len(codes) and (int(codes.max()) + 1) * span >= 2**63:  # pragma: no cover - beyond 10^9 events x entities
        raise OverflowError(f"{int(codes.max()) + 1} entities x {span} times do not fit one int64 key")
    keys = codes * span + np.searchsorted(times, tsu)
    return [np.searchsorted(keys, q_codes * span + np.searchsorted(times, q), side="left") for q in q_ts]


def _range_extreme(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, fn) -> np.ndarray:
    """``fn`` (np.fmax or np.fmin) of ``values[lo:hi]`` for every query; NaN for empty ranges."""
    import numpy as np

    n = len(values)
    out = np.full(len(lo), np.nan)
    length = hi - lo
    ok = length > 0
    if not ok.any():
        return out
    table = [values.astype("float64")]
    k = 1
    while (1 << k) <= length.max():
        prev = table[-1]
        step = 1 << (k - 1)
        nxt = prev.copy()
        nxt[: n - step] = fn(prev[: n - step], prev[step:])
        table.append(nxt)
        k += 1
    level = np.zeros(len(lo), dtype=np.int64)
    level[ok] = np.floor(np.log2(length[ok])).astype(np.int64)
    for lv in np.unique(level[ok]):
        rows = ok & (level == lv)
        t = table[lv]
        out[rows] = fn(t[lo[rows]], t[hi[rows] - (1 << lv)])
    return out


def compute_entity_features(events: pd.DataFrame, contract: DataContract,
                            history: pd.DataFrame | None = None, *, closing_rows: bool = False) -> pd.DataFrame:
    """Entity-feature rows for each distinct (entity, timestamp) of ``events`` (and the days' closes).

    ``history`` holds earlier events of the same entities (the lookback period) that are used as
    context only; no rows are produced for them. Returns the entity key, the timestamp and one column
    per aggregate of the contract: one row per distinct (entity, timestamp) of ``events`` and, with
    ``closing_rows``, one row per entity and UTC day of ``events`` stamped :func:`day_close` of that day
    (the state after the day's events; see the module docstring). Sorted by entity and timestamp.
    """
    import numpy as np
    import pandas as pd

    ent, ts = contract.entity, contract.event_timestamp
    needed = sorted({ent, ts, *(a.column for a in contract.aggregates if a.column)})
    target = events[needed].copy()
    target["_target"] = True
    parts = [target]
    if history is not None and len(history):
        ctx = history[needed].copy()
        ctx["_target"] = False
        parts.append(ctx)
    allev = pd.concat(parts, ignore_index=True)
    allev[ts] = pd.to_datetime(allev[ts], utc=True).astype("datetime64[ns, UTC]")
    tsu = allev[ts].astype("int64").to_numpy()  # ns since the epoch
    order, codes = _entity_time_order(allev[ent], tsu)
    allev = allev.take(order).reset_index(drop=True)
    codes, tsu = codes[order], tsu[order]
    is_target = allev["_target"].to_numpy()

    # queries: every target event (window [t - w, t)), then each day's close (window [T - w, T])
    q_codes, q_ref, q_hi = codes[is_target], tsu[is_target], tsu[is_target]
    out = allev.loc[is_target, [ent, ts]].reset_index(drop=True)
    if closing_rows and is_target.any():
        close = (tsu[is_target] // _DAY_NS + 1) * _DAY_NS - _US_NS
        days = pd.DataFrame({"c": q_codes, "T": close, "e": allev.loc[is_target, ent].to_numpy()}).drop_duplicates(
            ["c", "T"])
        # an event at the close itself keeps its own row: no two rows share entity and timestamp
        clash = pd.MultiIndex.from_arrays([days["c"], days["T"]]).isin(
            pd.MultiIndex.from_arrays([q_codes, q_hi]))
        if clash.any():
            log.warning("%d closing row(s) left out: the entity has an event at the day's last microsecond, whose "
                        "own row stays its latest", int(clash.sum()))
            days = days[~clash]
        c_codes, c_ts = days["c"].to_numpy(), days["T"].to_numpy()
        q_codes = np.r_[q_codes, c_codes]
        q_ref = np.r_[q_ref, c_ts]
        q_hi = np.r_[q_hi, c_ts + 1]  # first event after T: the window includes T
        closing = pd.DataFrame({ent: days["e"].to_numpy(),
                                ts: pd.to_datetime(c_ts, utc=True).astype("datetime64[ns, UTC]")})
        out = pd.concat([out, closing], ignore_index=True)

    # the bounds of every window: one search for the upper bound and one per distinct window length
    windows = sorted({int(pd.Timedelta(agg.window).value) for agg in contract.aggregates})
    upper, *found = _first_at_or_after(codes, tsu, q_codes, [q_hi, *(q_ref - w for w in windows)])
    lowers = {w: np.minimum(lo, upper) for w, lo in zip(windows, found, strict=True)}
    for agg in contract.aggregates:
        lower = lowers[int(pd.Timedelta(agg.window).value)]
        count = (upper - lower).astype("float64")
        if agg.function == "count":
            values = count
        elif agg.function == "time_since_last":
            prev = np.clip(upper - 1, 0, None)
            values = np.where(count > 0, (q_ref - tsu[prev]) / 1e9, np.nan)
        else:
            x = allev[agg.column].astype("float64").to_numpy()
            if agg.function in ("max", "min"):
                fn = np.fmax if agg.function == "max" else np.fmin
                values = _range_extreme(np.nan_to_num(x, nan=-np.inf if fn is np.fmax else np.inf), lower,
                                        upper, fn)
                values[np.isinf(values)] = np.nan
            else:
                valid = ~np.isnan(x)
                cs = np.r_[0.0, np.cumsum(np.where(valid, x, 0.0))]
                cs2 = np.r_[0.0, np.cumsum(np.where(valid, x * x, 0.0))]
                cn = np.r_[0, np.cumsum(valid)]
                s, s2, k = cs[upper] - cs[lower], cs2[upper] - cs2[lower], (cn[upper] - cn[lower]).astype(float)
                if agg.function == "sum":
                    values = s
                elif agg.function == "mean":
                    values = np.where(k > 0, s / np.maximum(k, 1), np.nan)
                else:  # std, ddof=1 as pandas
                    var = np.where(k > 1, (s2 - s * s / np.maximum(k, 1)) / np.maximum(k - 1, 1), np.nan)
                    values = np.sqrt(np.clip(var, 0.0, None))
        out[agg.name] = np.asarray(values, dtype="float64")
    out = out.drop_duplicates([ent, ts])  # several events of an entity at one instant: one row
    order, _ = _entity_time_order(out[ent], out[ts].astype("int64").to_numpy())
    return out.take(order).reset_index(drop=True)
