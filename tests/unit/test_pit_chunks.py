"""How the point-in-time join's (entity, time) pairs are split over calls of Feast (``training.pit_join``)."""

from __future__ import annotations

import math

import pytest

from closedloop.core.config_model import PitJoinSection
from closedloop.stages.features import pit_chunk_rows

DEFAULT = PitJoinSection()  # what a configuration without training.pit_join gets
PIT_CALLS, PIT_MIN_ROWS, PIT_MAX_ROWS = DEFAULT.calls, DEFAULT.min_rows, DEFAULT.max_rows


@pytest.mark.parametrize("pairs", [1, 99_999, 1_000_000, 2_500_001, 10_100_000, 20_000_000, 50_000_000, 10**9])
def test_the_pairs_go_in_about_the_configured_number_of_calls_within_the_bounds(pairs):
    chunk = pit_chunk_rows(pairs)
    assert PIT_MIN_ROWS <= chunk <= PIT_MAX_ROWS
    calls = math.ceil(pairs / chunk)
    if chunk == PIT_MIN_ROWS:       # small windows: few calls of the smallest size
        assert calls <= PIT_CALLS
    elif chunk == PIT_MAX_ROWS:     # huge windows: more calls, none larger than the cap
        assert calls >= PIT_CALLS
    else:                           # in between: exactly the configured number of calls
        assert calls == PIT_CALLS


def test_the_configuration_overrides_each_bound():
    assert pit_chunk_rows(1000, PitJoinSection(calls=7, min_rows=1)) == pit_chunk_rows(1000, {"calls": 7,
                                                                                               "min_rows": 1})
    assert math.ceil(1000 / pit_chunk_rows(1000, {"calls": 7, "min_rows": 1})) == 7
    assert pit_chunk_rows(10_000_000, {"max_rows": 200_000}) == 200_000
    assert pit_chunk_rows(10, {"min_rows": 50, "max_rows": 50}) == 50


@pytest.mark.parametrize("bad, words", [
    ({"calls": 0}, "calls >= 1"),
    ({"min_rows": 0}, "1 <= min_rows"),
    ({"min_rows": 10, "max_rows": 5}, "min_rows <= max_rows"),
    ({"chunk": 10}, "unknown key(s) ['chunk']"),
])
def test_a_bad_configuration_is_refused_naming_the_key(bad, words):
    with pytest.raises(ValueError, match=r"training\.pit_join") as err:
        pit_chunk_rows(1000, bad)
    assert words in str(err.value)
