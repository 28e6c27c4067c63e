"""Where tasks run: `train_model` follows CLOSEDLOOP_TRAINING_QUEUE (and its pod template); nothing else moves.

Each case parses the whole DAGs folder in a fresh interpreter with the setting in its environment, as the
dag-processor of a deployment does, and reads every task's queue and executor_config from the DagBag.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
print(json.dumps({"errors": {k: str(v) for k, v in bag.import_errors.items()},
                  "tasks": {f"{d.dag_id}.{t.task_id}": {"queue": t.queue, "executor_config": t.executor_config}
                            for d in bag.dags.values() for t in d.tasks}}))
"""


def placement(**settings: str) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CLOSEDLOOP_TRAINING_QUEUE", "CLOSEDLOOP_TRAINING_POD_TEMPLATE")}
    env.update(settings)
    out = subprocess.run([sys.executable, "-c", _PROBE, str(REPO / "dags")], capture_output=True, text=True,
                         env=env, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    return report["tasks"]


@pytest.fixture(scope="module")
def by_default() -> dict[str, dict]:
    return placement()


@pytest.fixture(scope="module")
def on_a_gpu_host() -> dict[str, dict]:
    return placement(CLOSEDLOOP_TRAINING_QUEUE="gpu",
                     CLOSEDLOOP_TRAINING_POD_TEMPLATE="/opt/airflow/pod_templates/gpu-training.yaml")


def test_every_task_runs_on_the_default_queue_by_default(by_default):
    assert "retraining.train_model" in by_default and len(by_default) > 10
    assert {name: t["queue"] for name, t in by_default.items() if t["queue"] != "default"} == {}
    assert {name: t["executor_config"] for name, t in by_default.items() if t["executor_config"]} == {}


def test_training_follows_the_setting_and_nothing_else_moves(by_default, on_a_gpu_host):
    assert set(on_a_gpu_host) == set(by_default)
    for dag_id in ("retraining", "churn.retraining"):  # every model's training moves
        train = on_a_gpu_host.pop(f"{dag_id}.train_model")
        assert train["queue"] == "gpu"
        assert train["executor_config"] == {"pod_template_file": "/opt/airflow/pod_templates/gpu-training.yaml"}
    moved = {name: t for name, t in on_a_gpu_host.items() if t["queue"] != "default" or t["executor_config"]}
    assert moved == {}, f"only train_model may leave the default queue: {sorted(moved)}"


def test_a_malformed_queue_name_is_refused(tmp_path):
    from closedloop.core.errors import ConfigError
    from closedloop.core.settings import Settings

    assert Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path)}).training_queue == "default"
    with pytest.raises(ConfigError, match="CLOSEDLOOP_TRAINING_QUEUE"):
        Settings.from_env({"CLOSEDLOOP_HOME": str(tmp_path), "CLOSEDLOOP_TRAINING_QUEUE": "gpu queue"})
