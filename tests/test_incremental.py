"""Run after run over a growing archive: each file judged once, skipped kinds, retries, batch commits,
kill -9, native decoder faults, requeue and maintenance. Real Spark, real Delta, real processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cxr.cli import main
from expectations.runner import validate_lakehouse
from lakehouse.config import Settings
from lakehouse.delta_rs import open_table, read_arrow
from lakehouse.maintain import referenced_paths
from lakehouse.runs import PreprocessRun
from lakehouse.tables import FILES, QUARANTINE, TENSORS
from tests.conftest import kill_group_when, scramble_keeping_size_and_mtime
from transforms.preprocess import run_preprocess
from transforms.sample import INVALID_KINDS, SKIPPED_KINDS, VALID_KINDS, png_bytes, synthetic_cxr, to_uint

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _run(spark: Any, settings: Settings, inp: Path | str, lake: Path, **kw: Any) -> PreprocessRun:
    return run_preprocess(str(inp), str(lake), settings=settings, spark=spark, progress=False, **kw)


def _valid(inp: Path, n: int, *, start: int = 0) -> list[Path]:
    inp.mkdir(parents=True, exist_ok=True)
    kinds = list(VALID_KINDS)
    out = []
    for i in range(start, start + n):
        ext, make = VALID_KINDS[kinds[i % len(kinds)]]
        p = inp / f"img_{i:04d}{ext}"
        p.write_bytes(make(1000 + i))
        out.append(p)
    return out


def _invalid(inp: Path, n: int) -> list[Path]:
    (inp / "bad").mkdir(parents=True, exist_ok=True)
    kinds = list(INVALID_KINDS.values())
    out = []
    for i in range(n):
        fname, make, _ = kinds[i % len(kinds)]
        p = inp / "bad" / f"{i:02d}_{fname}"
        p.write_bytes(make(i))
        out.append(p)
    return out


def _files(lake: Path, settings: Settings) -> dict[str, dict[str, object]]:
    t = read_arrow(str(lake), FILES, settings)
    return {r["source_uri"]: r for r in t.to_pylist()}


def test_the_second_day_passes_the_gate_and_old_failures_are_not_read(
    spark: Any, settings: Settings, tmp_path: Path
) -> None:
    """The scenario of issue #11: 20 images + 10 invalid files pass a 0.5 gate; 3 new images the next day
    must pass too (they used to score 10/13 = 0.77), without reading the old files again."""
    inp, lake = tmp_path / "in", tmp_path / "lake"
    first = _valid(inp, 20)
    bad = _invalid(inp, 10)
    s1 = _run(spark, settings, inp, lake, run_id="day1")
    assert (s1.discovered, s1.new, s1.quarantined, s1.reconciles) == (30, 20, 10, True)
    assert validate_lakehouse(str(lake), settings=settings, run_id="day1", max_quarantine_share=0.5).success

    scramble_keeping_size_and_mtime(first + bad)
    _valid(inp, 3, start=20)
    s2 = _run(spark, settings, inp, lake, run_id="day2")
    assert (s2.discovered, s2.new, s2.already_present, s2.quarantined, s2.decoded) == (33, 3, 30, 0, 3)
    assert s2.previously == {"new": 20, "quarantined": 10}
    # the default gate (0.05): day 2's own files are all fine
    report = validate_lakehouse(str(lake), settings=settings, run_id="day2")
    assert report.success, report
    # not read: the scrambled bytes would have made new failures or new rows
    assert read_arrow(str(lake), TENSORS, settings).num_rows == 23
    assert read_arrow(str(lake), QUARANTINE, settings).num_rows == 10
    ledger = _files(lake, settings)
    assert len(ledger) == 33 and {r["run_id"] for r in ledger.values()} == {"day1", "day2"}

    # the sensor has nothing new to wait for
    from cxr.tasks import new_images_waiting

    assert not new_images_waiting(str(inp), str(lake))
    _valid(inp, 1, start=40)
    assert new_images_waiting(str(inp), str(lake))


def test_a_changed_file_is_judged_again_and_a_copy_is_recorded_under_its_path(
    spark: Any, settings: Settings, tmp_path: Path
) -> None:
    inp, lake = tmp_path / "in", tmp_path / "lake"
    imgs = _valid(inp, 4)
    bad = _invalid(inp, 1)[0]
    _run(spark, settings, inp, lake, run_id="r1")
    # a fixed export replaces the broken file; a byte-identical copy of an image appears under a new name
    bad.write_bytes(png_bytes(to_uint(synthetic_cxr(64, 80, seed=77), 8)))
    shutil.copy(imgs[0], inp / "copy.png")
    s2 = _run(spark, settings, inp, lake, run_id="r2")
    assert (s2.new, s2.already_present, s2.content_present, s2.quarantined) == (1, 5, 1, 0)
    ledger = _files(lake, settings)
    assert ledger[str(bad)]["outcome"] == "new" and ledger[str(bad)]["run_id"] == "r2"
    assert ledger[str(inp / "copy.png")]["outcome"] == "already_present"
    # the copy is recorded: the third run reads nothing
    s3 = _run(spark, settings, inp, lake, run_id="r3")
    assert (s3.decoded, s3.already_present, s3.previously) == (0, 6, {"already_present": 1, "new": 5})
    from cxr.tasks import new_images_waiting

    assert not new_images_waiting(str(inp), str(lake))


def test_objects_that_are_not_radiographs_are_skipped_not_quarantined(
    spark: Any, settings: Settings, tmp_path: Path
) -> None:
    inp, lake = tmp_path / "in", tmp_path / "lake"
    _valid(inp, 2)
    (inp / "pacs").mkdir()
    for kind, (fname, make, _) in SKIPPED_KINDS.items():
        (inp / "pacs" / f"{kind}_{fname}").write_bytes(make(5))
    s = _run(spark, settings, inp, lake, run_id="pacs1")
    assert (s.discovered, s.new, s.skipped, s.quarantined, s.decoded, s.reconciles) == (6, 2, 4, 0, 2, True)
    assert s.skip_reasons == {"ModalityNotAllowed": 1, "MultiFrame": 1, "NoPixelData": 2}
    assert s.first_seen == 2
    assert read_arrow(str(lake), QUARANTINE, settings).num_rows == 0
    ledger = _files(lake, settings)
    for kind, (fname, _, reason) in SKIPPED_KINDS.items():
        row = ledger[str(inp / "pacs" / f"{kind}_{fname}")]
        assert (row["outcome"], row["reason_class"]) == ("skipped", reason) and row["reason"]
    # skipped files do not move the gate, even a strict one
    assert validate_lakehouse(str(lake), settings=settings, run_id="pacs1", max_quarantine_share=0.0).success
    # naming CT in the allowlist and requeueing the skipped CT slice takes it in (and only it is read)
    ct = settings.with_overrides(modalities=("CR", "DX", "RG", "CT"))
    assert main(["requeue", "--lakehouse", str(lake), "--skipped", "--error-class", "ModalityNotAllowed"]) == 0
    s_ct = _run(spark, ct, inp, lake, run_id="pacs-ct")
    assert (s_ct.new, s_ct.skipped, s_ct.decoded, s_ct.already_present) == (1, 0, 1, 5)
    assert s_ct.previously == {"new": 2, "skipped": 3}
    assert (
        read_arrow(str(lake), TENSORS, settings, columns=["modality"]).column("modality").to_pylist().count("CT") == 1
    )


def test_an_airflow_retry_of_a_committed_run_is_the_same_run(spark: Any, settings: Settings, tmp_path: Path) -> None:
    inp, lake = tmp_path / "in", tmp_path / "lake"
    _valid(inp, 6)
    _invalid(inp, 2)
    s1 = _run(spark, settings, inp, lake, run_id="pre-retry")
    again = _run(spark, settings, inp, lake, run_id="pre-retry")  # the retry finds everything committed
    assert (again.new, again.quarantined, again.already_present, again.decoded) == (6, 2, 0, 0)
    assert again.first_seen == s1.first_seen == 8
    assert read_arrow(str(lake), TENSORS, settings).num_rows == 6
    # another run is another run
    later = _run(spark, settings, inp, lake, run_id="pre-later")
    assert (later.new, later.quarantined, later.already_present, later.first_seen) == (0, 0, 8, 0)


def test_a_decoder_that_crashes_or_hangs_costs_one_file(spark: Any, settings: Settings, tmp_path: Path) -> None:
    """os.abort() and an endless sleep inside the decoder (a real child process dies / is killed)."""
    inp, lake = tmp_path / "in", tmp_path / "lake"
    _valid(inp, 4)
    (inp / "crash.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"CXR-FAULT-ABORT" + b"\x00" * 64)
    (inp / "hang.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"CXR-FAULT-HANG" + b"\x00" * 64)
    fast = settings.with_overrides(decode_timeout_s=3.0)
    s = _run(spark, fast, inp, lake, run_id="faults", decoder="tests.faulty_decoder:decode")
    assert (s.new, s.quarantined, s.reconciles) == (4, 2, True)
    assert s.quarantine_reasons == {"DecodeTimeout": 1, "DecoderCrash": 1}
    q = {r["source_uri"]: r for r in read_arrow(str(lake), QUARANTINE, settings).to_pylist()}
    assert q[str(inp / "crash.png")]["error_class"] == "DecoderCrash"
    assert "SIGABRT" in q[str(inp / "crash.png")]["error_message"]
    assert q[str(inp / "hang.png")]["error_class"] == "DecodeTimeout"
    # never retried automatically: the next run does not decode them (it would take 3 s again)
    again = _run(spark, fast, inp, lake, run_id="faults-2", decoder="tests.faulty_decoder:decode")
    assert (again.decoded, again.previously) == (0, {"new": 4, "quarantined": 2})

    # until requeued by class, with a count
    rc = main(["requeue", "--lakehouse", str(lake), "--error-class", "DecoderCrash"])
    assert rc == 0
    assert _files(lake, settings)[str(inp / "crash.png")]["outcome"] == "requeued"
    third = _run(spark, fast, inp, lake, run_id="faults-3", decoder="tests.faulty_decoder:decode")
    assert (third.decoded, third.quarantined, third.quarantine_reasons) == (1, 1, {"DecoderCrash": 1})
    assert _files(lake, settings)[str(inp / "crash.png")]["run_id"] == "faults-3"


def test_requeue_counts_and_filters(
    spark: Any, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp, lake = tmp_path / "in", tmp_path / "lake"
    _valid(inp, 1)
    bad = _invalid(inp, 3)
    _run(spark, settings, inp, lake, run_id="q1")
    capsys.readouterr()
    assert main(["requeue", "--lakehouse", str(lake), "--run-id", "nope"]) == 0
    assert "requeued 0 quarantined files from run nope" in capsys.readouterr().out
    assert main(["requeue", "--lakehouse", str(lake), "--run-id", "q1"]) == 0
    assert "requeued 3 quarantined files from run q1" in capsys.readouterr().out
    s = _run(spark, settings, inp, lake, run_id="q2")
    assert (s.quarantined, s.already_present, s.decoded, s.previously) == (3, 1, len(bad), {"new": 1})


def _committed_rows(lake: Path, settings: Settings) -> int:
    from deltalake.exceptions import TableNotFoundError

    try:
        return read_arrow(str(lake), TENSORS, settings, columns=["image_id"]).num_rows
    except TableNotFoundError:
        return 0


def test_kill_9_mid_run_keeps_committed_batches_and_the_rerun_is_exact(settings: Settings, tmp_path: Path) -> None:
    """A real `cxr preprocess` process group killed with SIGKILL at ~60% of its batches."""
    inp, lake = tmp_path / "in", tmp_path / "lake"
    total = 240
    for i in range(total):
        (inp / f"{i // 60}").mkdir(parents=True, exist_ok=True)
        (inp / f"{i // 60}" / f"x{i:04d}.png").write_bytes(png_bytes(to_uint(synthetic_cxr(96, 96, seed=i), 8)))
    env = {
        **os.environ,
        "CXR_COMMIT_EVERY_IMAGES": "20",
        "CXR_SPARK_MASTER": "local[2]",
        "CXR_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "PYTHONPATH": str(REPO),
    }
    cmd = [sys.executable, "-m", "cxr.cli", "preprocess", "--input", str(inp), "--lakehouse", str(lake)]
    kill_group_when(
        [*cmd, "--run-id", "killed", "--no-progress"],
        env,
        REPO,
        lambda: _committed_rows(lake, settings) >= total * 0.6,
        poll_s=0.2,
    )
    kept = _committed_rows(lake, settings)
    assert total * 0.6 <= kept < total and kept % 20 == 0, kept  # whole batches only

    # the retry runs under the same run id, as Airflow's retry of the task does
    rerun = subprocess.run(
        [*cmd, "--run-id", "killed", "--json", "--no-progress"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    import json

    s = json.loads(rerun.stdout)
    # the run's summary covers both attempts: every image new in this run, only the rest decoded now
    assert (s["new"], s["decoded"], s["already_present"], s["reconciles"]) == (total, total - kept, 0, True)
    ids = read_arrow(str(lake), TENSORS, settings, columns=["image_id", "run_id"])
    assert ids.num_rows == total == len(set(ids.column("image_id").to_pylist()))
    assert set(ids.column("run_id").to_pylist()) == {"killed"}
    ledger = _files(lake, settings)
    assert len(ledger) == total and {r["outcome"] for r in ledger.values()} == {"new"}

    # the killed batch's data files are orphans; maintenance removes exactly those
    root = lake / "tensors"
    data = {str(p.relative_to(root)) for p in root.rglob("*.parquet") if "_delta_log" not in p.parts}
    referenced = referenced_paths(str(lake), TENSORS, settings)
    orphans = data - referenced
    young = main(["maintain", "--lakehouse", str(lake)])  # default 24 h: nothing this young is touched
    assert young == 0 and {str(p.relative_to(root)) for p in root.rglob("*.parquet")} >= data
    assert main(["maintain", "--lakehouse", str(lake), "--older-than", "0"]) == 0
    after = {str(p.relative_to(root)) for p in root.rglob("*.parquet") if "_delta_log" not in p.parts}
    assert after == referenced & data and not (after & orphans)
    for spec in (TENSORS, QUARANTINE, FILES):
        t = open_table(str(lake), spec, settings)
        left = {
            str(p.relative_to(lake / spec.name))
            for p in (lake / spec.name).rglob("*.parquet")
            if "_delta_log" not in p.parts
        }
        assert left <= referenced_paths(str(lake), spec, settings), spec.name
        assert t.protocol().min_reader_version == 1 and t.protocol().min_writer_version == 2
    assert read_arrow(str(lake), TENSORS, settings).num_rows == total


class _ThrottlingS3:
    """A tiny S3 endpoint (path-style ListObjectsV2 and GetObject) that answers 503 SlowDown to every
    GET of the objects named in ``throttled``: the real fault an archive on S3 shows under load."""

    def __init__(self, objects: dict[str, bytes], throttled: set[str], cut_after: dict[str, int] | None = None) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlsplit

        self.objects, self.throttled, self.gets = objects, throttled, Counter[str]()
        self.cut_after = cut_after or {}  # key -> bytes sent before the connection breaks
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/xml") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Last-Modified", "Tue, 01 Dec 2026 00:00:00 GMT")
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                bucket, _, key = url.path.lstrip("/").partition("/")
                if not key:  # ListObjectsV2
                    prefix = parse_qs(url.query).get("prefix", [""])[0]
                    items = "".join(
                        f"<Contents><Key>{k}</Key><LastModified>2026-12-01T00:00:00.000Z</LastModified>"
                        f'<ETag>"e"</ETag><Size>{len(v)}</Size><StorageClass>STANDARD</StorageClass></Contents>'
                        for k, v in sorted(outer.objects.items())
                        if k.startswith(prefix)
                    )
                    body = (
                        '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                        f'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>{bucket}</Name><Prefix>{prefix}</Prefix>'
                        f"<KeyCount>{items.count('<Contents>')}</KeyCount><MaxKeys>1000</MaxKeys>"
                        f"<IsTruncated>false</IsTruncated>{items}</ListBucketResult>"
                    )
                    self._send(200, body.encode())
                    return
                outer.gets[key] += 1
                if key in outer.throttled:
                    self._send(
                        503, b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    )
                elif key in outer.cut_after:  # the full length announced, then the connection breaks
                    payload = outer.objects[key]
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload[: outer.cut_after[key]])
                    self.wfile.flush()
                    self.close_connection = True
                elif key in outer.objects:
                    self._send(200, outer.objects[key], "application/octet-stream")
                else:
                    self._send(404, b"<Error><Code>NoSuchKey</Code><Message>missing</Message></Error>")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_throttled_file_is_retried_then_left_for_the_next_run(spark: Any, settings: Settings, tmp_path: Path) -> None:
    from lakehouse import storage
    from lakehouse.errors import TransientReadError

    objects = {f"in/img{i}.png": png_bytes(to_uint(synthetic_cxr(64, 80, seed=300 + i), 8)) for i in range(3)}
    fake = _ThrottlingS3(objects, throttled={"in/img1.png"})
    try:
        s3 = settings.with_overrides(s3_endpoint_url=fake.url, s3_max_attempts=2)
        storage._s3_client.cache_clear()
        # the read retries with backoff (botocore's own retries, then ours) before it gives up
        with pytest.raises(TransientReadError, match="SlowDown"):
            storage.read_bytes("s3://bucket/in/img1.png", s3, backoff=(0.01,))
        assert fake.gets["in/img1.png"] >= 2 * 2  # two tries, each of botocore's retries with backoff
        lake = tmp_path / "lake"
        s1 = _run(spark, s3, "s3://bucket/in", lake, run_id="throttled")
        assert (s1.new, s1.retryable, s1.quarantined, s1.reconciles) == (2, 1, 0, True)
        row = _files(lake, settings)["s3://bucket/in/img1.png"]
        assert (row["outcome"], row["reason_class"]) == ("retryable", "TransientReadError")
        assert read_arrow(str(lake), QUARANTINE, settings).num_rows == 0  # not a permanent failure
        assert s1.first_seen == 3  # it counts as seen, not as failed
        # the throttling passes: the next run reads it (and only it)
        fake.throttled.clear()
        s2 = _run(spark, s3, "s3://bucket/in", lake, run_id="after")
        assert (s2.new, s2.retryable, s2.already_present, s2.decoded) == (1, 0, 2, 1)
    finally:
        fake.close()
        storage._s3_client.cache_clear()


def test_maintain_compacts_and_expires_removed_files_but_keeps_published_versions(
    spark: Any, settings: Settings, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Small MERGE files are compacted; the files a compaction removed go once expired, except those of
    the published (audited) version, which stays readable."""
    import json

    from deltalake import DeltaTable

    from cxr.tasks import publish_stage
    from inference.job import run_infer
    from tests.conftest import MODEL

    inp, lake = tmp_path / "in", tmp_path / "lake"
    _valid(inp, 16)
    _run(spark, settings.with_overrides(commit_every_images=2), inp, lake, run_id="small-batches")
    run_infer(
        str(lake),
        settings=settings,
        model_id=MODEL,
        weights_dir=str(checkpoint.parent),
        commit_every=2,
        batch_size=2,  # a commit per batch of 2: eight small files to compact
        progress=False,
    )
    published = publish_stage(str(lake), run_id="small-batches")["versions"]
    rows_at_publish = DeltaTable(str(lake / "predictions")).to_pyarrow_table().sort_by("image_id")

    def maintain_json(*extra: str) -> dict[str, dict[str, int]]:
        capsys.readouterr()
        assert main(["maintain", "--lakehouse", str(lake), "--older-than", "0", "--json", *extra]) == 0
        return {t["table"]: t for t in json.loads(capsys.readouterr().out)["tables"]}

    first = maintain_json("--retain-hours", "0")
    assert first["predictions"]["files_compacted"] >= 8 and first["files"]["files_compacted"] >= 8
    # the compacted-away files belong to the published versions (every table is published): all kept
    assert first["files"]["expired_deleted"] == 0
    assert first["predictions"]["expired_deleted"] == 0
    old = DeltaTable(str(lake / "predictions"), version=published["predictions"]).to_pyarrow_table()
    assert old.sort_by("image_id").equals(rows_at_publish)
    current = DeltaTable(str(lake / "predictions"))
    assert current.version() == published["predictions"] + 1 and len(current.file_uris()) < 8

    # the default retention (a week) keeps a newly published version's predecessors for time travel
    publish_stage(str(lake), run_id="small-batches")
    assert maintain_json()["predictions"]["expired_deleted"] == 0
    # with none, they go; every file left is referenced, and the tables read the same
    last = maintain_json("--retain-hours", "0")
    assert last["predictions"]["expired_deleted"] == first["predictions"]["files_compacted"]
    assert last["files"]["expired_deleted"] == first["files"]["files_compacted"]
    for spec in (TENSORS, FILES):
        root = lake / spec.name
        left = {str(p.relative_to(root)) for p in root.rglob("*.parquet") if "_delta_log" not in p.parts}
        active = DeltaTable(str(root)).get_add_actions(flatten=True).column("path").to_pylist()
        assert left == set(active), spec.name
    assert DeltaTable(str(lake / "predictions")).to_pyarrow_table().sort_by("image_id").equals(rows_at_publish)


