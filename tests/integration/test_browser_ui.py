"""The Airflow UI in a real browser: headless Chromium (Debian's ``chromium``, driven by Playwright) logs in
through the login form and opens the DAG list, a retraining run's graph, an extra link, the Model health page
and the graph of all DAG dependencies (ingest -> scoring -> monitoring -> retraining).

The world is small and made by real runs in the session's Airflow database: a generated data set whose
last days drift; the ``retraining`` DAG run once with ``dag.test()`` (it promotes the first champion);
three days scored; ``drift_monitoring`` run with ``dag.test()`` on two drifted windows, the second of which
confirms the drift and starts a ``retraining`` run through its ``TriggerDagRunOperator`` (whose built-in
"Triggered DAG" extra link is the one checked). Then only Airflow's API server is started, on that database
and that home, and the browser is pointed at it.

Screenshots are saved under ``$CLOSEDLOOP_SCREENSHOTS`` (default: a folder under pytest's temporary
directory, printed); with ``CLOSEDLOOP_WRITE_SCREENSHOTS=1`` the copies in ``docs/screenshots/`` (the UI tour of
docs/getting-started.md) are rewritten. Without ``chromium`` on the PATH (``make test`` installs it) the test skips,
and fails under ``CI=true``. Playwright never downloads a browser here.
"""

from __future__ import annotations

import os
import shutil
from datetime import date, timedelta
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, unquote

import pytest

from closedloop.core.runconf import Window
from closedloop.devtools.generate import GeneratorConfig

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DOCS_SHOTS = REPO / "docs" / "screenshots"
START = date(2026, 5, 1)
TRAIN = Window(START + timedelta(days=2), START + timedelta(days=16))
DRIFT_START = TRAIN.end                                   # every day after the training window drifts
SCORED = [DRIFT_START + timedelta(days=k) for k in range(3)]
DAGS = ("batch_scoring", "drift_monitoring", "ingest", "retraining", "rollback", "skew_check")
VIEWPORT = {"width": 1280, "height": 800}


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        msg = ("chromium is not on the PATH: `make test` installs Debian's package (apt-get install -y "
               "--no-install-recommends chromium, as root); Playwright's own browser download is not used")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def chromium() -> str:
    return _chromium()


@pytest.fixture(scope="module")
def world(chromium, generated_home, airflow_db, dagbag):
    """Runs in the session's Airflow database: one retraining (a champion), two drift_monitoring runs.

    (``chromium`` first: without a browser nothing is built.)
    """
    from closedloop.stages.scoring import score_day

    config = GeneratorConfig(start=START, days=(SCORED[-1] - START).days + 1, customers=300,
                             transactions_per_day=700, seed=23, fraud_rate=0.03, covariate_drift=1.5,
                             concept_drift=1.0, new_categories=True, drift_start=DRIFT_START)
    monitoring: list = []
    with generated_home("browser", config) as rt:
        try:
            retraining = dagbag.get_dag("retraining").test(
                run_conf={"window_start": TRAIN.start.isoformat(), "window_end": TRAIN.end.isoformat(),
                          "reason": "browser tour"})
            assert retraining.state == "success", _states(retraining)
            for day in SCORED:
                score_day(rt, day)
            # the first drifted window is not yet a regime; the second confirms it and starts retraining
            for day in SCORED[1:]:
                monitoring.append(dagbag.get_dag("drift_monitoring").test(run_conf={"day": day.isoformat()}))
            last = monitoring[-1]
            assert _states(last)["trigger_retraining"] == "success", _states(last)
            measured = last.get_task_instance("measure_drift").xcom_pull(task_ids="measure_drift")
            triggered = _triggered_runs([dr.run_id for dr in monitoring])
            assert len(triggered) == 1, triggered
            yield SimpleNamespace(rt=rt, retraining=retraining, retraining_tasks=sorted(_states(retraining)),
                                  monitoring=last, measured=measured, triggered=triggered[0])
        finally:
            # the triggered run stays queued (no scheduler here): gone, so that no later test of the session
            # sees a retraining "queued or running"
            _delete_retraining_runs(_triggered_runs([dr.run_id for dr in monitoring]))


def _states(dr) -> dict[str, str | None]:
    return {ti.task_id: ti.state for ti in dr.get_task_instances()}


