"""Degenerate label windows through the real retraining DAG (``dag.test()``): a decision, never a crash.

On one fresh home, three windows whose labels give no evidence: a week with no positive label at all, a
week with a handful (4) of positives, and a week whose labels are shuffled among its transactions (labels
unrelated to the inputs). Each run must end with every task successful and the gate's decision
"insufficient evidence" on the version (no champion appears); every task's return value must pass
Airflow's XCom serialisation as strict JSON (no NaN). The function-level catalogue of label abuse is
``tests/model/test_label_abuse.py``.
"""

from __future__ import annotations

import json
from datetime import date

import numpy as np
import pytest

from closedloop.devtools.generate import GeneratorConfig
from closedloop.stages.registry import CHAMPION, alias_version

pytestmark = pytest.mark.integration

WINDOWS = {
    "no positives": (date(2026, 1, 1), date(2026, 1, 8)),
    "a handful of positives (4)": (date(2026, 1, 8), date(2026, 1, 15)),
    "labels shuffled among the window's transactions (unrelated to the inputs)": (date(2026, 1, 15),
                                                                                   date(2026, 1, 22)),
}


@pytest.fixture(scope="module")
def world(generated_home, airflow_db, dagbag):
    config = GeneratorConfig(start=date(2026, 1, 1), days=22, customers=300, transactions_per_day=700, seed=4)
    with generated_home("label-abuse-dag", config) as rt:
        rng = np.random.default_rng(0)
        _relabel(rt, *WINDOWS["no positives"], lambda y: np.zeros_like(y))
        _relabel(rt, *WINDOWS["a handful of positives (4)"], lambda y: np.where(np.cumsum(y) <= 4, y, 0))
        _relabel(rt, *WINDOWS["labels shuffled among the window's transactions (unrelated to the inputs)"],
                 rng.permutation)
        yield rt, dagbag.get_dag("retraining")


def _relabel(rt, start: date, end: date, fn) -> None:
    """Replace the labels of the transactions of ``[start, end)`` (in every landed label partition) by ``fn``'s."""
    import pandas as pd

    c = rt.contract
    tx_ids = set()
    for d in rt.lake.list_days("landing", "transactions"):
        if start <= d < end:
            tx_ids |= set(rt.lake.read_parquet(rt.lake.partition("landing", "transactions", d))[c.row_key])
    parts = {d: rt.lake.read_parquet(rt.lake.partition("landing", "labels", d))
             for d in rt.lake.list_days("landing", "labels")}
    hits = {d: p[c.row_key].isin(tx_ids).to_numpy() for d, p in parts.items()}
    y = np.concatenate([p[c.label].to_numpy()[hits[d]] for d, p in parts.items()])
    new = pd.Series(fn(y)).to_numpy()
    at = 0
    for d, p in parts.items():
        k = int(hits[d].sum())
        if k:
            p.loc[hits[d], c.label] = new[at:at + k]
            rt.lake.write_parquet(p, rt.lake.partition("landing", "labels", d))
        at += k


def _strict_json(value) -> str:
    """A task's return value as Airflow's XCom backend serialises it, then as strict JSON (the API's)."""
    from airflow.sdk.bases.xcom import BaseXCom

    return json.dumps(BaseXCom.serialize_value(value), allow_nan=False)


@pytest.mark.parametrize("case", list(WINDOWS))
def test_a_window_without_evidence_reaches_insufficient_evidence(world, case, reliability):
    rt, dag = world
    start, end = WINDOWS[case]
    dr = dag.test(run_conf={"window_start": start.isoformat(), "window_end": end.isoformat(),
                            "reason": f"label abuse: {case}"})
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert set(states.values()) == {"success"}, states
    for ti in dr.get_task_instances():
        _strict_json(ti.xcom_pull(task_ids=ti.task_id))  # every return value is JSON-safe
    decision = dr.get_task_instance("evaluate_gate").xcom_pull(task_ids="evaluate_gate")
    assert decision["outcome"] == "insufficient_evidence", decision["reason"]
    assert alias_version(rt.client, rt.model_name, CHAMPION) is None
    tags = rt.client.get_model_version(rt.model_name, decision["candidate_version"]).tags
    assert tags["closedloop.decision"] == "insufficient_evidence" and tags["closedloop.status"] == "rejected"
    reliability.record("labels", f"through the retraining DAG: a window with {case}" if case == "no positives"
                       else f"through the retraining DAG: {case}",
                       f"every task succeeded, no NaN in XCom; insufficient_evidence recorded on "
                       f"v{decision['candidate_version']}; no champion")
