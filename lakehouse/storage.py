"""Storage in one place: local folders and ``s3://`` alike.

Nothing outside ``lakehouse/`` builds a table path or an object-store client by hand. A URI is either
a local path (relative or absolute) or ``s3://bucket/prefix``. An S3-compatible endpoint (moto, MinIO)
is honoured everywhere through ``Settings.s3_endpoint_url``. The pipeline's CloudWatch metrics are
published here too (:func:`put_metrics`): boto3 lives in this module only.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lakehouse.errors import SourceReadError, StorageError, TransientReadError
from lakehouse.tables import INTERNAL_SPECS, TABLE_NAMES, TableSpec

#: the CloudWatch units the pipeline's metrics use ("None": a ratio or other unitless number)
MetricUnit = Literal["None", "Count", "Seconds", "Percent"]

if TYPE_CHECKING:
    from lakehouse.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListedFile:
    """One file found under an input URI."""

    uri: str
    size: int
    #: modification time in milliseconds since the epoch (UTC).
    mtime_ms: int


def is_s3(uri: str) -> bool:
    """True for ``s3://``, ``s3a://`` and ``s3n://`` URIs."""
    return uri.split("://", 1)[0].lower() in ("s3", "s3a", "s3n") and "://" in uri


def split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``."""
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    rest = uri.split("://", 1)[1]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise StorageError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def normalize_uri(uri: str) -> str:
    """Canonical form: ``s3://bucket/prefix`` (no trailing slash) or an absolute local path."""
    if not uri:
        raise StorageError("empty URI: give a local folder or an s3://bucket/prefix")
    if is_s3(uri):
        bucket, key = split_s3(uri)
        key = key.strip("/")
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    return str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI, for folders and s3:// alike."""
    base = normalize_uri(uri)
    tail = "/".join(p.strip("/") for p in parts if p)
    return f"{base}/{tail}" if tail else base


# --- the lakehouse layout: every path under the lakehouse root is spelled here, once -------------------
def table_uri(lakehouse_uri: str, table: TableSpec | str) -> str:
    """Where a table of the lakehouse lives: ``<lakehouse>/<name>``."""
    name = table.name if isinstance(table, TableSpec) else table
    if name not in TABLE_NAMES and name not in INTERNAL_SPECS:
        raise StorageError(f"unknown table {name!r}: expected one of {TABLE_NAMES}")
    return join(lakehouse_uri, name)


def runs_uri(lakehouse_uri: str) -> str:
    """The folder of run summaries: ``<lakehouse>/runs``."""
    return join(lakehouse_uri, "runs")


def run_summary_uri(lakehouse_uri: str, name: str) -> str:
    """One run summary: ``<lakehouse>/runs/<name>.json``."""
    return join(runs_uri(lakehouse_uri), f"{name}.json")


def reports_uri(lakehouse_uri: str) -> str:
    """The folder of reports: ``<lakehouse>/reports``."""
    return join(lakehouse_uri, "reports")


def validation_uri(lakehouse_uri: str, table: str | None = None) -> str:
    """Validation results: the folder ``<lakehouse>/reports/validation``, or one table's ``<table>.json``."""
    folder = join(reports_uri(lakehouse_uri), "validation")
    return join(folder, f"{table}.json") if table else folder


def gx_history_uri(lakehouse_uri: str) -> str:
    """The stored GX validation results Data Docs are rebuilt from: ``<lakehouse>/reports/gx_validations``."""
    return join(reports_uri(lakehouse_uri), "gx_validations")


def data_docs_uri(lakehouse_uri: str) -> str:
    """The Data Docs site: ``<lakehouse>/reports/data_docs``."""
    return join(reports_uri(lakehouse_uri), "data_docs")


def data_docs_index_uri(lakehouse_uri: str) -> str:
    """The Data Docs start page: ``<lakehouse>/reports/data_docs/index.html``."""
    return join(data_docs_uri(lakehouse_uri), "index.html")


