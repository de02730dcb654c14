"""Least privilege, proven against a moto server that enforces IAM: each role of the app is assumed
(sts:AssumeRole) and calls S3 and the other services with its own temporary credentials.

The app is deployed (``moto_helpers.deploy``) into a moto server of its own, which then enforces IAM on
every request (``reset-auth``), so the shared, unenforced deployment of the other moto tests is untouched.
Before enforcement: a setup user (``*`` on ``*``) is made the only principal of every role's trust policy
(the services the roles trust cannot call moto); the objects the calls read are uploaded; the buckets'
own policies are removed: moto evaluates a bucket policy on object requests but not its conditions, so the
enforce-SSL and SSE-KMS-only Deny statements (which on AWS deny only plain HTTP and non-KMS uploads)
would deny every request; they are asserted in the template tests. moto names CloudWatch's actions after
its signing name (``monitoring:PutMetricData``) and AWS Batch's after its lower-case URL path
(``batch:describejobs``), and matches actions case-sensitively, unlike IAM: each deployed statement
granting such actions is given them under moto's names too (``_as_moto_names``).

What moto evaluates, and so what is proven live here: S3 requests are authorized against the object's or
the bucket's ARN (``arn:aws:s3:::bucket/key``), so the bucket/prefix scoping of every S3 statement is
proven by real calls; every other service is authorized against the resource ``*`` only (SQS: the queue's
ARN), so an ARN-scoped statement of another service never allows a call in moto, and only actions granted
on ``*`` can be shown allowed (plus MWAA's Celery queues, by queue ARN). moto ignores the Conditions of
identity policies. **moto cannot evaluate ARN-scoped non-S3 statements nor Conditions**: those are
asserted on the template and the deployed policy documents instead (the exact action set of each role,
the resources of every ARN-scoped statement, the ListBucket ``s3:prefix`` conditions, the PassRole
``iam:PassedToService`` conditions, the ``cloudwatch:namespace`` conditions, ``ecs:cluster`` on RunTask).

Every denial is shown able to fail: a role allowed ``*`` makes every denied call successfully (the
objects, buckets and requests are valid), and a twin of each role whose S3 object resources are widened
to the whole bucket (``arn:aws:s3:::bucket/*``) lets through each denied call its real policy grants in
another prefix of the same bucket: the denial comes from the scoping, not from a broken setup.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.infra.moto_helpers import (  # noqa: F401
    ACCOUNT,
    REGION,
    Deployment,
    as_list,
    client,
    deploy,
    enforce_iam_auth,
    moto_deployment,
    moto_server,
    moto_templates,
    role_logical_id,
    role_policy_statements,
)

pytestmark = pytest.mark.slow

#: role -> (stack, logical id prefix)
ROLES = {
    "emr": ("Cxr-Compute", "EmrJobRole"),
    "infer": ("Cxr-Compute", "InferTaskRole"),
    "infer_exec": ("Cxr-Compute", "InferExecutionRole"),
    "batch_instance": ("Cxr-Compute", "BatchInstanceRole"),
    "mwaa": ("Cxr-Orchestration", "MwaaExecutionRole"),
    "ci": ("Cxr-Ci", "DeployRole"),
}
OTHER_BUCKET = "cxr-lp-other"
#: the objects the calls read (bucket kind -> keys)
SEED = {
    "raw": ["images/a.dcm", "other/a.dcm"],
    "code": [
        "code/cxr.zip",
        "dags/xray_inference_pipeline.py",
        "requirements.txt",
        "plugins.zip",
        "startup.sh",
        "other/x",
    ],
    "lake": [
        "lakehouse/tensors/x",
        "lakehouse/tensors/part-0.parquet",
        "lakehouse/thresholds/part-0.parquet",
        "lakehouse/reports/published.json",
        "lakehouse/reports/report.html",
        "lakehouse/quarantine/q.parquet",
        "athena-results/q.csv",
    ],
    "other": ["x"],
}

#: (role, operation, bucket kind, key or list prefix, allowed)
S3_CASES: list[tuple[str, str, str, str, bool]] = [
    # EMR job role: reads images and code, writes the lakehouse
    ("emr", "get", "raw", "images/a.dcm", True),
    ("emr", "get", "code", "code/cxr.zip", True),
    ("emr", "put", "lake", "lakehouse/tensors/x", True),
    ("emr", "get", "lake", "lakehouse/tensors/x", True),
    ("emr", "put", "raw", "images/x", False),
    ("emr", "get", "code", "dags/xray_inference_pipeline.py", False),
    ("emr", "put", "lake", "athena-results/x", False),
    ("emr", "get", "other", "x", False),
    # inference task role: reads tensors/thresholds/published.json, writes predictions and run summaries
    ("infer", "get", "lake", "lakehouse/tensors/part-0.parquet", True),
    ("infer", "get", "lake", "lakehouse/thresholds/part-0.parquet", True),
    ("infer", "get", "lake", "lakehouse/reports/published.json", True),
    ("infer", "put", "lake", "lakehouse/predictions/part-0.parquet", True),
    ("infer", "put", "lake", "lakehouse/runs/x.json", True),
    ("infer", "put", "lake", "lakehouse/run_index/_delta_log/x.json", True),
    ("infer", "put", "lake", "lakehouse/tensors/part-1.parquet", False),
    ("infer", "get", "lake", "lakehouse/quarantine/q.parquet", False),
    ("infer", "get", "lake", "lakehouse/reports/report.html", False),
    ("infer", "get", "raw", "images/a.dcm", False),
    ("infer", "get", "code", "code/cxr.zip", False),
    # MWAA execution role: lists/reads images, RW lakehouse + Athena results, reads MWAA's files
    ("mwaa", "list", "raw", "images/", True),
    ("mwaa", "get", "raw", "images/a.dcm", True),
    ("mwaa", "put", "lake", "lakehouse/reports/report.html", True),
    ("mwaa", "get", "lake", "lakehouse/tensors/x", True),
    ("mwaa", "put", "lake", "athena-results/x.csv", True),
    ("mwaa", "get", "lake", "athena-results/q.csv", True),
    ("mwaa", "get", "code", "dags/xray_inference_pipeline.py", True),
    ("mwaa", "get", "code", "requirements.txt", True),
    ("mwaa", "get", "code", "plugins.zip", True),
    ("mwaa", "get", "code", "startup.sh", True),
    ("mwaa", "put", "code", "dags/x.py", False),
    ("mwaa", "put", "raw", "images/x", False),
    ("mwaa", "get", "code", "code/cxr.zip", False),
    ("mwaa", "get", "raw", "other/a.dcm", False),
    ("mwaa", "get", "other", "x", False),
    # CI deploy role: uploads the bundle, nothing of the data
    ("ci", "put", "code", "dags/x.py", True),
    ("ci", "put", "code", "code/cxr.zip", True),
    ("ci", "put", "code", "requirements.txt", True),
    ("ci", "put", "code", "plugins.zip", True),
    ("ci", "put", "code", "startup.sh", True),
    ("ci", "put", "code", "other/x", False),
    ("ci", "get", "raw", "images/a.dcm", False),
    ("ci", "put", "raw", "images/x", False),
    ("ci", "get", "lake", "lakehouse/tensors/x", False),
    ("ci", "put", "lake", "lakehouse/tensors/y", False),
    # no S3 at all
    *((role, "get", kind, key, False) for role in ("infer_exec", "batch_instance") for kind, key in (
        ("raw", "images/a.dcm"), ("lake", "lakehouse/tensors/x"), ("code", "code/cxr.zip"),
    )),
]  # fmt: skip

#: the calls of other services: (role, service, method, arguments, allowed)
METRIC = {"Namespace": "CXR/Pipeline", "MetricData": [{"MetricName": "lp", "Value": 1.0}]}
START_JOB = {"applicationId": "APP", "executionRoleArn": "ROLE", "jobDriver": {"sparkSubmit": {"entryPoint": "x"}}}
API_CASES: list[tuple[str, str, str, dict[str, Any], bool]] = [
    ("emr", "cloudwatch", "put_metric_data", METRIC, True),
    ("emr", "iam", "create_user", {"UserName": "lp-emr"}, False),
    ("emr", "emr-serverless", "start_job_run", START_JOB, False),
    ("infer", "cloudwatch", "put_metric_data", METRIC, True),
    ("infer", "emr-serverless", "start_job_run", START_JOB, False),
    ("infer", "iam", "create_user", {"UserName": "lp-infer"}, False),
    ("infer", "s3", "create_bucket", {"Bucket": "lp-infer-new"}, False),
    ("infer_exec", "ecr", "get_authorization_token", {}, True),
    ("infer_exec", "cloudwatch", "put_metric_data", METRIC, False),
    ("batch_instance", "ecr", "get_authorization_token", {}, False),
    ("batch_instance", "batch", "describe_jobs", {"jobs": ["x"]}, False),
    ("mwaa", "batch", "describe_jobs", {"jobs": ["x"]}, True),
    ("mwaa", "logs", "describe_log_groups", {}, True),
    ("mwaa", "cloudwatch", "put_metric_data", METRIC, True),
    ("mwaa", "sqs", "send_message", {"QueueUrl": "QUEUE:airflow-celery-lp", "MessageBody": "x"}, True),
    ("mwaa", "sqs", "send_message", {"QueueUrl": "QUEUE:lp-other", "MessageBody": "x"}, False),
    ("mwaa", "iam", "create_user", {"UserName": "lp-mwaa"}, False),
    ("mwaa", "s3", "create_bucket", {"Bucket": "lp-mwaa-new"}, False),
    ("mwaa", "ecr", "get_authorization_token", {}, False),
    ("ci", "ecr", "get_authorization_token", {}, True),
    ("ci", "iam", "create_user", {"UserName": "lp-ci"}, False),
    ("ci", "batch", "describe_jobs", {"jobs": ["x"]}, False),
    ("ci", "cloudwatch", "put_metric_data", METRIC, False),
]

#: every action each role is granted (its inline policies in the template), nothing else
ACTIONS = {
    "emr": [
        "cloudwatch:PutMetricData",
        *("kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey"),
        *("logs:CreateLogStream", "logs:DescribeLogGroups", "logs:DescribeLogStreams", "logs:PutLogEvents"),
        *("s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket"),
        *("s3:PutObject", "secretsmanager:GetSecretValue"),
    ],
    "infer": [
        "cloudwatch:PutMetricData",
        *("kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey"),
        *("s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket"),
        "s3:PutObject",
    ],
    "infer_exec": [
        *("ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:GetAuthorizationToken"),
        "ecr:GetDownloadUrlForLayer",
        *("kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey", "logs:CreateLogStream", "logs:PutLogEvents"),
    ],
    "batch_instance": [
        *("ecs:DeregisterContainerInstance", "ecs:DiscoverPollEndpoint", "ecs:Poll", "ecs:PutSystemLogEvents"),
        *("ecs:RegisterContainerInstance", "ecs:StartTelemetrySession", "ecs:SubmitAttachmentStateChanges"),
        *("ecs:SubmitContainerStateChange", "ecs:SubmitTaskStateChange", "ecs:UpdateContainerInstancesState"),
    ],
    "mwaa": [
        *("airflow:PublishMetrics", "athena:GetQueryExecution"),
        *("athena:StartQueryExecution", "athena:StopQueryExecution", "batch:DescribeJobs", "batch:SubmitJob"),
        *("batch:TerminateJob", "cloudwatch:PutMetricData", "ecs:DescribeTasks", "ecs:RunTask", "ecs:StopTask"),
        *("emr-serverless:CancelJobRun", "emr-serverless:GetApplication", "emr-serverless:GetJobRun"),
        *("emr-serverless:StartApplication", "emr-serverless:StartJobRun"),
        *("glue:CreateDatabase", "glue:CreateTable", "glue:DeleteTable", "glue:GetDatabase", "glue:GetPartitions"),
        *("glue:GetTable", "iam:PassRole"),
        *("kms:Decrypt", "kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey"),
        *("logs:CreateLogGroup", "logs:CreateLogStream", "logs:DescribeLogGroups"),
        *("logs:GetLogEvents", "logs:GetLogGroupFields", "logs:GetLogRecord", "logs:GetQueryResults"),
        *("logs:PutLogEvents", "s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetAccountPublicAccessBlock"),
        *("s3:GetBucketLocation", "s3:GetBucketPublicAccessBlock", "s3:GetBucketVersioning"),
        "s3:GetEncryptionConfiguration",
        *("s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "s3:PutObject"),
        *("sqs:ChangeMessageVisibility", "sqs:DeleteMessage", "sqs:GetQueueAttributes", "sqs:GetQueueUrl"),
        *("sqs:ReceiveMessage", "sqs:SendMessage", "ssm:GetParameter", "ssm:GetParameters"),
    ],
    "ci": [
        *("cloudformation:DescribeStacks", "ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage"),
        *("ecr:CompleteLayerUpload", "ecr:DescribeImages", "ecr:GetAuthorizationToken", "ecr:InitiateLayerUpload"),
        *("ecr:PutImage", "ecr:UploadLayerPart", "kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"),
        *("s3:GetObject", "s3:GetObjectVersion", "s3:ListBucket", "s3:PutObject"),
        "sts:AssumeRole",
    ],
}

DENIED = {"AccessDenied", "AccessDeniedException", "403"}
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@dataclass
class Enforced:
    """The app in a moto server that enforces IAM: bucket names by kind, role ARNs by name, the setup
    user's credentials, and the inline policies each role got (as deployed)."""

    endpoint: str
    dep: Deployment
    buckets: dict[str, str]
    roles: dict[str, str]
    setup: dict[str, str]
    policies: dict[str, list[dict[str, Any]]]
    _sessions: dict[str, dict[str, str]] = field(default_factory=dict)

    def credentials(self, role: str) -> dict[str, str]:
        """Temporary credentials of ``role`` (a name of ``roles``), from sts:AssumeRole as the setup user."""
        if role not in self._sessions:
            sts = client(self.endpoint, "sts", **self.setup)
            c = sts.assume_role(RoleArn=self.roles[role], RoleSessionName=f"lp-{role}")["Credentials"]
            self._sessions[role] = {
                "aws_access_key_id": c["AccessKeyId"],
                "aws_secret_access_key": c["SecretAccessKey"],
                "aws_session_token": c["SessionToken"],
            }
        return self._sessions[role]

    def client(self, service: str, role: str | None = None) -> Any:
        return client(self.endpoint, service, **(self.credentials(role) if role else self.setup))


