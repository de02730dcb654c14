"""Run summaries: one JSON per stage run under ``<lakehouse>/runs/`` (folder or s3://), written by the
preprocessing and inference jobs and read by validation, the report and the DAG's new-images sensor.

One record type: :class:`RunRecord`, with one subclass per job (:class:`PreprocessRun`, :class:`InferRun`).
The jobs fill one in and :func:`write_summary` it; :func:`read_summaries` gives them back, typed. The JSON
is ``kind`` plus every field; a summary without ``kind`` is a preprocessing run.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar

from lakehouse import storage
from lakehouse.config import Settings
from lakehouse.errors import StorageError

log = logging.getLogger(__name__)

RunKind = Literal["preprocess", "infer"]


def new_run_id(prefix: str = "pre") -> str:
    """A sortable, unique run id (``pre-20261130T221000Z-1a2b3c``)."""
    return f"{prefix}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


@dataclass(kw_only=True)
class RunRecord:
    """What one stage run did, as ``<lakehouse>/runs/<name>.json`` holds it.

    A record read back by :func:`read_summaries` also knows its file (``uri``, ``mtime_ms``) and the JSON
    as read (``body``, keys this version does not know included); these are not fields, so they are
    neither in the JSON nor in ``dataclasses.asdict``.
    """

    kind: ClassVar[RunKind]
    run_id: str

    def __post_init__(self) -> None:
        self.uri = ""
        self.mtime_ms = 0
        self._read_body: dict[str, Any] | None = None

    @property
    def body(self) -> dict[str, Any]:
        """The JSON as read back, or as it would be written for a record not read."""
        return self._read_body if self._read_body is not None else self.to_dict()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written for the run: ``kind`` and every field."""
        return {"kind": self.kind, **asdict(self)}

    def to_json(self) -> str:
        """The JSON text written for the run (``--json`` prints the same)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass(kw_only=True)
class PreprocessRun(RunRecord):
    """What a preprocessing run did; the counts reconcile with ``discovered``.

    ``already_present`` counts files an earlier run judged (unchanged since, whatever that judgement
    was: ``previously`` breaks them down by it) and new paths whose bytes are already in ``tensors``.
    An Airflow retry of a run counts what its earlier attempts judged as its own.
    """

    kind: ClassVar[RunKind] = "preprocess"
    input_uri: str = ""
    lakehouse_uri: str = ""
    discovered: int = 0
    new: int = 0
    already_present: int = 0
    duplicates: int = 0
    skipped: int = 0
    quarantined: int = 0
    retryable: int = 0
    decoded: int = 0
    batches: int = 0
    seconds: float = 0.0
    #: CPU seconds spent on this run: the driver's plus the decoding workers' (user + system)
    cpu_seconds: float = 0.0
    #: cores the run had to decode with (Spark's default parallelism)
    cores: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    previously: dict[str, int] = field(default_factory=dict)
    duplicate_pairs: list[dict[str, str]] = field(default_factory=list)
    dev_pseudonym_key: bool = False

    @property
    def reconciles(self) -> bool:
        """discovered = new + already present + duplicates + skipped + quarantined + retryable."""
        return self.discovered == (
            self.new + self.already_present + self.duplicates + self.skipped + self.quarantined + self.retryable
        )

    @property
    def first_seen(self) -> int:
        """Files this run judged that were not skipped: the quarantine share's denominator."""
        return self.new + self.duplicates + self.quarantined + self.retryable + self.content_present

    @property
    def content_present(self) -> int:
        """New paths whose bytes were already in ``tensors`` (part of ``already_present``)."""
        return self.already_present - sum(self.previously.values())

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written for the run, with ``reconciles``."""
        return {**super().to_dict(), "reconciles": self.reconciles}


@dataclass(kw_only=True)
class InferRun(RunRecord):
    """What an inference run did for one model."""

    kind: ClassVar[RunKind] = "infer"
    model_id: str
    weights_sha256: str
    tensors_version: int
    device: str
    candidates: int = 0
    already_predicted: int = 0
    predicted: int = 0
    seconds: float = 0.0
    #: CPU seconds of the inference process (user + system; all its threads)
    cpu_seconds: float = 0.0
    #: GPU seconds: wall seconds of the scoring loop on a CUDA device (0 on the CPU)
    gpu_seconds: float = 0.0
    #: CPU threads the model ran on
    cores: int = 0
    untrained: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_RECORD_TYPES: dict[str, type[RunRecord]] = {"preprocess": PreprocessRun, "infer": InferRun}
R = TypeVar("R", bound=RunRecord)


def write_summary(
    lakehouse_uri: str,
    record: RunRecord,
    settings: Settings,
    *,
    name: str | None = None,
    extra_keys: Mapping[str, Any] | None = None,
) -> str:
    """Write a run's record as ``<lakehouse>/runs/<name>.json`` and add it to the run index.

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix`` holding the Delta tables.
        record: the run's record.
        settings: for the S3 endpoint.
        name: the file name without ``.json``; the run id when None.
        extra_keys: keys written beside the record's (read back in ``body`` only).

    Returns:
        The URI written.
    """
    name = name or record.run_id
    uri = storage.run_summary_uri(lakehouse_uri, name)
    body = {**record.to_dict(), **(extra_keys or {})}
    text = json.dumps(body, indent=2, sort_keys=True)
    storage.write_text(uri, text, settings, content_type="application/json")
    from deltalake.exceptions import DeltaError

    try:
        if _open_index(lakehouse_uri, settings) is None:  # the first summary, or a lakehouse made before the index
            reindex(lakehouse_uri, settings)  # lists the folder: this summary included
        else:
            _append_index(lakehouse_uri, [(name, uri, datetime.now(UTC), text)], settings)
    except (StorageError, OSError, DeltaError) as exc:  # the JSON is written: `cxr maintain` indexes it later
        log.warning("run summary %s written but not indexed (%s): `cxr maintain` indexes it", uri, exc)
    return uri


def read_summaries(lakehouse_uri: str, settings: Settings, *, kind: type[R], run_id: str | None = None) -> list[R]:
    """The run summaries of the lakehouse that are a ``kind``, typed; none when there are none.

    Every summary comes from the run index (one small Delta table: no listing of ``runs/``, no read per
    summary); one run's (``run_id``) from a listing of the names that start with it (on S3 one prefix
    listing: the cost is that run's files, not the folder's).

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix`` holding the Delta tables.
        settings: for the S3 endpoint.
        kind: :class:`PreprocessRun` or :class:`InferRun`; :class:`RunRecord` for every run.
        run_id: only this run's summaries (their files are named after the run id: the others are not read).

    Returns:
        The records, each with its ``uri``, ``mtime_ms`` and ``body``. Summaries that are not JSON objects
        with a ``run_id`` and the fields of their kind are skipped with a warning.
    """
    if run_id is not None:
        folder = storage.runs_uri(lakehouse_uri)
        found = [
            (f.uri, f.mtime_ms, storage.read_text(f.uri, settings))
            for f in storage.list_prefix(folder, run_id, settings)
            if f.uri.endswith(".json")
        ]
    else:
        found = _indexed(lakehouse_uri, settings)
    out = []
    for uri, mtime_ms, text in found:
        record = _parse(uri, mtime_ms, text)
        if record is not None and isinstance(record, kind) and (run_id is None or record.run_id == run_id):
            out.append(record)
    return out


def shard_of(record: RunRecord) -> tuple[int, int]:
    """(i, N) of the inference shard a summary covers ((0, 1): a whole, unsharded run)."""
    try:
        i, n = (int(x) for x in str(record.body.get("shard") or "0/1").split("/"))
    except ValueError:
        return 0, 1
    return i, n


def newest_fanout(records: Sequence[R]) -> list[R]:
    """Per run id, the summaries of its newest fan-out: a run cleared and rerun with another shard count
    leaves the earlier fan-out's files (``-shard-i-of-N-``) beside the new ones, which must not be added up."""
    newest: dict[str, tuple[int, int]] = {}  # run id -> (mtime, N) of its newest summary
    for r in records:
        if r.mtime_ms >= newest.get(r.run_id, (-1, 0))[0]:
            newest[r.run_id] = (r.mtime_ms, shard_of(r)[1])
    return [r for r in records if shard_of(r)[1] == newest[r.run_id][1]]


