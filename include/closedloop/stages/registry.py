"""The MLflow model registry: versions, aliases and the promotion history.

Only this module moves aliases. :func:`promote` is the one way ``champion`` changes (the retraining
gate, the CLI, rollback and a rollout's end all call it): a compare-and-set under a lock, which gives the old
champion the ``previous`` alias and appends the move to the promotion history, an MLflow experiment with one
run per move.

A rollout (``rollout.mode`` shadow or canary, :mod:`closedloop.stages.rollout`) gives the candidate the
``challenger`` or ``canary`` alias instead (:func:`start_rollout`); a canary's traffic share is its version's
``closedloop.canary_share`` tag, which ``closedloop serve`` polls with the aliases (:func:`ramp_rollout`);
:func:`end_rollout` removes the alias and, for a promotion, moves ``champion``. One rollout per model at a time.
The ``canary`` alias and, on the version it points at, the ``closedloop.canary_share`` tag (a float in [0, 1])
are what ``closedloop serve`` polls (:func:`canary`); :func:`set_canary` and :func:`clear_canary` set them by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from closedloop.core.errors import PromotionConflict, TransientError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from closedloop.core.settings import Settings

log = logging.getLogger(__name__)

TAG = "closedloop."
CHAMPION, PREVIOUS = "champion", "previous"
# the candidate of a rollout: scored in shadow (challenger) or serving a share of traffic (canary)
CHALLENGER, CANARY = "challenger", "canary"
CANARY_SHARE_TAG = f"{TAG}canary_share"
HISTORY_EXPERIMENT = "closedloop-promotions"


def mlflow_client(settings: Settings) -> MlflowClient:
    """An MLflow client on the settings' tracking and registry stores (also set as the process default)."""
    import mlflow
    from mlflow import MlflowClient

    settings.ensure_dirs()
    # mlflow.set_*_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI into os.environ, where the
    # next Settings.from_env() of this process would take them for the user's choice: undo that
    exported = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_registry_uri)
    for key, value in exported.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    with embedded_store_creation(settings):
        return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_registry_uri)


