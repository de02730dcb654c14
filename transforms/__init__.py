"""The Spark preprocessing job and the pure decode/normalise functions it maps over partitions."""
