"""Feast on the production configuration: SQL registry on Postgres, online store on Redis, DuckDB offline
store reading the lake's curated Parquet on ``s3://`` (moto).

The same stage functions as on a laptop (``retraining.validate``, ``materialise``, ``build_training_set``);
only the environment differs (``prod_env``).
"""

from __future__ import annotations

from datetime import date

import pandas as pd
import pytest

from closedloop.core.runconf import Window
from closedloop.devtools.generate import GeneratorConfig, generate
from closedloop.stages import retraining as stages
from closedloop.stages.aggregates import compute_entity_features
from closedloop.stages.feast_config import feast_registry_config
from closedloop.stages.features import SPLITS, read_training_split

WINDOW = Window(date(2026, 1, 1), date(2026, 1, 8))


@pytest.fixture
def rt(prod_env):
    from closedloop.stages.runtime import Runtime

    rt = Runtime.from_env()
    generate(GeneratorConfig(start=date(2026, 1, 1), days=9, customers=80, transactions_per_day=150, seed=11),
             rt.lake, rt.contract)
    return rt


def test_registry_online_and_offline_stores_on_the_services(rt, prod_env, s3, bucket, redis_url):
    import redis
    import sqlalchemy as sa

    c = rt.contract
    assert rt.lake.root.startswith("s3://")
    assert type(rt.store.config.online_store).__name__ == "RedisOnlineStoreConfig"
    assert rt.store.config.registry.registry_type == "sql"
    stages.validate(rt, WINDOW)
    stages.materialise(rt, WINDOW)

    # the registry lives in Postgres: a store built afresh (another task) sees the view and its interval
    engine = sa.create_engine(feast_registry_config(rt.settings)["path"])
    with engine.connect() as conn:
        names = set(conn.execute(sa.text("SELECT feature_view_name FROM feature_views")).scalars())
    engine.dispose()
    assert names == {c.feature_view}
    from closedloop.stages.features import feature_store, materialised_until

    fresh = feature_store(rt.settings)
    assert materialised_until(fresh, c.feature_view) is not None

    # online: Redis holds one row per customer, its closing row: the state after its last transaction
    keys = redis.Redis.from_url(redis_url).keys("*")
    assert keys, "nothing was materialised into Redis"
    curated = rt.lake.read_parquet_many([rt.lake.partition("curated", "transactions", d)
                                         for d in pd.date_range("2026-01-01", "2026-01-07").date])
    expected = (compute_entity_features(curated, c, closing_rows=True).sort_values(c.event_timestamp)
                .groupby(c.entity).tail(1).set_index(c.entity).sort_index())
    entities = expected.index[:5].tolist()
    online = fresh.get_online_features(features=rt.defs.service,
                                       entity_rows=[{c.entity: e} for e in entities]).to_df()
    assert len(online) == len(entities)
    for name in c.entity_features:
        got = online.set_index(c.entity).loc[entities, name].to_numpy(dtype=float)
        assert got == pytest.approx(expected.loc[entities, name].to_numpy(dtype=float), nan_ok=True), name

    # offline: DuckDB reads the curated features on s3:// for a point-in-time-correct training set
    ts = stages.build_training_set(rt, WINDOW)
    assert ts["uri"].startswith(f"s3://{bucket}/lake/training_sets/")
    full = pd.concat([read_training_split(rt.lake, ts["uri"], s) for s in SPLITS], ignore_index=True)
    assert sum(ts["rows"].values()) == len(full) > 0
    recomputed = compute_entity_features(curated, c)
    merged = full.merge(recomputed, on=[c.entity, c.event_timestamp], suffixes=("", "_expected"))
    assert len(merged) == len(full)
    for name in c.entity_features:
        pd.testing.assert_series_equal(merged[name], merged[f"{name}_expected"], check_names=False)
    assert any(k.startswith(f"lake/training_sets/{ts['key']}/split=") for k in s3.keys(bucket, "lake/"))

    # batch scoring's bounded read (closedloop.stages.offline) of the same source on s3://: Feast's answer on every row
    from closedloop.stages.features import historical_features
    from closedloop.stages.offline import point_in_time_features, unsupported

    assert unsupported(rt.store, rt.store.get_feature_view(c.feature_view)) is None
    day = curated[curated[c.event_timestamp].dt.date == pd.Timestamp("2026-01-05").date()]
    pd.testing.assert_frame_equal(point_in_time_features(rt.store, rt.defs, day, c).reset_index(drop=True),
                                  historical_features(rt.store, rt.defs, day, c).reset_index(drop=True),
                                  check_dtype=False, check_exact=True)
