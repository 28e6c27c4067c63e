"""What the Airflow-level stages share: a copy of a world to run DAGs on, its own Airflow home, the runs' task
instances read back from the metadata database, and the peak memory of a process tree.

A DAG run changes its home (a new model version, a gate decision, Airflow's own database), so the
orchestration and end-to-end stages never run on the world itself: :func:`fresh_copy` copies the world's
home (lake, MLflow store, Feast registry and online store) into a directory of its own under ``.bench/``,
rewriting the absolute paths the MLflow store keeps (artifact locations, model storage) so that nothing
is written back into the world; every run starts from that same state.

The Airflow home inside the copy is the project's embedded one (``closedloop.devtools.airflow_home``: SQLite,
LocalExecutor, the repo's ``dags/``) with the parallelism asked for. Its database is migrated once per
Airflow version into a template under ``.bench/airflow-db/`` and copied from there (a migration takes
tens of seconds; it is not what the stages measure).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from common import BENCH_DIR, CONFIG, MIB, REPO, World

AIRFLOW = str(Path(sys.executable).parent / "airflow")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# -- a copy of the world -------------------------------------------------------------------------------
def fresh_copy(w: World, stage: str, without: tuple[str, ...] = ()) -> Path:
    """A copy of ``w``'s home under ``.bench/<stage>/<world>/closedloop`` (any earlier copy removed first).

    ``without``: paths relative to the home left out of the copy (e.g. ``lake/curated``: landed, not yet validated).
    The lake's Parquet files are hard-linked, not copied: the project writes every lake object atomically (a
    temporary file renamed into place, ``closedloop.core.lake.Lake.write_bytes``), so a rewrite in the copy replaces
    the link and never touches the world's file. The world's training sets are left out (a run rebuilds its own).
    """
    root = BENCH_DIR / stage / w.home.name
    if root.exists():
        shutil.rmtree(root)
    home = root / "closedloop"
    skip = {str(w.home / p) for p in ("lake/training_sets", *without)}
    lake = str(w.home / "lake") + os.sep

    def ignore(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == w.home
        return [n for n in names if (top and n in ("locks", "airflow")) or str(Path(folder) / n) in skip]

    def link_or_copy(src: str, dst: str) -> object:
        return os.link(src, dst) if src.startswith(lake) and src.endswith(".parquet") else shutil.copy2(src, dst)

    shutil.copytree(w.home, home, ignore=ignore, copy_function=link_or_copy)
    _rewrite_paths(home / "mlflow" / "mlflow.db", str(w.home), str(home))
    return home


def _rewrite_paths(db: Path, old: str, new: str) -> None:
    """Every text value of the MLflow store that names the world's home names the copy instead."""
    con = sqlite3.connect(db)
    try:
        tables = [t for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        args = (old + "/", new + "/", old + "/")
        for table in tables:
            for col in [r[1] for r in con.execute(f"PRAGMA table_info('{table}')")]:
                con.execute(f"UPDATE '{table}' SET \"{col}\" = REPLACE(\"{col}\", ?, ?) "
                            f"WHERE typeof(\"{col}\") = 'text' AND instr(\"{col}\", ?) > 0", args)
        con.commit()
    finally:
        con.close()


# -- the Airflow home ----------------------------------------------------------------------------------
def airflow_env(home: Path, config: Path = CONFIG, **extra: str) -> dict[str, str]:
    """The environment of every Airflow process on ``home``: no ``AIRFLOW__*`` of the caller's, CPU training."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update({
        "CLOSEDLOOP_HOME": str(home), "CLOSEDLOOP_CONFIG": str(config), "CLOSEDLOOP_DEVICE": "cpu",
        "AIRFLOW_HOME": str(home / "airflow"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "NO_COLOR": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
        **extra,
    })
    return env


def prepare_airflow(home: Path, env: dict[str, str], parallelism: int = 2) -> Path:
    """Write the embedded ``airflow.cfg`` into ``home/airflow`` and give it a migrated database."""
    from closedloop.core.settings import Settings
    from closedloop.devtools.airflow_home import write_config

    write_config(Settings.from_env(env), force=True, parallelism=parallelism)
    af_home = home / "airflow"
    shutil.copy(migrated_db(), af_home / "airflow.db")
    return af_home


def with_dag_folder(env: dict[str, str], name: str, folder: Path) -> dict[str, str]:
    """``env`` with a second DAG bundle ``name`` on ``folder``, after the home's own (the repo's ``dags/``).

    The product's DAG folder is unchanged and parsed first: ``airflow dags test`` parses the bundles in this
    order and stops at the first that holds the DAG, so a DAG of the repo's folder is found as it is without the
    second bundle, and a DAG of ``folder`` is found after the repo's DAGs were parsed (and written to the database).
    """
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    bundles = [{"name": "dags-folder", "classpath": local, "kwargs": {}},
               {"name": name, "classpath": local, "kwargs": {"path": str(folder)}}]
    return {**env, "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles)}


def fresh_db(af_home: Path, keep_as: str | None = None) -> None:
    """Give the Airflow home a fresh copy of the migrated database; the old one is kept as ``keep_as`` (or removed)."""
    for f in af_home.glob("airflow.db*"):  # the database and any journal of it
        if keep_as:
            os.replace(f, af_home / f.name.replace("airflow.db", keep_as, 1))
        else:
            f.unlink()
    shutil.copy(migrated_db(), af_home / "airflow.db")


def migrated_db() -> Path:
    """A freshly migrated, empty Airflow metadata database (made once per Airflow version)."""
    from importlib.metadata import version

    template = BENCH_DIR / "airflow-db" / version("apache-airflow") / "airflow.db"
    if template.exists():
        return template
    work = template.parent / f"tmp-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update({"AIRFLOW_HOME": str(work), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{work / 'airflow.db'}"})
    subprocess.run([AIRFLOW, "db", "migrate"], env=env, check=True, capture_output=True, timeout=600)
    os.replace(work / "airflow.db", template)
    shutil.rmtree(work, ignore_errors=True)
    return template


# -- task instances ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskRun:
    dag_id: str
    run_id: str
    task_id: str
    state: str | None
    start: datetime | None
    end: datetime | None
    try_number: int

    @property
    def seconds(self) -> float | None:
        return (self.end - self.start).total_seconds() if self.start and self.end else None


def _when(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def task_runs(af_home: Path, dag_id: str | None = None) -> list[TaskRun]:
    """Every task instance in the Airflow home's database (of ``dag_id``), as recorded by Airflow."""
    con = sqlite3.connect(f"file:{af_home / 'airflow.db'}?mode=ro", uri=True)
    try:
        sql = "SELECT dag_id, run_id, task_id, state, start_date, end_date, try_number FROM task_instance"
        rows = con.execute(sql + (" WHERE dag_id = ?" if dag_id else ""), (dag_id,) if dag_id else ()).fetchall()
    finally:
        con.close()
    return [TaskRun(d, r, t, s, _when(a), _when(b), int(n or 0)) for d, r, t, s, a, b, n in rows]


