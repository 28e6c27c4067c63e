"""Security: a login in the embedded configuration, secrets masked in task logs, none in the repository."""

from __future__ import annotations

import re
import stat
import subprocess

import pytest

from closedloop.core.secrets import secret_values
from closedloop.core.settings import REPO_ROOT, Settings
from closedloop.devtools.airflow_home import ADMIN, ensure_password, passwords_file, render_config, write_config


def test_the_embedded_airflow_needs_a_login(tmp_path, reliability):
    settings = Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path)})
    text = render_config(settings)
    assert "auth_manager = airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager" in text
    assert "simple_auth_manager_all_admins = False" in text
    assert f"simple_auth_manager_users = {ADMIN}:admin" in text
    write_config(settings)
    path = passwords_file(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    password = ensure_password(settings)
    assert len(password) >= 16 and password == ensure_password(settings)  # generated once, then kept
    other = Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path / "other")})
    assert ensure_password(other) != password  # random per home, never a default
    assert not str(path).startswith(str(REPO_ROOT / "include"))
    reliability.record("security", "embedded Airflow without a login",
                       "impossible: simple auth manager, all_admins False, a random password per home (0600)")


def test_the_project_secrets_are_found():
    env = {"MLFLOW_TRACKING_PASSWORD": "s3cr3t-mlflow", "AWS_SECRET_ACCESS_KEY": "aws-secret-value",
           "MLFLOW_TRACKING_URI": "http://closedloop:uri-password@mlflow:5000", "CLOSEDLOOP_HOME": "/tmp/x",
           "SLACK_WEBHOOK_URL": "https://hooks.slack.example/T000/B000/XXXX", "SHORT_TOKEN": "abc"}
    assert set(secret_values(env)) == {"s3cr3t-mlflow", "aws-secret-value", "uri-password",
                                       "https://hooks.slack.example/T000/B000/XXXX"}


def test_secrets_are_masked_in_task_logs(reliability):
    pytest.importorskip("airflow.sdk")
    from airflow.sdk._shared.secrets_masker import redact

    from closedloop.adapters.airflow.secrets import mask_secrets

    env = {"MLFLOW_TRACKING_PASSWORD": "s3cr3t-mlflow-pw",
           "MLFLOW_TRACKING_URI": "http://closedloop:uri-pw-12345@mlflow:5000"}
    assert mask_secrets(env) == 2
    line = "registering at http://closedloop:uri-pw-12345@mlflow:5000 with s3cr3t-mlflow-pw"
    masked = redact(line)
    assert "uri-pw-12345" not in masked and "s3cr3t-mlflow-pw" not in masked and "***" in masked
    reliability.record("security", "a secret closedloop reads appears in a task log line",
                       "masked as *** by Airflow's masker (closedloop registers what it reads)")


# What a committed secret looks like; placeholders (${VAR}, <...>, changeme) do not match.
LEAKS = {
    "AWS access key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Slack token": re.compile(r"\bxox[abposr]-[0-9A-Za-z-]{10,}"),
    "password in a URI": re.compile(r"://[A-Za-z0-9_.-]+:(?!\$\{|<|\*)[^@/\s'\"]{6,}@"),
    "password assignment": re.compile(
        r"(?i)\b(password|passwd|secret_access_key|api_key)\b\s*[:=]\s*['\"]?(?!\$\{|<|\*|changeme|None|\")"
        r"[A-Za-z0-9+/_-]{8,}"),
}


def test_no_secret_is_committed(reliability):
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    hits = []
    for name in files.split():
        if name.endswith(".lock") or name.startswith("tests/unit/test_security.py"):
            continue
        path = REPO_ROOT / name
        if not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        hits += [f"{name}: {what}" for what, pattern in LEAKS.items() if pattern.search(text)]
    assert not hits, hits
    reliability.record("security", "a secret committed to the repository",
                       "none found in the tracked files (keys, tokens, passwords in URIs or assignments)")
