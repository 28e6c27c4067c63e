"""The calibrated decision statistic and the calibration settings (pure functions, no data)."""

from __future__ import annotations

import math
import statistics

import pytest

from closedloop.core.errors import ConfigError
from closedloop.stages.calibration import (
    MODE_CALIBRATED,
    SOURCE_CALIBRATED,
    SOURCE_FIXED,
    Calibration,
    CalibrationSettings,
    aggregate,
    contribution,
    peak,
)


def _cal(**features: dict) -> Calibration:
    return Calibration(mode=MODE_CALIBRATED, why="test", std_multiplier=3.0, chunk_rows=1000,
                       features={n: {"source": SOURCE_CALIBRATED, **f} for n, f in features.items()},
                       weights={"a": 0.1, "b": 0.9})


def test_a_feature_counts_its_excess_over_its_chunks_in_their_std() -> None:
    cal = _cal(a={"mean": 0.02, "std": 0.01, "threshold": 0.05}, b={"mean": 0.1, "std": 0.05, "threshold": 0.25})
    assert contribution("a", 0.05, cal) == pytest.approx(3.0)      # at its threshold: std_multiplier
    assert contribution("a", 0.01, cal) == 0.0                      # quieter than its chunks: nothing
    assert contribution("a", None, cal) == pytest.approx(3.0)       # no value (a broken feed) is not silence
    fixed = Calibration(mode=MODE_CALIBRATED, why="", std_multiplier=3.0,
                        features={"a": {"source": SOURCE_FIXED, "threshold": 0.1}})
    assert contribution("a", 0.2, fixed) == pytest.approx(6.0)     # twice its fixed threshold


def test_one_used_feature_far_out_is_not_diluted_by_the_quiet_ones() -> None:
    """a (10 % of the model's total gain) 8 std out, b (90 %) quiet: sqrt(0.1 x 64) = 2.53, where a weighted mean
    of excesses (0.8) would hide it; b alone 1 std out counts 0.95."""
    cal = _cal(a={"mean": 0.02, "std": 0.01, "threshold": 0.05}, b={"mean": 0.1, "std": 0.05, "threshold": 0.25})
    assert aggregate({"a": 0.10, "b": 0.1}, cal) == pytest.approx(math.sqrt(0.1 * 64))
    assert aggregate({"a": 0.02, "b": 0.15}, cal) == pytest.approx(math.sqrt(0.9))
    assert aggregate({}, Calibration(mode=MODE_CALIBRATED, why="")) is None


def test_thresholds_scaled_for_a_small_window_scale_the_band_too() -> None:
    cal = _cal(a={"mean": 0.02, "std": 0.01, "threshold": 0.05}, b={"mean": 0.1, "std": 0.05, "threshold": 0.25})
    small = cal.for_rows(250)  # a quarter of a chunk's rows: distances twice as noisy
    assert small.features["a"]["mean"] == pytest.approx(0.04) and small.features["a"]["std"] == pytest.approx(0.02)
    assert aggregate({"a": 0.2, "b": 0.2}, small) == pytest.approx(aggregate({"a": 0.1, "b": 0.1}, cal))


def test_settings() -> None:
    assert CalibrationSettings.from_config(None).gap_days is None
    assert CalibrationSettings.from_config({"gap_days": 0}).gap_days == 0
    with pytest.raises(ConfigError, match="gap_days"):
        CalibrationSettings.from_config({"gap_days": -1})
    with pytest.raises(ConfigError, match=r"monitoring\.calibration: gap: unknown key"):
        CalibrationSettings.from_config({"gap": 2})
    assert CalibrationSettings.from_config(CalibrationSettings(gap_days=3)).gap_days == 3
    assert CalibrationSettings.from_config(None).peak_min_importance == 0.1
    with pytest.raises(ConfigError, match="peak_min_importance"):
        CalibrationSettings.from_config({"peak_min_importance": 0})


def test_thresholds_logged_for_the_first_statistic_are_recomputed_on_load() -> None:
    """A champion's thresholds.json written before the statistic changed holds an aggregate threshold on the old
    scale: loading it recomputes that threshold on the chunks' statistics kept with it."""
    cal = _cal(a={"mean": 0.02, "std": 0.01, "threshold": 0.05}, b={"mean": 0.1, "std": 0.05, "threshold": 0.25})
    cal.chunk_statistics = {"a": [0.01, 0.02, 0.03, 0.02], "b": [0.1, 0.05, 0.15, 0.1]}
    old = {**cal.to_dict(), "aggregate": {"threshold": 0.7, "mean": 0.4, "std": 0.1, "max": 0.6, "n": 4}}
    back = Calibration.from_dict(old)
    chunks = [aggregate({"a": a, "b": b}, cal) for a, b in zip(*cal.chunk_statistics.values(), strict=True)]
    expected = max(statistics.mean(chunks) + 3 * statistics.stdev(chunks), max(chunks), 1e-3)
    assert back.aggregate["threshold"] == pytest.approx(expected) and expected != 0.7
    assert back.aggregate["statistic"] == "weighted_rms_excess" and "recomputed" in back.why
    assert Calibration.from_dict(back.to_dict()).aggregate == back.aggregate  # a current one is kept as it is


def test_the_peak_is_the_largest_excess_among_the_features_the_model_relies_on_most() -> None:
    """The peak takes only the features named in ``peak['features']`` (at least ``peak_min_importance`` of the
    model's total gain); a thresholds.json written before the peak rule gets it on load, from its chunks."""
    cal = _cal(a={"mean": 0.02, "std": 0.01, "threshold": 0.05}, b={"mean": 0.1, "std": 0.05, "threshold": 0.25})
    cal.peak = {"features": ["b"]}
    assert peak({"a": 0.10, "b": 0.2}, cal) == (pytest.approx(2.0), "b")   # a is 8 std out but not a peak feature
    assert peak({"a": 0.10}, cal) == (pytest.approx(3.0), "b")             # b missing counts at its threshold
    assert peak({}, _cal()) is None                                          # no peak features: no peak
    cal.chunk_statistics = {"a": [0.01, 0.02, 0.03, 0.02], "b": [0.1, 0.05, 0.15, 0.2]}
    cal.aggregate = {"threshold": 1.0, "statistic": "weighted_rms_excess"}
    cal.peak, cal.weights = None, {"a": 0.05, "b": 0.95}
    back = Calibration.from_dict(cal.to_dict())
    chunks = [0.0, 0.0, 1.0, 2.0]   # b's excess in each chunk (a, 5 % of the gain, is not a peak feature)
    expected = max(statistics.mean(chunks) + 3 * statistics.stdev(chunks), max(chunks))
    assert back.peak["features"] == ["b"] and back.peak["threshold"] == pytest.approx(expected)
    assert "peak" in back.why and Calibration.from_dict(back.to_dict()).peak == back.peak
    # chunks that never move give no spread: the peak's threshold is never looser than a feature's own (3 std)
    cal.chunk_statistics = {"a": [0.02] * 4, "b": [0.1] * 4}
    assert Calibration.from_dict(cal.to_dict()).peak["threshold"] == pytest.approx(3.0)
