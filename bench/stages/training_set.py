"""Training set: the project's point-in-time join against a pandas ``merge_asof`` of the same rows.

Three lines:

- ``point-in-time join``: ``closedloop.stages.offline.point_in_time_features`` (what ``build_training_set`` calls:
  Feast's rules on the feature view's registered source, read in the window's range) on the window's
  labelled rows, against reading the same feature files with pyarrow and one
  ``pandas.merge_asof`` (by entity, backward, exact matches allowed, the view's TTL as tolerance);
- ``point-in-time join (Feast's get_historical_features)``: Feast's own join of the same rows
  (``closedloop.stages.features.historical_features``), the join before issue 23, against the same floor, its rows
  compared with the project's (up to 2M rows; ``CLOSEDLOOP_BENCH_FEAST_JOIN=0`` leaves it out);
- ``training set task``: ``closedloop.stages.retraining.build_training_set`` (what the DAG's task calls: read the
  curated window and its labels, the join, the time split, the Parquet parts) against the same steps in plain
  pandas/pyarrow with the ``merge_asof``.

Both run on a copy of the world's curated zone made of hard links (no bytes copied) with a Feast registry of
their own, so the training set the task writes lands in that copy, not in the world. The floor's features are
compared with Feast's, row by row.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from common import Result, World, frame_mib, measure

from stages.materialisation import fresh_runtime

STAGE = "training_set"


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` holds the files of ``src`` as hard links (the lake writes new files, never into old ones)."""
    shutil.copytree(src, dst, copy_function=os.link)


# -- the floor ------------------------------------------------------------------------------------
def read_features(rt: Any) -> Any:
    import glob

    import pyarrow.dataset as ds

    c = rt.contract
    files = sorted(glob.glob(rt.defs.source.path))
    return ds.dataset(files, format="parquet").to_table(
        columns=[c.entity, c.event_timestamp, *c.entity_features]).to_pandas()


def asof_join(rows: Any, feats: Any, contract: Any) -> Any:
    """``rows`` with the latest feature row of the same entity at or before each row's time, within the TTL."""
    import pandas as pd

    ent, ts = contract.entity, contract.event_timestamp
    feats[ts] = feats[ts].astype(rows[ts].dtype)  # in place: one copy of the feature history at a time
    feats = feats.sort_values(ts, kind="stable")
    left = rows.drop(columns=[c for c in contract.entity_features if c in rows]).sort_values(ts, kind="stable")
    return pd.merge_asof(left, feats, on=ts, by=ent, direction="backward", tolerance=contract.ttl,
                         allow_exact_matches=True)


def floor_task(rt: Any, start: Any, end: Any, grace: int, split: dict[str, Any], part_rows: int,
               out: Path) -> int:
    """Read the curated window and its labels, join them, merge_asof the features, split by time, write parts."""
    import pandas as pd

    from closedloop.core.lake import days_between
    from closedloop.stages.features import SPLITS, time_split

    c, lake = rt.contract, rt.lake
    tx = pd.concat([pd.read_parquet(lake.local_path(lake.partition("curated", "transactions", d)))
                    for d in days_between(start, end)], ignore_index=True)
    label_days = [d for d in lake.list_days("curated", "labels") if start <= d < end + timedelta(days=grace)]
    labels = pd.concat([pd.read_parquet(lake.local_path(lake.partition("curated", "labels", d)),
                                        columns=[c.row_key, c.label, c.label_timestamp]) for d in label_days],
                       ignore_index=True)
    labels = labels.sort_values(c.label_timestamp, kind="stable").drop_duplicates(c.row_key, keep="last")
    where = pd.Index(labels[c.row_key]).get_indexer(tx[c.row_key])  # a hash lookup, as the project's
    labelled = tx[where >= 0].reset_index(drop=True)
    labelled[c.label] = labels[c.label].to_numpy()[where[where >= 0]]
    full = asof_join(labelled, read_features(rt), c)
    full = full[[c.row_key, c.entity, c.event_timestamp, *c.model_features, c.label]]
    parts = time_split(full, c, split)
    for name in SPLITS:
        frame = parts[name]
        for n, i in enumerate(range(0, max(len(frame), 1), part_rows)):
            path = out / f"split={name}" / f"part-{n:05d}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.iloc[i:i + part_rows].to_parquet(path, index=False)
    return len(full)


