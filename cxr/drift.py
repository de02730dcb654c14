"""Drift of an inference run against a reference run -> the ``drift`` table (the publish gate's input).

Per model and pathology: PSI and KS of the probabilities, and the positive rate at 0.5 (xrv's calibrated
operating point). Per run, from ``tensors`` (the images the run scored): per-image intensity statistics
(mean, std, 5th/50th/95th percentile of the stored values) compared by PSI and KS, and the mix of
source format, view position, modality, bits stored, photometric interpretation, manufacturer and site
(its pseudonym) compared by PSI.

The reference is ``CXR_DRIFT_REFERENCE_RUN`` when set, else the first inference run ever published
(``lakehouse.publish``); its rows are sampled to at most :data:`REFERENCE_SAMPLE` images (the lowest
image ids: a hash-random sample, the same every day). PSI rows are the gate: ``status`` is ``fail``
when the PSI exceeds its ``threshold``: ``CXR_DRIFT_MAX_PSI`` (0.25), raised to the PSI that sampling
noise alone exceeds once in a thousand at the run's and the reference's sizes (so that a run of 40
images does not fail on noise: :func:`cxr.metrics.null_psi_quantile`); ``insufficient`` when the run
scored fewer than ``CXR_DRIFT_MIN_IMAGES`` images (not gated), ``no_reference`` on the first run; other
metrics are ``info``. The GX suite ``drift`` (``expectations.suites.drift_suite``) checks the PSI values of the run,
so a drifted run fails validation and publishes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cxr import metrics
from lakehouse import storage
from lakehouse.config import Settings
from lakehouse.tables import DRIFT, PATHOLOGY_COLUMNS, PREDICTIONS, TENSORS, arrow_schema, decode_tensor

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: reference images compared at most (bounded work on a 400k-image reference run)
REFERENCE_SAMPLE = 5000
#: the operating point of the positive-rate rows (xrv's outputs are calibrated so that 0.5 is it)
POSITIVE_AT = 0.5
#: quantile bins of the numeric PSIs (the reference's deciles)
PSI_BINS = 10
#: added to every bin's count (Jeffreys): a bin a small run leaves empty by chance does not fake drift.
#: Numeric PSIs also have a bin below the reference's minimum and one above its maximum (``tails``):
#: values outside everything the reference saw (inverted images, a new scanner's range) count fully.
PSEUDO_COUNT = 0.5
#: per-image intensity statistics compared (``input.<name>``)
INPUT_STATS = ("mean", "std", "p05", "p50", "p95")
#: lineage columns whose mix is compared (``input.<column>``)
MIX_COLUMNS = (
    "source_format",
    "view_position",
    "modality",
    "bits_stored",
    "photometric",
    "manufacturer",
    "site_pseudonym",
)


@dataclass(frozen=True)
class DriftResult:
    """One drift computation: the rows written and the verdict."""

    run_id: str
    reference_run_id: str | None
    rows: int
    failed: list[str]
    insufficient: bool

    @property
    def passed(self) -> bool:
        """True when no PSI exceeded the limit."""
        return not self.failed


def compute_drift(
    lakehouse_uri: str,
    *,
    settings: Settings,
    run_id: str,
    reference_run_id: str | None = None,
    max_psi: float | None = None,
    min_images: int | None = None,
) -> DriftResult:
    """Compare inference run ``run_id`` with the reference and write the ``drift`` rows (replacing the run's).

    Args:
        lakehouse_uri: folder or ``s3://bucket/prefix``.
        settings: storage endpoint and the drift settings.
        run_id: the inference run to check (its predictions, and the tensors of the images it scored).
        reference_run_id: overrides ``CXR_DRIFT_REFERENCE_RUN`` and the first published run.
        max_psi: overrides ``CXR_DRIFT_MAX_PSI``.
        min_images: overrides ``CXR_DRIFT_MIN_IMAGES``.

    Returns:
        The verdict; the rows are in ``drift``.

    A run that wrote no predictions (every new file a duplicate or quarantined) writes no rows and passes.
    """
    import pandas as pd

    from lakehouse import delta_rs
    from lakehouse.publish import read_published

    limit = settings.drift_max_psi if max_psi is None else max_psi
    minimum = settings.drift_min_images if min_images is None else min_images
    lake = storage.normalize_uri(lakehouse_uri)
    predictions = delta_rs.open_table(lake, PREDICTIONS, settings)
    columns = ["image_id", "model_id", "run_id", *PATHOLOGY_COLUMNS.values()]
    current = _run_rows(predictions.to_pyarrow_table(columns=columns, filters=[("run_id", "=", run_id)]))
    if current.empty:  # every new file was a duplicate or quarantined: nothing scored, nothing to gate
        delta_rs.ensure_table(lake, DRIFT, settings)
        log.info("inference run %s wrote no predictions: no drift to measure", run_id)
        return DriftResult(run_id, None, 0, [], False)
    published = read_published(lake, settings)
    reference_id = (
        reference_run_id
        or settings.drift_reference_run
        or (published.reference_infer_run_id if published else None)
        or None
    )
    if reference_id == run_id:
        reference_id = None  # the reference run itself: nothing to compare with
    reference = pd.DataFrame(columns=current.columns)
    if reference_id:
        version = published.versions.get("predictions") if published and not reference_run_id else None
        table = delta_rs.open_table(lake, PREDICTIONS, settings, version=version).to_pyarrow_table(
            columns=columns, filters=[("run_id", "=", reference_id)]
        )
        reference = _sample(_run_rows(table))
        if reference.empty:
            log.warning("drift reference run %s has no predictions here: no comparison", reference_id)
            reference_id = None
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []

    def add(
        model_id: str,
        feature: str,
        metric: str,
        value: float | None,
        ref: float | None,
        n: int,
        n_ref: int,
        *,
        df: int | None = None,
        no_ref: bool = False,
    ) -> None:
        """One row; ``df`` (degrees of freedom of a PSI) makes it a gated row; ``no_ref``: the reference
        has no value to compare with (a column added after the reference run: all null there)."""
        threshold = None
        if df is None:
            status = "info"
        elif reference_id is None or n_ref == 0 or no_ref:
            status = "no_reference"
        elif n < minimum:
            status = "insufficient"
        else:
            # above the limit AND above what sampling noise gives at these sizes (p = 0.999)
            threshold = max(limit, metrics.null_psi_quantile(n_ref, n, df=max(df, 1)))
            status = "fail" if value is not None and value > threshold else "pass"
        rows.append(
            {
                "run_id": run_id,
                "reference_run_id": reference_id,
                "model_id": model_id,
                "feature": feature,
                "metric": metric,
                "value": value,
                "reference_value": ref,
                "threshold": threshold,
                "status": status,
                "n": n,
                "n_reference": n_ref,
                "computed_at": now,
            }
        )

    for model_id, cur in current.groupby("model_id", sort=True):
        ref = reference[reference["model_id"] == model_id]
        for column in PATHOLOGY_COLUMNS.values():
            c = cur[column].dropna().to_numpy(dtype="float64")
            if len(c) == 0:
                continue
            r = ref[column].dropna().to_numpy(dtype="float64")
            m, nc, nr = str(model_id), len(c), len(r)
            add(
                m,
                column,
                "psi",
                metrics.psi(r, c, bins=PSI_BINS, pseudo_count=PSEUDO_COUNT, tails=True) if nr else None,
                None,
                nc,
                nr,
                df=PSI_BINS + 1,
            )
            add(m, column, "ks", metrics.ks_statistic(r, c) if nr else None, None, nc, nr)
            rate_ref = float((r >= POSITIVE_AT).mean()) if nr else None
            add(m, column, "positive_rate", float((c >= POSITIVE_AT).mean()), rate_ref, nc, nr)
    cur_inputs = _input_frame(lake, settings, sorted(set(current["image_id"])))
    ref_inputs = (
        _reference_inputs(lake, settings, str(reference_id), sorted(set(reference["image_id"])))
        if len(reference)
        else None
    )
    n, n_ref = len(cur_inputs), (len(ref_inputs) if ref_inputs is not None else 0)
    for stat in INPUT_STATS:
        c = cur_inputs[stat].to_numpy(dtype="float64")
        r = ref_inputs[stat].to_numpy(dtype="float64") if ref_inputs is not None else None
        feature = f"input.{stat}"
        psi = (
            metrics.psi(r, c, bins=PSI_BINS, pseudo_count=PSEUDO_COUNT, tails=True)
            if r is not None and len(r)
            else None
        )
        add("", feature, "psi", psi, None, n, n_ref, df=PSI_BINS + 1)
        add("", feature, "ks", metrics.ks_statistic(r, c) if r is not None and len(r) else None, None, n, n_ref)
        add("", feature, "mean", float(c.mean()), float(r.mean()) if r is not None and len(r) else None, n, n_ref)
    for mix in MIX_COLUMNS:
        c_values = [None if pd.isna(v) else str(v) for v in cur_inputs[mix]]
        r_values = [None if pd.isna(v) else str(v) for v in ref_inputs[mix]] if ref_inputs is not None else []
        value = metrics.psi_categorical(r_values, c_values, pseudo_count=PSEUDO_COUNT) if r_values else None
        categories = len(set(c_values) | set(r_values))
        # a column the reference run's images did not have yet (a lakehouse made before it) is null
        # throughout the reference: nothing to compare with, not drift
        unknown = bool(r_values) and all(v is None for v in r_values) and any(v is not None for v in c_values)
        add("", f"input.{mix}", "psi", value, None, n, n_ref, df=categories - 1, no_ref=unknown)

    _replace_run_rows(lake, settings, run_id, rows)
    failed = [f"{r['model_id'] or 'input'}:{r['feature']} psi={r['value']:.3f}" for r in rows if r["status"] == "fail"]
    insufficient = any(r["status"] == "insufficient" for r in rows)
    if failed:
        log.warning(
            "drift against %s: %d PSI above their thresholds: %s", reference_id, len(failed), ", ".join(failed[:8])
        )
    elif reference_id is None:
        log.info("drift: no reference run yet (the first published inference run becomes it)")
    elif insufficient:
        log.info("drift: %d images scored, fewer than %d: reported, not gated", n, minimum)
    else:
        log.info("drift against %s: every PSI within its threshold (at least %.2f)", reference_id, limit)
    return DriftResult(run_id, reference_id, len(rows), failed, insufficient)


def _run_rows(table: Any) -> pd.DataFrame:
    return table.to_pandas().sort_values(["model_id", "image_id"]).reset_index(drop=True)


def _sample(frame: pd.DataFrame) -> pd.DataFrame:
    """At most REFERENCE_SAMPLE images per model: the lowest image ids (sha256: a hash-random sample)."""
    return frame.groupby("model_id", group_keys=False).head(REFERENCE_SAMPLE).reset_index(drop=True)


def _input_frame(lake: str, settings: Settings, image_ids: Sequence[str]) -> pd.DataFrame:
    """Per image: intensity statistics of the stored tensor, and the lineage columns whose mix is compared."""
    import numpy as np
    import pandas as pd

    from lakehouse.delta_rs import read_rows_by_id

    ids = list(image_ids[:REFERENCE_SAMPLE])
    wanted = ["image_id", "tensor", "tensor_dtype", "tensor_shape", *MIX_COLUMNS]
    table = read_rows_by_id(lake, TENSORS, settings, ids, columns=wanted)
    rows: list[dict[str, Any]] = []
    for r in table.to_pylist():
        values = decode_tensor(r["tensor"], r["tensor_dtype"], r["tensor_shape"]).ravel()
        p05, p50, p95 = np.percentile(values, [5, 50, 95])
        rows.append(
            {
                "image_id": r["image_id"],
                "mean": float(values.mean()),
                "std": float(values.std()),
                "p05": float(p05),
                "p50": float(p50),
                "p95": float(p95),
                **{c: r[c] for c in MIX_COLUMNS},
            }
        )
    return pd.DataFrame(rows, columns=["image_id", *INPUT_STATS, *MIX_COLUMNS])


def _reference_inputs(lake: str, settings: Settings, reference_id: str, image_ids: Sequence[str]) -> pd.DataFrame:
    """:func:`_input_frame` of the reference sample, computed once per reference run and sample and cached
    under ``reports/drift_reference/``: every later day reads one small file instead of the tensor bytes
    of up to ``REFERENCE_SAMPLE`` images (whose row groups are spread over the reference run's files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lakehouse.errors import InputError, StorageError

    uri = storage.drift_reference_uri(lake, reference_id)
    wanted = list(image_ids[:REFERENCE_SAMPLE])
    try:
        cached = pq.read_table(pa.BufferReader(storage.read_bytes(uri, settings, backoff=()))).to_pandas()
        if sorted(cached["image_id"]) == sorted(wanted):
            return cached
        log.info("drift: the reference sample of %s changed: statistics computed again", reference_id)
    except (InputError, StorageError, pa.ArrowInvalid, KeyError):
        pass  # not computed yet (or unreadable): compute it
    frame: pd.DataFrame = _input_frame(lake, settings, wanted)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), settings)
    return frame


def _replace_run_rows(lake: str, settings: Settings, run_id: str, rows: list[dict[str, Any]]) -> None:
    """Write the run's rows, replacing what an earlier attempt of the same run wrote (idempotent)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    from lakehouse import delta_rs

    dt = delta_rs.ensure_table(lake, DRIFT, settings)
    schema = arrow_schema(DRIFT)
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    escaped = run_id.replace("'", "''")
    write_deltalake(dt, table, mode="overwrite", predicate=f"run_id = '{escaped}'")
