"""The ``cxr`` command line. Each stage's heavy imports happen inside its subcommand."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a file (spark-submit cxr/cli.py): keep cxr/ off the import path
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from cxr.tasks import DEFAULT_MODELS
from lakehouse import __version__
from lakehouse.config import Settings, describe, load_settings
from lakehouse.errors import CxrError, QueryError
from lakehouse.tables import RESIZE_ENGINES, TABLE_NAMES, TENSOR_DTYPES

if TYPE_CHECKING:
    from expectations.runner import ValidationReport

log = logging.getLogger("cxr")


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False, console=_stderr())],
    )
    for noisy in ("py4j", "botocore", "boto3", "urllib3", "s3transfer", "openjpeg", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stderr():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=True)


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from transforms.preprocess import run_preprocess

    settings = load_settings().with_overrides(
        resize_size=args.size,
        resize_engine=args.resize_engine,
        tensor_dtype=args.dtype,
        max_pixels=args.max_pixels,
    )
    input_uri = args.input or settings.input_uri
    lakehouse_uri = args.lakehouse or settings.lakehouse_uri
    if not input_uri or not lakehouse_uri:
        raise CxrError("give --input and --lakehouse (or set CXR_INPUT_URI / CXR_LAKEHOUSE_URI)")
    summary = run_preprocess(
        input_uri, lakehouse_uri, settings=settings, run_id=args.run_id, progress=not args.no_progress
    )
    if args.json:
        sys.stdout.write(summary.to_json() + "\n")
        return 0
    from lakehouse.storage import run_summary_uri, table_uri
    from lakehouse.tables import FILES, QUARANTINE, TENSORS

    console = Console(soft_wrap=True)
    table = Table(show_header=False, box=None, padding=(0, 2))
    for label, value in [
        ("discovered", summary.discovered),
        ("new tensors", summary.new),
        ("already present", summary.already_present),
        ("duplicates", summary.duplicates),
        ("skipped", summary.skipped),
        ("quarantined", summary.quarantined),
        ("retryable", summary.retryable),
        ("decoded", summary.decoded),
        ("batches", summary.batches),
        ("seconds", f"{summary.seconds:.1f}"),
    ]:
        table.add_row(label, str(value))
    console.print(f"[bold]preprocess run {summary.run_id}[/bold]")
    console.print(table)
    if summary.quarantine_reasons:
        reasons = ", ".join(f"{cls} {n}" for cls, n in sorted(summary.quarantine_reasons.items()))
        console.print(f"quarantined: {reasons} (each file's reason is in the quarantine table)")
    if summary.skip_reasons:
        reasons = ", ".join(f"{cls} {n}" for cls, n in sorted(summary.skip_reasons.items()))
        console.print(f"skipped: {reasons} (not radiographs to score; each file's reason is in the files table)")
    if summary.previously:
        earlier = ", ".join(f"{o} {n}" for o, n in sorted(summary.previously.items()))
        console.print(f"judged by earlier runs, unchanged, not read again: {earlier}")
    if summary.retryable:
        console.print(f"retryable: {summary.retryable} files could not be read for now; the next run reads them")
    for pair in summary.duplicate_pairs[:10]:
        console.print(f"duplicate: {pair['source_uri']} = {pair['duplicate_of']}")
    if len(summary.duplicate_pairs) > 10:
        console.print(f"... and {len(summary.duplicate_pairs) - 10} more duplicates (see the run summary)")
    check = "=" if summary.reconciles else "!="
    console.print(
        f"discovered {summary.discovered} {check} new {summary.new} + already present {summary.already_present}"
        f" + duplicates {summary.duplicates} + skipped {summary.skipped} + quarantined {summary.quarantined}"
        f" + retryable {summary.retryable}"
    )
    tables = (TENSORS, QUARANTINE, FILES)
    console.print("tables: " + ", ".join(table_uri(lakehouse_uri, t) for t in tables))
    console.print(f"run summary: {run_summary_uri(lakehouse_uri, summary.run_id)}")
    return 0


def _cmd_infer(args: argparse.Namespace) -> int:
    from inference.job import Shard, run_infer

    settings = load_settings()
    lakehouse_uri = _lakehouse(args, settings)
    shard = Shard.parse(args.shard) if args.shard else Shard()
    if args.weights and (len(args.model or []) > 1 or "," in (args.model or [""])[0]):
        raise CxrError("--weights names one file: give one --model with it (or use --weights-dir for several)")
    summaries = []

    def _run_one(model_id: str):  # type: ignore[no-untyped-def]
        return run_infer(
            lakehouse_uri,
            settings=settings,
            model_id=model_id,
            weights_dir=args.weights_dir,
            weights_uri=args.weights,
            allow_untrained=args.allow_untrained,
            batch_size=args.batch_size,
            device=args.device,
            amp=args.amp or settings.inference.amp,  # the flag first, the environment second
            shard=shard,
            graph=args.graph,
            channels_last=args.channels_last,
            commit_every=args.commit_every,
            run_id=args.run_id,
            progress=not args.no_progress,
            thresholds=args.thresholds,
        )

    models = [m.strip() for arg in (args.model or list(DEFAULT_MODELS)) for m in arg.split(",") if m.strip()]
    for model_id in models:
        with contextlib.redirect_stdout(sys.stderr):  # libraries print(); stdout stays for --json
            s = _run_one(model_id)
        summaries.append(s)
        if not args.json:
            flag = "  [UNTRAINED STAND-IN: outputs are meaningless]" if s.untrained else ""
            log.info(
                "%s on %s: %d candidates, %d already predicted, %d predicted in %.1f s (tensors v%d)%s",
                s.model_id,
                s.device,
                s.candidates,
                s.already_predicted,
                s.predicted,
                s.seconds,
                s.tensors_version,
                flag,
            )
    if args.json:
        sys.stdout.write(json.dumps([asdict(s) for s in summaries], indent=2) + "\n")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from transforms.sample import write_samples

    paths = write_samples(Path(args.output), count=args.count, include_invalid=args.include_invalid, seed=args.seed)
    log.info("wrote %d sample files under %s", len(paths), args.output)
    return 0


def _lakehouse(args: argparse.Namespace, settings: Settings) -> str:
    """``--lakehouse`` or the configured lakehouse; a clear error when neither is given."""
    uri = getattr(args, "lakehouse", None) or settings.lakehouse_uri
    if not uri:
        raise CxrError("give --lakehouse (or set CXR_LAKEHOUSE_URI)")
    return str(uri)


def _cmd_validate(args: argparse.Namespace) -> int:
    """``cxr validate``: run the suites, print a summary; 1 when any expectation failed."""
    from expectations.runner import validate_lakehouse

    settings = load_settings()
    report = validate_lakehouse(
        _lakehouse(args, settings),
        settings=settings,
        tables=args.table,
        run_id=args.run_id,
        models=args.model,
        max_quarantine_share=args.max_quarantine_share,
    )
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    else:
        _print_validation(report)
    return 0 if report.success else 1


def _print_validation(report: ValidationReport) -> None:
    """A rich table (table, rows, expectations passed / failed), then each failing expectation with examples."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(soft_wrap=True)
    table = Table(title=f"validation of {report.lakehouse_uri}")
    for col in ("table", "suites", "rows", "passed", "failed"):
        table.add_column(col)
    for name, t in report.tables.items():
        colour = "green" if t.success else "red"
        table.add_row(f"[{colour}]{name}[/]", ", ".join(t.suites), str(t.rows), str(t.passed), str(t.failed_count))
    console.print(table)
    for name, t in report.tables.items():
        for f in t.failed:
            detail = f.error or ", ".join(_short(x) for x in f.examples[:3])
            count = f" ({f.unexpected_count} unexpected)" if f.unexpected_count is not None else ""
            line = f"{name} / {f.suite}: {f.label()}{count}" + (f": {detail}" if detail else "")
            console.print(f"[red]FAILED[/] {escape(line)}")
    verdict = "[green]all expectations passed[/]" if report.success else "[red]validation FAILED[/]"
    console.print(f"{verdict}; Data Docs: {escape(report.data_docs_uri)}")


