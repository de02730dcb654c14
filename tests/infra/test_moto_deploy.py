"""The synthesized stacks deploy: every template is created in moto's CloudFormation (a real
``moto_server``), in dependency order, its cross-stack imports resolved, and reaches CREATE_COMPLETE.

moto's CloudFormation skips the resource types it does not implement (it logs ``No Moto CloudFormation
support for <type>`` and leaves them out of DescribeStackResources): that set is pinned exactly, so a moto
release that learns (or forgets) a type fails here. The fixture creates the skipped resources through
their APIs from the template's own properties (tests/infra/moto_helpers.py), except MWAA, which moto does
not implement at all: the MWAA environment is covered by the template assertions only.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from infra.versions import EMR_RELEASE_LABEL
from tests.infra.moto_helpers import STACKS, Deployment, moto_deployment, moto_templates  # noqa: F401

pytestmark = pytest.mark.slow

#: what moto 5.2.5's CloudFormation skips, per stack
SKIPPED = {
    "Cxr-Storage": {"AWS::S3::BucketPolicy", "AWS::SecretsManager::Secret"},
    "Cxr-Network": {"AWS::EC2::SecurityGroupEgress"},
    "Cxr-Compute": {"AWS::EMRServerless::Application"},
    "Cxr-Catalog": {"AWS::Glue::Database", "AWS::Athena::WorkGroup"},
    "Cxr-Orchestration": {"AWS::MWAA::Environment"},
    "Cxr-Monitoring": {"AWS::CloudWatch::Alarm", "AWS::SNS::TopicPolicy"},
    "Cxr-Ci": {"AWS::IAM::OIDCProvider"},
}


def _of_type(templates: dict[str, dict[str, Any]], stack: str, kind: str) -> dict[str, dict[str, Any]]:
    return {k: r["Properties"] for k, r in templates[stack]["Resources"].items() if r["Type"] == kind}


def test_every_stack_is_created_in_order(moto_deployment: Deployment) -> None:  # noqa: F811
    assert moto_deployment.status == dict.fromkeys(STACKS, "CREATE_COMPLETE")
    assert list(moto_deployment.status) == list(STACKS)


def test_moto_skips_exactly_these_types(moto_deployment: Deployment) -> None:  # noqa: F811
    assert {s: set(v.values()) for s, v in moto_deployment.skipped.items()} == SKIPPED
    assert moto_deployment.log is not None
    logged = set(re.findall(r"No Moto CloudFormation support for (\S+)", moto_deployment.log.read_text()))
    assert logged == set().union(*SKIPPED.values())


def test_cross_stack_imports_resolved(moto_deployment: Deployment) -> None:  # noqa: F811
    cfn = moto_deployment.client("cloudformation")
    exports = {e["Name"]: e["Value"] for e in cfn.list_exports()["Exports"]}
    storage, compute = moto_deployment.outputs["Cxr-Storage"], moto_deployment.outputs["Cxr-Compute"]
    assert exports["Cxr-Storage:ExportsOutputRefLake5F1B88EABDBCEEF1"] == storage["LakeBucket"]
    assert moto_deployment.outputs["Cxr-Catalog"]["AthenaOutput"] == f"s3://{storage['LakeBucket']}/athena-results/"
    orchestration = moto_deployment.outputs["Cxr-Orchestration"]
    assert orchestration["LakehouseUri"] == f"s3://{storage['LakeBucket']}/lakehouse"
    assert orchestration["InputUri"] == f"s3://{storage['RawBucket']}/images"
    assert storage["CodeBucket"] == "airflow-cxr-123456789012-us-east-1"
    assert compute["EcsCluster"] == "cxr-infer"
    # the application the fixture created stands where CloudFormation's would: in the outputs and exports
    assert compute["EmrApplicationId"] == moto_deployment.created["Spark"]
    assert storage["PseudonymSecretArn"] == moto_deployment.created["PseudonymKey2CD808DE"]


def test_skipped_resources_created_from_the_template(
    moto_deployment: Deployment,  # noqa: F811
    moto_templates: dict[str, dict[str, Any]],  # noqa: F811
) -> None:
    dep = moto_deployment
    storage, network = dep.outputs["Cxr-Storage"], dep.outputs["Cxr-Network"]
    # EMR Serverless: moto refuses the emr-spark-X.Y.Z label (it knows emr-X.Y.0): pinned, so we notice
    assert dep.release_label_refused == EMR_RELEASE_LABEL
    app = dep.client("emr-serverless").get_application(applicationId=dep.created["Spark"])["application"]
    (spec,) = _of_type(moto_templates, "Cxr-Compute", "AWS::EMRServerless::Application").values()
    assert (app["name"], app["type"].upper()) == (spec["Name"], "SPARK")
    assert app["networkConfiguration"] == {
        "subnetIds": network["PrivateSubnets"].split(","),
        "securityGroupIds": [network["JobsSecurityGroup"]],
    }
    assert app["autoStopConfiguration"] == {"enabled": True, "idleTimeoutMinutes": 15}
    # Glue, Athena
    assert dep.client("glue").get_database(Name="cxr")["Database"]["Name"] == "cxr"
    wg = dep.client("athena").get_work_group(WorkGroup="cxr")["WorkGroup"]["Configuration"]
    assert wg["ResultConfiguration"]["OutputLocation"] == f"s3://{storage['LakeBucket']}/athena-results/"
    assert wg["ResultConfiguration"]["EncryptionConfiguration"] == {
        "EncryptionOption": "SSE_KMS",
        "KmsKey": storage["KeyArn"],
    }
    assert wg["EnforceWorkGroupConfiguration"] is True
    # the secret, under the stack's key
    secret = dep.client("secretsmanager").describe_secret(SecretId=storage["PseudonymSecretArn"])
    assert (secret["Name"], secret["KmsKeyId"]) == ("cxr/pseudonym-key", storage["KeyArn"])
    # bucket policies, alarms, the topic policy, the OIDC provider
    s3 = dep.client("s3")
    for bucket in (storage["RawBucket"], storage["LakeBucket"], storage["CodeBucket"], storage["LogsBucket"]):
        assert '"aws:SecureTransport"' in s3.get_bucket_policy(Bucket=bucket)["Policy"]
    alarms = dep.client("cloudwatch").describe_alarms()["MetricAlarms"]
    expected = {p["AlarmName"] for p in _of_type(moto_templates, "Cxr-Monitoring", "AWS::CloudWatch::Alarm").values()}
    assert {a["AlarmName"] for a in alarms} == expected and len(expected) == 6
    topic = dep.outputs["Cxr-Monitoring"]["AlarmTopicArn"]
    assert all(a["AlarmActions"] == [topic] for a in alarms)
    assert "events.amazonaws.com" in dep.client("sns").get_topic_attributes(TopicArn=topic)["Attributes"]["Policy"]
    providers = dep.client("iam").list_open_id_connect_providers()["OpenIDConnectProviderList"]
    assert [p["Arn"] for p in providers] == [dep.created["GitHubOidc"]]


def test_batch_and_ecs_mirror_the_template(moto_deployment: Deployment) -> None:  # noqa: F811
    dep = moto_deployment
    network = dep.outputs["Cxr-Network"]
    batch = dep.client("batch")
    (env,) = batch.describe_compute_environments(computeEnvironments=["cxr-gpu"])["computeEnvironments"]
    resources = env["computeResources"]
    assert (env["type"], resources["type"], resources["minvCpus"], resources["maxvCpus"]) == ("MANAGED", "SPOT", 0, 64)
    assert resources["subnets"] == network["PrivateSubnets"].split(",")
    assert resources["securityGroupIds"] == [network["JobsSecurityGroup"]]
    assert env["serviceRole"].endswith(":role/aws-service-role/batch.amazonaws.com/AWSServiceRoleForbatch")
    (queue,) = batch.describe_job_queues(jobQueues=["cxr-gpu"])["jobQueues"]
    assert queue["computeEnvironmentOrder"] == [{"order": 1, "computeEnvironment": env["computeEnvironmentArn"]}]
    newest = max(
        batch.describe_job_definitions(jobDefinitionName="cxr-infer-gpu", status="ACTIVE")["jobDefinitions"],
        key=lambda d: d["revision"],
    )
    assert newest["jobDefinitionArn"] == dep.created["InferGpuJob"]
    assert (newest["revision"], newest["timeout"]) == (2, {"attemptDurationSeconds": 6 * 3600})
    # moto keeps platformCapabilities of a first revision only (its CloudFormation passes None): pinned
    assert "platformCapabilities" not in newest
    container = newest["containerProperties"]
    assert container["secrets"] == []  # the pseudonym key goes to the EMR job only
    assert (
        container["jobRoleArn"]
        == dep.client("iam").get_role(RoleName=dep.physical["Cxr-Compute"]["InferTaskRoleBD31ABFB"])["Role"]["Arn"]
    )
    td = dep.client("ecs").describe_task_definition(taskDefinition="cxr-infer")["taskDefinition"]
    assert td["containerDefinitions"][0]["name"] == "cxr-infer"
    # moto's CloudFormation drops the task definition's NetworkMode, Cpu, Memory, RequiresCompatibilities
    assert (td["family"], td["networkMode"], "cpu" in td) == ("cxr-infer", "bridge", False)
