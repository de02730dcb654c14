"""The Spark session factory (the only module of ``lakehouse/`` that imports pyspark).

- Locally: ``local[*]``, Delta Lake enabled, S3A for ``s3://`` with an endpoint override for a local
  S3 server. The Delta and S3A jars come from the local Maven repository (resolved by ``make setup``
  into ``jvm/classpath.txt``), so no network is needed; without that file the standard
  ``configure_spark_with_delta_pip`` path downloads them (machines with internet).
- Under ``spark-submit`` (EMR, the Airflow SparkSubmitOperator) the session that spark-submit
  configured is used unchanged; only settings it lacks are added.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lakehouse.config import Settings
from lakehouse.tables import TableSpec

if TYPE_CHECKING:
    from pyspark.sql import SparkSession
    from pyspark.sql.types import DataType, StructType

log = logging.getLogger(__name__)

# The engines of EMR (infra/versions.py; this floor must not import infra): keep in step with jvm/pom.xml,
# the pyspark / delta-spark pins and infra/versions.py (tests/test_versions.py compares them all).
SPARK_VERSION = "4.0.2"
DELTA_VERSION = "4.0.0"
#: Delta 4.0.x is published as delta-spark_<scala>, without the Spark-binary infix of later releases
DELTA_PACKAGE = f"io.delta:delta-spark_2.13:{DELTA_VERSION}"
HADOOP_VERSION = "3.4.1"  # = the hadoop-client jars in pyspark/jars
HADOOP_AWS_PACKAGE = f"org.apache.hadoop:hadoop-aws:{HADOOP_VERSION}"
#: in place of hadoop-aws 3.4.1's AWS SDK bundle 2.24.6, whose unshaded slf4j 1.x turns Spark's own logging
#: into a no-op (aws/aws-sdk-java-v2#5108); the bundle of Hadoop 3.4.2, as in jvm/pom.xml
AWS_SDK_PACKAGE = "software.amazon.awssdk:bundle:2.29.52"
CLASSPATH_FILE = Path(__file__).resolve().parent.parent / "jvm" / "classpath.txt"
#: a JVM class-data-sharing archive of the classes a run loads (made by `make setup`): seconds off start-up
CDS_ARCHIVE = CLASSPATH_FILE.parent / "cxr-classes.jsa"


def _artifact_id(jar: Path) -> str:
    """``delta-storage-4.0.0.jar`` -> ``delta-storage`` (the name without its version)."""
    parts = jar.stem.split("-")
    for i, p in enumerate(parts):
        if p[:1].isdigit():
            return "-".join(parts[:i])
    return jar.stem


def local_jars(settings: Settings) -> list[str] | None:
    """The resolved jars Spark itself lacks, or None when ``make setup`` has not resolved them.

    Jars whose artifact Spark already ships (jackson, parquet, hadoop-client, scala-library, ...) are
    left out so Spark's own versions win.
    """
    path = Path(settings.spark.classpath_file or CLASSPATH_FILE)
    if not path.is_file():
        return None
    import pyspark

    jars = [Path(p) for p in path.read_text().strip().split(os.pathsep) if p]
    if not jars or not all(j.is_file() for j in jars):
        log.warning("%s lists jars that are missing; run `make setup` again", path)
        return None
    shipped = {_artifact_id(j) for j in (Path(pyspark.__file__).parent / "jars").glob("*.jar")}
    return [str(j) for j in jars if _artifact_id(j) not in shipped]


def _s3a_conf(settings: Settings) -> dict[str, str]:
    conf = {
        "spark.hadoop.fs.s3a.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "spark.hadoop.fs.s3a.aws.credentials.provider": (
            "software.amazon.awssdk.auth.credentials.DefaultCredentialsProvider"
        ),
        "spark.hadoop.fs.s3a.endpoint.region": settings.s3_region,
    }
    if not _on_emr():
        # On EMR s3:// is EMRFS; elsewhere map it to S3A so the same URIs work everywhere.
        conf["spark.hadoop.fs.s3.impl"] = "org.apache.hadoop.fs.s3a.S3AFileSystem"
    if settings.s3_endpoint_url:
        conf.update(
            {
                "spark.hadoop.fs.s3a.endpoint": settings.s3_endpoint_url,
                "spark.hadoop.fs.s3a.path.style.access": "true",
                "spark.hadoop.fs.s3a.connection.ssl.enabled": str(settings.s3_endpoint_url.startswith("https")).lower(),
                "spark.hadoop.fs.s3a.change.detection.mode": "none",
            }
        )
    return conf


def _on_emr() -> bool:
    return Path("/usr/lib/spark/conf/spark-defaults.conf").exists() and Path("/emr").exists()


def spark_conf(settings: Settings) -> dict[str, str]:
    """Every configuration value the pipeline sets on its session (besides the jars)."""
    conf = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.parquet.compression.codec": "zstd",
        # New tables stay readable by delta-rs and Athena: no deletion vectors, no row tracking.
        "spark.databricks.delta.properties.defaults.enableDeletionVectors": "false",
        "spark.databricks.delta.properties.defaults.enableRowTracking": "false",
        "spark.databricks.delta.retentionDurationCheck.enabled": "true",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
    }
    conf.update(_s3a_conf(settings))
    return conf


def get_spark(settings: Settings, *, app_name: str = "cxr") -> SparkSession:
    """Return the process-wide Spark session, creating it when needed.

    Args:
        settings: the pipeline settings (master, S3 endpoint).
        app_name: the Spark application name.

    Returns:
        A session with Delta Lake and S3 configured.
    """
    from pyspark.sql import SparkSession

    # Python workers must run this interpreter (the venv), not whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    conf = spark_conf(settings)
    if os.environ.get("SPARK_ENV_LOADED") or "SPARK_SUBMIT_OPTS" in os.environ or _launched_by_spark_submit():
        # spark-submit (EMR, Airflow's SparkSubmitOperator) already chose master, jars and memory.
        builder = SparkSession.builder.appName(app_name)
        for k, v in conf.items():
            builder = builder.config(k, v)
        return builder.getOrCreate()

    if (settings.spark_master or "local").startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = (
        SparkSession.builder.appName(app_name)
        .master(settings.spark_master or "local[*]")
        .config("spark.driver.memory", settings.spark.driver_memory)
        .config("spark.ui.enabled", str(settings.spark.ui).lower())
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", str(settings.spark.shuffle_partitions))
        .config("spark.python.worker.reuse", "true")
        # Delta rebuilds table state after each commit with this many shuffle partitions (default 50:
        # seconds of task overhead on a laptop for a log of a few files).
        .config("spark.databricks.delta.snapshotPartitions", str(settings.spark.delta_snapshot_partitions))
        .config("spark.driver.extraJavaOptions", _java_options(settings))
    )
    for k, v in conf.items():
        builder = builder.config(k, v)
    jars = local_jars(settings)
    if jars is not None:
        if (settings.spark_master or "local").startswith("local"):
            # one JVM: put the jars on its class path (seconds faster than shipping them with spark.jars)
            builder = builder.config("spark.driver.extraClassPath", os.pathsep.join(jars))
        else:
            builder = builder.config("spark.jars", ",".join(jars))
    else:
        from delta import configure_spark_with_delta_pip

        log.warning(
            "jvm/classpath.txt not found (run `make setup`): asking Ivy for Delta %s and %s (needs internet)",
            DELTA_VERSION,
            HADOOP_AWS_PACKAGE,
        )
        builder = configure_spark_with_delta_pip(builder, extra_packages=[HADOOP_AWS_PACKAGE, AWS_SDK_PACKAGE])
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(settings.spark.log_level)
    return spark


def _java_options(settings: Settings) -> str:
    """JVM options of a local session: quick start-up (C1 JIT, class-data-sharing archive when made).

    The heavy lifting of the job runs in Python workers and native code, so the C2 compiler's peak
    speed matters less than start-up on short jobs. ``CXR_SPARK_JAVA_OPTS`` replaces these options.
    """
    if settings.spark.java_opts:
        return settings.spark.java_opts
    opts = ["-XX:TieredStopAtLevel=1", "-XX:+UseParallelGC"]
    if CDS_ARCHIVE.is_file():
        opts += [f"-XX:SharedArchiveFile={CDS_ARCHIVE}", "-Xlog:cds=off", "-Xlog:cds+dynamic=off"]
    return " ".join(opts)


def _launched_by_spark_submit() -> bool:
    """True when this Python process was started by spark-submit (it sets PYSPARK_GATEWAY_PORT)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


