"""The Spark preprocessing job: discover -> skip judged files -> read -> hash -> judge -> decode -> commit.

1. List every file under the input (folder or s3://) on the driver: nothing is filtered out. A file the
   ``files`` ledger judged before, unchanged since (same path, size and mtime), is counted and not read,
   whatever its outcome: an old failure is never decoded again (``cxr requeue`` asks for that).
2. The other files are judged in batches (``commit_every_images`` / ``commit_every_s``): Spark maps the
   pure decode functions over partitions of a batch (``mapInArrow``). Each file is read (transient read
   errors retried, then ``retryable``), hashed, judged from its header (a DICOM that is not a radiograph
   of an allowed modality, has no pixels or several frames is ``skipped``; a bomb is quarantined), and
   decoded in a supervised child process (a crash or a hang costs that file only).
3. Each worker writes its new tensors as zstd Parquet data files straight into the ``tensors`` folder
   and returns only small rows (status, key, reason): the JVM never carries the 100 KB tensors.
4. On the driver, after each batch: duplicates across partitions and batches and keys another writer
   committed meanwhile are taken out of the files (the earliest path keeps the row); the files are added
   to ``tensors`` in one Delta commit; failures go to ``quarantine``; every file's judgement goes to the
   ``files`` ledger. A kill loses at most the batch in flight; its data files are orphans that
   ``cxr maintain`` removes.
5. A summary reconciles: discovered = new + already present + duplicates + skipped + quarantined + retryable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lakehouse import ledger, storage
from lakehouse.config import Settings, warn_if_dev_key
from lakehouse.delta_rs import DataFile
from lakehouse.errors import InputError, StorageError, TransientReadError
from lakehouse.progress import ProgressBar, progress_bar, status
from lakehouse.runs import PreprocessRun, new_run_id, write_summary
from lakehouse.tables import QUARANTINE, TENSORS, Column, TableSpec
from transforms.decode import Skip, skip_reason
from transforms.supervised import DEFAULT_DECODER, DecoderStartError, SupervisedDecoder, shared_decoder
from transforms.tensor import PREPROCESS_VERSION, PreprocessParams

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.broadcast import Broadcast
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

#: status of each judged file in the job's result (the ``files.outcome`` values)
NEW, PRESENT, DUPLICATE, SKIPPED, QUARANTINED, RETRYABLE = (
    "new",
    "already_present",
    "duplicate",
    "skipped",
    "quarantined",
    "retryable",
)

#: per-file result of the decode stage: small rows only (the tensors are in the data files)
RESULT_SPEC = TableSpec(
    name="preprocess_result",
    key=("source_uri",),
    columns=(
        Column("source_uri", "string", False),
        Column("source_bytes", "bigint", False),
        Column("source_mtime_ms", "bigint", False),
        Column("image_id", "string", True, "sha256 hex; null when the bytes could not be read"),
        Column("status", "string", False),
        Column("duplicate_of", "string", True),
        Column("decoded", "boolean", False),
        Column("error_class", "string", True),
        Column("error_message", "string", True),
        Column("data_file", "string", True, "the data file (relative to tensors/) holding a new row"),
        Column("data_file_meta", "string", True, "JSON of the DataFile, on one row per file"),
        Column("cpu_s", "double", True, "CPU seconds spent on the file: the worker's and its decoder child's"),
    ),
    properties=(),
)

#: bytes read first from each file: a DICOM header that fits decides a skip before the rest is read
HEADER_BYTES = 256 << 10

#: rows per data file a worker writes (~18 MB of float16 224x224 tensors): few files, bounded memory
ROWS_PER_FILE = 256
#: rows per Parquet row group of a tensors data file (~1.2 MB of tensors): the unit a reader of some rows
#: fetches (inference shards, thumbnails, drift inputs); a sorted 256-row file then holds 16 id ranges,
#: so up to 16 shards each read about 1/N of it
ROW_GROUP_ROWS = 16


# --- the per-partition function (runs in Spark's Python workers) ------------------------------------
def process_files(
    batches: Iterable[pa.RecordBatch],
    *,
    known_ids: KnownIds,
    params: PreprocessParams,
    settings: Settings,
    lakehouse_uri: str,
    lineage: dict[str, Any],
    rows_per_file: int = ROWS_PER_FILE,
    decoder: str = DEFAULT_DECODER,
) -> Iterator[pa.RecordBatch]:
    """Judge every listed file of a partition; write the new tensors as data files of ``tensors``.

    Each file is decoded in a supervised child process (:func:`shared_decoder`): a decoder that
    crashes or hangs costs that one file (``DecoderCrash`` / ``DecodeTimeout``), not the task.
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
        # sorted by image_id: each row group's min/max statistics then cover a narrow id range, so an
        # inference shard (a contiguous id range) skips the row groups outside it
        table = pa.Table.from_pylist([t for t, _ in pending], schema=tensor_schema).sort_by("image_id")
        written = delta_rs.write_data_file(lakehouse_uri, TENSORS, table, settings, row_group_size=ROW_GROUP_ROWS)
        for _, res in pending:
            res["data_file"] = written.path
        pending[0][1]["data_file_meta"] = json.dumps(asdict(written))
        pending.clear()

    # one child per Python worker, reused by its tasks (Spark reuses workers): started once, not per task
    dec = shared_decoder(settings.decode_timeout_s, decoder=decoder)
    for batch in batches:
        cols = batch.to_pydict()
        for uri, size, mtime_ms in zip(cols["source_uri"], cols["source_bytes"], cols["mtime_ms"], strict=True):
            cpu_before = time.process_time() + _child_cpu_s(dec.pid)
            row = _process_one(uri, size, mtime_ms, known_ids, seen, params, settings, dec)
            row["cpu_s"] = max(time.process_time() + _child_cpu_s(dec.pid) - cpu_before, 0.0)
            res = {k: row.get(k) for k in schema.names}
            results.append(res)
            if row["status"] == NEW:
                pending.append(({**{k: row.get(k) for k in tensor_schema.names}, **lineage}, res))
                if len(pending) >= rows_per_file:
                    flush()
    flush()
    for i in range(0, len(results), 1024):
        yield pa.RecordBatch.from_pylist(results[i : i + 1024], schema=schema)


