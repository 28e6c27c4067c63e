"""Online scoring: the champion served over HTTP with the customer features of Feast's online store.

``POST /score`` takes transactions with their request-time fields (the contract's ``role: feature``
columns, the row key, the entity and, optionally, the event time), fetches each customer's features
from the online store (Feast's feature service, the same one batch scoring reads offline), builds the
model's matrix (:class:`RequestMatrix`: the values of :func:`closedloop.stages.model.model_matrix`, without
pandas) and scores it with the same trees as batch scoring (``inplace_predict``), and answers
the score, the decision at the version's stored threshold and the model version. Every answer is
logged to the lake (``served/transactions/<day>/part-*.parquet``) by a background writer; when a version
carries the ``challenger`` alias it is scored beside the champion on a configured share of requests and
its predictions go to ``served/shadow/<day>/`` only, never into the answer.

**The canary split.** When a version carries the ``canary`` alias, a share of the entities (the contract's
entity, e.g. ``customer_id``) is answered by it. The share is the tag ``closedloop.canary_share`` on that
version (a float in [0, 1]; missing or invalid: 0); the rollout sets both with
:func:`closedloop.stages.registry.set_canary` and removes the alias with
:func:`~closedloop.stages.registry.clear_canary`. A transaction goes to the canary arm when
:func:`closedloop.core.served.arm_bucket` of the model's name and its entity (SHA-256, uniform in [0, 1)) is
below the share: sticky per entity, and raising the share only moves entities from the champion to the
canary. The champion scores every transaction, canary ones included (in shadow), so each row of the served
log carries ``arm``, ``champion_score`` and ``champion_version`` beside the answered ``score`` and
``model_version`` (:mod:`closedloop.core.served`): guardrails compare both arms on the same requests. A
canary that fails (not loaded, or an exception while scoring) never reaches the caller: the champion answers,
the row is logged with arm ``champion`` and ``canary_error`` True, and ``closedloop_serve_arm_errors_total
{arm="canary"}`` counts it. ``/metrics`` has per-arm transactions, errors, latency and scores and the
canary's share and version. Batch scoring and drift monitoring use the champion only.

:class:`ModelHolder` polls the alias and swaps the model under a lock: a request takes the model once,
at its start, so it finishes on the version it began with; :class:`CanaryHolder` follows the canary alias and
its share tag in the same poll, so a new share or a removed alias reaches traffic within one poll interval
(``serving.poll_seconds``). :func:`create_app` builds the app from injected collaborators and starts nothing
until the app's lifespan begins.
"""

from __future__ import annotations

import hmac
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any

from pydantic import model_validator

from closedloop.core.config_model import ServingSection
from closedloop.core.errors import ConfigError
from closedloop.core.served import ARM_CANARY, ARM_CHAMPION, SERVED, SHADOW, arm_bucket, served_uri
from closedloop.stages.model import _declared_index, predict_inplace
from closedloop.stages.registry import CANARY, CHAMPION, alias_version, canary, load_booster
from closedloop.stages.scoring import version_info

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from fastapi import FastAPI
    from feast import FeatureStore
    from mlflow import MlflowClient

    from closedloop.core.lake import Lake
    from closedloop.core.schema import DataContract
    from closedloop.stages.features import FeastDefinitions

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
SERVED_AT, REQUEST_ID = "served_at", "request_id"


# -- configuration -------------------------------------------------------------------------------
class ServingConfig(ServingSection):
    """The ``serving:`` section of the configuration: its keys, types and defaults are
    :class:`~closedloop.core.config_model.ServingSection`'s, its ranges are checked here (ConfigError)."""

    @model_validator(mode="after")
    def _ranges(self) -> ServingConfig:
        if self.max_batch < 1 or self.poll_seconds <= 0 or self.log_flush_rows < 1 or self.log_flush_seconds <= 0:
            raise ConfigError("serving: max_batch and log_flush_rows must be >= 1, poll_seconds and "
                              "log_flush_seconds > 0")
        if not 0.0 <= self.shadow_share <= 1.0:
            raise ConfigError(f"serving.shadow_share={self.shadow_share}: a share between 0 and 1")
        return self

    @classmethod
    def from_typed(cls, section: ServingSection) -> ServingConfig:
        """The configuration's typed ``serving`` section (``Config.typed.serving``), its ranges checked."""
        return cls.model_validate(section.model_dump())


