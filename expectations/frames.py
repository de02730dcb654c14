"""The frames Great Expectations validates, derived from the lakehouse tables.

GX checks columns of one batch; several checks need values computed first (a tensor's byte length, the
key of a table it refers to, a run's quarantine share). These functions build those columns from the
Delta tables with delta-rs and pyarrow, never loading the ``tensor`` binary column into pandas.

Two kinds of frame, so that an audit costs what the audited runs added, not what the table holds:

- **row frames** (values: byte length vs dtype and shape, value range, probabilities, ledger reasons)
  hold the rows of the audited runs only (``runs``). They are read with a ``run_id`` filter: delta-rs
  gives every data file a guarantee from its Delta statistics (min/max of ``run_id``), so pyarrow never
  opens a file that holds no audited run (tensors are written one set of files per run). ``runs=None``
  (a full validation) reads every row, batch by batch.
- **key frames** (table-wide: unique keys, predictions without a tensor, tensors without a prediction)
  are computed in Arrow over projections of the id columns of the whole table (``group_by`` counts,
  ``is_in``): no value column is read, no Python object per row is made. The frame GX receives holds the
  rows that break a key rule (empty when the table is clean), so GX reports the same unexpected rows and
  counts as a check over the whole table would, from a frame of a few rows.

Nothing here imports Great Expectations; the frames are plain pandas and testable without it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from lakehouse.config import Settings
from lakehouse.delta_rs import run_filter
from lakehouse.tables import DIRECT_IDENTIFIERS, NUMPY_DTYPES, PATHOLOGY_COLUMNS, TENSORS, TableSpec

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from lakehouse.runs import PreprocessRun

log = logging.getLogger(__name__)

#: bytes per value of each dtype a tensor may be stored in
DTYPE_SIZES: dict[str, int] = {d: int(t[-1]) for d, t in NUMPY_DTYPES.items()}  # "<f2" -> 2 bytes

#: a keyed HMAC-SHA256 rendered as lowercase hex
HEX64 = re.compile(r"^[0-9a-f]{64}$")

#: values of the derived ``patient_pseudonym_form`` column
PSEUDONYM_HMAC, PSEUDONYM_OTHER = "hmac-sha256-hex", "not-an-hmac"

#: columns of ``tensors`` read for validation (the ``tensor`` bytes are reduced to their length)
TENSOR_COLUMNS = ["image_id", "tensor_dtype", "tensor_shape", "tensor_min", "tensor_max", "source_format"]
TENSOR_COLUMNS += ["width", "height", "patient_pseudonym", "run_id"]


def normalize_column_name(name: str) -> str:
    """``PatientName``, ``patient-name`` and ``patient_name`` all become ``patientname``."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


#: normalized names of the direct identifiers no table may have a column for
DIRECT_IDENTIFIER_KEYS = sorted({normalize_column_name(c) for c in DIRECT_IDENTIFIERS})


def expected_nbytes(shape: Sequence[int] | None, dtype: str | None) -> int | None:
    """product(shape) x dtype size; None when the shape is missing or the dtype unknown."""
    if shape is None or dtype not in DTYPE_SIZES:
        return None
    return math.prod(int(s) for s in shape) * DTYPE_SIZES[str(dtype)]


def shape_text(shape: Sequence[int] | None) -> str | None:
    """``[1, 224, 224]`` -> ``'1x224x224'`` (comparable against a set of allowed shapes)."""
    return None if shape is None else "x".join(str(int(s)) for s in shape)


def pseudonym_form(value: str | None) -> str | None:
    """Classify a pseudonym without keeping it: None (no pseudonym), HMAC hex, or something else."""
    if value is None:
        return None
    return PSEUDONYM_HMAC if HEX64.match(value) else PSEUDONYM_OTHER


# --- reading: the audited runs' rows, or id projections of the whole table ---------------------------
def projection(
    lakehouse_uri: str, spec: TableSpec, settings: Settings, *, columns: Sequence[str], version: int | None = None
) -> tuple[Any, list[str]]:
    """The table at ``version`` as a pyarrow dataset of ``columns`` only, and which of them it has.

    The dataset's schema is the projection, not the table's: delta-rs gives every data file a guarantee
    built (in Python) from its statistics of every column of the schema, which over the whole schema of
    ``tensors`` costs ~3 ms per data file (0.58 s for 200 files, measured), and ~0.1 ms over two columns.
    """
    from lakehouse.delta_rs import open_table, projected_dataset

    dt = open_table(lakehouse_uri, spec, settings, version=version)
    names = set(dt.schema().to_arrow().names)
    have = [c for c in dict.fromkeys(columns) if c in names]
    return projected_dataset(dt, have), have


