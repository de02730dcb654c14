"""SQL over the lakehouse: every saved query on a tiny lakehouse with hand-computed answers, the
``cxr query`` command (formats, errors), the Athena DDL and saved-query SQL, and a query over S3."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cxr.cli import main
from cxr.sql import (
    SAVED_QUERIES,
    Param,
    _literal,
    athena_ddl,
    athena_saved_query_sql,
    connect,
    query,
    run_saved,
    saved_query_sql,
)
from lakehouse.config import Settings, load_settings
from lakehouse.errors import QueryError
from lakehouse.publish import publish
from lakehouse.tables import (
    DRIFT,
    EVALUATION,
    PATHOLOGY_COLUMNS,
    PREDICTIONS,
    QUARANTINE,
    TABLE_NAMES,
    TENSORS,
    THRESHOLDS,
    arrow_schema,
    spec,
)
from tests.conftest import make_bucket, upload_dir

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
M1, M2 = "model-a", "model-b"


def f32(x: float) -> float:
    """The float32 value a REAL column holds for ``x``, as Python prints it back (shortest repr)."""
    return float(str(np.float32(x)))


# image_id -> (study_uid, view_position, source_format, source_bytes, run_id)
TENSOR_ROWS = {
    "ia": ("S1", "PA", "dicom", 100, "r1"),
    "ib": ("S1", "LL", "dicom", 200, "r1"),
    "ic": ("S2", "AP", "dicom", 300, "r2"),
    "id": (None, None, "png", 50, "r1"),
}
# (model_id, image_id) -> the non-null probabilities; every other pathology is null
PREDICTION_ROWS: dict[tuple[str, str], dict[str, float | None]] = {
    (M1, "ia"): {"atelectasis": 0.5, "cardiomegaly": 0.9, "edema": 0.1},
    (M1, "ib"): {"atelectasis": 0.49, "cardiomegaly": 0.6, "edema": None},
    (M1, "ic"): {"atelectasis": 0.7, "cardiomegaly": 0.5, "edema": 0.3},
    (M1, "id"): {"atelectasis": 0.1, "cardiomegaly": 0.1, "edema": 0.6},
    (M2, "ia"): {"atelectasis": 0.8},
    (M2, "ic"): {"atelectasis": 0.2},
}
# (source_uri, error_class, run_id)
QUARANTINE_ROWS = [
    ("in/q1.dcm", "DecodeError", "r1"),
    ("in/q2.dcm", "DecodeError", "r1"),
    ("in/q3.png", "EmptyFileError", "r1"),
    ("in/q4.dcm", "DecodeError", "r2"),
    ("in/q5.txt", "UnsupportedFormatError", "r2"),
]


def _tensor_row(image_id: str) -> dict[str, Any]:
    study, view, fmt, size, run = TENSOR_ROWS[image_id]
    blob = np.arange(4, dtype="<f2").tobytes()
    return {
        "image_id": image_id,
        "tensor": blob,
        "tensor_dtype": "float16",
        "tensor_shape": [1, 2, 2],
        "tensor_min": 0.0,
        "tensor_max": 3.0,
        "source_uri": f"in/{image_id}.{'dcm' if fmt == 'dicom' else fmt}",
        "source_bytes": size,
        "source_modified_at": None,
        "source_format": fmt,
        "width": 2,
        "height": 2,
        "bits_stored": 8,
        "photometric": "MONOCHROME2" if fmt == "dicom" else "GRAY",
        "transfer_syntax": None,
        "study_uid": study,
        "series_uid": None,
        "sop_uid": None,
        "modality": "DX" if fmt == "dicom" else None,
        "view_position": view,
        "patient_pseudonym": None,
        "preprocess_version": "1",
        "preprocess_params": "{}",
        "run_id": run,
        "ingested_at": NOW,
    }


def _prediction_row(model_id: str, image_id: str) -> dict[str, Any]:
    row: dict[str, Any] = {c: None for c in PATHOLOGY_COLUMNS.values()}
    row.update(PREDICTION_ROWS[(model_id, image_id)])
    row.update(
        image_id=image_id,
        model_id=model_id,
        weights_sha256="0" * 64,
        weights_source="weights-dir",
        tensors_version=1,
        run_id="inf-1",
        predicted_at=NOW,
        device="cpu",
        torch_version="2",
        xrv_version="1",
    )
    return row


# (model_id, prediction column) -> site threshold
THRESHOLD_ROWS = {(M1, "atelectasis"): 0.45, (M1, "cardiomegaly"): 0.95, (M2, "atelectasis"): 0.1}


def _threshold_row(model_id: str, column: str, threshold: float) -> dict[str, Any]:
    return {
        "model_id": model_id,
        "pathology": column.capitalize(),
        "prediction_column": column,
        "threshold": threshold,
        "rule": "youden",
        "evaluation_id": "ev-2",
        "labels_sha256": "f" * 64,
        "n_pos": 3,
        "n_neg": 5,
        "sensitivity": 1.0,
        "specificity": 0.8,
        "calibrated_at": NOW,
    }


# (evaluation_id, model_id, pathology, slice, slice_value, auroc, null_reason)
EVALUATION_ROWS = [
    ("ev-1", M1, "Atelectasis", "all", "all", 0.55, None),
    ("ev-2", M1, "Atelectasis", "all", "all", 0.75, None),
    ("ev-2", M1, "Atelectasis", "view_position", "PA", 1.0, None),
    ("ev-2", M1, "Cardiomegaly", "all", "all", None, "one class only (0 positive, 4 negative)"),
    ("ev-2", M2, "Atelectasis", "all", "all", 0.9, None),
]


def _evaluation_row(
    ev: str, model_id: str, pathology: str, slice_: str, value: str, auroc: float | None, reason: str | None
) -> dict[str, Any]:
    at = NOW if ev == "ev-2" else datetime(2025, 12, 31, tzinfo=UTC)  # ev-1 is the earlier evaluation
    return {
        "evaluation_id": ev,
        "model_id": model_id,
        "pathology": pathology,
        "prediction_column": pathology.lower(),
        "slice": slice_,
        "slice_value": value,
        "n_pos": 2 if auroc is not None else 0,
        "n_neg": 2 if auroc is not None else 4,
        "n_unlabeled": 0,
        "auroc": auroc,
        "threshold_rule": "youden",
        "null_reason": reason,
        "n_bootstrap": 0,
        "labels_uri": "labels.csv",
        "labels_sha256": "f" * 64,
        "labels_key": "image_id",
        "uncertain": "ignore",
        "predictions_version": 1,
        "evaluated_at": at,
    }


# (run_id, model_id, feature, metric, value, status, computed_at)
LATER = datetime(2026, 1, 3, tzinfo=UTC)
DRIFT_ROWS = [
    ("inf-0", M1, "atelectasis", "psi", 0.9, "fail", NOW),
    ("inf-1", M1, "atelectasis", "psi", 0.1, "pass", LATER),
    ("inf-1", M1, "atelectasis", "positive_rate", 0.5, "info", LATER),
    ("inf-1", "", "input.mean", "psi", 0.4, "fail", LATER),
]


def _drift_row(
    run: str, model_id: str, feature: str, metric: str, value: float, status: str, at: datetime
) -> dict[str, Any]:
    gated = metric == "psi"
    return {
        "run_id": run,
        "reference_run_id": "inf-0" if run != "inf-0" else None,
        "model_id": model_id,
        "feature": feature,
        "metric": metric,
        "value": value,
        "reference_value": None,
        "threshold": 0.25 if gated else None,
        "status": status,
        "n": 100,
        "n_reference": 200,
        "computed_at": at,
    }


def _write(lake: Path, spec: Any, rows: list[dict[str, Any]], settings: Settings) -> None:
    import pyarrow as pa
    from deltalake import write_deltalake

    from lakehouse.delta_rs import ensure_table

    ensure_table(str(lake), spec, settings)
    write_deltalake(str(lake / spec.name), pa.Table.from_pylist(rows, schema=arrow_schema(spec)), mode="append")


def _build(lake: Path, *, with_predictions: bool = True, with_quarantine: bool = True) -> Path:
    settings = Settings()
    _write(lake, TENSORS, [_tensor_row(i) for i in TENSOR_ROWS], settings)
    if with_predictions:
        _write(lake, PREDICTIONS, [_prediction_row(m, i) for m, i in PREDICTION_ROWS], settings)
        _write(lake, THRESHOLDS, [_threshold_row(m, c, t) for (m, c), t in THRESHOLD_ROWS.items()], settings)
        _write(lake, EVALUATION, [_evaluation_row(*r) for r in EVALUATION_ROWS], settings)
        _write(lake, DRIFT, [_drift_row(*r) for r in DRIFT_ROWS], settings)
    if with_quarantine:
        rows = [
            {
                "source_uri": uri,
                "content_sha256": None,
                "source_bytes": 1,
                "stage": "preprocess",
                "error_class": cls,
                "error_message": f"{cls} in {uri}",
                "run_id": run,
                "quarantined_at": NOW,
            }
            for uri, cls, run in QUARANTINE_ROWS
        ]
        _write(lake, QUARANTINE, rows, settings)
    publish(str(lake), settings, run_id="test")
    return lake


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny lakehouse above (read-only)."""
    return _build(tmp_path_factory.mktemp("sql") / "lake")


