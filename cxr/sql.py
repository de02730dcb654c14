"""SQL over the lakehouse: DuckDB locally, Athena (engine v3, Trino) on AWS.

Locally, each Delta table present in the lakehouse is opened with delta-rs and registered in an
in-memory DuckDB as a lazy Arrow dataset under its table name (``tensors``, ``quarantine``,
``predictions``): a query scans only the columns it names, so the ``tensor`` bytes are read only by
queries that select them. DuckDB's own delta extension is not used (it downloads at run time).

On AWS, :func:`athena_ddl` renders the Glue/Athena DDL that registers the same tables (Athena reads the
schema from the Delta log), and :func:`athena_saved_query_sql` renders a saved query with qualified names.
Saved queries are written in the SQL subset both DuckDB and Trino accept, with ``{name}`` placeholders
for tables and parameters that are substituted as validated literals.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from lakehouse.config import Settings
from lakehouse.errors import QueryError
from lakehouse.publish import NothingPublishedError, current_versions, reader_versions
from lakehouse.storage import is_s3, normalize_uri, published_manifest_uri
from lakehouse.tables import PATHOLOGY_COLUMNS, SPECS, TABLE_NAMES

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

log = logging.getLogger(__name__)

ParamKind = Literal["number", "integer", "string"]
OutputFormat = Literal["table", "csv", "json"]
ParamValue = float | int | str

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]*$")
_PLACEHOLDER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


@dataclass(frozen=True)
class Param:
    """One parameter of a saved query."""

    name: str
    kind: ParamKind
    #: None: the parameter is required.
    default: ParamValue | None = None
    doc: str = ""
    #: allowed values of a string parameter (empty: any string).
    choices: tuple[str, ...] = ()
    #: smallest allowed value of a number or integer parameter.
    minimum: float | None = None


@dataclass(frozen=True)
class SavedQuery:
    """A named query in the DuckDB/Trino common subset, with ``{table}`` and ``{param}`` placeholders."""

    name: str
    description: str
    sql: str
    params: tuple[Param, ...] = ()

    @property
    def defaults(self) -> dict[str, ParamValue]:
        """The parameters that have defaults, with their defaults."""
        return {p.name: p.default for p in self.params if p.default is not None}


# --- saved queries -----------------------------------------------------------------------------------
_PATHOLOGIES = tuple(PATHOLOGY_COLUMNS.values())

#: predictions in long form (image_id, model_id, pathology, probability), one row per model output
#: column: a VALUES list joined with a CASE, which DuckDB and Trino both accept (no UNPIVOT).
_LONG_PREDICTIONS = (
    "SELECT p.image_id, p.model_id, k.pathology, CASE k.pathology "
    + " ".join(f"WHEN '{c}' THEN p.{c}" for c in _PATHOLOGIES)
    + " END AS probability\n  FROM {predictions} AS p\n  CROSS JOIN (VALUES "
    + ", ".join(f"('{c}')" for c in _PATHOLOGIES)
    + ") AS k (pathology)"
)

_THRESHOLD = Param(
    "threshold",
    "number",
    0.5,
    "a finding counts as positive when its probability is at or above this (0.5 = xrv's calibrated operating point)",
    minimum=0.0,
)

_SAVED = (
    SavedQuery(
        "positives_per_pathology",
        "Per model and pathology: predictions at or above the threshold (positive) and predictions that are "
        "not null (scored); one row per model x pathology.",
        f"""SELECT l.model_id, l.pathology,
  COUNT(CASE WHEN l.probability >= {{threshold}} THEN 1 END) AS positive,
  COUNT(l.probability) AS scored
FROM ({_LONG_PREDICTIONS}) AS l
GROUP BY l.model_id, l.pathology
ORDER BY l.model_id, l.pathology""",
        (_THRESHOLD,),
    ),
    SavedQuery(
        "studies_with_findings",
        "DICOM studies with at least one finding at or above the threshold, per model: images of the study "
        "with a finding, findings in all, and the highest probability.",
        f"""SELECT t.study_uid, l.model_id,
  COUNT(DISTINCT l.image_id) AS positive_images,
  COUNT(*) AS positive_findings,
  MAX(l.probability) AS max_probability
FROM ({_LONG_PREDICTIONS}) AS l
JOIN {{tensors}} AS t ON t.image_id = l.image_id
WHERE t.study_uid IS NOT NULL AND l.probability >= {{threshold}}
GROUP BY t.study_uid, l.model_id
ORDER BY t.study_uid, l.model_id""",
        (_THRESHOLD,),
    ),
    SavedQuery(
        "findings_by_view_position",
        "Per view position (null for PNG/JPEG), model and pathology: scored predictions and positives at the "
        "threshold; pathologies a model does not predict are left out.",
        f"""SELECT t.view_position, l.model_id, l.pathology,
  COUNT(*) AS scored,
  COUNT(CASE WHEN l.probability >= {{threshold}} THEN 1 END) AS positive
