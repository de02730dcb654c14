"""``cxr evaluate``: ground-truth labels joined to ``predictions`` -> the ``evaluation`` table, and site
thresholds (``thresholds``) calibrated on them.

One call reads a labels file (:mod:`cxr.labels`: tidy, NIH ``Data_Entry_2017`` or CheXpert style, mapped
to TorchXRayVision's target names), matches its keys to images (``image_id``; ``file_name`` through every
path the ``files`` ledger and ``tensors`` know, so a duplicate's name matches too; ``sop_instance_uid``
through ``tensors.sop_uid``), and writes, per model, pathology and slice (``all``, or each value of a
lineage column such as ``view_position``), the metrics of :mod:`cxr.metrics`. Nothing is dropped
silently: label keys that match no image, keys that match several, conflicting labels of one image,
unmapped label names and uncertain labels are counted in the summary (``reports/evaluations/<id>.json``,
printed by the CLI), and images with a prediction but no label are ``n_unlabeled`` in every row.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, get_args

from cxr import metrics
from lakehouse import storage
from lakehouse.config import Settings
from lakehouse.errors import ConfigError, CxrError
from lakehouse.tables import EVALUATION, FILES, PATHOLOGY_COLUMNS, PREDICTIONS, TENSORS, THRESHOLDS

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)

KeyKind = Literal["image_id", "file_name", "sop_instance_uid"]
KEY_KINDS: tuple[str, ...] = get_args(KeyKind)
#: lineage columns an evaluation can be sliced by (tensors columns, then predictions columns)
SLICE_COLUMNS: tuple[str, ...] = (
    "source_format",
    "view_position",
    "modality",
    "bits_stored",
    "photometric",
    "transfer_syntax",
    "preprocess_version",
    "manufacturer",
    "site_pseudonym",
    "device",
    "weights_sha256",
)
_TENSOR_SLICES = frozenset(SLICE_COLUMNS[:9])
#: ledger outcomes whose row names an image in tensors (its own bytes or a byte-identical copy's)
_IMAGE_OUTCOMES = ("new", "already_present", "duplicate")


@dataclass(frozen=True)
class Rule:
    """How an operating point is chosen: Youden's J, or the highest threshold reaching a target sensitivity."""

    kind: Literal["youden", "sensitivity"]
    target: float | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``youden`` or ``sensitivity=0.9``.

        Raises:
            ConfigError: for anything else, or a target outside (0, 1].
        """
        name, _, value = text.strip().lower().partition("=")
        if name == "youden" and not value:
            return cls("youden")
        if name == "sensitivity":
            try:
                target = float(value)
            except ValueError:
                target = float("nan")
            if 0 < target <= 1:
                return cls("sensitivity", target)
        raise ConfigError(f"threshold rule {text!r}: use youden or sensitivity=T with 0 < T <= 1 (e.g. 0.9)")

    def __str__(self) -> str:
        return "youden" if self.kind == "youden" else f"sensitivity={self.target:g}"

    def threshold(self, y: np.ndarray, s: np.ndarray) -> float | None:
        """The operating point on these labels and scores (None when the rule cannot be applied)."""
        if self.kind == "youden":
            return metrics.youden_threshold(y, s)
        assert self.target is not None
        return metrics.sensitivity_threshold(y, s, target=self.target)


@dataclass
class EvaluationSummary:
    """What one evaluation matched, wrote and left out (counts only: no keys, no identifiers)."""

    evaluation_id: str
    labels_uri: str
    labels_sha256: str
    labels_format: str
    key: str
    rule: str
    run_id: str | None
    predictions_version: int
    models: list[str] = field(default_factory=list)
    label_rows: int = 0
    label_keys: int = 0
    matched_keys: int = 0
    unmatched_keys: int = 0
    ambiguous_keys: int = 0
    conflicting_labels: int = 0
    #: matched label keys whose image has no prediction in scope (other runs' images, --run-id / --model)
    keys_without_prediction: int = 0
    unmapped: dict[str, int] = field(default_factory=dict)
    #: label rows of pathologies none of the evaluated models predicts (model.targets), by pathology
    not_predicted: dict[str, int] = field(default_factory=dict)
    uncertain: int = 0
    uncertain_dropped: int = 0
    blank: int = 0
    #: columns of a one-column-per-finding file that are no known finding (Sex, Age, ...; check for typos)
    ignored_columns: list[str] = field(default_factory=list)
    images_predicted: int = 0
    images_labelled: int = 0
    rows_written: int = 0
    thresholds_written: int = 0
    thresholds_version: int | None = None
    null_auroc: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary."""
        return asdict(self)


