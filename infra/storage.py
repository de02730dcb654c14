"""Storage: the KMS key, the raw-image, lakehouse, code (MWAA source) and logs buckets, and the ECR
repository of the inference image."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_ecr as ecr
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from infra.config import DeployConfig


class StorageStack(cdk.Stack):
    """Buckets (SSE-KMS, TLS only, public access blocked, versioned) and the key that encrypts them,
    the logs, the secrets and the queues of every other stack."""

    def __init__(self, scope: Construct, cid: str, *, config: DeployConfig, **kwargs: object) -> None:
        super().__init__(scope, cid, **kwargs)  # type: ignore[arg-type]
        # S3 delivers the access logs under a bucket policy (logging.s3.amazonaws.com, this account's buckets),
        # not the legacy log-delivery ACL: the logs bucket can then disable ACLs (BucketOwnerEnforced)
        self.node.set_context("@aws-cdk/aws-s3:serverAccessLogsUseBucketPolicy", True)
        self.key = kms.Key(
            self,
            "Key",
            alias=f"alias/{config.prefix}",
            description="cxr pipeline: buckets, logs, secrets, Athena results",
            enable_key_rotation=True,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        # CloudWatch Logs encrypts the pipeline's log groups with this key (only log groups of this account)
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchLogs",
                principals=[iam.ServicePrincipal(f"logs.{self.region}.amazonaws.com")],
                actions=[
                    "kms:Encrypt",
                    "kms:Decrypt",
                    "kms:ReEncryptFrom",
                    "kms:ReEncryptTo",
                    "kms:GenerateDataKey",
                    "kms:DescribeKey",
                ],
                resources=["*"],  # in a key policy "*" is this key
                conditions={
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": f"arn:{self.partition}:logs:{self.region}:{self.account}:*"
                    }
                },
            )
        )
        # EventBridge and CloudWatch alarms publish to the KMS-encrypted alarm topic
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AlarmPublishers",
                principals=[
                    iam.ServicePrincipal("events.amazonaws.com"),
                    iam.ServicePrincipal("cloudwatch.amazonaws.com"),
                ],
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=["*"],  # in a key policy "*" is this key
                conditions={"StringEquals": {"aws:SourceAccount": self.account}},
            )
        )
        # Server access logs cannot be delivered to an SSE-KMS bucket: the logs bucket is SSE-S3.
        self.logs_bucket = s3.Bucket(
            self,
            "Logs",
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            minimum_tls_version=1.2,
            versioned=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            removal_policy=cdk.RemovalPolicy.RETAIN,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="age-out",
                    transitions=[
                        s3.Transition(
                            storage_class=s3.StorageClass.GLACIER_INSTANT_RETRIEVAL,
                            transition_after=cdk.Duration.days(90),
                        )
                    ],
                    expiration=cdk.Duration.days(365),
                    noncurrent_version_expiration=cdk.Duration.days(30),
                )
            ],
        )
        self.raw_bucket = self._data_bucket("Raw", "raw/")
        self.lake_bucket = self._data_bucket("Lake", "lake/")
        # MWAA's source bucket: its name must start with "airflow-", and it must be versioned
        self.code_bucket = self._data_bucket(
            "Code", "code/", bucket_name=f"airflow-{config.prefix}-{self.account}-{self.region}"
        )
        self.repository = ecr.Repository(
            self,
            "InferImage",
            repository_name=f"{config.prefix}-infer",
            image_tag_mutability=ecr.TagMutability.IMMUTABLE,
            image_scan_on_push=True,
            encryption=ecr.RepositoryEncryption.KMS,
            encryption_key=self.key,
            removal_policy=cdk.RemovalPolicy.RETAIN,
            lifecycle_rules=[ecr.LifecycleRule(description="keep the last 50 images", max_image_count=50)],
        )
        # the keyed-pseudonym secret (HMAC key of patient_pseudonym). Not rotated: a new key would give every
        # patient new pseudonyms and break the joins across runs; rotate it deliberately, with a re-pseudonymisation.
        self.pseudonym_secret = secretsmanager.Secret(
            self,
            "PseudonymKey",
            secret_name=f"{config.prefix}/pseudonym-key",
            description="CXR_PSEUDONYM_KEY: the HMAC key of patient pseudonyms",
            encryption_key=self.key,
            generate_secret_string=secretsmanager.SecretStringGenerator(password_length=64, exclude_punctuation=True),
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        for name, value in {
            "RawBucket": self.raw_bucket.bucket_name,
            "LakeBucket": self.lake_bucket.bucket_name,
            "CodeBucket": self.code_bucket.bucket_name,
            "LogsBucket": self.logs_bucket.bucket_name,
            "KeyArn": self.key.key_arn,
            "InferRepositoryUri": self.repository.repository_uri,
            "PseudonymSecretArn": self.pseudonym_secret.secret_arn,
        }.items():
            cdk.CfnOutput(self, name, value=value)

    def _data_bucket(self, cid: str, log_prefix: str, *, bucket_name: str | None = None) -> s3.Bucket:
        bucket = s3.Bucket(
            self,
            cid,
            bucket_name=bucket_name,
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.key,
            bucket_key_enabled=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            minimum_tls_version=1.2,
            versioned=True,
            server_access_logs_bucket=self.logs_bucket,
            server_access_logs_prefix=f"s3/{log_prefix}",
            removal_policy=cdk.RemovalPolicy.RETAIN,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="noncurrent",
                    noncurrent_version_expiration=cdk.Duration.days(30),
                    abort_incomplete_multipart_upload_after=cdk.Duration.days(7),
                )
            ],
        )
        # SSE-KMS only: an upload that asks for another encryption is refused (no header: the bucket default)
        bucket.add_to_resource_policy(
            iam.PolicyStatement(
                sid="DenyNonKmsEncryption",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["s3:PutObject"],
                resources=[bucket.arn_for_objects("*")],
                conditions={
                    "Null": {"s3:x-amz-server-side-encryption": "false"},
                    "StringNotEquals": {"s3:x-amz-server-side-encryption": "aws:kms"},
                },
            )
        )
        return bucket
