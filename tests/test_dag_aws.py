"""The DAG under ``CXR_PROFILE=aws``: task graph (both EMR modes), rendered operator arguments, and the
AWS calls each operator makes, run against the local moto server (S3, EMR Serverless, EMR, ECS, Athena).

Inference is mapped over the shards ``plan_infer`` returns: one ECS task (``CXR_INFER_BACKEND=ecs``) or
one AWS Batch job (``batch``) per shard, rendered and started per map index as the task runner does.

The DAG file reads the profile at import time, so each test loads it under a unique module name with the
environment patched (and restored after): the local-profile DAG other tests import is untouched.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lakehouse.tables import TABLE_NAMES

REPO = Path(__file__).resolve().parent.parent
DAG_FILE = REPO / "dags" / "xray_inference_pipeline.py"

RUN_ID = "manual__2026-01-02T03:04:05+00:00"
SAFE = "manual-2026-01-02T03-04-05-00-00"  # orch.safe_id(RUN_ID)
CONF = {"input_uri": "s3://in-bucket/images", "lakehouse_uri": "s3://lake-bucket/lake", "models": ["a", "b"]}
VARIABLES = {
    "cxr_code_uri": "s3://code-bucket/cxr",
    "cxr_emr_serverless_app_id": "00app",
    "cxr_emr_execution_role_arn": "arn:aws:iam::123456789012:role/cxr-emr",
    "cxr_emr_cluster_id": "j-CLUSTER",
    "cxr_ecs_cluster": "cxr-cluster",
    "cxr_ecs_task_definition": "cxr-infer:3",
    "cxr_ecs_subnets": "subnet-1,subnet-2",
    "cxr_ecs_security_groups": "sg-1",
    "cxr_athena_output": "s3://athena-results/cxr/",
    "cxr_batch_job_queue": "cxr-gpu",
    "cxr_batch_job_definition": "cxr-infer-gpu:2",
}
SUBMIT = (
    "--py-files s3://code-bucket/cxr/cxr.zip --conf spark.archives=s3://code-bucket/cxr/cxr-env.tar.gz#environment "
    "--conf {driver}.PYSPARK_PYTHON=./environment/bin/python "
    "--conf spark.executorEnv.PYSPARK_PYTHON=./environment/bin/python --conf {driver}.CXR_PROFILE=aws"
)
PREPROCESS_ARGS = [
    "preprocess",
    *("--input", "s3://in-bucket/images", "--lakehouse", "s3://lake-bucket/lake"),
    *("--run-id", f"pre-{SAFE}", "--no-progress"),
]
INFER_ARGS = ["--lakehouse", "s3://lake-bucket/lake", "--run-id", f"inf-{SAFE}", "--no-progress", "--model=a,b"]

CHAIN = [
    *("validate_tensors", "plan_infer", "infer", "drift", "validate_predictions", "evaluate", "publish"),
    *("athena_ddl", "athena_publish", "report", "maintain"),
]
EDGES = {
    "serverless": {("wait_for_images", "preprocess"), ("preprocess", "validate_tensors")},
    "cluster": {
        ("wait_for_images", "preprocess.add_step"),
        ("preprocess.add_step", "preprocess.wait_step"),
        ("preprocess.wait_step", "validate_tensors"),
    },
}


def _edges(dag: Any) -> set[tuple[str, str]]:
    down = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    up = {(u, t.task_id) for t in dag.tasks for u in t.upstream_task_ids}
    assert down == up
    return down


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The aws profile and the Variables (as AIRFLOW_VAR_* environment variables: no metadata database)."""
    monkeypatch.setenv("CXR_PROFILE", "aws")
    monkeypatch.delenv("CXR_EMR_MODE", raising=False)
    for var in ("CXR_INFER_BACKEND", "CXR_INFER_IMAGES_PER_TASK", "CXR_INFER_MAX_SHARDS", "CXR_INFER_THREADS_PER_TASK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_CXR_ATHENA_DB", raising=False)
    for key, value in VARIABLES.items():
        monkeypatch.setenv(f"AIRFLOW_VAR_{key.upper()}", value)
    yield monkeypatch


