"""Prometheus for the tests: the Debian binaries (``make prometheus`` installs them), the metric names a
PromQL expression reads, and the expressions of closedloop's alert rules and Grafana dashboard.

``SCRAPED`` is the list of metric names that tests/integration/test_serving.py proves a real Prometheus holds
after scraping a real ``closedloop serve``, ``LOOP_SCRAPED`` those tests/integration/test_model_health.py proves
it holds after scraping the Airflow plugin's exporter of the loop's state; the static tests
(tests/deploy/test_prometheus.py) check every name the rules and the dashboard use against both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from closedloop.core.settings import REPO_ROOT

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
GRAFANA_DIR = REPO_ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "closedloop-serve.json"

# What closedloop serve exposes (include/closedloop/adapters/serving.py, class Metrics) and Prometheus adds (up),
# as series names: a counter's _total, a histogram's _bucket, _sum and _count.
SCRAPED = frozenset({
    "up",
    "closedloop_serve_requests_total",
    "closedloop_serve_request_seconds_bucket",
    "closedloop_serve_request_seconds_sum",
    "closedloop_serve_request_seconds_count",
    "closedloop_serve_transactions_total",
    "closedloop_serve_model_version",
    "closedloop_serve_feature_values_total",
    "closedloop_serve_feature_missing_total",
    "closedloop_serve_unknown_customers_total",
    "closedloop_serve_shadow_predictions_total",
    "closedloop_serve_out_of_contract_total",
    # the canary split, by arm (champion, canary), and the canary's share
    "closedloop_serve_arm_transactions_total",
    "closedloop_serve_arm_errors_total",
    "closedloop_serve_arm_request_seconds_bucket",
    "closedloop_serve_arm_request_seconds_sum",
    "closedloop_serve_arm_request_seconds_count",
    "closedloop_serve_arm_score_count",
    "closedloop_serve_arm_score_sum",
    "closedloop_serve_canary_share",
})

# What the Airflow plugin's /closedloop/metrics exposes (include/closedloop/adapters/exporter.py, METRICS): the loop's
# state. tests/integration/test_model_health.py proves a real Prometheus holds each after scraping the real
# exporter on a real world.
LOOP_SCRAPED = frozenset({
    "closedloop_model_version",
    "closedloop_rollout_canary_share",
    "closedloop_drift_share",
    "closedloop_drift_share_threshold",
    "closedloop_drift_decision",
    "closedloop_drift_window_end_timestamp_seconds",
    "closedloop_performance_roc_auc",
    "closedloop_performance_roc_auc_band_lower",
    "closedloop_performance_window_end_timestamp_seconds",
    "closedloop_ingest_newest_day_timestamp_seconds",
    "closedloop_ingest_last_run_timestamp_seconds",
    "closedloop_quarantined_partitions",
    "closedloop_model_config_ok",
})
SERVE_JOB, LOOP_JOB = "closedloop-serve", "closedloop-loop"

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
             "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions, keywords, label
    names (in ``{...}`` or ``by (...)``), strings or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges, subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\$\w+", "", text)  # Grafana variables ($__rate_interval)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", text):
        name, call = m.group(1), m.group(2)
        if not call and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def rule_expressions() -> dict[str, str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return {r.get("alert") or r["record"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def dashboard_panels() -> list[dict]:
    """Every panel of the dashboard, those inside rows included."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_expressions() -> dict[str, str]:
    return {f"{p['title']} / {t.get('refId', '?')}": t["expr"] for p in dashboard_panels()
            for t in p.get("targets", []) if "expr" in t}


def binary(name: str) -> str:
    """Debian's ``promtool`` or ``prometheus``; a skip when missing (a failure under CI=true)."""
    path = shutil.which(name)
    if path is None:
        msg = (f"{name} is not on the PATH: `make prometheus` (part of `make test`) installs Debian's "
               "prometheus package (apt-get install -y --no-install-recommends prometheus, as root)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def config_for(tmp_path: Path, target: str | None, token_file: Path | None, interval: str = "15s", *,
               loop: tuple[str, Path] | None = None) -> Path:
    """deploy/prometheus/prometheus.yml with its serve job pointed at ``target`` (token in ``token_file``) and
    its loop job at ``loop`` (target, token file); a job given no target is left out. rules.yml beside it."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    where = {SERVE_JOB: (target, token_file) if target else None, LOOP_JOB: loop}
    jobs = []
    for job in config["scrape_configs"]:
        if where[job["job_name"]] is None:
            continue
        job_target, job_token = where[job["job_name"]]
        job["authorization"]["credentials_file"] = str(job_token)
        job["static_configs"] = [{"targets": [job_target]}]
        job.pop("scrape_interval", None)  # the test's interval (and timeout) for every job
        job.pop("scrape_timeout", None)
        jobs.append(job)
    config["scrape_configs"] = jobs
    shutil.copy(PROMETHEUS_DIR / "rules.yml", tmp_path / "rules.yml")
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_until_scraped(api, proc, wanted: set[str], job: str, timeout: float) -> None:
    """Wait until a real Prometheus (``proc``, its HTTP API client ``api``) holds every metric name of
    ``wanted`` and its only target is ``job``, up; fail with the names it still lacks after ``timeout`` s."""
    import time

    import httpx

    names: set[str] = set()
    deadline = time.monotonic() + timeout
    while not names >= wanted:
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"not scraped: {sorted(wanted - names)}"
        time.sleep(0.5)
        try:
            names = set(api.get("/label/__name__/values").json()["data"])
        except httpx.TransportError:
            continue
    targets = api.get("/targets").json()["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [(job, "up")]
