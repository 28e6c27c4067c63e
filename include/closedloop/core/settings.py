"""Settings: where state lives and which services to use, read from the environment.

This is the only module that reads the environment. It checks each value (a malformed one is refused here,
before any work) and hands each layer plain values: paths, URIs, URLs and names as set or defaulted. What a
value becomes in one service's own format is derived in the layer that talks to that service:

- Feast's ``registry`` and ``online_store`` sections (the SQL registry's SQLAlchemy URL, Redis's
  ``connection_string``, the ``${...}`` values of ``feature_store.yaml``): :mod:`closedloop.stages.feast_config`.
- the MLflow UI's base URL of the task links (from ``CLOSEDLOOP_MLFLOW_UI_URL`` or the tracking URI):
  :func:`closedloop.adapters.airflow.links.mlflow_ui_url`.
- the ``train_model`` task's queue and Kubernetes pod (``executor_config``):
  :func:`closedloop.adapters.airflow.orchestration.training_task_args`; the Dask scheduler the training engine
  connects to (or the local cluster it starts): :mod:`closedloop.stages.dask_training`.

Every default works on a laptop: all state lives under ``$CLOSEDLOOP_HOME`` (``.closedloop/`` in the checkout
by default).

Environment variables (all optional):

- ``CLOSEDLOOP_HOME``: root of all local state (default: ``<repo>/.closedloop``).
- ``CLOSEDLOOP_LAKE_URI``: root URI of the data lake (default: ``file://$CLOSEDLOOP_HOME/lake``).
- ``CLOSEDLOOP_MODELS``: the folder of model configurations (default: ``<repo>/models``): one folder per model,
  ``<name>/closedloop.yaml`` and its schema; every model gets its DAGs, lake prefix, MLflow names and Feast
  project in the one deployment (see :func:`model_entries`).
- ``CLOSEDLOOP_MODEL``: the model a process works on when it names none itself (the CLI's ``--model`` sets it);
  default: the only model, else the one with the root layout (``model.namespaced: false``).
- ``CLOSEDLOOP_CONFIG``: one configuration file instead of the folder: a single-model home as before many models
  (today's DAG ids, the lake's root, Feast project ``closedloop``); ``CLOSEDLOOP_MODELS`` is then not read.
- ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``: default ``sqlite:///$CLOSEDLOOP_HOME/mlflow/mlflow.db``.
- ``CLOSEDLOOP_MLFLOW_UI_URL``: the MLflow UI as a browser reaches it, for the extra links of the Airflow tasks
  (default: the tracking URI when it is ``http(s)://``, without any user:password; else empty: no MLflow links).
- ``CLOSEDLOOP_MLFLOW_ARTIFACTS``: artifact root for new experiments (default ``$CLOSEDLOOP_HOME/mlflow/artifacts``).
- ``CLOSEDLOOP_S3_ENDPOINT_URL``: an S3-compatible endpoint (MinIO) for ``s3://`` URIs; empty: AWS itself.
- ``CLOSEDLOOP_FEAST_REPO``: the Feast repository (default: ``<repo>/feature_repo``).
- ``CLOSEDLOOP_FEAST_REGISTRY``: Feast's registry: a file (default ``$CLOSEDLOOP_HOME/feast/registry.db``; ``s3://``
  works too, with ``FEAST_S3_ENDPOINT_URL`` for an S3-compatible endpoint) or a database,
  ``postgresql://user:<password>@host:port/db``, which Feast keeps as its SQL registry (what several processes
  that apply and materialise at once need). Rendered into ``feature_store.yaml`` by
  :func:`closedloop.stages.feast_config.feast_registry_config`.
- ``CLOSEDLOOP_ONLINE_STORE``: ``sqlite`` (default: a file under ``$CLOSEDLOOP_HOME/feast``) or ``redis``: Feast's
  online store, rendered into ``feature_store.yaml`` by :func:`closedloop.stages.feast_config.feast_online_store`.
- ``CLOSEDLOOP_REDIS_URL``: the Redis of the online store, ``redis://[:password@]host[:port][/db]`` (``rediss://``
  for TLS); required with ``CLOSEDLOOP_ONLINE_STORE=redis``.
- ``CLOSEDLOOP_DEVICE``: ``auto`` (default), ``cpu`` or ``cuda``: where XGBoost trains.
- ``CLOSEDLOOP_TRAINING_QUEUE``: the executor queue of the retraining DAG's ``train_model`` task (default
  ``default``, where every other task runs); ``gpu`` on a stack with a GPU worker listening on that queue.
- ``CLOSEDLOOP_TRAINING_POD_TEMPLATE``: on Kubernetes, the pod template file of the ``train_model`` task's pod
  (e.g. one that requests ``nvidia.com/gpu: 1``); empty (default): the executor's ordinary pod.
- ``CLOSEDLOOP_DASK_SCHEDULER``: with ``training.engine: dask`` in the configuration, the address of the Dask
  scheduler that trains (``tcp://host:8786``); empty (default): a local Dask cluster started for the task.
- ``CLOSEDLOOP_SCHEDULES``: ``on`` (default) or ``manual``: with ``manual`` the DAGs keep their Asset
  schedules but drop their time-based ones, so that a simulation or a demo drives days with explicit
  dates and the scheduler starts nothing on the wall clock.
- ``CLOSEDLOOP_TASK_RETRIES`` (default 2), ``CLOSEDLOOP_RETRY_DELAY_SECONDS`` (default 20; each retry waits about
  twice as long as the one before, at most 10 minutes) and ``CLOSEDLOOP_TASK_TIMEOUT_MINUTES`` (default 60): the
  retry and timeout policy of every task (tests shorten the delay).
- ``CLOSEDLOOP_ALLOWED_ROOTS``: comma-separated URI prefixes closedloop may read and write (default: the lake,
  the MLflow artifact root and ``$CLOSEDLOOP_HOME``). A lake or artifact root outside them, a scheme other than
  ``file``, ``s3`` or ``gs``, or a URI handed to a task that climbs out of them is refused before any work.
- ``CLOSEDLOOP_SERVE_TOKEN``: the bearer token of ``closedloop serve`` (``POST /score`` and ``GET /metrics``); empty
  (the laptop default): no token asked. Read by the scoring service only (docker-compose gives it to no other).
- ``CLOSEDLOOP_ALERTS``: where alerts go besides ``$CLOSEDLOOP_HOME/alerts/alerts.jsonl`` (always written):
  ``file`` (default: nowhere else), ``slack`` (the Slack provider's webhook notifier, on the Airflow connection
  named by ``CLOSEDLOOP_SLACK_WEBHOOK``: a connection id, never the URL) or ``email`` (Airflow's SMTP provider,
  to ``CLOSEDLOOP_ALERT_EMAIL``, comma-separated, over the connection ``CLOSEDLOOP_SMTP_CONN_ID``, default
  ``smtp_default``). See :mod:`closedloop.stages.alerts`. Read by :class:`AlertSettings` when an alert is
  delivered (not by :class:`Settings`): a bad value fails the alerting, with its message, not every task.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import ValidationError

from closedloop.core.config_model import ClosedloopConfig, MonitoringSection, known_keys
from closedloop.core.errors import ConfigError
from closedloop.core.schema import load_contract

REPO_ROOT = Path(__file__).resolve().parents[3]  # include/closedloop/core/settings.py -> the checkout
DEFAULT_MODELS = REPO_ROOT / "models"
MODEL_FILE = "closedloop.yaml"
# the configuration of the model with the root layout among the shipped ones (tests, docs)
DEFAULT_CONFIG = DEFAULT_MODELS / "card_fraud" / MODEL_FILE
MODEL_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def _as_uri(path_or_uri: str) -> str:
    """Return ``path_or_uri`` as a URI: plain paths become absolute ``file://`` URIs."""
    if "://" in path_or_uri:
        return path_or_uri.rstrip("/")
    return "file://" + str(Path(path_or_uri).expanduser().resolve())


