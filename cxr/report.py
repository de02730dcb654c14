"""``cxr report``: one self-contained HTML run report of a lakehouse.

The report holds everything inline (CSS, SVG histograms, JPEG thumbnails as data URIs): no JavaScript,
no CDN, so it opens from a folder, an S3 console download or an e-mail attachment alike. It shows

- the preprocessing run's counts (from ``<lakehouse>/runs/<run_id>.json``) and its quarantine reasons,
- whole-lakehouse totals read from the Delta tables with delta-rs (column projections only: the
  ``tensor`` column is read only from the data files that hold a thumbnail's image),
- every model's identity (weights sha256 and source), with a loud banner for an untrained stand-in,
- per-pathology score histograms and the highest-scoring images per finding,
- Great Expectations results (``<lakehouse>/reports/validation/<table>.json``) and a Data Docs link.

No direct patient identifiers are read; ``patient_pseudonym`` is not shown either.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lakehouse import storage
from lakehouse.errors import CxrError, StorageError
from lakehouse.publish import NothingPublishedError, reader_versions
from lakehouse.runs import InferRun, PreprocessRun, RunRecord, newest_fanout, read_summaries
from lakehouse.tables import PATHOLOGY_COLUMNS, TABLE_NAMES, TENSORS, UNTRAINED_SUFFIX, decode_tensor, spec

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    from markupsafe import Markup

    from lakehouse.config import Settings

log = logging.getLogger(__name__)

#: the banner colour; the browser test looks for these pixels
BANNER_RGB = (198, 40, 40)
HIST_BINS = 20
THUMB_SIZE = 128
THUMB_QUALITY = 85
#: quarantined files of the run listed one by one at most (the counts per reason are always complete)
MAX_QUARANTINE_ROWS = 50
_PREDICTION_META = ["image_id", "model_id", "weights_sha256", "weights_source", "run_id", "device"]


# --- what the template renders ------------------------------------------------------------------------
@dataclass(frozen=True)
class Thumb:
    """One thumbnail of a top-scoring image."""

    image_id: str
    score: float
    source_name: str
    data_uri: str


@dataclass
class Finding:
    """One pathology column of one model: its score distribution and top images."""

    name: str
    column: str
    count: int
    positive: int
    mean: float
    histogram: Markup
    thumbs: list[Thumb] = field(default_factory=list)
    #: the site threshold (``thresholds`` table) and the images at or above it, when calibrated
    site_threshold: float | None = None
    site_positive: int | None = None


@dataclass
class ModelReport:
    """What the predictions table holds for one model."""

    model_id: str
    rows: int
    weights_sha256: list[str]
    weights_source: list[str]
    devices: list[str]
    run_ids: list[str]
    untrained: bool
    findings: list[Finding] = field(default_factory=list)
    not_predicted: list[str] = field(default_factory=list)


# --- public API ---------------------------------------------------------------------------------------
def build_report(
    lakehouse_uri: str,
    *,
    settings: Settings,
    run_id: str | None = None,
    top: int = 8,
    output: str | None = None,
    published: bool = True,
) -> str:
    """Render the HTML run report of a lakehouse.

    The tables are read at their published (audited) versions (``lakehouse.publish``); the run summaries
    and validation results are shown as they are (they say what happened, audited or not).

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix`` holding the Delta tables.
        settings: for the S3 endpoint.
        run_id: the preprocessing run to report; the latest one when None.
        top: thumbnails per finding (the highest-scoring images).
        output: where the HTML will be written (default ``<lakehouse>/reports/report.html``); only used
            to make the Data Docs link relative to it.
        published: False reads the latest, unaudited table versions (the report says so).

    Returns:
        The HTML document.

    Raises:
        CxrError: when the lakehouse has no tables and no run summaries, or ``run_id`` is unknown.
    """
    if top < 0:
        raise CxrError(f"--top {top}: give 0 or more thumbnails per finding")
    lake = storage.normalize_uri(lakehouse_uri)
    out = storage.normalize_uri(output) if output else storage.report_uri(lake)
    runs = read_summaries(lake, settings, kind=RunRecord)
    try:
        versions = reader_versions(lake, settings, published=published)
    except NothingPublishedError:
        versions = {}  # nothing audited yet: no table is shown
    tensors = _tensor_facts(lake, settings, versions)
    quarantine = _read_table(
        lake, "quarantine", settings, ["source_uri", "error_class", "error_message", "run_id"], versions
    )
    predictions = _read_table(
        lake,
        "predictions",
        settings,
        _PREDICTION_META + list(PATHOLOGY_COLUMNS.values()),
        versions,
        optional_columns=True,
    )
    if tensors is None and quarantine is None and predictions is None and not runs:
        raise CxrError(
            f"no lakehouse at {lake}: no tables and no run summaries there; run `cxr preprocess` first "
            "or check --lakehouse"
        )
    preprocess_runs = sorted((r for r in runs if isinstance(r, PreprocessRun)), key=lambda r: (r.mtime_ms, r.run_id))
    infer_runs = sorted((r for r in runs if isinstance(r, InferRun)), key=lambda r: (r.run_id, r.model_id))
    run = _pick_run(preprocess_runs, run_id, lake)
    selected_id = run.run_id if run else None

    cutoffs = _thresholds(lake, settings, versions)
    # thumbnails of the run's own images (a daily report shows what that day found, and reads the tensor
    # bytes of at most top x findings images of it: O(run), not O(table)); every image without a run
    scope = tensors.run_image_ids(selected_id) if tensors and selected_id else None
    models = _model_reports(
        lake,
        predictions,
        settings,
        top=max(top, 0),
        tensors_version=versions.get("tensors"),
        cutoffs=cutoffs,
        scope=scope,
        scope_run=selected_id if scope is not None else None,
    )
    untrained = sorted({m.model_id for m in models if m.untrained} | {r.model_id for r in infer_runs if r.untrained})
    context = {
        "title": f"cxr run report: {selected_id or 'lakehouse'}",
        "lakehouse": lake,
        "generated_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        "run": run.body if run else None,
        "run_id": selected_id,
        # files whose bytes are in tensors: earlier failures and skips among "already present" are not
        "accepted": run.new + run.already_present - sum(run.previously.get(o, 0) for o in ("skipped", "quarantined"))
        if run
        else None,
        "other_runs": [r.run_id for r in reversed(preprocess_runs)],
        "duplicate_pairs": [
            {"source": _basename(p.get("source_uri", "")), "duplicate_of": _basename(p.get("duplicate_of", ""))}
            for p in (run.duplicate_pairs if run else [])
        ],
        "quarantine_reasons": sorted((run.quarantine_reasons if run else {}).items()),
        "run_quarantine": _run_quarantine_rows(quarantine, selected_id),
        "totals": _totals(tensors, quarantine, predictions, selected_id),
        "infer_runs": _per_run_and_model(infer_runs),
        "models": models,
        "untrained": untrained,
        "top": top,
        "top_scope": "run" if scope is not None else "lakehouse",
        "validation": _validation(lake, settings),
        "data_docs": _data_docs_link(lake, out, settings),
        "banner_rgb": "#{:02x}{:02x}{:02x}".format(*BANNER_RGB),
        "table_versions": {"published": published, "versions": versions},
        "evaluation": _evaluation_section(lake, settings, versions),
        "drift": _drift_section(lake, settings, versions, predictions),
    }
    return _render(context)


def write_report(
    lakehouse_uri: str,
    *,
    settings: Settings,
    run_id: str | None = None,
    top: int = 8,
    output: str | None = None,
    published: bool = True,
) -> str:
    """Render the run report and write it to a folder or s3://.

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix`` holding the Delta tables.
        settings: for the S3 endpoint.
        run_id: the preprocessing run to report; the latest one when None.
        top: thumbnails per finding.
        output: the HTML file's URI (default ``<lakehouse>/reports/report.html``).
        published: False reports the latest, unaudited table versions.

    Returns:
        The URI written.

    Raises:
        CxrError: as :func:`build_report`; StorageError when the output cannot be written.
    """
    out = storage.normalize_uri(output) if output else storage.report_uri(lakehouse_uri)
    html = build_report(lakehouse_uri, settings=settings, run_id=run_id, top=top, output=out, published=published)
    storage.write_text(out, html, settings, content_type="text/html; charset=utf-8")
    log.info("wrote the run report to %s (%d kB)", out, len(html) // 1024)
    return out


# --- reading ------------------------------------------------------------------------------------------
def _per_run_and_model(runs: list[InferRun]) -> list[dict[str, Any]]:
    """One row per inference run and model: a run fanned out over N shards has N summaries, added up
    (counts summed; seconds of the slowest shard, as they run side by side)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in newest_fanout(runs):
        key = (r.run_id, r.model_id)
        if key not in rows:
            rows[key] = {**r.body, "shards": 0}
        else:
            row = rows[key]
            for field in ("candidates", "already_predicted", "predicted"):
                row[field] = int(row.get(field) or 0) + int(r.body.get(field) or 0)
            row["seconds"] = max(float(row.get("seconds") or 0), float(r.body.get("seconds") or 0))
        rows[key]["shards"] += 1
    return list(rows.values())


