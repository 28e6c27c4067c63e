#!/usr/bin/env bash
# One role and one database per service, so that Airflow cannot read MLflow's tables nor the other way round:
#   airflow      the Airflow metadata database (and the Celery result backend), owned by the role airflow
#   mlflow       MLflow's tracking and registry store, owned by the role mlflow
#   mlflow_auth  the users and permissions of MLflow's basic-auth app, owned by the role mlflow
#   feast        Feast's SQL registry (feature definitions, materialisation state), owned by the role feast:
#                shared safely by every worker that applies and materialises at once (a registry file is not)
# Run by the postgres image once, when its data volume is empty (docker-entrypoint-initdb.d); the passwords
# come from the environment (.env), never from this file. psql quotes them (:'name'), so any character is safe.
set -euo pipefail
: "${AIRFLOW_DB_PASSWORD:?set AIRFLOW_DB_PASSWORD in .env}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD in .env}"
: "${FEAST_DB_PASSWORD:?set FEAST_DB_PASSWORD in .env}"

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v af_pw="$AIRFLOW_DB_PASSWORD" -v ml_pw="$MLFLOW_DB_PASSWORD" -v fe_pw="$FEAST_DB_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'af_pw';
CREATE ROLE mlflow LOGIN PASSWORD :'ml_pw';
CREATE ROLE feast LOGIN PASSWORD :'fe_pw';
CREATE DATABASE airflow OWNER airflow;
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE feast OWNER feast;
-- Only each owner may connect to its databases (PUBLIC may by default).
REVOKE ALL ON DATABASE airflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow FROM PUBLIC;
REVOKE ALL ON DATABASE mlflow_auth FROM PUBLIC;
REVOKE ALL ON DATABASE feast FROM PUBLIC;
SQL
