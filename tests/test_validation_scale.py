"""Validation at archive scale: an audit reads the tensor bytes of the runs it audits and no other.

A lakehouse with two preprocessing and two inference runs, made by the real stages: ``built_lakehouse``
(``pre-test`` + ``inf-test``, published) and a second day (``pre-day2`` + ``inf-day2``, new images, not
published yet). Every byte the validation reads from a Delta data file goes through delta-rs's pyarrow
filesystem handler; the ``reads`` fixture wraps that handler's files and records each read (path, offset,
length), which the tests compare with the byte ranges of the ``tensor`` column chunks in the Parquet
metadata of each data file.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from expectations.runner import ValidationReport, validate_lakehouse
from lakehouse.config import Settings
from tests.conftest import MODEL

pytestmark = pytest.mark.slow

#: Arrow fetches the last 64 KiB of every Parquet file it opens to find the footer (pyarrow's default
#: footer read size, not configurable through the dataset API); those bytes are not a column scan
FOOTER_PREFETCH = 64 * 1024


@dataclass(frozen=True)
class Read:
    """One read from a data file: ``path`` relative to the table root."""

    path: str
    offset: int
    length: int


class _CountingFile:
    """A delta-rs object-store file that records every read."""

    def __init__(self, inner: Any, path: str, log: list[Read]) -> None:
        self._inner, self._path, self._log = inner, path, log

    def read(self, nbytes: int = -1) -> bytes:
        offset = self._inner.tell()
        data = self._inner.read(nbytes)
        self._log.append(Read(self._path, offset, len(data)))
        return bytes(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Read]:
    """Every read the pyarrow datasets of delta-rs make from a data file, in order."""
    from deltalake.fs import DeltaStorageHandler

    log: list[Read] = []

    def open_input_file(self: DeltaStorageHandler, path: str) -> pa.PythonFile:
        return pa.PythonFile(_CountingFile(self._handler.open_input_file(path), path, log), mode="r")

    monkeypatch.setattr(DeltaStorageHandler, "open_input_file", open_input_file)
    return log


@pytest.fixture(scope="module")
def two_days(
    tmp_path_factory: pytest.TempPathFactory, built_lakehouse: Path, settings: Settings, spark: Any, checkpoint: Path
) -> Path:
    """``built_lakehouse`` plus a second day by the real stages: 3 new images preprocessed (``pre-day2``)
    and scored (``inf-day2``), not published. Read-only: copy it before changing it."""
    from inference.job import run_infer
    from transforms.preprocess import run_preprocess
    from transforms.sample import write_samples

    root = tmp_path_factory.mktemp("two-days")
    lake = root / "lake"
    shutil.copytree(built_lakehouse, lake)
    write_samples(root / "day2", count=3, seed=700)
    pre = run_preprocess(
        str(root / "day2"), str(lake), settings=settings, run_id="pre-day2", spark=spark, progress=False
    )
    assert pre.new == 3
    inf = run_infer(
        str(lake),
        settings=settings,
        model_id=MODEL,
        weights_dir=str(checkpoint.parent),
        run_id="inf-day2",
        progress=False,
    )
    assert inf.predicted == 3
    return lake


def _copy(two_days: Path, tmp_path: Path) -> Path:
    lake = tmp_path / "lake"
    shutil.copytree(two_days, lake)
    return lake


def _files_by_run(lake: Path, table: str) -> dict[str, list[str]]:
    """Run id -> the data files (relative paths) of the table's latest version holding that run's rows."""
    from deltalake import DeltaTable

    out: dict[str, list[str]] = {}
    for uri in DeltaTable(str(lake / table)).file_uris():
        rel = str(Path(uri).relative_to(lake / table))
        runs = set(pq.read_table(lake / table / rel, columns=["run_id"]).column("run_id").to_pylist())
        assert len(runs) == 1, f"{rel} holds rows of {runs}: the tests need one run per data file"
        out.setdefault(runs.pop(), []).append(rel)
    return out


def _chunks(path: Path, column: str) -> list[tuple[int, int]]:
    """[start, end) of every column chunk of ``column`` in a Parquet file."""
    meta = pq.ParquetFile(path).metadata
    index = meta.schema.names.index(column)
    out = []
    for rg in range(meta.num_row_groups):
        c = meta.row_group(rg).column(index)
        start = c.dictionary_page_offset if c.has_dictionary_page else c.data_page_offset
        out.append((start, start + c.total_compressed_size))
    return out


def _column_bytes_read(reads: list[Read], lake: Path, table: str, files: list[str], column: str) -> int:
    """Bytes of ``column``'s chunks in ``files`` that the reads covered, past the footer prefetch."""
    total = 0
    for rel in files:
        path = lake / table / rel
        prefetch = path.stat().st_size - FOOTER_PREFETCH
        for r in (r for r in reads if r.path.endswith(rel)):
            lo, hi = r.offset, min(r.offset + r.length, prefetch)
            total += sum(max(0, min(hi, end) - max(lo, start)) for start, end in _chunks(path, column))
    return total