FROM ({_LONG_PREDICTIONS}) AS l
JOIN {{tensors}} AS t ON t.image_id = l.image_id
WHERE l.probability IS NOT NULL
GROUP BY t.view_position, l.model_id, l.pathology
ORDER BY t.view_position NULLS LAST, l.model_id, l.pathology""",
        (_THRESHOLD,),
    ),
    SavedQuery(
        "quarantine_reasons",
        "Per run, stage and error class: the number of quarantined files (most frequent first).",
        """SELECT q.run_id, q.stage, q.error_class, COUNT(*) AS files
FROM {quarantine} AS q
GROUP BY q.run_id, q.stage, q.error_class
ORDER BY q.run_id, files DESC, q.error_class""",
    ),
    SavedQuery(
        "images_per_format",
        "Per preprocessing run and source format: tensors and the bytes of their source files.",
        """SELECT t.run_id, t.source_format, COUNT(*) AS images, CAST(SUM(t.source_bytes) AS BIGINT) AS source_bytes
FROM {tensors} AS t
GROUP BY t.run_id, t.source_format
ORDER BY t.run_id, t.source_format""",
    ),
    SavedQuery(
        "prediction_coverage",
        "Per model: tensors in the lakehouse, how many of them have a prediction, and how many are missing one.",
        """SELECT m.model_id, COUNT(*) AS tensors, COUNT(p.image_id) AS predicted,
  COUNT(*) - COUNT(p.image_id) AS missing
FROM (SELECT DISTINCT model_id FROM {predictions}) AS m
CROSS JOIN {tensors} AS t
LEFT JOIN {predictions} AS p ON p.image_id = t.image_id AND p.model_id = m.model_id
GROUP BY m.model_id
ORDER BY m.model_id""",
    ),
    SavedQuery(
        "top_images",
        "The images with the highest probability of one pathology (any model), with their lineage.",
        f"""SELECT l.model_id, l.image_id, l.probability, t.study_uid, t.view_position, t.source_format, t.source_uri
FROM ({_LONG_PREDICTIONS}) AS l
JOIN {{tensors}} AS t ON t.image_id = l.image_id
WHERE l.pathology = {{pathology}} AND l.probability IS NOT NULL
ORDER BY l.probability DESC, l.image_id, l.model_id
LIMIT {{limit}}""",
        (
            Param("pathology", "string", None, "prediction column, e.g. cardiomegaly", choices=_PATHOLOGIES),
            Param("limit", "integer", 10, "rows at most", minimum=1),
        ),
    ),
    SavedQuery(
        "decisions",
        "Per model and pathology: images scored, the site threshold (latest calibration in thresholds) and the "
        "images at or above it, next to the count at a fixed threshold for comparison.",
        f"""SELECT l.model_id, l.pathology, th.threshold, th.rule,
  COUNT(*) AS scored,
  COUNT(CASE WHEN l.probability >= th.threshold THEN 1 END) AS positive_at_site_threshold,
  COUNT(CASE WHEN l.probability >= {{threshold}} THEN 1 END) AS positive_at_fixed_threshold
FROM ({_LONG_PREDICTIONS}) AS l
JOIN {{thresholds}} AS th ON th.model_id = l.model_id AND th.prediction_column = l.pathology
WHERE l.probability IS NOT NULL
GROUP BY l.model_id, l.pathology, th.threshold, th.rule
ORDER BY l.model_id, l.pathology""",
        (_THRESHOLD,),
    ),
    SavedQuery(
        "decisions_by_image",
        "One pathology's probabilities next to the site threshold and the decision it gives (positive when at or "
        "above), per image and model with a threshold, highest probability first.",
        f"""SELECT l.image_id, l.model_id, l.probability, th.threshold,
  CASE WHEN l.probability >= th.threshold THEN TRUE ELSE FALSE END AS positive
