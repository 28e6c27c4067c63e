"""Rollback: give the ``champion`` alias back to an earlier version, on purpose and on the record.

A rollback is a promotion like any other: it goes through :func:`closedloop.stages.registry.promote` (the
same compare-and-set under the same lock), the version it leaves gets ``previous``, and the move is
appended to the promotion history with ``kind="rollback"``, who asked and why. The default target is
the ``previous`` alias, the champion before the current one; ``version`` names any other.

Refused, with nothing changed: an empty reason, no champion, no ``previous`` and no named version, an
unknown version, the current champion, and a version the gate rejected unless ``force`` (a rejected
version lost to the champion of its day: going back to it is a decision someone must own). A plain
rollback right after a rollback is refused too, because ``previous`` then holds the very version that
was rolled back from; name it to return to it on purpose.

:func:`promote_manually` (``closedloop promote VERSION``) is the same move to a named version, recorded
with ``kind="manual"``; both share the refusals of :func:`check_target`.

The Airflow DAG ``rollback`` calls :func:`rollback_run`; its configuration is checked against
:data:`closedloop.core.runconf.ROLLBACK` before any work, and the recorded actor is the user who
triggered the run. A retried task finds the rollback its own run already made and does not move twice.
"""

from __future__ import annotations

import getpass
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from closedloop.core.errors import ConfigError
from closedloop.core.runconf import ROLLBACK, check
from closedloop.stages.registry import CHAMPION, PREVIOUS, TAG, alias_version, history, promote

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from closedloop.core.settings import Settings
    from closedloop.stages.runtime import Runtime

log = logging.getLogger(__name__)

KIND = "rollback"
MANUAL = "manual"
AIRFLOW_ACTOR = "airflow"


@dataclass(frozen=True)
class RollbackResult:
    """What a rollback did: ``status`` is ``rolled_back`` or ``already_done`` (a retried request)."""

    model: str
    status: str
    from_version: str
    to_version: str
    actor: str
    reason: str
    at: str
    forced: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _versions(client: MlflowClient, name: str) -> dict[str, dict[str, str | None]]:
    """Every version of ``name`` with its closedloop status, by version number."""
    found = client.search_model_versions(f"name = '{name}'")
    return {str(v.version): {"status": v.tags.get(f"{TAG}status"), "decision": v.tags.get(f"{TAG}decision")}
            for v in sorted(found, key=lambda v: int(v.version))}


def _describe(versions: dict[str, dict[str, str | None]]) -> str:
    return ", ".join(f"v{v} ({info['status'] or 'candidate'})" for v, info in versions.items()) or "none"


def _request_marker(request: str) -> str:
    return f" [request {request}]"


def rollback(client: MlflowClient, settings: Settings, name: str, *, reason: str, version: str | None = None,
             actor: str | None = None, force: bool = False, request: str | None = None) -> RollbackResult:
    """Move ``champion`` of ``name`` back to ``version`` (default: the ``previous`` alias).

    ``request`` (an Airflow run id) is appended to the recorded reason and makes the call idempotent:
    when the newest history entry is this request's rollback and still holds, it is returned as
    ``already_done``. Raises ConfigError for a refused request and PromotionConflict when another
    promotion moved the champion between the checks and the move (nothing changed then either).
    """
    reason = (reason or "").strip()
    if not reason:
        raise ConfigError("a rollback needs a reason (--reason): say what is wrong with the champion")
    actor = actor or getpass.getuser()
    version = (str(version).strip().removeprefix("v") or None) if version is not None else None
    versions = _versions(client, name)
    if not versions:
        raise ConfigError(f"model {name} has no registered versions: there is nothing to roll back")
    current = alias_version(client, name, CHAMPION)
    if request is not None:
        done = _done_by(client, name, request, current)
        if done is not None:
            log.info("%s: rollback of request %s already made (v%s -> v%s)", name, request,
                     done.from_version, done.to_version)
            return done
    if current is None:
        raise ConfigError(f"model {name} has no champion: there is nothing to roll back "
                          f"(versions: {_describe(versions)}); promote one through the retraining gate")

    if version is None:
        target = alias_version(client, name, PREVIOUS)
        if target is None:
            raise ConfigError(f"model {name}: no previous champion to roll back to (champion v{current} is the "
                              f"first); name a version with --to (versions: {_describe(versions)})")
        last = next(iter(history(client, name, limit=1)), None)
        if last and last.get("kind") == KIND and last.get("from_version") == target:
            raise ConfigError(
                f"model {name}: the last move was a rollback from v{target} to v{current} at {last['at']} "
                f"({last['reason']}), so 'previous' is the version rolled back from; name it with --to {target} "
                "to return to it on purpose, or name another version")
    else:
        target = version
    status = check_target(name, versions, target, current, force=force, action="a rollback",
                          force_hint="--force (force: true in the DAG's form)")

    recorded = reason + (_request_marker(request) if request else "")
    if status == "rejected":
        recorded += " [forced: the version was rejected by the gate]"
    move = promote(client, settings, name, target, expected_champion=current, reason=recorded, actor=actor,
                   kind=KIND)
    log.warning("%s rolled back: champion v%s -> v%s by %s (%s)", name, current, target, actor, reason)
    return RollbackResult(name, "rolled_back", current, target, actor, recorded, move.at, status == "rejected")


