"""Label sanity from the data contract: the positive share a data set's labels are expected to show.

A schema declares it under ``label.expected_share``::

    label:
      expected_share:
        block: [0.0005, 0.2]   # wide: labels surely outside it are broken (inverted, one class, another feed)
        warn: [0.002, 0.05]    # narrow: outside it, an operator should look
        min_rows: 200          # fewer labelled rows: too few to judge, nothing is blocked
        confidence: 0.999      # of the binomial (Wilson score) interval of the observed share

The wide band **blocks** only when the whole binomial interval of the observed share lies outside it, and
only from ``min_rows`` rows on: a small, honest label day of a rare class (0 positives in 300 rows of a
1 % class) is not blocked, an inverted day (99 % positives) is. The narrow band **warns** on the observed
share itself, from :data:`WARN_MIN_ROWS` rows on (as the validation suite always has).

It is judged per label partition (:mod:`closedloop.stages.validation`, a blocking finding) and per window (the
gate: the holdout's share, see :mod:`closedloop.stages.gate`). A schema without ``expected_share`` keeps the older
``checks.warn.{min,max}_positive_share`` as its warning band and blocks nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from closedloop.core.errors import ContractError

WARN_MIN_ROWS = 1000
DEFAULT_MIN_ROWS = 200
DEFAULT_CONFIDENCE = 0.999
BLOCK_RULE = "label_share_implausible"


@dataclass(frozen=True)
class ShareBand:
    """The expected positive share of a contract's labels (see the module docstring)."""

    block: tuple[float, float] | None = None
    warn: tuple[float, float] | None = None
    min_rows: int = DEFAULT_MIN_ROWS
    confidence: float = DEFAULT_CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _band(value: Any, where: str) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ContractError(f"{where}: write the band as [low, high], shares between 0 and 1 (e.g. [0.0005, 0.2])"
                            ) from exc
    if not 0.0 <= lo <= hi <= 1.0:
        raise ContractError(f"{where}: [{lo}, {hi}] is not a band of shares (0 <= low <= high <= 1)")
    return lo, hi


def parse_share_band(label: dict[str, Any], checks: dict[str, Any], where: str) -> ShareBand | None:
    """The contract's :class:`ShareBand` from ``label.expected_share`` (or the older ``checks.warn``)."""
    spec = label.get("expected_share")
    if spec is None:
        warn = checks.get("warn") or {}
        lo, hi = warn.get("min_positive_share"), warn.get("max_positive_share")
        if lo is None and hi is None:
            return None
        return ShareBand(warn=(float(lo or 0.0), float(1.0 if hi is None else hi)), min_rows=WARN_MIN_ROWS)
    w = f"{where}: label.expected_share"
    if not isinstance(spec, dict):
        raise ContractError(f"{w}: expected a mapping with block, warn, min_rows, confidence")
    unknown = set(spec) - {"block", "warn", "min_rows", "confidence"}
    if unknown:
        raise ContractError(f"{w}: unknown key(s) {sorted(unknown)}; use block, warn, min_rows, confidence")
    block, warn = _band(spec.get("block"), f"{w}.block"), _band(spec.get("warn"), f"{w}.warn")
    if block and warn and not (block[0] <= warn[0] and warn[1] <= block[1]):
        raise ContractError(f"{w}: the warning band {list(warn)} must lie inside the blocking band {list(block)}")
    confidence = float(spec.get("confidence", DEFAULT_CONFIDENCE))
    if not 0.5 <= confidence < 1.0:
        raise ContractError(f"{w}.confidence={confidence}: use a confidence in [0.5, 1), e.g. 0.999")
    min_rows = int(spec.get("min_rows", DEFAULT_MIN_ROWS))
    if min_rows < 1:
        raise ContractError(f"{w}.min_rows={min_rows}: must be at least 1")
    return ShareBand(block=block, warn=warn, min_rows=min_rows, confidence=confidence)


def wilson_interval(positives: int, rows: int, confidence: float) -> tuple[float, float]:
    """The Wilson score interval of a binomial share ``positives / rows`` (``(0, 1)`` for no rows)."""
    from statistics import NormalDist

    if rows <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = positives / rows
    denom = 1 + z * z / rows
    centre = (p + z * z / (2 * rows)) / denom
    half = z * math.sqrt(p * (1 - p) / rows + z * z / (4 * rows * rows)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ShareVerdict:
    """How a set of labels' positive share compares with the band: ``ok``, ``warn`` or ``block``."""

    level: str
    share: float
    rows: int
    positives: int
    interval: tuple[float, float]
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge_share(positives: int, rows: int, band: ShareBand | None, what: str = "labels") -> ShareVerdict:
    """Judge ``positives`` of ``rows`` against ``band`` (see the module docstring for the rule)."""
    positives, rows = int(positives), int(rows)
    share = positives / rows if rows else math.nan
    confidence = band.confidence if band else DEFAULT_CONFIDENCE
    lo, hi = wilson_interval(positives, rows, confidence)

    def verdict(level: str, message: str) -> ShareVerdict:
        return ShareVerdict(level, share, rows, positives, (lo, hi), message)

    if band is None or rows == 0:
        return verdict("ok", f"{what}: no expected share declared" if band is None else f"{what}: no rows")
    seen = f"{what}: {positives} positive(s) in {rows} rows (share {share:.4%}, {confidence:.1%} interval " \
           f"[{lo:.4%}, {hi:.4%}])"
    if band.block and rows >= band.min_rows and (hi < band.block[0] or lo > band.block[1]):
        return verdict("block", f"{seen} lies wholly outside the contract's expected share "
                       f"[{band.block[0]:.4%}, {band.block[1]:.4%}]: inverted, one-class or foreign labels? "
                       "Fix the label feed (or the contract's label.expected_share.block)")
    if band.warn and rows >= WARN_MIN_ROWS and not band.warn[0] <= share <= band.warn[1]:
        return verdict("warn", f"{seen} is outside the usual share [{band.warn[0]:.4%}, {band.warn[1]:.4%}]")
    return verdict("ok", f"{seen} is plausible")
