"""The CDK app deployed into a real moto server (``moto_server`` on 127.0.0.1), shared by the moto tests.

``deploy(endpoint, templates)`` creates every stack through moto's CloudFormation, in dependency order,
so the cross-stack ``Fn::ImportValue`` exports resolve as they do on AWS. What moto's CloudFormation
cannot create is created through the service APIs from the template's own properties:

* **skipped by moto** (``No Moto CloudFormation support for ...``; the resource is absent from
  ``DescribeStackResources``, which lists an entry without ``LogicalResourceId`` in its place): the
  resource stays in the template moto gets, so the skipped set is what moto reports, and is then created
  through its API (MWAA has no moto backend at all: it is only asserted in the template tests).
  Where another resource or an output refers to a skipped one, the reference is replaced in moto's copy
  by what AWS would return: the secret's ARN, the EMR Serverless application's id and the OIDC provider's ARN come from creating
  them first through the API (moto validates release labels as ``emr-X.Y.0`` and refuses the
  ``emr-spark-X.Y.Z`` naming: the application then gets ``emr-X.Y.Z``, recorded; their properties need nothing of their own stack but the log group's name;
  the secret gets its stack's KMS key once the stack made it); an alarm's ARN is its name's.
* **moto quirks** fixed in moto's copy only: ``AWS::KMS::Key`` tags as ``TagKey``/``TagValue`` (moto's
  handler passes CloudFormation's ``Key``/``Value`` to a tagger expecting the API's names: KeyError) and
  its ``KeyPolicy`` as ``Fn::ToJsonString`` (moto stores the object, and DescribeKey fails on it);
  ``AWS::SSM::Parameter`` tags as a list (CloudFormation's are a map; moto iterates them as a list);
  ``AWS::Batch::ComputeEnvironment`` gets ``ServiceRole`` = Batch's service-linked role, what AWS uses
  when it is omitted (moto's handler requires it). moto's ``AWS::Batch::JobDefinition`` drops
  ``PlatformCapabilities`` and ``Timeout``: the template's job definition is registered again through
  the API with every property (revision 2, the newest ACTIVE one, which the DAG's Variable names; moto
  keeps ``Timeout`` but drops ``PlatformCapabilities`` of any revision after the first).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ACCOUNT = "123456789012"
REGION = "us-east-1"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
#: the deploy order: each stack after the stacks whose exports it imports
STACKS = ("Cxr-Storage", "Cxr-Network", "Cxr-Compute", "Cxr-Catalog", "Cxr-Orchestration", "Cxr-Monitoring", "Cxr-Ci")
#: what ``cdk bootstrap`` leaves in SSM: the templates' BootstrapVersion parameter reads it
BOOTSTRAP_VERSION = "/cdk-bootstrap/hnb659fds/version"
#: the zones ``cdk synth`` would have looked up into cdk.context.json for the concrete environment
CONTEXT = {f"availability-zones:account={ACCOUNT}:region={REGION}": [f"{REGION}a", f"{REGION}b", f"{REGION}c"]}
MOTO_SERVER = Path(sys.executable).with_name("moto_server")


def synth_templates(outdir: Path) -> dict[str, dict[str, Any]]:
    """Every stack's template, synthesized for the concrete account and region (as ``cdk deploy`` does)."""
    from infra.app import synth

    saved = {k: os.environ.get(k) for k in ("CDK_DEFAULT_ACCOUNT", "CDK_DEFAULT_REGION")}
    os.environ.update(CDK_DEFAULT_ACCOUNT=ACCOUNT, CDK_DEFAULT_REGION=REGION)
    try:
        synth(outdir, CONTEXT, nag=False, context_file=None)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {name: json.loads((outdir / f"{name}.template.json").read_text()) for name in STACKS}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """A ``moto_server`` process on a free port; its endpoint. Its log (moto's warnings) goes to ``log``."""
    port = free_port()
    env = {**os.environ, "AWS_DEFAULT_REGION": REGION}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out, env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited: {log.read_text()}") from None
                time.sleep(0.1)
        else:
            raise RuntimeError("moto_server did not start")
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def enforce_iam(endpoint: str) -> None:
    """From now on every request is authenticated and authorized against IAM (moto's ``reset-auth``:
    ``INITIAL_NO_AUTH_ACTION_COUNT`` = 0, the server-mode form of ``set_initial_no_auth_action_count``)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST")
    urllib.request.urlopen(request, timeout=10).close()


def client(endpoint: str, service: str, **credentials: str) -> Any:
    import boto3

    creds = credentials or CREDENTIALS
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION, **creds)


# --- CloudFormation values --------------------------------------------------------------------------
def camel(node: Any, keep: frozenset[str] = frozenset({"Properties", "Options", "Tags"})) -> Any:
    """CloudFormation's PascalCase property names as the APIs' camelCase (maps under ``keep`` as they are)."""
    if isinstance(node, dict):
        return {k[:1].lower() + k[1:]: (v if k in keep else camel(v, keep)) for k, v in node.items()}
    if isinstance(node, list):
        return [camel(v, keep) for v in node]
    return node


def substitute(node: Any, values: dict[tuple[str, str | None], Any]) -> Any:
    """``{"Ref": id}`` and ``{"Fn::GetAtt": [id, attr]}`` replaced by ``values[(id, None | attr)]``."""
    if isinstance(node, dict):
        if "Ref" in node and (node["Ref"], None) in values:
            return values[(node["Ref"], None)]
        if "Fn::GetAtt" in node and (node["Fn::GetAtt"][0], node["Fn::GetAtt"][1]) in values:
            return values[(node["Fn::GetAtt"][0], node["Fn::GetAtt"][1])]
        return {k: substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, values) for v in node]
    return node


def references(node: Any) -> set[tuple[str, str | None]]:
    """Every ``(logical id, attribute or None)`` a template fragment refers to."""
    found: set[tuple[str, str | None]] = set()
    if isinstance(node, dict):
        if "Ref" in node and isinstance(node["Ref"], str):
            found.add((node["Ref"], None))
        if "Fn::GetAtt" in node:
            found.add((node["Fn::GetAtt"][0], node["Fn::GetAtt"][1]))
        for v in node.values():
            found |= references(v)
    elif isinstance(node, list):
        for v in node:
            found |= references(v)
    return found


@dataclass
class Resolver:
    """Evaluates a template fragment against moto's state: pseudo parameters, exports, ``values``."""

    exports: dict[str, str]
    values: dict[tuple[str, str | None], Any] = field(default_factory=dict)

    def __call__(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self(v) for v in node]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            ((fn, arg),) = node.items()
            if fn == "Ref":
                pseudo = {
                    "AWS::AccountId": ACCOUNT,
                    "AWS::Region": REGION,
                    "AWS::Partition": "aws",
                    "AWS::URLSuffix": "amazonaws.com",
                }
                return pseudo[arg] if arg in pseudo else self.values[(arg, None)]
            if fn == "Fn::GetAtt":
                return self.values[(arg[0], arg[1])]
            if fn == "Fn::ImportValue":
                return self.exports[self(arg)]
            if fn == "Fn::Join":
                return arg[0].join(str(self(v)) for v in self(arg[1]))
            if fn == "Fn::Split":
                return self(arg[1]).split(arg[0])
            if fn == "Fn::Select":
                return self(arg[1])[int(arg[0])]
        return {k: self(v) for k, v in node.items()}


