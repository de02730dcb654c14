"""Write-audit-publish: the published (audited) version of every table, and the readers' view of it.

Stages write their tables; the audits (GX suites, the drift gate) check them; only then does the publish
step move the pointers. Consumers read only what a pointer names:

- ``<lakehouse>/reports/published.json`` records, per table, the Delta version that passed the audits
  (``cxr query``, the saved queries, the report and the notebook open the tables at these versions with
  Delta time travel; a table with no published version is not visible to them);
- ``<lakehouse>/_published/<table>/manifest`` lists the data files of that version (the symlink manifest
  Athena's tables are declared over, see :func:`cxr.sql.athena_ddl`): one object, replaced in one PUT, so
  Athena switches from one audited version to the next and never sees a half-written one.

A failed audit never reaches :func:`publish`: every reader stays on the previous published version.
``lakehouse.maintain`` keeps the data files of the published versions however old they are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from lakehouse import storage
from lakehouse.config import Settings
from lakehouse.errors import CxrError
from lakehouse.tables import SPECS, TABLE_NAMES, spec

log = logging.getLogger(__name__)


class NothingPublishedError(CxrError):
    """The lakehouse has no published (audited) version of any table yet."""


@dataclass(frozen=True)
class Published:
    """What the last publish recorded.

    Attributes:
        run_id: the pipeline run (preprocessing run id) that published.
        published_at: ISO timestamp (UTC).
        versions: table name -> the audited Delta version readers see.
        infer_run_id: the inference run whose predictions were audited in this publish (if any).
        reference_infer_run_id: the drift reference: the first published inference run, carried forward
            from publish to publish (``CXR_DRIFT_REFERENCE_RUN`` overrides it).
    """

    run_id: str
    published_at: str
    versions: dict[str, int]
    infer_run_id: str | None = None
    reference_infer_run_id: str | None = None
    manifests: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of ``published.json``."""
        return asdict(self)


def read_published(lakehouse_uri: str, settings: Settings) -> Published | None:
    """The last publish record, or None when nothing was ever published."""
    uri = storage.published_uri(lakehouse_uri)
    if not storage.exists(uri, settings):
        return None
    body = json.loads(storage.read_text(uri, settings))
    return Published(
        run_id=str(body.get("run_id", "")),
        published_at=str(body.get("published_at", "")),
        versions={str(t): int(v) for t, v in (body.get("versions") or {}).items()},
        infer_run_id=body.get("infer_run_id"),
        reference_infer_run_id=body.get("reference_infer_run_id"),
        manifests={str(t): str(u) for t, u in (body.get("manifests") or {}).items()},
    )


def published_versions(lakehouse_uri: str, settings: Settings) -> dict[str, int]:
    """Table name -> published Delta version (empty when nothing was published)."""
    record = read_published(lakehouse_uri, settings)
    return dict(record.versions) if record else {}


def reader_versions(lakehouse_uri: str, settings: Settings, *, published: bool = True) -> dict[str, int | None]:
    """The version a consumer opens each table at: the published one, or the latest when ``published`` is False.

    Args:
        lakehouse_uri: folder or ``s3://bucket/prefix``.
        settings: storage endpoint.
        published: False reads every table's latest version (unaudited: operators debugging a failed
            audit); True leaves out the tables that have no published version.

    Returns:
        Table name -> version (None: the latest). Tables absent from the lakehouse may be listed; the
        caller skips what it cannot open.

    Raises:
        NothingPublishedError: ``published`` and no table was ever published.
    """
    if not published:
        return dict.fromkeys(TABLE_NAMES)
    versions = published_versions(lakehouse_uri, settings)
    if not versions:
        raise NothingPublishedError(
            f"nothing is published in {storage.normalize_uri(lakehouse_uri)} yet: readers see only audited "
            "versions. Run the pipeline (`cxr run` / the DAG) or `cxr publish --lakehouse URI` (it audits, "
            "then publishes); `--unpublished` reads the latest, unaudited versions"
        )
    return {name: v for name, v in versions.items() if name in SPECS}


def current_versions(lakehouse_uri: str, settings: Settings, tables: Iterable[str] = TABLE_NAMES) -> dict[str, int]:
    """The latest Delta version of each of ``tables`` that exists."""
    from deltalake.exceptions import TableNotFoundError

    from lakehouse.delta_rs import open_table

    out: dict[str, int] = {}
    for name in tables:
        try:
            out[name] = int(open_table(lakehouse_uri, spec(name), settings).version())
        except TableNotFoundError:
            continue
    return out


