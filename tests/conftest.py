"""Shared fixtures: one Spark session, one local S3 server (moto) on 127.0.0.1, generated data."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Never reach AWS: fake credentials, and every S3 client points at the local server below.
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
)
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)

from datetime import UTC

from lakehouse.config import Settings, load_settings  # noqa: E402

TEST_KEY = "test-pseudonym-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server in server mode on 127.0.0.1 for the whole session."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def settings(s3_endpoint: str) -> Settings:
    """Test settings: local profile, the local S3 server, a test pseudonym key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update({"CXR_S3_ENDPOINT_URL": s3_endpoint, "CXR_PSEUDONYM_KEY": TEST_KEY, "CXR_FILES_PER_TASK": "8"})
    return load_settings(env)


@pytest.fixture(scope="session")
def spark(settings: Settings):  # type: ignore[no-untyped-def]
    """One Spark session (local[2], Delta, S3A -> the local S3 server) for the whole test session."""
    from lakehouse.spark import get_spark

    session = get_spark(settings.with_overrides(spark_master="local[2]"), app_name="cxr-tests")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def samples_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One image of every valid kind and one file of every invalid kind (read-only for tests)."""
    from transforms.sample import VALID_KINDS, write_samples

    out = tmp_path_factory.mktemp("samples")
    write_samples(out, count=len(VALID_KINDS), include_invalid=True, seed=100)
    return out


def make_bucket(settings: Settings, name: str) -> str:
    """Create a bucket on the local S3 server; return its s3:// URI."""
    from lakehouse.storage import s3_client

    client = s3_client(settings)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if name not in existing:
        client.create_bucket(Bucket=name)
    return f"s3://{name}"


def upload_dir(settings: Settings, local: Path, s3_uri: str) -> int:
    """Upload every file under ``local`` to ``s3_uri`` keeping relative paths; return the count."""
    from lakehouse.storage import s3_client, split_s3

    bucket, prefix = split_s3(s3_uri)
    client = s3_client(settings)
    n = 0
    for p in sorted(local.rglob("*")):
        if p.is_file():
            key = f"{prefix}/{p.relative_to(local).as_posix()}".lstrip("/")
            client.put_object(Bucket=bucket, Key=key, Body=p.read_bytes())
            n += 1
    return n


#: the DAG's tasks in order (local profile)
DAG_TASKS = [
    "wait_for_images",
    "preprocess",
    "validate_tensors",
    "plan_infer",
    "infer",
    "drift",
    "validate_predictions",
    "evaluate",
    "publish",
    "report",
    "maintain",
]


def kill_group_when(
    args: list[str], env: dict[str, str], cwd: Path, ready: Callable[[], bool], *, poll_s: float
) -> None:
    """Start ``args`` as a process group and SIGKILL the whole group as soon as ``ready()`` (a real kill -9),
    then every process left in its session (Spark's Python workers run in a process group of their own).

    Raises:
        AssertionError: when the process ends first or ``ready()`` stays false for 240 s.
    """
    import contextlib
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(
        args, env=env, cwd=cwd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 240
        while not ready():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "not ready to be killed after 240 s"
            time.sleep(poll_s)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Spark's Python daemon puts itself and its workers in a process group of their own (same
        # session): kill the whole session, as a node going away would, and wait until it is gone, so
        # that no worker writes a file after the kill
        deadline = time.monotonic() + 10
        while (left := _session_pids(proc.pid)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Linux /proc; zombies count as gone)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def scramble_keeping_size_and_mtime(paths: list[Path]) -> None:
    """Overwrite each file with other bytes of the same size and put its mtime back: a run that read it
    would see new content (a new row or a new failure); one that trusts (path, size, mtime) sees nothing."""
    import os

    for p in paths:
        st = p.stat()
        p.write_bytes(b"\x00" * st.st_size)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


MODEL = "densenet121-res224-all"


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init DenseNet saved exactly as xrv's weights files are (a whole pickled module), under
    the upstream file name, in a folder laid out like xrv's cache_dir."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import torchxrayvision as xrv

    from inference.weights import upstream_filename
    from transforms.decode import DecodedImage
    from transforms.sample import synthetic_cxr, to_uint
    from transforms.tensor import to_tensor

    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None).eval()
    # Random init saturates every output at 0 or 1 on the +-1024 scale; rescale the classifier so the
    # logits have unit spread on X-ray-like inputs and predictions differ between images.
    imgs = [to_uint(synthetic_cxr(256, 256, seed=s), 8) for s in range(4)]
    batch = torch.from_numpy(np.stack([to_tensor(DecodedImage(i, 255, "png", 256, 256, 8, "GRAY")) for i in imgs]))
    with torch.no_grad():
        feats = F.adaptive_avg_pool2d(F.relu(model.features(batch)), 1).flatten(1)
        logits = model.classifier(feats)
        model.classifier.weight.mul_(1.0 / (logits.std(dim=0, keepdim=True).T + 1e-6))
        model.classifier.bias.copy_(-model.classifier(feats).mean(dim=0) + model.classifier.bias)
    folder = tmp_path_factory.mktemp("weights")
    path = folder / upstream_filename(MODEL)
    torch.save(model, path)
    return path


def write_tensors_table(lakehouse: Path, files: list[Path], settings: Settings) -> int:
    """A `tensors` table made with the pure preprocessing function and delta-rs (no Spark needed)."""
    import hashlib
    from datetime import datetime

    import pyarrow as pa
    from deltalake import write_deltalake

    from lakehouse.delta_rs import ensure_table
    from lakehouse.tables import TENSORS, arrow_schema
    from transforms.tensor import PreprocessParams, preprocess_bytes

    params = PreprocessParams()
    rows = []
    for f in files:
        data = f.read_bytes()
        row = preprocess_bytes(data, name=str(f), params=params, pseudonym_key=TEST_KEY)
        row.update(
            image_id=hashlib.sha256(data).hexdigest(),
            source_uri=str(f),
            source_bytes=len(data),
            source_modified_at=None,
            preprocess_version="1",
            preprocess_params=params.to_json(),
            run_id="test",
            ingested_at=datetime.now(UTC),
        )
        rows.append(row)
    ensure_table(str(lakehouse), TENSORS, settings)
    write_deltalake(str(lakehouse / "tensors"), pa.Table.from_pylist(rows, schema=arrow_schema(TENSORS)), mode="append")
    return len(rows)


@pytest.fixture(scope="session")
def built_lakehouse(
    tmp_path_factory: pytest.TempPathFactory, settings: Settings, spark, samples_dir: Path, checkpoint: Path
) -> Path:  # type: ignore[no-untyped-def]
    """A lakehouse made by the real stages: every valid and invalid sample kind preprocessed with Spark
    (run id ``pre-test``), then scored by the inference job (run id ``inf-test``) with the random-init
    checkpoint loaded through the weights-dir path, then published (the publish step without the audits:
    a third of the sample set is invalid on purpose, above the quarantine gate). Read-only: copy it
    before changing it."""
    from inference.job import run_infer
    from lakehouse.publish import publish
    from transforms.preprocess import run_preprocess

    lake = tmp_path_factory.mktemp("built") / "lake"
    run_preprocess(str(samples_dir), str(lake), settings=settings, run_id="pre-test", spark=spark, progress=False)
    run_infer(
        str(lake),
        settings=settings,
        model_id=MODEL,
        weights_dir=str(checkpoint.parent),
        run_id="inf-test",
        progress=False,
    )
    publish(str(lake), settings, run_id="pre-test", infer_run_id="inf-test")
    return lake
