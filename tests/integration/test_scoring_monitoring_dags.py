"""batch_scoring and drift_monitoring with ``dag.test()``: a day scored; a quiet window and a drifted one.

The champion is trained through the package's stages (the retraining DAG has its own tests); then a
normal day is scored and monitored (no drift, nothing triggered), and days of a new regime are scored
and monitored (drift: a ``retraining`` run is created with the window, the reason and the report).
"""

from __future__ import annotations

import dataclasses
from datetime import date, timedelta

import pytest

from closedloop.core.runconf import Window
from closedloop.devtools.generate import GeneratorConfig
from closedloop.stages import retraining as stages

pytestmark = pytest.mark.integration

START = date(2026, 4, 1)
WARMUP, HISTORY = 30, 14
TRAIN = Window(START + timedelta(days=WARMUP), START + timedelta(days=WARMUP + HISTORY))
NORMAL = TRAIN.end                      # the first day after the training window
DRIFT_START = NORMAL + timedelta(days=2)


@pytest.fixture(scope="module")
def world(generated_home, airflow_db, dagbag):
    # independent days (structure=0): this module checks the DAGs' wiring; the calibrated policy's power against
    # the generator's day factor is measured in tests/data/test_drift_calibration.py (with it, this world's
    # first two drifted windows score 0.50 and 0.67 against a calibrated threshold of 0.76: not flagged)
    config = GeneratorConfig(start=START, days=WARMUP + HISTORY + 4, customers=500, transactions_per_day=1500,
                             seed=5, covariate_drift=0.6, concept_drift=1.0, new_categories=True,
                             drift_start=DRIFT_START, structure=0.0)
    with generated_home("monitoring", config) as rt:
        stages.validate(rt, TRAIN)
        stages.materialise(rt, TRAIN)
        ts = stages.build_training_set(rt, TRAIN)
        trained = stages.train(rt, ts, {"dag_run_id": "fixture"})
        registered = stages.register(rt, trained, TRAIN)
        stages.promote_or_reject(rt, stages.evaluate_gate(rt, registered, ts))
        try:
            yield rt, dagbag
        finally:
            # the retraining run that drift started stays queued (no scheduler here): gone, so that no later
            # module of the session (they share the Airflow database) finds a retraining "queued or running"
            # and skips its own trigger
            _delete_retraining_runs()


def _states(dr):
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def _retraining_runs():
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return [(r.run_id, dict(r.conf or {}), r.state) for r in
                session.query(DagRun).filter(DagRun.dag_id == "retraining", DagRun.run_id.like("drift__%"))]


def _delete_retraining_runs() -> None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        for run in session.query(DagRun).filter(DagRun.dag_id == "retraining", DagRun.run_id.like("drift__%")):
            session.delete(run)


def test_scoring_a_day(world):
    rt, dagbag = world
    c = rt.contract
    dr = dagbag.get_dag("batch_scoring").test(run_conf={"day": NORMAL.isoformat()})
    assert dr.state == "success", _states(dr)
    preds = rt.lake.read_parquet(rt.lake.partition("predictions", "transactions", NORMAL))
    landed = rt.lake.read_parquet(rt.lake.partition("landing", "transactions", NORMAL))
    assert len(preds) == len(landed) and preds[c.row_key].is_unique
    assert set(preds[c.row_key]) == set(landed[c.row_key])
    assert {"score", "decision", "model_version", *c.model_features} <= set(preds.columns)
    assert preds["score"].between(0, 1).all()
    assert set(preds["model_version"]) == {"1"}
    threshold = float(rt.client.get_run(rt.client.get_model_version(rt.model_name, "1").run_id)
                      .data.params["decision_threshold"])
    assert ((preds["score"] >= threshold).astype(int) == preds["decision"]).all()


def test_a_quiet_window_triggers_nothing(world):
    rt, dagbag = world
    day2 = NORMAL + timedelta(days=1)
    assert dagbag.get_dag("batch_scoring").test(run_conf={"day": day2.isoformat()}).state == "success"
    dr = dagbag.get_dag("drift_monitoring").test(run_conf={"day": day2.isoformat()})
    states = _states(dr)
    assert states["measure_drift"] == "success"
    assert states["decide_retraining"] == "success"
    assert states["trigger_retraining"] == "skipped"
    measured = dr.get_task_instance("measure_drift").xcom_pull(task_ids="measure_drift")
    assert measured["decision"]["judged"] and not measured["decision"]["drift"], measured["decision"]
    assert rt.lake.exists(measured["report"]["html"]) and rt.lake.exists(measured["report"]["json"])
    assert _retraining_runs() == []


