"""Materialisation: Feast into SQLite and into Redis against a bulk write of the same latest-per-entity rows.

The project's figure is ``closedloop.stages.retraining.materialise`` (what the retraining DAG's task calls: apply the
definitions, materialise the window with its overlap) on a Runtime of its own: a fresh home (Feast registry,
SQLite online store) under a temporary directory, reading the world's lake, so the world's own online store
and registry are untouched. For Redis the same with ``CLOSEDLOOP_ONLINE_STORE=redis`` on a dedicated database
(``CLOSEDLOOP_BENCH_REDIS``, default ``redis://127.0.0.1:6379/14``), which must be empty and is flushed after.

The floor reads the same offline Parquet files (the curated feature-view partitions), keeps the rows of the
same interval, the latest per entity, and writes the same bytes with the same client: ``sqlite3``
``executemany`` of the same upsert into a table of Feast's shape (entity key, feature name, serialised value,
value text, event time), one Redis pipeline of the same hashes (serialised entity key + project -> feature
hashes -> serialised values, and the event time). The floor's rows are checked against what Feast wrote.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import struct
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from common import CONFIG, Result, World, measure

STAGE = "materialisation"
REDIS_URL = os.environ.get("CLOSEDLOOP_BENCH_REDIS", "redis://127.0.0.1:6379/14")
PROJECT = "closedloop"  # feature_repo/feature_store.yaml
STRING, INT64 = 2, 4    # feast ValueType numbers (entity key serialisation v3)


def fresh_runtime(w: World, home: Path, lake: Path | None = None, **env: str) -> Any:
    """A Runtime whose Feast registry and online store live under ``home``, on ``lake`` (the world's)."""
    from closedloop.core.settings import Settings
    from closedloop.stages.runtime import Runtime

    base = {k: v for k, v in os.environ.items() if not k.startswith(("CLOSEDLOOP_", "FEAST_"))}
    rt = Runtime(Settings.from_env({**base, "CLOSEDLOOP_HOME": str(home), "CLOSEDLOOP_CONFIG": str(CONFIG),
                                    "CLOSEDLOOP_LAKE_URI": str(lake or w.home / "lake"), "CLOSEDLOOP_DEVICE": "cpu",
                                    **env}))
    rt.settings.ensure_dirs()
    return rt


# -- the floor ------------------------------------------------------------------------------------
def read_rows(rt: Any, lo: Any, hi: Any) -> Any:
    """The offline rows of ``[lo, hi]`` (Feast's bounds), as an Arrow table (plain pyarrow)."""
    import glob

    import pyarrow.dataset as ds

    c = rt.contract
    files = sorted(glob.glob(rt.defs.source.path))
    ts = ds.field(c.event_timestamp)
    return ds.dataset(files, format="parquet").to_table(
        columns=[c.entity, c.event_timestamp, *c.entity_features], filter=(ts >= lo) & (ts <= hi))


def latest_rows(rt: Any, lo: Any, hi: Any) -> Any:
    """The offline rows of ``[lo, hi]``, the latest per entity (pandas)."""
    c = rt.contract
    df = read_rows(rt, lo, hi).to_pandas()
    return df.sort_values(c.event_timestamp, kind="stable").drop_duplicates(c.entity, keep="last")


def entity_keys(entity: str, ids: Any) -> list[bytes]:
    """Feast's serialised entity keys (v3) of int64 ids: one join key, its name, the value's type and bytes."""
    name = entity.encode()
    head = struct.pack("<III", 1, STRING, len(name)) + name + struct.pack("<II", INT64, 8)
    return [head + struct.pack("<q", i) for i in ids.tolist()]


def value_bytes(values: Any) -> tuple[list[bytes], list[str | None]]:
    """Serialised ValueProto (double_val, field 6; empty for a null) and its text, per value."""
    out, text = [], []
    for v in values.tolist():
        if v != v:  # NaN: Feast writes an empty value
            out.append(b"")
            text.append(None)
        else:
            out.append(b")" + struct.pack("<d", v))
            text.append(str(v))
    return out, text


def sqlite_floor(rt: Any, lo: Any, hi: Any, path: Path, table: str) -> int:
    """Read, latest per entity, and write the same rows into a table of Feast's shape; returns rows written."""
    c = rt.contract
    df = latest_rows(rt, lo, hi)
    keys = entity_keys(c.entity, df[c.entity])
    ts = (df[c.event_timestamp].astype("int64") // 1_000_000_000).tolist()
    names = c.entity_features
    columns = [value_bytes(df[name].to_numpy()) for name in names]
    # entity by entity, its features in turn: Feast's order (the B-tree of the primary key sees the same inserts)
    rows = [(key, name, vals[i], text[i], t) for i, (key, t) in enumerate(zip(keys, ts, strict=True))
            for name, (vals, text) in zip(names, columns, strict=True)]
    conn = sqlite3.connect(path)
    conn.execute(f'CREATE TABLE IF NOT EXISTS "{table}" (entity_key BLOB, feature_name TEXT, value BLOB, '
                 'value_text TEXT, vector_value BLOB, event_ts timestamp, created_ts timestamp, '
                 'PRIMARY KEY(entity_key, feature_name))')
    conn.execute(f'CREATE INDEX IF NOT EXISTS "{table}_ek" ON "{table}" (entity_key)')
    with conn:
        conn.executemany(
            f'INSERT INTO "{table}" (entity_key, feature_name, value, value_text, event_ts, created_ts) '
            "VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
            "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
            "created_ts = excluded.created_ts", rows)
    conn.close()
    return len(rows)


def redis_mappings(rt: Any, df: Any) -> dict[bytes, dict[bytes, bytes]]:
    """Redis hashes of Feast's layout: key = entity key + project; fields: mmh3 of view:feature, and _ts:view."""
    import mmh3
    from google.protobuf.timestamp_pb2 import Timestamp

    c, view = rt.contract, rt.contract.feature_view
    keys = [k + PROJECT.encode() for k in entity_keys(c.entity, df[c.entity])]
    fields = [struct.pack("<Q", mmh3.hash(f"{view}:{n}", signed=False))[:4] for n in c.entity_features]
    columns = [value_bytes(df[n].to_numpy())[0] for n in c.entity_features]
    ns = df[c.event_timestamp].astype("int64")
    seconds, nanos = (ns // 1_000_000_000).tolist(), (ns % 1_000_000_000 // 1000 * 1000).tolist()  # datetime: µs
    ts_field = f"_ts:{view}".encode()
    out = {}
    for i, key in enumerate(keys):
        mapping = {ts_field: Timestamp(seconds=seconds[i], nanos=nanos[i]).SerializeToString()}
        for f, col in zip(fields, columns, strict=True):
            mapping[f] = col[i]
        out[key] = mapping
    return out


def redis_floor(rt: Any, lo: Any, hi: Any, client: Any) -> int:
    mappings = redis_mappings(rt, latest_rows(rt, lo, hi))
    with client.pipeline(transaction=False) as pipe:
        for key, mapping in mappings.items():
            pipe.hset(key, mapping=mapping)
        pipe.execute()
    return len(mappings)


def redis_dump(client: Any, keys: list[bytes]) -> dict[bytes, dict[bytes, bytes]]:
    with client.pipeline(transaction=False) as pipe:
        for k in keys:
            pipe.hgetall(k)
        return dict(zip(keys, pipe.execute(), strict=True))


# -- the stage -------------------------------------------------------------------------------------
def run(w: World, quick: bool) -> list[Result]:
    from closedloop.stages import retraining as stages
    from closedloop.stages.feast_config import feast_online_store
    from closedloop.stages.features import apply_definitions, materialize_window, to_utc

    w.ingested()
    w.runtime()
    results: list[Result] = []
    tmp = Path(tempfile.mkdtemp(prefix="materialisation-", dir=w.home))
    try:
        # SQLite: the project's task on a fresh Feast home, then the floor into a table of the same shape
        warm = fresh_runtime(w, tmp / "warm-up")  # Feast's, DuckDB's and ibis' imports and first-use setup
        apply_definitions(warm.store, warm.defs)
        materialize_window(warm.store, warm.defs, w.window.start, w.window.start, 0)
        rt = fresh_runtime(w, tmp / "sqlite")
        c = rt.contract
        overlap = rt.settings.config.typed.ingest.materialize_overlap_days
        lo, hi = to_utc(w.window.start - timedelta(days=overlap)), to_utc(w.window.end)
        entities = len(latest_rows(rt, lo, hi))
        data_mib = read_rows(rt, lo, hi).nbytes / 2**20  # what both read: the interval's offline rows
        figure = measure(lambda: stages.materialise(rt, w.window))
        online = Path(feast_online_store(rt.settings)["path"])
        table = f"{PROJECT}_{c.feature_view}"
        floor_db = tmp / "floor.db"
        floor = measure(lambda: sqlite_floor(rt, lo, hi, floor_db, table))
        con = sqlite3.connect(floor_db)
        con.execute("ATTACH DATABASE ? AS feast", (str(online),))
        cols = "entity_key, feature_name, value, value_text, event_ts"
        diff = con.execute(f'SELECT count(*) FROM (SELECT {cols} FROM "{table}" EXCEPT '
                           f'SELECT {cols} FROM feast."{table}")').fetchone()[0]
        feast_rows = con.execute(f'SELECT count(*) FROM feast."{table}"').fetchone()[0]
        con.close()
        results.append(Result.of(
            STAGE, "sqlite (materialise task)", w.rows, figure, floor, data_mib, work_rows=entities,
            notes=f"{entities} customers x {len(c.entity_features)} features ({feast_rows} rows); apply+materialise "
                  f"on a fresh registry; floor: pyarrow read + latest per entity + sqlite3 executemany of the "
                  f"same upsert; floor rows differing from Feast's: {diff}"))

        # Redis: the same on a dedicated, empty database
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            if client.dbsize():
                raise SystemExit(f"{REDIS_URL} is not empty: give a dedicated database (CLOSEDLOOP_BENCH_REDIS)")
        except redis.exceptions.ConnectionError as exc:
            print(f"materialisation: Redis at {REDIS_URL} unreachable ({exc}); redis line skipped", flush=True)
            return results
        try:
            rt = fresh_runtime(w, tmp / "redis", CLOSEDLOOP_ONLINE_STORE="redis", CLOSEDLOOP_REDIS_URL=REDIS_URL)
            figure = measure(lambda: stages.materialise(rt, w.window))
            keys = sorted(client.scan_iter(count=10_000))
            check = keys if quick else keys[:: max(1, len(keys) // 500)]
            feast_side = redis_dump(client, check)
            client.flushdb()
            floor = measure(lambda: redis_floor(rt, lo, hi, client))
            floor_side = redis_dump(client, check)
            differ = sum(feast_side[k] != floor_side[k] for k in check)
            results.append(Result.of(
                STAGE, "redis (materialise task)", w.rows, figure, floor, data_mib, work_rows=entities,
                notes=f"{len(keys)} keys x {len(c.entity_features)} features; Feast reads each key's time first "
                      f"(no skip_dedup); floor: pyarrow read + latest per entity + one pipeline of HSET; "
                      f"{differ} of {len(check)} checked keys differ from Feast's"))
        finally:
            client.flushdb()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results
