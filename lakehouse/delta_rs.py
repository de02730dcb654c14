"""delta-rs helpers: create, read and merge lakehouse tables without a JVM.

Used by the inference container, DuckDB queries, notebooks and tests, and by the Spark job for the
small things (creating tables, reading the known keys, recording quarantine rows) that do not need a
cluster and would cost seconds of Spark planning each.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from lakehouse.config import Settings
from lakehouse.storage import delta_storage_options, table_uri
from lakehouse.tables import TableSpec, arrow_schema

if TYPE_CHECKING:
    import pyarrow as pa
    from deltalake import DeltaTable


def open_table(lakehouse_uri: str, name: str, settings: Settings, *, version: int | None = None) -> DeltaTable:
    """Open a lakehouse table with delta-rs.

    Raises:
        deltalake.exceptions.TableNotFoundError: when the table does not exist yet.
    """
    from deltalake import DeltaTable

    uri = table_uri(lakehouse_uri, name)
    return DeltaTable(uri, version=version, storage_options=delta_storage_options(uri, settings))


def ensure_table(lakehouse_uri: str, spec: TableSpec, settings: Settings) -> DeltaTable:
    """Open the table of ``spec``, creating it empty (with the contract's properties) when missing."""
    from deltalake import DeltaTable

    uri = table_uri(lakehouse_uri, spec.name)
    return DeltaTable.create(
        uri,
        schema=arrow_schema(spec),
        mode="ignore",
        name=spec.name,
        configuration=dict(spec.properties),
        storage_options=delta_storage_options(uri, settings),
    )


def read_arrow(lakehouse_uri: str, name: str, settings: Settings, *, columns: list[str] | None = None) -> pa.Table:
    """Read a whole table (or some of its columns) as Arrow; fine for small tables and tests."""
    return open_table(lakehouse_uri, name, settings).to_pyarrow_table(columns=columns)


def merge_insert_new(lakehouse_uri: str, spec: TableSpec, rows: pa.Table, settings: Settings) -> int:
    """MERGE Arrow rows into the table on its key (null-safe), inserting only keys not there yet.

    Returns:
        The number of rows inserted.
    """
    if rows.num_rows == 0:
        return 0
    from deltalake.exceptions import CommitFailedError

    predicate = " AND ".join(f"(t.{k} = s.{k} OR (t.{k} IS NULL AND s.{k} IS NULL))" for k in spec.key)
    source = rows.select(spec.column_names).cast(arrow_schema(spec))
    for attempt in range(8):
        dt = ensure_table(lakehouse_uri, spec, settings)
        try:
            metrics = (
                dt.merge(source, predicate=predicate, source_alias="s", target_alias="t")
                .when_not_matched_insert_all()
                .execute()
            )
            return int(metrics.get("num_target_rows_inserted", 0))
        except CommitFailedError:  # another writer (a parallel shard) committed first: MERGE again on the new version
            time.sleep(0.2 * (attempt + 1))
    raise CommitFailedError(f"{spec.name}: gave up after 8 concurrent-commit conflicts")