def _child_cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a live child has used so far, from ``/proc`` (0 off Linux, or when none)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class KnownIds:
    """The keys ``tensors`` holds, as one sorted array of 32-byte digests (not a set of Python strings).

    Shipped to every Python worker by a Spark broadcast: 32 bytes per image (400k images: 12.8 MB) that
    unpickle as one buffer, where a ``frozenset`` of hex strings is ~110 bytes per image and 400k objects
    to rebuild in each worker. Lookups are a binary search: exact, no false positives.
    """

    def __init__(self, hex_ids: Iterable[str]) -> None:
        import numpy as np

        joined = "".join(hex_ids)  # one hex decode and one sort in C: 400k keys in ~0.3 s
        self._digests = np.unique(np.frombuffer(bytes.fromhex(joined), dtype="S32"))

    def __len__(self) -> int:
        return len(self._digests)

    def __contains__(self, hex_id: object) -> bool:
        import numpy as np

        if not isinstance(hex_id, str) or len(hex_id) != 64 or not len(self._digests):
            return False
        try:
            key = np.array([bytes.fromhex(hex_id)], dtype="S32")
        except ValueError:
            return False
        i = int(np.searchsorted(self._digests, key[0]))
        # compared as numpy fixed-width bytes (trailing NUL bytes are padding there, on both sides)
        return i < len(self._digests) and bool(self._digests[i : i + 1] == key)


