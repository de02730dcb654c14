"""The CI deploy role: GitHub Actions' OIDC provider and the role the deploy workflow assumes, bound to one
repository and one environment; it may only assume the CDK bootstrap roles, push the inference image and
upload the code bundle."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from constructs import Construct

from infra.config import CODE_PREFIX, DAGS_PREFIX, PLUGINS_KEY, REQUIREMENTS_KEY, STARTUP_KEY, DeployConfig
from infra.storage import StorageStack

GITHUB_OIDC = "token.actions.githubusercontent.com"
#: the CDK bootstrap qualifier (``cdk bootstrap``'s default)
CDK_QUALIFIER = "hnb659fds"


class CiStack(cdk.Stack):
    """GitHub OIDC provider + deploy role."""

    def __init__(
        self, scope: Construct, cid: str, *, config: DeployConfig, storage: StorageStack, **kwargs: object
    ) -> None:
        super().__init__(scope, cid, **kwargs)  # type: ignore[arg-type]
        provider = iam.CfnOIDCProvider(
            self, "GitHubOidc", url=f"https://{GITHUB_OIDC}", client_id_list=["sts.amazonaws.com"]
        )
        subject = f"repo:{config.github_repo}:environment:{config.github_environment}"
        self.deploy_role = iam.Role(
            self,
            "DeployRole",
            description=f"GitHub Actions deploy of {config.github_repo} (environment {config.github_environment})",
            max_session_duration=cdk.Duration.hours(1),
            assumed_by=iam.FederatedPrincipal(
                provider.attr_arn,
                conditions={
                    "StringEquals": {f"{GITHUB_OIDC}:aud": "sts.amazonaws.com", f"{GITHUB_OIDC}:sub": subject},
                },
                assume_role_action="sts:AssumeRoleWithWebIdentity",
            ),
        )
        boot = f"arn:{self.partition}:iam::{self.account}:role/cdk-{CDK_QUALIFIER}"
        code = storage.code_bucket
        statements = [
            # `cdk deploy` works through the bootstrap roles (CloudFormation does the rest with its own role)
            iam.PolicyStatement(
                actions=["sts:AssumeRole"],
                resources=[
                    f"{boot}-{kind}-role-{self.account}-{self.region}"
                    # the templates are file assets; the app has no image assets and does no lookups
                    for kind in ("deploy", "file-publishing")
                ],
            ),
            # the inference image, tagged by commit
            iam.PolicyStatement(actions=["ecr:GetAuthorizationToken"], resources=["*"]),  # no resource type
            iam.PolicyStatement(
                actions=[
                    "ecr:BatchCheckLayerAvailability",
                    "ecr:InitiateLayerUpload",
                    "ecr:UploadLayerPart",
                    "ecr:CompleteLayerUpload",
                    "ecr:PutImage",
                    "ecr:BatchGetImage",
                    "ecr:DescribeImages",
                ],
                resources=[storage.repository.repository_arn],
            ),
            # the bundle: DAGs, code, MWAA's requirements/plugins/startup script (their versions feed the deploy)
            iam.PolicyStatement(
                actions=["s3:PutObject", "s3:GetObject", "s3:GetObjectVersion"],
                resources=[
                    code.arn_for_objects(k)
                    for k in (f"{DAGS_PREFIX}*", f"{CODE_PREFIX}*", REQUIREMENTS_KEY, PLUGINS_KEY, STARTUP_KEY)
                ],
            ),
            iam.PolicyStatement(actions=["s3:ListBucket"], resources=[code.bucket_arn]),
            iam.PolicyStatement(
                actions=["kms:Encrypt", "kms:GenerateDataKey", "kms:Decrypt"], resources=[storage.key.key_arn]
            ),
            iam.PolicyStatement(
                actions=["cloudformation:DescribeStacks"],
                resources=[f"arn:{self.partition}:cloudformation:{self.region}:{self.account}:stack/Cxr-*/*"],
            ),
        ]
        policy = iam.Policy(self, "Access", statements=statements)
        policy.attach_to_role(self.deploy_role)
        cdk.CfnOutput(self, "DeployRoleArn", value=self.deploy_role.role_arn)
