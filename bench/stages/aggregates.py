"""Aggregates: the customer aggregates of a window's events (what ingest computes for every curated day).

The project's ``compute_entity_features`` (per-entity windows summed on a segment tree: every window exact
whatever the other rows hold, see closedloop.stages.aggregates) against the method it replaced, kept here as the
floor: one cumulative sum over all entities at once, ``cs[upper] - cs[lower]`` (fast, but one extreme value
destroys the precision of every later window of every entity). Both on the same events: the bench contract's
21 aggregates over the world's number of transactions and customers, the window's days and the lookback
before them, generated here with numpy (no lake: this stage needs no world built), with closing rows.
"""

from __future__ import annotations

from typing import Any

from common import REPO, Result, World, frame_mib, measure

STAGE = "aggregates"


def events(rows: int, customers: int, days: int, lookback_days: int, seed: int = 3) -> tuple[Any, Any]:
    """(the window's events, the lookback's events) with the bench contract's aggregated columns."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    per_day = rows / days
    start = pd.Timestamp("2026-01-05", tz="UTC")

    def frame(n: int, first: pd.Timestamp, span_days: int) -> pd.DataFrame:
        return pd.DataFrame({
            "customer_id": rng.integers(1, customers + 1, n).astype("int64"),
            "event_timestamp": first + pd.to_timedelta(rng.integers(0, span_days * 86_400 * 10**6, n), unit="us"),
            "amount": rng.lognormal(3.5, 1.2, n).round(2),
            "is_foreign": (rng.random(n) < 0.08).astype("int64"),
            "distance_from_home_km": np.where(rng.random(n) < 0.05, np.nan, rng.gamma(2.0, 8.0, n)),
            "merchant_risk_score": rng.random(n),
            "hour_of_day": rng.integers(0, 24, n).astype("int64"),
        })

    return (frame(rows, start, days),
            frame(int(per_day * lookback_days), start - pd.Timedelta(days=lookback_days), lookback_days))


def _first_at_or_after(codes: Any, tsu: Any, q_codes: Any, q_ts: list) -> list:
    """The window-bound search as it was before issue 16 (ranks of all times, then one packed key)."""
    import numpy as np

    times = np.sort(np.concatenate([tsu, *q_ts]))
    span = len(times) + 1
    keys = codes * span + np.searchsorted(times, tsu)
    return [np.searchsorted(keys, q_codes * span + np.searchsorted(times, q), side="left") for q in q_ts]


def cumulative_sums_floor(events: Any, contract: Any, history: Any) -> Any:
    """The method before issue 16 (one cumulative sum over every entity), with closing rows: the floor."""
    import numpy as np
    import pandas as pd

    from closedloop.stages.aggregates import _DAY_NS, _US_NS, _entity_time_order, _range_extreme

    ent, ts = contract.entity, contract.event_timestamp
    needed = sorted({ent, ts, *(a.column for a in contract.aggregates if a.column)})
    target = events[needed].copy()
    target["_target"] = True
    ctx = history[needed].copy()
    ctx["_target"] = False
    allev = pd.concat([target, ctx], ignore_index=True)
    allev[ts] = pd.to_datetime(allev[ts], utc=True).astype("datetime64[ns, UTC]")
    tsu = allev[ts].astype("int64").to_numpy()
    order, codes = _entity_time_order(allev[ent], tsu)
    allev = allev.take(order).reset_index(drop=True)
    codes, tsu = codes[order], tsu[order]
    is_target = allev["_target"].to_numpy()
    q_codes, q_ref, q_hi = codes[is_target], tsu[is_target], tsu[is_target]
    out = allev.loc[is_target, [ent, ts]].reset_index(drop=True)
    close = (tsu[is_target] // _DAY_NS + 1) * _DAY_NS - _US_NS
    days = pd.DataFrame({"c": q_codes, "T": close, "e": allev.loc[is_target, ent].to_numpy()}).drop_duplicates(
        ["c", "T"])
    c_codes, c_ts = days["c"].to_numpy(), days["T"].to_numpy()
    q_codes, q_ref, q_hi = np.r_[q_codes, c_codes], np.r_[q_ref, c_ts], np.r_[q_hi, c_ts + 1]
    out = pd.concat([out, pd.DataFrame({ent: days["e"].to_numpy(), ts: pd.to_datetime(c_ts, utc=True).astype(
        "datetime64[ns, UTC]")})], ignore_index=True)
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
                else:
                    var = np.where(k > 1, (s2 - s * s / np.maximum(k, 1)) / np.maximum(k - 1, 1), np.nan)
                    values = np.sqrt(np.clip(var, 0.0, None))
        out[agg.name] = np.asarray(values, dtype="float64")
    out = out.drop_duplicates([ent, ts])
    order, _ = _entity_time_order(out[ent], out[ts].astype("int64").to_numpy())
    return out.take(order).reset_index(drop=True)


def run(w: World, quick: bool) -> list[Result]:
    import numpy as np

    from closedloop.core.schema import load_contract
    from closedloop.stages.aggregates import compute_entity_features

    contract = load_contract(REPO / "bench" / "schemas" / "transactions_30.yaml")
    ev, hist = events(w.rows, w.customers, w.n_days, contract.lookback.days)
    compute_entity_features(ev.head(1000), contract, hist.head(1000), closing_rows=True)  # first-use imports
    figure = measure(lambda: compute_entity_features(ev, contract, hist, closing_rows=True))
    floor = measure(lambda: cumulative_sums_floor(ev, contract, hist))
    a, b = figure.result, floor.result
    names = [agg.name for agg in contract.aggregates]
    differ = 0
    for c in (agg.name for agg in contract.aggregates):
        x, y = a[c].to_numpy(), b[c].to_numpy()
        differ += int((~np.isclose(x, y, rtol=1e-9, atol=0.0, equal_nan=True)).sum())
    return [Result.of(STAGE, f"{len(names)} aggregates, closing rows", w.rows, figure, floor,
                      frame_mib(ev) + frame_mib(hist), work_rows=len(ev) + len(hist),
                      notes=f"{len(a)} feature rows from {len(ev)} events + {len(hist)} of lookback, "
                            f"{w.customers} customers; floor: one cumulative sum over all entities (the method "
                            f"before issue 16); {differ} of {len(a) * len(names)} values differ beyond 1e-9 "
                            f"relative (the floor's rounding: e.g. the deviation of equal amounts)")]
