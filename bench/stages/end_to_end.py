"""End to end: the ``retraining`` DAG on the world's window through real Airflow, vs the sum of its stages' floors.

The figure is ``airflow dags test retraining -c '{window_start, window_end, reason}'`` (the Makefile's
``retrain`` target) in a process of its own, on a fresh copy of the world (``airflow_env.fresh_copy``: the
landed data, the champion, the Feast stores), with its own Airflow home and migrated SQLite database under
``.bench/end_to_end/``: every run starts from the same state. The copy leaves the curated zone out: the run
validates and curates the window, as a retraining on newly landed data does (with the world's curated zone,
validate_window finds every partition validated already and checks nothing, while the sum of floors
includes validation). Quick mode keeps the curated zone (faster; the validation stage covers the suite).
The lineage is frozen (no git commit in it, ``GIT_DIR`` pointing nowhere, as the project's scheduler tests
do), so the run trains and registers a new version instead of finding the world's champion's run, which has
the same data.

Lines:
- ``retraining DAG (dags test)``: the command's wall time (Airflow's start and DAG parsing included), vs
  the sum of the floors of the stages it contains at this size, read from the results file
  (``CLOSEDLOOP_BENCH_OUT``): validation, materialisation (SQLite), training set, training. A missing floor
  is named in the notes and the floor printed ``-``. Peak memory: the highest summed resident memory of the
  command's whole process tree (sampled from /proc).
- ``retraining DAG run``: the DAG run alone (its start to its end in Airflow's database), same floor.
- ``task <task_id>``: each task instance's duration as Airflow recorded it (no floor).
When the results file holds this line for a smaller size of the suite (100k, 1M...: not the quick world),
the notes say how the figure grows: the ratio per 10x rows.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from pathlib import Path
from typing import Any

import airflow_env
from common import SIZES, Result, World, frame_mib, machine, size_name

STAGE = "end_to_end"
DAG_ID = "retraining"
# the stages the retraining DAG contains, and which of their lines is its floor (case contains this)
CONTAINED = {"validation": "", "materialisation": "sqlite", "training_set": "", "training": ""}
CASE_DAG = "retraining DAG (dags test)"
CASE_RUN = "retraining DAG run"


def run(w: World, quick: bool) -> list[Result]:
    w.champion()  # the world is complete: curated data, a training set, a champion
    # quick mode (CI: it only has to work, fast) keeps the curated zone: validate_window checks the window's
    # partitions and finds them validated (the validation stage runs the suite itself)
    home = airflow_env.fresh_copy(w, STAGE, without=() if quick else ("lake/curated",))
    env = airflow_env.airflow_env(home, GIT_DIR=str(home / "no-git"))
    af_home = airflow_env.prepare_airflow(home, env, parallelism=2)
    conf = {"window_start": w.window.start.isoformat(), "window_end": w.window.end.isoformat(), "reason": "bench"}
    log = home / "retraining-bench.log"
    rc, seconds, peak = airflow_env.run_tree([airflow_env.AIRFLOW, "dags", "test", DAG_ID, "-c", json.dumps(conf)],
                                             env, log, timeout=600 if quick else 4 * 3600)
    state, run_seconds = _dag_run(af_home)
    if rc != 0 or state != "success":
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise RuntimeError(f"airflow dags test {DAG_ID} exited {rc}, run state {state}; see {log}\n{tail}")

    floor, missing, parts = _floor_sum(w.rows)
    data = _training_set_mib(home)
    tasks = sorted(airflow_env.task_runs(af_home, DAG_ID), key=lambda t: (t.start is None, t.start))
    floor_note = (f"floor = sum of {' + '.join(parts)}" if floor is not None
                  else f"no floor: {', '.join(missing)} missing in {os.environ.get('CLOSEDLOOP_BENCH_OUT') or '-'}")
    out = [
        Result(STAGE, CASE_DAG, w.rows, seconds, floor, peak, None, data,
               notes=f"{floor_note}; peak = process tree{_growth(w.rows, CASE_DAG, seconds)}"
                     + ("; quick: the window was curated already, validate_window validated nothing" if quick else "")),
        Result(STAGE, CASE_RUN, w.rows, run_seconds, floor, peak, None, data,
               notes=f"DagRun start..end in Airflow's DB{_growth(w.rows, CASE_RUN, run_seconds)}"),
    ]
    for t in tasks:
        out.append(Result(STAGE, f"task {t.task_id}", w.rows, t.seconds or 0.0, None, peak, None, None,
                          notes=f"{t.state}, try {t.try_number}; peak is the whole run's"))
    return out


def _dag_run(af_home: Path) -> tuple[str | None, float]:
    con = sqlite3.connect(f"file:{af_home / 'airflow.db'}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT state, start_date, end_date FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1",
                          (DAG_ID,)).fetchone()
    finally:
        con.close()
    if row is None:
        return None, 0.0
    start, end = airflow_env._when(row[1]), airflow_env._when(row[2])
    return row[0], (end - start).total_seconds() if start and end else 0.0


def _results() -> list[dict[str, Any]]:
    path = os.environ.get("CLOSEDLOOP_BENCH_OUT")
    if not path or not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    here = machine()
    return [r for r in rows if r.get("machine") == here]


def _floor_sum(rows: int) -> tuple[float | None, list[str], list[str]]:
    """Sum of the latest floor of each contained stage at ``rows``; (sum or None, missing, what was summed).

    A stage's floor is its first case with a floor (its main line), as last written to the results file.
    """
    first: dict[str, str] = {}
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in _results():
        stage, case = str(r.get("stage")), str(r.get("case", ""))
        if (r.get("rows") == rows and stage in CONTAINED and r.get("floor_s") and CONTAINED[stage] in case.lower()
                and "gpu" not in case.lower()):
            first.setdefault(stage, case)
            latest[(stage, case)] = r
    missing = [s for s in CONTAINED if s not in first]
    if missing:
        return None, missing, []
    chosen = {s: latest[(s, first[s])] for s in CONTAINED}
    parts = [f"{s} ({r['case']}) {r['floor_s']:.2f} s" for s, r in chosen.items()]
    return sum(float(r["floor_s"]) for r in chosen.values()), [], parts


def _growth(rows: int, case: str, figure: float) -> str:
    """'; x2.9 per 10x rows from 100k' when a smaller size's line of ``case`` is in the results file."""
    smaller = [r for r in _results() if r.get("stage") == STAGE and r.get("case") == case
               and int(r.get("rows") or 0) in SIZES.values() and int(r["rows"]) < rows and r.get("figure_s")]
    if not smaller:
        return ""
    top = max(int(r["rows"]) for r in smaller)
    prev = [r for r in smaller if int(r["rows"]) == top][-1]
    ratio = figure / float(prev["figure_s"])
    per10 = ratio ** (1 / math.log10(rows / top))
    return f"; x{per10:.2f} per 10x rows from {size_name(top)} ({prev['figure_s']:.1f} s)"


def _training_set_mib(home: Path) -> float | None:
    """The run's training set as a pandas frame in memory (as ``common.frame_mib``), estimated from its first
    row group (read) and the row count of all its files (metadata): no need to load 10M rows to size them."""
    import pyarrow.parquet as pq

    files = sorted((home / "lake" / "training_sets").rglob("*.parquet"))
    if not files:
        return None
    # one training set per window and data: the copy's and the run's are the same directory
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    sample = pq.ParquetFile(files[0]).read_row_group(0).to_pandas()
    if sample.empty:
        return None
    return frame_mib(sample) / len(sample) * rows
