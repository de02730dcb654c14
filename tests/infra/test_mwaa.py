"""The DAG tests run under the Airflow and providers MWAA installs: the venv, the lock and MWAA's pins agree."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from infra import bundle as b
from infra.versions import AIRFLOW_VERSION

ROOT = Path(__file__).resolve().parents[2]
ESSENTIAL = b.read_pins(b.essential_constraints_file().read_text())
PROVIDERS = b.read_pins(b.providers_file().read_text())
LOCK = b.read_pins((ROOT / "constraints.txt").read_text())


def _version(pin: str) -> str:
    return pin.split("==", 1)[1]


def test_mwaa_files_are_for_the_deployed_airflow() -> None:
    assert ESSENTIAL["apache-airflow"] == f"apache-airflow=={AIRFLOW_VERSION}"
    assert {"amazon", "apache-spark", "standard"} <= {k.removeprefix("apache-airflow-providers-") for k in PROVIDERS}


def test_venv_runs_mwaas_airflow_and_providers() -> None:
    assert version("apache-airflow") == AIRFLOW_VERSION
    installed = {key: version(key) for key in PROVIDERS}
    assert installed == {key: _version(pin) for key, pin in PROVIDERS.items()}


@pytest.mark.parametrize("key", sorted(PROVIDERS))
def test_lock_pins_mwaas_provider(key: str) -> None:
    assert _version(LOCK[key]) == _version(PROVIDERS[key])


@pytest.mark.parametrize("key", sorted(ESSENTIAL))
def test_lock_and_venv_agree_with_the_essential_pins(key: str) -> None:
    """A package both pin is pinned alike (MWAA would not install the lock's version); one the venv has
    (Flask, SQLAlchemy, ...) is MWAA's version, so the tests ran what MWAA runs."""
    if key in LOCK:
        assert _version(LOCK[key]) == _version(ESSENTIAL[key])
    try:
        assert version(key) == _version(ESSENTIAL[key])
    except PackageNotFoundError:
        assert key not in LOCK  # not installed locally (celery, gunicorn, ...): then the lock has no pin
