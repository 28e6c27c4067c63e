"""Feast: definitions derived from the data contract, apply, materialise, and the training set.

The offline store is Feast's ``duckdb`` store over the lake's Parquet files: local paths here, ``s3://``
in production (DuckDB's httpfs extension ships as the ``duckdb-extension-httpfs`` wheel, so nothing is
downloaded at run time). Feast's default ``file`` (Dask) store was measured here and rejected: its
point-in-time join drops entity rows, collapses rows that share (entity, timestamp), and, worse, picks
an arbitrary earlier feature row after a shuffle, so two identical calls gave different features.

:func:`historical_features` still sends Feast the distinct (entity, timestamp) pairs and joins the
answer back onto every labelled row, so no row can be lost or duplicated whatever the store, and the
row count is checked. :func:`build_training_set` joins through :func:`closedloop.stages.offline.point_in_time_features`
instead (Feast's rules on the view's registered source, read in the window's range: the same rows, tested
against this function), falling back to it where that reader does not cover the source.
"""

from __future__ import annotations

import hashlib
import logging
import string
from dataclasses import dataclass
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from closedloop.core.config_model import PitJoinSection, TrainingSection
from closedloop.core.errors import NoDataError, PermanentError
from closedloop.core.lake import Lake, days_between
from closedloop.core.settings import check_uri
from closedloop.stages.feast_config import feast_env
from closedloop.stages.feast_store import (
    FeastDefinitions,
    apply_definitions,
    historical_features,
    materialised_until,
    materialize_window,
    pit_chunk_rows,
    to_utc,
)
from closedloop.stages.ingest import read_marker
from closedloop.stages.offline import point_in_time_features

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore

    from closedloop.core.schema import DataContract
    from closedloop.core.settings import Settings

log = logging.getLogger(__name__)

# the Feast store's operations (closedloop.stages.feast_store), importable from here as before
__all__ = ["FeastDefinitions", "apply_definitions", "historical_features", "materialised_until", "materialize_window",
           "pit_chunk_rows", "to_utc"]

SPLITS = ("train", "validation", "holdout")
# rows per Parquet part of a training split: ``training.part_rows`` of the configuration, whose default is the model's
DEFAULT_PART_ROWS: int = TrainingSection.model_fields["part_rows"].default


# -- definitions ---------------------------------------------------------------------------------
def source_path(lake_uri: str, contract: DataContract) -> str:
    """Where Feast reads the entity features: the daily files of the curated zone's feature-view folder."""
    uri = f"{lake_uri.rstrip('/')}/curated/{contract.feature_view}/*.parquet"
    return uri.removeprefix("file://")  # Feast joins file:// URIs onto its repo path; give it a path


def build_definitions(contract: DataContract, lake_uri: str, s3_endpoint: str | None = None) -> FeastDefinitions:
    """Entity, file source, feature view and feature service derived from ``contract``."""
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.data_format import ParquetFormat
    from feast.types import Float64

    value_type = ValueType.INT64 if contract.entity_dtype == "int64" else ValueType.STRING
    entity = Entity(
        name=contract.entity.removesuffix("_id") or contract.entity,
        join_keys=[contract.entity],
        value_type=value_type,
        description=contract.entity_description,
    )
    source = FileSource(
        name=f"{contract.feature_view}_source",
        path=source_path(lake_uri, contract),
        timestamp_field=contract.event_timestamp,
        file_format=ParquetFormat(),
        s3_endpoint_override=s3_endpoint,
        description=f"Curated {contract.feature_view} partitions of the lake.",
    )
    view = FeatureView(
        name=contract.feature_view,
        entities=[entity],
        ttl=contract.ttl,
        schema=[
            Field(name=a.name, dtype=Float64, description=a.description
                  or f"{a.function} of {a.column or 'events'} over {a.window} before the event")
            for a in contract.aggregates
        ],
        source=source,
        online=True,
        description=f"Aggregates over each {contract.entity}'s earlier events (an event's row never counts "
                    "it), and its state at the close of each day it was active (what the online store holds).",
        tags={"dataset": contract.name, "contract_sha256": contract.sha256[:12], "owner": "closedloop"},
    )
    service = FeatureService(
        name=f"{contract.name}_model",
        features=[view],
        description=f"The entity features of the {contract.name} model.",
        tags={"dataset": contract.name},
    )
    return FeastDefinitions(entity, source, view, service)


