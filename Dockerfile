# syntax=docker/dockerfile:1
# closedloop's one image, for every service of docker-compose.yaml that runs our code: the Airflow components
# (api-server, scheduler, dag-processor, triggerer, Celery workers) with the DAGs and the closedloop package,
# and the MLflow tracking server.
#
# Installed from the lock file: the builder runs `uv sync --frozen` on uv.lock (with the `production` extra,
# and `gpu` for the GPU worker's image: the build argument CLOSEDLOOP_EXTRAS)
# into a virtual environment, so the image holds exactly the versions that CI tests; nothing is resolved at
# build time and nothing is pip-installed at start-up. The runtime stage is the same Python image with that
# environment copied in (a venv only works under the interpreter it was made with) and no build tools.
# Not apache/airflow:3.3.2-python3.11: that image carries its own Airflow and providers, installed from
# Airflow's constraints into the user site; uv.lock's set would be a second, different one beside it.
#
# No HEALTHCHECK here on purpose: the image runs eight different processes, each with its own notion of
# healthy (an HTTP endpoint, a job heartbeat, a Celery ping); docker-compose.yaml gives each service its own.

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:3.11.14-slim-bookworm AS builder
COPY --from=uv /uv /usr/local/bin/uv
# The extras of pyproject.toml installed from the lock: `production` always; the GPU worker's image adds `gpu`
# (CuPy, so that on cuda the model matrix is built on the device: docs/explanation/gpu-matrix.md). docker-compose.yaml's
# airflow-worker-gpu builds its own image with CLOSEDLOOP_EXTRAS="production gpu"; every other service uses
# the default, without CuPy's CUDA libraries.
ARG CLOSEDLOOP_EXTRAS="production"
# SC2046 is ignored on the two syncs below: the unquoted $(printf ...) is meant to split into one --extra per word.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/opt/closedloop/.venv
WORKDIR /opt/closedloop
# Dependencies first (the slow layer, kept while uv.lock does not change), then the project itself.
COPY pyproject.toml uv.lock README.md ./
# hadolint ignore=SC2046
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev $(printf -- "--extra %s " ${CLOSEDLOOP_EXTRAS}) --no-install-project
# Editable, as `make install` does: the package stays at include/closedloop, so its REPO_ROOT is
# /opt/closedloop and the defaults for the config, the schemas and feature_repo/ hold in the image too.
COPY include/ include/
# hadolint ignore=SC2046
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev $(printf -- "--extra %s " ${CLOSEDLOOP_EXTRAS})

FROM python:3.11.14-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="closedloop" \
      org.opencontainers.image.description="Airflow, the closedloop DAGs and package, and the MLflow server" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed, non-root uid (Airflow's own 50000) that owns only what the services write: logs and scratch state.
RUN groupadd --system --gid 50000 closedloop \
    && useradd --system --uid 50000 --gid closedloop --create-home --home-dir /home/closedloop \
       --shell /usr/sbin/nologin closedloop
ENV PATH=/opt/closedloop/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    AIRFLOW_HOME=/opt/closedloop/airflow \
    CLOSEDLOOP_HOME=/var/lib/closedloop
WORKDIR /opt/closedloop
# Code and configuration stay owned by root: the services can read them, not change them.
COPY --from=builder /opt/closedloop/.venv .venv
COPY pyproject.toml README.md ./
COPY include/ include/
COPY dags/ dags/
COPY plugins/ plugins/
COPY feature_repo/ feature_repo/
COPY models/ models/
COPY deploy/mlflow/ deploy/mlflow/
RUN mkdir -p /opt/closedloop/airflow/logs /var/lib/closedloop \
    && chown -R closedloop:closedloop /opt/closedloop/airflow /var/lib/closedloop
# Numeric, so that a runtime (Kubernetes runAsNonRoot) can tell without /etc/passwd that it is not root.
USER 50000:50000
# DuckDB (Feast's offline store over s3://) loads its httpfs extension from ~/.duckdb: put it there now from
# the duckdb-extension-httpfs wheel, so that no task ever tries to download it (or needs a writable home).
RUN python -c "from closedloop.stages.features import ensure_duckdb_httpfs; ensure_duckdb_httpfs()"
# 8080: Airflow's API server and UI; 8793: a worker's log server; 8974: the scheduler's health check; 5000: MLflow.
EXPOSE 8080 8793 8974 5000
CMD ["airflow", "version"]
