"""Many models, one deployment: the models folder, the model a process works on, and where each keeps its state.

Function level: :func:`closedloop.core.settings.model_entries`, :func:`~closedloop.core.settings.select_model` and
:meth:`~closedloop.core.settings.Settings.from_env` on real copies of the shipped ``models/`` folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from closedloop.core.errors import ConfigError
from closedloop.core.settings import DEFAULT_MODELS, Settings, model_entries, select_model
from closedloop.stages.feast_config import feast_env

SHIPPED = sorted(p.name for p in DEFAULT_MODELS.iterdir() if (p / "closedloop.yaml").is_file())


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {"CLOSEDLOOP_HOME": str(home), **extra}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A copy of the shipped models folder, to break or extend."""
    shutil.copytree(DEFAULT_MODELS, tmp_path / "models")
    return tmp_path / "models"


def test_card_fraud_and_churn_ship_both_enabled():
    assert SHIPPED == ["card_fraud", "churn"]
    entries = {e.name: e for e in model_entries({})}
    assert set(entries) == set(SHIPPED)
    assert entries["card_fraud"].namespaced is False and entries["churn"].namespaced is True
    assert [entries["card_fraud"].dag_id("ingest"), entries["churn"].dag_id("ingest")] == ["ingest", "churn.ingest"]


def test_the_root_model_is_the_default_and_a_named_model_is_chosen(tmp_path: Path):
    assert select_model({}).name == "card_fraud"
    assert select_model({"CLOSEDLOOP_MODEL": "churn"}).name == "churn"
    assert select_model({"CLOSEDLOOP_MODEL": "churn"}, model="card_fraud").name == "card_fraud"
    with pytest.raises(ConfigError, match=r"model 'nope' not found in .*models \(models: card_fraud, churn\)"):
        select_model({}, model="nope")


def test_without_a_root_model_two_models_need_a_name(folder: Path):
    path = folder / "card_fraud" / "closedloop.yaml"
    path.write_text(path.read_text().replace("namespaced: false", "namespaced: true"))
    with pytest.raises(ConfigError, match=r"2 models in .* \(card_fraud, churn\): name one with --model"):
        select_model({"CLOSEDLOOP_MODELS": str(folder)})
    shutil.rmtree(folder / "churn")
    assert select_model({"CLOSEDLOOP_MODELS": str(folder)}).name == "card_fraud"  # the only one


def test_the_root_model_keeps_a_single_model_homes_layout(tmp_path: Path):
    """Upgrade path: card_fraud in the folder lives exactly where a single-model home kept its state."""
    home = tmp_path / "home"
    folder = Settings.from_env(_env(home))
    single = Settings.from_env(_env(home, CLOSEDLOOP_CONFIG=str(DEFAULT_MODELS / "card_fraud" / "closedloop.yaml")))
    for s in (folder, single):
        assert s.model == "card_fraud" and s.namespaced is False
        assert s.lake_uri == f"file://{home.resolve()}/lake"
        assert s.feast_registry == str(home.resolve() / "feast" / "registry.db")
        assert s.feast_dir == home.resolve() / "feast"
        assert (s.feast_project, s.monitoring_experiment) == ("closedloop", "closedloop-monitoring")
        assert s.config.model_name == "card_fraud" and s.config.typed.model.experiment == "closedloop-training"


def test_a_namespaced_model_keeps_its_state_apart(tmp_path: Path):
    home = tmp_path / "home"
    s = Settings.from_env(_env(home), model="churn")
    root = Settings.from_env(_env(home))
    assert s.lake_uri == f"{root.lake_uri}/models/churn"
    assert s.feast_registry == str(home.resolve() / "feast" / "churn" / "registry.db")
    assert s.feast_dir == home.resolve() / "feast" / "churn"
    assert (s.feast_project, s.monitoring_experiment) == ("closedloop_churn", "churn-monitoring")
    assert s.config.model_name == "churn" and s.config.typed.model.experiment == "churn-training"
    env = feast_env(s)
    assert env["CLOSEDLOOP_FEAST_PROJECT"] == "closedloop_churn" and "feast/churn/online_store.db" in \
        env["CLOSEDLOOP_FEAST_ONLINE_STORE"]
    # what is shared: the home (Airflow, the alerts file), MLflow's store, the allowed roots
    assert (s.home, s.mlflow_tracking_uri, s.allowed_roots) == (root.home, root.mlflow_tracking_uri, root.allowed_roots)
    s.check_uri(s.lake_uri + "/curated", "a churn URI")  # inside the allowed roots


