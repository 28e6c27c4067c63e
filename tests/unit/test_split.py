"""The time-based split of a training set: by fractions, or by whole days for drift-triggered runs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from closedloop.stages.features import time_split


@pytest.fixture
def frame(contract) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 1400
    ts = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(rng.uniform(0, 14 * 86400, n), unit="s")
    return pd.DataFrame({contract.row_key: [f"t{i:05d}" for i in range(n)], contract.event_timestamp: ts,
                         contract.label: rng.integers(0, 2, n)})


def test_fractions_split_in_time_order(frame, contract):
    parts = time_split(frame, contract, {"train": 0.7, "validation": 0.15, "holdout": 0.15})
    assert [len(parts[s]) for s in ("train", "validation", "holdout")] == [980, 210, 210]
    ts = contract.event_timestamp
    assert parts["train"][ts].max() <= parts["validation"][ts].min() <= parts["holdout"][ts].min()


def test_holdout_days_hold_out_the_last_days_and_validate_on_a_random_share(frame, contract):
    parts = time_split(frame, contract, {"train": 0.7, "validation": 0.15, "holdout": 0.15, "holdout_days": 1})
    ts = contract.event_timestamp
    last_day = pd.Timestamp("2026-01-14", tz="UTC")
    assert (parts["holdout"][ts] >= last_day).all()
    assert (parts["train"][ts] < last_day).all() and (parts["validation"][ts] < last_day).all()
    assert len(parts["holdout"]) == int((frame[ts] >= last_day).sum())
    # the training part reaches the day before the holdout (the newest regime is learnt from)
    assert parts["train"][ts].max() >= last_day - pd.Timedelta(hours=6)
    share = len(parts["validation"]) / (len(parts["train"]) + len(parts["validation"]))
    assert share == pytest.approx(0.15 / 0.85, abs=0.01)
    ids = pd.concat([parts[s][contract.row_key] for s in parts])
    assert ids.is_unique and len(ids) == len(frame)


def test_validation_days(frame, contract):
    parts = time_split(frame, contract, {"train": 0.7, "validation": 0.15, "holdout": 0.15, "holdout_days": 2,
                                         "validation_days": 3})
    ts = contract.event_timestamp
    assert parts["validation"][ts].min() >= pd.Timestamp("2026-01-10", tz="UTC")
    assert parts["holdout"][ts].min() >= pd.Timestamp("2026-01-13", tz="UTC")
    assert parts["train"][ts].max() < pd.Timestamp("2026-01-10", tz="UTC")
