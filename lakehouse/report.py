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
from lakehouse.runs import RunSummary, read_summaries
from lakehouse.tables import PATHOLOGY_COLUMNS

if TYPE_CHECKING:
    import argparse

    import numpy as np
    import pyarrow as pa
    from markupsafe import Markup

    from lakehouse.config import Settings

log = logging.getLogger(__name__)

#: marks a random-init stand-in model (same value as ``inference.job.UNTRAINED_SUFFIX``; not imported
#: from there because that module imports torch)
UNTRAINED_SUFFIX = "+untrained-random-init"
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
def default_output(lakehouse_uri: str) -> str:
    """Where the report goes unless told otherwise: ``<lakehouse>/reports/report.html``."""
    return storage.join(lakehouse_uri, "reports", "report.html")


def build_report(
    lakehouse_uri: str,
    *,
    settings: Settings,
    run_id: str | None = None,
    top: int = 8,
    output: str | None = None,
) -> str:
    """Render the HTML run report of a lakehouse.

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix`` holding the Delta tables.
        settings: for the S3 endpoint.
        run_id: the preprocessing run to report; the latest one when None.
        top: thumbnails per finding (the highest-scoring images).
        output: where the HTML will be written (default ``<lakehouse>/reports/report.html``); only used
            to make the Data Docs link relative to it.

    Returns:
        The HTML document.

    Raises:
        CxrError: when the lakehouse has no tables and no run summaries, or ``run_id`` is unknown.
    """
    if top < 0:
        raise CxrError(f"--top {top}: give 0 or more thumbnails per finding")
    lake = storage.normalize_uri(lakehouse_uri)
    out = storage.normalize_uri(output) if output else default_output(lake)
    runs = read_summaries(lake, settings)
    tensors = _read_table(lake, "tensors", settings, ["image_id", "source_format", "run_id"])
    quarantine = _read_table(lake, "quarantine", settings, ["source_uri", "error_class", "error_message", "run_id"])
    predictions = _read_table(
        lake, "predictions", settings, _PREDICTION_META + list(PATHOLOGY_COLUMNS.values()), optional_columns=True
    )
    if tensors is None and quarantine is None and predictions is None and not runs:
        raise CxrError(
            f"no lakehouse at {lake}: no tables and no run summaries there; run `cxr preprocess` first "
            "or check --lakehouse"
        )
    preprocess_runs = sorted(
        (r for r in runs if r.kind == "preprocess"),
        key=lambda r: (r.mtime_ms, str(r.body.get("run_id", ""))),
    )
    infer_runs = sorted(
        (r for r in runs if r.body.get("kind") == "infer"),
        key=lambda r: (str(r.body.get("run_id", "")), str(r.body.get("model_id", ""))),
    )
    run = _pick_run(preprocess_runs, run_id, lake)
    selected_id = str(run["run_id"]) if run else None

    models = _model_reports(lake, predictions, settings, top=max(top, 0))
    untrained = sorted(
        {m.model_id for m in models if m.untrained}
        | {str(r.body.get("model_id")) for r in infer_runs if r.body.get("untrained")}
    )
    context = {
        "title": f"cxr run report: {selected_id or 'lakehouse'}",
        "lakehouse": lake,
        "generated_at": f"{datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC",
        "run": run,
        "run_id": selected_id,
        "accepted": (int(run.get("new", 0)) + int(run.get("already_present", 0))) if run else None,
        "other_runs": [str(r.body.get("run_id")) for r in reversed(preprocess_runs)],
        "duplicate_pairs": [
            {"source": _basename(p.get("source_uri", "")), "duplicate_of": _basename(p.get("duplicate_of", ""))}
            for p in (run or {}).get("duplicate_pairs", [])
        ],
        "quarantine_reasons": sorted(((run or {}).get("quarantine_reasons") or {}).items()),
        "run_quarantine": _run_quarantine_rows(quarantine, selected_id),
        "totals": _totals(tensors, quarantine, predictions, selected_id),
        "infer_runs": [r.body for r in infer_runs],
        "models": models,
        "untrained": untrained,
        "top": top,
        "validation": _validation(lake, settings),
        "data_docs": _data_docs_link(lake, out, settings),
        "banner_rgb": "#{:02x}{:02x}{:02x}".format(*BANNER_RGB),
    }
    return _render(context)