SCHEMES = ("file", "s3", "gs")


def normalise_uri(uri: str) -> str:
    """``uri`` with ``.`` and ``..`` segments resolved (so that a prefix test means containment)."""
    import posixpath

    scheme, sep, rest = _as_uri(uri).partition("://")
    if scheme == "file":
        return "file://" + posixpath.normpath(rest)
    bucket, _, path = rest.partition("/")
    path = posixpath.normpath("/" + path).lstrip("/") if path else ""
    return f"{scheme}{sep}{bucket}" + (f"/{path}" if path else "")


def check_uri(uri: str, roots: list[str] | tuple[str, ...], what: str) -> str:
    """The normalised ``uri`` when it uses an allowed scheme and lies under one of ``roots``; ConfigError else."""
    scheme = _as_uri(uri).partition("://")[0]
    if scheme not in SCHEMES:
        raise ConfigError(f"{what}: {uri!r} uses the scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    norm = normalise_uri(uri)
    for root in roots:
        r = normalise_uri(root)
        if norm == r or norm.startswith(r.rstrip("/") + "/"):
            return norm
    raise ConfigError(f"{what}: {uri!r} lies outside the allowed roots ({', '.join(roots)}); set "
                      f"CLOSEDLOOP_ALLOWED_ROOTS to allow it")


ALERT_CHANNELS = ("file", "slack", "email")


@dataclass(frozen=True)
class AlertSettings:
    """``CLOSEDLOOP_ALERTS`` and what its channel needs (see the module doc), checked.

    Read by the notifier when it delivers an alert (:meth:`from_env`), never by :class:`Settings`: a bad value
    fails the task that alerts (or its failure callback), with its one-line message, not every task that reads
    the settings.
    """

    channel: str = "file"
    slack_conn_id: str = ""
    emails: tuple[str, ...] = ()
    smtp_conn_id: str = "smtp_default"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> AlertSettings:
        """The alert settings of ``env`` (default: ``os.environ``); ConfigError naming the variable when bad."""
        env = dict(os.environ if env is None else env)
        channel = (env.get("CLOSEDLOOP_ALERTS") or "file").strip().lower()
        if channel not in ALERT_CHANNELS:
            raise ConfigError(f"CLOSEDLOOP_ALERTS={channel!r}: use one of {', '.join(ALERT_CHANNELS)}")
        slack = (env.get("CLOSEDLOOP_SLACK_WEBHOOK") or "").strip()
        if "://" in slack:
            raise ConfigError("CLOSEDLOOP_SLACK_WEBHOOK holds a URL: give the id of an Airflow connection that holds "
                              "the webhook (e.g. AIRFLOW_CONN_SLACK_ALERTS), so that the secret stays in Airflow's "
                              "secrets")
        if channel == "slack" and not slack:
            raise ConfigError("CLOSEDLOOP_ALERTS=slack needs CLOSEDLOOP_SLACK_WEBHOOK: the id of an Airflow "
                              "connection of type slackwebhook")
        emails = tuple(e.strip() for e in (env.get("CLOSEDLOOP_ALERT_EMAIL") or "").split(",") if e.strip())
        if channel == "email" and not emails:
            raise ConfigError("CLOSEDLOOP_ALERTS=email needs CLOSEDLOOP_ALERT_EMAIL: the recipients, comma-separated")
        return cls(channel=channel, slack_conn_id=slack, emails=emails,
                   smtp_conn_id=(env.get("CLOSEDLOOP_SMTP_CONN_ID") or "smtp_default").strip())


def _number(env: dict[str, str], name: str, default: float) -> float:
    """A non-negative number from ``env[name]`` (``default`` when unset or empty)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ConfigError(f"{name}={raw!r}: expected a non-negative number")
    return value


ONLINE_STORES = ("sqlite", "redis")
SQL_REGISTRY_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")


def check_database_registry(url: str) -> None:
    """Refuse (ConfigError) a database ``CLOSEDLOOP_FEAST_REGISTRY`` that is not a PostgreSQL URL with a database.

    The check only: :func:`closedloop.stages.feast_config.feast_sql_registry_url` turns the URL into Feast's.
    """
    scheme, _, rest = url.partition("://")
    if scheme not in SQL_REGISTRY_SCHEMES or not rest.strip("/"):
        raise ConfigError(f"CLOSEDLOOP_FEAST_REGISTRY: {scheme!r} is not a database URL Feast can use; give "
                          "postgresql://user:<password>@host:port/database, a file path or an s3:// URI")


class RedisURL(NamedTuple):
    """``CLOSEDLOOP_REDIS_URL`` in parts (user name and password unquoted)."""

    host: str
    port: int
    db: str
    username: str
    password: str
    ssl: bool


def redis_url_parts(url: str) -> RedisURL:
    """``CLOSEDLOOP_REDIS_URL`` (``redis://[:password@]host[:port][/db]``, ``rediss://`` for TLS) in parts;
    ConfigError when malformed or when its password holds a comma (which Feast's connection string cannot pass:
    :func:`closedloop.stages.feast_config.feast_redis_connection`)."""
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as exc:
        raise ConfigError(f"CLOSEDLOOP_REDIS_URL: not a valid URL ({exc})") from exc
    if parts.scheme not in {"redis", "rediss"} or not parts.hostname:
        raise ConfigError("CLOSEDLOOP_REDIS_URL: expected redis://[:password@]host[:port][/db] (or rediss://)")
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(f"CLOSEDLOOP_REDIS_URL: the database must be a number, not {db!r}")
    secret = unquote(parts.password or "")
    if "," in secret:
        raise ConfigError("CLOSEDLOOP_REDIS_URL: Feast cannot pass a password with a comma; generate another")
    return RedisURL(host=parts.hostname, port=port, db=db, username=unquote(parts.username or ""),
                    password=secret, ssl=parts.scheme == "rediss")


def check_mlflow_ui_url(explicit: str | None) -> str:
    """``CLOSEDLOOP_MLFLOW_UI_URL`` checked (an ``http(s)://`` URL) and without its trailing ``/``; empty when unset.

    The check only: :func:`closedloop.adapters.airflow.links.mlflow_ui_url` derives the links' base from it or
    from the tracking URI.
    """
    url = (explicit or "").strip()
    if url and not url.startswith(("http://", "https://")):
        raise ConfigError(f"CLOSEDLOOP_MLFLOW_UI_URL={url!r}: expected an http(s):// URL such as "
                          "http://localhost:5000, or empty")
    return url.rstrip("/")


def is_database_url(value: str) -> bool:
    """Whether ``value`` is a database URL (``postgresql://``, ``mysql://``, ``sqlite://``...) rather than a path
    or an object-store URI."""
    return value.partition("://")[0].split("+")[0] in {"postgresql", "postgres", "mysql", "sqlite"} and "://" in value


@dataclass(frozen=True)
class ModelEntry:
    """One model of the deployment as its folder shows it, before its configuration is validated.

    ``namespaced`` is read leniently (``model.namespaced`` of the YAML, when it is a boolean): it only places the
    model's state; the strict check of the whole file is :attr:`Settings.config` (and the DAG files' import).
    """

    name: str
    config_path: Path
    namespaced: bool

    def dag_id(self, kind: str) -> str:
        """The id of this model's DAG of ``kind`` (``ingest``, ``retraining``...): ``<name>.<kind>`` when
        namespaced, ``kind`` for the root layout (a single-model home's ids, kept)."""
        return f"{self.name}.{kind}" if self.namespaced else kind


def _lenient_model_keys(path: Path) -> dict[str, Any]:
    """``model:`` of the YAML at ``path`` as far as it can be read; empty when it cannot (the strict load says why)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    model = raw.get("model") if isinstance(raw, dict) else None
    return model if isinstance(model, dict) else {}


def model_entries(env: dict[str, str] | None = None) -> list[ModelEntry]:
    """The deployment's models, sorted by name.

    With ``CLOSEDLOOP_CONFIG``: that one file, a single model with the root layout (named by its ``model.name``).
    Else every folder of ``CLOSEDLOOP_MODELS`` (default ``<repo>/models``) holding a ``closedloop.yaml``, named by
    the folder; namespaced unless its configuration says ``model.namespaced: false`` (the root layout, which one
    model of a deployment at most may keep).
    """
    env = dict(os.environ if env is None else env)
    single = (env.get("CLOSEDLOOP_CONFIG") or "").strip()
    if single:
        path = Path(single).expanduser().resolve()
        name = str(_lenient_model_keys(path).get("name") or path.parent.name)
        return [ModelEntry(name=name, config_path=path, namespaced=False)]
    folder = models_dir(env)
    if not folder.is_dir():
        raise ConfigError(f"CLOSEDLOOP_MODELS={folder}: not a folder (one folder per model, each with {MODEL_FILE})")
    entries = []
    for sub in sorted(p for p in folder.iterdir() if (p / MODEL_FILE).is_file()):
        namespaced = _lenient_model_keys(sub / MODEL_FILE).get("namespaced", True)
        entries.append(ModelEntry(name=sub.name, config_path=(sub / MODEL_FILE).resolve(),
                                  namespaced=namespaced if isinstance(namespaced, bool) else True))
    return entries


def models_dir(env: dict[str, str] | None = None) -> Path:
    """The folder of model configurations (``CLOSEDLOOP_MODELS``, default ``<repo>/models``)."""
    env = dict(os.environ if env is None else env)
    return Path(env.get("CLOSEDLOOP_MODELS") or DEFAULT_MODELS).expanduser().resolve()


def select_model(env: dict[str, str] | None = None, model: str | None = None) -> ModelEntry:
    """The model a process works on: ``model``, else ``CLOSEDLOOP_MODEL``, else the only one, else the one with the
    root layout; ConfigError naming the choices when there is no such model or no way to choose."""
    env = dict(os.environ if env is None else env)
    entries = model_entries(env)
    names = ", ".join(e.name for e in entries) or "none"
    wanted = (model or env.get("CLOSEDLOOP_MODEL") or "").strip()
    if wanted:
        for entry in entries:
            if entry.name == wanted:
                return entry
        where = env.get("CLOSEDLOOP_CONFIG") or models_dir(env)
        raise ConfigError(f"model {wanted!r} not found in {where} (models: {names})")
    if len(entries) == 1:
        return entries[0]
    roots = [e for e in entries if not e.namespaced]
    if len(roots) == 1:
        return roots[0]
    raise ConfigError(f"{len(entries)} models in {models_dir(env)} ({names}): name one with --model or "
                      "CLOSEDLOOP_MODEL")


@dataclass(frozen=True)
class Scheduling:
    """What DAG files need when they are parsed, and nothing else: the time schedules switch, every task's
    retries, retry delay and timeout, and ``train_model``'s queue and pod template.

    Read on its own (:meth:`from_env` reads only these six variables), so that a bad setting of another kind
    (an alert channel, a store URL) fails the tasks that read it, with its message, never the import of every
    DAG. :class:`Settings` carries the same values, read by this same function.
    """

    time_schedules: bool = True
    task_retries: int = 2
    retry_delay_seconds: float = 20.0
    task_timeout_minutes: float = 60.0
    training_queue: str = "default"
    training_pod_template: str = ""

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Scheduling:
        env = dict(os.environ if env is None else env)
        queue = (env.get("CLOSEDLOOP_TRAINING_QUEUE") or "default").strip()
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", queue):
            raise ConfigError(f"CLOSEDLOOP_TRAINING_QUEUE={queue!r}: a queue name is letters, digits, '_', '.', '-' "
                              "(e.g. default or gpu)")
        return cls(
            time_schedules=env.get("CLOSEDLOOP_SCHEDULES", "on").lower() != "manual",
            task_retries=int(_number(env, "CLOSEDLOOP_TASK_RETRIES", 2)),
            retry_delay_seconds=_number(env, "CLOSEDLOOP_RETRY_DELAY_SECONDS", 20.0),
            task_timeout_minutes=_number(env, "CLOSEDLOOP_TASK_TIMEOUT_MINUTES", 60.0),
            training_queue=queue,
            training_pod_template=(env.get("CLOSEDLOOP_TRAINING_POD_TEMPLATE") or "").strip(),
        )


@dataclass(frozen=True)
class Settings:
    """Resolved locations and service endpoints; build with :meth:`from_env`."""

    home: Path
    lake_uri: str
    config_path: Path
    # database URLs may hold a password: kept out of repr() (as the Redis URL)
    mlflow_tracking_uri: str = field(repr=False)
    mlflow_registry_uri: str = field(repr=False)
    mlflow_artifact_root: str
    feast_repo: Path
    feast_registry: str = field(repr=False)
    device: str = "auto"
    time_schedules: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)
    task_retries: int = 2
    retry_delay_seconds: float = 20.0
    task_timeout_minutes: float = 60.0
    allowed_roots: tuple[str, ...] = ()
    online_store: str = "sqlite"
    redis_url: str = field(default="", repr=False)  # may hold a password: kept out of repr()
    training_queue: str = "default"
    training_pod_template: str = ""
    dask_scheduler: str = ""
    serve_token: str = field(default="", repr=False)
    # CLOSEDLOOP_MLFLOW_UI_URL as set (checked), empty when unset: the links' base, derived from it or from the
    # tracking URI, is closedloop.adapters.airflow.links.mlflow_ui_url
    mlflow_ui_url: str = ""
    # the model these settings are for (its folder's name; with CLOSEDLOOP_CONFIG, its model.name) and whether its
    # state is namespaced: lake under models/<name>/, Feast files under feast/<name>/ and project closedloop_<name>
    model: str = ""
    namespaced: bool = False
    # the folder of models (None with CLOSEDLOOP_CONFIG), and the deployment's lake and Feast registry as set or
    # defaulted, before the model's namespace: what `closedloop env` exports, so that a later process derives the
    # same model paths again
    models_dir: Path | None = None
    lake_root: str = ""
    feast_registry_root: str = field(default="", repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, model: str | None = None) -> Settings:
        """Read the settings from ``env`` (default: ``os.environ``) for ``model`` (default: :func:`select_model`)."""
        env = dict(os.environ if env is None else env)
        raw_home = env.get("CLOSEDLOOP_HOME")
        if raw_home is not None and not raw_home.strip():
            raise ConfigError("CLOSEDLOOP_HOME is set but empty: unset it (the default is <checkout>/.closedloop) "
                              "or name a folder")
        home = Path(raw_home or REPO_ROOT / ".closedloop").expanduser().resolve()
        if home.exists() and not home.is_dir():
            raise ConfigError(f"CLOSEDLOOP_HOME={home} is a file, not a folder: point it at a folder (a missing "
                              "one is created)")
        tracking = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
        device = env.get("CLOSEDLOOP_DEVICE", "auto").lower()
        if device not in {"auto", "cpu", "cuda"}:
            raise ConfigError(f"CLOSEDLOOP_DEVICE={device!r}: use one of auto, cpu, cuda")
        storage_options: dict[str, Any] = {}
        if env.get("CLOSEDLOOP_S3_ENDPOINT_URL"):
            storage_options = {"client_kwargs": {"endpoint_url": env["CLOSEDLOOP_S3_ENDPOINT_URL"]}}
        lake_uri = _as_uri(env.get("CLOSEDLOOP_LAKE_URI") or str(home / "lake"))
        entry = select_model(env, model)
        artifacts = _as_uri(env.get("CLOSEDLOOP_MLFLOW_ARTIFACTS") or str(home / "mlflow" / "artifacts"))
        explicit = [r.strip() for r in env.get("CLOSEDLOOP_ALLOWED_ROOTS", "").split(",") if r.strip()]
        roots = tuple(explicit) if explicit else (lake_uri, artifacts, _as_uri(str(home)))
        check_uri(lake_uri, roots, "CLOSEDLOOP_LAKE_URI")
        check_uri(artifacts, roots, "CLOSEDLOOP_MLFLOW_ARTIFACTS")
        online_store = (env.get("CLOSEDLOOP_ONLINE_STORE") or "sqlite").lower()
        if online_store not in ONLINE_STORES:
            raise ConfigError(f"CLOSEDLOOP_ONLINE_STORE={online_store!r}: use one of {', '.join(ONLINE_STORES)}")
        redis_url = env.get("CLOSEDLOOP_REDIS_URL", "")
        if online_store == "redis":
            if not redis_url:
                raise ConfigError("CLOSEDLOOP_ONLINE_STORE=redis needs CLOSEDLOOP_REDIS_URL (redis://...)")
            redis_url_parts(redis_url)  # refuse a malformed URL now, not at the first materialisation
        scheduling = Scheduling.from_env(env)
        dask_scheduler = (env.get("CLOSEDLOOP_DASK_SCHEDULER") or "").strip()
        if dask_scheduler and "://" not in dask_scheduler:
            raise ConfigError(f"CLOSEDLOOP_DASK_SCHEDULER={dask_scheduler!r}: expected an address such as "
                              "tcp://dask-scheduler:8786, or empty for a local cluster")
        registry = registry_root = env.get("CLOSEDLOOP_FEAST_REGISTRY") or str(home / "feast" / "registry.db")
        if is_database_url(registry):
            check_database_registry(registry)  # a SQL registry is shared: each model is a Feast project of its own
        elif entry.namespaced:  # a registry file of its own, next to where the root model's would be
            head, _, tail = registry.rstrip("/").rpartition("/")
            registry = f"{head}/{entry.name}/{tail}" if head else f"{entry.name}/{tail}"
        return cls(
            home=home,
            lake_uri=f"{lake_uri}/models/{entry.name}" if entry.namespaced else lake_uri,
            config_path=entry.config_path,
            model=entry.name,
            namespaced=entry.namespaced,
            models_dir=None if (env.get("CLOSEDLOOP_CONFIG") or "").strip() else models_dir(env),
            lake_root=lake_uri,
            feast_registry_root=registry_root,
            mlflow_tracking_uri=tracking,
            mlflow_registry_uri=env.get("MLFLOW_REGISTRY_URI") or tracking,
            mlflow_artifact_root=artifacts,
            mlflow_ui_url=check_mlflow_ui_url(env.get("CLOSEDLOOP_MLFLOW_UI_URL")),
            feast_repo=Path(env.get("CLOSEDLOOP_FEAST_REPO") or REPO_ROOT / "feature_repo").resolve(),
            feast_registry=registry,
            device=device,
            time_schedules=scheduling.time_schedules,
            storage_options=storage_options,
            task_retries=scheduling.task_retries,
            retry_delay_seconds=scheduling.retry_delay_seconds,
            task_timeout_minutes=scheduling.task_timeout_minutes,
            allowed_roots=roots,
            online_store=online_store,
            redis_url=redis_url,
            training_queue=scheduling.training_queue,
            training_pod_template=scheduling.training_pod_template,
            dask_scheduler=dask_scheduler,
            serve_token=env.get("CLOSEDLOOP_SERVE_TOKEN", "").strip(),
        )

    @classmethod
    def deployment(cls, env: dict[str, str] | None = None) -> Settings:
        """The settings for what every model shares (the home, Airflow's, MLflow's store, the alert file): those of
        the model a process works on, or of the first model when there is no way to choose one, so that a
        deployment of namespaced models only still prepares its Airflow home and builds its links."""
        env = dict(os.environ if env is None else env)
        try:
            return cls.from_env(env)
        except ConfigError:
            entries = model_entries(env)
            if not entries:
                raise
            return cls.from_env(env, model=entries[0].name)

    def check_uri(self, uri: str, what: str) -> str:
        """Refuse (ConfigError) a URI outside the allowed roots or climbing out of them; see the module doc."""
        return check_uri(uri, self.allowed_roots, what)

    @cached_property
    def config(self) -> Config:
        """The versioned model and policy configuration (of :attr:`model`)."""
        config = Config.load(self.config_path)
        check_model_name(config, self.model, self.namespaced)
        return config

    @property
    def feast_dir(self) -> Path:
        """Where Feast keeps the SQLite online store (embedded default): ``feast/``, or ``feast/<model>/`` when
        the model is namespaced."""
        return self.home / "feast" / self.model if self.namespaced else self.home / "feast"

    @property
    def feast_project(self) -> str:
        """The model's Feast project: ``closedloop`` for the root layout, ``closedloop_<model>`` when namespaced
        (a shared SQL registry or Redis online store keeps each model's definitions and rows apart by it)."""
        return f"closedloop_{self.model}" if self.namespaced else "closedloop"

    @property
    def monitoring_experiment(self) -> str:
        """The MLflow experiment of the model's monitoring runs (one per window end)."""
        return f"{self.model}-monitoring" if self.namespaced else "closedloop-monitoring"

    def ensure_dirs(self) -> None:
        """Create the local directories of the embedded defaults (no-op for remote stores)."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.feast_dir.mkdir(parents=True, exist_ok=True)
        if self.mlflow_tracking_uri.startswith("sqlite:///"):
            Path(self.mlflow_tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if self.mlflow_artifact_root.startswith("file://"):
            Path(self.mlflow_artifact_root.removeprefix("file://")).mkdir(parents=True, exist_ok=True)
        if self.lake_uri.startswith("file://"):
            Path(self.lake_uri.removeprefix("file://")).mkdir(parents=True, exist_ok=True)


def check_model_name(config: Config, name: str, namespaced: bool) -> None:
    """Refuse (ConfigError naming the file and key) a model whose ``model.name`` is not the name it is known by
    (its folder's), or, when namespaced, a name that cannot be part of DAG ids and a Feast project."""
    if name and config.model_name != name:
        raise ConfigError(f"{config.path}: model.name={config.model_name!r}: must be {name!r}, the name of its "
                          "folder (a model's folder name is its id)")
    if namespaced and not MODEL_NAME.fullmatch(config.model_name):
        raise ConfigError(f"{config.path}: model.name={config.model_name!r}: a namespaced model's name is "
                          "lowercase letters, digits and '_', starting with a letter (at most 40)")


def check_model(entry: ModelEntry) -> Config:
    """Load ``entry``'s configuration and schema as its tasks will; ConfigError / ContractError when refused."""
    config = Config.load(entry.config_path)
    check_model_name(config, entry.name, entry.namespaced)
    load_contract(config.schema_path)
    return config


def validate_config(raw: dict[str, Any], path: Path) -> ClosedloopConfig:
    """``raw`` validated by :class:`~closedloop.core.config_model.ClosedloopConfig`; ConfigError naming the file and
    every problem's key path, one line each (``closedloop.yaml: monitoring.calibraton: unknown key (known: ...)``)."""
    try:
        return ClosedloopConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            where = ".".join(str(p) for p in loc) or "(top level)"
            if error["type"] == "extra_forbidden":
                known = known_keys(loc[:-1])
                listed = f" (known: {', '.join(known)})" if known else ""
                problems.append(f"{path.name}: {where}: unknown key{listed}")
            elif error["type"] == "missing":
                problems.append(f"{path.name}: {where}: missing required key")
            else:
                problems.append(f"{path.name}: {where}={error.get('input')!r}: {error['msg'][0].lower()}"
                                f"{error['msg'][1:]}")
        raise ConfigError(f"{path}: {len(problems)} problem(s) in the configuration:\n" + "\n".join(problems)) from None


@dataclass(frozen=True)
class Config:
    """The versioned configuration file: data set, model, training, gate and ingest policy.

    Code reads :attr:`typed` (every key known and typed, every default filled in); :attr:`raw` is the file as
    parsed (its hash is the lineage's, and a test may copy and change it to build another configuration)."""

    path: Path
    raw: dict[str, Any]
    # the same file, validated: every key known and of its type, every default filled in (config_model)
    typed: ClosedloopConfig = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.typed is None:  # built from a dict rather than loaded
            object.__setattr__(self, "typed", validate_config(self.raw, self.path))

    @classmethod
    def load(cls, path: Path) -> Config:
        """Load and check the configuration at ``path``."""
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError as exc:
            moved = ""
            if path.parts[-3:] == ("include", "config", "closedloop.yaml"):
                moved = ("; the shipped configuration moved to models/card_fraud/closedloop.yaml (unset "
                         "CLOSEDLOOP_CONFIG to run every model of models/, or point it there)")
            raise ConfigError(f"{path}: configuration file not found (set CLOSEDLOOP_CONFIG){moved}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        missing = {"dataset", "model", "training", "gate"} - set(raw)
        if missing:
            raise ConfigError(f"{path}: missing section(s) {sorted(missing)}")
        return cls(path=path, raw=raw, typed=validate_config(raw, path))

    @property
    def schema_path(self) -> Path:
        """The data contract (schema file) of the data set, relative paths taken from the config's folder."""
        p = Path(self.typed.dataset.schema_)
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    @property
    def model_name(self) -> str:
        return self.typed.model.name

    @property
    def monitoring(self) -> MonitoringSection:
        """The typed ``monitoring`` section; ConfigError when the file has none."""
        if self.typed.monitoring is None:
            raise ConfigError(f"{self.path}: no monitoring section (monitoring and calibration need one)")
        return self.typed.monitoring

    def sha256(self) -> str:
        """Content hash of the configuration file (lineage)."""
        import hashlib

        return hashlib.sha256(self.path.read_bytes()).hexdigest()
