"""Data sources: the curated entity-feature partitions of the lake (Parquet, read by DuckDB)."""

from _definitions import DEFINITIONS

customer_activity_source = DEFINITIONS.source
