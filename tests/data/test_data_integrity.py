"""Data that cannot be silently wrong: hostile but plausible deliveries, each against a control run.

Each case delivers something bad into a copy of one lake (earlier days curated) and the same lake receives,
as the control, nothing or the good version of it. What must hold: the bad delivery is refused or left out
with a message naming what, where and why; and nothing downstream differs from the control (the curated
transactions, every customer's feature rows to 1e-9 relative, the labelled rows a training set is built
from): RELIABILITY.md's "corrupted downstream" column (tests/support/corruption.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support.corruption import corrupted, differences

from closedloop.core.errors import ConfigError, DataValidationError, NoDataError, PermanentError
from closedloop.core.lake import Lake
from closedloop.devtools.generate import GeneratorConfig, generate
from closedloop.stages import quarantine as q
from closedloop.stages import validation as v
from closedloop.stages.features import read_labelled_window
from closedloop.stages.ingest import REPEATED_IDS_RULE, CuratedIds, ingest_partition, ingest_window, read_marker

START = date(2026, 6, 1)
DAYS = 6
DAY = START + timedelta(days=DAYS - 1)  # the day every case delivers


@pytest.fixture(scope="module")
def template(contract, tmp_path_factory):
    """A lake whose transactions and labels before DAY are curated, and DAY's valid partitions (set aside)."""
    root = tmp_path_factory.mktemp("integrity") / "lake"
    lake = Lake(f"file://{root}")
    generate(GeneratorConfig(start=START, days=DAYS, customers=80, transactions_per_day=250, seed=23), lake,
             contract)
    good = {}
    for kind in ("transactions", "labels"):
        uri = lake.partition("landing", kind, DAY)
        good[kind] = lake.read_parquet(uri)
        lake.delete(uri)
    for kind in ("transactions", "labels"):
        for d in lake.list_days("landing", kind):
            ingest_partition(lake, contract, kind, d, label_grace_days=DAYS)
    return root, good


def _lake(template, path: Path) -> Lake:
    shutil.copytree(template[0], path)
    return Lake(f"file://{path}")


def _state(lake: Lake, contract) -> dict[str, pd.DataFrame]:
    """What downstream reads: curated transactions, every feature row, curated labels."""
    def read(kind: str) -> pd.DataFrame:
        days = lake.list_days("curated", kind)
        return lake.read_parquet_many([lake.partition("curated", kind, d) for d in days])

    return {"transactions": read("transactions"), "features": read(contract.feature_view),
            "labels": read("labels")}


def _compare(control: dict, treated: dict, contract) -> dict[str, tuple]:
    return {
        "curated_transactions": differences(control["transactions"], treated["transactions"], [contract.row_key]),
        "feature_rows": differences(control["features"], treated["features"],
                                    [contract.entity, contract.event_timestamp]),
        "curated_labels": differences(control["labels"], treated["labels"], [contract.row_key]),
    }


def _rejected(lake: Lake, contract, kind: str, rule: str) -> tuple[str, dict]:
    with pytest.raises(DataValidationError) as err:
        ingest_partition(lake, contract, kind, DAY)
    assert isinstance(err.value, PermanentError)  # the DAG fails the task now: no retry
    report = lake.read_json(lake.partition("quarantine", kind, DAY, ".validation.json"))
    assert any(f["rule"] == rule for f in report["findings"]), report["findings"]
    assert read_marker(lake, kind, DAY) is None and lake.entry_kind(lake.partition("landing", kind, DAY)) == "missing"
    return str(err.value), report


