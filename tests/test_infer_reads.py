"""What the inference job reads: a no-op run reads no tensor bytes, a new day's run reads only the new
files' tensors, and a shard reads only the row groups that hold its rows.

Bytes are counted by a real reader hook (:func:`count_reads`): every file delta-rs opens for a pyarrow
dataset is wrapped so that each ``read`` is recorded with its offset, and :func:`column_bytes_read` maps
those byte ranges onto the Parquet column chunks of a table's data files (footers parsed directly,
outside the hook). Tables are written with the production writer (``delta_rs.write_data_file``, zstd,
row groups of 64 rows, files of 256 rows, as the preprocessing job writes them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.job import SCORE_COLUMNS, Shard, run_infer
from lakehouse import delta_rs
from lakehouse.config import Settings
from lakehouse.delta_rs import read_arrow
from lakehouse.tables import PREDICTIONS, TENSORS, arrow_schema
from tests.conftest import MODEL, write_tensors_table
from transforms.sample import write_samples

#: pyarrow reads a Parquet footer speculatively: the last 64 KiB of the file, which can overlap the tail
#: of its last tensor chunk
FOOTER_READ = 64 * 1024
#: a no-op run over these tables (2 files) may read this many bytes of the ``tensor`` column at most
NOOP_TENSOR_BYTES = 2 * FOOTER_READ


# --- the reader hook ---------------------------------------------------------------------------------
@dataclass
class ReadLog:
    """Every read made through delta-rs' pyarrow filesystem: (path relative to the table, offset, bytes)."""

    reads: list[tuple[str, int, int]] = field(default_factory=list)

    def total(self) -> int:
        return sum(n for _, _, n in self.reads)


class _CountingFile:
    """A file object that records each read's offset and length, and forwards everything else."""

    def __init__(self, raw: Any, path: str, log: ReadLog) -> None:
        self._raw, self._path, self._log = raw, path, log

    def read(self, nbytes: int = -1) -> bytes:
        offset = self._raw.tell()
        data = self._raw.read(nbytes)
        self._log.reads.append((self._path, offset, len(data)))
        return bytes(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


@contextmanager
def count_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReadLog]:
    """Record every read of every file that a delta-rs pyarrow dataset opens (any table, any storage)."""
    import pyarrow as pa
    from deltalake.fs import DeltaStorageHandler

    log = ReadLog()

    def opener(self: Any, path: str) -> pa.PythonFile:
        return pa.PythonFile(_CountingFile(self._handler.open_input_file(path), path, log), mode="r")

    with monkeypatch.context() as m:
        m.setattr(DeltaStorageHandler, "open_input_file", opener)
        m.setattr(DeltaStorageHandler, "open_input_stream", opener)
        yield log


def column_chunks(table_dir: Path, column: str) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges [start, end) of ``column``'s chunk in every row group of every data file, by file name."""
    import pyarrow.parquet as pq

    out: dict[str, list[tuple[int, int]]] = {}
    for path in table_dir.rglob("*.parquet"):
        meta = pq.ParquetFile(path).metadata
        j = meta.schema.names.index(column)
        ranges = []
        for g in range(meta.num_row_groups):
            c = meta.row_group(g).column(j)
            start = (
                c.dictionary_page_offset if c.has_dictionary_page and c.dictionary_page_offset else c.data_page_offset
            )
            ranges.append((start, start + c.total_compressed_size))
        out[path.name] = ranges
    return out


def column_bytes_read(log: ReadLog, table_dir: Path, column: str, *, files: set[str] | None = None) -> int:
    """Bytes of ``column``'s chunks (in ``table_dir``'s data files, or only ``files``) covered by the reads."""
    chunks = column_chunks(table_dir, column)
    total = 0
    for path, offset, n in log.reads:
        name = Path(path).name
        if name not in chunks or (files is not None and name not in files):
            continue
        total += sum(max(0, min(offset + n, end) - max(offset, start)) for start, end in chunks[name])
    return total


# --- tables ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> dict[str, Any]:
    """One real tensors row (from a generated PNG, through the preprocessing function): the template of
    the synthetic rows below, which differ in image_id and tensor values."""
    root = tmp_path_factory.mktemp("template")
    write_tensors_table(root / "lake", write_samples(root / "in", count=1, seed=5), settings)
    return read_arrow(str(root / "lake"), TENSORS, settings).to_pylist()[0]


