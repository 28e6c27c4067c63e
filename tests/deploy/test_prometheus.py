"""Prometheus and Grafana for the scoring service, checked without starting them: promtool on the scrape
configuration and the alert rules (with their unit-test series, deploy/prometheus/tests/), and the Grafana
provisioning and dashboard JSON statically. Every metric name the rules and the dashboard read must be in
``SCRAPED``, which tests/integration/test_serving.py proves a real Prometheus holds after a real scrape.

promtool comes from Debian's ``prometheus`` package (``make prometheus``, part of ``make test``): without it the
promtool tests skip, and fail under ``CI=true``.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from support.promql import (
    DASHBOARD,
    GRAFANA_DIR,
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
    token = tmp_path / "serve_token"
    token.write_text("a-token\n")
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "closedloop-serve" and job["metrics_path"] == "/metrics"
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/serve_token"}
    assert config["rule_files"] == ["rules.yml"]
    done = promtool("check", "config", str(config_for(tmp_path, "closedloop-serve:8000", token)))
    assert done.returncode == 0, done.stdout + done.stderr
    # and the check bites: a token file that is not there is refused
    token.unlink()
    done = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode != 0 and "serve_token" in done.stdout + done.stderr


def test_promtool_accepts_the_rules():
    done = promtool("check", "rules", str(PROMETHEUS_DIR / "rules.yml"))
    assert done.returncode == 0 and "SUCCESS: 7 rules found" in done.stdout, done.stdout + done.stderr


def test_the_rules_fire_on_bad_series_and_stay_quiet_on_good_ones(tmp_path):
    tests = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
    assert tests
    done = promtool("test", "rules", *map(str, tests))
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    # and the unit tests bite: a p99 threshold raised out of reach makes the latency alert's test fail
    (tmp_path / "tests").mkdir()
    rules = (PROMETHEUS_DIR / "rules.yml").read_text()
    assert rules.count("> 0.25") == 1
    (tmp_path / "rules.yml").write_text(rules.replace("> 0.25", "> 25"))
    copy = tmp_path / "tests" / "rules_test.yml"
    copy.write_text(tests[0].read_text())
    done = promtool("test", "rules", str(copy))
    assert done.returncode != 0 and "ClosedloopServeLatencyP99High" in done.stdout + done.stderr


def test_every_guardrail_has_a_rule_with_severity_and_explanation():
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"ClosedloopServeDown", "ClosedloopServeLatencyP99High", "ClosedloopServeErrorRate",
            "ClosedloopServeMissingFeatures", "ClosedloopServeOutOfContract"} <= set(by_name)
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

    from closedloop.serving import Metrics

    metrics = Metrics(["f"])
    metrics.requests.labels("/score", "200").inc()
    metrics.out_of_contract.labels("amount").inc()
    metrics.version.labels("champion").set(1)
    metrics.observe_features(__import__("pandas").DataFrame({"f": [1.0]}))
    exposed = {line.split("{")[0].split(" ")[0] for line in generate_latest(metrics.registry).decode().splitlines()
               if line and not line.startswith("#")}
    assert SCRAPED - {"up"} == {n for n in exposed if not n.endswith("_created")}


@pytest.mark.parametrize("source", ["rules", "dashboard"])
def test_every_metric_name_of_the_rules_and_dashboard_is_scraped(source):
    exprs = rule_expressions() if source == "rules" else dashboard_expressions()
    assert exprs
    for where, expr in exprs.items():
        names = metric_names(expr)
        assert names, f"{where}: no metric name in {expr!r}"
        assert names <= SCRAPED, f"{where}: {sorted(names - SCRAPED)} are not scraped from closedloop serve"


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
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "closedloop.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


# -- in the compose stack -----------------------------------------------------------------------------
def test_compose_runs_prometheus_with_the_serve_token_as_a_file_and_grafana_with_the_dashboard():
    from closedloop.settings import REPO_ROOT

    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yaml").read_text())
    services = compose["services"]
    prometheus, grafana = services["prometheus"], services["grafana"]
    # the token: compose's secret from the same variable closedloop-serve checks, mounted where the
    # configuration reads it, given to Prometheus alone and never in its environment
    assert compose["secrets"] == {"serve_token": {"environment": "CLOSEDLOOP_SERVE_TOKEN"}}
    assert [n for n, s in services.items() if "serve_token" in s.get("secrets", [])] == ["prometheus"]
    assert "environment" not in prometheus
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
