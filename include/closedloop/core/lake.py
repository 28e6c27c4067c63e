"""The data lake: zones, partition naming and fsspec I/O under one root URI.

Layout under the root (``file://$CLOSEDLOOP_HOME/lake`` by default, ``s3://bucket/prefix`` in production)::

    landing/<kind>/<YYYY-MM-DD>.parquet            raw daily partitions (kind: transactions, labels)
    quarantine/<kind>/<YYYY-MM-DD>.parquet         rejected partitions ...
    quarantine/<kind>/<YYYY-MM-DD>.validation.json ... with their validation report
    curated/<kind>/<YYYY-MM-DD>.parquet            validated partitions
    curated/<feature view>/<YYYY-MM-DD>.parquet    entity features: Feast's offline source
    curated/_validation/<kind>/<YYYY-MM-DD>.json   validation result of each curated partition
    curated/_index/transaction_ids/<YYYY-MM-DD>.parquet   fingerprints of the day's curated ids (ingest's key check)
    curated/_versions/<kind>/<YYYY-MM-DD>_<sha12>.parquet  a curated copy superseded by a re-delivery (+ .json)
    training_sets/<window>/split=<split>/part-NNNNN.parquet  training sets: a folder of parts per split
    served/transactions/<YYYY-MM-DD>/part-*.parquet predictions answered online (closedloop serve), one file per batch
    served/shadow/<YYYY-MM-DD>/part-*.parquet      the challenger's shadow predictions, never answered
    reports/...                                     (reports/skew/<YYYY-MM-DD>.json: training/serving skew)
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import fsspec

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

ZONES = ("landing", "quarantine", "curated", "training_sets", "predictions", "served", "reports")
KINDS = ("transactions", "labels")


def day_name(day: date) -> str:
    """Partition name of ``day``."""
    return day.isoformat()


def days_between(start: date, end: date) -> list[date]:
    """The days of the half-open interval ``[start, end)``."""
    return [start + timedelta(days=i) for i in range((end - start).days)]


@dataclass
class Lake:
    """A lake rooted at ``root`` (a URI); all paths it hands out are URIs."""

    root: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.root.rstrip("/")
        self._fs, _ = fsspec.core.url_to_fs(self.root, **self.storage_options)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._fs

    @property
    def is_local(self) -> bool:
        return self.root.startswith("file://") or "://" not in self.root

    def uri(self, *parts: str) -> str:
        """URI of ``parts`` under the root; refuses parts that would climb out of it."""
        for p in parts:
            if p.startswith("/") or ".." in p.split("/"):
                raise ValueError(f"lake path part {p!r} is absolute or climbs out of the lake")
        return "/".join([self.root, *parts])

    def partition(self, zone: str, kind: str, day: date, suffix: str = ".parquet") -> str:
        """URI of one daily partition."""
        return self.uri(zone, kind, day_name(day) + suffix)

    def _path(self, uri: str) -> str:
        return self._fs._strip_protocol(uri)

    # -- inspection ----------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        return self._fs.exists(self._path(uri))

    def list_days(self, zone: str, kind: str, suffix: str = ".parquet") -> list[date]:
        """Days that have a partition in ``zone/kind``, sorted."""
        base = self._path(self.uri(zone, kind))
        if not self._fs.exists(base):
            return []
        days = []
        for p in self._fs.ls(base, detail=False):
            name = p.rsplit("/", 1)[-1]
            if not name.endswith(suffix) or name.endswith(".validation.json"):
                continue
            stem = name[: -len(suffix)]
            try:
                days.append(date.fromisoformat(stem))
            except ValueError:
                continue
        return sorted(days)

    def entry_kind(self, uri: str) -> str:
        """What sits at ``uri``: "file" (a regular file), "directory", "symlink", "socket", "fifo", "device",
        "missing" or "other". Links are not followed: a link is reported as one, whatever it points to."""
        import os
        import stat

        path = self._path(uri)
        if self.is_local:
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                return "missing"
            for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"),
                               (stat.S_ISSOCK, "socket"), (stat.S_ISFIFO, "fifo"), (stat.S_ISBLK, "device"),
                               (stat.S_ISCHR, "device")):
                if test(mode):
                    return name
            return "other"
        try:
            info = self._fs.info(path)
        except FileNotFoundError:
            return "missing"
        return {"file": "file", "directory": "directory"}.get(str(info.get("type")), "other")

    def sha256(self, uri: str) -> str:
        """Content hash of the object at ``uri``."""
        h = hashlib.sha256()
        with self._fs.open(self._path(uri), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    # -- reads ---------------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        with self._fs.open(self._path(uri), "rb") as f:
            return f.read()

    def read_json(self, uri: str) -> Any:
        return json.loads(self.read_bytes(uri))

    def read_parquet(self, uri: str, columns: list[str] | None = None) -> pd.DataFrame:
        import pandas as pd

        with self._fs.open(self._path(uri), "rb") as f:
            return pd.read_parquet(f, columns=columns)

    def read_parquet_many(self, uris: list[str], columns: list[str] | None = None) -> pd.DataFrame:
        """Concatenate the partitions at ``uris`` (an empty frame when there are none)."""
        import pandas as pd

        frames = [self.read_parquet(u, columns=columns) for u in uris]
        frames = [f for f in frames if len(f)]
        if not frames:
            return pd.DataFrame(columns=columns) if columns else pd.DataFrame()
        return pd.concat(frames, ignore_index=True)

    # -- writes (atomic: write a temporary object, then move it into place) ----------------------
    def write_bytes(self, uri: str, data: bytes) -> str:
        path = self._path(uri)
        parent = path.rsplit("/", 1)[0]
        self._fs.makedirs(parent, exist_ok=True)
        if self.is_local:
            tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
            with self._fs.open(tmp, "wb") as f:
                f.write(data)
            self._fs.mv(tmp, path)
        else:  # object stores put whole objects atomically
            with self._fs.open(path, "wb") as f:
                f.write(data)
        return uri

    def write_json(self, uri: str, obj: Any) -> str:
        return self.write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def write_parquet(self, df: pd.DataFrame, uri: str) -> str:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return self.write_bytes(uri, buf.getvalue())

    def copy(self, src: str, dst: str) -> str:
        return self.write_bytes(dst, self.read_bytes(src))

    def move(self, src: str, dst: str) -> str:
        """Move ``src`` to ``dst`` (copy then delete, so that a failure loses nothing)."""
        self.copy(src, dst)
        self._fs.rm(self._path(src))
        return dst

    def move_entry(self, src: str, dst: str) -> str:
        """Move whatever sits at ``src`` (a folder, a link, a socket: not only a file) to ``dst`` as it is."""
        import os

        if self.is_local:
            os.makedirs(os.path.dirname(self._path(dst)), exist_ok=True)
            os.replace(self._path(src), self._path(dst))  # a link moves as a link, a folder whole
        else:
            self._fs.mv(self._path(src), self._path(dst), recursive=True)
        return dst

    def delete(self, uri: str, recursive: bool = False) -> None:
        if self.exists(uri):
            self._fs.rm(self._path(uri), recursive=recursive)

    def local_path(self, uri: str) -> str:
        """Filesystem path of a ``file://`` URI (for libraries that want paths)."""
        return self._path(uri)