def _with_nulls(batch: pa.RecordBatch, columns: Sequence[str]) -> pa.RecordBatch:
    """``batch`` with ``columns`` in that order, those it lacks (a table from an older release) as nulls."""
    import pyarrow as pa

    names = set(batch.schema.names)
    if all(c in names for c in columns) and len(names) == len(columns):
        return batch.select(list(columns))
    arrays = [batch.column(c) if c in names else pa.nulls(batch.num_rows) for c in columns]
    return pa.RecordBatch.from_arrays(arrays, names=list(columns))


def scan_batches(
    lakehouse_uri: str,
    spec: TableSpec,
    settings: Settings,
    *,
    columns: Sequence[str],
    version: int | None = None,
    runs: Collection[str] | None = None,
    batch_size: int = 256,
) -> Iterable[pa.RecordBatch]:
    """Record batches of some columns of the rows of ``runs`` (every row when None), at ``version``.

    The ``run_id`` filter is evaluated first against each data file's guarantee (delta-rs builds it from
    the file's Delta statistics: min/max of ``run_id``), so a file that holds no audited run is not
    opened; the rows of the files that are read are filtered exactly. Columns the table lacks (made by an
    older release) read as nulls. Readahead is one batch and one file: memory holds about one batch.

    Args:
        lakehouse_uri: folder or ``s3://`` root of the lakehouse.
        spec: the table.
        settings: storage endpoint.
        columns: the columns to read.
        version: the Delta version (default the latest).
        runs: the run ids whose rows are read; None: every row; empty: none (nothing is opened).
        batch_size: rows per batch.

    Yields:
        Record batches holding ``columns`` in that order.
    """
    if runs is not None and not runs:
        return
    wanted = [*columns, *(["run_id"] if runs is not None else [])]
    dataset, have = projection(lakehouse_uri, spec, settings, columns=wanted, version=version)
    for batch in dataset.to_batches(
        columns=[c for c in have if c in columns],
        filter=None if runs is None else run_filter(runs),
        batch_size=batch_size,
        batch_readahead=1,
        fragment_readahead=1,
    ):
        yield _with_nulls(batch, columns)


def read_rows(
    lakehouse_uri: str,
    spec: TableSpec,
    settings: Settings,
    *,
    columns: Sequence[str],
    version: int | None = None,
    runs: Collection[str] | None = None,
) -> pa.Table:
    """Some columns of the rows of ``runs`` (every row when None) in one Arrow table: for small columns
    (ids, probabilities, reasons), never ``tensor``. Files are pruned as in :func:`scan_batches`."""
    import pyarrow as pa

    wanted = [*columns, *(["run_id"] if runs is not None else [])]
    dataset, have = projection(lakehouse_uri, spec, settings, columns=wanted, version=version)
    if runs is not None and not runs:
        table = dataset.schema.empty_table()
    else:
        table = dataset.to_table(columns=have, filter=None if runs is None else run_filter(runs))
    batches = [_with_nulls(b, columns) for b in table.to_batches()]
    if batches:
        return pa.Table.from_batches(batches)
    fields = {f.name: f for f in dataset.schema}
    return pa.schema([fields.get(c, pa.field(c, pa.null())) for c in columns]).empty_table()


def run_ids(ids: pa.Table) -> set[str]:
    """The distinct ``run_id`` values of an id projection."""
    import pyarrow.compute as pc

    return {str(r) for r in pc.unique(ids.column("run_id")).to_pylist() if r is not None}