def test_a_shared_registry_keeps_one_database_and_an_explicit_file_gets_a_folder_per_model(tmp_path: Path):
    sql = "postgresql://closedloop@db:5432/feast"
    assert Settings.from_env(_env(tmp_path, CLOSEDLOOP_FEAST_REGISTRY=sql), model="churn").feast_registry == sql
    s3 = Settings.from_env(_env(tmp_path, CLOSEDLOOP_FEAST_REGISTRY="s3://bucket/feast/registry.db"), model="churn")
    assert s3.feast_registry == "s3://bucket/feast/churn/registry.db"


def test_a_model_whose_name_is_not_its_folder_is_refused_naming_the_file_and_key(folder: Path, tmp_path: Path):
    shutil.copytree(folder / "churn", folder / "attrition")
    s = Settings.from_env(_env(tmp_path, CLOSEDLOOP_MODELS=str(folder)), model="attrition")
    with pytest.raises(ConfigError, match=r"attrition/closedloop.yaml: model.name='churn': must be 'attrition'"):
        _ = s.config


def test_a_namespaced_name_that_cannot_be_an_id_is_refused(folder: Path, tmp_path: Path):
    shutil.copytree(folder / "churn", folder / "Churn-2")
    path = folder / "Churn-2" / "closedloop.yaml"
    path.write_text(path.read_text().replace("name: churn ", "name: Churn-2 "))
    s = Settings.from_env(_env(tmp_path, CLOSEDLOOP_MODELS=str(folder)), model="Churn-2")
    with pytest.raises(ConfigError, match=r"model.name='Churn-2': a namespaced model's name is lowercase"):
        _ = s.config


def test_a_broken_model_breaks_only_its_own_settings(folder: Path, tmp_path: Path):
    path = folder / "churn" / "closedloop.yaml"
    path.write_text(path.read_text().replace("margin: 0.002", "margin: lots"))
    env = _env(tmp_path, CLOSEDLOOP_MODELS=str(folder))
    assert Settings.from_env(env).config.model_name == "card_fraud"  # the default model works
    churn = Settings.from_env(env, model="churn")  # where its state lives is still known
    assert churn.lake_uri.endswith("/models/churn")
    with pytest.raises(ConfigError, match=r"(?s)churn/closedloop.yaml.*gate.margin='lots'"):
        _ = churn.config


def test_the_old_configuration_path_says_where_it_moved(tmp_path: Path):
    old = tmp_path / "include" / "config" / "closedloop.yaml"
    s = Settings.from_env(_env(tmp_path, CLOSEDLOOP_CONFIG=str(old)))
    with pytest.raises(ConfigError, match=r"moved to models/card_fraud/closedloop\.yaml"):
        _ = s.config


def test_a_models_folder_that_is_not_one_is_refused(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"CLOSEDLOOP_MODELS=.*nowhere: not a folder"):
        Settings.from_env(_env(tmp_path, CLOSEDLOOP_MODELS=str(tmp_path / "nowhere")))


def test_what_every_model_shares_is_read_without_choosing_a_model(folder: Path, tmp_path: Path):
    """With namespaced models only and none named, a model's settings need a name; the deployment's do not."""
    path = folder / "card_fraud" / "closedloop.yaml"
    path.write_text(path.read_text().replace("namespaced: false", "namespaced: true"))
    env = _env(tmp_path, CLOSEDLOOP_MODELS=str(folder))
    with pytest.raises(ConfigError, match="name one with --model"):
        Settings.from_env(env)
    shared = Settings.deployment(env)
    assert shared.home == tmp_path.resolve() and shared.mlflow_tracking_uri.endswith("mlflow/mlflow.db")
