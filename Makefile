# closedloop: the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
CLOSEDLOOP_HOME ?= $(CURDIR)/.closedloop
ifeq ($(strip $(CLOSEDLOOP_HOME)),)
$(error CLOSEDLOOP_HOME is set but empty: unset it (the default is .closedloop in the checkout) or name a folder)
endif
export CLOSEDLOOP_HOME
export AIRFLOW_HOME := $(CLOSEDLOOP_HOME)/airflow
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export NO_COLOR := 1
export PYTHONWARNINGS := ignore::DeprecationWarning,ignore::FutureWarning

UV ?= $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.tools/bin/uv)
VENV := .venv
BIN := $(VENV)/bin
# `airflow standalone` starts its components as `airflow ...` from the PATH: the venv's, without activating it
export PATH := $(CURDIR)/$(BIN):$(PATH)
# the port of `make airflow`'s UI and API (the tasks reach the API there too); not 8793/8794, where the
# scheduler and the triggerer serve their logs
AIRFLOW_PORT ?= 8080

# The model of generate, retrain, status and demo-retrain: a folder of models/ (`make demo-retrain MODEL=churn`);
# empty: CLOSEDLOOP_MODEL, else the default model (card_fraud, the one with the root layout).
MODEL ?=
ifneq ($(strip $(MODEL)),)
export CLOSEDLOOP_MODEL := $(MODEL)
endif

# The demo's data set: fixed dates, so that every run of the demo is the same.
DEMO_START ?= 2026-03-01
DEMO_DAYS ?= 45
DEMO_WINDOW_START ?= 2026-03-01
DEMO_WINDOW_END ?= 2026-03-29

.PHONY: help install demo demo-retrain test test-fast reliability lint format airflow-home airflow generate retrain status clean browser prometheus \
  bench bench-quick dashboard-screenshot docs

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(UV):
	@echo "uv not found: installing it into .tools/"
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet 'uv>=0.5'

# --compile-bytecode: this machine (and CI) sets PYTHONDONTWRITEBYTECODE=1, so without .pyc files written
# here every Airflow task process would compile Airflow, MLflow, Feast, GX and Evidently from source again
# (import airflow.sdk 3.2 s -> 1.5 s, mlflow 3.7 s -> 1.4 s). The project's own sources too, for the same reason.
$(BIN)/closedloop: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python $(PYTHON) --compile-bytecode
	$(BIN)/python -m compileall -q -j 0 include dags plugins > /dev/null
	@touch $@

install: $(BIN)/closedloop  ## Build .venv from the lock file (bootstraps uv when missing)

airflow-home: install  ## Write the embedded Airflow home and migrate its database (closedloop airflow-config)
	$(BIN)/closedloop airflow-config

generate: install  ## Write the demo data set into the lake's landing zone
	$(BIN)/closedloop generate --start $(DEMO_START) --days $(DEMO_DAYS)

# the model's retraining DAG: `retraining`, or `<model>.retraining` for a namespaced model (closedloop models)
retrain: airflow-home  ## Run the retraining DAG once on the demo window (airflow dags test; MODEL=<name> for another model)
	@dag=$$($(BIN)/closedloop models --dag-id retraining) || exit 1; \
	conf='{"window_start": "$(DEMO_WINDOW_START)", "window_end": "$(DEMO_WINDOW_END)", "reason": "make demo"}'; \
	echo "$(BIN)/airflow dags test $$dag -c '$$conf'"; \
	$(BIN)/airflow dags test $$dag -c "$$conf" > $(CLOSEDLOOP_HOME)/retraining-demo.log 2>&1 \
	  || { tail -n 80 $(CLOSEDLOOP_HOME)/retraining-demo.log; echo "retraining failed: see $(CLOSEDLOOP_HOME)/retraining-demo.log"; exit 1; }; \
	grep -o "DagRun Finished: dag_id=$$dag,.*run_duration=[0-9.]*, state=[a-z_]*" $(CLOSEDLOOP_HOME)/retraining-demo.log \
	  | sed -E "s/.*dag_id=([^,]*),.*run_id=([^,]*).*run_duration=([0-9.]*), state=([a-z_]*)/\1 run \2: \4 in \3 s/" || true

status: install  ## Show champion, candidates and promotion history
	$(BIN)/closedloop status

demo: install  ## The closed loop on the real scheduler: history, normal days, drift, a retrain, a summary
	@echo "A fresh $(CLOSEDLOOP_HOME) for the demo (its dates are fixed)"
	@rm -rf $(CLOSEDLOOP_HOME)
	@$(MAKE) --no-print-directory airflow-home
	$(BIN)/closedloop demo
	@echo
	@$(BIN)/closedloop status