def duplicated_rows(ids: pa.Table, keys: Sequence[str]) -> pa.Array:
    """Indices of the rows of ``ids`` whose key (``keys``) occurs more than once, in row order.

    Computed in Arrow (a hash ``group_by`` count of every key, then a join back to the rows of the keys
    counted more than once): memory is that of the key columns, never a Python object per row.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = ids.select(list(keys)).group_by(list(keys)).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts.column("count_all"), 1)).select(list(keys))
    if repeated.num_rows == 0:
        return pa.array([], type=pa.int64())
    indexed = ids.select(list(keys)).append_column("_row", pa.array(np.arange(ids.num_rows, dtype=np.int64)))
    rows = indexed.join(repeated, keys=list(keys), join_type="inner").column("_row")
    return pc.take(rows, pc.sort_indices(rows))


# --- tensors -----------------------------------------------------------------------------------------
#: the columns of the validated projection of ``tensors``, with their types
_TENSOR_FRAME_FIELDS: tuple[tuple[str, str], ...] = (
    ("image_id", "string"),
    ("tensor_dtype", "string"),
    ("tensor_shape", "string"),
    ("tensor_nbytes", "int64"),
    ("expected_nbytes", "int64"),
    ("tensor_min", "float64"),
    ("tensor_max", "float64"),
    ("source_format", "string"),
    ("width", "int64"),
    ("height", "int64"),
    ("patient_pseudonym_form", "string"),
    ("run_id", "string"),
)
_INT_COLUMNS = ("tensor_nbytes", "expected_nbytes", "width", "height")


def _tensor_frame_schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema([(name, pa.type_for_alias(t)) for name, t in _TENSOR_FRAME_FIELDS])


def _tensor_part(batch: pa.RecordBatch) -> pa.Table:
    """The derived columns of one batch (at most a few hundred tensors); the tensor bytes are dropped."""
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = _tensor_frame_schema()

    def col(name: str) -> pa.Array:
        return pc.cast(batch.column(name), schema.field(name).type)

    shapes = batch.column("tensor_shape")
    if pa.types.is_null(shapes.type):
        shapes = pa.nulls(batch.num_rows, pa.list_(pa.int64()))
    dtypes = batch.column("tensor_dtype").to_pylist()
    # a few hundred short lists per batch: the product of each shape is cheapest in Python
    expected = pa.array([expected_nbytes(s, d) for s, d in zip(shapes.to_pylist(), dtypes, strict=True)], pa.int64())
    pseudonyms = pc.cast(batch.column("patient_pseudonym"), pa.string())
    form = pc.if_else(pc.match_substring_regex(pseudonyms, HEX64.pattern), PSEUDONYM_HMAC, PSEUDONYM_OTHER)
    arrays = {
        "image_id": col("image_id"),
        "tensor_dtype": col("tensor_dtype"),
        "tensor_shape": pc.binary_join(pc.cast(shapes, pa.list_(pa.string())), "x"),
        "tensor_nbytes": pc.cast(pc.binary_length(batch.column("tensor")), pa.int64()),
        "expected_nbytes": expected,
        "tensor_min": col("tensor_min"),
        "tensor_max": col("tensor_max"),
        "source_format": col("source_format"),
        "width": col("width"),
        "height": col("height"),
        "patient_pseudonym_form": form,
        "run_id": col("run_id"),
    }
    return pa.Table.from_arrays([arrays[f.name] for f in schema], schema=schema)


def _to_pandas(table: pa.Table, int_columns: Sequence[str] = ()) -> pd.DataFrame:
    """A small Arrow table as pandas: strings as objects, the integer columns nullable (``Int64``)."""
    frame = table.to_pandas()
    for name in int_columns:
        frame[name] = frame[name].astype("Int64")
    return frame


def tensors_frame(batches: Iterable[pa.RecordBatch]) -> pd.DataFrame:
    """The validated projection of ``tensors`` from record batches holding ``tensor`` and TENSOR_COLUMNS.

    Per row: ``tensor_nbytes`` (pyarrow.compute.binary_length of the stored bytes), ``expected_nbytes``
    (product(shape) x dtype size), ``tensor_shape`` as text, ``patient_pseudonym_form`` (the pseudonym
    itself is dropped: validation results and Data Docs never hold it). Each batch is reduced in Arrow
    as it arrives, so memory holds one batch of tensor bytes and the small derived columns.

    Args:
        batches: record batches scanned from the table (each holds at most a few hundred tensors).

    Returns:
        One row per tensor, without the tensor bytes.
    """
    import pyarrow as pa

    parts = [_tensor_part(b) for b in batches]
    table = pa.concat_tables(parts) if parts else _tensor_frame_schema().empty_table()
    return _to_pandas(table, _INT_COLUMNS)


def read_tensors_frame(
    lakehouse_uri: str,
    settings: Settings,
    *,
    batch_size: int = 256,
    version: int | None = None,
    runs: Collection[str] | None = None,
) -> pd.DataFrame:
    """:func:`tensors_frame` of the rows of ``runs`` (every row when None) of ``tensors`` at ``version``.

    Only the data files that may hold an audited run are opened (see :func:`scan_batches`): the tensor
    bytes of other runs are never read.
    """
    columns = ["tensor", *TENSOR_COLUMNS]
    return tensors_frame(
        scan_batches(
            lakehouse_uri, TENSORS, settings, columns=columns, version=version, runs=runs, batch_size=batch_size
        )
    )


def tensors_keys_frame(ids: pa.Table) -> pd.DataFrame:
    """The rows of ``tensors`` (projection ``image_id``, ``run_id`` of the whole table) whose ``image_id``
    occurs more than once: empty when every key is unique."""
    return ids.select(["image_id", "run_id"]).take(duplicated_rows(ids, ["image_id"])).to_pandas()


def columns_frame(column_names: Sequence[str]) -> pd.DataFrame:
    """One row per column of a table: its name and its normalized name (checked against identifiers)."""
    import pandas as pd

    return pd.DataFrame(
        {"column_name": list(column_names), "normalized_name": [normalize_column_name(c) for c in column_names]}
    )


def quarantine_frame(table: pa.Table) -> pd.DataFrame:
    """The validated projection of ``quarantine``: the reason columns and the run (no source paths)."""
    cols = [c for c in ("content_sha256", "stage", "error_class", "error_message", "run_id") if c in table.column_names]
    return table.select(cols).to_pandas()


def files_frame(table: pa.Table) -> pd.DataFrame:
    """The validated projection of the ``files`` ledger: no paths (``path_key`` is a hash of the path),
    ``has_reason`` / ``has_image_id`` true where the outcome requires them."""
    import hashlib

    import pandas as pd

    outcomes = table.column("outcome").to_pylist()
    reasons = table.column("reason_class").to_pylist()
    ids = table.column("image_id").to_pylist()
    return pd.DataFrame(
        {
            "path_key": [hashlib.sha256(u.encode()).hexdigest() for u in table.column("source_uri").to_pylist()],
            "outcome": outcomes,
            "run_id": table.column("run_id").to_pylist(),
            "has_reason": [
                bool(r) or o not in ("skipped", "quarantined", "retryable")
                for o, r in zip(outcomes, reasons, strict=True)
            ],
            "has_image_id": [
                bool(i) or o not in ("new", "already_present", "duplicate") for o, i in zip(outcomes, ids, strict=True)
            ],
        }
    )


def files_keys_frame(ids: pa.Table) -> pd.DataFrame:
    """The rows of the ``files`` ledger (projection ``source_uri``, ``run_id`` of the whole table) whose
    path is judged more than once, as ``path_key`` (sha256 of the path) and ``run_id``: empty when every
    path has one row."""
    import hashlib

    rows = ids.select(["source_uri", "run_id"]).take(duplicated_rows(ids, ["source_uri"]))
    frame = rows.select(["run_id"]).to_pandas()
    frame.insert(0, "path_key", [hashlib.sha256(u.encode()).hexdigest() for u in rows.column("source_uri").to_pylist()])
    return frame


def read_run_summaries(lakehouse_uri: str, settings: Settings) -> list[PreprocessRun]:
    """Every preprocessing run summary under ``<lakehouse>/runs/``."""
    from lakehouse.runs import PreprocessRun, read_summaries

    return read_summaries(lakehouse_uri, settings, kind=PreprocessRun)


def quarantine_runs_frame(
    quarantine: pa.Table,
    summaries: Sequence[PreprocessRun],
    *,
    run_id: str | None = None,
    pending: Iterable[str] | None = None,
) -> pd.DataFrame:
    """One row per preprocessing run: inputs discovered, inputs quarantined, and their share.

    ``discovered`` is the run summary's ``first_seen`` (files the run judged first, skipped ones aside; an
    Airflow retry counts what its earlier attempts judged); ``quarantined`` is the larger of the summary's count and
    the quarantine rows carrying the run id (a file quarantined again in a later run keeps its first row,
    so the table alone can undercount). A run with quarantine rows but no summary gets ``discovered``
    null, which the suite reports.

    Args:
        quarantine: the quarantine table (``run_id`` and ``stage`` are read).
        summaries: preprocessing run summaries (:func:`read_run_summaries`).
        run_id: check only this run when it names a preprocessing run; every run otherwise.
        pending: write-audit-publish mode: check ``run_id`` and these runs (those not published yet), and
            no other.

    Returns:
        Columns ``run_id``, ``discovered``, ``quarantined``, ``quarantine_share``.
    """
    import pandas as pd

    rows_per_run: dict[str, int] = {}
    stages = quarantine.column("stage").to_pylist() if "stage" in quarantine.column_names else None
    for i, rid in enumerate(quarantine.column("run_id").to_pylist()):
        if stages is None or stages[i] in (None, "preprocess"):
            rows_per_run[rid] = rows_per_run.get(rid, 0) + 1
    by_run = {s.run_id: s for s in summaries if s.run_id}
    run_ids = sorted(set(by_run) | set(rows_per_run))
    if pending is not None:
        wanted = set(pending) | ({run_id} if run_id else set())
        run_ids = [r for r in run_ids if r in wanted]
    elif run_id is not None and run_id in by_run:
        run_ids = [run_id]
    elif run_id is not None:
        log.info("run %s has no preprocessing summary: checking the quarantine share of every run", run_id)
    discovered: list[int | None] = []
    quarantined: list[int] = []
    shares: list[float | None] = []
    for rid in run_ids:
        summary = by_run.get(rid)
        # the share of the files this run saw first and did not skip: files judged by earlier runs (not
        # read again) and files skipped by design (not radiographs) neither dilute nor count
        d = summary.first_seen if summary is not None else None
        q = max(summary.quarantined if summary else 0, rows_per_run.get(rid, 0))
        discovered.append(d)
        quarantined.append(q)
        shares.append(None if not d else q / d)
    return pd.DataFrame(
        {
            "run_id": run_ids,
            "discovered": pd.array(discovered, dtype="Int64"),
            "quarantined": pd.array(quarantined, dtype="Int64"),
            "quarantine_share": pd.array(shares, dtype="Float64"),
        }
    )


#: columns of ``predictions`` read for its row checks
PREDICTION_COLUMNS = ["image_id", "model_id", *PATHOLOGY_COLUMNS.values(), "run_id"]
#: the id projection of ``predictions`` read for its table-wide checks
PREDICTION_ID_COLUMNS = ["image_id", "model_id", "run_id"]


def predictions_frame(predictions: pa.Table) -> pd.DataFrame:
    """The validated projection of ``predictions`` (the audited rows): ids, probabilities, ``run_id``, and
    ``nan_probability`` (pandas turns NaN into null, so NaN is counted while still in Arrow)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = ["image_id", "model_id", *(c for c in PATHOLOGY_COLUMNS.values() if c in predictions.column_names)]
    cols += [c for c in ("run_id",) if c in predictions.column_names]
    nan = np.zeros(predictions.num_rows, dtype=bool)
    for c in PATHOLOGY_COLUMNS.values():
        if c in predictions.column_names and pa.types.is_floating(predictions.schema.field(c).type):
            nan |= pc.fill_null(pc.is_nan(predictions.column(c)), False).to_numpy(zero_copy_only=False)
    frame = predictions.select(cols).to_pandas()
    frame["nan_probability"] = nan
    return frame


