"""The Spark preprocessing job: discover -> read -> hash -> skip known -> decode -> write -> commit.

1. List every file under the input (folder or s3://) on the driver: nothing is filtered out.
2. Map the pure decode functions over partitions of that listing (``mapInArrow``). A file whose
   (uri, size, mtime) or whose sha256 is already in ``tensors`` is counted, not decoded; a file whose
   bytes were seen earlier in the same partition is a duplicate, not decoded.
3. Each worker writes its new tensors as zstd Parquet data files straight into the ``tensors`` folder
   and returns only small rows (status, key, file name): the JVM never carries the 100 KB tensors.
4. On the driver, duplicates across partitions and keys another writer committed meanwhile are taken
   out of the files (the first path in sort order keeps the row); then all files are added to
   ``tensors`` in one Delta commit (an insert-only MERGE on ``image_id``: no key is inserted twice,
   and files of a failed run are never committed). Failures go to ``quarantine``.
5. A summary reconciles: discovered = new + already present + duplicates + quarantined.

The driver, :func:`run_preprocess`, runs these as named steps: ``_plan`` (list, read the known keys,
size the job), ``_decode`` (the Spark job), ``_dedupe``, ``_commit``, ``_quarantine``, ``_reconcile``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lakehouse import storage
from lakehouse.config import Settings, warn_if_dev_key
from lakehouse.delta_rs import DataFile
from lakehouse.errors import InputError, StorageError
from lakehouse.progress import ProgressBar, progress_bar, status
from lakehouse.runs import PreprocessRun, new_run_id, write_summary
from lakehouse.tables import QUARANTINE, TENSORS, Column, TableSpec
from transforms.tensor import PREPROCESS_VERSION, PreprocessParams, preprocess_bytes

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

#: status of each discovered file in the job's result
NEW, PRESENT, DUPLICATE, QUARANTINED = "new", "already_present", "duplicate", "quarantined"

#: per-file result of the decode stage: small rows only (the tensors are in the data files)
RESULT_SPEC = TableSpec(
    name="preprocess_result",
    key=("source_uri",),
    columns=(
        Column("source_uri", "string", False),
        Column("source_bytes", "bigint", False),
        Column("image_id", "string", True, "sha256 hex; null when the bytes could not be read"),
        Column("status", "string", False),
        Column("duplicate_of", "string", True),
        Column("decoded", "boolean", False),
        Column("error_class", "string", True),
        Column("error_message", "string", True),
        Column("data_file", "string", True, "the data file (relative to tensors/) holding a new row"),
        Column("data_file_meta", "string", True, "JSON of the DataFile, on one row per file"),
    ),
    properties=(),
)

#: rows per data file a worker writes (~18 MB of float16 224x224 tensors): few files, bounded memory
ROWS_PER_FILE = 256


# --- the per-partition function (runs in Spark's Python workers) ------------------------------------
def process_files(
    batches: Iterable[pa.RecordBatch],
    *,
    known_files: dict[tuple[str, int, int], str],
    known_ids: frozenset[str],
    params: PreprocessParams,
    settings: Settings,
    lakehouse_uri: str,
    lineage: dict[str, Any],
    rows_per_file: int = ROWS_PER_FILE,
) -> Iterator[pa.RecordBatch]:
    """Decode every listed file of a partition; write the new tensors as data files of ``tensors``.

    Yields one small result row per input (always); new rows name the data file that holds them.
    ``lineage`` holds the run-level columns (preprocess_version, preprocess_params, run_id, ingested_at).
    """
    import pyarrow as pa

    from lakehouse import delta_rs
    from lakehouse.tables import arrow_schema

    schema = arrow_schema(RESULT_SPEC)
    tensor_schema = arrow_schema(TENSORS)
    seen: dict[str, str] = {}
    results: list[dict[str, Any]] = []
    pending: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (tensor row, its result row)

    def flush() -> None:
        if not pending:
            return
        table = pa.Table.from_pylist([t for t, _ in pending], schema=tensor_schema)
        written = delta_rs.write_data_file(lakehouse_uri, TENSORS, table, settings)
        for _, res in pending:
            res["data_file"] = written.path
        pending[0][1]["data_file_meta"] = json.dumps(asdict(written))
        pending.clear()

    for batch in batches:
        cols = batch.to_pydict()
        for uri, size, mtime_ms in zip(cols["source_uri"], cols["source_bytes"], cols["mtime_ms"], strict=True):
            row = _process_one(uri, size, mtime_ms, known_files, known_ids, seen, params, settings)
            res = {k: row.get(k) for k in schema.names}
            results.append(res)
            if row["status"] == NEW:
                pending.append(({**{k: row.get(k) for k in tensor_schema.names}, **lineage}, res))
                if len(pending) >= rows_per_file:
                    flush()
    flush()
    for i in range(0, len(results), 1024):
        yield pa.RecordBatch.from_pylist(results[i : i + 1024], schema=schema)


def _process_one(
    uri: str,
    size: int,
    mtime_ms: int,
    known_files: dict[tuple[str, int, int], str],
    known_ids: frozenset[str],
    seen: dict[str, str],
    params: PreprocessParams,
    settings: Settings,
) -> dict[str, Any]:
    try:
        modified = datetime.fromtimestamp(mtime_ms / 1000, tz=UTC) if mtime_ms else None
    except (ValueError, OverflowError, OSError):  # an absurd mtime is not a reason to fail the run
        modified = None
    row: dict[str, Any] = {"source_uri": uri, "source_bytes": size, "source_modified_at": modified, "decoded": False}
    known = known_files.get((uri, size, mtime_ms))
    if known is not None:  # same path, size and mtime as an ingested file: not even read
        return {**row, "image_id": known, "status": PRESENT}
    if size > settings.max_file_bytes:  # refused before reading: one huge stray file must not kill a worker
        return {
            **row,
            "status": QUARANTINED,
            "error_class": "ImageTooLargeError",
            "error_message": f"the file is {size} bytes, above the limit of {settings.max_file_bytes} bytes "
            "(raise CXR_MAX_FILE_BYTES if it is a genuine image)",
        }
    try:
        data = storage.read_bytes(uri, settings)
    except InputError as exc:
        return {**row, "status": QUARANTINED, "error_class": type(exc).__name__, "error_message": str(exc)}
    sha = hashlib.sha256(data).hexdigest()
    row.update(image_id=sha, source_bytes=len(data))
    if sha in known_ids:
        return {**row, "status": PRESENT}
    if sha in seen:
        return {**row, "status": DUPLICATE, "duplicate_of": seen[sha]}
    row["decoded"] = True
    try:
        fields = preprocess_bytes(data, name=uri, params=params, pseudonym_key=settings.pseudonym_key)
    except InputError as exc:
        return {**row, "status": QUARANTINED, "error_class": type(exc).__name__, "error_message": str(exc)}
    except Exception as exc:  # one bad file must never fail the job; it is quarantined, not hidden
        log.exception("unexpected error decoding %s", uri)
        return {
            **row,
            "status": QUARANTINED,
            "error_class": "UnexpectedError",
            "error_message": f"{type(exc).__name__}: {exc} (please report this file to the pipeline maintainers)",
        }
    seen[sha] = uri
    return {**row, **fields, "status": NEW}


# --- the driver ------------------------------------------------------------------------------------
def run_preprocess(
    input_uri: str,
    lakehouse_uri: str,
    *,
    settings: Settings,
    run_id: str | None = None,
    spark: SparkSession | None = None,
    progress: bool = True,
) -> PreprocessRun:
    """Preprocess every image under ``input_uri`` into the lakehouse.

    Args:
        input_uri: a folder or ``s3://bucket/prefix`` of PNG, JPEG and DICOM files (recursive).
        lakehouse_uri: a folder or ``s3://bucket/prefix`` holding the Delta tables.
        settings: resize size/engine, dtype, pixel limit, pseudonym key, S3 endpoint.
        run_id: recorded in every row written; generated when None.
        spark: an existing session (tests); created from ``settings`` when None.
        progress: show a progress display on stderr.

    Returns:
        The reconciled summary of the run.

    Raises:
        StorageError: when the input cannot be listed or the lakehouse cannot be written.
    """
    from lakehouse import delta_rs

    started = time.perf_counter()
    run_id = run_id or new_run_id()
    warn_if_dev_key(settings)
    params = PreprocessParams(
        size=settings.resize_size,
        engine=settings.resize_engine,
        dtype=settings.tensor_dtype,
        max_pixels=settings.max_pixels,
    )
    summary = PreprocessRun(
        run_id=run_id, input_uri=input_uri, lakehouse_uri=lakehouse_uri, dev_pseudonym_key=settings.uses_dev_key
    )
    plan = _plan(input_uri, lakehouse_uri, params, settings, spark=spark, run_id=run_id)
    summary.discovered = len(plan.listing)
    log.debug("read %d known tensors at %.1fs", len(plan.known_ids), time.perf_counter() - started)
    if not plan.listing:
        summary.seconds = time.perf_counter() - started
        write_summary(lakehouse_uri, summary, settings)
        return summary

    now = datetime.now(UTC)
    small = _decode(plan, lakehouse_uri, params, settings, run_id=run_id, ingested_at=now, progress=progress)
    log.debug("decode took %.1fs", time.perf_counter() - started)
    written = [DataFile(**json.loads(r["data_file_meta"])) for r in small if r["data_file_meta"]]
    commit_attempted = False
    try:
        deduped = _dedupe(small)
        with status(f"committing {len(deduped.first_of)} new tensors", enabled=progress):
            written = _without_rows(lakehouse_uri, small, deduped.late_dups, written, settings)
            commit_attempted = True
            inserted = _commit(lakehouse_uri, written, settings, run_id=run_id)
        log.debug("tensors committed at %.1fs", time.perf_counter() - started)
        _quarantine(lakehouse_uri, small, settings, run_id=run_id, quarantined_at=now)
    except BaseException:
        # files never committed are removed rather than left for VACUUM; after a commit attempt they
        # stay (the commit may have landed even if it reported an error)
        if not commit_attempted:
            for f in written:
                delta_rs.delete_data_file(lakehouse_uri, TENSORS, f.path, settings)
        raise

    _reconcile(summary, small, deduped, inserted=inserted, started=started)
    write_summary(lakehouse_uri, summary, settings)
    return summary


@dataclass(frozen=True)
class _Plan:
    """What a run works on: the listed input, what ``tensors`` already holds, the session and its tasks."""

    listing: list[storage.ListedFile]
    known_files: dict[tuple[str, int, int], str]  # (uri, size, mtime_ms) -> image_id: not even read
    known_ids: frozenset[str]  # read, hashed, and not decoded
    spark: SparkSession
    n_tasks: int


def _plan(
    input_uri: str,
    lakehouse_uri: str,
    params: PreprocessParams,
    settings: Settings,
    *,
    spark: SparkSession | None,
    run_id: str,
) -> _Plan:
    """List the input, read the keys ``tensors`` holds, and size the decode job (both tables exist after)."""
    from lakehouse import delta_rs
    from lakehouse.spark import get_spark

    listing = list(storage.list_files(input_uri, settings))
    log.info("discovered %d files under %s", len(listing), input_uri)
    if not listing:
        log.warning("no files under %s: check the input URI", input_uri)
    spark = spark or get_spark(settings, app_name=f"cxr-preprocess-{run_id}")

    # the keys already in `tensors`, read with delta-rs (milliseconds, no Spark job)
    known = delta_rs.ensure_table(lakehouse_uri, TENSORS, settings).to_pyarrow_table(
        columns=["image_id", "source_uri", "source_bytes", "source_modified_at"]
    )
    _check_same_params(lakehouse_uri, params, settings)
    # both output tables exist after every run, even one that quarantined nothing (readers and the
    # validation step find an empty table rather than no table)
    delta_rs.ensure_table(lakehouse_uri, QUARANTINE, settings)
    known_files = {
        (uri, size, int(ts.timestamp() * 1000)): iid
        for iid, uri, size, ts in zip(*(known.column(c).to_pylist() for c in known.column_names), strict=True)
        if ts is not None
    }
    # Few, large tasks: each Spark 4 Python task costs ~0.1-0.3 s of fixed overhead on a small machine;
    # worker memory does not grow with task size (results are streamed in batches of 16 rows). A
    # multiple of the parallelism so that no core idles in the last wave.
    par = spark.sparkContext.defaultParallelism
    n_tasks = min(len(listing), par * max(1, -(-len(listing) // (settings.files_per_task * par))))
    return _Plan(listing, known_files, frozenset(known.column("image_id").to_pylist()), spark, n_tasks)


def _decode(
    plan: _Plan,
    lakehouse_uri: str,
    params: PreprocessParams,
    settings: Settings,
    *,
    run_id: str,
    ingested_at: datetime,
    progress: bool,
) -> list[dict[str, Any]]:
    """Run :func:`process_files` over the listing with Spark (``mapInArrow``); one small row per file."""
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    from lakehouse.spark import spark_schema

    spark, sc = plan.spark, plan.spark.sparkContext
    bc_files, bc_ids = sc.broadcast(plan.known_files), sc.broadcast(plan.known_ids)
    listing_schema = StructType(
        [
            StructField("source_uri", StringType(), False),
            StructField("source_bytes", LongType(), False),
            StructField("mtime_ms", LongType(), False),
        ]
    )
    files_df = spark.createDataFrame(
        sc.parallelize([(f.uri, f.size, f.mtime_ms) for f in plan.listing], plan.n_tasks), listing_schema
    )
    lineage = {
        "preprocess_version": PREPROCESS_VERSION,
        "preprocess_params": params.to_json(),
        "run_id": run_id,
        "ingested_at": ingested_at,
    }

    def _map(batches: Iterable[pa.RecordBatch]) -> Iterable[pa.RecordBatch]:
        return process_files(
            batches,
            known_files=bc_files.value,
            known_ids=bc_ids.value,
            params=params,
            settings=settings,
            lakehouse_uri=lakehouse_uri,
            lineage=lineage,
        )

    label = f"preprocessing {len(plan.listing)} files"
    try:
        with _spark_progress(spark, label, total_tasks=plan.n_tasks, enabled=progress):
            return files_df.mapInArrow(_map, spark_schema(RESULT_SPEC)).toArrow().to_pylist()
    finally:
        bc_files.unpersist()
        bc_ids.unpersist()


@dataclass(frozen=True)
class _Deduped:
    """Which path keeps each new key: across partitions, the first path in sort order."""

    first_of: dict[str, str]  # image_id -> the source_uri whose row is inserted
    late_dups: dict[str, str]  # source_uri decoded as new in another partition -> the path that keeps it
    pairs: list[dict[str, str]]  # every duplicate input and the path it duplicates, by source_uri


def _dedupe(small: list[dict[str, Any]]) -> _Deduped:
    """Resolve duplicates across partitions among the rows decoded as new, and list every duplicate."""
    first_of: dict[str, str] = {}
    for r in sorted((r for r in small if r["status"] == NEW), key=lambda r: r["source_uri"]):
        first_of.setdefault(r["image_id"], r["source_uri"])
    late_dups = {
        r["source_uri"]: first_of[r["image_id"]]
        for r in small
        if r["status"] == NEW and first_of[r["image_id"]] != r["source_uri"]
    }
    pairs = sorted(
        [{"source_uri": u, "duplicate_of": d} for u, d in late_dups.items()]
        + [
            {"source_uri": r["source_uri"], "duplicate_of": first_of.get(r["image_id"], r["duplicate_of"])}
            for r in small
            if r["status"] == DUPLICATE
        ],
        key=lambda p: p["source_uri"],
    )
    return _Deduped(first_of, late_dups, pairs)


def _commit(lakehouse_uri: str, files: list[DataFile], settings: Settings, *, run_id: str) -> int:
    """Add the workers' data files to ``tensors`` in one Delta commit; the number of rows inserted."""
    from lakehouse import delta_rs

    try:
        return delta_rs.commit_data_files(lakehouse_uri, TENSORS, files, settings, run_id=run_id)
    except Exception as exc:
        raise StorageError(
            f"cannot commit {len(files)} data files to {storage.table_uri(lakehouse_uri, TENSORS)}: {exc}"
        ) from exc


