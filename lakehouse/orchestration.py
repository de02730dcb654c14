"""What the Airflow DAG runs: the stage callables, the Spark submit operator, the failure callback, and
``cxr run`` (the whole DAG locally with ``dag.test()``).

Importing this module is cheap (no pyspark, torch, GX or boto session): every heavy import happens
inside the callable that needs it, at task run time. ``dags/xray_inference_pipeline.py`` only wires.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lakehouse.config import Settings, load_settings
from lakehouse.errors import CxrError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DAG_ID = "xray_inference_pipeline"
DEFAULT_MODELS = ("densenet121-res224-all",)
#: Airflow connection id of the Spark master for the local profile (defaults to the CXR_SPARK_MASTER
#: setting when the connection is not defined in Airflow).
SPARK_CONN_ID = "cxr_spark"


def absolute(uri: str) -> str:
    """A folder URI made absolute against the repository root (tasks run in other working directories);
    s3:// URIs unchanged. Pure path arithmetic: safe at parse time."""
    if uri.startswith(("s3://", "s3a://")) or os.path.isabs(uri):
        return uri
    return str(REPO_ROOT / uri)


def cli_path() -> str:
    """The ``cxr`` executable: ``CXR_CLI`` when set, else the one beside this Python, else ``cxr``."""
    if os.environ.get("CXR_CLI"):
        return os.environ["CXR_CLI"]
    beside = Path(sys.executable).parent / "cxr"
    return str(beside) if beside.exists() else "cxr"


def spark_application() -> str:
    """The file spark-submit runs: the ``cxr`` CLI module itself (the stage code ships with the package)."""
    return str(Path(__file__).resolve().parent / "cli.py")


# --- stage callables (run inside Airflow tasks) ------------------------------------------------------
def new_images_waiting(input_uri: str, lakehouse_uri: str) -> bool:
    """Sensor poke: True when ``input_uri`` holds files the lakehouse has not seen (by URI and size).

    A file seen before (in ``tensors`` or ``quarantine``) does not count: a rerun over an unchanged
    folder waits, then skips (soft fail), instead of reprocessing.
    """
    from lakehouse import delta_rs, storage

    settings = load_settings()
    listing = {(f.uri, f.size) for f in storage.list_files(input_uri, settings)}
    if not listing:
        log.info("no files under %s yet", input_uri)
        return False
    from deltalake.exceptions import TableNotFoundError

    seen: set[tuple[str, int]] = set()
    for table in ("tensors", "quarantine"):
        try:
            t = delta_rs.read_arrow(lakehouse_uri, table, settings, columns=["source_uri", "source_bytes"])
        except TableNotFoundError:  # nothing written there yet
            continue
        seen.update(zip(t.column("source_uri").to_pylist(), t.column("source_bytes").to_pylist(), strict=True))
    # files stored under another name (byte-identical duplicates) are in the run summaries only
    seen_uris = {uri for uri, _ in seen} | _duplicate_uris(lakehouse_uri, settings)
    new = sum(1 for uri, size in listing if (uri, size) not in seen and uri not in seen_uris)
    log.info("%d of %d files under %s are new", new, len(listing), input_uri)
    return new > 0


def _duplicate_uris(lakehouse_uri: str, settings: Settings) -> set[str]:
    """Source URIs that earlier preprocessing runs found to duplicate another file (from ``runs/*.json``)."""
    from lakehouse.runs import read_summaries

    runs = read_summaries(lakehouse_uri, settings, kind="preprocess")
    return {p["source_uri"] for r in runs for p in r.body.get("duplicate_pairs", [])}


def validate_stage(
    lakehouse_uri: str,
    tables: Sequence[str],
    *,
    run_id: str | None = None,
    models: Sequence[str] | str | None = None,
) -> dict[str, Any]:
    """Audit step: run the GX suites; raise AirflowFailException (no retry: data does not heal by
    retrying) when any expectation failed, so that no later stage runs on it: no inference on failing
    tensors, no published versions, no Athena declaration, no report.

    Returns:
        Per-table success and the Data Docs URI (an XCom for the report and the logs).
    """
    from airflow.exceptions import AirflowFailException

    from expectations.runner import validate_lakehouse

    if isinstance(models, str):  # a rendered template: "['a', 'b']"
        import ast

        models = [str(m) for m in ast.literal_eval(models)] if models.strip() else None
    report = validate_lakehouse(
        lakehouse_uri, settings=load_settings(), tables=list(tables), run_id=run_id, models=list(models or []) or None
    )
    per_table = {name: bool(result.success) for name, result in report.tables.items()}
    summary: dict[str, Any] = {
        "success": report.success,
        "tables": per_table,
        "data_docs": report.data_docs_uri,
    }
    log.info("validation of %s: %s (Data Docs: %s)", ", ".join(tables), summary["tables"], report.data_docs_uri)
    if not report.success:
        failed = [name for name, ok in per_table.items() if not ok]
        raise AirflowFailException(
            f"validation failed for {', '.join(failed)}: the run stops here (no publish); see {report.data_docs_uri}"
        )
    return summary


