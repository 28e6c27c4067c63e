"""Load benchmark of online scoring: ``closedloop serve`` in one process, the load from this one, on loopback.

Builds a small world in a temporary ``CLOSEDLOOP_HOME`` (generated data, a champion trained through the
retraining stages, the window materialised into the online store), then, for each online store (Feast's
SQLite file, and Redis at ``--redis``, a dedicated database number that must be empty and is flushed at
the end), starts ``closedloop serve`` as a child process (its own process group, a free loopback port,
a bearer token) and sends it requests of 1 and of 100 transactions, one at a time from one client with
keep-alive (closed loop: latency, not queueing), bounded by ``--requests`` and ``--seconds`` per case. The
client is :class:`RawClient` (a socket, the request bytes built before the clock: the load generator's own
CPU out of the latency, as with a load generator in C); the one-transaction case is also sent through
``httpx``, whose own cost per request the table shows beside it.
Reports p50/p99 latency, requests/s and transactions/s as a Markdown table (BENCHMARKS.md quotes it).
Also, per online store: the in-process floor of one transaction (Feast's online read of its customer and
``inplace_predict`` on its matrix, in this process, one after the other), the one-transaction case's
ratios to it (p50, p99, and the server's CPU time per request against the floor's: the figure a loaded
machine distorts least), and the throughput of 16 and 64 concurrent clients (``--clients``).

    .venv/bin/python bench/serve_load.py [--requests 2000] [--seconds 20] [--redis redis://127.0.0.1:6379/13]
                                         [--stores sqlite,redis] [--profile /tmp/serve.prof]

``--profile`` runs the server under cProfile and writes ``<PROFILE>.<store>`` when it stops (read it with
``pstats``); its latencies and CPU are then the profiler's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START = date(2026, 3, 1)


# the server under cProfile: uvicorn re-raises the SIGTERM it handled once it has shut down (the process
# would die before the profile is written), so here that last step is skipped and the profile written
PROFILED = """
import cProfile, runpy, signal, sys
out, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
signal.raise_signal = lambda sig: None
profile = cProfile.Profile()
profile.enable()
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit:
    pass
finally:
    profile.disable()
    profile.dump_stats(out)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_world(home: Path) -> list[dict]:
    """Generate, train and promote a champion in ``home``; returns request rows of the day after the window."""
    os.environ["CLOSEDLOOP_HOME"] = str(home)
    os.environ.setdefault("CLOSEDLOOP_DEVICE", "cpu")
    import pandas as pd

    from closedloop.core.runconf import Window
    from closedloop.devtools.generate import GeneratorConfig, generate
    from closedloop.stages import retraining as stages
    from closedloop.stages.registry import promote
    from closedloop.stages.runtime import Runtime

    window = Window(START + timedelta(days=2), START + timedelta(days=16))
    rt = Runtime.from_env()
    generate(GeneratorConfig(start=START, days=17, customers=1000, transactions_per_day=1500, seed=3), rt.lake,
             rt.contract)
    stages.validate(rt, window)
    stages.materialise(rt, window)
    ts = stages.build_training_set(rt, window)
    reg = stages.register(rt, stages.train(rt, ts, {"dag_run_id": "bench"}), window)
    promote(rt.client, rt.settings, rt.model_name, reg["version"], expected_champion=None, reason="bench",
            actor="bench")
    live = rt.lake.read_parquet(rt.lake.partition("landing", "transactions", window.end))
    c = rt.contract
    known = rt.store.get_online_features(features=rt.defs.service, entity_rows=[
        {c.entity: int(e)} for e in live[c.entity].unique()]).to_df()
    known = set(known.dropna(subset=c.entity_features, how="all")[c.entity])
    live = live[live[c.entity].isin(known)]  # new customers would get 404: not what is measured here
    rows = []
    for rec in live[[c.row_key, c.entity, c.event_timestamp, *c.transaction_features]].to_dict("records"):
        tx = {k: (None if pd.isna(v) else (v.item() if hasattr(v, "item") else v)) for k, v in rec.items()}
        tx[c.event_timestamp] = pd.Timestamp(rec[c.event_timestamp]).isoformat()
        rows.append(tx)
    return rows


