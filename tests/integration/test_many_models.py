"""One deployment, many models: card_fraud and churn side by side, at the same time, neither losing the other's state.

- Feast: two processes, started together, each apply their model's definitions and materialise a window at the
  same moment (a barrier file releases both), once with the embedded registry files (one per model) and once with
  one SQL registry on PostgreSQL shared by both (a Feast project per model). Afterwards each model's store lists
  its own feature view, entity and service, and serves its online features: neither model lost anything.
- The real scheduler: one Airflow home and metadata database run both models' DAGs; both ingest a day at the same
  time, then both retrain at the same time (their runs' intervals overlap). Each registered model gets its own
  champion, version 1, trained on its own data in its own experiment; ``closedloop status --model ...`` and the
  Model health page's data show each its own champion, and the alerts file holds a ``promoted`` alert per model.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

MODELS = ("card_fraud", "churn")
FEAST_WINDOW = (date(2026, 3, 1), date(2026, 3, 4))  # [start, end): three days each model materialises

# What each model's process runs before the work it does at the same moment as the other's: wait_for_barrier()
# says the process is ready (its imports done) and returns when the test opens the barrier, for both at once.
BARRIER = """
import json, sys, time
from pathlib import Path

def wait_for_barrier(model):
    barrier = Path(sys.argv[1])
    (barrier.parent / (model + ".ready")).touch()
    deadline = time.monotonic() + 120
    while not barrier.exists():
        if time.monotonic() > deadline:
            sys.exit("the barrier never opened")
        time.sleep(0.02)
"""

# One model's Feast worker: curate the window (before the barrier, so that only Feast runs at the same time), then
# build the store (a SQL registry's tables are made then), apply the definitions and materialise the window.
FEAST_WORKER = BARRIER + """
from datetime import date
from closedloop.core.runconf import Window
from closedloop.stages import retraining as stages
from closedloop.stages.runtime import Runtime

rt = Runtime.from_env()
window = Window(date.fromisoformat(sys.argv[2]), date.fromisoformat(sys.argv[3]))
stages.validate(rt, window)
rt.defs  # feast imported
wait_for_barrier(rt.settings.model)
began = time.time()
out = stages.materialise(rt, window)
print(json.dumps({"model": rt.settings.model, "began": began, "ended": time.time(), **out}))
"""

# One model's MLflow worker: its first client on the embedded tracking database, which creates its tables.
MLFLOW_WORKER = BARRIER + """
import mlflow
from closedloop.stages.runtime import Runtime

