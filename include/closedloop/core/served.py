"""The served log in the lake: where online serving writes each prediction it made, read back by the skew check.

``served/<kind>/<day>/part-*.parquet``, ``kind`` being ``transactions`` (what was answered) or ``shadow`` (the
challenger's scores of a share of the same requests). Written by :class:`closedloop.adapters.serving.ServedLog`.
"""

from __future__ import annotations

from datetime import date
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.core.lake import Lake

SERVED, SHADOW = "transactions", "shadow"


def served_uri(lake: Lake, kind: str, day: date) -> str:
    """The folder of one day of served predictions (``kind``: transactions or shadow)."""
    return lake.uri("served", kind, day.isoformat())


def read_served(lake: Lake, day: date, kind: str = SERVED) -> pd.DataFrame:
    """Every prediction logged on ``day`` (an empty frame when there is none)."""
    base = served_uri(lake, kind, day)
    if not lake.exists(base):
        import pandas as pd

        return pd.DataFrame()
    files = sorted(p for p in lake.fs.ls(lake.local_path(base), detail=False)  # a path, whatever the store
                   if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"))
    return lake.read_parquet_many([f"{base}/{p.rsplit('/', 1)[-1]}" for p in files])