FROM ({_LONG_PREDICTIONS}) AS l
JOIN {{thresholds}} AS th ON th.model_id = l.model_id AND th.prediction_column = l.pathology
WHERE l.pathology = {{pathology}} AND l.probability IS NOT NULL
ORDER BY l.probability DESC, l.image_id, l.model_id
LIMIT {{limit}}""",
        (
            Param("pathology", "string", None, "prediction column, e.g. cardiomegaly", choices=_PATHOLOGIES),
            Param("limit", "integer", 100, "rows at most", minimum=1),
        ),
    ),
    SavedQuery(
        "evaluation_summary",
        "The latest evaluation over all images: per model and pathology AUROC with its CI, AUPRC, ECE and the "
        "operating point (highest AUROC first).",
        """SELECT e.model_id, e.pathology, e.n_pos, e.n_neg, e.n_unlabeled, e.auroc, e.auroc_ci_low, e.auroc_ci_high,
  e.auprc, e.ece, e.threshold, e.threshold_rule, e.sensitivity, e.specificity, e.null_reason
FROM {evaluation} AS e
WHERE e.slice = 'all' AND e.evaluated_at = (SELECT MAX(evaluated_at) FROM {evaluation})
ORDER BY e.auroc DESC NULLS LAST, e.model_id, e.pathology""",
    ),
    SavedQuery(
        "drift_latest",
        "The drift rows of the latest inference run checked, gated ones (PSI) first.",
        """SELECT d.run_id, d.reference_run_id, d.model_id, d.feature, d.metric, d.value, d.reference_value,
  d.threshold, d.status, d.n, d.n_reference