def test_a_transaction_id_curated_on_another_day_blocks_the_new_day(template, contract, tmp_path, reliability):
    _, good = template
    control, treated = _lake(template, tmp_path / "control"), _lake(template, tmp_path / "treated")
    earlier = START + timedelta(days=2)
    old_ids = treated.read_parquet(treated.partition("curated", "transactions", earlier))[contract.row_key]
    bad = good["transactions"].copy()
    bad.loc[bad.index[[3, 40, 77]], contract.row_key] = old_ids.iloc[[0, 5, 9]].to_numpy()
    treated.write_parquet(bad, treated.partition("landing", "transactions", DAY))

    message, _ = _rejected(treated, contract, "transactions", REPEATED_IDS_RULE)
    assert earlier.isoformat() in message and DAY.isoformat() in message and "3 transaction_id" in message
    assert str(old_ids.iloc[0]) in message
    assert not treated.exists(treated.partition("curated", contract.feature_view, DAY))
    measure = _compare(_state(control, contract), _state(treated, contract), contract)
    assert corrupted(**measure) == "nothing", measure
    # the corrected delivery goes through, and matches the control's curation of the good day
    treated.write_parquet(good["transactions"], treated.partition("landing", "transactions", DAY))
    control.write_parquet(good["transactions"], control.partition("landing", "transactions", DAY))
    for lake in (treated, control):
        assert ingest_partition(lake, contract, "transactions", DAY).status == "curated"
    measure = _compare(_state(control, contract), _state(treated, contract), contract)
    reliability.record("integrity", "transaction ids already curated on another day, delivered again in a new day",
                       f"rejected at ingest: {REPEATED_IDS_RULE}, quarantined naming both days and the ids; "
                       f"the corrected day was curated",
                       corrupted=corrupted(**measure))


def test_the_id_index_finds_repeats_in_days_curated_during_the_same_run(template, contract, tmp_path):
    """The index is shared by the days of a window: a day curated a moment ago is searched too."""
    _, good = template
    lake = _lake(template, tmp_path / "lake")
    index = CuratedIds(lake, contract)
    assert index.repeated_finding(good["transactions"][contract.row_key], DAY) is None  # loads the index files
    lake.write_parquet(good["transactions"], lake.partition("landing", "transactions", DAY))
    ingest_partition(lake, contract, "transactions", DAY, id_index=index)
    again = good["transactions"][contract.row_key].iloc[:4]
    finding = index.repeated_finding(again, DAY + timedelta(days=1))
    assert finding is not None and finding.unexpected_count == 4 and DAY.isoformat() in finding.message
    assert index.repeated_finding(again, DAY) is None  # a corrected delivery of the same day is no repeat


def test_an_integer_beyond_the_contract_type_is_rejected_with_its_column(template, contract, tmp_path,
                                                                          reliability):
    _, good = template
    control, treated = _lake(template, tmp_path / "control"), _lake(template, tmp_path / "treated")
    bad = good["transactions"].copy()
    bad[contract.entity] = bad[contract.entity].astype("uint64")
    bad.loc[bad.index[7], contract.entity] = np.uint64(2**63 + 5)  # would wrap to a negative int64
    treated.write_parquet(bad, treated.partition("landing", "transactions", DAY))

    message, _ = _rejected(treated, contract, "transactions", v.TYPE_RULE)
    assert f"column {contract.entity!r}" in message and "int64 range" in message and str(2**63 + 5) in message
    measure = _compare(_state(control, contract), _state(treated, contract), contract)
    assert corrupted(**measure) == "nothing"
    assert (_state(treated, contract)["features"][contract.entity] >= 0).all()
    reliability.record("integrity", "an integer id beyond the contract's int64 (2^63 + 5, as uint64)",
                       f"rejected: {v.TYPE_RULE} on {contract.entity} (outside the int64 range); quarantined",
                       corrupted=corrupted(**measure))


def _folder_of_parts(lake: Lake, uri: str, frame: pd.DataFrame) -> None:
    path = Path(lake.local_path(uri))
    path.mkdir(parents=True)
    half = len(frame) // 2
    frame.iloc[:half].to_parquet(path / "part-0.parquet", index=False)
    frame.iloc[half:].to_parquet(path / "part-1.parquet", index=False)


def _link_to_a_good_file(lake: Lake, uri: str, frame: pd.DataFrame) -> None:
    target = Path(lake.local_path(uri)).parent.parent.parent / "elsewhere.parquet"
    frame.to_parquet(target, index=False)
    os.symlink(target, lake.local_path(uri))


