"""The online load benchmark works: ``bench/serve_load.py`` on a small world, the SQLite online store, a few
requests per case.

As the suite's quick test, this checks that the script runs and reports, not how fast anything is: each case
of the table is there (one transaction through the minimal client and through httpx, 100 transactions, the
in-process floor, concurrent clients), every request answered 200 (the script stops on any other status),
figures positive, and the ratios to the floor are the figures' own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.integration, pytest.mark.bench]


def test_serve_load_reports_every_case_against_its_floor(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "serve_load.py"), "--stores", "sqlite",
                           "--requests", "60", "--seconds", "3", "--clients", "4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"serve_load failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    results = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    cases = {(r["batch"], str(r["clients"]), r.get("client", "raw")): r for r in results}
    assert set(cases) == {(1, "1", "raw"), (1, "1", "httpx"), (100, "1", "raw"), (1, "floor (in process)", "-"),
                          (1, "4", "raw")}
    for r in results:
        assert r["requests"] > 0 and r["p50_ms"] > 0 and r["p99_ms"] >= r["p50_ms"] and r["requests_per_s"] > 0
    floor = cases[(1, "floor (in process)", "-")]
    for client in ("raw", "httpx"):
        one = cases[(1, "1", client)]
        assert one["vs_floor_p50"] == round(one["p50_ms"] / floor["p50_ms"], 2)
        assert one["vs_floor_cpu"] == round(one["server_cpu_ms"] / floor["server_cpu_ms"], 2)
        assert one["client_cpu_ms"] > 0
    assert cases[(100, "1", "raw")]["transactions_per_s"] == pytest.approx(
        cases[(100, "1", "raw")]["requests_per_s"] * 100, rel=0.01)
    table = proc.stdout
    assert "| online store | transactions per request | clients | client |" in table
    assert table.count("| sqlite |") == 5