def _process_one(
    uri: str,
    size: int,
    mtime_ms: int,
    known_ids: KnownIds,
    seen: dict[str, str],
    params: PreprocessParams,
    settings: Settings,
    dec: SupervisedDecoder,
) -> dict[str, Any]:
    try:
        modified = datetime.fromtimestamp(mtime_ms / 1000, tz=UTC) if mtime_ms else None
    except (ValueError, OverflowError, OSError):  # an absurd mtime is not a reason to fail the run
        modified = None
    row: dict[str, Any] = {
        "source_uri": uri,
        "source_bytes": size,
        "source_mtime_ms": mtime_ms,
        "source_modified_at": modified,
        "decoded": False,
    }
    if size > settings.max_file_bytes:  # refused before reading: one huge stray file must not kill a worker
        return {
            **row,
            "status": QUARANTINED,
            "error_class": "ImageTooLargeError",
            "error_message": f"the file is {size} bytes, above the limit of {settings.max_file_bytes} bytes "
            "(raise CXR_MAX_FILE_BYTES if it is a genuine image)",
        }
    verdicts: list[Skip | None] = []

    def keep_reading(head: bytes, complete: bool) -> bool:
        # the header alone decides a skip (no pixel data, another modality, several frames): a large
        # multi-frame object is not even downloaded past its header
        verdicts.append(skip_reason(head, name=uri, modalities=settings.modalities, partial=not complete))
        return verdicts[-1] is None

    try:
        data = storage.read_bytes(uri, settings, head=HEADER_BYTES, keep_reading=keep_reading)
        skip = verdicts[-1] if verdicts else None
        if skip is None and len(data) >= HEADER_BYTES:  # the head may not have held the whole header
            skip = skip_reason(data, name=uri, modalities=settings.modalities)
    except TransientReadError as exc:  # throttled or timed out even after retries: read again next run
        return {**row, "status": RETRYABLE, "error_class": type(exc).__name__, "error_message": str(exc)}
    except InputError as exc:  # unreadable, or a header that declares a bomb
        return {**row, "status": QUARANTINED, "error_class": type(exc).__name__, "error_message": str(exc)}
    if skip is not None:
        if len(data) == size:  # read whole anyway (a small file): its hash is known
            row.update(image_id=hashlib.sha256(data).hexdigest())
        return {**row, "status": SKIPPED, "error_class": skip.reason_class, "error_message": skip.message}
    sha = hashlib.sha256(data).hexdigest()
    row.update(image_id=sha, source_bytes=len(data))
    if sha in known_ids:
        return {**row, "status": PRESENT}
    if sha in seen:
        return {**row, "status": DUPLICATE, "duplicate_of": seen[sha]}
    row["decoded"] = True
    try:
        fields = dec.decode(data, name=uri, params=params, pseudonym_key=settings.pseudonym_key)
    except InputError as exc:  # DecoderCrash and DecodeTimeout included
        return {**row, "status": QUARANTINED, "error_class": type(exc).__name__, "error_message": str(exc)}
    except DecoderStartError:  # the environment is broken, not this file: fail the task (Spark retries it)
        raise
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
    decoder: str = DEFAULT_DECODER,
) -> PreprocessRun:
    """Preprocess every file under ``input_uri`` not judged before into the lakehouse, in batches.

    Args:
        input_uri: a folder or ``s3://bucket/prefix`` of PNG, JPEG and DICOM files (recursive).
        lakehouse_uri: a folder or ``s3://bucket/prefix`` holding the Delta tables.
        settings: resize size/engine, dtype, limits, modalities, batch size, pseudonym key, S3 endpoint.
        run_id: recorded in every row written; generated when None. An existing run id (an Airflow
            retry) counts what that run's earlier attempts judged as its own.
        spark: an existing session (tests); created from ``settings`` when None.
        progress: show a progress display on stderr.
        decoder: ``module:function`` the supervised child decodes with (tests inject faulty decoders).

    Returns:
        The reconciled summary of the run.

    Raises:
        StorageError: when the input cannot be listed or the lakehouse cannot be written.
        ConfigError: when the settings do not match the lakehouse (tensor params, pseudonym key).
    """
    started, cpu_started = time.perf_counter(), time.process_time()
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
    state = _RunState(first_of={}, tensors_version=plan.tensors_version, start_version=plan.tensors_version)
    _count_known(state, plan, run_id)
    _record_unrecorded(lakehouse_uri, plan, settings)
    if plan.todo:
        now = datetime.now(UTC)
        # the keys tensors held when the run started, shipped to the workers once for every batch
        known_ids = plan.spark.sparkContext.broadcast(plan.known_ids)
        bar_label = f"preprocessing {len(plan.todo)} files"
        with progress_bar(bar_label, len(plan.todo), enabled=progress, unit="files") as bar:
            for chunk in _chunks(plan.todo, plan.spark, settings, state):
                batch_started = time.perf_counter()
                small = _decode(
                    plan,
                    chunk,
                    lakehouse_uri,
                    params,
                    settings,
                    run_id=run_id,
                    ingested_at=now,
                    bar=bar,
                    done_before=state.judged,
                    decoder=decoder,
                    known_ids=known_ids,
                )
                _commit_batch(lakehouse_uri, small, state, settings, run_id=run_id, now=now, progress=progress)
                state.seconds_per_file = (time.perf_counter() - batch_started) / len(chunk)
                bar.update(state.judged)
        known_ids.unpersist()
    _reconcile(summary, state, started=started)
    # this process's CPU (listing, planning, commits) and the workers' and decoder children's, per file
    summary.cpu_seconds = round(time.process_time() - cpu_started + state.cpu_s, 3)
    summary.cores = int(plan.spark.sparkContext.defaultParallelism)
    write_summary(lakehouse_uri, summary, settings)
    return summary


