"""What one deployment may choose, read from CDK context (``cdk.json``, ``-c key=value``, or
``python -m infra synth --context key=value``), each with a default that stands the pipeline up as is."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

#: The custom metrics the DAG publishes (lakehouse/config.py: CXR_METRICS_NAMESPACE) and the alarms watch.
METRICS_NAMESPACE = "CXR/Pipeline"

#: Where things live in the buckets: the DAG's default input and lakehouse, Athena's results.
INPUT_PREFIX = "images/"
LAKEHOUSE_PREFIX = "lakehouse/"
ATHENA_PREFIX = "athena-results/"
#: The code bucket (also MWAA's source bucket): the bundle `python -m infra.bundle` writes.
DAGS_PREFIX = "dags/"
CODE_PREFIX = "code/"
REQUIREMENTS_KEY = "requirements.txt"
PLUGINS_KEY = "plugins.zip"
STARTUP_KEY = "startup.sh"
#: Airflow Variables the DAG reads, served from SSM Parameter Store under this prefix (MWAA's secrets backend).
VARIABLES_PREFIX = "/cxr/variables"
#: the CXR_* settings MWAA's startup script exports (infra/mwaa/startup.sh), served from SSM as well
SETTINGS_PREFIX = "/cxr/settings"
CONNECTIONS_PREFIX = "/cxr/connections"
INFER_CONTAINER = "cxr-infer"
#: github_repo until a deployment names its own (``python -m infra deploy`` refuses it)
PLACEHOLDER_REPO = "example-org/cxr-lakehouse"  # the container name the DAG's EcsRunTaskOperator overrides


@dataclass(frozen=True)
class DeployConfig:
    """The deployment's choices. Every field is a context key of the same name."""

    prefix: str = "cxr"
    #: the inference image tag in ECR (tags are immutable: the deploy workflow pushes the commit SHA)
    image_tag: str = "latest"
    #: S3 object versions of the MWAA files in the code bucket (MWAA re-installs when they change);
    #: empty: the newest version (first deploy, before anything was uploaded, MWAA gets none)
    requirements_version: str = ""
    plugins_version: str = ""
    startup_version: str = ""
    #: the GitHub repository (owner/name) and environment whose workflow may assume the deploy role
    github_repo: str = PLACEHOLDER_REPO
    github_environment: str = "production"
    #: NAT gateways for egress (PyPI for MWAA's requirements, TorchXRayVision weights from GitHub); 0: none
    nat_gateways: int = 1
    #: ``all``: the interface endpoints of infra/network.py (traffic to AWS APIs stays on the AWS network);
    #: ``none``: AWS APIs through the NAT gateway (needs nat_gateways >= 1; ~$280/month less at rest)
    interface_endpoints: str = "all"
    emr_max_vcpu: int = 64
    emr_max_memory_gb: int = 256
    #: pre-initialised EMR Serverless capacity (a driver and two executors kept warm while the app runs)
    emr_prewarm: bool = False
    fargate_cpu: int = 4096
    fargate_memory_mib: int = 16384
    batch_max_vcpus: int = 64
    batch_instance_types: str = "g5.xlarge,g5.2xlarge,g6.xlarge,g6.2xlarge"
    athena_bytes_scanned_limit: int = 100 * 1024**3
    mwaa_environment_class: str = "mw1.small"
    mwaa_max_workers: int = 5
    alarm_email: str = ""
    #: where the DAG runs inference shards: ECS Fargate (``ecs``, CPU) or AWS Batch (``batch``, the GPU queue)
    infer_backend: str = "ecs"
    #: alarm when a run quarantines more than this share of its files
    max_quarantine_share: float = 0.05
    log_retention_days: int = 90

    @classmethod
    def from_context(cls, get: Any) -> DeployConfig:
        """Build from a context getter (``app.node.try_get_context``): unset keys keep their default;
        values given as strings (``-c nat_gateways=0``) are converted to the field's type."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = get(f.name)
            if raw is None:
                continue
            default = getattr(cls, f.name)
            if isinstance(default, bool):
                values[f.name] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            else:
                values[f.name] = str(raw)
        config = cls(**values)
        if "/" not in config.github_repo:
            raise ValueError(f"github_repo must be owner/name, got {config.github_repo!r}")
        if config.interface_endpoints not in ("all", "none"):
            raise ValueError(f"interface_endpoints must be all or none, got {config.interface_endpoints!r}")
        if config.interface_endpoints == "none" and config.nat_gateways < 1:
            raise ValueError("interface_endpoints=none needs a NAT gateway (nat_gateways >= 1) to reach AWS APIs")
        if config.infer_backend not in ("ecs", "batch"):
            raise ValueError(f"infer_backend must be ecs or batch, got {config.infer_backend!r}")
        # bucket names (airflow-<prefix>-<account>-<region>: 63 characters at most), MWAA's and ECR's names
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,19}", config.prefix):
            raise ValueError(f"prefix must be 1-20 of a-z, 0-9 and '-', starting with a letter; got {config.prefix!r}")
        return config
