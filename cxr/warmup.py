"""The JVM class-data-sharing archive ``make setup`` records: Spark starts seconds faster afterwards."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from lakehouse.config import Settings
from lakehouse.spark import CDS_ARCHIVE, get_spark
from transforms.preprocess import run_preprocess
from transforms.sample import write_samples


def record_cds_archive(settings: Settings) -> Path | None:
    """Run a small representative job with class recording on, and install the JVM's archive.

    The JVM writes the archive while exiting, after Python has let go of it: this waits for the JVM
    process to end and then moves the archive into place atomically, so no session ever maps a
    half-written file. Used by ``make setup``.

    Returns:
        The archive's path, or None when the JVM did not write one.
    """
    tmp = Path(tempfile.mkdtemp(prefix="cxr-cds-"))
    partial = tmp / "classes.jsa"
    java_opts = f"-XX:TieredStopAtLevel=1 -XX:+UseParallelGC -XX:ArchiveClassesAtExit={partial} -Xlog:cds=off -Xlog:cds+dynamic=off"
    settings = replace(settings, spark=replace(settings.spark, java_opts=java_opts))
    try:
        write_samples(tmp / "in", count=6, include_invalid=True)
        spark = get_spark(settings, app_name="cxr-record-classes")
        proc = spark.sparkContext._gateway.proc  # type: ignore[attr-defined,union-attr]
        run_preprocess(str(tmp / "in"), str(tmp / "lake"), settings=settings, spark=spark, progress=False)
        run_preprocess(str(tmp / "in"), str(tmp / "lake"), settings=settings, spark=spark, progress=False)
        spark.stop()
        spark.sparkContext._gateway.shutdown()  # type: ignore[attr-defined,union-attr]
        if proc is not None:
            proc.stdin.close()  # the JVM exits when its stdin closes, and dumps the archive
            proc.wait(timeout=300)
        if not partial.is_file():
            return None
        partial.replace(CDS_ARCHIVE)
        return CDS_ARCHIVE
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