def _socket(lake: Lake, uri: str, frame: pd.DataFrame) -> None:
    folder, name = os.path.split(lake.local_path(uri))
    s, cwd = socket.socket(socket.AF_UNIX), os.getcwd()
    os.chdir(folder)  # AF_UNIX paths are short: bind the name from its folder
    try:
        s.bind(name)
    finally:
        os.chdir(cwd)
        s.close()


@pytest.mark.parametrize(("name", "make", "entry"), [
    ("a day delivered as a folder of Parquet parts", _folder_of_parts, "directory"),
    ("a symbolic link in landing (to a valid file)", _link_to_a_good_file, "symlink"),
    ("a socket in landing", _socket, "socket"),
])
def test_what_is_not_a_regular_file_is_quarantined_as_unreadable(template, contract, tmp_path, reliability, name,
                                                                  make, entry):
    _, good = template
    control, treated = _lake(template, tmp_path / "control"), _lake(template, tmp_path / "treated")
    uri = treated.partition("landing", "transactions", DAY)
    make(treated, uri, good["transactions"])
    assert DAY in treated.list_days("landing", "transactions")  # it is planned like any delivery

    message, _ = _rejected(treated, contract, "transactions", v.READABLE_RULE)
    assert f"{DAY}.parquet in landing is" in message and "not a regular Parquet file" in message
    assert treated.entry_kind(treated.partition("quarantine", "transactions", DAY)) == entry  # moved as it was
    measure = _compare(_state(control, contract), _state(treated, contract), contract)
    assert corrupted(**measure) == "nothing"
    # the next run finds the partition quarantined (no retry reads it again)
    with pytest.raises(DataValidationError):
        ingest_partition(treated, contract, "transactions", DAY)
    # the quarantine commands show it without reading it, and release the corrected file in its place
    listed = [e for e in q.list_quarantine(treated) if e["day"] == DAY.isoformat()]
    assert len(listed) == 1 and listed[0]["entry"] == entry and listed[0]["blocking"]
    with pytest.raises(ConfigError, match=f"is a {entry}, not a Parquet file"):
        q.release(treated, contract, "transactions", DAY, reason="test")
    fixed = tmp_path / "fixed.parquet"
    good["transactions"].to_parquet(fixed, index=False)
    assert q.release(treated, contract, "transactions", DAY, reason="one file now",
                     fixed_file=fixed)["status"] == "released"
    assert read_marker(treated, "transactions", DAY) is not None
    reliability.record("integrity", name, f"rejected: {v.READABLE_RULE} naming the entry, never opened nor "
                                          f"retried; moved to quarantine as it was (listed by `closedloop "
                                          f"quarantine list`); the corrected file was released and curated",
                       corrupted=corrupted(**measure))


def test_labels_stamped_before_their_transaction_never_reach_a_training_set(template, contract, tmp_path,
                                                                            reliability, caplog):
    _, good = template
    control, treated = _lake(template, tmp_path / "control"), _lake(template, tmp_path / "treated")
    for lake in (control, treated):
        lake.write_parquet(good["transactions"], lake.partition("landing", "transactions", DAY))
        ingest_partition(lake, contract, "transactions", DAY)
    # labels of DAY's transactions, delivered the same day (a label's time must lie in its partition's day)
    tx = treated.read_parquet(treated.partition("curated", "transactions", DAY))
    tx = tx[tx[contract.event_timestamp] >= pd.Timestamp(DAY, tz="UTC") + pd.Timedelta(hours=2)]
    end = pd.Timestamp(DAY, tz="UTC") + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
    labels = pd.DataFrame({contract.row_key: tx[contract.row_key].to_numpy(),
                           contract.label: (np.arange(len(tx)) % 7 == 0).astype("int64"),
                           contract.label_timestamp: np.minimum(tx[contract.event_timestamp] + pd.Timedelta(
                               minutes=30), end).to_numpy()})
    event = tx[contract.event_timestamp].to_numpy()
    early, same = labels.index[::9], labels.index[4::9]
    labels.loc[early, contract.label_timestamp] = event[early] - pd.Timedelta(hours=1)
    labels.loc[same, contract.label_timestamp] = event[same]  # at the very instant: allowed
    treated.write_parquet(labels, treated.partition("landing", "labels", DAY))
    control.write_parquet(labels.drop(index=early), control.partition("landing", "labels", DAY))
    for lake in (control, treated):
        assert ingest_partition(lake, contract, "labels", DAY, label_grace_days=DAYS).status == "curated"

    with caplog.at_level(logging.WARNING, logger="closedloop.stages.features"):
        rows, _, unlabelled = read_labelled_window(treated, contract, START, DAY + timedelta(days=1), 0)
    want, _, control_unlabelled = read_labelled_window(control, contract, START, DAY + timedelta(days=1), 0)
    assert rows.attrs["labels_before_event"] == len(early) and unlabelled == control_unlabelled
    assert not set(labels.loc[early, contract.row_key]) & set(rows[contract.row_key])
    assert set(labels.loc[same, contract.row_key]) <= set(rows[contract.row_key])
    assert f"{len(early)} label(s) stamped before their transaction" in caplog.text
    measure = {"training_set_rows": differences(want, rows, [contract.row_key])}
    assert corrupted(**measure) == "nothing"
    reliability.record("integrity", "labels stamped before their transaction's event time",
                       f"left out of the training set with a warning naming them ({len(early)} of {len(labels)}; "
                       f"labels at the event's very instant kept)", corrupted=corrupted(**measure))