def predictions_keys_frame(ids: pa.Table, tensor_ids: pa.Array | Sequence[str]) -> pd.DataFrame:
    """The rows of ``predictions`` (id projection of the whole table) that break a table-wide rule: their
    (``image_id``, ``model_id``) occurs more than once, or their ``image_id`` is not a key of ``tensors``
    (``in_tensors`` False). Empty when the table is clean.

    Args:
        ids: ``image_id``, ``model_id``, ``run_id`` of every prediction.
        tensor_ids: every ``image_id`` of ``tensors`` (at the version audited).
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    known = (
        tensor_ids if isinstance(tensor_ids, pa.Array | pa.ChunkedArray) else pa.array(list(tensor_ids), pa.string())
    )
    in_tensors = pc.fill_null(pc.is_in(ids.column("image_id"), value_set=known), False)
    table = ids.select(PREDICTION_ID_COLUMNS).append_column("in_tensors", in_tensors)
    repeated = pc.is_in(
        pa.array(range(ids.num_rows), pa.int64()), value_set=duplicated_rows(ids, ["image_id", "model_id"])
    )
    return table.filter(pc.or_(repeated, pc.invert(in_tensors))).to_pandas()


def coverage_models(
    predictions: pa.Table, *, models: Sequence[str] | None = None, run_id: str | None = None
) -> list[str]:
    """The models every tensor must have a prediction for.

    ``models`` when given; else the distinct model ids predicted in run ``run_id``; else every model id
    present (when ``run_id`` names no inference run, every model id present).
    """
    import pyarrow.compute as pc

    if models:
        return sorted(set(models))
    ids = predictions.column("model_id")
    if run_id is not None and "run_id" in predictions.column_names:
        of_run = {str(m) for m in pc.unique(ids.filter(pc.equal(predictions.column("run_id"), run_id))).to_pylist()}
        if of_run:
            return sorted(of_run)
        log.info("run %s wrote no predictions: checking coverage for every model present", run_id)
    return sorted({str(m) for m in pc.unique(ids).to_pylist()})


def coverage_frame(predictions: pa.Table, tensor_ids: pa.Array | Sequence[str], models: Sequence[str]) -> pd.DataFrame:
    """The (tensor, model) pairs without a prediction: one row each, ``has_prediction`` False.

    Computed in Arrow over the whole table (for each model, the tensor ids not among the ids it scored):
    the frame holds only the missing pairs, so it is empty when every tensor is scored by every model.

    Args:
        predictions: ``image_id`` and ``model_id`` of every prediction.
        tensor_ids: every ``image_id`` of ``tensors`` (duplicates count once).
        models: the models every tensor must have a prediction for.

    Returns:
        Columns ``image_id``, ``model_id``, ``has_prediction``, sorted by model then image.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    known = (
        tensor_ids if isinstance(tensor_ids, pa.Array | pa.ChunkedArray) else pa.array(list(tensor_ids), pa.string())
    )
    unique = pc.unique(known)
    unique = pc.take(unique, pc.sort_indices(unique))
    parts = []
    for model in models:
        done = predictions.column("image_id").filter(pc.equal(predictions.column("model_id"), model))
        missing = unique.filter(pc.invert(pc.is_in(unique, value_set=done)))
        parts.append(pd.DataFrame({"image_id": missing.to_pylist(), "model_id": model}))
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"image_id": [], "model_id": []})
    frame["image_id"] = frame["image_id"].astype(object)
    frame["model_id"] = frame["model_id"].astype(object)
    frame["has_prediction"] = False
    return frame


