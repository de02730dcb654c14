"""The ground floor: config, errors, storage, delta_rs, spark, tables, runs, progress.

The contracts every stage shares (settings, table specs and the tensor byte format, the lakehouse layout,
run summaries). It imports nothing above it and is importable without pyspark or torch (the inference
container has no JVM); ``lakehouse.spark`` is the only module that imports pyspark.
"""

__version__ = "0.1.0"
