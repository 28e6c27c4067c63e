"""The data contract: parsing, clear errors, and what derives from it."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from closedloop.core.errors import ContractError
from closedloop.core.schema import load_contract, parse_window


def test_card_fraud_contract_derives_features(contract):
    assert contract.row_key == "transaction_id"
    assert contract.entity == "customer_id"
    assert len([c for c in contract.columns if c.dtype in ("float64", "int64") and c.role == "feature"]) \
        + len(contract.aggregates) >= 10
    assert len(contract.categorical) >= 2
    assert contract.model_features == contract.transaction_features + contract.entity_features
    assert contract.feature_refs == [f"customer_activity:{a.name}" for a in contract.aggregates]
    assert set(contract.landing_columns) == {contract.row_key, contract.entity, contract.event_timestamp,
                                             *(c.name for c in contract.columns)}
    assert contract.label not in contract.landing_columns  # labels arrive on their own


def _write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "schema.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _raw(contract_path) -> dict:
    return yaml.safe_load(Path(contract_path).read_text())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.pop("keys"), "missing required key 'keys'"),
        (lambda r: r["columns"][0].update(dtype="decimal"), "dtype 'decimal'"),
        (lambda r: r["columns"][1].pop("categories"), "needs its list of categories"),
        (lambda r: r["columns"].append(dict(r["columns"][0])), "declared twice"),
        (lambda r: r["entity_features"]["aggregates"][0].update(function="median"), "function 'median'"),
        (lambda r: r["entity_features"]["aggregates"][2].update(column="nope"), "'nope' is not a declared column"),
        (lambda r: r["entity_features"]["aggregates"][0].update(window="7 days"), "window '7 days'"),
        (lambda r: r["entity_features"].update(lookback_days=3), "lookback_days is shorter"),
    ],
)
def test_bad_contract_is_refused_with_a_clear_message(tmp_path, contract, mutate, message):
    raw = _raw(contract.path)
    mutate(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(ContractError, match=message) as err:
        load_contract(path)
    assert str(path) in str(err.value)


def test_another_data_set_is_one_schema_file(tmp_path):
    """A different data set (not fraud, other names) needs a schema file, not code."""
    raw = {
        "name": "churn", "keys": {"row": {"name": "event_id"}, "entity": {"name": "account", "dtype": "string"}},
        "event_timestamp": "ts", "label": {"name": "churned", "timestamp": "known_at"},
        "columns": [{"name": "sessions", "dtype": "int64"}, {"name": "plan", "dtype": "category",
                                                              "categories": ["free", "pro"]}],
        "entity_features": {"view": "account_usage", "lookback_days": 14,
                            "aggregates": [{"name": "sessions_sum_14d", "function": "sum", "column": "sessions",
                                            "window": "14d"}]},
    }
    c = load_contract(_write(tmp_path, raw))
    assert c.model_features == ["sessions", "plan", "sessions_sum_14d"]
    assert c.landing_columns == {"event_id": "string", "account": "string", "ts": "timestamp",
                                 "sessions": "int64", "plan": "category"}
    assert c.label_columns == {"event_id": "string", "churned": "int64", "known_at": "timestamp"}
    assert c.feature_view == "account_usage"


def test_contract_hash_changes_with_content(tmp_path, contract):
    raw = _raw(contract.path)
    a = load_contract(_write(tmp_path, raw))
    raw["columns"][0]["warn"]["max"] = 1.0
    b = load_contract(_write(tmp_path, raw))
    assert a.sha256 != b.sha256


@pytest.mark.parametrize(("text", "expected"), [("7d", timedelta(days=7)), ("12h", timedelta(hours=12))])
def test_parse_window(text, expected):
    assert parse_window(text) == expected
