"""What the DAG's tasks run: the stage callables, the failure callback, the DAG id and default models.

Importing this module is cheap (no pyspark, torch, GX or boto session): every heavy import happens
inside the callable that needs it, at task run time. ``dags/xray_inference_pipeline.py`` only wires;
the operators that call these are built in :mod:`cxr.operators`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lakehouse.config import Settings, load_settings

if TYPE_CHECKING:
    from expectations.runner import ValidationReport
    from lakehouse.storage import MetricUnit

log = logging.getLogger(__name__)

DAG_ID = "xray_inference_pipeline"
DEFAULT_MODELS = ("densenet121-res224-all",)
#: the lakehouse run ids of a DAG run's preprocessing and inference: ``<prefix>-<safe_id(dag run id)>``
PREPROCESS_RUN_PREFIX = "pre"
INFER_RUN_PREFIX = "inf"


# --- stage callables (run inside Airflow tasks) ------------------------------------------------------


def new_images_waiting(input_uri: str, lakehouse_uri: str) -> bool:
    """Sensor poke: True when ``input_uri`` holds files the ``files`` ledger has no judgement for.

    A file judged before and unchanged (same path, size and mtime), whatever the outcome (new, a
    byte-identical copy, skipped, quarantined), does not count: a rerun over an unchanged folder waits,
    then skips (soft fail), instead of reprocessing. Retryable and requeued files count.
    """
    from lakehouse import ledger, storage

    settings = load_settings()
    listing = list(storage.list_files(input_uri, settings))
    if not listing:
        log.info("no files under %s yet", input_uri)
        return False
    new = len(ledger.split_listing(lakehouse_uri, listing, settings).todo)  # an Arrow join, not a dict per file
    log.info("%d of %d files under %s are new", new, len(listing), input_uri)
    return new > 0


def validate_stage(
    lakehouse_uri: str,
    tables: Sequence[str],
    *,
    run_id: str | None = None,
    models: Sequence[str] | str | None = None,
) -> dict[str, Any]:
    """Audit step: run the GX suites; raise AirflowFailException (no retry: data does not heal by
    retrying) when any expectation failed, so that no later stage runs on it: no inference on failing
    tensors, no published versions, no Athena declaration, no report.

    With ``CXR_METRICS_NAMESPACE`` set, the audit publishes the run's CloudWatch metrics first (before a
    failure is raised, so that the alarms see it): ``ValidationFailures`` and the audited run's stage
    metrics (:func:`run_metrics`). A metric that cannot be published logs a warning and fails nothing.

    Returns:
        Per-table success and the Data Docs URI (an XCom for the report and the logs).
    """
    from airflow.exceptions import AirflowFailException

    from expectations.runner import validate_lakehouse

    if isinstance(models, str):  # a rendered template: "['a', 'b']"
        import ast

        models = [str(m) for m in ast.literal_eval(models)] if models.strip() else None
    settings = load_settings()
    report = validate_lakehouse(
        lakehouse_uri,
        settings=settings,
        tables=list(tables),
        run_id=run_id,
        models=list(models or []) or None,
        pending=True,  # this run and every run not published yet: a failed run never rides along later
    )
    per_table = {name: bool(result.success) for name, result in report.tables.items()}
    summary: dict[str, Any] = {
        "success": report.success,
        "tables": per_table,
        "data_docs": report.data_docs_uri,
        "versions": report.versions,  # what the publish step may publish
    }
    log.info("validation of %s: %s (Data Docs: %s)", ", ".join(tables), summary["tables"], report.data_docs_uri)
    if settings.metrics_namespace:
        metrics: dict[str, tuple[float, MetricUnit]] = {
            "ValidationFailures": (float(validation_failures(report)), "Count")
        }
        if run_id:
            metrics.update(run_metrics(lakehouse_uri, settings, run_id=run_id, versions=report.versions))
        publish_metrics(settings, metrics)
    if not report.success:
        failed = [name for name, ok in per_table.items() if not ok]
        raise AirflowFailException(
            f"validation failed for {', '.join(failed)}: the run stops here (no publish); see {report.data_docs_uri}"
        )
    return summary


# --- CloudWatch metrics (the monitoring stack's alarms; published where CXR_METRICS_NAMESPACE is set) --


def validation_failures(report: ValidationReport) -> int:
    """The ``ValidationFailures`` metric of one audit: the GX expectations that failed, summed over the
    suites of every table it validated (0 when all passed; at least 1 when the audit failed)."""
    failed = sum(result.failed_count for result in report.tables.values())
    return failed if report.success or failed else 1


def run_metrics(
    lakehouse_uri: str, settings: Settings, *, run_id: str, versions: Mapping[str, int] | None = None
) -> dict[str, tuple[float, MetricUnit]]:
    """The stage metrics of the run an audit task audits, from the run's summaries (``runs/<run_id>*.json``).

    A preprocessing run gives ``ImagesPreprocessed`` (its new ``tensors`` rows), ``ImagesQuarantined`` and
    ``QuarantineShare``, the quarantined files over the files it saw first and did not skip, counted
    exactly as the quarantine share gate (``CXR_MAX_QUARANTINE_SHARE``) counts them
    (:func:`expectations.frames.quarantine_runs_frame`); an inference run gives ``PredictionsWritten``,
    its predictions summed over models and the shards of its newest fan-out.

    Args:
        lakehouse_uri: the lakehouse.
        settings: for the storage endpoint.
        run_id: the audited run (``pre-...`` or ``inf-...``).
        versions: the table versions the audit read (the quarantine rows are read at that version).

    Returns:
        Metric name -> (value, unit); empty when the run has no summary or its summaries cannot be read
        (logged: a metric is not worth failing the task for).
    """
    import pandas as pd
    from deltalake.exceptions import DeltaError

    from expectations import frames
    from lakehouse.errors import StorageError
    from lakehouse.runs import InferRun, PreprocessRun, RunRecord, newest_fanout, read_summaries
    from lakehouse.tables import QUARANTINE

    metrics: dict[str, tuple[float, MetricUnit]] = {}
    try:
        records = read_summaries(lakehouse_uri, settings, kind=RunRecord, run_id=run_id)
        preprocess = [r for r in records if isinstance(r, PreprocessRun)]
        if preprocess:
            latest = max(preprocess, key=lambda r: r.mtime_ms)  # one file per run: a retry rewrites it
            quarantine = frames.read_rows(
                lakehouse_uri,
                QUARANTINE,
                settings,
                columns=["run_id", "stage"],
                version=(versions or {}).get("quarantine"),
                runs={run_id},
            )
            gate = frames.quarantine_runs_frame(quarantine, [latest], run_id=run_id).iloc[0]
            quarantined, share = int(gate["quarantined"]), gate["quarantine_share"]
            metrics["ImagesPreprocessed"] = (float(latest.new), "Count")
            metrics["ImagesQuarantined"] = (float(quarantined), "Count")
            if not pd.isna(share):  # NA: the run saw no file first (every file skipped or judged before)
                metrics["QuarantineShare"] = (float(share), "None")
            elif not quarantined:
                metrics["QuarantineShare"] = (0.0, "None")
        infer = newest_fanout([r for r in records if isinstance(r, InferRun)])
        if infer:
            metrics["PredictionsWritten"] = (float(sum(r.predicted for r in infer)), "Count")
    except (StorageError, DeltaError, OSError) as exc:
        log.warning("the metrics of run %s are not published: its summaries cannot be read (%s)", run_id, exc)
        return {}
    if not metrics:
        log.info("run %s has no summary: no stage metrics to publish", run_id)
    return metrics


def publish_metrics(settings: Settings, metrics: Mapping[str, tuple[float, MetricUnit]]) -> bool:
    """Publish ``metrics`` to CloudWatch in ``settings.metrics_namespace`` (nothing when it is empty).

    Returns:
        True when published; False when off, or when they could not be published: a warning is logged and
        the task goes on (a monitoring outage must not fail the pipeline).
    """
    from lakehouse import storage
    from lakehouse.errors import StorageError

    namespace = settings.metrics_namespace
    if not namespace or not metrics:
        return False
    shown = ", ".join(f"{name}={value:g}" for name, (value, _) in metrics.items())
    try:
        storage.put_metrics(namespace, metrics, settings)
    except StorageError as exc:
        log.warning("CloudWatch metrics NOT published (%s); the task goes on: %s", shown, exc)
        return False
    log.info("published CloudWatch metrics to %s: %s", namespace, shown)
    return True


# --- the fan-out of inference ------------------------------------------------------------------------


def images_to_score(
    lakehouse_uri: str, settings: Settings, models: Sequence[str], *, allow_untrained: bool = False
) -> int:
    """The predictions an inference run over ``models`` would write: for each model, the ``tensors`` rows
    without a ``predictions`` row of that model (a stand-in's id, ``<model>+untrained-random-init``,
    counts as scored when ``allow_untrained``). Reads the ``image_id`` column of ``tensors`` and the
    ``image_id`` and ``model_id`` columns of ``predictions`` only: O(ids), never a tensor byte.

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix`` holding the Delta tables.
        settings: for the S3 endpoint.
        models: the run's model ids (xrv weights names).
        allow_untrained: the run may write a random-init stand-in's rows.

    Returns:
        Image-model pairs lacking a prediction (0 when there is no ``tensors`` table).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake.exceptions import TableNotFoundError

    from lakehouse.delta_rs import read_arrow
    from lakehouse.tables import PREDICTIONS, TENSORS, UNTRAINED_SUFFIX

    try:
        ids = read_arrow(lakehouse_uri, TENSORS, settings, columns=["image_id"]).column("image_id")
    except TableNotFoundError:
        return 0
    try:
        done = read_arrow(lakehouse_uri, PREDICTIONS, settings, columns=["image_id", "model_id"])
    except TableNotFoundError:
        return len(ids) * len(models)
    total = 0
    for model in dict.fromkeys(models):
        names = pa.array([model, model + UNTRAINED_SUFFIX] if allow_untrained else [model], type=pa.string())
        scored = done.filter(pc.is_in(done.column("model_id"), value_set=names)).column("image_id")
        total += len(ids) - int(pc.sum(pc.is_in(ids, value_set=pc.unique(scored))).as_py() or 0)
    return total