def ensure_duckdb_httpfs() -> None:
    """Install DuckDB's ``httpfs`` extension from the ``duckdb-extension-httpfs`` wheel (never downloaded).

    The wheel only ships the file; DuckDB (through ibis, in Feast's offline store) looks for it in its
    extension directory and, not finding it there, tries to download it at the first ``s3://`` read, which
    fails on a machine without internet access. Installing the file from the wheel puts it there once.
    """
    from pathlib import Path

    import duckdb
    import duckdb_extension_httpfs

    with duckdb.connect() as con:
        row = con.execute("SELECT installed FROM duckdb_extensions() WHERE extension_name = 'httpfs'").fetchone()
        if row and row[0]:
            return
        path = (Path(duckdb_extension_httpfs.__file__).parent / "extensions" / f"v{duckdb.__version__}"
                / "httpfs.duckdb_extension")
        if not path.exists():
            raise PermanentError(f"{path}: DuckDB's httpfs extension for duckdb {duckdb.__version__} is missing; "
                                 "install duckdb-extension-httpfs of the same version as duckdb")
        try:
            con.execute(f"INSTALL '{path}'")
        except duckdb.Error:  # another task process installing it at the same moment: fine if it is there now
            row = con.execute("SELECT installed FROM duckdb_extensions() WHERE extension_name = 'httpfs'").fetchone()
            if not (row and row[0]):
                raise
        log.info("installed DuckDB's httpfs extension from %s", path)


def configure_duckdb_s3(endpoint: str | None) -> None:
    """Give DuckDB (the default ibis connection Feast's offline store reads through) the S3 credentials.

    Feast's DuckDB store reads a ``FileSource`` on ``s3://`` with ``ibis.read_parquet(path)``: unless the
    source names a credential reference, it passes neither credentials nor its ``s3_endpoint_override``,
    and DuckDB then asks ``<bucket>.s3.amazonaws.com`` anonymously. This sets an S3 secret on that
    connection from botocore's own credential chain (environment, config files, instance role: what s3fs
    and MLflow use too) and, for an S3-compatible endpoint (MinIO), its host with path-style URLs.
    """
    from urllib.parse import urlsplit

    import boto3
    import ibis

    session = boto3.Session()
    creds = session.get_credentials()
    parts = [("TYPE", "s3"), ("REGION", session.region_name or "us-east-1")]
    if creds is not None:
        frozen = creds.get_frozen_credentials()
        parts += [("KEY_ID", frozen.access_key), ("SECRET", frozen.secret_key)]
        if frozen.token:
            parts.append(("SESSION_TOKEN", frozen.token))
    if endpoint:
        url = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        parts += [("ENDPOINT", url.netloc), ("URL_STYLE", "path"), ("USE_SSL", url.scheme == "https")]
    body = ", ".join(f"{k} {v}" if isinstance(v, bool) else f"{k} '{str(v).replace(chr(39), chr(39) * 2)}'"
                     for k, v in parts)
    if ibis.options.default_backend is None:
        ibis.options.default_backend = ibis.duckdb.connect()
    con = ibis.options.default_backend
    con._load_extensions(["httpfs"])
    con.raw_sql(f"CREATE OR REPLACE SECRET closedloop_s3 ({body})")


def feature_store(settings: Settings) -> FeatureStore:
    """A FeatureStore for ``settings``: ``feature_repo/feature_store.yaml`` rendered with its values."""
    import yaml
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    if settings.lake_uri.startswith("s3://"):  # the offline store reads the curated zone over s3://
        ensure_duckdb_httpfs()
        configure_duckdb_s3((settings.storage_options.get("client_kwargs") or {}).get("endpoint_url"))
    settings.feast_dir.mkdir(parents=True, exist_ok=True)
    text = (settings.feast_repo / "feature_store.yaml").read_text()
    rendered = string.Template(text).safe_substitute(feast_env(settings))
    config = RepoConfig(**yaml.safe_load(rendered))
    config.repo_path = settings.feast_repo
    store = FeatureStore(config=config)
    if config.registry.registry_type == "sql":
        create_sql_registry(store)
    return store


