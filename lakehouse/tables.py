"""Table contracts: columns, keys and Delta table properties of ``tensors``, ``quarantine``,
``predictions``, ``files`` (the ledger of every file a run judged), ``evaluation``, ``thresholds`` and
``drift``, defined once and rendered as Arrow (delta-rs, DuckDB), Spark, Athena DDL and GX column
checks; and the tensor byte format every stage reads and writes (:func:`encode_tensor` / :func:`decode_tensor`).

Tables stay readable by Athena engine v3 and by delta-rs: reader version 1, writer version 2, no
deletion vectors, no column mapping, no VARIANT, no TIMESTAMP_NTZ (a test checks the protocol).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

#: how a tensor's values are stored (``tensors.tensor_dtype``)
TensorDtype = Literal["float16", "float32"]
#: the resize implementation (``xrv.datasets.XRayResizer(engine=...)``)
ResizeEngine = Literal["cv2", "skimage"]
TENSOR_DTYPES: tuple[str, ...] = get_args(TensorDtype)
RESIZE_ENGINES: tuple[str, ...] = get_args(ResizeEngine)
#: the numpy dtype (little-endian) of each storage dtype; its itemsize is the bytes per value
NUMPY_DTYPES: dict[str, str] = {"float16": "<f2", "float32": "<f4"}

#: appended to a model id whose predictions come from a random-init stand-in (no weights): marked in every row
UNTRAINED_SUFFIX = "+untrained-random-init"


@dataclass(frozen=True)
class Column:
    """One column of a table contract. ``type`` is a Spark SQL type name (also rendered for Arrow)."""

    name: str
    type: str
    nullable: bool = True
    doc: str = ""


@dataclass(frozen=True)
class TableSpec:
    """A table's contract: its name, merge key, columns and Delta properties."""

    name: str
    key: tuple[str, ...]
    columns: tuple[Column, ...]
    properties: tuple[tuple[str, str], ...]

    @property
    def column_names(self) -> list[str]:
        """Column names in contract order."""
        return [c.name for c in self.columns]


#: Delta properties of every table: the protocol Athena v3 and delta-rs read.
READABLE_PROTOCOL: tuple[tuple[str, str], ...] = (
    ("delta.minReaderVersion", "1"),
    ("delta.minWriterVersion", "2"),
    ("delta.enableDeletionVectors", "false"),
    ("delta.enableChangeDataFeed", "false"),
    ("delta.appendOnly", "false"),
)

DIRECT_IDENTIFIERS = (
    "patient_name",
    "patient_id",
    "patient_birth_date",
    "patient_address",
    "other_patient_ids",
    "accession_number",
    "institution_name",
    "referring_physician_name",
)

TENSORS = TableSpec(
    name="tensors",
    key=("image_id",),
    columns=(
        Column("image_id", "string", False, "sha256 hex of the source file's bytes"),
        Column("tensor", "binary", False, "C-order little-endian values of tensor_dtype"),
        Column("tensor_dtype", "string", False, "'float16' or 'float32'"),
        Column("tensor_shape", "array<int>", False, "e.g. [1, 224, 224]"),
        Column("tensor_min", "float", True, "minimum stored value (on the [-1024, 1024] scale)"),
        Column("tensor_max", "float", True, "maximum stored value"),
        Column("source_uri", "string", False, "first path the bytes were found under"),
        Column("source_bytes", "bigint", False, "size of the source file"),
        Column("source_modified_at", "timestamp", True, "modification time of the source file"),
        Column("source_format", "string", False, "png, jpeg or dicom"),
        Column("width", "int", False, "original width in pixels"),
        Column("height", "int", False, "original height in pixels"),
        Column("bits_stored", "int", False, "bit depth the normalisation used (maxval = 2**bits - 1)"),
        Column("photometric", "string", True, "DICOM PhotometricInterpretation, or PNG/JPEG colour type"),
        Column("transfer_syntax", "string", True, "DICOM transfer syntax UID"),
        Column("study_uid", "string", True),
        Column("series_uid", "string", True),
        Column("sop_uid", "string", True),
        Column("modality", "string", True),
        Column("view_position", "string", True),
        Column("manufacturer", "string", True, "DICOM Manufacturer (0008,0070)"),
        Column("site_pseudonym", "string", True, "HMAC-SHA256 of the InstitutionName with the pseudonym key"),
        Column("patient_pseudonym", "string", True, "HMAC-SHA256 of PatientID with the secret pseudonym key"),
        Column("preprocess_version", "string", False),
        Column("preprocess_params", "string", False, "JSON: size, resize engine, dtype, library versions"),
        Column("run_id", "string", False),
        Column("ingested_at", "timestamp", False),
    ),
    properties=READABLE_PROTOCOL,
)