def _column_size(lake: Path, table: str, files: list[str], column: str) -> int:
    """Bytes of ``column``'s chunks in ``files`` outside the footer prefetch (what a scan must read)."""
    total = 0
    for rel in files:
        path = lake / table / rel
        prefetch = path.stat().st_size - FOOTER_PREFETCH
        total += sum(max(0, min(end, prefetch) - start) for start, end in _chunks(path, column))
    return total


def _failed(report: ValidationReport, table: str) -> dict[tuple[str, str, str | None], Any]:
    return {(f.suite, f.expectation_type, f.column): f for f in report.tables[table].failed}


def _audit_tensors(lake: Path, settings: Settings, **kwargs: Any) -> ValidationReport:
    """The DAG's validate_tensors audit (write-audit-publish mode) of ``pre-day2``."""
    return validate_lakehouse(
        str(lake),
        settings=settings,
        tables=["tensors", "quarantine", "files"],
        run_id="pre-day2",
        pending=True,
        max_quarantine_share=0.5,
        **kwargs,
    )


def _rewrite_run(lake: Path, table: str, run_id: str, change: Any) -> str:
    """Rewrite the rows of one run with delta-rs (``change`` edits them): returns the first row's image_id."""
    from deltalake import DeltaTable, write_deltalake

    rows = DeltaTable(str(lake / table)).to_pyarrow_table().filter(pc.field("run_id") == run_id)
    rows = rows.sort_by("image_id")
    write_deltalake(str(lake / table), change(rows), mode="overwrite", predicate=f"run_id = '{run_id}'")
    return str(rows.column("image_id")[0].as_py())


def _set(data: pa.Table, column: str, row: int, value: Any) -> pa.Table:
    values = data.column(column).to_pylist()
    values[row] = value
    idx = data.column_names.index(column)
    return data.set_column(idx, data.field(idx), pa.array(values, type=data.field(idx).type))


def _corrupt(rows: pa.Table) -> pa.Table:
    """Row 0: a tensor 2 bytes short of its shape and a maximum above the [-1024, 1024] scale."""
    rows = _set(rows, "tensor", 0, rows.column("tensor")[0].as_py()[:-2])
    return _set(rows, "tensor_max", 0, 2000.0)


BYTES = ("tensors", "expect_column_pair_values_to_be_equal", "tensor_nbytes,expected_nbytes")
RANGE = ("tensors", "expect_column_values_to_be_between", "tensor_max")


# --- the tests -----------------------------------------------------------------------------------------


def test_an_audit_reads_the_tensor_bytes_of_its_runs_only(
    two_days: Path, tmp_path: Path, settings: Settings, reads: list[Read]
) -> None:
    lake = _copy(two_days, tmp_path)
    files = _files_by_run(lake, "tensors")
    assert sorted(files) == ["pre-day2", "pre-test"]
    old, new = files["pre-test"], files["pre-day2"]
    assert _column_size(lake, "tensors", old, "tensor") > 0  # there is something not to read

    report = _audit_tensors(lake, settings)
    assert report.success, report.to_dict()
    assert report.tables["tensors"].audited_runs == ["pre-day2"]
    assert report.tables["tensors"].rows == 3
    # the new run's tensors were scanned whole; not one byte of the published run's tensor chunks
    assert _column_bytes_read(reads, lake, "tensors", new, "tensor") == _column_size(lake, "tensors", new, "tensor")
    assert _column_bytes_read(reads, lake, "tensors", old, "tensor") == 0
    # while the table-wide key check read the ids of every run
    assert _column_bytes_read(reads, lake, "tensors", old, "image_id") == _column_size(lake, "tensors", old, "image_id")

    # the control: a full validation (no run: `cxr validate` by hand) scans every tensor
    reads.clear()
    full = validate_lakehouse(str(lake), settings=settings, tables=["tensors"])
    assert full.success and full.tables["tensors"].audited_runs is None and full.tables["tensors"].rows == 20
    assert _column_bytes_read(reads, lake, "tensors", old, "tensor") == _column_size(lake, "tensors", old, "tensor")

    # predictions: the value checks read the pending inference run's rows; keys and coverage every row
    reads.clear()
    report = validate_lakehouse(str(lake), settings=settings, tables=["predictions"], run_id="inf-day2", pending=True)
    assert report.success, report.to_dict()
    assert (report.tables["predictions"].audited_runs, report.tables["predictions"].rows) == (["inf-day2"], 3)
    by_run = _files_by_run(lake, "predictions")
    assert _column_bytes_read(reads, lake, "predictions", by_run["inf-test"], "atelectasis") == 0


