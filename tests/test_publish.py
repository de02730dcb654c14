"""Write-audit-publish over several days with the CLI's audit-and-publish step (``cxr publish``): a run
that fails the quarantine-share gate is never published by a later clean run, until an operator accepts
it (recorded); a run that scored nothing passes the drift gate; publish records the audited versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from deltalake import DeltaTable

from cxr.cli import main
from cxr.sql import query
from lakehouse.config import Settings
from tests.conftest import MODEL

pytestmark = pytest.mark.slow


def _published(lake: Path) -> dict[str, int]:
    return json.loads((lake / "reports" / "published.json").read_text())["versions"]


def _tensors(lake: Path, settings: Settings) -> int:
    return int(query(str(lake), "SELECT COUNT(*) AS n FROM tensors", settings=settings)["n"][0].as_py())


def test_a_failed_run_waits_for_acceptance_and_an_empty_run_passes(
    built_lakehouse: Path,
    samples_dir: Path,
    tmp_path: Path,
    settings: Settings,
    spark,
    checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # type: ignore[no-untyped-def]
    from cxr.drift import compute_drift
    from inference.job import run_infer
    from transforms.preprocess import run_preprocess
    from transforms.sample import write_samples

    lake = Path(shutil.copytree(built_lakehouse, tmp_path / "lake"))
    before = _tensors(lake, settings)

    def day(name: str, folder: Path) -> int:
        run_preprocess(str(folder), str(lake), settings=settings, run_id=f"pre-{name}", spark=spark, progress=False)
        run_infer(
            str(lake),
            settings=settings,
            model_id=MODEL,
            weights_dir=str(checkpoint.parent),
            run_id=f"inf-{name}",
            progress=False,
        )
        compute_drift(str(lake), settings=settings, run_id=f"inf-{name}")
        return main(["publish", "--lakehouse", str(lake), "--run-id", f"pre-{name}", "--infer-run-id", f"inf-{name}"])

    # day "bad": 2 new images and every invalid kind: far above the 5% quarantine share
    bad = tmp_path / "bad"
    write_samples(bad, count=2, seed=500)
    shutil.copytree(samples_dir / "invalid", bad / "invalid")
    assert day("bad", bad) == 1
    record = (lake / "reports" / "published.json").read_text()
    assert _tensors(lake, settings) == before

    # day "good": clean, but the bad day is still unpublished: it does not ride along
    good = tmp_path / "good"
    write_samples(good, count=3, seed=900)
    assert day("good", good) == 1
    assert (lake / "reports" / "published.json").read_text() == record
    out = capsys.readouterr().out
    assert "quarantine_runs" in out

    # an operator accepts the bad day (its quarantined files stay quarantined): both days are published
    assert main(["accept", "--lakehouse", str(lake), "--run-id", "pre-bad", "--reason", "test data, known bad"]) == 0
    accepted = json.loads((lake / "reports" / "accepted.json").read_text())
    assert accepted["quarantine_share"]["pre-bad"]["reason"] == "test data, known bad"
    assert main(["publish", "--lakehouse", str(lake), "--run-id", "pre-good", "--infer-run-id", "inf-good"]) == 0
    assert _tensors(lake, settings) == before + 5
    versions = _published(lake)
    for table in ("tensors", "predictions", "drift", "files", "quarantine"):
        assert versions[table] == DeltaTable(str(lake / table)).version(), table

    # a day of byte-identical copies only: nothing new to score, no drift rows, and it publishes
    copies = tmp_path / "copies"
    copies.mkdir()
    for k, p in enumerate(sorted(good.rglob("*.png"))):
        shutil.copy(p, copies / f"copy{k}.png")
    assert day("copies", copies) == 0
    drift = DeltaTable(str(lake / "drift")).to_pandas()
    assert "inf-copies" not in set(drift["run_id"])
    assert _tensors(lake, settings) == before + 5


def test_publish_fails_an_inference_run_that_was_never_checked_for_drift(
    built_lakehouse: Path, tmp_path: Path, settings: Settings, spark, checkpoint: Path
) -> None:  # type: ignore[no-untyped-def]
    from inference.job import run_infer
    from transforms.preprocess import run_preprocess
    from transforms.sample import write_samples

    lake = Path(shutil.copytree(built_lakehouse, tmp_path / "lake"))
    write_samples(tmp_path / "new", count=2, seed=700)
    run_preprocess(str(tmp_path / "new"), str(lake), settings=settings, run_id="pre-new", spark=spark, progress=False)
    run_infer(
        str(lake),
        settings=settings,
        model_id=MODEL,
        weights_dir=str(checkpoint.parent),
        run_id="inf-new",
        progress=False,
    )
    assert main(["publish", "--lakehouse", str(lake)]) == 1  # no `cxr drift --run-id inf-new`: not audited
    assert main(["drift", "--lakehouse", str(lake), "--run-id", "inf-new"]) == 0
    assert main(["publish", "--lakehouse", str(lake)]) == 0