def _pick_run(runs: list[PreprocessRun], run_id: str | None, lake: str) -> PreprocessRun | None:
    """The requested preprocessing run, or the latest; None when there is none and none was asked for."""
    if run_id is None:
        return runs[-1] if runs else None
    for r in runs:
        if r.run_id == run_id:
            return r
    known = ", ".join(r.run_id for r in runs) or "none"
    raise CxrError(f"no preprocessing run {run_id!r} under {storage.runs_uri(lake)} (known runs: {known})")


def _read_table(
    lake: str,
    name: str,
    settings: Settings,
    columns: list[str],
    versions: dict[str, int | None],
    *,
    optional_columns: bool = False,
) -> pa.Table | None:
    """Some columns of a table at the version readers see, or None when it does not exist (or is unpublished)."""
    from deltalake.exceptions import TableNotFoundError

    from lakehouse.delta_rs import open_table, projected_dataset

    if name not in versions:
        return None
    try:
        dt = open_table(lake, spec(name), settings, version=versions[name])
    except TableNotFoundError:
        return None
    if optional_columns:
        present = set(dt.schema().to_arrow().names)
        columns = [c for c in columns if c in present]
    return projected_dataset(dt, columns).to_table(columns=columns)  # a dataset over these columns only


def _counts(table: pa.Table, column: str) -> list[tuple[str, int]]:
    """(value, rows) of a column, most frequent first."""
    import pyarrow.compute as pc

    vc = pc.value_counts(table.column(column)).to_pylist()
    return sorted(((str(v["values"]), int(v["counts"])) for v in vc), key=lambda x: (-x[1], x[0]))