def check_target(name: str, versions: dict[str, dict[str, str | None]], target: str, current: str | None, *,
                 force: bool, action: str, force_hint: str = "--force") -> str | None:
    """Refuse a move of ``champion`` to ``target`` that is unknown, already champion, or rejected without force.

    Returns the target's closedloop status. Shared by rollback and the manual promotion.
    """
    if target not in versions:
        raise ConfigError(f"model {name} has no version {target!r}: versions are {_describe(versions)}")
    if target == current:
        raise ConfigError(f"model {name}: version {target} is already the champion; nothing to do")
    status = versions[target]["status"]
    if status == "rejected" and not force:
        raise ConfigError(f"model {name}: version {target} was rejected by the promotion gate; {action} to it "
                          f"needs {force_hint} and a reason that says why")
    return status


def promote_manually(client: MlflowClient, settings: Settings, name: str, version: str, *, reason: str,
                     actor: str | None = None, force: bool = False) -> RollbackResult:
    """Make ``version`` the champion by hand (``closedloop promote``), recorded with ``kind="manual"``.

    The same refusals as a rollback to a named version (empty reason, unknown version, the current
    champion, a rejected version without ``force``) and the same compare-and-set :func:`promote`.
    """
    reason = (reason or "").strip()
    if not reason:
        raise ConfigError("a manual promotion needs a reason (--reason): say why this version should serve")
    actor = actor or getpass.getuser()
    target = str(version).strip().removeprefix("v")
    versions = _versions(client, name)
    if not versions:
        raise ConfigError(f"model {name} has no registered versions: train one with the retraining DAG first")
    current = alias_version(client, name, CHAMPION)
    status = check_target(name, versions, target, current, force=force, action="a manual promotion")
    suspect = versions[target].get("decision") == "labels_suspect"
    recorded = reason + ((" [forced: the gate found the labels suspect]" if suspect else
                          " [forced: the version was rejected by the gate]") if status == "rejected" else "")
    move = promote(client, settings, name, target, expected_champion=current, reason=recorded, actor=actor,
                   kind=MANUAL)
    if status == "rejected":  # who overrode the gate, and why, on the version itself
        client.set_model_version_tag(name, target, f"{TAG}forced_by", actor[:250])
        client.set_model_version_tag(name, target, f"{TAG}forced_reason", reason[:4000])
    log.warning("%s promoted by hand: champion v%s -> v%s by %s (%s)", name, current, target, actor, reason)
    return RollbackResult(name, "promoted", current or "", target, actor, recorded, move.at, status == "rejected")


def _done_by(client: MlflowClient, name: str, request: str, current: str | None) -> RollbackResult | None:
    """This request's rollback, when it is the newest move and the champion is still where it put it."""
    last = next(iter(history(client, name, limit=1)), None)
    if (last and last.get("kind") == KIND and (last.get("reason") or "").find(_request_marker(request)) >= 0
            and last.get("to_version") == current):
        return RollbackResult(name, "already_done", last["from_version"] or "", last["to_version"],
                              last.get("actor") or "", last.get("reason") or "", last.get("at") or "",
                              "[forced" in (last.get("reason") or ""))
    return None


def triggering_actor(dag_run: Any) -> str:
    """Who started an Airflow run (``triggering_user_name`` of the DagRun, Airflow >= 3.1), else "airflow"."""
    user = getattr(dag_run, "triggering_user_name", None) if dag_run is not None else None
    return str(user) if user else AIRFLOW_ACTOR


def rollback_run(rt: Runtime, conf: dict[str, Any] | None, *, actor: str, request: str) -> dict[str, Any]:
    """The ``rollback`` DAG's task: check the run configuration, then roll back as it says."""
    conf = check(conf, ROLLBACK)
    result = rollback(rt.client, rt.settings, rt.model_name, reason=conf["reason"], version=conf.get("version"),
                      actor=actor, force=bool(conf.get("force")), request=request)
    return result.to_dict()
