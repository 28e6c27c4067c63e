"""A training set written as ``build_training_set`` writes it, from splits a test already holds.

The label-abuse catalogues (tests/model/test_label_abuse.py, tests/model/test_flights_gate.py) relabel
splits in memory and hand them to ``train_and_log`` and the gate: Feast is not what they test.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pandas as pd

from closedloop.stages.features import SPLITS, frame_sha256
from closedloop.stages.runtime import Runtime


def write_training_set(rt: Runtime, key: str, parts: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Write ``parts`` (train, validation, holdout) under ``training_sets/<key>``; return its description."""
    c = rt.contract
    cols = [c.row_key, c.entity, c.event_timestamp, *c.model_features, c.label]
    uri = rt.lake.uri("training_sets", key)
    for name in SPLITS:
        rt.lake.write_parquet(parts[name][cols], f"{uri}/split={name}/part-0.parquet")
    digest = hashlib.sha256("".join(frame_sha256(parts[s][cols]) for s in SPLITS).encode()).hexdigest()
    return {"uri": uri, "key": key, "rows": {s: len(parts[s]) for s in SPLITS},
            "positives": {s: int(parts[s][c.label].sum()) for s in SPLITS}, "data_sha256": digest,
            "partitions": {}, "unlabelled_rows": 0}
