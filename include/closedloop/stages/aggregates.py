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
key; counts, sums, means and standard deviations come from a segment tree of (count, sum, squared
deviations) merged with Chan's pairwise formula, maxima and minima from a sparse table, so the cost grows
as n log n, whatever the number of entities.

Exact whatever the other rows hold. A window is answered from the tree's nodes that lie inside it, never
from a difference of running totals: no value outside a window (another entity's, or the same entity's
before the window) enters its arithmetic. One extreme or non-finite value changes only the windows that
contain it; every other window keeps the precision of a direct sum over its own values (a relative error
of a few ulps times the log of its length), and a standard deviation is computed from deviations, never
as ``E[x^2] - E[x]^2``. (The cumulative sums used before over all entities at once turned one customer's
extreme amount into NaN sums for every customer after it.) NaN is a missing value: left out of counts,
sums, means and deviations.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datetime import date

    import numpy as np
    import pandas as pd

    from closedloop.core.schema import DataContract

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

    One answer per array of ``q_ts`` (the same entities ``q_codes`` each). ``(entity, time)`` packs into one
    increasing int64 key, so every query is one binary search: the first key ``>=`` the query's is the
    entity's first event at or after that time, or the next entity's first event, which is the position
    after this one's last. Times count from the first event, in microseconds when every event time is a
    whole microsecond (a query time rounded up: the same events are at or after it); when entities x times
    do not fit an int64 that way, times are replaced by their rank among all event and query times.
    """
    import numpy as np

    if not len(tsu):
        return [np.zeros(len(q), dtype=np.int64) for q in q_ts]
    unit = _US_NS if not (tsu % _US_NS).any() else 1
    t0 = int(tsu.min())
    span = (int(tsu.max()) - t0) // unit + 2  # offsets 0 .. span - 2 for events, span - 1: after them all
    if (int(codes.max()) + 1) * span < 2**63:
        keys = codes * span + (tsu - t0) // unit
        return [np.searchsorted(keys, q_codes * span + np.clip(-((t0 - q) // unit), 0, span - 1), side="left")
                for q in q_ts]
    times = np.sort(np.concatenate([tsu, *q_ts]))  # a time's rank: its first position here (equal times, equal rank)
    span = len(times) + 1
    if (int(codes.max()) + 1) * span >= 2**63:  # pragma: no cover - beyond 10^9 events x entities
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


_QUERY_CHUNK = 1 << 20  # queries walked at once (bounds the memory of the node lists)


def _merge_moments(na: np.ndarray, ta: np.ndarray, ma: np.ndarray, nb: np.ndarray, tb: np.ndarray,
                   mb: np.ndarray) -> np.ndarray:
    """The squared deviations from the mean of two disjoint parts together (Chan et al.'s pairwise formula).

    ``n``: counts, ``t``: sums, ``m``: squared deviations of each part. An empty part leaves the other's
    figure untouched; a non-finite value makes only the results it belongs to non-finite.
    """
    import numpy as np

    na, nb = na.astype(np.float64), nb.astype(np.float64)  # counts may be integers: na * nb must not wrap
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        delta = tb / nb - ta / na
        m2 = ma + mb + delta * delta * (na * nb / (na + nb))
    return np.where(na == 0, mb, np.where(nb == 0, ma, m2))


class _Tree:
    """A segment tree over the values ``x`` sorted by (entity, time) (NaN: missing): per node, the sum of its
    values and (each built on first use) their count and their squared deviations from their mean.

    Node ``i`` has children ``2i`` and ``2i + 1``; the leaves are ``[size, size + len(x))``; a node's sum is
    the pairwise sum of its leaves.
    """

    def __init__(self, x: np.ndarray) -> None:
        import numpy as np

        self.size = size = 1 << max(0, (len(x) - 1).bit_length())
        self.sum = np.zeros(2 * size)
        self._valid = ~np.isnan(x)
        self.sum[size:size + len(x)] = np.where(self._valid, x, 0.0)
        self.has_missing = not self._valid.all()
        self._count: np.ndarray | None = None  # built on first use (int32: half the memory of floats)
        self._m2: np.ndarray | None = None
        for lo, hi in self._levels():
            with np.errstate(invalid="ignore", over="ignore"):
                self.sum[lo:hi] = self.sum[2 * lo:2 * hi:2] + self.sum[2 * lo + 1:2 * hi:2]

    @property
    def count(self) -> np.ndarray:
        """The number of (non-missing) values under each node."""
        if self._count is None:
            import numpy as np

            count = self._count = np.zeros(2 * self.size, dtype=np.int32)
            count[self.size:self.size + len(self._valid)] = self._valid
            for lo, hi in self._levels():
                count[lo:hi] = count[2 * lo:2 * hi:2] + count[2 * lo + 1:2 * hi:2]
        return self._count

    def _levels(self) -> list[tuple[int, int]]:
        """The levels above the leaves, bottom up: the parents ``[lo, hi)`` of children ``[2 lo, 2 hi)``."""
        out, hi = [], self.size
        while hi > 1:
            out.append((hi // 2, hi))
            hi //= 2
        return out

    @property
    def m2(self) -> np.ndarray:
        if self._m2 is None:
            import numpy as np

            with np.errstate(invalid="ignore"):
                m2 = self._m2 = self.sum * 0.0  # a leaf deviates by 0 from itself (NaN for an infinite leaf)
            for lo, hi in self._levels():
                a, b = slice(2 * lo, 2 * hi, 2), slice(2 * lo + 1, 2 * hi, 2)
                m2[lo:hi] = _merge_moments(self.count[a], self.sum[a], m2[a], self.count[b], self.sum[b], m2[b])
        return self._m2


def _window_nodes(size: int, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query, node) pairs: the nodes of a tree of ``size`` leaves that tile each range ``[lo, hi)`` exactly.

    The classic bottom-up walk, vectorised over the queries; a query leaves the walk once its bounds meet,
    so a window of ``k`` values has at most about ``2 log2 k`` nodes.
    """
    import numpy as np

    left, right = lo.astype(np.int64) + size, hi.astype(np.int64) + size
    act = np.flatnonzero(left < right)
    left, right = left[act], right[act]
    queries, nodes = [], []
    while len(act):
        take = (left & 1).astype(bool)
        queries.append(act[take])
        nodes.append(left[take])
        left = left + take
        take = (right & 1).astype(bool)
        right = right - take
        queries.append(act[take])
        nodes.append(right[take])
        left, right = left >> 1, right >> 1
        keep = left < right
        act, left, right = act[keep], left[keep], right[keep]
    if not queries:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(queries), np.concatenate(nodes)


def _window_moments(trees: dict[str, _Tree], wanted: dict[str, bool], lo: np.ndarray,
                    hi: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Per column of ``wanted``: (count, sum, squared deviations or None) of its values in each ``[lo, hi)``.

    Each window is the sum of the tree nodes that tile it (one walk per call, shared by the columns); the
    squared deviations (``wanted[column]`` true) are ``sum(node m2 + node count * (node mean - mean)^2)``
    over those nodes, with the window's own mean: no term can cancel another.
    """
    import numpy as np

    n = len(lo)
    out = {c: (np.zeros(n), np.zeros(n), np.zeros(n) if m2 else None) for c, m2 in wanted.items()}
    size = next(iter(trees.values())).size
    for start in range(0, n, _QUERY_CHUNK):
        stop = min(n, start + _QUERY_CHUNK)
        q, node = _window_nodes(size, lo[start:stop], hi[start:stop])
        for column in wanted:
            tree = trees[column]
            count, total, m2 = out[column]
            if tree.has_missing:
                count[start:stop] = np.bincount(q, weights=tree.count[node], minlength=stop - start)
            else:
                count[start:stop] = hi[start:stop] - lo[start:stop]
            with np.errstate(invalid="ignore", over="ignore"):
                total[start:stop] = np.bincount(q, weights=tree.sum[node], minlength=stop - start)
            if m2 is not None:
                k = tree.count[node]
                with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                    mean = total[start:stop] / count[start:stop]
                    dev = np.where(k > 0, tree.sum[node] / k - mean[q], 0.0)
                    m2[start:stop] = np.bincount(q, weights=tree.m2[node] + k * dev * dev, minlength=stop - start)
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

    # queries: every distinct (entity, time) of the target events (window [t - w, t): several events of an
    # entity at one instant share one row), then each day's close (window [T - w, T])
    tpos = np.flatnonzero(is_target)
    if len(tpos) > 1:  # sorted by (entity, time): repeats are adjacent
        tpos = tpos[np.r_[True, (codes[tpos[1:]] != codes[tpos[:-1]]) | (tsu[tpos[1:]] != tsu[tpos[:-1]])]]
    q_codes, q_ref, q_hi, q_pos = codes[tpos], tsu[tpos], tsu[tpos], tpos
    if closing_rows and len(tpos):
        close = (q_ref // _DAY_NS + 1) * _DAY_NS - _US_NS
        days = pd.DataFrame({"c": q_codes, "T": close, "p": tpos}).drop_duplicates(["c", "T"])
        # an event at the close itself keeps its own row: no two rows share entity and timestamp
        clash = pd.MultiIndex.from_arrays([days["c"], days["T"]]).isin(
            pd.MultiIndex.from_arrays([q_codes, q_hi]))
        if clash.any():
            log.warning("%d closing row(s) left out: the entity has an event at the day's last microsecond, whose "
                        "own row stays its latest", int(clash.sum()))
            days = days[~clash]
        c_ts = days["T"].to_numpy()
        q_codes = np.r_[q_codes, days["c"].to_numpy()]
        q_ref = np.r_[q_ref, c_ts]
        q_hi = np.r_[q_hi, c_ts + 1]  # first event after T: the window includes T
        q_pos = np.r_[q_pos, days["p"].to_numpy()]

    # the bounds of every window: one search for the upper bound and one per distinct window length
    windows = sorted({int(pd.Timedelta(agg.window).value) for agg in contract.aggregates})
    upper, *found = _first_at_or_after(codes, tsu, q_codes, [q_hi, *(q_ref - w for w in windows)])
    lowers = {w: np.minimum(lo, upper) for w, lo in zip(windows, found, strict=True)}
    # counts, sums and squared deviations of every (column, window) the sums, means and deviations need
    summed = [a for a in contract.aggregates if a.function in ("sum", "mean", "std")]
    trees = {c: _Tree(allev[c].astype("float64").to_numpy()) for c in sorted({a.column for a in summed})}
    moments: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    for w in windows:
        wanted: dict[str, bool] = {}
        for a in summed:
            if int(pd.Timedelta(a.window).value) == w:
                wanted[a.column] = wanted.get(a.column, False) or a.function == "std"
        if wanted:
            found_w = _window_moments(trees, wanted, lowers[w], upper)
            moments.update({(c, w): v for c, v in found_w.items()})
    order = np.lexsort((q_ref, q_codes))  # the rows' order: entity codes follow the entities' values
    out = {ent: allev[ent].take(q_pos[order]).reset_index(drop=True),
           ts: pd.to_datetime(q_ref[order], utc=True).astype("datetime64[ns, UTC]")}
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
                k, s, m2 = moments[(agg.column, int(pd.Timedelta(agg.window).value))]
                with np.errstate(invalid="ignore", divide="ignore"):
                    if agg.function == "sum":
                        values = s
                    elif agg.function == "mean":
                        values = np.where(k > 0, s / np.maximum(k, 1), np.nan)
                    else:  # std, ddof=1 as pandas
                        values = np.where(k > 1, np.sqrt(np.clip(m2 / np.maximum(k - 1, 1), 0.0, None)), np.nan)
        out[agg.name] = np.asarray(values, dtype="float64")[order]
    del trees, moments
    return pd.DataFrame(out)
