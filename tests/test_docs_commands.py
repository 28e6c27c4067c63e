"""The docs check: the shell blocks of the README and of every page of ``docs/`` (``DOCS``) work as written.

Each fenced ``bash`` block either runs verbatim (bash -euo pipefail, from the checkout's root, in a fresh
``CLOSEDLOOP_HOME``, with the environment of a user's shell: no Airflow variable, the venv not on the PATH), or
carries one marker on the line just above it:

- ``<!-- docs-check: covered-by tests/<file>.py::<test> (note) -->``: a long block (the demo, a retraining,
  a running Airflow) that a test of the suite already does; the test must exist.
- ``<!-- docs-check: server "<command>" health <url> [expect "<text>"] -->``: a block that starts a server: it
  runs verbatim, the server line in the background, a wait on the health URL right after it, and the whole
  process group is stopped at the end (nothing may be left on the port); its output must hold the expected text.
- ``<!-- docs-check: chain <name> home <path> -->``: a block that writes to a literal home (the bring-your-own-data
  guide's ``CLOSEDLOOP_HOME=/tmp/churn``): every block of the chain runs verbatim, in document order, each in its
  own shell as a user types them one after the other (the later ones use what the earlier ones left there), in
  one test. The home is removed before and after, and the test holds an exclusive lock (``fcntl.flock`` on
  ``<path>.docs-check.lock`` next to it) for the whole chain, so two runs of the check on one machine wait for
  each other instead of mixing their homes. The shells get a ``CLOSEDLOOP_HOME`` that must stay unused: a block
  that stops setting its own home fails, instead of writing elsewhere. All of a chain's blocks name the same
  home.
- ``<!-- docs-check: skip (reason) -->``: cannot run here at all (Docker).

Whatever the marker, every ``closedloop`` and ``airflow`` command of every block that is not skipped is parsed by
the real command line (typer's and Airflow's parsers, nothing executed): a renamed option or subcommand fails here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]
# the README, then getting-started (a new clone follows it verbatim), then every other page of docs/
DOCS = [REPO / "README.md", *(p for p in [REPO / "docs" / "getting-started.md"] if p.exists()),
        *sorted(p for p in (REPO / "docs").rglob("*.md") if p != REPO / "docs" / "getting-started.md")]
MARKER = re.compile(r"^\s*<!-- docs-check: (.*?) -->\s*$")
# a closedloop or airflow command (not `make airflow`, not a path such as .closedloop/airflow/...)
COMMAND = re.compile(r"(?<![\w./-])(?<!make )(?:\.venv/bin/)?(closedloop|airflow)\s+([^|;&)\n#]*)")


@dataclass
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    body: str
    marker: str  # "" when unmarked

    @property
    def kind(self) -> str:
        return self.marker.split(" ", 1)[0] if self.marker else "run"

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() == "```bash":
                indent = len(lines[i]) - len(lines[i].lstrip())
                j = i + 1
                while lines[j].strip() != "```":
                    j += 1
                body = "\n".join(line[indent:] for line in lines[i + 1:j])
                k = i - 1
                while k >= 0 and not lines[k].strip():
                    k -= 1
                m = MARKER.match(lines[k]) if k >= 0 else None
                found.append(Block(str(doc.relative_to(REPO)), i + 1, body, m.group(1).strip() if m else ""))
                i = j
            i += 1
    return found


BLOCKS = blocks()


def test_every_shell_block_runs_or_says_which_test_covers_it():
    assert len(BLOCKS) >= 10, [str(b) for b in BLOCKS]
    for b in BLOCKS:
        assert b.kind in {"run", "covered-by", "server", "chain", "skip"}, \
            f"{b}: unknown docs-check marker {b.marker!r}"
        if b.kind == "covered-by":
            target = b.marker.split()[1]
            path, _, test = target.partition("::")
            assert (REPO / path).is_file(), f"{b}: {path} does not exist"
            assert re.search(rf"^def {re.escape(test)}\(", (REPO / path).read_text(), re.M), \
                f"{b}: {path} has no test {test}"
        if b.kind == "skip":
            assert re.fullmatch(r"skip \(.+\)", b.marker), f"{b}: a skip says why, in parentheses"
        if b.kind == "server":
            assert re.fullmatch(r'server "[^"]+" health https?://\S+( expect "[^"]+")?', b.marker), b.marker
        if b.kind == "chain":
            assert re.fullmatch(r"chain [\w-]+ home /\S+", b.marker), f"{b}: chain <name> home <absolute path>"
    for name, chain in CHAINS.items():
        assert len({b.marker for b in chain}) == 1, f"chain {name}: its blocks name different homes"


def _commands(block: Block) -> list[tuple[str, list[str]]]:
    text = block.body.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        for m in COMMAND.finditer(_uncommented(line)):
            out.append((m.group(1), shlex.split(m.group(2), comments=True)))
    return out


def _uncommented(line: str) -> str:
    """The line without its trailing shell comment (a `#` outside quotes)."""
    for at in (m.start() for m in re.finditer(r"(?:^|\s)#", line)):
        try:
            shlex.split(line[:at])
        except ValueError:  # inside quotes
            continue
        return line[:at]
    return line


def _parse_closedloop(args: list[str]) -> None:
    """Parse (never run) ``closedloop ARGS`` with the CLI's own parser; AssertionError naming what it refused."""
    import typer

    from closedloop.cli import app

    cmd = typer.main.get_command(app)  # typer's own copy of click: duck-typed below
    try:
        ctx = cmd.make_context("closedloop", list(args))
        while hasattr(cmd, "resolve_command"):
            rest = [*ctx._protected_args, *ctx.args]
            if not rest:
                break
            name, sub, rest = cmd.resolve_command(ctx, rest)
            ctx = sub.make_context(name, rest, parent=ctx)
            cmd = sub
    except Exception as exc:
        if not hasattr(exc, "format_message"):
            raise
        raise AssertionError(f"closedloop {shlex.join(args)}: {exc.format_message()}") from None


