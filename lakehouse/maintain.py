"""Lakehouse upkeep (``cxr maintain``): delete orphan and expired data files, compact small files.

- **Orphans**: data files in a table's folder that no version of the table references: left by a run
  killed between writing and committing a batch, a failed commit, or a MERGE attempt that lost a
  conflict. Deleted once older than ``older_than_hours`` (default 24), so the files of a run writing
  right now (not committed yet) are never touched.
- **Expired files**: data files a later version removed (a compaction, a MERGE that rewrote a file) more
  than ``retain_hours`` ago (default 168, Delta's own default retention). Time travel to versions older
  than that stops working, except to the versions recorded in ``reports/published.json`` (the audited
  versions), whose files are always kept.
- **Run index**: summaries under ``runs/`` that the run index lacks are added to it.
- **Compaction**: ``predictions``, ``quarantine``, ``files`` and ``run_index`` grow by small MERGE commits; once a table
  holds ``COMPACT_MIN_FILES`` files under ``COMPACT_TARGET_BYTES`` they are rewritten into files of about
  that size (files already that large are left alone, so a compaction never rewrites the whole table).

Deletion is done here, not with delta-rs VACUUM, so that it writes no commit and keeps the published
versions readable.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

from lakehouse import storage
from lakehouse.config import Settings
from lakehouse.errors import ConfigError
from lakehouse.publish import published_versions
from lakehouse.runs import reindex
from lakehouse.tables import FILES, PREDICTIONS, QUARANTINE, RUN_INDEX, SPECS, TableSpec

log = logging.getLogger(__name__)

#: tables written by small MERGE commits: compacted by maintenance
COMPACTED: tuple[TableSpec, ...] = (PREDICTIONS, QUARANTINE, FILES, RUN_INDEX)
#: a file under this size is small; compaction writes files of about this size
COMPACT_TARGET_BYTES = 16 << 20
#: compact a table once it holds this many small files
COMPACT_MIN_FILES = 8


@dataclass
class TableUpkeep:
    """What maintenance did to one table."""

    table: str
    orphans_deleted: int = 0
    expired_deleted: int = 0
    bytes_freed: int = 0
    orphans_kept_young: int = 0
    files_compacted: int = 0
    files_added: int = 0


@dataclass
class MaintainResult:
    """What ``cxr maintain`` did, per table."""

    lakehouse_uri: str
    older_than_hours: float
    retain_hours: float
    tables: list[TableUpkeep] = field(default_factory=list)
    #: run summaries the run index lacked, added to it
    summaries_indexed: int = 0

    @property
    def bytes_freed(self) -> int:
        """Bytes of data files deleted, over every table."""
        return sum(t.bytes_freed for t in self.tables)

    @property
    def orphans_deleted(self) -> int:
        """Orphan data files deleted, over every table."""
        return sum(t.orphans_deleted for t in self.tables)

    @property
    def files_deleted(self) -> int:
        """Orphan and expired data files deleted, over every table."""
        return sum(t.orphans_deleted + t.expired_deleted for t in self.tables)

    def to_dict(self) -> dict[str, object]:
        """The result as JSON-ready data, with the totals (``cxr maintain --json``, the DAG task's XCom)."""
        from dataclasses import asdict

        return {**asdict(self), "bytes_freed": self.bytes_freed, "files_deleted": self.files_deleted}


def maintain(
    lakehouse_uri: str,
    settings: Settings,
    *,
    older_than_hours: float = 24.0,
    retain_hours: float = 168.0,
    compact: bool = True,
) -> MaintainResult:
    """Delete orphan and expired data files and compact the small-file tables.

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix`` holding the Delta tables.
        settings: for the S3 endpoint.
        older_than_hours: only orphans last modified longer ago than this are deleted (0: every orphan;
            only when no run is writing).
        retain_hours: files removed by a later version are kept this long for time travel.
        compact: also compact ``predictions``, ``quarantine`` and ``files``.

    Raises:
        ConfigError: for a negative age.
    """
    from deltalake.exceptions import TableNotFoundError

    from lakehouse import delta_rs

    if older_than_hours < 0 or retain_hours < 0:
        raise ConfigError(f"ages must be 0 or more hours (got {older_than_hours} and {retain_hours})")
    result = MaintainResult(storage.normalize_uri(lakehouse_uri), older_than_hours, retain_hours)
    published = published_versions(lakehouse_uri, settings)
    result.summaries_indexed = reindex(lakehouse_uri, settings)  # summaries whose index row was not written
    for spec in (*SPECS.values(), RUN_INDEX):
        upkeep = TableUpkeep(spec.name)
        try:
            dt = delta_rs.open_table(lakehouse_uri, spec, settings)
        except TableNotFoundError:
            continue
        if compact and spec in COMPACTED:
            sizes = dt.get_add_actions(flatten=True).column("size_bytes").to_pylist()
            if sum(1 for s in sizes if s < COMPACT_TARGET_BYTES) >= COMPACT_MIN_FILES:
                metrics = dt.optimize.compact(target_size=COMPACT_TARGET_BYTES)
                upkeep.files_compacted = int(metrics.get("numFilesRemoved", 0))
                upkeep.files_added = int(metrics.get("numFilesAdded", 0))
        keep_versions = [v for v in (published.get(spec.name),) if v is not None]
        _sweep(lakehouse_uri, spec, settings, older_than_hours, retain_hours, keep_versions, upkeep)
        result.tables.append(upkeep)
        log.info(
            "%s: %d orphan and %d expired files deleted (%d bytes), %d young orphans kept, %d small files compacted",
            spec.name,
            upkeep.orphans_deleted,
            upkeep.expired_deleted,
            upkeep.bytes_freed,
            upkeep.orphans_kept_young,
            upkeep.files_compacted,
        )
    return result


@dataclass(frozen=True)
class LogPaths:
    """What the Delta log says about the data files: every path it mentions, and when each removed one was
    removed (ms since the epoch; the latest removal)."""

    referenced: set[str]
    removed_at: dict[str, int]


def read_log_paths(lakehouse_uri: str, spec: TableSpec, settings: Settings) -> LogPaths:
    """Every data file path (relative to the table root) that any version in the Delta log adds or removes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    log_uri = storage.join(storage.table_uri(lakehouse_uri, spec), "_delta_log")
    out = LogPaths(set(), {})
    for f in storage.list_files(log_uri, settings):
        name = f.uri.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:20].isdigit():
            for line in storage.read_text(f.uri, settings).splitlines():
                if line.strip():
                    _note(out, json.loads(line))
        elif ".checkpoint." in name and name.endswith(".parquet"):
            table = pq.read_table(pa.BufferReader(storage.read_bytes(f.uri, settings, backoff=())))
            for kind in ("add", "remove"):
                if kind in table.column_names:
                    for item in table.column(kind).to_pylist():
                        if item:
                            _note(out, {kind: item})
    return out


def referenced_paths(lakehouse_uri: str, spec: TableSpec, settings: Settings) -> set[str]:
    """Every data file path (relative to the table root) that any version in the Delta log adds or removes."""
    return read_log_paths(lakehouse_uri, spec, settings).referenced


def _note(out: LogPaths, action: dict[str, object]) -> None:
    for kind in ("add", "remove"):
        body = action.get(kind)
        if isinstance(body, dict) and isinstance(body.get("path"), str):
            path = unquote(str(body["path"]))
            out.referenced.add(path)
            if kind == "remove" and body.get("deletionTimestamp") is not None:
                ts = int(body["deletionTimestamp"])  # type: ignore[call-overload]
                out.removed_at[path] = max(ts, out.removed_at.get(path, 0))


def _active_paths(lakehouse_uri: str, spec: TableSpec, settings: Settings, version: int | None) -> set[str]:
    from lakehouse import delta_rs

    return delta_rs.data_file_paths(delta_rs.open_table(lakehouse_uri, spec, settings, version=version))


def _sweep(
    lakehouse_uri: str,
    spec: TableSpec,
    settings: Settings,
    older_than_hours: float,
    retain_hours: float,
    keep_versions: list[int],
    upkeep: TableUpkeep,
) -> None:
    root = storage.table_uri(lakehouse_uri, spec).rstrip("/")
    logged = read_log_paths(lakehouse_uri, spec, settings)
    keep = _active_paths(lakehouse_uri, spec, settings, None)
    for version in keep_versions:
        keep |= _active_paths(lakehouse_uri, spec, settings, version)
    now_ms = time.time() * 1000
    orphan_cutoff, expired_cutoff = now_ms - older_than_hours * 3.6e6, now_ms - retain_hours * 3.6e6
    for f in storage.list_files(root, settings):
        rel = f.uri[len(root) + 1 :]
        if rel.startswith("_") or "/_" in rel or rel.startswith(".") or "/." in rel:
            continue  # the log, and hidden or underscore files Delta readers ignore
        if not rel.endswith(".parquet") or rel in keep:
            continue
        if rel not in logged.referenced:  # an orphan: no version ever referenced it
            if f.mtime_ms > orphan_cutoff:
                upkeep.orphans_kept_young += 1
                continue
            upkeep.orphans_deleted += 1
        elif logged.removed_at.get(rel, now_ms) <= expired_cutoff:  # removed by a version long enough ago
            upkeep.expired_deleted += 1
        else:
            continue
        storage.delete(f.uri, settings)
        upkeep.bytes_freed += max(f.size, 0)
