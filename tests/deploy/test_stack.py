"""The production stack, checked statically: no Docker needed, nothing started.

The compose file against the Compose specification's schema and the Dockerfile against hadolint (both tools
are dev dependencies, run as subprocesses); then what the schema cannot see: every setting closedloop reads is
given to the Airflow services, every variable is in ``.env.example`` and holds no secret there, no secret has a
default (compose refuses to start without it), each secret reaches only the services that need it, health
checks and start-up order, and the GPU worker.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from closedloop.core.secrets import SECRET_NAME
from closedloop.core.settings import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yaml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
PKG = REPO_ROOT / "include" / "closedloop" / "core"  # settings.py and secrets.py

# ${NAME}, ${NAME:-default}, ${NAME:?message} and the other forms; $${...} is an escaped, literal dollar.
VARIABLE = re.compile(r"(?<!\$)\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")
# Wider than closedloop.core.secrets.SECRET_NAME: also keys (Fernet, JWT, S3 access key ids) and the logins.
SECRETISH = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|CREDENTIAL", re.IGNORECASE)


def tool(name: str) -> str:
    """The dev dependency ``name`` from the running interpreter's environment (else from PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed: run `make install` (it is in pyproject.toml's dev group)"
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def airflow_services(services: dict) -> dict:
    """The services that run Airflow and so closedloop's code (tasks, DAG parsing): command ``airflow ...``."""
    runs = re.compile(r"\bairflow (db|api-server|scheduler|dag-processor|triggerer|celery)\b")
    return {name: s for name, s in services.items() if runs.search(" ".join(s.get("command", [])))}


def text_of(node) -> str:
    """Every string in a loaded YAML node, one per line (to search a service for the variables it uses)."""
    if isinstance(node, dict):
        return "\n".join(text_of(k) + "\n" + text_of(v) for k, v in node.items())
    if isinstance(node, list):
        return "\n".join(text_of(v) for v in node)
    return str(node)


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