def evaluate(
    lakehouse_uri: str,
    labels_uri: str,
    *,
    settings: Settings,
    key: KeyKind,
    models: Sequence[str] | None = None,
    run_id: str | None = None,
    slices: Sequence[str] = (),
    n_bootstrap: int = 1000,
    rule: str = "youden",
    calibrate: bool = False,
    uncertain: Literal["ignore", "positive", "negative"] = "ignore",
    seed: int = 0,
    published: bool = True,
) -> EvaluationSummary:
    """Evaluate the predictions against a labels file; write ``evaluation`` (and ``thresholds``).

    Args:
        lakehouse_uri: folder or ``s3://bucket/prefix``.
        labels_uri: a CSV (``.csv.gz`` too), Parquet file or Delta table folder, local or s3://.
        settings: storage endpoint.
        key: what the labels' key is: an ``image_id`` (sha256 of the file), a ``file_name`` (a base name,
            or a relative path matched as a path suffix) or a DICOM ``sop_instance_uid``.
        models: models to evaluate (default: every model with predictions).
        run_id: evaluate only the predictions of this inference run.
        slices: lineage columns to slice by, in addition to ``all`` (see :data:`SLICE_COLUMNS`).
        n_bootstrap: bootstrap resamples of the AUROC CI (0: no CI).
        rule: operating point rule, ``youden`` or ``sensitivity=T``.
        calibrate: also write the ``all`` slice's thresholds to ``thresholds`` (upsert per model and
            pathology: the table's Delta version is the thresholds version).
        uncertain: CheXpert-style -1 labels: ignore them, or take them as positive or negative.
        seed: bootstrap seed.
        published: read the published (audited) versions of predictions, tensors and files (the
            default); False reads the latest (the DAG's evaluate step: the run under audit).

    Returns:
        The summary (also written to ``reports/evaluations/<evaluation_id>.json``).

    Raises:
        ConfigError: bad key kind, slice column, rule or bootstrap count.
        CxrError: no predictions, no labels file, labels whose keys match no image.
    """
    import pandas as pd

    from cxr.labels import read_labels
    from lakehouse import delta_rs

    if key not in KEY_KINDS:
        raise ConfigError(f"--key {key!r}: use one of {', '.join(KEY_KINDS)}")
    bad = [s for s in slices if s not in SLICE_COLUMNS]
    if bad:
        raise ConfigError(f"cannot slice by {bad}: use some of {', '.join(SLICE_COLUMNS)}")
    if n_bootstrap < 0:
        raise ConfigError(f"--bootstrap {n_bootstrap}: give 0 or more resamples")
    parsed_rule = Rule.parse(rule)
    lake = storage.normalize_uri(lakehouse_uri)

    versions = _versions(lake, settings, published=published)
    predictions, version = _read_predictions(
        lake, settings, models=models, run_id=run_id, version=versions["predictions"]
    )
    labels = read_labels(
        labels_uri, key_column=key, targets=list(PATHOLOGY_COLUMNS), uncertain=uncertain, settings=settings
    )
    summary = EvaluationSummary(
        evaluation_id=f"ev-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}",
        labels_uri=labels.uri,
        labels_sha256=labels.sha256,
        labels_format=labels.format,
        key=key,
        rule=str(parsed_rule),
        run_id=run_id,
        predictions_version=version,
        models=sorted(predictions["model_id"].unique().tolist()),
        label_rows=labels.rows_read,
        unmapped=dict(labels.unmapped),
        uncertain=labels.uncertain,
        uncertain_dropped=labels.uncertain_dropped,
        blank=labels.blank,
        ignored_columns=list(labels.ignored_columns),
    )
    tidy = labels.table
    keys = pd.Series(tidy["key"].astype(str).unique())
    summary.label_keys = len(keys)
    mapping, ambiguous = _key_to_image(lake, settings, key, keys, versions)
    summary.ambiguous_keys = ambiguous
    summary.matched_keys = len(mapping)
    summary.unmatched_keys = summary.label_keys - summary.matched_keys - ambiguous
    if not mapping:
        raise CxrError(
            f"none of the {summary.label_keys} label keys ({key}) matches an image in {lake}: check --key "
            f"(the labels are {labels.format} style)"
        )
    tidy = tidy.assign(image_id=tidy["key"].astype(str).map(mapping)).dropna(subset=["image_id"])
    tidy, summary.conflicting_labels = _one_label_per_image(tidy)
    summary.images_labelled = int(tidy["image_id"].nunique())
    summary.images_predicted = int(predictions["image_id"].nunique())
    in_scope = set(predictions["image_id"])
    summary.keys_without_prediction = sum(1 for i in mapping.values() if i not in in_scope)
    predicted = {p for p, c in PATHOLOGY_COLUMNS.items() if predictions[c].notna().any()}
    counts = tidy.loc[~tidy["pathology"].isin(predicted), "pathology"].value_counts()
    summary.not_predicted = {str(k): int(v) for k, v in counts.items()}

    lineage = _slice_frame(lake, settings, predictions, slices, versions)
    now = datetime.now(UTC)
    rows: list[dict[str, Any]] = []
    base = {
        "evaluation_id": summary.evaluation_id,
        "run_id": run_id,
        "threshold_rule": str(parsed_rule),
        "n_bootstrap": n_bootstrap,
        "labels_uri": labels.uri,
        "labels_sha256": labels.sha256,
        "labels_key": key,
        "uncertain": uncertain,
        "predictions_version": version,
        "evaluated_at": now,
    }
    for model_id, per_model in predictions.groupby("model_id", sort=True):
        per_model = per_model.merge(lineage, on=["image_id", "model_id"], how="left") if slices else per_model
        for pathology, column in PATHOLOGY_COLUMNS.items():
            scored = per_model[per_model[column].notna()]
            if scored.empty:
                continue  # the model does not predict this pathology
            truth = tidy.loc[tidy["pathology"] == pathology, ["image_id", "label"]]
            joined = scored.merge(truth, on="image_id", how="left")
            groups: list[tuple[str, str, pd.DataFrame]] = [("all", "all", joined)]
            for s in slices:
                values = joined[s].astype("string").fillna("null")
                groups += [(s, str(v), g) for v, g in joined.groupby(values, sort=True)]
            for slice_name, slice_value, g in groups:
                row = _metrics_row(g, column, parsed_rule, n_bootstrap=n_bootstrap, seed=seed)
                if row["null_reason"]:
                    summary.null_auroc[row["null_reason"]] = summary.null_auroc.get(row["null_reason"], 0) + 1
                rows.append(
                    {
                        **base,
                        **row,
                        "model_id": model_id,
                        "pathology": pathology,
                        "prediction_column": column,
                        "slice": slice_name,
                        "slice_value": slice_value,
                    }
                )
    table = _arrow(rows, EVALUATION)
    summary.rows_written = delta_rs.merge_insert_new(lake, EVALUATION, table, settings)
    if calibrate:
        summary.thresholds_written, summary.thresholds_version = _write_thresholds(lake, settings, rows, now)
    storage.write_text(
        storage.evaluation_summary_uri(lake, summary.evaluation_id),
        json.dumps(summary.to_dict(), indent=2, sort_keys=True),
        settings,
        content_type="application/json",
    )
    log.info(
        "evaluation %s: %d rows; %d of %d label keys matched (%d unmatched, %d ambiguous)",
        summary.evaluation_id,
        summary.rows_written,
        summary.matched_keys,
        summary.label_keys,
        summary.unmatched_keys,
        summary.ambiguous_keys,
    )
    return summary


