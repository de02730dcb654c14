"""The Airflow DAG, local profile: DagBag integrity and parse cost, then whole runs with ``cxr run``
(``dag.test()`` in a child process: real spark-submit, the real inference process, real GX, SQLite
Airflow home), on a folder and on the local S3 server, with a failure injected into ``infer``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from deltalake import DeltaTable

from lakehouse.config import Settings
from lakehouse.tables import PREDICTIONS, TENSORS
from tests.conftest import DAG_TASKS, MODEL, TEST_KEY, make_bucket, upload_dir
from transforms.sample import INVALID_KINDS, VALID_KINDS

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CXR = str(Path(PY).parent / "cxr")


def _airflow_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CXR_", "AIRFLOW"))}
    env.update(
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        CXR_PSEUDONYM_KEY=TEST_KEY,
        CXR_RETRY_DELAY_S="1",
        CXR_POKE_INTERVAL_S="1",
        CXR_INFER_RUNNER="process",
        # the sample set holds one file of every invalid kind on purpose
        CXR_MAX_QUARANTINE_SHARE="0.5",
        CXR_SPARK_MASTER="local[2]",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


PARSE_PROBE = textwrap.dedent(
    """
    import json, sys, time
    import airflow.sdk  # Airflow itself is not what we measure
    from airflow.dag_processing.dagbag import DagBag
    before = set(sys.modules)
    t = time.perf_counter()
    bag = DagBag(dag_folder=sys.argv[1])
    seconds = time.perf_counter() - t
    dag = bag.dags["xray_inference_pipeline"]
    heavy = sorted({m.split(".")[0] for m in set(sys.modules) - before}
                   & {"pyspark", "torch", "torchxrayvision", "great_expectations", "deltalake", "duckdb", "cv2"})
    print(json.dumps({
        "errors": {k: str(v) for k, v in bag.import_errors.items()},
        "seconds": seconds,
        "heavy": heavy,
        "tags": sorted(dag.tags),
        "doc_md": bool(dag.doc_md),
        "params": sorted(dag.params.keys()),
        "tasks": {t.task_id: {"retries": t.retries, "backoff": t.retry_exponential_backoff,
                               "mapped": t.is_mapped,
                               "expand": repr(t.expand_input.value) if t.is_mapped else None,
                               "partial": {k: str(v) for k, v in t.partial_kwargs.items()} if t.is_mapped else None,
                               "timeout": t.execution_timeout.total_seconds() if t.execution_timeout else None,
                               "callback": bool(t.on_failure_callback),
                               "downstream": sorted(t.downstream_task_ids),
                               "outlets": [getattr(o, "name", str(o)) for o in t.outlets],
                               "operator": (t.operator_class if t.is_mapped else type(t)).__name__,
                               "operator_module": (t.operator_class if t.is_mapped else type(t)).__module__,
                               "callable": (lambda f: f and f"{f.__module__}.{f.__name__}")(
                                   getattr(t, "python_callable", None)),
                               "command": getattr(t, "command", None) or getattr(t, "bash_command", None),
                               "image": getattr(t, "image", None),
                               "op_kwargs": getattr(t, "op_kwargs", None)}
                  for t in dag.tasks},
    }, default=str))
    """
)


def _parse(tmp_path: Path, **env: str) -> dict:
    out = subprocess.run(
        [PY, "-c", PARSE_PROBE, str(ROOT / "dags")],
        env=_airflow_env(tmp_path, **env),
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dagbag_integrity_and_parse_cost(tmp_path: Path) -> None:
    info = _parse(tmp_path)
    assert info["errors"] == {}
    assert info["seconds"] < 2.0, info["seconds"]
    assert info["heavy"] == [], f"parsing imported {info['heavy']}"
    assert {"cxr", "inference", "profile:local"} <= set(info["tags"])
    assert info["doc_md"]
    assert info["params"] == [
        "allow_untrained",
        "infer_shards",
        "input_uri",
        "labels_key",
        "labels_uri",
        "lakehouse_uri",
        "models",
        "thresholds",
        "weights_dir",
    ]
    tasks = info["tasks"]
    order = DAG_TASKS
    assert sorted(tasks) == sorted(order)
    for up, down in zip(order, order[1:], strict=False):
        assert tasks[up]["downstream"] == [down], (up, tasks[up]["downstream"])
    assert tasks["maintain"]["downstream"] == []  # the last task
    for task_id, t in tasks.items():
        assert t["retries"] >= 2 and t["backoff"] and t["callback"], task_id
        assert t["timeout"] and t["timeout"] > 0, task_id
    assert tasks["preprocess"]["outlets"] == ["cxr_tensors"]
    assert tasks["infer"]["outlets"] == ["cxr_predictions"]
    # inference fans out: one mapped instance per item the plan returns (the local process here)
    assert [t for t, v in tasks.items() if v["mapped"]] == ["infer"]
    assert (
        tasks["infer"]["expand"] == "{'bash_command': XComArg(<Task(PythonOperator): plan_infer>).map(process_command)}"
    )
    # the tree: operators built in cxr.operators, every Python callable is a cxr.tasks function
    assert (tasks["preprocess"]["operator"], tasks["preprocess"]["operator_module"]) == (
        "CxrSparkSubmitOperator",
        "cxr.operators",
    )
    callables = {task_id: t["callable"] for task_id, t in tasks.items() if t["callable"]}
    assert callables == {
        "wait_for_images": "cxr.tasks.new_images_waiting",
        "validate_tensors": "cxr.tasks.validate_stage",
        "plan_infer": "cxr.tasks.plan_infer_stage",
        "drift": "cxr.tasks.drift_stage",
        "validate_predictions": "cxr.tasks.validate_stage",
        "evaluate": "cxr.tasks.evaluate_stage",
        "publish": "cxr.tasks.publish_stage",
        "report": "cxr.tasks.report_stage",
        "maintain": "cxr.tasks.maintain_stage",
    }
    # only orphans a day old go: the files of a run writing right now (not committed yet) are never touched
    assert tasks["maintain"]["op_kwargs"] == {"lakehouse_uri": "{{ params.lakehouse_uri }}", "older_than_hours": 24.0}


INJECT = textwrap.dedent(
    """\
    #!/usr/bin/env bash
    # First attempt: run the real job committing every 4 images, SIGKILL it right after its first
    # commit to `predictions`, and fail. Later attempts: the real command.
    attempts="{marker}"
    n=$(cat "$attempts" 2>/dev/null || echo 0); echo $((n + 1)) > "$attempts"
    if [ "$n" = "0" ] && [ "$1" = "infer" ]; then
      "{real}" "$@" --commit-every 4 & pid=$!
      for _ in $(seq 1 2400); do
        if [ -e "$CXR_LAKEHOUSE_URI/predictions/_delta_log/00000000000000000001.json" ]; then
          kill -9 $pid; echo killed > "$attempts.killed"; exit 1
        fi
        kill -0 $pid 2>/dev/null || break
        sleep 0.05
      done
      wait $pid; exit 1
    fi
    exec "{real}" "$@"
    """
)


def _cxr_run(tmp_path: Path, input_uri: str, lake: str, env: dict[str, str], weights: Path, *more: str) -> str:
    out = subprocess.run(
        [CXR, "run", "--input", input_uri, "--lakehouse", lake, "--model", MODEL, "--weights-dir", str(weights), *more],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout


@pytest.mark.slow
def test_local_dag_end_to_end_with_a_failed_infer_attempt(tmp_path: Path, samples_dir: Path, checkpoint: Path) -> None:
    marker = tmp_path / "infer-attempts"
    wrapper = tmp_path / "cxr-wrapper"
    wrapper.write_text(INJECT.format(marker=marker, real=CXR))
    wrapper.chmod(0o755)
    lake = tmp_path / "lake"
    env = _airflow_env(tmp_path, CXR_CLI=str(wrapper))
    stdout = _cxr_run(tmp_path, str(samples_dir), str(lake), env, checkpoint.parent)

    # the injected failure happened after a partial commit, and the retry completed the work
    assert marker.read_text().strip() == "2" and (tmp_path / "infer-attempts.killed").exists()
    partial = DeltaTable(str(lake / "predictions"), version=1).to_pyarrow_table(columns=["image_id"])
    assert 0 < partial.num_rows < len(VALID_KINDS)
    tensors = DeltaTable(str(lake / "tensors")).to_pyarrow_table(columns=["image_id"])
    preds = DeltaTable(str(lake / "predictions")).to_pyarrow_table(columns=["image_id", "model_id", "run_id"])
    assert tensors.num_rows == len(VALID_KINDS)
    pairs = list(zip(preds.column("image_id").to_pylist(), preds.column("model_id").to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == len(VALID_KINDS), "duplicates or missing predictions after the retry"
    assert set(preds.column("model_id").to_pylist()) == {MODEL}
    assert set(preds.column("image_id").to_pylist()) == set(tensors.column("image_id").to_pylist())
    quarantine = DeltaTable(str(lake / "quarantine")).to_pyarrow_table(columns=["source_uri"])
    assert quarantine.num_rows == len(INVALID_KINDS)

    # audited, published, reported
    docs = lake / "reports" / "data_docs" / "index.html"
    assert docs.exists() and "predictions" in docs.read_text()
    for table in ("tensors", "quarantine", "predictions"):
        assert json.loads((lake / "reports" / "validation" / f"{table}.json").read_text())["success"] is True
    published = json.loads((lake / "reports" / "published.json").read_text())
    assert published["versions"]["tensors"] == DeltaTable(str(lake / "tensors")).version()
    # maintenance (after publish) had too few small files of predictions to compact: published is latest
    preds_dt = DeltaTable(str(lake / "predictions"))
    at_publish = published["versions"]["predictions"]
    assert preds_dt.version() == at_publish

    def rows(dt: DeltaTable) -> list[tuple[str, ...]]:
        t = dt.to_pyarrow_table(columns=["image_id", "model_id", "run_id"])
        return sorted(zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True))

    assert rows(DeltaTable(str(lake / "predictions"), version=at_publish)) == rows(preds_dt)
    html = (lake / "reports" / "report.html").read_text()
    assert published["run_id"] in html and MODEL in html
    runs = sorted(p.name for p in (lake / "runs").glob("*.json"))
    assert any(r.startswith("pre-manual") for r in runs) and any(r.startswith("inf-manual") for r in runs), runs
    assert "pipeline run manual__" in stdout and ": success" in stdout
    assert f"report:    {lake}/reports/report.html" in stdout
    # the last task, maintenance, ran after the report
    assert "  maintain               success" in stdout, stdout
    assert stdout.index("  report ") < stdout.index("  maintain ")

    # a second run over the same folder finds nothing new: the sensor soft-fails and the run is skipped
    env2 = {**env, "CXR_WAIT_TIMEOUT_S": "3"}
    out = subprocess.run(
        [CXR, "run", "--input", str(samples_dir), "--lakehouse", str(lake), "--model", MODEL],
        env=env2,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "wait_for_images        skipped" in out.stdout and "preprocess             skipped" in out.stdout
    assert DeltaTable(str(lake / "predictions")).version() == preds_dt.version()


@pytest.mark.slow
def test_local_dag_on_the_local_s3_server(
    tmp_path: Path, settings: Settings, samples_dir: Path, checkpoint: Path
) -> None:
    from lakehouse.storage import write_text

    bucket = make_bucket(settings, "dag-e2e")
    valid = tmp_path / "valid"
    valid.mkdir()
    for p in sorted(samples_dir.rglob("*")):  # valid kinds only: the quarantine share gate stays default
        if p.is_file() and p.relative_to(samples_dir).parts[0] in ("images", "dicom"):
            dst = valid / p.relative_to(samples_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
    n = upload_dir(settings, valid, f"{bucket}/in")
    # labels on S3 (tidy, keyed by file name): the DAG evaluates the run before publishing it
    files = sorted(p for p in valid.rglob("*") if p.is_file())
    labels = "file_name,pathology,label\n" + "".join(f"{p.name},Cardiomegaly,{k % 2}\n" for k, p in enumerate(files))
    labels += "not-here.png,Cardiomegaly,1\n"
    write_text(f"{bucket}/labels/labels.csv", labels, settings)
    env = _airflow_env(tmp_path, CXR_S3_ENDPOINT_URL=settings.s3_endpoint_url)
    env.pop("CXR_MAX_QUARANTINE_SHARE")
    stdout = _cxr_run(
        tmp_path, f"{bucket}/in", f"{bucket}/lake", env, checkpoint.parent, "--labels", f"{bucket}/labels/labels.csv"
    )
    assert "  maintain               success" in stdout, stdout  # upkeep of an s3:// lakehouse
    assert f"{n}/{n + 1} labels matched" in stdout, stdout

    from lakehouse.delta_rs import read_arrow
    from lakehouse.storage import read_text
    from lakehouse.tables import EVALUATION

    tensors = read_arrow(f"{bucket}/lake", TENSORS, settings, columns=["image_id"])
    preds = read_arrow(f"{bucket}/lake", PREDICTIONS, settings, columns=["image_id", "model_id"])
    assert tensors.num_rows == n == len(VALID_KINDS)
    assert preds.num_rows == n
    assert "<html" in read_text(f"{bucket}/lake/reports/report.html", settings).lower()
    assert "Data Docs" in read_text(f"{bucket}/lake/reports/data_docs/index.html", settings)
    published = json.loads(read_text(f"{bucket}/lake/reports/published.json", settings))
    assert set(published["versions"]) == {"tensors", "quarantine", "files", "predictions", "drift", "evaluation"}
    assert published["reference_infer_run_id"] == published["infer_run_id"]  # the first run is the reference
    evaluation = read_arrow(f"{bucket}/lake", EVALUATION, settings).to_pandas()
    cardio = evaluation[(evaluation["pathology"] == "Cardiomegaly") & (evaluation["slice"] == "all")].iloc[0]
    assert (cardio["n_pos"], cardio["n_neg"]) == (sum(k % 2 for k in range(n)), n - sum(k % 2 for k in range(n)))
    assert cardio["labels_uri"] == f"{bucket}/labels/labels.csv" and cardio["run_id"] == published["infer_run_id"]
    # Athena's manifests list the published versions' data files on S3
    manifest = read_text(f"{bucket}/lake/_published/predictions/manifest", settings).split()
    assert manifest and all(u.startswith(f"{bucket}/lake/predictions/") for u in manifest)


def test_infer_runs_in_the_container_when_docker_is_chosen(tmp_path: Path) -> None:
    """With a Docker daemon (here: forced), each shard of `infer` is the inference image with the job's
    arguments only (its ENTRYPOINT is `cxr infer`); without one, the same arguments to a local process."""
    import shlex

    from cxr.operators import docker_kwargs, process_command

    info = _parse(tmp_path, CXR_INFER_RUNNER="docker", CXR_INFER_IMAGE="registry.example/cxr-infer:1.2")
    infer = info["tasks"]["infer"]
    assert (infer["operator"], infer["mapped"]) == ("DockerOperator", True)
    assert infer["partial"]["image"] == "registry.example/cxr-infer:1.2"
    assert infer["expand"] == "XComArg(<Task(PythonOperator): plan_infer>).map(docker_kwargs)"
    entrypoint = [ln for ln in (ROOT / "inference/Dockerfile").read_text().splitlines() if ln.startswith("ENTRYPOINT")]
    assert entrypoint == ['ENTRYPOINT ["cxr", "infer"]']
    # one plan item, as each launcher receives it: the container gets its arguments, the process the same
    args = ["--lakehouse", "/data/my lake", "--run-id", "inf-x", "--no-progress", "--model=a,b", "--shard", "1/2"]
    item = {"shard": "1/2", "args": args, "threads": 3}
    container = docker_kwargs(item)
    assert container["command"] == args and container["environment"]["OMP_NUM_THREADS"] == "3"
    local = _parse(tmp_path, CXR_INFER_RUNNER="process")["tasks"]["infer"]
    assert local["operator"] == "BashOperator"
    command = process_command(item)
    assert command.startswith('OMP_NUM_THREADS=3 "${CXR_CLI:-') and '}" infer --lakehouse ' in command
    assert shlex.split(command)[2:] == ["infer", *args]  # [OMP_NUM_THREADS=3, the cli, "infer", *args]
    assert process_command({**item, "threads": 0}).startswith('"${CXR_CLI:-')


@pytest.mark.slow
def test_new_images_sensor_counts_only_unjudged_files(tmp_path: Path, settings: Settings, spark) -> None:  # type: ignore[no-untyped-def]
    """Files a preprocessing run judged are not new: stored, a duplicate found in the run, a copy of a
    stored image, quarantined or skipped. A changed file and a requeued failure are."""
    import os

    from cxr.tasks import new_images_waiting
    from lakehouse.ledger import requeue
    from transforms.preprocess import run_preprocess
    from transforms.sample import SKIPPED_KINDS, write_samples

    images, lake = tmp_path / "in", tmp_path / "lake"

    def waiting() -> bool:
        return new_images_waiting(str(images), str(lake))

    def preprocess(run_id: str):  # type: ignore[no-untyped-def]
        return run_preprocess(str(images), str(lake), settings=settings, run_id=run_id, spark=spark, progress=False)

    first = write_samples(images, count=1, seed=3)[0]
    (images / "same_day_copy.png").write_bytes(first.read_bytes())
    assert waiting() is True  # nothing judged yet (no tables at all)
    s1 = preprocess("pre-1")
    assert (s1.new, s1.duplicates, s1.duplicate_pairs) == (
        1,
        1,
        [{"source_uri": str(images / "same_day_copy.png"), "duplicate_of": str(first)}],
    )
    assert waiting() is False

    copy = images / "copy_of_first.png"
    copy.write_bytes(first.read_bytes())
    assert waiting() is True
    s2 = preprocess("pre-2")
    assert (s2.new, s2.content_present, s2.decoded) == (0, 1, 0)  # read and hashed, known bytes
    assert waiting() is False

    bad = images / "bad.png"
    bad.write_bytes(b"not an image")
    fname, make, _ = SKIPPED_KINDS["structured_report"]
    (images / fname).write_bytes(make(3))
    assert waiting() is True
    s3 = preprocess("pre-3")
    assert (s3.new, s3.quarantined, s3.skipped, s3.quarantine_reasons) == (0, 1, 1, {"UnsupportedFormatError": 1})
    assert waiting() is False

    # a failure requeued after a fix is waiting again; so is a file changed in place (same path, new size)
    assert requeue(str(lake), settings, run_id="pre-3") == 1
    assert waiting() is True
    preprocess("pre-4")
    assert waiting() is False
    st = first.stat()
    first.write_bytes(first.read_bytes() + b"\0")
    os.utime(first, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert waiting() is True


@pytest.mark.slow
def test_day_after_day_over_a_growing_archive(tmp_path: Path, checkpoint: Path) -> None:
    """The whole DAG, three days in a row, at the default quarantine gate (0.05), over an archive that
    grows like a PACS export: radiographs, reports, a CT slice, a multi-frame cine, broken files and one
    file that crashes its native decoder (pylibjpeg-rle panics). Every day succeeds; old files are not
    read again; nothing is lost, duplicated or left behind."""
    from lakehouse.maintain import referenced_paths
    from transforms.sample import INVALID_KINDS, SKIPPED_KINDS, rle_decoder_crash_dicom

    archive, lake = tmp_path / "archive", tmp_path / "lake"
    env = _airflow_env(tmp_path)
    env.pop("CXR_MAX_QUARANTINE_SHARE")  # the default gate
    kinds = list(VALID_KINDS.items())

    def add_images(day: int, n: int) -> None:
        folder = archive / f"day{day}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _, (ext, make) = kinds[i % len(kinds)]
            (folder / f"img{i:03d}{ext}").write_bytes(make(1000 * day + i))

    def run_day() -> dict[str, object]:
        stdout = _cxr_run(tmp_path, str(archive), str(lake), env, checkpoint.parent)
        assert ": success" in stdout and "  maintain               success" in stdout, stdout
        latest = max((lake / "runs").glob("pre-*.json"), key=lambda p: p.stat().st_mtime)
        return json.loads(latest.read_text())

    # day 1: 20 radiographs, a structured report, a CT slice, a 3-frame cine, one truncated PNG
    add_images(1, 20)
    for kind in ("structured_report", "ct_slice", "multi_frame"):
        fname, make, _ = SKIPPED_KINDS[kind]
        (archive / "day1" / fname).write_bytes(make(1))
    _, truncated, _ = INVALID_KINDS["truncated_png"]
    (archive / "day1" / "broken.png").write_bytes(truncated(1))
    d1 = run_day()
    assert (d1["new"], d1["skipped"], d1["quarantined"], d1["reconciles"]) == (20, 3, 1, True)

    # day 2: 20 more, a key object, and a poison pill for the RLE decoder
    add_images(2, 20)
    fname, make, _ = SKIPPED_KINDS["key_object"]
    (archive / "day2" / fname).write_bytes(make(2))
    (archive / "day2" / "poison.dcm").write_bytes(rle_decoder_crash_dicom(2))
    d2 = run_day()
    assert (d2["new"], d2["skipped"], d2["quarantined"], d2["already_present"]) == (20, 1, 1, 24)
    assert d2["quarantine_reasons"] == {"DecoderCrash": 1}
    assert d2["previously"] == {"new": 20, "quarantined": 1, "skipped": 3}

    # day 3: three more; yesterday's poison pill is not decoded again
    add_images(3, 3)
    d3 = run_day()
    assert (d3["new"], d3["decoded"], d3["quarantined"], d3["already_present"]) == (3, 3, 0, 46)

    tensors = DeltaTable(str(lake / "tensors")).to_pyarrow_table(columns=["image_id"]).column("image_id").to_pylist()
    preds = DeltaTable(str(lake / "predictions")).to_pyarrow_table(columns=["image_id"]).column("image_id").to_pylist()
    assert len(tensors) == len(set(tensors)) == 43 and sorted(preds) == sorted(tensors)
    # nothing accumulates: every data file left in every table is referenced by the Delta log
    settings = Settings()
    for table in ("tensors", "quarantine", "files", "predictions"):
        from lakehouse.tables import spec

        root = lake / table
        data = {str(p.relative_to(root)) for p in root.rglob("*.parquet") if "_delta_log" not in p.parts}
        assert data <= referenced_paths(str(lake), spec(table), settings), table