def test_a_drifted_window_starts_retraining_with_the_right_configuration(world):
    _, dagbag = world
    for d in (DRIFT_START, DRIFT_START + timedelta(days=1)):
        assert dagbag.get_dag("batch_scoring").test(run_conf={"day": d.isoformat()}).state == "success"
    # the first drifted window is not yet a regime: drift, but not confirmed, nothing started
    dr = dagbag.get_dag("drift_monitoring").test(run_conf={"day": DRIFT_START.isoformat()})
    assert _states(dr)["trigger_retraining"] == "skipped"
    measured = dr.get_task_instance("measure_drift").xcom_pull(task_ids="measure_drift")
    assert measured["decision"]["drift"], measured["decision"]
    assert _retraining_runs() == []
    # the next one confirms it
    last = DRIFT_START + timedelta(days=1)
    dr = dagbag.get_dag("drift_monitoring").test(run_conf={"day": last.isoformat()})
    states = _states(dr)
    assert states["trigger_retraining"] == "success", states
    runs = _retraining_runs()
    assert len(runs) == 1
    run_id, conf, _ = runs[0]
    end = last + timedelta(days=1)
    assert run_id == f"drift__{(end - timedelta(days=2)).isoformat()}_{end.isoformat()}"
    assert conf["window_end"] == end.isoformat()
    assert conf["window_start"] == (end - timedelta(days=14)).isoformat()
    assert conf["holdout_days"] == 1
    assert conf["reason"].startswith("drift")
    assert conf["trigger"]["report_uri"].endswith("report.html")
    # decide_retraining raised a `drift_detected` alert naming the retraining run it starts
    from closedloop.stages.alerts import read_alerts

    drifted = [a for a in read_alerts(world[0].settings, "drift_detected") if a["run_id"] == dr.run_id]
    assert len(drifted) == 1 and run_id in drifted[0]["summary"], drifted
    # the configuration it starts retraining with is one retraining accepts
    from closedloop.core.runconf import resolve_window

    assert resolve_window(conf) == Window(end - timedelta(days=14), end)

    # the same window again: no second run (a retraining is queued, and the run id is the window's)
    dr = dagbag.get_dag("drift_monitoring").test(run_conf={"day": last.isoformat()})
    assert _states(dr)["trigger_retraining"] in {"skipped", "success"}
    assert len(_retraining_runs()) == 1


def test_calibration_turned_off_in_the_configuration_means_the_fixed_rules(world, monkeypatch):
    # docs/explanation/DRIFT.md: `calibration.enabled: false` is "always the fixed rules", for a champion trained with
    # calibrated thresholds too (they were read and used regardless, so the switch changed only later champions)
    from closedloop.stages.monitoring import champion_calibration
    from closedloop.stages.scoring import champion

    rt, _ = world
    champ = champion(rt)
    logged = champion_calibration(rt, champ)
    assert logged.calibrated, logged.why  # the fixture's champion has calibrated thresholds
    config = rt.settings.config
    monitoring = {**config.raw["monitoring"], "calibration": {**config.raw["monitoring"].get("calibration", {}),
                                                              "enabled": False}}
    # the same file with the switch off (validated again: the code reads Config.typed)
    off_config = dataclasses.replace(config, raw={**config.raw, "monitoring": monitoring}, typed=None)
    monkeypatch.setitem(rt.settings.__dict__, "config", off_config)
    off = champion_calibration(rt, champ)
    assert not off.calibrated and off.why.startswith("calibration disabled"), off.why
    # the model's importance still weighs what is reported (over the features the fixed rules judge)
    assert set(logged.weights) <= set(off.weights) and sum(off.weights.values()) == pytest.approx(1.0)
    assert max(off.weights, key=off.weights.get) == max(logged.weights, key=logged.weights.get)
    assert off.prediction["threshold"] == monitoring["prediction_threshold"]


def test_the_reference_is_the_champions_own(world):
    from closedloop.stages.monitoring import champion_reference
    from closedloop.stages.scoring import champion

    rt, _ = world
    champ = champion(rt)
    reference, quality = champion_reference(rt, champ)
    run = rt.client.get_run(champ["run_id"])
    assert set(rt.contract.model_features) <= set(reference.columns)
    # a sample of the whole training window (train, validation and holdout), with an out-of-sample score each
    window_rows = sum(int(run.data.params[f"rows_{s}"]) for s in ("train", "validation", "holdout"))
    assert len(reference) == min(rt.settings.config.typed.training.reference_sample_rows, window_rows)
    assert reference["score"].notna().all() and reference["score"].between(0, 1).all()
    assert reference[rt.contract.event_timestamp].is_monotonic_increasing
    assert quality["roc_auc"] == run.data.metrics["holdout_roc_auc"]
    # the reference comes from the champion's training window, not from any later data
    window = rt.client.get_model_version(rt.model_name, champ["version"]).tags["closedloop.window"]
    start, end = window.split("..")
    ts = reference[rt.contract.event_timestamp]
    assert ts.min().date().isoformat() >= start and ts.max().date().isoformat() < end