def publish_stage(lakehouse_uri: str, *, run_id: str, database: str = "cxr") -> dict[str, Any]:
    """Publish step (after both audits passed): record the validated table versions in
    ``<lakehouse>/reports/published.json`` and, on s3://, return the Athena DDL the AWS profile runs.

    Readers that want only audited data read the versions named there (Delta time travel).
    """
    from datetime import UTC, datetime

    from lakehouse import delta_rs, storage

    settings = load_settings()
    versions = {t: int(delta_rs.open_table(lakehouse_uri, t, settings).version()) for t in ("tensors", "predictions")}
    record = {"run_id": run_id, "published_at": datetime.now(UTC).isoformat(), "versions": versions}
    uri = storage.join(lakehouse_uri, "reports", "published.json")
    storage.write_text(uri, json.dumps(record, indent=2, sort_keys=True), settings, content_type="application/json")
    log.info("published %s -> %s", versions, uri)
    ddl: list[str] = []
    if storage.is_s3(lakehouse_uri):
        from lakehouse.sql import athena_ddl

        ddl = athena_ddl(lakehouse_uri, database=database)
    return {**record, "uri": uri, "athena_ddl": ddl}


def athena_ddl_stage(lakehouse_uri: str, *, database: str = "cxr") -> list[str]:
    """The Athena DDL statements for the lakehouse (an XCom list the AthenaOperator maps over)."""
    from lakehouse.sql import athena_ddl

    return athena_ddl(lakehouse_uri, database=database)


def report_stage(lakehouse_uri: str, *, run_id: str | None = None) -> str:
    """Write the HTML run report; return its URI."""
    from lakehouse.report import write_report

    return write_report(lakehouse_uri, settings=load_settings(), run_id=run_id or None)


def on_failure(context: Mapping[str, Any]) -> None:
    """``on_failure_callback``: one summary line a person can act on (no data, no identifiers)."""
    ti = context.get("task_instance") or context.get("ti")
    exc = context.get("exception")
    params = context.get("params") or {}
    log.error(
        "cxr pipeline task failed: dag=%s task=%s run=%s try=%s/%s error=%s: %s | lakehouse=%s | log: %s",
        getattr(ti, "dag_id", DAG_ID),
        getattr(ti, "task_id", "?"),
        context.get("run_id"),
        getattr(ti, "try_number", "?"),
        (getattr(ti, "max_tries", 0) or 0) + 1,
        type(exc).__name__ if exc else "unknown",
        (str(exc).splitlines() or [""])[0][:300] if exc else "",
        params.get("lakehouse_uri"),
        getattr(ti, "log_url", ""),
    )


# --- the Spark stage ---------------------------------------------------------------------------------
def _spark_submit_operator_class() -> type:
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    class CxrSparkSubmitOperator(SparkSubmitOperator):
        """SparkSubmitOperator whose Delta/S3A options come from the settings at run time (not at parse
        time): the same session ``cxr preprocess`` builds. The master is the ``cxr_spark`` connection
        when Airflow defines one, else ``CXR_SPARK_MASTER`` (default ``local[*]``)."""

        def execute(self, context: Any) -> Any:
            from lakehouse.spark import spark_submit_env, spark_submit_options

            opts = spark_submit_options(load_settings())
            master = opts.pop("master")
            conn_env = f"AIRFLOW_CONN_{self._conn_id.upper()}"
            try:
                from airflow.sdk import BaseHook

                BaseHook.get_connection(self._conn_id)
            except Exception:  # noqa: BLE001 - not defined in Airflow: use the settings' master
                os.environ[conn_env] = json.dumps({"conn_type": "spark", "host": master})
            self.conf = {**opts["conf"], **(self.conf or {})}
            for attr in ("driver_class_path", "jars", "packages"):
                if attr in opts:
                    setattr(self, attr, opts[attr])
            # the pip-installed spark-submit: SPARK_HOME = the pyspark package, this venv's bin on PATH
            env = {
                **spark_submit_env(),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            }
            self.env_vars = {**env, **(self.env_vars or {})}
            self._hook = None
            return super().execute(context)

    return CxrSparkSubmitOperator


def __getattr__(name: str) -> Any:
    # the operator class is built on first use, so that importing this module imports no provider
    if name == "CxrSparkSubmitOperator":
        return _spark_submit_operator_class()
    raise AttributeError(name)


