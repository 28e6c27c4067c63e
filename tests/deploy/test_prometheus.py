"""Prometheus and Grafana for the scoring service and the loop, checked without starting them: promtool on the scrape
configuration and the alert rules (with their unit-test series, deploy/prometheus/tests/), and the Grafana
provisioning and dashboard JSON statically. Every metric name the rules and the dashboard read must be in
``SCRAPED``, which tests/integration/test_serving.py proves a real Prometheus holds after a real scrape.

promtool comes from Debian's ``prometheus`` package (``make prometheus``, part of ``make test``): without it the
promtool tests skip, and fail under ``CI=true``.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from support.promql import (
    DASHBOARD,
    GRAFANA_DIR,
    LOOP_SCRAPED,
    PROMETHEUS_DIR,
    SCRAPED,
    binary,
    config_for,
    dashboard_expressions,
    dashboard_panels,
    metric_names,
    rule_expressions,
)


def promtool(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd)


# -- promtool ---------------------------------------------------------------------------------------
def test_promtool_accepts_the_scrape_configuration(tmp_path):
    # the token file the configuration names exists only in the stack: point it at one here
    token, loop_token = tmp_path / "serve_token", tmp_path / "metrics_token"
    token.write_text("a-token\n")
    loop_token.write_text("another-token\n")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job, loop = config["scrape_configs"]
    assert job["job_name"] == "closedloop-serve" and job["metrics_path"] == "/metrics"
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/serve_token"}
    # the loop's metrics: the Airflow plugin's route on the API server, with the plugin's scrape token
    assert loop["job_name"] == "closedloop-loop" and loop["metrics_path"] == "/closedloop/metrics"
    assert loop["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/metrics_token"}
    assert loop["static_configs"] == [{"targets": ["airflow-apiserver:8080"]}]
    assert config["rule_files"] == ["rules.yml"]
    # the file itself, with its token files where the stack mounts them elsewhere
    text = (PROMETHEUS_DIR / "prometheus.yml").read_text()
    real = tmp_path / "real.yml"
    real.write_text(text.replace("/run/secrets/", f"{tmp_path}/"))
    shutil.copy(PROMETHEUS_DIR / "rules.yml", tmp_path / "rules.yml")
    done = promtool("check", "config", str(real))
    assert done.returncode == 0, done.stdout + done.stderr
    done = promtool("check", "config", str(config_for(tmp_path, "closedloop-serve:8000", token,
                                                      loop=("127.0.0.1:8080", loop_token))))
    assert done.returncode == 0, done.stdout + done.stderr
    # and the check bites: a token file that is not there is refused
    token.unlink()
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode != 0 and "serve_token" in done.stdout + done.stderr


def test_promtool_accepts_the_rules():
    done = promtool("check", "rules", str(PROMETHEUS_DIR / "rules.yml"))
    assert done.returncode == 0 and "SUCCESS: 13 rules found" in done.stdout, done.stdout + done.stderr


def test_the_rules_fire_on_bad_series_and_stay_quiet_on_good_ones(tmp_path):
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert tests
    done = promtool("test", "rules", *map(str, tests))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    assert {t.name for t in tests} == {"rules_test.yml", "loop_rules_test.yml"}
    # and the unit tests bite: a threshold moved out of reach makes its alert's test fail (the p99 latency of
    # the service; the data-arrival age of the loop)
    (tmp_path / "tests").mkdir()
    rules = (PROMETHEUS_DIR / "rules.yml").read_text()
    for old, new, test, alert in (("> 0.25", "> 25", "rules_test.yml", "ClosedloopServeLatencyP99High"),
                                  ("/ 3600 > 48", "/ 3600 > 480", "loop_rules_test.yml", "ClosedloopDataNotArrived")):
        assert rules.count(old) == 1
        (tmp_path / "rules.yml").write_text(rules.replace(old, new))
        copy = tmp_path / "tests" / test
        copy.write_text((PROMETHEUS_DIR / "tests" / test).read_text())
        done = promtool("test", "rules", str(copy))
        assert done.returncode != 0 and alert in done.stdout + done.stderr, done.stdout + done.stderr


def test_every_guardrail_has_a_rule_with_severity_and_explanation():
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"ClosedloopServeDown", "ClosedloopServeLatencyP99High", "ClosedloopServeErrorRate",
            "ClosedloopServeMissingFeatures", "ClosedloopServeOutOfContract"} <= set(by_name)
    assert {"ClosedloopLoopMetricsDown", "ClosedloopDataNotArrived", "ClosedloopIngestStalled",
            "ClosedloopDriftDecided", "ClosedloopPerformanceBelowBand", "ClosedloopModelConfigRefused"} <= set(by_name)
    for name, rule in by_name.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule.get("for"), f"{name}: fires on one bad evaluation"


# -- the metric names ---------------------------------------------------------------------------------
def test_the_metric_name_parser_finds_names_and_skips_functions_labels_and_keywords():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(a_bucket{job="x", le!="b_total"}[5m]))) '
            '/ on (instance) group_left (pod) c_total offset 5m > bool 0.25 and up unless d{e="f"}[$__rate_interval]')
    assert metric_names(expr) == {"a_bucket", "c_total", "up", "d"}
    assert metric_names("sum without (feature) (x_total) / scalar(sum(rate(y[1h])))") == {"x_total", "y"}


def test_the_scraped_list_is_what_the_service_registers():
    """SCRAPED against the service's own registry (the real scrape proves Prometheus holds each of them)."""
    from prometheus_client import generate_latest

    from closedloop.adapters.serving import Metrics

    metrics = Metrics(["f"])
    metrics.requests.labels("/score", "200").inc()
    metrics.out_of_contract.labels("amount").inc()
    metrics.version.labels("champion").set(1)
    metrics.observe_features(__import__("pandas").DataFrame({"f": [1.0]}))
    exposed = {line.split("{")[0].split(" ")[0] for line in generate_latest(metrics.registry).decode().splitlines()
               if line and not line.startswith("#")}
    assert SCRAPED - {"up"} == {n for n in exposed if not n.endswith("_created")}


