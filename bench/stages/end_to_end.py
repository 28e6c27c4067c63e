"""End to end: the ``retraining`` DAG on the world's window through real Airflow, vs its stages' floors plus
Airflow's own overhead (the same command on the DAG's empty twin).

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

Airflow's overhead (the CLI's start, parsing the DAG folder and writing it to the database, creating the run,
each task's start-up, its XCom pulls and push) is in the figure and in no stage's floor. It is measured first:
``bench/empty_twin.py`` reads the ``retraining`` DAG from the home's DagBag and generates its empty twin
``retraining_empty`` (the same task ids, dependencies, XCom inputs, trigger rules and mapped instances; every
task a Python task that returns ``{}``) into ``airflow/bench-dags/`` of the home, a second DAG bundle after the
repo's ``dags/`` (``airflow_env.with_dag_folder``; the product's folder is unchanged, and ``dags test`` parses it
first for both DAGs). The twin runs with the same command, conf and environment in the same home; the real run
then gets a fresh copy of the migrated database (the twin's is kept as ``airflow-empty-twin.db``), so that it
starts from the state it always did.

Lines:
- ``empty retraining DAG (dags test)``: the twin's command, wall time (no floor); its DagRun's duration in
  the notes.
- ``retraining DAG (dags test)``: the command's wall time (Airflow's start and DAG parsing included), vs
  the sum of the floors of the stages it contains at this size, read from the results file
  (``CLOSEDLOOP_BENCH_OUT``): validation (the daily partitions), the aggregates (``validate_window`` curates
  each day with its customer aggregates, the validation stage's floor counts only the rules), materialisation
  (SQLite), the training set task, the train task; plus the empty
  twin's wall time. The notes give what was summed and the ratio against the stage floors alone (the floor of
  this line before the twin existed, comparable with older results). A missing floor is named in the notes
  and the floor printed ``-``. Peak memory: the highest summed resident memory of the command's whole process
  tree (sampled from /proc).
- ``retraining DAG run``: the DAG run alone (its start to its end in Airflow's database), vs the same sum of
  stage floors plus the twin's DagRun duration (and, in the notes, the ratio against the stage floors alone).
- ``task <task_id>``: each task instance's duration as Airflow recorded it (no floor).
When the results file holds this line for a smaller size of the suite (100k, 1M...: not the quick world),
the notes say how the figure grows: the ratio per 10x rows.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import airflow_env
from common import REPO, SIZES, Result, World, frame_mib, machine, size_name

STAGE = "end_to_end"
DAG_ID = "retraining"
# the stages the retraining DAG contains, and which of their lines is its floor (case contains this)
CONTAINED = {"validation": "daily partitions", "aggregates": "aggregates", "materialisation": "sqlite",
             "training_set": "training set task", "training": "train task"}
CASE_DAG = "retraining DAG (dags test)"
CASE_RUN = "retraining DAG run"
CASE_EMPTY = "empty retraining DAG (dags test)"
TWIN_ID = "retraining_empty"  # the empty twin's dag_id (bench/empty_twin.py)


def run(w: World, quick: bool) -> list[Result]:
    w.champion()  # the world is complete: curated data, a training set, a champion
    # quick mode (CI: it only has to work, fast) keeps the curated zone: validate_window checks the window's
    # partitions and finds them validated (the validation stage runs the suite itself)
    home = airflow_env.fresh_copy(w, STAGE, without=() if quick else ("lake/curated",))
    env = airflow_env.airflow_env(home, GIT_DIR=str(home / "no-git"))
    af_home = airflow_env.prepare_airflow(home, env, parallelism=2)
    twin_folder = af_home / "bench-dags"
    env = airflow_env.with_dag_folder(env, "bench-twins", twin_folder)
    conf = {"window_start": w.window.start.isoformat(), "window_end": w.window.end.isoformat(), "reason": "bench"}

    # Airflow's own overhead: the DAG's empty twin, the same command in the same home, before the real run
    _write_twin(env, twin_folder / f"{TWIN_ID}.py")
    empty = _dags_test(TWIN_ID, conf, env, af_home, home / "retraining-empty-bench.log", 600)
    # the real run starts from a fresh database, as without the twin (whose parse wrote the repo's DAGs into it)
    airflow_env.fresh_db(af_home, keep_as="airflow-empty-twin.db")
    real = _dags_test(DAG_ID, conf, env, af_home, home / "retraining-bench.log", 600 if quick else 4 * 3600)
    seconds, run_seconds, peak = real.seconds, real.run_seconds, real.peak

    stages, missing, parts = _floor_sum(w.rows)
    data = _training_set_mib(home)
    tasks = sorted(airflow_env.task_runs(af_home, DAG_ID), key=lambda t: (t.start is None, t.start))
    if stages is None:
        floor_note = f"no floor: {', '.join(missing)} missing in {os.environ.get('CLOSEDLOOP_BENCH_OUT') or '-'}"
        run_note, floor, run_floor = "", None, None
    else:
        floor, run_floor = stages + empty.seconds, stages + empty.run_seconds
        floor_note = (f"floor = sum of {' + '.join(parts)} + empty twin's dags test {empty.seconds:.2f} s; "
                      f"stage floors only {stages:.2f} s, ratio {seconds / stages:.2f}")
        run_note = (f"; floor = stage floors {stages:.2f} s + empty twin's DagRun {empty.run_seconds:.2f} s; "
                    f"stage floors only: ratio {run_seconds / stages:.2f}")
    out = [
        Result(STAGE, CASE_EMPTY, w.rows, empty.seconds, None, empty.peak, None, None,
               notes=f"{TWIN_ID}: the retraining DAG's tasks, dependencies and XCom inputs, each task returning {{}} "
                     f"(bench/empty_twin.py): Airflow's own overhead; its DagRun {empty.run_seconds:.2f} s; "
                     f"peak = process tree{_growth(w.rows, CASE_EMPTY, empty.seconds)}"),
        Result(STAGE, CASE_DAG, w.rows, seconds, floor, peak, None, data,
               notes=f"{floor_note}; peak = process tree{_growth(w.rows, CASE_DAG, seconds)}"
                     + ("; quick: the window was curated already, validate_window validated nothing" if quick else "")),
        Result(STAGE, CASE_RUN, w.rows, run_seconds, run_floor, peak, None, data,
               notes=f"DagRun start..end in Airflow's DB{run_note}{_growth(w.rows, CASE_RUN, run_seconds)}"),
    ]
    for t in tasks:
        out.append(Result(STAGE, f"task {t.task_id}", w.rows, t.seconds or 0.0, None, peak, None, None,
                          notes=f"{t.state}, try {t.try_number}; peak is the whole run's"))
    return out


def _write_twin(env: dict[str, str], path: Path) -> None:
    """Generate the empty twin of the retraining DAG, as the home's DagBag holds it, into ``path``."""
    done = subprocess.run([sys.executable, str(REPO / "bench" / "empty_twin.py"), DAG_ID, TWIN_ID, str(path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"bench/empty_twin.py {DAG_ID} exited {done.returncode}:\n{done.stderr[-4000:]}")


@dataclass(frozen=True)
class DagsTest:
    seconds: float  # the command's wall time
    run_seconds: float  # its DagRun, start to end in Airflow's database
    peak: float  # MiB, the process tree's


def _dags_test(dag_id: str, conf: dict[str, str], env: dict[str, str], af_home: Path, log: Path,
               timeout: float) -> DagsTest:
    """``airflow dags test dag_id -c conf`` in its own process tree; fails with the log's tail unless it succeeded."""
    rc, seconds, peak = airflow_env.run_tree([airflow_env.AIRFLOW, "dags", "test", dag_id, "-c", json.dumps(conf)],
                                             env, log, timeout=timeout)
    state, run_seconds = _dag_run(af_home, dag_id)
    if rc != 0 or state != "success":
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        raise RuntimeError(f"airflow dags test {dag_id} exited {rc}, run state {state}; see {log}\n{tail}")
    return DagsTest(seconds, run_seconds, peak)


def _dag_run(af_home: Path, dag_id: str) -> tuple[str | None, float]:
    con = sqlite3.connect(f"file:{af_home / 'airflow.db'}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT state, start_date, end_date FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1",
                          (dag_id,)).fetchone()
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

    A stage's floor is its first case with a floor (its main line), as last written to the results file. Where
    the project's own figure is below that line's floor (the aggregates: their floor is the method they
    replaced, slower than them), the figure is the cheapest known way to do the work and is summed instead.
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
    cheapest = {s: min(float(r["floor_s"]), float(r["figure_s"])) for s, r in chosen.items()}
    parts = [f"{s} ({r['case']}) {cheapest[s]:.2f} s" + (" (its figure: below its floor)"
                                                         if cheapest[s] < float(r["floor_s"]) else "")
             for s, r in chosen.items()]
    return sum(cheapest.values()), [], parts


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