@pytest.fixture(scope="module")
def tensors_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tensors, no predictions and no quarantine table."""
    return _build(tmp_path_factory.mktemp("sql") / "lake", with_predictions=False, with_quarantine=False)


def _positives(expected: dict[tuple[str, str], tuple[int, int]]) -> list[dict[str, Any]]:
    """One row per model x pathology: the listed (positive, scored) counts, (0, 0) for the rest."""
    return [
        {
            "model_id": m,
            "pathology": p,
            "positive": expected.get((m, p), (0, 0))[0],
            "scored": expected.get((m, p), (0, 0))[1],
        }
        for m in (M1, M2)
        for p in sorted(PATHOLOGY_COLUMNS.values())
    ]


def _study(study: str, model: str, images: int, findings: int, top: float) -> dict[str, Any]:
    return {
        "study_uid": study,
        "model_id": model,
        "positive_images": images,
        "positive_findings": findings,
        "max_probability": f32(top),
    }


def _view(view: str | None, model: str, pathology: str, scored: int, positive: int) -> dict[str, Any]:
    return {"view_position": view, "model_id": model, "pathology": pathology, "scored": scored, "positive": positive}


def _top(model: str, image: str, p: float) -> dict[str, Any]:
    study, view, fmt, _, _ = TENSOR_ROWS[image]
    return {
        "model_id": model,
        "image_id": image,
        "probability": f32(p),
        "study_uid": study,
        "view_position": view,
        "source_format": fmt,
        "source_uri": f"in/{image}.{'dcm' if fmt == 'dicom' else fmt}",
    }


#: saved query -> [(params, expected rows)], computed by hand from the rows above.
EXPECTED: dict[str, list[tuple[dict[str, Any], list[dict[str, Any]]]]] = {
    "positives_per_pathology": [
        # 0.5 exactly (ia atelectasis, ic cardiomegaly) counts; 0.49 does not; null edema is not scored
        (
            {},
            _positives(
                {
                    (M1, "atelectasis"): (2, 4),
                    (M1, "cardiomegaly"): (3, 4),
                    (M1, "edema"): (1, 3),
                    (M2, "atelectasis"): (1, 2),
                }
            ),
        ),
        (
            {"threshold": 0.75},
            _positives(
                {
                    (M1, "atelectasis"): (0, 4),
                    (M1, "cardiomegaly"): (1, 4),
                    (M1, "edema"): (0, 3),
                    (M2, "atelectasis"): (1, 2),
                }
            ),
        ),
    ],
    "studies_with_findings": [
        # id (no study) has edema 0.6 but is not a study; S2 under model-b has only 0.2
        ({}, [_study("S1", M1, 2, 3, 0.9), _study("S1", M2, 1, 1, 0.8), _study("S2", M1, 1, 2, 0.7)]),
        ({"threshold": "0.75"}, [_study("S1", M1, 1, 1, 0.9), _study("S1", M2, 1, 1, 0.8)]),
    ],
    "findings_by_view_position": [
        (
            {},
            [
                _view("AP", M1, "atelectasis", 1, 1),
                _view("AP", M1, "cardiomegaly", 1, 1),
                _view("AP", M1, "edema", 1, 0),
                _view("AP", M2, "atelectasis", 1, 0),
                _view("LL", M1, "atelectasis", 1, 0),
                _view("LL", M1, "cardiomegaly", 1, 1),
                _view("PA", M1, "atelectasis", 1, 1),
                _view("PA", M1, "cardiomegaly", 1, 1),
                _view("PA", M1, "edema", 1, 0),
                _view("PA", M2, "atelectasis", 1, 1),
                _view(None, M1, "atelectasis", 1, 0),
                _view(None, M1, "cardiomegaly", 1, 0),
                _view(None, M1, "edema", 1, 1),
            ],
        ),
    ],
    "quarantine_reasons": [
        (
            {},
            [
                {"run_id": "r1", "stage": "preprocess", "error_class": "DecodeError", "files": 2},
                {"run_id": "r1", "stage": "preprocess", "error_class": "EmptyFileError", "files": 1},
                {"run_id": "r2", "stage": "preprocess", "error_class": "DecodeError", "files": 1},
                {"run_id": "r2", "stage": "preprocess", "error_class": "UnsupportedFormatError", "files": 1},
            ],
        ),
    ],
    "images_per_format": [
        (
            {},
            [
                {"run_id": "r1", "source_format": "dicom", "images": 2, "source_bytes": 300},
                {"run_id": "r1", "source_format": "png", "images": 1, "source_bytes": 50},
                {"run_id": "r2", "source_format": "dicom", "images": 1, "source_bytes": 300},
            ],
        ),
    ],
    "prediction_coverage": [
        (
            {},
            [
                {"model_id": M1, "tensors": 4, "predicted": 4, "missing": 0},
                {"model_id": M2, "tensors": 4, "predicted": 2, "missing": 2},
            ],
        ),
    ],
    "top_images": [
        (
            {"pathology": "cardiomegaly"},
            [_top(M1, "ia", 0.9), _top(M1, "ib", 0.6), _top(M1, "ic", 0.5), _top(M1, "id", 0.1)],
        ),
        ({"pathology": "atelectasis", "limit": 3}, [_top(M2, "ia", 0.8), _top(M1, "ic", 0.7), _top(M1, "ia", 0.5)]),
        ({"pathology": "edema", "limit": "1"}, [_top(M1, "id", 0.6)]),
    ],
}


def _decision(model: str, pathology: str, threshold: float, scored: int, site: int, fixed: int) -> dict[str, Any]:
    return {
        "model_id": model,
        "pathology": pathology,
        "threshold": threshold,
        "rule": "youden",
        "scored": scored,
        "positive_at_site_threshold": site,
        "positive_at_fixed_threshold": fixed,
    }


def _summary(model: str, pathology: str, auroc: float | None, reason: str | None) -> dict[str, Any]:
    row = _evaluation_row("ev-2", model, pathology, "all", "all", auroc, reason)
    keep = ("model_id", "pathology", "n_pos", "n_neg", "n_unlabeled", "auroc")
    out = {k: row[k] for k in keep}
    out.update(auroc_ci_low=None, auroc_ci_high=None, auprc=None, ece=None, threshold=None, threshold_rule="youden")
    out.update(sensitivity=None, specificity=None, null_reason=reason)
    return out


def _drift(model: str, feature: str, metric: str, value: float, status: str) -> dict[str, Any]:
    row = _drift_row("inf-1", model, feature, metric, value, status, LATER)
    return {
        k: row[k]
        for k in (
            "run_id",
            "reference_run_id",
            "model_id",
            "feature",
            "metric",
            "value",
            "reference_value",
            "threshold",
            "status",
            "n",
            "n_reference",
        )
    }


EXPECTED.update(
    {
        # M1 atelectasis 0.5, 0.49, 0.7, 0.1 at 0.45 -> 3; cardiomegaly 0.9, 0.6, 0.5, 0.1 at 0.95 -> 0;
        # M2 atelectasis 0.8, 0.2 at 0.1 -> 2; edema has no threshold: not listed
        "decisions": [
            (
                {},
                [
                    _decision(M1, "atelectasis", 0.45, 4, 3, 2),
                    _decision(M1, "cardiomegaly", 0.95, 4, 0, 3),
                    _decision(M2, "atelectasis", 0.1, 2, 2, 1),
                ],
            ),
            (
                {"threshold": 0.8},
                [
                    _decision(M1, "atelectasis", 0.45, 4, 3, 0),
                    _decision(M1, "cardiomegaly", 0.95, 4, 0, 1),
                    _decision(M2, "atelectasis", 0.1, 2, 2, 1),
                ],
            ),
        ],
        # cardiomegaly: M1 has a threshold (0.95), M2 predicts none; 0.9 < 0.95 is not positive
        "decisions_by_image": [
            (
                {"pathology": "cardiomegaly"},
                [
                    {"image_id": i, "model_id": M1, "probability": f32(p), "threshold": 0.95, "positive": False}
                    for i, p in (("ia", 0.9), ("ib", 0.6), ("ic", 0.5), ("id", 0.1))
                ],
            ),
            (
                {"pathology": "atelectasis", "limit": 3},
                [
                    {"image_id": "ia", "model_id": M2, "probability": f32(0.8), "threshold": 0.1, "positive": True},
                    {"image_id": "ic", "model_id": M1, "probability": f32(0.7), "threshold": 0.45, "positive": True},
                    {"image_id": "ia", "model_id": M1, "probability": f32(0.5), "threshold": 0.45, "positive": True},
                ],
            ),
        ],
        # the latest evaluation (ev-2), slice all only, highest AUROC first and null last
        "evaluation_summary": [
            (
                {},
                [
                    _summary(M2, "Atelectasis", 0.9, None),
                    _summary(M1, "Atelectasis", 0.75, None),
                    _summary(M1, "Cardiomegaly", None, "one class only (0 positive, 4 negative)"),
                ],
            )
        ],
        # the latest run checked (inf-1): failed rows first
        "drift_latest": [
            (
                {},
                [
                    _drift("", "input.mean", "psi", 0.4, "fail"),
                    _drift(M1, "atelectasis", "psi", 0.1, "pass"),
                    _drift(M1, "atelectasis", "positive_rate", 0.5, "info"),
                ],
            )
        ],
    }
)

CASES = [(name, params, rows) for name, cases in EXPECTED.items() for params, rows in cases]


def _rows(table: Any) -> list[dict[str, Any]]:
    """Arrow rows with REAL (float32) values as Python prints the stored float32 back."""
    import pyarrow as pa

    floats = {f.name for f in table.schema if pa.types.is_float32(f.type)}
    return [{k: (f32(v) if k in floats and v is not None else v) for k, v in r.items()} for r in table.to_pylist()]


def test_every_saved_query_has_expected_answers() -> None:
    assert set(EXPECTED) == set(SAVED_QUERIES)
    assert all(EXPECTED[name] for name in SAVED_QUERIES)


@pytest.mark.parametrize(("name", "params", "expected"), CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_saved_query_answers(lake: Path, name: str, params: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    result = run_saved(str(lake), name, settings=Settings(), params=params)
    assert _rows(result) == expected


@pytest.mark.parametrize(("name", "params", "expected"), CASES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(CASES)])
def test_athena_sql_of_saved_queries_gives_the_same_answers(
    lake: Path, name: str, params: dict[str, Any], expected: list[dict[str, Any]]
) -> None:
    """The Athena rendering, run in DuckDB against views in a schema named like the Glue database."""
    sql = athena_saved_query_sql(name, database="cxr_test", params=params)
    tables = "|".join(TABLE_NAMES)
    assert re.search(rf"\b(FROM|JOIN)\s+({tables})\b", sql) is None  # every table qualified
    con = connect(str(lake), settings=Settings())
    try:
        con.execute("CREATE SCHEMA cxr_test")
        for t in TABLE_NAMES:
            if t != "files":  # the ledger is not in this lakehouse
                con.execute(f"CREATE VIEW cxr_test.{t} AS SELECT * FROM {t}")
        assert _rows(con.sql(sql).to_arrow_table()) == expected
    finally:
        con.close()


@pytest.mark.parametrize("name", sorted(SAVED_QUERIES))
def test_saved_queries_avoid_duckdb_only_syntax(name: str) -> None:
    """Saved queries stay in the subset Athena engine v3 (Trino) also accepts."""
    needs_pathology = name in ("top_images", "decisions_by_image")
    sql = saved_query_sql(name, params={"pathology": "edema"} if needs_pathology else None).upper()
    for token in (
        "::",
        " ILIKE ",
        "QUALIFY",
        "EXCLUDE",
        "GROUP BY ALL",
        "ORDER BY ALL",
        "STRING_AGG",
        "UNPIVOT",
        "LIST(",
        "$",
    ):
        assert token not in sql, f"{name} uses {token!r}"
    assert sql.count("(") == sql.count(")")


def test_athena_saved_query_sql_text() -> None:
    sql = athena_saved_query_sql("quarantine_reasons", database="radiology")
    assert sql == (
        "SELECT q.run_id, q.stage, q.error_class, COUNT(*) AS files\n"
        'FROM "radiology"."quarantine" AS q\n'
        "GROUP BY q.run_id, q.stage, q.error_class\n"
        "ORDER BY q.run_id, files DESC, q.error_class"
    )
    top = athena_saved_query_sql("top_images", params={"pathology": "mass", "limit": 5})
    assert "WHERE l.pathology = 'mass' AND" in top and top.endswith("LIMIT 5")
    assert '"cxr"."predictions" AS p' in top and '"cxr"."tensors" AS t' in top


def test_athena_ddl_statements() -> None:
    """Each table is declared over its published manifest, with the contract's columns (write-audit-publish)."""
    statements = athena_ddl("s3://bucket/lake/", database="radiology")
    assert statements[0] == "CREATE DATABASE IF NOT EXISTS `radiology`"
    assert len(statements) == 1 + 2 * len(TABLE_NAMES)
    for k, name in enumerate(TABLE_NAMES):
        drop, create = statements[1 + 2 * k], statements[2 + 2 * k]
        assert drop == f"DROP TABLE IF EXISTS `radiology`.`{name}`"
        lines = create.splitlines()
        assert lines[0] == f"CREATE EXTERNAL TABLE `radiology`.`{name}` ("
        columns = [line.strip().rstrip(",") for line in lines[1 : lines.index(")")]]
        assert columns == [f"`{c.name}` {c.type}" for c in spec(name).columns]
        assert lines[lines.index(")") + 1 :] == [
            "ROW FORMAT SERDE 'org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe'",
            "STORED AS INPUTFORMAT 'org.apache.hadoop.hive.ql.io.SymlinkTextInputFormat'",
            "OUTPUTFORMAT 'org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat'",
            f"LOCATION 's3://bucket/lake/_published/{name}/'",
        ]
    assert "`tensor_shape` array<int>" in statements[2] and "`ingested_at` timestamp" in statements[2]
    assert athena_ddl("s3a://bucket")[2].endswith("LOCATION 's3://bucket/_published/tensors/'")