@dataclass(frozen=True)
class _Plan:
    """What a run works on: the listed input, the files to judge, what ``tensors`` holds, the session."""

    listing: list[storage.ListedFile]
    #: files judged before and unchanged since (not read again), with that judgement (``ledger.KNOWN_COLUMNS``)
    known: pa.Table
    #: files to judge in this run
    todo: list[storage.ListedFile]
    known_ids: KnownIds  # read, hashed, and not decoded
    tensors_version: int
    spark: SparkSession


def _plan(
    input_uri: str,
    lakehouse_uri: str,
    params: PreprocessParams,
    settings: Settings,
    *,
    spark: SparkSession | None,
    run_id: str,
) -> _Plan:
    """List the input, split it into known files and files to judge, read the keys ``tensors`` holds."""
    from lakehouse import delta_rs
    from lakehouse.spark import get_spark

    listing = list(storage.list_files(input_uri, settings))
    log.info("discovered %d files under %s", len(listing), input_uri)
    if not listing:
        log.warning("no files under %s: check the input URI", input_uri)
    spark = spark or get_spark(settings, app_name=f"cxr-preprocess-{run_id}")

    # every output table exists after every run, even one that quarantined nothing (readers and the
    # validation step find an empty table rather than no table)
    # the pseudonym key must be the one the table's pseudonyms were made with (recorded at creation)
    fingerprint = delta_rs.check_key_fingerprint(lakehouse_uri, TENSORS, settings)
    log.debug("pseudonym key fingerprint %s", fingerprint)
    tensors = delta_rs.ensure_table(lakehouse_uri, TENSORS, settings)
    delta_rs.ensure_table(lakehouse_uri, QUARANTINE, settings)
    _check_same_params(lakehouse_uri, params, settings)
    split = ledger.split_listing(lakehouse_uri, listing, settings)
    ids = tensors.to_pyarrow_table(columns=["image_id"]).column("image_id").to_pylist()
    log.info("%d files judged before and unchanged; %d to judge", split.known.num_rows, len(split.todo))
    return _Plan(listing, split.known, split.todo, KnownIds(ids), tensors.version(), spark)


@dataclass
class _RunState:
    """What the run has judged so far, batch after batch (plus what earlier attempts of it judged)."""

    #: image_id -> the path whose row this run inserted (later copies are duplicates of it)
    first_of: dict[str, str]
    #: the tensors version after this run's last commit (another writer moves it on)
    tensors_version: int
    #: the tensors version the run started from (the workers' known keys are that version's)
    start_version: int = -1
    #: another writer has committed to tensors during this run
    foreign_commits: bool = False
    #: data files this run committed to tensors
    own_files: set[str] = field(default_factory=set)
    judged: int = 0
    batches: int = 0
    decoded: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, dict[str, int]] = field(default_factory=lambda: {QUARANTINED: {}, SKIPPED: {}})
    previously: dict[str, int] = field(default_factory=dict)
    pairs: list[dict[str, str]] = field(default_factory=list)
    seconds_per_file: float | None = None
    #: CPU seconds the workers and their decoder children spent on the files judged so far
    cpu_s: float = 0.0

    def count(self, outcome: str, reason_class: str | None = None) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if outcome in self.reasons and reason_class:
            self.reasons[outcome][reason_class] = self.reasons[outcome].get(reason_class, 0) + 1


def _count_known(state: _RunState, plan: _Plan, run_id: str) -> None:
    """Count the files judged before: this run's earlier attempts under their outcomes, others as present
    (counted in Arrow: an archive of 400k known files makes no Python object per file)."""
    import pyarrow.compute as pc

    ours = pc.equal(plan.known.column("run_id"), run_id)
    for k in plan.known.filter(ours).to_pylist():  # an Airflow retry: what the earlier attempt judged is this run's
        state.count(k["outcome"], k["reason_class"])
        if k["outcome"] == NEW and k["image_id"]:
            state.first_of.setdefault(k["image_id"], k["source_uri"])
        if k["outcome"] == DUPLICATE:
            state.pairs.append({"source_uri": k["source_uri"], "duplicate_of": k["duplicate_of"] or ""})
    for v in pc.value_counts(plan.known.filter(pc.invert(ours)).column("outcome")).to_pylist():
        outcome, n = str(v["values"]), int(v["counts"])
        state.outcomes[PRESENT] = state.outcomes.get(PRESENT, 0) + n
        state.previously[outcome] = state.previously.get(outcome, 0) + n