def _trust(principal: str) -> str:
    statement = {"Effect": "Allow", "Principal": {"AWS": principal}, "Action": "sts:AssumeRole"}
    return json.dumps({"Version": "2012-10-17", "Statement": [statement]})


def _moto_name(action: str) -> str | None:
    """How moto names ``action`` when it differs from IAM's name: CloudWatch by its signing name, Batch by
    its lower-case URL path."""
    if action.startswith("cloudwatch:"):
        return action.replace("cloudwatch:", "monitoring:")
    if action.startswith("batch:"):
        return action.lower()
    return None


def _as_moto_names(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with each action moto names otherwise also granted under moto's name."""
    statements = []
    for s in doc["Statement"]:
        actions = as_list(s["Action"])
        extra = [m for a in actions if (m := _moto_name(a)) is not None]
        statements.append({**s, "Action": actions + extra} if extra else s)
    return {**doc, "Statement": statements}


def _widened(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with every S3 object resource widened to its whole bucket (``arn:aws:s3:::b/*``)."""

    def widen(resource: str) -> str:
        m = re.fullmatch(r"arn:aws:s3:::([^/]+)/.+", resource)
        return f"arn:aws:s3:::{m.group(1)}/*" if m else resource

    statements = [{**s, "Resource": [widen(r) for r in as_list(s["Resource"])]} for s in doc["Statement"]]
    return {**doc, "Statement": statements}


def _role_names(dep: Deployment, templates: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {
        name: dep.physical[stack][role_logical_id(templates[stack], prefix)] for name, (stack, prefix) in ROLES.items()
    }


@pytest.fixture(scope="module")
def enforced(
    tmp_path_factory: pytest.TempPathFactory,
    moto_templates: dict[str, dict[str, Any]],  # noqa: F811
) -> Iterator[Enforced]:
    log = tmp_path_factory.mktemp("moto-iam") / "moto.log"
    with moto_server(log) as endpoint:
        dep = deploy(endpoint, moto_templates)
        storage = dep.outputs["Cxr-Storage"]
        buckets = {k: storage[f"{k.capitalize()}Bucket"] for k in ("raw", "lake", "code")} | {"other": OTHER_BUCKET}
        s3, iam = dep.client("s3"), dep.client("iam")
        s3.create_bucket(Bucket=OTHER_BUCKET)
        for kind in ("raw", "lake", "code"):
            s3.delete_bucket_policy(Bucket=buckets[kind])  # moto ignores their conditions (module docstring)
        for kind, keys in SEED.items():
            for key in keys:
                s3.put_object(Bucket=buckets[kind], Key=key, Body=b"seed")
        for queue in ("airflow-celery-lp", "lp-other"):
            dep.client("sqs").create_queue(QueueName=queue)
        user = iam.create_user(UserName="lp-setup")["User"]["Arn"]
        iam.put_user_policy(UserName="lp-setup", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))
        key = iam.create_access_key(UserName="lp-setup")["AccessKey"]
        setup = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}

        names = _role_names(dep, moto_templates)
        roles: dict[str, str] = {}
        policies: dict[str, list[dict[str, Any]]] = {}
        for name, role in names.items():
            roles[name] = iam.get_role(RoleName=role)["Role"]["Arn"]
            iam.update_assume_role_policy(RoleName=role, PolicyDocument=_trust(user))
            policies[name] = []
            for policy in iam.list_role_policies(RoleName=role)["PolicyNames"]:
                doc = iam.get_role_policy(RoleName=role, PolicyName=policy)["PolicyDocument"]
                policies[name].append(doc)
                iam.put_role_policy(RoleName=role, PolicyName=policy, PolicyDocument=json.dumps(_as_moto_names(doc)))
            assert iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"] == []
            # the twin: the same policies, S3 objects widened to the whole bucket
            twin = f"lp-wide-{name}"
            roles[f"wide:{name}"] = iam.create_role(RoleName=twin, AssumeRolePolicyDocument=_trust(user))["Role"]["Arn"]
            for i, doc in enumerate(policies[name]):
                widened = _as_moto_names(_widened(doc))
                iam.put_role_policy(RoleName=twin, PolicyName=f"p{i}", PolicyDocument=json.dumps(widened))
        roles["allow_all"] = iam.create_role(RoleName="lp-allow-all", AssumeRolePolicyDocument=_trust(user))["Role"][
            "Arn"
        ]
        iam.put_role_policy(RoleName="lp-allow-all", PolicyName="all", PolicyDocument=json.dumps(ALLOW_ALL))

        enforce_iam_auth(endpoint)
        yield Enforced(endpoint, dep, buckets, roles, setup, policies)


# --- calls ------------------------------------------------------------------------------------------
def _s3_call(env: Enforced, role: str, op: str, kind: str, key: str) -> Callable[[], Any]:
    s3, bucket = env.client("s3", role), env.buckets[kind]
    if op == "get":
        return lambda: s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    if op == "put":
        return lambda: s3.put_object(Bucket=bucket, Key=key, Body=b"lp")
    assert op == "list"
    return lambda: s3.list_objects_v2(Bucket=bucket, Prefix=key)


def _api_call(env: Enforced, role: str, service: str, method: str, kwargs: dict[str, Any]) -> Callable[[], Any]:
    args = dict(kwargs)
    if service == "emr-serverless":
        args |= {"applicationId": env.dep.created["Spark"], "executionRoleArn": env.roles["emr"]}
    if service == "sqs":
        args["QueueUrl"] = f"{env.endpoint}/{ACCOUNT}/{args['QueueUrl'].split(':', 1)[1]}"
    api = env.client(service, role)
    return lambda: getattr(api, method)(**args)


def _allowed(call: Callable[[], Any]) -> bool:
    """True when the call succeeds, False when IAM denies it; any other error fails the test."""
    try:
        call()
    except ClientError as exc:
        code = exc.response["Error"]["Code"]
        assert code in DENIED or exc.response["ResponseMetadata"]["HTTPStatusCode"] == 403, exc
        return False
    return True


def _case_id(case: tuple[Any, ...]) -> str:
    return "-".join(str(p) for p in case[:4] if not isinstance(p, dict)).replace("/", "_")


@pytest.mark.parametrize("case", S3_CASES, ids=[_case_id(c) for c in S3_CASES])
def test_s3_access_of_each_role(enforced: Enforced, case: tuple[str, str, str, str, bool]) -> None:
    role, op, kind, key, allowed = case
    assert _allowed(_s3_call(enforced, role, op, kind, key)) is allowed


@pytest.mark.parametrize("case", API_CASES, ids=[_case_id(c) for c in API_CASES])
def test_other_services_of_each_role(enforced: Enforced, case: tuple[str, str, str, dict[str, Any], bool]) -> None:
    role, service, method, kwargs, allowed = case
    assert _allowed(_api_call(enforced, role, service, method, kwargs)) is allowed


def test_setup_user_is_not_anonymous(enforced: Enforced) -> None:
    """Enforcement is on: the default test credentials (no such user) are refused, the setup user is not."""
    with pytest.raises(ClientError) as err:
        client(enforced.endpoint, "s3").list_objects_v2(Bucket=enforced.buckets["raw"])
    assert err.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    assert enforced.client("s3").list_objects_v2(Bucket=enforced.buckets["raw"])["KeyCount"] >= 2


def test_every_denied_call_is_a_valid_call(enforced: Enforced) -> None:
    """A role allowed ``*`` makes every call denied above: what denies them is the roles' policies."""
    for role, op, kind, key, allowed in S3_CASES:
        if not allowed:
            assert _allowed(_s3_call(enforced, "allow_all", op, kind, key)), (role, op, kind, key)
    for role, service, method, kwargs, allowed in API_CASES:
        if not allowed:
            kwargs = {**kwargs, "UserName": f"{kwargs['UserName']}-ctl"} if "UserName" in kwargs else kwargs
            kwargs = {**kwargs, "Bucket": f"{kwargs['Bucket']}-ctl"} if "Bucket" in kwargs else kwargs
            assert _allowed(_api_call(enforced, "allow_all", service, method, kwargs)), (role, service, method)


def _grants_in_bucket(docs: list[dict[str, Any]], action: str, bucket: str) -> bool:
    return any(
        action in as_list(s["Action"]) and any(r.startswith(f"arn:aws:s3:::{bucket}/") for r in as_list(s["Resource"]))
        for doc in docs
        for s in doc["Statement"]
    )


def test_denials_come_from_prefix_scoping(enforced: Enforced) -> None:
    """Each role's twin, its S3 object resources widened to the whole bucket (the lake bucket's ``*``), lets
    through exactly the denied calls whose action the real policy grants in another prefix of the bucket."""
    flipped: dict[str, list[str]] = {}
    for role, op, kind, key, allowed in S3_CASES:
        if allowed or op == "list":
            continue
        action = {"get": "s3:GetObject", "put": "s3:PutObject"}[op]
        expected = _grants_in_bucket(enforced.policies[role], action, enforced.buckets[kind])
        assert _allowed(_s3_call(enforced, f"wide:{role}", op, kind, key)) is expected, (role, op, kind, key)
        if expected:
            flipped.setdefault(role, []).append(f"{op} {kind}/{key}")
    assert flipped == {
        "emr": ["get code/dags/xray_inference_pipeline.py", "put lake/athena-results/x"],
        "infer": [
            "put lake/lakehouse/tensors/part-1.parquet",
            "get lake/lakehouse/quarantine/q.parquet",
            "get lake/lakehouse/reports/report.html",
        ],
        "mwaa": ["get code/code/cxr.zip", "get raw/other/a.dcm"],
        "ci": ["put code/other/x"],
    }


def test_inference_writes_its_run_summary_through_the_product_code(
    enforced: Enforced, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lakehouse.runs.write_summary`` (boto3 for the JSON, delta-rs for the run index) as the inference
    task role: under ``<lake>/lakehouse/`` it writes both; aimed at ``lakehouse/tensors`` it is denied."""
    from lakehouse import storage
    from lakehouse.config import load_settings
    from lakehouse.errors import StorageError
    from lakehouse.runs import InferRun, write_summary

    creds = enforced.credentials("infer")
    monkeypatch.setenv("CXR_S3_ENDPOINT_URL", enforced.endpoint)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds["aws_secret_access_key"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", creds["aws_session_token"])
    storage._s3_client.cache_clear()  # the cached client holds whichever credentials it was made with
    import boto3

    # boto3's default session keeps the credentials it first resolved (an earlier test's): start a new one
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    try:
        settings = load_settings()
        lake = f"s3://{enforced.buckets['lake']}/lakehouse"
        record = InferRun(run_id="inf-lp", model_id="m", weights_sha256="s", tensors_version=1, device="cpu")
        assert write_summary(lake, record, settings) == f"{lake}/runs/inf-lp.json"
        with pytest.raises(StorageError, match="AccessDenied"):
            write_summary(f"{lake}/tensors", record, settings)
    finally:
        storage._s3_client.cache_clear()
    s3 = enforced.client("s3")
    listed = s3.list_objects_v2(Bucket=enforced.buckets["lake"], Prefix="lakehouse/run")["Contents"]
    keys = {o["Key"] for o in listed}
    assert "lakehouse/runs/inf-lp.json" in keys
    assert "lakehouse/run_index/_delta_log/00000000000000000000.json" in keys  # indexed, not only written
    assert not [k for k in keys if k.startswith("lakehouse/tensors/")]


# --- the template: what moto cannot evaluate -----------------------------------------------------------
def _statements(templates: dict[str, dict[str, Any]], role: str) -> list[dict[str, Any]]:
    stack, prefix = ROLES[role]
    return role_policy_statements(templates[stack], role_logical_id(templates[stack], prefix))


def test_exact_action_set_of_each_role(moto_templates: dict[str, dict[str, Any]]) -> None:  # noqa: F811
    found = {
        role: sorted({a for s in _statements(moto_templates, role) for a in as_list(s["Action"])}) for role in ROLES
    }
    assert found == {role: sorted(actions) for role, actions in ACTIONS.items()}
    assert all(s["Effect"] == "Allow" for role in ROLES for s in _statements(moto_templates, role))
    assert not [a for actions in found.values() for a in actions if "*" in a]  # no wildcard action


def _deployed(dep: Deployment, templates: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each role's statements as deployed (every reference resolved), from moto's IAM."""
    iam = dep.client("iam")
    out: dict[str, list[dict[str, Any]]] = {}
    for name, role in _role_names(dep, templates).items():
        out[name] = [
            s
            for p in iam.list_role_policies(RoleName=role)["PolicyNames"]
            for s in iam.get_role_policy(RoleName=role, PolicyName=p)["PolicyDocument"]["Statement"]
        ]
    return out


def test_arn_scoped_statements_and_conditions(
    moto_deployment: Deployment,  # noqa: F811
    moto_templates: dict[str, dict[str, Any]],  # noqa: F811
) -> None:
    """Every statement not on ``*`` and not S3 names exactly its resources; every Condition is as meant."""
    dep, deployed = moto_deployment, _deployed(moto_deployment, moto_templates)
    storage, compute = dep.outputs["Cxr-Storage"], dep.outputs["Cxr-Compute"]
    key, secret, repo = (
        storage["KeyArn"],
        storage["PseudonymSecretArn"],
        f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/cxr-infer",
    )
    ra = f"{REGION}:{ACCOUNT}"
    logs = f"arn:aws:logs:{ra}:log-group:/cxr"
    app = f"arn:aws:emr-serverless:{ra}:/applications/{compute['EmrApplicationId']}"
    roles = {
        r: dep.client("iam").get_role(RoleName=n)["Role"]["Arn"] for r, n in _role_names(dep, moto_templates).items()
    }
    ecs = [f"arn:aws:ecs:{ra}:{kind}/AWSBatch-cxr-gpu*" for kind in ("cluster", "container-instance")]
    boot = [
        f"arn:aws:iam::{ACCOUNT}:role/cdk-hnb659fds-{k}-role-{ACCOUNT}-{REGION}"
        for k in ("deploy", "file-publishing")  # no image assets, no lookups
    ]
    expected = {
        "emr": {"kms:Decrypt": [key], "secretsmanager:GetSecretValue": [secret], "logs:PutLogEvents": [f"{logs}/emr", f"{logs}/emr:*"]},
        "infer": {"kms:Decrypt": [key]},
        "infer_exec": {"ecr:BatchGetImage": [repo], "kms:Decrypt": [key], "logs:PutLogEvents": [f"{logs}/infer", f"{logs}/infer:*"]},
        "batch_instance": {"ecs:Poll": ecs, "ecs:RegisterContainerInstance": ecs},
        "mwaa": {
            "airflow:PublishMetrics": [f"arn:aws:airflow:{ra}:environment/cxr"],
            "logs:CreateLogGroup": [f"arn:aws:logs:{ra}:log-group:airflow-cxr-*"],
            "logs:GetLogEvents": [f"arn:aws:logs:{ra}:log-group:airflow-cxr-*"],
            "sqs:SendMessage": [f"arn:aws:sqs:{REGION}:*:airflow-celery-*"],
            "kms:Decrypt": [key],
            "ssm:GetParameter": [f"arn:aws:ssm:{ra}:parameter/cxr/variables/*", f"arn:aws:ssm:{ra}:parameter/cxr/connections/*", f"arn:aws:ssm:{ra}:parameter/cxr/settings/*"],
            "emr-serverless:StartJobRun": [app],
            "emr-serverless:GetJobRun": [f"{app}/jobruns/*"],
            "iam:PassRole": [roles["emr"], roles["infer"], roles["infer_exec"]],
            "ecs:RunTask": [f"arn:aws:ecs:{ra}:task-definition/cxr-infer:*"],
            "ecs:DescribeTasks": [f"arn:aws:ecs:{ra}:task/cxr-infer/*"],
            "batch:SubmitJob": [f"arn:aws:batch:{ra}:job-queue/cxr-gpu", f"arn:aws:batch:{ra}:job-definition/cxr-infer-gpu", f"arn:aws:batch:{ra}:job-definition/cxr-infer-gpu:*"],
            "batch:TerminateJob": [f"arn:aws:batch:{ra}:job/*"],
            "athena:StartQueryExecution": [f"arn:aws:athena:{ra}:workgroup/cxr"],
            "glue:CreateTable": [f"arn:aws:glue:{ra}:catalog", f"arn:aws:glue:{ra}:database/cxr", f"arn:aws:glue:{ra}:table/cxr/*"],
            "glue:CreateDatabase": [f"arn:aws:glue:{ra}:catalog", f"arn:aws:glue:{ra}:database/cxr"],
            "glue:GetDatabase": [f"arn:aws:glue:{ra}:catalog", f"arn:aws:glue:{ra}:database/cxr", f"arn:aws:glue:{ra}:table/cxr/*", f"arn:aws:glue:{ra}:database/default"],
        },
        "ci": {
            "sts:AssumeRole": boot,
            "ecr:PutImage": [repo],
            "kms:Encrypt": [key],
            "cloudformation:DescribeStacks": [f"arn:aws:cloudformation:{ra}:stack/Cxr-*/*"],
        },
    }  # fmt: skip
    for role, actions in expected.items():
        for action, resources in actions.items():
            granted = sorted(
                r for s in deployed[role] if action in as_list(s["Action"]) for r in as_list(s["Resource"])
            )
            assert granted == sorted(resources), (role, action)
    # every non-S3 action granted on "*" is one without a resource type (the rest are ARN-scoped above)
    on_star = {
        role: sorted({a for s in statements if s["Resource"] == "*" for a in as_list(s["Action"])})
        for role, statements in deployed.items()
    }
    assert on_star == {
        "emr": ["cloudwatch:PutMetricData"],
        "infer": ["cloudwatch:PutMetricData"],
        "infer_exec": ["ecr:GetAuthorizationToken"],
        "batch_instance": ["ecs:DiscoverPollEndpoint"],
        "mwaa": ["batch:DescribeJobs", "cloudwatch:PutMetricData", "logs:DescribeLogGroups", "s3:GetAccountPublicAccessBlock"],
        "ci": ["ecr:GetAuthorizationToken"],
    }  # fmt: skip

    # Conditions (moto ignores them): ListBucket by prefix, PassRole to one service, metrics by namespace
    def conditions(role: str, action: str) -> list[Any]:
        return [s.get("Condition") for s in deployed[role] if action in as_list(s["Action"])]

    b = {k: storage[f"{k.capitalize()}Bucket"] for k in ("raw", "lake", "code")}

    def listing(role: str) -> dict[str, list[list[str]] | None]:
        out: dict[str, Any] = {}
        for s in deployed[role]:
            if "s3:ListBucket" in as_list(s["Action"]):
                bucket = s["Resource"].removeprefix("arn:aws:s3:::")
                kind = next(k for k, v in b.items() if v == bucket)
                c = s.get("Condition")
                out.setdefault(kind, []).append(c["StringLike"]["s3:prefix"] if c else None)
        return out

    assert listing("emr") == {
        "raw": [["images/", "images/*"]],
        "code": [["code/", "code/*"]],
        "lake": [["lakehouse/", "lakehouse/*"]],
    }
    assert listing("infer") == {"lake": [["lakehouse/", "lakehouse/*"]]}  # the reads and writes: one listing
    assert listing("mwaa") == {
        "code": [None],  # MWAA lists its source bucket itself (no prefix); the code bucket holds no patient data
        "raw": [["images/", "images/*"]],
        "lake": [["lakehouse/", "lakehouse/*"], ["athena-results/", "athena-results/*"]],
    }
    assert listing("ci") == {"code": [None]}  # the bundle upload lists the whole code bucket
    assert listing("infer_exec") == listing("batch_instance") == {}
    passed = {
        s["Condition"]["StringEquals"]["iam:PassedToService"]: sorted(as_list(s["Resource"]))
        for s in deployed["mwaa"]
        if "iam:PassRole" in as_list(s["Action"])
    }
    assert passed == {
        "emr-serverless.amazonaws.com": [roles["emr"]],
        "ecs-tasks.amazonaws.com": sorted([roles["infer"], roles["infer_exec"]]),
    }
    assert conditions("mwaa", "ecs:RunTask") == [{"ArnEquals": {"ecs:cluster": f"arn:aws:ecs:{ra}:cluster/cxr-infer"}}]
    namespace = {"StringEquals": {"cloudwatch:namespace": "CXR/Pipeline"}}
    assert (
        conditions("emr", "cloudwatch:PutMetricData") == conditions("infer", "cloudwatch:PutMetricData") == [namespace]
    )
    assert conditions("mwaa", "cloudwatch:PutMetricData") == [
        {"StringEquals": {"cloudwatch:namespace": ["AmazonMWAA", "CXR/Pipeline"]}}
    ]
    conditioned = {
        (role, a)
        for role, statements in deployed.items()
        for s in statements
        if "Condition" in s
        for a in as_list(s["Action"])
    }
    assert conditioned == {
        *((r, "s3:ListBucket") for r in ("emr", "infer", "mwaa")),
        ("mwaa", "iam:PassRole"), ("mwaa", "ecs:RunTask"),
        *((r, "cloudwatch:PutMetricData") for r in ("emr", "infer", "mwaa")),
    }  # fmt: skip