def test_a_corrupt_row_fails_its_own_audit_and_a_published_run_is_not_read_again(
    two_days: Path, tmp_path: Path, settings: Settings, reads: list[Read]
) -> None:
    # the run being audited: caught
    lake = _copy(two_days, tmp_path / "new")
    bad = _rewrite_run(lake, "tensors", "pre-day2", _corrupt)
    report = _audit_tensors(lake, settings)
    assert not report.success
    failed = _failed(report, "tensors")
    assert set(failed) == {BYTES, RANGE}
    assert failed[BYTES].unexpected_count == 1
    assert failed[BYTES].examples == [{"image_id": bad, "tensor_nbytes": 100350, "expected_nbytes": 100352}]
    assert report.tables["tensors"].rows == 3

    # the same corruption in the published run: the audit of pre-day2 neither reads nor fails it
    lake = _copy(two_days, tmp_path / "old")
    bad = _rewrite_run(lake, "tensors", "pre-test", _corrupt)
    old = _files_by_run(lake, "tensors")["pre-test"]
    reads.clear()
    report = _audit_tensors(lake, settings)
    assert report.success, report.to_dict()
    assert _column_bytes_read(reads, lake, "tensors", old, "tensor") == 0
    # a full validation still finds it: the corruption is there to be found
    full = validate_lakehouse(str(lake), settings=settings, tables=["tensors"])
    failed = _failed(full, "tensors")
    assert set(failed) == {BYTES, RANGE} and failed[BYTES].examples[0]["image_id"] == bad


def test_key_orphan_and_coverage_checks_span_every_run(two_days: Path, tmp_path: Path, settings: Settings) -> None:
    from deltalake import DeltaTable, write_deltalake

    lake = _copy(two_days, tmp_path)
    tensors = DeltaTable(str(lake / "tensors")).to_pyarrow_table().sort_by("image_id")
    old_row = tensors.filter(pc.field("run_id") == "pre-test").slice(0, 1)
    dup_id = old_row.column("image_id")[0].as_py()
    # day 2 holds a copy of a published tensor (a valid row: only the key is wrong)
    write_deltalake(str(lake / "tensors"), _set(old_row, "run_id", 0, "pre-day2"), mode="append")

    predictions = DeltaTable(str(lake / "predictions")).to_pyarrow_table().sort_by("image_id")
    published = predictions.filter(pc.field("run_id") == "inf-test")
    twice = published.slice(0, 1)  # its key again, in day 2
    orphan = _set(published.slice(1, 1), "image_id", 0, "f" * 64)  # no such tensor
    unscored = published.column("image_id")[2].as_py()  # a published tensor loses its prediction
    extra = pa.concat_tables([twice, orphan])
    write_deltalake(
        str(lake / "predictions"), _set(_set(extra, "run_id", 0, "inf-day2"), "run_id", 1, "inf-day2"), mode="append"
    )
    DeltaTable(str(lake / "predictions")).delete(f"image_id = '{unscored}' AND run_id = 'inf-test'")

    report = _audit_tensors(lake, settings)
    failed = _failed(report, "tensors")
    assert set(failed) == {("tensors_keys", "expect_column_values_to_be_unique", "image_id")}
    key = failed["tensors_keys", "expect_column_values_to_be_unique", "image_id"]
    assert key.unexpected_count == 2 and key.examples == [{"image_id": dup_id}] * 2
    assert report.tables["tensors"].audited_runs == ["pre-day2"]

    report = validate_lakehouse(str(lake), settings=settings, tables=["predictions"], run_id="inf-day2", pending=True)
    failed = _failed(report, "predictions")
    assert set(failed) == {
        ("predictions_keys", "expect_compound_columns_to_be_unique", "image_id,model_id"),
        ("predictions_keys", "expect_column_values_to_be_in_set", "in_tensors"),
        ("predictions_coverage", "expect_column_values_to_be_in_set", "has_prediction"),
    }
    assert failed["predictions_keys", "expect_compound_columns_to_be_unique", "image_id,model_id"].unexpected_count == 2
    absent = failed["predictions_keys", "expect_column_values_to_be_in_set", "in_tensors"]
    assert absent.unexpected_count == 1 and absent.examples[0]["image_id"] == "f" * 64
    missing = failed["predictions_coverage", "expect_column_values_to_be_in_set", "has_prediction"]
    assert missing.examples == [{"has_prediction": False, "image_id": unscored, "model_id": MODEL}]
    # the value checks covered day 2's rows only (3 scored + the 2 added)
    assert (report.tables["predictions"].audited_runs, report.tables["predictions"].rows) == (["inf-day2"], 5)


def test_run_id_without_pending_checks_that_run_or_every_row(
    two_days: Path, tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    from cxr.cli import main

    lake = _copy(two_days, tmp_path)
    capsys.readouterr()
    assert main(["validate", "--lakehouse", str(lake), "--table", "tensors", "--run-id", "pre-day2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["tables"]["tensors"]
    assert (printed["audited_runs"], printed["rows"]) == (["pre-day2"], 3)
    # an id with no tensors (an inference run): every row, as for the quarantine share
    report = validate_lakehouse(str(lake), settings=settings, tables=["tensors"], run_id="inf-day2")
    assert (report.tables["tensors"].audited_runs, report.tables["tensors"].rows) == (None, 20)
