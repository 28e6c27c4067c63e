"""Monitoring's window handling around the calibrated decision (a real lake and MLflow on the test's home):
low-traffic windows widened backwards, one judgement per end day, a late realised drop that starts a
retraining (cooldown and de-duplication applying), and a window re-judged on late labels recording its realised
figure with its calibrated band, as the Model health page, the exporter and the alert rule read it."""

from __future__ import annotations

import subprocess
from datetime import date, timedelta

import pandas as pd
import pytest

from closedloop.core.runconf import Window


def _predictions(rt, day: date, rows: int) -> None:
    frame = pd.DataFrame({rt.contract.row_key: [f"{day}-{i}" for i in range(rows)], "score": [0.1] * rows})
    rt.lake.write_parquet(frame, rt.lake.partition("predictions", "transactions", day))


def test_a_low_traffic_window_is_widened_backwards_up_to_its_limit(runtime) -> None:
    from closedloop.stages.monitoring import widened_window

    rt = runtime
    end = date(2026, 6, 12)
    for k, rows in enumerate([300, 300, 300, 300, 300, 300]):  # 2026-06-11 back to 2026-06-06
        _predictions(rt, end - timedelta(days=k + 1), rows)
    asked = Window(end - timedelta(days=2), end)
    assert widened_window(rt, asked, 500, 7) == (asked, 600)  # enough rows: as asked
    assert widened_window(rt, asked, 1000, 7) == (Window(end - timedelta(days=4), end), 1200)
    # the limit: at most 5 days, however few rows they hold
    assert widened_window(rt, asked, 10_000, 5) == (Window(end - timedelta(days=5), end), 1500)


def test_a_late_realised_drop_starts_one_retraining(runtime) -> None:
    from closedloop.stages.monitoring import EXPERIMENT, decide_retraining
    from closedloop.stages.registry import ensure_experiment

    rt = runtime
    exp_id = ensure_experiment(rt.client, rt.settings, EXPERIMENT)
    window = Window(date(2026, 6, 10), date(2026, 6, 12))
    rt.client.create_run(exp_id, tags={"closedloop.window": str(window), "closedloop.drift": "false"})
    late = [{"window": {"start": "2026-05-20", "end": "2026-05-22"}, "realised": 0.81,
             "band": {"lower": 0.9, "upper": 0.99}, "positives": 40, "labelled_rows": 5000,
             "why": "realised roc_auc 0.810 of 2026-05-20..2026-05-22 on 5000 labelled rows (40 positives), "
                    "labels until 2026-06-12, is below its calibrated band [0.900, 0.990]"}]
    quiet = {"judged": True, "drift": False, "reasons": ["no drift: no rule fired"], "fired": []}
    measured = {"window": window.to_dict(), "report": {"html": "file:///r/report.html"}, "decision": quiet,
                "figures": {"drift_share": 0.0}, "late_drops": late}

    started = decide_retraining(rt, measured, active_retrainings=0, monitoring_run_id="m-1")
    assert started["retrain"] is True and started["run_id"] == "drift__2026-06-10_2026-06-12"
    assert started["why"].startswith("drift: late realised drop: realised roc_auc 0.810 of 2026-05-20..")
    assert "this window: no drift" in started["why"]

    # the next day, a window inside the cooldown with another late drop: refused, and why
    nxt = Window(date(2026, 6, 11), date(2026, 6, 13))
    rt.client.create_run(exp_id, tags={"closedloop.window": str(nxt), "closedloop.drift": "false"})
    again = decide_retraining(rt, {**measured, "window": nxt.to_dict()}, active_retrainings=0,
                              monitoring_run_id="m-2")
    assert again["retrain"] is False and "cooldown" in again["why"]

    # without a late drop, a quiet window starts nothing
    none = decide_retraining(rt, {**measured, "late_drops": []}, active_retrainings=0, monitoring_run_id="m-3")
    assert none["retrain"] is False and none["why"].startswith("no drift")


