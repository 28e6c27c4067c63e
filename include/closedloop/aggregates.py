"""Customer features: aggregates over each customer's earlier events, free of leakage.

For every event ``e`` of entity ``c`` at time ``t``, each aggregate is computed over the events of ``c``
with timestamps in ``[t - window, t)``: strictly before ``t``, so an event never sees itself (nor
another event at the very same instant). The row describing ``e`` is stamped ``t``; Feast's
point-in-time join at ``t`` then picks exactly that row.

Vectorised: events sorted by (entity, time); for each event the bounds of its window are found with
``merge_asof`` (per entity), sums and counts come from cumulative sums, maxima and minima from a
sparse table, so the cost grows as n log n, whatever the number of entities.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from closedloop.schema import DataContract


def _bounds(ent: np.ndarray, tsu: np.ndarray, lo_ts: np.ndarray) -> np.ndarray:
    """For each row, the first position (in the sorted arrays) of its entity with time >= ``lo_ts``."""
    import numpy as np
    import pandas as pd

    pos = np.arange(len(ent))
    right = pd.DataFrame({"e": ent, "t": tsu, "p": pos})
    left = pd.DataFrame({"e": ent, "t": lo_ts, "i": pos}).sort_values("t", kind="stable")
    found = pd.merge_asof(left, right.sort_values("t", kind="stable"), on="t", by="e", direction="forward",
                          allow_exact_matches=True)
    out = np.empty(len(ent), dtype=np.int64)
    # no later event of the entity: the window ends at the entity's last row + 1 (never happens for the
    # upper bound, since every row is its own candidate)
    out[found["i"].to_numpy()] = found["p"].fillna(-1).to_numpy(dtype=np.int64)
    return out


def _range_extreme(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, fn) -> np.ndarray:
    """``fn`` (np.fmax or np.fmin) of ``values[lo:hi]`` for every row; NaN for empty ranges."""
    import numpy as np

    n = len(values)
    out = np.full(n, np.nan)
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
    level = np.zeros(n, dtype=np.int64)
    level[ok] = np.floor(np.log2(length[ok])).astype(np.int64)
    for lv in np.unique(level[ok]):
        rows = ok & (level == lv)
        t = table[lv]
        out[rows] = fn(t[lo[rows]], t[hi[rows] - (1 << lv)])
    return out


def compute_entity_features(events: pd.DataFrame, contract: DataContract,
                            history: pd.DataFrame | None = None) -> pd.DataFrame:
    """Entity-feature rows for each distinct (entity, timestamp) of ``events``.

    ``history`` holds earlier events of the same entities (the lookback period) that are used as
    context only; no rows are produced for them. Returns the entity key, the event timestamp and one
    column per aggregate of the contract, one row per distinct (entity, timestamp) of ``events``.
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
    allev = allev.sort_values([ent, ts], kind="stable").reset_index(drop=True)

    codes = pd.factorize(allev[ent])[0].astype(np.int64)
    tsu = allev[ts].astype("int64").to_numpy()  # ns since the epoch
    upper = _bounds(codes, tsu, tsu)  # first event of the entity at >= t: the window ends before it
    group_start = np.zeros(len(codes), dtype=np.int64)
    if len(codes):
        first = np.r_[True, codes[1:] != codes[:-1]]
        group_start = np.maximum.accumulate(np.where(first, np.arange(len(codes)), 0))

    out = allev.loc[allev["_target"], [ent, ts]].copy()
    is_target = allev["_target"].to_numpy()
    for agg in contract.aggregates:
        lower = _bounds(codes, tsu, tsu - int(pd.Timedelta(agg.window).value))
        lower = np.minimum(np.where(lower < 0, upper, lower), upper)
        count = (upper - lower).astype("float64")
        if agg.function == "count":
            values = count
        elif agg.function == "time_since_last":
            prev = upper - 1
            has = (count > 0) & (prev >= group_start)
            values = np.where(has, (tsu - tsu[np.clip(prev, 0, None)]) / 1e9, np.nan)
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
        out[agg.name] = np.asarray(values, dtype="float64")[is_target]
    out = out.drop_duplicates([ent, ts]).reset_index(drop=True)
    return out