def shard_count(
    to_score: int,
    *,
    requested: int,
    per_task: int,
    max_shards: int,
    cores: int | None = None,
    threads_per_task: int = 1,
) -> int:
    """How many shard tasks an inference run fans out to.

    Args:
        to_score: predictions to write (:func:`images_to_score`).
        requested: the ``infer_shards`` Param; 0 = auto: one task per ``per_task`` predictions.
        per_task: ``CXR_INFER_IMAGES_PER_TASK``.
        max_shards: ``CXR_INFER_MAX_SHARDS``: the most tasks, requested or not.
        cores: the machine's cores when the shards share it (local profile); None on AWS.
        threads_per_task: ``CXR_INFER_THREADS_PER_TASK``: local shards are capped at ``cores // this``.

    Returns:
        At least 1 (a run with nothing to score still runs one task, which writes its summary).
    """
    n = requested if requested > 0 else -(-to_score // per_task)
    n = min(n, max_shards)
    if cores is not None:
        n = min(n, cores // threads_per_task)
    return max(n, 1)


def local_cores() -> int:
    """The cores this process may run on (its CPU affinity; ``os.cpu_count()`` where there is none)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def infer_arguments(params: Mapping[str, Any], *, lakehouse_uri: str, run_id: str, shard: str | None) -> list[str]:
    """The arguments of one ``cxr infer`` call (after ``infer``; the inference image's ENTRYPOINT is
    ``cxr infer``): the lakehouse, run id, the run's models and flags from the DAG's params, the shard.

    Args:
        params: the run's params (``models``, ``allow_untrained``, ``weights_dir``, ``thresholds``).
        lakehouse_uri: the lakehouse.
        run_id: the inference run id, the same for every shard.
        shard: ``i/N``; None for one unsharded task.
    """
    args = ["--lakehouse", lakehouse_uri, "--run-id", run_id, "--no-progress"]
    args.append("--model=" + ",".join(str(m) for m in params.get("models") or DEFAULT_MODELS))
    if params.get("allow_untrained"):
        args.append("--allow-untrained")
    if params.get("weights_dir"):
        args += ["--weights-dir", str(params["weights_dir"])]
    if params.get("thresholds"):
        args += ["--thresholds", str(params["thresholds"])]
    if shard is not None:
        args += ["--shard", shard]
    return args


def plan_infer_stage(
    lakehouse_uri: str, *, run_id: str, params: Mapping[str, Any], ti: Any = None
) -> list[dict[str, Any]]:
    """Plan the inference fan-out: count the predictions to write (ids only), choose N (the
    ``infer_shards`` Param, or auto from the count), and return one item per shard task, which the
    mapped ``infer`` task expands over. Every shard task scores every model of the run for its shard
    (``cxr infer --shard i/N``: the images whose stable hash falls in shard i and that lack a
    prediction), under the same run id, so downstream stages see one run.

    Args:
        lakehouse_uri: the lakehouse.
        run_id: the inference run id.
        params: the DAG run's params (``infer_shards``, ``models`` and the inference flags).
        ti: the task instance (the plan is also pushed as the XCom ``plan``, for ``cxr run``'s summary).

    Returns:
        ``[{"shard": "i/N", "args": [...cxr infer arguments...], "threads": T}, ...]``; ``threads`` is
        the intra-op threads of a local shard process (0: the job's default).
    """
    settings = load_settings()
    models = [str(m) for m in params.get("models") or DEFAULT_MODELS]
    to_score = images_to_score(lakehouse_uri, settings, models, allow_untrained=bool(params.get("allow_untrained")))
    requested = int(params.get("infer_shards") or 0)
    local = settings.profile == "local"
    cores = local_cores() if local else None
    air = settings.airflow
    n = shard_count(
        to_score,
        requested=requested,
        per_task=air.infer_images_per_task,
        max_shards=air.infer_max_shards,
        cores=cores,
        threads_per_task=air.infer_threads_per_task,
    )
    wanted = requested or -(-to_score // air.infer_images_per_task)
    if n < wanted:
        log.warning(
            "%d shards asked for; %d run (CXR_INFER_MAX_SHARDS=%d%s)",
            wanted,
            n,
            air.infer_max_shards,
            f", {cores} cores // CXR_INFER_THREADS_PER_TASK={air.infer_threads_per_task}" if cores else "",
        )
    threads = cores // n if cores is not None and n > 1 else 0
    plan = [
        {
            "shard": f"{i}/{n}",
            "args": infer_arguments(
                params, lakehouse_uri=lakehouse_uri, run_id=run_id, shard=f"{i}/{n}" if n > 1 else None
            ),
            "threads": threads,
        }
        for i in range(n)
    ]
    how = f"the infer_shards Param ({requested})" if requested else f"{air.infer_images_per_task} per task"
    log.info("%d predictions to write for %s: %d shard task(s), from %s", to_score, ", ".join(models), n, how)
    if ti is not None:
        ti.xcom_push(key="plan", value={"to_score": to_score, "shards": n, "requested": requested})
    return plan


#: the audit tasks whose validated table versions the publish step publishes
AUDIT_TASKS = ("validate_tensors", "validate_predictions", "evaluate")


def publish_stage(
    lakehouse_uri: str,
    *,
    run_id: str,
    infer_run_id: str | None = None,
    database: str = "cxr",
    ti: Any = None,
) -> dict[str, Any]:
    """Publish step (after every audit passed): move the published pointers to the versions the audits
    read (``lakehouse.publish``: ``reports/published.json`` for DuckDB, the report and the notebook; one
    symlink manifest per table for Athena) and, on s3://, return the Athena DDL.

    In the DAG the versions come from the audit tasks' results (``AUDIT_TASKS``), so a commit made after
    an audit is never published by it; called without a task instance (tests, scripts) it publishes the
    current version of every table. A failed audit fails its task, so this never runs for unaudited data.
    """
    from lakehouse.publish import publish
    from lakehouse.storage import is_s3, published_uri

    versions: dict[str, int] | None = None
    if ti is not None:
        versions = {}
        for result in ti.xcom_pull(task_ids=list(AUDIT_TASKS)) or []:
            if isinstance(result, dict):
                versions.update({str(t): int(v) for t, v in (result.get("versions") or {}).items()})
        if not versions:
            raise RuntimeError("the audit tasks returned no validated versions: nothing to publish")
    record = publish(
        lakehouse_uri, load_settings(), run_id=run_id, infer_run_id=infer_run_id or None, versions=versions
    )
    ddl: list[str] = []
    if is_s3(lakehouse_uri):
        from cxr.sql import athena_ddl

        ddl = athena_ddl(lakehouse_uri, database=database)
    return {**record.to_dict(), "uri": published_uri(lakehouse_uri), "athena_ddl": ddl}


def drift_stage(lakehouse_uri: str, *, run_id: str) -> dict[str, Any]:
    """Drift of the inference run against the reference run -> ``drift`` rows (gated by validate_predictions)."""
    from cxr.drift import compute_drift

    result = compute_drift(lakehouse_uri, settings=load_settings(), run_id=run_id)
    return {
        "reference_run_id": result.reference_run_id,
        "rows": result.rows,
        "failed": result.failed,
        "insufficient": result.insufficient,
    }


def evaluate_stage(lakehouse_uri: str, *, labels_uri: str = "", key: str = "file_name", run_id: str) -> dict[str, Any]:
    """With a ``labels_uri``: evaluate the inference run's predictions against it (``evaluation`` rows),
    then audit the evaluation table (an AirflowFailException stops the run before publish). Without one:
    nothing to do (the task succeeds, saying so)."""
    from airflow.exceptions import AirflowFailException

    from cxr.evaluate import evaluate
    from expectations.runner import validate_lakehouse

    if not labels_uri:
        log.info("no labels_uri given: nothing to evaluate")
        return {"evaluated": False}
    settings = load_settings()
    # the run under audit is not published yet: evaluate the latest versions
    summary = evaluate(lakehouse_uri, labels_uri, settings=settings, key=key, run_id=run_id, published=False)  # type: ignore[arg-type]
    report = validate_lakehouse(lakehouse_uri, settings=settings, tables=["evaluation"])
    publish_metrics(settings, {"ValidationFailures": (float(validation_failures(report)), "Count")})
    if not report.success:
        raise AirflowFailException(f"the evaluation table failed its audit: see {report.data_docs_uri}")
    return {"evaluated": True, **summary.to_dict(), "versions": report.versions}


def athena_ddl_stage(lakehouse_uri: str, *, database: str = "cxr") -> list[str]:
    """The Athena DDL statements for the lakehouse (an XCom list the AthenaOperator maps over)."""
    from cxr.sql import athena_ddl

    return athena_ddl(lakehouse_uri, database=database)


def report_stage(lakehouse_uri: str, *, run_id: str | None = None) -> str:
    """Write the HTML run report; return its URI."""
    from cxr.report import write_report

    return write_report(lakehouse_uri, settings=load_settings(), run_id=run_id or None)


def maintain_stage(lakehouse_uri: str, *, older_than_hours: float = 24.0) -> dict[str, Any]:
    """Delete orphan and expired data files and compact the small-file tables (``cxr maintain``)."""
    from lakehouse.maintain import maintain

    result = maintain(lakehouse_uri, load_settings(), older_than_hours=older_than_hours)
    log.info("maintenance freed %d bytes in %d files", result.bytes_freed, result.files_deleted)
    return result.to_dict()


def on_failure(context: Mapping[str, Any]) -> None:
    """``on_failure_callback``: one summary line a person can act on (no data, no identifiers), and the
    ``TaskFailures`` metric (1) in ``CXR_METRICS_NAMESPACE`` when that is set."""
    ti = context.get("task_instance") or context.get("ti")
    exc = context.get("exception")
    params = context.get("params") or {}
    log.error(
        "cxr pipeline task failed: dag=%s task=%s run=%s try=%s/%s error=%s: %s | lakehouse=%s | log: %s",
        getattr(ti, "dag_id", DAG_ID),
        getattr(ti, "task_id", "?"),
        context.get("run_id"),
        getattr(ti, "try_number", "?"),
        (getattr(ti, "max_tries", 0) or 0) + 1,
        type(exc).__name__ if exc else "unknown",
        (str(exc).splitlines() or [""])[0][:300] if exc else "",
        params.get("lakehouse_uri"),
        getattr(ti, "log_url", ""),
    )
    # the alarm on DAG task failures (infra/monitoring.py) watches this metric
    try:
        settings = load_settings()
    except Exception as exc:  # the callback must not raise: the failure it reports is the one that matters
        log.warning("TaskFailures metric NOT published: settings unreadable: %s", exc)
        return
    publish_metrics(settings, {"TaskFailures": (1.0, "Count")})


def safe_id(run_id: str) -> str:
    """An Airflow run id as a lakehouse run id: letters, digits and '-' only."""
    import re

    return re.sub(r"[^A-Za-z0-9]+", "-", str(run_id)).strip("-")[:80]


def stage_run_id(prefix: str, dag_run_id: str) -> str:
    """The lakehouse run id a DAG run gives a stage (``pre-manual-2026-...``)."""
    return f"{prefix}-{safe_id(dag_run_id)}"
