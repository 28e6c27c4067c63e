"""Render the dashboard's loop panels from a real Prometheus scrape into docs/screenshots/dashboard-loop.png.

``make dashboard-screenshot`` (or ``.venv/bin/python deploy/dashboard_screenshot.py [--out PNG]``) runs, on this
machine and in a temporary closedloop home:

1. a small generated world (a covariate and concept drift from ``--drift-day``), whose days end yesterday: a
   champion trained, gated and promoted through the package's stages;
2. the Airflow plugin's app (``plugins/model_health.py``, its ``/closedloop/metrics`` route with a scrape token)
   under uvicorn, and Debian's ``prometheus`` (``make prometheus``) scraping it every 2 s with
   ``deploy/prometheus/prometheus.yml``'s loop job and evaluating ``rules.yml``;
3. the loop, advanced while Prometheus watches: each 2-day window is ingested, scored and measured (Evidently,
   CBPE) as the DAGs would; a drift decision retrains and, if the gate agrees, promotes a new champion;
   yesterday's delivery is refused by validation and quarantined (labels due after today are withheld: they
   have not arrived);
4. every loop panel of ``deploy/grafana/dashboards/closedloop-serve.json``: its own PromQL, asked of that
   Prometheus with ``/api/v1/query_range`` and drawn with matplotlib in the dashboard's layout, with the alerts
   Prometheus holds at the end.

Grafana has no Debian package: this draws the panels' queries, not Grafana itself. The x axis is the wall clock
of the run (minutes), each step of the loop a simulated day or two. About 3-5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "closedloop-serve.json"
LOOP_PANELS = range(10, 18)  # the dashboard's loop panels (ids); 1-9 are closedloop serve's
SCRAPE = 2  # seconds


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plugin_app():
    """The plugin's FastAPI app, mounted under /closedloop as Airflow's API server mounts it."""
    from fastapi import FastAPI

    spec = importlib.util.spec_from_file_location("closedloop_plugin", REPO / "plugins" / "model_health.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = FastAPI()
    root.mount(module.URL_PREFIX, module.build_app())
    return root


@contextlib.contextmanager
def _uvicorn(app):
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextlib.contextmanager
def _prometheus(work: Path, target: str, token_file: Path):
    """Debian's prometheus with deploy/prometheus/prometheus.yml's loop job pointed at ``target``."""
    import httpx
    import yaml

    binary = shutil.which("prometheus")
    if binary is None:
        sys.exit("prometheus is not on the PATH: `make prometheus` installs Debian's package")
    config = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=f"{SCRAPE}s", evaluation_interval=f"{SCRAPE}s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "closedloop-loop"]
    job.update(scrape_interval=f"{SCRAPE}s", scrape_timeout=f"{SCRAPE}s",
               static_configs=[{"targets": [target]}])
    job["authorization"]["credentials_file"] = str(token_file)
    config["scrape_configs"] = [job]
    shutil.copy(REPO / "deploy" / "prometheus" / "rules.yml", work / "rules.yml")
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=30)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("prometheus did not start")
            time.sleep(0.5)
        yield api
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _run_loop(rt, start: date, days: int, drift_day: date, say) -> None:
    """The loop's stages as its DAGs call them, window by window, with pauses for Prometheus to scrape."""
    from closedloop.core.errors import DataValidationError
    from closedloop.core.runconf import Window
    from closedloop.devtools.generate import make_bad
    from closedloop.stages import retraining as stages
    from closedloop.stages.ingest import ingest_partition
    from closedloop.stages.monitoring import measure_window
    from closedloop.stages.scoring import score_day

    def pause(seconds: float = 3 * SCRAPE) -> None:
        time.sleep(seconds)

    def retrain(window: Window) -> None:
        stages.validate(rt, window)
        stages.materialise(rt, window)
        ts = stages.build_training_set(rt, window)
        trained = stages.train(rt, ts, {"dag_run_id": "screenshot"})
        registered = stages.register(rt, trained, window)
        outcome = stages.promote_or_reject(rt, stages.evaluate_gate(rt, registered, ts))
        say(f"retraining on {window.start}..{window.end}: version {registered['version']} {outcome['action']}")

    retrain(Window(start + timedelta(days=2), start + timedelta(days=16)))
    pause()
    end = start + timedelta(days=days - 1)  # yesterday: its delivery is refused (below)
    day = start + timedelta(days=16)
    while day < end:
        window = Window(day, min(day + timedelta(days=2), end))
        stages.validate(rt, window)
        for d in (window.start, window.start + timedelta(days=1)):
            score_day(rt, d)
        measured = measure_window(rt, window, dag_run_id="screenshot")
        decision = measured["decision"]
        say(f"window {window.start}..{window.end}: drift share {measured['figures']['drift_share']:.2f}, "
            f"{'drift: retrain' if decision['drift'] else 'no drift'}")
        pause()
        if decision["drift"] and window.start >= drift_day:
            retrain(Window(window.end - timedelta(days=14), window.end))
            pause()
        day = window.end
    # yesterday's delivery, refused by validation (keys nulled) and quarantined by ingest
    landing = rt.lake.partition("landing", "transactions", end)
    rt.lake.write_parquet(make_bad(rt.lake.read_parquet(landing), "null_key", rt.contract, seed=1), landing)
    with contextlib.suppress(DataValidationError):
        ingest_partition(rt.lake, rt.contract, "transactions", end)
    say(f"transactions of {end} quarantined")
    pause(4 * SCRAPE)


