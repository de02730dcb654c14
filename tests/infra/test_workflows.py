"""The GitHub Actions workflows: linted, pinned, and gated the way the deployment needs.

actionlint (built from source by ``infra/tools/install.sh`` into ``.tools/bin``; it also runs shellcheck on
the ``run:`` blocks where shellcheck is installed) and zizmor (the dev extra) must find nothing in
``.github/``; each is also run on a broken workflow and must report exactly its faults. The structural
checks are functions that return the problems they find, run on the real files and on copies with one
thing broken.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GITHUB = ROOT / ".github"
WORKFLOWS = GITHUB / "workflows"
INSTALL = ROOT / "infra" / "tools" / "install.sh"
NO_GO = 3  # install.sh's exit status when this machine has no Go to build actionlint with
SHA_PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
VERSION_COMMENT = re.compile(r"#\s*v\d+\.\d+\.\d+(\s|$)")
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$")

Workflow = dict[str, Any]


def load(name: str) -> Workflow:
    """A workflow parsed; PyYAML reads the key ``on`` as the boolean True, so it is put back as "on"."""
    doc: dict[Any, Any] = yaml.safe_load((WORKFLOWS / name).read_text())
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def all_uses(doc: Workflow) -> list[str]:
    """Every ``uses:`` of a parsed workflow: reusable-workflow jobs and steps."""
    found = []
    for job in doc["jobs"].values():
        if "uses" in job:
            found.append(job["uses"])
        found += [step["uses"] for step in job.get("steps", []) if "uses" in step]
    return found


def unpinned(text: str) -> list[str]:
    """The ``uses:`` of a workflow's text not pinned to a full commit SHA with a ``# vX.Y.Z`` comment.

    Local references (``./...``: this repository at the same commit) need no pin.
    """
    bad = []
    for line in text.splitlines():
        match = USES_LINE.match(line)
        if match is None or match.group(1).startswith("./"):
            continue
        ref, rest = match.groups()
        if not (SHA_PINNED.match(ref) and VERSION_COMMENT.search(rest)):
            bad.append(ref)
    return bad


def _steps(job: Workflow) -> list[Workflow]:
    return list(job.get("steps", []))


def checkout_problems(doc: Workflow) -> list[str]:
    """Checkouts that leave the job token in .git/config (``persist-credentials`` not false)."""
    return [
        f"job {name}: actions/checkout without persist-credentials: false"
        for name, job in doc["jobs"].items()
        for step in _steps(job)
        if str(step.get("uses", "")).startswith("actions/checkout@")
        and step.get("with", {}).get("persist-credentials") is not False
    ]


def ci_problems(doc: Workflow) -> list[str]:
    """What keeps ci.yml from being the CI the README promises: ``.ci/run`` on Python 3.11 and Java 17."""
    problems = []
    if not {"push", "pull_request", "workflow_call"} <= set(doc["on"]):
        problems.append("ci.yml is not run on push, pull_request and workflow_call")
    if doc.get("permissions") != {"contents": "read"}:
        problems.append("ci.yml's token is not read-only (permissions: contents: read)")
    job = doc["jobs"].get("test", {})
    if job.get("timeout-minutes") != 90:
        problems.append("the test job has no 90-minute timeout")
    steps = _steps(job)
    if not steps or steps[-1].get("run") != ".ci/run":
        problems.append("the test job does not end by running .ci/run")
    versions = {str(step["uses"]).split("@")[0]: step.get("with", {}) for step in steps if "uses" in step}
    if versions.get("actions/setup-python", {}).get("python-version") != "3.11":
        problems.append("the test job does not set up Python 3.11")
    if versions.get("actions/setup-java", {}) != {"distribution": "temurin", "java-version": "17"}:
        problems.append("the test job does not set up Temurin Java 17")
    return problems + checkout_problems(doc)


DEPLOY_PERMISSIONS = {"contents": "read", "id-token": "write"}


def deploy_problems(doc: Workflow) -> list[str]:
    """What breaks the deployment's gates: tests first, manual approval, OIDC token for the deploy job only."""
    problems = []
    if set(doc["on"]) != {"push", "workflow_dispatch"} or doc["on"]["push"] != {"branches": ["main"]}:
        problems.append("deploy.yml is not run on push to main and workflow_dispatch only")
    jobs = doc["jobs"]
    if jobs.get("test", {}).get("uses") != "./.github/workflows/ci.yml":
        problems.append("the test job does not call ci.yml")
    deploy = jobs.get("deploy", {})
    needs = deploy.get("needs", [])
    if "test" not in ([needs] if isinstance(needs, str) else needs):
        problems.append("the deploy job does not need the test job")
    if deploy.get("environment") != "production":
        problems.append("the deploy job has no environment: production (the manual approval)")
    if deploy.get("if") != "github.ref == 'refs/heads/main'":
        problems.append("the deploy job would deploy a branch other than main")
    if doc.get("permissions") != {}:
        problems.append("deploy.yml grants permissions to every job (want permissions: {})")
    for name, job in jobs.items():
        perms = job.get("permissions", {})
        if name == "deploy" and perms != DEPLOY_PERMISSIONS:
            problems.append(f"the deploy job's permissions are {perms}, not {DEPLOY_PERMISSIONS}")
        elif name != "deploy" and "id-token" in perms:
            problems.append(f"job {name} may mint an OIDC token (id-token), which only the deploy job needs")
    return problems + checkout_problems(doc)


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci_run = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make test   # the whole test suite" in readme
    assert "make test" in ci_run
    assert ci_problems(load("ci.yml")) == []