# --- the deployment -----------------------------------------------------------------------------------
@dataclass
class Deployment:
    """What ``deploy`` left in moto: per stack its status, outputs, resources (logical id -> physical id)
    and the resources moto's CloudFormation skipped (logical id -> type), created through the APIs."""

    endpoint: str
    status: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    physical: dict[str, dict[str, str]] = field(default_factory=dict)
    skipped: dict[str, dict[str, str]] = field(default_factory=dict)
    created: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    #: the template's EMR release label, when moto refused it (the application then has ``emr-X.Y.Z``)
    release_label_refused: str | None = None
    log: Path | None = None

    def client(self, service: str, **credentials: str) -> Any:
        return client(self.endpoint, service, **credentials)


def _moto_quirks(template: dict[str, Any], batch_service_role: str) -> dict[str, Any]:
    moto = copy.deepcopy(template)
    for resource in moto["Resources"].values():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::KMS::Key" and "Tags" in props:
            props["Tags"] = [{"TagKey": t["Key"], "TagValue": t["Value"]} for t in props["Tags"]]
        if resource["Type"] == "AWS::KMS::Key" and isinstance(props.get("KeyPolicy"), dict):
            props["KeyPolicy"] = {"Fn::ToJsonString": props["KeyPolicy"]}
        if resource["Type"] == "AWS::SSM::Parameter" and isinstance(props.get("Tags"), dict):
            props["Tags"] = [{"Key": k, "Value": v} for k, v in props["Tags"].items()]
        if resource["Type"] == "AWS::Batch::ComputeEnvironment":
            props.setdefault("ServiceRole", batch_service_role)
    return moto


