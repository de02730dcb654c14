"""Scoped IAM statements: S3 by bucket and prefix (objects and listing), and iam:PassRole to one service."""

from __future__ import annotations

from collections.abc import Iterable

from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3

READ = ["s3:GetObject", "s3:GetObjectVersion"]
WRITE = ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]


def s3_access(
    bucket: s3.IBucket,
    prefixes: Iterable[str],
    *,
    write: bool = False,
    list_prefix: str | None = None,
    list_all: bool = False,
) -> list[iam.PolicyStatement]:
    """Objects under ``prefixes`` (each a folder ``a/b/`` or one key), read or read+write, and listing of
    the bucket limited to ``list_prefix`` (default: the first prefix); ``list_all``: listing unconditioned
    (a service that checks the bucket itself, e.g. MWAA on its source bucket)."""
    prefixes = list(prefixes)
    resources = [bucket.arn_for_objects(p + "*" if p.endswith("/") else p) for p in prefixes]
    statements = [iam.PolicyStatement(actions=READ + (WRITE if write else []), resources=resources)]
    if list_all:
        statements.append(iam.PolicyStatement(actions=["s3:ListBucket"], resources=[bucket.bucket_arn]))
        return statements
    listed = list_prefix if list_prefix is not None else prefixes[0]
    statements.append(
        iam.PolicyStatement(
            actions=["s3:ListBucket"],
            resources=[bucket.bucket_arn],
            conditions={"StringLike": {"s3:prefix": [listed, listed + "*"]}},
        )
    )
    return statements


def pass_role(roles: Iterable[iam.IRole], service: str) -> iam.PolicyStatement:
    """iam:PassRole on exactly these roles, and only to ``service`` (e.g. ``ecs-tasks.amazonaws.com``)."""
    return iam.PolicyStatement(
        actions=["iam:PassRole"],
        resources=[r.role_arn for r in roles],
        conditions={"StringEquals": {"iam:PassedToService": service}},
    )


def attach(role: iam.Role, name: str, statements: Iterable[iam.PolicyStatement]) -> iam.Policy:
    """One inline policy per role (managed policies would carry AWS's action sets, not ours)."""
    policy = iam.Policy(role, name, statements=list(statements))
    policy.attach_to_role(role)
    return policy