# --- steps ------------------------------------------------------------------------------------------
def _versions(lake: str, settings: Settings, *, published: bool) -> dict[str, int | None]:
    """The version of predictions, tensors and files to read: the published ones, or the latest (None)."""
    from lakehouse.publish import NothingPublishedError, reader_versions

    try:
        versions = reader_versions(lake, settings, published=published)
    except NothingPublishedError:
        versions = {}
    for name in ("predictions", "tensors"):
        if name not in versions:
            raise CxrError(
                f"no published {name} in {lake}: evaluate after the publish step (cxr publish), "
                "or pass published=False (cxr evaluate --unpublished) to evaluate the latest, unaudited predictions"
            )
    return {name: versions.get(name) for name in ("predictions", "tensors", "files")}


def _read_predictions(
    lake: str, settings: Settings, *, models: Sequence[str] | None, run_id: str | None, version: int | None
) -> tuple[pd.DataFrame, int]:
    """The probabilities (image_id, model_id, one column per pathology) to evaluate, and the version read."""
    from deltalake.exceptions import TableNotFoundError

    from lakehouse.delta_rs import open_table

    try:
        dt = open_table(lake, PREDICTIONS, settings, version=version)
    except TableNotFoundError:
        raise CxrError(f"no predictions table under {lake}: run `cxr infer` first") from None
    columns = ["image_id", "model_id", "run_id", "device", "weights_sha256", *PATHOLOGY_COLUMNS.values()]
    frame = dt.to_pyarrow_table(columns=columns).to_pandas()
    if run_id:
        frame = frame[frame["run_id"] == run_id]
    if models:
        frame = frame[frame["model_id"].isin(list(models))]
    if frame.empty:
        what = " and ".join(
            x for x in (f"run {run_id}" if run_id else "", f"models {list(models or [])}" if models else "") if x
        )
        raise CxrError(f"no predictions to evaluate in {lake}" + (f" for {what}" if what else ""))
    return frame.reset_index(drop=True), int(dt.version())


