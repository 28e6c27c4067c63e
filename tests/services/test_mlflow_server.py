"""MLflow on the production configuration: a tracking server process on Postgres, artifacts on S3 (moto).

The retraining stages train, log, register, gate and promote through closedloop's registry functions;
the champion is then loaded back by its alias, and what the server keeps is checked where it lives.
"""

from __future__ import annotations

from datetime import date

import pytest

from closedloop.core.runconf import Window
from closedloop.devtools.generate import GeneratorConfig, generate
from closedloop.stages import retraining as stages
from closedloop.stages.registry import CHAMPION, alias_version, history, load_booster

WINDOW = Window(date(2026, 1, 1), date(2026, 1, 8))


def test_train_register_promote_and_load_through_the_server(mlflow_env, s3, bucket):
    import sqlalchemy as sa

    from closedloop.stages.runtime import Runtime
    from closedloop.stages.training import predict

    rt = Runtime.from_env()
    assert rt.settings.mlflow_tracking_uri == mlflow_env.url
    generate(GeneratorConfig(start=date(2026, 1, 1), days=9, customers=200, transactions_per_day=500, seed=3,
                             fraud_rate=0.04), rt.lake, rt.contract)
    stages.validate(rt, WINDOW)
    stages.materialise(rt, WINDOW)
    ts = stages.build_training_set(rt, WINDOW)
    trained = stages.train(rt, ts, {"dag_run_id": "services-test"})
    registered = stages.register(rt, trained, WINDOW)
    assert registered["version"] == "1" and registered["created"]
    decision = stages.evaluate_gate(rt, registered, ts)
    assert decision["outcome"] == "promote", decision
    action = stages.promote_or_reject(rt, decision)
    assert action["action"] == "promoted", action

    # the alias and the history are on the server, in Postgres
    assert alias_version(rt.client, rt.model_name, CHAMPION) == "1"
    assert [h["to_version"] for h in history(rt.client, rt.model_name)] == ["1"]
    engine = sa.create_engine(mlflow_env.backend.replace("postgresql://", "postgresql+psycopg2://", 1))
    with engine.connect() as conn:
        aliases = conn.execute(sa.text("SELECT name, alias, version FROM registered_model_aliases")).all()
    engine.dispose()
    assert [tuple(a) for a in aliases] == [(rt.model_name, CHAMPION, 1)]

    # the artifacts are in the bucket, under the configured root
    run = rt.client.get_run(trained["run_id"])
    assert run.info.artifact_uri.startswith(f"s3://{bucket}/mlflow/")
    keys = s3.keys(bucket, "mlflow/")
    assert any(k.endswith("MLmodel") for k in keys), keys
    assert any("/reference" in k for k in keys), keys
    # the plots (training) and the gate's comparison went through the server to the bucket as well
    assert any(k.endswith("/plots/roc_curve.png") for k in keys), keys
    assert any(k.endswith("/gate/comparison_v1.png") for k in keys), keys

    # loaded back by its alias, the champion scores the holdout as it did when it was judged
    from closedloop.stages.features import read_training_split

    booster = load_booster(f"models:/{rt.model_name}@{CHAMPION}")
    holdout = read_training_split(rt.lake, ts["uri"], "holdout")
    scores = predict(booster, holdout, rt.contract)
    assert len(scores) == len(holdout) and 0.0 <= float(min(scores)) <= float(max(scores)) <= 1.0
    assert pytest.approx(decision["candidate"]["roc_auc"], abs=1e-6) == _auc(holdout, scores, rt)


def _auc(frame, scores, rt) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(frame[rt.contract.label], scores))