def test_a_lakehouse_made_before_the_ledger_gets_one_without_reading_its_files(
    spark: Any, settings: Settings, tmp_path: Path
) -> None:
    """Tensors without `files` rows (a lakehouse of an earlier release, or a kill between a batch's two
    commits): the paths in tensors are known by (path, size, mtime), not read, and recorded."""
    inp, lake = tmp_path / "in", tmp_path / "lake"
    imgs = _valid(inp, 5)
    _run(spark, settings, inp, lake, run_id="old-release")
    shutil.rmtree(lake / "files")  # what the earlier release left: no ledger
    scramble_keeping_size_and_mtime(imgs)
    s = _run(spark, settings, inp, lake, run_id="upgraded")
    assert (s.decoded, s.new, s.already_present, s.previously) == (0, 0, 5, {"new": 5})
    ledger = _files(lake, settings)
    assert {(r["outcome"], r["run_id"]) for r in ledger.values()} == {("new", "old-release")} and len(ledger) == 5


def test_a_multi_frame_object_is_skipped_from_its_header_without_downloading_its_pixels(
    spark: Any, settings: Settings, tmp_path: Path
) -> None:
    """Its download breaks after the first 300 KB (of 1.5 MB): had the pipeline read on, the file would be
    retryable; judged from the header, it is skipped. A radiograph cut the same way is retryable."""
    import io

    import numpy as np
    import pydicom

    from transforms.sample import dicom_bytes

    big = dicom_bytes(to_uint(synthetic_cxr(512, 512, seed=9), 12), bits_stored=12, seed=9)
    ds = pydicom.dcmread(io.BytesIO(big))
    ds.NumberOfFrames = 3
    ds.PixelData = bytes(ds.PixelData) * 3
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    cine, radiograph = buf.getvalue(), big
    assert len(cine) > 1_500_000 and len(radiograph) > 500_000
    objects = {"pacs/cine.dcm": cine, "pacs/dx.dcm": radiograph}
    fake = _ThrottlingS3(objects, throttled=set(), cut_after=dict.fromkeys(objects, 300_000))
    try:
        from lakehouse import storage

        s3 = settings.with_overrides(s3_endpoint_url=fake.url)
        storage._s3_client.cache_clear()
        s = _run(spark, s3, "s3://bucket/pacs", tmp_path / "lake", run_id="cut")
        assert (s.skipped, s.retryable, s.skip_reasons) == (1, 1, {"MultiFrame": 1})
        rows = _files(tmp_path / "lake", settings)
        assert rows["s3://bucket/pacs/cine.dcm"]["image_id"] is None  # not read whole, so not hashed
        assert rows["s3://bucket/pacs/dx.dcm"]["outcome"] == "retryable"
        assert np.frombuffer(cine[:8], np.uint8).size == 8
    finally:
        fake.close()
        storage._s3_client.cache_clear()


def test_a_run_with_another_pseudonym_key_is_refused(spark: Any, settings: Settings, tmp_path: Path) -> None:
    from lakehouse.errors import ConfigError

    inp, lake = tmp_path / "in", tmp_path / "lake"
    _valid(inp, 2)
    _run(spark, settings, inp, lake, run_id="key1")
    _valid(inp, 1, start=10)
    other = settings.with_overrides(pseudonym_key="another-secret")
    with pytest.raises(ConfigError, match="another key .*split every patient in two"):
        _run(spark, other, inp, lake, run_id="key2")
    assert read_arrow(str(lake), TENSORS, settings).num_rows == 2  # nothing written with the other key
    assert _run(spark, settings, inp, lake, run_id="key1-again").new == 1