def write_report(
    lakehouse_uri: str,
    *,
    settings: Settings,
    run_id: str | None = None,
    top: int = 8,
    output: str | None = None,
) -> str:
    """Render the run report and write it to a folder or s3://.

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix`` holding the Delta tables.
        settings: for the S3 endpoint.
        run_id: the preprocessing run to report; the latest one when None.
        top: thumbnails per finding.
        output: the HTML file's URI (default ``<lakehouse>/reports/report.html``).

    Returns:
        The URI written.

    Raises:
        CxrError: as :func:`build_report`; StorageError when the output cannot be written.
    """
    out = storage.normalize_uri(output) if output else default_output(lakehouse_uri)
    html = build_report(lakehouse_uri, settings=settings, run_id=run_id, top=top, output=out)
    storage.write_text(out, html, settings, content_type="text/html; charset=utf-8")
    log.info("wrote the run report to %s (%d kB)", out, len(html) // 1024)
    return out


def report_command(args: argparse.Namespace, settings: Settings) -> int:
    """``cxr report``: write the report; 0 when written.

    Raises:
        CxrError: no lakehouse given or found, no tables, unknown run id.
    """
    lakehouse_uri = args.lakehouse or settings.lakehouse_uri
    if not lakehouse_uri:
        raise CxrError("give --lakehouse (or set CXR_LAKEHOUSE_URI)")
    write_report(lakehouse_uri, settings=settings, run_id=args.run_id, top=args.top, output=args.output)
    return 0


# --- reading ------------------------------------------------------------------------------------------
def _pick_run(runs: list[RunSummary], run_id: str | None, lake: str) -> dict[str, Any] | None:
    """The requested preprocessing run, or the latest; None when there is none and none was asked for."""
    if run_id is None:
        return runs[-1].body if runs else None
    for r in runs:
        if r.body.get("run_id") == run_id:
            return r.body
    known = ", ".join(str(r.body.get("run_id")) for r in runs) or "none"
    raise CxrError(f"no preprocessing run {run_id!r} under {lake}/runs (known runs: {known})")


def _read_table(
    lake: str, name: str, settings: Settings, columns: list[str], *, optional_columns: bool = False
) -> pa.Table | None:
    """Some columns of a table, or None when the table does not exist."""
    from deltalake.exceptions import TableNotFoundError

    from lakehouse.delta_rs import open_table

    try:
        dt = open_table(lake, name, settings)
    except TableNotFoundError:
        return None
    if optional_columns:
        present = set(dt.schema().to_arrow().names)
        columns = [c for c in columns if c in present]
    return dt.to_pyarrow_table(columns=columns)


def _counts(table: pa.Table, column: str) -> list[tuple[str, int]]:
    """(value, rows) of a column, most frequent first."""
    import pyarrow.compute as pc

    vc = pc.value_counts(table.column(column)).to_pylist()
    return sorted(((str(v["values"]), int(v["counts"])) for v in vc), key=lambda x: (-x[1], x[0]))


def _totals(
    tensors: pa.Table | None, quarantine: pa.Table | None, predictions: pa.Table | None, run_id: str | None
) -> dict[str, Any]:
    """Whole-lakehouse counts from the tables (None for a table that does not exist)."""
    import pyarrow.compute as pc

    totals: dict[str, Any] = {"tensors": None, "quarantine": None, "predictions": None}
    if tensors is not None:
        totals["tensors"] = tensors.num_rows
        totals["tensors_by_format"] = _counts(tensors, "source_format")
        totals["tensors_of_run"] = (
            int(pc.sum(pc.equal(tensors.column("run_id"), run_id)).as_py() or 0) if run_id else None
        )
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


def _model_reports(lake: str, predictions: pa.Table | None, settings: Settings, *, top: int) -> list[ModelReport]:
    """Per model: identity, per-pathology histograms and the top images per finding."""
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
        ids = np.asarray(sub.column("image_id").to_pylist(), dtype=object)
        for name, col in PATHOLOGY_COLUMNS.items():
            if col not in sub.column_names:
                report.not_predicted.append(name)
                continue
            values = sub.column(col).to_numpy(zero_copy_only=False).astype(np.float64)
            ok = ~np.isnan(values)
            if not ok.any():
                report.not_predicted.append(name)
                continue
            scores, score_ids = values[ok], ids[ok]
            finding = Finding(
                name=name,
                column=col,
                count=int(ok.sum()),
                positive=int((scores >= 0.5).sum()),
                mean=float(scores.mean()),
                histogram=_histogram_svg(scores, title=f"{name} ({model_id})"),
            )
            report.findings.append(finding)
            wanted.setdefault(model_id, []).append((finding, _top_k(score_ids, scores, top)))
        models.append(report)
    _attach_thumbs(lake, wanted, settings)
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
    lake: str, wanted: dict[str, list[tuple[Finding, list[tuple[str, float]]]]], settings: Settings
) -> None:
    """Read only the tensors of the images shown and attach one thumbnail per (finding, image)."""
    import pyarrow.compute as pc

    from lakehouse.delta_rs import open_table

    ids = sorted({i for per_model in wanted.values() for _, top in per_model for i, _ in top})
    if not ids:
        return
    import pyarrow as pa

    dataset = open_table(lake, "tensors", settings).to_pyarrow_dataset()
    wanted_ids = pa.array(ids)
    parts = []
    # sha256 ids defeat min/max pruning: look at each file's small image_id column first and read the
    # tensor bytes only of files that hold a wanted image
    for fragment in dataset.get_fragments():
        fragment_ids = fragment.to_table(columns=["image_id"]).column("image_id")
        if pc.any(pc.is_in(fragment_ids, value_set=wanted_ids)).as_py():
            parts.append(
                fragment.to_table(
                    columns=["image_id", "tensor", "tensor_dtype", "tensor_shape", "source_uri"],
                    filter=pc.field("image_id").isin(ids),
                )
            )
    if not parts:
        return
    table = pa.concat_tables(parts)
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

    from transforms.tensor import decode_tensor

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
        listed = list(storage.list_files(storage.join(lake, "reports", "validation"), settings))
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
    for table in [*storage.TABLE_NAMES, *sorted(set(found) - set(storage.TABLE_NAMES))]:
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
    index = storage.join(lake, "reports", "data_docs", "index.html")
    if storage.is_s3(index) == storage.is_s3(output) and (
        not storage.is_s3(index) or storage.split_s3(index)[0] == storage.split_s3(output)[0]
    ):
        if storage.is_s3(index):
            href = posixpath.relpath(storage.split_s3(index)[1], posixpath.dirname(storage.split_s3(output)[1]))
        else:
            href = os.path.relpath(index, os.path.dirname(output)).replace(os.sep, "/")
    else:
        href = index
    return {"href": href, "uri": index, "exists": _exists(index, settings)}