def test_deploy_is_gated() -> None:
    assert deploy_problems(load("deploy.yml")) == []


def test_deploy_steps_in_order() -> None:
    """Foundation (ECR) before the image push; the image tag is the commit SHA; bundle before deploy."""
    deploy = load("deploy.yml")["jobs"]["deploy"]
    assert deploy["env"] == {"IMAGE_TAG": "${{ github.sha }}"}
    steps = [step.get("uses", "").split("@")[0] or step["run"].strip() for step in deploy["steps"]]
    assert steps == [
        "actions/checkout",
        "actions/setup-python",
        "aws-actions/configure-aws-credentials",
        "make setup-infra",
        'make deploy-foundation INFRA_CTX="-c github_repo=$GITHUB_REPOSITORY"',
        "aws-actions/amazon-ecr-login",
        'docker build -f inference/Dockerfile -t "$REGISTRY/cxr-infer:$IMAGE_TAG" .\n'
        'docker push "$REGISTRY/cxr-infer:$IMAGE_TAG"\n'
        'docker build -f inference/Dockerfile --build-arg TORCH_VARIANT=cuda -t "$REGISTRY/cxr-infer:$IMAGE_TAG-cuda" .\n'
        'docker push "$REGISTRY/cxr-infer:$IMAGE_TAG-cuda"',
        "make bundle",  # the wheel the Spark venv installs
        "bash infra/mwaa/build_spark_env.sh infra/build",
        'make deploy IMAGE_TAG="$IMAGE_TAG" INFRA_CTX="-c github_repo=$GITHUB_REPOSITORY"',
    ]
    credentials = deploy["steps"][2]["with"]
    assert credentials == {"role-to-assume": "${{ vars.CXR_DEPLOY_ROLE_ARN }}", "aws-region": "${{ vars.AWS_REGION }}"}


