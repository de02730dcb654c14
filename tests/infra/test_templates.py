"""The synthesized templates hold what issue #13 asks for: every resource, encrypted, private, least privilege.

One synth per session (tests/infra/conftest.py), with cdk-nag on: the fixture itself fails on an
unacknowledged AwsSolutions finding. The assertions walk the template dicts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra.config import METRICS_NAMESPACE, DeployConfig
from infra.versions import AIRFLOW_VERSION, EMR_RELEASE_LABEL
from tests.infra.conftest import Template, environment_agnostic, read_templates

DEFAULTS = DeployConfig()
#: actions that have no resource type in IAM: the only statements allowed Resource "*"
NO_RESOURCE_TYPE = {
    "cloudwatch:PutMetricData",
    "ecr:GetAuthorizationToken",
    "ecs:DiscoverPollEndpoint",
    "logs:DescribeLogGroups",
    "s3:GetAccountPublicAccessBlock",
    "batch:DescribeJobs",
}


def resources(template: Template, kind: str) -> dict[str, dict[str, Any]]:
    """The properties of every resource of type ``kind``, by logical id."""
    return {k: r.get("Properties", {}) for k, r in template["Resources"].items() if r["Type"] == kind}


def one(template: Template, kind: str) -> dict[str, Any]:
    found = list(resources(template, kind).values())
    assert len(found) == 1, f"{len(found)} resources of type {kind}"
    return found[0]


def by_name(template: Template, kind: str) -> dict[str, dict[str, Any]]:
    """Resources of ``kind`` by logical id without CDK's 8-hex hash suffix (``Raw72517081`` -> ``Raw``)."""
    return {re.sub(r"[0-9A-F]{8}$", "", k): p for k, p in resources(template, kind).items()}


