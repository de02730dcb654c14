"""Run summaries: one JSON per stage run under ``<lakehouse>/runs/`` (folder or s3://), written by the
preprocessing and inference jobs and read by validation, the report and the DAG's new-images sensor."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from lakehouse import storage
from lakehouse.config import Settings
from lakehouse.errors import StorageError

log = logging.getLogger(__name__)

RunKind = Literal["preprocess", "infer"]


def new_run_id(prefix: str = "pre") -> str:
    """A sortable, unique run id (``pre-20261130T221000Z-1a2b3c``)."""
    return f"{prefix}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class RunSummary:
    """One run summary file: where it is, when it was written, what it says."""

    uri: str
    mtime_ms: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        """``preprocess`` or ``infer`` (summaries written before the field existed are preprocessing runs)."""
        return str(self.body.get("kind", "preprocess"))


def write_summary(lakehouse_uri: str, name: str, body: dict[str, Any], settings: Settings) -> str:
    """Write ``body`` as ``<lakehouse>/runs/<name>.json``; return its URI."""
    uri = storage.run_summary_uri(lakehouse_uri, name)
    storage.write_text(uri, json.dumps(body, indent=2, sort_keys=True), settings, content_type="application/json")
    return uri


def read_summaries(lakehouse_uri: str, settings: Settings, *, kind: RunKind | None = None) -> list[RunSummary]:
    """Every run summary under ``<lakehouse>/runs/`` (of one ``kind`` when given); none when the folder is
    missing. Files that are not JSON objects with a ``run_id`` are skipped with a warning."""
    try:
        listed = [f for f in storage.list_files(storage.runs_uri(lakehouse_uri), settings) if f.uri.endswith(".json")]
    except StorageError:
        return []  # no run has written a summary yet
    out = []
    for f in listed:
        try:
            body = json.loads(storage.read_text(f.uri, settings))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.warning("skipping %s: not a JSON run summary (%s)", f.uri, exc)
            continue
        if not isinstance(body, dict) or "run_id" not in body:
            log.warning("skipping %s: not a run summary", f.uri)
            continue
        summary = RunSummary(f.uri, f.mtime_ms, body)
        if kind is None or summary.kind == kind:
            out.append(summary)
    return out
