"""Parse-time operator factories for the DAG, local and aws: they construct operators, never run them.

``stage_tasks(profile)`` is the one entry the DAG file calls. Provider imports happen inside the
factories, so that importing this module imports no provider; the stage code the operators call lives
in :mod:`cxr.tasks` (Python callables) or behind the ``cxr`` CLI (Spark, inference).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr.tasks import athena_ddl_stage
from lakehouse.config import container_env, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
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
    if load_settings().airflow.cli:
        return load_settings().airflow.cli
    beside = Path(sys.executable).parent / "cxr"
    return str(beside) if beside.exists() else "cxr"


def spark_application() -> str:
    """The file spark-submit runs: the ``cxr`` CLI module itself (the stage code ships with the package)."""
    return str(Path(__file__).resolve().parent / "cli.py")


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
            from airflow.sdk import BaseHook
            from airflow.sdk.exceptions import AirflowNotFoundException

            try:
                BaseHook.get_connection(self._conn_id)
            except AirflowNotFoundException:  # not defined in Airflow: use the settings' master
                os.environ[conn_env] = json.dumps({"conn_type": "spark", "host": master})
            self.conf = {**opts["conf"], **(self.conf or {})}
            if (self._deploy_mode or "client") == "client":
                # Spark's JVM at WARN (the task log keeps warnings and errors, not every stage); not in
                # cluster deploy mode, where the hook finds the driver id in spark-submit's INFO lines
                import shlex

                log4j2 = Path(__file__).resolve().parent / "log4j2.properties"  # package data
                java = self.conf.get("spark.driver.extraJavaOptions", "")
                if "log4j2.configurationFile" not in java:
                    option = shlex.quote(f"-Dlog4j2.configurationFile={log4j2}")
                    self.conf["spark.driver.extraJavaOptions"] = f"{java} {option}".strip()
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


# --- operator factories (called by the DAG file at parse time: they construct, never run) -----------


def docker_available() -> bool:
    """True when the inference should run in its container: ``CXR_INFER_RUNNER=docker``, or ``auto``
    (the default) with a Docker daemon socket present (a stat, no connection)."""
    runner = load_settings().airflow.infer_runner
    if runner in ("docker", "process"):
        return runner == "docker"
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    return host.startswith("unix://") and os.path.exists(host[len("unix://") :])


# the inference fan-out: `plan_infer` (cxr.tasks.plan_infer_stage) returns one item per shard,
# {"shard": "i/N", "args": [...cxr infer arguments...], "threads": T}; the mapped `infer` task expands
# over it, each launcher turning an item into its own argument with one of these functions (called at
# run time, in the task: values expanded from an XCom are not templated again)


def process_command(item: Mapping[str, Any]) -> str:
    """A shard as a local process's bash command: ``cxr infer`` (``CXR_CLI`` when set) with the shard's
    arguments, shell-quoted, and its thread count when the machine's cores are split between shards."""
    import shlex

    threads = int(item.get("threads") or 0)
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return f'{prefix}"${{CXR_CLI:-{cli_path()}}}" infer {shlex.join(str(a) for a in item["args"])}'


def docker_kwargs(item: Mapping[str, Any]) -> dict[str, Any]:
    """A shard as the inference container's arguments (its ENTRYPOINT is ``cxr infer``) and environment."""
    env = container_env()  # S3 endpoint, weights mirror, region and credentials when set
    if item.get("threads"):
        env["OMP_NUM_THREADS"] = str(int(item["threads"]))
    return {"command": [str(a) for a in item["args"]], "environment": env}


def ecs_overrides(item: Mapping[str, Any]) -> dict[str, Any]:
    """A shard as the ECS task's overrides: the container ``cxr-infer``'s command (ENTRYPOINT ``cxr infer``)."""
    return {"containerOverrides": [{"name": "cxr-infer", "command": [str(a) for a in item["args"]]}]}


def batch_overrides(item: Mapping[str, Any]) -> dict[str, Any]:
    """A shard as the AWS Batch job's container overrides: its command (ENTRYPOINT ``cxr infer``)."""
    return {"command": [str(a) for a in item["args"]]}