def reindex(lakehouse_uri: str, settings: Settings) -> int:
    """Add every summary under ``runs/`` that the run index lacks, or holds an older copy of (a lakehouse
    made before the index, or a summary whose index row was not written); creates the index. Lists the
    folder: O(runs).

    Returns:
        The number of summaries added to the index.
    """
    from lakehouse.delta_rs import projected_dataset

    dt = _open_index(lakehouse_uri, settings)
    indexed: dict[str, int] = {}  # name -> when its latest index row was written (ms)
    if dt is not None:
        rows_read = projected_dataset(dt, ["name", "written_at"]).to_table()
        for name, at in zip(
            rows_read.column("name").to_pylist(), rows_read.column("written_at").to_pylist(), strict=True
        ):
            indexed[name] = max(indexed.get(name, 0), int(at.timestamp() * 1000))
    folder = storage.runs_uri(lakehouse_uri)
    try:
        listed = [f for f in storage.list_prefix(folder, "", settings) if f.uri.endswith(".json")]
    except StorageError:
        listed = []
    rows = []
    for f in listed:
        name = f.uri[len(folder) + 1 : -len(".json")]
        if name not in indexed or f.mtime_ms > indexed[name]:  # missing, or rewritten after it was indexed
            rows.append(
                (name, f.uri, datetime.fromtimestamp(f.mtime_ms / 1000, tz=UTC), storage.read_text(f.uri, settings))
            )
    _append_index(lakehouse_uri, rows, settings, create=True)
    if rows:
        log.info("run index: %d summaries added", len(rows))
    return len(rows)


