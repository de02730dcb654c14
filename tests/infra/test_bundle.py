"""The code bundle (``python -m infra.bundle``): the wheel and the zip hold the packages and their data, MWAA's
constraints are its essential pins plus the lock, the requirements point where MWAA puts the files, and (slow,
against the package index) the requirements re-resolve for MWAA's Python with Airflow and its providers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from infra import bundle as b
from infra.versions import AIRFLOW_VERSION, MWAA_PYTHON

ROOT = Path(__file__).resolve().parents[2]
#: Package data the code reads at run time (pyproject.toml [tool.setuptools.package-data]).
PACKAGE_DATA = ("cxr/templates/report.html.j2", "cxr/log4j2.properties", "cxr/prices/aws-us-east-1.json")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> b.Bundle:
    return b.build_bundle(tmp_path_factory.mktemp("bundle"))


def _pins(path: Path) -> dict[str, str]:
    return b.read_pins(path.read_text())


def test_layout(built: b.Bundle) -> None:
    files = sorted(p.relative_to(built.root).as_posix() for p in built.root.rglob("*") if p.is_file())
    assert files == [
        "code/cli.py",
        "code/cxr.zip",
        f"code/{built.wheel.name}",
        "dags/cxr-constraints.txt",
        "dags/xray_inference_pipeline.py",
        "plugins.zip",
        "requirements.txt",
        "startup.sh",
    ]
    assert built.dag.read_bytes() == (ROOT / "dags" / "xray_inference_pipeline.py").read_bytes()
    assert built.cli.read_bytes() == (ROOT / "cxr" / "cli.py").read_bytes()


def test_wheel_holds_the_packages_and_their_data(built: b.Bundle) -> None:
    assert built.wheel.name == "cxr_lakehouse-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(built.wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read("cxr_lakehouse-0.1.0.dist-info/METADATA").decode()
    for package in b.PACKAGES:
        assert f"{package}/__init__.py" in names
    assert {"cxr/cli.py", "lakehouse/config.py", "transforms/preprocess.py", "expectations/suites.py"} <= names
    assert set(PACKAGE_DATA) <= names
    assert not {n for n in names if n.startswith(("tests/", "infra/", "dags/")) or n.endswith(".pyc")}
    assert "Provides-Extra: quality" in metadata.splitlines()


def test_packages_zip_imports_from_the_zip(built: b.Bundle) -> None:
    with zipfile.ZipFile(built.packages_zip) as zf:
        names = set(zf.namelist())
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert {f"{p}/__init__.py" for p in b.PACKAGES} | set(PACKAGE_DATA) <= names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # what spark-submit --py-files does: the zip first on the path; the modules must come from it
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import lakehouse.tables, expectations, transforms; "
        "print(lakehouse.tables.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(built.packages_zip)],
        capture_output=True,
        text=True,
        cwd=built.root,
        check=True,
    )
    assert done.stdout.strip() == f"{built.packages_zip}/lakehouse/tables.py"


def test_zip_is_reproducible(tmp_path: Path) -> None:
    first = b.zip_packages(tmp_path / "a.zip")
    second = b.zip_packages(tmp_path / "b.zip")
    assert first.read_bytes() == second.read_bytes()


def test_plugins_zip_holds_the_wheel_at_its_root(built: b.Bundle) -> None:
    with zipfile.ZipFile(built.plugins) as zf:
        assert zf.namelist() == [built.wheel.name]
        assert zf.read(built.wheel.name) == built.wheel.read_bytes()


def test_requirements_point_where_mwaa_puts_the_files(built: b.Bundle) -> None:
    lines = built.requirements.read_text().splitlines()
    assert lines == [
        "-c /usr/local/airflow/dags/cxr-constraints.txt",
        f"cxr-lakehouse[quality] @ file:///usr/local/airflow/plugins/{built.wheel.name}",
        # a change of the constraints alone is a new requirements.txt: MWAA re-installs
        f"# constraints sha256 {hashlib.sha256(built.constraints.read_bytes()).hexdigest()}",
    ]
    # MWAA's DAGs folder is the bundle's dags/, plugins.zip is unpacked to /usr/local/airflow/plugins/
    constraints_at = lines[0].removeprefix("-c ")
    assert built.root / "dags" / Path(constraints_at).relative_to(b.MWAA_DAGS_DIR) == built.constraints
    assert Path(lines[1].split("file://", 1)[1]).relative_to(b.MWAA_PLUGINS_DIR).as_posix() == built.wheel.name
    # MWAA forces Airflow's own constraints (pandas 3) on a file without this flag (user_requirements.py)
    assert any(line.startswith(("-c ", "--constraint ")) for line in lines)


def test_constraints_are_the_essential_pins_then_the_lock(built: b.Bundle) -> None:
    essential = _pins(b.essential_constraints_file())
    lock = _pins(ROOT / "constraints.txt")
    merged = _pins(built.constraints)  # raises on a name pinned twice
    assert list(merged)[: len(essential)] == list(essential)
    assert merged == {**essential, **{k: v for k, v in lock.items() if k not in essential}}
    assert merged["sqlalchemy"] == "SQLAlchemy==2.0.51"
    assert merged["flask"] == "Flask==3.1.3"
    assert merged["apache-airflow"] == f"apache-airflow=={AIRFLOW_VERSION}"
    assert merged["pandas"] == lock["pandas"]
    assert int(merged["pandas"].split("==")[1].split(".")[0]) < 3


@pytest.mark.parametrize(
    ("lock", "expected"),
    [
        ("flask==3.0.0\npandas==2.3.3\n", ["Flask==3.1.3", "SQLAlchemy==2.0.51", "pandas==2.3.3"]),
        ("# lock\nsqlalchemy==2.0.51\nnumpy==2.3.5\n", ["Flask==3.1.3", "SQLAlchemy==2.0.51", "numpy==2.3.5"]),
        ("", ["Flask==3.1.3", "SQLAlchemy==2.0.51"]),
    ],
)
def test_merge_essential_wins(lock: str, expected: list[str], caplog: pytest.LogCaptureFixture) -> None:
    essential = "# MWAA\nFlask==3.1.3\nSQLAlchemy==2.0.51  # pinned\n"
    with caplog.at_level(logging.WARNING, logger="infra.bundle"):
        text = b.merge_constraints(essential, lock, header=["made by a test"])
    assert text.splitlines()[0] == "# made by a test"
    assert [line for line in text.splitlines() if not line.startswith("#")] == expected
    warned = [r.getMessage() for r in caplog.records]
    assert warned == (
        ["the lock pins flask==3.0.0, MWAA's essential constraints Flask==3.1.3: MWAA's wins"]
        if "3.0.0" in lock
        else []
    )


@pytest.mark.parametrize("line", ["pandas>=2,<3", "numpy==2.3.5; python_version < '3.12'", "-c other.txt", "pandas"])
def test_read_pins_refuses_what_is_not_a_pin(line: str) -> None:
    with pytest.raises(ValueError, match="line 2"):
        b.read_pins(f"a==1\n{line}\n")


def test_read_pins_refuses_a_name_twice() -> None:
    with pytest.raises(ValueError, match="pinned twice"):
        b.read_pins("Flask==3.1.3\nflask==3.1.2\n")


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, {"CXR_PROFILE": "aws", "CXR_EMR_MODE": "serverless"}),
        (
            {"AIRFLOW__CXR__INPUT_URI": "s3://raw/images/", "AIRFLOW__CXR__LAKEHOUSE_URI": "s3://lake/lakehouse/"},
            {
                "CXR_PROFILE": "aws",
                "CXR_EMR_MODE": "serverless",
                "CXR_INPUT_URI": "s3://raw/images/",
                "CXR_LAKEHOUSE_URI": "s3://lake/lakehouse/",
            },
        ),
        (
            {"AIRFLOW__CXR__METRICS_NAMESPACE": "CXR/Pipeline"},
            {"CXR_PROFILE": "aws", "CXR_EMR_MODE": "serverless", "CXR_METRICS_NAMESPACE": "CXR/Pipeline"},
        ),
    ],
)
def test_startup_script_exports_the_settings(built: b.Bundle, env: dict[str, str], expected: dict[str, str]) -> None:
    base = {"PATH": os.environ["PATH"], **env}
    done = subprocess.run(
        ["sh", "-c", '. "$1" && env', "sh", str(built.startup)], env=base, capture_output=True, text=True, check=True
    )
    exported = dict(line.split("=", 1) for line in done.stdout.splitlines() if line.startswith("CXR_"))
    assert exported == expected
    assert os.access(built.startup, os.X_OK)


def test_spark_env_script_needs_the_wheel(tmp_path: Path) -> None:
    """The Docker part runs only in the deploy workflow; before it, the script checks its input."""
    script = ROOT / "infra" / "mwaa" / "build_spark_env.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    (tmp_path / "code").mkdir()
    done = subprocess.run(["bash", str(script), str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert "expected exactly one cxr_lakehouse wheel" in done.stderr


#: Lock pins published on PyPI as source only: `--only-binary=:all:` (which `--platform` requires) cannot
#: take them, so the test builds their wheels first (MWAA installs the provider that needs it itself).
SDIST_ONLY = ("pyspark-client",)
#: MWAA 3.x runs on Amazon Linux 2023 (glibc 2.34), x86_64.
PLATFORMS = ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


@pytest.mark.slow
def test_requirements_resolve_for_mwaa(built: b.Bundle, tmp_path: Path) -> None:
    """MWAA's pip run, as a dry run for its Python and platform: the bundle's requirements with MWAA's
    installed base (the essential packages and the providers), under the bundle's constraints. Needs the
    package index (as `make setup` does)."""
    plugins = tmp_path / "plugins"
    with zipfile.ZipFile(built.plugins) as zf:
        zf.extractall(plugins)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        built.requirements.read_text()
        .replace(f"-c {b.MWAA_DAGS_DIR}/", f"-c {built.root / 'dags'}/")
        .replace(f"file://{b.MWAA_PLUGINS_DIR}/", f"file://{plugins}/")
    )
    assert str(b.MWAA_DAGS_DIR) not in requirements.read_text()
    lock = _pins(ROOT / "constraints.txt")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), *(lock[n] for n in SDIST_ONLY)],
        check=True,
        timeout=600,
    )
    py = MWAA_PYTHON.replace(".", "")
    report = tmp_path / "report.json"
    cmd = [
        *(sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--progress-bar", "off"),
        *("--report", str(report), "--target", str(tmp_path / "target")),
        *("--python-version", MWAA_PYTHON, "--implementation", "cp", "--abi", f"cp{py}"),
        *(arg for platform in PLATFORMS for arg in ("--platform", platform)),
        *("--only-binary=:all:", "--find-links", str(wheels)),
        *("-r", str(requirements)),
        *("-r", str(b.essential_constraints_file()), "-r", str(b.providers_file())),
    ]
    done = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=1200,
        env={**os.environ, "PIP_CONSTRAINT": ""},
    )
    assert done.returncode == 0, done.stdout[-4000:]

    installs = json.loads(report.read_text())["install"]
    resolved = {b.canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    for key, pin in {**_pins(b.essential_constraints_file()), **_pins(b.providers_file())}.items():
        assert resolved.get(key) == pin.split("==")[1], pin
    assert int(resolved["pandas"].split(".")[0]) < 3
    ours = next(i for i in installs if b.canonical(i["metadata"]["name"]) == "cxr-lakehouse")
    assert ours["download_info"]["url"] == f"file://{plugins}/{built.wheel.name}"
    assert ours["requested_extras"] == ["quality"]
    assert {"great-expectations", "duckdb", "deltalake", "jinja2"} <= set(resolved)
    # Spark runs on EMR and torch in the inference container: neither belongs on MWAA's workers
    assert not {"pyspark", "torch", "torchvision", "torchxrayvision", "onnxruntime", "delta-spark"} & set(resolved), (
        "the worker's requirements pull in Spark or torch: check the `quality` extra in pyproject.toml "
        "(great-expectations[spark] pulls pyspark)"
    )


@pytest.mark.slow
def test_startup_script_reads_unset_settings_from_ssm(built: b.Bundle, s3_endpoint: str, tmp_path: Path) -> None:
    """Settings MWAA did not pass as AIRFLOW__CXR__* are read from SSM (/cxr/settings/<NAME>, written by the
    stack) with the AWS CLI; here the CLI is a shim that makes the same get-parameter call with boto3 against
    the local moto server. A value MWAA did pass wins; a parameter that does not exist leaves the setting unset."""
    import boto3

    ssm = boto3.client("ssm", endpoint_url=s3_endpoint, region_name="us-east-1")
    ssm.put_parameter(
        Name="/cxr/settings/CXR_INPUT_URI", Value="s3://raw-from-ssm/images", Type="String", Overwrite=True
    )
    ssm.put_parameter(Name="/cxr/settings/CXR_INFER_BACKEND", Value="batch", Type="String", Overwrite=True)
    ssm.put_parameter(Name="/cxr/settings/CXR_LAKEHOUSE_URI", Value="s3://not-used/lake", Type="String", Overwrite=True)
    shim = tmp_path / "bin" / "aws"
    shim.parent.mkdir()
    shim.write_text(
        f"#!{sys.executable}\n"
        "import sys, boto3\n"
        "args = sys.argv[1:]\n"
        "assert args[:2] == ['ssm', 'get-parameter'] and '--query' in args, args\n"
        "name = args[args.index('--name') + 1]\n"
        f"client = boto3.client('ssm', endpoint_url={s3_endpoint!r}, region_name='us-east-1')\n"
        "try:\n"
        "    print(client.get_parameter(Name=name)['Parameter']['Value'])\n"
        "except client.exceptions.ParameterNotFound:\n"
        "    sys.exit(255)\n"
    )
    shim.chmod(0o755)
    env = {
        "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AIRFLOW__CXR__LAKEHOUSE_URI": "s3://lake/lakehouse",
    }
    done = subprocess.run(
        ["sh", "-c", '. "$1" && env', "sh", str(built.startup)], env=env, capture_output=True, text=True, check=True
    )
    exported = dict(line.split("=", 1) for line in done.stdout.splitlines() if line.startswith("CXR_"))
    assert exported == {
        "CXR_PROFILE": "aws",
        "CXR_EMR_MODE": "serverless",
        "CXR_INPUT_URI": "s3://raw-from-ssm/images",
        "CXR_LAKEHOUSE_URI": "s3://lake/lakehouse",  # MWAA's value, not SSM's
        "CXR_INFER_BACKEND": "batch",
    }
