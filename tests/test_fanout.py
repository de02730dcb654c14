"""The inference fan-out: how many shard tasks a run gets (``shard_count``), what the plan counts
(predictions to write, from ids only) and returns, shard processes running at once on one lakehouse, and
the mapped DAG run end to end with two shards (``dag.test()`` through ``cxr.local_run``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cxr import tasks
from lakehouse.config import Settings
from lakehouse.delta_rs import read_arrow
from lakehouse.tables import PREDICTIONS, TENSORS, UNTRAINED_SUFFIX
from tests.conftest import MODEL, write_tensors_table
from transforms.sample import VALID_KINDS

CXR = str(Path(sys.executable).parent / "cxr")
#: a second model for the counts: scored only by its untrained stand-in here (no weights file)
OTHER = "densenet121-res224-nih"


@pytest.mark.parametrize(
    ("to_score", "requested", "cores", "threads", "expected"),
    [
        (0, 0, None, 1, 1),  # nothing to score: one task still runs (and writes its summary)
        (200, 0, None, 1, 2),  # auto: one task per 100 predictions
        (201, 0, None, 1, 3),
        (10_000, 0, None, 1, 32),  # never more than the maximum
        (201, 5, None, 1, 5),  # the Param wins over auto
        (201, 50, None, 1, 32),  # ... up to the maximum
        (201, 4, 16, 4, 4),  # local: 16 cores hold 4 processes of 4 threads
        (201, 4, 8, 4, 2),  # ... 8 cores hold 2
        (201, 0, 2, 4, 1),  # fewer cores than one process wants: still one
    ],
)
def test_shard_count(to_score: int, requested: int, cores: int | None, threads: int, expected: int) -> None:
    n = tasks.shard_count(
        to_score, requested=requested, per_task=100, max_shards=32, cores=cores, threads_per_task=threads
    )
    assert n == expected


@pytest.fixture(scope="module")
def tensors_lake(tmp_path_factory: pytest.TempPathFactory, settings: Settings, samples_dir: Path) -> Path:
    """A lakehouse whose ``tensors`` hold every valid sample kind (delta-rs, no Spark). Read-only."""
    files = sorted(p for p in samples_dir.rglob("*") if p.is_file() and p.parts[-2] in ("images", "dicom"))
    lake = tmp_path_factory.mktemp("fanout") / "lake"
    assert write_tensors_table(lake, files, settings) == len(VALID_KINDS)
    return lake


def _copy(lake: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(lake, tmp_path / "lake"))


def test_images_to_score_counts_ids_only(
    tensors_lake: Path, tmp_path: Path, settings: Settings, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Predictions to write, per model, before and after real inference on one shard of each model (the
    second one an untrained stand-in, which counts only for a run that allows one); the count reads no
    byte of the ``tensor`` column (a reader hook on every file delta-rs opens)."""
    from inference.job import Shard, run_infer
    from tests.test_infer_reads import FOOTER_READ, column_bytes_read, column_chunks, count_reads

    lake = _copy(tensors_lake, tmp_path)
    n = len(VALID_KINDS)
    ids = read_arrow(str(lake), TENSORS, settings, columns=["image_id"]).column("image_id").to_pylist()
    assert tasks.images_to_score(str(lake), settings, [MODEL]) == n  # no predictions table yet
    assert tasks.images_to_score(str(lake), settings, [MODEL, OTHER]) == 2 * n

    first = run_infer(
        str(lake), settings=settings, model_id=MODEL, weights_dir=str(checkpoint.parent), shard=Shard(0, 2),
        device="cpu", progress=False,
    )  # fmt: skip
    owned0 = sum(Shard(0, 2).owns(i) for i in ids)
    assert first.predicted == owned0 and 0 < owned0 < n
    # a stand-in for OTHER on the other shard: no weights anywhere (an empty cache, an unreachable mirror)
    monkeypatch.setattr("torchxrayvision.utils.get_cache_dir", lambda: str(tmp_path / "empty-cache"))
    offline = replace(settings, inference=replace(settings.inference, weights_base_url="http://127.0.0.1:9/x"))
    second = run_infer(
        str(lake), settings=offline, model_id=OTHER, allow_untrained=True, shard=Shard(1, 2), device="cpu",
        progress=False,
    )  # fmt: skip
    assert second.untrained and second.model_id == OTHER + UNTRAINED_SUFFIX and second.predicted == n - owned0

    assert tasks.images_to_score(str(lake), settings, [MODEL]) == n - owned0
    assert tasks.images_to_score(str(lake), settings, [OTHER]) == n  # a stand-in's rows are not OTHER's
    assert tasks.images_to_score(str(lake), settings, [OTHER], allow_untrained=True) == owned0
    with count_reads(monkeypatch) as log:
        assert tasks.images_to_score(str(lake), settings, [MODEL, OTHER, MODEL], allow_untrained=True) == n
    files = {p.name for p in (lake / "tensors").glob("*.parquet")}
    tensor_bytes = sum(
        end - start for chunks in column_chunks(lake / "tensors", "tensor").values() for start, end in chunks
    )
    assert column_bytes_read(log, lake / "tensors", "image_id") > 0  # the hook saw the reads
    # at most pyarrow's speculative footer read (the file's last 64 KiB) of each data file
    assert column_bytes_read(log, lake / "tensors", "tensor") <= FOOTER_READ * len(files) < tensor_bytes / 10
    preds = read_arrow(str(lake), PREDICTIONS, settings, columns=["image_id"]).num_rows
    assert preds == n  # owned0 rows of MODEL + n - owned0 of the stand-in


