"""The benchmark suite works: ``bench/run.py --quick`` runs every stage on a tiny world and reports it.

This checks that the suite runs, not how fast anything is (figures are never asserted in tests: they
live in BENCHMARKS.md, from ``make bench``). What it does hold: every stage of the suite printed lines,
each with a positive figure; a floor, where a line has one, is positive and its ratio is figure / floor;
the peak memory and data size are numbers; and the report renders a table per stage from the same file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# not in `make test`'s run: `make bench-quick` (which .ci/run runs after `make test`) selects it with -m bench
pytestmark = [pytest.mark.integration, pytest.mark.bench]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "quick.jsonl"
    env = {**os.environ, "CLOSEDLOOP_BENCH_DIR": str(tmp / "bench-dir")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"bench/run.py --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    lines = [json.loads(x) for x in out.read_text().splitlines() if x.strip()]
    return proc, out, lines


def test_every_stage_reports_figures(quick_run):
    sys.path.insert(0, str(REPO / "bench"))
    from run import STAGES

    proc, _, lines = quick_run
    assert {r["stage"] for r in lines} == set(STAGES)
    for r in lines:
        where = f"{r['stage']}/{r['case']}"
        assert r["rows"] > 0, where
        assert r["figure_s"] > 0, where
        assert r["figure_peak_mib"] == r["figure_peak_mib"], where  # a number, not NaN
        if r["floor_s"] is not None:
            assert r["floor_s"] > 0, where
            assert r["ratio"] == pytest.approx(r["figure_s"] / r["floor_s"]), where
        # every line printed on stdout too (the table a user reads)
        assert r["case"] in proc.stdout, where


def test_report_renders_a_table_per_stage(quick_run):
    _, out, lines = quick_run
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    for stage in {r["stage"] for r in lines}:
        assert f"### {stage}\n" in proc.stdout
    assert proc.stdout.count("\n| ") >= len({(r["stage"], r["case"]) for r in lines})


def test_end_to_end_counts_airflows_own_overhead_in_its_floors(quick_run):
    """The retraining DAG's empty twin ran first, in the same home; its times are in the two DAG lines' floors."""
    _, _, lines = quick_run
    e2e = {r["case"]: r for r in lines if r["stage"] == "end_to_end"}
    empty = e2e["empty retraining DAG (dags test)"]
    assert empty["floor_s"] is None
    for case, part in (("retraining DAG (dags test)", "empty twin's dags test"),
                       ("retraining DAG run", "empty twin's DagRun")):
        assert part in e2e[case]["notes"], case
        assert "stage floors only" in e2e[case]["notes"], case