def variables_read_by(path: Path) -> set[str]:
    """The environment variables a module reads: ``env.get("X")``, ``env["X"]`` and helpers called as
    ``f(env, "X", ...)``, plus the names in a module-level tuple of variable names (``URI_NAMES``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func, args = node.func, node.args
            if isinstance(func, ast.Attribute) and func.attr == "get" and _is_env(func.value) and args:
                names |= _strings(args[:1])
            elif any(_is_env(a) for a in args):
                names |= _strings(args[[_is_env(a) for a in args].index(True) + 1:][:1])
        elif isinstance(node, ast.Subscript) and _is_env(node.value):
            names |= _strings([node.slice])
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.endswith("_NAMES")
                                                  for t in node.targets):
            names |= _strings(getattr(node.value, "elts", []))
    return {n for n in names if re.fullmatch(r"[A-Z][A-Z0-9_]+", n)}


def _is_env(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "env"


def _strings(nodes) -> set[str]:
    return {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)}


# -- the tools ------------------------------------------------------------------------------------
def test_compose_file_follows_the_compose_specification(tmp_path):
    cmd = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run([*cmd, str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # and the check bites: a misspelt key is refused
    broken = tmp_path / "docker-compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:", "    healthchek:", 1))
    done = subprocess.run([*cmd, str(broken)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "healthchek" in done.stdout + done.stderr


def test_dockerfile_passes_hadolint():
    done = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # and the check bites: an unpinned base image that runs as root is refused
    done = subprocess.run([tool("hadolint"), "--no-color", "-"], input="FROM python:latest\nRUN pip install x\n",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "DL3007" in done.stdout


def test_the_image_is_built_from_the_lock_file_and_runs_as_a_user():
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)
    assert all(re.search(r":\d[\w.-]*$", image) for image in froms), froms  # every base image at a version
    # the lock file, never a fresh resolve; the extras from the build argument, `production` by default
    assert "uv sync --frozen --no-dev $(printf -- \"--extra %s \" ${CLOSEDLOOP_EXTRAS})" in text
    assert 'ARG CLOSEDLOOP_EXTRAS="production"' in text
    assert re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)[-1] == "50000:50000"
    rules = [r for r in (REPO_ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*" and "**/.env" in rules  # the context holds only what is named, never a .env
    assert not any(r.startswith("!") and (".env" in r or ".closedloop" in r or r == "!tests/") for r in rules)


# -- (c) settings and variables -------------------------------------------------------------------
def test_every_variable_closedloop_reads_is_given_to_the_airflow_services(services):
    read = variables_read_by(PKG / "settings.py") | variables_read_by(PKG / "secrets.py")
    assert {"CLOSEDLOOP_HOME", "CLOSEDLOOP_LAKE_URI", "MLFLOW_TRACKING_URI", "CLOSEDLOOP_TASK_RETRIES",
            "CLOSEDLOOP_REDIS_URL", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"} <= read  # the parser finds them
    runners = airflow_services(services)
    assert {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
            "airflow-worker", "airflow-worker-gpu"} == set(runners)
    for name, service in runners.items():
        missing = read - SERVE_ONLY - UNSET_ALTERNATIVES - set(service["environment"])
        assert not missing, f"{name} lacks {sorted(missing)}"
        assert not SERVE_ONLY & set(service["environment"]), f"{name} holds the scoring service's token"


# Read by settings.py for `closedloop serve` only: given to closedloop-serve, to no Airflow service.
SERVE_ONLY = {"CLOSEDLOOP_SERVE_TOKEN"}
# Alternatives the stack leaves unset on purpose: CLOSEDLOOP_CONFIG is the single-model home's file in place of
# CLOSEDLOOP_MODELS (which the stack sets); CLOSEDLOOP_MODEL a process's own choice of model (every task names its
# DAG's model; the scoring service is given one: CLOSEDLOOP_SERVE_MODEL).
UNSET_ALTERNATIVES = {"CLOSEDLOOP_CONFIG", "CLOSEDLOOP_MODEL"}


def test_the_scoring_service_gets_closedloop_settings_and_its_token_but_no_airflow_key(services):
    serve = services["closedloop-serve"]
    env = serve["environment"]
    read = variables_read_by(PKG / "settings.py") | variables_read_by(PKG / "secrets.py")
    missing = {n for n in read if not n.startswith("AIRFLOW__")} - {"CLOSEDLOOP_CONFIG"} - set(env)
    assert env["CLOSEDLOOP_MODEL"] == "${CLOSEDLOOP_SERVE_MODEL:-card_fraud}"  # the model it scores
    assert not missing, f"closedloop-serve lacks {sorted(missing)}"
    assert not [k for k in env if k.startswith("AIRFLOW__")], "the scoring service needs no Airflow setting"
    assert serve["command"][:2] == ["closedloop", "serve"] and env["CLOSEDLOOP_ONLINE_STORE"] == "redis"
    assert env["CLOSEDLOOP_REDIS_URL"].endswith("@redis:6379/1")  # the online store the workers materialise
    assert env["MLFLOW_TRACKING_USERNAME"] == services["airflow-worker"]["environment"]["MLFLOW_TRACKING_USERNAME"]


def test_settings_docstring_names_every_variable_it_reads():
    import closedloop.core.settings

    undocumented = {n for n in variables_read_by(PKG / "settings.py") if n not in closedloop.core.settings.__doc__}
    assert not undocumented


def test_every_compose_variable_is_in_env_example():
    used = {m["name"] for m in VARIABLE.finditer(COMPOSE.read_text())}
    listed = set(env_example())
    assert used, "no ${VAR} found: the pattern is broken"
    assert not used - listed, f"add to .env.example: {sorted(used - listed)}"
    assert not listed - used, f".env.example lists what compose does not use: {sorted(listed - used)}"


def test_env_example_holds_no_secret():
    values = env_example()
    filled = {k: v for k, v in values.items() if (SECRETISH.search(k) or SECRET_NAME.search(k)) and v}
    assert not filled, f"placeholders only: leave these empty in .env.example: {sorted(filled)}"
    # the values it does hold are short, plain defaults (names, numbers, addresses), not generated strings
    assert all(re.fullmatch(r"[\w.:/-]{0,32}", v) for v in values.values()), values
    assert (REPO_ROOT / ".gitignore").read_text().splitlines().count(".env") == 1


# -- (d) no secret without the operator ------------------------------------------------------------
def test_compose_refuses_to_start_without_its_secrets():
    text = COMPOSE.read_text()
    uses = list(VARIABLE.finditer(text))
    secrets = {m["name"] for m in uses if SECRETISH.search(m["name"]) or m["name"].endswith(("_USER", "_USERNAME"))}
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET",
            "MLFLOW_ADMIN_PASSWORD", "S3_SECRET_ACCESS_KEY"} <= secrets
    for m in uses:
        if m["name"] in secrets:
            assert m["op"] == ":?" and m["arg"], f"{m.group(0)}: a secret must be ${{{m['name']}:?message}}"
        else:  # every other variable has a working default, so none is silently empty
            assert m["op"] in (":-", ":?"), f"{m.group(0)}: give a default (:-) or require it (:?)"


ONLY_IN = {  # the secrets that must not spread beyond the services that need them
    "POSTGRES_PASSWORD": {"postgres"},
    "MINIO_ROOT_PASSWORD": {"minio", "minio-init"},
    "MLFLOW_ADMIN_PASSWORD": {"mlflow", "mlflow-init"},
    "AIRFLOW_ADMIN_PASSWORD": {"airflow-init"},
    "MLFLOW_DB_PASSWORD": {"postgres", "mlflow"},
    "CLOSEDLOOP_SERVE_TOKEN": {"closedloop-serve"},
    "CLOSEDLOOP_METRICS_TOKEN": {"airflow-apiserver"},
    "GRAFANA_ADMIN_PASSWORD": {"grafana"},
}


@pytest.mark.parametrize("secret", sorted(ONLY_IN))
def test_each_secret_reaches_only_the_services_that_need_it(services, secret):
    holders = {name for name, s in services.items() if "${" + secret + ":" in text_of(s)}
    assert holders == ONLY_IN[secret]


def test_the_airflow_services_need_logins_and_share_their_keys(services):
    env = services["airflow-apiserver"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://airflow:${")
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("FabAuthManager")
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "false"
    for key in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        assert env[key].startswith("${") and ":?" in env[key]
    assert "MLFLOW_ADMIN" not in text_of(env)  # closedloop logs to MLflow as its own, ordinary user


def test_postgres_keeps_airflow_and_mlflow_apart():
    script = (REPO_ROOT / "deploy" / "postgres" / "init-databases.sh").read_text()
    assert re.findall(r"CREATE DATABASE (\w+) OWNER (\w+)", script) == [
        ("airflow", "airflow"), ("mlflow", "mlflow"), ("mlflow_auth", "mlflow"), ("feast", "feast")]
    assert "$AIRFLOW_DB_PASSWORD" in script and "PASSWORD '" not in script  # from the environment, quoted by psql


def test_redis_serves_celery_and_feast_from_different_databases(services):
    env = services["airflow-worker"]["environment"]
    assert env["AIRFLOW__CELERY__BROKER_URL"].endswith("@redis:6379/0")
    assert env["CLOSEDLOOP_REDIS_URL"].endswith("@redis:6379/1")
    assert env["CLOSEDLOOP_ONLINE_STORE"] == "redis"


def test_mlflow_runs_with_basic_auth(services):
    mlflow = services["mlflow"]
    assert mlflow["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    config = (REPO_ROOT / "deploy" / "mlflow" / "basic_auth.ini").read_text()
    assert "admin_password" not in config and "@postgres:5432/mlflow_auth" in config
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"] == "postgresql://mlflow@postgres:5432/mlflow"


# -- (e) health and start-up order -----------------------------------------------------------------
def test_long_running_services_have_health_checks(services):
    for name, service in services.items():
        if service.get("restart") == "always":
            test = service.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name}: no health check"
        else:
            assert service.get("restart") == "no", f"{name}: a job says restart: 'no', a service 'always'"


def test_start_up_waits_for_health_and_for_jobs_to_finish(services):
    for name, service in services.items():
        for dep, rule in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on an unknown service {dep}"
            expected = "service_healthy" if services[dep].get("restart") == "always" \
                else "service_completed_successfully"
            assert rule == {"condition": expected}, f"{name} -> {dep}: {rule}"
    workers = services["airflow-worker"]["depends_on"]
    assert {"postgres", "redis", "minio-init", "airflow-init", "airflow-apiserver", "mlflow-init"} <= set(workers)


def test_images_are_pinned_and_ports_stay_on_loopback_by_default(services):
    for name, service in services.items():
        image = service.get("image", "")
        assert re.search(r":[\w.${}:-]*\d", image) and not image.endswith(":latest"), f"{name}: {image}"
        for port in service.get("ports", []):
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), f"{name}: {port}"


def test_the_gpu_worker_serves_the_gpu_queue_on_one_nvidia_gpu(services):
    gpu = services["airflow-worker-gpu"]
    assert gpu["command"][:3] == ["airflow", "celery", "worker"]
    assert gpu["command"][gpu["command"].index("--queues") + 1] == "gpu"
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["environment"]["CLOSEDLOOP_DEVICE"] == "cuda" and gpu["profiles"] == ["gpu"]
    default = services["airflow-worker"]["command"]
    assert default[default.index("--queues") + 1] == "default"  # the CPU worker never takes GPU work


def test_the_gpu_worker_s_image_holds_the_gpu_extra(services):
    # the GPU worker builds the Dockerfile with CuPy (the `gpu` extra) beside `production`; the others without it
    gpu = services["airflow-worker-gpu"]
    assert gpu["build"]["args"]["CLOSEDLOOP_EXTRAS"].split() == ["production", "gpu"]
    assert gpu["image"] != services["airflow-worker"]["image"]  # never one tag for two different images
    assert "args" not in services["airflow-worker"]["build"]
    dockerfile = DOCKERFILE.read_text()
    assert 'ARG CLOSEDLOOP_EXTRAS="production"' in dockerfile
    syncs = [line for line in dockerfile.splitlines() if line.lstrip().startswith("uv sync --frozen")]
    assert len(syncs) == 2 and all("${CLOSEDLOOP_EXTRAS}" in line and "--extra production" not in line
                                   for line in syncs), syncs
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^gpu = \[\n\s+"cupy-', pyproject, re.MULTILINE), "the gpu extra is CuPy"


def test_training_reaches_the_gpu_worker_only_when_the_host_says_so(services):
    # the setting reaches every Airflow service (the dag-processor decides the queue when it parses), with
    # `default` unless .env says `gpu`: a task sent to a queue nobody listens on would wait forever
    for name, service in airflow_services(services).items():
        assert service["environment"]["CLOSEDLOOP_TRAINING_QUEUE"] == "${CLOSEDLOOP_TRAINING_QUEUE:-default}", name
    assert env_example()["CLOSEDLOOP_TRAINING_QUEUE"] == "default"
    gpu = services["airflow-worker-gpu"]["command"]
    assert gpu[gpu.index("--queues") + 1] == "gpu"  # the value a GPU host sets (tests/dags/test_task_placement.py)
    assert "CLOSEDLOOP_TRAINING_QUEUE=gpu" in COMPOSE.read_text()  # and the compose file says how
