"""Window guards through the real DAGs: a retraining window after the newest landed data is refused before any
Feast or lake write, and the online store's high-water mark never runs ahead of the curated data.

Treated home: the retraining DAG on a window after the data (refused), then the ingest DAG on a normal day,
then (function level) a materialisation asked for a far window. Control home: the same data, only the
ingest DAG on the normal day. The online store's rows and the lake must not differ between them.
"""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from support.corruption import corrupted, differences

from closedloop.core.runconf import Window
from closedloop.devtools.generate import GeneratorConfig
from closedloop.stages.features import materialised_until

pytestmark = pytest.mark.integration

START = date(2026, 7, 1)
CONFIG = GeneratorConfig(start=START, days=3, customers=60, transactions_per_day=200, seed=31)
DAY = START + timedelta(days=2)  # the newest landed day
LATE = {"window_start": (DAY + timedelta(days=20)).isoformat(), "window_end": (DAY + timedelta(days=27)).isoformat()}


def _files(rt) -> list[str]:
    root = Path(rt.lake.local_path(rt.lake.uri()))
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _online(rt) -> pd.DataFrame:
    c = rt.contract
    ids = sorted(set(rt.lake.read_parquet(rt.lake.partition("landing", "transactions", DAY))[c.entity]))
    rows = rt.store.get_online_features(features=rt.defs.service,
                                        entity_rows=[{c.entity: int(i)} for i in ids]).to_dict()
    return pd.DataFrame(rows)


def _states(dr) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def test_a_late_window_is_refused_and_the_high_water_mark_follows_the_data(generated_home, airflow_db, dagbag,
                                                                            reliability):
    from closedloop.stages import retraining

    retrain, ingest = dagbag.get_dag("retraining"), dagbag.get_dag("ingest")
    with generated_home("guard-control", CONFIG) as control:
        dr = ingest.test(run_conf={"day": DAY.isoformat()})
        assert dr.state == "success", _states(dr)
        control_online, control_files = _online(control), _files(control)
        control_mark = materialised_until(control.store, control.defs.view.name)

    with generated_home("guard-treated", CONFIG) as rt:
        before = _files(rt)
        dr = retrain.test(run_conf=LATE)
        states = _states(dr)
        assert dr.state == "failed" and states["validate_window"] == "failed", states
        assert all(s in ("upstream_failed", None) for t, s in states.items() if t != "validate_window"), states
        assert _files(rt) == before  # nothing curated, nothing materialised, no training set
        assert materialised_until(rt.store, rt.defs.view.name) is None

        dr = ingest.test(run_conf={"day": DAY.isoformat()})
        assert dr.state == "success", _states(dr)
        mark = materialised_until(rt.store, rt.defs.view.name)
        assert mark == datetime.combine(DAY + timedelta(days=1), datetime.min.time(), UTC) == control_mark

        # asked for a far window, materialisation stops at the newest curated day: the mark stays
        out = retraining.materialise(rt, Window(DAY + timedelta(days=20), DAY + timedelta(days=27)))
        assert out["start"] == out["end"]
        assert materialised_until(rt.store, rt.defs.view.name) == mark

        measure = {"online_store_rows": differences(control_online, _online(rt), [rt.contract.entity])}
        assert corrupted(**measure) == "nothing", measure
        assert [f for f in _files(rt) if not f.startswith("_")] == [f for f in control_files if not f.startswith("_")]
    reliability.record(
        "bad-input-dag", "a retraining window after the newest landed data (retraining DAG, then ingest DAG)",
        "run failed at validate_window (NoDataError naming the newest day) before any lake or Feast write; the "
        "next day's ingest materialised up to that day's end, as the control's; a far window asked of "
        "materialisation moved nothing", corrupted=corrupted(**measure))


# Confs each Param of the trigger form accepts (Airflow validates one Param at a time and keeps unknown keys),
# refused by runconf.check, the first step of validate_window.
CROSS_FIELD = {
    "validation_days without holdout_days": {"window_start": START.isoformat(), "window_end": DAY.isoformat(),
                                             "validation_days": 1},
    "a reversed window": {"window_start": DAY.isoformat(), "window_end": START.isoformat()},
    "a window starting in year 1": {"window_start": "0001-01-01", "window_end": DAY.isoformat()},
    "an unknown key": {"window_start": START.isoformat(), "window_end": DAY.isoformat(), "windw": 3},
}


def test_a_conf_the_form_accepts_but_the_rules_refuse_fails_the_first_task_at_try_1(generated_home, airflow_db,
                                                                                   dagbag, reliability):
    retrain = dagbag.get_dag("retraining")
    with generated_home("guard-conf", CONFIG) as rt:
        before = _files(rt)
        for name, conf in CROSS_FIELD.items():
            copy.deepcopy(retrain.params).update(conf)  # the trigger form lets it through (each Param validated)
            dr = retrain.test(run_conf=conf)
            tis = {ti.task_id: ti for ti in dr.get_task_instances()}
            states = {t: ti.state for t, ti in tis.items()}
            assert dr.state == "failed" and states["validate_window"] == "failed", (name, states)
            assert tis["validate_window"].try_number == 1, name  # AirflowFailException: no retry
            assert all(s in ("upstream_failed", None) for t, s in states.items() if t != "validate_window"), states
        assert _files(rt) == before  # nothing validated, curated, materialised or trained
        assert materialised_until(rt.store, rt.defs.view.name) is None
    reliability.record(
        "config", "retraining DAG triggered with confs each Param accepts: validation_days without holdout_days, "
        "a reversed window, a window starting in year 1, an unknown key",
        "validate_window failed at try 1 (runconf.check, its first step: one-line ConfigError, no retry); no "
        "later task ran; the lake and the online store untouched")