def _set(path: str, value: object) -> Callable[[Workflow], None]:
    """A change to a workflow: set the key at a dotted path (None deletes it)."""

    def change(doc: Workflow) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: int | str = int(last) if isinstance(node, list) else last
        if value is None:
            del node[key]
        else:
            node[key] = value

    return change


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (_set("jobs.deploy.environment", None), "the deploy job has no environment: production (the manual approval)"),
        (
            _set("jobs.deploy.environment", "staging"),
            "the deploy job has no environment: production (the manual approval)",
        ),
        (_set("jobs.deploy.needs", []), "the deploy job does not need the test job"),
        (_set("jobs.deploy.if", None), "the deploy job would deploy a branch other than main"),
        (_set("jobs.test.uses", "./.github/workflows/other.yml"), "the test job does not call ci.yml"),
        (
            _set("permissions", {"id-token": "write"}),
            "deploy.yml grants permissions to every job (want permissions: {})",
        ),
        (
            _set("jobs.test.permissions", {"contents": "read", "id-token": "write"}),
            "job test may mint an OIDC token (id-token), which only the deploy job needs",
        ),
        (
            _set("jobs.deploy.permissions", {"contents": "write", "id-token": "write"}),
            "the deploy job's permissions are {'contents': 'write', 'id-token': 'write'}, "
            "not {'contents': 'read', 'id-token': 'write'}",
        ),
        (
            _set("jobs.deploy.steps.0.with", {}),
            "job deploy: actions/checkout without persist-credentials: false",
        ),
        (_set("on.pull_request", {}), "deploy.yml is not run on push to main and workflow_dispatch only"),
    ],
)
def test_deploy_problems_are_caught(change: Callable[[Workflow], None], problem: str) -> None:
    doc = copy.deepcopy(load("deploy.yml"))
    change(doc)
    assert deploy_problems(doc) == [problem]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (_set("jobs.test.steps.-1", None), "the test job does not end by running .ci/run"),
        (_set("permissions", {"contents": "write"}), "ci.yml's token is not read-only (permissions: contents: read)"),
        (_set("on.workflow_call", None), "ci.yml is not run on push, pull_request and workflow_call"),
        (_set("jobs.test.timeout-minutes", None), "the test job has no 90-minute timeout"),
    ],
)
def test_ci_problems_are_caught(change: Callable[[Workflow], None], problem: str) -> None:
    doc = copy.deepcopy(load("ci.yml"))
    change(doc)
    assert ci_problems(doc) == [problem]


def test_every_action_is_pinned_to_a_commit_sha() -> None:
    pins: dict[str, set[str]] = {}
    for path in sorted(WORKFLOWS.glob("*.yml")):
        text = path.read_text()
        assert unpinned(text) == [], path.name
        # the line scan saw every `uses:` the YAML holds (none hides in a flow mapping)
        assert len([line for line in text.splitlines() if USES_LINE.match(line)]) == len(all_uses(load(path.name)))
        for ref in all_uses(load(path.name)):
            action, _, sha = ref.partition("@")
            pins.setdefault(action, set()).add(sha)
    # one release per action across the workflows (Dependabot bumps them together)
    assert {action: len(shas) for action, shas in pins.items() if len(shas) > 1} == {}
    assert set(pins) == {
        "./.github/workflows/ci.yml",
        "actions/checkout",
        "actions/setup-python",
        "actions/setup-java",
        "actions/cache",
        "aws-actions/configure-aws-credentials",
        "aws-actions/amazon-ecr-login",
    }


def test_unpinned_finds_tags_and_bare_shas() -> None:
    sha = "0123456789abcdef0123456789abcdef01234567"
    text = (
        "steps:\n"
        "  - uses: actions/checkout@v4\n"
        f"  - uses: actions/cache@{sha}\n"
        f"  - uses: actions/cache@{sha[:12]} # v4.2.0\n"
        f"  - uses: actions/setup-python@{sha} # v6.2.0\n"
        "  - uses: ./.github/actions/local\n"
    )
    assert unpinned(text) == ["actions/checkout@v4", f"actions/cache@{sha}", f"actions/cache@{sha[:12]}"]


def test_dependabot_keeps_the_pins_fresh() -> None:
    config = yaml.safe_load((GITHUB / "dependabot.yml").read_text())
    [actions] = [u for u in config["updates"] if u["package-ecosystem"] == "github-actions"]
    assert actions["schedule"] == {"interval": "weekly"}
    assert actions["cooldown"]["default-days"] >= 3


# --- the linters -------------------------------------------------------------------------------------

BROKEN_WORKFLOW = """\
name: broken
on: pull_request_target
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
        with:
          ref: ${{ github.event.pull_request.head.sha }}
      - run: echo "${{ github.event.pull_request.title }}"
  deploy:
    needs: buld
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
        with:
          ref: ${{ github.shaa }}
"""
# no cooldown: a release is proposed the day it is published
BROKEN_DEPENDABOT = """\
version: 2
updates:
  - package-ecosystem: github-actions
    directory: /
    schedule:
      interval: weekly
"""


@pytest.fixture()
def broken_repo(tmp_path: Path) -> Path:
    """A .github folder with a workflow and a Dependabot config that each break rules."""
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "broken.yml").write_text(BROKEN_WORKFLOW)
    (tmp_path / ".github" / "dependabot.yml").write_text(BROKEN_DEPENDABOT)
    return tmp_path


