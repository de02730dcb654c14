"""delta-rs helpers: create, read and merge lakehouse tables without a JVM.

Used by the inference container, DuckDB queries, notebooks and tests, and by the Spark job for the
small things (creating tables, reading the known keys, recording quarantine rows) that do not need a
cluster and would cost seconds of Spark planning each.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lakehouse import storage
from lakehouse.config import Settings
from lakehouse.errors import StorageError
from lakehouse.storage import delta_storage_options, table_uri
from lakehouse.tables import TableSpec, arrow_schema

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset
    from deltalake import DeltaTable


def open_table(lakehouse_uri: str, spec: TableSpec, settings: Settings, *, version: int | None = None) -> DeltaTable:
    """Open a lakehouse table with delta-rs.

    Raises:
        deltalake.exceptions.TableNotFoundError: when the table does not exist yet.
    """
    from deltalake import DeltaTable

    uri = table_uri(lakehouse_uri, spec)
    return DeltaTable(uri, version=version, storage_options=delta_storage_options(uri, settings))


def ensure_table(lakehouse_uri: str, spec: TableSpec, settings: Settings) -> DeltaTable:
    """Open the table of ``spec``, creating it empty (with the contract's properties) when missing.

    A table made by an earlier release that lacks columns the contract added since (nullable ones) gets
    them added (one schema commit; old rows read them as null).
    """
    from deltalake import DeltaTable

    uri = table_uri(lakehouse_uri, spec)
    dt = DeltaTable.create(
        uri,
        schema=arrow_schema(spec),
        mode="ignore",
        name=spec.name,
        configuration=dict(spec.properties),
        storage_options=delta_storage_options(uri, settings),
    )
    return _add_missing_columns(dt, spec)


def _add_missing_columns(dt: DeltaTable, spec: TableSpec) -> DeltaTable:
    from deltalake.schema import Field

    have = set(dt.schema().to_arrow().names)
    missing = [f for f in arrow_schema(spec) if f.name not in have]
    if not missing:
        return dt
    if any(not f.nullable for f in missing):
        raise StorageError(
            f"{spec.name}: the table lacks required columns {[f.name for f in missing if not f.nullable]}; "
            "it was made by an incompatible release"
        )
    dt.alter.add_columns([Field.from_arrow(f) for f in missing])
    logging.getLogger(__name__).info("%s: added columns %s", spec.name, ", ".join(f.name for f in missing))
    dt.update_incremental()
    return dt


#: table property recording the fingerprint of the key the table's patient pseudonyms were made with
KEY_FINGERPRINT_PROPERTY = "cxr.pseudonymKeyFingerprint"


def check_key_fingerprint(lakehouse_uri: str, spec: TableSpec, settings: Settings) -> str:
    """Refuse to add pseudonyms made with another key than the table's; record the key when none is.

    The fingerprint (:func:`lakehouse.config.key_fingerprint`) is kept as the table property
    ``cxr.pseudonymKeyFingerprint``: a missing table is created with it (like :func:`ensure_table`), and a
    table made before fingerprints existed adopts the current key's. A custom property changes no protocol:
    the table stays reader 1 / writer 2.

    Args:
        lakehouse_uri: folder or ``s3://`` root of the lakehouse.
        spec: the table whose pseudonyms are checked (``TENSORS``).
        settings: the pseudonym key and the S3 endpoint.

    Returns:
        The fingerprint, now recorded in the table.

    Raises:
        ConfigError: the table's pseudonyms were made with another key.
    """
    from deltalake import DeltaTable
    from deltalake.exceptions import CommitFailedError

    from lakehouse.config import key_fingerprint
    from lakehouse.errors import ConfigError

    ours = key_fingerprint(settings.pseudonym_key)
    uri = table_uri(lakehouse_uri, spec)
    for attempt in range(8):
        dt = DeltaTable.create(  # a new table gets the property in its first commit; an existing one is opened
            uri,
            schema=arrow_schema(spec),
            mode="ignore",
            name=spec.name,
            configuration={**dict(spec.properties), KEY_FINGERPRINT_PROPERTY: ours},
            raise_if_key_not_exists=False,  # ours is not a delta.* key
            storage_options=delta_storage_options(uri, settings),
        )
        recorded = dt.metadata().configuration.get(KEY_FINGERPRINT_PROPERTY)
        if recorded == ours:
            return ours
        if recorded is not None:
            raise ConfigError(
                f"{uri}: this lakehouse's pseudonyms were made with another key (fingerprint {recorded}; the "
                f"current key's is {ours}); a different key would split every patient in two: set "
                "CXR_PSEUDONYM_KEY to the original key or use a new lakehouse"
            )
        # a table from before fingerprints. NB: deltalake 1.6's alter holds the GIL during its I/O, so
        # this one call cannot reach an S3 server running in this same Python process (moto in tests)
        try:
            dt.alter.set_table_properties({KEY_FINGERPRINT_PROPERTY: ours}, raise_if_not_exists=False)
        except CommitFailedError:  # another run recorded its key first: read what it recorded
            time.sleep(0.2 * (attempt + 1))
            continue
        logging.getLogger(__name__).info("%s: recorded pseudonym key fingerprint %s", spec.name, ours)
        return ours
    raise CommitFailedError(f"{spec.name}: gave up recording the key fingerprint after 8 concurrent commits")


def read_arrow(
    lakehouse_uri: str,
    spec: TableSpec,
    settings: Settings,
    *,
    columns: list[str] | None = None,
    version: int | None = None,
) -> pa.Table:
    """Read a whole table (or some of its columns) as Arrow, at ``version`` (default the latest)."""
    dt = open_table(lakehouse_uri, spec, settings, version=version)
    if columns is None:
        return dt.to_pyarrow_table()
    return projected_dataset(dt, columns).to_table(columns=columns)


def projected_dataset(dt: DeltaTable, columns: Sequence[str]) -> pa.dataset.Dataset:
    """A pyarrow dataset of ``dt`` over ``columns`` only: delta-rs builds each data file's statistics
    guarantee (in Python) for every column of the dataset's schema, ~3 ms per file over the whole
    ``tensors`` schema, ~0.1 ms over one or two columns."""
    import pyarrow as pa

    schema = pa.schema(dt.schema().to_arrow())
    return dt.to_pyarrow_dataset(schema=pa.schema([schema.field(c) for c in columns]))


def data_file_paths(dt: DeltaTable) -> set[str]:
    """The data files of ``dt``'s version, as paths relative to the table root (unquoted), from its log."""
    from urllib.parse import unquote

    return {unquote(p) for p in dt.get_add_actions(flatten=True).column("path").to_pylist()}


def run_filter(runs: Collection[str]) -> pc.Expression:
    """The pyarrow dataset filter selecting the rows of ``runs``: a data file whose ``run_id`` statistics
    admit none of them is not opened."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.field("run_id").isin(pa.array(sorted(set(runs)), type=pa.string()))


def value_counts(dt: DeltaTable, column: str) -> dict[str, int]:
    """Rows per value of a string ``column``, from the Delta log where it can be: a data file whose
    statistics say min = max and no nulls holds one value in all its ``numRecords`` rows and is not
    opened; only files that mix values (or lack exact statistics: strings over 64 characters) are read."""
    import pyarrow as pa
    import pyarrow.compute as pc

    actions = pa.table(dt.get_add_actions(flatten=True))
    counts: dict[str, int] = {}
    if not actions.num_rows:
        return counts
    names = actions.column_names
    if f"min.{column}" in names and f"max.{column}" in names:
        lo, hi = actions.column(f"min.{column}"), actions.column(f"max.{column}")
        single = pc.fill_null(pc.equal(lo, hi), False)
        if f"null_count.{column}" in names:
            single = pc.and_(single, pc.fill_null(pc.equal(actions.column(f"null_count.{column}"), 0), False))
        for value, n in zip(
            lo.filter(single).to_pylist(), actions.column("num_records").filter(single).to_pylist(), strict=True
        ):
            counts[str(value)] = counts.get(str(value), 0) + int(n)
        unknown = {str(p) for p in actions.column("path").filter(pc.invert(single)).to_pylist()}
    else:
        unknown = {str(p) for p in actions.column("path").to_pylist()}
    if unknown:
        from urllib.parse import unquote

        unknown = {unquote(p) for p in unknown}
        for fragment in projected_dataset(dt, [column]).get_fragments():
            if unquote(fragment.path) in unknown:
                for v in pc.value_counts(fragment.to_table(columns=[column]).column(column)).to_pylist():
                    key = str(v["values"])
                    counts[key] = counts.get(key, 0) + int(v["counts"])
    return counts


def run_ids(lakehouse_uri: str, spec: TableSpec, settings: Settings, *, version: int | None = None) -> set[str]:
    """The distinct ``run_id`` values of the table at ``version``, from the Delta log: a data file whose
    statistics say min = max holds one run and is not opened (see :func:`value_counts`)."""
    return set(value_counts(open_table(lakehouse_uri, spec, settings, version=version), "run_id"))


def read_rows_by_id(
    lakehouse_uri: str,
    spec: TableSpec,
    settings: Settings,
    ids: Sequence[str],
    *,
    columns: list[str],
    version: int | None = None,
    run_ids: Sequence[str] | None = None,
) -> pa.Table:
    """The rows whose ``image_id`` is in ``ids`` (some columns), at ``version``.

    sha256 ids defeat min/max pruning: each data file's small ``image_id`` column is read first, and the
    other columns (the tensor bytes) only of the row groups that hold a wanted id (a tensors row group is
    16 rows: reading 100 images costs at most 100 row groups, however large the table). With ``run_ids``
    (the runs that wrote the rows, when the caller knows them) only the data files whose ``run_id``
    statistics admit those runs are opened at all.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted = pa.array(sorted(set(ids)), type=pa.string())
    extra = ["run_id"] if run_ids is not None else []
    dataset = projected_dataset(
        open_table(lakehouse_uri, spec, settings, version=version), list(dict.fromkeys(["image_id", *extra, *columns]))
    )
    within = run_filter(run_ids) if run_ids is not None else None
    parts = []
    for fragment in dataset.get_fragments(filter=within) if len(wanted) else ():
        hits = np.flatnonzero(
            pc.is_in(fragment.to_table(columns=["image_id"]).column("image_id"), value_set=wanted).to_numpy(
                zero_copy_only=False
            )
        )
        if not hits.size:
            continue
        groups = fragment.row_groups  # in file order, as the rows above
        ends = np.cumsum([g.num_rows for g in groups])
        holding = sorted({groups[int(k)].id for k in np.searchsorted(ends, hits, side="right")})
        parts.append(
            fragment.subset(row_group_ids=holding).to_table(columns=columns, filter=pc.field("image_id").isin(wanted))
        )
    return pa.concat_tables(parts) if parts else dataset.schema.empty_table().select(columns)


def ids_added_since(
    lakehouse_uri: str,
    spec: TableSpec,
    settings: Settings,
    version: int,
    *,
    exclude: set[str] | frozenset[str] = frozenset(),
) -> set[str]:
    """The ``image_id`` values of the data files added to the table after ``version`` (except the files in
    ``exclude``, paths relative to the table root): what other writers committed since then, read from the
    ``image_id`` column of those files alone. Files a compaction rewrote count as added (a superset).
    """
    from urllib.parse import unquote

    before = data_file_paths(open_table(lakehouse_uri, spec, settings, version=version)) if version >= 0 else set()
    ids: set[str] = set()
    for fragment in projected_dataset(open_table(lakehouse_uri, spec, settings), ["image_id"]).get_fragments():
        rel = unquote(fragment.path)
        if rel not in before and rel not in exclude:
            ids.update(fragment.to_table(columns=["image_id"]).column("image_id").to_pylist())
    return ids


def append_rows(lakehouse_uri: str, spec: TableSpec, rows: pa.Table, settings: Settings) -> int:
    """Append Arrow rows to the table (created when missing); concurrent appends do not conflict.

    Returns:
        The number of rows appended.
    """
    from deltalake import write_deltalake

    if rows.num_rows == 0:
        return 0
    dt = ensure_table(lakehouse_uri, spec, settings)
    write_deltalake(dt, rows.select(spec.column_names).cast(arrow_schema(spec)), mode="append")
    return rows.num_rows


def merge_insert_new(lakehouse_uri: str, spec: TableSpec, rows: pa.Table, settings: Settings) -> int:
    """MERGE Arrow rows into the table on its key (null-safe), inserting only keys not there yet.

    Returns:
        The number of rows inserted.
    """
    if rows.num_rows == 0:
        return 0
    return int(_merge(lakehouse_uri, spec, rows, settings, update=False).get("num_target_rows_inserted", 0))


def merge_upsert(lakehouse_uri: str, spec: TableSpec, rows: pa.Table, settings: Settings) -> int:
    """MERGE Arrow rows into the table on its key (null-safe): a key there is updated, a new one inserted.

    Returns:
        The number of rows written (updated or inserted).
    """
    if rows.num_rows == 0:
        return 0
    metrics = _merge(lakehouse_uri, spec, rows, settings, update=True)
    return int(metrics.get("num_target_rows_updated", 0)) + int(metrics.get("num_target_rows_inserted", 0))


def _merge(lakehouse_uri: str, spec: TableSpec, rows: pa.Table, settings: Settings, *, update: bool) -> dict:
    """One MERGE on the table's key, again on the new version after a concurrent commit (8 tries)."""
    from deltalake.exceptions import CommitFailedError

    predicate = " AND ".join(f"(t.{k} = s.{k} OR (t.{k} IS NULL AND s.{k} IS NULL))" for k in spec.key)
    source = rows.select(spec.column_names).cast(arrow_schema(spec))
    for attempt in range(8):
        dt = ensure_table(lakehouse_uri, spec, settings)
        merger = dt.merge(source, predicate=predicate, source_alias="s", target_alias="t")
        if update:
            merger = merger.when_matched_update_all()
        try:
            return dict(merger.when_not_matched_insert_all().execute())
        except CommitFailedError:  # another writer (a parallel shard) committed first: MERGE again on the new version
            # jittered backoff: N shards that collided once must not collide again in lockstep
            time.sleep(random.uniform(0.1, 0.3) * 2 ** min(attempt, 4))
    raise CommitFailedError(f"{spec.name}: gave up after 8 concurrent-commit conflicts")


# --- data files written outside delta-rs, committed in one transaction ----------------------------
#: string statistics are recorded only up to this length (image ids and DICOM UIDs fit; long paths do not)
_MAX_STAT_CHARS = 64


@dataclass(frozen=True)
class DataFile:
    """A Parquet file written into a table's folder; it is part of the table only once committed."""

    #: path relative to the table root, as the Delta log records it
    path: str
    size: int
    #: milliseconds since the epoch
    modification_time: int
    num_records: int
    #: Delta per-file statistics (JSON: numRecords, minValues, maxValues, nullCount)
    stats: str


def write_data_file(
    lakehouse_uri: str,
    spec: TableSpec,
    rows: pa.Table,
    settings: Settings,
    *,
    name_hint: str = "part-cxr",
    row_group_size: int = 64,
    compression_level: int = 3,
) -> DataFile:
    """Write ``rows`` as one zstd Parquet file into the folder of table ``spec`` (not committed).

    Meant for Spark's Python workers: the tensors go from the worker straight to storage, so the JVM
    never carries the 100 KB values. Binary columns get no dictionary and no Parquet statistics (a
    min/max of tensor bytes is useless and costly). The file is invisible to readers until
    :func:`commit_data_files` adds it; a file never committed is removed by VACUUM.

    Raises:
        StorageError: when the file cannot be written.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = rows.select(spec.column_names).cast(arrow_schema(spec))
    flat = [f.name for f in table.schema if not pa.types.is_binary(f.type)]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        compression_level=compression_level,
        row_group_size=row_group_size,
        use_dictionary=flat,
        write_statistics=flat,
    )
    data = sink.getvalue().to_pybytes()
    rel = f"{name_hint}-{uuid.uuid4()}-c000.zstd.parquet"
    storage.write_bytes(_data_file_uri(lakehouse_uri, spec, rel), data, settings)
    return DataFile(
        path=rel,
        size=len(data),
        modification_time=int(time.time() * 1000),
        num_records=table.num_rows,
        stats=delta_stats(table),
    )


def _data_file_uri(lakehouse_uri: str, spec: TableSpec, path: str) -> str:
    """Where a data file (``path`` relative to the table root, as the log records it) lives."""
    return storage.join(table_uri(lakehouse_uri, spec), path)


def delta_stats(table: pa.Table) -> str:
    """Delta per-file statistics of an Arrow table: numRecords, nullCount of every flat column, and
    exact min/max of numbers and of short strings (timestamps, long strings and binaries get none:
    absent statistics only disable data skipping, wrong ones would hide rows)."""
    import math

    import pyarrow as pa
    import pyarrow.compute as pc

    mins: dict[str, object] = {}
    maxs: dict[str, object] = {}
    nulls: dict[str, int] = {}
    for name in table.column_names:
        col = table.column(name)
        typ = col.type
        if pa.types.is_list(typ):
            continue
        nulls[name] = col.null_count
        if col.null_count == len(col):
            continue
        numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ)
        if pa.types.is_string(typ):
            if pc.max(pc.utf8_length(col)).as_py() > _MAX_STAT_CHARS:
                continue
        elif not numeric:
            continue
        lo, hi = (v.as_py() for v in pc.min_max(col).values())
        if pa.types.is_floating(typ) and not (math.isfinite(lo) and math.isfinite(hi)):
            continue
        mins[name], maxs[name] = lo, hi
    return json.dumps(
        {"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls},
        separators=(",", ":"),
    )


def read_data_file(lakehouse_uri: str, spec: TableSpec, path: str, settings: Settings) -> pa.Table:
    """Read back a data file written by :func:`write_data_file` (to rewrite it without some rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = storage.read_bytes(_data_file_uri(lakehouse_uri, spec, path), settings)
    return pq.read_table(pa.BufferReader(data))


def delete_data_file(lakehouse_uri: str, spec: TableSpec, path: str, settings: Settings) -> None:
    """Delete an uncommitted data file (best effort: an orphan is harmless and VACUUM removes it)."""
    from lakehouse.errors import StorageError

    try:
        storage.delete(_data_file_uri(lakehouse_uri, spec, path), settings)
    except StorageError as exc:
        logging.getLogger(__name__).warning("left an uncommitted data file behind (VACUUM removes it): %s", exc)


def commit_data_files(
    lakehouse_uri: str, spec: TableSpec, files: list[DataFile], settings: Settings, *, run_id: str
) -> int:
    """Add data files to the table in one Delta commit (append: concurrent appends do not conflict).

    Returns:
        The number of rows the commit added.
    """
    if not files:
        return 0
    from deltalake.transaction import AddAction, CommitProperties

    dt = ensure_table(lakehouse_uri, spec, settings)
    dt.create_write_transaction(
        [AddAction(f.path, f.size, {}, f.modification_time, True, f.stats) for f in files],
        mode="append",
        schema=arrow_schema(spec),
        commit_properties=CommitProperties(custom_metadata={"cxr.run_id": run_id}),
    )
    return sum(f.num_records for f in files)