def materialise_redis(home: Path, url: str) -> None:
    from closedloop.core.settings import Settings
    from closedloop.stages.features import feature_store, materialize_window
    from closedloop.stages.runtime import Runtime

    rt = Runtime(Settings.from_env({**os.environ, "CLOSEDLOOP_HOME": str(home), "CLOSEDLOOP_ONLINE_STORE": "redis",
                                    "CLOSEDLOOP_REDIS_URL": url}))
    store = feature_store(rt.settings)
    materialize_window(store, rt.defs, START + timedelta(days=2), START + timedelta(days=16), 1)


class ServeProcess:
    """``closedloop serve`` in a child process group, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, env: dict[str, str], log: Path, profile: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        command = [str(Path(sys.executable).parent / "closedloop"), "serve", "--host", "127.0.0.1",
                   "--port", str(self.port)]
        if profile:  # the server under cProfile (written when it stops): where its CPU per request goes
            command = [sys.executable, "-c", PROFILED, profile, *command]
        self.proc = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = Path(self.log.name).read_text()[-3000:]
                raise RuntimeError(f"closedloop serve exited with {self.proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"closedloop serve not ready after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RawClient:
    """A minimal HTTP/1.1 client on one keep-alive socket: the request's head built once, the answer read by
    its ``Content-Length``. The load generator's own cost per request (about 0.05 ms of CPU) stays out of
    the server's latency, as with a load generator in C; ``httpx`` costs about ten times that (the
    ``client CPU`` column)."""

    def __init__(self, url: str, token: str):
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.answers = self.sock.makefile("rb")
        self.head = request_head(host, port, token)

    def post(self, body: bytes) -> tuple[int, bytes]:
        self.sock.sendall(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        lines = []
        while (line := self.answers.readline()) not in (b"\r\n", b""):  # up to the blank line
            lines.append(line)
        status, length = parse_head(b"".join(lines))
        return status, self.answers.read(length)

    def close(self) -> None:
        self.answers.close()
        self.sock.close()


def request_head(host: str, port: str, token: str) -> bytes:
    """A ``POST /score`` request's head up to its ``Content-Length`` value."""
    return (f"POST /score HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: ").encode()


def parse_head(head: bytes) -> tuple[int, int]:
    """(status, content length) of an answer's head (its status line and headers)."""
    if not head:
        raise ConnectionError("the server closed the connection")
    lines = head.split(b"\r\n")
    length = next((int(v) for k, _, v in (line.partition(b":") for line in lines[1:])
                   if k.lower() == b"content-length"), 0)
    return int(lines[0].split()[1]), length


def request_bodies(rows: list[dict], batch: int) -> list[bytes]:
    """The JSON bodies of requests of ``batch`` transactions, built before any clock."""
    return [json.dumps({"transactions": rows[start:start + batch]}).encode()
            for start in range(0, len(rows) - batch + 1, batch if batch > 1 else 1)]


def run_case(url: str, token: str, rows: list[dict], batch: int, max_requests: int, seconds: float,
             pid: int | None = None, client: str = "raw") -> dict:
    """Requests of ``batch`` transactions, one after the other, for at most ``max_requests`` or ``seconds``;
    ``client``: ``raw`` (:class:`RawClient`) or ``httpx``."""
    import httpx
    import numpy as np

    bodies = request_bodies(rows, batch)
    if client == "raw":
        raw = RawClient(url, token)
        post, close = raw.post, raw.close
    else:
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}",
                                                   "Content-Type": "application/json"}, timeout=30)

        def post(body: bytes) -> tuple[int, bytes]:
            r = http.post("/score", content=body)
            return r.status_code, r.content

        close = http.close
    lat = []
    try:
        for i in range(20):  # warm-up, not counted
            post(bodies[i % len(bodies)])
        t0, own0 = time.perf_counter(), time.process_time()
        cpu0 = cpu_seconds(pid) if pid else None
        i = 0
        while i < max_requests and time.perf_counter() - t0 < seconds:
            s = time.perf_counter()
            status, body = post(bodies[i % len(bodies)])
            lat.append(time.perf_counter() - s)
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
            i += 1
        wall = time.perf_counter() - t0
        cpu = (cpu_seconds(pid) - cpu0) / len(lat) * 1000 if pid else None
        own = (time.process_time() - own0) / len(lat) * 1000
    finally:
        close()
    ms = np.array(lat) * 1000
    return {"batch": batch, "client": client, "requests": len(lat), "seconds": round(wall, 1),
            "server_cpu_ms": cpu and round(cpu, 2), "client_cpu_ms": round(own, 3),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "requests_per_s": round(len(lat) / wall, 1), "transactions_per_s": round(len(lat) * batch / wall, 1)}


