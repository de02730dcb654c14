"""Fixtures of the infra tests: the CDK app synthesized once per session, with cdk-nag's AwsSolutions checks."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

Template = dict[str, Any]


@pytest.fixture(scope="session")
def cdk_app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The app as ``make synth`` builds it (default context, nag on), synthesized into a session tmp dir.

    Synthesis fails here on any cdk-nag finding that infra/nag.py does not acknowledge."""
    from infra.app import build_app

    with environment_agnostic():
        app = build_app(tmp_path_factory.mktemp("cdk.out"), nag=True, context_file=None)
        app.synth()
    return app


@pytest.fixture(scope="session")
def cloud_assembly_dir(cdk_app: Any) -> Path:
    """The cloud assembly directory (``*.template.json``, ``manifest.json``) of ``cdk_app``."""
    return Path(cdk_app.outdir)


@pytest.fixture(scope="session")
def templates(cloud_assembly_dir: Path) -> dict[str, Template]:
    """Every stack's CloudFormation template, by stack name (``Cxr-Storage``, ...)."""
    return read_templates(cloud_assembly_dir)


@contextmanager
def environment_agnostic() -> Iterator[None]:
    """Synthesize without a concrete account and region (as CI does), whatever the caller's shell set."""
    saved = {k: os.environ.pop(k) for k in ("CDK_DEFAULT_ACCOUNT", "CDK_DEFAULT_REGION") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def read_templates(outdir: Path) -> dict[str, Template]:
    """The templates of a cloud assembly, by stack name."""
    return {
        p.name.removesuffix(".template.json"): json.loads(p.read_text()) for p in sorted(outdir.glob("*.template.json"))
    }