rt = Runtime.from_env()
wait_for_barrier(rt.settings.model)
began = time.time()
names = [e.name for e in rt.client.search_experiments()]
print(json.dumps({"model": rt.settings.model, "began": began, "ended": time.time(), "experiments": names}))
"""


def _at_once(script: str, args: list[str], folder: Path, timeout: float = 120) -> dict[str, dict]:
    """Run ``script`` once per model (``CLOSEDLOOP_MODEL``), released together by a barrier file in ``folder``;
    each process's last stdout line (JSON) by model. Fails with both processes' stderr when one fails."""
    barrier = folder / "go"
    procs = {m: subprocess.Popen([sys.executable, "-c", script, str(barrier), *args],
                                 env={**os.environ, "CLOSEDLOOP_MODEL": m}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
             for m in MODELS}
    try:
        deadline = time.monotonic() + timeout
        while not all((folder / f"{m}.ready").exists() for m in MODELS):
            if any(p.poll() is not None for p in procs.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        barrier.touch()
        outs = {m: p.communicate(timeout=timeout) for m, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs.values()), "\n".join(o[1][-6000:] for o in outs.values())
    return {m: json.loads(o[0].strip().splitlines()[-1]) for m, o in outs.items()}


@contextlib.contextmanager
def _registry(kind: str) -> Iterator[str | None]:
    """``files``: nothing to set (each model's registry file); ``sql``: a fresh PostgreSQL database, dropped after.

    An unreachable PostgreSQL skips the case, or fails it under ``CI=true`` (tests/support/services.py)."""
    if kind == "files":
        yield None
        return
    from support import services

    with services.postgres_database("cl_many_models") as url:
        yield url


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return max(a[0], b[0]) < min(a[1], b[1])


@pytest.fixture(scope="module")
def feast_lake(tmp_path_factory):
    """One lake holding a few landed days of both models (the lake's root for card_fraud, models/churn/ for churn)."""
    from closedloop.devtools.generate import GeneratorConfig, generate
    from closedloop.stages.runtime import Runtime

    root = tmp_path_factory.mktemp("feast_lake")
    lake = root / "lake"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLOSEDLOOP_HOME", str(root / "seed"))
        mp.setenv("CLOSEDLOOP_LAKE_URI", str(lake))
        for model, seed in zip(MODELS, (3, 4), strict=True):
            rt = Runtime.from_env(model)
            generate(GeneratorConfig(start=FEAST_WINDOW[0], days=(FEAST_WINDOW[1] - FEAST_WINDOW[0]).days,
                                     customers=150, transactions_per_day=300, seed=seed, fraud_rate=0.05),
                     rt.lake, rt.contract)
    return lake


@pytest.mark.parametrize("registry", ["files", "sql"])
def test_two_models_apply_and_materialise_at_once_and_keep_their_definitions(registry, feast_lake, tmp_path,
                                                                              monkeypatch):
    from closedloop.stages.feast_store import materialised_until
    from closedloop.stages.runtime import Runtime

    home = tmp_path / "closedloop"
    env = {"CLOSEDLOOP_HOME": str(home), "CLOSEDLOOP_LAKE_URI": str(feast_lake)}
    for var in ("CLOSEDLOOP_CONFIG", "CLOSEDLOOP_MODEL", "CLOSEDLOOP_FEAST_REGISTRY", "CLOSEDLOOP_ONLINE_STORE"):
        monkeypatch.delenv(var, raising=False)
    with _registry(registry) as url:
        if url:
            env["CLOSEDLOOP_FEAST_REGISTRY"] = url
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        done = _at_once(FEAST_WORKER, [d.isoformat() for d in FEAST_WINDOW], tmp_path)
        # both were applying and materialising at the same moment
        assert _overlap(*((done[m]["began"], done[m]["ended"]) for m in MODELS)), done

        stores = {}
        for model in MODELS:
            rt = Runtime.from_env(model)  # a store built afresh: what the registry holds now
            c, store = rt.contract, rt.store
            stores[model] = rt
            assert store.project == rt.settings.feast_project
            assert {v.name for v in store.list_feature_views()} == {c.feature_view}, model
            assert [(e.name, e.join_key) for e in store.list_entities()] == [(rt.defs.entity.name, c.entity)], model
            assert [s.name for s in store.list_feature_services()] == [f"{c.name}_model"], model
            assert materialised_until(store, c.feature_view) is not None, model
            # the online store serves the window's last features of the model's own entities
            last = FEAST_WINDOW[1] - timedelta(days=1)
            feats = rt.lake.read_parquet(rt.lake.partition("curated", c.feature_view, last))
            entities = sorted(feats[c.entity].unique().tolist())[:5]
            online = store.get_online_features(features=rt.defs.service,
                                               entity_rows=[{c.entity: e} for e in entities]).to_dict()
            values = [online[name][i] for name in c.entity_features for i in range(len(entities))]
            assert any(v is not None for v in values), (model, online)
        assert stores["card_fraud"].settings.feast_project != stores["churn"].settings.feast_project
        if url:  # one SQL registry, both projects in it
            import sqlalchemy as sa

            from closedloop.stages.feast_config import feast_registry_config

            engine = sa.create_engine(feast_registry_config(stores["churn"].settings)["path"])
            with engine.connect() as conn:
                rows = set(conn.execute(sa.text("SELECT project_id, feature_view_name FROM feature_views")))
            engine.dispose()
            assert rows == {(rt.settings.feast_project, rt.contract.feature_view) for rt in stores.values()}
        else:  # a registry file per model
            files = {m: Path(rt.settings.feast_registry) for m, rt in stores.items()}
            assert files["card_fraud"] != files["churn"] and all(f.exists() for f in files.values()), files


def test_two_models_first_mlflow_clients_at_once_on_the_embedded_store(tmp_path, monkeypatch):
    """Both models' first trainings of a fresh home open the embedded tracking database at the same moment."""
    monkeypatch.setenv("CLOSEDLOOP_HOME", str(tmp_path / "closedloop"))
    for var in ("CLOSEDLOOP_CONFIG", "CLOSEDLOOP_MODEL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    done = _at_once(MLFLOW_WORKER, [], tmp_path)
    assert _overlap(*((done[m]["began"], done[m]["ended"]) for m in MODELS)), done
    assert (tmp_path / "closedloop" / "mlflow" / "mlflow.db").exists()


# -- the real scheduler ----------------------------------------------------------------------------------------------
START = date(2026, 3, 1)
GENERATED_DAYS = 14  # the window's days and the week after it, when most of their labels arrive
WINDOW = {"window_start": "2026-03-01", "window_end": "2026-03-08"}
# small data as in test_closed_loop_scheduler.py / test_bring_your_own_data.py: enough positives in a one-day holdout
DATA = {"card_fraud": {"customers": 400, "transactions_per_day": 1200, "fraud_rate": 0.03, "seed": 42},
        "churn": {"customers": 300, "transactions_per_day": 800, "fraud_rate": 0.05, "seed": 5}}
EXPERIMENTS = {"card_fraud": "closedloop-training", "churn": "churn-training"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interval(run: dict) -> tuple[float, float]:
    from datetime import datetime

    def at(value: str) -> float:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()

    return at(run["start_date"]), at(run["end_date"])


def _run_together(stack, runs: dict[str, dict], timeout: float) -> dict[str, dict]:
    """Trigger every ``dag_id: conf`` of ``runs`` at once, wait for all; the finished runs by DAG id."""
    ids = {dag_id: stack.trigger(dag_id, conf) for dag_id, conf in runs.items()}
    return {dag_id: stack.wait_run(dag_id, run_id, timeout) for dag_id, run_id in ids.items()}


def test_two_models_ingest_and_retrain_at_once_under_the_scheduler(tmp_path, monkeypatch):
    from closedloop.core.settings import select_model
    from closedloop.devtools.airflow_home import airflow_home, write_config
    from closedloop.devtools.generate import GeneratorConfig, generate
    from closedloop.devtools.stack import AirflowStack
    from closedloop.stages.alerts import alerts_path
    from closedloop.stages.health import gather
    from closedloop.stages.registry import CHAMPION, alias_version
    from closedloop.stages.runtime import Runtime

    home = tmp_path / "closedloop"
    monkeypatch.setenv("CLOSEDLOOP_HOME", str(home))
    for var in ("CLOSEDLOOP_CONFIG", "CLOSEDLOOP_MODEL", "CLOSEDLOOP_MODELS", "CLOSEDLOOP_LAKE_URI",
                "CLOSEDLOOP_FEAST_REGISTRY", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    rts = {m: Runtime.from_env(m) for m in MODELS}
    for m, rt in rts.items():
        generate(GeneratorConfig(start=START, days=GENERATED_DAYS, **DATA[m]), rt.lake, rt.contract)
    # one Airflow home and metadata database for both models (this test's own, not the session's)
    af_home = airflow_home(rts["card_fraud"].settings)
    write_config(rts["card_fraud"].settings, parallelism=2)
    for var in [v for v in os.environ if v.startswith("AIRFLOW__")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("AIRFLOW_HOME", str(af_home))
    subprocess.run([str(Path(sys.executable).parent / "airflow"), "db", "migrate"], check=True,
                   capture_output=True, timeout=300, env=os.environ.copy())

    ingest = {m: select_model(model=m).dag_id("ingest") for m in MODELS}
    retraining = {m: select_model(model=m).dag_id("retraining") for m in MODELS}
    assert ingest == {"card_fraud": "ingest", "churn": "churn.ingest"}  # the root layout beside a namespaced one
    # the DAGs downstream of ingest (scoring, monitoring...) stay paused: this story is ingest and retraining
    env = {"CLOSEDLOOP_HOME": str(home), "CLOSEDLOOP_SCHEDULES": "manual",
           "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True", "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2", "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10"}
    port = _free_port()
    with AirflowStack(af_home, env, port=port) as stack:
        wanted = [*ingest.values(), *retraining.values()]

        def parsed() -> bool:
            known = {d["dag_id"] for d in stack.api("GET", "/dags", params={"limit": 100})["dags"]}
            return set(wanted) <= known

        stack.wait(parsed, 120, f"the DAGs {wanted} to be parsed")
        for dag_id in wanted:
            stack.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

        ingested = _run_together(stack, {d: {"day": START.isoformat()} for d in ingest.values()}, 180)
        states = {d: stack.task_states(d, r["dag_run_id"]) for d, r in ingested.items()}
        assert all(r["state"] == "success" for r in ingested.values()), (states, af_home / "logs")
        trained = _run_together(stack, {d: {**WINDOW, "reason": f"first {m} champion"}
                                        for m, d in retraining.items()}, 300)
        states = {d: stack.task_states(d, r["dag_run_id"]) for d, r in trained.items()}
        assert all(r["state"] == "success" for r in trained.values()), (states, af_home / "logs")
    # at the same time: each model's run started before the other's ended
    assert _overlap(*(_interval(ingested[d]) for d in ingest.values())), ingested
    assert _overlap(*(_interval(trained[d]) for d in retraining.values())), trained

    runs, data = {}, {}
    for m, rt in rts.items():
        # its own champion, version 1, trained on its own data in its own experiment
        assert alias_version(rt.client, m, CHAMPION) == "1", m
        mv = rt.client.get_model_version(m, "1")
        run = rt.client.get_run(mv.run_id)
        runs[m], data[m] = mv.run_id, mv.tags["closedloop.data_sha256"]
        assert rt.client.get_experiment(run.info.experiment_id).name == EXPERIMENTS[m]
        assert run.data.tags["closedloop.schema"] == rt.contract.name == m
        assert mv.tags["closedloop.training_set"].startswith(rt.lake.uri("training_sets") + "/"), mv.tags
        assert mv.tags["closedloop.dag_run_id"] == trained[retraining[m]]["dag_run_id"]
        # the Model health page's data: its own champion
        health = gather(rt)
        assert health["model"] == m and health["champion"]["version"] == "1", health
        assert health["champion"]["run_id"] == mv.run_id
    assert runs["card_fraud"] != runs["churn"] and data["card_fraud"] != data["churn"]
    assert rts["churn"].lake.uri("training_sets").startswith(rts["card_fraud"].lake.uri("models") + "/churn/")

    closedloop = str(Path(sys.executable).parent / "closedloop")
    for m in MODELS:
        out = subprocess.run([closedloop, "status", "--model", m], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "CLOSEDLOOP_HOME": str(home)})
        assert out.returncode == 0, out.stderr
        other = next(o for o in MODELS if o != m)
        assert f"model {m} " in out.stdout and "champion: version 1 " in out.stdout, out.stdout
        assert f"run: {runs[m]}" in out.stdout and runs[other] not in out.stdout, out.stdout

    alerts = [json.loads(line) for line in alerts_path(rts["churn"].settings).read_text().splitlines()]
    promoted = {(a["model"], a["dag_id"]) for a in alerts if a["kind"] == "promoted"}
    assert promoted == {(m, retraining[m]) for m in MODELS}, alerts
    # stopped cleanly: nothing of this stack still serves its port
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
