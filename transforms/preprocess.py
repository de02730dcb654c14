"""The Spark preprocessing job: discover -> read -> hash -> skip known -> decode -> MERGE.

1. List every file under the input (folder or s3://) on the driver: nothing is filtered out.
2. Map the pure decode functions over partitions of that listing (``mapInArrow``). A file whose
   (uri, size, mtime) or whose sha256 is already in ``tensors`` is counted, not decoded; a file whose
   bytes were seen earlier in the same partition is a duplicate, not decoded.
3. Duplicates across partitions are resolved on a small projection (no tensor shuffle); the first
   path in sort order keeps the row.
4. New tensors are MERGEd into ``tensors`` on ``image_id``; failures into ``quarantine``.
5. A summary reconciles: discovered = new + already present + duplicates + quarantined.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lakehouse import storage
from lakehouse.config import Settings, warn_if_dev_key
from lakehouse.errors import InputError, StorageError
from lakehouse.tables import QUARANTINE, TENSORS, Column, TableSpec
from transforms.tensor import PREPROCESS_VERSION, PreprocessParams, preprocess_bytes

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

#: status of each discovered file in the job's result
NEW, PRESENT, DUPLICATE, QUARANTINED = "new", "already_present", "duplicate", "quarantined"

#: per-file result of the decode stage (tensor columns + status), as a contract so Arrow and Spark agree
_TENSOR_FIELDS = [
    c for c in TENSORS.columns if c.name not in ("preprocess_version", "preprocess_params", "run_id", "ingested_at")
]
RESULT_SPEC = TableSpec(
    name="preprocess_result",
    key=("source_uri",),
    columns=(
        *[Column(c.name, c.type, True, c.doc) for c in _TENSOR_FIELDS],
        Column("status", "string", False),
        Column("duplicate_of", "string", True),
        Column("decoded", "boolean", False),
        Column("error_class", "string", True),
        Column("error_message", "string", True),
    ),
    properties=(),
)


@dataclass
class Summary:
    """What a preprocessing run did; the counts reconcile with ``discovered``."""

    run_id: str
    input_uri: str
    lakehouse_uri: str
    discovered: int = 0
    new: int = 0
    already_present: int = 0
    duplicates: int = 0
    quarantined: int = 0
    decoded: int = 0
    seconds: float = 0.0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    duplicate_pairs: list[dict[str, str]] = field(default_factory=list)
    dev_pseudonym_key: bool = False

    @property
    def reconciles(self) -> bool:
        """discovered = new + already present + duplicates + quarantined."""
        return self.discovered == self.new + self.already_present + self.duplicates + self.quarantined

    def to_dict(self) -> dict[str, Any]:
        """The summary as written to ``<lakehouse>/runs/<run_id>.json``."""
        return {"kind": "preprocess", **asdict(self), "reconciles": self.reconciles}

    def to_json(self) -> str:
        """The summary as JSON (``cxr preprocess --json``)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def new_run_id(prefix: str = "pre") -> str:
    """A sortable, unique run id."""
    return f"{prefix}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


