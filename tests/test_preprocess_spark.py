"""The Spark preprocessing job end to end: real Spark, real Delta, a real local S3 server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from lakehouse.config import Settings
from lakehouse.delta_rs import open_table, read_arrow
from lakehouse.runs import PreprocessRun
from lakehouse.tables import QUARANTINE, TENSORS, decode_tensor
from tests.conftest import TEST_KEY, make_bucket, upload_dir
from transforms.decode import pseudonymize
from transforms.preprocess import run_preprocess
from transforms.sample import INVALID_KINDS, VALID_KINDS, Identity, dicom_bytes, png_bytes, synthetic_cxr, to_uint
from transforms.tensor import PreprocessParams, preprocess_bytes

pytestmark = pytest.mark.slow


def _run(spark, settings: Settings, input_uri: str | Path, lakehouse: str | Path, **kw) -> PreprocessRun:  # type: ignore[no-untyped-def]
    return run_preprocess(str(input_uri), str(lakehouse), settings=settings, spark=spark, progress=False, **kw)


@pytest.fixture(scope="module")
def first_run(spark, settings: Settings, samples_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    lake = tmp_path_factory.mktemp("lake")
    summary = _run(spark, settings, samples_dir, lake)
    return lake, summary


def test_counts_reconcile_and_every_input_is_accounted_for(first_run, samples_dir: Path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    lake, s = first_run
    n_files = sum(1 for p in samples_dir.rglob("*") if p.is_file())
    assert s.discovered == n_files == len(VALID_KINDS) + len(INVALID_KINDS)
    assert (s.new, s.already_present, s.duplicates, s.quarantined) == (len(VALID_KINDS), 0, 0, len(INVALID_KINDS))
    assert s.reconciles
    tensors = read_arrow(str(lake), TENSORS, settings)
    quarantine = read_arrow(str(lake), QUARANTINE, settings)
    seen = set(tensors.column("source_uri").to_pylist()) | set(quarantine.column("source_uri").to_pylist())
    assert seen == {str(p) for p in samples_dir.rglob("*") if p.is_file()}


def test_quarantine_has_a_reason_per_bad_kind(first_run, samples_dir: Path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    lake, s = first_run
    q = read_arrow(str(lake), QUARANTINE, settings).to_pylist()
    by_name = {Path(r["source_uri"]).name: r for r in q}
    for kind, (fname, _, expected) in INVALID_KINDS.items():
        row = by_name[f"{kind}_{fname}"]
        assert row["error_class"] == expected, kind
        assert row["error_message"] and row["stage"] == "preprocess" and row["run_id"] == s.run_id
    assert (
        by_name["zero_byte_empty.png"]["content_sha256"]
        == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_tensors_equal_the_pure_function_and_contract(first_run, samples_dir: Path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    import hashlib
    import json

    lake, s = first_run
    rows = read_arrow(str(lake), TENSORS, settings).to_pylist()
    assert len(rows) == len(VALID_KINDS)
    for row in rows:
        data = Path(row["source_uri"]).read_bytes()
        assert row["image_id"] == hashlib.sha256(data).hexdigest()
        expected = preprocess_bytes(data, name=row["source_uri"], params=PreprocessParams(), pseudonym_key=TEST_KEY)
        assert row["tensor"] == expected["tensor"]
        assert row["tensor_dtype"] == "float16" and row["tensor_shape"] == [1, 224, 224]
        t = decode_tensor(row["tensor"], row["tensor_dtype"], row["tensor_shape"])
        assert -1024 <= t.min() == row["tensor_min"] and t.max() == row["tensor_max"] <= 1024
        assert row["source_bytes"] == len(data) and row["width"] > 0 and row["height"] > 0
        assert row["run_id"] == s.run_id and row["preprocess_version"] == "1"
        assert json.loads(row["preprocess_params"])["resize_engine"] == "cv2"
        assert (
            row["source_format"]
            == {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "dcm": "dicom"}[row["source_uri"].rsplit(".", 1)[1]]
        )


def test_no_phi_in_any_column_or_file(first_run, samples_dir: Path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    lake, _ = first_run
    forbidden = ["SYNTHETIC^PATIENT", "SYNTHETIC", "SYN-000", "19700101", "SYNTHETIC HOSPITAL"]
    for table in (TENSORS, QUARANTINE):
        t = read_arrow(str(lake), table, settings)
        names = set(t.column_names)
        assert not names & {"patient_name", "patient_id", "patient_birth_date", "institution_name"}
        for col in t.column_names:
            if col == "tensor":
                continue
            text = " ".join(map(str, t.column(col).to_pylist()))
            for f in forbidden:
                assert f not in text, (table, col, f)
    for f in Path(lake).rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            assert b"SYN-000" not in blob and b"SYNTHETIC^PATIENT" not in blob, f
    dicom_rows = [r for r in read_arrow(str(lake), TENSORS, settings).to_pylist() if r["source_format"] == "dicom"]
    assert dicom_rows
    for r in dicom_rows:
        seed = int(Path(r["source_uri"]).stem.rsplit("_", 1)[1])
        assert r["patient_pseudonym"] == pseudonymize(Identity(patient_id=f"SYN-{seed:06d}").patient_id, TEST_KEY)


def test_tables_stay_readable_by_delta_rs_and_athena(first_run, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    lake, _ = first_run
    for table in (TENSORS, QUARANTINE):
        dt = open_table(str(lake), table, settings)
        proto = dt.protocol()
        assert (proto.min_reader_version, proto.min_writer_version) == (1, 2)
        assert not proto.reader_features and not proto.writer_features
        schema_json = dt.schema().to_json()
        assert "variant" not in schema_json and "timestamp_ntz" not in schema_json
        config = dt.metadata().configuration
        assert config.get("delta.enableDeletionVectors") == "false"
        assert "delta.columnMapping.mode" not in config


def test_rerun_is_idempotent(spark, settings: Settings, samples_dir: Path, first_run) -> None:  # type: ignore[no-untyped-def]
    lake, first = first_run
    before_t = read_arrow(str(lake), TENSORS, settings).num_rows
    before_q = read_arrow(str(lake), QUARANTINE, settings).num_rows
    again = _run(spark, settings, samples_dir, lake)
    assert (again.new, again.already_present, again.quarantined, again.duplicates) == (
        0,
        first.new,
        first.quarantined,
        0,
    )
    # only the quarantined inputs are read again; known images are skipped before decoding
    assert again.decoded == first.quarantined
    assert read_arrow(str(lake), TENSORS, settings).num_rows == before_t
    assert read_arrow(str(lake), QUARANTINE, settings).num_rows == before_q
    assert set(pc.unique(read_arrow(str(lake), TENSORS, settings).column("run_id")).to_pylist()) == {first.run_id}


def test_incremental_add_decodes_only_new_files(spark, settings: Settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    inp, lake = tmp_path / "in", tmp_path / "lake"
    inp.mkdir()
    for i in range(12):
        (inp / f"a{i:03d}.png").write_bytes(png_bytes(to_uint(synthetic_cxr(64, 80, seed=i), 8)))
    s1 = _run(spark, settings, inp, lake)
    assert (s1.new, s1.decoded) == (12, 12)
    for i in range(12, 15):
        (inp / f"b{i:03d}.png").write_bytes(png_bytes(to_uint(synthetic_cxr(64, 80, seed=i), 8)))
    shutil.copy(inp / "a000.png", inp / "copy_of_a000.png")  # known bytes under a new path: hashed, not decoded
    s2 = _run(spark, settings, inp, lake)
    assert (s2.discovered, s2.new, s2.already_present, s2.decoded) == (16, 3, 13, 3)
    assert read_arrow(str(lake), TENSORS, settings).num_rows == 15


def test_same_bytes_under_two_paths_give_one_row(spark, settings: Settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    inp, lake = tmp_path / "in", tmp_path / "lake"
    (inp / "x").mkdir(parents=True)
    img = png_bytes(to_uint(synthetic_cxr(64, 64, seed=1), 8))
    for name in ("x/one.png", "x/two.png", "zz_three.png"):
        (inp / name).write_bytes(img)
    (inp / "other.png").write_bytes(png_bytes(to_uint(synthetic_cxr(64, 64, seed=2), 8)))
    # one file per task: the copies land in different partitions and are resolved after decoding
    s = _run(spark, settings.with_overrides(files_per_task=1), inp, lake)
    assert (s.discovered, s.new, s.duplicates) == (4, 2, 2)
    first = str(inp / "x/one.png")
    assert s.duplicate_pairs == [
        {"source_uri": str(inp / "x/two.png"), "duplicate_of": first},
        {"source_uri": str(inp / "zz_three.png"), "duplicate_of": first},
    ]
    t = read_arrow(str(lake), TENSORS, settings)
    assert sorted(t.column("source_uri").to_pylist()) == sorted([first, str(inp / "other.png")])
    # the duplicates' data files were written by their tasks and dropped before the commit: no orphan
    assert _files_on_disk(lake) == _committed_files(lake, settings)
    assert len(_committed_files(lake, settings)) == 2


def _files_on_disk(lake: Path) -> set[str]:
    return {p.name for p in (lake / "tensors").glob("*.parquet")}


def _committed_files(lake: Path, settings: Settings) -> set[str]:
    return {Path(f).name for f in open_table(str(lake), TENSORS, settings).file_uris()}


def test_spark_and_the_delta_log_see_the_worker_written_files(spark, first_run, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """The tensors are written by Python workers and committed with delta-rs: Spark reads them as a
    Delta table, the log's per-file statistics are exact, and every file on disk is committed."""
    lake, summary = first_run
    expected = read_arrow(str(lake), TENSORS, settings).sort_by("image_id")
    df = spark.read.format("delta").load(str(lake / "tensors"))
    assert df.count() == expected.num_rows == summary.new
    got = df.orderBy("image_id").select("image_id", "tensor", "tensor_shape", "ingested_at").toArrow()
    assert got.column("image_id").to_pylist() == expected.column("image_id").to_pylist()
    assert got.column("tensor").to_pylist() == expected.column("tensor").to_pylist()
    assert got.column("tensor_shape").to_pylist() == expected.column("tensor_shape").to_pylist()
    assert got.column("ingested_at").to_pylist() == expected.column("ingested_at").to_pylist()
    assert _files_on_disk(lake) == _committed_files(lake, settings)
    log_stats = [
        json.loads(json.loads(line)["add"]["stats"])
        for f in sorted((lake / "tensors" / "_delta_log").glob("*.json"))
        for line in f.read_text().splitlines()
        if '"add"' in line
    ]
    assert sum(s["numRecords"] for s in log_stats) == expected.num_rows
    ids = set(expected.column("image_id").to_pylist())
    assert min(ids) == min(s["minValues"]["image_id"] for s in log_stats)
    assert max(ids) == max(s["maxValues"]["image_id"] for s in log_stats)
    assert all(s["nullCount"]["tensor"] == 0 for s in log_stats)