def report_uri(lakehouse_uri: str) -> str:
    """The HTML run report: ``<lakehouse>/reports/report.html``."""
    return join(reports_uri(lakehouse_uri), "report.html")


def published_uri(lakehouse_uri: str) -> str:
    """The record of the audited table versions: ``<lakehouse>/reports/published.json``."""
    return join(reports_uri(lakehouse_uri), "published.json")


def evaluation_summary_uri(lakehouse_uri: str, evaluation_id: str) -> str:
    """What one ``cxr evaluate`` matched, counted and left out: ``<lakehouse>/reports/evaluations/<id>.json``."""
    return join(reports_uri(lakehouse_uri), "evaluations", f"{evaluation_id}.json")


def drift_reference_uri(lakehouse_uri: str, run_id: str) -> str:
    """The cached input statistics of a drift reference run: ``<lakehouse>/reports/drift_reference/<run_id>.parquet``."""
    return join(reports_uri(lakehouse_uri), "drift_reference", f"{run_id}.parquet")


def accepted_uri(lakehouse_uri: str) -> str:
    """Runs an operator accepted despite a failed audit (``cxr accept``): ``<lakehouse>/reports/accepted.json``."""
    return join(reports_uri(lakehouse_uri), "accepted.json")


def published_manifest_uri(lakehouse_uri: str, table: str) -> str:
    """The symlink manifest of a table's published version (Athena reads its folder):
    ``<lakehouse>/_published/<table>/manifest``."""
    return join(lakehouse_uri, "_published", table, "manifest")


# --- object store clients --------------------------------------------------------------------------
def _aws_client(service: str, endpoint_url: str, region: str, max_attempts: int, **config: Any) -> Any:
    """A boto3 client of ``service`` at the endpoint override (moto, MinIO; empty: AWS) in ``region``, with
    standard retries and the botocore ``config`` given."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        service,
        endpoint_url=endpoint_url or None,
        region_name=region,
        config=Config(retries={"max_attempts": max_attempts, "mode": "standard"}, **config),
    )


@lru_cache(maxsize=4)
def _s3_client(endpoint_url: str, region: str, max_attempts: int = 5) -> Any:
    return _aws_client(
        "s3", endpoint_url, region, max_attempts, s3={"addressing_style": "path"} if endpoint_url else {}
    )


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the configured endpoint (cached per process)."""
    return _s3_client(settings.s3_endpoint_url, settings.s3_region, settings.s3_max_attempts)


@lru_cache(maxsize=4)
def _cloudwatch_client(endpoint_url: str, region: str, max_attempts: int) -> Any:
    # short timeouts: a metric is worth less than the task that publishes it
    return _aws_client("cloudwatch", endpoint_url, region, max_attempts, connect_timeout=5, read_timeout=10)


def put_metrics(namespace: str, metrics: Mapping[str, tuple[float, MetricUnit]], settings: Settings) -> None:
    """Publish custom CloudWatch metrics (one data point each, now, without dimensions) in one request.

    The client is built like the S3 client: ``settings.s3_endpoint_url`` (``CXR_S3_ENDPOINT_URL`` /
    ``AWS_ENDPOINT_URL``: moto, LocalStack) when set, else AWS in ``settings.s3_region``; the same retries.

    Args:
        namespace: the CloudWatch namespace (``Settings.metrics_namespace``, e.g. ``CXR/Pipeline``).
        metrics: metric name -> (value, unit).
        settings: for the endpoint, region and retries.

    Raises:
        StorageError: when the metrics cannot be published (endpoint unreachable, no credentials, denied,
            a value CloudWatch refuses).
    """
    import math

    if not metrics:
        return
    bad = sorted(name for name, (value, _) in metrics.items() if not math.isfinite(value))
    if bad:
        raise StorageError(f"cannot publish metrics {bad} to CloudWatch: not finite numbers")
    from botocore.exceptions import BotoCoreError, ClientError

    client = _cloudwatch_client(settings.s3_endpoint_url, settings.s3_region, settings.s3_max_attempts)
    data = [{"MetricName": name, "Value": float(value), "Unit": unit} for name, (value, unit) in metrics.items()]
    try:
        client.put_metric_data(Namespace=namespace, MetricData=data)
    except (BotoCoreError, ClientError) as exc:
        where = settings.s3_endpoint_url or f"AWS ({settings.s3_region})"
        raise StorageError(
            f"cannot publish metrics {sorted(metrics)} to CloudWatch {namespace!r} at {where}: {exc}"
        ) from exc


