"""``cxr run``: the whole DAG once on a local Airflow (``dag.test()``, SQLite in ``.airflow/``)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cxr.operators import REPO_ROOT
from cxr.tasks import DAG_ID, DEFAULT_MODELS
from lakehouse.config import load_settings
from lakehouse.errors import CxrError
from lakehouse.storage import is_s3


def airflow_env(home: Path | None = None) -> dict[str, str]:
    """Environment for a self-contained local Airflow: home inside the repo, SQLite, our dags folder."""
    home = (home or Path(os.environ.get("AIRFLOW_HOME", REPO_ROOT / ".airflow"))).resolve()
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run_local(
    *,
    input_uri: str,
    lakehouse_uri: str,
    models: Sequence[str] = DEFAULT_MODELS,
    allow_untrained: bool = False,
    weights_dir: str | None = None,
    airflow_home: Path | None = None,
) -> dict[str, Any]:
    """Run the DAG once with ``dag.test()`` (no scheduler), migrating the SQLite database first.

    Returns:
        The run's final state and each task's state.

    Raises:
        CxrError: when the run did not succeed (the failing task's log says why).
    """
    env = airflow_env(airflow_home)
    # one interactive run: with nothing new under the input, give up waiting after a minute (the run is
    # then skipped), not after the scheduled DAG's hours
    settings = load_settings()
    if settings.source("airflow.wait_timeout_s") != "env":
        env["CXR_WAIT_TIMEOUT_S"] = "60"
    if settings.source("airflow.poke_interval_s") != "env":
        env["CXR_POKE_INTERVAL_S"] = "5"
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    _migrate_db(env)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    if bag.import_errors:
        raise CxrError(f"the DAG does not import: {bag.import_errors}")
    dag = bag.get_dag(DAG_ID)
    # tasks run in other working directories (Bash, spark-submit): folders travel as absolute paths
    input_uri, lakehouse_uri = (u if is_s3(u) else str(Path(u).resolve()) for u in (input_uri, lakehouse_uri))
    conf = {
        "input_uri": input_uri,
        "lakehouse_uri": lakehouse_uri,
        "models": list(models),
        "allow_untrained": allow_untrained,
        "weights_dir": weights_dir or "",
    }
    dr = dag.test(run_conf=conf)
    states = {ti.task_id: str(ti.state) for ti in dr.get_task_instances()} if hasattr(dr, "get_task_instances") else {}
    result = {"state": str(dr.state), "run_id": dr.run_id, "tasks": states}
    if str(dr.state) != "success":
        failed = [t for t, s in states.items() if s not in ("success", "skipped")]
        raise CxrError(f"the pipeline run ended {dr.state}; tasks not successful: {failed} (see the log above)")
    return result


def _migrate_db(env: Mapping[str, str]) -> None:
    """``airflow db migrate`` in a child process (idempotent; creates the SQLite file on first use)."""
    import subprocess

    airflow_bin = Path(sys.executable).parent / "airflow"
    cmd = [str(airflow_bin) if airflow_bin.exists() else (shutil.which("airflow") or "airflow"), "db", "migrate"]
    done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise CxrError("airflow db migrate failed: " + " | ".join(tail))