# --- `cxr run`: the whole DAG locally ----------------------------------------------------------------
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
    env.setdefault("CXR_WAIT_TIMEOUT_S", os.environ.get("CXR_WAIT_TIMEOUT_S", "60"))
    env.setdefault("CXR_POKE_INTERVAL_S", os.environ.get("CXR_POKE_INTERVAL_S", "5"))
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    _migrate_db(env)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
    if bag.import_errors:
        raise CxrError(f"the DAG does not import: {bag.import_errors}")
    dag = bag.get_dag(DAG_ID)
    from lakehouse.storage import is_s3

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


# --- operator factories (called by the DAG file at parse time: they construct, never run) -----------
def safe_id(run_id: str) -> str:
    """An Airflow run id as a lakehouse run id: letters, digits and '-' only."""
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", str(run_id)).strip("-")[:80]


def docker_available() -> bool:
    """True when the inference should run in its container: ``CXR_INFER_RUNNER=docker``, or ``auto``
    (the default) with a Docker daemon socket present (a stat, no connection)."""
    runner = os.environ.get("CXR_INFER_RUNNER", "auto")
    if runner in ("docker", "process"):
        return runner == "docker"
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return host.startswith("unix://") and os.path.exists(host[len("unix://") :])


def process_infer_task(lakehouse: str, run_id: str, flags: str, *, outlets: list[Any]) -> Any:
    """The inference job as a local process: the same ``cxr infer`` command the container runs.
    Templated values reach bash through the environment (no quoting pitfalls); ``flags`` is a template
    that quotes its own values."""
    from airflow.providers.standard.operators.bash import BashOperator

    return BashOperator(
        task_id="infer",
        bash_command=f'"${{CXR_CLI:-{cli_path()}}}" infer --lakehouse "$CXR_LAKEHOUSE_URI" --run-id "$CXR_RUN_ID"'
        f" --no-progress{flags}",
        env={"CXR_LAKEHOUSE_URI": lakehouse, "CXR_RUN_ID": run_id},
        append_env=True,
        cwd=str(REPO_ROOT),  # relative folder URIs mean the same as for the other tasks
        outlets=outlets,
    )


def docker_infer_task(lakehouse: str, run_id: str, flags: str, *, outlets: list[Any]) -> Any:
    """The inference container (``CXR_INFER_IMAGE``) through a reachable Docker daemon. A folder
    lakehouse must sit under ``CXR_DOCKER_MOUNT`` (bind-mounted at the same path); s3:// needs nothing."""
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import Mount

    mount = os.environ.get("CXR_DOCKER_MOUNT", "")
    # S3 endpoint, region and credentials when set (else the daemon host's instance role applies)
    env = {k: v for k, v in os.environ.items() if k.startswith(("CXR_S3_", "CXR_WEIGHTS_", "AWS_"))}
    return DockerOperator(
        task_id="infer",
        image=os.environ.get("CXR_INFER_IMAGE", "cxr-infer:latest"),
        # the image's ENTRYPOINT is `cxr infer`: only the arguments follow
        command=f"--lakehouse {{{{ params.lakehouse_uri | shell_quote }}}} --run-id {run_id} --no-progress{flags}",
        environment=env,
        mounts=[Mount(source=mount, target=mount, type="bind")] if mount else [],
        auto_remove="success",
        mount_tmp_dir=False,
        outlets=outlets,
    )


