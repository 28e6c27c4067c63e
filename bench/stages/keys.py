"""Keys across days: the index behind ingest's check that a new day repeats no id curated on another day.

``CuratedIds`` (closedloop.stages.ingest) on a lake holding the world's ids curated over its days (fingerprint files
written as ingest writes them): the first check of a process (reading every day's fingerprints, one sort)
and the check of one new day's ids, against a floor that does the same with the ids themselves: read every
curated day's id column and one hash lookup of the new day's ids in them.
"""

from __future__ import annotations

import tempfile
from datetime import date, timedelta
from typing import Any

from common import REPO, Result, World, measure

STAGE = "keys"


def run(w: World, quick: bool) -> list[Result]:
    import numpy as np
    import pandas as pd

    from closedloop.core.lake import Lake
    from closedloop.core.schema import load_contract
    from closedloop.stages.ingest import CuratedIds

    contract = load_contract(REPO / "bench" / "schemas" / "transactions_30.yaml")
    key = contract.row_key
    days = w.n_days + contract.lookback.days  # what a window's ingest holds curated
    per_day = w.rows // w.n_days
    first = date(2026, 1, 1)
    with tempfile.TemporaryDirectory(dir=REPO / ".bench" if (REPO / ".bench").exists() else None) as tmp:
        lake = Lake(f"file://{tmp}/lake")
        writer = CuratedIds(lake, contract)
        for i in range(days):
            ids = pd.Series([f"t{j:011d}" for j in range(i * per_day, (i + 1) * per_day)])
            lake.write_parquet(pd.DataFrame({key: ids}), lake.partition("curated", "transactions",
                                                                         first + timedelta(days=i)))
            writer.add(first + timedelta(days=i), ids)
        new_day = first + timedelta(days=days)
        fresh = pd.Series([f"n{j:011d}" for j in range(per_day)])
        repeated = fresh.copy()
        repeated.iloc[::1000] = [f"t{j:011d}" for j in range(0, len(repeated.iloc[::1000]) * 7919, 7919)]

        def project() -> Any:
            index = CuratedIds(lake, contract)
            return index.repeated_finding(fresh, new_day), index.repeated_finding(repeated, new_day)

        def floor() -> Any:
            known = pd.Index(pd.concat([lake.read_parquet(lake.partition("curated", "transactions", d),
                                                          columns=[key])[key]
                                        for d in lake.list_days("curated", "transactions")], ignore_index=True))
            return int(fresh.isin(known).sum()), int(repeated.isin(known).sum())

        figure, base = measure(project), measure(floor)
        clean, dirty = figure.result
        assert clean is None and dirty is not None and dirty.unexpected_count == base.result[1], (dirty, base.result)
        index_mib = sum(np.dtype(np.uint64).itemsize for _ in range(1)) * days * per_day / 2**20
    return [Result.of(STAGE, "new day vs every curated id", w.rows, figure, base, index_mib,
                      work_rows=days * per_day,
                      notes=f"{days} curated days x {per_day} ids, then two new days of {per_day} ids (one clean, one "
                            f"with {dirty.unexpected_count} repeats) in a fresh process state; floor: every day's id "
                            f"column read and one hash lookup; data = the fingerprint files (8 bytes an id)")]