FROM {drift} AS d
WHERE d.computed_at = (SELECT MAX(computed_at) FROM {drift})
ORDER BY CASE d.status WHEN 'fail' THEN 0 WHEN 'pass' THEN 1 ELSE 2 END, d.model_id, d.feature, d.metric""",
    ),
)

#: the saved queries by name.
SAVED_QUERIES: dict[str, SavedQuery] = {q.name: q for q in _SAVED}


def _literal(param: Param, value: object) -> str:
    """A validated SQL literal for a parameter value (numbers checked, strings quoted)."""
    if param.kind in ("number", "integer"):
        if isinstance(value, bool):
            raise QueryError(f"parameter {param.name} must be a number, not {value!r}")
        try:
            number: float | int = int(str(value).strip()) if param.kind == "integer" else float(str(value).strip())
        except ValueError:
            kind = "an integer" if param.kind == "integer" else "a number"
            raise QueryError(f"parameter {param.name} must be {kind} (got {value!r})") from None
        if isinstance(number, float) and not math.isfinite(number):
            raise QueryError(f"parameter {param.name} must be a finite number (got {value!r})")
        if param.minimum is not None and number < param.minimum:
            raise QueryError(f"parameter {param.name} must be at least {param.minimum:g} (got {value!r})")
        # a plain decimal literal (no exponent): DECIMAL in both DuckDB and Trino, compared alike
        return str(number) if param.kind == "integer" else format(Decimal(repr(float(number))), "f")
    text = str(value)
    if param.choices and text not in param.choices:
        raise QueryError(f"parameter {param.name}={text!r} is not one of: {', '.join(param.choices)}")
    return "'" + text.replace("'", "''") + "'"


def _resolve_params(saved: SavedQuery, params: Mapping[str, object] | None) -> dict[str, str]:
    given = dict(params or {})
    known = {p.name for p in saved.params}
    unknown = sorted(set(given) - known)
    if unknown:
        accepted = ", ".join(sorted(known)) or "none"
        raise QueryError(f"saved query {saved.name} has no parameter {', '.join(unknown)} (it accepts: {accepted})")
    rendered = {}
    for p in saved.params:
        value = given.get(p.name, p.default)
        if value is None:
            raise QueryError(f"saved query {saved.name} needs --param {p.name}=VALUE ({p.doc})")
        rendered[p.name] = _literal(p, value)
    return rendered


def _get_saved(name: str) -> SavedQuery:
    try:
        return SAVED_QUERIES[name]
    except KeyError:
        raise QueryError(f"no saved query named {name!r}: choose one of {', '.join(SAVED_QUERIES)}") from None


def _substitute(template: str, values: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        return values[m.group(1)]

    return _PLACEHOLDER.sub(one, template)


def saved_query_sql(name: str, *, params: Mapping[str, object] | None = None) -> str:
    """A saved query rendered for DuckDB (bare table names), parameters substituted.

    Args:
        name: a key of :data:`SAVED_QUERIES`.
        params: parameter values (defaults fill the rest).

    Returns:
        The SQL text.

    Raises:
        QueryError: unknown query, unknown, missing or invalid parameter.
    """
    saved = _get_saved(name)
    return _substitute(saved.sql, {**{t: t for t in TABLE_NAMES}, **_resolve_params(saved, params)})


def _check_database(database: str) -> str:
    if not _IDENTIFIER.match(database):
        raise QueryError(
            f"Athena database name {database!r} is not valid: use lowercase letters, digits and underscores"
        )
    return database


def athena_saved_query_sql(name: str, *, database: str = "cxr", params: Mapping[str, object] | None = None) -> str:
    """A saved query rendered for Athena engine v3, with table names qualified by the database.

    Args:
        name: a key of :data:`SAVED_QUERIES`.
        database: the Glue database holding the tables (see :func:`athena_ddl`).
        params: parameter values (defaults fill the rest).

    Returns:
        The SQL text (no trailing semicolon).

    Raises:
        QueryError: unknown query, invalid database name, unknown, missing or invalid parameter.
    """
    db = _check_database(database)
    saved = _get_saved(name)
    tables = {t: f'"{db}"."{t}"' for t in TABLE_NAMES}
    return _substitute(saved.sql, {**tables, **_resolve_params(saved, params)})


def athena_ddl(lakehouse_uri: str, *, database: str = "cxr") -> list[str]:
    """Glue/Athena DDL declaring each table over its published version (write-audit-publish).

    Each table is a Parquet table over the symlink manifest the publish step writes
    (``<lakehouse>/_published/<table>/manifest``: the data files of the audited Delta version), so Athena
    reads only what passed the audits, and moves to the next audited version when the manifest is replaced.
    The columns come from the table contract; a table is dropped and declared again so that its columns
    follow the contract (dropping an external table deletes no data).

    Args:
        lakehouse_uri: an ``s3://bucket/prefix`` lakehouse.
        database: the Glue database to create the tables in.

    Returns:
        ``CREATE DATABASE IF NOT EXISTS``, then per table ``DROP TABLE IF EXISTS`` and ``CREATE EXTERNAL
        TABLE`` (statements without trailing semicolons; Athena runs one statement per call).

    Raises:
        QueryError: the lakehouse is not on S3, or the database name is not valid.
    """
    db = _check_database(database)
    if not is_s3(lakehouse_uri):
        raise QueryError(f"Athena reads tables on S3 only: {lakehouse_uri!r} is not an s3://bucket/prefix lakehouse")
    statements = [f"CREATE DATABASE IF NOT EXISTS `{db}`"]
    for name in TABLE_NAMES:
        location = published_manifest_uri(lakehouse_uri, name).rsplit("/", 1)[0] + "/"
        if "'" in location:
            raise QueryError(f"cannot write an Athena LOCATION for {location!r}: it contains a quote")
        columns = ",\n".join(f"  `{c.name}` {c.type}" for c in SPECS[name].columns)
        statements.append(f"DROP TABLE IF EXISTS `{db}`.`{name}`")
        statements.append(
            f"CREATE EXTERNAL TABLE `{db}`.`{name}` (\n{columns}\n)\n"
            "ROW FORMAT SERDE 'org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe'\n"
            "STORED AS INPUTFORMAT 'org.apache.hadoop.hive.ql.io.SymlinkTextInputFormat'\n"
            "OUTPUTFORMAT 'org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat'\n"
            f"LOCATION '{location}'"
        )
    return statements


# --- running queries locally -------------------------------------------------------------------------
def connect(lakehouse_uri: str, *, settings: Settings, published: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the lakehouse's tables registered as lazy Arrow datasets.

    Each table is opened at its published (audited) version (``lakehouse.publish``); tables absent from
    the lakehouse or never published are not registered. ``published=False`` opens the latest versions.

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix``.
        settings: for the S3 endpoint.
        published: False: the latest, unaudited versions.

    Returns:
        The connection; ``SHOW TABLES`` lists the tables present.

    Raises:
        QueryError: when no lakehouse is given, it holds no table at all, or nothing is published yet.
    """
    import duckdb
    from deltalake.exceptions import TableNotFoundError

    from lakehouse.delta_rs import open_table

    if not lakehouse_uri:
        raise QueryError("give --lakehouse (or set CXR_LAKEHOUSE_URI)")
    try:
        versions = reader_versions(lakehouse_uri, settings, published=published)
    except NothingPublishedError as exc:
        if current_versions(lakehouse_uri, settings):
            raise QueryError(str(exc)) from None
        versions = {}  # no table at all: said below
    con = duckdb.connect(":memory:")
    con.execute("SET python_enable_replacements = false")  # never resolve a table name to a Python variable
    con.execute("SET TimeZone = 'UTC'")
    present = []
    for name, version in versions.items():
        try:
            dataset = open_table(lakehouse_uri, SPECS[name], settings, version=version).to_pyarrow_dataset()
        except TableNotFoundError:
            log.debug("no %s table under %s", name, lakehouse_uri)
            continue
        con.register(name, dataset)
        present.append(name)
    if not present:
        con.close()
        raise QueryError(
            f"no Delta tables under {normalize_uri(lakehouse_uri)}: run `cxr preprocess` into it first "
            "(or give the right --lakehouse)"
        )
    return con


