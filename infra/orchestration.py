"""Orchestration: the MWAA environment (Airflow, private web server), its execution role, and the Airflow
Variables the DAG reads, served from SSM Parameter Store through MWAA's secrets backend."""

from __future__ import annotations

import json

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_mwaa as mwaa
from aws_cdk import aws_ssm as ssm
from constructs import Construct

from infra import access
from infra.catalog import CatalogStack
from infra.compute import ComputeStack
from infra.config import (
    ATHENA_PREFIX,
    CODE_PREFIX,
    CONNECTIONS_PREFIX,
    DAGS_PREFIX,
    INPUT_PREFIX,
    LAKEHOUSE_PREFIX,
    METRICS_NAMESPACE,
    PLUGINS_KEY,
    REQUIREMENTS_KEY,
    SETTINGS_PREFIX,
    STARTUP_KEY,
    VARIABLES_PREFIX,
    DeployConfig,
)
from infra.network import NetworkStack
from infra.storage import StorageStack
from infra.versions import AIRFLOW_VERSION

SECRETS_BACKEND = "airflow.providers.amazon.aws.secrets.systems_manager.SystemsManagerParameterStoreBackend"


class OrchestrationStack(cdk.Stack):
    """MWAA + the DAG's Variables."""

    def __init__(
        self,
        scope: Construct,
        cid: str,
        *,
        config: DeployConfig,
        storage: StorageStack,
        network: NetworkStack,
        compute: ComputeStack,
        catalog: CatalogStack,
        **kwargs: object,
    ) -> None:
        super().__init__(scope, cid, **kwargs)  # type: ignore[arg-type]
        name = config.prefix
        lake, raw, code, key = storage.lake_bucket, storage.raw_bucket, storage.code_bucket, storage.key
        arn = f"arn:{self.partition}"
        region_account = f"{self.region}:{self.account}"
        self.input_uri = f"s3://{raw.bucket_name}/{INPUT_PREFIX.rstrip('/')}"
        self.lakehouse_uri = f"s3://{lake.bucket_name}/{LAKEHOUSE_PREFIX.rstrip('/')}"

        # --- the DAG's Airflow Variables (README "Airflow on AWS"), one SSM parameter each ---
        self.variables = {
            "cxr_code_uri": f"s3://{code.bucket_name}/{CODE_PREFIX.rstrip('/')}",
            "cxr_emr_serverless_app_id": compute.emr_app.attr_application_id,
            "cxr_emr_execution_role_arn": compute.emr_job_role.role_arn,
            "cxr_ecs_cluster": compute.cluster.cluster_name,
            "cxr_ecs_task_definition": compute.task_definition.family,  # the newest ACTIVE revision
            "cxr_ecs_subnets": ",".join(network.private_subnets.subnet_ids),
            "cxr_ecs_security_groups": network.jobs_sg.security_group_id,
            "cxr_batch_job_queue": compute.batch_name,
            "cxr_batch_job_definition": compute.job_definition_name,  # the newest ACTIVE revision
            "cxr_athena_output": catalog.results_uri,
            "cxr_athena_db": catalog.database_name,
            "cxr_athena_workgroup": catalog.workgroup_name,
        }
        # --- the CXR_* settings MWAA's startup script exports (read when the DAG is parsed) ---
        self.settings = {
            "CXR_INPUT_URI": self.input_uri,
            "CXR_LAKEHOUSE_URI": self.lakehouse_uri,
            "CXR_METRICS_NAMESPACE": METRICS_NAMESPACE,
            "CXR_INFER_BACKEND": config.infer_backend,
        }
        for cid, folder, values, what in (
            ("Var", VARIABLES_PREFIX, self.variables, "Airflow Variable {} of the cxr DAG"),
            ("Setting", SETTINGS_PREFIX, self.settings, "{} of the cxr DAG on MWAA (exported by startup.sh)"),
        ):
            for entry, value in values.items():
                ssm.StringParameter(
                    self,
                    f"{cid}-{entry}",
                    parameter_name=f"{folder}/{entry}",
                    string_value=value,
                    description=what.format(entry),
                )

        # --- the MWAA execution role: MWAA's own needs, then each DAG step's calls ---
        self.execution_role = iam.Role(
            self,
            "MwaaExecutionRole",
            description="cxr MWAA: runs the DAG (sensor, validation, publish, report on the workers; EMR, ECS, Batch, Athena calls)",
            assumed_by=iam.CompositePrincipal(
                iam.ServicePrincipal("airflow.amazonaws.com"), iam.ServicePrincipal("airflow-env.amazonaws.com")
            ),
        )
        env_arn = f"{arn}:airflow:{region_account}:environment/{name}"
        emr_app = f"{arn}:emr-serverless:{region_account}:/applications/{compute.emr_app.attr_application_id}"
        task_family = f"{arn}:ecs:{region_account}:task-definition/{compute.task_definition.family}:*"
        cluster_tasks = f"{arn}:ecs:{region_account}:task/{compute.cluster.cluster_name}/*"
        glue_db = catalog.database_name
        statements = [
            # MWAA itself: its metrics, logs, Celery queue and the source bucket
            iam.PolicyStatement(actions=["airflow:PublishMetrics"], resources=[env_arn]),
            iam.PolicyStatement(
                actions=[
                    "logs:CreateLogStream",
                    "logs:CreateLogGroup",
                    "logs:PutLogEvents",
                    "logs:GetLogEvents",
                    "logs:GetLogRecord",
                    "logs:GetLogGroupFields",
                    "logs:GetQueryResults",
                ],
                resources=[f"{arn}:logs:{region_account}:log-group:airflow-{name}-*"],
            ),
            iam.PolicyStatement(actions=["logs:DescribeLogGroups"], resources=["*"]),  # no resource type
            iam.PolicyStatement(
                actions=[
                    "sqs:ChangeMessageVisibility",
                    "sqs:DeleteMessage",
                    "sqs:GetQueueAttributes",
                    "sqs:GetQueueUrl",
                    "sqs:ReceiveMessage",
                    "sqs:SendMessage",
                ],
                resources=[f"{arn}:sqs:{self.region}:*:airflow-celery-*"],  # MWAA's queue lives in an AWS account
            ),
            iam.PolicyStatement(
                actions=["kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey", "kms:Encrypt"],
                resources=[key.key_arn],
            ),
            iam.PolicyStatement(
                actions=["cloudwatch:PutMetricData"],
                resources=["*"],  # no resource type: scoped by namespace
                conditions={"StringEquals": {"cloudwatch:namespace": ["AmazonMWAA", METRICS_NAMESPACE]}},
            ),
            iam.PolicyStatement(actions=["s3:GetAccountPublicAccessBlock"], resources=["*"]),  # MWAA's bucket check
            iam.PolicyStatement(
                actions=[
                    "s3:GetBucketPublicAccessBlock",
                    "s3:GetBucketLocation",
                    "s3:GetEncryptionConfiguration",
                    "s3:GetBucketVersioning",
                ],
                resources=[code.bucket_arn],
            ),
            # MWAA lists its source bucket itself (no prefix): the code bucket holds no patient data
            *access.s3_access(code, [DAGS_PREFIX, REQUIREMENTS_KEY, PLUGINS_KEY, STARTUP_KEY], list_all=True),
            # the DAG's Variables and Connections, and the settings startup.sh exports (SSM)
            iam.PolicyStatement(
                actions=["ssm:GetParameter", "ssm:GetParameters"],
                resources=[
                    f"{arn}:ssm:{region_account}:parameter{VARIABLES_PREFIX}/*",
                    f"{arn}:ssm:{region_account}:parameter{CONNECTIONS_PREFIX}/*",
                    f"{arn}:ssm:{region_account}:parameter{SETTINGS_PREFIX}/*",
                ],
            ),
            # sensor: list new images; validation, publish, report, maintain: the lakehouse; Athena's results
            *access.s3_access(raw, [INPUT_PREFIX]),
            *access.s3_access(lake, [LAKEHOUSE_PREFIX], write=True),
            *access.s3_access(lake, [ATHENA_PREFIX], write=True),
            iam.PolicyStatement(
                actions=["s3:GetBucketLocation"], resources=[lake.bucket_arn]
            ),  # Athena's results check
            # preprocess: EMR Serverless
            iam.PolicyStatement(
                actions=[
                    "emr-serverless:StartJobRun",
                    "emr-serverless:GetApplication",
                    "emr-serverless:StartApplication",
                ],
                resources=[emr_app],
            ),
            iam.PolicyStatement(
                actions=["emr-serverless:GetJobRun", "emr-serverless:CancelJobRun"], resources=[f"{emr_app}/jobruns/*"]
            ),
            access.pass_role([compute.emr_job_role], "emr-serverless.amazonaws.com"),
            # infer: ECS tasks (one per shard) ...
            iam.PolicyStatement(
                actions=["ecs:RunTask"],
                resources=[task_family],
                conditions={"ArnEquals": {"ecs:cluster": compute.cluster.cluster_arn}},
            ),
            iam.PolicyStatement(actions=["ecs:DescribeTasks", "ecs:StopTask"], resources=[cluster_tasks]),
            access.pass_role([compute.infer_task_role, compute.infer_execution_role], "ecs-tasks.amazonaws.com"),
            # ... or AWS Batch jobs
            iam.PolicyStatement(
                actions=["batch:SubmitJob"],
                resources=[
                    f"{arn}:batch:{region_account}:job-queue/{compute.batch_name}",
                    f"{arn}:batch:{region_account}:job-definition/{compute.job_definition_name}",
                    f"{arn}:batch:{region_account}:job-definition/{compute.job_definition_name}:*",
                ],
            ),
            iam.PolicyStatement(actions=["batch:TerminateJob"], resources=[f"{arn}:batch:{region_account}:job/*"]),
            iam.PolicyStatement(actions=["batch:DescribeJobs"], resources=["*"]),  # no resource type
            # athena_ddl / athena_publish: the workgroup and the Glue database's tables
            iam.PolicyStatement(
                actions=[
                    "athena:StartQueryExecution",
                    "athena:GetQueryExecution",
                    "athena:StopQueryExecution",
                ],
                resources=[f"{arn}:athena:{region_account}:workgroup/{catalog.workgroup_name}"],
            ),
            iam.PolicyStatement(
                actions=[
                    "glue:GetDatabase",
                    "glue:GetTable",
                    "glue:CreateTable",
                    "glue:DeleteTable",
                    "glue:GetPartitions",  # Athena's DROP TABLE looks the table's partitions up
                ],
                resources=[
                    f"{arn}:glue:{region_account}:catalog",
                    f"{arn}:glue:{region_account}:database/{glue_db}",
                    f"{arn}:glue:{region_account}:table/{glue_db}/*",
                ],
            ),
            # the DDL's first statement: CREATE DATABASE IF NOT EXISTS <db>; the queries run in the context
            # of the database "default" (AthenaOperator's database), which Athena looks up
            iam.PolicyStatement(
                actions=["glue:CreateDatabase"],
                resources=[f"{arn}:glue:{region_account}:catalog", f"{arn}:glue:{region_account}:database/{glue_db}"],
            ),
            iam.PolicyStatement(
                actions=["glue:GetDatabase"],
                resources=[f"{arn}:glue:{region_account}:database/default"],
            ),
        ]
        policy = access.attach(self.execution_role, "Access", statements)

        subnet_ids = network.private_subnets.subnet_ids[:2]
        logging = mwaa.CfnEnvironment.ModuleLoggingConfigurationProperty(enabled=True, log_level="INFO")
        self.airflow = mwaa.CfnEnvironment(
            self,
            "Airflow",
            name=name,
            airflow_version=AIRFLOW_VERSION,
            environment_class=config.mwaa_environment_class,
            min_workers=1,
            max_workers=config.mwaa_max_workers,
            execution_role_arn=self.execution_role.role_arn,
            kms_key=key.key_arn,
            webserver_access_mode="PRIVATE_ONLY",
            source_bucket_arn=code.bucket_arn,
            dag_s3_path=DAGS_PREFIX.rstrip("/"),
            requirements_s3_path=REQUIREMENTS_KEY,
            plugins_s3_path=PLUGINS_KEY,
            startup_script_s3_path=STARTUP_KEY,
            requirements_s3_object_version=config.requirements_version or None,
            plugins_s3_object_version=config.plugins_version or None,
            startup_script_s3_object_version=config.startup_version or None,
            network_configuration=mwaa.CfnEnvironment.NetworkConfigurationProperty(
                subnet_ids=subnet_ids, security_group_ids=[network.mwaa_sg.security_group_id]
            ),
            logging_configuration=mwaa.CfnEnvironment.LoggingConfigurationProperty(
                dag_processing_logs=logging,
                scheduler_logs=logging,
                task_logs=logging,
                webserver_logs=logging,
                worker_logs=logging,
            ),
            airflow_configuration_options={
                "core.load_examples": "False",
                "secrets.backend": SECRETS_BACKEND,
                "secrets.backend_kwargs": json.dumps(
                    {"variables_prefix": VARIABLES_PREFIX, "connections_prefix": CONNECTIONS_PREFIX}
                ),
                # read by startup.sh (MWAA exposes them as AIRFLOW__CXR__*) into the CXR_* settings; the
                # script falls back to the same values in SSM under /cxr/settings/
                "cxr.input_uri": self.input_uri,
                "cxr.lakehouse_uri": self.lakehouse_uri,
                "cxr.metrics_namespace": METRICS_NAMESPACE,
                "cxr.infer_backend": config.infer_backend,
            },
        )
        self.airflow.node.add_dependency(policy)  # MWAA checks its role's permissions at creation
        cdk.CfnOutput(self, "MwaaEnvironment", value=name)
        cdk.CfnOutput(self, "MwaaExecutionRoleArn", value=self.execution_role.role_arn)
        cdk.CfnOutput(self, "InputUri", value=self.input_uri)
        cdk.CfnOutput(self, "LakehouseUri", value=self.lakehouse_uri)
