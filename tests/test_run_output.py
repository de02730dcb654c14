"""What ``cxr run`` shows a person: one line per task as it starts and ends, a summary in DAG order and
the paths, at most 40 lines; Airflow's and Spark's output in log files under the Airflow home's ``logs/``;
on failure the failed task's last log lines, its log file and a non-zero exit status."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import DAG_TASKS
from tests.test_dag import CXR, _airflow_env
from transforms.sample import INVALID_KINDS, SKIPPED_KINDS, VALID_KINDS

ORDER = DAG_TASKS
MAX_LINES = 46


@pytest.fixture(scope="module")
def cli_samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample set as ``cxr sample`` writes it: one image of every valid kind, one file of every invalid kind."""
    out = tmp_path_factory.mktemp("cli-samples")
    cmd = [CXR, "sample", "--output", str(out), "--count", str(len(VALID_KINDS)), "--include-invalid"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


def _run(tmp_path: Path, samples: Path, lake: Path, env: dict[str, str]) -> tuple[int, list[str]]:
    """``cxr run`` as a person types it; the return code and every line it printed (stdout, then stderr)."""
    cmd = [CXR, "run", "--input", str(samples), "--lakehouse", str(lake), "--allow-untrained"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    return out.returncode, out.stdout.splitlines() + out.stderr.splitlines()


def _summary(lines: list[str]) -> dict[str, str]:
    """Task id -> its summary line (the indented lines after 'pipeline run ...'), in the order printed."""
    start = next(i for i, line in enumerate(lines) if line.startswith("pipeline run "))
    rows = {}
    for line in lines[start + 1 :]:
        m = re.match(r"  (\w+) +(\w+) ", line)
        if not m:
            break
        rows[m.group(1)] = line
    return rows


def _task_log(home: Path, task_id: str) -> Path:
    root = home / "logs" / "dag_id=xray_inference_pipeline"
    # a mapped task (infer: one instance per shard) logs under map_index=<i>/
    [log] = [
        *root.glob(f"run_id=*/task_id={task_id}/attempt=1.log"),
        *root.glob(f"run_id=*/task_id={task_id}/map_index=0/attempt=1.log"),
    ]
    return log


@pytest.mark.slow
def test_cxr_run_prints_one_line_per_task_and_logs_to_files(tmp_path: Path, cli_samples: Path) -> None:
    lake = tmp_path / "lake"
    home = tmp_path / "airflow"
    code, lines = _run(tmp_path, cli_samples, lake, _airflow_env(tmp_path))
    text = "\n".join(lines)
    assert code == 0, text
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{text}"

    # live: a start and an end line per task, in DAG order
    live = [(m.group(1), m.group(2)) for m in map(re.compile(r"\d\d:\d\d:\d\d (\w+) +(\w+)").match, lines) if m]
    assert live == [(t, s) for t in ORDER for s in ("started", "success")], live
    # the summary: every task in DAG order, with its state and the stage's own counts
    rows = _summary(lines)
    assert list(rows) == ORDER
    assert all(re.match(rf"  {t} +success +\d+\.\ds  ", rows[t]) for t in ORDER), rows
    n_valid, n_invalid, n_skipped = len(VALID_KINDS), len(INVALID_KINDS), len(SKIPPED_KINDS)
    assert (
        f"{n_valid + n_invalid + n_skipped} files: {n_valid} new, {n_invalid} quarantined, {n_skipped} skipped"
        in rows["preprocess"]
    )
    assert re.search(
        r"tensors (\d+)/\1, quarantine (\d+)/\2, files (\d+)/\3 expectations passed", rows["validate_tensors"]
    )
    assert re.search(r"predictions (\d+)/\1, drift (\d+)/\2 expectations passed", rows["validate_predictions"])
    assert rows["drift"].endswith("no reference run yet (this run becomes it once published)")
    assert rows["evaluate"].endswith("no labels_uri: skipped")
    # the real weights when they can be downloaded, else the stand-in (marked in its model id)
    assert re.search(
        rf"  {n_valid} predicted \(0 before\), densenet121-res224-all(\+untrained-random-init)?, cpu\+onnxruntime-[\d.]+$",
        rows["infer"],
    )
    assert re.search(r"tensors v1, quarantine v\d, predictions v1, files v1, drift v1$", rows["publish"]), rows[
        "publish"
    ]
    assert rows["report"].endswith(f"{lake}/reports/report.html")
    assert rows["maintain"].endswith("0 data files deleted (0 bytes freed)")
    [tables] = [line for line in lines if line.startswith("tables:")]
    assert f"{lake}/drift" in tables and f"{lake}/evaluation" not in tables  # only the tables there are
    for label in ("tables:", "data docs:", "report:", "task logs:"):
        assert any(line.startswith(label) for line in lines), label
    # nothing of Airflow's or Spark's own output on the terminal
    assert not re.search(r"\[info|\[warning|INFO |WARN |Spark-Submit|Traceback", text), text

    # ... which is in the log files: one per task attempt in Airflow's layout, one for the run outside them
    logs = {t: _task_log(home, t).read_text() for t in ORDER}
    assert all("[DAG TEST] starting task_id=" + t in logs[t] for t in ORDER)
    pre = logs["preprocess"]
    assert "Spark-Submit cmd" in pre and "-Dlog4j2.configurationFile=" in pre and "discovered" not in text
    assert "INFO SparkContext" not in pre, "Spark's JVM logs at WARN"
    assert "Command exited with return code 0" in logs["infer"]
    [run_log] = (home / "logs" / "cxr_run").glob("*.log")
    assert "Filling up the DagBag" in run_log.read_text()


@pytest.mark.slow
def test_a_failed_run_shows_the_failed_tasks_last_log_lines(tmp_path: Path, cli_samples: Path) -> None:
    """The default quarantine share gate (0.05) fails the sample set's validation: validate_tensors fails
    (no retry for data), later tasks do not run."""
    env = _airflow_env(tmp_path)
    env.pop("CXR_MAX_QUARANTINE_SHARE")
    code, lines = _run(tmp_path, cli_samples, tmp_path / "lake", env)
    text = "\n".join(lines)
    assert code == 1, text
    assert len(lines) <= MAX_LINES + 5, f"{len(lines)} lines:\n{text}"  # the summary, then 20 log lines
    rows = _summary(lines)
    assert list(rows) == ORDER
    assert re.match(
        r"  validate_tensors +failed +\d+\.\ds  .*AirflowFailException: validation failed", rows["validate_tensors"]
    )
    assert all(re.match(rf"  {t} +upstream_failed", rows[t]) for t in ORDER[3:]), rows
    log = _task_log(tmp_path / "airflow", "validate_tensors")
    header = next(i for i, line in enumerate(lines) if line.startswith("validate_tensors failed; the last lines of "))
    assert lines[header].endswith(f"{log.relative_to(tmp_path)}:")
    tail = [line[4:] for line in lines[header + 1 :] if line.startswith("  | ")]
    assert 1 <= len(tail) <= 20 and not any(set(line.strip()) == {"^"} for line in tail)
    assert any("validation failed for quarantine" in line for line in tail)
    assert all(line[:240] in log.read_text() for line in tail)
