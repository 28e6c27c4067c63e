"""The labelled rows of a window: each curated transaction with its latest label, in order, nothing invented."""

from __future__ import annotations

from datetime import date, timedelta

import pandas as pd
import pytest

from closedloop.core.errors import PermanentError
from closedloop.core.lake import Lake
from closedloop.stages.features import read_labelled_window
from closedloop.stages.ingest import marker_uri

START = date(2026, 3, 1)


def _curate(lake: Lake, kind: str, day: date, frame: pd.DataFrame) -> None:
    uri = lake.partition("curated", kind, day)
    lake.write_parquet(frame, uri)
    lake.write_json(marker_uri(lake, kind, day), {"uri": f"landing/{kind}/{day}", "sha256": f"{kind}-{day}"})


def _tx(contract, ids: list[str], day: date) -> pd.DataFrame:
    return pd.DataFrame({contract.row_key: ids, contract.entity: range(len(ids)),
                         contract.event_timestamp: pd.Timestamp(day, tz="UTC") + pd.to_timedelta(range(len(ids)),
                                                                                                  unit="min"),
                         "amount": [10.0 * (i + 1) for i in range(len(ids))]})


def _labels(contract, rows: list[tuple[str, int, str]]) -> pd.DataFrame:
    return pd.DataFrame({contract.row_key: [r[0] for r in rows], contract.label: [r[1] for r in rows],
                         contract.label_timestamp: pd.to_datetime([r[2] for r in rows], utc=True)})


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(f"file://{tmp_path / 'lake'}")


def test_each_transaction_gets_its_latest_label_and_unlabelled_ones_are_counted(lake, contract):
    _curate(lake, "transactions", START, _tx(contract, ["b", "a", "c", "d"], START))
    _curate(lake, "transactions", START + timedelta(days=1), _tx(contract, ["e", "f"], START + timedelta(days=1)))
    # a: corrected the next day (1 -> 0); b: corrected at the same instant, the later file wins;
    # e: corrected earlier than its first label (the later label_timestamp wins, not the later file);
    # c and f: never labelled; z: a label for no transaction of the window
    _curate(lake, "labels", START + timedelta(days=1), _labels(contract, [
        ("a", 1, "2026-03-02 08:00"), ("b", 0, "2026-03-02 09:00"), ("e", 1, "2026-03-02 12:00"),
        ("z", 1, "2026-03-02 12:00")]))
    _curate(lake, "labels", START + timedelta(days=2), _labels(contract, [
        ("a", 0, "2026-03-03 08:00"), ("b", 1, "2026-03-02 09:00"), ("d", 1, "2026-03-03 10:00"),
        ("e", 0, "2026-03-01 12:00")]))

    labelled, partitions, unlabelled = read_labelled_window(lake, contract, START, START + timedelta(days=2), 5)

    assert labelled[contract.row_key].tolist() == ["b", "a", "d", "e"]   # the transactions' order
    assert labelled[contract.label].tolist() == [1, 0, 1, 1]
    assert labelled["amount"].tolist() == [10.0, 20.0, 40.0, 10.0]     # each row its own transaction's values
    assert unlabelled == 2
    assert labelled.index.tolist() == [0, 1, 2, 3]
    assert len(partitions) == 4


def test_a_transaction_id_repeated_across_days_is_refused_naming_the_key(lake, contract):
    _curate(lake, "transactions", START, _tx(contract, ["a", "b"], START))
    _curate(lake, "transactions", START + timedelta(days=1), _tx(contract, ["b"], START + timedelta(days=1)))
    _curate(lake, "labels", START + timedelta(days=1), _labels(contract, [("a", 1, "2026-03-02 08:00")]))
    with pytest.raises(PermanentError, match=f"repeat {contract.row_key} values, e.g. \\['b'\\]"):
        read_labelled_window(lake, contract, START, START + timedelta(days=2), 5)
