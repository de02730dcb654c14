"""The DAG under ``CXR_PROFILE=aws`` renders against what the stacks deployed: the Airflow Variables are
read from the moto deployment's SSM parameters (``/cxr/variables/*``, MWAA's secrets backend; here as
``AIRFLOW_VAR_<NAME>``), and every rendered value is checked against the resource moto reports (the EMR
Serverless application, the IAM role, the code bucket, the ECS cluster, task definition, subnets and
security group, the Batch queue and job definition, the Glue database and Athena workgroup), not against
the template. The Variables the DAG's templates reference are exactly the ones the stack writes.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.infra.moto_helpers import Deployment, moto_deployment, moto_templates  # noqa: F401
from tests.test_dag_aws import VARIABLES, aws_env, load_dag, plan_of, rendered, rendered_shard  # noqa: F401

pytestmark = pytest.mark.slow

PREFIX = "/cxr/variables/"


def ssm_variables(dep: Deployment) -> dict[str, str]:
    """Every ``/cxr/variables/<name>`` parameter of the deployment: name -> value."""
    pages = dep.client("ssm").get_paginator("get_parameters_by_path").paginate(Path=PREFIX, Recursive=True)
    return {p["Name"].removeprefix(PREFIX): p["Value"] for page in pages for p in page["Parameters"]}


@pytest.fixture
def stack_env(aws_env: pytest.MonkeyPatch, moto_deployment: Deployment) -> pytest.MonkeyPatch:  # noqa: F811
    """The aws profile with the deployment's Variables only (the hand-written ones of test_dag_aws unset)."""
    for name in VARIABLES:
        aws_env.delenv(f"AIRFLOW_VAR_{name.upper()}", raising=False)
    for name, value in ssm_variables(moto_deployment).items():
        aws_env.setenv(f"AIRFLOW_VAR_{name.upper()}", value)
    return aws_env


def referenced_variables(dag: Any) -> set[str]:
    """The Variables the DAG's templates read (``var.value.x`` and ``var.value.get('x', ...)``), from the
    serialized DAG: every task's template fields, mapped tasks' partial and expanded arguments included."""
    from airflow.serialization.serialized_objects import DagSerialization

    text = json.dumps(DagSerialization.to_dict(dag))
    return set(re.findall(r"var\.value\.(?:get\(\s*\\?['\"])?(\w+)", text))


def test_ssm_variables_are_the_dags(stack_env: pytest.MonkeyPatch, moto_deployment: Deployment) -> None:  # noqa: F811
    """Both inference backends of the stack's EMR mode (serverless): what the templates read is written."""
    ssm = set(ssm_variables(moto_deployment))
    referenced = referenced_variables(load_dag(stack_env, "serverless"))
    stack_env.setenv("CXR_INFER_BACKEND", "batch")
    referenced |= referenced_variables(load_dag(stack_env, "serverless"))
    assert "cxr_ecs_cluster" in referenced and "cxr_batch_job_queue" in referenced  # both backends parsed
    assert referenced - ssm == set()  # a Variable the DAG needs and the stack does not write fails here
    assert ssm - referenced == set()  # a Variable the stack writes for nothing fails here
    assert len(ssm) == 12


def test_emr_serverless_job_renders_the_deployed_application(
    stack_env: pytest.MonkeyPatch,
    moto_deployment: Deployment,  # noqa: F811
) -> None:
    dep = moto_deployment
    task = rendered(load_dag(stack_env, "serverless"), "preprocess")
    app = dep.client("emr-serverless").get_application(applicationId=task.application_id)["application"]
    assert app["name"] == "cxr-preprocess" and app["applicationId"] == dep.outputs["Cxr-Compute"]["EmrApplicationId"]
    role = dep.client("iam").get_role(RoleName=task.execution_role_arn.rsplit("/", 1)[1])["Role"]
    assert role["Arn"] == task.execution_role_arn
    assert role["RoleName"].startswith("Cxr-Compute-EmrJobRole")
    code = dep.outputs["Cxr-Storage"]["CodeBucket"]
    dep.client("s3").head_bucket(Bucket=code)
    submit = task.job_driver["sparkSubmit"]
    assert submit["entryPoint"] == f"s3://{code}/code/cli.py"
    params = submit["sparkSubmitParameters"].split()
    assert params[:2] == ["--py-files", f"s3://{code}/code/cxr.zip"]
    assert f"spark.archives=s3://{code}/code/cxr-env.tar.gz#environment" in params
    # the EMR job role may read exactly the code prefix the DAG points at
    policies = [
        dep.client("iam").get_role_policy(RoleName=role["RoleName"], PolicyName=p)["PolicyDocument"]
        for p in dep.client("iam").list_role_policies(RoleName=role["RoleName"])["PolicyNames"]
    ]
    resources = [r for doc in policies for s in doc["Statement"] for r in json.dumps(s["Resource"]).split('"')]
    assert f"arn:aws:s3:::{code}/code/*" in resources


