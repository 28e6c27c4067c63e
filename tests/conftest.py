"""Shared test set-up: one Airflow home for the whole session, a fresh closedloop home per test.

The environment is set before anything imports Airflow: the metadata database, the DAGs folder and a
small parallelism. Each test that needs closedloop state gets its own ``CLOSEDLOOP_HOME`` (lake,
MLflow store, Feast registry and online store), so tests never see each other's models or data.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_SESSION = Path(tempfile.mkdtemp(prefix="closedloop-tests-"))

os.environ.setdefault("CLOSEDLOOP_HOME", str(_SESSION / "home"))
os.environ["AIRFLOW_HOME"] = str(_SESSION / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__PARALLELISM"] = "2"
os.environ["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_SESSION / 'airflow' / 'airflow.db'}"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# prometheus_client chooses where metric values live when it is first imported: feast.metrics (imported by
# Feast's online reads) sets PROMETHEUS_MULTIPROC_DIR first, which puts every later metric in shared files,
# so two scoring apps of one test process (test_serving, test_serving_canary) would count into the same series.
# (A `closedloop serve` process holds one app: there the shared files hold only its own series.)
import prometheus_client  # noqa: E402,F401

os.environ["CLOSEDLOOP_DEVICE"] = "cpu"
# MLflow's HTTP client retries for minutes by default (7 retries, backoff factor 2, 120 s timeout): a test
# that meets a dead server should fail in seconds, still through MLflow's own retries with backoff.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
# a task retried by the scheduler waits a second or two, not the production 20 s and more
os.environ.setdefault("CLOSEDLOOP_RETRY_DELAY_SECONDS", "1")

from closedloop.core.schema import DataContract, load_contract  # noqa: E402
from closedloop.core.settings import REPO_ROOT  # noqa: E402

CONTRACT_PATH = REPO_ROOT / "models" / "card_fraud" / "schema.yaml"

# -- RELIABILITY.md: what the tests that try to break the pipeline observed (tests/support/reliability.py)
# (the list lives in support.reliability: `import conftest` may find another conftest.py, e.g. tests/services')
from support.reliability import RECORDS as RELIABILITY_RECORDS  # noqa: E402


@pytest.fixture
def reliability(request):
    """``reliability.record(area, case, outcome, lost="nothing", *, corrupted=...)``: after the assertions."""
    from support.reliability import Recorder

    return Recorder(request.node.nodeid, RELIABILITY_RECORDS)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    # Tests that record reliability cases carry the marker (`make reliability` selects them), and the
    # staleness check of RELIABILITY.md, which reads what the other tests recorded, runs last.
    # A module is marked whole: its tests may build on each other (a story of DAG runs).
    modules = {item.module for item in items if "reliability" in getattr(item, "fixturenames", ())}
    for item in items:
        if getattr(item, "module", None) in modules:
            item.add_marker(pytest.mark.reliability)
    last = [i for i in items if i.nodeid.startswith("tests/test_reliability_doc.py")]
    items[:] = [i for i in items if i not in last] + last


_FAILED: list[str] = []


def pytest_runtest_logreport(report):
    if report.failed:
        _FAILED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    # `make reliability` rewrites RELIABILITY.md when every case passed (the staleness checks of the old file
    # may fail in that very run: they are what the rewrite fixes).
    failed = [n for n in _FAILED if not n.startswith("tests/test_reliability_doc.py")]
    if os.environ.get("CLOSEDLOOP_WRITE_RELIABILITY") == "1" and not failed and RELIABILITY_RECORDS:
        from support.reliability import DOC, render

        DOC.write_text(render(RELIABILITY_RECORDS) + "\n")
        if _FAILED:  # only the staleness checks of the file just rewritten failed
            session.exitstatus = 0


@pytest.fixture(scope="session")
def contract() -> DataContract:
    return load_contract(CONTRACT_PATH)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``CLOSEDLOOP_HOME`` for this test (in the environment, as tasks read it)."""
    h = tmp_path / "closedloop"
    monkeypatch.setenv("CLOSEDLOOP_HOME", str(h))
    for var in ("CLOSEDLOOP_LAKE_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "CLOSEDLOOP_MLFLOW_ARTIFACTS",
                "CLOSEDLOOP_FEAST_REGISTRY", "CLOSEDLOOP_CONFIG", "CLOSEDLOOP_MODELS", "CLOSEDLOOP_MODEL"):
        monkeypatch.delenv(var, raising=False)
    return h


@pytest.fixture
def runtime(home: Path):
    """A Runtime on the test's own home."""
    from closedloop.stages.runtime import Runtime

    return Runtime.from_env()


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """The session's Airflow metadata database, migrated once."""
    airflow_home = Path(os.environ["AIRFLOW_HOME"])
    airflow_home.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                   capture_output=True, env=os.environ.copy(), timeout=300)
    return airflow_home


@pytest.fixture(scope="session")
def dagbag(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


@pytest.fixture(scope="session")
def generated_home(tmp_path_factory):
    """A factory of fresh closedloop homes holding generated data, for module-scoped fixtures.

    ``with generated_home("name", GeneratorConfig(...)) as rt:`` sets ``CLOSEDLOOP_HOME`` (as tasks read
    it) for as long as the block lasts and yields a Runtime on it.
    """

    @contextlib.contextmanager
    def make(name: str, config):
        from closedloop.devtools.generate import generate
        from closedloop.stages.runtime import Runtime

        home = tmp_path_factory.mktemp(name) / "closedloop"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CLOSEDLOOP_HOME", str(home))
            rt = Runtime.from_env()
            generate(config, rt.lake, rt.contract)
            yield rt

    return make