# --- the per-partition function (runs in Spark's Python workers) ------------------------------------
def process_files(
    batches: Iterable[pa.RecordBatch],
    *,
    known_files: dict[tuple[str, int, int], str],
    known_ids: frozenset[str],
    params: PreprocessParams,
    settings: Settings,
    out_rows: int = 16,
) -> Iterator[pa.RecordBatch]:
    """Decode every listed file of a partition into result rows (one row per input, always)."""
    import pyarrow as pa

    from lakehouse.tables import arrow_schema

    schema = arrow_schema(RESULT_SPEC)
    seen: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for batch in batches:
        cols = batch.to_pydict()
        for uri, size, mtime_ms in zip(cols["source_uri"], cols["source_bytes"], cols["mtime_ms"], strict=True):
            rows.append(_process_one(uri, size, mtime_ms, known_files, known_ids, seen, params, settings))
            if len(rows) >= out_rows:
                yield pa.RecordBatch.from_pylist(rows, schema=schema)
                rows = []
    if rows:
        yield pa.RecordBatch.from_pylist(rows, schema=schema)


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
    except Exception as exc:  # noqa: BLE001 - one bad file must never fail the job; it is quarantined, not hidden
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
) -> Summary:
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
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    from lakehouse import delta_rs
    from lakehouse.spark import get_spark, merge_insert_new, spark_schema

    started = time.perf_counter()
    run_id = run_id or new_run_id()
    warn_if_dev_key(settings)
    params = PreprocessParams(
        size=settings.resize_size,
        engine=settings.resize_engine,
        dtype=settings.tensor_dtype,
        max_pixels=settings.max_pixels,
    )
    summary = Summary(
        run_id=run_id, input_uri=input_uri, lakehouse_uri=lakehouse_uri, dev_pseudonym_key=settings.uses_dev_key
    )

    listing = list(storage.list_files(input_uri, settings))
    summary.discovered = len(listing)
    log.info("discovered %d files under %s", len(listing), input_uri)
    if not listing:
        log.warning("no files under %s: check the input URI", input_uri)
    spark = spark or get_spark(settings, app_name=f"cxr-preprocess-{run_id}")
    sc = spark.sparkContext

    # the keys already in `tensors`, read with delta-rs (milliseconds, no Spark job)
    known = delta_rs.ensure_table(lakehouse_uri, TENSORS, settings).to_pyarrow_table(
        columns=["image_id", "source_uri", "source_bytes", "source_modified_at"]
    )
    _check_same_params(lakehouse_uri, params, settings)
    # both output tables exist after every run, even one that quarantined nothing (readers and the
    # validation step find an empty table rather than no table)
    delta_rs.ensure_table(lakehouse_uri, QUARANTINE, settings)
    known_ids = frozenset(known.column("image_id").to_pylist())
    known_files = {
        (uri, size, int(ts.timestamp() * 1000)): iid
        for iid, uri, size, ts in zip(*(known.column(c).to_pylist() for c in known.column_names), strict=True)
        if ts is not None
    }
    log.debug("read %d known tensors at %.1fs", len(known_ids), time.perf_counter() - started)
    bc_files, bc_ids = sc.broadcast(known_files), sc.broadcast(known_ids)
    if not listing:
        summary.seconds = time.perf_counter() - started
        _write_summary(summary, settings)
        return summary

    # Few, large tasks: each Spark 4 Python task costs ~0.1-0.3 s of fixed overhead on a small machine;
    # worker memory does not grow with task size (results are streamed in batches of 16 rows). A
    # multiple of the parallelism so that no core idles in the last wave.
    par = sc.defaultParallelism
    n_tasks = min(len(listing), par * max(1, -(-len(listing) // (settings.files_per_task * par))))
    listing_schema = StructType(
        [
            StructField("source_uri", StringType(), False),
            StructField("source_bytes", LongType(), False),
            StructField("mtime_ms", LongType(), False),
        ]
    )
    files_df = spark.createDataFrame(
        sc.parallelize([(f.uri, f.size, f.mtime_ms) for f in listing], n_tasks), listing_schema
    )

    def _map(batches: Iterable[pa.RecordBatch]) -> Iterable[pa.RecordBatch]:
        return process_files(
            batches, known_files=bc_files.value, known_ids=bc_ids.value, params=params, settings=settings
        )

    result = files_df.mapInArrow(_map, spark_schema(RESULT_SPEC)).persist()
    try:
        with _SparkProgress(spark, f"preprocessing {len(listing)} files", total_tasks=n_tasks, enabled=progress):
            result.count()  # runs the decode once; the cached result feeds everything below
        log.debug("decode took %.1fs", time.perf_counter() - started)
        small = result.select("source_uri", "image_id", "status", "duplicate_of", "decoded", "error_class").collect()
        summary.decoded = sum(1 for r in small if r.decoded)
        # cross-partition duplicates: among rows decoded as new, the first path in sort order wins
        first_of: dict[str, str] = {}
        for r in sorted((r for r in small if r.status == NEW), key=lambda r: r.source_uri):
            first_of.setdefault(r.image_id, r.source_uri)
        late_dups = {
            r.source_uri: first_of[r.image_id]
            for r in small
            if r.status == NEW and first_of[r.image_id] != r.source_uri
        }
        summary.duplicate_pairs = sorted(
            [{"source_uri": u, "duplicate_of": d} for u, d in late_dups.items()]
            + [
                {"source_uri": r.source_uri, "duplicate_of": first_of.get(r.image_id, r.duplicate_of)}
                for r in small
                if r.status == DUPLICATE
            ],
            key=lambda p: p["source_uri"],
        )
        for r in small:
            if r.status == QUARANTINED:
                summary.quarantine_reasons[r.error_class] = summary.quarantine_reasons.get(r.error_class, 0) + 1

        now = datetime.now(UTC)
        new_rows = result.filter(F.col("status") == NEW)
        if late_dups:
            new_rows = new_rows.filter(~F.col("source_uri").isin(list(late_dups)))
        tensors_src = new_rows.select(
            *[c.name for c in _TENSOR_FIELDS],
            F.lit(PREPROCESS_VERSION).alias("preprocess_version"),
            F.lit(params.to_json()).alias("preprocess_params"),
            F.lit(run_id).alias("run_id"),
            F.lit(now).alias("ingested_at"),
        )
        expected_new = len(first_of)
        with _status(f"merging {expected_new} new tensors", progress):
            inserted = (
                merge_insert_new(spark, tensors_src, lakehouse_uri, TENSORS, settings, source_persisted=True)
                if expected_new
                else 0
            )
        log.debug("tensors merged at %.1fs", time.perf_counter() - started)
        n_quarantined = sum(summary.quarantine_reasons.values())
        if n_quarantined:  # small rows (no tensors): collected and merged with delta-rs
            quarantine_rows = (
                result.filter(F.col("status") == QUARANTINED)
                .select(
                    "source_uri",
                    F.col("image_id").alias("content_sha256"),
                    "source_bytes",
                    F.lit("preprocess").alias("stage"),
                    "error_class",
                    "error_message",
                    F.lit(run_id).alias("run_id"),
                    F.lit(now).alias("quarantined_at"),
                )
                .toArrow()
            )
            delta_rs.merge_insert_new(lakehouse_uri, QUARANTINE, quarantine_rows, settings)
    finally:
        result.unpersist()
        bc_files.unpersist()
        bc_ids.unpersist()

    summary.new = inserted
    # rows another writer inserted between our read of the table and our MERGE are already present
    summary.already_present = sum(1 for r in small if r.status == PRESENT) + (expected_new - inserted)
    summary.duplicates = len(summary.duplicate_pairs)
    summary.quarantined = n_quarantined
    summary.seconds = round(time.perf_counter() - started, 3)
    if not summary.reconciles:  # a bug, never an input problem: fail loudly rather than report wrong counts
        raise StorageError(f"counts do not reconcile: {summary.to_json()}")
    _write_summary(summary, settings)
    return summary


def _check_same_params(lakehouse_uri: str, params: PreprocessParams, settings: Settings) -> None:
    """Refuse to mix tensor shapes, dtypes or resize engines in one table.

    Raises:
        ConfigError: when the table's tensors were made with other size/engine/dtype settings.
    """
    from lakehouse import delta_rs
    from lakehouse.errors import ConfigError

    table = delta_rs.open_table(lakehouse_uri, "tensors", settings)
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


def _write_summary(summary: Summary, settings: Settings) -> None:
    from lakehouse.runs import write_summary

    write_summary(summary.lakehouse_uri, summary.run_id, summary.to_dict(), settings)


# --- progress ----------------------------------------------------------------------------------------
class _SparkProgress:
    """A rich progress bar fed by Spark's status tracker (tasks of the running job)."""

    def __init__(self, spark: SparkSession, label: str, *, total_tasks: int, enabled: bool) -> None:
        self.spark, self.label, self.total, self.enabled = spark, label, total_tasks, enabled
        self._stop = threading.Event()

    def __enter__(self) -> _SparkProgress:
        if not self.enabled:
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tasks"),
            TimeElapsedColumn(),
        )
        self._task = self._progress.add_task(self.label, total=self.total)
        self._progress.start()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        tracker = self.spark.sparkContext.statusTracker()
        done_before = 0
        while not self._stop.wait(0.5):
            done = done_before
            for sid in tracker.getActiveStageIds():
                info = tracker.getStageInfo(sid)
                if info is not None and info.numTasks == self.total:
                    done = info.numCompletedTasks
            done_before = done
            self._progress.update(self._task, completed=done)

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join(timeout=2)
        if exc[0] is None:
            self._progress.update(self._task, completed=self.total)
        self._progress.stop()


@contextmanager
def _status(label: str, enabled: bool) -> Iterator[None]:
    """A spinner with a label while a Spark action runs (nothing when disabled)."""
    if not enabled:
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(label):
        yield