def _record_unrecorded(lakehouse_uri: str, plan: _Plan, settings: Settings) -> None:
    """Give a ledger row to every listed path known from ``tensors`` only (a kill between a batch's tensors
    commit and its ledger write, or a lakehouse made before the ledger)."""
    import pyarrow.compute as pc

    now = datetime.now(UTC)
    unrecorded = plan.known.filter(pc.invert(plan.known.column("in_ledger")))
    rows = [
        {
            "source_uri": k["source_uri"],
            "source_bytes": k["source_bytes"],
            "source_mtime_ms": k["source_mtime_ms"],
            "outcome": k["outcome"],
            "image_id": k["image_id"],
            "run_id": k["run_id"],
            "judged_at": now,
        }
        for k in unrecorded.to_pylist()
    ]
    if rows:
        log.info("recording %d files committed to tensors without a ledger row", len(rows))
        ledger.record(lakehouse_uri, rows, settings)


def _chunks(
    todo: list[storage.ListedFile], spark: SparkSession, settings: Settings, state: _RunState
) -> Iterator[list[storage.ListedFile]]:
    """The files to judge in batches, each committed before the next starts.

    A batch holds at most ``commit_every_images`` files and, once a batch has measured the speed, no
    more than ``commit_every_s`` of work; the first batch is at most four waves of tasks (``files_per_task``
    per core) until then. A remainder of under a quarter batch joins the batch before it (each batch
    costs a Spark job and two commits).
    """
    par = spark.sparkContext.defaultParallelism
    i = 0
    while i < len(todo):
        size = min(settings.commit_every_images, 4 * settings.files_per_task * par)
        if state.seconds_per_file:
            size = min(settings.commit_every_images, int(settings.commit_every_s / state.seconds_per_file))
        size = max(size, 1)
        if len(todo) - (i + size) < size // 4:
            size = len(todo) - i
        yield todo[i : i + size]
        i += size