def in_process_floor(home: Path, store_name: str, redis_url: str, rows: list[dict], max_requests: int,
                     seconds: float) -> dict:
    """The floor of one transaction, in this process: Feast's online read of its customer (the same feature
    service and store as the server) and ``inplace_predict`` of the champion on its matrix, nothing else
    (no HTTP, no validation, no log), one after the other as the one-client case sends them."""
    import numpy as np

    from closedloop.core.settings import Settings
    from closedloop.stages.features import feature_store
    from closedloop.stages.model import _declared_index
    from closedloop.stages.registry import CHAMPION, alias_version, load_booster
    from closedloop.stages.runtime import Runtime
    from closedloop.stages.scoring import version_info

    env = {**os.environ, "CLOSEDLOOP_HOME": str(home)}
    if store_name == "redis":
        env.update({"CLOSEDLOOP_ONLINE_STORE": "redis", "CLOSEDLOOP_REDIS_URL": redis_url})
    rt = Runtime(Settings.from_env(env))
    c = rt.contract
    store = feature_store(rt.settings)
    booster = load_booster(version_info(rt.client, rt.model_name, alias_version(rt.client, rt.model_name,
                                                                                 CHAMPION))["model_uri"])
    booster.set_param({"nthread": 1})
    entity_features = list(c.entity_features)
    index = {n: _declared_index(tuple(c.categorical[n])) for n in c.categorical}

    def one(tx: dict) -> float:
        got = store.get_online_features(features=rt.defs.service, entity_rows=[{c.entity: tx[c.entity]}]).to_dict()
        x = np.empty((1, len(c.model_features)), dtype=np.float32)
        for j, name in enumerate(c.model_features):
            v = got[name][0] if name in entity_features else (
                index[name].get(tx[name]) if name in index else tx[name])
            x[0, j] = np.nan if v is None else v
        return float(booster.inplace_predict(x)[0])

    for i in range(20):
        one(rows[i % len(rows)])
    lat = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    while len(lat) < max_requests and time.perf_counter() - t0 < seconds:
        s = time.perf_counter()
        one(rows[len(lat) % len(rows)])
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    cpu = (time.process_time() - cpu0) / len(lat) * 1000
    ms = np.array(lat) * 1000
    return {"store": store_name, "batch": 1, "clients": "floor (in process)", "client": "-", "requests": len(lat),
            "seconds": round(wall, 1), "server_cpu_ms": round(cpu, 2), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "requests_per_s": round(len(lat) / wall, 1),
            "transactions_per_s": round(len(lat) / wall, 1)}


