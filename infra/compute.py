"""Compute: the EMR Serverless application (Spark preprocessing), the ECS cluster and Fargate task
definition (CPU inference), the AWS Batch GPU compute environment, job queue and job definition (GPU
inference), their log groups, and one role per actor: the EMR job role, the inference task role (ECS and
Batch run the same image with the same role), the inference execution role, the Batch instance role."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_batch as batch
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_emrserverless as emr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra import access
from infra.config import CODE_PREFIX, INFER_CONTAINER, INPUT_PREFIX, LAKEHOUSE_PREFIX, METRICS_NAMESPACE, DeployConfig
from infra.network import NetworkStack
from infra.storage import StorageStack
from infra.versions import EMR_RELEASE_LABEL

#: where the EMR runtime keeps its Delta Lake jars
EMR_DELTA_LIB = "/usr/share/aws/delta/lib"
#: what the inference job reads and writes under the lakehouse prefix (inference/job.py)
INFER_READS = ("tensors/", "thresholds/", "reports/published.json")
INFER_WRITES = ("predictions/", "runs/", "run_index/")


def retention_days(days: int) -> logs.RetentionDays:
    """The CloudWatch Logs retention for a number of days (30, 90, 180, 365 or 731)."""
    known = {
        30: logs.RetentionDays.ONE_MONTH,
        90: logs.RetentionDays.THREE_MONTHS,
        180: logs.RetentionDays.SIX_MONTHS,
        365: logs.RetentionDays.ONE_YEAR,
        731: logs.RetentionDays.TWO_YEARS,
    }
    if days not in known:
        raise ValueError(f"log_retention_days must be one of {sorted(known)}, got {days}")
    return known[days]


class ComputeStack(cdk.Stack):
    """Where the stages run: Spark on EMR Serverless, the inference image on ECS Fargate or AWS Batch."""

    def __init__(
        self,
        scope: Construct,
        cid: str,
        *,
        config: DeployConfig,
        storage: StorageStack,
        network: NetworkStack,
        **kwargs: object,
    ) -> None:
        super().__init__(scope, cid, **kwargs)  # type: ignore[arg-type]
        key = storage.key
        retention = retention_days(config.log_retention_days)
        self.log_groups = {
            name: logs.LogGroup(
                self,
                f"{name.capitalize()}Logs",
                log_group_name=f"/{config.prefix}/{name}",
                encryption_key=key,
                retention=retention,
                removal_policy=cdk.RemovalPolicy.RETAIN,
            )
            for name in ("emr", "infer")
        }
        subnets = network.private_subnets.subnet_ids
        lake, raw, code = storage.lake_bucket, storage.raw_bucket, storage.code_bucket
        kms_use = iam.PolicyStatement(
            actions=["kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"], resources=[key.key_arn]
        )
        metrics = iam.PolicyStatement(
            actions=["cloudwatch:PutMetricData"],
            resources=["*"],  # PutMetricData has no resource type: scoped by namespace instead
            conditions={"StringEquals": {"cloudwatch:namespace": METRICS_NAMESPACE}},
        )

        # --- EMR Serverless: the Spark preprocessing job ---
        self.emr_job_role = iam.Role(
            self,
            "EmrJobRole",
            description="cxr preprocess (Spark on EMR Serverless): reads images and code, writes the lakehouse",
            assumed_by=iam.ServicePrincipal(
                "emr-serverless.amazonaws.com", conditions={"StringEquals": {"aws:SourceAccount": self.account}}
            ),
        )
        access.attach(
            self.emr_job_role,
            "Access",
            [
                *access.s3_access(raw, [INPUT_PREFIX]),
                *access.s3_access(code, [CODE_PREFIX]),
                *access.s3_access(lake, [LAKEHOUSE_PREFIX], write=True),
                kms_use,
                iam.PolicyStatement(
                    actions=["secretsmanager:GetSecretValue"], resources=[storage.pseudonym_secret.secret_arn]
                ),
                iam.PolicyStatement(
                    actions=["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"],
                    resources=[self.log_groups["emr"].log_group_arn, f"{self.log_groups['emr'].log_group_arn}:*"],
                ),
                # EMR Serverless looks its log group up before it writes (DescribeLogGroups lists by prefix)
                iam.PolicyStatement(
                    actions=["logs:DescribeLogGroups"],
                    resources=[f"arn:{self.partition}:logs:{self.region}:{self.account}:log-group:*"],
                ),
                metrics,
            ],
        )
        secret = storage.pseudonym_secret.secret_name
        spark_defaults = {
            # the pseudonym key, resolved by EMR Serverless from Secrets Manager at job start (never in the template)
            "spark.emr-serverless.driverEnv.CXR_PSEUDONYM_KEY": f"EMR.secret@{secret}",
            "spark.executorEnv.CXR_PSEUDONYM_KEY": f"EMR.secret@{secret}",
            "spark.emr-serverless.driverEnv.CXR_PROFILE": "aws",
            "spark.executorEnv.CXR_PROFILE": "aws",
            "spark.emr-serverless.driverEnv.CXR_METRICS_NAMESPACE": METRICS_NAMESPACE,
            # Delta Lake on EMR Serverless: the runtime ships the jars (Delta 4.0.0 on emr-spark-8.0.0) but
            # does not put them on the class path; the session factory (lakehouse/spark.py) adds the rest
            "spark.jars": ",".join(f"{EMR_DELTA_LIB}/{jar}" for jar in ("delta-spark.jar", "delta-storage.jar")),
            "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
            "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        }
        worker = emr.CfnApplication.WorkerConfigurationProperty(cpu="4 vCPU", memory="16 GB")
        self.emr_app = emr.CfnApplication(
            self,
            "Spark",
            name=f"{config.prefix}-preprocess",
            type="SPARK",
            release_label=EMR_RELEASE_LABEL,
            architecture="X86_64",
            auto_start_configuration=emr.CfnApplication.AutoStartConfigurationProperty(enabled=True),
            auto_stop_configuration=emr.CfnApplication.AutoStopConfigurationProperty(
                enabled=True, idle_timeout_minutes=15
            ),
            maximum_capacity=emr.CfnApplication.MaximumAllowedResourcesProperty(
                cpu=f"{config.emr_max_vcpu} vCPU",
                memory=f"{config.emr_max_memory_gb} GB",
                disk=f"{config.emr_max_vcpu * 20} GB",
            ),
            initial_capacity=[
                emr.CfnApplication.InitialCapacityConfigKeyValuePairProperty(
                    key=kind,
                    value=emr.CfnApplication.InitialCapacityConfigProperty(
                        worker_count=count, worker_configuration=worker
                    ),
                )
                for kind, count in (("Driver", 1), ("Executor", 2))
            ]
            if config.emr_prewarm
            else None,
            network_configuration=emr.CfnApplication.NetworkConfigurationProperty(
                subnet_ids=subnets, security_group_ids=[network.jobs_sg.security_group_id]
            ),
            monitoring_configuration=emr.CfnApplication.MonitoringConfigurationProperty(
                cloud_watch_logging_configuration=emr.CfnApplication.CloudWatchLoggingConfigurationProperty(
                    enabled=True, log_group_name=self.log_groups["emr"].log_group_name, encryption_key_arn=key.key_arn
                )
            ),
            runtime_configuration=[
                emr.CfnApplication.ConfigurationObjectProperty(
                    classification="spark-defaults", properties=spark_defaults
                )
            ],
        )

        # --- the inference image: one task role for ECS and Batch, one execution role ---
        self.infer_task_role = iam.Role(
            self,
            "InferTaskRole",
            description="cxr infer (ECS/Batch): reads tensors, writes predictions and run summaries",
            assumed_by=iam.ServicePrincipal(
                "ecs-tasks.amazonaws.com", conditions={"StringEquals": {"aws:SourceAccount": self.account}}
            ),
        )
        prefix = LAKEHOUSE_PREFIX
        access.attach(
            self.infer_task_role,
            "Access",
            [
                *access.s3_access(lake, [prefix + p for p in INFER_READS], list_prefix=prefix),
                *access.s3_access(lake, [prefix + p for p in INFER_WRITES], write=True, list_prefix=prefix),
                kms_use,
                metrics,
            ],
        )
        self.infer_execution_role = iam.Role(
            self,
            "InferExecutionRole",
            description="cxr infer: pulls the image and writes its logs",
            assumed_by=iam.ServicePrincipal(
                "ecs-tasks.amazonaws.com", conditions={"StringEquals": {"aws:SourceAccount": self.account}}
            ),
        )
        access.attach(
            self.infer_execution_role,
            "Access",
            [
                iam.PolicyStatement(
                    actions=["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"],
                    resources=[storage.repository.repository_arn],
                ),
                iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]),  # no resource type
                iam.PolicyStatement(
                    actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                    resources=[f"{self.log_groups['infer'].log_group_arn}:*"],
                ),
                kms_use,
            ],
        )
        image = ecs.ContainerImage.from_registry(f"{storage.repository.repository_uri}:{config.image_tag}")
        environment = {"CXR_PROFILE": "aws", "CXR_METRICS_NAMESPACE": METRICS_NAMESPACE}

        # ECS: a cluster with Container Insights and the Fargate task definition (CPU inference)
        self.cluster = ecs.Cluster(
            self,
            "Cluster",
            cluster_name=f"{config.prefix}-infer",
            vpc=network.vpc,
            container_insights_v2=ecs.ContainerInsights.ENABLED,
        )
        self.task_definition = ecs.FargateTaskDefinition(
            self,
            "InferTask",
            family=f"{config.prefix}-infer",
            cpu=config.fargate_cpu,
            memory_limit_mib=config.fargate_memory_mib,
            task_role=self.infer_task_role,
            execution_role=self.infer_execution_role,
            runtime_platform=ecs.RuntimePlatform(
                operating_system_family=ecs.OperatingSystemFamily.LINUX, cpu_architecture=ecs.CpuArchitecture.X86_64
            ),
        )
        self.task_definition.add_container(
            INFER_CONTAINER,
            container_name=INFER_CONTAINER,
            image=image,
            environment=environment,
            logging=ecs.LogDrivers.aws_logs(stream_prefix="ecs", log_group=self.log_groups["infer"]),
        )

        # AWS Batch: a spot GPU compute environment (g5/g6), its queue and the job definition (GPU inference);
        # their names are fixed (the DAG's Variables, the MWAA role and the failure rule name them)
        self.batch_name = f"{config.prefix}-gpu"  # compute environment, job queue, launch template
        self.job_definition_name = f"{config.prefix}-infer-gpu"
        self.batch_instance_role = iam.Role(
            self,
            "BatchInstanceRole",
            description="cxr Batch GPU instances: the ECS agent registers the instance and reports task state",
            assumed_by=iam.ServicePrincipal("ec2.amazonaws.com"),
        )
        batch_clusters = f"arn:{self.partition}:ecs:{self.region}:{self.account}:cluster/AWSBatch-{self.batch_name}*"
        batch_instances = (
            f"arn:{self.partition}:ecs:{self.region}:{self.account}:container-instance/AWSBatch-{self.batch_name}*"
        )
        access.attach(
            self.batch_instance_role,
            "EcsAgent",
            [
                iam.PolicyStatement(
                    actions=[
                        "ecs:RegisterContainerInstance",
                        "ecs:DeregisterContainerInstance",
                        "ecs:SubmitContainerStateChange",
                        "ecs:SubmitTaskStateChange",
                        "ecs:SubmitAttachmentStateChanges",
                        "ecs:UpdateContainerInstancesState",
                        "ecs:Poll",
                        "ecs:StartTelemetrySession",
                        "ecs:PutSystemLogEvents",
                    ],
                    resources=[batch_clusters, batch_instances],
                ),
                # the agent asks where to poll before it knows its cluster: no resource type
                iam.PolicyStatement(actions=["ecs:DiscoverPollEndpoint"], resources=["*"]),
            ],
        )
        instance_profile = iam.CfnInstanceProfile(
            self, "BatchInstanceProfile", roles=[self.batch_instance_role.role_name]
        )
        # IMDSv2 only, one hop: the jobs' containers (bridge network) cannot reach the instance role's
        # credentials (they have the task role); the root volume (image layers, scratch files) is encrypted
        launch_template = ec2.CfnLaunchTemplate(
            self,
            "GpuLaunchTemplate",
            launch_template_name=self.batch_name,
            launch_template_data=ec2.CfnLaunchTemplate.LaunchTemplateDataProperty(
                metadata_options=ec2.CfnLaunchTemplate.MetadataOptionsProperty(
                    http_endpoint="enabled", http_tokens="required", http_put_response_hop_limit=1
                ),
                block_device_mappings=[
                    ec2.CfnLaunchTemplate.BlockDeviceMappingProperty(
                        device_name="/dev/xvda",
                        ebs=ec2.CfnLaunchTemplate.EbsProperty(encrypted=True, volume_type="gp3"),
                    )
                ],
            ),
        )
        self.compute_environment = batch.CfnComputeEnvironment(
            self,
            "GpuComputeEnvironment",
            compute_environment_name=self.batch_name,
            type="MANAGED",
            state="ENABLED",
            compute_resources=batch.CfnComputeEnvironment.ComputeResourcesProperty(
                type="SPOT",
                allocation_strategy="SPOT_PRICE_CAPACITY_OPTIMIZED",
                minv_cpus=0,
                maxv_cpus=config.batch_max_vcpus,
                instance_types=config.batch_instance_types.split(","),
                subnets=subnets,
                security_group_ids=[network.jobs_sg.security_group_id],
                instance_role=instance_profile.attr_arn,
                launch_template=batch.CfnComputeEnvironment.LaunchTemplateSpecificationProperty(
                    launch_template_id=launch_template.ref, version=launch_template.attr_latest_version_number
                ),
                ec2_configuration=[
                    batch.CfnComputeEnvironment.Ec2ConfigurationObjectProperty(image_type="ECS_AL2023_NVIDIA")
                ],
            ),
        )
        self.job_queue = batch.CfnJobQueue(
            self,
            "GpuQueue",
            job_queue_name=self.batch_name,
            priority=1,
            compute_environment_order=[
                batch.CfnJobQueue.ComputeEnvironmentOrderProperty(
                    order=1, compute_environment=self.compute_environment.ref
                )
            ],
        )
        self.job_definition = batch.CfnJobDefinition(
            self,
            "InferGpuJob",
            job_definition_name=self.job_definition_name,
            type="container",
            platform_capabilities=["EC2"],
            retry_strategy=batch.CfnJobDefinition.RetryStrategyProperty(attempts=3),  # spot interruptions
            timeout=batch.CfnJobDefinition.TimeoutProperty(attempt_duration_seconds=6 * 3600),
            container_properties=batch.CfnJobDefinition.ContainerPropertiesProperty(
                image=f"{storage.repository.repository_uri}:{config.image_tag}-cuda",  # the CUDA build of the same commit
                job_role_arn=self.infer_task_role.role_arn,
                execution_role_arn=self.infer_execution_role.role_arn,
                resource_requirements=[
                    batch.CfnJobDefinition.ResourceRequirementProperty(type=t, value=v)
                    for t, v in (("VCPU", "4"), ("MEMORY", "15000"), ("GPU", "1"))
                ],
                environment=[
                    batch.CfnJobDefinition.EnvironmentProperty(name=k, value=v)
                    for k, v in {**environment, "CXR_INFER_AMP": "1"}.items()
                ],
                log_configuration=batch.CfnJobDefinition.LogConfigurationProperty(
                    log_driver="awslogs",
                    options={
                        "awslogs-group": self.log_groups["infer"].log_group_name,
                        "awslogs-stream-prefix": "batch",
                    },
                ),
            ),
        )
        for name, value in {
            "EmrApplicationId": self.emr_app.attr_application_id,
            "EmrJobRoleArn": self.emr_job_role.role_arn,
            "EcsCluster": self.cluster.cluster_name,
            "InferTaskDefinition": self.task_definition.task_definition_arn,
            "BatchJobQueue": self.job_queue.ref,
            "BatchJobDefinition": self.job_definition.ref,
        }.items():
            cdk.CfnOutput(self, name, value=value)
