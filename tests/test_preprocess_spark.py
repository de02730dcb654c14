"""The Spark preprocessing job end to end: real Spark, real Delta, a real local S3 server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from lakehouse.config import Settings
from lakehouse.delta_rs import open_table, read_arrow
from lakehouse.runs import PreprocessRun
from lakehouse.tables import FILES, QUARANTINE, TENSORS, decode_tensor
from tests.conftest import TEST_KEY, kill_group_when, make_bucket, scramble_keeping_size_and_mtime, upload_dir
from transforms.decode import pseudonymize
from transforms.preprocess import run_preprocess
from transforms.sample import (
    INVALID_KINDS,
    SKIPPED_KINDS,
    VALID_KINDS,
    Identity,
    dicom_bytes,
    png_bytes,
    synthetic_cxr,
    to_uint,
)
from transforms.tensor import PreprocessParams, preprocess_bytes

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
#: what the job counts for the sample set's one file of every skipped and invalid kind
SKIP_REASONS = {"ModalityNotAllowed": 1, "MultiFrame": 1, "NoPixelData": 2}
QUARANTINE_REASONS = {
    "DecodeError": 3,
    "EmptyFileError": 1,
    "ImageTooLargeError": 1,
    "UnsupportedFormatError": 3,
    "UnsupportedImageError": 1,
}


def _run(spark, settings: Settings, input_uri: str | Path, lakehouse: str | Path, **kw) -> PreprocessRun:  # type: ignore[no-untyped-def]
    return run_preprocess(str(input_uri), str(lakehouse), settings=settings, spark=spark, progress=False, **kw)


@pytest.fixture(scope="module")
def archive(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's copy of the sample set (every valid, invalid and skipped kind): the rerun test
    overwrites its files for a moment, which the session's read-only ``samples_dir`` must never see."""
    out = tmp_path_factory.mktemp("archive") / "samples"
    shutil.copytree(samples_dir, out)
    return out


