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

# One model's worker: curate the window (before the barrier, so that only Feast runs at the same time), build the
# store, say it is ready, wait for the barrier, then apply the definitions and materialise the window.
FEAST_WORKER = """
import json, os, sys, time
from datetime import date
from pathlib import Path
from closedloop.core.runconf import Window
from closedloop.stages import retraining as stages
from closedloop.stages.runtime import Runtime

rt = Runtime.from_env()
window = Window(date.fromisoformat(sys.argv[1]), date.fromisoformat(sys.argv[2]))
stages.validate(rt, window)
rt.defs  # feast imported; the store (and a SQL registry's tables) is made after the barrier
barrier = Path(sys.argv[3])
(barrier.parent / (rt.settings.model + ".ready")).touch()
deadline = time.monotonic() + 120
while not barrier.exists():
    if time.monotonic() > deadline:
        sys.exit("the barrier never opened")
    time.sleep(0.02)
began = time.time()
out = stages.materialise(rt, window)
print(json.dumps({"model": rt.settings.model, "began": began, "ended": time.time(), **out}))
"""


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
        barrier = tmp_path / "go"
        procs = {m: subprocess.Popen([sys.executable, "-c", FEAST_WORKER, *(d.isoformat() for d in FEAST_WINDOW),
                                      str(barrier)], env={**os.environ, "CLOSEDLOOP_MODEL": m},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for m in MODELS}
        try:
            deadline = time.monotonic() + 120
            while not all((tmp_path / f"{m}.ready").exists() for m in MODELS):
                dead = {m: p.returncode for m, p in procs.items() if p.poll() is not None}
                assert not dead and time.monotonic() < deadline, {m: p.communicate() for m, p in procs.items()
                                                                  if p.poll() is not None}
                time.sleep(0.05)
            barrier.touch()
            outs = {m: p.communicate(timeout=120) for m, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert all(p.returncode == 0 for p in procs.values()), "\n".join(o[1][-6000:] for o in outs.values())
        done = {m: json.loads(o[0].strip().splitlines()[-1]) for m, o in outs.items()}
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
