"""The "corrupted downstream" measure of RELIABILITY.md: what a bad delivery changed compared with a control.

A case runs twice: once with the bad delivery (the treated run) and once without it (the control). What must
not differ is everything the bad delivery has no business changing: the feature rows of the other entities
(numbers to 1e-9 relative), the training set's rows, the online store's rows. :func:`differences` compares
two frames row by row on their keys; :func:`corrupted` turns the comparisons of one case into the cell of
RELIABILITY.md ("nothing" when every comparison is clean).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

RTOL = 1e-9


def differences(control: pd.DataFrame, treated: pd.DataFrame, keys: list[str], *, rtol: float = RTOL,
                columns: list[str] | None = None) -> tuple[int, int, list[str]]:
    """(rows that differ, rows compared, up to three examples) between two frames keyed by ``keys``.

    A row is different when it is missing from either side or when one of ``columns`` (all shared columns by
    default) differs: numbers beyond ``rtol`` relative (NaN equals NaN, an infinity only itself), anything
    else by equality.
    """
    cols = columns or [c for c in control.columns if c in treated.columns and c not in keys]
    a = control.set_index(keys)[cols]
    b = treated.set_index(keys)[cols]
    for side, name in ((a, "control"), (b, "treated")):
        if not side.index.is_unique:
            raise ValueError(f"the {name} frame repeats keys {keys}: rows cannot be compared")
    both = a.index.intersection(b.index)
    only = a.index.symmetric_difference(b.index)
    a, b = a.loc[both], b.loc[both]
    bad = np.zeros(len(both), dtype=bool)
    for c in cols:
        x, y = a[c], b[c]
        if pd.api.types.is_numeric_dtype(x) and pd.api.types.is_numeric_dtype(y) and not (
                pd.api.types.is_bool_dtype(x) or pd.api.types.is_bool_dtype(y)):
            xv, yv = x.to_numpy("float64"), y.to_numpy("float64")
            same = np.isclose(xv, yv, rtol=rtol, atol=0.0, equal_nan=True) | (xv == yv)
        else:
            same = ((x == y) | (x.isna() & y.isna())).to_numpy(bool)
        bad |= ~same
    examples = [f"{k} missing on one side" for k in list(only[:3])]
    examples += [f"{k}: {dict(a.loc[k])} -> {dict(b.loc[k])}" for k in list(both[bad][: 3 - len(examples)])]
    return int(bad.sum()) + len(only), len(both) + len(only), examples


def corrupted(**comparisons: tuple[int, int, list[str]]) -> str:
    """The RELIABILITY.md cell for one case: "nothing", or each comparison that found differences."""
    parts = [f"{name.replace('_', ' ')}: {n} of {total} rows differ (e.g. {'; '.join(ex)[:200]})"
             for name, (n, total, ex) in comparisons.items() if n]
    if not any(total for _, total, _ in comparisons.values()):
        raise ValueError("nothing was compared: a control measure needs rows")
    return "; ".join(parts) if parts else "nothing"


def measured(**comparisons: tuple[int, int, list[str]]) -> str:
    """What was compared, for the outcome text: e.g. "other customers' feature rows 1200, training set 800"."""
    return ", ".join(f"{name.replace('_', ' ')} {total}" for name, (_, total, _) in comparisons.items())