# the key of the PostgreSQL advisory lock that serialises the creation of Feast's SQL registry tables
SQL_REGISTRY_LOCK = int.from_bytes(hashlib.sha256(b"closedloop feast sql registry").digest()[:4], "big")


def create_sql_registry(store: FeatureStore) -> None:
    """Build ``store``'s SQL registry (Feast creates its tables when missing) one process at a time.

    Feast's ``SqlRegistry`` runs ``CREATE TABLE`` for every missing table on its creation; two processes doing so
    on a fresh database at once (two models' tasks, or two tasks of one) race, and the loser fails with a unique
    violation in ``pg_type``. A transaction-level advisory lock around the creation lets the second find the tables
    made (tests/integration/test_many_models.py).
    """
    import sqlalchemy as sa

    registry = store.config.registry
    engine = sa.create_engine(registry.path, **(registry.sqlalchemy_config_kwargs or {}))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SQL_REGISTRY_LOCK})
            store.registry  # noqa: B018 - the property creates the registry (and its missing tables)
    finally:
        engine.dispose()


# -- training set ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingSet:
    """A written training set: where it is and what went into it."""

    uri: str
    key: str
    rows: dict[str, int]
    positives: dict[str, int]
    data_sha256: str
    partitions: dict[str, str]  # partition URI -> content hash of its landed file
    unlabelled_rows: int
    labels_before_event: int = 0  # labels left out: stamped before their transaction (see _attach_latest_labels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "key": self.key,
            "rows": self.rows,
            "positives": self.positives,
            "data_sha256": self.data_sha256,
            "partitions": self.partitions,
            "unlabelled_rows": self.unlabelled_rows,
            "labels_before_event": self.labels_before_event,
        }



def read_labelled_window(lake: Lake, contract: DataContract, start: date, end: date,
                         label_grace_days: int) -> tuple[pd.DataFrame, dict[str, str], int]:
    """Curated transactions of ``[start, end)`` joined with every curated label known for them.

    Labels are read from label partitions dated ``[start, end + grace)``. Returns the labelled rows,
    the partitions read (URI -> hash of the landed file) and the number of unlabelled transactions.
    """
    days = days_between(start, end)
    tx_uris, partitions = [], {}
    missing = []
    for d in days:
        uri = lake.partition("curated", "transactions", d)
        marker = read_marker(lake, "transactions", d)
        if marker is None or not lake.exists(uri):
            missing.append(d.isoformat())
            continue
        tx_uris.append(uri)
        partitions[marker["uri"]] = marker["sha256"]
    if missing:
        raise NoDataError(f"window {start}..{end}: no curated transactions for {', '.join(missing)}; "
                          "ingest (validate) those days first")
    label_days = [d for d in lake.list_days("curated", "labels")
                  if start <= d < end + timedelta(days=label_grace_days)]
    label_uris = []
    for d in label_days:
        marker = read_marker(lake, "labels", d)
        if marker is not None:
            label_uris.append(lake.partition("curated", "labels", d))
            partitions[marker["uri"]] = marker["sha256"]
    tx = lake.read_parquet_many(tx_uris)
    if tx.empty:
        raise NoDataError(f"window {start}..{end}: the curated partitions hold no transactions")
    labels = lake.read_parquet_many(label_uris, columns=[contract.row_key, contract.label, contract.label_timestamp])
    if labels.empty:
        raise NoDataError(f"window {start}..{end}: no labels arrived in label partitions "
                          f"{start}..{end + timedelta(days=label_grace_days)}")
    labelled = _attach_latest_labels(tx, labels, contract)
    return labelled, partitions, len(tx) - len(labelled)


def labels_before_event(tx: pd.DataFrame, labels: pd.DataFrame, contract: DataContract) -> Any:
    """Mask of ``labels`` stamped strictly before the event of the transaction they name (one at the very
    instant of the event is allowed); labels of unknown transactions are not flagged."""
    import numpy as np
    import pandas as pd

    where = pd.Index(tx[contract.row_key]).get_indexer(labels[contract.row_key])
    known = where >= 0
    event = tx[contract.event_timestamp].to_numpy()[np.where(known, where, 0)]
    label_ts = pd.to_datetime(labels[contract.label_timestamp], utc=True).to_numpy()
    return known & (label_ts < event)