def _key_to_image(
    lake: str, settings: Settings, key: str, keys: pd.Series, versions: dict[str, int | None]
) -> tuple[dict[str, str], int]:
    """Label key -> image_id, and the number of keys matching more than one image (left out)."""
    from lakehouse.delta_rs import read_arrow

    v = versions.get("tensors")
    if key == "image_id":
        ids = set(read_arrow(lake, TENSORS, settings, columns=["image_id"], version=v).column("image_id").to_pylist())
        return {k: k for k in keys if k in ids}, 0
    if key == "sop_instance_uid":
        t = read_arrow(lake, TENSORS, settings, columns=["image_id", "sop_uid"], version=v).to_pandas().dropna()
        pairs = t.rename(columns={"sop_uid": "name"})
    else:
        pairs = _paths(lake, settings, versions)
        depth = {k.strip("/").count("/") + 1 for k in keys}
        frames = []
        for d in sorted(depth):
            frames.append(pairs.assign(name=pairs["path"].map(lambda p, d=d: "/".join(p.split("/")[-d:]))))
        import pandas as pd

        pairs = pd.concat(frames)[["name", "image_id"]]
        keys = keys.map(lambda k: k.strip("/"))
    candidates = pairs[pairs["name"].isin(set(keys))].drop_duplicates()
    per_name = candidates.groupby("name")["image_id"].nunique()
    ambiguous = set(per_name[per_name > 1].index)
    unique = candidates[~candidates["name"].isin(ambiguous)]
    return dict(zip(unique["name"], unique["image_id"], strict=True)), len(ambiguous)


def _paths(lake: str, settings: Settings, versions: dict[str, int | None]) -> pd.DataFrame:
    """Every (path, image_id) the lakehouse knows: the ledger's judged paths and tensors' first paths."""
    import pandas as pd
    from deltalake.exceptions import TableNotFoundError

    from lakehouse.delta_rs import read_arrow

    parts = [
        read_arrow(
            lake, TENSORS, settings, columns=["source_uri", "image_id"], version=versions.get("tensors")
        ).to_pandas()
    ]
    try:
        ledger = read_arrow(
            lake, FILES, settings, columns=["source_uri", "image_id", "outcome"], version=versions.get("files")
        ).to_pandas()
        parts.append(ledger[ledger["outcome"].isin(_IMAGE_OUTCOMES)].dropna(subset=["image_id"]))
    except TableNotFoundError:
        pass
    frame = pd.concat(parts)[["source_uri", "image_id"]].drop_duplicates()
    return pd.DataFrame({"path": frame["source_uri"].map(_plain_path), "image_id": frame["image_id"]})


def _plain_path(uri: str) -> str:
    """A source URI as a slash path (scheme and bucket kept; only its tail is ever compared)."""
    return posixpath.normpath(str(uri).replace("\\", "/"))