def _tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [str(r[0]) for r in con.sql("SHOW TABLES").fetchall()]


def _run(
    con: duckdb.DuckDBPyConnection, sql: str, params: Mapping[str, object] | None = None, limit: int | None = None
) -> pa.Table:
    import duckdb
    import pyarrow as pa

    try:
        rel = con.sql(sql, params=dict(params) if params else None)
        if rel is not None and limit is not None:
            rel = rel.limit(limit)  # pushed into DuckDB: only `limit` rows are ever materialised
        return rel.to_arrow_table() if rel is not None else pa.table({})
    except duckdb.CatalogException as exc:
        first = str(exc).splitlines()[0]
        if "Table with name" in first:
            first += f" Tables in this lakehouse: {', '.join(_tables(con))}"
        raise QueryError(first) from exc
    except duckdb.Error as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise QueryError(first) from exc


def query(
    lakehouse_uri: str,
    sql: str,
    *,
    settings: Settings,
    params: Mapping[str, object] | None = None,
    limit: int | None = None,
    published: bool = True,
) -> pa.Table:
    """Run SQL with DuckDB over the lakehouse's tables (``tensors``, ``quarantine``, ``predictions``).

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix``.
        sql: DuckDB SQL; several statements run in turn and the last one's rows are returned.
        settings: for the S3 endpoint.
        params: values bound to ``$name`` placeholders in the SQL (by DuckDB, never pasted into the text).
        limit: return at most this many rows (applied inside DuckDB, so memory stays bounded).
        published: False reads the latest, unaudited versions instead of the published ones.

    Returns:
        The result as an Arrow table.

    Raises:
        QueryError: bad SQL, an unknown table or column, no lakehouse.
    """
    con = connect(lakehouse_uri, settings=settings, published=published)
    try:
        return _run(con, sql, params, limit)
    finally:
        con.close()


def run_saved(
    lakehouse_uri: str,
    name: str,
    *,
    settings: Settings,
    params: Mapping[str, object] | None = None,
    limit: int | None = None,
    published: bool = True,
) -> pa.Table:
    """Run a saved query locally.

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix``.
        name: a key of :data:`SAVED_QUERIES`.
        settings: for the S3 endpoint.
        params: parameter values (defaults fill the rest).
        limit: return at most this many rows.
        published: False reads the latest, unaudited versions.

    Returns:
        The result as an Arrow table.

    Raises:
        QueryError: unknown query, bad parameters, a table the query needs is absent, no lakehouse.
    """
    sql = saved_query_sql(name, params=params)
    return query(lakehouse_uri, sql, settings=settings, limit=limit, published=published)


def _cell(value: object, arrow_type: pa.DataType, *, fmt: OutputFormat) -> object:
    import numpy as np
    import pyarrow as pa

    if value is None:
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None if fmt == "json" else str(value)
        if pa.types.is_float32(arrow_type):
            return float(str(np.float32(value)))  # the shortest repr of the stored float32
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>" if fmt == "table" else base64.b64encode(value).decode()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, list | dict) and fmt != "json":
        return json.dumps(value, default=str)
    return value


def format_result(table: pa.Table, *, fmt: OutputFormat = "table") -> str:
    """Render a result as an aligned text table, CSV (with header) or a JSON array of objects.

    Args:
        table: the rows to render.
        fmt: ``table``, ``csv`` or ``json``.

    Returns:
        The text, ending with a newline.
    """
    import pyarrow as pa

    names = table.column_names
    types = [f.type for f in table.schema]
    rows = [
        [_cell(v, t, fmt=fmt) for v, t in zip(row, types, strict=True)]
        for row in zip(*(c.to_pylist() for c in table.columns), strict=True)
    ]
    if fmt == "json":
        return json.dumps([dict(zip(names, r, strict=True)) for r in rows], indent=2, default=str) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(["" if v is None else v for v in r] for r in rows)
        return buf.getvalue()
    text = [["NULL" if v is None else str(v) for v in r] for r in rows]
    widths = [max([len(n)] + [len(r[i]) for r in text]) for i, n in enumerate(names)]
    numeric = [pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) for t in types]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric, strict=True)
        ).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in text]
    out.append(f"({table.num_rows} row{'' if table.num_rows == 1 else 's'})")
    return "\n".join(out) + "\n"
