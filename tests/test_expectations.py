"""Great Expectations suites and ``cxr validate``: a clean lakehouse passes, each corruption is caught.

The corrupted lakehouses are copies of ``built_lakehouse`` (made by the real preprocessing and inference
stages) with one table rewritten by delta-rs. Real GX, real Delta, real local S3.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from cxr.cli import main
from expectations import frames
from lakehouse.config import Settings
from lakehouse.runs import PreprocessRun
from tests.conftest import MODEL, make_bucket, upload_dir
from transforms.sample import INVALID_KINDS

# --- helpers ----------------------------------------------------------------------------------------


def _copy(built_lakehouse: Path, tmp_path: Path) -> Path:
    lake = tmp_path / "lake"
    shutil.copytree(built_lakehouse, lake)
    return lake


def _read(lake: Path, table: str) -> pa.Table:
    from deltalake import DeltaTable

    return DeltaTable(str(lake / table)).to_pyarrow_table()


def _overwrite(lake: Path, table: str, data: pa.Table) -> None:
    from deltalake import write_deltalake

    write_deltalake(str(lake / table), data, mode="overwrite", schema_mode="overwrite")


def _set(data: pa.Table, column: str, row: int, value: Any) -> pa.Table:
    """``data`` with one cell replaced."""
    values = data.column(column).to_pylist()
    values[row] = value
    idx = data.column_names.index(column)
    return data.set_column(idx, data.field(idx), pa.array(values, type=data.field(idx).type))


def _validate(capsys: pytest.CaptureFixture[str], lake: Path | str, *extra: str) -> tuple[int, dict[str, Any]]:
    """``cxr validate --json``: the exit status and the printed report."""
    capsys.readouterr()
    rc = main(["validate", "--lakehouse", str(lake), "--json", *extra])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if out.strip() else {})


def _failed(report: dict[str, Any], table: str) -> set[tuple[str, str, str | None]]:
    """(suite, expectation type, column) of every failed expectation of a table."""
    return {(f["suite"], f["expectation_type"], f["column"]) for f in report["tables"][table]["failed"]}


def _failure(report: dict[str, Any], table: str, etype: str, column: str) -> dict[str, Any]:
    [hit] = [f for f in report["tables"][table]["failed"] if f["expectation_type"] == etype and f["column"] == column]
    return hit


# --- pure frame builders (no GX, no Spark) ----------------------------------------------------------


def test_tensors_frame_reduces_tensor_bytes_to_their_length() -> None:
    batch = pa.RecordBatch.from_pylist(
        [
            {
                "tensor": b"\x00" * 8,
                "tensor_shape": [1, 2, 2],
                "tensor_dtype": "float16",
                "patient_pseudonym": "a" * 64,
            },
            {"tensor": b"\x00" * 7, "tensor_shape": [1, 2, 2], "tensor_dtype": "float32", "patient_pseudonym": "Doe^J"},
            {"tensor": b"", "tensor_shape": [1, 2, 2], "tensor_dtype": "float64", "patient_pseudonym": None},
        ]
    )
    for name in ("image_id", "tensor_min", "tensor_max", "source_format", "width", "height", "run_id"):
        batch = batch.append_column(name, pa.nulls(3))
    frame = frames.tensors_frame([batch])
    assert "tensor" not in frame.columns and "patient_pseudonym" not in frame.columns
    assert frame["tensor_nbytes"].tolist() == [8, 7, 0]
    assert frame["expected_nbytes"].tolist()[:2] == [8, 16]
    assert frame["expected_nbytes"].isna().tolist() == [False, False, True]
    assert frame["tensor_shape"].tolist() == ["1x2x2"] * 3
    assert frame["patient_pseudonym_form"].tolist() == ["hmac-sha256-hex", "not-an-hmac", None]


def test_column_names_are_compared_case_and_separator_insensitively() -> None:
    frame = frames.columns_frame(["image_id", "PatientName", "patient-id"])
    assert frame["normalized_name"].tolist() == ["imageid", "patientname", "patientid"]
    assert {"patientname", "patientid"} <= set(frames.DIRECT_IDENTIFIER_KEYS)
    assert "imageid" not in frames.DIRECT_IDENTIFIER_KEYS


def test_quarantine_runs_frame_uses_the_summary_denominator() -> None:
    quarantine = pa.table(
        {"run_id": ["r1", "r1", "r2", "r3"], "stage": ["preprocess"] * 4, "error_class": ["DecodeError"] * 4}
    )
    summaries = [
        PreprocessRun(run_id="r1", discovered=40, new=38, quarantined=2),
        PreprocessRun(run_id="r2", discovered=4, new=1, quarantined=3),  # one input quarantined again: its row is older
        # 100 files, 96 judged by earlier runs: 2 of the 4 new ones were bad (not 2 %)
        PreprocessRun(run_id="r4", discovered=100, new=2, already_present=96, quarantined=2, previously={"new": 96}),
    ]
    frame = frames.quarantine_runs_frame(quarantine, summaries)
    assert frame["run_id"].tolist() == ["r1", "r2", "r3", "r4"]
    assert frame["quarantined"].tolist() == [2, 3, 1, 2]
    assert frame["quarantine_share"].tolist()[:2] == [0.05, 0.75]
    assert frame["quarantine_share"].tolist()[3] == 0.5
    assert frame["discovered"].isna().tolist() == [False, False, True, False]  # r3 wrote no summary
    only = frames.quarantine_runs_frame(quarantine, summaries, run_id="r2")
    assert only["run_id"].tolist() == ["r2"]


def test_coverage_models_and_frame() -> None:
    predictions = pa.table({"image_id": ["a", "b", "a"], "model_id": ["m1", "m1", "m2"], "run_id": ["x", "x", "y"]})
    assert frames.coverage_models(predictions) == ["m1", "m2"]
    assert frames.coverage_models(predictions, run_id="y") == ["m2"]
    assert frames.coverage_models(predictions, models=["m3"]) == ["m3"]
    # only the missing pairs: b has no m2 prediction; c (in tensors twice) has none at all
    cov = frames.coverage_frame(predictions, ["c", "a", "b", "c"], ["m1", "m2"])
    assert list(zip(cov["image_id"], cov["model_id"], cov["has_prediction"], strict=True)) == [
        ("c", "m1", False),
        ("b", "m2", False),
        ("c", "m2", False),
    ]
    assert frames.coverage_frame(predictions, ["a"], ["m1", "m2"]).empty


def test_key_frames_hold_exactly_the_rows_that_break_a_key_rule() -> None:
    ids = pa.table({"image_id": ["a", "b", "a", "c", "a"], "run_id": ["r1", "r1", "r2", "r2", "r3"]})
    assert frames.duplicated_rows(ids, ["image_id"]).to_pylist() == [0, 2, 4]
    dups = frames.tensors_keys_frame(ids)
    assert list(zip(dups["image_id"], dups["run_id"], strict=True)) == [("a", "r1"), ("a", "r2"), ("a", "r3")]
    assert frames.tensors_keys_frame(ids.slice(1, 3)).empty  # b, a, c: unique

    predictions = pa.table(
        {
            "image_id": ["a", "a", "b", "z", "b"],
            "model_id": ["m1", "m2", "m1", "m1", "m1"],
            "run_id": ["x", "x", "x", "y", "y"],
        }
    )
    keys = frames.predictions_keys_frame(predictions, ["a", "b"])
    # (b, m1) twice, across runs; z is no tensor; (a, m1) and (a, m2) are fine
    assert list(zip(keys["image_id"], keys["model_id"], keys["run_id"], keys["in_tensors"], strict=True)) == [
        ("b", "m1", "x", True),
        ("z", "m1", "y", False),
        ("b", "m1", "y", True),
    ]
    assert frames.predictions_keys_frame(predictions.slice(0, 3), ["a", "b"]).empty

    ledger = pa.table({"source_uri": ["/in/p.png", "/in/q.png", "/in/p.png"], "run_id": ["r1", "r1", "r2"]})
    paths = frames.files_keys_frame(ledger)
    key = hashlib.sha256(b"/in/p.png").hexdigest()
    assert list(zip(paths["path_key"], paths["run_id"], strict=True)) == [(key, "r1"), (key, "r2")]


# --- stage errors -------------------------------------------------------------------------------------


def test_validate_without_tables_is_a_stage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["validate", "--lakehouse", str(tmp_path / "empty")])
    assert rc == 2
    assert "no Delta table" in capsys.readouterr().err


@pytest.mark.slow
def test_validate_missing_requested_table_is_a_stage_error(
    built_lakehouse: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lake = _copy(built_lakehouse, tmp_path)
    shutil.rmtree(lake / "predictions")
    rc = main(["validate", "--lakehouse", str(lake), "--table", "predictions"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "['predictions'] not found" in err


# --- the suites on real lakehouses ------------------------------------------------------------------


@pytest.mark.slow
def test_clean_lakehouse_passes_every_suite(
    built_lakehouse: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lake = _copy(built_lakehouse, tmp_path)
    # the sample set holds 9 invalid files among 26 judged inputs (and 4 skipped): a share of 0.35 is expected here
    rc, report = _validate(capsys, lake, "--max-quarantine-share", "0.5")
    assert rc == 0, report
    assert report["success"] is True
    counts = {name: (t["rows"], t["evaluated"], t["passed"]) for name, t in report["tables"].items()}
    assert counts == {
        "tensors": (17, 22, 22),
        "quarantine": (9, 10, 10),
        "files": (30, 6, 6),
        "predictions": (17, 25, 25),
    }
    index = (lake / "reports" / "data_docs" / "index.html").read_text()
    for suite in ("tensors", "tensors_columns", "tensors_keys", "quarantine_runs", "predictions_coverage"):
        assert suite in index
    saved = json.loads((lake / "reports" / "validation" / "predictions.json").read_text())
    assert saved["success"] is True and saved["failed_count"] == 0

    # a model the run never used: every one of the 17 tensors lacks its prediction
    rc, report = _validate(capsys, lake, "--table", "predictions", "--model", MODEL, "--model", "resnet50-res512-all")
    assert rc == 1
    assert _failed(report, "predictions") == {
        ("predictions_coverage", "expect_column_values_to_be_in_set", "has_prediction")
    }
    assert (
        _failure(report, "predictions", "expect_column_values_to_be_in_set", "has_prediction")["unexpected_count"] == 17
    )
    # the docs of the earlier call's tables are kept beside the new predictions results
    index = (lake / "reports" / "data_docs" / "index.html").read_text()
    assert "tensors_columns" in index and "predictions_coverage" in index


@pytest.mark.slow
def test_tensors_suite_catches_each_corruption(
    built_lakehouse: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lake = _copy(built_lakehouse, tmp_path)
    data = _read(lake, "tensors").sort_by("image_id")
    ids = data.column("image_id").to_pylist()
    truncated = data.column("tensor")[0].as_py()[:-2]
    data = _set(data, "tensor", 0, truncated)  # 2 bytes short of 1x224x224 float16
    data = _set(data, "tensor_max", 1, 2000.0)  # above the [-1024, 1024] scale
    data = _set(data, "image_id", 2, ids[3])  # a duplicated key
    data = _set(data, "width", 4, 0)
    data = _set(data, "source_format", 5, "gif")
    dicom_row = data.column("source_format").to_pylist().index("dicom")
    data = _set(data, "patient_pseudonym", dicom_row, "DOE^JOHN")  # a name where an HMAC belongs
    data = data.append_column("PatientID", pa.array(["X"] * data.num_rows))  # a direct identifier column
    _overwrite(lake, "tensors", data)

    capsys.readouterr()
    rc = main(["validate", "--lakehouse", str(lake), "--table", "tensors"])
    printed = capsys.readouterr().out
    assert rc == 1
    assert "FAILED tensors / tensors_keys: expect_column_values_to_be_unique(image_id) (2 unexpected)" in printed
    assert "DOE^JOHN" not in printed

    saved = json.loads((lake / "reports" / "validation" / "tensors.json").read_text())
    assert saved["success"] is False
    report = {"tables": {"tensors": saved}}
    assert _failed(report, "tensors") == {
        ("tensors", "expect_column_pair_values_to_be_equal", "tensor_nbytes,expected_nbytes"),
        ("tensors", "expect_column_values_to_be_between", "tensor_max"),
        ("tensors_keys", "expect_column_values_to_be_unique", "image_id"),
        ("tensors", "expect_column_values_to_be_between", "width"),
        ("tensors", "expect_column_values_to_be_in_set", "source_format"),
        ("tensors", "expect_column_values_to_be_in_set", "patient_pseudonym_form"),
        ("tensors_columns", "expect_column_values_to_not_be_in_set", "normalized_name"),
    }
    nbytes = _failure(report, "tensors", "expect_column_pair_values_to_be_equal", "tensor_nbytes,expected_nbytes")
    assert nbytes["unexpected_count"] == 1
    assert nbytes["examples"][0]["image_id"] == ids[0]
    assert _failure(report, "tensors", "expect_column_values_to_be_unique", "image_id")["unexpected_count"] == 2
    ident = _failure(report, "tensors", "expect_column_values_to_not_be_in_set", "normalized_name")
    assert ident["examples"] == [{"normalized_name": "patientid", "column_name": "PatientID"}]
    assert "DOE^JOHN" not in json.dumps(report)
    index = lake / "reports" / "data_docs" / "index.html"
    assert "tensors_columns" in index.read_text()
    docs = "".join(p.read_text() for p in (lake / "reports" / "data_docs").rglob("*.html"))
    assert "DOE^JOHN" not in docs


@pytest.mark.slow
def test_quarantine_suite_catches_empty_reasons_and_a_high_share(  # type: ignore[no-untyped-def]
    built_lakehouse: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    spark,
) -> None:
    lake = _copy(built_lakehouse, tmp_path)
    # the default threshold (0.05, CXR_MAX_QUARANTINE_SHARE) fails run pre-test: 9 of 26 inputs (the
    # 4 objects skipped by design count in neither)
    monkeypatch.delenv("CXR_MAX_QUARANTINE_SHARE", raising=False)
    rc, report = _validate(capsys, lake, "--table", "quarantine")
    assert rc == 1
    assert _failed(report, "quarantine") == {
        ("quarantine_runs", "expect_column_values_to_be_between", "quarantine_share")
    }
    share = _failure(report, "quarantine", "expect_column_values_to_be_between", "quarantine_share")
    assert share["kwargs"]["max_value"] == 0.05
    assert share["examples"] == [{"quarantine_share": pytest.approx(9 / 26), "run_id": "pre-test"}]
    # the environment sets the threshold; the flag overrides it
    monkeypatch.setenv("CXR_MAX_QUARANTINE_SHARE", "0.4")
    assert _validate(capsys, lake, "--table", "quarantine")[0] == 0
    assert _validate(capsys, lake, "--table", "quarantine", "--max-quarantine-share", "0.3")[0] == 1

    # a second, real run into the same lakehouse: 1 new image and 3 new bad files (the old files are
    # not judged again), so its own share is 3 / 4 whatever the first run did
    from transforms.preprocess import run_preprocess
    from transforms.sample import write_samples

    day2 = tmp_path / "day2"
    write_samples(day2, count=1, seed=500)
    for i, (fname, make, _) in enumerate(list(INVALID_KINDS.values())[:3]):
        (day2 / f"bad{i}_{fname}").write_bytes(make(500 + i))
    pre = run_preprocess(str(day2), str(lake), settings=settings, run_id="pre-day2", spark=spark, progress=False)
    assert (pre.new, pre.quarantined, pre.first_seen) == (1, 3, 4)
    rc, report = _validate(
        capsys, lake, "--table", "quarantine", "--max-quarantine-share", "0.5", "--run-id", "pre-day2"
    )
    assert rc == 1
    share = _failure(report, "quarantine", "expect_column_values_to_be_between", "quarantine_share")
    assert share["examples"] == [{"quarantine_share": pytest.approx(3 / 4), "run_id": "pre-day2"}]

    # empty reasons
    data = _read(lake, "quarantine")
    data = _set(_set(data, "error_message", 0, ""), "error_class", 1, "")
    _overwrite(lake, "quarantine", data)
    rc, report = _validate(
        capsys, lake, "--table", "quarantine", "--max-quarantine-share", "0.5", "--run-id", "pre-test"
    )
    assert rc == 1
    assert _failed(report, "quarantine") == {
        ("quarantine", "expect_column_value_lengths_to_be_between", "error_message"),
        ("quarantine", "expect_column_value_lengths_to_be_between", "error_class"),
        ("quarantine", "expect_column_values_to_match_regex", "error_class"),
    }
    assert "quarantine_runs" in (lake / "reports" / "data_docs" / "index.html").read_text()


@pytest.mark.slow
def test_files_suite_catches_each_corruption(
    built_lakehouse: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lake = _copy(built_lakehouse, tmp_path)
    data = _read(lake, "files")
    rows = data.to_pylist()
    quarantined = next(i for i, r in enumerate(rows) if r["outcome"] == "quarantined")
    new = next(i for i, r in enumerate(rows) if r["outcome"] == "new")
    data = _set(data, "reason_class", quarantined, None)
    data = _set(data, "image_id", new, None)
    other = next(i for i in range(len(rows)) if i not in (quarantined, new))
    data = _set(data, "outcome", other, "maybe")
    data = pa.concat_tables([data, data.slice(3, 1)])  # one path judged twice
    _overwrite(lake, "files", data)
    rc, report = _validate(capsys, lake, "--table", "files")
    assert rc == 1
    assert _failed(report, "files") == {
        ("files_keys", "expect_column_values_to_be_unique", "path_key"),
        ("files", "expect_column_values_to_be_in_set", "outcome"),
        ("files", "expect_column_values_to_be_in_set", "has_reason"),
        ("files", "expect_column_values_to_be_in_set", "has_image_id"),
    }
    # the ledger's paths never appear in a result: the path key is a hash
    assert "/" not in json.dumps(_failure(report, "files", "expect_column_values_to_be_unique", "path_key")["examples"])


@pytest.mark.slow
def test_predictions_suite_catches_each_corruption(
    built_lakehouse: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lake = _copy(built_lakehouse, tmp_path)
    data = _read(lake, "predictions").sort_by("image_id")
    orphaned = data.column("image_id")[2].as_py()
    data = _set(data, "atelectasis", 0, 1.5)  # not a probability
    data = _set(data, "effusion", 3, float("nan"))  # NaN is not null: pandas would hide it
    data = _set(data, "image_id", 2, "f" * 64)  # not in tensors; and tensor `orphaned` loses its prediction
    data = pa.concat_tables([data, data.slice(1, 1)])  # a duplicated (image_id, model_id)
    _overwrite(lake, "predictions", data)

    rc, report = _validate(capsys, lake, "--table", "predictions", "--run-id", "inf-test")
    assert rc == 1
    assert _failed(report, "predictions") == {
        ("predictions", "expect_column_values_to_be_between", "atelectasis"),
        ("predictions_keys", "expect_compound_columns_to_be_unique", "image_id,model_id"),
        ("predictions_keys", "expect_column_values_to_be_in_set", "in_tensors"),
        ("predictions", "expect_column_values_to_be_in_set", "nan_probability"),
        ("predictions_coverage", "expect_column_values_to_be_in_set", "has_prediction"),
    }
    assert _failure(report, "predictions", "expect_column_values_to_be_between", "atelectasis")["unexpected_count"] == 1
    missing = _failure(report, "predictions", "expect_column_values_to_be_in_set", "has_prediction")
    assert missing["examples"] == [{"has_prediction": False, "image_id": orphaned, "model_id": MODEL}]
    absent = _failure(report, "predictions", "expect_column_values_to_be_in_set", "in_tensors")
    assert absent["examples"][0]["image_id"] == "f" * 64
    assert "predictions_coverage" in (lake / "reports" / "data_docs" / "index.html").read_text()


@pytest.mark.slow
def test_validate_s3_lakehouse_publishes_data_docs_to_s3(built_lakehouse: Path, settings: Settings) -> None:
    from expectations.runner import validate_lakehouse
    from lakehouse.storage import read_text, s3_client

    lake = make_bucket(settings, "cxr-validate") + "/lake"
    upload_dir(settings, built_lakehouse, lake)
    report = validate_lakehouse(lake, settings=settings, max_quarantine_share=0.5)
    assert report.success is True
    assert sorted(report.tables) == ["files", "predictions", "quarantine", "tensors"]
    assert report.data_docs_uri == "s3://cxr-validate/lake/reports/data_docs/index.html"
    index = read_text(report.data_docs_uri, settings)
    assert "predictions_coverage" in index and "tensors_columns" in index
    keys = [
        o["Key"] for o in s3_client(settings).list_objects_v2(Bucket="cxr-validate", Prefix="lake/reports/")["Contents"]
    ]
    assert any(k.startswith("lake/reports/data_docs/validations/tensors/") and k.endswith(".html") for k in keys)
    saved = json.loads(read_text("s3://cxr-validate/lake/reports/validation/tensors.json", settings))
    assert saved["success"] is True and saved["evaluated"] == 22