def aws_preprocess_tasks(args: list[str], *, outlets: list[Any]) -> Any:
    """The Spark stage on AWS: EMR Serverless (default) or, with ``CXR_EMR_MODE=cluster``, steps on an
    existing EMR cluster (EmrAddStepsOperator + EmrStepSensor) as the seed design does.

    Airflow Variables: ``cxr_code_uri`` (s3:// folder holding ``cli.py`` and the ``cxr`` package zip),
    ``cxr_emr_serverless_app_id`` + ``cxr_emr_execution_role_arn`` (serverless) or ``cxr_emr_cluster_id``.
    """
    from airflow.sdk import TaskGroup

    code = "{{ var.value.cxr_code_uri }}"
    cluster = os.environ.get("CXR_EMR_MODE", "serverless") == "cluster"
    # the driver's Python is the packed environment's: on YARN (cluster deploy mode) the application
    # master's environment, on EMR Serverless the driverEnv
    driver_env = "spark.yarn.appMasterEnv" if cluster else "spark.emr-serverless.driverEnv"
    submit = [  # a list: a template such as `{{ var.value.cxr_code_uri }}` must not be split at its spaces
        *("--py-files", f"{code}/cxr.zip"),
        *("--conf", f"spark.archives={code}/cxr-env.tar.gz#environment"),
        *("--conf", f"{driver_env}.PYSPARK_PYTHON=./environment/bin/python"),
        *("--conf", "spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python"),
    ]
    if cluster:
        from airflow.providers.amazon.aws.operators.emr import EmrAddStepsOperator
        from airflow.providers.amazon.aws.sensors.emr import EmrStepSensor

        with TaskGroup("preprocess") as group:
            add = EmrAddStepsOperator(
                task_id="add_step",
                job_flow_id="{{ var.value.cxr_emr_cluster_id }}",
                steps=[
                    {
                        "Name": "cxr-preprocess-{{ run_id | safe_id }}",
                        "ActionOnFailure": "CONTINUE",
                        "HadoopJarStep": {
                            "Jar": "command-runner.jar",
                            "Args": [
                                "spark-submit",
                                "--deploy-mode",
                                "cluster",
                                *submit,
                                f"{code}/cli.py",
                                *args,
                            ],
                        },
                    }
                ],
            )
            EmrStepSensor(
                task_id="wait_step",
                job_flow_id="{{ var.value.cxr_emr_cluster_id }}",
                step_id="{{ task_instance.xcom_pull(task_ids='preprocess.add_step')[0] }}",
                poke_interval=60,
                outlets=outlets,
            )
            add >> group.children["preprocess.wait_step"]
        return group
    from airflow.providers.amazon.aws.operators.emr import EmrServerlessStartJobOperator

    return EmrServerlessStartJobOperator(
        task_id="preprocess",
        application_id="{{ var.value.cxr_emr_serverless_app_id }}",
        execution_role_arn="{{ var.value.cxr_emr_execution_role_arn }}",
        job_driver={
            "sparkSubmit": {
                "entryPoint": f"{code}/cli.py",
                "entryPointArguments": args,
                "sparkSubmitParameters": " ".join(submit),
            }
        },
        configuration_overrides={
            "monitoringConfiguration": {"s3MonitoringConfiguration": {"logUri": "{{ params.lakehouse_uri }}/logs/emr/"}}
        },
        name="cxr-preprocess-{{ run_id | safe_id }}",
        wait_for_completion=True,
        waiter_delay=60,
        outlets=outlets,
    )


def aws_infer_task(args: list[str], *, outlets: list[Any]) -> Any:
    """The inference image on ECS (MWAA workers have no Docker daemon).

    Airflow Variables: ``cxr_ecs_cluster``, ``cxr_ecs_task_definition`` (the image pushed to ECR, container
    name ``cxr-infer``), ``cxr_ecs_subnets`` and ``cxr_ecs_security_groups`` (comma-separated).
    """
    from airflow.providers.amazon.aws.operators.ecs import EcsRunTaskOperator

    # the image's ENTRYPOINT is already `cxr infer` (inference/Dockerfile): the override is its arguments
    command = [*(args[1:] if args[:1] == ["infer"] else args), "--model={{ params.models | join(',') }}"]
    return EcsRunTaskOperator(
        task_id="infer",
        cluster="{{ var.value.cxr_ecs_cluster }}",
        task_definition="{{ var.value.cxr_ecs_task_definition }}",
        launch_type=os.environ.get("CXR_ECS_LAUNCH_TYPE", "FARGATE"),
        overrides={"containerOverrides": [{"name": "cxr-infer", "command": command}]},
        network_configuration={
            "awsvpcConfiguration": {
                "subnets": "{{ var.value.cxr_ecs_subnets.split(',') }}",
                "securityGroups": "{{ var.value.cxr_ecs_security_groups.split(',') }}",
                "assignPublicIp": "DISABLED",
            }
        },
        wait_for_completion=True,
        waiter_delay=30,
        # native rendering: the subnets and security groups render as lists, as run_task needs them
        render_template_as_native_obj=True,
        outlets=outlets,
    )


def aws_athena_tasks(lakehouse: str) -> Any:
    """Athena DDL (one query per statement, mapped over the list ``athena_ddl`` returns).

    Airflow Variable: ``cxr_athena_output`` (s3:// folder for query results); database ``cxr_athena_db``.
    """
    from airflow.providers.amazon.aws.operators.athena import AthenaOperator
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.sdk import TaskGroup

    # a group (task ids unprefixed), so that `publish >> group >> report` orders both tasks after publish
    with TaskGroup("athena", prefix_group_id=False) as group:
        ddl = PythonOperator(
            task_id="athena_ddl",
            python_callable=athena_ddl_stage,
            op_kwargs={"lakehouse_uri": lakehouse, "database": "{{ var.value.get('cxr_athena_db', 'cxr') }}"},
        )
        run = AthenaOperator.partial(
            task_id="athena_publish",
            database="default",
            output_location="{{ var.value.cxr_athena_output }}",
        ).expand(query=ddl.output)
        ddl >> run
    return group