# -- a window re-judged on late labels: its realised figure with its band, up to the exporter and the rule --------
def _rejudged_world(rt, *, separable: bool):
    """A champion's performance reference (calibrated on 12 chunks of 400 rows), an earlier window of 800 scored
    rows judged when it had no labels, and its labels arriving later; then the window after it re-judges it.

    ``separable``: the late labels follow the scores (realised ROC AUC inside the band) or not (about 0.5: below it).
    Returns the Calibration used, the earlier window's MLflow run id and the late drops."""
    import numpy as np

    from closedloop.stages import drift, performance
    from closedloop.stages.calibration import Calibration
    from closedloop.stages.monitoring import EXPERIMENT, rejudge_earlier
    from closedloop.stages.registry import ensure_experiment

    rng = np.random.default_rng(25)
    c = rt.contract
    y_ref = rng.integers(0, 2, 4800)
    s_ref = 1 / (1 + np.exp(-(2.0 * y_ref - 1 + rng.normal(0, 1.2, 4800))))
    ref = performance.calibrate_reference(s_ref, y_ref, 400)
    assert ref.realised is not None  # a band to judge against
    cal = Calibration(mode="calibrated", why="test reference", performance=ref.to_dict())

    earlier = Window(date(2026, 5, 20), date(2026, 5, 22))
    y = rng.integers(0, 2, 800)
    score = 1 / (1 + np.exp(-((2.0 * y - 1 if separable else 0) + rng.normal(0, 1.2, 800))))
    keys = [f"k{i}" for i in range(800)]
    for k, day in enumerate((earlier.start, earlier.start + timedelta(days=1))):
        rows = slice(400 * k, 400 * (k + 1))
        frame = pd.DataFrame({c.row_key: keys[rows], "score": score[rows],
                              **{f: np.zeros(400) for f in c.model_features}})
        rt.lake.write_parquet(frame, rt.lake.partition("predictions", "transactions", day))
    # the labels arrive ten days after the window, in one curated partition
    label_day = earlier.end + timedelta(days=10)
    labels = pd.DataFrame({c.row_key: keys, c.label: y.astype("int64"),
                           c.label_timestamp: pd.Timestamp(label_day, tz="UTC")})
    rt.lake.write_parquet(labels, rt.lake.partition("curated", "labels", label_day))

    policy = drift.DriftPolicy.from_config(rt.settings.config.raw["monitoring"])
    exp_id = ensure_experiment(rt.client, rt.settings, EXPERIMENT)
    run = rt.client.create_run(exp_id, tags={"closedloop.window": str(earlier),
                                             "closedloop.window_end": earlier.end.isoformat(),
                                             "closedloop.champion_version": "1"})
    # its own measurement had no labels: an estimate, no realised figure (as measure_window logs it)
    rt.client.log_metric(run.info.run_id, "estimated_roc_auc", 0.8, step=earlier.end.toordinal())
    later = Window(earlier.end + timedelta(days=12), earlier.end + timedelta(days=14))
    late = rejudge_earlier(rt, exp_id, later, {"version": "1"}, cal, policy)
    return cal, run.info.run_id, late, y, score


def _state(rt):
    from closedloop.stages import health

    data = {"model": rt.model_name, "champion": None, "latest_drift": None, "drift_share_threshold": 0.3,
            "series": health._series([], health.monitoring_series(rt))}
    return health.loop_state(rt, data)