def test_keys_committed_meanwhile_and_uncommitted_files(settings: Settings, tmp_path: Path) -> None:
    """The worker function and the commit step without Spark: a key another run committed after this
    run read the table is not inserted twice, and the file holding it is rewritten, not orphaned."""
    from datetime import UTC, datetime

    import pyarrow as pa

    from lakehouse import delta_rs
    from lakehouse.delta_rs import DataFile
    from lakehouse.tables import TENSORS
    from transforms import preprocess as pp

    inp, lake = tmp_path / "in", tmp_path / "lake"
    inp.mkdir()
    for i in range(5):
        (inp / f"img{i}.png").write_bytes(png_bytes(to_uint(synthetic_cxr(64, 72, seed=40 + i), 8)))
    delta_rs.ensure_table(str(lake), TENSORS, settings)
    params = PreprocessParams(size=32, engine="cv2", dtype="float16", max_pixels=10**8)
    lineage = {
        "preprocess_version": "t",
        "preprocess_params": params.to_json(),
        "run_id": "r",
        "ingested_at": datetime.now(UTC),
    }

    def work(names: list[str], rows_per_file: int) -> list[dict]:  # type: ignore[type-arg]
        listing = pa.RecordBatch.from_pylist(
            [{"source_uri": str(inp / n), "source_bytes": (inp / n).stat().st_size, "mtime_ms": 0} for n in names]
        )
        out = pp.process_files(
            [listing],
            known_files={},
            known_ids=frozenset(),
            params=params,
            settings=settings,
            lakehouse_uri=str(lake),
            lineage=lineage,
            rows_per_file=rows_per_file,
        )
        return pa.Table.from_batches(list(out)).to_pylist()

    ours = work([f"img{i}.png" for i in range(5)], rows_per_file=3)  # two data files: 3 + 2 rows
    written = [DataFile(**json.loads(r["data_file_meta"])) for r in ours if r["data_file_meta"]]
    assert [f.num_records for f in written] == [3, 2] and len(_files_on_disk(lake)) == 2
    assert _committed_files(lake, settings) == set()  # written, not yet visible
    # another run commits img1 first
    theirs = work(["img1.png"], rows_per_file=10)
    their_file = DataFile(**json.loads(theirs[0]["data_file_meta"]))
    delta_rs.commit_data_files(str(lake), TENSORS, [their_file], settings, run_id="other")
    files = pp._without_rows(str(lake), ours, {}, written, settings)
    assert [f.num_records for f in files] == [2, 2]  # the untouched file, then the rewrite of the other
    assert written[1] in files and written[0] not in files
    assert delta_rs.commit_data_files(str(lake), TENSORS, files, settings, run_id="r") == 4
    t = read_arrow(str(lake), TENSORS, settings)
    assert t.num_rows == 5 and len(set(t.column("image_id").to_pylist())) == 5
    assert _files_on_disk(lake) == _committed_files(lake, settings)  # the replaced file was deleted