def delta_storage_options(uri: str, settings: Settings) -> dict[str, str]:
    """Storage options for delta-rs (``deltalake``) for this URI; empty for local paths."""
    if not is_s3(uri):
        return {}
    # Commits use S3 conditional writes (supported by AWS S3 and by moto): concurrent writers (parallel
    # shards, a Spark job beside a delta-rs job) cannot overwrite each other's log entries, with no
    # DynamoDB lock table to run.
    opts = {"AWS_REGION": settings.s3_region, "AWS_S3_CONDITIONAL_PUT": "etag"}
    if settings.s3_endpoint_url:
        opts["AWS_ENDPOINT_URL"] = settings.s3_endpoint_url
        opts["AWS_ALLOW_HTTP"] = "true"
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if os.environ.get(var):
            opts[var] = os.environ[var]
    return opts


# --- listing and reading ---------------------------------------------------------------------------
def list_files(uri: str, settings: Settings) -> Iterator[ListedFile]:
    """Every regular file under ``uri``, recursively, hidden files included (nothing is skipped).

    Args:
        uri: a local folder, a single local file, or an ``s3://bucket/prefix``.
        settings: for the S3 endpoint.

    Returns:
        An iterator of listed files in a stable (sorted) order.

    Raises:
        StorageError: when the location does not exist or cannot be listed.
    """
    u = normalize_uri(uri)
    if is_s3(u):
        yield from _list_s3(u, settings)
        return
    root = Path(u)
    if root.is_file():
        st = root.stat()
        yield ListedFile(str(root), st.st_size, int(st.st_mtime * 1000))
        return
    if not root.is_dir():
        raise StorageError(f"input folder not found: {u}")
    found: list[ListedFile] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop (or a second link to a folder already listed)
            dirnames.clear()
            continue
        seen_dirs.add(real)
        dirnames.sort()
        for name in filenames:
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError as exc:  # a dangling link: still an input, quarantined when read
                found.append(ListedFile(str(p), -1, 0))
                del exc
                continue
            if p.is_file():
                found.append(ListedFile(str(p), st.st_size, int(st.st_mtime * 1000)))
    found.sort(key=lambda f: f.uri)
    yield from found


def list_prefix(folder_uri: str, name_prefix: str, settings: Settings) -> list[ListedFile]:
    """The files directly in ``folder_uri`` whose names start with ``name_prefix``, sorted; none when the
    folder is missing. On S3 one ``Prefix`` listing: the cost is the number of matches, not of the folder.

    Raises:
        StorageError: when the location cannot be listed.
    """
    u = normalize_uri(folder_uri)
    if is_s3(u):
        bucket, key = split_s3(u)
        base = f"{key}/" if key else ""
        from botocore.exceptions import BotoCoreError, ClientError

        client = s3_client(settings)
        found: list[ListedFile] = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base + name_prefix):
                for obj in page.get("Contents", []):
                    if "/" not in obj["Key"][len(base) :]:
                        found.append(
                            ListedFile(
                                f"s3://{bucket}/{obj['Key']}",
                                int(obj["Size"]),
                                int(obj["LastModified"].timestamp() * 1000),
                            )
                        )
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot list {u}: {exc}") from exc
        return sorted(found, key=lambda f: f.uri)
    try:
        entries = [e for e in os.scandir(u) if e.name.startswith(name_prefix) and e.is_file()]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise StorageError(f"cannot list {u}: {exc.strerror}") from exc
    return sorted(
        (ListedFile(e.path, e.stat().st_size, int(e.stat().st_mtime * 1000)) for e in entries), key=lambda f: f.uri
    )


