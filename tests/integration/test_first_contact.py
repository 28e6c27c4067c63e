"""What a new user meets first: ``closedloop airflow-config`` prepares a home completely, ``closedloop env`` says
when it is not prepared, and the CLI's homes (missing, a file, empty) are answered in one line."""

from __future__ import annotations

import configparser
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from closedloop.cli import app
from closedloop.core.settings import REPO_ROOT, Settings
from closedloop.devtools.airflow_home import ensure_jwt_secret

CLOSEDLOOP = Path(sys.executable).parent / "closedloop"


def _run(home: Path | str, *args: str) -> subprocess.CompletedProcess:
    """The installed console script with only CLOSEDLOOP_HOME (no Airflow variable of the test session)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CLOSEDLOOP_"))}
    env.update({"CLOSEDLOOP_HOME": str(home), "NO_COLOR": "1"})
    return subprocess.run([str(CLOSEDLOOP), *args], capture_output=True, text=True, env=env, timeout=180)


def _env(home: Path):
    """`closedloop env` in-process (it imports no Airflow)."""
    return CliRunner().invoke(app, ["env"], env={"CLOSEDLOOP_HOME": str(home)})


def _cfg(home: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(home / "airflow" / "airflow.cfg")
    return parser


def test_airflow_config_prepares_a_home_completely_and_idempotently(tmp_path):
    home = tmp_path / "home"
    env_before = _env(home)
    assert env_before.exit_code == 0 and "export AIRFLOW_HOME=" in env_before.stdout
    assert "is not prepared" in env_before.stderr and "closedloop airflow-config" in env_before.stderr

    first = _run(home, "airflow-config")
    assert first.returncode == 0, first.stderr
    airflow = home / "airflow"
    assert (airflow / "airflow.db").stat().st_size > 0  # migrated: `airflow dags test` needs nothing more
    secret = (airflow / "jwt_secret").read_text().strip()
    assert len(secret) >= 32 and _cfg(home).get("api_auth", "jwt_secret") == secret
    for private in ("jwt_secret", "airflow.cfg", "simple_auth_manager_passwords.json.generated"):
        assert stat.S_IMODE((airflow / private).stat().st_mode) == 0o600, private
    assert _cfg(home).get("core", "dags_folder") == str(REPO_ROOT / "dags")

    again = _run(home, "airflow-config")
    assert again.returncode == 0 and "rewrote" not in again.stderr
    assert (airflow / "jwt_secret").read_text().strip() == secret  # kept: running components stay valid
    assert _env(home).stderr == ""  # prepared: nothing to say
    other = Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path / "other")})
    assert ensure_jwt_secret(other) != secret  # per home


def test_airflow_config_rewrites_airflow_s_own_default_config_and_says_so(tmp_path):
    """What `airflow dags test` writes when it meets a home without airflow.cfg: dags under AIRFLOW_HOME."""
    home = tmp_path / "home"
    airflow = home / "airflow"
    airflow.mkdir(parents=True)
    (airflow / "airflow.cfg").write_text(f"[core]\ndags_folder = {airflow / 'dags'}\nplugins_folder = "
                                         f"{airflow / 'plugins'}\n[database]\nsql_alchemy_conn = sqlite:///"
                                         f"{airflow / 'airflow.db'}\n")
    assert "is not prepared" in _env(home).stderr
    out = _run(home, "airflow-config")
    assert out.returncode == 0, out.stderr
    assert "rewrote" in out.stderr and f"dags_folder is {airflow / 'dags'}" in out.stderr
    assert _cfg(home).get("core", "dags_folder") == str(REPO_ROOT / "dags")
    assert _cfg(home).get("core", "plugins_folder") == str(REPO_ROOT / "plugins")


@pytest.mark.parametrize("args", [("status",), ("history",), ("report",), ("quarantine", "list"),
                                  ("quarantine", "show", "transactions", "2026-03-01")])
def test_a_read_command_on_a_missing_home_says_so_and_creates_nothing(tmp_path, args):
    home = tmp_path / "nowhere"
    out = CliRunner().invoke(app, list(args), env={"CLOSEDLOOP_HOME": str(home)})
    assert out.exit_code == 1
    assert f"no closedloop home at {home}" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not home.exists()


@pytest.mark.parametrize("args", [("status",), ("env",), ("generate", "--days", "1"), ("airflow-config",)])
def test_a_file_as_closedloop_home_is_one_line(tmp_path, args):
    a_file = tmp_path / "home.txt"
    a_file.write_text("not a folder")
    out = CliRunner().invoke(app, list(args), env={"CLOSEDLOOP_HOME": str(a_file)})
    assert out.exit_code == 1, out.output
    assert out.stderr.strip() == (f"error: CLOSEDLOOP_HOME={a_file} is a file, not a folder: point it at a folder "
                                  "(a missing one is created)")
    assert out.stdout == ""


@pytest.mark.parametrize("args", [("status",), ("env",), ("generate", "--days", "1")])
def test_an_empty_closedloop_home_is_refused(tmp_path, args):
    before = set((REPO_ROOT / ".closedloop").glob("**/*")) if (REPO_ROOT / ".closedloop").exists() else None
    out = CliRunner().invoke(app, list(args), env={"CLOSEDLOOP_HOME": ""})
    assert out.exit_code == 1, out.output
    assert out.stderr.strip().startswith("error: CLOSEDLOOP_HOME is set but empty")
    after = set((REPO_ROOT / ".closedloop").glob("**/*")) if (REPO_ROOT / ".closedloop").exists() else None
    assert after == before  # nothing written into the checkout


@pytest.mark.parametrize("value", ["", "file"])
def test_make_airflow_refuses_a_bad_home_before_starting_anything(tmp_path, value):
    home = tmp_path / "home.txt" if value == "file" else ""
    if value == "file":
        home.write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "CLOSEDLOOP_"))}
    env["CLOSEDLOOP_HOME"] = str(home)
    out = subprocess.run(["make", "--no-print-directory", "airflow", "AIRFLOW_PORT=1"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    expected = "CLOSEDLOOP_HOME is set but empty" if value == "" else "is a file, not a folder"
    assert expected in out.stderr, out.stderr
    assert "standalone" not in out.stdout