def _exists(uri: str, settings: Settings) -> bool:
    """True when the file exists (folder or s3://)."""
    if not storage.is_s3(uri):
        return os.path.isfile(uri)
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = storage.split_s3(uri)
    try:
        storage.s3_client(settings).head_object(Bucket=bucket, Key=key)
    except ClientError:
        return False
    except BotoCoreError as exc:
        raise StorageError(f"cannot check {uri}: {exc}") from exc
    return True


def _basename(uri: str) -> str:
    """The file name of a path or URI (no folders: they may say more than the report needs)."""
    return posixpath.basename(str(uri).replace("\\", "/").rstrip("/"))


# --- rendering ----------------------------------------------------------------------------------------
def _histogram_svg(scores: np.ndarray, *, title: str) -> Markup:
    """An inline SVG histogram of scores on [0, 1] with the 0.5 operating point marked."""
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
        + f'<text x="{left}" y="{height - 4}" font-size="10" text-anchor="middle">0</text>'
        f'<text x="{mid:.1f}" y="{height - 4}" font-size="10" text-anchor="middle">0.5</text>'
        f'<text x="{left + plot_w}" y="{height - 4}" font-size="10" text-anchor="end">1</text>'
        f'<text x="{left - 3}" y="{top_pad + 8}" font-size="10" text-anchor="end">{peak}</text>'
        f'<text x="{left - 3}" y="{base}" font-size="10" text-anchor="end">0</text>'
        "</svg>"
    )
    return Markup(svg)  # noqa: S704 - built from numbers and escaped text only