def load_dag(monkeypatch: pytest.MonkeyPatch, mode: str) -> Any:
    """Parse the DAG file as the aws profile in EMR ``mode``, under a module name of its own."""
    monkeypatch.setenv("CXR_EMR_MODE", mode)
    spec = importlib.util.spec_from_file_location(f"_cxr_dag_aws_{mode}", DAG_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


class RecordingTI:
    """The task-instance side of a task's context: XComs kept in a dict; ``map_index`` of a mapped task's
    instance (-1: not mapped)."""

    def __init__(self, xcoms: dict[tuple[str, str], Any] | None = None, *, map_index: int = -1) -> None:
        self.xcoms: dict[tuple[str, str], Any] = dict(xcoms or {})
        self.pushed: dict[str, Any] = {}
        self.map_index = map_index

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value

    def xcom_pull(self, task_ids: str | None = None, key: str = "return_value", **_: Any) -> Any:
        return self.xcoms.get((str(task_ids), key))


def context(dag: Any, conf: dict[str, Any] = CONF, ti: RecordingTI | None = None) -> dict[str, Any]:
    """A task context as the task runner builds it: params (defaults + run conf), run id, Variables."""
    from airflow.sdk.execution_time.context import VariableAccessor

    params = copy.deepcopy(dag.params)
    for key, value in conf.items():
        params[key] = value
    ti = ti or RecordingTI()
    return {
        "dag": dag,
        "dag_run": SimpleNamespace(conf=conf),
        "params": params.validate(),
        "run_id": RUN_ID,
        "var": {"value": VariableAccessor(deserialize_json=False), "json": VariableAccessor(deserialize_json=True)},
        "ti": ti,
        "task_instance": ti,
    }


def rendered(dag: Any, task_id: str, ctx: dict[str, Any] | None = None) -> Any:
    task = dag.get_task(task_id)
    task.render_template_fields(ctx or context(dag))
    return task


def rendered_shard(dag: Any, plan: list[dict[str, Any]], index: int, conf: dict[str, Any] = CONF) -> Any:
    """Instance ``index`` of the mapped ``infer`` task, rendered as the task runner renders it (the plan as
    ``plan_infer``'s XCom): the operator it unmaps to, and its context."""
    ti = RecordingTI({("plan_infer", "return_value"): plan}, map_index=index)
    ctx = context(dag, conf, ti=ti)
    dag.get_task("infer").render_template_fields(ctx)
    return ctx["task"], ctx


def plan_of(shards: int, conf: dict[str, Any] = CONF) -> list[dict[str, Any]]:
    """What ``plan_infer`` returns for ``shards`` shards of the run (its arguments: cxr.tasks.infer_arguments)."""
    from cxr.tasks import infer_arguments

    lake, params = conf["lakehouse_uri"], {**conf}
    return [
        {
            "shard": f"{i}/{shards}",
            "args": infer_arguments(
                params, lakehouse_uri=lake, run_id=f"inf-{SAFE}", shard=f"{i}/{shards}" if shards > 1 else None
            ),
            "threads": 0,
        }
        for i in range(shards)
    ]


def operator_class(task: Any) -> type:
    """The operator class of a task, mapped or not."""
    return task.operator_class if task.is_mapped else type(task)


def ddl(db: str, lake: str = "s3://lake-bucket/lake") -> list[str]:
    """The DDL of the rendered database and lakehouse (its text is checked in tests/test_sql.py)."""
    from cxr.sql import athena_ddl

    statements = athena_ddl(lake, database=db)
    assert statements[0] == f"CREATE DATABASE IF NOT EXISTS `{db}`" and len(statements) == 1 + 2 * len(TABLE_NAMES)
    assert statements[2].endswith(f"LOCATION '{lake}/_published/tensors/'")  # the published manifest
    return statements


# --- parsing: graph, retries, operators --------------------------------------------------------------
@pytest.mark.parametrize("mode", ["serverless", "cluster"])
def test_aws_task_graph_retries_and_operators(aws_env: pytest.MonkeyPatch, mode: str) -> None:
    from airflow.providers.amazon.aws.operators.athena import AthenaOperator
    from airflow.providers.amazon.aws.operators.ecs import EcsRunTaskOperator
    from airflow.providers.amazon.aws.operators.emr import EmrAddStepsOperator, EmrServerlessStartJobOperator
    from airflow.providers.amazon.aws.sensors.emr import EmrStepSensor
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.providers.standard.sensors.python import PythonSensor

    dag = load_dag(aws_env, mode)
    expected = EDGES[mode] | set(zip(CHAIN[:-1], CHAIN[1:], strict=True))
    assert _edges(dag) == expected
    assert sorted(t.task_id for t in dag.tasks) == sorted({t for e in expected for t in e})
    assert {t.task_id: t.retries for t in dag.tasks if t.retries < 2} == {}
    assert "profile:aws" in dag.tags

    classes = {
        "wait_for_images": PythonSensor,
        "infer": EcsRunTaskOperator,
        **dict.fromkeys(
            [
                *("validate_tensors", "plan_infer", "drift", "validate_predictions", "evaluate", "publish"),
                *("athena_ddl", "report"),
            ],
            PythonOperator,
        ),
    }
    if mode == "serverless":
        classes["preprocess"] = EmrServerlessStartJobOperator
    else:
        classes |= {"preprocess.add_step": EmrAddStepsOperator, "preprocess.wait_step": EmrStepSensor}
    assert {k: operator_class(dag.get_task(k)) for k in classes} == classes
    assert sorted(t.task_id for t in dag.tasks if t.is_mapped) == ["athena_publish", "infer"]
    assert repr(dag.get_task("infer").expand_input.value) == (
        "{'overrides': XComArg(<Task(PythonOperator): plan_infer>).map(ecs_overrides)}"
    )
    mapped = dag.get_task("athena_publish")
    assert mapped.operator_class is AthenaOperator and mapped.partial_kwargs["database"] == "default"


@pytest.mark.parametrize("mode", ["serverless", "cluster"])
def test_aws_dag_serializes_as_the_dag_processor_stores_it(aws_env: pytest.MonkeyPatch, mode: str) -> None:
    """The scheduler sees the serialized DAG: same tasks, same edges, the ECS task still native-rendered."""
    from airflow.serialization.serialized_objects import DagSerialization

    dag = load_dag(aws_env, mode)
    stored = DagSerialization.from_dict(json.loads(json.dumps(DagSerialization.to_dict(dag))))
    assert _edges(stored) == _edges(dag)
    assert stored.get_task("infer").is_mapped
    assert stored.get_task("infer").partial_kwargs["render_template_as_native_obj"] is True


def test_aws_dag_does_not_change_the_local_dag(aws_env: pytest.MonkeyPatch) -> None:
    """Loading the aws DAG registers no module, and the local profile still parses to its own operators."""
    import sys

    load_dag(aws_env, "serverless")
    assert not [m for m in sys.modules if m.startswith("_cxr_dag_aws")]
    aws_env.setenv("CXR_PROFILE", "local")
    local = load_dag(aws_env, "serverless")
    assert type(local.get_task("wait_for_images")).__name__ == "PythonSensor"
    assert "athena_ddl" not in local.task_ids and "profile:local" in local.tags


# --- rendering ---------------------------------------------------------------------------------------
def test_rendered_emr_serverless_job(aws_env: pytest.MonkeyPatch) -> None:
    task = rendered(load_dag(aws_env, "serverless"), "preprocess")
    assert task.application_id == "00app"
    assert task.execution_role_arn == "arn:aws:iam::123456789012:role/cxr-emr"
    assert task.name == f"cxr-preprocess-{SAFE}"
    assert task.job_driver == {
        "sparkSubmit": {
            "entryPoint": "s3://code-bucket/cxr/cli.py",
            "entryPointArguments": PREPROCESS_ARGS,
            "sparkSubmitParameters": SUBMIT.format(driver="spark.emr-serverless.driverEnv"),
        }
    }
    assert task.configuration_overrides == {
        "monitoringConfiguration": {"s3MonitoringConfiguration": {"logUri": "s3://lake-bucket/lake/logs/emr/"}}
    }


def test_rendered_emr_cluster_step_and_sensor(aws_env: pytest.MonkeyPatch) -> None:
    dag = load_dag(aws_env, "cluster")
    ti = RecordingTI({("preprocess.add_step", "return_value"): ["s-STEP1"]})
    add = rendered(dag, "preprocess.add_step", context(dag, ti=ti))
    assert add.job_flow_id == "j-CLUSTER"
    assert add.steps == [
        {
            "Name": f"cxr-preprocess-{SAFE}",
            "ActionOnFailure": "CONTINUE",
            "HadoopJarStep": {
                "Jar": "command-runner.jar",
                "Args": [
                    *("spark-submit", "--deploy-mode", "cluster"),
                    *SUBMIT.format(driver="spark.yarn.appMasterEnv").split(),
                    "s3://code-bucket/cxr/cli.py",
                    *PREPROCESS_ARGS,
                ],
            },
        }
    ]
    sensor = rendered(dag, "preprocess.wait_step", context(dag, ti=ti))
    assert (sensor.job_flow_id, sensor.step_id) == ("j-CLUSTER", "s-STEP1")


def test_rendered_ecs_task_matches_the_image_entrypoint(aws_env: pytest.MonkeyPatch) -> None:
    task, _ = rendered_shard(load_dag(aws_env, "serverless"), plan_of(1), 0)
    assert (task.cluster, task.task_definition, task.launch_type) == ("cxr-cluster", "cxr-infer:3", "FARGATE")
    assert task.overrides == {"containerOverrides": [{"name": "cxr-infer", "command": INFER_ARGS}]}
    assert task.network_configuration == {
        "awsvpcConfiguration": {
            "subnets": ["subnet-1", "subnet-2"],
            "securityGroups": ["sg-1"],
            "assignPublicIp": "DISABLED",
        }
    }
    # the override replaces the image's CMD: ENTRYPOINT + command is the whole `cxr infer` call
    dockerfile = (REPO / "inference" / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    assert [*entrypoint, *INFER_ARGS] == ["cxr", "infer", *INFER_ARGS]


STAND_IN_CONF = [
    ({}, []),
    ({"allow_untrained": True}, ["--allow-untrained"]),
    ({"weights_dir": "/models/xrv dir"}, ["--weights-dir", "/models/xrv dir"]),
    ({"allow_untrained": True, "weights_dir": "/w"}, ["--allow-untrained", "--weights-dir", "/w"]),
]


@pytest.mark.parametrize(("conf", "flags"), STAND_IN_CONF)
def test_rendered_ecs_command_passes_the_stand_in_and_weights_flags(
    aws_env: pytest.MonkeyPatch, conf: dict[str, Any], flags: list[str]
) -> None:
    """``allow_untrained`` and ``weights_dir`` reach the container as the local command passes them, and
    an unset one leaves no trace (no empty argument)."""
    import shlex

    dag = load_dag(aws_env, "serverless")
    task, _ = rendered_shard(dag, plan_of(1, {**CONF, **conf}), 0, {**CONF, **conf})
    assert task.overrides == {"containerOverrides": [{"name": "cxr-infer", "command": [*INFER_ARGS, *flags]}]}

    aws_env.setenv("CXR_PROFILE", "local")
    aws_env.setenv("CXR_INFER_RUNNER", "process")
    local = load_dag(aws_env, "serverless")
    task, _ = rendered_shard(local, plan_of(1, {**CONF, **conf}), 0, {**CONF, **conf})
    command = shlex.split(task.bash_command)
    assert command[1:] == ["infer", *INFER_ARGS, *flags]  # the same arguments, to the local `cxr`


@pytest.mark.parametrize("mode", ["serverless", "cluster"])
def test_waiters_outlast_the_execution_timeout(aws_env: pytest.MonkeyPatch, mode: str) -> None:
    """No waiter gives up (and cancels the job) before the task's own execution timeout: the EMR
    Serverless provider's default, 25 polls of 60 s, cancelled any job longer than ~25 minutes."""
    dag = load_dag(aws_env, mode)
    timeout = dag.default_args["execution_timeout"]
    assert timeout.total_seconds() > 25 * 60  # the DAG allows long jobs: what the waiters must respect
    waiting = ["infer", "preprocess"] if mode == "serverless" else ["infer"]
    for task_id in waiting:
        task = rendered_shard(dag, plan_of(2), 1)[0] if task_id == "infer" else rendered(dag, task_id)
        assert task.execution_timeout == timeout
        assert task.waiter_max_attempts * task.waiter_delay >= timeout.total_seconds(), task_id
    if mode == "cluster":
        sensor = dag.get_task("preprocess.wait_step")
        assert sensor.execution_timeout == timeout
        assert sensor.timeout >= timeout.total_seconds()  # the sensor's own limit is not the shorter one


def test_rendered_sensor_key_and_athena_ddl(aws_env: pytest.MonkeyPatch) -> None:
    dag = load_dag(aws_env, "serverless")
    ctx = context(dag, {**CONF, "input_uri": "s3://in-bucket/images/"})
    sensor = rendered(dag, "wait_for_images", ctx)
    assert sensor.op_kwargs["input_uri"] == "s3://in-bucket/images/" and sensor.soft_fail
    assert sensor.python_callable.__qualname__ == "new_images_waiting"

    assert rendered(dag, "athena_ddl", ctx).execute(ctx) == ddl("cxr")  # cxr_athena_db unset: "cxr"
    aws_env.setenv("AIRFLOW_VAR_CXR_ATHENA_DB", "cxr_prod")
    dag = load_dag(aws_env, "serverless")
    ctx = context(dag)
    assert rendered(dag, "athena_ddl", ctx).execute(ctx) == ddl("cxr_prod")

    athena = dag.get_task("athena_publish").unmap({"query": ddl("cxr_prod")[2]})
    athena.render_template_fields(ctx)
    assert (athena.output_location, athena.database, athena.query, athena.workgroup) == (
        "s3://athena-results/cxr/",
        "default",
        ddl("cxr_prod")[2],
        "primary",  # cxr_athena_workgroup unset
    )
    aws_env.setenv("AIRFLOW_VAR_CXR_ATHENA_WORKGROUP", "cxr")
    dag = load_dag(aws_env, "serverless")
    athena = dag.get_task("athena_publish").unmap({"query": "SELECT 1"})
    athena.render_template_fields(context(dag))
    assert athena.workgroup == "cxr"


# --- the AWS calls, against the local moto server ----------------------------------------------------
@pytest.fixture
def moto_aws(aws_env: pytest.MonkeyPatch, s3_endpoint: str) -> Iterator[dict[str, Any]]:
    """Airflow's ``aws_default`` connection -> the local moto server; boto3 clients for the checks."""
    import boto3

    extra = {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}
    conn = {"conn_type": "aws", "login": "testing", "password": "testing", "extra": extra}
    aws_env.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))

    def client(service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    yield {"client": client}


@pytest.mark.slow
def test_new_images_sensor_pokes_the_input_prefix_on_s3(
    moto_aws: dict[str, Any], aws_env: pytest.MonkeyPatch, s3_endpoint: str
) -> None:
    """The aws profile's sensor is the local one (the `files` ledger decides what is new), over s3://."""
    aws_env.setenv("CXR_S3_ENDPOINT_URL", s3_endpoint)
    s3 = moto_aws["client"]("s3")
    s3.create_bucket(Bucket="cxr-dagaws-in")
    s3.put_object(Bucket="cxr-dagaws-in", Key="other/x.png", Body=b"x")
    dag = load_dag(aws_env, "serverless")
    conf = {**CONF, "input_uri": "s3://cxr-dagaws-in/images", "lakehouse_uri": "s3://cxr-dagaws-in/lake"}
    ctx = context(dag, conf)
    sensor = rendered(dag, "wait_for_images", ctx)
    assert sensor.poke(ctx).is_done is False  # only a key outside the prefix
    s3.put_object(Bucket="cxr-dagaws-in", Key="images/sub/a.png", Body=b"png")
    assert sensor.poke(ctx).is_done is True  # no ledger yet: every file is new


@pytest.mark.slow
def test_emr_serverless_job_run_started(moto_aws: dict[str, Any], aws_env: pytest.MonkeyPatch) -> None:
    emr = moto_aws["client"]("emr-serverless")
    app_id = emr.create_application(name="cxr", releaseLabel="emr-7.5.0", type="SPARK")["applicationId"]
    aws_env.setenv("AIRFLOW_VAR_CXR_EMR_SERVERLESS_APP_ID", app_id)
    dag = load_dag(aws_env, "serverless")
    ctx = context(dag)
    task = rendered(dag, "preprocess", ctx)
    task.waiter_delay = 1
    job_id = task.execute(ctx)  # waits for completion: moto's runs succeed at once

    run = emr.get_job_run(applicationId=app_id, jobRunId=job_id)["jobRun"]
    assert run["state"] == "SUCCESS" and run["name"] == f"cxr-preprocess-{SAFE}"
    assert run["executionRole"] == "arn:aws:iam::123456789012:role/cxr-emr"
    assert run["jobDriver"]["sparkSubmit"] == {
        "entryPoint": "s3://code-bucket/cxr/cli.py",
        "entryPointArguments": PREPROCESS_ARGS,
        "sparkSubmitParameters": SUBMIT.format(driver="spark.emr-serverless.driverEnv"),
    }
    assert run["configurationOverrides"]["monitoringConfiguration"] == {
        "s3MonitoringConfiguration": {"logUri": "s3://lake-bucket/lake/logs/emr/"}
    }


@pytest.mark.slow
def test_emr_cluster_step_added(moto_aws: dict[str, Any], aws_env: pytest.MonkeyPatch) -> None:
    emr = moto_aws["client"]("emr")
    cluster_id = emr.run_job_flow(
        Name="cxr",
        ReleaseLabel="emr-7.5.0",
        Instances={"InstanceCount": 1, "KeepJobFlowAliveWhenNoSteps": True, "MasterInstanceType": "m5.xlarge"},
        JobFlowRole="EMR_EC2_DefaultRole",
        ServiceRole="EMR_DefaultRole",
    )["JobFlowId"]
    aws_env.setenv("AIRFLOW_VAR_CXR_EMR_CLUSTER_ID", cluster_id)
    dag = load_dag(aws_env, "cluster")
    ti = RecordingTI()
    ctx = context(dag, ti=ti)
    step_ids = rendered(dag, "preprocess.add_step", ctx).execute(ctx)
    assert len(step_ids) == 1

    step = emr.describe_step(ClusterId=cluster_id, StepId=step_ids[0])["Step"]
    assert step["Name"] == f"cxr-preprocess-{SAFE}"
    assert step["Config"]["Args"][:3] == ["spark-submit", "--deploy-mode", "cluster"]
    assert step["Config"]["Args"][-len(PREPROCESS_ARGS) - 1 :] == ["s3://code-bucket/cxr/cli.py", *PREPROCESS_ARGS]

    ti.xcoms[("preprocess.add_step", "return_value")] = step_ids
    sensor = rendered(dag, "preprocess.wait_step", ctx)
    state = step["Status"]["State"]
    assert sensor.poke(ctx) is (state == "COMPLETED")


def _s3_tensors_lake(tmp_path: Path, samples_dir: Path, settings: Any, bucket: str) -> tuple[str, int]:
    """A lakehouse on the moto server whose ``tensors`` hold every valid sample kind; (its URI, rows)."""
    from tests.conftest import make_bucket, upload_dir, write_tensors_table

    files = sorted(p for p in samples_dir.rglob("*") if p.is_file() and p.parts[-2] in ("images", "dicom"))
    n = write_tensors_table(tmp_path / "lake", files, settings)
    uri = f"{make_bucket(settings, bucket)}/lake"
    upload_dir(settings, tmp_path / "lake", uri)
    return uri, n


def _planned(dag: Any, conf: dict[str, Any]) -> list[dict[str, Any]]:
    """``plan_infer`` run as its task (the real callable, against the lakehouse on the moto server)."""
    ti = RecordingTI()
    ctx = context(dag, conf, ti=ti)
    plan = rendered(dag, "plan_infer", ctx).execute(ctx)
    assert ti.pushed["plan"]["shards"] == len(plan)
    return plan


@pytest.mark.slow
def test_ecs_tasks_started_one_per_shard(
    moto_aws: dict[str, Any],
    aws_env: pytest.MonkeyPatch,
    s3_endpoint: str,
    settings: Any,
    samples_dir: Path,
    tmp_path: Path,
) -> None:
    """Auto fan-out on ECS: plan_infer counts the predictions to write in the lakehouse on S3 (17 images,
    10 per task: 2 shards), and each mapped instance starts one ECS task whose command is its shard's,
    under the same run id."""
    ec2, ecs = moto_aws["client"]("ec2"), moto_aws["client"]("ecs")
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})  # moto's task ENIs need it
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24")["Subnet"]["SubnetId"] for i in (1, 2)]
    sg = ec2.create_security_group(GroupName="cxr-dagaws", Description="cxr", VpcId=vpc)["GroupId"]
    ecs.create_cluster(clusterName="cxr-dagaws")
    td = ecs.register_task_definition(
        family="cxr-dagaws-infer",
        networkMode="awsvpc",
        requiresCompatibilities=["FARGATE"],
        cpu="1024",
        memory="4096",
        containerDefinitions=[
            {"name": "cxr-infer", "image": "cxr-infer:test", "essential": True, "cpu": 1024, "memory": 4096}
        ],
    )["taskDefinition"]
    for key, value in {
        "ecs_cluster": "cxr-dagaws",
        "ecs_task_definition": f"{td['family']}:{td['revision']}",
        "ecs_subnets": ",".join(subnets),
        "ecs_security_groups": sg,
    }.items():
        aws_env.setenv(f"AIRFLOW_VAR_CXR_{key.upper()}", value)
    lake, n = _s3_tensors_lake(tmp_path, samples_dir, settings, "cxr-dagaws-ecs")
    aws_env.setenv("CXR_S3_ENDPOINT_URL", s3_endpoint)
    aws_env.setenv("CXR_INFER_IMAGES_PER_TASK", "10")
    dag = load_dag(aws_env, "serverless")
    conf = {**CONF, "lakehouse_uri": lake, "models": ["a"], "allow_untrained": True}
    plan = _planned(dag, conf)
    assert len(plan) == -(-n // 10) == 2

    arns = []
    for i in range(len(plan)):
        task, ctx = rendered_shard(dag, plan, i, conf)
        # moto stops the task at its first describe but leaves its container PENDING, which the operator's
        # success check reports as "still pending": start it only (the run_task call is what is checked)
        task.wait_for_completion = False
        task.execute(ctx)
        arns.append(ctx["ti"].pushed["ecs_task_arn"])

    described = {t["taskArn"]: t for t in ecs.describe_tasks(cluster="cxr-dagaws", tasks=arns)["tasks"]}
    args = ["--lakehouse", lake, "--run-id", f"inf-{SAFE}", "--no-progress", "--model=a", "--allow-untrained"]
    for i, arn in enumerate(arns):
        command = [*args, "--shard", f"{i}/2"]
        assert described[arn]["overrides"]["containerOverrides"] == [{"name": "cxr-infer", "command": command}]
        assert described[arn]["taskDefinitionArn"] == td["taskDefinitionArn"]
        assert (described[arn]["launchType"], described[arn]["startedBy"]) == ("FARGATE", "cxr")
        eni = {d["name"]: d["value"] for d in described[arn]["attachments"][0]["details"]}
        assert eni["subnetId"] == subnets[0]


def test_rendered_batch_jobs_one_per_shard(aws_env: pytest.MonkeyPatch) -> None:
    """CXR_INFER_BACKEND=batch: one AWS Batch job per shard, on the queue and definition the Variables
    name, each named after the run and its map index, its command the shard's."""
    from airflow.providers.amazon.aws.operators.batch import BatchOperator

    aws_env.setenv("CXR_INFER_BACKEND", "batch")
    dag = load_dag(aws_env, "serverless")
    assert operator_class(dag.get_task("infer")) is BatchOperator
    for i in range(3):
        task, _ = rendered_shard(dag, plan_of(3), i)
        assert (task.job_name, task.job_queue, task.job_definition) == (
            f"cxr-infer-{SAFE}-{i}",
            "cxr-gpu",
            "cxr-infer-gpu:2",
        )
        assert task.container_overrides == {"command": [*INFER_ARGS, "--shard", f"{i}/3"]}
        assert task.array_properties is None and task.wait_for_completion is True


@pytest.mark.slow
def test_batch_jobs_submitted_one_per_shard(
    moto_aws: dict[str, Any],
    aws_env: pytest.MonkeyPatch,
    s3_endpoint: str,
    settings: Any,
    samples_dir: Path,
    tmp_path: Path,
) -> None:
    """The infer_shards Param on AWS Batch: plan_infer plans 2 shards for the lakehouse on S3, and each
    mapped instance submits one job whose container command is its shard's, under the same run id."""
    iam, batch = moto_aws["client"]("iam"), moto_aws["client"]("batch")
    role = iam.create_role(RoleName="cxr-dagaws-batch", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    env = batch.create_compute_environment(
        computeEnvironmentName="cxr-dagaws-gpu", type="UNMANAGED", state="ENABLED", serviceRole=role
    )
    queue = batch.create_job_queue(
        jobQueueName="cxr-dagaws-gpu",
        state="ENABLED",
        priority=1,
        computeEnvironmentOrder=[{"order": 1, "computeEnvironment": env["computeEnvironmentArn"]}],
    )
    definition = batch.register_job_definition(
        jobDefinitionName="cxr-dagaws-infer",
        type="container",
        containerProperties={"image": "cxr-infer:test", "vcpus": 4, "memory": 16384},
    )
    aws_env.setenv("AIRFLOW_VAR_CXR_BATCH_JOB_QUEUE", "cxr-dagaws-gpu")
    aws_env.setenv("AIRFLOW_VAR_CXR_BATCH_JOB_DEFINITION", f"cxr-dagaws-infer:{definition['revision']}")
    aws_env.setenv("CXR_INFER_BACKEND", "batch")
    lake, _ = _s3_tensors_lake(tmp_path, samples_dir, settings, "cxr-dagaws-batch")
    aws_env.setenv("CXR_S3_ENDPOINT_URL", s3_endpoint)
    dag = load_dag(aws_env, "serverless")
    conf = {**CONF, "lakehouse_uri": lake, "infer_shards": 2}
    plan = _planned(dag, conf)
    assert [p["shard"] for p in plan] == ["0/2", "1/2"]

    job_ids = []
    for i in range(len(plan)):
        task, ctx = rendered_shard(dag, plan, i, conf)
        task.wait_for_completion = False  # submitted only: moto would run the container in Docker
        job_ids.append(task.execute(ctx))

    jobs = {j["jobId"]: j for j in batch.describe_jobs(jobs=job_ids)["jobs"]}
    args = ["--lakehouse", lake, "--run-id", f"inf-{SAFE}", "--no-progress", "--model=a,b"]
    for i, job_id in enumerate(job_ids):
        job = jobs[job_id]
        assert job["container"]["command"] == [*args, "--shard", f"{i}/2"]
        assert job["jobName"] == f"cxr-infer-{SAFE}-{i}"
        assert (job["jobQueue"], job["jobDefinition"]) == (queue["jobQueueArn"], definition["jobDefinitionArn"])


@pytest.mark.slow
def test_athena_runs_each_ddl_statement(moto_aws: dict[str, Any], aws_env: pytest.MonkeyPatch) -> None:
    athena = moto_aws["client"]("athena")
    aws_env.setenv("AIRFLOW_VAR_CXR_ATHENA_DB", "cxr_dagaws")
    dag = load_dag(aws_env, "serverless")
    ctx = context(dag)
    statements = rendered(dag, "athena_ddl", ctx).execute(ctx)
    assert statements == ddl("cxr_dagaws")
    ids = []
    for statement in statements:  # what the mapped task instances do, one statement each
        task = dag.get_task("athena_publish").unmap({"query": statement})
        task.render_template_fields(ctx)
        task.sleep_time = 0
        ids.append(task.execute(ctx))

    ran = [athena.get_query_execution(QueryExecutionId=i)["QueryExecution"] for i in ids]
    assert [q["Query"] for q in ran] == statements
    assert {q["Status"]["State"] for q in ran} == {"SUCCEEDED"}
    # moto names the result file inside the output folder, as Athena does
    assert [q["ResultConfiguration"]["OutputLocation"].rsplit("/", 1)[0] for q in ran] == [
        "s3://athena-results/cxr"
    ] * len(statements)
    assert {q["QueryExecutionContext"]["Database"] for q in ran} == {"default"}
