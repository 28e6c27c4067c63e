"""What a late day costs: its ingest time as a ratio to a normal day's, measured in the same run.

A generated world of ``--days`` days (``--per-day`` transactions a day, ``--customers`` customers, the card
contract: a 30-day lookback) is ingested in day order, except two days held back:

- the newest day, ingested last: a normal daily ingest (validation, curation, the id check, its feature rows
  over a 30-day history);
- day ``--late`` (default: the 3rd), landed after every later day was curated: its ingest also recomputes,
  for its own customers, the feature rows of every later day its lookback reaches (30 days here, the worst
  case) and rewrites them.

Each of the two is timed ``--repeat`` times on copies of the same lake, the late one right after the normal
one (the ratio of each pair, and of the medians, is printed: on a shared machine a pair sees the same load).
Then the recomputed rows are checked against in-order ingest (the figure is worthless if they differ). Usage::

    .venv/bin/python bench/late_day.py [--days 36] [--per-day 20000] [--customers 20000] [--repeat 3]

Prints the two times, their ratio and the rows checked.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main(argv: list[str] | None = None) -> int:
    import logging

    from support.corruption import differences

    from closedloop.core.lake import Lake
    from closedloop.core.schema import load_contract
    from closedloop.devtools.generate import GeneratorConfig, generate
    from closedloop.stages.ingest import ingest_partition

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", type=int, default=36)
    p.add_argument("--per-day", type=int, default=20_000)
    p.add_argument("--customers", type=int, default=20_000)
    p.add_argument("--late", type=int, default=2, help="the late day's index (0: the first day)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)

    contract = load_contract(REPO / "models" / "card_fraud" / "schema.yaml")
    start = date(2026, 1, 1)
    late, newest = start + timedelta(days=args.late), start + timedelta(days=args.days - 1)
    with tempfile.TemporaryDirectory(prefix="late-day-") as tmp:
        base = Path(tmp) / "base"
        lake = Lake(f"file://{base}")
        t0 = time.perf_counter()
        generate(GeneratorConfig(start=start, days=args.days, customers=args.customers,
                                 transactions_per_day=args.per_day, seed=args.seed), lake, contract)
        held = {}
        for d in (late, newest):
            uri = lake.partition("landing", "transactions", d)
            held[d] = lake.read_bytes(uri)
            lake.delete(uri)
        for d in lake.list_days("landing", "transactions"):
            ingest_partition(lake, contract, "transactions", d)
        rows = sum(len(lake.read_parquet(lake.partition("curated", "transactions", d), columns=[contract.row_key]))
                   for d in lake.list_days("curated", "transactions"))
        print(f"world: {args.days} days, {rows} transactions curated without the two held back, "
              f"{args.customers} customers, lookback {contract.lookback.days} days ({time.perf_counter() - t0:.0f} s)")

        def timed(day: date, copy: Path, before: list[date]) -> tuple[float, object, Lake]:
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(base, copy)
            lk = Lake(f"file://{copy}")
            for d in before:
                lk.write_bytes(lk.partition("landing", "transactions", d), held[d])
                ingest_partition(lk, contract, "transactions", d)
            lk.write_bytes(lk.partition("landing", "transactions", day), held[day])
            t = time.perf_counter()
            out = ingest_partition(lk, contract, "transactions", day)
            return time.perf_counter() - t, out, lk

        normal_s, late_s = [], []
        for i in range(args.repeat):
            normal_s.append(timed(newest, Path(tmp) / "normal", [late])[0])
            secs, out, treated = timed(late, Path(tmp) / "late", [newest])
            late_s.append(secs)
            print(f"  run {i + 1}: normal day {normal_s[-1]:.2f} s, late day {late_s[-1]:.2f} s "
                  f"({len(out.recomputed)} later days recomputed)", flush=True)

        # the figure counts only if the late lake is the in-order lake: every day's rows computed in day order,
        # the late day in its place
        from closedloop.stages.ingest import write_entity_features

        control = Lake(f"file://{Path(tmp) / 'ordered'}")
        shutil.copytree(base, Path(tmp) / "ordered")
        for d in sorted({*control.list_days("curated", "transactions"), *held}):
            if d in held:
                control.write_bytes(control.partition("landing", "transactions", d), held[d])
                ingest_partition(control, contract, "transactions", d)
            else:
                frame = control.read_parquet(control.partition("curated", "transactions", d))
                write_entity_features(control, contract, d, frame)
        days = sorted({*treated.list_days("curated", contract.feature_view)})
        a = control.read_parquet_many([control.partition("curated", contract.feature_view, d) for d in days])
        b = treated.read_parquet_many([treated.partition("curated", contract.feature_view, d) for d in days])
        bad, compared, examples = differences(a, b, [contract.entity, contract.event_timestamp])

    n, lt = statistics.median(normal_s), statistics.median(late_s)
    ratios = [b / a for a, b in zip(normal_s, late_s, strict=True)]
    print(f"normal day: {n:.2f} s (median of {args.repeat}); late day: {lt:.2f} s; ratio of the medians "
          f"{lt / n:.2f}; ratio run by run (each pair back to back) {', '.join(f'{r:.2f}' for r in ratios)}, "
          f"median {statistics.median(ratios):.2f}")
    print(f"feature rows checked against in-order ingest: {compared}, differing: {bad} {examples if bad else ''}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