def _parse_airflow(args: list[str]) -> None:
    from airflow.cli.cli_parser import get_parser

    try:
        get_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"airflow {shlex.join(args)}: refused by Airflow's parser (exit {exc.code})") from None


@pytest.mark.parametrize(("args", "refused"), [
    (["statuss"], "No such command 'statuss'"),
    (["quarantine", "release", "transactions", "2026-03-12", "--reson", "x"], "No such option: --reson"),
    (["rollback"], "Missing option '--reason'"),
])
def test_the_closedloop_parser_refuses_what_the_cli_refuses(args, refused):
    with pytest.raises(AssertionError, match=refused):
        _parse_closedloop(args)


def test_every_cli_command_in_the_docs_parses():
    checked = 0
    for b in BLOCKS:
        if b.kind == "skip":
            continue
        for program, args in _commands(b):
            try:
                _parse_closedloop(args) if program == "closedloop" else _parse_airflow(args)
            except AssertionError as exc:
                pytest.fail(f"{b}: {exc}")
            checked += 1
    assert checked >= 12, checked


CHAINS: dict[str, list[Block]] = {}
for _b in BLOCKS:
    if _b.kind == "chain":
        CHAINS.setdefault(_b.marker.split()[1], []).append(_b)


def _user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CLOSEDLOOP_", "MLFLOW_"))}
    venv = str(REPO / ".venv" / "bin")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p.rstrip("/") != venv)
    env.update({"CLOSEDLOOP_HOME": str(home), "NO_COLOR": "1"})
    return env


def _script(block: Block) -> tuple[str, str | None]:
    """The block as a script; a server block gets its server line backgrounded and a health wait after it."""
    if block.kind != "server":
        return "set -euo pipefail\n" + block.body + "\n", None
    server, url = re.match(r'server "([^"]+)" health (\S+)', block.marker).groups()
    lines = block.body.splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith(server))
    start = lines[at].split(" #", 1)[0].rstrip()
    start = start if start.endswith("&") else start + " &"
    wait = (f"for _ in $(seq 240); do curl -sf {shlex.quote(url)} > /dev/null && break; sleep 0.5; done\n"
            f"curl -sf {shlex.quote(url)} > /dev/null || {{ echo 'no answer from {url}' >&2; exit 1; }}")
    return "set -euo pipefail\n" + "\n".join([*lines[:at], start, wait, *lines[at + 1:]]) + "\n", url