def test_a_failure_before_the_commit_leaves_no_data_file(
    spark, settings: Settings, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from transforms import preprocess as pp

    inp, lake = tmp_path / "in", tmp_path / "lake"
    inp.mkdir()
    for i in range(3):
        (inp / f"f{i}.png").write_bytes(png_bytes(to_uint(synthetic_cxr(64, 64, seed=60 + i), 8)))

    def boom(*a, **k):  # type: ignore[no-untyped-def]
        assert _files_on_disk(lake)  # the workers did write the tensors
        raise RuntimeError("driver died before the commit")

    monkeypatch.setattr(pp, "_without_rows", boom)
    with pytest.raises(RuntimeError, match="before the commit"):
        _run(spark, settings, inp, lake)
    assert _files_on_disk(lake) == set()
    assert read_arrow(str(lake), TENSORS, settings).num_rows == 0
    monkeypatch.undo()
    assert _run(spark, settings, inp, lake).new == 3  # and the rerun completes


def test_float32_and_size_options(spark, settings: Settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    inp, lake = tmp_path / "in", tmp_path / "lake"
    inp.mkdir()
    (inp / "a.dcm").write_bytes(dicom_bytes(to_uint(synthetic_cxr(90, 120, seed=5), 12), bits_stored=12))
    _run(spark, settings.with_overrides(tensor_dtype="float32", resize_size=64), inp, lake)
    row = read_arrow(str(lake), TENSORS, settings).to_pylist()[0]
    assert row["tensor_dtype"] == "float32" and row["tensor_shape"] == [1, 64, 64] and len(row["tensor"]) == 64 * 64 * 4
    assert np.isfinite(decode_tensor(row["tensor"], "float32", [1, 64, 64])).all()


def test_s3_input_and_s3_lakehouse_round_trip(spark, settings: Settings, samples_dir: Path) -> None:  # type: ignore[no-untyped-def]
    bucket_in = make_bucket(settings, "cxr-raw")
    bucket_lake = make_bucket(settings, "cxr-lake")
    n = upload_dir(settings, samples_dir, f"{bucket_in}/archive")
    lake = f"{bucket_lake}/lakehouse"
    s = _run(spark, settings, f"{bucket_in}/archive", lake)
    assert (s.discovered, s.new, s.quarantined) == (n, len(VALID_KINDS), len(INVALID_KINDS)) and s.reconciles
    tensors = read_arrow(lake, TENSORS, settings)
    assert tensors.num_rows == len(VALID_KINDS)
    assert all(u.startswith("s3://cxr-raw/archive/") for u in tensors.column("source_uri").to_pylist())
    assert read_arrow(lake, QUARANTINE, settings).num_rows == len(INVALID_KINDS)
    again = _run(spark, settings, f"{bucket_in}/archive", lake)
    assert (again.new, again.already_present) == (0, len(VALID_KINDS))
    # the run summary went to the lakehouse too
    from lakehouse.storage import read_text

    assert '"reconciles": true' in read_text(f"{lake}/runs/{again.run_id}.json", settings)


def test_other_tensor_settings_are_refused_for_an_existing_table(
    spark, settings: Settings, first_run, samples_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    from lakehouse.errors import ConfigError

    lake, _ = first_run
    with pytest.raises(ConfigError, match="size=224.*this run asks for size=128"):
        _run(spark, settings.with_overrides(resize_size=128), samples_dir, lake)