class RecordingTI:
    """The task instance a PythonOperator passes: the XComs the callable pushes."""

    def __init__(self) -> None:
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def test_plan_auto_and_requested(tensors_lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Auto: N from the count and CXR_INFER_IMAGES_PER_TASK; requested: the Param, capped by the local
    machine's cores; each item is one `cxr infer` call with its `--shard i/N` under the same run id."""
    for var in [k for k in os.environ if k.startswith("CXR_")]:
        monkeypatch.delenv(var)
    lake = str(tensors_lake)
    n = len(VALID_KINDS)
    params = {
        "models": [MODEL, OTHER],
        "weights_dir": "/w",
        "allow_untrained": False,
        "thresholds": "",
        "infer_shards": 0,
    }
    monkeypatch.setenv("CXR_PROFILE", "aws")  # no cores cap: the shards run elsewhere
    monkeypatch.setenv("CXR_INFER_IMAGES_PER_TASK", "10")
    ti = RecordingTI()
    plan = tasks.plan_infer_stage(lake, run_id="inf-r1", params=params, ti=ti)
    expected_n = -(-2 * n // 10)  # two models' predictions, 10 per task
    assert ti.pushed["plan"] == {"to_score": 2 * n, "shards": expected_n, "requested": 0}
    base = [
        "--lakehouse",
        lake,
        "--run-id",
        "inf-r1",
        "--no-progress",
        f"--model={MODEL},{OTHER}",
        "--weights-dir",
        "/w",
    ]
    assert plan == [
        {"shard": f"{i}/{expected_n}", "args": [*base, "--shard", f"{i}/{expected_n}"], "threads": 0}
        for i in range(expected_n)
    ]

    # local: 3 asked for, 8 cores of which each process wants 4: 2 shards of 4 threads each
    monkeypatch.setenv("CXR_PROFILE", "local")
    monkeypatch.setenv("CXR_INFER_THREADS_PER_TASK", "4")
    monkeypatch.setattr(tasks, "local_cores", lambda: 8)
    plan = tasks.plan_infer_stage(lake, run_id="inf-r2", params={**params, "infer_shards": 3}, ti=ti)
    assert [(p["shard"], p["args"][-2:], p["threads"]) for p in plan] == [
        ("0/2", ["--shard", "0/2"], 4),
        ("1/2", ["--shard", "1/2"], 4),
    ]
    assert ti.pushed["plan"] == {"to_score": 2 * n, "shards": 2, "requested": 3}
    # one shard: the unsharded command (no --shard), the job's own threads
    one = tasks.plan_infer_stage(lake, run_id="inf-r3", params={**params, "infer_shards": 1, "allow_untrained": True})
    args = ["--lakehouse", lake, "--run-id", "inf-r3", "--no-progress", f"--model={MODEL},{OTHER}"]
    assert one == [{"shard": "0/1", "args": [*args, "--allow-untrained", "--weights-dir", "/w"], "threads": 0}]


@pytest.mark.slow
def test_shard_processes_at_once_on_one_lakehouse(tensors_lake: Path, tmp_path: Path, checkpoint: Path) -> None:
    """Two `cxr infer --shard i/2` processes started together (committing every image, so that their
    MERGEs into `predictions` race): both succeed, and together they score every image exactly once."""
    from inference.job import Shard

    lake = _copy(tensors_lake, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env["CXR_ONNX_CACHE"] = str(tmp_path / "onnx")  # one cache both processes fill
    common = ["infer", "--lakehouse", str(lake), "--model", MODEL, "--weights-dir", str(checkpoint.parent)]
    common += ["--run-id", "inf-together", "--no-progress", "--commit-every", "1", "--device", "cpu"]
    procs = [
        subprocess.Popen(
            [CXR, *common, "--shard", f"{i}/2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)

    settings = Settings()
    preds = read_arrow(str(lake), PREDICTIONS, settings, columns=["image_id", "model_id", "run_id"]).to_pylist()
    ids = read_arrow(str(lake), TENSORS, settings, columns=["image_id"]).column("image_id").to_pylist()
    keys = [(r["image_id"], r["model_id"]) for r in preds]
    assert len(keys) == len(set(keys)) == len(ids) and {k[0] for k in keys} == set(ids)
    assert {r["run_id"] for r in preds} == {"inf-together"}
    for i in range(2):
        body = json.loads((lake / "runs" / f"inf-together-shard-{i}-of-2-{MODEL}.json").read_text())
        assert (body["shard"], body["predicted"]) == (f"{i}/2", sum(Shard(i, 2).owns(x) for x in ids))


RUN_LOCAL = textwrap.dedent(
    """
    import json, sys
    from cxr.local_run import run_local, summary_lines
    input_uri, lake, weights = sys.argv[1:4]
    result = run_local(input_uri=input_uri, lakehouse_uri=lake, models=[sys.argv[4]], weights_dir=weights,
                       infer_shards=int(sys.argv[5]))
    print("\\n".join(summary_lines(result, lakehouse_uri=lake)))
    print(json.dumps({t.task_id: [t.state, t.mapped] for t in result.tasks}))
    """
)


@pytest.mark.slow
def test_dag_maps_inference_over_two_shards(tmp_path: Path, samples_dir: Path, checkpoint: Path) -> None:
    """The whole DAG (dag.test(), as `cxr run` runs it) with the Param infer_shards=2: plan_infer plans
    two shards, two mapped `infer` instances succeed under one run id, each writes its shard's summary,
    the predictions are complete without duplicates, and drift, the audit, publish and the run's summary
    see both shards."""
    from deltalake import DeltaTable

    from inference.job import Shard
    from tests.test_dag import _airflow_env

    if tasks.local_cores() < 2:
        pytest.skip("two local shard processes of one thread need two cores")
    lake = tmp_path / "lake"
    env = _airflow_env(tmp_path, CXR_INFER_THREADS_PER_TASK="1")
    out = subprocess.run(
        [sys.executable, "-c", RUN_LOCAL, str(samples_dir), str(lake), str(checkpoint.parent), MODEL, "2"],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=900,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    states = json.loads(out.stdout.strip().splitlines()[-1])
    assert states["plan_infer"] == ["success", 0]
    assert states["infer"] == ["success", 2], out.stdout
    assert all(state == "success" for state, _ in states.values()), states

    tensors = DeltaTable(str(lake / "tensors")).to_pyarrow_table(columns=["image_id"]).column("image_id").to_pylist()
    preds = DeltaTable(str(lake / "predictions")).to_pyarrow_table(columns=["image_id", "model_id", "run_id"])
    keys = list(zip(preds.column("image_id").to_pylist(), preds.column("model_id").to_pylist(), strict=True))
    assert len(keys) == len(set(keys)) == len(tensors) == len(VALID_KINDS)
    assert {k[0] for k in keys} == set(tensors)
    (run_id,) = set(preds.column("run_id").to_pylist())
    predicted = []
    for i in range(2):
        body = json.loads((lake / "runs" / f"{run_id}-shard-{i}-of-2-{MODEL}.json").read_text())
        assert body["shard"] == f"{i}/2" and body["run_id"] == run_id
        predicted.append(body["predicted"])
        assert body["predicted"] == sum(Shard(i, 2).owns(x) for x in tensors) > 0
    assert not (lake / "runs" / f"{run_id}-{MODEL}.json").exists()  # no unsharded run beside them

    # drift and the audit read the run's rows of both shards; publish published them
    published = json.loads((lake / "reports" / "published.json").read_text())
    assert published["infer_run_id"] == run_id
    assert DeltaTable(str(lake / "predictions"), version=published["versions"]["predictions"]).to_pyarrow_table(
        columns=["image_id"]
    ).num_rows == len(tensors)
    validation = json.loads((lake / "reports" / "validation" / "predictions.json").read_text())
    assert validation["run_id"] == run_id and validation["success"] is True
    # `cxr run`'s lines: one per shard as it ran, then the task's sum over both shards
    lines = out.stdout.splitlines()
    for i in range(2):
        assert any(f" infer[{i}] " in ln and "success" in ln for ln in lines), out.stdout
    (plan_line,) = [ln for ln in lines if ln.startswith("  plan_infer ")]
    assert f"{len(tensors)} predictions to write: 2 shard(s), 2 asked for" in plan_line
    (infer_line,) = [ln for ln in lines if ln.startswith("  infer ")]
    assert f"{sum(predicted)} predicted (0 before), {MODEL}" in infer_line and "2 shards" in infer_line
    # the report's inference table: one row for the run and model, the shards added up
    html = (lake / "reports" / "report.html").read_text()
    assert f'data-infer-predicted="{run_id}|{MODEL}">{sum(predicted)}<' in html
    assert f'data-infer-shards="{run_id}|{MODEL}">2<' in html and html.count("data-infer-predicted=") == 1