def run_concurrent(url: str, token: str, rows: list[dict], clients: int, seconds: float) -> dict:
    """``clients`` concurrent clients (asyncio streams, one keep-alive connection each, requests written as
    :class:`RawClient` writes them) sending one-transaction requests back to back for ``seconds``:
    throughput, and latency under that load."""
    import asyncio

    import numpy as np

    bodies = request_bodies(rows, 1)
    host, port = url.removeprefix("http://").split(":")
    head = request_head(host, port, token)

    async def go() -> tuple[list[float], float]:
        lat: list[float] = []

        async def client(k: int, until: float, record: bool) -> None:
            reader, writer = await asyncio.open_connection(host, int(port))
            i = k
            try:
                while time.perf_counter() < until:
                    s = time.perf_counter()
                    body = bodies[i % len(bodies)]
                    writer.write(head + str(len(body)).encode() + b"\r\n\r\n" + body)
                    status, length = parse_head(await reader.readuntil(b"\r\n\r\n"))
                    await reader.readexactly(length)
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}")
                    if record:
                        lat.append(time.perf_counter() - s)
                    i += clients
            finally:
                writer.close()

        await asyncio.gather(*(client(k, time.perf_counter() + 1.0, False) for k in range(clients)))  # warm-up
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k, t0 + seconds, True) for k in range(clients)))
        return lat, time.perf_counter() - t0

    lat, wall = asyncio.run(go())
    ms = np.array(lat) * 1000
    return {"batch": 1, "clients": clients, "requests": len(lat), "seconds": round(wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "requests_per_s": round(len(lat) / wall, 1), "transactions_per_s": round(len(lat) / wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="at most this many requests per case")
    ap.add_argument("--seconds", type=float, default=20.0, help="at most this long per case")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/13", help="a dedicated, empty Redis database")
    ap.add_argument("--stores", default="sqlite,redis")
    ap.add_argument("--clients", default="16,64", help="concurrent clients of the throughput cases (one-transaction "
                                                         "requests); empty: none")
    ap.add_argument("--profile", default="", help="run the server under cProfile and write its profile to "
                    "PROFILE.<store> (the figures are then the profiler's, not the server's)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="closedloop-serve-bench-"))
    home = tmp / "home"
    t = time.perf_counter()
    rows = build_world(home)
    print(f"world built in {time.perf_counter() - t:.0f} s ({len(rows)} live transactions)", file=sys.stderr)
    token = secrets.token_hex(16)
    results = []
    redis_client = None
    try:
        for store in args.stores.split(","):
            env = {**os.environ, "CLOSEDLOOP_HOME": str(home), "CLOSEDLOOP_SERVE_TOKEN": token}
            if store == "redis":
                import redis

                redis_client = redis.Redis.from_url(args.redis)
                if redis_client.dbsize():
                    raise SystemExit(f"{args.redis} is not empty: give a dedicated database (--redis .../<db>)")
                materialise_redis(home, args.redis)
                env.update({"CLOSEDLOOP_ONLINE_STORE": "redis", "CLOSEDLOOP_REDIS_URL": args.redis})
            floor = in_process_floor(home, store, args.redis, rows, args.requests, args.seconds)
            print(json.dumps(floor), file=sys.stderr)
            server = ServeProcess(env, tmp / f"serve-{store}.log",  # its log goes with the temporary home
                                  f"{args.profile}.{store}" if args.profile else None)
            try:
                server.wait_ready()
                cases = [(1, "raw"), (1, "httpx"), (100, "raw")]
                for batch, client in cases:
                    res = {"store": store, "clients": 1, **run_case(server.url, token, rows, batch, args.requests,
                                                                     args.seconds, server.proc.pid, client)}
                    if batch == 1:
                        res["vs_floor_p50"] = round(res["p50_ms"] / floor["p50_ms"], 2)
                        res["vs_floor_p99"] = round(res["p99_ms"] / floor["p99_ms"], 2)
                        res["vs_floor_cpu"] = round(res["server_cpu_ms"] / floor["server_cpu_ms"], 2)
                    print(json.dumps(res), file=sys.stderr)
                    results.append(res)
                results.append(floor)
                for clients in [int(k) for k in args.clients.split(",") if k.strip()]:
                    res = {"store": store, **run_concurrent(server.url, token, rows, clients, args.seconds)}
                    print(json.dumps(res), file=sys.stderr)
                    results.append(res)
            finally:
                server.stop()
    finally:
        if redis_client is not None:
            redis_client.flushdb()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{args.requests} requests or {args.seconds:.0f} s per case, one client, keep-alive, loopback.\n")
    print("| online store | transactions per request | clients | client | requests | p50 latency | p99 latency "
          "| requests/s | transactions/s | server CPU per request | client CPU per request "
          "| p50 / p99 / CPU vs the floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ratio = (f"{r['vs_floor_p50']}x / {r['vs_floor_p99']}x / {r['vs_floor_cpu']}x" if "vs_floor_p99" in r
                 else "-")
        cpu = f"{r['server_cpu_ms']} ms" if r.get("server_cpu_ms") is not None else "-"
        own = f"{r['client_cpu_ms']} ms" if r.get("client_cpu_ms") is not None else "-"
        print(f"| {r['store']} | {r['batch']} | {r['clients']} | {r.get('client', 'raw')} | {r['requests']} "
              f"| {r['p50_ms']} ms | {r['p99_ms']} ms | {r['requests_per_s']} | {r['transactions_per_s']} | {cpu} "
              f"| {own} | {ratio} |")


if __name__ == "__main__":
    main()
