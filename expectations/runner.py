"""Run the suites with Great Expectations, build Data Docs, write machine-readable results.

``validate_lakehouse`` is the library entry point (the Airflow DAG's audit step); ``cxr validate``
calls it too. For each table the runner builds the validated frames (:mod:`expectations.frames`: pandas
projections read with delta-rs, the tensor bytes reduced to their length while scanning), runs the
table's suites in a throw-away GX file context in a temporary folder, and writes:

- ``<lakehouse>/reports/data_docs/`` the Data Docs site (``index.html``), built locally and copied to a
  folder or uploaded to s3:// alike;
- ``<lakehouse>/reports/validation/<table>.json`` success, counts and failed expectations;
- ``<lakehouse>/reports/gx_validations/<suite>/`` the latest GX result of each suite, so Data Docs built by
  a later call that validates other tables still show every table's latest result.

What an audit reads (so that a daily run costs what it added, not what the tables hold):

- the row suites of ``tensors``, ``files`` and ``predictions`` (byte length, value range, probabilities,
  reasons) read the rows of the audited runs only (``run_id``, and in write-audit-publish mode every run
  not published yet), with a ``run_id`` filter that leaves other runs' data files unopened;
- the table-wide suites (unique keys, predictions without a tensor, tensors without a prediction) read
  the id columns of every row and compute in Arrow;
- without a run (``cxr validate`` by hand, no ``--run-id``), the row suites read every row: time grows
  with the tables, memory stays about one batch of tensors plus ~150 bytes per row of the projection.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lakehouse import storage
from lakehouse.config import Settings
from lakehouse.errors import ConfigError, CxrError, StorageError
from lakehouse.tables import (
    DIRECT_IDENTIFIERS,
    DRIFT,
    EVALUATION,
    FILES,
    PREDICTIONS,
    QUARANTINE,
    TABLE_NAMES,
    TENSORS,
    THRESHOLDS,
)

if TYPE_CHECKING:
    import great_expectations as gx
    import pandas as pd

log = logging.getLogger(__name__)

TABLES = TABLE_NAMES
#: columns whose values are never shown in a summary or a result file
SENSITIVE_COLUMNS = frozenset({*DIRECT_IDENTIFIERS, "patient_pseudonym", "site_pseudonym", "source_uri"})
#: unexpected values kept per failed expectation
EXAMPLES = 5
#: columns identifying the unexpected rows of each suite (shown instead of a row index)
_INDEX_COLUMNS: dict[str, list[str]] = {
    "tensors": ["image_id"],
    "tensors_columns": ["column_name"],
    "quarantine": ["content_sha256"],
    "quarantine_runs": ["run_id"],
    "files": ["path_key"],
    "files_keys": ["path_key"],
    "tensors_keys": ["image_id"],
    "predictions": ["image_id", "model_id"],
    "predictions_keys": ["image_id", "model_id"],
    "predictions_coverage": ["image_id", "model_id"],
    "drift": ["model_id", "feature", "metric"],
    "evaluation": ["evaluation_id", "model_id", "pathology", "slice"],  # slice_value may be a site pseudonym
    "thresholds": ["model_id", "pathology"],
}


@dataclass(frozen=True)
class FailedExpectation:
    """One expectation that did not pass."""

    suite: str
    expectation_type: str
    column: str | None
    kwargs: dict[str, Any]
    unexpected_count: int | None = None
    examples: list[Any] = field(default_factory=list)
    observed_value: Any = None
    error: str | None = None

    def label(self) -> str:
        """``expect_x(column)``."""
        return f"{self.expectation_type}({self.column})" if self.column else self.expectation_type


@dataclass(frozen=True)
class TableResult:
    """The outcome of one table's suites.

    ``rows`` is the row count of the table's first suite: for ``tensors``, ``files`` and ``predictions``
    the rows of ``audited_runs`` (the value checks), while their ``*_keys`` and coverage suites cover the
    whole table.
    """

    table: str
    success: bool
    suites: list[str]
    rows: int
    evaluated: int
    passed: int
    failed: list[FailedExpectation]
    #: the runs whose rows the row suite read (sorted); None: every row of the table (a full validation,
    #: or a table whose checks are not run-scoped). ``rows`` counts those rows.
    audited_runs: list[str] | None = None

    @property
    def failed_count(self) -> int:
        """Expectations that did not pass."""
        return len(self.failed)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``<lakehouse>/reports/validation/<table>.json``)."""
        body = asdict(self)
        body["failed_count"] = self.failed_count
        return body


