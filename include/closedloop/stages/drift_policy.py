"""What drift monitoring and its calibration share: the policy and the preparation of the frames.

:mod:`closedloop.stages.drift` measures and decides with them, :mod:`closedloop.stages.calibration` sets its
thresholds with them; both import this module (it imports neither), so that drift can import calibration at
the top. The names are re-exported by :mod:`closedloop.stages.drift`, where they were first defined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from closedloop.core.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

    from closedloop.core.schema import DataContract

NUMERIC_DTYPES = {"float64", "int64"}


# -- the policy ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DriftPolicy:
    """The ``monitoring:`` section of the configuration, checked."""

    min_rows: int
    sample_rows: int
    numeric_stattest: str
    numeric_threshold: float
    categorical_stattest: str
    categorical_threshold: float
    drift_share_threshold: float
    key_features: dict[str, float]
    prediction_threshold: float
    quality_drop: float
    min_labelled_positives: int
    cooldown_hours: float
    keep_reports: int
    window_days: int = 2

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> DriftPolicy:
        """Build the policy from the ``monitoring`` mapping; errors name the offending key."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"monitoring: expected a mapping, got {type(cfg).__name__}")

        def get(key: str, kind: type, lo: float | None = None, hi: float | None = None,
                default: Any = None) -> Any:
            if key not in cfg:
                if default is not None:
                    return default
                raise ConfigError(f"monitoring: missing required key {key!r}")
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"monitoring.{key}={value!r}: expected a number")
            if kind is int and float(value) != int(value):
                raise ConfigError(f"monitoring.{key}={value!r}: expected a whole number")
            value = kind(value)
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise ConfigError(f"monitoring.{key}={value!r}: must be in [{lo}, {hi if hi is not None else 'inf'}]")
            return value

        def name(key: str) -> str:
            value = cfg.get(key)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"monitoring.{key}={value!r}: expected the name of an Evidently stattest")
            return value.strip()

        raw_keys = cfg.get("key_features") or {}
        if not isinstance(raw_keys, dict):
            raise ConfigError("monitoring.key_features: expected a mapping feature -> threshold")
        key_features: dict[str, float] = {}
        for feature, threshold in raw_keys.items():
            if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0:
                raise ConfigError(f"monitoring.key_features.{feature}={threshold!r}: expected a number >= 0")
            key_features[str(feature)] = float(threshold)
        return cls(
            min_rows=get("min_rows", int, 1),
            sample_rows=get("sample_rows", int, 0),
            numeric_stattest=name("numeric_stattest"),
            numeric_threshold=get("numeric_threshold", float, 0.0),
            categorical_stattest=name("categorical_stattest"),
            categorical_threshold=get("categorical_threshold", float, 0.0),
            drift_share_threshold=get("drift_share_threshold", float, 0.0, 1.0),
            key_features=key_features,
            prediction_threshold=get("prediction_threshold", float, 0.0),
            quality_drop=get("quality_drop", float, 0.0, 1.0),
            min_labelled_positives=get("min_labelled_positives", int, 0),
            cooldown_hours=get("cooldown_hours", float, 0.0),
            keep_reports=get("keep_reports", int, 1),
            window_days=get("window_days", int, 1, default=2),
        )

    def check_features(self, contract: DataContract) -> None:
        """Refuse key features that are not model features of ``contract``."""
        unknown = sorted(set(self.key_features) - set(contract.model_features))
        if unknown:
            raise ConfigError(f"monitoring.key_features: {unknown} are not model features of {contract.name!r}")



# -- the figures and the frames ---------------------------------------------------------------------
def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj



def _kinds(contract: DataContract) -> dict[str, str]:
    """``numeric`` or ``categorical`` for each model feature."""
    kinds: dict[str, str] = {}
    dtypes = {c.name: c.dtype for c in contract.columns}
    for name in contract.model_features:
        kinds[name] = "numeric" if dtypes.get(name, "float64") in NUMERIC_DTYPES else "categorical"
    return kinds


def _prepared(frame: pd.DataFrame, kinds: dict[str, str]) -> pd.DataFrame:
    """The columns in ``kinds``: numeric as float64 (unparseable -> NaN), categorical as Python strings
    (missing -> None; values outside the contract's categories are kept: they are drift)."""
    import numpy as np
    import pandas as pd

    out: dict[str, Any] = {}
    for name, kind in kinds.items():
        s = frame[name]
        if kind == "numeric":
            values = pd.to_numeric(s, errors="coerce").astype("float64").to_numpy()
            out[name] = np.where(np.isfinite(values), values, np.nan)
        else:
            out[name] = s.astype("string").to_numpy(dtype=object, na_value=None)
    return pd.DataFrame(out)


def _sample(frame: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """``n`` rows of ``frame`` drawn without replacement (in their original order), or all of them."""
    import numpy as np

    if n <= 0 or len(frame) <= n:
        return frame
    rows = np.sort(np.random.default_rng(seed).choice(len(frame), size=n, replace=False))
    return frame.iloc[rows]