def _short(value: Any) -> str:
    """A compact rendering of an unexpected value or row identifier (hashes shortened)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text[:12] + "…" if len(text) > 16 else text


def _cmd_query(args: argparse.Namespace) -> int:
    """``cxr query``: ad-hoc SQL, a saved query, the saved-query list or the Athena DDL."""
    from cxr.sql import SAVED_QUERIES, athena_ddl, format_result, query, run_saved

    settings = load_settings()
    if args.list:
        lines = []
        for q in SAVED_QUERIES.values():
            accepted = " ".join(f"{p.name}={'(required)' if p.default is None else p.default}" for p in q.params)
            lines.append(f"{q.name}{'  [' + accepted + ']' if accepted else ''}\n    {q.description}")
        sys.stdout.write("\n".join(lines) + "\n")
        return 0
    lakehouse_uri = args.lakehouse or settings.lakehouse_uri
    if args.athena_ddl:
        if not lakehouse_uri:
            raise QueryError("give --lakehouse s3://bucket/prefix (or set CXR_LAKEHOUSE_URI)")
        sys.stdout.write("".join(f"{s};\n\n" for s in athena_ddl(lakehouse_uri, database=args.database)))
        return 0
    if args.limit < 0:
        raise QueryError(f"--limit must be 0 or more (got {args.limit})")
    params = _parse_params(args.param)
    published = not args.unpublished
    if args.unpublished:
        log.warning("reading the latest, UNAUDITED table versions (--unpublished)")
    if args.saved and args.sql:
        raise QueryError("give either SQL or --saved NAME, not both")
    if args.saved:
        result = run_saved(
            lakehouse_uri, args.saved, settings=settings, params=params, limit=args.limit + 1, published=published
        )
    elif args.sql:
        values = {k: _ad_hoc_value(v) for k, v in params.items()}
        result = query(
            lakehouse_uri, args.sql, settings=settings, params=values, limit=args.limit + 1, published=published
        )
    else:
        raise QueryError('give the SQL to run (cxr query "SELECT ...") or --saved NAME (see --list)')
    shown = result.slice(0, args.limit)
    sys.stdout.write(format_result(shown, fmt=args.format))
    if result.num_rows > shown.num_rows:
        log.warning("showing the first %d rows; there are more (raise --limit to see more)", shown.num_rows)
    return 0


def _parse_params(items: list[str]) -> dict[str, str]:
    """``--param NAME=VALUE`` items as a dict."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise QueryError(f"--param {item!r}: expected NAME=VALUE")
        out[name.strip()] = value
    return out