def _attach_latest_labels(tx: pd.DataFrame, labels: pd.DataFrame, contract: DataContract) -> pd.DataFrame:
    """The transactions that have a label, in their order, with the label of latest ``label_timestamp``.

    Labels of the same transaction at the same instant: the later in ``labels`` wins. Hash lookups on the
    ids, never a sort or a merge on them: at 10M rows pandas' ``merge(validate="one_to_one")`` and the sort of
    the labels by id took 105 of the window's 122 s. Duplicate transaction ids raise.
    """
    import pandas as pd

    key = contract.row_key
    ids = tx[key]
    if not ids.is_unique:
        dup = ids[ids.duplicated()].iloc[:5].tolist()
        raise PermanentError(f"curated transactions of the window repeat {contract.row_key} values, e.g. {dup}: "
                             "a transaction id must be unique across days")
    early = _early_labels(tx, labels, contract)
    if early.any():
        sample = labels.loc[early, key].iloc[:5].tolist()
        log.warning("%d label(s) stamped before their transaction's event time left out of the training set "
                    "(a clock or join error of the label feed; a later label of the same transaction still "
                    "counts), e.g. %s", int(early.sum()), sample)
        labels = labels[~early]
    if not labels[key].is_unique:  # corrections: keep each id's latest label (stable, so ties keep file order)
        labels = labels.sort_values(contract.label_timestamp, kind="stable").drop_duplicates(key, keep="last")
    where = pd.Index(labels[key]).get_indexer(ids)
    found = where >= 0
    labelled = tx[found].reset_index(drop=True)
    labelled[contract.label] = labels[contract.label].iloc[where[found]].reset_index(drop=True)
    labelled.attrs["labels_before_event"] = int(early.sum())
    return labelled


def _early_labels(tx: pd.DataFrame, labels: pd.DataFrame, contract: DataContract) -> Any:
    """:func:`labels_before_event`, as a numpy mask aligned with ``labels``."""
    import numpy as np

    return np.asarray(labels_before_event(tx, labels, contract), dtype=bool)