def publish(
    lakehouse_uri: str,
    settings: Settings,
    *,
    run_id: str,
    versions: Mapping[str, int] | None = None,
    infer_run_id: str | None = None,
) -> Published:
    """Move the published pointers to the audited versions (call only after the audits passed).

    Writes one symlink manifest per table (the audited version's data files, for Athena), then
    ``published.json`` (for every other reader). Tables not named keep their previous published version.

    Args:
        lakehouse_uri: folder or ``s3://bucket/prefix``.
        settings: storage endpoint.
        run_id: the run publishing (recorded).
        versions: table -> the version the audits read; default: the latest version of every table present.
        infer_run_id: the inference run audited in this publish; the first one ever published becomes the
            drift reference.

    Returns:
        The new publish record.
    """
    from lakehouse.delta_rs import open_table

    previous = read_published(lakehouse_uri, settings)
    chosen = dict(versions) if versions is not None else current_versions(lakehouse_uri, settings)
    merged = {**(previous.versions if previous else {}), **{k: int(v) for k, v in chosen.items()}}
    manifests = dict(previous.manifests) if previous else {}
    for name, version in sorted(chosen.items()):
        dt = open_table(lakehouse_uri, spec(name), settings, version=int(version))
        uri = storage.published_manifest_uri(lakehouse_uri, name)
        body = "".join(f"{storage.normalize_uri(u)}\n" for u in sorted(dt.file_uris()))
        storage.write_text(uri, body, settings, content_type="text/plain")
        manifests[name] = uri
    reference = previous.reference_infer_run_id if previous else None
    record = Published(
        run_id=run_id,
        published_at=datetime.now(UTC).isoformat(),
        versions=merged,
        infer_run_id=infer_run_id,
        reference_infer_run_id=reference or infer_run_id,
        manifests=manifests,
    )
    storage.write_text(
        storage.published_uri(lakehouse_uri),
        json.dumps(record.to_dict(), indent=2, sort_keys=True),
        settings,
        content_type="application/json",
    )
    log.info("published %s", ", ".join(f"{t}@v{v}" for t, v in sorted(chosen.items())))
    return record


def read_table(
    lakehouse_uri: str,
    name: str,
    settings: Settings,
    *,
    columns: list[str] | None = None,
    published: bool = True,
) -> Any:
    """A table (some columns) as Arrow, at its published version (the latest with ``published=False``).

    Raises:
        NothingPublishedError: ``published`` and the table has no published version.
    """
    from lakehouse.delta_rs import read_arrow

    version: int | None = None
    if published:
        versions = published_versions(lakehouse_uri, settings)
        if name not in versions:
            raise NothingPublishedError(
                f"{name} has no published version in {storage.normalize_uri(lakehouse_uri)} yet "
                "(the publish step records it after the audits)"
            )
        version = versions[name]
    return read_arrow(lakehouse_uri, spec(name), settings, columns=columns, version=version)


def pending_runs(lakehouse_uri: str, settings: Settings, tables: Iterable[str]) -> set[str]:
    """Run ids with rows in the latest version of ``tables`` and in none of their published versions:
    the runs the next publish would make visible, which its audits must therefore cover (a run that
    failed an audit stays pending, and fails the audits again, until it is fixed or accepted).

    A run is published once any of its rows in these tables is, so a table published for the first time
    (a lakehouse upgraded from a release that published fewer tables) does not make old runs pending.
    """
    from deltalake.exceptions import TableNotFoundError

    from lakehouse.delta_rs import run_ids

    def runs_of(name: str, version: int | None) -> set[str]:
        return run_ids(lakehouse_uri, spec(name), settings, version=version)  # from the log's statistics

    published = published_versions(lakehouse_uri, settings)
    latest: set[str] = set()
    seen: set[str] = set()
    for name in tables:
        try:
            latest |= runs_of(name, None)
        except TableNotFoundError:
            continue
        if name in published:
            seen |= runs_of(name, published[name])
    return latest - seen


#: audits a run can be accepted past (the drift gate is accepted by checking the run again with a higher
#: limit, ``cxr drift --max-psi``, which the drift rows record)
ACCEPTABLE_CHECKS = ("quarantine_share",)


def accepted_runs(lakehouse_uri: str, settings: Settings, check: str) -> dict[str, dict[str, str]]:
    """Run id -> the acceptance record (reason, accepted_at) of the runs accepted past ``check``."""
    uri = storage.accepted_uri(lakehouse_uri)
    if not storage.exists(uri, settings):
        return {}
    body = json.loads(storage.read_text(uri, settings))
    return {str(r): dict(v) for r, v in (body.get(check) or {}).items()}


def accept_run(lakehouse_uri: str, settings: Settings, run_id: str, *, check: str, reason: str) -> None:
    """Record that ``run_id`` is accepted although it failed ``check`` (the next publish may publish it).

    Raises:
        CxrError: an unknown check, or no reason given.
    """
    if check not in ACCEPTABLE_CHECKS:
        raise CxrError(f"cannot accept a run past {check!r}: acceptable checks are {', '.join(ACCEPTABLE_CHECKS)}")
    if not reason.strip():
        raise CxrError("say why the run is accepted (--reason): the record is the audit trail")
    uri = storage.accepted_uri(lakehouse_uri)
    body = json.loads(storage.read_text(uri, settings)) if storage.exists(uri, settings) else {}
    body.setdefault(check, {})[run_id] = {"reason": reason.strip(), "accepted_at": datetime.now(UTC).isoformat()}
    storage.write_text(uri, json.dumps(body, indent=2, sort_keys=True), settings, content_type="application/json")
    log.warning("run %s accepted past %s: %s", run_id, check, reason.strip())