@pytest.fixture(scope="module")
def first_run(spark, settings: Settings, archive: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    lake = tmp_path_factory.mktemp("lake")
    summary = _run(spark, settings, archive, lake)
    return lake, summary


def _inputs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_counts_reconcile_and_every_input_is_accounted_for(first_run, archive: Path, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    lake, s = first_run
    n_valid, n_invalid, n_skipped = len(VALID_KINDS), len(INVALID_KINDS), len(SKIPPED_KINDS)
    assert s.discovered == len(_inputs(archive)) == n_valid + n_invalid + n_skipped == 30
    assert (s.new, s.already_present, s.duplicates, s.skipped, s.quarantined, s.retryable) == (
        n_valid,
        0,
        0,
        n_skipped,
        n_invalid,
        0,
    )
    assert (s.skip_reasons, s.quarantine_reasons) == (SKIP_REASONS, QUARANTINE_REASONS)
    # every file goes to the decoder but those skipped from their header (a bomb is refused by the decoder)
    assert (s.decoded, s.previously, s.content_present, s.first_seen) == (n_valid + n_invalid, {}, 0, 26)
    # one commit: the first batch is up to four waves of tasks (4 x 8 files per task x 2 cores = 64 files)
    assert (s.batches, s.reconciles) == (1, True)
    tensors = read_arrow(str(lake), TENSORS, settings)
    quarantine = read_arrow(str(lake), QUARANTINE, settings)
    # every input has exactly one judgement in the ledger, and it agrees with the table it landed in
    ledger = read_arrow(str(lake), FILES, settings).to_pylist()
    outcome = {r["source_uri"]: r["outcome"] for r in ledger}
    assert len(ledger) == len(outcome) == s.discovered and {r["run_id"] for r in ledger} == {s.run_id}
    expected = {
        str(p): {"invalid": "quarantined", "not_radiographs": "skipped"}.get(p.parent.name, "new")
        for p in _inputs(archive)
    }
    assert outcome == expected
    assert sorted(tensors.column("source_uri").to_pylist()) == sorted(u for u, o in expected.items() if o == "new")
    assert sorted(quarantine.column("source_uri").to_pylist()) == sorted(
        u for u, o in expected.items() if o == "quarantined"
    )


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
    # the kinds skipped by design have their reason in the ledger, not a quarantine row
    ledger = {Path(r["source_uri"]).name: r for r in read_arrow(str(lake), FILES, settings).to_pylist()}
    for kind, (fname, _, reason) in SKIPPED_KINDS.items():
        row = ledger[f"{kind}_{fname}"]
        assert (row["outcome"], row["reason_class"]) == ("skipped", reason) and row["reason"], kind
        assert f"{kind}_{fname}" not in by_name


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


def test_rerun_is_idempotent(spark, settings: Settings, archive: Path, first_run) -> None:  # type: ignore[no-untyped-def]
    """A rerun over the unchanged archive reads no file at all: every input was judged by the first run,
    whatever its outcome (new, quarantined or skipped), and is known by path, size and mtime."""
    lake, first = first_run
    tables = (TENSORS, QUARANTINE, FILES)
    versions = [open_table(str(lake), spec, settings).version() for spec in tables]
    inputs = _inputs(archive)
    originals = {p: (p.read_bytes(), p.stat()) for p in inputs}
    scramble_keeping_size_and_mtime(inputs)
    try:
        again = _run(spark, settings, archive, lake)
    finally:  # the other tests of the module read the archive's real bytes
        for p, (data, st) in originals.items():
            p.write_bytes(data)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (again.discovered, again.new, again.already_present, again.duplicates) == (30, 0, first.discovered, 0)
    assert (again.skipped, again.quarantined, again.retryable, again.decoded, again.batches) == (0, 0, 0, 0, 0)
    assert again.previously == {"new": first.new, "quarantined": first.quarantined, "skipped": first.skipped}
    assert (again.first_seen, again.content_present, again.reconciles) == (0, 0, True)
    # not read: the zeroed bytes would have made new quarantine rows, ledger rows or tensors
    assert [open_table(str(lake), spec, settings).version() for spec in tables] == versions
    assert read_arrow(str(lake), TENSORS, settings).num_rows == first.new
    assert read_arrow(str(lake), QUARANTINE, settings).num_rows == first.quarantined
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
    assert (s2.previously, s2.content_present, s2.first_seen) == ({"new": 12}, 1, 4)
    assert read_arrow(str(lake), TENSORS, settings).num_rows == 15


def test_same_bytes_under_two_paths_give_one_row(spark, settings: Settings, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    inp, lake = tmp_path / "in", tmp_path / "lake"
    (inp / "x").mkdir(parents=True)
    img = png_bytes(to_uint(synthetic_cxr(64, 64, seed=1), 8))
    for name in ("x/one.png", "x/two.png", "zz_three.png"):
        (inp / name).write_bytes(img)
    (inp / "other.png").write_bytes(png_bytes(to_uint(synthetic_cxr(64, 64, seed=2), 8)))
    # one file per task, two per batch: other.png and x/one.png commit first; the two later
    # copies are decoded in the second batch's two partitions and resolved against the first batch
    s = _run(spark, settings.with_overrides(files_per_task=1, commit_every_images=2), inp, lake)
    assert (s.discovered, s.new, s.duplicates, s.decoded, s.batches) == (4, 2, 2, 4, 2)
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
    # each data file is sorted by image_id (inference shards are id ranges: they skip other row groups)
    import pyarrow.parquet as pq

    for f in _data_files(lake):
        file_ids = pq.read_table(lake / "tensors" / f, columns=["image_id"]).column("image_id").to_pylist()
        assert file_ids == sorted(file_ids), f


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
            known_ids=pp.KnownIds([]),
            params=params,
            settings=settings,
            lakehouse_uri=str(lake),
            lineage=lineage,
            rows_per_file=rows_per_file,
        )
        return pa.Table.from_batches(list(out)).to_pylist()

    read_version = open_table(str(lake), TENSORS, settings).version()  # what this run read before decoding
    ours = work([f"img{i}.png" for i in range(5)], rows_per_file=3)  # two data files: 3 + 2 rows
    written = [DataFile(**json.loads(r["data_file_meta"])) for r in ours if r["data_file_meta"]]
    assert [f.num_records for f in written] == [3, 2] and len(_files_on_disk(lake)) == 2
    assert _committed_files(lake, settings) == set()  # written, not yet visible
    # another run commits img1 first
    theirs = work(["img1.png"], rows_per_file=10)
    their_file = DataFile(**json.loads(theirs[0]["data_file_meta"]))
    delta_rs.commit_data_files(str(lake), TENSORS, [their_file], settings, run_id="other")
    state = pp._RunState(first_of={}, tensors_version=read_version, start_version=read_version)
    files, present, _ = pp._without_rows(str(lake), ours, {}, written, state, settings)
    assert present == {str(inp / "img1.png")}  # judged already present, not new
    assert [f.num_records for f in files] == [2, 2]  # the untouched file, then the rewrite of the other
    assert written[1] in files and written[0] not in files
    assert delta_rs.commit_data_files(str(lake), TENSORS, files, settings, run_id="r") == 4
    t = read_arrow(str(lake), TENSORS, settings)
    assert t.num_rows == 5 and len(set(t.column("image_id").to_pylist())) == 5
    assert _files_on_disk(lake) == _committed_files(lake, settings)  # the replaced file was deleted
    # the check reads the files added since the run started, except the run's own: theirs alone here
    state.own_files.update(f.path for f in files)
    since = delta_rs.ids_added_since(str(lake), TENSORS, settings, read_version, exclude=state.own_files)
    assert since == {theirs[0]["image_id"]}
    assert (
        delta_rs.ids_added_since(str(lake), TENSORS, settings, open_table(str(lake), TENSORS, settings).version())
        == set()
    )


def test_known_ids_are_exact_and_compact() -> None:
    """The keys shipped to the workers: membership is exact (a digest one bit off is not known), and the
    broadcast costs 32 bytes per key."""
    import hashlib
    import pickle

    from transforms.preprocess import KnownIds

    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5000)]
    known = KnownIds(ids[::2])
    assert all(i in known for i in ids[::2]) and not any(i in known for i in ids[1::2])
    near = ids[0][:-1] + ("0" if ids[0][-1] != "0" else "1")
    assert near not in known and "not-hex" not in known and None not in known
    assert len(known) == 2500 and len(pickle.dumps(known)) < 2500 * 32 + 1024
    assert ids[0] not in KnownIds([])