def _render(api, t0: float, t1: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["id"] in LOOP_PANELS]
    top = min(p["gridPos"]["y"] for p in panels)
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) - top
    alerts = api.get("/alerts").json()["data"]["alerts"]
    fig = plt.figure(figsize=(18, 2.2 + rows * 0.42))
    grid = fig.add_gridspec(rows + 3, 24, hspace=5, wspace=1.6)
    fig.suptitle(f"{dashboard['title']}: the loop's panels, from a real Prometheus scrape "
                 f"({datetime.fromtimestamp(t0, UTC):%Y-%m-%d %H:%M}-{datetime.fromtimestamp(t1, UTC):%H:%M} UTC)",
                 fontsize=13, fontweight="bold")
    for p in panels:
        g = p["gridPos"]
        ax = fig.add_subplot(grid[g["y"] - top:g["y"] - top + g["h"], g["x"]:g["x"] + g["w"]])
        ax.set_title(p["title"], fontsize=10, loc="left")
        unit = p["fieldConfig"]["defaults"].get("unit")
        lines = []
        for t in p["targets"]:
            answer = api.get("/query_range", params={"query": t["expr"], "start": t0, "end": t1,
                                                     "step": f"{SCRAPE}s"}).json()
            for series in answer["data"]["result"]:
                label = t.get("legendFormat", "")
                for k, v in series["metric"].items():
                    label = label.replace("{{" + k + "}}", v)
                xs = [(float(ts) - t0) / 60 for ts, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                lines.append((label.strip(), xs, ys))
        if p["type"] == "stat":
            ax.axis("off")
            mappings = (p["fieldConfig"]["defaults"].get("mappings") or [{}])[0].get("options", {})
            for i, (label, _, ys) in enumerate(lines):
                last = ys[-1]
                text = mappings.get(str(int(last)), {}).get("text") if mappings else None
                shown = text or (f"{last:.0%}" if unit == "percentunit" else f"{last:g}")
                ax.text(0.02, 0.78 - i * 0.34, shown, fontsize=20, fontweight="bold", transform=ax.transAxes,
                        color="#b00020" if text == "retrain" else "#1b5e20")
                ax.text(0.02, 0.66 - i * 0.34, label, fontsize=8, color="#555", transform=ax.transAxes)
            if not lines:
                ax.text(0.02, 0.7, "no data", fontsize=14, color="#777", transform=ax.transAxes)
            continue
        for label, xs, ys in lines:
            ax.step(xs, ys, where="post", label=label, linestyle="--" if "band" in label or "threshold" in label
                    else "-")
        ax.set_xlabel("minutes into the run (each step: a day or two of the loop)", fontsize=8)
        ax.set_ylabel({"percentunit": "share", "h": "hours"}.get(unit, p["title"].split(":")[0]), fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7, loc="best")
    ax = fig.add_subplot(grid[rows:, :])
    ax.axis("off")
    listed = sorted({(a["labels"]["alertname"], a["state"], a["labels"].get("kind", "")) for a in alerts})
    text = "; ".join(f"{n}{f' ({k})' if k else ''}: {s}" for n, s, k in listed) or "none"
    ax.text(0, 0.6, f"Alerts Prometheus holds at the end (rules.yml; a 'pending' one waits for its for:): {text}",
            fontsize=9, wrap=True, transform=ax.transAxes)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots" / "dashboard-loop.png")
    parser.add_argument("--days", type=int, default=32, help="generated days, ending yesterday")
    parser.add_argument("--drift-day", type=int, default=24, help="the day (from the first) the drift starts")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="closedloop-dashboard-"))
    os.environ["CLOSEDLOOP_HOME"] = str(work / "closedloop")
    os.environ.setdefault("AIRFLOW_HOME", str(work / "airflow"))
    os.environ["AIRFLOW__CLOSEDLOOP__METRICS_TOKEN"] = token = "screenshot-scrape-token"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from closedloop.devtools.generate import GeneratorConfig, generate
    from closedloop.stages.runtime import Runtime

    start = datetime.now(UTC).date() - timedelta(days=args.days)
    drift_day = start + timedelta(days=args.drift_day)
    rt = Runtime.from_env()
    generate(GeneratorConfig(start=start, days=args.days, customers=300, transactions_per_day=700, seed=23,
                             fraud_rate=0.03, covariate_drift=1.5, concept_drift=1.0, new_categories=True,
                             drift_start=drift_day),
             rt.lake, rt.contract)
    today = datetime.now(UTC).date()
    for day in rt.lake.list_days("landing", "labels"):  # labels of the last days arrive after today: not yet
        if day >= today:
            rt.lake.delete(rt.lake.partition("landing", "labels", day))
    (work / "token").write_text(token + "\n")
    try:
        with _uvicorn(_plugin_app()) as port, _prometheus(work, f"127.0.0.1:{port}", work / "token") as api:
            t0 = time.time()
            _run_loop(rt, start, args.days, drift_day, lambda s: print(s, flush=True))
            _render(api, t0, time.time(), args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