def process_infer_task(lakehouse: str, run_id: str, plan: Any, *, outlets: list[Any]) -> Any:
    """The inference job as local processes, one mapped task per shard: the same ``cxr infer`` command
    the container runs. ``plan`` is the ``plan_infer`` task's output; the lakehouse and run id also reach
    the process's environment (``CXR_LAKEHOUSE_URI``, ``CXR_RUN_ID``)."""
    from airflow.providers.standard.operators.bash import BashOperator

    return BashOperator.partial(
        task_id="infer",
        env={"CXR_LAKEHOUSE_URI": lakehouse, "CXR_RUN_ID": run_id},
        append_env=True,
        cwd=str(REPO_ROOT),  # relative folder URIs mean the same as for the other tasks
        outlets=outlets,
    ).expand(bash_command=plan.map(process_command))


def docker_infer_task(plan: Any, *, outlets: list[Any]) -> Any:
    """The inference container (``CXR_INFER_IMAGE``) through a reachable Docker daemon, one mapped task
    per shard. A folder lakehouse must sit under ``CXR_DOCKER_MOUNT`` (bind-mounted at the same path);
    s3:// needs nothing."""
    from airflow.providers.docker.operators.docker import DockerOperator
    from docker.types import Mount

    settings = load_settings()
    mount = settings.airflow.docker_mount
    return DockerOperator.partial(
        task_id="infer",
        image=settings.airflow.infer_image,
        mounts=[Mount(source=mount, target=mount, type="bind")] if mount else [],
        auto_remove="success",
        mount_tmp_dir=False,
        outlets=outlets,
    ).expand_kwargs(plan.map(docker_kwargs))


