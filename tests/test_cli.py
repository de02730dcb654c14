"""The `cxr` console script as a process: exit codes, one-line errors, JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from transforms.sample import INVALID_KINDS, SKIPPED_KINDS

CXR = str(Path(sys.executable).parent / "cxr")


def _cxr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "CXR_PSEUDONYM_KEY": "cli-test-key", **(env or {})}
    return subprocess.run([CXR, *args], capture_output=True, text=True, env=full_env, timeout=600)


def test_sample_writes_every_kind(tmp_path: Path) -> None:
    out = tmp_path / "s"
    r = _cxr("sample", "--output", str(out), "--count", "5", "--include-invalid")
    assert r.returncode == 0, r.stderr
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) == 5 + len(INVALID_KINDS) + len(SKIPPED_KINDS)
    assert {p.suffix for p in files[:5]} >= {".png"}


def test_missing_input_fails_with_one_line_reason(tmp_path: Path) -> None:
    r = _cxr("preprocess", "--input", str(tmp_path / "nope"), "--lakehouse", str(tmp_path / "lake"))
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cxr preprocess: StorageError: input folder not found:")


def test_bad_setting_fails_before_spark(tmp_path: Path) -> None:
    r = _cxr(
        "preprocess", "--input", str(tmp_path), "--lakehouse", str(tmp_path / "l"), env={"CXR_RESIZE_ENGINE": "magic"}
    )
    assert r.returncode == 2 and "CXR_RESIZE_ENGINE='magic'" in r.stderr


@pytest.mark.slow
def test_preprocess_process_prints_reconciled_json(tmp_path: Path) -> None:
    samples, lake = tmp_path / "s", tmp_path / "lake"
    assert _cxr("sample", "--output", str(samples), "--count", "4", "--include-invalid").returncode == 0
    r = _cxr("preprocess", "--input", str(samples), "--lakehouse", str(lake), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["discovered"] == 4 + len(INVALID_KINDS) + len(SKIPPED_KINDS)
    assert (summary["new"], summary["quarantined"], summary["skipped"], summary["reconciles"]) == (
        4,
        len(INVALID_KINDS),
        len(SKIPPED_KINDS),
        True,
    )
    assert (lake / "tensors" / "_delta_log").is_dir() and (lake / "runs" / f"{summary['run_id']}.json").is_file()


def _as_arguments(opts: dict) -> list[str]:  # type: ignore[type-arg]
    """``spark_submit_options`` as spark-submit command-line options (what SparkSubmitOperator renders)."""
    args = ["--master", opts["master"]]
    for key in ("packages", "driver_class_path", "jars"):
        if key in opts:
            args += [f"--{key.replace('_', '-')}", opts[key]]
    for k, v in opts["conf"].items():
        args += ["--conf", f"{k}={v}"]
    return args


@pytest.mark.slow
def test_job_runs_unchanged_under_spark_submit(tmp_path: Path) -> None:
    """The same entry point under spark-submit (as on EMR / Airflow's SparkSubmitOperator)."""
    from lakehouse.config import load_settings
    from lakehouse.spark import spark_submit_env, spark_submit_options

    samples, lake = tmp_path / "s", tmp_path / "lake"
    assert _cxr("sample", "--output", str(samples), "--count", "3").returncode == 0
    settings = load_settings().with_overrides(spark_master="local[2]")
    root = Path(__file__).resolve().parent.parent
    cmd = [
        str(Path(sys.executable).parent / "spark-submit"),
        *_as_arguments(spark_submit_options(settings)),
        str(root / "cxr" / "cli.py"),
        "preprocess",
        "--input",
        str(samples),
        "--lakehouse",
        str(lake),
        "--json",
        "--no-progress",
    ]
    env = {**os.environ, **spark_submit_env(), "CXR_PSEUDONYM_KEY": "cli-test-key"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout[r.stdout.index("{") :])
    assert (summary["discovered"], summary["new"], summary["reconciles"]) == (3, 3, True)


@pytest.mark.slow
def test_a_stage_that_cannot_run_exits_2_with_one_line(tmp_path: Path) -> None:
    samples = tmp_path / "s"
    assert _cxr("sample", "--output", str(samples), "--count", "1").returncode == 0
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the lakehouse should be")
    r = _cxr("preprocess", "--input", str(samples), "--lakehouse", str(blocker), "--no-progress")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("cxr preprocess: ") and last.endswith("(run with -v for the traceback)")
    assert "Traceback" not in r.stderr


def test_config_shows_sources_and_masks_the_pseudonym_key() -> None:
    env = {"CXR_PSEUDONYM_KEY": "s3cr3t-hospital-key", "CXR_SPARK_LOG_LEVEL": "ERROR", "CXR_PROFILE": "local"}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CXR_")}, **env}
    r = subprocess.run(
        [CXR, "config", "--lakehouse", "/data/lake", "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert "s3cr3t" not in r.stdout and rows["pseudonym_key"]["value"] == "****** (set)"
    assert (rows["pseudonym_key"]["source"], rows["pseudonym_key"]["env"]) == ("env", "CXR_PSEUDONYM_KEY")
    assert (rows["lakehouse_uri"]["value"], rows["lakehouse_uri"]["source"]) == ("/data/lake", "flag")
    assert (rows["input_uri"]["value"], rows["input_uri"]["source"]) == ("data/samples", "profile")
    assert (rows["spark.log_level"]["value"], rows["spark.log_level"]["source"]) == ("ERROR", "env")
    assert (rows["airflow.retry_delay_s"]["value"], rows["airflow.retry_delay_s"]["source"]) == ("60", "default")
    text = subprocess.run([CXR, "config"], capture_output=True, text=True, env=env, timeout=60).stdout
    assert "s3cr3t" not in text and "******" in text and "CXR_PSEUDONYM_KEY" in text
    # without a key the built-in development key is named as such, never printed
    dev = subprocess.run(
        [CXR, "config"], capture_output=True, text=True, timeout=60, env={**env, "CXR_PSEUDONYM_KEY": ""}
    )
    assert "NOT secret" in dev.stdout and "cxr-dev-key-not-secret" not in dev.stdout
