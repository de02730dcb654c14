"""Every engine version the AWS deployment runs, in one place.

The lock (``constraints.txt``) and ``pyproject.toml`` pin the same versions (a test compares them), so the
job the tests run is the job EMR runs, and the DAG is tested under the Airflow and providers MWAA installs.
"""

from __future__ import annotations

#: The newest EMR runtime (GA 2026-05-21; EMR Serverless, EC2 and EKS): Spark 4.0.2, Delta 4.0.0,
#: Python 3.11-3.13.
EMR_RELEASE_LABEL = "emr-spark-8.0.0"
SPARK_VERSION = "4.0.2"
DELTA_VERSION = "4.0.0"
EMR_PYTHONS = ("3.11", "3.12", "3.13")

#: MWAA's newest Airflow (github.com/aws/amazon-mwaa-docker-images, images/airflow/3.3.1) and its Python.
AIRFLOW_VERSION = "3.3.1"
MWAA_PYTHON = "3.12"

#: The Python of the EMR job venv and of the inference image: one that both EMR and MWAA support.
JOB_PYTHON = MWAA_PYTHON
assert JOB_PYTHON in EMR_PYTHONS
