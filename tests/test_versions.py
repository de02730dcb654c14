"""One set of engine versions: the AWS deployment's (infra/versions.py), the lock's, the job's and the jars'.

``lakehouse/`` is the ground floor and must not import ``infra``, so ``lakehouse/spark.py`` keeps its own
constants; these tests keep every copy equal to ``infra/versions.py``.
"""

from __future__ import annotations

import re
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from infra import versions
from lakehouse import spark as sp

ROOT = Path(__file__).resolve().parent.parent
POM_NS = {"m": "http://maven.apache.org/POM/4.0.0"}


def _locked() -> dict[str, str]:
    """name -> version of every ``name==version`` line of constraints.txt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _extra_pins(extra: str) -> dict[str, str]:
    """name -> version of the ``name==version`` requirements of one pyproject.toml extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for req in project["optional-dependencies"][extra]:
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;,]+)$", req)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def _pom() -> tuple[dict[str, str], dict[str, str]]:
    """The pom's properties, and artifactId -> version (properties substituted) of its dependencies."""
    root = ET.parse(ROOT / "jvm" / "pom.xml").getroot()
    properties = root.find("m:properties", POM_NS)
    assert properties is not None
    props = {el.tag.split("}")[1]: (el.text or "").strip() for el in properties}

    def value(text: str) -> str:
        return re.sub(r"\$\{([^}]+)\}", lambda m: props[m.group(1)], text)

    deps = {}
    for dep in root.findall("m:dependencies/m:dependency", POM_NS):
        group, artifact = (value(dep.findtext(f"m:{tag}", "", POM_NS)) for tag in ("groupId", "artifactId"))
        deps[f"{group}:{artifact}"] = value(dep.findtext("m:version", "", POM_NS))
    return props, deps


def test_spark_and_delta_agree_everywhere() -> None:
    locked, spark_extra = _locked(), _extra_pins("spark")
    assert (sp.SPARK_VERSION, sp.DELTA_VERSION) == (versions.SPARK_VERSION, versions.DELTA_VERSION)
    assert spark_extra["pyspark"] == locked["pyspark"] == versions.SPARK_VERSION
    assert spark_extra["delta-spark"] == locked["delta-spark"] == versions.DELTA_VERSION
    # the provider's pyspark-client writes into the same pyspark/ folder: it must be the same Spark
    assert _extra_pins("airflow")["pyspark-client"] == locked["pyspark-client"] == versions.SPARK_VERSION


def test_the_pom_resolves_the_jars_spark_py_names() -> None:
    _, deps = _pom()
    group, artifact, version = sp.DELTA_PACKAGE.split(":")
    assert deps[f"{group}:{artifact}"] == version == versions.DELTA_VERSION
    group, artifact, version = sp.HADOOP_AWS_PACKAGE.split(":")
    assert deps[f"{group}:{artifact}"] == version == sp.HADOOP_VERSION
    group, artifact, version = sp.AWS_SDK_PACKAGE.split(":")
    assert deps[f"{group}:{artifact}"] == version


def test_hadoop_aws_matches_the_hadoop_pyspark_bundles() -> None:
    pyspark = pytest.importorskip("pyspark")
    assert pyspark.__version__ == versions.SPARK_VERSION
    jars = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    assert [j.name for j in jars] == [f"hadoop-client-api-{sp.HADOOP_VERSION}.jar"]


def test_delta_pip_asks_for_the_jar_the_pom_resolves() -> None:
    """Machines with internet take ``configure_spark_with_delta_pip``'s coordinate: the same jar."""
    delta = pytest.importorskip("delta")
    from pyspark.sql import SparkSession

    builder = delta.configure_spark_with_delta_pip(SparkSession.builder)
    assert builder._options["spark.jars.packages"] == sp.DELTA_PACKAGE  # type: ignore[attr-defined]


def test_airflow_is_the_one_mwaa_runs() -> None:
    assert _locked()["apache-airflow"] == _extra_pins("airflow")["apache-airflow"] == versions.AIRFLOW_VERSION


def test_inference_image_runs_the_job_python() -> None:
    dockerfile = (ROOT / "inference" / "Dockerfile").read_text()
    assert re.findall(r"^ARG PYTHON_VERSION=(\S+)$", dockerfile, re.M) == [versions.JOB_PYTHON]
    assert versions.JOB_PYTHON in versions.EMR_PYTHONS