def upstreams(af_home: Path, dag_id: str) -> dict[str, list[str]]:
    """Each task's direct upstream task ids, from the DAG as Airflow serialised it (its latest version)."""
    import zlib

    con = sqlite3.connect(f"file:{af_home / 'airflow.db'}?mode=ro", uri=True)
    try:
        data, packed = con.execute("SELECT data, data_compressed FROM serialized_dag WHERE dag_id = ? "
                                   "ORDER BY created_at DESC LIMIT 1", (dag_id,)).fetchone()
    finally:
        con.close()
    tasks = json.loads(data if data else zlib.decompress(packed))["dag"]["tasks"]
    ups: dict[str, list[str]] = {}
    for t in tasks:
        t = t.get("__var", t)
        ups.setdefault(t["task_id"], [])
        for down in t.get("downstream_task_ids") or []:
            ups.setdefault(down, []).append(t["task_id"])
    return {k: sorted(v) for k, v in ups.items()}


def handoffs(runs: list[TaskRun], ups: dict[str, list[str]]) -> list[tuple[str, float]]:
    """For each task of one DAG run that has upstreams: its start minus the last end of its upstreams."""
    by_task = {r.task_id: r for r in runs}
    out = []
    for task_id, parents in ups.items():
        t = by_task.get(task_id)
        ends = [by_task[p].end for p in parents if p in by_task and by_task[p].end]
        if t is None or t.start is None or not parents or len(ends) != len(parents):
            continue
        out.append((f"{'+'.join(parents)} -> {task_id}", (t.start - max(ends)).total_seconds()))
    return out


# -- memory of a process tree --------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return kids


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def tree_rss(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants, summed."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        total += _rss(p)
        todo.extend(_children(p))
    return total


class TreePeak:
    """Samples the summed resident memory of a process tree until stopped; ``peak_mib`` is the highest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self._done.wait(self.interval)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak / MIB


def run_tree(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int, float, float]:
    """Run ``cmd`` in a process group of its own, output to ``log``; (exit code, seconds, peak tree MiB).

    The whole group is killed when the command overruns ``timeout`` or the caller is interrupted.
    """
    import signal

    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with TreePeak(proc.pid) as peak:
                rc = proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None or _group_alive(proc.pid):
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    time.sleep(1)
                proc.wait()
        return rc, time.perf_counter() - t0, peak.peak_mib


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