@dataclass(frozen=True)
class _TensorFacts:
    """What the report shows of ``tensors`` at the version readers see, without reading its data files:
    row counts per format and per run from the Delta log's statistics (one-value files are not opened)."""

    dt: Any
    rows: int
    by_format: dict[str, int]
    by_run: dict[str, int]

    def run_image_ids(self, run_id: str) -> pa.Array:
        """The image ids the run added (a filter on run_id: only that run's data files are opened)."""
        import pyarrow as pa

        from lakehouse.delta_rs import projected_dataset, run_filter

        if not self.by_run.get(run_id):
            return pa.array([], pa.string())
        dataset = projected_dataset(self.dt, ["image_id", "run_id"])
        table = dataset.to_table(columns=["image_id"], filter=run_filter([run_id]))
        return table.column("image_id").combine_chunks()


def _tensor_facts(lake: str, settings: Settings, versions: dict[str, int | None]) -> _TensorFacts | None:
    """:class:`_TensorFacts` of the version readers see; None when the table does not exist (or is unpublished)."""
    from deltalake.exceptions import TableNotFoundError

    from lakehouse.delta_rs import open_table, value_counts

    if "tensors" not in versions:
        return None
    try:
        dt = open_table(lake, TENSORS, settings, version=versions["tensors"])
    except TableNotFoundError:
        return None
    by_run = value_counts(dt, "run_id")
    return _TensorFacts(dt, sum(by_run.values()), value_counts(dt, "source_format"), by_run)


def _totals(
    tensors: _TensorFacts | None, quarantine: pa.Table | None, predictions: pa.Table | None, run_id: str | None
) -> dict[str, Any]:
    """Whole-lakehouse counts from the tables (None for a table that does not exist)."""
    import pyarrow.compute as pc

    totals: dict[str, Any] = {"tensors": None, "quarantine": None, "predictions": None}
    if tensors is not None:
        totals["tensors"] = tensors.rows
        totals["tensors_by_format"] = sorted(tensors.by_format.items(), key=lambda x: (-x[1], x[0]))
        totals["tensors_of_run"] = tensors.by_run.get(run_id, 0) if run_id else None
    if quarantine is not None:
        totals["quarantine"] = quarantine.num_rows
        totals["quarantine_by_class"] = _counts(quarantine, "error_class")
    if predictions is not None:
        totals["predictions"] = predictions.num_rows
        totals["predicted_images"] = len(pc.unique(predictions.column("image_id")))
        totals["predictions_by_model"] = _counts(predictions, "model_id")
    return totals


