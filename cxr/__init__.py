"""The application: the ``cxr`` command line, what the DAG's tasks run, its operators, the local run, the
HTML report and the SQL front end. Imports the stages (``transforms``, ``inference``, ``expectations``)
and the ground floor (``lakehouse``); nothing below imports it."""