def _one_label_per_image(tidy: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """One label per (image, pathology): copies agreeing collapse; disagreeing ones are left out and counted."""
    per = tidy.groupby(["image_id", "pathology"])["label"].nunique()
    conflicting = per[per > 1]
    if len(conflicting):
        bad = set(conflicting.index)
        tidy = tidy[[(i, p) not in bad for i, p in zip(tidy["image_id"], tidy["pathology"], strict=True)]]
    return tidy.drop_duplicates(subset=["image_id", "pathology"]), len(conflicting)


def _slice_frame(
    lake: str, settings: Settings, predictions: pd.DataFrame, slices: Sequence[str], versions: dict[str, int | None]
) -> pd.DataFrame:
    """(image_id, model_id, slice columns) for the predictions evaluated."""
    from lakehouse.delta_rs import read_arrow

    out = predictions[["image_id", "model_id", *[s for s in slices if s not in _TENSOR_SLICES]]]
    wanted = [s for s in slices if s in _TENSOR_SLICES]
    if wanted:
        version = versions.get("tensors")
        lineage = read_arrow(lake, TENSORS, settings, columns=["image_id", *wanted], version=version).to_pandas()
        out = out.merge(lineage, on="image_id", how="left")
    return out


def _metrics_row(g: pd.DataFrame, column: str, rule: Rule, *, n_bootstrap: int, seed: int) -> dict[str, Any]:
    """The metrics of one (model, pathology, slice) group: ``label`` null = unlabeled."""
    import numpy as np

    labelled = g[g["label"].notna()]
    y = labelled["label"].to_numpy(dtype=np.int64)
    s = labelled[column].to_numpy(dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    row: dict[str, Any] = {
        "n_pos": n_pos,
        "n_neg": n_neg,
        "n_unlabeled": int(len(g) - len(labelled)),
        "null_reason": None,
    }
    if len(y) == 0:
        row["null_reason"] = "no labelled images"
    elif n_pos == 0 or n_neg == 0:
        row["null_reason"] = f"one class only ({n_pos} positive, {n_neg} negative)"
    auroc = metrics.auroc(y, s) if not row["null_reason"] else None
    low, high = (
        metrics.bootstrap_auroc_ci(y, s, n_boot=n_bootstrap, seed=seed)
        if auroc is not None and n_bootstrap
        else (None, None)
    )
    threshold = rule.threshold(y, s) if not row["null_reason"] else None
    at = metrics.confusion_at(y, s, threshold) if threshold is not None else {}
    curve = metrics.roc_on_grid(y, s) if auroc is not None else None
    band = metrics.bootstrap_roc_band(y, s, n_boot=n_bootstrap, seed=seed) if curve is not None else None
    predicted, observed, counts = metrics.calibration_bins(y, s) if len(y) else (None, None, None)
    row.update(
        roc_fpr=metrics.ROC_GRID.tolist() if curve is not None else None,
        roc_tpr=curve.tolist() if curve is not None else None,
        roc_tpr_low=band[0].tolist() if band is not None else None,
        roc_tpr_high=band[1].tolist() if band is not None else None,
        calibration_predicted=predicted,
        calibration_observed=observed,
        calibration_count=counts,
    )
    row.update(
        auroc=auroc,
        auroc_ci_low=low,
        auroc_ci_high=high,
        auprc=metrics.auprc(y, s) if n_pos else None,
        ece=metrics.ece(y, s) if len(y) else None,
        threshold=threshold,
        sensitivity=at.get("sensitivity"),
        specificity=at.get("specificity"),
        ppv=at.get("ppv"),
        npv=at.get("npv"),
    )
    return row


def _write_thresholds(lake: str, settings: Settings, rows: list[dict[str, Any]], now: datetime) -> tuple[int, int]:
    """Upsert the ``all`` slice's thresholds; return (rows written, the thresholds table's new version)."""
    from lakehouse import delta_rs

    chosen = [
        {
            "model_id": r["model_id"],
            "pathology": r["pathology"],
            "prediction_column": r["prediction_column"],
            "threshold": r["threshold"],
            "rule": r["threshold_rule"],
            "evaluation_id": r["evaluation_id"],
            "labels_sha256": r["labels_sha256"],
            "n_pos": r["n_pos"],
            "n_neg": r["n_neg"],
            "sensitivity": r["sensitivity"],
            "specificity": r["specificity"],
            "calibrated_at": now,
        }
        for r in rows
        if r["slice"] == "all" and r["threshold"] is not None
    ]
    if not chosen:
        raise CxrError("no threshold could be calibrated: every pathology lacks positive or negative labels")
    written = delta_rs.merge_upsert(lake, THRESHOLDS, _arrow(chosen, THRESHOLDS), settings)
    version = int(delta_rs.open_table(lake, THRESHOLDS, settings).version())
    log.info("thresholds: %d written, thresholds version %d", written, version)
    return written, version


def _arrow(rows: list[dict[str, Any]], spec: Any) -> pa.Table:
    import pyarrow as pa

    from lakehouse.tables import arrow_schema

    schema = arrow_schema(spec)
    return pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