def _run_quarantine_rows(quarantine: pa.Table | None, run_id: str | None) -> dict[str, Any]:
    """The quarantine rows the run recorded (file basenames only), capped at MAX_QUARANTINE_ROWS."""
    import pyarrow.compute as pc

    if quarantine is None or run_id is None:
        return {"rows": [], "total": 0}
    mine = quarantine.filter(pc.equal(quarantine.column("run_id"), run_id))
    rows = sorted(
        (
            {"file": _basename(r["source_uri"]), "error_class": r["error_class"], "message": r["error_message"]}
            for r in mine.to_pylist()
        ),
        key=lambda r: (r["error_class"], r["file"]),
    )
    return {"rows": rows[:MAX_QUARANTINE_ROWS], "total": len(rows)}


def _model_reports(
    lake: str,
    predictions: pa.Table | None,
    settings: Settings,
    *,
    top: int,
    tensors_version: int | None,
    cutoffs: dict[tuple[str, str], float] | None = None,
    scope: pa.Array | None = None,
    scope_run: str | None = None,
) -> list[ModelReport]:
    """Per model: identity, per-pathology histograms (every prediction) and the top images per finding
    (among the ``scope`` image ids when given: those ``scope_run`` added, whose files alone are read)."""
    import numpy as np
    import pyarrow.compute as pc

    if predictions is None or predictions.num_rows == 0:
        return []
    models: list[ModelReport] = []
    wanted: dict[str, list[tuple[Finding, list[tuple[str, float]]]]] = {}
    for model_id in sorted(str(m) for m in pc.unique(predictions.column("model_id")).to_pylist()):
        sub = predictions.filter(pc.equal(predictions.column("model_id"), model_id))

        def distinct(col: str, sub: pa.Table = sub) -> list[str]:
            return sorted(str(v) for v in pc.unique(sub.column(col)).to_pylist()) if col in sub.column_names else []

        sources = distinct("weights_source")
        report = ModelReport(
            model_id=model_id,
            rows=sub.num_rows,
            weights_sha256=distinct("weights_sha256"),
            weights_source=sources,
            devices=distinct("device"),
            run_ids=distinct("run_id"),
            untrained=model_id.endswith(UNTRAINED_SUFFIX) or "untrained" in sources,
        )
        # the thumbnails' candidates: the scope's rows only become Python objects
        shown_rows = sub if scope is None else sub.filter(pc.is_in(sub.column("image_id"), value_set=scope))
        ids = np.asarray(shown_rows.column("image_id").to_pylist(), dtype=object)
        for name, col in PATHOLOGY_COLUMNS.items():
            if col not in sub.column_names:
                report.not_predicted.append(name)
                continue
            values = sub.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
            ok = ~np.isnan(values)
            if not ok.any():
                report.not_predicted.append(name)
                continue
            scores = values[ok]
            site = (cutoffs or {}).get((model_id, col))
            finding = Finding(
                name=name,
                column=col,
                count=int(ok.sum()),
                positive=int((scores >= 0.5).sum()),
                mean=float(scores.mean()),
                histogram=_histogram_svg(scores, title=f"{name} ({model_id})", site_threshold=site),
                site_threshold=site,
                site_positive=int((scores >= site).sum()) if site is not None else None,
            )
            report.findings.append(finding)
            shown = shown_rows.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
            keep = ~np.isnan(shown)
            wanted.setdefault(model_id, []).append((finding, _top_k(ids[keep], shown[keep], top)))
        models.append(report)
    _attach_thumbs(lake, wanted, settings, tensors_version, scope_run)
    return models