# -- errors answered as HTTP statuses ------------------------------------------------------------
class ServingError(Exception):
    """An error with the HTTP status it is answered with."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServingError):
    status = 422


class TooLarge(ServingError):
    status = 413


class UnknownCustomers(ServingError):
    status = 404


class Unavailable(ServingError):
    status = 503


# -- the model -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    """One model version ready to score."""

    name: str
    alias: str
    version: str
    threshold: float
    booster: Any = field(repr=False)


def version_loader(client: MlflowClient, name: str) -> Callable[[str, str], LoadedModel]:
    """Load version ``v`` of ``name`` (booster and stored threshold) as
    :func:`closedloop.stages.scoring.version_info` does."""
    def load(alias: str, version: str) -> LoadedModel:
        info = version_info(client, name, version)
        booster = load_booster(info["model_uri"])
        booster.set_param({"nthread": 1})  # a request is a few rows; concurrency comes from the requests
        return LoadedModel(name, alias, version, info["threshold"], booster)

    return load


class ModelHolder:
    """The version an alias points at, loaded; :meth:`refresh` swaps it when the alias moves."""

    def __init__(self, client: MlflowClient, name: str, alias: str,
                 loader: Callable[[str, str], LoadedModel] | None = None):
        self.client, self.name, self.alias = client, name, alias
        self._load = loader or version_loader(client, name)
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None

    @property
    def model(self) -> LoadedModel | None:
        """The current model (a request reads it once and keeps it to the end)."""
        return self._model

    def refresh(self) -> bool:
        """Follow the alias: load the version it points at if it changed; True when the model changed.

        The new version is loaded before the lock is taken, so requests keep scoring on the old one
        meanwhile; an alias removed unloads the model (a challenger retired).
        """
        version = alias_version(self.client, self.name, self.alias)
        current = self._model
        if version == (current.version if current else None):
            return False
        loaded = self._load(self.alias, version) if version is not None else None
        with self._lock:
            self._model = loaded
        log.info("%s@%s: version %s -> %s", self.name, self.alias, current.version if current else None, version)
        return True


@dataclass(frozen=True)
class CanaryState:
    """The canary as one request sees it: its version, its traffic share and the loaded model (None when the
    version could not be loaded: its share of requests is answered by the champion, counted as canary errors)."""

    version: str
    share: float
    model: LoadedModel | None = field(default=None, repr=False)
    error: str = ""


class CanaryHolder:
    """The ``canary`` alias and its traffic share (the ``closedloop.canary_share`` tag of its version, read by
    :func:`closedloop.stages.registry.canary`), followed like :class:`ModelHolder`: :meth:`refresh` loads a new
    version before swapping, takes a new share as it is, and drops the canary when the alias is removed.

    The state is one immutable :class:`CanaryState` swapped whole, so a request that reads :attr:`state` once
    sees a version with its own share. A version that fails to load is kept with no model (its share goes to
    the champion, counted) and loaded again at the next refresh.
    """

    alias = CANARY

    def __init__(self, client: MlflowClient, name: str, loader: Callable[[str, str], LoadedModel] | None = None):
        self.client, self.name = client, name
        self._load = loader or version_loader(client, name)
        self._state: CanaryState | None = None

    @property
    def state(self) -> CanaryState | None:
        """The current canary (None: no canary, no split); a request reads it once, with the champion."""
        return self._state

    @property
    def model(self) -> LoadedModel | None:
        state = self._state
        return state.model if state is not None else None

    def refresh(self) -> bool:
        """Follow the alias and the share tag; True when the canary changed. MLflow not answering raises (the
        poller keeps the current canary)."""
        target = canary(self.client, self.name)
        current = self._state
        if target is None:
            self._state = None
            if current is not None:
                log.info("%s@%s: version %s removed; all traffic to the champion", self.name, CANARY, current.version)
            return current is not None
        version, share = target
        if current is not None and current.version == version and current.model is not None:
            if current.share == share:
                return False
            self._state = replace(current, share=share)
            log.info("%s@%s: version %s, share %s -> %s", self.name, CANARY, version, current.share, share)
            return True
        try:
            state = CanaryState(version, share, self._load(CANARY, version))
        except Exception as exc:  # a canary that cannot load never stops the service: the champion answers
            log.exception("%s@%s: could not load version %s; its share goes to the champion", self.name, CANARY,
                          version)
            state = CanaryState(version, share, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                                if str(exc) else type(exc).__name__)
        self._state = state
        if state == current:  # the same version failing to load again
            return False
        log.info("%s@%s: version %s -> %s at share %s%s", self.name, CANARY, current.version if current else None,
                 version, share, " (not loaded)" if state.model is None else "")
        return True


# -- online features -----------------------------------------------------------------------------
class OnlineFeatures:
    """The customer features of Feast's online store, through the model's feature service."""

    def __init__(self, store: FeatureStore, defs: FeastDefinitions, contract: DataContract):
        self.store, self.defs, self.contract = store, defs, contract

    def fetch(self, entities: list[Any]) -> np.ndarray:
        """One row per entity (in order), the contract's entity features as columns (float64); NaN where the
        store has none. No pandas: Feast's response as lists, straight into one array.

        Raises Unavailable when the store does not answer.
        """
        import numpy as np

        c = self.contract
        try:
            resp = self.store.get_online_features(features=self.defs.service,
                                                  entity_rows=[{c.entity: e} for e in entities]).to_dict()
        except Exception as exc:  # any failure of the store: no made-up features, no made-up score
            log.exception("online store failed")
            raise Unavailable(f"the online feature store did not answer ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); retry later") from exc
        out = np.empty((len(entities), len(c.entity_features)), dtype=np.float64)
        for j, f in enumerate(c.entity_features):
            out[:, j] = [_as_float(v) for v in resp[f]]
        return out


def _as_float(value: Any) -> float:
    """A value as a float, NaN for a missing or non-numeric one (as ``pd.to_numeric(errors="coerce")``)."""
    if value is None or isinstance(value, str):
        try:
            return float(value) if value is not None else float("nan")
        except ValueError:
            return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


# -- the served log ------------------------------------------------------------------------------
class ServedLog:
    """Buffers logged predictions and writes them to the lake in batches, one atomic file per batch and day.

    Flushed by a background thread when ``flush_rows`` are waiting or every ``flush_seconds``, and at
    :meth:`close`. A failed write keeps the rows for the next try (up to ``10 * flush_rows``).
    """

    def __init__(self, lake: Lake, kind: str, flush_rows: int, flush_seconds: float):
        self.lake, self.kind = lake, kind
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._rows: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.written: list[str] = []

    def append(self, rows: list[dict[str, Any]]) -> None:
        with self._lock:
            self._rows.extend(rows)
            full = len(self._rows) >= self.flush_rows
        if full:
            self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    def flush(self) -> list[str]:
        """Write what is buffered now; returns the URIs written."""
        import pandas as pd

        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return []
        frame = pd.DataFrame(rows)
        uris = []
        try:
            for day, part in frame.groupby(frame[SERVED_AT].dt.date, sort=True):
                stamp = datetime.now(UTC).strftime("%H%M%S%f")
                uri = f"{served_uri(self.lake, self.kind, day)}/part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
                self.lake.write_parquet(part.reset_index(drop=True), uri)
                uris.append(uri)
        except Exception:
            log.exception("could not write %d served %s rows; kept for the next flush", len(rows), self.kind)
            with self._lock:
                self._rows = (rows + self._rows)[-10 * self.flush_rows:]
            return uris
        self.written.extend(uris)
        return uris

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                self._wake.wait(self.flush_seconds)
                self._wake.clear()
                self.flush()

        self._thread = threading.Thread(target=loop, name=f"served-log-{self.kind}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.flush()


# -- scoring -------------------------------------------------------------------------------------
def request_model(contract: DataContract) -> tuple[type, type]:
    """Pydantic models of one transaction and of a request, derived from the contract; unknown fields refused."""
    from typing import Annotated

    from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, create_model

    # a strict float still takes an integer
    kinds: dict[str, Any] = {"float64": StrictFloat, "int64": StrictInt, "string": StrictStr, "bool": bool}
    fields: dict[str, Any] = {
        contract.row_key: (Annotated[StrictStr, Field(min_length=1, max_length=200)], ...),
        contract.entity: (StrictInt if contract.entity_dtype == "int64" else StrictStr, ...),
        contract.event_timestamp: (AwareDatetime | None, None),
    }
    for col in contract.columns:
        if col.role != "feature":
            continue
        # an unknown category is scored as missing, as in batch (feature_frame); drift monitoring watches them
        kind: Any = StrictStr if col.dtype == "category" else kinds[col.dtype]
        fields[col.name] = (kind | None, None) if col.nullable else (kind, ...)
    strict = ConfigDict(extra="forbid")
    transaction = create_model("Transaction", __config__=strict, **fields)

    class ScoreRequest(BaseModel):
        model_config = strict
        transactions: list[transaction] = Field(min_length=1)  # type: ignore[valid-type]

    return transaction, ScoreRequest


def contract_warnings(transaction: dict[str, Any], contract: DataContract) -> list[dict[str, Any]]:
    """The request fields outside the contract's ranges (``block:`` and ``warn:``) or categories.

    Batch validation would quarantine (block) or warn about such values; online the transaction is still scored
    (an unknown category as missing, as in batch) and the answer names each field: ``{"field", "value",
    "expected"}``.
    """
    out: list[dict[str, Any]] = []
    for col in contract.columns:
        value = transaction.get(col.name)
        if col.role != "feature" or value is None:
            continue
        if col.dtype == "category":
            if value not in col.categories:
                out.append({"field": col.name, "value": value, "expected": f"one of {list(col.categories)}"})
            continue
        for rule, spec in (("block", col.block), ("warn", col.warn)):
            lo, hi = spec.get("min"), spec.get("max")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                out.append({"field": col.name, "value": value,
                            "expected": f"in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}] "
                                        f"({rule}: range)"})
                break
    return out


def score_frame(model: LoadedModel, frame: pd.DataFrame, contract: DataContract) -> Any:
    """Scores of ``frame`` (request fields and entity features) by ``model``: the batch path's matrix and trees."""
    return predict_inplace(model.booster, frame, contract).astype("float64")


