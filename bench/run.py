"""The benchmark suite: every stage of closedloop against its floor, at 100k, 1M and 10M transactions.

    .venv/bin/python bench/run.py [--sizes 100k,1m,10m] [--stages validation,training,...] [--out FILE]
    .venv/bin/python bench/run.py --quick          # what CI runs: a tiny world, every stage once, to prove it works

For each size it builds the world (``bench/common.py``: generated, ingested, materialised, a training set and
a champion, each step once and kept under ``.bench/``), then runs each stage in a process of its own
(``bench/run.py --stage NAME --rows N``): the project's own code first, its floor (the bare work with the
same library and settings) next, in that process. Each stage prints its lines (figure, floor, ratio, peak
memory above the process's starting point, in-memory size of its data) and appends them as JSON to
``--out`` (default ``bench/results/latest.jsonl``); ``bench/report.py`` turns that file into the tables of
BENCHMARKS.md.

Stages are modules of ``bench/stages/`` with ``run(world, quick) -> list[Result]``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HEADER, REPO, emit, machine, parse_size, size_name, world

# in the order of the retraining DAG, then the DAG-level ones (end_to_end sums the floors of the others)
STAGES = ("validation", "aggregates", "keys", "materialisation", "training_set", "training", "scoring", "drift",
          "orchestration", "end_to_end")
# stages measured once, not per size
ONCE = ("orchestration",)
QUICK_ROWS = 5_000
DEFAULT_OUT = REPO / "bench" / "results" / "latest.jsonl"


def run_stage(name: str, rows: int, quick: bool, out: Path | None) -> None:
    """One stage in this process (what the suite starts per stage)."""
    os.environ["CLOSEDLOOP_BENCH_OUT"] = str(out or "")
    module = importlib.import_module(f"stages.{name}")
    results = module.run(world(rows, quick=quick), quick)
    emit(results, out)


def prepare(rows: int, quick: bool) -> None:
    """Build the world of a size (each step once; printed, not a benchmark figure)."""
    w = world(rows, quick=quick)
    for step in ("generated", "ingested", "materialised", "training_set", "champion"):
        t0 = time.perf_counter()
        getattr(w, step)()
        print(f"  world {size_name(rows)}: {step} ({time.perf_counter() - t0:.1f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100k,1m,10m", help="comma-separated: 100k, 1m, 10m or a number of rows")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of: {', '.join(STAGES)}")
    p.add_argument("--quick", action="store_true", help=f"one tiny world ({QUICK_ROWS} rows), to check it works")
    p.add_argument("--out", type=Path, default=None, help=f"JSON lines appended here (default {DEFAULT_OUT})")
    p.add_argument("--stage", help=argparse.SUPPRESS)     # internal: run one stage in this process
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    out = args.out or DEFAULT_OUT

    if args.prepare:
        prepare(args.rows, args.quick)
        return 0
    if args.stage:
        run_stage(args.stage, args.rows, args.quick, out)
        return 0

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {unknown}: use {', '.join(STAGES)}")
    sizes = [QUICK_ROWS] if args.quick else [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    print(f"closedloop benchmarks on {machine()}; results appended to {out}", flush=True)
    base = [sys.executable, str(Path(__file__).resolve())] + (["--quick"] if args.quick else [])
    failed: list[str] = []
    done_once: set[str] = set()
    for rows in sizes:
        print(f"\n== {size_name(rows)} transactions ==", flush=True)
        subprocess.run([*base, "--prepare", "--rows", str(rows)], check=True)
        print(HEADER, flush=True)
        for name in stages:
            if name in ONCE and name in done_once:
                continue
            done_once.add(name)
            rc = subprocess.run([*base, "--stage", name, "--rows", str(rows), "--out", str(out)]).returncode
            if rc != 0:
                failed.append(f"{name} at {size_name(rows)} (exit {rc})")
                print(f"!! {name} at {size_name(rows)} failed (exit {rc})", flush=True)
    if failed:
        print("\nfailed: " + "; ".join(failed), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
