"""Customer features: aggregates over each customer's earlier events, free of leakage.

For every event ``e`` of entity ``c`` at time ``t``, each aggregate is computed over the events of ``c``
with timestamps in ``[t - window, t)``: strictly before ``t``, so an event never sees itself (nor
another event at the very same instant). The row describing ``e`` is stamped ``t``; Feast's
point-in-time join at ``t`` then picks exactly that row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.schema import DataContract


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
    allev[ts] = pd.to_datetime(allev[ts], utc=True)
    allev = allev.sort_values([ent, ts], kind="stable").reset_index(drop=True)
    allev["_one"] = 1.0
    allev["_tsec"] = allev[ts].astype("int64") / 1e9

    out = allev.loc[allev["_target"], [ent, ts]].copy()
    grouped = allev.set_index(ts).groupby(ent, sort=False)
    for agg in contract.aggregates:
        window = pd.Timedelta(agg.window)
        if agg.function == "count":
            col, fn = "_one", "sum"
        elif agg.function == "time_since_last":
            col, fn = "_tsec", "max"
        else:
            col, fn = agg.column, agg.function
        rolled = grouped[col].rolling(window, closed="left").agg(fn)
        values = rolled.to_numpy()
        # groupby-rolling returns rows grouped by entity in the (entity, ts)-sorted order of allev
        if agg.function == "count" or agg.function == "sum":
            values = np.nan_to_num(values, nan=0.0)
        elif agg.function == "time_since_last":
            values = allev["_tsec"].to_numpy() - values
        out[agg.name] = values[allev["_target"].to_numpy()]
    out = out.drop_duplicates([ent, ts]).reset_index(drop=True)
    for agg in contract.aggregates:
        out[agg.name] = out[agg.name].astype("float64")
    return out