@pytest.fixture(scope="session")
def actionlint() -> Iterator[Path]:
    """actionlint, built by infra/tools/install.sh (once; later runs find it in .tools/bin)."""
    proc = subprocess.run(["bash", str(INSTALL)], capture_output=True, text=True, timeout=900)
    if proc.returncode == NO_GO and not os.environ.get("CI"):
        pytest.skip(f"no Go to build actionlint with ({proc.stderr.strip()}); CI fails here instead")
    assert proc.returncode == 0, f"infra/tools/install.sh failed ({proc.returncode}):\n{proc.stderr}"
    yield Path(proc.stdout.strip().splitlines()[-1])


def run_actionlint(actionlint: Path, cwd: Path) -> list[tuple[str, int, str]]:
    """actionlint's errors for the workflows under cwd as (file, line, kind)."""
    files = sorted(str(p.relative_to(cwd)) for p in (cwd / ".github" / "workflows").glob("*.yml"))
    proc = subprocess.run(
        [str(actionlint), "-format", "{{json .}}", *files], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode in (0, 1), f"actionlint failed ({proc.returncode}): {proc.stderr}"
    errors = json.loads(proc.stdout) or []
    return [(Path(e["filepath"]).name, e["line"], e["kind"]) for e in errors]


@pytest.mark.slow
def test_actionlint_passes_the_workflows(actionlint: Path) -> None:
    assert run_actionlint(actionlint, ROOT) == []


@pytest.mark.slow
def test_actionlint_reports_a_broken_workflow(actionlint: Path, broken_repo: Path) -> None:
    assert run_actionlint(actionlint, broken_repo) == [
        ("broken.yml", 10, "expression"),  # the PR title expanded into the shell script
        ("broken.yml", 11, "job-needs"),  # needs a job that does not exist
        ("broken.yml", 17, "expression"),  # github.shaa
    ]


def _zizmor() -> str:
    """The zizmor of this venv (the dev extra), else the one on PATH."""
    here = Path(sys.executable).with_name("zizmor")
    found = str(here) if here.exists() else shutil.which("zizmor")
    assert found, "zizmor is not installed (make setup installs the dev extra)"
    return found


def run_zizmor(github: Path, *flags: str) -> list[tuple[str, str, str]]:
    """zizmor's findings (offline, no config file, every severity) as (audit, file, route of the finding)."""
    proc = subprocess.run(
        [_zizmor(), "--offline", "--no-config", "--no-progress", "--format", "json", *flags, str(github)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 or proc.returncode >= 10, f"zizmor failed ({proc.returncode}): {proc.stderr}"
    findings = []
    for finding in json.loads(proc.stdout):
        locations = finding["locations"]
        [primary] = [loc for loc in locations if loc["symbolic"]["kind"] == "Primary"] or locations[:1]
        symbolic = primary["symbolic"]
        route = ".".join(str(next(iter(part.values()))) for part in symbolic["route"]["route"])
        findings.append((finding["ident"], Path(symbolic["key"]["Local"]["verbatim_path"]).name, route))
    return sorted(findings)


def test_zizmor_finds_nothing() -> None:
    assert run_zizmor(GITHUB) == []


def test_zizmor_accepted_findings() -> None:
    """The inline ignores accept exactly one finding: `./` for ci.yml (actionlint rejects GitHub's `$/`)."""
    assert run_zizmor(GITHUB, "--no-ignores") == [("self-repository", "deploy.yml", "jobs.test.uses")]


def test_zizmor_reports_a_broken_workflow(broken_repo: Path) -> None:
    assert run_zizmor(broken_repo / ".github") == [
        ("artipacked", "broken.yml", "jobs.build.steps.0"),
        ("artipacked", "broken.yml", "jobs.deploy.steps.0"),
        ("dangerous-triggers", "broken.yml", "on"),
        ("dependabot-cooldown", "dependabot.yml", "updates.0.package-ecosystem"),
        ("excessive-permissions", "broken.yml", ""),  # no permissions: the default token for every job
        ("excessive-permissions", "broken.yml", "jobs.build"),
        ("excessive-permissions", "broken.yml", "jobs.deploy"),
        ("template-injection", "broken.yml", "jobs.build.steps.1.run"),
        ("unpinned-uses", "broken.yml", "jobs.build.steps.0.uses"),
        ("unpinned-uses", "broken.yml", "jobs.deploy.steps.0.uses"),
    ]