@dataclass(frozen=True)
class RequestMatrix:
    """The model's matrix of a request, built from its transactions (dicts) and their online features
    (:meth:`OnlineFeatures.fetch`) without pandas: the values :func:`closedloop.stages.model.model_matrix` gives
    for the same rows in a frame (a category's index in the contract's declared categories, NaN outside
    them or missing; numbers as floats, NaN when missing), so the scores are batch's (tests compare them).
    """

    names: tuple[str, ...]
    request: tuple[tuple[int, str, dict[str, int] | None], ...]  # (column, field, categories' index or None)
    entity: tuple[tuple[int, int], ...]  # (column, column of the fetched features)

    @classmethod
    def of(cls, contract: DataContract) -> RequestMatrix:
        fetched = {f: k for k, f in enumerate(contract.entity_features)}
        request, entity = [], []
        for j, name in enumerate(contract.model_features):
            if name in fetched:
                entity.append((j, fetched[name]))
            else:
                cats = contract.categorical.get(name)
                request.append((j, name, _declared_index(tuple(cats)) if cats is not None else None))
        return cls(tuple(contract.model_features), tuple(request), tuple(entity))

    def build(self, transactions: list[dict[str, Any]], feats: np.ndarray) -> np.ndarray:
        import numpy as np

        nan = float("nan")
        x = np.empty((len(transactions), len(self.names)), dtype=np.float32)
        for j, k in self.entity:
            x[:, j] = feats[:, k]
        for j, name, index in self.request:
            if index is None:
                x[:, j] = [nan if (v := t.get(name)) is None else _as_float(v) for t in transactions]
            else:
                x[:, j] = [nan if (v := index.get(t.get(name))) is None else v for t in transactions]  # type: ignore[arg-type]
        return x


