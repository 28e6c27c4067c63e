"""Labels that name no curated transaction of their grace period: counted, sampled, only a warning."""

from __future__ import annotations

from datetime import date, timedelta

import pandas as pd

from closedloop.core.lake import Lake
from closedloop.stages.ingest import UNKNOWN_LABELS_RULE, unknown_label_finding

DAY = date(2026, 2, 10)
GRACE = 3


def _lake(tmp_path, contract, ids_by_day: dict[date, list[str]], labels: list[str]) -> tuple[Lake, str]:
    lake = Lake(f"file://{tmp_path / 'lake'}")
    for d, ids in ids_by_day.items():
        lake.write_parquet(pd.DataFrame({contract.row_key: ids}), lake.partition("curated", "transactions", d))
    uri = lake.partition("landing", "labels", DAY)
    lake.write_parquet(pd.DataFrame({contract.row_key: labels}), uri)
    return lake, uri


def test_only_labels_without_a_transaction_in_the_period_are_counted_in_their_order(tmp_path, contract):
    days = {DAY - timedelta(days=i): [f"t{i}-{j}" for j in range(50)] for i in range(GRACE + 2)}
    # a day with a repeated id (the lookup then falls back to a plain membership test)
    days[DAY - timedelta(days=1)] += ["t1-0"]
    too_old = DAY - timedelta(days=GRACE + 1)
    labels = (["t0-3", "ghost-b", "t3-49", f"t{GRACE + 1}-7", "t1-0", "ghost-a", "t2-10"]
              + [f"t{i}-{j}" for i in range(GRACE + 1) for j in range(0, 50, 7)])
    lake, uri = _lake(tmp_path, contract, days, labels)
    cache: dict = {}

    finding = unknown_label_finding(lake, contract, DAY, uri, GRACE, cache)

    # the transaction of too_old is outside [DAY - GRACE, DAY]: its label is as unknown as the ghosts
    assert too_old not in cache and len(cache) == GRACE + 1
    assert finding.rule == UNKNOWN_LABELS_RULE and finding.column == contract.row_key
    assert finding.severity == "warn" and finding.unexpected_count == 3
    assert f"3 of {len(labels)} label(s)" in finding.message
    assert list(finding.sample)[:3] == ["ghost-b", f"t{GRACE + 1}-7", "ghost-a"]

    # the cache of ids serves the next label day; all known: no finding
    lake.write_parquet(pd.DataFrame({contract.row_key: ["t0-1", "t1-0", "t2-2"]}), uri)
    assert unknown_label_finding(lake, contract, DAY, uri, GRACE, cache) is None


def test_transactions_waiting_in_landing_count_as_known(tmp_path, contract):
    """Judged whatever waits in landing: a readable day not curated yet vouches for its own ids only."""
    lake, uri = _lake(tmp_path, contract, {DAY: ["a"]}, ["a", "b", "ghost"])
    lake.write_parquet(pd.DataFrame({contract.row_key: ["b"]}),
                       lake.partition("landing", "transactions", DAY - timedelta(days=1)))
    finding = unknown_label_finding(lake, contract, DAY, uri, GRACE)
    assert finding is not None and finding.unexpected_count == 1 and list(finding.sample) == ["ghost"]