def _triggered_runs(monitoring_run_ids: list[str]) -> list[str]:
    """The retraining runs that these drift_monitoring runs started (their conf names the trigger)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        runs = session.query(DagRun).filter(DagRun.dag_id == "retraining").all()
        return [r.run_id for r in runs
                if ((r.conf or {}).get("trigger") or {}).get("run_id") in set(monitoring_run_ids)]


def _delete_retraining_runs(run_ids: list[str]) -> None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        for run in session.query(DagRun).filter(DagRun.dag_id == "retraining", DagRun.run_id.in_(run_ids)):
            session.delete(run)


@pytest.fixture(scope="module")
def server(world):
    """Only Airflow's API server (UI, REST API, plugins), on the session's database and the world's home."""
    from support.services import free_port

    from closedloop.devtools.stack import AirflowStack

    stack = AirflowStack(Path(os.environ["AIRFLOW_HOME"]), {"CLOSEDLOOP_HOME": str(world.rt.settings.home)},
                         port=free_port(), components=("api-server",))
    with stack:
        yield stack


@pytest.fixture(scope="module")
def shots(request, tmp_path_factory) -> Path:
    """The screenshots' folder, reported on pytest's terminal (output capture does not hide it)."""
    folder = Path(os.environ.get("CLOSEDLOOP_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nscreenshots of the UI tour: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser(chromium, server):
    """One headless Chromium for the module (Debian's; Playwright downloads nothing)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--headless=new"])
        context = b.new_context(viewport=VIEWPORT)
        context.set_default_timeout(30_000)
        try:
            yield context.new_page()
        finally:
            context.close()
            b.close()


def _shot(page, shots: Path, name: str, **kwargs) -> Path:
    path = shots / f"{name}.png"
    (kwargs.pop("locator", None) or page).screenshot(path=path, **kwargs)
    return path


def _run_url(server, dag_id: str, run_id: str, rest: str = "") -> str:
    return f"{server.url}/dags/{dag_id}/runs/{quote(run_id, safe='')}{rest}"


# The tests below are one tour, in order: the login first (the page keeps its session).
def test_1_the_ui_asks_for_a_login_and_the_form_logs_in(browser, server, shots):
    page = browser
    page.goto(server.url + "/dags")
    page.wait_for_url(lambda u: "/auth/login" in u)  # no session: the UI sends the browser to the login form
    page.locator("input[name=username]").fill(server.user)
    page.locator("input[name=password]").fill("not-the-password")
    page.get_by_role("button", name="Sign in").click()
    page.get_by_text("Invalid credentials").wait_for()
    assert "/auth/login" in page.url
    page.locator("input[name=password]").fill(server.password())
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(lambda u: "/auth/login" not in u)
    assert page.url.startswith(server.url + "/dags"), page.url  # back where it was sent from
    assert any(c["name"] == "_token" for c in page.context.cookies())


def test_2_the_dag_list_shows_the_closedloop_dags(browser, server, shots):
    page = browser
    page.goto(server.url + "/dags")
    for dag_id in DAGS:
        page.get_by_role("link", name=dag_id, exact=True).first.wait_for()
    _shot(page, shots, "dags")


def test_3_a_retraining_run_s_graph_shows_its_tasks(browser, server, world, shots):
    page = browser
    page.goto(_run_url(server, "retraining", world.retraining.run_id))
    page.get_by_role("button", name="Show Graph").first.click()
    nodes = page.locator(".react-flow__node")
    assert len(world.retraining_tasks) == 7, world.retraining_tasks  # the run's own tasks, validate .. promote
    for task_id in world.retraining_tasks:
        nodes.filter(has_text=task_id).first.wait_for()
    names = {t.strip() for t in nodes.all_inner_texts()}
    assert {t for t in world.retraining_tasks if not any(n.startswith(t) for n in names)} == set(), names
    assert page.get_by_text("Success").first.is_visible()
    # the screenshot: the graph alone, as wide as the window allows
    page.get_by_role("button", name="Collapse Details Panel").click()
    page.locator(".react-flow__controls-fitview").click()
    page.wait_for_timeout(500)  # the fit is animated
    boxes = [b for b in (n.bounding_box() for n in nodes.all()) if b]
    x0, y0 = max(min(b["x"] for b in boxes) - 30, 0), max(min(b["y"] for b in boxes) - 30, 0)
    x1 = min(max(b["x"] + b["width"] for b in boxes) + 30, VIEWPORT["width"])
    y1 = min(max(b["y"] + b["height"] for b in boxes) + 30, VIEWPORT["height"])
    _shot(page, shots, "retraining-graph", clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})


def test_4_the_trigger_task_s_extra_link_opens_the_retraining_run_it_started(browser, server, world, shots):
    page = browser
    page.goto(_run_url(server, "drift_monitoring", world.monitoring.run_id, "/tasks/trigger_retraining/details"))
    page.get_by_text("Extra Links", exact=True).wait_for()
    link = page.get_by_role("link", name="Triggered DAG", exact=True)
    assert link.get_attribute("href") == f"/dags/retraining/runs/{world.triggered}"
    _shot(page, shots, "extra-link")
    link.click()
    page.wait_for_url(lambda u: unquote(u).endswith(f"/dags/retraining/runs/{world.triggered}"))
    page.get_by_text(world.triggered).first.wait_for()
    _shot(page, shots, "triggered-run")


def test_5_the_model_health_page_shows_the_champion_and_the_drift(browser, server, world, shots):
    page = browser
    page.goto(server.url + "/")
    page.get_by_role("button", name="Browse").click()
    page.get_by_role("menuitem", name="Model health").click()
    page.wait_for_url(lambda u: "/plugin/model-health" in u)
    frame = page.frame_locator("iframe")
    from closedloop.stages.registry import CHAMPION, alias_version

    champion = alias_version(world.rt.client, world.rt.model_name, CHAMPION)
    assert champion == "1"  # promoted by the retraining run
    assert frame.locator("#champion-version").inner_text().strip() == champion
    drift_share = world.measured["figures"]["drift_share"]
    assert frame.locator("#drift-share").inner_text().strip() == f"{drift_share:.4f}"
    assert frame.locator("svg").count() == 3  # the drift share, the champions' ROC AUC, estimated vs realised
    assert frame.get_by_role("img", name="Drift share per monitored window").is_visible()
    _shot(page, shots, "model-health")
    figure = frame.locator("svg").first
    figure.scroll_into_view_if_needed()
    _shot(page, shots, "model-health-drift", locator=figure)

    if os.environ.get("CLOSEDLOOP_WRITE_SCREENSHOTS") == "1":  # docs/getting-started.md's UI tour
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        for name in ("dags", "retraining-graph", "extra-link", "model-health", "model-health-drift"):
            shutil.copyfile(shots / f"{name}.png", DOCS_SHOTS / f"{name}.png")
            assert (DOCS_SHOTS / f"{name}.png").stat().st_size < 300_000, name


def test_6_the_dependency_graph_shows_the_loop_from_ingest_to_retraining(browser, server, shots):
    """drift_monitoring's graph with "All Dag Dependencies": the assets between the DAGs and the trigger."""
    page = browser
    page.goto(f"{server.url}/dags/drift_monitoring")
    page.get_by_role("button", name="Show Graph (Press g)").click()
    page.get_by_role("button", name="Options").click()
    page.get_by_test_id("dependencies").get_by_role("combobox").click()
    page.get_by_role("option", name="All Dag Dependencies").click()
    page.keyboard.press("Escape")
    nodes = page.locator(".react-flow__node")
    chain = ["ingest", "closedloop_curated", "batch_scoring", "closedloop_predictions", "drift_monitoring",
             "retraining"]
    for name in chain:
        nodes.filter(has_text=name).first.wait_for()
    collapse = page.get_by_role("button", name="Collapse Details Panel")
    if collapse.count():
        collapse.click()
    page.locator(".react-flow__controls-fitview").click()
    page.wait_for_timeout(500)  # the fit is animated
    # each node by the first line of its text (drift_monitoring's box holds its tasks below its name)
    boxes: dict[str, dict] = {}
    for node in nodes.all():
        label = node.inner_text().strip().splitlines()[0].strip()
        box = node.bounding_box()
        if box and label not in boxes:
            boxes[label] = box
    assert set(chain) <= set(boxes), sorted(boxes)
    # drawn left to right in the loop's order: each DAG feeds the next
    xs = [boxes[name]["x"] for name in chain]
    assert xs == sorted(xs), dict(zip(chain, xs, strict=True))
    # trigger_retraining twice: the task inside drift_monitoring and the trigger dependency it draws to retraining
    assert nodes.filter(has_text="trigger_retraining").count() >= 2
    every = [b for b in (n.bounding_box() for n in nodes.all()) if b]
    x0, y0 = max(min(b["x"] for b in every) - 20, 0), max(min(b["y"] for b in every) - 20, 0)
    x1 = min(max(b["x"] + b["width"] for b in every) + 20, VIEWPORT["width"])
    y1 = min(max(b["y"] + b["height"] for b in every) + 20, VIEWPORT["height"])
    _shot(page, shots, "dag-dependencies", clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
    if os.environ.get("CLOSEDLOOP_WRITE_SCREENSHOTS") == "1":  # docs/getting-started.md's UI tour
        shutil.copyfile(shots / "dag-dependencies.png", DOCS_SHOTS / "dag-dependencies.png")