def _open_index(lakehouse_uri: str, settings: Settings) -> Any:
    """The run index (a delta-rs table), or None when there is none yet."""
    from deltalake.exceptions import TableNotFoundError

    from lakehouse import delta_rs
    from lakehouse.tables import RUN_INDEX

    try:
        return delta_rs.open_table(lakehouse_uri, RUN_INDEX, settings)
    except TableNotFoundError:
        return None


def _append_index(
    lakehouse_uri: str, rows: list[tuple[str, str, datetime, str]], settings: Settings, *, create: bool = False
) -> None:
    """Append (name, uri, written_at, JSON) rows to the run index (``create``: make it even with none)."""
    import pyarrow as pa

    from lakehouse import delta_rs
    from lakehouse.tables import RUN_INDEX, arrow_schema

    if create and not rows:
        delta_rs.ensure_table(lakehouse_uri, RUN_INDEX, settings)
        return
    parsed = [(r, _json_object(r[3])) for r in rows]
    table = pa.Table.from_pylist(
        [
            {
                "name": name,
                "run_id": str(body.get("run_id", "")),
                "kind": str(body.get("kind", "preprocess")),
                "uri": uri,
                "written_at": written_at,
                "body": text,
            }
            for (name, uri, written_at, text), body in parsed
        ],
        schema=arrow_schema(RUN_INDEX),
    )
    delta_rs.append_rows(lakehouse_uri, RUN_INDEX, table, settings)


def _json_object(text: str) -> dict[str, Any]:
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _indexed(lakehouse_uri: str, settings: Settings) -> list[tuple[str, int, str]]:
    """(uri, written ms, JSON) of every indexed summary, the latest row per name (a retried run rewrites
    its summary); the index is made from the folder first when there is none."""
    dt = _open_index(lakehouse_uri, settings)
    if dt is None:
        reindex(lakehouse_uri, settings)
        dt = _open_index(lakehouse_uri, settings)
        if dt is None:
            return []
    from lakehouse.delta_rs import projected_dataset

    columns = ["name", "uri", "written_at", "body"]
    rows = projected_dataset(dt, columns).to_table(columns=columns).to_pylist()
    latest: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["written_at"]):
        latest[r["name"]] = r
    return [
        (r["uri"], int(r["written_at"].timestamp() * 1000), r["body"])
        for r in sorted(latest.values(), key=lambda r: r["uri"])
    ]


def _parse(uri: str, mtime_ms: int, text: str) -> RunRecord | None:
    """The typed record of one summary's JSON text; None (logged) when it is not a summary."""
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("skipping %s: not a JSON run summary (%s)", uri, exc)
        return None
    if not isinstance(body, dict) or "run_id" not in body:
        log.warning("skipping %s: not a run summary", uri)
        return None
    record = _record(body, uri)
    if record is None:
        return None
    record.uri, record.mtime_ms, record._read_body = uri, mtime_ms, body
    return record


def _record(body: dict[str, Any], uri: str) -> RunRecord | None:
    """The typed record of a summary's JSON (keys that are not fields stay in ``body`` only); None (logged)
    for another kind of run or when a field without a default is missing."""
    record_type = _RECORD_TYPES.get(str(body.get("kind", "preprocess")))
    if record_type is None:
        log.debug("ignoring %s: a run of kind %r", uri, body.get("kind"))
        return None
    known = {f.name: f for f in fields(record_type)}
    missing = [n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING and n not in body]
    if missing:
        log.warning("skipping %s: not a run summary (no %s)", uri, ", ".join(missing))
        return None
    return record_type(**{k: v for k, v in body.items() if k in known})
