"""Turn the suite's JSON lines into the Markdown tables of BENCHMARKS.md.

    .venv/bin/python bench/report.py [FILE ...]      # default: bench/results/latest.jsonl

One table per stage, a row per (case, size): figure, floor, ratio, peak memory of the stage and of its
floor, the in-memory size of the stage's data and peak/data. The files are read in the order given; when a
(stage, case, size) was measured more than once, the last measurement is shown.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import size_name
from run import DEFAULT_OUT, STAGES


def _s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f} s" if x < 1 else f"{x:.1f} s" if x < 100 else f"{x:.0f} s"


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{max(x, 0):.0f}"


def tables(lines: list[dict]) -> str:
    last: dict[tuple[str, str, int], dict] = {}
    for r in lines:
        last[(r["stage"], r["case"], r["rows"])] = r
    order = {s: i for i, s in enumerate(STAGES)}
    out: list[str] = []
    machines = sorted({r["machine"] for r in last.values()})
    out.append(f"Machine: {'; '.join(machines)}.\n")
    for stage in sorted({k[0] for k in last}, key=lambda s: (order.get(s, 99), s)):
        out.append(f"### {stage}\n")
        out.append("| case | rows | figure | floor | ratio | peak MiB | floor peak MiB | data MiB | peak / data "
                   "| notes |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        rows = sorted((r for k, r in last.items() if k[0] == stage), key=lambda r: (r["case"], r["rows"]))
        for r in rows:
            ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
            per = f"{r['figure_peak_mib'] / r['data_mib']:.1f}x" if r.get("data_mib") else "-"
            work = f" ({r['work_rows']:,} processed)" if r.get("work_rows") and r["work_rows"] != r["rows"] else ""
            notes = (r.get("notes") or "").replace("|", "/")
            out.append(f"| {r['case']} | {size_name(r['rows'])}{work} | {_s(r['figure_s'])} | {_s(r['floor_s'])} | "
                       f"{ratio} | {_mib(r['figure_peak_mib'])} | {_mib(r.get('floor_peak_mib'))} | "
                       f"{_mib(r.get('data_mib'))} | {per} | {notes} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    """The tables of one or more result files, read in order (a later line of a case replaces an earlier one)."""
    paths = [Path(a) for a in argv] or [DEFAULT_OUT]
    lines = [json.loads(x) for path in paths for x in path.read_text().splitlines() if x.strip()]
    print(tables(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