def test_ecs_task_renders_the_deployed_cluster_task_and_network(
    stack_env: pytest.MonkeyPatch,
    moto_deployment: Deployment,  # noqa: F811
) -> None:
    dep = moto_deployment
    task, _ = rendered_shard(load_dag(stack_env, "serverless"), plan_of(1), 0)
    ecs, ec2 = dep.client("ecs"), dep.client("ec2")
    (cluster,) = ecs.describe_clusters(clusters=[task.cluster])["clusters"]
    assert (cluster["clusterName"], cluster["status"]) == (task.cluster, "ACTIVE")
    td = ecs.describe_task_definition(taskDefinition=task.task_definition)["taskDefinition"]
    assert (td["family"], td["status"]) == (task.task_definition, "ACTIVE")  # the family: its newest revision
    assert [c["name"] for c in td["containerDefinitions"]] == [task.overrides["containerOverrides"][0]["name"]]
    vpc = task.network_configuration["awsvpcConfiguration"]
    subnets = ec2.describe_subnets(SubnetIds=vpc["subnets"])["Subnets"]
    assert sorted(s["SubnetId"] for s in subnets) == sorted(vpc["subnets"]) and len(subnets) == 2
    network_vpc = dep.outputs["Cxr-Network"]["VpcId"]
    assert {s["VpcId"] for s in subnets} == {network_vpc}
    assert {s["MapPublicIpOnLaunch"] for s in subnets} == {False}  # private subnets
    (sg,) = ec2.describe_security_groups(GroupIds=vpc["securityGroups"])["SecurityGroups"]
    assert sg["VpcId"] == network_vpc
    # the same network the EMR application and the Batch compute environment use
    app = dep.client("emr-serverless").get_application(applicationId=dep.created["Spark"])["application"]
    assert app["networkConfiguration"] == {"subnetIds": vpc["subnets"], "securityGroupIds": vpc["securityGroups"]}
    (env,) = dep.client("batch").describe_compute_environments(computeEnvironments=["cxr-gpu"])["computeEnvironments"]
    assert (env["computeResources"]["subnets"], env["computeResources"]["securityGroupIds"]) == (
        vpc["subnets"],
        vpc["securityGroups"],
    )


def test_batch_job_renders_the_deployed_queue_and_definition(
    stack_env: pytest.MonkeyPatch,
    moto_deployment: Deployment,  # noqa: F811
) -> None:
    dep = moto_deployment
    stack_env.setenv("CXR_INFER_BACKEND", "batch")
    task, _ = rendered_shard(load_dag(stack_env, "serverless"), plan_of(2), 1)
    batch = dep.client("batch")
    (queue,) = batch.describe_job_queues(jobQueues=[task.job_queue])["jobQueues"]
    assert (queue["jobQueueName"], queue["state"]) == (task.job_queue, "ENABLED")
    assert queue["jobQueueArn"] == dep.outputs["Cxr-Compute"]["BatchJobQueue"]
    definitions = batch.describe_job_definitions(jobDefinitionName=task.job_definition, status="ACTIVE")
    newest = max(definitions["jobDefinitions"], key=lambda d: d["revision"])  # what a bare name submits
    assert newest["jobDefinitionName"] == task.job_definition
    task_role = dep.client("iam").get_role(RoleName=dep.physical["Cxr-Compute"]["InferTaskRoleBD31ABFB"])["Role"]
    assert newest["containerProperties"]["jobRoleArn"] == task_role["Arn"]


def test_athena_tasks_render_the_deployed_database_and_output(
    stack_env: pytest.MonkeyPatch,
    moto_deployment: Deployment,  # noqa: F811
) -> None:
    from tests.test_dag_aws import context

    dep = moto_deployment
    dag = load_dag(stack_env, "serverless")
    ctx = context(dag)
    ddl = rendered(dag, "athena_ddl", ctx)
    database = dep.client("glue").get_database(Name=ddl.op_kwargs["database"])["Database"]
    assert database["Name"] == ddl.op_kwargs["database"] == "cxr"
    athena = dag.get_task("athena_publish").unmap({"query": "SELECT 1"})
    athena.render_template_fields(ctx)
    group = dep.client("athena").get_work_group(WorkGroup=dep.outputs["Cxr-Catalog"]["AthenaWorkGroup"])["WorkGroup"]
    assert athena.output_location == group["Configuration"]["ResultConfiguration"]["OutputLocation"]
    assert athena.output_location == f"s3://{dep.outputs['Cxr-Storage']['LakeBucket']}/athena-results/"
    # the workgroup the MWAA role may use (athena:* on workgroup/cxr only), not the provider's "primary"
    assert athena.workgroup == group["Name"] == "cxr"
