"""The promotion gate: decide whether a candidate replaces the champion.

The gate decides; the registry acts. :func:`decide` is a pure function of the two models' metrics on
the same holdout; :func:`evaluate_gate` scores both models, records the decision in the candidate's
version tags and a decision report in its MLflow run, and returns it for the promote task.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from closedloop.metrics import DIRECTIONS, classification_metrics

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from closedloop.lake import Lake
    from closedloop.schema import DataContract
    from closedloop.settings import Settings

log = logging.getLogger(__name__)

PROMOTE, REJECT, INSUFFICIENT = "promote", "reject", "insufficient_evidence"
_EPS = 1e-9  # metric differences below this are rounding, not evidence


@dataclass(frozen=True)
class Decision:
    """The gate's verdict on one candidate."""

    outcome: str  # promote | reject | insufficient_evidence
    reason: str
    candidate_version: str
    champion_version: str | None
    candidate: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] = field(default_factory=dict)

    @property
    def promote(self) -> bool:
        return self.outcome == PROMOTE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _loss(metric: str, candidate: float, champion: float) -> float:
    """How much worse the candidate is on ``metric`` (negative when better)."""
    return champion - candidate if DIRECTIONS[metric] else candidate - champion


def decide(candidate: dict[str, float], champion: dict[str, float] | None, policy: dict[str, Any], *,
           candidate_version: str, champion_version: str | None) -> Decision:
    """Apply the gate policy to the metrics of both models on the same holdout.

    Promote when there is no champion, or when the candidate beats it on the primary metric by more
    than ``margin`` (a tie is not a win) without losing more than each guard's tolerance.
    """
    primary = policy["primary_metric"]
    margin = float(policy.get("margin", 0.0))
    args = {"candidate_version": candidate_version, "champion_version": champion_version,
            "candidate": candidate, "champion": champion or {}}
    if champion is None:
        return Decision(PROMOTE, "no champion yet: the first valid candidate becomes champion", **args)
    positives = candidate.get("positives", math.inf)
    if positives < int(policy.get("min_holdout_positives", 0)):
        return Decision(INSUFFICIENT, f"holdout has {positives:.0f} positives, fewer than the "
                        f"{policy['min_holdout_positives']} needed to judge: champion kept", **args)
    c, k = candidate.get(primary, math.nan), champion.get(primary, math.nan)
    if math.isnan(c) or math.isnan(k):
        return Decision(INSUFFICIENT, f"{primary} undefined on the holdout: champion kept", **args)
    gain = -_loss(primary, c, k)
    if gain <= margin + _EPS:  # a tie (or a gain of exactly the margin, up to rounding) is not a win
        return Decision(REJECT, f"{primary} {c:.4f} vs champion {k:.4f}: gain {gain:+.4f} does not exceed "
                        f"the margin {margin}", **args)
    for metric, tolerance in (policy.get("guards") or {}).items():
        loss = _loss(metric, candidate.get(metric, math.nan), champion.get(metric, math.nan))
        if math.isnan(loss) or loss > float(tolerance) + _EPS:
            return Decision(REJECT, f"{primary} improves by {gain:+.4f} but guard {metric} worsens by {loss:.4f} "
                            f"(tolerance {tolerance})", **args)
    return Decision(PROMOTE, f"{primary} {c:.4f} vs champion {k:.4f}: gain {gain:+.4f} exceeds the margin "
                    f"{margin}, guards within tolerance", **args)


def evaluate_gate(settings: Settings, client: MlflowClient, lake: Lake, contract: DataContract, *,
                  name: str, candidate_version: str, training_set_uri: str) -> Decision:
    """Score candidate and current champion on the candidate's holdout and record the decision."""
    from closedloop.features import read_training_split
    from closedloop.registry import CHAMPION, TAG, alias_version, load_booster
    from closedloop.training import predict

    holdout = read_training_split(lake, training_set_uri, "holdout")
    y = holdout[contract.label].to_numpy()
    cand_mv = client.get_model_version(name, candidate_version)
    cand_threshold = float(client.get_run(cand_mv.run_id).data.params["decision_threshold"])
    cand_metrics = classification_metrics(y, predict(load_booster(cand_mv.source), holdout, contract), cand_threshold)

    champ_version = alias_version(client, name, CHAMPION)
    champ_metrics: dict[str, float] | None = None
    if champ_version == candidate_version:  # a re-run of the run that promoted it: keep its recorded decision
        log.info("%s v%s is already the champion", name, candidate_version)
        return Decision(PROMOTE, "already the champion", candidate_version, champ_version, cand_metrics, cand_metrics)
    if champ_version is not None:
        champ_mv = client.get_model_version(name, champ_version)
        champ_threshold = float(client.get_run(champ_mv.run_id).data.params["decision_threshold"])
        champ_metrics = classification_metrics(
            y, predict(load_booster(champ_mv.source), holdout, contract), champ_threshold)
    decision = decide(cand_metrics, champ_metrics, settings.config.gate,
                      candidate_version=candidate_version, champion_version=champ_version)
    client.set_model_version_tag(name, candidate_version, f"{TAG}decision", decision.outcome)
    client.set_model_version_tag(name, candidate_version, f"{TAG}decision_reason", decision.reason[:4000])
    client.set_model_version_tag(name, candidate_version, f"{TAG}compared_with", champ_version or "none")
    for m in ("roc_auc", "pr_auc", "log_loss"):
        if champ_metrics is not None:
            client.set_model_version_tag(name, candidate_version, f"{TAG}gate.champion_{m}", f"{champ_metrics[m]:.6f}")
        client.set_model_version_tag(name, candidate_version, f"{TAG}gate.candidate_{m}", f"{cand_metrics[m]:.6f}")
    client.log_dict(cand_mv.run_id, decision.to_dict(), f"gate/decision_v{candidate_version}.json")
    log.info("gate for %s v%s: %s (%s)", name, candidate_version, decision.outcome, decision.reason)
    return decision