def test_the_unknown_label_check_runs_whatever_else_sits_in_landing(template, contract, tmp_path, reliability):
    from closedloop.stages.ingest import UNKNOWN_LABELS_RULE, unknown_label_finding

    _, good = template
    control, treated = _lake(template, tmp_path / "control"), _lake(template, tmp_path / "treated")
    _folder_of_parts(treated, treated.partition("landing", "transactions", DAY), good["transactions"])
    labels = good["labels"].copy()
    labels.loc[labels.index[:5], contract.row_key] = [f"ghost-{i}" for i in range(5)]
    for lake in (control, treated):
        lake.write_parquet(labels, lake.partition("landing", "labels", DAY))
        outcome = ingest_partition(lake, contract, "labels", DAY, label_grace_days=DAYS)
        assert outcome.status == "curated"
        assert any(w.startswith(UNKNOWN_LABELS_RULE) and "5 of" in w for w in outcome.warnings), outcome.warnings
    assert any(f"not judged: {DAY}" in w for w in outcome.warnings)  # the treated lake's folder, named
    measure = _compare(_state(control, contract), _state(treated, contract), contract)
    assert corrupted(**measure) == "nothing"
    # a readable day waiting in landing vouches for its own ids
    uri = treated.partition("landing", "labels", DAY)
    treated.delete(treated.partition("landing", "transactions", DAY), recursive=True)
    treated.write_parquet(good["transactions"], treated.partition("landing", "transactions", DAY))
    finding = unknown_label_finding(treated, contract, DAY, uri, DAYS)
    assert finding.unexpected_count == 5 and "not judged" not in finding.message
    reliability.record("integrity", "labels delivered while a transactions day in landing is a folder of parts",
                       f"warned: {UNKNOWN_LABELS_RULE} judged all the same (5 unknown ids named), the unreadable "
                       f"day named as not judged; readable days waiting in landing count as known",
                       corrupted=corrupted(**measure))


def test_a_window_after_the_newest_data_is_refused_before_any_write(template, contract, tmp_path, reliability):
    lake = _lake(template, tmp_path / "lake")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "lake").rglob("*"))
    late = DAY + timedelta(days=10)
    with pytest.raises(NoDataError, match=r"starts after the newest transactions landed or curated"):
        ingest_window(lake, contract, late, late + timedelta(days=7), label_grace_days=3)
    with pytest.raises(NoDataError, match=r"no transactions partition landed"):  # a daily ingest of a late day
        ingest_partition(lake, contract, "transactions", late)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "lake").rglob("*")) == before
    reliability.record("integrity", "a run window after the newest landed data",
                       "refused (NoDataError naming the newest day) before any lake write: the lake's files are "
                       "the same as before", corrupted="nothing")