QUARANTINE = TableSpec(
    name="quarantine",
    key=("source_uri", "content_sha256", "error_class"),
    columns=(
        Column("source_uri", "string", False),
        Column("content_sha256", "string", True, "null when the bytes could not be read"),
        Column("source_bytes", "bigint", True),
        Column("stage", "string", False, "the stage that refused the input, e.g. 'preprocess'"),
        Column("error_class", "string", False, "class name of the error, e.g. DecodeError"),
        Column("error_message", "string", False, "what is wrong and what to do about it"),
        Column("run_id", "string", False),
        Column("quarantined_at", "timestamp", False),
    ),
    properties=READABLE_PROTOCOL,
)

#: what a preprocessing run decided about one file (``files.outcome``)
FileOutcome = Literal["new", "already_present", "duplicate", "skipped", "quarantined", "retryable", "requeued"]
FILE_OUTCOMES: tuple[str, ...] = get_args(FileOutcome)
#: outcomes after which a file is judged again by the next run (until then it is not read again)
REJUDGED_OUTCOMES: tuple[str, ...] = ("retryable", "requeued")

FILES = TableSpec(
    name="files",
    key=("source_uri",),
    columns=(
        Column("source_uri", "string", False, "the file's path (one row per path: its latest judgement)"),
        Column("source_bytes", "bigint", False, "size when judged (-1: a dangling link)"),
        Column("source_mtime_ms", "bigint", False, "modification time when judged, ms since the epoch"),
        Column("outcome", "string", False, ", ".join(FILE_OUTCOMES)),
        Column("image_id", "string", True, "sha256 of the bytes; null when they were not read or not readable"),
        Column("duplicate_of", "string", True, "for a duplicate: the path whose row is in tensors"),
        Column("reason_class", "string", True, "why skipped / quarantined / retryable, e.g. ModalityNotAllowed"),
        Column("reason", "string", True, "the reason in words"),
        Column("run_id", "string", False, "the preprocessing run that judged the file"),
        Column("judged_at", "timestamp", False),
    ),
    properties=READABLE_PROTOCOL,
)

#: TorchXRayVision's default pathologies -> prediction column names (snake_case)
PATHOLOGY_COLUMNS: dict[str, str] = {
    "Atelectasis": "atelectasis",
    "Consolidation": "consolidation",
    "Infiltration": "infiltration",
    "Pneumothorax": "pneumothorax",
    "Edema": "edema",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Effusion": "effusion",
    "Pneumonia": "pneumonia",
    "Pleural_Thickening": "pleural_thickening",
    "Cardiomegaly": "cardiomegaly",
    "Nodule": "nodule",
    "Mass": "mass",
    "Hernia": "hernia",
    "Lung Lesion": "lung_lesion",
    "Fracture": "fracture",
    "Lung Opacity": "lung_opacity",
    "Enlarged Cardiomediastinum": "enlarged_cardiomediastinum",
}

PREDICTIONS = TableSpec(
    name="predictions",
    key=("image_id", "model_id"),
    columns=(
        Column("image_id", "string", False, "tensors.image_id the prediction is for"),
        Column("model_id", "string", False, "xrv weights name; '+untrained-random-init' marks a stand-in"),
        Column("weights_sha256", "string", False, "sha256 of the weights file loaded ('none:...' for a stand-in)"),
        Column("weights_source", "string", False, "weights-dir, uri, xrv-cache, download or untrained"),
        *(
            Column(c, "float", True, f"calibrated output for {name}; null when the model lacks it")
            for name, c in PATHOLOGY_COLUMNS.items()
        ),
        Column("tensors_version", "bigint", False, "Delta version of tensors that was read"),
        Column("run_id", "string", False),
        Column("predicted_at", "timestamp", False),
        Column("device", "string", False, "cpu or cuda device name"),
        Column("torch_version", "string", False),
        Column("xrv_version", "string", False),
        *(
            Column(d, "boolean", True, f"{c} >= the site threshold; null without thresholds (cxr infer --thresholds)")
            for c, d in {c: f"positive_{c}" for c in PATHOLOGY_COLUMNS.values()}.items()
        ),
        Column("thresholds_version", "bigint", True, "Delta version of thresholds applied; null: none"),
    ),
    properties=READABLE_PROTOCOL,
)