def _port_open(url: str) -> bool:
    parsed = urlparse(url)
    with socket.socket() as s:
        return s.connect_ex((parsed.hostname or "127.0.0.1", parsed.port or 80)) == 0


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind in {"run", "server"}], ids=str)
def test_the_block_runs_verbatim_in_a_fresh_home(block, tmp_path):
    script, url = _script(block)
    if url is not None and _port_open(url):
        pytest.fail(f"{block}: something already listens at {url}: the documented port must be free for this check")
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as o, stderr.open("w") as e:  # files, not pipes: a background server keeps them open
        proc = subprocess.Popen(["bash", "-c", script], cwd=REPO, env=_user_env(tmp_path / "home"), stdout=o,
                                stderr=e, start_new_session=True)
    try:
        proc.wait(timeout=300)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):  # the block's servers: the whole group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            deadline = time.monotonic() + 10
            while url and time.monotonic() < deadline and _port_open(url):
                time.sleep(0.2)
        proc.kill()
    out, err = stdout.read_text(), stderr.read_text()
    assert proc.returncode == 0, f"{block} failed (exit {proc.returncode}):\n{script}\nstdout:\n{out}\nstderr:\n{err}"
    assert out.strip(), f"{block} printed nothing"
    expected = re.search(r'expect "([^"]+)"', block.marker)
    assert expected is None or expected.group(1) in out, f"{block}: {expected.group(1)!r} not in its output:\n{out}"
    if url is not None:
        assert not _port_open(url), f"{block}: {url} still answers after the teardown"


def _run_chain(chain: list[Block], tmp_path: Path) -> None:
    """Each block of the chain verbatim, in order, each in its own shell, in the home its marker names."""
    home = Path(chain[0].marker.split()[3])
    unused = tmp_path / "home-the-blocks-must-not-use"
    with open(home.with_name(home.name + ".docs-check.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run of this check on the machine: wait for it
        shutil.rmtree(home, ignore_errors=True)
        try:
            for block in chain:
                script = "set -euo pipefail\n" + block.body + "\n"
                proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=_user_env(unused), capture_output=True,
                                      text=True, timeout=600)
                failed = f"{block} failed (exit {proc.returncode}):\n{script}\nstdout:\n{proc.stdout}\n"
                assert proc.returncode == 0, f"{failed}stderr:\n{proc.stderr}"
                assert proc.stdout.strip(), f"{block} printed nothing"
                assert home.is_dir() and not unused.exists(), f"{block} did not write to its home {home}"
        finally:
            shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_the_chain_runs_verbatim_in_its_own_home(name, tmp_path):
    _run_chain(CHAINS[name], tmp_path)


def test_a_chain_fails_on_a_failing_block_or_one_that_leaves_its_home_and_clears_the_home(tmp_path):
    home = tmp_path / "literal-home"
    marker = f"chain t home {home}"
    first = Block("T.md", 1, f'export CLOSEDLOOP_HOME={home}\nmkdir -p "$CLOSEDLOOP_HOME" && echo first', marker)
    reads = Block("T.md", 5, f'test -d {home} && echo "the first block\'s home is there"', marker)
    _run_chain([first, reads], tmp_path)
    assert not home.exists()
    with pytest.raises(AssertionError, match=r"T.md:9 failed \(exit 3\)"):
        _run_chain([first, Block("T.md", 9, "echo then; exit 3", marker)], tmp_path)
    assert not home.exists()
    with pytest.raises(AssertionError, match="did not write to its home"):  # its home dropped: the default one
        _run_chain([Block("T.md", 1, 'mkdir -p "$CLOSEDLOOP_HOME" && echo elsewhere', marker)], tmp_path)


def test_the_docs_facts_match_the_product():
    """DAG count, the Triggering example's window inside the demo's data, the default ports."""
    from datetime import date, timedelta

    from closedloop.devtools.demo import DemoPlan

    started = (REPO / "docs" / "getting-started.md").read_text()
    dags = sorted(p.stem for p in (REPO / "dags").glob("*.py") if not p.name.startswith("_"))
    assert len(dags) == 8 and "(eight per model, `housekeeping` included" in started, dags
    plan = DemoPlan()
    first, last = plan.start, plan.start + timedelta(days=plan.days - 1)
    assert f"On the data `make demo` leaves ({first}..{last};" in started
    triggering = started[started.index("## Trigger a run"):started.index("## Model health page")]
    windows = re.findall(r'"window_start": "([\d-]+)", "window_end": "([\d-]+)"', triggering)
    assert windows, "no example window under Triggering"
    for start, end in windows:  # end exclusive: its last day must have landed
        assert first <= date.fromisoformat(start) and date.fromisoformat(end) - timedelta(days=1) <= last, (start, end)
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^AIRFLOW_PORT \?= 8080$", makefile, re.M) and "http://localhost:8080" in started
    import inspect

    from closedloop.cli import serve

    serving = (REPO / "docs" / "how-to" / "online-scoring.md").read_text()
    assert inspect.signature(serve).parameters["port"].default == 8000 and "serve --port 8000" in serving
