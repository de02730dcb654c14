"""cdk-nag AwsSolutions findings accepted on purpose, each with its reason (filled in as findings come)."""

from __future__ import annotations

import aws_cdk as cdk


def acknowledge(app: cdk.App) -> None:
    """Attach every accepted finding to the construct it concerns."""
    _ = app
