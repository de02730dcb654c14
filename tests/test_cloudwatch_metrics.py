"""The CloudWatch metrics the DAG's audit tasks publish (``CXR_METRICS_NAMESPACE``), read back from the
local moto server: the real task callables on a lakehouse made by the real stages (``built_lakehouse``:
the sample set preprocessed with Spark and scored by the inference job), a clean run, a run that fails
the quarantine share gate, and an unreachable endpoint."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lakehouse.config import describe, load_settings
from lakehouse.errors import ConfigError
from tests.conftest import TEST_KEY
from transforms.sample import INVALID_KINDS, SKIPPED_KINDS, VALID_KINDS

PRE, INF = "pre-test", "inf-test"  # the runs of built_lakehouse
TENSOR_TABLES = ["tensors", "quarantine", "files"]  # what the DAG's validate_tensors audits
PREDICTION_TABLES = ["predictions", "drift"]  # what the DAG's validate_predictions audits
#: the contract with the monitoring stack (infra/): names and units
UNITS = {
    "QuarantineShare": "None",
    "ValidationFailures": "Count",
    "ImagesPreprocessed": "Count",
    "ImagesQuarantined": "Count",
    "PredictionsWritten": "Count",
    "TaskFailures": "Count",
}


@pytest.fixture
def lake(built_lakehouse: Path, tmp_path: Path) -> Path:
    """A copy of the built lakehouse (an audit writes its results and Data Docs into it)."""
    out = tmp_path / "lake"
    shutil.copytree(built_lakehouse, out)
    return out


@pytest.fixture
def namespace(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> str:
    """The task's environment: the moto server as endpoint, a namespace of this test's own (metrics
    without dimensions add up across everything published to one namespace)."""
    ns = f"CXR/Test-{uuid.uuid4().hex[:8]}"
    for var in [v for v in os.environ if v.startswith("CXR_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("CXR_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("CXR_PSEUDONYM_KEY", TEST_KEY)
    monkeypatch.setenv("CXR_METRICS_NAMESPACE", ns)
    return ns


@pytest.fixture
def cloudwatch(s3_endpoint: str) -> Iterator[Any]:
    import boto3

    yield boto3.client("cloudwatch", endpoint_url=s3_endpoint, region_name="us-east-1")


def _values(cw: Any, namespace: str, name: str, stat: str) -> list[float]:
    """The published values of one metric (no dimensions, the contract's unit) under ``stat``, over one
    period that spans the test."""
    now = datetime.now(UTC)
    result = cw.get_metric_data(
        MetricDataQueries=[
            {
                "Id": "m",
                "MetricStat": {
                    "Metric": {"Namespace": namespace, "MetricName": name},
                    "Period": 7200,
                    "Stat": stat,
                    "Unit": UNITS[name],  # a data point of another unit is not returned
                },
            }
        ],
        StartTime=now - timedelta(hours=1),
        EndTime=now + timedelta(hours=1),
    )
    return [float(v) for v in result["MetricDataResults"][0]["Values"]]


def _metrics(cw: Any, namespace: str) -> dict[str, list[Any]]:
    return {m["MetricName"]: m["Dimensions"] for m in cw.list_metrics(Namespace=namespace)["Metrics"]}


def _rows(lake: Path, table: str, run_id: str) -> int:
    from deltalake import DeltaTable

    runs = DeltaTable(str(lake / table)).to_pyarrow_table(columns=["run_id"]).column("run_id").to_pylist()
    return runs.count(run_id)


@pytest.mark.slow
def test_a_clean_run_publishes_every_metric_once(
    lake: Path, namespace: str, cloudwatch: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxr import tasks

    monkeypatch.setenv("CXR_MAX_QUARANTINE_SHARE", "0.5")  # a third of the sample set is invalid on purpose
    assert tasks.validate_stage(str(lake), TENSOR_TABLES, run_id=PRE)["success"] is True
    tasks.drift_stage(str(lake), run_id=INF)
    assert tasks.validate_stage(str(lake), PREDICTION_TABLES, run_id=INF)["success"] is True

    # exactly the contract: five metrics, no dimensions
    assert _metrics(cloudwatch, namespace) == dict.fromkeys(set(UNITS) - {"TaskFailures"}, [])  # no task failed
    # the sample set: one file of each valid kind (a tensor each), one of each invalid kind (quarantined),
    # one of each kind skipped by design (in neither count of the share)
    n_valid, n_invalid = len(VALID_KINDS), len(INVALID_KINDS)
    assert _values(cloudwatch, namespace, "ImagesPreprocessed", "Sum") == [n_valid] == [_rows(lake, "tensors", PRE)]
    assert _values(cloudwatch, namespace, "ImagesQuarantined", "Sum") == [n_invalid]
    assert _values(cloudwatch, namespace, "QuarantineShare", "Maximum") == [pytest.approx(9 / 26)]
    assert (n_invalid, n_valid + n_invalid, len(SKIPPED_KINDS)) == (9, 26, 4)
    # one model over every tensor
    assert _values(cloudwatch, namespace, "PredictionsWritten", "Sum") == [n_valid] == [_rows(lake, "predictions", INF)]
    # one data point per audit task, both 0
    assert _values(cloudwatch, namespace, "ValidationFailures", "SampleCount") == [2]
    assert _values(cloudwatch, namespace, "ValidationFailures", "Maximum") == [0]


@pytest.mark.slow
def test_a_failed_audit_publishes_its_failures_before_it_fails(lake: Path, namespace: str, cloudwatch: Any) -> None:
    from airflow.exceptions import AirflowFailException

    from cxr import tasks

    # the default gate (CXR_MAX_QUARANTINE_SHARE=0.05) fails run pre-test: 9 of 26 inputs quarantined
    with pytest.raises(AirflowFailException, match="validation failed for quarantine"):
        tasks.validate_stage(str(lake), TENSOR_TABLES, run_id=PRE)
    results = [json.loads((lake / "reports" / "validation" / f"{t}.json").read_text()) for t in TENSOR_TABLES]
    failed = [(f["suite"], f["column"]) for r in results for f in r["failed"]]
    assert failed == [("quarantine_runs", "quarantine_share")]
    assert _values(cloudwatch, namespace, "ValidationFailures", "Sum") == [1]
    assert _values(cloudwatch, namespace, "QuarantineShare", "Maximum") == [pytest.approx(9 / 26)]
    assert _values(cloudwatch, namespace, "ImagesQuarantined", "Sum") == [9]
    assert "PredictionsWritten" not in _metrics(cloudwatch, namespace)


@pytest.mark.slow
def test_an_unreachable_endpoint_warns_and_the_task_succeeds(
    lake: Path, namespace: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from cxr import tasks

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("CXR_S3_ENDPOINT_URL", f"http://127.0.0.1:{closed}")  # the lakehouse is a folder
    monkeypatch.setenv("CXR_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("CXR_MAX_QUARANTINE_SHARE", "0.5")
    with caplog.at_level(logging.WARNING, logger="cxr.tasks"):
        assert tasks.validate_stage(str(lake), TENSOR_TABLES, run_id=PRE)["success"] is True
    warnings = [r.getMessage() for r in caplog.records if r.name == "cxr.tasks" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "CloudWatch metrics NOT published" in warnings[0]
    assert f"127.0.0.1:{closed}" in warnings[0] and namespace in warnings[0]
    assert "ValidationFailures=0" in warnings[0] and "ImagesQuarantined=9" in warnings[0]


def test_the_namespace_setting(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from cxr import tasks

    assert load_settings({}).metrics_namespace == ""  # local: off
    aws = load_settings({"CXR_PROFILE": "aws"})
    assert aws.metrics_namespace == "CXR/Pipeline"
    row = next(r for r in describe(aws) if r.name == "metrics_namespace")
    assert (row.value, row.source, row.env) == ("CXR/Pipeline", "profile", "CXR_METRICS_NAMESPACE")
    assert load_settings({"CXR_PROFILE": "aws", "CXR_METRICS_NAMESPACE": "off"}).metrics_namespace == ""
    assert load_settings({"CXR_METRICS_NAMESPACE": "Site A/cxr"}).metrics_namespace == "Site A/cxr"
    for bad in ("AWS/EC2", "cxr|pipeline", "x" * 256):
        with pytest.raises(ConfigError, match="CloudWatch custom namespace"):
            load_settings({"CXR_METRICS_NAMESPACE": bad})
    # off: nothing is attempted (an unreachable endpoint logs nothing)
    off = load_settings({"CXR_S3_ENDPOINT_URL": "http://127.0.0.1:9", "CXR_S3_MAX_ATTEMPTS": "1"})
    with caplog.at_level(logging.WARNING):
        assert tasks.publish_metrics(off, {"ValidationFailures": (1.0, "Count")}) is False
    assert caplog.records == []


@pytest.mark.slow
def test_a_failed_task_publishes_task_failures(tmp_path: Path, namespace: str, cloudwatch: Any) -> None:
    """The DAG's on_failure_callback, given the exception a real task callable raised (validation of a
    lakehouse that has no tables), publishes TaskFailures = 1: the metric the task-failure alarm watches."""
    from types import SimpleNamespace

    from cxr import tasks

    with pytest.raises(Exception) as failed:
        tasks.validate_stage(str(tmp_path / "no-lakehouse"), ["tensors"], run_id=PRE)
    ti = SimpleNamespace(dag_id=tasks.DAG_ID, task_id="validate_tensors", try_number=1, max_tries=0, log_url="")
    assert _values(cloudwatch, namespace, "TaskFailures", "Sum") == []
    tasks.on_failure({"task_instance": ti, "exception": failed.value, "run_id": "manual__x", "params": {}})
    assert _values(cloudwatch, namespace, "TaskFailures", "Sum") == [1.0]