def drift_frame(drift: pa.Table | None, run_id: str | None, pending: Iterable[str] | None = None) -> pd.DataFrame:
    """The drift rows checked, with ``gated_psi`` (the PSI of rows the gate checks: status pass or fail;
    null elsewhere) and ``checked`` (False on the one row added for a run that has no drift rows).

    Args:
        drift: the drift table (None: it does not exist yet).
        run_id: the inference run checked (without ``pending`` and run id: the latest run checked).
        pending: write-audit-publish mode: ``run_id`` and these inference runs (those with predictions
            not published yet), each of which must have been checked.
    """
    import pandas as pd

    cols = ["run_id", "model_id", "feature", "metric", "value", "threshold", "status", "computed_at"]
    frame = drift.select(cols).to_pandas() if drift is not None else pd.DataFrame(columns=cols)
    required: set[str] = set(pending) if pending is not None else set()
    if pending is not None:
        # a run_id that wrote no predictions is not pending and needs no check; its rows (none) are shown
        wanted = required | ({run_id} if run_id else set())
    elif run_id is not None:
        wanted = {run_id}
    else:  # the latest run checked: earlier runs' verdicts stay with them
        wanted = {str(frame.sort_values("computed_at")["run_id"].iloc[-1])} if len(frame) else set()
    frame = frame[frame["run_id"].isin(wanted)].drop(columns=["computed_at"]).reset_index(drop=True)
    frame["checked"] = True
    missing = sorted(required - set(frame["run_id"]))
    if missing:
        blank = pd.DataFrame({"run_id": missing, "status": "missing", "checked": False})
        frame = pd.concat([frame, blank], ignore_index=True)
    gated = (frame["metric"] == "psi") & frame["status"].isin(["pass", "fail"])
    frame["gated_psi"] = frame["value"].where(gated)
    return frame


def thresholds_frame(thresholds: pa.Table) -> pd.DataFrame:
    """``thresholds`` as validated (every column is small)."""
    return thresholds.to_pandas()


def evaluation_frame(evaluation: pa.Table) -> pd.DataFrame:
    """``evaluation`` without the label URIs, plus ``null_explained`` (a null AUROC has a null_reason)."""
    cols = [c for c in evaluation.column_names if c not in ("labels_uri",)]
    frame = evaluation.select(cols).to_pandas()
    frame["null_explained"] = frame["auroc"].notna() | frame["null_reason"].notna()
    return frame