def _tags(props: dict[str, Any]) -> list[dict[str, str]]:
    tags = props.get("Tags", [])
    return [{"Key": k, "Value": v} for k, v in tags.items()] if isinstance(tags, dict) else tags


def _physical_values(dep: Deployment, stack: str, template: dict[str, Any]) -> dict[tuple[str, str | None], Any]:
    """Ref and the GetAtt the post-deploy creations need, for the stack's deployed resources."""
    values: dict[tuple[str, str | None], Any] = {}
    for logical, physical in dep.physical[stack].items():
        kind = template["Resources"][logical]["Type"]
        values[(logical, None)] = physical
        if kind == "AWS::KMS::Key":
            values[(logical, "Arn")] = dep.client("kms").describe_key(KeyId=physical)["KeyMetadata"]["Arn"]
        elif kind == "AWS::S3::Bucket":
            values[(logical, "Arn")] = f"arn:aws:s3:::{physical}"
        elif kind == "AWS::EC2::SecurityGroup":
            values[(logical, "GroupId")] = physical
        elif kind == "AWS::IAM::Role":
            values[(logical, "Arn")] = dep.client("iam").get_role(RoleName=physical)["Role"]["Arn"]
    return values


def deploy(endpoint: str, templates: dict[str, dict[str, Any]]) -> Deployment:
    """Every stack into moto's CloudFormation, the skipped resources through their APIs (module docstring)."""
    dep = Deployment(endpoint)
    cfn, iam = dep.client("cloudformation"), dep.client("iam")
    dep.client("ssm").put_parameter(Name=BOOTSTRAP_VERSION, Value="30", Type="String")
    batch_role = iam.create_service_linked_role(AWSServiceName="batch.amazonaws.com")["Role"]["Arn"]
    for stack in STACKS:
        started = time.monotonic()
        template = templates[stack]
        resources = template["Resources"]
        exports = {e["Name"]: e["Value"] for e in cfn.list_exports().get("Exports", [])}
        resolve = Resolver(exports)
        subs = _pre_create(dep, stack, template, resolve)
        moto = _moto_quirks(template, batch_role)
        moto["Resources"] = substitute(moto["Resources"], subs)
        moto["Outputs"] = substitute(moto.get("Outputs", {}), subs)
        cfn.create_stack(StackName=stack, TemplateBody=json.dumps(moto), Capabilities=["CAPABILITY_NAMED_IAM"])
        described = cfn.describe_stacks(StackName=stack)["Stacks"][0]
        dep.status[stack] = described["StackStatus"]
        dep.outputs[stack] = {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}
        listed = cfn.describe_stack_resources(StackName=stack)["StackResources"]
        dep.physical[stack] = {
            r["LogicalResourceId"]: r.get("PhysicalResourceId", "") for r in listed if "LogicalResourceId" in r
        }
        dep.skipped[stack] = {k: r["Type"] for k, r in resources.items() if k not in dep.physical[stack]}
        resolve.values = {**_physical_values(dep, stack, template), **subs}
        _post_create(dep, stack, template, resolve)
        dep.seconds[stack] = time.monotonic() - started
    return dep


