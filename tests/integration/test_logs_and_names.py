"""What the logs and names say: library INFO stays INFO, runs named by what they did, one "drift:" prefix, and a
new-category warning that names the new values."""

from __future__ import annotations

import logging
import subprocess
import sys
from datetime import date

from closedloop.core.schema import load_contract
from closedloop.core.settings import REPO_ROOT
from closedloop.stages.monitoring import trigger_reason
from closedloop.stages.retraining import run_name


def test_training_runs_are_named_by_model_and_window():
    assert run_name("card_fraud", "2026-03-01..2026-03-29") == "train card_fraud 2026-03-01..03-29"
    assert run_name("churn", "2025-12-20..2026-01-17") == "train churn 2025-12-20..2026-01-17"
    assert run_name("churn", "") == "train churn"


def test_the_trigger_reason_says_drift_once():
    reasons = ["drift: drift_share, key feature", "drift share 0.45 >= 0.3 (5 of 11 features)"]
    assert trigger_reason(reasons) == "drift: drift_share, key feature; drift share 0.45 >= 0.3 (5 of 11 features)"
    assert trigger_reason(["score drift 0.2"]) == "drift: score drift 0.2"


def test_mlflow_info_lines_reach_the_task_log_as_info_not_on_stderr():
    """In an Airflow task every stderr line is recorded at ERROR: MLflow must log through logging instead."""
    code = (
        "import logging, sys\n"
        "logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(levelname)s %(name)s %(message)s')\n"
        "from closedloop.stages.runtime import library_logs_at_their_level\n"
        "library_logs_at_their_level()\n"
        "import mlflow\n"
        "logging.getLogger('mlflow.tracking.fluent').info('Registered model x')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "INFO mlflow.tracking.fluent Registered model x" in out.stdout
    assert "Registered model x" not in out.stderr


def test_mlflow_imported_first_is_reconfigured(caplog):
    import mlflow  # noqa: F401  (configured by its import: own stderr handler, no propagation)

    from closedloop.stages.runtime import library_logs_at_their_level

    library_logs_at_their_level()
    with caplog.at_level(logging.INFO):
        logging.getLogger("mlflow.store").info("a library's info")
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "mlflow.store"] == [
        ("INFO", "a library's info")]


def test_a_new_category_warning_names_the_new_values():
    sys.path.insert(0, str(REPO_ROOT / "tests" / "data"))
    from test_validation import make_transactions

    from closedloop.stages.validation import validate_frame

    contract = load_contract(REPO_ROOT / "models/card_fraud/schema.yaml")
    day = date(2024, 3, 10)
    df = make_transactions(contract, day)
    column = next(c for c in contract.columns if c.dtype == "category")
    values = df[column.name].astype(object).to_numpy()
    values[:3] = "crypto_atm"
    values[3] = "pawn_shop"
    df[column.name] = values
    result = validate_frame(df, contract, "transactions", day)
    warning = next(f for f in result.warnings if f.rule == "expect_column_values_to_be_in_set")
    assert "new value(s) 'crypto_atm', 'pawn_shop' in 4 of 200 rows" in warning.message, warning.message


def test_the_demo_s_last_line_names_its_own_port():
    from types import SimpleNamespace

    from closedloop.devtools.demo import _print_summary

    summary = {"runs": [], "monitoring": [], "champion_before": "1", "champion_after": "2",
               "status": {"history": []}, "seconds": 240.0}
    for port, expected in ((8080, "`make airflow` (http://localhost:8080,"),
                           (8093, "`make airflow AIRFLOW_PORT=8093` (http://localhost:8093,")):
        lines: list[str] = []
        _print_summary(summary, lines.append, SimpleNamespace(port=port))
        assert expected in lines[-1], lines[-1]


def test_promotion_history_runs_say_what_moved(runtime, tmp_path):
    from closedloop.stages.registry import HISTORY_EXPERIMENT, promote

    client, name = runtime.client, runtime.model_name
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source=str(tmp_path))
    promote(client, runtime.settings, name, "1", expected_champion=None, reason="first", actor="test")
    promote(client, runtime.settings, name, "2", expected_champion="1", reason="better", actor="test")
    exp = client.get_experiment_by_name(HISTORY_EXPERIMENT)
    names = sorted(r.info.run_name for r in client.search_runs([exp.experiment_id]))
    assert names == [f"promotion {name} none -> v1", f"promotion {name} v1 -> v2"]