def _decode(
    plan: _Plan,
    chunk: list[storage.ListedFile],
    lakehouse_uri: str,
    params: PreprocessParams,
    settings: Settings,
    *,
    run_id: str,
    ingested_at: datetime,
    bar: ProgressBar,
    done_before: int,
    decoder: str,
    known_ids: Broadcast[KnownIds],
) -> list[dict[str, Any]]:
    """Run :func:`process_files` over one batch with Spark (``mapInArrow``); one small row per file."""
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    from lakehouse.spark import spark_schema

    spark, sc = plan.spark, plan.spark.sparkContext
    listing_schema = StructType(
        [
            StructField("source_uri", StringType(), False),
            StructField("source_bytes", LongType(), False),
            StructField("mtime_ms", LongType(), False),
        ]
    )
    # Few, large tasks: each Spark 4 Python task costs ~0.1-0.3 s of fixed overhead on a small machine;
    # worker memory does not grow with task size (results are streamed). A multiple of the parallelism
    # so that no core idles in the last wave.
    par = sc.defaultParallelism
    n_tasks = min(len(chunk), par * max(1, -(-len(chunk) // (settings.files_per_task * par))))
    files_df = spark.createDataFrame(
        sc.parallelize([(f.uri, f.size, f.mtime_ms) for f in chunk], n_tasks), listing_schema
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
            known_ids=known_ids.value,
            params=params,
            settings=settings,
            lakehouse_uri=lakehouse_uri,
            lineage=lineage,
            decoder=decoder,
        )

    with _spark_progress(spark, bar, n_tasks=n_tasks, n_files=len(chunk), done_before=done_before):
        return files_df.mapInArrow(_map, spark_schema(RESULT_SPEC)).toArrow().to_pylist()


@dataclass(frozen=True)
class _Deduped:
    """Which path keeps each new key: an earlier batch's path, else the first path in sort order."""

    late_dups: dict[str, str]  # source_uri decoded as new, not inserted -> the path that keeps its key
    keeper: dict[str, str]  # image_id -> the path that keeps it (this batch's or an earlier batch's)


def _dedupe(small: list[dict[str, Any]], first_of: dict[str, str]) -> _Deduped:
    """Resolve duplicates among the rows decoded as new (across partitions and batches of the run)."""
    batch_first: dict[str, str] = {}
    for r in sorted((r for r in small if r["status"] == NEW), key=lambda r: r["source_uri"]):
        batch_first.setdefault(r["image_id"], first_of.get(r["image_id"], r["source_uri"]))
    late_dups = {
        r["source_uri"]: batch_first[r["image_id"]]
        for r in small
        if r["status"] == NEW and batch_first[r["image_id"]] != r["source_uri"]
    }
    return _Deduped(late_dups, {**first_of, **batch_first})


def _commit_batch(
    lakehouse_uri: str,
    small: list[dict[str, Any]],
    state: _RunState,
    settings: Settings,
    *,
    run_id: str,
    now: datetime,
    progress: bool,
) -> None:
    """Commit one batch: its tensors, then its quarantine rows, then every file's judgement in ``files``.

    A kill between these steps loses nothing: committed tensors are known by path on the next run, and
    files without a judgement are judged again (their quarantine rows are merged, never doubled).
    """
    from lakehouse import delta_rs

    started = time.perf_counter()
    written = [DataFile(**json.loads(r["data_file_meta"])) for r in small if r["data_file_meta"]]
    deduped = _dedupe(small, state.first_of)
    commit_attempted = False
    try:
        with status(f"committing batch {state.batches + 1}", enabled=progress):
            written, present, checked = _without_rows(lakehouse_uri, small, deduped.late_dups, written, state, settings)
            commit_attempted = True
            inserted = _commit(lakehouse_uri, written, settings, run_id=run_id)
            state.own_files.update(f.path for f in written)
            after = delta_rs.open_table(lakehouse_uri, TENSORS, settings).version()
            # exactly one version later: ours alone; more: another writer committed too, so the next batch
            # looks at what it added (-1 forces that)
            state.tensors_version = after if after == checked + (1 if written else 0) else -1
            rows = _judgements(small, deduped, present, run_id=run_id, judged_at=now)
            kept = sum(1 for r in rows if r["outcome"] == NEW)
            if kept != inserted:  # a bug, never an input problem: stop before the ledger records it
                raise StorageError(f"batch {state.batches + 1}: {inserted} rows committed for {kept} new files")
            _quarantine(lakehouse_uri, small, settings, run_id=run_id, quarantined_at=now)
            ledger.record(lakehouse_uri, rows, settings)
    except BaseException:
        # files never committed are removed rather than left for `cxr maintain`; after a commit attempt
        # they stay (the commit may have landed even if it reported an error)
        if not commit_attempted:
            for f in written:
                delta_rs.delete_data_file(lakehouse_uri, TENSORS, f.path, settings)
        raise
    for r in rows:
        state.count(r["outcome"], r["reason_class"])
        if r["outcome"] == NEW:
            state.first_of[r["image_id"]] = r["source_uri"]
        elif r["outcome"] == DUPLICATE:
            state.pairs.append({"source_uri": r["source_uri"], "duplicate_of": r["duplicate_of"]})
    state.batches += 1
    state.judged += len(small)
    state.decoded += sum(1 for r in small if r["decoded"])
    state.cpu_s += sum(r.get("cpu_s") or 0.0 for r in small)
    log.info(
        "batch %d committed: %d files judged, %d new (%.1fs)",
        state.batches,
        len(small),
        inserted,
        time.perf_counter() - started,
    )


def _judgements(
    small: list[dict[str, Any]], deduped: _Deduped, present: set[str], *, run_id: str, judged_at: datetime
) -> list[dict[str, Any]]:
    """One ``files`` row per judged file of the batch, with its final outcome."""
    rows = []
    for r in small:
        outcome, duplicate_of = r["status"], r["duplicate_of"]
        if outcome == NEW and r["source_uri"] in deduped.late_dups:
            outcome, duplicate_of = DUPLICATE, deduped.late_dups[r["source_uri"]]
        elif outcome == DUPLICATE:  # the partition's first copy may itself have lost to an earlier path
            duplicate_of = deduped.keeper.get(r["image_id"], duplicate_of)
        elif outcome == NEW and r["source_uri"] in present:  # another writer committed its key meanwhile
            outcome = PRESENT
        failed = outcome in (SKIPPED, QUARANTINED, RETRYABLE)
        rows.append(
            {
                "source_uri": r["source_uri"],
                "source_bytes": r["source_bytes"],
                "source_mtime_ms": r["source_mtime_ms"],
                "outcome": outcome,
                "image_id": r["image_id"],
                "duplicate_of": duplicate_of if outcome == DUPLICATE else None,
                "reason_class": r["error_class"] if failed else None,
                "reason": r["error_message"] if failed else None,
                "run_id": run_id,
                "judged_at": judged_at,
            }
        )
    return rows


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


def _reconcile(summary: PreprocessRun, state: _RunState, *, started: float) -> None:
    """Fill in the run's counts; StorageError unless each input has exactly one outcome."""
    o = state.outcomes
    summary.new = o.get(NEW, 0)
    summary.already_present = o.get(PRESENT, 0)
    summary.duplicates = o.get(DUPLICATE, 0)
    summary.skipped = o.get(SKIPPED, 0)
    summary.quarantined = o.get(QUARANTINED, 0)
    summary.retryable = o.get(RETRYABLE, 0)
    summary.decoded = state.decoded
    summary.batches = state.batches
    summary.quarantine_reasons = dict(sorted(state.reasons[QUARANTINED].items()))
    summary.skip_reasons = dict(sorted(state.reasons[SKIPPED].items()))
    summary.previously = dict(sorted(state.previously.items()))
    summary.duplicate_pairs = sorted(state.pairs, key=lambda p: p["source_uri"])
    summary.seconds = round(time.perf_counter() - started, 3)
    if not summary.reconciles:  # a bug, never an input problem: fail loudly rather than report wrong counts
        raise StorageError(f"counts do not reconcile: {summary.to_json()}")


def _without_rows(
    lakehouse_uri: str,
    small: list[dict[str, Any]],
    late_dups: dict[str, str],
    written: list[DataFile],
    state: _RunState,
    settings: Settings,
) -> tuple[list[DataFile], set[str], int]:
    """The workers' data files with no key twice, ready to commit to ``tensors``; the paths whose key
    another writer committed meanwhile; and the table version this was checked against.

    Rows to leave out: duplicates across partitions and batches (``late_dups``) and keys another writer
    committed after this run read the table (looked for only when the table moved on without us). A file
    holding such rows is rewritten without them (rare: only duplicate inputs or concurrent runs cause it).
    A key another writer commits in the instant between this check and our commit is the one window
    left (appends do not conflict in Delta); the validation suite's unique ``image_id`` check reports it.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    from lakehouse import delta_rs

    dt = delta_rs.open_table(lakehouse_uri, TENSORS, settings)
    present: set[str] = set()
    # another writer committed (now or in an earlier batch: the workers' known keys are those of the
    # run's start, so every later batch is checked too): which of our keys did it add?
    state.foreign_commits = state.foreign_commits or dt.version() != state.tensors_version
    if state.foreign_commits:  # the keys in the files other writers added since the run started, only
        ours = {r["image_id"] for r in small if r["status"] == NEW}
        theirs = ours.intersection(
            delta_rs.ids_added_since(lakehouse_uri, TENSORS, settings, state.start_version, exclude=state.own_files)
        )
        present = {r["source_uri"] for r in small if r["status"] == NEW and r["image_id"] in theirs}
    drop = set(late_dups) | present
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
    return files, present - set(late_dups), dt.version()


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
def _spark_progress(
    spark: SparkSession, bar: ProgressBar, *, n_tasks: int, n_files: int, done_before: int
) -> Iterator[None]:
    """Move the run's files bar while a batch's Spark job runs, from Spark's status tracker."""
    stop = threading.Event()
    thread = threading.Thread(target=_poll_tasks, args=(spark, n_tasks, n_files, done_before, bar, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2)


def _poll_tasks(
    spark: SparkSession, n_tasks: int, n_files: int, done_before: int, bar: ProgressBar, stop: threading.Event
) -> None:
    """Every 0.5 s until ``stop``: the files of the completed tasks of the batch's stage."""
    tracker = spark.sparkContext.statusTracker()
    while not stop.wait(0.5):
        for sid in tracker.getActiveStageIds():
            info = tracker.getStageInfo(sid)
            if info is not None and info.numTasks == n_tasks:
                bar.update(done_before + n_files * info.numCompletedTasks // n_tasks)
