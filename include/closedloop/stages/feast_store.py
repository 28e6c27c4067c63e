"""What is done to a Feast store with a data contract's definitions: apply, materialise, the point-in-time join.

Below :mod:`closedloop.stages.features` (which builds the definitions and the store, and the training set),
:mod:`closedloop.stages.ingest` (which materialises a day) and :mod:`closedloop.stages.offline` (which falls back
to Feast's own join): the three import it at the top, and it imports none of them. The names are re-exported by
:mod:`closedloop.stages.features`, where they were first defined.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import TYPE_CHECKING, Any

from closedloop.core.config_model import PitJoinSection
from closedloop.core.errors import PermanentError

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore

    from closedloop.core.schema import DataContract

log = logging.getLogger(__name__)

# How many (entity, time) pairs Feast's point-in-time join is asked for per call (``training.pit_join`` of
# the configuration, :class:`closedloop.core.config_model.PitJoinSection`, which holds the defaults). Two costs
# pull apart: each call of the DuckDB store scans the feature view's whole source first (a fixed cost that grows
# with the feature history: 0.5 s at 1M transactions, 5.5 s at 10M), and its memory grows with the pairs of the
# call (each pair meets every feature row of its entity inside the TTL): 125k, 250k and 1M pairs peaked at 1.1,
# 1.9 and 4.0 GiB above the start, in 16.8, 17.9 and 18.1 s (1M-transaction benchmark). So the pairs are split
# over about ``calls`` calls, which keeps both the scans and the memory per call proportional to the data, with
# at least ``min_rows`` pairs per call (the memory of one call is small next to the data below that) and at most
# ``max_rows``.
def pit_chunk_rows(pairs: int, pit_join: PitJoinSection | Mapping[str, int] | None = None) -> int:
    """Pairs per call of the point-in-time join for ``pairs`` (entity, time) pairs (see the comment above).

    ``pit_join`` is the configuration's typed ``training.pit_join`` (``Config.typed.training.pit_join``), or a
    mapping of some of its keys (``calls``, ``min_rows``, ``max_rows``; the others get the model's defaults).
    """
    if not isinstance(pit_join, PitJoinSection):
        given = dict(pit_join or {})
        unknown = sorted(set(given) - set(PitJoinSection.model_fields))
        if unknown:
            raise ValueError(f"training.pit_join: unknown key(s) {unknown}; expected calls, min_rows, max_rows")
        pit_join = PitJoinSection(**{k: int(v) for k, v in given.items()})
    calls, min_rows, max_rows = pit_join.calls, pit_join.min_rows, pit_join.max_rows
    if calls < 1 or min_rows < 1 or max_rows < min_rows:
        raise ValueError(f"training.pit_join: need calls >= 1 and 1 <= min_rows <= max_rows, got calls={calls}, "
                         f"min_rows={min_rows}, max_rows={max_rows}")
    return min(max_rows, max(min_rows, -(-pairs // calls)))


def to_utc(day: date) -> datetime:
    """Midnight UTC of ``day``."""
    return datetime.combine(day, time(0), tzinfo=UTC)


@dataclass(frozen=True)
class FeastDefinitions:
    """The Feast objects of one data contract."""

    entity: Any
    source: Any
    view: Any
    service: Any

    def objects(self) -> list[Any]:
        return [self.entity, self.source, self.view, self.service]


def apply_definitions(store: FeatureStore, defs: FeastDefinitions) -> None:
    """Register the definitions (idempotent: applying the same objects again changes nothing)."""
    store.apply(defs.objects())


def materialised_until(store: FeatureStore, view_name: str) -> datetime | None:
    """The end of the latest interval materialised for ``view_name`` (Feast's registry); None before any."""
    from feast.errors import FeatureViewNotFoundException

    try:
        view = store.get_feature_view(view_name, allow_registry_cache=False)
    except FeatureViewNotFoundException:
        return None
    ends = [end if end.tzinfo else end.replace(tzinfo=UTC) for _, end in view.materialization_intervals]
    return max(ends) if ends else None


def materialize_window(store: FeatureStore, defs: FeastDefinitions, start: date, end: date,
                       overlap_days: int = 1, *, newest: date | None = None) -> tuple[datetime, datetime]:
    """Materialise ``[start - overlap, end)`` of the feature view into the online store; returns the interval.

    The interval is named by the caller (the run's window), never "now"; the overlap re-reads the
    days before for late data. Re-running it writes the same rows again, so an interrupted run is
    repaired by its retry. The online store keeps one row per entity and overwrites it whatever its
    time, so a window older than what was already materialised (a backfill, an old window retrained)
    is extended to the end of that: each entity keeps its newest features instead of going back in time.

    ``newest``, the newest curated day of the feature view: the interval never ends after that day's end,
    so the high-water mark Feast records (where the next materialisation starts from) never runs ahead
    of the data; an interval that starts after it materialises nothing.
    """
    lo = to_utc(start - timedelta(days=overlap_days))
    hi = to_utc(end)
    until = materialised_until(store, defs.view.name)
    if until is not None and until > hi:
        log.info("materialising %s..%s instead of ..%s: the online store already holds features up to %s",
                 lo, until, hi, until)
        hi = until
    if newest is not None and hi > to_utc(newest + timedelta(days=1)):
        log.info("materialising up to %s instead of %s: no curated feature rows after %s", to_utc(
            newest + timedelta(days=1)), hi, newest)
        hi = to_utc(newest + timedelta(days=1))
    if hi <= lo:
        log.warning("nothing to materialise: %s..%s starts after the newest curated features (%s)", lo, hi, newest)
        return lo, lo
    store.materialize(lo, hi, feature_views=[defs.view.name])
    return lo, hi


def historical_features(store: FeatureStore, defs: FeastDefinitions, rows: pd.DataFrame,
                        contract: DataContract, pit_join: PitJoinSection | Mapping[str, int] | None = None
                        ) -> pd.DataFrame:
    """``rows`` with the entity features as of each row's event time (point-in-time correct).

    Every input row comes back exactly once, in the input order. Feast is asked for the distinct (entity,
    time) pairs in chunks of :func:`pit_chunk_rows` pairs, sized by the ``calls``, ``min_rows`` and
    ``max_rows`` of ``pit_join``.
    """
    import pandas as pd

    ent, ts = contract.entity, contract.event_timestamp
    keys = rows[[ent, ts]].drop_duplicates().reset_index(drop=True)
    chunk_rows = pit_chunk_rows(len(keys), pit_join)
    log.info("point-in-time join: %d (entity, time) pairs, %d per call", len(keys), chunk_rows)
    parts = [
        store.get_historical_features(entity_df=keys.iloc[i:i + chunk_rows].reset_index(drop=True),
                                      features=defs.service).to_df()[[ent, ts, *contract.entity_features]]
        for i in range(0, max(len(keys), 1), max(chunk_rows, 1))
    ]
    feats = (parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)).drop_duplicates([ent, ts])
    feats[ts] = feats[ts].dt.tz_convert("UTC").astype(rows[ts].dtype)
    out = rows.drop(columns=[c for c in contract.entity_features if c in rows], errors="ignore").merge(
        feats, on=[ent, ts], how="left", validate="many_to_one"
    )
    if len(out) != len(rows):
        raise PermanentError(f"point-in-time join returned {len(out)} rows for {len(rows)}: "
                             "refusing a lossy training set")
    return out
