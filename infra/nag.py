"""cdk-nag AwsSolutions findings accepted on purpose, each on the construct it concerns, with its reason.

cdk-nag v3 matches an acknowledgment by its exact finding id: ``AwsSolutions-IAM5[Resource::<arn>]`` names one
wildcard resource as cdk-nag renders it (``<Logical.Arn>`` for a GetAtt, the export name for a value imported
from another stack, ``<AWS::Region>`` for a pseudo parameter). The ids are built here from the constructs
themselves, so a renamed construct changes both sides; a finding that is not listed fails ``make synth``.
"""

from __future__ import annotations

from typing import Any, cast

import aws_cdk as cdk
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from constructs import IConstruct

from infra.catalog import CatalogStack
from infra.compute import ComputeStack
from infra.config import (
    ATHENA_PREFIX,
    CODE_PREFIX,
    CONNECTIONS_PREFIX,
    DAGS_PREFIX,
    INPUT_PREFIX,
    LAKEHOUSE_PREFIX,
    SETTINGS_PREFIX,
    DeployConfig,
)
from infra.config import VARIABLES_PREFIX as VARIABLES
from infra.storage import StorageStack

ARN = "arn:<AWS::Partition>"
REGION_ACCOUNT = "<AWS::Region>:<AWS::AccountId>"

S3_PREFIX = (
    "objects under one key prefix of one bucket: S3 scopes object permissions by key prefix, and a prefix ends "
    "in a wildcard (the keys below it are the run's files, unknown in advance)"
)
LOG_STREAMS = "the log streams of this one log group (stream names are made per job or task at run time)"
NO_RESOURCE_TYPE = "{actions}: the action has no resource type in IAM, so the only resource it takes is '*'"


