"""Monitoring's window handling around the calibrated decision (a real lake and MLflow on the test's home):
low-traffic windows widened backwards, one judgement per end day, and a late realised drop that starts a
retraining (cooldown and de-duplication applying)."""

from __future__ import annotations

from datetime import date, timedelta

import pandas as pd

from closedloop.runconf import Window


def _predictions(rt, day: date, rows: int) -> None:
    frame = pd.DataFrame({rt.contract.row_key: [f"{day}-{i}" for i in range(rows)], "score": [0.1] * rows})
    rt.lake.write_parquet(frame, rt.lake.partition("predictions", "transactions", day))


def test_a_low_traffic_window_is_widened_backwards_up_to_its_limit(runtime) -> None:
    from closedloop.monitoring import widened_window

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
    from closedloop.monitoring import EXPERIMENT, decide_retraining
    from closedloop.registry import ensure_experiment

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