@dataclass(frozen=True)
class ValidationReport:
    """What ``validate_lakehouse`` found: success only when every expectation of every table passed."""

    lakehouse_uri: str
    tables: dict[str, TableResult]
    data_docs_uri: str
    result_uris: dict[str, str]
    run_id: str | None = None
    #: the Delta version of every table validated (what a publish after this audit may publish)
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """True when every validated table passed."""
        return all(t.success for t in self.tables.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``cxr validate --json``)."""
        return {
            "success": self.success,
            "lakehouse_uri": self.lakehouse_uri,
            "run_id": self.run_id,
            "data_docs_uri": self.data_docs_uri,
            "result_uris": self.result_uris,
            "versions": self.versions,
            "tables": {name: t.to_dict() for name, t in self.tables.items()},
        }


@dataclass
class _Batch:
    """One suite and the frame it validates."""

    table: str
    suite_name: str
    #: builds the suite (GX needs its context to exist before a suite is created)
    make_suite: Callable[[], gx.ExpectationSuite]
    frame: pd.DataFrame


# --- public API -------------------------------------------------------------------------------------
def validate_lakehouse(
    lakehouse_uri: str,
    *,
    settings: Settings,
    tables: Sequence[str] | None = None,
    run_id: str | None = None,
    models: Sequence[str] | None = None,
    max_quarantine_share: float | None = None,
    pending: bool = False,
) -> ValidationReport:
    """Validate lakehouse tables with the Great Expectations suites and publish Data Docs.

    Every table is read at one version, fixed when the call starts and returned in the report
    (``versions``): the publish step publishes exactly what was audited.

    Args:
        lakehouse_uri: folder or ``s3://bucket/prefix`` holding the Delta tables.
        settings: storage endpoint, allowed tensor size, default quarantine share.
        tables: tables to validate; every table present when None.
        run_id: the run audited: the row checks of ``tensors``, ``files`` and ``predictions`` read its
            rows only (every row of a table that has none of its rows); the preprocessing run whose
            quarantine share is checked (every run when it names none) and the inference run whose models
            every tensor must have a prediction for. Without it (and without ``pending``), every row of
            every table is checked: a full validation, whose time grows with the tables.
        models: models every tensor must have a prediction for (overrides ``run_id``'s models).
        max_quarantine_share: overrides ``settings.max_quarantine_share``.
        pending: write-audit-publish mode: the run-scoped checks (row checks, quarantine share, drift)
            cover ``run_id`` and every run not published yet (so a run that failed an audit keeps failing
            it until fixed or accepted, and is never published by a later run), and no older run. The
            table-wide checks (unique keys, predictions without a tensor, coverage) always cover every row,
            on id columns only.

    Returns:
        The report: ``.success``, per-table results, where the Data Docs and result files are.

    Raises:
        CxrError: when no table or a requested table is missing, or an option is out of range.
    """
    lake = storage.normalize_uri(lakehouse_uri)
    share = settings.max_quarantine_share if max_quarantine_share is None else max_quarantine_share
    if not 0.0 <= share <= 1.0 or math.isnan(share):
        raise ConfigError(f"max quarantine share must be within [0, 1] (got {share})")
    from lakehouse.publish import accepted_runs, current_versions, pending_runs

    # the tables there are, each at the version every read below uses
    present = current_versions(lake, settings, TABLES)
    if tables is None:
        chosen = [t for t in TABLES if t in present]
        if not chosen:
            raise CxrError(
                f"no Delta table (tensors, quarantine, predictions) under {lake}: run `cxr preprocess` first"
            )
    else:
        chosen = [t for t in TABLES if t in set(tables)]
        unknown = sorted(set(tables) - set(TABLES))
        if unknown:
            raise CxrError(f"unknown table(s) {unknown}: expected some of {list(TABLES)}")
        missing = [t for t in chosen if t not in present]
        if missing:
            raise CxrError(
                f"table(s) {missing} not found under {lake} (present: {sorted(present) or 'none'}); "
                "run the stage that writes them first"
            )
    if "predictions" in chosen and "tensors" not in present:
        raise CxrError(f"validating predictions needs the tensors table, which is missing under {lake}")
    versions = {t: present[t] for t in {*chosen, *(["tensors"] if "predictions" in chosen else [])}}
    runs: dict[str, set[str]] | None = None
    if pending:
        runs = {}
        if {"tensors", "quarantine"} & set(chosen):
            preprocess = pending_runs(lake, settings, ["tensors", "quarantine"])
            runs["tensors"] = preprocess
            # a run an operator accepted past the quarantine share (cxr accept) is not checked again
            runs["quarantine_share"] = preprocess - set(accepted_runs(lake, settings, "quarantine_share"))
        if "files" in chosen:  # a run that only re-judged known files has ledger rows and nothing else
            runs["files"] = pending_runs(lake, settings, ["files"])
        if {"predictions", "drift"} & set(chosen):
            runs["predictions"] = pending_runs(lake, settings, ["predictions"])
    batches, audited = _build_batches(
        lake, settings, chosen, run_id=run_id, models=models, max_share=share, versions=versions, pending=runs
    )
    results = {
        name: replace(result, audited_runs=audited[name]) if name in audited else result
        for name, result in _run_gx(lake, settings, batches).items()
    }
    result_uris: dict[str, str] = {}
    for name, result in results.items():
        uri = storage.validation_uri(lake, name)
        body = {"lakehouse_uri": lake, "run_id": run_id, **result.to_dict()}
        storage.write_text(uri, json.dumps(body, indent=2, default=str), settings, content_type="application/json")
        result_uris[name] = uri
    report = ValidationReport(
        lakehouse_uri=lake,
        tables=results,
        data_docs_uri=storage.data_docs_index_uri(lake),
        result_uris=result_uris,
        run_id=run_id,
        versions={t: v for t, v in versions.items() if t in chosen},
    )
    log.info("validation %s; Data Docs: %s", "passed" if report.success else "FAILED", report.data_docs_uri)
    return report


# --- frames -----------------------------------------------------------------------------------------
def _audited_runs(table: str, present: set[str], *, run_id: str | None, pending: set[str] | None) -> set[str] | None:
    """The runs whose rows the row suite of ``table`` reads; None: every row.

    Write-audit-publish mode: ``run_id`` and every run of the table not published yet (possibly none).
    Otherwise ``run_id`` when the table has rows of it; every row when it has none or no run is given.
    """
    if pending is not None:
        return set(pending) | ({run_id} if run_id else set())
    if run_id is None:
        return None
    if run_id in present:
        return {run_id}
    log.info("run %s has no rows in %s: checking every row of the table", run_id, table)
    return None


def _build_batches(
    lake: str,
    settings: Settings,
    chosen: Sequence[str],
    *,
    run_id: str | None,
    models: Sequence[str] | None,
    max_share: float,
    versions: dict[str, int],
    pending: dict[str, set[str]] | None = None,
) -> tuple[list[_Batch], dict[str, list[str] | None]]:
    """The (suite, frame) pairs of the chosen tables, each read at its version in ``versions``, and the
    runs whose rows each run-scoped table's row suite read (None: every row).

    Row suites read the audited runs' rows (:func:`_audited_runs`); table-wide suites read id columns of
    every row (:mod:`expectations.frames`).
    """
    from expectations import frames, suites
    from lakehouse.delta_rs import open_table, read_arrow

    def read(spec: Any, columns: list[str] | None = None) -> Any:
        return read_arrow(lake, spec, settings, columns=columns, version=versions.get(spec.name))

    def ids_of(spec: Any, columns: list[str]) -> Any:  # an id projection of every row
        return frames.read_rows(lake, spec, settings, columns=columns, version=versions.get(spec.name))

    out: list[_Batch] = []
    audited: dict[str, list[str] | None] = {}

    def scope(table: str, ids: Any, key: str) -> set[str] | None:
        runs = _audited_runs(table, frames.run_ids(ids), run_id=run_id, pending=(pending or {}).get(key))
        audited[table] = None if runs is None else sorted(runs)
        return runs

    @cache
    def all_tensor_ids() -> Any:  # image_id and run_id of every tensor, read once
        return ids_of(TENSORS, ["image_id", "run_id"])

    if "tensors" in chosen:
        ids = all_tensor_ids()
        runs = scope("tensors", ids, "tensors")
        tensors = frames.read_tensors_frame(lake, settings, version=versions.get("tensors"), runs=runs)
        sizes = sorted({settings.resize_size, 224})
        out.append(_Batch("tensors", "tensors", partial(suites.tensors_suite, sizes=sizes), tensors))
        names = open_table(lake, TENSORS, settings, version=versions.get("tensors")).schema().to_arrow().names
        columns = frames.columns_frame(names)
        keys = frames.DIRECT_IDENTIFIER_KEYS
        out.append(
            _Batch("tensors", "tensors_columns", partial(suites.tensors_columns_suite, identifier_keys=keys), columns)
        )
        out.append(_Batch("tensors", "tensors_keys", suites.tensors_keys_suite, frames.tensors_keys_frame(ids)))
    if "quarantine" in chosen:
        quarantine = read(QUARANTINE)
        runs_frame = frames.quarantine_runs_frame(
            quarantine,
            frames.read_run_summaries(lake, settings),
            run_id=run_id,
            pending=pending["quarantine_share"] if pending is not None else None,
        )
        out.append(_Batch("quarantine", "quarantine", suites.quarantine_suite, frames.quarantine_frame(quarantine)))
        out.append(
            _Batch(
                "quarantine", "quarantine_runs", partial(suites.quarantine_runs_suite, max_share=max_share), runs_frame
            )
        )
    if "files" in chosen:
        ids = ids_of(FILES, ["source_uri", "run_id"])
        runs = scope("files", ids, "files")
        columns = ["source_uri", "outcome", "run_id", "reason_class", "image_id"]
        ledger = frames.read_rows(lake, FILES, settings, columns=columns, version=versions.get("files"), runs=runs)
        out.append(_Batch("files", "files", suites.files_suite, frames.files_frame(ledger)))
        out.append(_Batch("files", "files_keys", suites.files_keys_suite, frames.files_keys_frame(ids)))
    if "predictions" in chosen:
        ids = ids_of(PREDICTIONS, frames.PREDICTION_ID_COLUMNS)
        runs = scope("predictions", ids, "predictions")
        rows = frames.read_rows(
            lake,
            PREDICTIONS,
            settings,
            columns=frames.PREDICTION_COLUMNS,
            version=versions.get("predictions"),
            runs=runs,
        )
        out.append(_Batch("predictions", "predictions", suites.predictions_suite, frames.predictions_frame(rows)))
        known = all_tensor_ids().column("image_id")
        keys_frame = frames.predictions_keys_frame(ids, known)
        out.append(_Batch("predictions", "predictions_keys", suites.predictions_keys_suite, keys_frame))
        wanted = frames.coverage_models(ids, models=models, run_id=run_id)
        coverage = frames.coverage_frame(ids, known, wanted)
        out.append(_Batch("predictions", "predictions_coverage", suites.predictions_coverage_suite, coverage))
    if "drift" in chosen:
        infer = pending["predictions"] if pending is not None else None
        drift = frames.drift_frame(read(DRIFT), run_id, pending=infer)
        out.append(_Batch("drift", "drift", partial(suites.drift_suite, max_psi=settings.drift_max_psi), drift))
    if "evaluation" in chosen:
        evaluation = frames.evaluation_frame(read(EVALUATION))
        out.append(_Batch("evaluation", "evaluation", suites.evaluation_suite, evaluation))
    if "thresholds" in chosen:
        out.append(
            _Batch("thresholds", "thresholds", suites.thresholds_suite, frames.thresholds_frame(read(THRESHOLDS)))
        )
    return out, audited


# --- Great Expectations -----------------------------------------------------------------------------
def _run_gx(lake: str, settings: Settings, batches: Sequence[_Batch]) -> dict[str, TableResult]:
    """Run every suite on its frame in a temporary GX file context; publish Data Docs and results."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no telemetry calls from a data pipeline
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are about itself
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    per_table: dict[str, list[tuple[str, Any, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="cxr-gx-") as tmp:
        context = gx.get_context(mode="file", project_root_dir=tmp)
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        gx_root = Path(str(context.root_directory))
        store = gx_root / "uncommitted" / "validations"
        history = storage.gx_history_uri(lake)
        validated = {b.suite_name for b in batches}
        _seed_history(history, store, settings, skip=validated)
        source = context.data_sources.add_pandas("cxr_lakehouse")
        for b in batches:
            suite = context.suites.add(b.make_suite())
            asset = source.add_dataframe_asset(name=suite.name)
            definition = asset.add_batch_definition_whole_dataframe(f"{suite.name}_all_rows")
            vd = context.validation_definitions.add(
                gx.ValidationDefinition(name=suite.name, data=definition, suite=suite)
            )
            checkpoint = context.checkpoints.add(
                gx.Checkpoint(
                    name=f"cxr_{suite.name}",
                    validation_definitions=[vd],
                    actions=[],
                    result_format={
                        "result_format": "SUMMARY",
                        "partial_unexpected_count": EXAMPLES,
                        "unexpected_index_column_names": _INDEX_COLUMNS.get(suite.name, []),
                    },
                )
            )
            result = checkpoint.run(batch_parameters={"dataframe": b.frame})
            for run_result in result.run_results.values():
                per_table.setdefault(b.table, []).append((suite.name, run_result, len(b.frame)))
        context.build_data_docs()
        site = gx_root / "uncommitted" / "data_docs" / "local_site"
        storage.put_tree(site, storage.data_docs_uri(lake), settings)
        for name in sorted(validated):
            if (store / name).is_dir():
                storage.put_tree(store / name, storage.join(history, name), settings)
    return {table: _table_result(table, runs) for table, runs in per_table.items()}


def _table_result(table: str, runs: list[tuple[str, Any, int]]) -> TableResult:
    """Fold the GX results of a table's suites into one TableResult."""
    failed: list[FailedExpectation] = []
    evaluated = passed = 0
    for suite_name, run_result, _rows in runs:
        for r in run_result.results:
            evaluated += 1
            if r.success:
                passed += 1
            else:
                failed.append(_failed(suite_name, r))
    rows = runs[0][2] if runs else 0
    return TableResult(
        table=table,
        success=not failed,
        suites=[s for s, _, _ in runs],
        rows=rows,
        evaluated=evaluated,
        passed=passed,
        failed=failed,
    )


def _failed(suite_name: str, r: Any) -> FailedExpectation:
    """A FailedExpectation from a GX ExpectationValidationResult (values sanitized, identifiers redacted)."""
    cfg = r.expectation_config
    kwargs = {k: _plain(v) for k, v in dict(cfg.kwargs).items() if k != "batch_id"}
    if "column" in kwargs:
        column: str | None = str(kwargs["column"])
    elif "column_A" in kwargs:
        column = f"{kwargs['column_A']},{kwargs['column_B']}"
    elif "column_list" in kwargs:
        column = ",".join(str(c) for c in kwargs["column_list"])
    else:
        column = None
    result = dict(r.result or {})
    examples: list[Any]
    if column is not None and any(c in SENSITIVE_COLUMNS for c in column.split(",")):
        examples = ["<redacted>"] if result.get("unexpected_count") else []
    elif result.get("partial_unexpected_index_list"):
        examples = [_redact(_plain(x)) for x in result["partial_unexpected_index_list"][:EXAMPLES]]
    else:
        examples = [_plain(x) for x in (result.get("partial_unexpected_list") or [])[:EXAMPLES]]
    return FailedExpectation(
        suite=suite_name,
        expectation_type=str(cfg.type),
        column=column,
        kwargs=kwargs,
        unexpected_count=result.get("unexpected_count"),
        examples=examples,
        observed_value=_plain(result.get("observed_value")),
        error=_exception_message(r.exception_info),
    )


def _exception_message(info: Any) -> str | None:
    """The message of an exception GX caught while evaluating an expectation, if any."""
    if not isinstance(info, dict):
        return None
    candidates = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    for c in candidates:
        if c.get("raised_exception"):
            return str(c.get("exception_message") or "exception")[:500]
    return None


def _redact(value: Any) -> Any:
    """Drop the values of sensitive columns from a row identifier dict."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if k in SENSITIVE_COLUMNS else v) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    """numpy / pandas scalars and tuples -> JSON-ready Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _plain(item())
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def _seed_history(history_uri: str, store: Path, settings: Settings, *, skip: set[str]) -> None:
    """Copy the latest stored GX results of suites not validated now into the local results store."""
    from lakehouse.errors import SourceReadError

    base = storage.normalize_uri(history_uri)
    try:
        listed = list(storage.list_files(base, settings))
    except StorageError:
        return  # nothing validated before
    for f in listed:
        rel = f.uri[len(base) :].lstrip("/")
        if not rel.endswith(".json") or rel.split("/", 1)[0] in skip:
            continue
        try:
            data = storage.read_bytes(f.uri, settings)
        except SourceReadError as exc:
            log.warning("earlier validation result %s not readable (%s): left out of Data Docs", f.uri, exc)
            continue
        target = store / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
