"""The Kubernetes path, checked statically: deploy/helm/values.yaml for the official Airflow chart.

No cluster and no chart download here: the file parses, runs the KubernetesExecutor on closedloop's image,
holds no secret (every one is a Kubernetes Secret named by reference), gives every task pod each setting
closedloop reads, and the pod template of train_model (named by CLOSEDLOOP_TRAINING_POD_TEMPLATE, which the
DAG turns into the task's executor_config: tests/dags/test_task_placement.py) asks for one NVIDIA GPU. Every chart
key it sets is one the chart has: tests/deploy/airflow_chart_keys.yaml, transcribed from the chart's values.yaml
at a named commit (a trimmed list, not the chart's 400 kB values.schema.json, of which only an old version
was at hand).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from closedloop.core.settings import REPO_ROOT

VALUES = REPO_ROOT / "deploy" / "helm" / "values.yaml"
CHART_KEYS = Path(__file__).with_name("airflow_chart_keys.yaml")
# environment names (MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY) and chart keys (fernetKey, pass)
SECRETISH = re.compile(r"PASSWORD|SECRET|_KEY|TOKEN|CREDENTIAL|REDIS_URL|USERNAME|[a-z](Key|Password|Secret|Token)$"
                       r"|^(pass|password|secret|token)$")
# keys whose value is the NAME of a Kubernetes Secret or of a key in one, never its content
REFERENCE = re.compile(r"(SecretName|secretName|secretKey)$")


def _stack():
    """tests/deploy/test_stack.py's parser of the variables closedloop reads (one definition of it)."""
    spec = importlib.util.spec_from_file_location("closedloop_test_stack", Path(__file__).with_name("test_stack.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(VALUES.read_text())


@pytest.fixture(scope="module")
def settings_map(values) -> dict:
    return yaml.safe_load(values["extraConfigMaps"]["closedloop-settings"]["data"])


@pytest.fixture(scope="module")
def gpu_pod(values) -> dict:
    files = yaml.safe_load(values["extraConfigMaps"]["closedloop-gpu-pod-template"]["data"])
    return yaml.safe_load(files["gpu-training.yaml"])


def _scalars(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _scalars(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _scalars(v, (*path, str(i)))
    else:
        yield path, node


def test_the_chart_runs_the_kubernetes_executor_on_closedloops_image(values):
    assert values["executor"] == "KubernetesExecutor"
    assert values["airflowVersion"].startswith("3.")
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yaml").read_text())
    default_image = re.search(r":-([^}]+)\}", compose["x-closedloop-image"]["image"]).group(1)
    image = values["images"]["airflow"]
    assert f"{image['repository']}:{image['tag']}" == default_image  # the image docker compose builds
    assert values["config"]["core"]["dags_folder"] == "/opt/closedloop/dags"
    assert values["airflowHome"] == "/opt/closedloop/airflow"  # the Dockerfile's AIRFLOW_HOME
    # no create-user job, so no Admin with the chart's well-known password; and no Airflow 2 `webserver` section
    assert values["createUserJob"]["enabled"] is False and "webserver" not in values
    assert values["postgresql"]["enabled"] is False and values["redis"]["enabled"] is False


def test_no_secret_is_written_in_the_values(values, settings_map, gpu_pod):
    everything = [*_scalars(values), *_scalars(settings_map), *_scalars(gpu_pod)]
    for path, value in everything:
        key = path[-1] if path else ""
        if REFERENCE.search(key) or value in (None, "", False, True) or not isinstance(value, str):
            continue
        assert not SECRETISH.search(key), f"{'.'.join(path)} holds a value: reference a Kubernetes Secret instead"
        assert not re.search(r"://[^/\s:@]*:[^/\s@]+@", value), f"{'.'.join(path)}: a password inside a URI"
    for name in ("fernetKey", "apiSecretKey", "jwtSecret", "webserverSecretKey"):
        assert not values.get(name), f"{name}: use {name}SecretName"
    assert "metadataConnection" not in values.get("data", {})  # the connection with its password: a Secret
    assert values["data"]["metadataSecretName"] and values["fernetKeySecretName"] and values["jwtSecretName"]
    # and the check bites: a literal password is found
    leaked = {**settings_map, "MLFLOW_TRACKING_PASSWORD": "hunter2"}
    assert any(SECRETISH.search(k) and v for k, v in leaked.items() if isinstance(v, str))


def test_every_task_pod_gets_every_setting_closedloop_reads(values, settings_map, gpu_pod):
    stack = _stack()
    read = stack.variables_read_by(stack.PKG / "settings.py") | stack.variables_read_by(stack.PKG / "secrets.py")
    read -= {"AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"}  # the chart's own, from data.metadataSecretName
    read -= stack.SERVE_ONLY  # the scoring service's own token: no task reads it (the chart runs no scoring service)
    read -= stack.UNSET_ALTERNATIVES  # CLOSEDLOOP_MODELS is given; a task names its model
    in_secret = {"CLOSEDLOOP_REDIS_URL"}  # holds the Redis password: key of closedloop-secrets
    assert not (read - in_secret) - set(settings_map), sorted((read - in_secret) - set(settings_map))
    assert not in_secret & set(settings_map)
    env_from = yaml.safe_load(values["extraEnvFrom"])
    assert {"configMapRef": {"name": "closedloop-settings"}} in env_from
    assert {"secretRef": {"name": "closedloop-secrets"}} in env_from
    base = gpu_pod["spec"]["containers"][0]
    assert base["envFrom"] == env_from  # the GPU pod has the same settings and secrets as every other pod
    assert "closedloop-secrets" in VALUES.read_text().split("---")[0]  # and the header says what it holds
    for name in in_secret | {"AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"}:
        assert f"{name}=" in VALUES.read_text().split("---")[0], name


def test_the_training_pod_asks_for_one_gpu_and_the_scheduler_can_read_it(values, settings_map, gpu_pod):
    base = gpu_pod["spec"]["containers"][0]
    assert gpu_pod["kind"] == "Pod" and base["name"] == "base"  # the KubernetesExecutor runs the task in `base`
    assert base["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "CLOSEDLOOP_DEVICE", "value": "cuda"} in base["env"]
    image = values["images"]["airflow"]
    assert base["image"] == f"{image['repository']}:{image['tag']}"
    assert gpu_pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # the path the task's executor_config names is where the scheduler mounts the template
    template = Path(settings_map["CLOSEDLOOP_TRAINING_POD_TEMPLATE"])
    mounts = {m["name"]: m["mountPath"] for m in values["scheduler"]["extraVolumeMounts"]}
    volumes = {v["name"]: v["configMap"]["name"] for v in values["scheduler"]["extraVolumes"]}
    (volume,) = [n for n, p in mounts.items() if str(template.parent) == p]
    assert volumes[volume] == "closedloop-gpu-pod-template"
    assert template.name in yaml.safe_load(values["extraConfigMaps"][volumes[volume]]["data"])
    # every other task pod stays on the CPU
    assert "nvidia.com/gpu" not in str(values["workers"]) and settings_map["CLOSEDLOOP_DEVICE"] == "cpu"


def _unknown_chart_keys(values: dict, chart: dict) -> list[str]:
    """The key paths of ``values`` that the chart (as listed in airflow_chart_keys.yaml) does not have."""
    sections, free = chart["sections"], set(chart["free"])
    unknown = [key for key in values if key not in chart["top_level"]]

    def walk(node: dict, path: str) -> None:
        for key, child in node.items():
            if key not in sections[path]:
                unknown.append(f"{path}.{key}")
            elif f"{path}.{key}" in sections and isinstance(child, dict):
                walk(child, f"{path}.{key}")

    for key, node in values.items():
        if isinstance(node, dict) and key in chart["top_level"] and key not in free:
            if key in sections:
                walk(node, key)
            else:
                unknown.append(f"{key}.* (a section {CHART_KEYS.name} does not list)")
    for name, entry in values.get("extraConfigMaps", {}).items():
        unknown += [f"extraConfigMaps.{name}.{k}" for k in entry if k not in chart["extraConfigMaps_entry"]]
    return unknown


def test_every_chart_key_is_one_the_chart_has(values):
    chart = yaml.safe_load(CHART_KEYS.read_text())
    assert chart["source"]["commit"] in VALUES.read_text()  # the values file names what it was checked against
    assert _unknown_chart_keys(values, chart) == []
    for name, entry in values["extraConfigMaps"].items():
        assert "{{" not in entry["data"], name  # the chart passes each ConfigMap's data through `tpl`
    # and the check bites: keys written from memory that the chart does not have are found
    wrong = {**values, "apiServerSecretKeySecretName": "x", "scheduler": {"extraVolume": []},
             "images": {"airflow": {"repo": "closedloop"}}, "extraConfigMaps": {"c": {"data": "", "immutable": True}}}
    assert _unknown_chart_keys(wrong, chart) == [
        "apiServerSecretKeySecretName", "images.airflow.repo", "scheduler.extraVolume", "extraConfigMaps.c.immutable"]