def _raise_walk_error(exc: OSError) -> None:
    raise StorageError(f"cannot list {exc.filename}: {exc.strerror}") from exc


def _list_s3(uri: str, settings: Settings) -> Iterator[ListedFile]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    prefix = f"{key}/" if key else ""
    client = s3_client(settings)
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                if obj["Key"].endswith("/") and int(obj["Size"]) == 0:
                    continue  # an empty "folder" marker object, not a file
                yield ListedFile(
                    f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), int(obj["LastModified"].timestamp() * 1000)
                )
    except (BotoCoreError, ClientError) as exc:
        raise StorageError(f"cannot list {uri}: {exc}") from exc


#: S3 error codes that pass: throttling, timeouts, server-side hiccups
_TRANSIENT_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
        "502",
        "504",
    }
)
#: local errno values that pass (network file systems)
_TRANSIENT_ERRNOS = frozenset({errno.ETIMEDOUT, errno.EAGAIN, errno.EINTR, errno.ESTALE})
#: seconds slept before each further try of a transient read error (S3: each try is itself botocore's
#: 5 attempts with exponential backoff)
READ_BACKOFF_S: tuple[float, ...] = (2.0,)


#: ``keep_reading(head, complete)``: False stops the read after the head (``complete``: the head is the whole file)
HeadCheck = Callable[[bytes, bool], bool]


def read_bytes(
    uri: str,
    settings: Settings,
    *,
    backoff: tuple[float, ...] = READ_BACKOFF_S,
    head: int = 0,
    keep_reading: HeadCheck | None = None,
) -> bytes:
    """Read one input file; a transient error (throttling, timeout) is retried with backoff.

    Args:
        uri: a local path or ``s3://bucket/key``.
        settings: for the S3 endpoint.
        backoff: seconds slept before each retry of a transient error.
        head: with ``keep_reading``, read this many bytes first (one request: the rest of the same stream
            is read only when ``keep_reading(head_bytes, complete)`` says so).
        keep_reading: judges the head; False returns the head alone (the file was not read further).

    Raises:
        TransientReadError: the error still passes for transient after the retries (read again next run).
        SourceReadError: when the bytes cannot be read (an input error: the file is quarantined).
        InputError: whatever ``keep_reading`` raises.
    """
    for delay in (*backoff, None):
        try:
            return _read_once(uri, settings, head if keep_reading else 0, keep_reading)
        except TransientReadError as exc:
            if delay is None:
                raise
            log.info("transient error reading %s (%s): retrying in %.1f s", uri, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _read_stream(stream: Any, head: int, keep_reading: HeadCheck | None) -> bytes:
    if not head or keep_reading is None:
        return bytes(stream.read())
    parts, n = [], 0
    while n < head:  # a stream may return less than asked before its end
        part = stream.read(head - n)
        if not part:
            break
        parts.append(bytes(part))
        n += len(part)
    first = b"".join(parts)
    complete = n < head  # the end was reached: the head is the whole file
    if not keep_reading(first, complete) or complete:
        return first
    return first + bytes(stream.read())


def _read_once(uri: str, settings: Settings, head: int, keep_reading: HeadCheck | None) -> bytes:
    if is_s3(uri):
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        bucket, key = split_s3(uri)
        try:
            stream = s3_client(settings).get_object(Bucket=bucket, Key=key)["Body"]
            try:
                return _read_stream(stream, head, keep_reading)
            finally:
                stream.close()  # a stream left after the head: the rest is not downloaded
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _TRANSIENT_S3_CODES or status in _TRANSIENT_S3_CODES:
                raise TransientReadError(f"cannot read {uri} for now: {exc}") from exc
            raise SourceReadError(f"cannot read {uri}: {exc}") from exc
        except (
            EndpointConnectionError,
            ConnectTimeoutError,
            ReadTimeoutError,
            ConnectionClosedError,
            ResponseStreamingError,
            IncompleteReadError,
        ) as exc:
            raise TransientReadError(f"cannot read {uri} for now: {exc}") from exc
        except BotoCoreError as exc:
            raise SourceReadError(f"cannot read {uri}: {exc}") from exc
    try:
        with Path(uri).open("rb") as fh:
            return _read_stream(fh, head, keep_reading)
    except OSError as exc:
        if exc.errno in _TRANSIENT_ERRNOS:
            raise TransientReadError(f"cannot read {uri} for now: {exc.strerror or exc}") from exc
        raise SourceReadError(f"cannot read {uri}: {exc.strerror or exc}") from exc


def write_text(uri: str, text: str, settings: Settings, *, content_type: str = "text/plain") -> None:
    """Write a small text object (a run summary, a report) to a folder or s3://.

    Raises:
        StorageError: when the object cannot be written.
    """
    write_bytes(uri, text.encode(), settings, content_type=content_type)


def write_bytes(uri: str, data: bytes, settings: Settings, *, content_type: str | None = None) -> None:
    """Write one object (a Parquet data file, a report) to a folder or s3://, creating folders as needed.

    Raises:
        StorageError: when the object cannot be written.
    """
    u = normalize_uri(uri)
    if is_s3(u):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(u)
        try:
            extra = {"ContentType": content_type} if content_type else {}
            s3_client(settings).put_object(Bucket=bucket, Key=key, Body=data, **extra)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot write {u}: {exc}") from exc
        return
    p = Path(u)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    except OSError as exc:
        raise StorageError(f"cannot write {u}: {exc.strerror or exc}") from exc


def delete(uri: str, settings: Settings) -> None:
    """Delete one object or file if it exists (best effort for files no table references)."""
    u = normalize_uri(uri)
    if is_s3(u):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(u)
        try:
            s3_client(settings).delete_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"cannot delete {u}: {exc}") from exc
        return
    Path(u).unlink(missing_ok=True)