def _pre_create(
    dep: Deployment, stack: str, template: dict[str, Any], resolve: Resolver
) -> dict[tuple[str, str | None], Any]:
    """The skipped resources other resources or outputs refer to, created first; their references' values."""
    resources = template["Resources"]
    subs: dict[tuple[str, str | None], Any] = {}
    # Ref of a same-stack log group is its name (the EMR application's logging configuration)
    resolve.values.update(
        {(k, None): r["Properties"]["LogGroupName"] for k, r in resources.items() if r["Type"] == "AWS::Logs::LogGroup"}
    )
    for logical, resource in resources.items():
        kind, props = resource["Type"], resource.get("Properties", {})
        if kind == "AWS::SecretsManager::Secret":
            sm = dep.client("secretsmanager")
            generate = props["GenerateSecretString"]
            password = sm.get_random_password(
                PasswordLength=generate["PasswordLength"], ExcludePunctuation=generate["ExcludePunctuation"]
            )["RandomPassword"]
            arn = sm.create_secret(
                Name=props["Name"], Description=props["Description"], SecretString=password, Tags=_tags(props)
            )["ARN"]
            subs[(logical, None)] = arn
            dep.created[logical] = arn
        elif kind == "AWS::EMRServerless::Application":
            api = camel(resolve({k: v for k, v in props.items() if k != "Tags"}))
            emr = dep.client("emr-serverless")
            tags = {t["Key"]: t["Value"] for t in _tags(props)}
            try:
                app = emr.create_application(**api, clientToken=logical, tags=tags)
            except emr.exceptions.ValidationException:  # moto knows only emr-X.Y.0 labels, not emr-spark-X.Y.Z
                dep.release_label_refused = api["releaseLabel"]
                api["releaseLabel"] = "emr-" + api["releaseLabel"].rsplit("-", 1)[1]
                app = emr.create_application(**api, clientToken=logical, tags=tags)
            subs[(logical, "ApplicationId")] = app["applicationId"]
            subs[(logical, "Arn")] = app["arn"]
            dep.created[logical] = app["applicationId"]
        elif kind == "AWS::IAM::OIDCProvider":
            arn = dep.client("iam").create_open_id_connect_provider(
                Url=props["Url"],
                ClientIDList=props["ClientIdList"],
                ThumbprintList=props.get("ThumbprintList", []),
                Tags=_tags(props),
            )["OpenIDConnectProviderArn"]
            subs[(logical, "Arn")] = subs[(logical, None)] = dep.created[logical] = arn
        elif kind == "AWS::CloudWatch::Alarm":
            subs[(logical, "Arn")] = f"arn:aws:cloudwatch:{REGION}:{ACCOUNT}:alarm:{props['AlarmName']}"
    return subs


