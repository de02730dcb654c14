"""Lakehouse upkeep (``cxr maintain``): delete orphan data files, compact the small-file tables.

An orphan is a data file in a table's folder that no version of the table references: left by a run
killed between writing and committing a batch, a failed commit, or a MERGE attempt that lost a
conflict. Files that an old version references (time travel, the published pointers) are kept: this is
not VACUUM. Only orphans older than ``older_than_hours`` are deleted, so a run writing right now (its
files are not committed yet) is never touched: keep the default (24 h) unless nothing else runs.

``predictions``, ``quarantine`` and ``files`` grow by small MERGE commits; they are compacted (the small
files are rewritten into few; the old ones stay referenced by old versions).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import unquote

from lakehouse import storage
from lakehouse.config import Settings
from lakehouse.errors import ConfigError
from lakehouse.tables import FILES, PREDICTIONS, QUARANTINE, SPECS, TableSpec

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger(__name__)

#: tables written by small MERGE commits: compacted by maintenance
COMPACTED: tuple[TableSpec, ...] = (PREDICTIONS, QUARANTINE, FILES)


@dataclass
class TableUpkeep:
    """What maintenance did to one table."""

    table: str
    orphans_deleted: int = 0
    bytes_freed: int = 0
    orphans_kept_young: int = 0
    files_compacted: int = 0
    files_added: int = 0


@dataclass
class MaintainResult:
    """What ``cxr maintain`` did, per table."""

    lakehouse_uri: str
    older_than_hours: float
    tables: list[TableUpkeep] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        """Bytes of orphan data files deleted, over every table."""
        return sum(t.bytes_freed for t in self.tables)

    @property
    def orphans_deleted(self) -> int:
        """Orphan data files deleted, over every table."""
        return sum(t.orphans_deleted for t in self.tables)


def maintain(
    lakehouse_uri: str, settings: Settings, *, older_than_hours: float = 24.0, compact: bool = True
) -> MaintainResult:
    """Delete orphan data files older than the limit and compact the small-file tables.

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix`` holding the Delta tables.
        settings: for the S3 endpoint.
        older_than_hours: only orphans last modified longer ago than this are deleted (0: every orphan;
            only when no run is writing).
        compact: also compact ``predictions``, ``quarantine`` and ``files``.

    Raises:
        ConfigError: for a negative age.
    """
    from deltalake.exceptions import TableNotFoundError

    from lakehouse import delta_rs

    if older_than_hours < 0:
        raise ConfigError(f"--older-than must be 0 or more hours (got {older_than_hours})")
    result = MaintainResult(storage.normalize_uri(lakehouse_uri), older_than_hours)
    for spec in SPECS.values():
        upkeep = TableUpkeep(spec.name)
        try:
            dt = delta_rs.open_table(lakehouse_uri, spec, settings)
        except TableNotFoundError:
            continue
        if compact and spec in COMPACTED:
            metrics = dt.optimize.compact()
            upkeep.files_compacted = int(metrics.get("numFilesRemoved", 0))
            upkeep.files_added = int(metrics.get("numFilesAdded", 0))
        _delete_orphans(lakehouse_uri, spec, settings, older_than_hours, upkeep)
        result.tables.append(upkeep)
        log.info(
            "%s: %d orphan files deleted (%d bytes), %d kept (younger than %s h), %d small files compacted",
            spec.name,
            upkeep.orphans_deleted,
            upkeep.bytes_freed,
            upkeep.orphans_kept_young,
            older_than_hours,
            upkeep.files_compacted,
        )
    return result


def referenced_paths(lakehouse_uri: str, spec: TableSpec, settings: Settings) -> set[str]:
    """Every data file path (relative to the table root) that any version in the Delta log adds or removes."""
    import pyarrow.parquet as pq

    log_uri = storage.join(storage.table_uri(lakehouse_uri, spec), "_delta_log")
    paths: set[str] = set()
    for f in storage.list_files(log_uri, settings):
        name = f.uri.rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:20].isdigit():
            for line in storage.read_text(f.uri, settings).splitlines():
                if line.strip():
                    paths.update(_action_paths(json.loads(line)))
        elif ".checkpoint." in name and name.endswith(".parquet"):
            import pyarrow as pa

            table = pq.read_table(pa.BufferReader(storage.read_bytes(f.uri, settings, backoff=())))
            for action in ("add", "remove"):
                if action in table.column_names:
                    for item in table.column(action).to_pylist():
                        if item and item.get("path"):
                            paths.add(unquote(item["path"]))
    return paths


def _action_paths(action: dict[str, object]) -> Iterable[str]:
    for kind in ("add", "remove"):
        body = action.get(kind)
        if isinstance(body, dict) and isinstance(body.get("path"), str):
            yield unquote(str(body["path"]))


def _delete_orphans(
    lakehouse_uri: str, spec: TableSpec, settings: Settings, older_than_hours: float, upkeep: TableUpkeep
) -> None:
    root = storage.table_uri(lakehouse_uri, spec).rstrip("/")
    referenced = referenced_paths(lakehouse_uri, spec, settings)
    cutoff_ms = (time.time() - older_than_hours * 3600) * 1000
    for f in storage.list_files(root, settings):
        rel = f.uri[len(root) + 1 :]
        if rel.startswith("_") or "/_" in rel or rel.startswith(".") or "/." in rel:
            continue  # the log, and hidden or underscore files Delta readers ignore
        if not rel.endswith(".parquet") or rel in referenced:
            continue
        if f.mtime_ms > cutoff_ms:
            upkeep.orphans_kept_young += 1
            continue
        storage.delete(f.uri, settings)
        upkeep.orphans_deleted += 1
        upkeep.bytes_freed += max(f.size, 0)