def synthetic_rows(template: dict[str, Any], n: int, *, seed: int) -> list[dict[str, Any]]:
    """``n`` tensors rows: distinct sha256 ids, float16 values on xrv's scale (100 KB each, as real rows)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        values = rng.uniform(-1024, 1024, size=(1, 224, 224)).astype("<f2")
        rows.append(
            {
                **template,
                "image_id": hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(),
                "tensor": values.tobytes(),
                "source_uri": f"synthetic://{seed}/{i}.png",
            }
        )
    return rows


def append_files(
    lake: Path,
    rows: list[dict[str, Any]],
    settings: Settings,
    *,
    rows_per_file: int = 256,
    row_group_size: int = 64,
    sort: bool = False,
) -> list[str]:
    """Commit ``rows`` to ``tensors`` as data files written by the production writer; their names."""
    import pyarrow as pa

    files = []
    for start in range(0, len(rows), rows_per_file):
        part = rows[start : start + rows_per_file]
        if sort:  # what a writer that sorts each file by image_id produces
            part = sorted(part, key=lambda r: r["image_id"])
        table = pa.Table.from_pylist(part, schema=arrow_schema(TENSORS))
        files.append(delta_rs.write_data_file(str(lake), TENSORS, table, settings, row_group_size=row_group_size))
    delta_rs.commit_data_files(str(lake), TENSORS, files, settings, run_id="test-files")
    return [f.path for f in files]


def bulk_predictions(lake: Path, ids: list[str], settings: Settings) -> None:
    """Mark ``ids`` as already scored by MODEL: bulk rows of a fixture run (probabilities left null)."""
    import pyarrow as pa
    import torch
    import torchxrayvision as xrv
    from deltalake import write_deltalake

    delta_rs.ensure_table(str(lake), PREDICTIONS, settings)
    n = len(ids)
    cols = {
        "image_id": ids,
        "model_id": [MODEL] * n,
        "weights_sha256": ["0" * 64] * n,
        "weights_source": ["weights-dir"] * n,
        "tensors_version": [0] * n,
        "run_id": ["bulk-fixture"] * n,
        "predicted_at": [datetime.now(UTC)] * n,
        "device": ["cpu"] * n,
        "torch_version": [torch.__version__] * n,
        "xrv_version": [xrv.__version__] * n,
    }
    schema = arrow_schema(PREDICTIONS)
    table = pa.Table.from_pydict({f.name: cols.get(f.name, [None] * n) for f in schema}, schema=schema)
    write_deltalake(str(lake / "predictions"), table, mode="append")


# --- tests -------------------------------------------------------------------------------------------
def test_noop_run_reads_ids_not_tensors_and_a_new_day_reads_only_the_new_file(
    template: dict[str, Any],
    checkpoint: Path,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lake = tmp_path / "lake"
    rows = synthetic_rows(template, 320, seed=1)
    old_files = append_files(lake, rows, settings)  # 2 files, 5 row groups
    bulk_predictions(lake, [r["image_id"] for r in rows], settings)
    table_dir = lake / "tensors"
    total = sum(e - s for ranges in column_chunks(table_dir, "tensor").values() for s, e in ranges)
    assert total > 300 * 90_000  # ~100 KB of tensor a row: the table is what a full scan would read

    with count_reads(monkeypatch) as log:
        s = run_infer(str(lake), settings=settings, weights_dir=str(checkpoint.parent), device="cpu", progress=False)
    assert (s.candidates, s.already_predicted, s.predicted) == (320, 320, 0)
    assert (s.extra["tensor_bytes_read"], s.extra["row_groups_tensor_read"]) == (0, 0)
    noop_tensor = column_bytes_read(log, table_dir, "tensor")
    noop_ids = column_bytes_read(log, table_dir, "image_id")
    assert noop_ids > 0  # the hook saw the ids pass: it is live
    assert noop_tensor < NOOP_TENSOR_BYTES, noop_tensor
    assert log.total() < 1_000_000  # all reads of the run, footers and ids included: kilobytes

    # the old reading (every tensor of the table streamed, then filtered) through the same hook
    with count_reads(monkeypatch) as full:
        dataset = delta_rs.open_table(str(lake), TENSORS, settings).to_pyarrow_dataset()
        assert sum(b.num_rows for b in dataset.to_batches(columns=SCORE_COLUMNS, batch_size=16)) == 320
    assert column_bytes_read(full, table_dir, "tensor") >= total > 100 * NOOP_TENSOR_BYTES

    # a new day: 5 new images in a new file; the run reads the tensors of that file only, and scores them
    new = synthetic_rows(template, 5, seed=2)
    new_files = append_files(lake, new, settings)
    with count_reads(monkeypatch) as day:
        s2 = run_infer(str(lake), settings=settings, weights_dir=str(checkpoint.parent), device="cpu", progress=False)
    assert (s2.candidates, s2.already_predicted, s2.predicted) == (325, 320, 5)
    assert column_bytes_read(day, table_dir, "tensor", files=set(old_files)) < NOOP_TENSOR_BYTES
    new_total = sum(e - s for f in new_files for s, e in column_chunks(table_dir, "tensor")[f])
    assert new_total == s2.extra["tensor_bytes_read"]
    # the new file's tensor chunk once, plus what its (speculative, 64 KiB) footer read overlapped
    assert new_total <= column_bytes_read(day, table_dir, "tensor", files=set(new_files)) <= new_total + FOOTER_READ
    scored = read_arrow(str(lake), PREDICTIONS, settings, columns=["image_id", "run_id"]).to_pylist()
    assert sorted(r["image_id"] for r in scored if r["run_id"] == s2.run_id) == sorted(r["image_id"] for r in new)


@pytest.mark.slow
def test_each_shard_reads_only_the_row_groups_holding_its_rows(
    template: dict[str, Any],
    checkpoint: Path,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Files sorted by image_id (row groups of 8 rows): shard i/4 reads about a quarter of the tensor
    bytes, not the table; together the shards score every row once."""
    lake = tmp_path / "lake"
    rows = synthetic_rows(template, 160, seed=3)
    append_files(lake, rows, settings, rows_per_file=160, row_group_size=8, sort=True)  # 1 file, 20 row groups
    table_dir = lake / "tensors"
    (ranges,) = column_chunks(table_dir, "tensor").values()
    total = sum(e - s for s, e in ranges)
    largest_group = max(e - s for s, e in ranges)
    n = 4
    read = []
    predicted = 0
    for i in range(n):
        with count_reads(monkeypatch) as log:
            s = run_infer(
                str(lake),
                settings=settings,
                weights_dir=str(checkpoint.parent),
                shard=Shard(i, n),
                device="cpu",
                progress=False,
            )
        owned = sum(Shard(i, n).owns(r["image_id"]) for r in rows)
        assert (s.candidates, s.predicted) == (owned, owned)
        predicted += s.predicted
        read.append(column_bytes_read(log, table_dir, "tensor"))
        # its own rows' row groups, plus at most one shared group at each end of its id range
        assert read[-1] <= total * owned / len(rows) + 2 * largest_group, (i, read[-1], total)
        assert read[-1] == s.extra["tensor_bytes_read"]
        # row groups of other shards were skipped by their image_id statistics, without reading their ids
        assert s.extra["row_groups_id_read"] < s.extra["row_groups_total"] == len(ranges)
    assert predicted == len(rows) == read_arrow(str(lake), PREDICTIONS, settings).num_rows
    assert max(read) < total / 2  # not the table: a quarter and its edges
    assert sum(read) <= total + 2 * (n - 1) * largest_group  # the shards together read the table about once