#: the decision column of each pathology (``positive_<pathology>``) when inference applies thresholds
DECISION_COLUMNS: dict[str, str] = {c: f"positive_{c}" for c in PATHOLOGY_COLUMNS.values()}

EVALUATION = TableSpec(
    name="evaluation",
    key=("evaluation_id", "model_id", "pathology", "slice", "slice_value"),
    columns=(
        Column("evaluation_id", "string", False, "one `cxr evaluate` call"),
        Column("run_id", "string", True, "the inference run evaluated; null: every run's predictions"),
        Column("model_id", "string", False),
        Column("pathology", "string", False, "TorchXRayVision target name, e.g. Effusion"),
        Column("prediction_column", "string", False, "the predictions column, e.g. effusion"),
        Column("slice", "string", False, "'all', or the tensors/predictions column sliced by"),
        Column("slice_value", "string", False, "'all', or the slice's value ('null' for missing)"),
        Column("n_pos", "bigint", False, "labelled positive images with a prediction"),
        Column("n_neg", "bigint", False, "labelled negative images with a prediction"),
        Column("n_unlabeled", "bigint", False, "images with a prediction but no label for this pathology"),
        Column("auroc", "double", True, "Mann-Whitney AUROC (ties count half); null with null_reason"),
        Column("auroc_ci_low", "double", True, "percentile bootstrap CI (fixed seed)"),
        Column("auroc_ci_high", "double", True),
        Column("auprc", "double", True, "average precision"),
        Column("ece", "double", True, "expected calibration error, 10 equal-width bins"),
        Column("threshold", "double", True, "operating point from threshold_rule"),
        Column("threshold_rule", "string", False, "youden, or sensitivity=<target>"),
        Column("sensitivity", "double", True, "at threshold (positive: probability >= threshold)"),
        Column("specificity", "double", True),
        Column("ppv", "double", True),
        Column("npv", "double", True),
        Column("null_reason", "string", True, "why auroc is null (one class only, no labels)"),
        Column("roc_fpr", "array<double>", True, "false-positive rates the ROC curve is given at (0, 0.02, ..., 1)"),
        Column("roc_tpr", "array<double>", True, "true-positive rate at each roc_fpr (highest TPR with FPR <= it)"),
        Column("roc_tpr_low", "array<double>", True, "pointwise bootstrap band of roc_tpr (same resamples count)"),
        Column("roc_tpr_high", "array<double>", True),
        Column("calibration_predicted", "array<double>", True, "mean probability per ECE bin (null: empty)"),
        Column("calibration_observed", "array<double>", True, "observed positive rate per ECE bin"),
        Column("calibration_count", "array<bigint>", True, "labelled images per ECE bin"),
        Column("n_bootstrap", "int", False),
        Column("labels_uri", "string", False),
        Column("labels_sha256", "string", False),
        Column("labels_key", "string", False, "image_id, file_name or sop_instance_uid"),
        Column("uncertain", "string", False, "how CheXpert-style -1 labels were taken: ignore, positive, negative"),
        Column("predictions_version", "bigint", False, "Delta version of predictions read"),
        Column("evaluated_at", "timestamp", False),
    ),
    properties=READABLE_PROTOCOL,
)

THRESHOLDS = TableSpec(
    name="thresholds",
    key=("model_id", "pathology"),
    columns=(
        Column("model_id", "string", False),
        Column("pathology", "string", False, "TorchXRayVision target name"),
        Column("prediction_column", "string", False, "the predictions column"),
        Column("threshold", "double", False, "positive when probability >= threshold"),
        Column("rule", "string", False, "youden, or sensitivity=<target>"),
        Column("evaluation_id", "string", False, "the evaluation the threshold was calibrated on"),
        Column("labels_sha256", "string", False),
        Column("n_pos", "bigint", False),
        Column("n_neg", "bigint", False),
        Column("sensitivity", "double", True, "on the calibration labels"),
        Column("specificity", "double", True),
        Column("calibrated_at", "timestamp", False),
    ),
    properties=READABLE_PROTOCOL,
)

#: drift verdicts (``drift.status``): fail gates publishing
DriftStatus = Literal["pass", "fail", "info", "insufficient", "no_reference"]
DRIFT_STATUSES: tuple[str, ...] = get_args(DriftStatus)