def aws_preprocess_tasks(args: list[str], *, outlets: list[Any]) -> Any:
    """The Spark stage on AWS: EMR Serverless (default) or, with ``CXR_EMR_MODE=cluster``, steps on an
    existing EMR cluster (EmrAddStepsOperator + EmrStepSensor) as the seed design does.

    Airflow Variables: ``cxr_code_uri`` (s3:// folder holding ``cli.py`` and the ``cxr`` package zip),
    ``cxr_emr_serverless_app_id`` + ``cxr_emr_execution_role_arn`` (serverless) or ``cxr_emr_cluster_id``.
    """
    from airflow.sdk import TaskGroup

    code = "{{ var.value.cxr_code_uri }}"
    cluster = load_settings().aws.emr_mode == "cluster"
    # the driver's Python is the packed environment's: on YARN (cluster deploy mode) the application
    # master's environment, on EMR Serverless the driverEnv
    driver_env = "spark.yarn.appMasterEnv" if cluster else "spark.emr-serverless.driverEnv"
    submit = [  # a list: a template such as `{{ var.value.cxr_code_uri }}` must not be split at its spaces
        *("--py-files", f"{code}/cxr.zip"),
        *("--conf", f"spark.archives={code}/cxr-env.tar.gz#environment"),
        *("--conf", f"{driver_env}.PYSPARK_PYTHON=./environment/bin/python"),
        *("--conf", "spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python"),
        # the job runs as the aws profile (the built-in pseudonym key is refused there); the key itself
        # comes from the application's defaults, never from the DAG
        *("--conf", f"{driver_env}.CXR_PROFILE=aws"),
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

    job = EmrServerlessStartJobOperator(
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
    return _poll_until_timeout(job)


def _poll_until_timeout(task: Any) -> Any:
    """Make ``task``'s waiter poll as long as the task may run (its ``execution_timeout``, from the DAG's
    default_args), one poll more; without a timeout, as long as the ECS provider's own default (a million
    polls). The EMR Serverless default (25 polls) gives up on, and cancels, any job longer than ~25 minutes.
    A mapped task gets it in its partial arguments (every shard polls as long).
    """
    import math

    timeout = task.execution_timeout
    kwargs = task.partial_kwargs if getattr(task, "is_mapped", False) else None
    delay = kwargs["waiter_delay"] if kwargs is not None else task.waiter_delay
    attempts = math.ceil(timeout.total_seconds() / delay) + 1 if timeout else 1_000_000
    if kwargs is not None:
        kwargs["waiter_max_attempts"] = attempts
    else:
        task.waiter_max_attempts = attempts
    return task


def aws_infer_task(plan: Any, *, outlets: list[Any]) -> Any:
    """The inference image on AWS, one mapped task per shard (MWAA workers have no Docker daemon):
    ``CXR_INFER_BACKEND=ecs`` (default) runs an ECS task per shard (Fargate unless
    ``CXR_ECS_LAUNCH_TYPE`` says otherwise), ``batch`` submits an AWS Batch job per shard (e.g. a GPU job
    queue). Each shard's command is its ``plan_infer`` item's arguments (``... --shard i/N``); a failed
    shard is retried alone, and a retry scores only what its shard still lacks.

    Airflow Variables: ``cxr_ecs_cluster``, ``cxr_ecs_task_definition`` (the image pushed to ECR, container
    name ``cxr-infer``), ``cxr_ecs_subnets`` and ``cxr_ecs_security_groups`` (comma-separated) for ECS;
    ``cxr_batch_job_queue`` and ``cxr_batch_job_definition`` (the same image) for Batch.
    """
    settings = load_settings()
    if settings.aws.infer_backend == "batch":
        from airflow.providers.amazon.aws.operators.batch import BatchOperator

        # one job per shard (not one array job): each shard is its own Airflow task instance, retried
        # alone, and its command names its shard (the container needs no AWS_BATCH_JOB_ARRAY_INDEX logic)
        return BatchOperator.partial(
            task_id="infer",
            job_name="cxr-infer-{{ run_id | safe_id }}-{{ ti.map_index }}",
            job_queue="{{ var.value.cxr_batch_job_queue }}",
            job_definition="{{ var.value.cxr_batch_job_definition }}",
            wait_for_completion=True,
            outlets=outlets,
        ).expand(container_overrides=plan.map(batch_overrides))
    from airflow.providers.amazon.aws.operators.ecs import EcsRunTaskOperator

    task = EcsRunTaskOperator.partial(
        task_id="infer",
        cluster="{{ var.value.cxr_ecs_cluster }}",
        task_definition="{{ var.value.cxr_ecs_task_definition }}",
        launch_type=settings.aws.ecs_launch_type,
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
    ).expand(overrides=plan.map(ecs_overrides))
    return _poll_until_timeout(task)


def aws_athena_tasks(lakehouse: str) -> Any:
    """Athena DDL (one query per statement, mapped over the list ``athena_ddl`` returns).

    Airflow Variables: ``cxr_athena_output`` (s3:// folder for query results); database ``cxr_athena_db``
    (default ``cxr``); ``cxr_athena_workgroup`` (default ``primary``; the CDK stack's workgroup enforces its
    own result location and encryption, which then win over ``cxr_athena_output``).
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
            workgroup="{{ var.value.get('cxr_athena_workgroup', 'primary') }}",
        ).expand(query=ddl.output)
        ddl >> run
    return group


# --- the one entry the DAG calls ---------------------------------------------------------------------
@dataclass(frozen=True)
class StageTasks:
    """The DAG's tasks in order; ``athena`` only on the aws profile."""

    wait: Any
    preprocess: Any
    validate_tensors: Any
    plan_infer: Any
    infer: Any
    drift: Any
    validate_predictions: Any
    evaluate: Any
    publish: Any
    athena: Any | None
    report: Any
    maintain: Any


def stage_tasks(profile: str, *, tensors: Any, predictions: Any) -> StageTasks:
    """Build every task of the DAG for ``profile`` (call inside ``with DAG(...)``).

    Args:
        profile: ``local`` (a sensor on the input, spark-submit, local processes or Docker) or ``aws``
            (an S3 key sensor, EMR Serverless or an EMR cluster, ECS or AWS Batch, Athena). Inference is
            mapped over the shards ``plan_infer`` returns.
        tensors: the Asset the preprocessing task updates.
        predictions: the Asset the inference task updates.

    Returns:
        The constructed tasks; the DAG file orders them.
    """
    from airflow.providers.standard.operators.python import PythonOperator

    from cxr import tasks

    settings = load_settings()
    lakehouse = "{{ params.lakehouse_uri }}"
    # the template twin of tasks.stage_run_id, rendered at run time
    pre_run_id = f"{tasks.PREPROCESS_RUN_PREFIX}-{{{{ run_id | safe_id }}}}"
    inf_run_id = f"{tasks.INFER_RUN_PREFIX}-{{{{ run_id | safe_id }}}}"
    aws = profile == "aws"

    from airflow.providers.standard.sensors.python import PythonSensor

    # both profiles: new = a file under the input (folder or s3://) the `files` ledger has not judged, so
    # the run is not started again for files already judged (quarantined, skipped or copies included)
    wait = PythonSensor(
        task_id="wait_for_images",
        python_callable=tasks.new_images_waiting,
        op_kwargs={"input_uri": "{{ params.input_uri }}", "lakehouse_uri": lakehouse},
        mode="reschedule",
        poke_interval=settings.airflow.poke_interval_s,
        timeout=settings.airflow.wait_timeout_s,
        soft_fail=True,  # nothing new: the run is skipped, not failed
    )

    preprocess_args = ["preprocess", "--input", "{{ params.input_uri }}", "--lakehouse", lakehouse]
    preprocess_args += ["--run-id", pre_run_id, "--no-progress"]
    if aws:
        preprocess = aws_preprocess_tasks(preprocess_args, outlets=[tensors])
    else:
        preprocess = _spark_submit_operator_class()(
            task_id="preprocess",
            application=spark_application(),
            application_args=preprocess_args,
            conn_id=SPARK_CONN_ID,
            name="cxr-preprocess",
            outlets=[tensors],
        )

    validate_tensors = PythonOperator(
        task_id="validate_tensors",
        python_callable=tasks.validate_stage,
        op_kwargs={"lakehouse_uri": lakehouse, "tables": ["tensors", "quarantine", "files"], "run_id": pre_run_id},
    )

    plan_infer = PythonOperator(
        task_id="plan_infer",
        python_callable=tasks.plan_infer_stage,
        # the params (models, flags, infer_shards) come from the task's context
        op_kwargs={"lakehouse_uri": lakehouse, "run_id": inf_run_id},
    )
    if aws:
        infer = aws_infer_task(plan_infer.output, outlets=[predictions])
    elif docker_available():
        infer = docker_infer_task(plan_infer.output, outlets=[predictions])
    else:
        infer = process_infer_task(lakehouse, inf_run_id, plan_infer.output, outlets=[predictions])

    validate_predictions = PythonOperator(
        task_id="validate_predictions",
        python_callable=tasks.validate_stage,
        # the models are those the inference run wrote (a stand-in's id says so: '<name>+untrained-random-init')
        # the drift gate: a PSI above CXR_DRIFT_MAX_PSI fails here, so nothing of the run is published
        op_kwargs={"lakehouse_uri": lakehouse, "tables": ["predictions", "drift"], "run_id": inf_run_id},
    )
    drift = PythonOperator(
        task_id="drift",
        python_callable=tasks.drift_stage,
        op_kwargs={"lakehouse_uri": lakehouse, "run_id": inf_run_id},
    )
    evaluate = PythonOperator(
        task_id="evaluate",
        python_callable=tasks.evaluate_stage,
        op_kwargs={
            "lakehouse_uri": lakehouse,
            "labels_uri": "{{ params.labels_uri }}",
            "key": "{{ params.labels_key }}",
            "run_id": inf_run_id,
        },
    )
    publish = PythonOperator(
        task_id="publish",
        python_callable=tasks.publish_stage,
        op_kwargs={"lakehouse_uri": lakehouse, "run_id": pre_run_id, "infer_run_id": inf_run_id},
    )
    report = PythonOperator(
        task_id="report",
        python_callable=tasks.report_stage,
        op_kwargs={"lakehouse_uri": lakehouse, "run_id": pre_run_id},
    )
    maintain = PythonOperator(
        task_id="maintain",
        python_callable=tasks.maintain_stage,
        # orphans of killed or failed runs are a day old before they go: a run writing now is never touched
        op_kwargs={"lakehouse_uri": lakehouse, "older_than_hours": 24.0},
    )
    return StageTasks(
        wait=wait,
        preprocess=preprocess,
        validate_tensors=validate_tensors,
        plan_infer=plan_infer,
        infer=infer,
        drift=drift,
        validate_predictions=validate_predictions,
        evaluate=evaluate,
        publish=publish,
        athena=aws_athena_tasks(lakehouse) if aws else None,
        report=report,
        maintain=maintain,
    )
