"""The lake on ``s3://`` (moto's S3 server): partitions written, listed, read, curated and quarantined."""

from __future__ import annotations

from datetime import date

import pytest

from closedloop.core.errors import DataValidationError
from closedloop.devtools.generate import GeneratorConfig, generate, make_bad
from closedloop.stages.ingest import ingest_partition, read_marker
from closedloop.stages.quarantine import list_quarantine, release

START = date(2026, 5, 1)


@pytest.fixture
def rt(home, s3, bucket, monkeypatch):
    from closedloop.stages.runtime import Runtime

    monkeypatch.setenv("CLOSEDLOOP_LAKE_URI", f"s3://{bucket}/lake")
    monkeypatch.setenv("CLOSEDLOOP_S3_ENDPOINT_URL", s3.endpoint)
    return Runtime.from_env()


def test_ingest_curates_and_quarantines_on_s3(rt, s3, bucket, tmp_path):
    lake, contract = rt.lake, rt.contract
    assert not lake.is_local
    generate(GeneratorConfig(start=START, days=2, customers=50, transactions_per_day=150, seed=5), lake, contract)
    assert lake.list_days("landing", "transactions") == [START, date(2026, 5, 2)]

    good = ingest_partition(lake, contract, "transactions", START)
    assert good.status == "curated"
    assert read_marker(lake, "transactions", START)["sha256"] == lake.sha256(
        lake.partition("landing", "transactions", START))
    curated = lake.read_parquet(lake.partition("curated", "transactions", START))
    landed = lake.read_parquet(lake.partition("landing", "transactions", START))
    assert len(curated) == len(landed) > 0

    bad_day = date(2026, 5, 2)
    landing = lake.partition("landing", "transactions", bad_day)
    clean = lake.read_parquet(landing)
    lake.write_parquet(make_bad(clean, "null_key", contract, seed=1), landing)
    with pytest.raises(DataValidationError):
        ingest_partition(lake, contract, "transactions", bad_day)
    keys = s3.keys(bucket, "lake/")
    assert "lake/quarantine/transactions/2026-05-02.parquet" in keys
    assert "lake/quarantine/transactions/2026-05-02.validation.json" in keys
    assert "lake/landing/transactions/2026-05-02.parquet" not in keys  # moved, not copied
    assert f"lake/curated/{contract.feature_view}/2026-05-01.parquet" in keys
    assert [e["day"] for e in list_quarantine(lake)] == ["2026-05-02"]

    fixed = tmp_path / "fixed.parquet"
    clean.to_parquet(fixed, index=False)
    release(lake, contract, "transactions", bad_day, reason="fixed upstream", fixed_file=fixed)
    assert lake.exists(lake.partition("curated", "transactions", bad_day))
    assert list_quarantine(lake) == []