def test_a_window_re_judged_on_late_labels_records_its_realised_figure_with_its_band(runtime) -> None:
    from closedloop.adapters import exporter
    from closedloop.stages import performance
    from closedloop.stages.monitoring import EXPERIMENT

    rt = runtime
    cal, run_id, late, y, score = _rejudged_world(rt, separable=True)
    assert late == []
    band = performance.PerformanceReference.from_dict(cal.performance).realised.for_rows(800)
    m = rt.client.get_run(run_id).data.metrics
    realised = performance.realised("roc_auc", score, y)
    assert m["realised_roc_auc"] == pytest.approx(realised) and band.contains(realised)
    assert (m["realised_roc_auc_lower"], m["realised_roc_auc_upper"]) == pytest.approx((band.lower, band.upper))
    assert m["labelled_rows"] == 800

    # the page's series, the exporter's state and its samples: the realised figure with its band's lower edge
    state = _state(rt)
    assert state["performance"]["realised"]["roc_auc"] == pytest.approx(realised)
    assert state["performance"]["realised"]["band_lower"] == pytest.approx(band.lower)
    got = {(name, labels.get("kind")): v for name, labels, v in exporter.samples(state)}
    assert got[("closedloop_performance_roc_auc_band_lower", "realised")] == pytest.approx(band.lower)
    assert got[("closedloop_performance_roc_auc", "realised")] > got[("closedloop_performance_roc_auc_band_lower",
                                                                        "realised")]

    # a window re-judged before the band was recorded with it (a realised figure, no band) stays readable:
    # its figure is shown, its band is absent (no rule can judge it), nothing fails
    exp_id = rt.client.get_experiment_by_name(EXPERIMENT).experiment_id
    old = rt.client.create_run(exp_id, tags={"closedloop.window": "2026-06-01..2026-06-03",
                                             "closedloop.window_end": "2026-06-03",
                                             "closedloop.champion_version": "1"})
    rt.client.log_metric(old.info.run_id, "realised_roc_auc", 0.61, step=date(2026, 6, 20).toordinal())
    state = _state(rt)
    assert state["performance"]["realised"] == {"roc_auc": 0.61, "band_lower": None,
                                                "window_end": state["performance"]["realised"]["window_end"]}
    kinds = {(name, labels.get("kind")) for name, labels, _ in exporter.samples(state)}
    assert ("closedloop_performance_roc_auc", "realised") in kinds
    assert ("closedloop_performance_roc_auc_band_lower", "realised") not in kinds


def test_a_late_realised_drop_below_its_band_fires_the_performance_rule(runtime, tmp_path) -> None:
    """The exporter's own exposition of a window re-judged below its band, as promtool's input series:
    ``ClosedloopPerformanceBelowBand`` fires for the realised kind (and only for it)."""
    import yaml
    from prometheus_client.parser import text_string_to_metric_families
    from support.promql import PROMETHEUS_DIR, binary

    from closedloop.adapters import exporter

    rt = runtime
    _, run_id, late, _, _ = _rejudged_world(rt, separable=False)
    assert len(late) == 1 and late[0]["realised"] < late[0]["band"]["lower"]
    assert rt.client.get_run(run_id).data.tags["closedloop.late_drop"] == "true"
    state = _state(rt)
    realised = state["performance"]["realised"]
    assert realised["roc_auc"] == pytest.approx(late[0]["realised"])
    assert realised["band_lower"] == pytest.approx(late[0]["band"]["lower"])

    series = []
    for family in text_string_to_metric_families(exporter.render(state).decode()):
        for s in family.samples:
            if s.name.startswith("closedloop_performance_roc_auc"):
                labels = ", ".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
                series.append({"series": f"{s.name}{{{labels}}}", "values": f"{s.value!r}x10"})
    assert {s["series"].split("{")[0] for s in series} == {"closedloop_performance_roc_auc",
                                                          "closedloop_performance_roc_auc_band_lower"}
    rule = next(r for g in yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())["groups"]
                for r in g["rules"] if r.get("alert") == "ClosedloopPerformanceBelowBand")
    test = {"rule_files": [str(PROMETHEUS_DIR / "rules.yml")], "evaluation_interval": "1m",
            "tests": [{"interval": "4m", "input_series": series, "alert_rule_test": [{
                "eval_time": "36m", "alertname": "ClosedloopPerformanceBelowBand",
                "exp_alerts": [{"exp_labels": {"severity": "critical", "model": rt.model_name, "kind": "realised"},
                                "exp_annotations": {
                                    "summary": f"realised ROC AUC of {rt.model_name} is {realised['roc_auc']:.3f}, "
                                               "below its calibrated band",
                                    "description": rule["annotations"]["description"].replace(
                                        "{{ $labels.kind }}", "realised")}}]}]}]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test))
    done = subprocess.run([binary("promtool"), "test", "rules", str(tmp_path / "test.yml")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