DRIFT = TableSpec(
    name="drift",
    key=("run_id", "model_id", "feature", "metric"),
    columns=(
        Column("run_id", "string", False, "the inference run checked"),
        Column("reference_run_id", "string", True, "the inference run compared with; null: none yet"),
        Column("model_id", "string", False, "'' for input statistics (from tensors)"),
        Column("feature", "string", False, "a prediction column, or input.<statistic> / input.<lineage column>"),
        Column("metric", "string", False, "psi, ks, positive_rate, mean, std, p05, p50, p95"),
        Column("value", "double", True, "on this run"),
        Column("reference_value", "double", True, "the same metric on the reference run"),
        Column("threshold", "double", True, "the gate: max(CXR_DRIFT_MAX_PSI, sampling-noise PSI); null: not gated"),
        Column("status", "string", False, ", ".join(DRIFT_STATUSES)),
        Column("n", "bigint", False, "images of this run"),
        Column("n_reference", "bigint", False, "images of the reference sample"),
        Column("computed_at", "timestamp", False),
    ),
    properties=READABLE_PROTOCOL,
)

#: every table of the lakehouse by name: the one list of table names (``TABLE_NAMES``) derives from it
SPECS: dict[str, TableSpec] = {
    s.name: s for s in (TENSORS, QUARANTINE, PREDICTIONS, FILES, EVALUATION, THRESHOLDS, DRIFT)
}
TABLE_NAMES: tuple[str, ...] = tuple(SPECS)

#: the index of run summaries (``lakehouse.runs``): one row per summary written, so that readers find
#: runs without listing and reading every JSON under ``runs/``. Operational metadata: not audited, not
#: published, not an Athena table (the JSON files stay the human-readable copy).
RUN_INDEX = TableSpec(
    name="run_index",
    key=("name",),
    columns=(
        Column("name", "string", False, "the summary's file name under runs/, without .json"),
        Column("run_id", "string", False),
        Column("kind", "string", False, "preprocess or infer"),
        Column("uri", "string", False, "the JSON copy of the summary"),
        Column("written_at", "timestamp", False, "when the summary was written"),
        Column("body", "string", False, "the summary, as JSON"),
    ),
    properties=READABLE_PROTOCOL,
)
#: tables the pipeline keeps for itself (outside ``SPECS``: no suite, no publishing, no SQL)
INTERNAL_SPECS: dict[str, TableSpec] = {RUN_INDEX.name: RUN_INDEX}


def spec(name: str) -> TableSpec:
    """The contract of table ``name``.

    Raises:
        KeyError: naming the known tables, for an unknown name.
    """
    try:
        return SPECS[name]
    except KeyError:
        raise KeyError(f"unknown table {name!r}: expected one of {TABLE_NAMES}") from None


def arrow_type(type_name: str) -> pa.DataType:
    """The Arrow type of a contract type name."""
    import pyarrow as pa

    simple = {
        "string": pa.string(),
        "binary": pa.binary(),
        "int": pa.int32(),
        "bigint": pa.int64(),
        "float": pa.float32(),
        "double": pa.float64(),
        "boolean": pa.bool_(),
        "timestamp": pa.timestamp("us", tz="UTC"),
    }
    if type_name in simple:
        return simple[type_name]
    if type_name.startswith("array<") and type_name.endswith(">"):
        return pa.list_(arrow_type(type_name[6:-1]))
    raise ValueError(f"unsupported contract type {type_name!r}")


def arrow_schema(spec: TableSpec) -> pa.Schema:
    """The table's Arrow schema (what delta-rs and DuckDB see)."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field(c.name, arrow_type(c.type), nullable=c.nullable, metadata={"comment": c.doc} if c.doc else None)
            for c in spec.columns
        ]
    )


# --- the tensor byte format -----------------------------------------------------------------------------
def encode_tensor(tensor: np.ndarray, dtype: TensorDtype) -> bytes:
    """C-order little-endian bytes of the tensor in the storage dtype (``tensors.tensor``)."""
    import numpy as np

    return np.ascontiguousarray(tensor, dtype=NUMPY_DTYPES[dtype]).tobytes()


def decode_tensor(blob: bytes, dtype: str, shape: list[int] | tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`encode_tensor`, as float32."""
    import numpy as np

    return np.frombuffer(blob, dtype=NUMPY_DTYPES[dtype]).reshape(tuple(shape)).astype(np.float32)