def _ad_hoc_value(text: str) -> int | float | str:
    """A CLI value for a ``$name`` placeholder: an integer or number when it reads as one, else a string."""
    for convert in (int, float):
        try:
            return convert(text)  # type: ignore[no-any-return]
        except ValueError:
            continue
    return text


def _cmd_report(args: argparse.Namespace) -> int:
    """``cxr report``: write the HTML run report."""
    from cxr.report import write_report

    settings = load_settings()
    write_report(
        _lakehouse(args, settings),
        settings=settings,
        run_id=args.run_id,
        top=args.top,
        output=args.output,
        published=not args.unpublished,
    )
    return 0


def _cmd_accept(args: argparse.Namespace) -> int:
    """``cxr accept``: record that a run is accepted although it failed an audit."""
    from lakehouse.publish import accept_run

    settings = load_settings()
    accept_run(_lakehouse(args, settings), settings, args.run_id, check=args.check, reason=args.reason)
    sys.stdout.write(f"accepted {args.run_id} past {args.check}: the next publish may publish it\n")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """``cxr evaluate``: labels joined to predictions -> evaluation (and thresholds with --calibrate)."""
    from cxr.evaluate import evaluate

    settings = load_settings()
    summary = evaluate(
        _lakehouse(args, settings),
        args.labels,
        settings=settings,
        key=args.key,
        models=[m.strip() for arg in args.model or [] for m in arg.split(",") if m.strip()] or None,
        run_id=args.run_id,
        slices=[s.strip() for arg in args.slice or [] for s in arg.split(",") if s.strip()],
        n_bootstrap=args.bootstrap,
        rule=args.calibrate or args.rule,
        calibrate=bool(args.calibrate),
        uncertain=args.uncertain,
        published=not args.unpublished,
    )
    if args.json:
        sys.stdout.write(json.dumps(summary.to_dict(), indent=2, default=str) + "\n")
        return 0
    s = summary
    lines = [
        f"evaluation {s.evaluation_id}: {s.rows_written} rows ({', '.join(s.models)}; rule {s.rule})",
        f"labels: {s.labels_format} style, {s.label_rows} rows, {s.label_keys} keys: {s.matched_keys} matched, "
        f"{s.unmatched_keys} match no image, {s.ambiguous_keys} match several (left out)",
        f"images: {s.images_predicted} with predictions, {s.images_labelled} labelled; "
        f"{s.conflicting_labels} conflicting labels left out",
    ]
    if s.keys_without_prediction:
        lines.append(f"{s.keys_without_prediction} matched images have no prediction in scope (other runs or models)")
    if s.unmapped:
        lines.append(
            "labels with no TorchXRayVision target: " + ", ".join(f"{k} ({v})" for k, v in sorted(s.unmapped.items()))
        )
    if s.not_predicted:
        lines.append(
            "labels of pathologies these models do not predict: "
            + ", ".join(f"{k} ({v})" for k, v in sorted(s.not_predicted.items()))
        )
    if s.uncertain:
        lines.append(f"uncertain (-1) labels: {s.uncertain} ({s.uncertain_dropped} ignored)")
    if s.ignored_columns:
        lines.append("columns read as no label (check for a misspelt finding): " + ", ".join(s.ignored_columns))
    if s.null_auroc:
        lines.append("no AUROC: " + ", ".join(f"{k} ({v} rows)" for k, v in sorted(s.null_auroc.items())))
    if s.thresholds_version is not None:
        lines.append(f"thresholds: {s.thresholds_written} written, thresholds version {s.thresholds_version}")
    lines.append("see: cxr query --unpublished --saved evaluation_summary (visible to readers after cxr publish)")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_drift(args: argparse.Namespace) -> int:
    """``cxr drift``: compare an inference run with the reference run; 1 when a PSI exceeds the limit."""
    from cxr.drift import compute_drift

    settings = load_settings()
    result = compute_drift(
        _lakehouse(args, settings),
        settings=settings,
        run_id=args.run_id,
        reference_run_id=args.reference_run_id,
        max_psi=args.max_psi,
    )
    verdict = "FAIL" if result.failed else ("no reference" if result.reference_run_id is None else "pass")
    sys.stdout.write(
        f"drift of {result.run_id} against {result.reference_run_id or '-'}: {verdict} ({result.rows} rows)\n"
    )
    for line in result.failed:
        sys.stdout.write(f"  {line}\n")
    return 1 if result.failed else 0