def read_text(uri: str, settings: Settings) -> str:
    """Read a small text object written by :func:`write_text`."""
    u = normalize_uri(uri)
    if is_s3(u):
        return read_bytes(u, settings).decode()
    return Path(u).read_text()


def exists(uri: str, settings: Settings) -> bool:
    """True when the file exists (folder or s3://).

    Raises:
        StorageError: when the store cannot be asked (network, permissions other than a missing key).
    """
    if not is_s3(uri):
        return os.path.isfile(uri)
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client(settings).head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise StorageError(f"cannot check {uri}: {exc}") from exc  # e.g. 403: not "missing"
    except BotoCoreError as exc:
        raise StorageError(f"cannot check {uri}: {exc}") from exc
    return True


def put_tree(local: Path, dest_uri: str, settings: Settings) -> int:
    """Replace ``dest_uri`` (folder or s3://) by the files under the local folder ``local``.

    On s3:// every file is uploaded with its content type, then objects under ``dest_uri`` that the new
    tree does not hold are deleted (pages of an earlier build the new index no longer links).

    Returns:
        The number of files written.

    Raises:
        StorageError: when the destination cannot be written.
    """
    import mimetypes
    import shutil

    dest = normalize_uri(dest_uri)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    if not is_s3(dest):
        target = Path(dest)
        try:
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(local, target)
        except OSError as exc:
            raise StorageError(f"cannot write {dest}: {exc}") from exc
        return len(files)
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3(dest)
    client = s3_client(settings)
    keys = {f"{prefix}/{p.relative_to(local).as_posix()}".lstrip("/") for p in files}
    try:
        stale = [f.uri for f in list_files(dest, settings)]
        for p in files:
            key = f"{prefix}/{p.relative_to(local).as_posix()}".lstrip("/")
            ctype = mimetypes.guess_type(p.name)[0] or "application/octet-stream"
            client.put_object(Bucket=bucket, Key=key, Body=p.read_bytes(), ContentType=ctype)
        for uri in stale:
            key = split_s3(uri)[1]
            if key not in keys:
                client.delete_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError) as exc:
        raise StorageError(f"cannot write {dest}: {exc}") from exc
    return len(files)