def test_shard_ranges_are_disjoint_complete_and_prunable() -> None:
    """Contiguous ranges of the id's first 8 hex digits: every id has exactly one owner, and a shard may
    hold a row group exactly when the group's [min, max] overlaps its range."""
    rng = np.random.default_rng(0)
    ids = [hashlib.sha256(rng.bytes(8)).hexdigest() for _ in range(2000)]
    edges = ["00000000", "3fffffff", "40000000", "7fffffff", "80000000", "bfffffff", "c0000000", "ffffffff"]
    ids += [e + "0" * 56 for e in edges]
    for n in (1, 3, 4, 7):
        owners = [[i for i in range(n) if Shard(i, n).owns(x)] for x in ids]
        assert all(len(o) == 1 for o in owners)
        counts = np.bincount([o[0] for o in owners], minlength=n)
        assert counts.min() > len(ids) / n * 0.8  # uniform
    assert [Shard(i, 4).owns("3fffffff" + "0" * 56) for i in range(4)] == [True, False, False, False]
    assert [Shard(i, 4).owns("40000000" + "0" * 56) for i in range(4)] == [False, True, False, False]
    s1 = Shard(1, 4)  # owns prefixes 40000000..7fffffff
    assert not s1.may_hold("0" * 64, "3fffffff" + "f" * 56)
    assert s1.may_hold("3fffffff" + "f" * 56, "40000000" + "0" * 56)
    assert s1.may_hold("7fffffff" + "0" * 56, "f" * 64)
    assert not s1.may_hold("80000000" + "0" * 56, "f" * 64)
    assert s1.may_hold("ab", "ff")  # truncated statistics bound nothing
    sorted_ids = sorted(ids)
    for a in range(0, len(sorted_ids), 37):  # groups of sorted ids (narrower than a shard): exact
        group = sorted_ids[a : a + 37]
        assert s1.may_hold(group[0], group[-1]) == any(s1.owns(x) for x in group)
