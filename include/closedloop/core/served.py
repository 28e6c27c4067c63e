"""The served log in the lake: where online serving writes each prediction it made, read back by the skew check.

``served/<kind>/<day>/part-*.parquet``, ``kind`` being ``transactions`` (what was answered) or ``shadow`` (the
challenger's scores of a share of the same requests). Written by :class:`closedloop.adapters.serving.ServedLog`.

Each row of ``transactions`` is one answered prediction: the row key, the entity, the event time, the model
inputs as served (online features included), ``score``, ``decision`` and ``model_version`` of the answer,
``served_at``, ``request_id``, and the canary split's columns: ``arm`` (``champion`` or ``canary``: who
answered), ``champion_score`` and ``champion_version`` (the champion's score of the same row: equal to
``score`` on champion rows, scored in shadow on canary rows, so a guardrail compares both on the same
requests) and ``canary_error`` (True on a row the canary should have answered but could not: the champion
answered it), and ``latency_ms`` (the service's time to fetch the request's features and score it with both
arms: the rollout's p99 guardrail). Rows written before the split have none of these: read them as the
champion's (:func:`with_arms`). A ``shadow`` row is a ``transactions`` row with the challenger's ``score``, ``decision``
and ``model_version`` in place of the answer's.

:func:`arm_bucket` is the canary split: an entity lands in the canary arm when its bucket is below the share.
"""

from __future__ import annotations

import hashlib
from datetime import date
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.core.lake import Lake

SERVED, SHADOW = "transactions", "shadow"
ARM_CHAMPION, ARM_CANARY = "champion", "canary"
ARM_COLUMNS = ("arm", "champion_score", "champion_version", "canary_error")


def arm_bucket(model: str, entity: object) -> float:
    """The entity's place in [0, 1) for the canary split of ``model``: the first 53 bits of SHA-256 of
    ``"<model>\\x1f<entity>"`` over 2**53 (exact in a float, so never 1.0).

    Deterministic across processes and machines (no ``hash()`` salt), uniform, and independent between models
    (salted with the name). ``bucket < share`` puts the entity in the canary arm: the same entity always lands
    in the same arm for a given share, and raising the share only moves entities from champion to canary.
    """
    digest = hashlib.sha256(f"{model}\x1f{entity}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2.0**53


def served_uri(lake: Lake, kind: str, day: date) -> str:
    """The folder of one day of served predictions (``kind``: transactions or shadow)."""
    return lake.uri("served", kind, day.isoformat())


def read_served(lake: Lake, day: date, kind: str = SERVED) -> pd.DataFrame:
    """Every prediction logged on ``day`` (an empty frame when there is none)."""
    base = served_uri(lake, kind, day)
    if not lake.exists(base):
        import pandas as pd

        return pd.DataFrame()
    files = sorted(p for p in lake.fs.ls(lake.local_path(base), detail=False)  # a path, whatever the store
                   if p.rsplit("/", 1)[-1].startswith("part-") and p.endswith(".parquet"))
    return lake.read_parquet_many([f"{base}/{p.rsplit('/', 1)[-1]}" for p in files])


def with_arms(served: pd.DataFrame) -> pd.DataFrame:
    """``served`` with the split's columns filled where rows predate them (the champion answered those)."""
    if served.empty:
        return served
    out = served.copy()
    if "arm" not in out:
        out["arm"] = ARM_CHAMPION
    out["arm"] = out["arm"].fillna(ARM_CHAMPION)
    if "champion_score" not in out:
        out["champion_score"] = out["score"]
    out["champion_score"] = out["champion_score"].fillna(out["score"])
    if "champion_version" not in out:
        out["champion_version"] = out["model_version"]
    out["champion_version"] = out["champion_version"].fillna(out["model_version"])
    out["canary_error"] = out["canary_error"].eq(True) if "canary_error" in out else False  # missing: False
    return out
