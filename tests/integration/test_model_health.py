"""The "Model health" page: its data from a real champion and a real drift report, the plugin's app behind
Airflow's own token validation, and the plugin as Airflow's plugins manager loads it.

The champion is trained and promoted through the package's stages on a small generated world (as the
scoring and serving tests do); two days are scored and one window measured with the monitoring stage
(Evidently report in the lake, figures in MLflow); no DAG run is needed. Tokens are minted in-process by
the auth manager exactly as Airflow's ``/auth/token`` route does (``generate_jwt`` on the user).
"""

from __future__ import annotations

import html
import json
import re
from datetime import date, timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest

from closedloop.core.runconf import Window
from closedloop.devtools.generate import GeneratorConfig
from closedloop.stages import retraining as stages

pytestmark = pytest.mark.integration

START = date(2026, 5, 1)
TRAIN = Window(START + timedelta(days=2), START + timedelta(days=16))
MONITORED = Window(TRAIN.end, TRAIN.end + timedelta(days=2))
PREFIX = "/closedloop"


@pytest.fixture(scope="module")
def world(generated_home, airflow_db):
    from closedloop.stages.monitoring import measure_window
    from closedloop.stages.scoring import score_day

    config = GeneratorConfig(start=START, days=(MONITORED.end - START).days + 1, customers=300,
                             transactions_per_day=700, seed=23, fraud_rate=0.03)
    with generated_home("health", config) as rt:
        stages.validate(rt, TRAIN)
        stages.materialise(rt, TRAIN)
        ts = stages.build_training_set(rt, TRAIN)
        trained = stages.train(rt, ts, {"dag_run_id": "fixture"})
        registered = stages.register(rt, trained, TRAIN)
        promoted = stages.promote_or_reject(rt, stages.evaluate_gate(rt, registered, ts))
        for day in (MONITORED.start, MONITORED.start + timedelta(days=1)):
            score_day(rt, day)
        measured = measure_window(rt, MONITORED, dag_run_id="fixture")
        # a skew report as closedloop.stages.skew writes it (its format is that module's docstring)
        skew_day = MONITORED.start
        rt.lake.write_json(rt.lake.uri("reports", "skew", f"{skew_day.isoformat()}.json"), {
            "day": skew_day.isoformat(), "served_rows": 40, "sampled": 40, "passed": False,
            "reasons": ["12.50% of rows mismatch (more than 1.00%)"], "mismatch_share": 0.125,
            "feature_mismatch_share": 0.125, "score_mismatch_share": 0.0, "score_max_abs_diff": 0.0,
            "features": {}, "examples": [], "model_versions": [registered["version"]], "policy": {}})
        yield SimpleNamespace(rt=rt, registered=registered, promoted=promoted, measured=measured)


@pytest.fixture(scope="module")
def client(airflow_db):
    """The plugin's app as the API server mounts it (its own ``init_plugins``), behind a TestClient."""
    from airflow.api_fastapi.app import init_plugins
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    root = FastAPI()
    init_plugins(root)
    with TestClient(root) as c:
        yield c


def _token(username: str, role: str | None) -> str:
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    return create_auth_manager().generate_jwt(SimpleAuthManagerUser(username=username, role=role))


def test_health_data_holds_champion_history_drift_and_skew(world):
    from closedloop.stages import health

    rt = world.rt
    data = health.gather(rt)
    champ = data["champion"]
    assert champ["version"] == world.registered["version"]
    run_auc = rt.client.get_run(champ["run_id"]).data.metrics["holdout_roc_auc"]
    assert champ["metrics"]["roc_auc"] == pytest.approx(run_auc, abs=1e-6)
    assert data["history"] and data["history"][0]["to_version"] == champ["version"]
    assert world.promoted["action"] == "promoted"
    assert data["history"][0]["reason"] == world.promoted["reason"] and data["history"][0]["reason"]
    latest = data["latest_drift"]
    assert latest["window"] == MONITORED.to_dict()
    assert latest["figures"]["drift_share"] == pytest.approx(world.measured["figures"]["drift_share"])
    assert latest["html_path"] == f"drift/{MONITORED.start}_{MONITORED.end}/report.html"
    # the series: one point for the window, from MLflow's monitoring run
    assert [p["window"] for p in data["series"]] == [MONITORED.to_dict()]
    assert data["series"][0]["drift_share"] == pytest.approx(world.measured["figures"]["drift_share"])
    assert data["skew"]["day"] == MONITORED.start.isoformat() and data["skew"]["passed"] is False
    json.dumps(data)  # JSON-safe as it is

    body, media = health.report_bytes(rt, latest["html_path"])
    assert media.startswith("text/html") and body == rt.lake.read_bytes(world.measured["report"]["html"])
    # measure_drift's "Drift report" link, from the very dict it returns, is this report under the page's route
    from closedloop.adapters.airflow.links import drift_report_url

    assert drift_report_url("", world.measured) == f"{PREFIX}/reports/{latest['html_path']}"
    for bad in ("../curated/transactions/2026-05-03.parquet", "drift/../../landing/x.json",
                "drift/2026-05-20_2026-05-18/report.html", "drift/x_y/report.html", "skew/notaday.json",
                "drift/2026-01-01_2026-01-03/report.html"):
        with pytest.raises(health.ReportNotFound):
            health.report_bytes(rt, bad)


