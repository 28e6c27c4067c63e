"""Progress on long work: ``closedloop generate`` reports each file written on stderr; stdout stays the result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

CLOSEDLOOP = Path(sys.executable).parent / "closedloop"
STEP = re.compile(r"^\[(\d+)/(\d+)\] landing/(transactions|labels)/(\d{4}-\d{2}-\d{2})\.parquet written "
                  r"\((\d+) rows, \d+\.\d s\)$")


def _generate(home: Path, *extra: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    env = {**os.environ, "CLOSEDLOOP_HOME": str(home), "NO_COLOR": "1"}
    return subprocess.run([str(CLOSEDLOOP), "generate", "--start", "2026-03-01", "--days", "4", "--customers", "40",
                           "--transactions-per-day", "120", "--seed", "3", *extra],
                          capture_output=True, text=True, env=env, timeout=120)


def test_generate_reports_every_file_on_stderr_and_keeps_json_on_stdout(tmp_path):
    home = tmp_path / "closedloop"
    out = _generate(home, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)  # stdout is the JSON alone
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("simulated ") and f"writing {result['partitions']} landing files" in lines[0]
    assert re.fullmatch(r"done in \d+\.\d s", lines[-1])
    steps = [STEP.match(line) for line in lines[1:-1]]
    assert all(steps), lines
    # one numbered line per file written, in order, out of the announced total
    assert [int(m[1]) for m in steps] == list(range(1, len(result["uris"]) + 1))
    assert {int(m[2]) for m in steps} == {len(result["uris"])}
    # each line names a file that exists, with the rows it holds
    landing = home / "lake" / "landing"
    for m in steps:
        path = landing / m[3] / f"{m[4]}.parquet"
        assert path.as_uri() in result["uris"]
        assert len(pd.read_parquet(path)) == int(m[5]), m[0]
    assert sum(int(m[5]) for m in steps if m[3] == "transactions") == result["transactions"]
    assert [m[4] for m in steps if m[3] == "transactions"] == ["2026-03-01", "2026-03-02", "2026-03-03", "2026-03-04"]


def test_generate_without_json_prints_only_its_summary_on_stdout(tmp_path):
    out = _generate(tmp_path / "closedloop")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [line for line in out.stdout.strip().splitlines()
                                               if line.startswith("wrote ")] != []
    assert sum(bool(STEP.match(line)) for line in out.stderr.splitlines()) >= 4


def test_a_bad_argument_prints_no_progress(tmp_path):
    home = tmp_path / "closedloop"
    env = {**os.environ, "CLOSEDLOOP_HOME": str(home), "NO_COLOR": "1"}
    out = subprocess.run([str(CLOSEDLOOP), "generate", "--start", "2026-13-01", "--days", "2", "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert "error:" in out.stderr and not any(STEP.match(line) for line in out.stderr.splitlines())
