"""The frames Great Expectations validates, derived from the lakehouse tables.

GX checks columns of one batch; several checks need values computed first (a tensor's byte length, the
key of a table it refers to, a run's quarantine share). These functions build those columns from the
Delta tables with delta-rs and pyarrow, never loading the ``tensor`` binary column into pandas: the byte
length of each tensor is computed batch by batch while scanning, and only the small projection is kept.

Nothing here imports Great Expectations; the frames are plain pandas and testable without it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from lakehouse.config import Settings
from lakehouse.tables import DIRECT_IDENTIFIERS, NUMPY_DTYPES, PATHOLOGY_COLUMNS, TENSORS

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


def tensors_frame(batches: Iterable[pa.RecordBatch]) -> pd.DataFrame:
    """The validated projection of ``tensors`` from record batches holding ``tensor`` and TENSOR_COLUMNS.

    Per row: ``tensor_nbytes`` (pyarrow.compute.binary_length of the stored bytes), ``expected_nbytes``
    (product(shape) x dtype size), ``tensor_shape`` as text, ``patient_pseudonym_form`` (the pseudonym
    itself is dropped: validation results and Data Docs never hold it).

    Args:
        batches: record batches scanned from the table (each holds at most a few hundred tensors).

    Returns:
        One row per tensor, without the tensor bytes.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = []
    for batch in batches:
        nbytes = pc.binary_length(batch.column("tensor"))
        small = pa.Table.from_batches([batch.drop_columns(["tensor"])]).append_column("tensor_nbytes", nbytes)
        parts.append(small)
    if not parts:
        return pd.DataFrame(columns=[*_TENSOR_FRAME_COLUMNS])
    table = pa.concat_tables(parts)
    rows = table.to_pylist()
    frame = pd.DataFrame(
        {
            "image_id": [r["image_id"] for r in rows],
            "tensor_dtype": [r["tensor_dtype"] for r in rows],
            "tensor_shape": [shape_text(r["tensor_shape"]) for r in rows],
            "tensor_nbytes": pd.array([r["tensor_nbytes"] for r in rows], dtype="Int64"),
            "expected_nbytes": pd.array(
                [expected_nbytes(r["tensor_shape"], r["tensor_dtype"]) for r in rows], dtype="Int64"
            ),
            "tensor_min": [r["tensor_min"] for r in rows],
            "tensor_max": [r["tensor_max"] for r in rows],
            "source_format": [r["source_format"] for r in rows],
            "width": pd.array([r["width"] for r in rows], dtype="Int64"),
            "height": pd.array([r["height"] for r in rows], dtype="Int64"),
            "patient_pseudonym_form": [pseudonym_form(r["patient_pseudonym"]) for r in rows],
            "run_id": [r["run_id"] for r in rows],
        }
    )
    return frame


_TENSOR_FRAME_COLUMNS = (
    "image_id",
    "tensor_dtype",
    "tensor_shape",
    "tensor_nbytes",
    "expected_nbytes",
    "tensor_min",
    "tensor_max",
    "source_format",
    "width",
    "height",
    "patient_pseudonym_form",
    "run_id",
)


def read_tensors_frame(
    lakehouse_uri: str, settings: Settings, *, batch_size: int = 256, version: int | None = None
) -> pd.DataFrame:
    """Scan ``tensors`` (at ``version``) in batches with delta-rs and build :func:`tensors_frame` (bounded memory)."""
    from lakehouse.delta_rs import open_table

    dataset = open_table(lakehouse_uri, TENSORS, settings, version=version).to_pyarrow_dataset()
    present = set(dataset.schema.names)
    columns = ["tensor", *(c for c in TENSOR_COLUMNS if c in present)]
    missing = [c for c in TENSOR_COLUMNS if c not in present]

    def _batches() -> Iterable[pa.RecordBatch]:
        import pyarrow as pa

        for batch in dataset.to_batches(
            columns=columns, batch_size=batch_size, batch_readahead=1, fragment_readahead=1
        ):
            for name in missing:  # an absent optional column reads as nulls (a missing required one fails)
                batch = batch.append_column(name, pa.nulls(batch.num_rows))
            yield batch

    return tensors_frame(_batches())


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


def predictions_frame(predictions: pa.Table, tensor_ids: Iterable[str]) -> pd.DataFrame:
    """The validated projection of ``predictions`` plus ``in_tensors`` (the image_id exists in tensors)."""
    known = set(tensor_ids)
    cols = ["image_id", "model_id", *(c for c in PATHOLOGY_COLUMNS.values() if c in predictions.column_names)]
    cols += [c for c in ("run_id",) if c in predictions.column_names]
    import numpy as np
    import pyarrow.compute as pc

    nan = np.zeros(predictions.num_rows, dtype=bool)
    for c in PATHOLOGY_COLUMNS.values():  # pandas turns NaN into null: count NaN while still in Arrow
        if c in predictions.column_names:
            nan |= pc.fill_null(pc.is_nan(predictions.column(c)), False).to_numpy(zero_copy_only=False)
    frame = predictions.select(cols).to_pandas()
    frame["in_tensors"] = [i in known for i in frame["image_id"]]
    frame["nan_probability"] = nan
    return frame


def coverage_models(
    predictions: pa.Table, *, models: Sequence[str] | None = None, run_id: str | None = None
) -> list[str]:
    """The models every tensor must have a prediction for.

    ``models`` when given; else the distinct model ids predicted in run ``run_id``; else every model id
    present (when ``run_id`` names no inference run, every model id present).
    """
    if models:
        return sorted(set(models))
    ids = predictions.column("model_id").to_pylist()
    if run_id is not None and "run_id" in predictions.column_names:
        of_run = {m for m, r in zip(ids, predictions.column("run_id").to_pylist(), strict=True) if r == run_id}
        if of_run:
            return sorted(of_run)
        log.info("run %s wrote no predictions: checking coverage for every model present", run_id)
    return sorted(set(ids))


def coverage_frame(predictions: pa.Table, tensor_ids: Sequence[str], models: Sequence[str]) -> pd.DataFrame:
    """One row per (tensor, model): ``has_prediction`` is False where the model has not scored the tensor."""
    import pandas as pd

    done = set(zip(predictions.column("image_id").to_pylist(), predictions.column("model_id").to_pylist(), strict=True))
    ids = sorted(set(tensor_ids))
    pairs = [(i, m) for m in models for i in ids]
    return pd.DataFrame(
        {
            "image_id": [i for i, _ in pairs],
            "model_id": [m for _, m in pairs],
            "has_prediction": [(i, m) in done for i, m in pairs],
        }
    )


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