@contextlib.contextmanager
def embedded_store_creation(settings: Settings) -> Iterator[None]:
    """Hold an exclusive file lock beside the embedded SQLite tracking database (nothing for any other store).

    ``MlflowClient()`` creates the database's tables when they are missing; two processes doing so at once (two
    models' first trainings, tests/integration/test_many_models.py) race, and the loser fails with "table ...
    already exists". Under the lock the second finds the tables made.
    """
    uri = settings.mlflow_tracking_uri
    if not uri.startswith("sqlite:///"):
        yield
        return
    with open(uri.removeprefix("sqlite:///") + ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def ensure_experiment(client: MlflowClient, settings: Settings, name: str) -> str:
    """The id of experiment ``name``, created with its artifacts under the settings' artifact root."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=f"{settings.mlflow_artifact_root}/{name}")
    except Exception:  # created meanwhile by a concurrent task
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def ensure_model(client: MlflowClient, name: str) -> None:
    """Create the registered model ``name`` unless it exists (only "does not exist" means missing)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        try:
            client.create_registered_model(name, description="Managed by closedloop: see its promotion history.")
        except MlflowException as exc2:  # created meanwhile by a concurrent task
            if exc2.error_code != "RESOURCE_ALREADY_EXISTS":
                raise


def unreachable(exc: BaseException) -> bool:
    """Whether an MLflow error is a failure to reach its server (refused, timed out, retries exhausted)."""
    import requests

    seen: BaseException | None = exc
    for _ in range(20):  # the chain of causes, bounded
        if seen is None:
            break
        if isinstance(seen, requests.exceptions.RequestException | ConnectionError | TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def service_errors(client: MlflowClient, action: str) -> Iterator[None]:
    """Turn "the MLflow server does not answer" into a TransientError that names it.

    MLflow's HTTP client has already retried with backoff (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``,
    ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR``, ``MLFLOW_HTTP_REQUEST_TIMEOUT``); what is left is for the task's
    own retries, and the message says where to look. Other MLflow errors pass unchanged.
    """
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if not unreachable(exc):
            raise
        detail = str(exc).splitlines()[0][:300]
        raise TransientError(f"{action}: the MLflow server at {client.tracking_uri} did not answer after "
                             f"retries ({detail}); check that it is up, the task is retried") from exc


def find_version(client: MlflowClient, name: str, lineage_key: str) -> ModelVersion | None:
    """The version registered for ``lineage_key``, if any."""
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get(f"{TAG}lineage_key") == lineage_key:
            return mv
    return None


def register(client: MlflowClient, name: str, *, model_uri: str, run_id: str, lineage_key: str,
             tags: dict[str, str]) -> tuple[str, bool]:
    """Register the run's model as a version of ``name``; returns ``(version, created)``.

    Idempotent: a version already registered for the same lineage key is returned, not duplicated. The
    version and its tags are created in one call, so a failure leaves either no version or a whole one;
    an unreachable server raises TransientError naming it (the retry finds any version this call made).
    """
    with service_errors(client, f"registering {name} (lineage {lineage_key})"):
        ensure_model(client, name)
        existing = find_version(client, name, lineage_key)
        if existing is not None:
            log.info("version %s of %s already holds lineage %s", existing.version, name, lineage_key)
            return str(existing.version), False
        all_tags = {**tags, f"{TAG}lineage_key": lineage_key, f"{TAG}status": "candidate"}
        mv = client.create_model_version(name, source=model_uri, run_id=run_id, tags=all_tags,
                                         model_id=logged_model_id(model_uri))
    return str(mv.version), True


def logged_model_id(model_uri: str) -> str | None:
    """The LoggedModel id of a ``models:/m-...`` URI (what ``log_model`` returns), else None.

    An MLflow tracking server refuses a version whose source is a ``models:/<id>`` URI unless the id is
    also given (the local SQLite store does not check): pass it, as ``mlflow.register_model`` does.
    """
    rest = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else ""
    return rest if rest.startswith("m-") and "/" not in rest and "@" not in rest else None


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def canary_share(value: str | None) -> float:
    """The traffic share a ``closedloop.canary_share`` tag value gives: the float in [0, 1] it holds; 0 (all
    traffic to the champion) when the tag is missing, not a number or outside [0, 1], logged as an error then."""
    if value is None:
        return 0.0
    try:
        share = float(value)
    except ValueError:
        share = float("nan")
    if not 0.0 <= share <= 1.0:  # NaN included
        log.error("%s=%r is not a share in [0, 1]: the canary gets no traffic until it is", CANARY_SHARE_TAG, value)
        return 0.0
    return share


def canary(client: MlflowClient, name: str) -> tuple[str, float] | None:
    """The version the ``canary`` alias points at and its traffic share (:func:`canary_share` of its tag); None
    when there is no canary. An MLflow server that does not answer raises (the caller keeps what it had)."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(name, CANARY)
    except MlflowException as exc:
        if unreachable(exc):
            raise
        return None
    return str(mv.version), canary_share((mv.tags or {}).get(CANARY_SHARE_TAG))


def set_canary(client: MlflowClient, name: str, version: str, share: float) -> None:
    """Make ``version`` the canary with ``share`` of online traffic (a ramp step: call again with a larger share).

    The tag is written before the alias moves, so a poller never sees a new canary with an old share.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"canary share {share}: a share between 0 and 1")
    client.set_model_version_tag(name, str(version), CANARY_SHARE_TAG, repr(float(share)))
    if alias_version(client, name, CANARY) != str(version):
        client.set_registered_model_alias(name, CANARY, str(version))
    log.info("%s: canary version %s at share %s", name, version, share)


def clear_canary(client: MlflowClient, name: str) -> None:
    """Remove the ``canary`` alias (a rollback or the end of a rollout): all traffic goes back to the champion
    within one poll interval of ``closedloop serve``. Nothing to do when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model_alias(name, CANARY)
    except MlflowException as exc:
        if unreachable(exc):
            raise
    log.info("%s: canary alias removed", name)


@contextlib.contextmanager
def _promotion_lock(settings: Settings, name: str) -> Iterator[None]:
    """Serialise promotions of one model on this host (the compare-and-set's critical section)."""
    lock_dir = settings.home / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"promote-{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Promotion:
    model: str
    version: str
    previous: str | None
    reason: str
    actor: str
    at: str
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def promote(client: MlflowClient, settings: Settings, name: str, version: str, *, expected_champion: str | None,
            reason: str, actor: str | None = None, kind: str = "promotion") -> Promotion:
    """Make ``version`` the champion if ``champion`` still points at ``expected_champion``.

    Raises PromotionConflict when another promotion moved it meanwhile (nothing is changed then).
    The old champion gets the ``previous`` alias; the move is appended to the history.
    """
    from mlflow.exceptions import MlflowException

    actor = actor or getpass.getuser()
    with _promotion_lock(settings, name):
        current = alias_version(client, name, CHAMPION)
        if current != (str(expected_champion) if expected_champion is not None else None):
            raise PromotionConflict(
                f"{name}: champion is version {current}, the decision expected {expected_champion}; "
                "nothing was changed, re-run the gate against the current champion")
        if current == str(version):
            log.info("%s version %s is already the champion", name, version)
            return Promotion(name, str(version), current, reason, actor, _now(), "noop")
        try:
            client.get_model_version(name, str(version))
            old_previous = alias_version(client, name, PREVIOUS)
            if old_previous is not None and old_previous not in (current, str(version)):
                client.set_model_version_tag(name, old_previous, f"{TAG}status", "retired")
            if current is not None:
                client.set_registered_model_alias(name, PREVIOUS, current)
                client.set_model_version_tag(name, current, f"{TAG}status", "previous")
            client.set_registered_model_alias(name, CHAMPION, str(version))
            client.set_model_version_tag(name, str(version), f"{TAG}status", "champion")
        except MlflowException as exc:
            raise TransientError(f"{name}: could not move aliases to version {version}: {exc}") from exc
        move = Promotion(name, str(version), current, reason, actor, _now(), kind)
        _append_history(client, settings, move)
    log.info("%s: champion %s -> %s (%s)", name, current, version, reason)
    return move


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _append_history(client: MlflowClient, settings: Settings, move: Promotion) -> None:
    exp_id = ensure_experiment(client, settings, HISTORY_EXPERIMENT)
    before = f"v{move.previous}" if move.previous else "none"
    run = client.create_run(exp_id, run_name=f"{move.kind} {move.model} {before} -> v{move.version}", tags={
        f"{TAG}model": move.model, f"{TAG}to_version": move.version, f"{TAG}from_version": move.previous or "",
        f"{TAG}reason": move.reason[:4000], f"{TAG}actor": move.actor, f"{TAG}kind": move.kind,
        f"{TAG}at": move.at,
    })
    client.set_terminated(run.info.run_id)


def history(client: MlflowClient, name: str, limit: int = 50) -> list[dict[str, Any]]:
    """The promotion history of ``name``, newest first."""
    exp = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG}model` = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=limit)
    return [{
        "at": r.data.tags.get(f"{TAG}at"), "kind": r.data.tags.get(f"{TAG}kind"),
        "from_version": r.data.tags.get(f"{TAG}from_version") or None,
        "to_version": r.data.tags.get(f"{TAG}to_version"), "reason": r.data.tags.get(f"{TAG}reason"),
        "actor": r.data.tags.get(f"{TAG}actor"),
    } for r in runs]


def reject(client: MlflowClient, name: str, version: str, reason: str) -> None:
    """Keep ``version`` as a rejected candidate, with the reason in its tags."""
    client.set_model_version_tag(name, version, f"{TAG}status", "rejected")
    client.set_model_version_tag(name, version, f"{TAG}rejected_reason", reason[:4000])


def version_summary(client: MlflowClient, mv: ModelVersion, aliases: list[str] | None = None) -> dict[str, Any]:
    """A version with its run's holdout metrics and its closedloop tags."""
    metrics: dict[str, float] = {}
    if mv.run_id:
        run = client.get_run(mv.run_id)
        metrics = {k.removeprefix("holdout_"): round(v, 6) for k, v in run.data.metrics.items()
                   if k.startswith("holdout_")}
    return {
        "version": str(mv.version), "run_id": mv.run_id,
        "aliases": sorted(aliases if aliases is not None else (mv.aliases or [])),
        "status": mv.tags.get(f"{TAG}status"), "created": datetime.fromtimestamp(
            mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
        "metrics": metrics,
        "decision": mv.tags.get(f"{TAG}decision"), "reason": mv.tags.get(f"{TAG}decision_reason")
        or mv.tags.get(f"{TAG}rejected_reason"),
        "training_window": mv.tags.get(f"{TAG}window"),
    }


def status(client: MlflowClient, settings: Settings, name: str) -> dict[str, Any]:
    """Champion, candidates, their metrics and the promotion history of ``name``."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return {"model": name, "tracking_uri": settings.mlflow_tracking_uri, "champion": None,
                "versions": [], "history": []}
    by_version: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():
        by_version.setdefault(str(v), []).append(alias)
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version), reverse=True)
    summaries = [version_summary(client, v, by_version.get(str(v.version), [])) for v in versions]
    champ = next((s for s in summaries if CHAMPION in s["aliases"]), None)
    if champ is not None and champ["run_id"]:
        run = client.get_run(champ["run_id"])
        champ["experiment_id"] = run.info.experiment_id
        champ["artifact_uri"] = run.info.artifact_uri
    running = rollout_state(client, name)
    return {"model": name, "tracking_uri": settings.mlflow_tracking_uri, "champion": champ,
            "versions": summaries, "history": history(client, name),
            "rollout": running.to_dict() if running is not None else None}


def load_booster(model_uri: str) -> Any:
    """Load an XGBoost booster logged by :mod:`closedloop.stages.training`."""
    import mlflow.xgboost

    return mlflow.xgboost.load_model(model_uri)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


# -- rollouts -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rollout:
    """A rollout in progress, as the candidate version's tags say."""

    model: str
    version: str
    mode: str  # "shadow" or "canary"
    champion: str | None  # the champion it started against (compare-and-set of its end)
    step: int  # index into rollout.steps (canary); 0 for shadow
    share: float  # the canary's traffic share (shadow: 0, the challenger answers no request)
    started_at: str
    step_started_at: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def rollout_state(client: MlflowClient, name: str) -> Rollout | None:
    """The rollout in progress for ``name`` (its ``canary`` or ``challenger`` version's tags), or None."""
    for alias, mode in ((CANARY, "canary"), (CHALLENGER, "shadow")):
        version = alias_version(client, name, alias)
        if version is None:
            continue
        tags = client.get_model_version(name, version).tags
        if tags.get(f"{TAG}rollout_mode") != mode:
            continue  # a challenger set by hand, not a rollout
        return Rollout(model=name, version=version, mode=mode, champion=tags.get(f"{TAG}rollout_champion") or None,
                       step=int(tags.get(f"{TAG}rollout_step", "0")),
                       share=canary_share(tags.get(CANARY_SHARE_TAG)) if mode == "canary" else 0.0,
                       started_at=tags.get(f"{TAG}rollout_started_at", ""),
                       step_started_at=tags.get(f"{TAG}rollout_step_started_at", ""))
    return None


def start_rollout(client: MlflowClient, settings: Settings, name: str, version: str, *, mode: str, share: float,
                  champion: str | None, reason: str, actor: str, at: str | None = None) -> Rollout:
    """Give ``version`` the rollout's alias (``canary`` with ``share`` of traffic, or ``challenger``).

    Idempotent for the same version (a retried task finds its rollout); PromotionConflict when another version's
    rollout is in progress (one at a time: it ends first) or the champion moved meanwhile.
    """
    from mlflow.exceptions import MlflowException

    if mode not in ("shadow", "canary"):
        raise ValueError(f"rollout mode {mode!r}: shadow or canary")
    at = at or _now()
    with _promotion_lock(settings, name):
        running = rollout_state(client, name)
        if running is not None:
            if running.version == str(version):
                return running
            raise PromotionConflict(f"{name}: a rollout of version {running.version} is in progress (since "
                                    f"{running.started_at}); version {version} waits for it to end")
        current = alias_version(client, name, CHAMPION)
        if current != (str(champion) if champion is not None else None):
            raise PromotionConflict(f"{name}: champion is version {current}, the decision expected {champion}; "
                                    "nothing was changed")
        try:
            tags = {"rollout_mode": mode, "rollout_champion": champion or "", "rollout_step": "0",
                    "rollout_started_at": at, "rollout_step_started_at": at, "status": mode}
            for key, value in tags.items():
                client.set_model_version_tag(name, str(version), f"{TAG}{key}", value)
            if mode == "canary":
                set_canary(client, name, str(version), share)
            else:
                client.set_registered_model_alias(name, CHALLENGER, str(version))
        except MlflowException as exc:
            raise TransientError(f"{name}: could not start the rollout of version {version}: {exc}") from exc
        _append_history(client, settings, Promotion(name, str(version), current, reason, actor, at,
                                                    f"rollout_start_{mode}"))
    return rollout_state(client, name)  # type: ignore[return-value]


def ramp_rollout(client: MlflowClient, settings: Settings, rollout: Rollout, *, step: int, share: float,
                 reason: str, actor: str, at: str | None = None) -> Rollout:
    """Move the canary to ``step`` (``share`` of traffic), if it is still at ``rollout.step`` (compare-and-set)."""
    at = at or _now()
    with _promotion_lock(settings, rollout.model):
        now = rollout_state(client, rollout.model)
        if now is None or now.version != rollout.version:
            raise PromotionConflict(f"{rollout.model}: the rollout of version {rollout.version} ended meanwhile")
        if now.step == step:
            return now  # a retry
        if now.step != rollout.step:
            raise PromotionConflict(f"{rollout.model}: the canary moved to step {now.step} meanwhile")
        for key, value in {"rollout_step": str(step), "rollout_step_started_at": at}.items():
            client.set_model_version_tag(rollout.model, rollout.version, f"{TAG}{key}", value)
        set_canary(client, rollout.model, rollout.version, share)
        _append_history(client, settings, Promotion(rollout.model, rollout.version, rollout.champion, reason, actor,
                                                    at, f"rollout_ramp_{share:g}"))
    return rollout_state(client, rollout.model)  # type: ignore[return-value]


def end_rollout(client: MlflowClient, settings: Settings, rollout: Rollout, *, promoted: bool, reason: str,
                actor: str) -> Promotion | None:
    """End the rollout: remove its alias (all traffic back to the champion) and, when ``promoted``, make the
    candidate the champion (compare-and-set against the champion the rollout started with). None when it had
    ended already (a retry)."""
    now = rollout_state(client, rollout.model)
    if now is None or now.version != rollout.version:
        return None
    move = None
    if promoted:
        move = promote(client, settings, rollout.model, rollout.version, expected_champion=rollout.champion,
                       reason=reason, actor=actor, kind=f"rollout_promotion_{rollout.mode}")
    with _promotion_lock(settings, rollout.model):
        if rollout.mode == "canary":
            clear_canary(client, rollout.model)
        else:
            client.delete_registered_model_alias(rollout.model, CHALLENGER)
        if not promoted:
            client.set_model_version_tag(rollout.model, rollout.version, f"{TAG}status", "rolled_back")
            client.set_model_version_tag(rollout.model, rollout.version, f"{TAG}rejected_reason", reason[:4000])
            move = Promotion(rollout.model, rollout.champion or "", rollout.version, reason, actor, _now(),
                             f"rollout_rollback_{rollout.mode}")
            _append_history(client, settings, move)
    return move