def _top_k(ids: np.ndarray, scores: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The k highest scores (ties broken by image_id), as (image_id, score)."""
    import numpy as np

    if k == 0 or scores.size == 0:
        return []
    kth = np.partition(scores, scores.size - min(k, scores.size))[scores.size - min(k, scores.size)]
    cand = np.nonzero(scores >= kth)[0]
    ranked = sorted(((str(ids[i]), float(scores[i])) for i in cand), key=lambda x: (-x[1], x[0]))
    return ranked[:k]


def _attach_thumbs(
    lake: str,
    wanted: dict[str, list[tuple[Finding, list[tuple[str, float]]]]],
    settings: Settings,
    tensors_version: int | None,
    run_id: str | None = None,
) -> None:
    """Read only the tensors of the images shown (of the data files of ``run_id`` when given: the run that
    added them) and attach one thumbnail per (finding, image)."""
    from lakehouse.delta_rs import read_rows_by_id

    ids = sorted({i for per_model in wanted.values() for _, top in per_model for i, _ in top})
    if not ids:
        return
    columns = ["image_id", "tensor", "tensor_dtype", "tensor_shape", "source_uri"]
    table = read_rows_by_id(
        lake, TENSORS, settings, ids, columns=columns, version=tensors_version, run_ids=[run_id] if run_id else None
    )
    if not table.num_rows:
        return
    images: dict[str, tuple[str, str]] = {}
    for row in table.to_pylist():
        images[row["image_id"]] = (
            _thumbnail_uri(row["tensor"], row["tensor_dtype"], row["tensor_shape"]),
            _basename(row["source_uri"]),
        )
    missing = set(ids) - set(images)
    if missing:
        log.warning("%d predicted images are no longer in tensors; shown without a thumbnail", len(missing))
    for per_model in wanted.values():
        for finding, top in per_model:
            for image_id, score in top:
                data_uri, name = images.get(image_id, ("", "(not in tensors)"))
                finding.thumbs.append(Thumb(image_id, score, name, data_uri))


def _thumbnail_uri(blob: bytes, dtype: str, shape: list[int]) -> str:
    """A stored tensor (values on [-1024, 1024]) -> a grayscale JPEG data URI THUMB_SIZE pixels wide."""
    import cv2
    import numpy as np

    arr = decode_tensor(blob, dtype, shape)
    img = arr.reshape(arr.shape[-2:]) if arr.ndim > 2 else arr
    u8: Any = np.clip(np.rint((img + 1024.0) * (255.0 / 2048.0)), 0, 255).astype(np.uint8)
    h, w = u8.shape
    if w > THUMB_SIZE:
        u8 = cv2.resize(u8, (THUMB_SIZE, max(1, round(h * THUMB_SIZE / w))), interpolation=cv2.INTER_AREA)
    # JPEG: about a quarter of the PNG size; the page repeats an image in every finding it tops
    ok, jpg = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
    if not ok:  # pragma: no cover - cv2 encodes any uint8 2-D array
        raise CxrError("could not encode a thumbnail as JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(jpg.tobytes()).decode("ascii")


def _validation(lake: str, settings: Settings) -> list[dict[str, Any]]:
    """Great Expectations results per table: passed / failed / not validated."""
    found: dict[str, dict[str, Any]] = {}
    try:
        listed = list(storage.list_files(storage.validation_uri(lake), settings))
    except StorageError:
        listed = []
    for f in listed:
        name = posixpath.basename(f.uri)
        if not name.endswith(".json"):
            continue
        try:
            body = json.loads(storage.read_text(f.uri, settings))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            log.warning("skipping unreadable validation result %s: %s", f.uri, exc)
            continue
        if isinstance(body, dict):
            found[name[: -len(".json")]] = body
    rows = []
    for table in [*TABLE_NAMES, *sorted(set(found) - set(TABLE_NAMES))]:
        body = found.get(table) or {}
        # the runner's form (evaluated / passed / failed), or GX's own statistics block
        stats: dict[str, Any] = body["statistics"] if isinstance(body.get("statistics"), dict) else {}
        failed = [
            f"{f.get('expectation_type', '?')}({f['column']})"
            if f.get("column")
            else str(f.get("expectation_type", "?"))
            for f in body.get("failed") or []
            if isinstance(f, dict)
        ]
        rows.append(
            {
                "table": table,
                "status": "not validated" if not body else ("passed" if body.get("success") else "failed"),
                "evaluated": body.get("evaluated", stats.get("evaluated_expectations")),
                "successful": body.get("passed", stats.get("successful_expectations")),
                "failed": failed,  # expectation names only: unexpected example values are not copied here
            }
        )
    return rows


def _data_docs_link(lake: str, output: str, settings: Settings) -> dict[str, Any]:
    """The Data Docs link, relative to the report when both live on the same file system or bucket."""
    index = storage.data_docs_index_uri(lake)
    if storage.is_s3(index) == storage.is_s3(output) and (
        not storage.is_s3(index) or storage.split_s3(index)[0] == storage.split_s3(output)[0]
    ):
        if storage.is_s3(index):
            href = posixpath.relpath(storage.split_s3(index)[1], posixpath.dirname(storage.split_s3(output)[1]))
        else:
            href = os.path.relpath(index, os.path.dirname(output)).replace(os.sep, "/")
    else:
        href = index
    return {"href": href, "uri": index, "exists": storage.exists(index, settings)}


def _basename(uri: str) -> str:
    """The file name of a path or URI (no folders: they may say more than the report needs)."""
    return posixpath.basename(str(uri).replace("\\", "/").rstrip("/"))


# --- rendering ----------------------------------------------------------------------------------------
def _histogram_svg(scores: np.ndarray, *, title: str, site_threshold: float | None = None) -> Markup:
    """An inline SVG histogram of scores on [0, 1] with the 0.5 operating point marked (dashed) and the
    site threshold, when calibrated (red)."""
    import numpy as np
    from markupsafe import Markup, escape

    counts, edges = np.histogram(np.clip(scores, 0.0, 1.0), bins=HIST_BINS, range=(0.0, 1.0))
    width, height, left, bottom, top_pad = 300, 120, 28, 18, 6
    plot_w, plot_h = width - left - 4, height - bottom - top_pad
    peak = max(int(counts.max()), 1)
    bar_w = plot_w / HIST_BINS
    bars = []
    for i, c in enumerate(counts):
        h = plot_h * int(c) / peak
        x, y = left + i * bar_w, top_pad + plot_h - h
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" height="{h:.1f}" fill="#3b6ea8">'
            f"<title>{edges[i]:.2f}-{edges[i + 1]:.2f}: {int(c)}</title></rect>"
        )
    mid = left + plot_w / 2
    base = top_pad + plot_h
    svg = (
        f'<svg class="hist" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">'
        f"<title>{escape(title)}</title>"
        f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#555"/>'
        f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{base}" stroke="#555"/>'
        f'<line x1="{mid:.1f}" y1="{top_pad}" x2="{mid:.1f}" y2="{base}" stroke="#999" stroke-dasharray="3,3"/>'
        + "".join(bars)
        + (
            f'<line class="site-threshold" x1="{left + plot_w * site_threshold:.1f}" y1="{top_pad}" '
            f'x2="{left + plot_w * site_threshold:.1f}" y2="{base}" stroke="#c0392b" stroke-width="1.5"/>'
            if site_threshold is not None
            else ""
        )
        + f'<text x="{left}" y="{height - 4}" font-size="10" text-anchor="middle">0</text>'
        f'<text x="{mid:.1f}" y="{height - 4}" font-size="10" text-anchor="middle">0.5</text>'
        f'<text x="{left + plot_w}" y="{height - 4}" font-size="10" text-anchor="end">1</text>'
        f'<text x="{left - 3}" y="{top_pad + 8}" font-size="10" text-anchor="end">{peak}</text>'
        f'<text x="{left - 3}" y="{base}" font-size="10" text-anchor="end">0</text>'
        "</svg>"
    )
    return Markup(svg)  # built from numbers and escaped text only


def _thresholds(lake: str, settings: Settings, versions: dict[str, int | None]) -> dict[tuple[str, str], float]:
    """(model_id, prediction column) -> the site threshold of the published ``thresholds`` version."""
    table = _read_table(lake, "thresholds", settings, ["model_id", "prediction_column", "threshold"], versions)
    if table is None:
        return {}
    return {(r["model_id"], r["prediction_column"]): float(r["threshold"]) for r in table.to_pylist()}


def _evaluation_section(lake: str, settings: Settings, versions: dict[str, int | None]) -> dict[str, Any] | None:
    """The latest published evaluation: per model and pathology (slice all) its metrics, ROC curve with the
    bootstrap band and calibration plot, highest AUROC first; the other slices as rows."""
    from cxr.charts import calibration_svg, roc_svg

    table = _read_table(lake, "evaluation", settings, [c.name for c in spec("evaluation").columns], versions)
    if table is None or table.num_rows == 0:
        return None
    every = table.to_pylist()
    latest = max(every, key=lambda r: (r["evaluated_at"], r["evaluation_id"]))["evaluation_id"]
    rows = [r for r in every if r["evaluation_id"] == latest]
    overall = sorted(
        (r for r in rows if r["slice"] == "all"),
        key=lambda r: (r["auroc"] is None, -(r["auroc"] or 0.0), r["model_id"], r["pathology"]),
    )
    for r in overall:
        title = f"{r['pathology']} ({r['model_id']})"
        r["roc"] = (
            roc_svg(r["roc_fpr"], r["roc_tpr"], low=r["roc_tpr_low"], high=r["roc_tpr_high"], title=f"ROC {title}")
            if r["roc_tpr"]
            else None
        )
        r["calibration"] = (
            calibration_svg(
                r["calibration_predicted"],
                r["calibration_observed"],
                r["calibration_count"],
                title=f"calibration {title}",
            )
            if r["calibration_count"]
            else None
        )
    slices = sorted(
        (r for r in rows if r["slice"] != "all"),
        key=lambda r: (r["model_id"], r["pathology"], r["slice"], r["slice_value"]),
    )
    first = rows[0]
    return {
        "evaluation_id": latest,
        "labels_uri": first["labels_uri"],
        "labels_sha256": first["labels_sha256"],
        "rule": first["threshold_rule"],
        "run_id": first["run_id"],
        "predictions_version": first["predictions_version"],
        "overall": overall,
        "slices": slices,
    }


def _drift_section(
    lake: str, settings: Settings, versions: dict[str, int | None], predictions: pa.Table | None
) -> dict[str, Any] | None:
    """The latest published drift verdict: PSI bars, and this run's probabilities against the reference's."""
    import pyarrow.compute as pc

    from cxr.charts import overlay_histogram_svg, psi_bars_svg

    table = _read_table(lake, "drift", settings, [c.name for c in spec("drift").columns], versions)
    if table is None or table.num_rows == 0:
        return None
    latest = pc.max(table.column("computed_at")).as_py()
    rows = [r for r in table.to_pylist() if r["computed_at"] == latest]
    run_id, reference = rows[0]["run_id"], rows[0]["reference_run_id"]
    psi = [r for r in rows if r["metric"] == "psi" and r["value"] is not None]
    psi.sort(key=lambda r: (r["model_id"] != "", r["model_id"], -r["value"]))
    bars = [
        (
            f"{'input' if not r['model_id'] else 'p'}: {r['feature'].removeprefix('input.')}",
            r["value"],
            r["threshold"],
            r["status"],
        )
        for r in psi
    ]
    histograms = []
    if predictions is not None and reference and "run_id" in predictions.column_names:
        runs, models = predictions.column("run_id"), predictions.column("model_id")
        for model_id in sorted({r["model_id"] for r in psi if r["model_id"]}):
            of_model = pc.equal(models, model_id)
            current = predictions.filter(pc.and_(of_model, pc.equal(runs, run_id)))
            before = predictions.filter(pc.and_(of_model, pc.equal(runs, reference)))
            for name, col in PATHOLOGY_COLUMNS.items():
                if col not in predictions.column_names:
                    continue
                a = [v for v in current.column(col).to_pylist() if v is not None]
                b = [v for v in before.column(col).to_pylist() if v is not None]
                if a and b:
                    title = f"{name} ({model_id}): {run_id} vs {reference}"
                    svg = overlay_histogram_svg(a, b, title=title)
                    histograms.append({"name": name, "model_id": model_id, "column": col, "svg": svg})
    statuses = [r["status"] for r in rows]
    verdict = "fail" if "fail" in statuses else "pass" if "pass" in statuses else statuses[0]
    return {
        "run_id": run_id,
        "reference_run_id": reference,
        "verdict": verdict,
        "bars": psi_bars_svg(bars, title=f"PSI of {run_id} against {reference}") if bars else None,
        "failed": [r for r in psi if r["status"] == "fail"],
        "histograms": histograms,
        "n": rows[0]["n"],
        "n_reference": rows[0]["n_reference"],
    }


def _render(context: dict[str, Any]) -> str:
    """Render the template with autoescaping."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cxr", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["short"] = lambda s, n=12: str(s)[:n]
    env.filters["num"] = lambda v: "n/a" if v is None else f"{v:,}" if isinstance(v, int) else str(v)
    return env.get_template("report.html.j2").render(**context)
