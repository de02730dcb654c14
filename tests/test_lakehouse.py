"""lakehouse/ contracts: settings, storage URIs, table specs, the Spark session factory's choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from lakehouse import storage
from lakehouse.config import DEV_PSEUDONYM_KEY, load_settings
from lakehouse.errors import ConfigError, StorageError
from lakehouse.tables import QUARANTINE, TENSORS, arrow_schema


def test_profiles_and_overrides() -> None:
    local = load_settings({})
    assert (local.profile, local.lakehouse_uri, local.spark_master, local.uses_dev_key) == (
        "local",
        "data/lakehouse",
        "local[*]",
        True,
    )
    aws = load_settings({"CXR_PROFILE": "aws", "CXR_PSEUDONYM_KEY": "secret", "CXR_MAX_PIXELS": "1_000"})
    assert (aws.lakehouse_uri, aws.spark_master, aws.uses_dev_key, aws.max_pixels) == ("", "", False, 1000)
    assert aws.with_overrides(max_pixels=None, resize_size=128).resize_size == 128
    assert DEV_PSEUDONYM_KEY not in repr(aws) and "secret" not in repr(aws)  # the key never reaches a log


@pytest.mark.parametrize("env", [{"CXR_PROFILE": "prod"}, {"CXR_TENSOR_DTYPE": "int8"}, {"CXR_MAX_PIXELS": "lots"}])
def test_bad_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_settings(env)


def test_uris(tmp_path: Path) -> None:
    assert storage.table_uri("s3://bucket/lake/", "tensors") == "s3://bucket/lake/tensors"
    assert storage.table_uri(str(tmp_path), "quarantine") == f"{tmp_path}/quarantine"
    assert storage.split_s3("s3://b/k/x.png") == ("b", "k/x.png")
    with pytest.raises(StorageError):
        storage.table_uri(str(tmp_path), "nope")
    with pytest.raises(StorageError):
        storage.split_s3("s3:///key")


def test_listing_includes_hidden_and_nested_files(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/b/x.dcm", ".hidden.png", "_underscore.png", "a/noext"):
        (tmp_path / name).write_bytes(b"x" * 3)
    listed = [f.uri for f in storage.list_files(str(tmp_path), load_settings({}))]
    assert listed == sorted(str(tmp_path / n) for n in ("a/b/x.dcm", ".hidden.png", "_underscore.png", "a/noext"))


def test_arrow_schema_matches_the_contract() -> None:
    import pyarrow as pa

    schema = arrow_schema(TENSORS)
    assert schema.field("tensor").type == pa.binary() and not schema.field("image_id").nullable
    assert schema.field("tensor_shape").type == pa.list_(pa.int32())
    assert schema.field("ingested_at").type == pa.timestamp("us", tz="UTC")
    assert arrow_schema(QUARANTINE).names[:2] == ["source_uri", "content_sha256"]


def test_spark_schema_matches_arrow_schema() -> None:
    from lakehouse.spark import spark_schema

    for spec in (TENSORS, QUARANTINE):
        spark_fields = spark_schema(spec).fields
        assert [f.name for f in spark_fields] == arrow_schema(spec).names
        assert [f.nullable for f in spark_fields] == [c.nullable for c in spec.columns]


def test_jar_resolution_prefers_local_maven_and_falls_back_to_delta_pip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lakehouse import spark as sp

    jars = sp.local_jars(load_settings({}))
    assert jars is not None, "run `make setup`: jvm/classpath.txt is missing"
    names = {Path(j).name for j in jars}
    assert f"delta-spark_2.13-{sp.DELTA_VERSION}.jar" in names
    assert f"hadoop-aws-{sp.HADOOP_VERSION}.jar" in names
    # the AWS SDK bundle of hadoop-aws 3.4.1 (2.24.6) carries an unshaded slf4j 1.x that silences Spark's log
    assert not any(n.startswith("bundle-2.24.") for n in names)
    assert not any(
        n.startswith(("jackson-databind", "scala-library", "hadoop-client-api")) for n in names
    )  # Spark's own win
    missing = load_settings({"CXR_SPARK_CLASSPATH_FILE": str(tmp_path / "missing.txt")})
    assert sp.local_jars(missing) is None
    opts = sp.spark_submit_options(missing)
    packages = f"io.delta:delta-spark_2.13:{sp.DELTA_VERSION},{sp.HADOOP_AWS_PACKAGE}"
    assert opts["packages"] == f"{packages},{sp.AWS_SDK_PACKAGE}"  # the SDK bundle jvm/pom.xml resolves too
    assert "driver_class_path" not in opts and "jars" not in opts

    # the standard path for machines with internet: configure_spark_with_delta_pip asks Ivy for the same jar
    from delta import configure_spark_with_delta_pip
    from pyspark.sql import SparkSession

    builder = configure_spark_with_delta_pip(SparkSession.builder, extra_packages=[sp.HADOOP_AWS_PACKAGE])
    assert builder._options["spark.jars.packages"] == packages  # type: ignore[attr-defined]


def test_symlinked_folders_are_listed_once(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.png").write_bytes(b"x")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    (real / "loop").symlink_to(real, target_is_directory=True)  # a loop must not hang the listing
    listed = [Path(f.uri).name for f in storage.list_files(str(tmp_path), load_settings({}))]
    assert listed.count("a.png") == 1


@pytest.mark.parametrize("override", [{"resize_size": 0}, {"files_per_task": 0}, {"max_pixels": -1}])
def test_overrides_are_validated(override: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        load_settings({}).with_overrides(**override)


def test_concurrent_delta_rs_merges_both_land(tmp_path: Path) -> None:
    """Parallel shards MERGE into one table: a commit conflict is retried, nothing is lost or doubled."""
    import threading
    from datetime import UTC, datetime

    import pyarrow as pa

    from lakehouse.delta_rs import ensure_table, merge_insert_new, read_arrow

    settings = load_settings({})
    ensure_table(str(tmp_path), QUARANTINE, settings)

    def rows(prefix: str) -> pa.Table:
        n = 20
        return pa.table(
            {
                "source_uri": [f"{prefix}{i}" for i in range(n)],
                "content_sha256": [None] * n,
                "source_bytes": [1] * n,
                "stage": ["test"] * n,
                "error_class": ["DecodeError"] * n,
                "error_message": ["x"] * n,
                "run_id": [prefix] * n,
                "quarantined_at": [datetime.now(UTC)] * n,
            }
        )

    inserted: list[int] = []
    threads = [
        threading.Thread(
            target=lambda p=p: inserted.append(merge_insert_new(str(tmp_path), QUARANTINE, rows(p), settings))
        )
        for p in "abcd"
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(inserted) == [20, 20, 20, 20]
    assert read_arrow(str(tmp_path), QUARANTINE, settings).num_rows == 80
    assert merge_insert_new(str(tmp_path), QUARANTINE, rows("a"), settings) == 0  # null-safe key: no double insert


def test_every_variable_lands_in_its_setting_with_its_source() -> None:
    env = {
        "CXR_PROFILE": "aws",
        "CXR_SPARK_UI": "true",
        "CXR_SHUFFLE_PARTITIONS": "3",
        "CXR_RETRY_DELAY_S": "5",
        "CXR_INFER_RUNNER": "process",
        "CXR_EMR_MODE": "cluster",
        "CXR_MALLOC_TUNING": "0",
        "CXR_INFER_AMP": "1",
        "CXR_WEIGHTS_SHA256_DENSENET121_RES224_ALL": "ABCDEF",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
    }
    s = load_settings(env)
    assert (s.spark.ui, s.spark.shuffle_partitions, s.airflow.retry_delay_s) == (True, 3, 5)
    assert (s.airflow.infer_runner, s.aws.emr_mode, s.inference.malloc_tuning) == ("process", "cluster", False)
    assert s.inference.amp is True and load_settings({}).inference.amp is False
    assert s.weights_sha256_for("densenet121-res224-all") == "abcdef" and s.weights_sha256_for("other") is None
    assert s.s3_endpoint_url == "http://127.0.0.1:5000" and s.source("s3_endpoint_url") == "env"
    assert (s.source("profile"), s.source("spark.ui"), s.source("spark.log_level")) == ("env", "env", "default")
    assert (
        s.source("lakehouse_uri") == "profile" and s.with_overrides(lakehouse_uri="x").source("lakehouse_uri") == "flag"
    )
    for bad in ({"CXR_SPARK_UI": "maybe"}, {"CXR_EMR_MODE": "yarn"}, {"CXR_SHUFFLE_PARTITIONS": "0"}):
        with pytest.raises(ConfigError):
            load_settings(bad)


def test_run_records_round_trip_and_one_run_is_read_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from lakehouse.runs import InferRun, PreprocessRun, RunRecord, read_summaries, reindex, write_summary

    settings = load_settings({})
    pre = PreprocessRun(run_id="pre-a", discovered=3, new=2, quarantined=1, quarantine_reasons={"DecodeError": 1})
    write_summary(str(tmp_path), pre, settings)
    write_summary(str(tmp_path), PreprocessRun(run_id="pre-ab", discovered=1, new=1), settings)
    inf = InferRun(run_id="inf-a", model_id="m", weights_sha256="s", tensors_version=1, device="cpu", predicted=2)
    write_summary(str(tmp_path), inf, settings, name="inf-a-m", extra_keys={"shard": "0/1"})
    (tmp_path / "runs" / "pre-z.json").write_text("{not json")  # another run's file, broken
    assert reindex(str(tmp_path), settings) == 1  # what `cxr maintain` does: the index learns of the file

    every = read_summaries(str(tmp_path), settings, kind=RunRecord)
    assert sorted(r.run_id for r in every) == ["inf-a", "pre-a", "pre-ab"] and "pre-z.json" in caplog.text
    caplog.clear()
    (only,) = read_summaries(str(tmp_path), settings, kind=PreprocessRun, run_id="pre-a")
    assert only == pre and only.reconciles and only.body["reconciles"] is True
    assert "pre-z.json" not in caplog.text  # files of other runs are not even read
    (scored,) = read_summaries(str(tmp_path), settings, kind=InferRun, run_id="inf-a")
    assert (scored.predicted, scored.body["shard"]) == (2, "0/1")
    assert read_summaries(str(tmp_path), settings, kind=InferRun, run_id="pre-a") == []


def test_every_run_summary_comes_from_the_run_index(tmp_path: Path) -> None:
    """Reading every summary reads the index, not the folder: with the JSON copies gone the records are
    still there; a lakehouse made before the index gets one from its folder, on first read or write."""
    import shutil

    from lakehouse.runs import PreprocessRun, RunRecord, read_summaries, write_summary

    settings = load_settings({})
    lake = str(tmp_path)
    for k in range(3):
        write_summary(lake, PreprocessRun(run_id=f"pre-{k}", discovered=k, new=k), settings)
    write_summary(lake, PreprocessRun(run_id="pre-1", discovered=5, new=5), settings)  # a retry rewrites it
    for f in (tmp_path / "runs").glob("*.json"):
        f.unlink()
    every = read_summaries(lake, settings, kind=RunRecord)
    assert [(r.run_id, r.discovered) for r in every] == [("pre-0", 0), ("pre-1", 5), ("pre-2", 2)]
    assert all(isinstance(r, PreprocessRun) and r.reconciles for r in every)

    # an older lakehouse: summaries and no index
    old = tmp_path / "old"
    for k in range(2):
        write_summary(str(old), PreprocessRun(run_id=f"pre-{k}", discovered=1, new=1), settings)
    shutil.rmtree(old / "run_index")
    assert [r.run_id for r in read_summaries(str(old), settings, kind=RunRecord)] == ["pre-0", "pre-1"]
    assert (old / "run_index" / "_delta_log").is_dir()
    shutil.rmtree(old / "run_index")
    write_summary(str(old), PreprocessRun(run_id="pre-2", discovered=1, new=1), settings)  # the index starts whole
    for f in (old / "runs").glob("*.json"):
        f.unlink()
    assert [r.run_id for r in read_summaries(str(old), settings, kind=RunRecord)] == ["pre-0", "pre-1", "pre-2"]


def _tensor_rows(n: int, seed: int) -> object:
    """n tensors rows of random 100 KB payloads (every column filled with a plausible value)."""
    import hashlib
    from datetime import UTC, datetime

    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    schema = arrow_schema(TENSORS)
    cols: dict[str, object] = {}
    for f in schema:
        if f.name == "image_id":
            cols[f.name] = [hashlib.sha256(f"{seed}-{i}".encode()).hexdigest() for i in range(n)]
        elif f.name == "tensor":
            cols[f.name] = [rng.integers(0, 255, 100_000, dtype=np.uint8).tobytes() for _ in range(n)]
        elif pa.types.is_list(f.type):
            cols[f.name] = [[1, 224, 224]] * n
        elif pa.types.is_timestamp(f.type):
            cols[f.name] = [datetime.now(UTC)] * n
        elif pa.types.is_string(f.type):
            cols[f.name] = ["float16" if f.name == "tensor_dtype" else "x"] * n
        elif pa.types.is_boolean(f.type):
            cols[f.name] = [False] * n
        else:
            cols[f.name] = pa.array([1] * n).cast(f.type)
    return pa.Table.from_pydict(cols, schema=schema)


def _read_chars() -> int:
    """Bytes this process has read through read(2) so far (page-cache hits included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts bytes read through /proc/self/io (Linux)")
def test_rows_by_id_read_only_the_row_groups_that_hold_them(tmp_path: Path) -> None:
    """A few images out of a table of several files read the tensor bytes of their row groups only."""
    from lakehouse import delta_rs

    settings, lake = load_settings({}), str(tmp_path)
    files = []
    for k in range(3):
        rows = _tensor_rows(256, seed=k)
        files.append(delta_rs.write_data_file(lake, TENSORS, rows, settings, row_group_size=64))  # type: ignore[arg-type]
    delta_rs.commit_data_files(lake, TENSORS, files, settings, run_id="r")
    every = delta_rs.read_arrow(lake, TENSORS, settings, columns=["image_id"]).column("image_id").to_pylist()
    wanted = [every[5], every[300], every[301]]  # row group 0 of file 0, row group 0 of file 1

    before = _read_chars()
    got = delta_rs.read_rows_by_id(lake, TENSORS, settings, wanted, columns=["image_id", "tensor"])
    few = _read_chars() - before
    before = _read_chars()
    whole = delta_rs.read_arrow(lake, TENSORS, settings, columns=["image_id", "tensor"])
    everything = _read_chars() - before

    assert sorted(got.column("image_id").to_pylist()) == sorted(wanted)
    expected = {r["image_id"]: r["tensor"] for r in whole.to_pylist() if r["image_id"] in wanted}
    assert {r["image_id"]: r["tensor"] for r in got.to_pylist()} == expected
    assert everything > 3 * 256 * 100_000  # the tensors are incompressible: the whole table is ~77 MB
    assert few < 2.5 * 64 * 100_000  # two row groups of 64 tensors, plus ids and footers
    assert delta_rs.read_rows_by_id(lake, TENSORS, settings, [], columns=["image_id"]).num_rows == 0
    # the run that wrote them, when known, prunes the other runs' files: none opened here
    assert delta_rs.read_rows_by_id(lake, TENSORS, settings, wanted, columns=["image_id"], run_ids=["x"]).num_rows == 3
    before = _read_chars()
    assert (
        delta_rs.read_rows_by_id(lake, TENSORS, settings, wanted, columns=["tensor"], run_ids=["other"]).num_rows == 0
    )
    assert _read_chars() - before < 64 * 100_000 / 4


def test_run_ids_come_from_the_log_statistics(tmp_path: Path) -> None:
    """run_ids: one-run files are known from their min = max statistics without being opened; files that
    mix runs, and run ids too long for exact statistics, are read."""
    from datetime import UTC, datetime

    import pyarrow as pa

    from lakehouse import delta_rs

    settings, lake = load_settings({}), str(tmp_path)
    long_id = "pre-manual__2026-12-01T10_00_00.123456_00_00-" + "x" * 40  # longer than the 64-char statistics

    def rows(run_ids: list[str], start: int) -> pa.Table:
        n = len(run_ids)
        return pa.table(
            {
                "source_uri": [f"s3://b/{start + i}.png" for i in range(n)],
                "content_sha256": [None] * n,
                "source_bytes": [1] * n,
                "stage": ["preprocess"] * n,
                "error_class": ["DecodeError"] * n,
                "error_message": ["bad"] * n,
                "run_id": run_ids,
                "quarantined_at": [datetime.now(UTC)] * n,
            }
        )

    delta_rs.merge_insert_new(lake, QUARANTINE, rows(["pre-a", "pre-a"], 0), settings)
    delta_rs.merge_insert_new(lake, QUARANTINE, rows(["pre-b", "pre-c"], 10), settings)  # one file, two runs
    delta_rs.merge_insert_new(lake, QUARANTINE, rows([long_id], 20), settings)
    first = delta_rs.open_table(lake, QUARANTINE, settings).version()
    delta_rs.merge_insert_new(lake, QUARANTINE, rows(["pre-d"], 30), settings)
    assert delta_rs.run_ids(lake, QUARANTINE, settings) == {"pre-a", "pre-b", "pre-c", long_id, "pre-d"}
    assert delta_rs.run_ids(lake, QUARANTINE, settings, version=first) == {"pre-a", "pre-b", "pre-c", long_id}
    # a one-run file is not opened: with its data gone, its run is still known from the log
    actions = pa.table(delta_rs.open_table(lake, QUARANTINE, settings).get_add_actions(flatten=True))
    single = [
        str(p)
        for p, lo, hi in zip(
            *(actions.column(c).to_pylist() for c in ("path", "min.run_id", "max.run_id")), strict=True
        )
        if lo == hi == "pre-d"
    ]
    assert len(single) == 1
    (tmp_path / "quarantine" / single[0]).unlink()
    assert "pre-d" in delta_rs.run_ids(lake, QUARANTINE, settings)


def test_newest_fanout_and_a_rewritten_summary_is_reindexed(tmp_path: Path) -> None:
    """A run rerun with another shard count keeps only its newest fan-out's summaries; a summary rewritten
    after its index row (the index append failed) is indexed again by reindex."""
    import os
    import time

    from lakehouse.runs import InferRun, RunRecord, newest_fanout, read_summaries, reindex, write_summary

    settings, lake = load_settings({}), str(tmp_path)

    def shard(i: int, n: int, predicted: int) -> None:
        rec = InferRun(run_id="inf-x", model_id="m", weights_sha256="s", tensors_version=1, device="cpu")
        rec.predicted = predicted
        write_summary(lake, rec, settings, name=f"inf-x-shard-{i}-of-{n}-m", extra_keys={"shard": f"{i}/{n}"})

    for i in range(3):
        shard(i, 3, 10)
    time.sleep(0.01)
    for i in range(2):
        shard(i, 2, 7)  # the rerun, with two shards
    every = read_summaries(lake, settings, kind=InferRun)
    assert len(every) == 5
    kept = newest_fanout(every)
    assert sorted(r.body["shard"] for r in kept) == ["0/2", "1/2"] and sum(r.predicted for r in kept) == 14

    # rewritten on disk after it was indexed, without an index row: maintain's reindex picks it up
    path = tmp_path / "runs" / "inf-x-shard-0-of-2-m.json"
    path.write_text(path.read_text().replace('"predicted": 7', '"predicted": 9'))
    later = time.time() + 5
    os.utime(path, (later, later))
    before = {r.uri: r.predicted for r in read_summaries(lake, settings, kind=RunRecord)}  # type: ignore[attr-defined]
    assert before[str(path)] == 7
    assert reindex(lake, settings) == 1
    after = {r.uri: r.predicted for r in read_summaries(lake, settings, kind=RunRecord)}  # type: ignore[attr-defined]
    assert after[str(path)] == 9 and reindex(lake, settings) == 0
