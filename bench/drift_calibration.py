"""The calibrated drift decision against the fixed policy on the structured generator: the three-seed table.

``python bench/drift_calibration.py [--seeds 11 12 13] [--scenarios none covariate concept demo]
[--records out.json]`` builds, per seed, the world of ``tests/data/test_drift_calibration.py`` (the same
functions: 400 customers, 2500 transactions a day, day factor and cycles on, 30 warm-up days, a 28-day
training window, 20 two-day windows sliding by one day after it), judges every scenario's 20 windows with
the fixed policy and the calibrated one, and prints the Markdown table of docs/explanation/DRIFT.md (alarms out of 20
per seed). ``--records`` writes every window's figures and decisions as JSON. About a minute per seed and
scenario on two shared cores; the suite asserts the targets on a cheaper configuration.

Scenarios: ``none`` (stable), ``covariate`` (covariate_drift=0.5) and ``concept`` (concept_drift=1.0), the
strong scenarios of tests/data/test_drift_statistics.py (20/20 there on independent days), and ``demo``
(the demo's drifted regime: covariate_drift=0.6, concept_drift=1.0, new categories).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _suite_world() -> Any:
    spec = importlib.util.spec_from_file_location("drift_calibration_world",
                                                  ROOT / "tests" / "data" / "test_drift_calibration.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    parser.add_argument("--scenarios", nargs="+", default=["none", "covariate", "concept", "demo"])
    parser.add_argument("--records", type=Path, help="write every window's figures and decisions here (JSON)")
    parser.add_argument("--customers", type=int, default=400, help="the suite's test uses a smaller world")
    parser.add_argument("--per-day", type=int, default=2500, help="transactions a day")
    parser.add_argument("--structure", type=float, default=1.0, help="the generator's structure (1: its default)")
    args = parser.parse_args(argv)
    w = _suite_world()
    w.CUSTOMERS, w.PER_DAY, w.STRUCTURE = args.customers, args.per_day, args.structure
    records: list[dict[str, Any]] = []
    table: dict[tuple[str, int], tuple[int, int]] = {}
    for seed in args.seeds:
        started = time.perf_counter()
        world = w.world(seed)
        print(f"seed {seed}: world in {time.perf_counter() - started:.0f} s; {world.calibration.why}", flush=True)
        for scenario in args.scenarios:
            started = time.perf_counter()
            v = w.verdicts(world, scenario)
            fixed, cal = w.alarms(v["fixed"]), w.alarms(v["calibrated"])
            table[(scenario, seed)] = (fixed, cal)
            print(f"seed {seed} {scenario}: fixed {fixed}/20, calibrated {cal}/20 "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
            for i, (f, c) in enumerate(zip(v["fixed"], v["calibrated"], strict=True)):
                records.append({"seed": seed, "scenario": scenario, "window": i, "fixed": f.to_dict(),
                                "calibrated": c.to_dict(), "figures": v["figures"][i]})
        records.append({"seed": seed, "calibration": world.calibration.to_dict()})
    if args.records:
        args.records.write_text(json.dumps(records, default=str))
    print("\n| scenario | fixed policy | calibrated |\n|---|---|---|")
    for scenario in args.scenarios:
        cells = [table[(scenario, s)] for s in args.seeds if (scenario, s) in table]
        print(f"| {w.SCENARIO_NAMES.get(scenario, scenario)} | {' / '.join(str(c[0]) for c in cells)} | "
              f"{' / '.join(str(c[1]) for c in cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
