"""Contracts shared by every stage: settings, storage, table schemas, the Spark session factory.

Importable without pyspark or torch (the inference container has no JVM); ``lakehouse.spark`` is the
only module that imports pyspark.
"""

__version__ = "0.1.0"