def test_the_loop_scraped_list_is_what_the_exporter_registers():
    """LOOP_SCRAPED against the exporter's own output for a state with every figure (the real scrape in
    tests/integration/test_model_health.py proves Prometheus holds each of them from a real world)."""
    from closedloop.adapters.exporter import METRICS, render

    state = {"model": "m", "versions": {"champion": 3, "canary": 0}, "canary_share": 0.0,
             "drift": {"share": 0.2, "share_threshold": 0.5, "decision": "retrain", "window_end": 1.7e9},
             "performance": {k: {"roc_auc": 0.8, "band_lower": 0.75, "window_end": 1.7e9}
                             for k in ("estimated", "realised")},
             "ingest": {"transactions": {"newest_day": 1.7e9, "last_curated_at": 1.7e9, "last_run_at": 1.7e9,
                                         "quarantined": 2}}}
    text = render(state).decode()
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert LOOP_SCRAPED == exposed == set(METRICS)
    assert 'closedloop_drift_decision{decision="retrain",model="m"} 1.0' in text
    assert 'closedloop_model_version{arm="canary",model="m"} 0.0' in text
    # a figure the loop has not produced is absent, not 0: no rule fires on what nobody measured
    bare = render({**state, "drift": None, "performance": {}}).decode()
    assert "closedloop_drift_share{" not in bare and "closedloop_performance_roc_auc{" not in bare


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_name_of_the_rules_and_dashboard_is_scraped(source):
    exprs = rule_expressions() if source == "rules" else dashboard_expressions()
    assert exprs
    known = SCRAPED | LOOP_SCRAPED
    for where, expr in exprs.items():
        names = metric_names(expr)
        assert names, f"{where}: no metric name in {expr!r}"
        assert names <= known, f"{where}: {sorted(names - known)} are scraped neither from closedloop serve nor " \
                               "from the loop's exporter"


# -- Grafana ------------------------------------------------------------------------------------------
def test_the_dashboard_is_valid_json_with_every_panel_on_the_provisioned_datasource():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "closedloop-serve" and "id" not in dashboard  # provisioned: Grafana assigns ids
    datasources = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    panels = dashboard_panels()
    assert len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": source["uid"]}, p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == source["uid"] for t in p["targets"]), p["title"]
        assert p["description"], p["title"]
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
    # what the issue asks the dashboard to show
    used = set().union(*(metric_names(e) for e in dashboard_expressions().values()))
    assert {"closedloop_serve_requests_total", "closedloop_serve_request_seconds_bucket",
            "closedloop_serve_feature_missing_total", "closedloop_serve_out_of_contract_total",
            "closedloop_serve_model_version"} <= used
    # and the loop: drift share, performance (estimated vs realised), versions, last ingest, quarantine
    assert {"closedloop_drift_share", "closedloop_drift_decision", "closedloop_performance_roc_auc",
            "closedloop_performance_roc_auc_band_lower", "closedloop_model_version",
            "closedloop_ingest_newest_day_timestamp_seconds", "closedloop_ingest_last_run_timestamp_seconds",
            "closedloop_quarantined_partitions", "closedloop_rollout_canary_share"} <= used
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "closedloop.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# -- in the compose stack -----------------------------------------------------------------------------
def test_compose_runs_prometheus_with_the_serve_token_as_a_file_and_grafana_with_the_dashboard():
    from closedloop.core.settings import REPO_ROOT

    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yaml").read_text())
    services = compose["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    # the token: compose's secret from the same variable closedloop-serve checks, mounted where the
    # configuration reads it, given to Prometheus alone and never in its environment
    assert compose["secrets"] == {"serve_token": {"environment": "CLOSEDLOOP_SERVE_TOKEN"},
                                  "metrics_token": {"environment": "CLOSEDLOOP_METRICS_TOKEN"}}
    for secret in ("serve_token", "metrics_token"):
        assert [n for n, s in services.items() if secret in s.get("secrets", [])] == ["prometheus"]
    assert "environment" not in prometheus
    # the loop's scrape token: checked by the API server (the plugin's [closedloop] metrics_token) alone
    assert services["airflow-apiserver"]["environment"]["AIRFLOW__CLOSEDLOOP__METRICS_TOKEN"].startswith(
        "${CLOSEDLOOP_METRICS_TOKEN:?")
    assert [n for n, s in services.items() if "AIRFLOW__CLOSEDLOOP__METRICS_TOKEN" in s.get("environment", {})] \
        == ["airflow-apiserver"]
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["authorization"]["credentials_file"] == "/run/secrets/serve_token"
    assert config["scrape_configs"][0]["static_configs"] == [{"targets": ["closedloop-serve:8000"]}]
    assert services["closedloop-serve"]["command"][-2:] == ["--port", "8000"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    # Grafana: its admin from .env, the provisioning and the dashboards from the repository, read-only
    env = grafana["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert {"./deploy/grafana/provisioning:/etc/grafana/provisioning:ro",
            "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro"} <= set(grafana["volumes"])
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == "/var/lib/grafana/dashboards/" + DASHBOARD.name
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