def flat(node: Any) -> str:
    """An intrinsic rendered flat: Fn::Join joined, ``<Ref>``, ``<Logical.Attr>``, imports by export name."""
    if isinstance(node, str):
        return node
    if isinstance(node, dict) and "Fn::Join" in node:
        sep, items = node["Fn::Join"]
        return sep.join(flat(i) for i in items)
    if isinstance(node, dict) and "Ref" in node:
        return f"<{node['Ref']}>"
    if isinstance(node, dict) and "Fn::GetAtt" in node:
        return "<{}.{}>".format(*node["Fn::GetAtt"])
    if isinstance(node, dict) and "Fn::ImportValue" in node:
        return str(node["Fn::ImportValue"])
    return repr(node)


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def policy_statements(templates: dict[str, Template]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(``stack/logical id``, statement) of every AWS::IAM::Policy and every role's inline policy."""
    for stack, template in templates.items():
        for lid, props in resources(template, "AWS::IAM::Policy").items():
            for st in props["PolicyDocument"]["Statement"]:
                yield f"{stack}/{lid}", st
        for lid, props in resources(template, "AWS::IAM::Role").items():
            for policy in props.get("Policies", []):
                for st in policy["PolicyDocument"]["Statement"]:
                    yield f"{stack}/{lid}", st


# --- cdk-nag ------------------------------------------------------------------------------------------------


def _acknowledged(app: Any) -> set[tuple[str, str]]:
    import aws_cdk as cdk

    key = cdk.Validations.ACKNOWLEDGED_RULES_METADATA_KEY
    return {
        (c.node.path, rule.removeprefix("Annotation::"))
        for c in app.node.find_all()
        for m in c.node.metadata
        if m.type == key
        for rule in m.data
        if "AwsSolutions-" in rule
    }


def test_nag_acknowledgments_are_granular_and_on_constructs(cdk_app: Any) -> None:
    import aws_cdk as cdk

    acks = _acknowledged(cdk_app)
    assert len(acks) >= 30
    stacks = {s.node.path for s in cdk_app.node.children if isinstance(s, cdk.Stack)}
    assert not {path for path, _ in acks} & (stacks | {""}), "an acknowledgment on a whole stack or the app"
    for _, rule in acks:
        assert rule in {"AwsSolutions-SMG4", "AwsSolutions-EC23", "AwsSolutions-ECS2"} or re.fullmatch(
            r"AwsSolutions-IAM5\[Resource::.+\]", rule
        ), rule
    assert not {r for _, r in acks if r.startswith("AwsSolutions-IAM5[Action::")}, (
        "wildcard actions are fixed, not acknowledged"
    )


def test_every_acknowledgment_matches_a_finding(cdk_app: Any, tmp_path: Path) -> None:
    """No stale acknowledgment: the findings of the same app without them are exactly the acknowledged ones."""
    import cdk_nag

    from infra.app import build_app

    with environment_agnostic():
        bare = build_app(tmp_path, nag=False, context_file=None)
        bare.synth()
    report = cdk_nag.AwsSolutionsChecks(bare).validate_scope(bare)
    findings = {
        (str(r.construct_path).removesuffix("/Resource"), v.rule_name)
        for v in report.violations
        for r in v.violating_resources
    }
    assert findings == _acknowledged(cdk_app)


def test_nag_passes_for_another_prefix(tmp_path: Path) -> None:
    """The acknowledgments follow the deployment's prefix (names in ARNs), not the default's."""
    from infra.app import synth

    with environment_agnostic():
        synth(tmp_path, {"prefix": "demo"}, nag=True, context_file=None)
    assert "demo-preprocess" in (tmp_path / "Cxr-Compute.template.json").read_text()


# --- storage --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storage(templates: dict[str, Template]) -> Template:
    return templates["Cxr-Storage"]


def test_buckets_kms_except_logs_sse_s3(storage: Template) -> None:
    buckets = by_name(storage, "AWS::S3::Bucket")
    assert set(buckets) == {"Raw", "Lake", "Code", "Logs"}
    (key,) = resources(storage, "AWS::KMS::Key")
    assert resources(storage, "AWS::KMS::Key")[key]["EnableKeyRotation"] is True
    for name in ("Raw", "Lake", "Code"):
        (rule,) = buckets[name]["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        assert rule["ServerSideEncryptionByDefault"] == {
            "SSEAlgorithm": "aws:kms",
            "KMSMasterKeyID": {"Fn::GetAtt": [key, "Arn"]},
        }
        assert rule["BucketKeyEnabled"] is True
        # access logs to the logs bucket, one prefix per bucket
        assert buckets[name]["LoggingConfiguration"] == {
            "DestinationBucketName": {
                "Ref": next(k for k in resources(storage, "AWS::S3::Bucket") if k.startswith("Logs"))
            },
            "LogFilePrefix": f"s3/{name.lower()}/",
        }
    # S3 server access logging cannot deliver to an SSE-KMS bucket: exactly SSE-S3 there
    assert buckets["Logs"]["BucketEncryption"] == {
        "ServerSideEncryptionConfiguration": [{"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]
    }
    assert "AccessControl" not in buckets["Logs"]  # log delivery by bucket policy, ACLs disabled
    assert buckets["Logs"]["OwnershipControls"] == {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}


def test_buckets_private_versioned_with_lifecycle(storage: Template) -> None:
    buckets = by_name(storage, "AWS::S3::Bucket")
    for name, props in buckets.items():
        assert props["PublicAccessBlockConfiguration"] == dict.fromkeys(
            ("BlockPublicAcls", "BlockPublicPolicy", "IgnorePublicAcls", "RestrictPublicBuckets"), True
        ), name
        assert props["VersioningConfiguration"] == {"Status": "Enabled"}, name
    (logs_rule,) = buckets["Logs"]["LifecycleConfiguration"]["Rules"]
    assert logs_rule["Status"] == "Enabled" and logs_rule["ExpirationInDays"] == 365
    assert logs_rule["Transitions"] == [{"StorageClass": "GLACIER_IR", "TransitionInDays": 90}]
    assert buckets["Code"]["BucketName"] == {
        "Fn::Join": ["", ["airflow-cxr-", {"Ref": "AWS::AccountId"}, "-", {"Ref": "AWS::Region"}]]
    }


def test_bucket_policies_deny_plain_http_and_other_encryption(storage: Template) -> None:
    policies = {
        flat(p["Bucket"]): p["PolicyDocument"]["Statement"]
        for p in resources(storage, "AWS::S3::BucketPolicy").values()
    }
    buckets = by_name(storage, "AWS::S3::Bucket")
    logical = {re.sub(r"[0-9A-F]{8}$", "", k): k for k in resources(storage, "AWS::S3::Bucket")}
    assert set(policies) == {f"<{logical[n]}>" for n in buckets}
    for name in buckets:
        statements = policies[f"<{logical[name]}>"]
        tls = [s for s in statements if s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}]
        assert tls and tls[0]["Effect"] == "Deny" and tls[0]["Action"] == "s3:*" and tls[0]["Principal"] == {"AWS": "*"}
        kms = [s for s in statements if s.get("Sid") == "DenyNonKmsEncryption"]
        if name == "Logs":
            assert not kms
            continue
        assert len(kms) == 1, name
        deny = kms[0]
        assert deny["Effect"] == "Deny" and deny["Action"] == "s3:PutObject"
        assert deny["Condition"] == {
            "Null": {"s3:x-amz-server-side-encryption": "false"},
            "StringNotEquals": {"s3:x-amz-server-side-encryption": "aws:kms"},
        }


def test_ecr_immutable_scanned_and_secret_encrypted(storage: Template) -> None:
    repo = one(storage, "AWS::ECR::Repository")
    assert repo["ImageTagMutability"] == "IMMUTABLE"
    assert repo["ImageScanningConfiguration"] == {"ScanOnPush": True}
    assert repo["EncryptionConfiguration"]["EncryptionType"] == "KMS"
    secret = one(storage, "AWS::SecretsManager::Secret")
    assert flat(secret["KmsKeyId"]).startswith("<Key")


# --- network --------------------------------------------------------------------------------------------------


def test_vpc_private_subnets_and_endpoints(templates: dict[str, Template]) -> None:
    network = templates["Cxr-Network"]
    one(network, "AWS::EC2::VPC")
    private = [p for p in resources(network, "AWS::EC2::Subnet").values() if not p.get("MapPublicIpOnLaunch")]
    assert len(private) == 2 and len({flat(p["AvailabilityZone"]) for p in private}) == 2
    endpoints = resources(network, "AWS::EC2::VPCEndpoint").values()
    service = {flat(e["ServiceName"]).removeprefix("com.amazonaws.<AWS::Region>."): e for e in endpoints}
    assert service["s3"]["VpcEndpointType"] == "Gateway"
    interface = {name for name, e in service.items() if e["VpcEndpointType"] == "Interface"}
    needed = {
        "ecr.api",
        "ecr.dkr",
        "logs",
        "sts",
        "glue",
        "athena",
        "emr-serverless",
        "sqs",
        "airflow.api",
        "airflow.env",
        "airflow.ops",
    }
    assert needed <= interface, needed - interface
    assert all(service[n]["PrivateDnsEnabled"] is True for n in interface)
    flow = one(network, "AWS::EC2::FlowLog")
    assert flow["TrafficType"] == "ALL" and flow["ResourceType"] == "VPC"


# --- compute --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compute(templates: dict[str, Template]) -> Template:
    return templates["Cxr-Compute"]


def test_emr_serverless_release_and_capacity(compute: Template) -> None:
    emr = one(compute, "AWS::EMRServerless::Application")
    assert emr["ReleaseLabel"] == EMR_RELEASE_LABEL
    assert emr["Type"] == "SPARK"
    assert emr["MaximumCapacity"] == {
        "Cpu": f"{DEFAULTS.emr_max_vcpu} vCPU",
        "Memory": f"{DEFAULTS.emr_max_memory_gb} GB",
        "Disk": f"{DEFAULTS.emr_max_vcpu * 20} GB",
    }
    (defaults,) = [c["Properties"] for c in emr["RuntimeConfiguration"] if c["Classification"] == "spark-defaults"]
    # Delta Lake: EMR ships the jars but does not load them; the pseudonym key comes from Secrets Manager
    assert (
        defaults["spark.jars"] == "/usr/share/aws/delta/lib/delta-spark.jar,/usr/share/aws/delta/lib/delta-storage.jar"
    )
    assert defaults["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"
    assert defaults["spark.sql.catalog.spark_catalog"] == "org.apache.spark.sql.delta.catalog.DeltaCatalog"
    assert "EMR.secret@" in json.dumps(defaults["spark.executorEnv.CXR_PSEUDONYM_KEY"])  # a name, not a value


def test_ecs_cluster_and_fargate_task(compute: Template) -> None:
    one(compute, "AWS::ECS::Cluster")
    task = one(compute, "AWS::ECS::TaskDefinition")
    assert task["RequiresCompatibilities"] == ["FARGATE"]
    assert [c["Name"] for c in task["ContainerDefinitions"]] == ["cxr-infer"]


def test_batch_spot_gpu(compute: Template) -> None:
    env = one(compute, "AWS::Batch::ComputeEnvironment")
    res = env["ComputeResources"]
    assert res["Type"] == "SPOT"
    families = {t.split(".")[0] for t in res["InstanceTypes"]}
    assert families == {"g5", "g6"}
    # IMDSv2 only, one hop, encrypted root volume
    (lt_id,) = resources(compute, "AWS::EC2::LaunchTemplate")
    assert res["LaunchTemplate"]["LaunchTemplateId"] == {"Ref": lt_id}
    data = resources(compute, "AWS::EC2::LaunchTemplate")[lt_id]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
    assert all(m["Ebs"]["Encrypted"] is True for m in data["BlockDeviceMappings"])
    queue = one(compute, "AWS::Batch::JobQueue")
    (ce_id,) = resources(compute, "AWS::Batch::ComputeEnvironment")
    assert [o["ComputeEnvironment"] for o in queue["ComputeEnvironmentOrder"]] == [{"Ref": ce_id}]
    job = one(compute, "AWS::Batch::JobDefinition")
    requirements = {r["Type"]: r["Value"] for r in job["ContainerProperties"]["ResourceRequirements"]}
    assert requirements["GPU"] == "1"


def test_log_groups_all_kms(templates: dict[str, Template]) -> None:
    groups = {f"{s}/{k}": p for s, t in templates.items() for k, p in resources(t, "AWS::Logs::LogGroup").items()}
    assert len(groups) >= 3
    missing = [k for k, p in groups.items() if "KmsKeyId" not in p]
    assert not missing
    assert all("RetentionInDays" in p for p in groups.values())


# --- catalog, orchestration -----------------------------------------------------------------------------------


def test_glue_database_and_athena_workgroup(templates: dict[str, Template]) -> None:
    catalog = templates["Cxr-Catalog"]
    assert one(catalog, "AWS::Glue::Database")["DatabaseInput"]["Name"] == "cxr"
    conf = one(catalog, "AWS::Athena::WorkGroup")["WorkGroupConfiguration"]
    assert conf["ResultConfiguration"]["EncryptionConfiguration"]["EncryptionOption"] == "SSE_KMS"
    assert conf["ResultConfiguration"]["EncryptionConfiguration"]["KmsKey"]
    assert conf["BytesScannedCutoffPerQuery"] == DEFAULTS.athena_bytes_scanned_limit
    assert conf["EnforceWorkGroupConfiguration"] is True


def test_mwaa_environment(templates: dict[str, Template]) -> None:
    mwaa = one(templates["Cxr-Orchestration"], "AWS::MWAA::Environment")
    assert mwaa["AirflowVersion"] == AIRFLOW_VERSION
    assert mwaa["WebserverAccessMode"] == "PRIVATE_ONLY"
    assert mwaa["KmsKey"]
    assert mwaa["RequirementsS3Path"] and mwaa["StartupScriptS3Path"]
    assert "RequirementsS3ObjectVersion" not in mwaa  # default context: the newest version
    options = mwaa["AirflowConfigurationOptions"]
    assert options["secrets.backend"].endswith("SystemsManagerParameterStoreBackend")
    assert options["cxr.infer_backend"] == "ecs"
    # what startup.sh exports, also in SSM (its fallback when MWAA does not pass the options)
    names = {p["Name"] for p in resources(templates["Cxr-Orchestration"], "AWS::SSM::Parameter").values()}
    settings = {"CXR_INPUT_URI", "CXR_LAKEHOUSE_URI", "CXR_METRICS_NAMESPACE", "CXR_INFER_BACKEND"}
    assert {n.removeprefix("/cxr/settings/") for n in names if n.startswith("/cxr/settings/")} == settings


def test_context_keys_reach_the_templates(tmp_path: Path) -> None:
    """requirements_version -> MWAA's object version; interface_endpoints=none -> only the S3 gateway
    endpoint (AWS APIs through the NAT gateway)."""
    from infra.app import synth

    with environment_agnostic():
        synth(tmp_path, {"requirements_version": "abc", "interface_endpoints": "none"}, nag=False, context_file=None)
    made = read_templates(tmp_path)
    mwaa = one(made["Cxr-Orchestration"], "AWS::MWAA::Environment")
    assert mwaa["RequirementsS3ObjectVersion"] == "abc"
    endpoint = one(made["Cxr-Network"], "AWS::EC2::VPCEndpoint")
    assert endpoint["VpcEndpointType"] == "Gateway"
    one(made["Cxr-Network"], "AWS::EC2::NatGateway")


# --- monitoring -----------------------------------------------------------------------------------------------


def test_alarms_rules_dashboard_topic(templates: dict[str, Template]) -> None:
    monitoring = templates["Cxr-Monitoring"]
    topic_id, topic = next(iter(resources(monitoring, "AWS::SNS::Topic").items()))
    assert topic["KmsMasterKeyId"]
    alarms = list(resources(monitoring, "AWS::CloudWatch::Alarm").values())
    assert all(a["AlarmActions"] == [{"Ref": topic_id}] for a in alarms)
    pipeline = {a["MetricName"] for a in alarms if a.get("Namespace") == METRICS_NAMESPACE}
    assert pipeline == {"TaskFailures", "QuarantineShare", "ValidationFailures"}
    rules = resources(monitoring, "AWS::Events::Rule")
    assert {r["EventPattern"]["source"][0] for r in rules.values()} == {"aws.emr-serverless", "aws.batch", "aws.ecs"}
    assert all(r["Targets"][0]["Arn"] == {"Ref": topic_id} for r in rules.values())
    watched = {flat(a["Dimensions"][0]["Value"]) for a in alarms if a.get("Namespace") == "AWS/Events"}
    assert watched == {f"<{k}>" for k in rules}
    one(monitoring, "AWS::CloudWatch::Dashboard")


# --- the whole app: no Lambda, least-privilege IAM, one role per actor -----------------------------------------


def test_no_lambda_or_custom_resources(templates: dict[str, Template]) -> None:
    kinds = {r["Type"] for t in templates.values() for r in t["Resources"].values()}
    assert "AWS::Lambda::Function" not in kinds
    assert not {k for k in kinds if k.startswith("Custom::") or k == "AWS::CloudFormation::CustomResource"}


def test_no_wildcard_actions(templates: dict[str, Template]) -> None:
    statements = list(policy_statements(templates))
    assert len(statements) > 30
    wild = [(where, a) for where, st in statements for a in as_list(st["Action"]) if "*" in a]
    assert not wild


def test_resource_star_only_for_actions_without_resource_type(templates: dict[str, Template]) -> None:
    star = [(w, st) for w, st in policy_statements(templates) if "*" in as_list(st["Resource"])]
    assert star
    assert all(set(as_list(st["Action"])) <= NO_RESOURCE_TYPE for _, st in star), star


def test_pass_role_only_to_one_service(templates: dict[str, Template]) -> None:
    passes = [st for _, st in policy_statements(templates) if "iam:PassRole" in as_list(st["Action"])]
    assert len(passes) >= 2
    for st in passes:
        assert as_list(st["Action"]) == ["iam:PassRole"]
        assert set(st.get("Condition", {}).get("StringEquals", {})) == {"iam:PassedToService"}, st


def test_github_deploy_role_trust(templates: dict[str, Template]) -> None:
    ci = templates["Cxr-Ci"]
    assert one(ci, "AWS::IAM::OIDCProvider")["ClientIdList"] == ["sts.amazonaws.com"]
    (trust,) = one(ci, "AWS::IAM::Role")["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Action"] == "sts:AssumeRoleWithWebIdentity"
    assert trust["Condition"] == {
        "StringEquals": {
            "token.actions.githubusercontent.com:aud": "sts.amazonaws.com",
            "token.actions.githubusercontent.com:sub": f"repo:{DEFAULTS.github_repo}:environment:production",
        }
    }


def test_one_role_per_actor(templates: dict[str, Template]) -> None:
    roles = {(s, name): p for s, t in templates.items() for name, p in by_name(t, "AWS::IAM::Role").items()}
    assert set(roles) == {
        ("Cxr-Network", "VpcFlowLogIAMRole"),  # CDK's flow-log delivery role: one log group, no wildcards
        ("Cxr-Compute", "EmrJobRole"),
        ("Cxr-Compute", "InferTaskRole"),
        ("Cxr-Compute", "InferExecutionRole"),
        ("Cxr-Compute", "BatchInstanceRole"),
        ("Cxr-Orchestration", "MwaaExecutionRole"),
        ("Cxr-Ci", "DeployRole"),
    }
    described = {k: p["Description"] for k, p in roles.items() if k[1] != "VpcFlowLogIAMRole"}
    assert len(set(described.values())) == len(described)  # no two actors share a role
    assert all(not p.get("ManagedPolicyArns") for p in roles.values())