def time_split(frame: pd.DataFrame, contract: DataContract, fractions: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """Split rows by event time: the earliest ``train`` share, then ``validation``, then ``holdout``.

    With ``holdout_days`` the split is by whole days instead: the last days are held out; the
    ``validation_days`` before them validate, or, without ``validation_days``, a seeded random
    ``validation`` share of the remaining rows does, so that the most recent days (a new regime, after
    drift) are also in the training part.
    """
    ordered = frame.sort_values([contract.event_timestamp, contract.row_key], kind="stable").reset_index(drop=True)
    if fractions.get("holdout_days"):
        ts = ordered[contract.event_timestamp]
        last = ts.max().normalize() + timedelta(days=1)
        hold_from = last - timedelta(days=int(fractions["holdout_days"]))
        holdout = ordered[ts >= hold_from]
        rest = ordered[ts < hold_from]
        if fractions.get("validation_days"):
            val_from = hold_from - timedelta(days=int(fractions["validation_days"]))
            in_val = rest[contract.event_timestamp] >= val_from
        else:
            share = fractions["validation"] / (fractions["train"] + fractions["validation"])
            in_val = rest.index.isin(rest.sample(frac=share, random_state=0).index)
        return {"train": rest[~in_val], "validation": rest[in_val], "holdout": holdout}
    total = sum(fractions[s] for s in SPLITS)
    n = len(ordered)
    a = round(n * fractions["train"] / total)
    b = a + round(n * fractions["validation"] / total)
    return {"train": ordered.iloc[:a], "validation": ordered.iloc[a:b], "holdout": ordered.iloc[b:]}


def frame_sha256(frame: pd.DataFrame) -> str:
    """Order-sensitive content hash of a frame."""
    import pandas as pd

    h = hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    h.update(",".join(frame.columns).encode())
    return h.hexdigest()


def build_training_set(store: FeatureStore, defs: FeastDefinitions, lake: Lake, contract: DataContract,
                       start: date, end: date, *, label_grace_days: int,
                       split: dict[str, Any], part_rows: int = DEFAULT_PART_ROWS,
                       pit_join: PitJoinSection | dict[str, int] | None = None) -> TrainingSet:
    """Write the point-in-time-correct training set of ``[start, end)`` as Parquet partitioned by split.

    Each split is a folder of parts of at most ``part_rows`` rows each (``split=<name>/part-00000.parquet``,
    ...), in event-time order: one process reads them all (:func:`read_training_split`), a Dask cluster
    one part per task (:func:`training_split_parts`). Deterministic: the same curated data gives the same
    rows, hash and location. The point-in-time join is :func:`closedloop.stages.offline.point_in_time_features`
    (Feast's rules on the registered source, read in the window's range); ``pit_join`` (``calls``,
    ``min_rows``, ``max_rows``) sizes the calls of Feast's own join (:func:`pit_chunk_rows`) where that
    reader does not cover the source; the rows are the same whatever it says.
    """
    labelled, partitions, unlabelled = read_labelled_window(lake, contract, start, end, label_grace_days)
    early = int(labelled.attrs.get("labels_before_event", 0))
    # Feast's rules, read from the view's registered source in the window's range (closedloop.stages.offline): the
    # same rows as get_historical_features (tests/integration/test_offline_read.py), without its scans of the
    # whole history per call (10.8x merge_asof at 10M)
    full = point_in_time_features(store, defs, labelled, contract, pit_join=pit_join)
    if full[contract.row_key].duplicated().any():
        raise PermanentError("training set has duplicate transaction ids")
    columns = [contract.row_key, contract.entity, contract.event_timestamp, *contract.model_features, contract.label]
    full = full[columns]
    parts = time_split(full, contract, split)
    for name in SPLITS:
        if parts[name].empty:
            raise NoDataError(f"window {start}..{end}: the {name} split is empty; widen the window")
    digest = hashlib.sha256()
    for name in SPLITS:
        digest.update(frame_sha256(parts[name]).encode())
    data_sha = digest.hexdigest()
    key = f"{start.isoformat()}_{end.isoformat()}_{data_sha[:12]}"  # the split is part of the hash
    base = lake.uri("training_sets", key)
    for name in SPLITS:
        write_training_split(lake, base, name, parts[name], part_rows)
    rows = {s: len(parts[s]) for s in SPLITS}
    positives = {s: int(parts[s][contract.label].sum()) for s in SPLITS}
    log.info("training set %s: rows %s, positives %s, %d unlabelled transactions left out",
             base, rows, positives, unlabelled)
    return TrainingSet(uri=base, key=key, rows=rows, positives=positives, data_sha256=data_sha,
                       partitions=dict(sorted(partitions.items())), unlabelled_rows=unlabelled,
                       labels_before_event=early)


def write_training_split(lake: Lake, uri: str, split: str, frame: pd.DataFrame,
                         part_rows: int = DEFAULT_PART_ROWS) -> list[str]:
    """Write one split under the training set ``uri`` as parts of at most ``part_rows`` rows, in order.

    The split's folder is emptied first: a rewrite with another ``part_rows`` leaves no stale part behind.
    """
    if part_rows < 1:
        raise PermanentError(f"training.part_rows={part_rows}: a part holds at least one row")
    lake.delete(f"{uri}/split={split}", recursive=True)
    return [lake.write_parquet(frame.iloc[i:i + part_rows], f"{uri}/split={split}/part-{n:05d}.parquet")
            for n, i in enumerate(range(0, max(len(frame), 1), part_rows))]


def training_split_parts(lake: Lake, uri: str, split: str) -> list[str]:
    """The Parquet parts of one split of a training set (a URI under the lake's training sets), in order."""
    import re

    check_uri(uri, [lake.uri("training_sets")], "training set URI")
    folder = f"{uri}/split={split}"
    found = lake.fs.glob(f"{lake.local_path(folder)}/part-*.parquet") if lake.exists(folder) else []
    numbered = []
    for path in found:
        m = re.fullmatch(r"part-(\d+)\.parquet", path.rsplit("/", 1)[-1])
        if m:
            numbered.append((int(m.group(1)), f"{folder}/{path.rsplit('/', 1)[-1]}"))
    if not numbered:
        raise NoDataError(f"{folder}: no part-*.parquet in this training split; build the training set first")
    return [part for _, part in sorted(numbered)]


def read_training_split(lake: Lake, uri: str, split: str) -> pd.DataFrame:
    """One split of a training set written by :func:`build_training_set`, all its parts in one frame."""
    import pandas as pd

    frames = [lake.read_parquet(part) for part in training_split_parts(lake, uri, split)]
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