def _data_files(lake: Path) -> dict[str, int]:
    """The tensors data files on disk (relative to the table root, as the log names them) and their sizes."""
    root = lake / "tensors"
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*.parquet") if "_delta_log" not in p.parts}


def test_a_kill_before_the_first_commit_leaves_only_orphans(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real `cxr preprocess` process group killed with SIGKILL inside its first batch: its workers
    have written tensors data files, the batch is not committed. Nothing is visible, nothing is judged,
    the rerun does the whole work once, and `cxr maintain --older-than 0` removes exactly the killed
    run's data files. (tests/test_incremental.py kills a run after some of its batches committed.)"""
    from cxr.cli import main
    from lakehouse.maintain import referenced_paths

    inp, lake = tmp_path / "in", tmp_path / "lake"
    inp.mkdir()
    total = 80
    for i in range(total):
        (inp / f"k{i:03d}.png").write_bytes(png_bytes(to_uint(synthetic_cxr(64, 64, seed=500 + i), 8)))
    env = {
        **os.environ,
        "CXR_PSEUDONYM_KEY": TEST_KEY,
        "CXR_SPARK_MASTER": "local[2]",
        "CXR_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "PYTHONPATH": str(REPO),
    }
    cmd = [
        sys.executable,
        "-m",
        "cxr.cli",
        "preprocess",
        "--input",
        str(inp),
        "--lakehouse",
        str(lake),
        "--no-progress",
    ]
    # one batch of 8 tasks of 10 files, two at a time: each task writes its data file when it ends, the
    # batch commits after the last one, so the first file appears seconds before the commit
    killed_env = {
        **env,
        "CXR_FILES_PER_TASK": "10",
        "PYSPARK_SUBMIT_ARGS": "--conf spark.default.parallelism=8 pyspark-shell",
    }
    kill_group_when([*cmd, "--run-id", "killed"], killed_env, REPO, lambda: bool(_data_files(lake)), poll_s=0.05)
    orphans = _data_files(lake)
    # killed before the commit: the table is still its empty version 0, no file was judged, no summary
    assert orphans and open_table(str(lake), TENSORS, settings).version() == 0
    assert read_arrow(str(lake), TENSORS, settings).num_rows == 0
    assert referenced_paths(str(lake), TENSORS, settings) == set()
    assert not (lake / "files").exists() and not (lake / "runs").exists()

    rerun = subprocess.run(
        [*cmd, "--run-id", "rerun", "--json"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    s = json.loads(rerun.stdout)
    assert (s["discovered"], s["new"], s["decoded"], s["already_present"], s["previously"]) == (
        total,
        total,
        total,
        0,
        {},
    )
    assert s["reconciles"]
    t = read_arrow(str(lake), TENSORS, settings, columns=["image_id", "run_id"])
    assert t.num_rows == total == len(set(t.column("image_id").to_pylist()))
    assert set(t.column("run_id").to_pylist()) == {"rerun"}
    referenced = referenced_paths(str(lake), TENSORS, settings)
    assert set(_data_files(lake)) - referenced == set(orphans)  # the killed run's files, and only those

    capsys.readouterr()
    assert main(["maintain", "--lakehouse", str(lake), "--older-than", "0", "--json"]) == 0
    upkeep = {u["table"]: u for u in json.loads(capsys.readouterr().out)["tables"]}
    assert (upkeep["tensors"]["orphans_deleted"], upkeep["tensors"]["bytes_freed"]) == (
        len(orphans),
        sum(orphans.values()),
    )
    assert set(_data_files(lake)) == referenced and not set(_data_files(lake)) & set(orphans)
    assert read_arrow(str(lake), TENSORS, settings).num_rows == total


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
    assert (s.discovered, s.new, s.skipped, s.quarantined) == (
        n,
        len(VALID_KINDS),
        len(SKIPPED_KINDS),
        len(INVALID_KINDS),
    )
    assert (s.skip_reasons, s.quarantine_reasons, s.reconciles) == (SKIP_REASONS, QUARANTINE_REASONS, True)
    tensors = read_arrow(lake, TENSORS, settings)
    assert tensors.num_rows == len(VALID_KINDS)
    assert all(u.startswith("s3://cxr-raw/archive/") for u in tensors.column("source_uri").to_pylist())
    assert read_arrow(lake, QUARANTINE, settings).num_rows == len(INVALID_KINDS)
    ledger = read_arrow(lake, FILES, settings, columns=["source_uri", "outcome"])
    assert ledger.num_rows == n and all(
        u.startswith("s3://cxr-raw/archive/") for u in ledger.column("source_uri").to_pylist()
    )
    # the objects' size and LastModified identify them on S3 as a file's size and mtime do: nothing is read again
    again = _run(spark, settings, f"{bucket_in}/archive", lake)
    assert (again.new, again.already_present, again.decoded) == (0, n, 0)
    assert again.previously == {
        "new": len(VALID_KINDS),
        "quarantined": len(INVALID_KINDS),
        "skipped": len(SKIPPED_KINDS),
    }
    # the run summary went to the lakehouse too
    from lakehouse.storage import read_text

    assert '"reconciles": true' in read_text(f"{lake}/runs/{again.run_id}.json", settings)


def test_other_tensor_settings_are_refused_for_an_existing_table(
    spark, settings: Settings, first_run, archive: Path
) -> None:  # type: ignore[no-untyped-def]
    from lakehouse.errors import ConfigError

    lake, _ = first_run
    with pytest.raises(ConfigError, match="size=224.*this run asks for size=128"):
        _run(spark, settings.with_overrides(resize_size=128), archive, lake)