def score_matrix(model: LoadedModel, x: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Scores of a request's matrix (:class:`RequestMatrix`, columns ``names``) by ``model``, as float64; the
    booster's feature names are checked against ``names`` (as :func:`closedloop.stages.training.predict_inplace`)."""
    have = model.booster.feature_names
    if have is not None and have != list(names):
        raise ValueError(f"feature_names mismatch: the model has {have}, the contract {list(names)}")
    return model.booster.inplace_predict(x).astype("float64")


@dataclass
class Scorer:
    """What ``POST /score`` does, without HTTP: features, scores, the canary split, the log and the shadow. No
    pandas on this path (the served log's rows become a frame in its writer's thread)."""

    contract: DataContract
    features: OnlineFeatures
    champion: ModelHolder
    challenger: ModelHolder | None
    served: ServedLog
    shadow: ServedLog | None
    config: ServingConfig
    metrics: Any = None
    rng: random.Random = field(default_factory=random.Random)
    matrix: RequestMatrix | None = None
    canary: CanaryHolder | None = None

    def __post_init__(self) -> None:
        if self.matrix is None:
            self.matrix = RequestMatrix.of(self.contract)

    def score(self, transactions: list[dict[str, Any]]) -> dict[str, Any]:
        """The answer to ``transactions`` (the body of ``POST /score``)."""
        return self.answer(transactions)[0]

    def answer(self, transactions: list[dict[str, Any]]) -> tuple[dict[str, Any], set[str]]:
        """The answer to ``transactions`` and the arms that answered them (``champion``, ``canary``)."""
        import numpy as np

        started = time.perf_counter()
        c = self.contract
        if len(transactions) > self.config.max_batch:
            raise TooLarge(f"{len(transactions)} transactions in one request: at most {self.config.max_batch} "
                           "(serving.max_batch); split the batch")
        model = self.champion.model  # taken once: this request finishes on this version
        canary_state = self.canary.state if self.canary is not None else None  # and on this canary and share
        if model is None:
            raise Unavailable(f"{self.champion.name} has no champion loaded yet; retry once one is promoted")
        ids = [t[c.row_key] for t in transactions]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise BadRequest(f"{c.row_key} must be unique within a request: repeated {dup}")
        now = datetime.now(UTC)
        entity_ids = [t[c.entity] for t in transactions]
        feats = self.features.fetch(entity_ids)
        unknown = np.isnan(feats).all(axis=1)
        if unknown.any():
            who = sorted({entity_ids[i] for i in np.flatnonzero(unknown)})
            if self.metrics is not None:
                self.metrics.unknown.inc(int(unknown.sum()))
            raise UnknownCustomers(f"no features in the online store for {c.entity} {who[:20]}: unknown customer(s) "
                                   "or not materialised yet; score them in batch once ingested")
        if self.metrics is not None:
            self.metrics.observe_features(feats)
        assert self.matrix is not None
        x = self.matrix.build(transactions, feats)
        try:
            champion_scores = score_matrix(model, x, self.matrix.names).tolist()
        except Exception:
            if self.metrics is not None:
                self.metrics.arm_errors[ARM_CHAMPION].inc(len(transactions))
            raise
        champion_decisions = [s >= model.threshold for s in champion_scores]
        scores, decisions = list(champion_scores), list(champion_decisions)
        arms, canary_error = [ARM_CHAMPION] * len(transactions), [False] * len(transactions)
        chosen = self._canary_rows(canary_state, model.name, entity_ids)
        if chosen:
            assert canary_state is not None
            answered = self._score_canary(canary_state, x[chosen])
            for k, i in enumerate(chosen):
                if answered is None:
                    canary_error[i] = True
                else:
                    scores[i], decisions[i], arms[i] = answered[0][k], answered[1][k], ARM_CANARY
        request_id = uuid.uuid4().hex
        fetched = {f: k for k, f in enumerate(c.entity_features)}
        logged = []
        latency_ms = (time.perf_counter() - started) * 1000.0  # features and both arms' scores: the rollout's p99
        for i, t in enumerate(transactions):
            ts = t.get(c.event_timestamp)
            row = {c.row_key: ids[i], c.entity: entity_ids[i],
                   c.event_timestamp: now if ts is None else ts.astimezone(UTC)}
            values = feats[i].tolist()
            for name in c.model_features:
                row[name] = values[fetched[name]] if name in fetched else t.get(name)
            canary_row = arms[i] == ARM_CANARY
            row["score"], row["decision"] = scores[i], int(decisions[i])
            row["model_version"] = canary_state.version if canary_row and canary_state else model.version
            row["arm"], row["champion_score"], row["champion_version"] = arms[i], champion_scores[i], model.version
            row["canary_error"] = canary_error[i]
            row["latency_ms"] = latency_ms
            row[SERVED_AT], row[REQUEST_ID] = now, request_id
            logged.append(row)
        self.served.append(logged)
        self._shadow(x, logged, model)
        predictions: list[dict[str, Any]] = []
        for i in range(len(transactions)):
            prediction = {c.row_key: ids[i], "score": scores[i], "decision": int(decisions[i])}
            if arms[i] == ARM_CANARY:  # the top-level version and threshold are the champion's
                prediction["model_version"] = logged[i]["model_version"]
            predictions.append(prediction)
        if self.metrics is not None:
            self.metrics.observe_arms(arms, scores)
        for prediction, transaction in zip(predictions, transactions, strict=True):
            warnings = contract_warnings(transaction, c)
            if warnings:  # scored all the same; the caller and /metrics are told which fields
                prediction["warnings"] = warnings
                if self.metrics is not None:
                    for w in warnings:
                        self.metrics.out_of_contract.labels(w["field"]).inc()
        return ({"model": model.name, "model_version": model.version, "threshold": model.threshold,
                 "predictions": predictions}, set(arms))

    @staticmethod
    def _canary_rows(state: CanaryState | None, model: str, entities: list[Any]) -> list[int]:
        """The rows whose entity the split puts in the canary arm (none without a canary or at share 0)."""
        if state is None or state.share <= 0.0:
            return []
        return [i for i, e in enumerate(entities) if arm_bucket(model, e) < state.share]

    def _score_canary(self, state: CanaryState, x: np.ndarray) -> tuple[list[float], list[bool]] | None:
        """The canary's scores and decisions of its rows; None when it cannot score them (logged and counted:
        the champion answers them; the caller never sees the canary's failure)."""
        out = None
        if state.model is not None:  # not loaded: the poller logged why (and tries again)
            try:
                assert self.matrix is not None
                out = score_matrix(state.model, x, self.matrix.names).tolist()
            except Exception:
                log.exception("canary version %s failed on %d transaction(s); the champion answered them",
                              state.version, len(x))
        if out is None or state.model is None:
            if self.metrics is not None:
                self.metrics.arm_errors[ARM_CANARY].inc(len(x))
            return None
        return out, [s >= state.model.threshold for s in out]

    def _shadow(self, x: np.ndarray, logged: list[dict[str, Any]], champ: LoadedModel) -> None:
        """Score with the challenger on a share of requests; log only (failures never reach the caller)."""
        shadow = self.challenger.model if self.challenger is not None else None
        if shadow is None or self.shadow is None or self.rng.random() >= self.config.shadow_share:
            return
        try:
            assert self.matrix is not None
            scores = score_matrix(shadow, x, self.matrix.names)
            out = []
            for row, s in zip(logged, scores.tolist(), strict=True):
                out.append({**row, "score": s, "decision": int(s >= shadow.threshold), "model_version": shadow.version})
            self.shadow.append(out)
            if self.metrics is not None:
                self.metrics.shadow.inc(len(out))
        except Exception:
            log.exception("shadow scoring with %s@%s failed (the champion's answer was not affected)",
                          shadow.name, shadow.alias)


# -- metrics -------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics of one app, in their own registry."""

    def __init__(self, features: list[str]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

        self.registry = CollectorRegistry()
        p = "closedloop_serve_"
        self.requests = Counter(f"{p}requests", "Requests by endpoint and status.", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram(f"{p}request_seconds", "Latency of POST /score.", registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.transactions = Counter(f"{p}transactions", "Transactions scored.", registry=self.registry)
        self.version = Gauge(f"{p}model_version", "The version each alias serves (0: none).", ["alias"],
                             registry=self.registry)
        self.feature_values = Counter(f"{p}feature_values", "Online feature values fetched.", ["feature"],
                                      registry=self.registry)
        self.feature_missing = Counter(f"{p}feature_missing", "Online feature values that were missing (NaN); "
                                       "the missing rate is missing / values.", ["feature"], registry=self.registry)
        self.unknown = Counter(f"{p}unknown_customers", "Transactions refused: no online features.",
                               registry=self.registry)
        self.shadow = Counter(f"{p}shadow_predictions", "Challenger predictions logged.", registry=self.registry)
        self.out_of_contract = Counter(f"{p}out_of_contract", "Transactions scored with a field outside the "
                                       "contract's block:/warn: range or categories, by field.", ["field"],
                                       registry=self.registry)
        # the canary split, by arm (champion, canary): both arms' series exist from the start, at 0
        arm_transactions = Counter(f"{p}arm_transactions", "Transactions answered, by arm.", ["arm"],
                                   registry=self.registry)
        arm_errors = Counter(f"{p}arm_errors", "Transactions an arm failed to score, by arm: canary, answered by "
                             "the champion instead; champion, the request failed.", ["arm"], registry=self.registry)
        arm_latency = Histogram(f"{p}arm_request_seconds", "Latency of POST /score requests with a transaction "
                                "answered by the arm, by arm.", ["arm"], registry=self.registry,
                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        arm_score = Summary(f"{p}arm_score", "Scores answered, by arm (sum / count: the mean score).", ["arm"],
                            registry=self.registry)
        self.canary_share = Gauge(f"{p}canary_share", "The canary's share of traffic (0: no canary); its version "
                                  "is closedloop_serve_model_version{alias=\"canary\"}.", registry=self.registry)
        arms = (ARM_CHAMPION, ARM_CANARY)
        self.arm_transactions = {a: arm_transactions.labels(a) for a in arms}
        self.arm_errors = {a: arm_errors.labels(a) for a in arms}
        self.arm_latency = {a: arm_latency.labels(a) for a in arms}
        self.arm_score = {a: arm_score.labels(a) for a in arms}
        self.feature_names = features
        # the children a request touches, bound once (a labels() lookup per feature and request costs)
        self.score_ok = self.requests.labels("/score", "200")
        self._values = [self.feature_values.labels(f) for f in features]
        self._missing = [self.feature_missing.labels(f) for f in features]

    def observe_features(self, feats: Any) -> None:
        """Count the fetched values and the missing ones: ``feats`` rows by ``feature_names`` columns (an
        array or a frame)."""
        import numpy as np

        values = np.asarray(feats, dtype=np.float64)
        missing = np.isnan(values).sum(axis=0).tolist()
        for values_child, missing_child, m in zip(self._values, self._missing, missing, strict=True):
            values_child.inc(len(values))
            if m:
                missing_child.inc(m)

    def observe_arms(self, arms: list[str], scores: list[float]) -> None:
        """Count the answered transactions and their scores by arm."""
        n_canary = 0
        for arm, score in zip(arms, scores, strict=True):
            self.arm_score[arm].observe(score)
            n_canary += arm == ARM_CANARY
        self.arm_transactions[ARM_CHAMPION].inc(len(arms) - n_canary)
        if n_canary:
            self.arm_transactions[ARM_CANARY].inc(n_canary)

    def set_versions(self, *holders: ModelHolder | CanaryHolder | None) -> None:
        """The version gauge of each holder's alias (0: none loaded); a canary's share gauge too."""
        for h in holders:
            if h is not None:
                m = h.model
                self.version.labels(h.alias).set(float(m.version) if m is not None and m.version.isdigit() else 0)
                if isinstance(h, CanaryHolder):
                    self.canary_share.set(h.state.share if h.state is not None else 0.0)


# -- the app -------------------------------------------------------------------------------------
class Poller:
    """Refreshes the holders every ``seconds`` in a background thread."""

    def __init__(self, holders: list[ModelHolder | CanaryHolder], seconds: float, on_change: Callable[[], None]):
        self.holders, self.seconds, self.on_change = holders, seconds, on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> None:
        changed = False
        for h in self.holders:
            try:
                changed |= h.refresh()
            except Exception:
                log.exception("could not follow %s@%s; keeping the loaded version", h.name, h.alias)
        if changed:
            self.on_change()

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.seconds):
                self.poll_once()

        self._thread = threading.Thread(target=loop, name="alias-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


UNAUTHORISED = "missing or wrong bearer token (Authorization: Bearer <CLOSEDLOOP_SERVE_TOKEN>)"


def invalid_content(errors: Sequence[Any]) -> dict[str, Any]:
    """The 422 answer to a request pydantic refused: each problem as ``field: message (got value)``."""
    problems = []
    for e in list(errors)[:20]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        problems.append(f"{where}: {e.get('msg')}" + (f" (got {e['input']!r})" if e.get("type") != "missing"
                                                      and not isinstance(e.get("input"), dict | list) else ""))
    return {"error": "invalid request: " + "; ".join(problems), "problems": problems}


def json_bytes(content: Any) -> bytes:
    """``content`` as Starlette's ``JSONResponse`` renders it."""
    return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")).encode()


@cache
def _scoring_app() -> type[FastAPI]:
    """FastAPI with ``POST /score`` answered by the ASGI call itself.

    The request goes straight to ``app.state.answer_score`` (the function the FastAPI route calls too),
    without Starlette's middleware stack, routing and request objects: about a fifth of the server's CPU
    per one-transaction request (``bench/serve_load.py``). Every other path, and the lifespan, is FastAPI's.
    """
    from fastapi import FastAPI

    class ScoringApp(FastAPI):
        async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:
            if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/score":
                await super().__call__(scope, receive, send)
                return
            authorization = ""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value.decode("latin-1")
            chunks = []
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            status, content, extra = self.state.answer_score(authorization, b"".join(chunks))
            body = json_bytes(content)
            headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
            headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    return ScoringApp


def create_app(*, contract: DataContract, store: FeatureStore, defs: FeastDefinitions, client: MlflowClient,
               model_name: str, lake: Lake, config: ServingConfig, token: str = "",
               loader: Callable[[str, str], LoadedModel] | None = None, seed: int | None = None) -> FastAPI:
    """The scoring app. Collaborators are passed in; the lifespan loads the models, starts the alias poller
    and the log writers, and flushes the log at shutdown.

    ``token``: when set, ``POST /score`` and ``GET /metrics`` need ``Authorization: Bearer <token>``;
    ``/health`` and ``/ready`` stay open (probes).
    """
    from fastapi import Depends, Request
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from pydantic import ValidationError

    _, score_request = request_model(contract)
    metrics = Metrics(contract.entity_features)
    champion = ModelHolder(client, model_name, CHAMPION, loader)
    challenger = ModelHolder(client, model_name, CHALLENGER, loader)
    canary_holder = CanaryHolder(client, model_name, loader)
    served = ServedLog(lake, SERVED, config.log_flush_rows, config.log_flush_seconds)
    shadow = ServedLog(lake, SHADOW, config.log_flush_rows, config.log_flush_seconds)
    scorer = Scorer(contract, OnlineFeatures(store, defs, contract), champion, challenger, served, shadow, config,
                    metrics, random.Random(seed), canary=canary_holder)
    holders: list[ModelHolder | CanaryHolder] = [champion, challenger, canary_holder]
    poller = Poller(holders, config.poll_seconds, lambda: metrics.set_versions(*holders))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        poller.poll_once()
        metrics.set_versions(*holders)
        poller.start()
        served.start()
        shadow.start()
        try:
            yield
        finally:
            poller.stop()
            served.close()
            shadow.close()

    app = _scoring_app()(title="closedloop scoring", lifespan=lifespan,
                         description=f"Scores {contract.name} transactions with {model_name}@champion.")
    app.state.scorer, app.state.poller, app.state.metrics = scorer, poller, metrics

    def bearer_ok(given: str) -> bool:
        if not token:
            return True
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

    async def authorised(request: Request) -> None:  # async: a sync dependency would hop to a worker thread
        if not bearer_ok(request.headers.get("authorization", "")):
            raise _Unauthorised(UNAUTHORISED)

    class _Unauthorised(ServingError):
        status = 401

    # this module postpones annotations (strings); FastAPI reads these two from the objects themselves
    authorised.__annotations__["request"] = Request

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)

    @app.get("/health")
    def health() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/ready")
    def ready() -> Response:
        """Readiness: a champion is loaded."""
        m = champion.model
        if m is None:
            return JSONResponse({"ready": False, "reason": f"{model_name} has no champion loaded"}, status_code=503)
        c, k = challenger.model, canary_holder.state
        return JSONResponse({"ready": True, "model": model_name, "model_version": m.version,
                             "challenger_version": c.version if c else None,
                             "canary_version": k.version if k else None, "canary_share": k.share if k else 0.0,
                             "canary_loaded": k is not None and k.model is not None})

    @app.get("/metrics", dependencies=[Depends(authorised)])
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def answer_score(authorization: str, body: bytes) -> tuple[int, Any, dict[str, str] | None]:
        """``POST /score`` from its ``Authorization`` header and body: (status, JSON content, extra headers).

        Every outcome is here (401, 422, the :class:`ServingError` statuses, 200) with its metrics, so the
        ASGI fast path (:func:`_scoring_app`) and the FastAPI route answer alike. The body is validated from
        its bytes by pydantic (``model_validate_json``: no intermediate Python objects); the work runs on the
        event loop, with no thread hop: one request is a few hundred microseconds of Python that the GIL
        would serialise anyway. An unexpected exception propagates (a 500, logged by the server).
        """
        start = time.perf_counter()
        if not bearer_ok(authorization):
            metrics.requests.labels("/score", "401").inc()
            return 401, {"error": UNAUTHORISED}, {"WWW-Authenticate": "Bearer"}
        try:
            request = score_request.model_validate_json(body)
        except ValidationError as exc:
            metrics.requests.labels("/score", "422").inc()
            return 422, invalid_content(exc.errors(include_url=False)), None
        rows = [t.model_dump() for t in request.transactions]
        try:
            out, arms = scorer.answer(rows)
        except ServingError as exc:
            metrics.requests.labels("/score", str(exc.status)).inc()
            return exc.status, {"error": exc.message}, None
        finally:
            elapsed = time.perf_counter() - start
            metrics.latency.observe(elapsed)
        for arm in arms:
            metrics.arm_latency[arm].observe(elapsed)
        metrics.transactions.inc(len(rows))
        metrics.score_ok.inc()
        return 200, out, None

    async def score(request: Request) -> Response:
        """Score the transactions: one prediction per transaction, in order."""
        status, content, headers = answer_score(request.headers.get("authorization", ""), await request.body())
        return JSONResponse(content, status_code=status, headers=headers)

    score.__annotations__.update(request=Request, **{"return": Response})
    app.post("/score", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": score_request.model_json_schema()}}}})(score)
    app.state.answer_score = answer_score

    return app


def app_from_runtime(rt: Any) -> FastAPI:
    """The app on a :class:`~closedloop.stages.runtime.Runtime`'s collaborators, configured by ``serving:``."""
    return create_app(contract=rt.contract, store=rt.store, defs=rt.defs, client=rt.client,
                      model_name=rt.model_name, lake=rt.lake,
                      config=ServingConfig.from_typed(rt.settings.config.typed.serving), token=rt.settings.serve_token)