def _cmd_publish(args: argparse.Namespace) -> int:
    """``cxr publish``: the DAG's audit and publish steps, for a lakehouse built with the CLI.

    The audits cover every run not published yet (and ``--run-id`` / ``--infer-run-id``); what is
    published is exactly the versions they read.
    """
    from expectations.runner import validate_lakehouse
    from lakehouse.publish import publish

    settings = load_settings()
    lakehouse_uri = _lakehouse(args, settings)
    if _present(lakehouse_uri, settings, ["predictions"]):
        from lakehouse import delta_rs
        from lakehouse.tables import DRIFT

        delta_rs.ensure_table(lakehouse_uri, DRIFT, settings)  # so that unchecked runs fail the drift gate
    reports = []
    before = _present(lakehouse_uri, settings, _PRE_TABLES)
    if before:
        reports.append(
            validate_lakehouse(lakehouse_uri, settings=settings, tables=before, run_id=args.run_id, pending=True)
        )
    after = [t for t in _present(lakehouse_uri, settings, TABLE_NAMES) if t not in _PRE_TABLES]
    if after:
        reports.append(
            validate_lakehouse(lakehouse_uri, settings=settings, tables=after, run_id=args.infer_run_id, pending=True)
        )
    for report in reports:
        _print_validation(report)
    if not reports or not all(r.success for r in reports):
        log.error("an audit failed: nothing published; readers stay on the previous published versions")
        return 1
    versions = {t: v for r in reports for t, v in r.versions.items()}
    record = publish(
        lakehouse_uri, settings, run_id=args.run_id or "cli", infer_run_id=args.infer_run_id, versions=versions
    )
    sys.stdout.write("published " + ", ".join(f"{t}@v{v}" for t, v in sorted(record.versions.items())) + "\n")
    return 0


_PRE_TABLES = ("tensors", "quarantine", "files")


def _present(lakehouse_uri: str, settings: Settings, tables: Sequence[str]) -> list[str]:
    from lakehouse.publish import current_versions

    return list(current_versions(lakehouse_uri, settings, tables))