def _render(context: dict[str, Any]) -> str:
    """Render the template with autoescaping."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["short"] = lambda s, n=12: str(s)[:n]
    env.filters["num"] = lambda v: "n/a" if v is None else f"{v:,}" if isinstance(v, int) else str(v)
    return env.from_string(_TEMPLATE).render(**context)


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="cxr report">
<title>{{ title }}</title>
<style>
  body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2430;
         background: #f6f7f9; }
  main { max-width: 1200px; margin: 0 auto; padding: 16px 24px 48px; }
  h1 { font-size: 24px; margin: 8px 0 4px; }
  h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 2px solid #d5dbe3; padding-bottom: 4px; }
  h3 { font-size: 15px; margin: 18px 0 6px; }
  .meta { color: #5a6472; font-size: 13px; }
  .banner { background: {{ banner_rgb }}; color: #fff; padding: 18px 24px; font-size: 20px; font-weight: 700; }
  .banner p { margin: 4px 0 0; font-size: 15px; font-weight: 400; }
  .warn { background: #fff3cd; border: 1px solid #e0c060; padding: 8px 12px; margin: 8px 0; }
  .cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
  .card { background: #fff; border: 1px solid #d5dbe3; border-radius: 6px; padding: 10px 16px; min-width: 130px; }
  .card .n { font-size: 28px; font-weight: 700; color: #2a4d7a; }
  .card .l { font-size: 12px; color: #5a6472; text-transform: uppercase; letter-spacing: .04em; }
  table { border-collapse: collapse; background: #fff; margin: 6px 0 12px; font-size: 13px; }
  th, td { border: 1px solid #d5dbe3; padding: 4px 8px; text-align: left; vertical-align: top; }
  th { background: #eaeef3; }
  td.r { text-align: right; font-variant-numeric: tabular-nums; }
  code { font-size: 12px; }
  .passed { color: #1b7a34; font-weight: 700; }
  .failed { color: #e53935; font-weight: 700; }
  .not-validated { color: #6b7280; }
  .hists { display: flex; flex-wrap: wrap; gap: 10px; }
  .hist-box { background: #fff; border: 1px solid #d5dbe3; border-radius: 6px; padding: 6px 8px; }
  .hist-box .cap { font-size: 12px; color: #3a4452; }
  .grid { display: flex; flex-wrap: wrap; gap: 8px; }
  figure { margin: 0; background: #fff; border: 1px solid #d5dbe3; border-radius: 4px; padding: 4px;
           width: {{ 128 }}px; font-size: 11px; }
  figure img { display: block; width: 128px; height: 128px; object-fit: contain; background: #000; }
  figcaption { overflow-wrap: anywhere; }
</style>
</head>
<body>
{% if untrained %}
<div class="banner" id="untrained-banner" role="alert">
  UNTRAINED STAND-IN MODEL: these predictions are meaningless
  <p>{{ untrained | join(", ") }} ran with random-init weights (no weights file was found). Do not use its
  scores for anything; rerun <code>cxr infer</code> with real weights (<code>--weights-dir</code> or
  <code>--weights</code>).</p>
</div>
{% endif %}
<main>
<h1>{{ title }}</h1>
<div class="meta">lakehouse <code>{{ lakehouse }}</code> &middot; generated {{ generated_at }}</div>

<section id="summary">
<h2>Run summary</h2>
{% if run %}
{% if run.get("dev_pseudonym_key") %}
<div class="warn">This run made DICOM pseudonyms with the built-in development key: they are not secret.
Set CXR_PSEUDONYM_KEY for real data.</div>
{% endif %}
{% if run.get("reconciles") is false %}
<div class="warn">The counts of this run do not reconcile (discovered &ne; new + already present + duplicates +
quarantined).</div>
{% endif %}
<div class="cards">
  <div class="card"><div class="n" data-count="discovered">{{ run.get("discovered") | num }}</div><div class="l">discovered</div></div>
  <div class="card"><div class="n" data-count="accepted">{{ accepted }}</div><div class="l">accepted</div></div>
  <div class="card"><div class="n" data-count="duplicates">{{ run.get("duplicates") | num }}</div><div class="l">duplicates</div></div>
  <div class="card"><div class="n" data-count="quarantined">{{ run.get("quarantined") | num }}</div><div class="l">quarantined</div></div>
  <div class="card"><div class="n" data-count="predicted">{{ totals.get("predicted_images") | num }}</div>
    <div class="l">images with predictions</div></div>
</div>
<table>
  <tr><th>preprocessing run</th><td><code data-field="run_id">{{ run.get("run_id") | num }}</code></td></tr>
  <tr><th>input</th><td><code>{{ run.get("input_uri", "") }}</code></td></tr>
  <tr><th>discovered files</th><td class="r" data-field="discovered">{{ run.get("discovered") | num }}</td></tr>
  <tr><th>new tensors</th><td class="r" data-field="new">{{ run.get("new") | num }}</td></tr>
  <tr><th>already present</th><td class="r" data-field="already_present">{{ run.get("already_present") | num }}</td></tr>
  <tr><th>duplicates (same bytes as another file)</th><td class="r" data-field="duplicates">{{ run.get("duplicates") | num }}</td></tr>
  <tr><th>quarantined</th><td class="r" data-field="quarantined">{{ run.get("quarantined") | num }}</td></tr>
  <tr><th>counts reconcile</th><td data-field="reconciles">{{ "yes" if run.get("reconciles") else "no" }}</td></tr>
  <tr><th>seconds</th><td class="r" data-field="seconds">{{ run.get("seconds", 0) | round(1) }}</td></tr>
</table>
<p class="meta">accepted = new + already present. &ldquo;Images with predictions&rdquo; counts distinct images in
the predictions table (every model, whole lakehouse).</p>
{% if other_runs | length > 1 %}
<p class="meta">Other preprocessing runs in this lakehouse (newest first):
{% for r in other_runs if r != run_id %}<code>{{ r }}</code>{{ ", " if not loop.last }}{% endfor %}
&mdash; pick one with <code>cxr report --run-id</code>.</p>
{% endif %}
{% if duplicate_pairs %}
<h3>Duplicates</h3>
<table id="duplicates">
  <tr><th>file</th><th>same bytes as</th></tr>
  {% for p in duplicate_pairs %}<tr><td>{{ p.source }}</td><td>{{ p.duplicate_of }}</td></tr>{% endfor %}
</table>
{% endif %}
{% else %}
<p>No preprocessing run summary in <code>{{ lakehouse }}/runs/</code>: the counts below come from the tables only.</p>
{% endif %}
</section>

<section id="quarantine">
<h2>Quarantine reasons</h2>
{% if quarantine_reasons %}
<table id="quarantine-reasons">
  <tr><th>error class</th><th>files in this run</th></tr>
  {% for cls, n in quarantine_reasons %}
  <tr><td>{{ cls }}</td><td class="r" data-reason="{{ cls }}">{{ n }}</td></tr>
  {% endfor %}
</table>
{% else %}
<p>Nothing was quarantined{{ " in this run" if run else "" }}.</p>
{% endif %}
{% if run_quarantine.rows %}
<h3>Quarantined files of this run{% if run_quarantine.total > run_quarantine.rows | length %}
(first {{ run_quarantine.rows | length }} of {{ run_quarantine.total }}){% endif %}</h3>
<table id="quarantined-files">
  <tr><th>file</th><th>error class</th><th>message</th></tr>
  {% for q in run_quarantine.rows %}
  <tr><td>{{ q.file }}</td><td>{{ q.error_class }}</td><td>{{ q.message }}</td></tr>
  {% endfor %}
</table>
{% endif %}
</section>

<section id="lakehouse-totals">
<h2>Lakehouse totals</h2>
<table>
  <tr><th>table</th><th>rows</th><th>breakdown</th></tr>
  <tr><td>tensors</td><td class="r" data-total="tensors">{{ totals.tensors | num }}</td>
    <td>{% for k, n in totals.get("tensors_by_format", []) %}{{ k }}: <span data-format="{{ k }}">{{ n }}</span>{{ ", " if not loop.last }}{% endfor %}
    {% if totals.get("tensors_of_run") is not none %} &middot; written by this run: <span data-total="tensors_of_run">{{ totals.tensors_of_run }}</span>{% endif %}</td></tr>
  <tr><td>quarantine</td><td class="r" data-total="quarantine">{{ totals.quarantine | num }}</td>
    <td>{% for k, n in totals.get("quarantine_by_class", []) %}{{ k }}: {{ n }}{{ ", " if not loop.last }}{% endfor %}</td></tr>
  <tr><td>predictions</td><td class="r" data-total="predictions">{{ totals.predictions | num }}</td>
    <td>{% for k, n in totals.get("predictions_by_model", []) %}<code>{{ k }}</code>: <span data-model-rows="{{ k }}">{{ n }}</span>{{ ", " if not loop.last }}{% endfor %}</td></tr>
</table>
<p class="meta">n/a: the table does not exist yet.</p>
</section>

<section id="models">
<h2>Models and weights</h2>
{% if models %}
<table>
  <tr><th>model</th><th>rows</th><th>weights sha256</th><th>weights source</th><th>device</th><th>inference runs</th></tr>
  {% for m in models %}
  <tr{% if m.untrained %} class="untrained"{% endif %}><td><code>{{ m.model_id }}</code>{% if m.untrained %} <strong>(UNTRAINED)</strong>{% endif %}</td>
    <td class="r">{{ m.rows }}</td>
    <td>{% for s in m.weights_sha256 %}<code title="{{ s }}">{{ s | short(16) }}</code>{{ ", " if not loop.last }}{% endfor %}</td>
    <td>{{ m.weights_source | join(", ") }}</td><td>{{ m.devices | join(", ") }}</td>
    <td>{% for r in m.run_ids %}<code>{{ r }}</code>{{ ", " if not loop.last }}{% endfor %}</td></tr>
  {% endfor %}
</table>
{% else %}
<p>No predictions yet: run <code>cxr infer</code>.</p>
{% endif %}
{% if infer_runs %}
<h3>Inference runs</h3>
<table id="inference-runs">
  <tr><th>run</th><th>model</th><th>device</th><th>tensors version</th><th>candidates</th><th>already predicted</th>
    <th>predicted</th><th>seconds</th></tr>
  {% for r in infer_runs %}
  <tr><td><code>{{ r.run_id }}</code></td><td><code>{{ r.get("model_id", "") }}</code>{% if r.get("untrained") %} <strong>(UNTRAINED)</strong>{% endif %}</td>
    <td>{{ r.get("device", "") }}</td><td class="r">{{ r.get("tensors_version", "") }}</td>
    <td class="r">{{ r.get("candidates", "") }}</td><td class="r">{{ r.get("already_predicted", "") }}</td>
    <td class="r" data-infer-predicted="{{ r.run_id }}|{{ r.get('model_id', '') }}">{{ r.get("predicted", "") }}</td>
    <td class="r">{{ r.get("seconds", 0) | round(1) }}</td></tr>
  {% endfor %}
</table>
{% endif %}
</section>

<section id="distributions">
<h2>Score distributions</h2>
<p class="meta">Calibrated outputs on [0, 1]; the dashed line is the model's operating point (0.5).</p>
{% for m in models %}
<h3>{{ m.model_id }}</h3>
<div class="hists">
  {% for f in m.findings %}
  <div class="hist-box" data-model="{{ m.model_id }}" data-finding="{{ f.column }}">{{ f.histogram }}
    <div class="cap"><strong>{{ f.name }}</strong>: n={{ f.count }}, &ge;0.5: {{ f.positive }}, mean {{ "%.3f" | format(f.mean) }}</div></div>
  {% endfor %}
</div>
{% if m.not_predicted %}<p class="meta">Not predicted by this model: {{ m.not_predicted | join(", ") }}.</p>{% endif %}
{% else %}
<p>No predictions yet.</p>
{% endfor %}
</section>

<section id="top-images">
<h2>Highest-scoring images per finding</h2>
{% for m in models %}
<h3>{{ m.model_id }}</h3>
{% for f in m.findings %}
<div class="finding" data-model="{{ m.model_id }}" data-finding="{{ f.column }}">
  <div class="meta"><strong>{{ f.name }}</strong>: top {{ f.thumbs | length }}</div>
  <div class="grid">
  {% for t in f.thumbs %}
    <figure>{% if t.data_uri %}<img class="thumb" src="{{ t.data_uri }}" alt="{{ t.image_id | short }}" width="128" height="128">{% endif %}
      <figcaption><code>{{ t.image_id | short }}</code> <span class="score">{{ "%.3f" | format(t.score) }}</span><br>
        <span class="file">{{ t.source_name }}</span></figcaption></figure>
  {% endfor %}
  </div>
</div>
{% endfor %}
{% else %}
<p>No predictions yet.</p>
{% endfor %}
</section>

<section id="validation">
<h2>Validation</h2>
<table>
  <tr><th>table</th><th>result</th><th>expectations</th></tr>
  {% for v in validation %}
  <tr><td>{{ v.table }}</td><td class="{{ v.status | replace(' ', '-') }}" data-validation="{{ v.table }}">{{ v.status }}</td>
    <td>{% if v.evaluated is not none %}{{ v.successful }}/{{ v.evaluated }} passed{% endif %}
    {% if v.failed %}<br>failed: {% for f in v.failed %}<code>{{ f }}</code>{{ ", " if not loop.last }}{% endfor %}{% endif %}</td></tr>
  {% endfor %}
</table>
<p><a id="data-docs-link" href="{{ data_docs.href }}">Great Expectations Data Docs</a>
{% if not data_docs.exists %}<span class="meta">(not built yet: run <code>cxr validate</code>)</span>{% endif %}</p>
</section>
</main>
</body>
</html>
"""
