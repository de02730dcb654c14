"""Great Expectations suites as code for the lakehouse tables (``suites``), the frames they validate
(``frames``), and the runner behind ``cxr validate`` (``runner``).

``from expectations.runner import validate_lakehouse`` is the library entry point (write-audit-publish:
publish nothing whose ``ValidationReport.success`` is False).
"""
