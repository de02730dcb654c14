"""The ``files`` ledger: every file a preprocessing run judged, by (uri, size, mtime), with its outcome.

A file is read once. The next run skips every path whose size and modification time are unchanged,
whatever its outcome (new, already present, duplicate, skipped or quarantined): an old failure is not
decoded again and does not count against a new run's quarantine share. A changed file is judged again;
``retryable`` (a transient read error) and ``requeued`` (``cxr requeue``) files are judged by the next run.

One row per path holds its latest judgement (MERGE on ``source_uri``). The ledger is written after each
batch's tensors are committed, so a kill between the two leaves tensors rows without ledger rows:
:func:`split_listing` also counts those (same path, size and mtime in ``tensors``) as known.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lakehouse.config import Settings
from lakehouse.storage import ListedFile
from lakehouse.tables import FILES, REJUDGED_OUTCOMES, TENSORS, TableSpec, arrow_schema

if TYPE_CHECKING:
    import pyarrow as pa


#: the columns of :attr:`Split.known`
KNOWN_COLUMNS = (
    "source_uri",
    "source_bytes",
    "source_mtime_ms",
    "outcome",
    "image_id",
    "run_id",
    "reason_class",
    "duplicate_of",
    "in_ledger",
)


@dataclass(frozen=True)
class Split:
    """A listing split by what earlier runs judged: the files judged before and unchanged since (one Arrow
    row each, with that judgement: :data:`KNOWN_COLUMNS`), and the files to judge now (in listing order)."""

    known: pa.Table
    todo: list[ListedFile]


def split_listing(lakehouse_uri: str, listing: Sequence[ListedFile], settings: Settings) -> Split:
    """Split ``listing`` into files judged before (unchanged: same path, size and mtime) and files to judge.

    Known: a ledger row whose outcome holds (not retryable, not requeued); or, for a path the ledger has no
    row for at all, a ``tensors`` row (a lakehouse older than the ledger, or a kill between a batch's
    tensors commit and its ledger commit: ``in_ledger`` False, outcome ``new`` of the run that committed
    it; the next run records it). Computed with Arrow joins, not a Python object per row: the ledger's and
    the listing's columns are joined in C, and only the files to judge become Python objects (the known
    ones stay one Arrow table).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    listed = pa.table(
        {
            "source_uri": pa.array([f.uri for f in listing], pa.string()),
            "listed_bytes": pa.array([f.size for f in listing], pa.int64()),
            "listed_mtime_ms": pa.array([f.mtime_ms for f in listing], pa.int64()),
            "listed_at": pa.array(np.arange(len(listing), dtype=np.int64)),
        }
    )
    files = _read(lakehouse_uri, FILES, settings, list(KNOWN_COLUMNS[:-1]))
    rejudged = pc.is_in(files.column("outcome"), value_set=pa.array(REJUDGED_OUTCOMES, pa.string()))
    ledger = files.filter(pc.invert(rejudged))
    ledger = ledger.append_column("in_ledger", pa.repeat(True, ledger.num_rows))
    tensors = _read(
        lakehouse_uri, TENSORS, settings, ["image_id", "source_uri", "source_bytes", "source_modified_at", "run_id"]
    )
    # paths in tensors the ledger has no row for at all (a rejudged ledger row wins over tensors too)
    tensors = tensors.filter(
        pc.and_(
            pc.invert(pc.is_in(tensors.column("source_uri"), value_set=files.column("source_uri"))),
            pc.is_valid(tensors.column("source_modified_at")),
        )
    )
    n = tensors.num_rows
    from_tensors = pa.table(
        {
            "source_uri": tensors.column("source_uri"),
            "source_bytes": tensors.column("source_bytes"),
            "source_mtime_ms": pc.divide(
                pc.cast(pc.cast(tensors.column("source_modified_at"), pa.timestamp("us", tz="UTC")), pa.int64()), 1000
            ),
            "outcome": pa.repeat("new", n),
            "image_id": tensors.column("image_id"),
            "run_id": tensors.column("run_id"),
            "reason_class": pa.nulls(n, pa.string()),
            "duplicate_of": pa.nulls(n, pa.string()),
            "in_ledger": pa.repeat(False, n),
        }
    )
    ledger = ledger.select(KNOWN_COLUMNS)
    candidates = pa.concat_tables([ledger, from_tensors.cast(ledger.schema)])
    joined = listed.join(candidates, keys="source_uri", join_type="inner")
    same = joined.filter(
        pc.and_(
            pc.equal(joined.column("listed_bytes"), joined.column("source_bytes")),
            pc.equal(joined.column("listed_mtime_ms"), joined.column("source_mtime_ms")),
        )
    )
    # one row per listed file (a path in tensors twice, its bytes changed in between: either row will do)
    order = same.column("listed_at").to_numpy()
    _, first = np.unique(order, return_index=True)
    known = same.take(pa.array(first)).sort_by("listed_at")
    is_known = np.zeros(len(listing), dtype=bool)
    is_known[known.column("listed_at").to_numpy()] = True
    todo = [f for f, k in zip(listing, is_known, strict=True) if not k]
    return Split(known.select(KNOWN_COLUMNS), todo)


def _read(lakehouse_uri: str, spec: TableSpec, settings: Settings, columns: list[str]) -> pa.Table:
    """Columns of a table; an empty table when it does not exist yet (nothing is created)."""
    from deltalake.exceptions import TableNotFoundError

    from lakehouse import delta_rs

    try:
        return delta_rs.open_table(lakehouse_uri, spec, settings).to_pyarrow_table(columns=columns)
    except TableNotFoundError:
        return arrow_schema(spec).empty_table().select(columns)


def record(lakehouse_uri: str, rows: Iterable[Mapping[str, Any]], settings: Settings) -> int:
    """Upsert judgements (one per path: the new one replaces the old). Returns the number of rows written."""
    import pyarrow as pa

    from lakehouse import delta_rs

    table = pa.Table.from_pylist([{c: r.get(c) for c in FILES.column_names} for r in rows], schema=arrow_schema(FILES))
    delta_rs.merge_upsert(lakehouse_uri, FILES, table, settings)
    return table.num_rows


def requeue(
    lakehouse_uri: str,
    settings: Settings,
    *,
    error_class: str | None = None,
    run_id: str | None = None,
    outcome: str = "quarantined",
) -> int:
    """Mark quarantined (or skipped) files, optionally of one error/reason class and/or run, to be judged
    again by the next run: after a decoder upgrade, or after a modality was added to the allowlist.

    Returns:
        How many files were marked.

    Raises:
        ConfigError: for an outcome other than quarantined or skipped.
    """
    from lakehouse import delta_rs
    from lakehouse.errors import ConfigError

    if outcome not in ("quarantined", "skipped"):
        raise ConfigError(f"only quarantined or skipped files can be requeued (not {outcome!r})")
    dt = delta_rs.ensure_table(lakehouse_uri, FILES, settings)
    predicate = f"outcome = {_sql_str(outcome)}"
    if error_class:
        predicate += f" AND reason_class = {_sql_str(error_class)}"
    if run_id:
        predicate += f" AND run_id = {_sql_str(run_id)}"
    metrics = dt.update(updates={"outcome": "'requeued'"}, predicate=predicate)
    return int(metrics.get("num_updated_rows", 0))


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