def _post_create(dep: Deployment, stack: str, template: dict[str, Any], resolve: Resolver) -> None:
    """The skipped resources nothing refers to, through their APIs; the Batch job definition in full."""
    creators: dict[str, Callable[[str, dict[str, Any]], Any]] = {
        "AWS::S3::BucketPolicy": lambda _, p: dep.client("s3").put_bucket_policy(
            Bucket=p["Bucket"], Policy=json.dumps(p["PolicyDocument"])
        ),
        "AWS::EC2::SecurityGroupEgress": lambda _, p: dep.client("ec2").authorize_security_group_egress(
            GroupId=p["GroupId"],
            IpPermissions=[
                {
                    "IpProtocol": p["IpProtocol"],
                    **({"FromPort": p["FromPort"], "ToPort": p["ToPort"]} if "FromPort" in p else {}),
                    "UserIdGroupPairs": [
                        {"GroupId": p["DestinationSecurityGroupId"], "Description": p.get("Description", "")}
                    ],
                }
            ],
        ),
        "AWS::Glue::Database": lambda _, p: dep.client("glue").create_database(
            CatalogId=p["CatalogId"], DatabaseInput=p["DatabaseInput"]
        ),
        "AWS::Athena::WorkGroup": lambda _, p: dep.client("athena").create_work_group(
            Name=p["Name"], Description=p["Description"], Configuration=p["WorkGroupConfiguration"], Tags=p["Tags"]
        ),
        "AWS::SNS::TopicPolicy": lambda _, p: [
            dep.client("sns").set_topic_attributes(
                TopicArn=topic, AttributeName="Policy", AttributeValue=json.dumps(p["PolicyDocument"])
            )
            for topic in p["Topics"]
        ],
        "AWS::CloudWatch::Alarm": lambda _, p: dep.client("cloudwatch").put_metric_alarm(**p),
    }
    resources = template["Resources"]
    for logical, kind in dep.skipped[stack].items():
        if logical in dep.created or kind == "AWS::MWAA::Environment":  # MWAA: no moto backend
            continue
        props = resolve(resources[logical].get("Properties", {}))
        dep.created[logical] = creators[kind](logical, props)
    for logical, resource in resources.items():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::SecretsManager::Secret":  # its key: made by this stack
            dep.client("secretsmanager").update_secret(
                SecretId=dep.created[logical], KmsKeyId=resolve(props["KmsKeyId"])
            )
        elif resource["Type"] == "AWS::Batch::JobDefinition":
            api = camel(resolve({k: v for k, v in props.items() if k != "Tags"}))
            registered = dep.client("batch").register_job_definition(**api, tags=props.get("Tags", {}))
            dep.created[logical] = registered["jobDefinitionArn"]


# --- fixtures (imported by the moto test modules; session-scoped: one synth, one deployment) -------------
@pytest.fixture(scope="session")
def moto_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every stack's template, synthesized once for the session (concrete account and region)."""
    return synth_templates(tmp_path_factory.mktemp("cdk-moto"))


@pytest.fixture(scope="session")
def moto_deployment(
    tmp_path_factory: pytest.TempPathFactory, moto_templates: dict[str, dict[str, Any]]
) -> Iterator[Deployment]:
    """The app deployed into a fresh moto server (no IAM enforcement); the server's log in ``log``."""
    log = tmp_path_factory.mktemp("moto-deploy") / "moto.log"
    with moto_server(log) as endpoint:
        dep = deploy(endpoint, moto_templates)
        dep.log = log
        yield dep


# --- IAM enforcement (tests/infra/test_least_privilege.py) ------------------------------------------------
def enforce_iam_auth(endpoint: str) -> None:
    """``enforce_iam`` that moto's server accepts: the count goes as a plain-text body (a form-encoded body,
    urllib's default, is parsed away by the server and reaches moto empty: HTTP 500)."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(request, timeout=10).close()


def role_logical_id(template: dict[str, Any], prefix: str) -> str:
    """The logical id of the template's one ``AWS::IAM::Role`` whose id starts with ``prefix``."""
    (found,) = [k for k, r in template["Resources"].items() if r["Type"] == "AWS::IAM::Role" and k.startswith(prefix)]
    return found


def role_policy_statements(template: dict[str, Any], role: str) -> list[dict[str, Any]]:
    """Every statement of the template's ``AWS::IAM::Policy`` resources attached to role ``role`` (logical id)."""
    return [
        statement
        for r in template["Resources"].values()
        if r["Type"] == "AWS::IAM::Policy" and {"Ref": role} in r["Properties"].get("Roles", [])
        for statement in r["Properties"]["PolicyDocument"]["Statement"]
    ]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]