def _cmd_config(args: argparse.Namespace) -> int:
    """``cxr config``: the effective settings, where each came from, secrets masked."""
    settings = load_settings().with_overrides(input_uri=args.input, lakehouse_uri=args.lakehouse)
    rows = describe(settings)
    if args.json:
        sys.stdout.write(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
        return 0
    names = {"profile": f"profile default ({settings.profile})", "env": "environment"}
    cells = [(r.name, r.value, names.get(r.source, r.source), r.env) for r in rows]
    header = ("setting", "value", "source", "variable")
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(3)]
    lines = [f"cxr settings (profile {settings.profile}; flag > environment > profile default > default)"]
    for c in [header, *cells]:
        lines.append("  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3])
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_maintain(args: argparse.Namespace) -> int:
    from lakehouse.maintain import maintain

    settings = load_settings()
    result = maintain(
        _lakehouse(args, settings),
        settings,
        older_than_hours=args.older_than,
        retain_hours=args.retain_hours,
        compact=not args.no_compact,
    )
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2) + "\n")
        return 0
    lines = [
        f"maintenance of {result.lakehouse_uri} (orphans older than {args.older_than:g} h, "
        f"removed files older than {args.retain_hours:g} h)"
    ]
    for t in result.tables:
        text = f"  {t.table}: {t.orphans_deleted} orphan and {t.expired_deleted} expired files deleted"
        text += f" ({_bytes(t.bytes_freed)})"
        text += f", {t.orphans_kept_young} younger orphans kept" if t.orphans_kept_young else ""
        text += f", {t.files_compacted} small files compacted into {t.files_added}" if t.files_compacted else ""
        lines.append(text)
    lines.append(f"freed {_bytes(result.bytes_freed)} in {result.files_deleted} files")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _cmd_requeue(args: argparse.Namespace) -> int:
    from lakehouse.ledger import requeue

    settings = load_settings()
    outcome = "skipped" if args.skipped else "quarantined"
    n = requeue(_lakehouse(args, settings), settings, error_class=args.error_class, run_id=args.run_id, outcome=outcome)
    which = [
        f"of class {args.error_class}" if args.error_class else "",
        f"from run {args.run_id}" if args.run_id else "",
    ]
    detail = " ".join(w for w in which if w)
    sys.stdout.write(
        f"requeued {n} {outcome} files{' ' + detail if detail else ''}: the next preprocessing run reads them again\n"
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from cxr.local_run import run_local, summary_lines

    settings = load_settings()
    input_uri = args.input or settings.input_uri or "data/samples"
    lakehouse_uri = args.lakehouse or settings.lakehouse_uri or "data/lakehouse"
    if not 0 <= args.infer_shards <= settings.airflow.infer_max_shards:
        raise CxrError(f"--infer-shards {args.infer_shards}: give 0 (auto) to {settings.airflow.infer_max_shards}")
    result = run_local(
        input_uri=input_uri,
        lakehouse_uri=lakehouse_uri,
        models=args.model or list(DEFAULT_MODELS),
        allow_untrained=args.allow_untrained,
        weights_dir=args.weights_dir,
        labels_uri=args.labels,
        labels_key=args.labels_key,
        thresholds=args.thresholds,
        infer_shards=args.infer_shards,
        capture=not args.verbose,  # `cxr -v run`: Airflow's and the tasks' output on the terminal too
    )
    sys.stdout.write("".join(f"{line}\n" for line in summary_lines(result, lakehouse_uri=lakehouse_uri)))
    return 0 if result.succeeded else 1


def _cmd_cost(args: argparse.Namespace) -> int:
    """``cxr cost``: cost per 1k images from the run summaries' measured seconds and a prices file."""
    from cxr.cost import compute_cost, load_prices, print_report

    settings = load_settings()
    prices = load_prices(args.prices)
    report = compute_cost(
        _lakehouse(args, settings), settings=settings, prices=prices, run_ids=args.run_id, cores=args.cores
    )
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        print_report(report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``cxr`` argument parser."""
    p = argparse.ArgumentParser(prog="cxr", description="Chest X-ray lakehouse pipeline")
    p.add_argument("--version", action="version", version=f"cxr {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("preprocess", help="images (folder or s3://) -> Delta tensors + quarantine")
    pre.add_argument("--input", help="folder or s3://bucket/prefix of PNG/JPEG/DICOM files (recursive)")
    pre.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    pre.add_argument("--size", type=int, help="output size in pixels (default 224)")
    pre.add_argument(
        "--resize-engine",
        choices=RESIZE_ENGINES,
        help="cv2 INTER_AREA (default) or skimage (xrv's training default)",
    )
    pre.add_argument("--dtype", choices=TENSOR_DTYPES, help="tensor storage dtype (default float16)")
    pre.add_argument(
        "--max-pixels", type=int, help="refuse images whose header declares more pixels (default 64000000)"
    )
    pre.add_argument("--run-id", help="run id recorded in every row (default: generated)")
    pre.add_argument("--no-progress", action="store_true", help="no progress display")
    pre.add_argument("--json", action="store_true", help="print the summary as JSON")
    pre.set_defaults(func=_cmd_preprocess)

    inf = sub.add_parser("infer", help="Delta tensors -> TorchXRayVision -> Delta predictions")
    inf.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    inf.add_argument(
        "--model",
        action="append",
        help=f"xrv weights name (repeatable or comma-separated; default {DEFAULT_MODELS[0]})",
    )
    inf.add_argument("--weights-dir", help="folder in xrv's cache layout holding the weights files (air-gapped use)")
    inf.add_argument("--weights", help="one weights file, local path or s3:// object")
    inf.add_argument(
        "--allow-untrained",
        action="store_true",
        help="without weights, use a random-init stand-in (marked in every row)",
    )
    inf.add_argument(
        "--batch-size", type=int, default=0, help="images per forward pass (default: 16 on the CPU, 256 on CUDA)"
    )
    inf.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    inf.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    inf.add_argument(
        "--graph",
        choices=["auto", "eager", "frozen", "onnx"],
        default="auto",
        help="engine: auto (default: ONNX Runtime on CPU, the frozen graph when onnxruntime is missing or the "
        "model cannot be exported; eager on CUDA), frozen (TorchScript, bit-identical to eager), eager, or onnx "
        "(ONNX Runtime on CPU; outputs within 1e-4 of xrv)",
    )
    inf.add_argument(
        "--channels-last", action="store_true", help="channels_last memory format (see docs/benchmarks.md)"
    )
    inf.add_argument("--shard", help="i/N: score only shard i of N (disjoint, together complete)")
    inf.add_argument("--commit-every", type=int, default=1024, help="MERGE results every N images")
    inf.add_argument("--run-id", help="run id recorded in every row (default: generated)")
    inf.add_argument(
        "--thresholds",
        help="latest or a thresholds table version: add positive_<pathology> decisions (cxr evaluate --calibrate)",
    )
    inf.add_argument("--no-progress", action="store_true")
    inf.add_argument("--json", action="store_true", help="print the summaries as JSON")
    inf.set_defaults(func=_cmd_infer)

    val = sub.add_parser("validate", help="Great Expectations suites over the tables; Data Docs; exit 1 on failure")
    val.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    val.add_argument(
        "--table",
        action="append",
        choices=TABLE_NAMES,
        help="table to validate (repeatable; default: every table present)",
    )
    val.add_argument("--run-id", help="the run whose quarantine share / prediction completeness is checked")
    val.add_argument("--model", action="append", help="models every tensor must have a prediction for")
    val.add_argument(
        "--max-quarantine-share",
        type=float,
        help="fail when more than this share of a run's inputs were quarantined (default CXR_MAX_QUARANTINE_SHARE)",
    )
    val.add_argument("--json", action="store_true", help="print the results as JSON")
    val.set_defaults(func=_cmd_validate)

    qry = sub.add_parser("query", help="SQL (DuckDB) over tensors, quarantine and predictions")
    qry.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    qry.add_argument("sql", nargs="?", help="the SQL; tables are visible as tensors, quarantine, predictions")
    qry.add_argument("--saved", help="run a saved query by name (see --list)")
    qry.add_argument("--param", action="append", default=[], help="NAME=VALUE for a saved query's parameters")
    qry.add_argument("--list", action="store_true", help="list the saved queries")
    qry.add_argument("--athena-ddl", action="store_true", help="print the Athena/Glue DDL for the tables")
    qry.add_argument("--database", default="cxr", help="Athena database name for --athena-ddl (default cxr)")
    qry.add_argument("--format", choices=["table", "csv", "json"], default="table")
    qry.add_argument("--limit", type=int, default=1000, help="rows printed at most (default 1000)")
    qry.add_argument(
        "--unpublished",
        action="store_true",
        help="read the latest table versions, audited or not (default: the published, audited versions)",
    )
    qry.set_defaults(func=_cmd_query)

    ev = sub.add_parser("evaluate", help="labels joined to predictions -> evaluation (AUROC with CI, thresholds)")
    ev.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    ev.add_argument("--labels", required=True, help="labels: CSV (.csv.gz), Parquet or Delta; tidy, NIH or CheXpert")
    ev.add_argument("--key", required=True, choices=["image_id", "file_name", "sop_instance_uid"])
    ev.add_argument("--model", action="append", help="models to evaluate (default: every model predicted)")
    ev.add_argument("--run-id", help="evaluate only this inference run's predictions")
    ev.add_argument("--slice", action="append", help="lineage column to slice by (repeatable), e.g. view_position")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the AUROC CI (default 1000)")
    ev.add_argument("--rule", default="youden", help="operating point: youden (default) or sensitivity=0.9")
    ev.add_argument("--calibrate", metavar="RULE", help="write site thresholds by RULE (youden | sensitivity=T)")
    ev.add_argument(
        "--uncertain", choices=["ignore", "positive", "negative"], default="ignore", help="CheXpert -1 labels"
    )
    ev.add_argument(
        "--unpublished", action="store_true", help="evaluate the latest, unaudited predictions (default: published)"
    )
    ev.add_argument("--json", action="store_true", help="print the summary as JSON")
    ev.set_defaults(func=_cmd_evaluate)

    dr = sub.add_parser("drift", help="PSI/KS of an inference run against the reference run; exit 1 on drift")
    dr.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    dr.add_argument("--run-id", required=True, help="the inference run to check")
    dr.add_argument("--reference-run-id", help="compare with this run (default: the first published inference run)")
    dr.add_argument("--max-psi", type=float, help="the gate (default CXR_DRIFT_MAX_PSI, 0.25)")
    dr.set_defaults(func=_cmd_drift)

    pub = sub.add_parser(
        "publish", help="audit every table (GX, drift gate), then publish their versions to readers; exit 1 on failure"
    )
    pub.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    pub.add_argument("--run-id", help="the preprocessing run whose quarantine share is audited (default: every run)")
    pub.add_argument("--infer-run-id", help="the inference run audited (coverage, drift gate)")
    pub.set_defaults(func=_cmd_publish)

    acc = sub.add_parser(
        "accept", help="accept a preprocessing run that failed the quarantine share gate (recorded with the reason)"
    )
    acc.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    acc.add_argument("--run-id", required=True, help="the preprocessing run")
    acc.add_argument("--check", default="quarantine_share", choices=["quarantine_share"])
    acc.add_argument("--reason", required=True, help="why: kept in reports/accepted.json")
    acc.set_defaults(func=_cmd_accept)

    rep = sub.add_parser("report", help="one self-contained HTML run report")
    rep.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    rep.add_argument("--run-id", help="report this preprocessing run (default: the latest)")
    rep.add_argument("--output", help="where to write the HTML (default <lakehouse>/reports/report.html)")
    rep.add_argument("--top", type=int, default=8, help="thumbnails per finding (default 8)")
    rep.add_argument("--unpublished", action="store_true", help="report the latest, unaudited table versions")
    rep.set_defaults(func=_cmd_report)

    run = sub.add_parser(
        "run",
        help="the whole Airflow DAG once, locally (dag.test(), SQLite in .airflow/): one line per task here, "
        "Airflow and Spark logs in .airflow/logs (exit 1 when the run failed)",
    )
    run.add_argument("--input", help="images: folder or s3:// (default CXR_INPUT_URI or data/samples)")
    run.add_argument("--lakehouse", help="Delta tables: folder or s3:// (default CXR_LAKEHOUSE_URI or data/lakehouse)")
    run.add_argument("--model", action="append", help="xrv weights name (repeatable)")
    run.add_argument("--weights-dir", help="folder in xrv's cache layout holding the weights files")
    run.add_argument(
        "--allow-untrained", action="store_true", help="without weights, a random-init stand-in (marked in every row)"
    )
    run.add_argument("--labels", help="a labels file: evaluate the run against it before publishing (cxr evaluate)")
    run.add_argument(
        "--labels-key",
        default="file_name",
        choices=["file_name", "image_id", "sop_instance_uid"],
        help="the labels' key",
    )
    run.add_argument("--thresholds", help="latest or a thresholds version: decision columns (cxr infer --thresholds)")
    run.add_argument(
        "--infer-shards",
        type=int,
        default=1,
        metavar="N",
        help="inference tasks (the DAG's infer_shards Param; 0 = from the number of images to score). "
        "dag.test() runs tasks one at a time, so shards here run one after another (default 1)",
    )
    run.set_defaults(func=_cmd_run)

    mnt = sub.add_parser(
        "maintain", help="delete orphan and expired data files, compact small files (the DAG's last task)"
    )
    mnt.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    mnt.add_argument(
        "--older-than",
        type=float,
        default=24.0,
        metavar="HOURS",
        help="delete only orphans older than this (default 24: never the files of a run still writing; 0 when none is)",
    )
    mnt.add_argument(
        "--retain-hours",
        type=float,
        default=168.0,
        metavar="HOURS",
        help="keep files a later version removed this long for time travel (default 168; published versions always)",
    )
    mnt.add_argument("--no-compact", action="store_true", help="do not compact predictions, quarantine and files")
    mnt.add_argument("--json", action="store_true", help="print what was done as JSON")
    mnt.set_defaults(func=_cmd_maintain)

    rq = sub.add_parser(
        "requeue", help="mark quarantined (or --skipped) files to be read again by the next run (after a fix)"
    )
    rq.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    rq.add_argument(
        "--error-class", help="only files of this error or skip class (e.g. DecoderCrash, ModalityNotAllowed)"
    )
    rq.add_argument(
        "--skipped", action="store_true", help="requeue skipped files instead (e.g. after adding a modality)"
    )
    rq.add_argument("--run-id", help="only files quarantined by this preprocessing run")
    rq.set_defaults(func=_cmd_requeue)

    cst = sub.add_parser("cost", help="cost per 1k images from the runs' measured seconds and a prices file")
    cst.add_argument("--lakehouse", help="folder or s3://bucket/prefix holding the Delta tables")
    cst.add_argument("--prices", help="a prices JSON file (default: cxr/prices/aws-us-east-1.json, UNVERIFIED)")
    cst.add_argument("--run-id", nargs="+", action="extend", help="only these runs (default: every run summary)")
    cst.add_argument(
        "--cores",
        type=int,
        help="cores of the machine that measured the runs, for summaries that do not record them (default: this one's)",
    )
    cst.add_argument("--json", action="store_true", help="print the report as JSON")
    cst.set_defaults(func=_cmd_cost)

    cfg = sub.add_parser("config", help="the effective settings and where each came from (secrets masked)")
    cfg.add_argument("--input", help="as for `cxr run`: shown as coming from a flag")
    cfg.add_argument("--lakehouse", help="as for `cxr run`: shown as coming from a flag")
    cfg.add_argument("--json", action="store_true", help="print the settings as JSON")
    cfg.set_defaults(func=_cmd_config)

    smp = sub.add_parser("sample", help="write synthetic chest-X-ray-like PNG/JPEG/DICOM files")
    smp.add_argument("--output", required=True, help="folder to write into")
    smp.add_argument("--count", type=int, default=34, help="number of valid images (default 34: two of each kind)")
    smp.add_argument("--include-invalid", action="store_true", help="also write one file of every invalid kind")
    smp.add_argument("--seed", type=int, default=0)
    smp.set_defaults(func=_cmd_sample)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cxr`` console script."""
    import os

    # Arrow's jemalloc pool returns freed memory to the system where the default (mimalloc) keeps it:
    # measured on a 50k-row lakehouse, `cxr validate` of one run peaked at 481 MB instead of 566 MB
    # (the 200-row lakehouse: 447 / 455 MB) and `cxr report` at 296 instead of 355 MB, same speed.
    # Read by pyarrow when it is first imported (after this line); a user's own choice wins.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except CxrError as exc:
        sys.stderr.write(f"cxr {args.command}: {type(exc).__name__}: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"cxr {args.command}: interrupted\n")
        return 130
    except Exception as exc:  # the stage could not run (Spark, delta-rs, I/O): one line, traceback with -v
        log.debug("traceback", exc_info=True)
        first = (str(exc).strip().splitlines() or [""])[0][:500]
        sys.stderr.write(f"cxr {args.command}: {type(exc).__name__}: {first} (run with -v for the traceback)\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
