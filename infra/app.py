"""The CDK app: every stack of the pipeline, wired together, with cdk-nag's AwsSolutions checks.

``build_app()`` is what ``python -m infra synth`` (``make synth``) and the tests call; the stacks are::

    Cxr-Storage        KMS key, buckets (raw, lake, code = MWAA source, logs), ECR repository, pseudonym secret
    Cxr-Network        VPC, private subnets, S3 gateway + interface endpoints, flow logs, security groups
    Cxr-Compute        EMR Serverless app + job role; ECS cluster + Fargate task; Batch GPU env/queue/job def
    Cxr-Catalog        Glue database, Athena workgroup
    Cxr-Orchestration  MWAA environment + execution role, the DAG's Variables in SSM
    Cxr-Monitoring     alarm topic, alarms, EventBridge failure rules, dashboard
    Cxr-Ci             GitHub OIDC provider + the deploy role
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import aws_cdk as cdk
import cdk_nag

from infra import nag as nags
from infra.catalog import CatalogStack
from infra.ci import CiStack
from infra.compute import ComputeStack
from infra.config import DeployConfig
from infra.monitoring import MonitoringStack
from infra.network import NetworkStack
from infra.orchestration import OrchestrationStack
from infra.storage import StorageStack

INFRA = Path(__file__).resolve().parent
CDK_OUT = INFRA / "cdk.out"
#: the deployment's choices, committed (github_repo, alarm_email, nat_gateways, ...): every synth reads them,
#: so that the deploy workflow and a person at a terminal deploy the same stacks; -c wins over the file
CONTEXT_FILE = INFRA / "context.json"
#: the stacks `make deploy` deploys first: the bucket the bundle goes to and the image repository
FOUNDATION = ("Cxr-Storage",)


def build_app(
    outdir: str | os.PathLike[str] | None = None,
    context: dict[str, Any] | None = None,
    *,
    nag: bool = True,
    context_file: Path | None = CONTEXT_FILE,
) -> cdk.App:
    """All stacks in one app; ``context`` overrides ``DeployConfig``'s defaults (see infra/config.py).

    The account and region come from ``CDK_DEFAULT_ACCOUNT``/``CDK_DEFAULT_REGION`` (set by the CDK CLI
    from the caller's credentials) when present; otherwise the templates are environment-agnostic."""
    committed = file_context(context_file) if context_file else {}
    app = cdk.App(outdir=str(outdir or CDK_OUT), context={**committed, **(context or {})})
    config = DeployConfig.from_context(app.node.try_get_context)
    account, region = os.environ.get("CDK_DEFAULT_ACCOUNT"), os.environ.get("CDK_DEFAULT_REGION")
    env = cdk.Environment(account=account, region=region) if account and region else None
    tags = {"project": "cxr", "prefix": config.prefix}

    storage = StorageStack(app, "Cxr-Storage", config=config, env=env)
    network = NetworkStack(app, "Cxr-Network", config=config, log_key=storage.key, env=env)
    compute = ComputeStack(app, "Cxr-Compute", config=config, storage=storage, network=network, env=env)
    catalog = CatalogStack(app, "Cxr-Catalog", config=config, storage=storage, env=env)
    orchestration = OrchestrationStack(
        app,
        "Cxr-Orchestration",
        config=config,
        storage=storage,
        network=network,
        compute=compute,
        catalog=catalog,
        env=env,
    )
    MonitoringStack(
        app, "Cxr-Monitoring", config=config, storage=storage, compute=compute, orchestration=orchestration, env=env
    )
    CiStack(app, "Cxr-Ci", config=config, storage=storage, env=env)
    for key, value in tags.items():
        cdk.Tags.of(app).add(key, value)
    if nag:  # cdk-nag's AwsSolutions pack: synth fails on any finding not acknowledged in infra/nag.py
        nags.acknowledge(app)
        cdk.Validations.of(app).add_plugins(cdk_nag.AwsSolutionsChecks(app))
    return app


def file_context(path: Path = CONTEXT_FILE) -> dict[str, Any]:
    """The committed deployment choices (``infra/context.json``), keys starting with ``_`` left out."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a JSON object of context keys expected")
    return {k: v for k, v in data.items() if not k.startswith("_")}


def synth(
    outdir: str | os.PathLike[str] | None = None,
    context: dict[str, Any] | None = None,
    *,
    nag: bool = True,
    context_file: Path | None = CONTEXT_FILE,
) -> cdk.cx_api.CloudAssembly:
    """Synthesize every stack's CloudFormation template into ``outdir`` (default ``infra/cdk.out``);
    ``context_file=None``: the defaults of ``DeployConfig`` (the tests), not the committed choices."""
    return build_app(outdir, context, nag=nag, context_file=context_file).synth()