# --- tables --------------------------------------------------------------------------------------------
def spark_type(type_name: str) -> DataType:
    """The Spark type of a contract type name (no SparkContext needed)."""
    from pyspark.sql import types as T

    simple = {
        "string": T.StringType(),
        "binary": T.BinaryType(),
        "int": T.IntegerType(),
        "bigint": T.LongType(),
        "float": T.FloatType(),
        "double": T.DoubleType(),
        "boolean": T.BooleanType(),
        "timestamp": T.TimestampType(),
    }
    if type_name in simple:
        return simple[type_name]
    if type_name.startswith("array<") and type_name.endswith(">"):
        return T.ArrayType(spark_type(type_name[6:-1]))
    raise ValueError(f"unsupported contract type {type_name!r}")


def spark_schema(spec: TableSpec) -> StructType:
    """The table contract as a Spark schema."""
    from pyspark.sql.types import StructField, StructType

    return StructType(
        [StructField(c.name, spark_type(c.type), c.nullable, {"comment": c.doc} if c.doc else {}) for c in spec.columns]
    )


def spark_submit_options(settings: Settings) -> dict[str, Any]:
    """What a ``spark-submit`` needs to give a local submission the same session as :func:`get_spark`:
    ``master``, ``conf``, and one of ``driver_class_path`` / ``jars`` / ``packages``.

    The jars go on the driver class path when ``make setup`` resolved them, else ``packages``
    (downloads through Ivy). On EMR none of this is needed: Delta is enabled by the cluster config.
    """
    master = settings.spark_master or "local[*]"
    opts: dict[str, Any] = {"master": master}
    jars = local_jars(settings)
    if jars is None:
        opts["packages"] = f"{DELTA_PACKAGE},{HADOOP_AWS_PACKAGE},{AWS_SDK_PACKAGE}"
    elif master.startswith("local"):
        opts["driver_class_path"] = os.pathsep.join(jars)
    else:
        opts["jars"] = ",".join(jars)
    opts["conf"] = {
        **spark_conf(settings),
        "spark.databricks.delta.snapshotPartitions": str(settings.spark.delta_snapshot_partitions),
        "spark.pyspark.python": sys.executable,
    }
    return opts


def spark_submit_env() -> dict[str, str]:
    """Environment for running the pip-installed ``spark-submit`` (SPARK_HOME = the pyspark package)."""
    import pyspark

    return {"SPARK_HOME": str(Path(pyspark.__file__).parent), "PYSPARK_PYTHON": sys.executable}