def _quarantine(
    lakehouse_uri: str, small: list[dict[str, Any]], settings: Settings, *, run_id: str, quarantined_at: datetime
) -> None:
    """Record a ``quarantine`` row per input that could not become a tensor (small rows: merged with delta-rs)."""
    import pyarrow as pa

    from lakehouse import delta_rs
    from lakehouse.tables import arrow_schema

    quarantined = [r for r in small if r["status"] == QUARANTINED]
    if not quarantined:
        return
    rows = pa.Table.from_pylist(
        [
            {
                "source_uri": r["source_uri"],
                "content_sha256": r["image_id"],
                "source_bytes": r["source_bytes"],
                "stage": "preprocess",
                "error_class": r["error_class"],
                "error_message": r["error_message"],
                "run_id": run_id,
                "quarantined_at": quarantined_at,
            }
            for r in quarantined
        ],
        schema=arrow_schema(QUARANTINE),
    )
    delta_rs.merge_insert_new(lakehouse_uri, QUARANTINE, rows, settings)


def _reconcile(
    summary: PreprocessRun, small: list[dict[str, Any]], deduped: _Deduped, *, inserted: int, started: float
) -> None:
    """Fill in the run's counts; StorageError unless each input is new, present, a duplicate or quarantined."""
    quarantined = [r for r in small if r["status"] == QUARANTINED]
    summary.decoded = sum(1 for r in small if r["decoded"])
    summary.new = inserted
    # keys another writer committed between our read of the table and our commit are already present
    summary.already_present = sum(1 for r in small if r["status"] == PRESENT) + (len(deduped.first_of) - inserted)
    summary.quarantined = len(quarantined)
    for r in quarantined:
        summary.quarantine_reasons[r["error_class"]] = summary.quarantine_reasons.get(r["error_class"], 0) + 1
    summary.duplicate_pairs = deduped.pairs
    summary.duplicates = len(deduped.pairs)
    summary.seconds = round(time.perf_counter() - started, 3)
    if not summary.reconciles:  # a bug, never an input problem: fail loudly rather than report wrong counts
        raise StorageError(f"counts do not reconcile: {summary.to_json()}")