def test_svg_plots_have_axes_labels_and_one_point_per_window():
    from closedloop.stages import health

    svg = health.line_chart("t", ["2026-01-02", "2026-01-03", "2026-01-04"], {"a": [0.1, None, 0.4]},
                            x_label="window end", y_label="share", y_range=(0.0, 1.0), hlines={"limit": 0.3})
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert ">window end</text>" in svg and ">share</text>" in svg
    assert svg.count("<circle") == 2          # the None is a gap, not a point
    assert "<polyline" not in svg             # two isolated points make no line
    empty = health.line_chart("t", [], {"a": []}, x_label="x", y_label="y")
    assert "no monitored windows yet" in empty


def test_anonymous_and_forged_requests_get_401(client):
    import jwt

    for path in ("/", "/api/health.json", "/reports/drift/2026-05-17_2026-05-19/report.html"):
        r = client.get(PREFIX + path)
        assert r.status_code == 401, (path, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    html_401 = client.get(PREFIX + "/", headers={"Accept": "text/html"})
    assert html_401.status_code == 401 and html_401.headers["content-type"].startswith("text/html")

    forged = jwt.encode({"sub": "admin", "role": "admin", "aud": "apache-airflow", "exp": 4102444800},
                        "not-the-secret-of-this-airflow", algorithm="HS512")
    for headers, cookies in (({"Authorization": f"Bearer {forged}"}, None), ({}, {"_token": forged}),
                             ({"Authorization": "Bearer garbage"}, None)):
        client.cookies.clear()
        r = client.get(PREFIX + "/api/health.json", headers=headers, cookies=cookies)
        assert r.status_code == 401, (headers, cookies, r.text)
        assert "champion" not in r.text
    client.cookies.clear()
    # a valid token of a user without a role: authenticated, not authorised
    r = client.get(PREFIX + "/", headers={"Authorization": f"Bearer {_token('nobody', None)}"})
    assert r.status_code == 403, r.text


def test_a_logged_in_user_sees_the_page(client, world):
    rt = world.rt
    token = _token("admin", "admin")
    # the browser's way: the UI's _token cookie, in the iframe's requests
    r = client.get(PREFIX + "/", cookies={"_token": token})
    client.cookies.clear()
    assert r.status_code == 200, r.text
    page = r.text
    champ = world.registered["version"]
    auc = rt.client.get_run(rt.client.get_model_version(rt.model_name, champ).run_id).data.metrics["holdout_roc_auc"]
    assert re.search(rf"id='champion-version'>{champ}<", page)
    assert f"{auc:.4f}" in page
    assert html.escape(world.promoted["reason"]) in page  # the promotion history, with its reason
    assert f"id='drift-share'>{world.measured['figures']['drift_share']:.4f}<" in page
    assert page.count("<svg") == 3 and "share of drifted features" in page and ">ROC AUC</text>" in page
    # the thresholds the decision used, each feature against its band, estimated vs realised performance
    assert "id='thresholds-mode'>calibrated: calibrated on " in page
    estimated = world.measured["figures"]["performance"]["estimated"]
    assert f"id='estimated-performance'>{estimated:.4f} / [" in page
    assert "Estimated (CBPE, no labels) vs realised ROC AUC" in page and "in the decision (weight" in page
    assert "failed" in page and "12.50% of rows mismatch" in page  # the skew report

    # the API's way: a Bearer header; the JSON and the linked report
    auth = {"Authorization": f"Bearer {token}"}
    data = client.get(PREFIX + "/api/health.json", headers=auth).json()
    assert data["champion"]["version"] == champ
    # the input peak's threshold the decision used is on the page too (a feature far out decides alone)
    pk = data["latest_drift"]["thresholds"]["peak"]
    assert pk["threshold"] >= 3.0 and pk["feature"] in pk["features"], pk
    assert f"id='input-peak'>{html.escape(pk['feature'])} " in page
    link = data["latest_drift"]["html_path"]
    assert f'href="reports/{link}?model={rt.model_name}"' in page  # the report of this page's model
    for query in ("", f"?model={rt.model_name}"):  # the default model's, and named
        rep = client.get(f"{PREFIX}/reports/{link}{query}", headers=auth)
        assert rep.status_code == 200 and rep.content == rt.lake.read_bytes(world.measured["report"]["html"])
    # another model's lake holds no such report; an unknown model is a 404 naming the known ones
    assert client.get(f"{PREFIX}/reports/{link}?model=churn", headers=auth).status_code == 404
    assert client.get(f"{PREFIX}/reports/{link}?model=nope", headers=auth).status_code == 404
    assert client.get(f"{PREFIX}/reports/../curated/x.parquet", headers=auth).status_code == 404
    assert client.get(f"{PREFIX}/reports/drift/2026-01-01_2026-01-03/report.html", headers=auth).status_code == 404


def test_each_model_has_its_page_and_the_selector_lists_them_all(client, world):
    """One deployment, many models: ``?model=`` picks the page's model (default: the root-layout one, card_fraud);
    churn, which has trained nothing in this home, says so rather than showing card_fraud's champion."""
    from closedloop.core.settings import model_entries

    auth = {"Authorization": f"Bearer {_token('admin', 'admin')}"}
    names = [e.name for e in model_entries()]
    assert names == ["card_fraud", "churn"]
    champ = world.registered["version"]
    pages = {}
    for query in ("", "?model=card_fraud", "?model=churn"):
        r = client.get(f"{PREFIX}/{query}", headers=auth)
        assert r.status_code == 200, (query, r.text)
        pages[query] = r.text
        nav = re.search(r"<nav id='models'.*?</nav>", r.text)
        assert nav, r.text[:500]
        current = query.removeprefix("?model=") or "card_fraud"
        # every model listed; the current one marked, the others plain GET links
        assert f"<strong aria-current='page'>{current}</strong>" in nav[0]
        for other in set(names) - {current}:
            assert f'<a href="?model={other}">{other}</a>' in nav[0]
        assert f"<h1>Model health: {current}</h1>" in r.text
    assert pages[""] == pages["?model=card_fraud"]
    assert re.search(rf"id='champion-version'>{champ}<", pages["?model=card_fraud"])
    churn = pages["?model=churn"]
    assert "No champion yet" in churn and "champion-version" not in churn
    assert "No drift report yet" in churn and "No skew report yet" in churn
    data = client.get(f"{PREFIX}/api/health.json?model=churn", headers=auth).json()
    assert data["model"] == "churn" and data["champion"] is None and data["history"] == []
    assert client.get(f"{PREFIX}/api/health.json", headers=auth).json()["champion"]["version"] == champ
    listed = client.get(f"{PREFIX}/api/models.json", headers=auth).json()
    assert listed == {"default": "card_fraud", "models": [{"name": n, "error": None} for n in names]}
    # an unknown model: 404 naming the known ones, on the page (HTML for a browser) and the JSON alike
    for path in ("/?model=nope", "/api/health.json?model=nope"):
        r = client.get(PREFIX + path, headers=auth)
        assert r.status_code == 404, r.text
        assert r.json()["detail"] == "no model 'nope' in this deployment; known models: card_fraud, churn"
    r = client.get(PREFIX + "/?model=nope", headers={**auth, "Accept": "text/html"})
    assert r.status_code == 404 and "known models: card_fraud, churn" in r.text
    # the auth still guards every route, whatever the model
    for path in ("/?model=churn", "/api/health.json?model=churn", "/api/models.json"):
        assert client.get(PREFIX + path).status_code == 401


def _metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_metrics_hold_every_models_series(client, world):
    auth = {"Authorization": f"Bearer {_token('admin', 'admin')}"}
    r = client.get(PREFIX + "/metrics", headers=auth)
    assert r.status_code == 200, r.text
    got = _metric_samples(r.text)
    champion = (("arm", "champion"), ("model", "card_fraud"))
    assert got[("closedloop_model_version", champion)] == float(world.registered["version"])
    assert got[("closedloop_model_version", (("arm", "champion"), ("model", "churn")))] == 0.0
    for model in ("card_fraud", "churn"):
        assert got[("closedloop_model_config_ok", (("model", model),))] == 1.0
        assert ("closedloop_quarantined_partitions", (("kind", "transactions"), ("model", model))) in got
    # drift measured for card_fraud only: churn's figures are absent, not 0
    assert {dict(labels)["model"] for name, labels in got if name == "closedloop_drift_share"} == {"card_fraud"}


def test_a_model_whose_configuration_is_refused_breaks_nothing_else(client, world, tmp_path, monkeypatch):
    """A deployment with card_fraud and a model whose closedloop.yaml is refused: the page and the metrics of
    card_fraud are whole, the broken one is listed with its error (no link) and exports config_ok 0 alone."""
    import shutil

    from closedloop.core.settings import DEFAULT_MODELS

    models = tmp_path / "models"
    shutil.copytree(DEFAULT_MODELS / "card_fraud", models / "card_fraud")
    shutil.copytree(DEFAULT_MODELS / "churn", models / "broken")  # its model.name says churn: refused
    monkeypatch.setenv("CLOSEDLOOP_MODELS", str(models))
    auth = {"Authorization": f"Bearer {_token('admin', 'admin')}"}

    r = client.get(PREFIX + "/", headers=auth)
    assert r.status_code == 200, r.text
    assert re.search(rf"id='champion-version'>{world.registered['version']}<", r.text)
    nav = re.search(r"<nav id='models'.*?</nav>", r.text, re.S)[0]
    assert "?model=broken" not in nav
    assert re.search(r"<span class='bad'>broken</span>: configuration refused <code>[^<]*model\.name=&#x27;churn"
                     r"&#x27;: must be &#x27;broken&#x27;", nav), nav
    # the broken model's own page: the selector (card_fraud a link) and its error, 503; its JSON a 503 naming it
    r = client.get(PREFIX + "/?model=broken", headers=auth)
    assert r.status_code == 503 and "id='config-error'" in r.text and '<a href="?model=card_fraud">' in r.text
    r = client.get(PREFIX + "/api/health.json?model=broken", headers=auth)
    assert r.status_code == 503 and "model 'broken' is refused" in r.json()["detail"], r.text

    got = _metric_samples(client.get(PREFIX + "/metrics", headers=auth).text)
    assert got[("closedloop_model_config_ok", (("model", "broken"),))] == 0.0
    assert got[("closedloop_model_config_ok", (("model", "card_fraud"),))] == 1.0
    assert got[("closedloop_model_version", (("arm", "champion"), ("model", "card_fraud")))] == \
        float(world.registered["version"])
    assert {dict(labels)["model"] for _, labels in got} == {"card_fraud", "broken"}
    assert [k for k in got if dict(k[1])["model"] == "broken"] == [("closedloop_model_config_ok",
                                                                    (("model", "broken"),))]


def test_an_unreachable_registry_gives_503_not_a_traceback(client, home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    auth = {"Authorization": f"Bearer {_token('admin', 'admin')}"}
    r = client.get(PREFIX + "/api/health.json", headers=auth)
    assert r.status_code == 503, r.text
    assert "reachable from the API server" in r.json()["detail"] and "Traceback" not in r.text
    # the loop's metrics too: a 503 Prometheus records as a failed scrape (up == 0, ClosedloopLoopMetricsDown)
    r = client.get(PREFIX + "/metrics", headers=auth)
    assert r.status_code == 503 and "loop metrics unavailable" in r.json()["detail"], r.text


def test_airflow_loads_the_plugin(airflow_db):
    import os

    from airflow import plugins_manager

    assert Path(os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"]) == Path(__file__).resolve().parents[2] / "plugins"
    plugins, errors = plugins_manager._get_plugins()
    assert not {k: v for k, v in errors.items() if "model_health" in k}, errors
    ours = [p for p in plugins if p.name == "closedloop_model_health"]
    assert len(ours) == 1
    apps, _ = plugins_manager.get_fastapi_plugins()
    assert [a["url_prefix"] for a in apps if a["app"] is ours[0].fastapi_apps[0]["app"]] == [PREFIX]
    views, _ = plugins_manager._get_ui_plugins()
    view = next(v for v in views if v["name"] == "Model health")
    assert view["href"] == "closedloop/" and view["url_route"] == "model-health" and view["destination"] == "nav"
    # what the UI receives (GET /api/v2/plugins): the plugin through the public API's own response model
    from airflow.api_fastapi.core_api.datamodels.plugins import PluginResponse

    info = next(i for i in plugins_manager.get_plugin_info() if i["name"] == "closedloop_model_health")
    listed = PluginResponse.model_validate(info)
    assert [v.href for v in listed.external_views] == ["closedloop/"]
    assert [a.url_prefix for a in listed.fastapi_apps] == [PREFIX]


def test_loading_the_plugin_stays_cheap():
    """The scheduler, the dag-processor and task processes load plugins: no web or ML stack at import."""
    import subprocess
    import sys

    code = ("import sys, runpy; runpy.run_path(sys.argv[1]); "
            "print(sorted(m for m in ('fastapi', 'closedloop', 'mlflow', 'pandas', 'evidently') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parents[2] / "plugins"
                                                          / "model_health.py")],
                         capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


# -- the loop's metrics: the exporter on this world, scraped by a real Prometheus -------------------------------
class _Uvicorn:
    """An ASGI app under uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, app):
        import threading

        import uvicorn
        from support.services import free_port

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        from support.services import wait_for

        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), 60, "uvicorn")
        assert self.thread.is_alive()
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def test_a_real_prometheus_scrapes_the_loop_metrics_of_a_real_world(world, client, tmp_path, monkeypatch):
    """The plugin's /closedloop/metrics on this module's world (its champion, its measured window and a
    partition really quarantined by ingest), served by uvicorn as the API server mounts it, scraped by Debian's
    prometheus with deploy/prometheus/prometheus.yml's loop job (scrape token from a file) and rules.yml: every
    name of ``LOOP_SCRAPED`` is in its database (tests/deploy/test_prometheus.py checks every name the rules
    and the dashboard use against it and ``SCRAPED``), the values are the Model health page's, each rule and
    panel expression evaluates, and the loop's alerts are pending exactly where this world says they should be."""
    import subprocess
    import time

    import httpx
    from airflow.api_fastapi.app import init_plugins
    from fastapi import FastAPI
    from support.promql import (
        LOOP_JOB,
        LOOP_SCRAPED,
        binary,
        config_for,
        dashboard_expressions,
        rule_expressions,
        wait_until_scraped,
    )
    from support.services import free_port

    from closedloop.core.errors import DataValidationError
    from closedloop.devtools.generate import make_bad
    from closedloop.stages import health
    from closedloop.stages.ingest import ingest_partition

    prometheus = binary("prometheus")
    rt = world.rt
    # a partition refused by ingest for real: the world's last generated day, its keys nulled
    bad_day = MONITORED.end
    landing = rt.lake.partition("landing", "transactions", bad_day)
    rt.lake.write_parquet(make_bad(rt.lake.read_parquet(landing), "null_key", rt.contract, seed=1), landing)
    with pytest.raises(DataValidationError):
        ingest_partition(rt.lake, rt.contract, "transactions", bad_day)
    state = health.loop_state(rt)
    assert state["ingest"]["transactions"]["quarantined"] == 1
    assert state["versions"] == {"champion": int(world.registered["version"]), "canary": 0}
    assert state["drift"]["share"] == pytest.approx(world.measured["figures"]["drift_share"])
    decision = world.measured["decision"]
    assert state["drift"]["decision"] == ("retrain" if decision["drift"] else
                                          "no_drift" if decision["judged"] else "not_judged")
    estimated = state["performance"]["estimated"]
    assert estimated["roc_auc"] == pytest.approx(world.measured["figures"]["performance"]["estimated"])
    curated = rt.lake.list_days("curated", "transactions")
    assert bad_day not in curated and curated[-1] < bad_day
    assert state["ingest"]["transactions"]["newest_day"] == health._day_start(curated[-1].isoformat())
    # the last ingest run: the lake's own times, the newest of the validation markers and the quarantine report
    import os

    from closedloop.stages.ingest import marker_uri
    from closedloop.stages.quarantine import report_uri

    markers = [os.path.getmtime(rt.lake.local_path(marker_uri(rt.lake, "transactions", d))) for d in curated]
    refused = os.path.getmtime(rt.lake.local_path(report_uri(rt.lake, "transactions", bad_day)))
    assert state["ingest"]["transactions"]["last_run_at"] == pytest.approx(max(*markers, refused))

    scrape_token = "a-scrape-token-for-this-test"
    monkeypatch.setenv("AIRFLOW__CLOSEDLOOP__METRICS_TOKEN", scrape_token)
    # the route: no token, a wrong one -> 401; the scrape token or an Airflow user's -> the exposition
    assert client.get(PREFIX + "/metrics").status_code == 401
    assert client.get(PREFIX + "/metrics", headers={"Authorization": "Bearer not-it"}).status_code == 401
    as_user = client.get(PREFIX + "/metrics", headers={"Authorization": f"Bearer {_token('admin', 'admin')}"})
    assert as_user.status_code == 200 and as_user.headers["content-type"].startswith("text/plain")
    # the scrape token opens the metrics only, not the page
    assert client.get(PREFIX + "/api/health.json", headers={"Authorization": f"Bearer {scrape_token}"}
                      ).status_code == 401

    token_file = tmp_path / "metrics_token"
    token_file.write_text(scrape_token + "\n")
    root = FastAPI()
    init_plugins(root)  # the plugin's apps, mounted as the API server mounts them
    with _Uvicorn(root) as srv:
        config = config_for(tmp_path, None, None, interval="3s", loop=(f"127.0.0.1:{srv.port}", token_file))
        port = free_port()
        proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=10)

            def query(expr: str) -> list[dict]:
                answer = api.get("/query", params={"query": expr}).json()
                assert answer["status"] == "success", (expr, answer)
                return answer["data"]["result"]

            wait_until_scraped(api, proc, LOOP_SCRAPED, LOOP_JOB, timeout=60)
            # the values, as Prometheus holds them, are the page's
            # (churn, the deployment's other model, has its own series: no champion, nothing measured)
            champions = {r["metric"]["model"]: (r["metric"], r["value"][1])
                         for r in query('closedloop_model_version{arm="champion"}')}
            assert champions == {name: ({"__name__": "closedloop_model_version", "arm": "champion",
                                         "instance": f"127.0.0.1:{srv.port}", "job": LOOP_JOB, "model": name}, value)
                                 for name, value in ((rt.model_name, str(state["versions"]["champion"])),
                                                     ("churn", "0"))}
            assert {r["metric"]["model"]: r["value"][1]
                    for r in query('closedloop_quarantined_partitions{kind="transactions"}')} == {
                rt.model_name: "1", "churn": "0"}
            assert {r["metric"]["model"]: r["value"][1] for r in query("closedloop_model_config_ok")} == {
                rt.model_name: "1", "churn": "1"}
            assert [r["metric"]["decision"] for r in query("closedloop_drift_decision == 1")] == \
                [state["drift"]["decision"]]
            assert float(query("closedloop_drift_share")[0]["value"][1]) == pytest.approx(state["drift"]["share"])
            assert float(query('closedloop_performance_roc_auc{kind="estimated"}')[0]["value"][1]) == \
                pytest.approx(estimated["roc_auc"])
            # every rule loads and every rule and panel expression evaluates on these series
            groups = api.get("/rules").json()["data"]["groups"]
            rules = {r["name"]: r for g in groups for r in g["rules"]}
            assert set(rules) == set(rule_expressions())
            for expr in {**rule_expressions(), **dashboard_expressions()}.values():
                query(expr.replace("$__rate_interval", "1m"))
            # the loop's alerts, pending (their `for:` has not elapsed) exactly where this world calls for them:
            # its newest curated day is months before the clock (data not arrived), while its lake was written
            # minutes ago (ingest not stalled); drift and performance as measured
            expected = {"ClosedloopDataNotArrived"}
            if state["drift"]["decision"] == "retrain":
                expected.add("ClosedloopDriftDecided")
            if any(p["band_lower"] is not None and p["roc_auc"] < p["band_lower"]
                   for p in state["performance"].values()):
                expected.add("ClosedloopPerformanceBelowBand")
            deadline = time.monotonic() + 30
            while True:
                alerts = api.get("/alerts").json()["data"]["alerts"]
                active = {a["labels"]["alertname"] for a in alerts if a["labels"]["alertname"] in LOOP_ALERTS}
                if active == expected or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert active == expected, alerts
        finally:
            proc.terminate()
            proc.wait(timeout=30)


LOOP_ALERTS = {"ClosedloopLoopMetricsDown", "ClosedloopDataNotArrived", "ClosedloopIngestStalled",
               "ClosedloopDriftDecided", "ClosedloopPerformanceBelowBand"}