def mismatches(project: Any, floor: Any, contract: Any) -> int:
    """Rows whose entity features differ between the two joins (NaN equals NaN), aligned on the row key."""
    import numpy as np
    import pandas as pd

    key, feats = contract.row_key, contract.entity_features
    where = pd.Index(floor[key]).get_indexer(project[key])
    missing = int((where < 0).sum())
    x = project[feats].to_numpy(dtype="float64")[where >= 0]
    y = floor[feats].to_numpy(dtype="float64")[where[where >= 0]]
    same = np.isclose(x, y, rtol=1e-9, atol=1e-9) | (np.isnan(x) & np.isnan(y))
    return int((~same.all(axis=1)).sum()) + missing + abs(len(project) - len(floor))


# -- the stage -------------------------------------------------------------------------------------
def run(w: World, quick: bool) -> list[Result]:
    from closedloop.stages import retraining as stages
    from closedloop.stages.features import (
        apply_definitions,
        historical_features,
        read_labelled_window,
    )
    from closedloop.stages.offline import point_in_time_features

    # Feast's own join beside it (the figure before issue 23), up to 2M (at 10M it took 230 s)
    feast = w.rows <= 2_000_000 and os.environ.get("CLOSEDLOOP_BENCH_FEAST_JOIN", "1") != "0"

    w.ingested()
    w.runtime()
    results: list[Result] = []
    tmp = Path(tempfile.mkdtemp(prefix="training-set-", dir=w.home))
    try:
        link_tree(w.home / "lake" / "curated", tmp / "lake" / "curated")
        rt = fresh_runtime(w, tmp / "home", lake=tmp / "lake")
        c, cfg = rt.contract, rt.settings.config
        apply_definitions(rt.store, rt.defs)
        grace = cfg.typed.ingest.label_grace_days
        labelled, _, _ = read_labelled_window(rt.lake, c, w.window.start, w.window.end, grace)
        historical_features(rt.store, rt.defs, labelled.head(100), c)  # Feast's, DuckDB's first-use setup
        point_in_time_features(rt.store, rt.defs, labelled.head(100), c)  # the reader's view and connection
        data_mib = frame_mib(labelled)

        figure = measure(lambda: point_in_time_features(rt.store, rt.defs, labelled, c))
        # only what the comparison needs is kept while the floor runs (at 10M the stage held both whole results
        # and the feature history at once, and passed 24 GiB)
        project = figure.result[[c.row_key, *c.entity_features]]
        figure.result = None
        floor = measure(lambda: asof_join(labelled, read_features(rt), c))
        diff = mismatches(project, floor.result, c)
        floor.result = None
        results.append(Result.of(
            STAGE, "point-in-time join", w.rows, figure, floor, data_mib, work_rows=len(labelled),
            notes=f"{len(labelled)} labelled rows x {len(c.entity_features)} features; closedloop.stages.offline "
                  f"(Feast's rules on the registered source, read in the window's range by DuckDB); floor: "
                  f"pyarrow read of "
                  f"the feature files + merge_asof (by entity, backward, TTL {c.ttl.days} d); rows differing: {diff}"))
        if feast:
            feast_figure = measure(lambda: historical_features(rt.store, rt.defs, labelled, c))
            same = mismatches(project, feast_figure.result[[c.row_key, *c.entity_features]], c)
            feast_figure.result = None
            results.append(Result.of(
                STAGE, "point-in-time join (Feast's get_historical_features)", w.rows, feast_figure, floor,
                data_mib, work_rows=len(labelled),
                notes=f"the join before issue 23: Feast get_historical_features (DuckDB, the whole history scanned "
                      f"per call); floor as above; rows differing from closedloop.stages.offline's: {same}"))
            del feast_figure
        del project, figure, floor
        labelled = None  # the task reads the window itself

        split, part_rows = cfg.typed.training.split.model_dump(exclude_none=True), cfg.typed.training.part_rows
        figure = measure(lambda: stages.build_training_set(rt, w.window))
        floor = measure(lambda: floor_task(rt, w.window.start, w.window.end, grace, split, part_rows,
                                           tmp / "floor"))
        results.append(Result.of(
            STAGE, "training set task", w.rows, figure, floor, data_mib, work_rows=sum(figure.result["rows"].values()),
            notes="build_training_set: read window + labels, point-in-time join (closedloop.stages.offline), "
                  "time split, Parquet parts; floor: the same in pandas with merge_asof"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results