def acknowledge(app: cdk.App) -> None:
    """Attach every accepted finding to the construct it concerns (never to a stack or the app)."""
    storage, compute = cast(StorageStack, _at(app, "Cxr-Storage")), cast(ComputeStack, _at(app, "Cxr-Compute"))
    raw, lake, code = storage.raw_bucket, storage.lake_bucket, storage.code_bucket
    emr_logs, infer_logs = compute.log_groups["emr"], compute.log_groups["infer"]
    catalog = cast(CatalogStack, _at(app, "Cxr-Catalog"))
    prefix = DeployConfig.from_context(app.node.try_get_context).prefix

    def objects(bucket: s3.IBucket, key_prefix: str) -> str:  # as seen from another stack than the bucket's
        return f"{_export(bucket.bucket_arn)}/{key_prefix}*"

    _ack(
        storage,
        "PseudonymKey",
        "AwsSolutions-SMG4",
        "the HMAC key of the patient pseudonyms: rotating it would give every patient a new pseudonym and break "
        "the joins across runs; it is rotated deliberately, together with a re-pseudonymisation of the lakehouse",
    )
    _ack(
        app,
        "Cxr-Network/EndpointsSg",
        "AwsSolutions-EC23",
        "the rule cannot evaluate an intrinsic CIDR (it errors): the one ingress rule is HTTPS from the VPC's own "
        "CIDR (Fn::GetAtt Vpc.CidrBlock, 10.40.0.0/16), not 0.0.0.0/0",
    )
    _ack(
        compute,
        "InferTask",
        "AwsSolutions-ECS2",
        "the environment holds no secret, only CXR_PROFILE=aws and the metrics namespace (the inference job "
        "needs no secret: pseudonyms are made in the EMR job, which reads its key from Secrets Manager)",
    )

    metrics = NO_RESOURCE_TYPE.format(
        actions="cloudwatch:PutMetricData (limited to the CXR/Pipeline namespace by the cloudwatch:namespace condition)"
    )
    ecr_token = NO_RESOURCE_TYPE.format(
        actions="ecr:GetAuthorizationToken (the registry login; pulls and pushes are limited to the one repository)"
    )
    _iam5(
        compute,
        "EmrJobRole/Access",
        {
            "*": metrics,
            objects(raw, INPUT_PREFIX): S3_PREFIX,
            objects(code, CODE_PREFIX): S3_PREFIX,
            objects(lake, LAKEHOUSE_PREFIX): S3_PREFIX,
            f"{_local(emr_logs)}:*": LOG_STREAMS,
            f"{ARN}:logs:{REGION_ACCOUNT}:log-group:*": "logs:DescribeLogGroups, which EMR Serverless calls before it "
            "writes: the action lists log groups by name prefix and is authorized on log-group:*",
        },
    )
    _iam5(
        compute,
        "InferTaskRole/Access",
        {
            "*": metrics,
            **{
                objects(lake, LAKEHOUSE_PREFIX + p): S3_PREFIX
                for p in ("tensors/", "thresholds/", "predictions/", "runs/", "run_index/")
            },
        },
    )
    _iam5(compute, "InferExecutionRole/Access", {"*": ecr_token, f"{_local(infer_logs)}:*": LOG_STREAMS})
    ecs = f"{ARN}:ecs:{REGION_ACCOUNT}"
    batch_names = "Batch names the ECS cluster of the compute environment <name> AWSBatch-<name>-<uuid>"
    _iam5(
        compute,
        "BatchInstanceRole/EcsAgent",
        {
            "*": NO_RESOURCE_TYPE.format(
                actions="ecs:DiscoverPollEndpoint (the agent asks before it knows its cluster)"
            ),
            f"{ecs}:cluster/AWSBatch-{compute.batch_name}*": batch_names,
            f"{ecs}:container-instance/AWSBatch-{compute.batch_name}*": f"{batch_names}; its instances are container-instance/<cluster>/<id>",
        },
    )

    app_id, cluster = compute.emr_app.attr_application_id, compute.cluster.cluster_name
    _iam5(
        app,
        "Cxr-Orchestration/MwaaExecutionRole/Access",
        {
            "*": NO_RESOURCE_TYPE.format(
                actions="logs:DescribeLogGroups, s3:GetAccountPublicAccessBlock (MWAA's checks), "
                "batch:DescribeJobs, cloudwatch:PutMetricData (namespaces AmazonMWAA and "
                "CXR/Pipeline by condition)"
            ),
            f"{ARN}:logs:{REGION_ACCOUNT}:log-group:airflow-{prefix}-*": "MWAA's own log groups, airflow-<environment>-<component>",
            f"{ARN}:sqs:<AWS::Region>:*:airflow-celery-*": "MWAA's Celery queue, which lives in an account of the MWAA "
            "service (its id is not ours to name)",
            objects(code, DAGS_PREFIX): S3_PREFIX,
            objects(raw, INPUT_PREFIX): S3_PREFIX,
            objects(lake, LAKEHOUSE_PREFIX): S3_PREFIX,
            objects(lake, ATHENA_PREFIX): S3_PREFIX,
            f"{ARN}:ssm:{REGION_ACCOUNT}:parameter{VARIABLES}/*": "the DAG's Airflow Variables, one parameter each",
            f"{ARN}:ssm:{REGION_ACCOUNT}:parameter{CONNECTIONS_PREFIX}/*": "the DAG's Airflow Connections",
            f"{ARN}:ssm:{REGION_ACCOUNT}:parameter{SETTINGS_PREFIX}/*": "the CXR_* settings MWAA's startup script exports",
            f"{ARN}:emr-serverless:{REGION_ACCOUNT}:/applications/{_export(app_id)}/jobruns/*": "the job runs of the one EMR Serverless application (run ids are made at start)",
            f"{ecs}:task-definition/{compute.task_definition.family}:*": "the revisions of the one task definition family",
            f"{ecs}:task/{_export(cluster)}/*": "the tasks of the one ECS cluster (task ids are made at start)",
            f"{ARN}:batch:{REGION_ACCOUNT}:job-definition/{compute.job_definition_name}:*": "the revisions of the one job definition",
            f"{ARN}:batch:{REGION_ACCOUNT}:job/*": "batch:TerminateJob on the jobs it submitted: a job's ARN carries only "
            "its id, not its queue",
            f"{ARN}:glue:{REGION_ACCOUNT}:table/{catalog.database_name}/*": "the tables of the one Glue database, which the DAG creates",
        },
    )
    _iam5(
        app,
        "Cxr-Ci/Access",
        {
            "*": ecr_token,
            objects(code, DAGS_PREFIX): S3_PREFIX,
            objects(code, CODE_PREFIX): S3_PREFIX,
            f"{ARN}:cloudformation:{REGION_ACCOUNT}:stack/Cxr-*/*": "DescribeStacks on the app's own stacks (Cxr-*; "
            "a stack ARN ends in its generated id)",
        },
    )


def _at(scope: IConstruct, path: str) -> Any:
    """The construct at ``path`` below ``scope`` (``A/B/C``); raises when there is none."""
    for part in path.split("/"):
        scope = scope.node.find_child(part)
    return scope


def _ack(scope: IConstruct, path: str, rule: str, reason: str) -> None:
    cdk.Validations.of(_at(scope, path)).acknowledge(cdk.Acknowledgment(id=rule, reason=reason))


def _iam5(scope: IConstruct, policy: str, resources: dict[str, str]) -> None:
    """One IAM5 acknowledgment per wildcard resource of one policy."""
    for resource, reason in resources.items():
        _ack(scope, policy, f"AwsSolutions-IAM5[Resource::{resource}]", reason)


def _local(log_group: logs.LogGroup) -> str:
    """A log group's ARN within its own stack, as cdk-nag renders a Fn::GetAtt."""
    cfn = cast(cdk.CfnResource, log_group.node.default_child)
    return f"<{cdk.Stack.of(log_group).get_logical_id(cfn)}.Arn>"


def _export(value: str) -> str:
    """The export name under which a resource's stack hands ``value`` (its attribute) to other stacks: the name
    cdk-nag shows for the imported value. ``export_value`` returns the export the reference creates anyway."""
    reference = cdk.Tokenization.reverse(value)
    producer = cdk.Stack.of(cast(cdk.Reference, reference).target)
    return cast(str, producer.resolve(producer.export_value(value))["Fn::ImportValue"])