@pytest.mark.parametrize(
    ("uri", "database", "message"),
    [
        ("data/lakehouse", "cxr", "Athena reads tables on S3 only"),
        ("s3://bucket/lake", "Bad-Name", "database name 'Bad-Name' is not valid"),
        ("s3://bucket/lake", "x`; DROP", "is not valid"),
    ],
)
def test_athena_ddl_refuses(uri: str, database: str, message: str) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        athena_ddl(uri, database=database)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("nope", {}, "no saved query named 'nope': choose one of positives_per_pathology, "),
        ("top_images", {}, "saved query top_images needs --param pathology=VALUE"),
        (
            "top_images",
            {"pathology": "x' OR '1'='1"},
            "parameter pathology=\"x' OR '1'='1\" is not one of: atelectasis,",
        ),
        ("top_images", {"pathology": "mass", "limit": 0}, "parameter limit must be at least 1 (got 0)"),
        ("top_images", {"pathology": "mass", "limit": "2.5"}, "parameter limit must be an integer (got '2.5')"),
        ("positives_per_pathology", {"threshold": "0.5; DROP"}, "parameter threshold must be a number"),
        ("positives_per_pathology", {"threshold": "nan"}, "parameter threshold must be a finite number"),
        ("positives_per_pathology", {"threshold": True}, "parameter threshold must be a number, not True"),
        ("quarantine_reasons", {"run": "r1"}, "saved query quarantine_reasons has no parameter run (it accepts: none)"),
    ],
)
def test_saved_query_parameter_errors(name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(QueryError, match=re.escape(message)):
        saved_query_sql(name, params=params)


def test_string_and_number_literals() -> None:
    assert _literal(Param("s", "string"), "O'Brien") == "'O''Brien'"
    assert _literal(Param("t", "number"), "0.25") == "0.25"
    assert _literal(Param("t", "number"), 1) == "1.0"
    assert _literal(Param("t", "number"), 1e-5) == "0.00001"
    assert _literal(Param("n", "integer"), " 7 ") == "7"


def test_query_binds_params_and_returns_arrow(lake: Path) -> None:
    t = query(
        str(lake),
        "SELECT image_id, cardiomegaly FROM predictions WHERE model_id = $m AND cardiomegaly >= $t ORDER BY image_id",
        settings=Settings(),
        params={"m": M1, "t": 0.55},
    )
    assert t.column_names == ["image_id", "cardiomegaly"]
    assert _rows(t) == [{"image_id": "ia", "cardiomegaly": f32(0.9)}, {"image_id": "ib", "cardiomegaly": f32(0.6)}]


def test_tensor_bytes_and_shape_read_back(lake: Path) -> None:
    from lakehouse.tables import decode_tensor

    row = query(
        str(lake), "SELECT tensor, tensor_dtype, tensor_shape FROM tensors WHERE image_id = 'ib'", settings=Settings()
    ).to_pylist()[0]
    assert decode_tensor(row["tensor"], row["tensor_dtype"], row["tensor_shape"]).tolist() == [[[0.0, 1.0], [2.0, 3.0]]]


# --- the cxr query command ---------------------------------------------------------------------------
def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["query", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_table_format(lake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(
        capsys,
        "--lakehouse",
        str(lake),
        "SELECT image_id, view_position, source_bytes, tensor FROM tensors ORDER BY image_id",
    )
    assert rc == 0
    assert out == (
        "image_id  view_position  source_bytes  tensor\n"
        "--------  -------------  ------------  ---------\n"
        "ia        PA                      100  <8 bytes>\n"
        "ib        LL                      200  <8 bytes>\n"
        "ic        AP                      300  <8 bytes>\n"
        "id        NULL                     50  <8 bytes>\n"
        "(4 rows)\n"
    )


def test_cli_saved_query_csv_with_param(lake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(
        capsys,
        "--lakehouse",
        str(lake),
        "--saved",
        "studies_with_findings",
        "--param",
        "threshold=0.75",
        "--format",
        "csv",
    )
    assert rc == 0
    assert out == (
        "study_uid,model_id,positive_images,positive_findings,max_probability\nS1,model-a,1,1,0.9\nS1,model-b,1,1,0.8\n"
    )


def test_cli_json_format_and_ad_hoc_param(lake: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sql = "SELECT image_id, edema, ingested_at FROM predictions JOIN tensors USING (image_id) WHERE model_id = $m ORDER BY image_id"
    rc, out, _ = _cli(capsys, "--lakehouse", str(lake), sql, "--param", f"m={M1}", "--format", "json")
    assert rc == 0
    at = "2026-01-02T03:04:05+00:00"
    assert json.loads(out) == [
        {"image_id": "ia", "edema": 0.1, "ingested_at": at},
        {"image_id": "ib", "edema": None, "ingested_at": at},
        {"image_id": "ic", "edema": 0.3, "ingested_at": at},
        {"image_id": "id", "edema": 0.6, "ingested_at": at},
    ]


def test_cli_limit(lake: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    rc, out, _ = _cli(
        capsys,
        "--lakehouse",
        str(lake),
        "SELECT image_id FROM tensors ORDER BY image_id",
        "--format",
        "csv",
        "--limit",
        "2",
    )
    assert rc == 0
    assert out == "image_id\nia\nib\n"
    assert "showing the first 2 rows; there are more (raise --limit to see more)" in caplog.text
    # the limit is applied inside DuckDB: exactly limit rows come back, and no warning when nothing is cut
    from cxr.sql import query

    assert query(str(lake), "SELECT image_id FROM tensors", settings=load_settings({}), limit=3).num_rows == 3
    caplog.clear()
    rc, out, _ = _cli(
        capsys, "--lakehouse", str(lake), "SELECT image_id FROM tensors", "--format", "csv", "--limit", "4"
    )
    assert rc == 0 and out.count("\n") == 5 and "showing" not in caplog.text


def test_cli_lakehouse_from_environment(
    lake: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_LAKEHOUSE_URI", str(lake))
    rc, out, _ = _cli(capsys, "SELECT COUNT(*) AS n FROM quarantine", "--format", "csv")
    assert (rc, out) == (0, "n\n5\n")


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(capsys, "--list")
    assert rc == 0
    names = [line.split()[0] for line in out.splitlines() if line and not line.startswith(" ")]
    assert names == list(SAVED_QUERIES)
    assert "top_images  [pathology=(required) limit=10]" in out.splitlines()


def test_cli_athena_ddl(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _cli(capsys, "--lakehouse", "s3://bucket/lake", "--athena-ddl", "--database", "radiology")
    assert rc == 0
    assert out.startswith(
        "CREATE DATABASE IF NOT EXISTS `radiology`;\n\nDROP TABLE IF EXISTS `radiology`.`tensors`;\n\n"
        "CREATE EXTERNAL TABLE `radiology`.`tensors` (\n"
    )
    assert out.count(";\n") == 1 + 2 * len(TABLE_NAMES)  # the database, then a drop and a create per table
    assert out.endswith("LOCATION 's3://bucket/lake/_published/drift/';\n\n")


@pytest.mark.parametrize(
    ("which", "argv", "message"),
    [
        ("lake", ["SELEC 1"], 'cxr query: QueryError: Parser Error: syntax error at or near "SELEC"'),
        (
            "lake",
            ["SELECT nope FROM tensors"],
            'cxr query: QueryError: Binder Error: Referenced column "nope" not found',
        ),
        (
            "lake",
            ["SELECT nope(1)"],
            "cxr query: QueryError: Catalog Error: Scalar Function with name nope does not exist!\n",
        ),
        (
            "tensors_only",
            ["SELECT * FROM predictions"],
            "cxr query: QueryError: Catalog Error: Table with name predictions does not exist! "
            "Tables in this lakehouse: tensors",
        ),
        (
            "tensors_only",
            ["--saved", "quarantine_reasons"],
            "cxr query: QueryError: Catalog Error: Table with name quarantine does not exist! "
            "Tables in this lakehouse: tensors",
        ),
        ("lake", ["--saved", "no_such_query"], "cxr query: QueryError: no saved query named 'no_such_query'"),
        (
            "lake",
            ["--saved", "top_images"],
            "cxr query: QueryError: saved query top_images needs --param pathology=VALUE",
        ),
        (
            "lake",
            ["--saved", "top_images", "--param", "pathology"],
            "cxr query: QueryError: --param 'pathology': expected NAME=VALUE",
        ),
        (
            "lake",
            ["SELECT 1", "--saved", "quarantine_reasons"],
            "cxr query: QueryError: give either SQL or --saved NAME, not both",
        ),
        ("lake", [], "cxr query: QueryError: give the SQL to run"),
        ("empty", ["SELECT 1"], "cxr query: QueryError: no Delta tables under "),
        ("lake", ["--athena-ddl"], "cxr query: QueryError: Athena reads tables on S3 only"),
    ],
)
def test_cli_errors_exit_2_with_one_line(
    which: str,
    argv: list[str],
    message: str,
    lake: Path,
    tensors_only: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    where = {"lake": lake, "tensors_only": tensors_only, "empty": tmp_path}[which]
    rc, out, err = _cli(capsys, "--lakehouse", str(where), *argv)
    assert rc == 2
    assert out == ""
    assert err.startswith(message)
    assert err.count("\n") == 1


# --- S3 ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_query_over_s3_lakehouse(
    lake: Path, settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = make_bucket(settings, "cxr-sql") + "/lake"
    assert upload_dir(settings, lake, uri) > 0
    name, params, expected = CASES[0]
    assert _rows(run_saved(uri, name, settings=settings, params=params)) == expected
    assert _rows(run_saved(uri, "prediction_coverage", settings=settings)) == EXPECTED["prediction_coverage"][0][1]

    monkeypatch.setenv("CXR_S3_ENDPOINT_URL", settings.s3_endpoint_url)
    rc, out, _ = _cli(capsys, "--lakehouse", uri, "--saved", "quarantine_reasons", "--format", "csv")
    assert rc == 0
    assert out == (
        "run_id,stage,error_class,files\n"
        "r1,preprocess,DecodeError,2\n"
        "r1,preprocess,EmptyFileError,1\n"
        "r2,preprocess,DecodeError,1\n"
        "r2,preprocess,UnsupportedFormatError,1\n"
    )
    rc, _, err = _cli(capsys, "--lakehouse", make_bucket(settings, "cxr-sql") + "/nothing-here", "SELECT 1")
    assert rc == 2 and "no Delta tables under s3://cxr-sql/nothing-here" in err


# --- write-audit-publish -------------------------------------------------------------------------------
def _count(lake: Path, *, published: bool = True) -> int:
    return int(
        query(str(lake), "SELECT COUNT(*) AS n FROM tensors", settings=Settings(), published=published)["n"][0].as_py()
    )


def test_readers_see_only_the_published_versions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A write after the publish (not audited yet) is invisible to queries and to Athena's manifest until
    the next publish; --unpublished shows it."""
    from deltalake import DeltaTable

    settings = Settings()
    lake = _build(tmp_path / "lake")
    manifest = tmp_path / "lake" / "_published" / "tensors" / "manifest"
    published_files = manifest.read_text().split()
    assert published_files == sorted(DeltaTable(str(lake / "tensors")).file_uris()) and len(published_files) == 1
    _write(lake, TENSORS, [{**_tensor_row("ia"), "image_id": "ie"}], settings)  # a stage writes, unaudited

    assert _count(lake) == 4 and _count(lake, published=False) == 5
    rc, out, _ = _cli(capsys, "--lakehouse", str(lake), "SELECT COUNT(*) AS n FROM tensors", "--format", "csv")
    assert (rc, out) == (0, "n\n4\n")
    rc, out, _ = _cli(
        capsys, "--lakehouse", str(lake), "--unpublished", "SELECT COUNT(*) AS n FROM tensors", "--format", "csv"
    )
    assert (rc, out) == (0, "n\n5\n")
    assert manifest.read_text().split() == published_files  # Athena is still on the audited version

    record = publish(str(lake), settings, run_id="second")
    assert record.versions["tensors"] == DeltaTable(str(lake / "tensors")).version()
    assert _count(lake) == 5
    assert manifest.read_text().split() == sorted(DeltaTable(str(lake / "tensors")).file_uris())
    assert len(manifest.read_text().split()) == 2


def test_nothing_published_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings()
    _write(tmp_path / "lake", TENSORS, [_tensor_row("ia")], settings)
    with pytest.raises(QueryError, match="nothing is published in .* yet"):
        query(str(tmp_path / "lake"), "SELECT 1", settings=settings)
    assert _count(tmp_path / "lake", published=False) == 1