def _without_rows(
    lakehouse_uri: str,
    small: list[dict[str, Any]],
    late_dups: dict[str, str],
    written: list[DataFile],
    settings: Settings,
) -> list[DataFile]:
    """The workers' data files with no key twice, ready to commit to ``tensors``.

    Rows to leave out: duplicates across partitions (``late_dups``) and keys another writer committed
    after this run read the table. A file holding such rows is rewritten without them (rare: only
    duplicate inputs or concurrent runs cause it). A key committed by another writer in the instant
    between this re-read and the commit is the one window left (appends do not conflict in Delta).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from lakehouse import delta_rs

    current = frozenset(
        delta_rs.open_table(lakehouse_uri, TENSORS, settings)
        .to_pyarrow_table(columns=["image_id"])
        .column("image_id")
        .to_pylist()
    )
    drop = {
        r["source_uri"]
        for r in small
        if r["status"] == NEW and (r["source_uri"] in late_dups or r["image_id"] in current)
    }
    dirty = {r["data_file"] for r in small if r["status"] == NEW and r["source_uri"] in drop}
    files = [f for f in written if f.path not in dirty]
    for f in written:
        if f.path in dirty:
            table = delta_rs.read_data_file(lakehouse_uri, TENSORS, f.path, settings)
            keep = table.filter(
                pc.invert(pc.is_in(table.column("source_uri"), value_set=pa.array(sorted(drop), pa.string())))
            )
            if keep.num_rows:
                files.append(delta_rs.write_data_file(lakehouse_uri, TENSORS, keep, settings))
            delta_rs.delete_data_file(lakehouse_uri, TENSORS, f.path, settings)
    return files


def _check_same_params(lakehouse_uri: str, params: PreprocessParams, settings: Settings) -> None:
    """Refuse to mix tensor shapes, dtypes or resize engines in one table.

    Raises:
        ConfigError: when the table's tensors were made with other size/engine/dtype settings.
    """
    from lakehouse import delta_rs
    from lakehouse.errors import ConfigError

    table = delta_rs.open_table(lakehouse_uri, TENSORS, settings)
    head = table.to_pyarrow_dataset().head(1, columns=["preprocess_params"]).column("preprocess_params").to_pylist()
    if not head:
        return
    existing = json.loads(head[0])
    ours = json.loads(params.to_json())
    keys = ("size", "resize_engine", "dtype")
    if any(existing.get(k) != ours.get(k) for k in keys):
        raise ConfigError(
            f"{lakehouse_uri}/tensors holds tensors made with "
            + ", ".join(f"{k}={existing.get(k)}" for k in keys)
            + "; this run asks for "
            + ", ".join(f"{k}={ours.get(k)}" for k in keys)
            + ": use another lakehouse for other settings"
        )


# --- progress ----------------------------------------------------------------------------------------
@contextmanager
def _spark_progress(spark: SparkSession, label: str, *, total_tasks: int, enabled: bool) -> Iterator[None]:
    """A progress bar of the running Spark job's tasks, fed by Spark's status tracker (full on success)."""
    with progress_bar(label, total_tasks, enabled=enabled, unit="tasks") as bar:
        if not enabled:
            yield
            return
        stop = threading.Event()
        thread = threading.Thread(target=_poll_tasks, args=(spark, total_tasks, bar, stop), daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=2)
        bar.update(total_tasks)


def _poll_tasks(spark: SparkSession, total_tasks: int, bar: ProgressBar, stop: threading.Event) -> None:
    """Every 0.5 s until ``stop``: the completed tasks of the active stage of ``total_tasks`` tasks."""
    tracker = spark.sparkContext.statusTracker()
    done_before = 0
    while not stop.wait(0.5):
        done = done_before
        for sid in tracker.getActiveStageIds():
            info = tracker.getStageInfo(sid)
            if info is not None and info.numTasks == total_tasks:
                done = info.numCompletedTasks
        done_before = done
        bar.update(done)