demo-retrain: install airflow-home generate retrain  ## Only the first step: generate data and run retraining once
	@echo
	@$(BIN)/closedloop status
	@echo
	@echo "MLflow UI:  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CLOSEDLOOP_HOME)/mlflow/mlflow.db"

airflow: install  ## Airflow's UI, scheduler and the rest on the embedded home (http://localhost:$AIRFLOW_PORT, 8080)
	@set -o pipefail; $(BIN)/closedloop airflow-config --show-login | tail -n 1
	@echo "Airflow UI: http://localhost:$(AIRFLOW_PORT) (home $(AIRFLOW_HOME); Ctrl-C stops every component)"
	CLOSEDLOOP_SCHEDULES=manual AIRFLOW__API__PORT=$(AIRFLOW_PORT) AIRFLOW__API__BASE_URL=http://localhost:$(AIRFLOW_PORT) \
	  $(BIN)/airflow standalone

# $(call debian_package,PACKAGE,COMMANDS IT PROVIDES,WHAT NEEDS IT): apt-get it as root when a command is missing
define debian_package
@missing=; for c in $(2); do command -v $$c > /dev/null || missing=1; done; [ -z "$$missing" ] && exit 0; \
if [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
  echo "installing Debian's $(1) for $(3)"; \
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1) > /dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(1) > /dev/null; } \
    || echo "$(1) could not be installed: without it $(3) skip, or fail under CI=true"; \
else \
  echo "$(1) is missing: run 'sudo apt-get install -y --no-install-recommends $(1)' (without it $(3) skip, or fail under CI=true)"; \
fi
endef

browser:  ## Debian's chromium for the browser test of the UI (apt-get, as root; skipped when present)
	$(call debian_package,chromium,chromium,tests/integration/test_browser_ui.py)

prometheus:  ## Debian's prometheus (with promtool) for the rule and scrape tests (apt-get, as root; skipped when present)
	$(call debian_package,prometheus,promtool prometheus,tests/deploy/test_prometheus.py and the scrape test)

dashboard-screenshot: install prometheus  ## docs/screenshots/dashboard-loop.png: the loop's panels from a real Prometheus scrape (2-4 min)
	$(BIN)/python deploy/dashboard_screenshot.py --out docs/screenshots/dashboard-loop.png

test: install browser prometheus  ## Set up and run the test suite
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest

# -m replaces pyproject's `-m 'not bench'` (pytest keeps the last -m), so bench stays out here too
test-fast: install  ## The edit-test loop: ruff, then the unit, DAG-policy and data tests without the slow ones (~1.5 min)
	$(BIN)/ruff check .
	$(BIN)/pytest tests/unit tests/dags tests/data -m "not slow and not bench" -q -p no:cacheprovider

reliability: install  ## Run the tests that try to break closedloop and regenerate RELIABILITY.md from their results
	CLOSEDLOOP_WRITE_RELIABILITY=1 $(BIN)/pytest -m reliability -p no:cacheprovider -q
	$(BIN)/pytest tests/test_reliability_doc.py -p no:cacheprovider -q

docs: install  ## Regenerate docs/reference/: configuration.md, cli.md, dags.md (tests/unit/test_*_reference.py fail while stale)
	$(BIN)/python -m closedloop.devtools.config_reference
	$(BIN)/python -m closedloop.devtools.cli_reference
	$(BIN)/python -m closedloop.devtools.dag_reference

lint: install  ## ruff and the import contract (lint-imports: the layers of include/closedloop)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/ruff format --check include dags tests feature_repo || true

BENCH_SIZES ?= 100k,1m,10m
BENCH_STAGES ?= validation,materialisation,training_set,training,scoring,drift,orchestration,end_to_end

bench: install  ## Every stage against its floor at 100k, 1M and 10M rows (long: about two hours on 2 cores, most at 10M)
	$(BIN)/python bench/run.py --sizes $(BENCH_SIZES) --stages $(BENCH_STAGES) --out bench/results/latest.jsonl
	$(BIN)/python bench/report.py bench/results/latest.jsonl > bench/results/latest.md
	@echo "tables: bench/results/latest.md (BENCHMARKS.md quotes them)"

bench-quick: install  ## The benchmark suite on a tiny world, checked by tests/bench (CI runs it after make test)
	$(BIN)/pytest -m bench tests/bench -p no:cacheprovider

clean:  ## Delete all local state ($CLOSEDLOOP_HOME): a clean start
	rm -rf $(CLOSEDLOOP_HOME)
