"""The typed model of the configuration (core.config_model): every shipped configuration validates; an unknown
key, a missing one or a wrong type is refused by Config.load with its path; the defaults are the documented ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from closedloop.core.config_model import ClosedloopConfig
from closedloop.core.errors import ConfigError
from closedloop.core.settings import DEFAULT_CONFIG, REPO_ROOT, Config

SHIPPED = [*sorted((REPO_ROOT / "models").glob("*/closedloop.yaml")),
           *sorted((REPO_ROOT / "examples").glob("*/closedloop.yaml")),
           REPO_ROOT / "bench" / "config" / "closedloop.yaml"]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_shipped_configuration_validates(path):
    config = Config.load(path)
    assert config.typed.model.name == config.raw["model"]["name"]
    assert config.typed.monitoring is not None and config.typed.training.params == config.raw["training"]["params"]


def test_there_are_shipped_configurations():
    assert len(SHIPPED) >= 4 and all(p.exists() for p in SHIPPED)


def _load_with(tmp_path: Path, change) -> Config:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    change(raw)
    path = tmp_path / "closedloop.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Config.load(path)


@pytest.mark.parametrize(("change", "says"), [
    (lambda raw: raw.update(monitorng={}), r"closedloop\.yaml: monitorng: unknown key \(known: alerts, dataset, "),
    (lambda raw: raw["monitoring"]["calibration"].update(calibraton=True),
     r"closedloop\.yaml: monitoring\.calibration\.calibraton: unknown key \(known: enabled, gap_days, "),
    (lambda raw: raw["training"]["pit_join"].update(call=3), r"training\.pit_join\.call: unknown key"),
    (lambda raw: raw["gate"]["bootstrap"].update(resamples="many"),
     r"gate\.bootstrap\.resamples='many': input should be a valid integer"),
    (lambda raw: raw["housekeeping"].update(keep_served_days=True), r"housekeeping\.keep_served_days=True: "),
    (lambda raw: raw["monitoring"]["key_features"].update(amount="high"), r"monitoring\.key_features\.amount='high'"),
    (lambda raw: raw["training"].update(engine="spark"), r"training\.engine='spark': input should be 'local' or"),
    (lambda raw: raw["model"].pop("experiment"), r"closedloop\.yaml: model\.experiment: missing required key"),
])
def test_a_bad_key_is_refused_with_its_path(tmp_path, change, says):
    with pytest.raises(ConfigError, match=says) as err:
        _load_with(tmp_path, change)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no pydantic traceback chained


def test_every_problem_is_named_on_its_own_line(tmp_path):
    def change(raw):
        raw["serving"]["max_bach"] = 10
        raw["skew"]["sample_rows"] = "2000"
    with pytest.raises(ConfigError) as err:
        _load_with(tmp_path, change)
    lines = str(err.value).splitlines()
    assert lines[0].endswith("2 problem(s) in the configuration:")
    assert sorted(lines[1:]) == ["closedloop.yaml: serving.max_bach: unknown key (known: log_flush_rows, "
                                 "log_flush_seconds, max_batch, poll_seconds, shadow_share)",
                                 "closedloop.yaml: skew.sample_rows='2000': input should be a valid integer"]


def test_free_form_maps_take_any_key(tmp_path):
    def change(raw):
        raw["training"]["params"]["max_bin"] = 128
        raw["training"]["dask"]["local_cluster"]["memory_limit"] = "2GB"
        raw["gate"]["guards"]["recall_at_fpr"] = 0.05
    typed = _load_with(tmp_path, change).typed
    assert typed.training.params["max_bin"] == 128 and typed.gate.guards["recall_at_fpr"] == 0.05


def test_the_defaults_are_the_documented_ones():
    minimal = {"dataset": {"schema": "s.yaml"}, "model": {"name": "m", "experiment": "e"},
               "training": {"split": {"train": 0.7, "validation": 0.15, "holdout": 0.15}, "target_fpr": 0.01,
                            "num_boost_round": 10, "early_stopping_rounds": 3, "params": {}},
               "gate": {"primary_metric": "roc_auc"}}
    c = ClosedloopConfig.model_validate(minimal)
    assert (c.ingest.label_grace_days, c.ingest.materialize_overlap_days) == (21, 1)
    assert (c.training.engine, c.training.part_rows, c.training.window_days, c.training.reference_sample_rows) == (
        "local", 500_000, 28, 5000)
    assert (c.training.pit_join.calls, c.training.pit_join.min_rows, c.training.pit_join.max_rows) == (
        20, 125_000, 1_000_000)
    assert (c.gate.margin, c.gate.min_holdout_positives, c.gate.floor, c.gate.guards) == (
        0.002, 20, None, {"pr_auc": 0.02, "log_loss": 0.01})
    assert (c.gate.bootstrap.resamples, c.gate.bootstrap.confidence, c.gate.bootstrap.seed) == (1000, 0.95, 0)
    assert c.training.dask.local_cluster.model_dump() == {"n_workers": 2, "threads_per_worker": 1, "processes": False}
    assert c.monitoring is None
    assert c.serving.model_dump() == {"max_batch": 1000, "poll_seconds": 30.0, "shadow_share": 0.1,
                                      "log_flush_rows": 5000, "log_flush_seconds": 10.0}
    assert c.skew.model_dump() == {"sample_rows": 2000, "feature_tolerance": 1e-6, "score_tolerance": 1e-6,
                                   "max_mismatch_share": 0.01}
    assert c.alerts.model_dump() == {"landing_delay_hours": 6.0, "lookback_days": 3}
    assert c.housekeeping.model_dump() == {"keep_served_days": 90, "keep_predictions_days": 90,
                                           "keep_training_sets_days": 180, "keep_monitoring_runs_days": 90,
                                           "keep_versions_days": 365, "keep_airflow_days": 30}


def _key_paths(d: dict, path: tuple[str, ...] = ()):
    for key, value in d.items():
        yield (*path, key)
        if isinstance(value, dict) and key not in ("params", "guards", "key_features"):  # free-form maps
            yield from _key_paths(value, (*path, key))


# the keys whose default is not the shipped file's value, each for a reason its description gives
NOT_THE_SHIPPED_VALUE = {
    "gate.floor",                   # on the scale of primary_metric, which has no default: unset, no floor
    "monitoring",                   # unset: no monitoring, no calibration at training
    "monitoring.key_features",      # names of the shipped data set's features
    "model.namespaced",             # card_fraud keeps the root layout; a new model is namespaced
}


def test_an_omitted_key_gets_the_shipped_value():
    """A new user who leaves a key out gets what the shipped configuration says, the safe value (a gate margin,
    a bootstrap, guards, two confirming windows of drift...), not a permissive one."""
    import copy

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    full = ClosedloopConfig.model_validate(raw)
    differs, optional = set(), 0
    for path in _key_paths(raw):
        fewer = copy.deepcopy(raw)
        section = fewer
        for key in path[:-1]:
            section = section[key]
        del section[path[-1]]
        try:
            typed = ClosedloopConfig.model_validate(fewer)
        except ValueError:  # a required key
            continue
        optional += 1
        if typed != full:
            differs.add(".".join(path))
    assert optional > 40 and differs == NOT_THE_SHIPPED_VALUE


def test_the_code_that_applies_a_section_gets_the_model_defaults_when_it_is_omitted(tmp_path):
    """Serving, skew, calibration, the point-in-time join's sizes and the local Dask cluster take their defaults
    from the model (config_model), nowhere else: a configuration without those sections gets them."""
    from closedloop.adapters.serving import ServingConfig
    from closedloop.core.config_model import CalibrationSection, PitJoinSection, ServingSection, SkewSection
    from closedloop.stages.calibration import CalibrationSettings
    from closedloop.stages.feast_store import pit_chunk_rows
    from closedloop.stages.skew import SkewPolicy

    def drop(raw):
        for section in ("serving", "skew"):
            del raw[section]
        del raw["monitoring"]["calibration"], raw["training"]["pit_join"], raw["training"]["dask"]

    typed = _load_with(tmp_path, drop).typed
    assert ServingConfig.from_typed(typed.serving) == ServingConfig() and ServingConfig().model_dump() == (
        ServingSection().model_dump())
    assert SkewPolicy.from_typed(typed.skew) == SkewPolicy() and SkewPolicy().model_dump() == (
        SkewSection().model_dump())
    assert CalibrationSettings.from_config(typed.monitoring.calibration).model_dump() == (
        CalibrationSection().model_dump())
    assert typed.training.pit_join == PitJoinSection()
    assert [pit_chunk_rows(n, typed.training.pit_join) for n in (1, 10**7, 10**9)] == [
        pit_chunk_rows(n) for n in (1, 10**7, 10**9)]
    # and a bad value is refused by the code that applies it, in its words
    with pytest.raises(ConfigError, match=r"serving\.shadow_share=1\.5: a share between 0 and 1"):
        ServingConfig.from_typed(ServingSection(shadow_share=1.5))
    with pytest.raises(ConfigError, match="max_mismatch_share in"):
        SkewPolicy.from_typed(SkewSection(max_mismatch_share=2.0))
