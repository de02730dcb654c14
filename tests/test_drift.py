"""The drift gate, end to end with the real stages: a day like the reference day publishes, a day with
30% of its images inverted fails the gate and publishes nothing (queries, Athena manifests and the report
stay on the previous published version)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from deltalake import DeltaTable

from cxr.cli import main
from cxr.report import build_report
from cxr.sql import query
from lakehouse.config import Settings
from tests.conftest import MODEL

pytestmark = pytest.mark.slow


def _day(folder: Path, seeds: range, *, inverted_share: float = 0.0) -> None:
    """PNG chest-X-ray-like images from the sample generator; the first share of every ten inverted."""
    from transforms.sample import png_bytes, synthetic_cxr, to_uint

    folder.mkdir(parents=True)
    for k, seed in enumerate(seeds):
        pixels = to_uint(synthetic_cxr(256, 256, seed=seed), 8)
        if k % 10 < round(inverted_share * 10):
            pixels = 255 - pixels
        (folder / f"img{seed:05d}.png").write_bytes(png_bytes(pixels))


def _count(lake: Path, table: str, settings: Settings, *, published: bool = True) -> int:
    sql = f"SELECT COUNT(*) AS n FROM {table}"
    return int(query(str(lake), sql, settings=settings, published=published)["n"][0].as_py())


def test_a_drifted_run_fails_the_gate_and_publishes_nothing(
    tmp_path: Path, settings: Settings, spark, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    from inference.job import run_infer
    from transforms.preprocess import run_preprocess

    lake = tmp_path / "lake"

    def run(name: str, seeds: range, inverted_share: float = 0.0) -> tuple[int, int]:
        _day(tmp_path / name, seeds, inverted_share=inverted_share)
        run_preprocess(
            str(tmp_path / name), str(lake), settings=settings, run_id=f"pre-{name}", spark=spark, progress=False
        )
        run_infer(
            str(lake),
            settings=settings,
            model_id=MODEL,
            weights_dir=str(checkpoint.parent),
            run_id=f"inf-{name}",
            progress=False,
        )
        drift = main(["drift", "--lakehouse", str(lake), "--run-id", f"inf-{name}"])
        published = main(
            ["publish", "--lakehouse", str(lake), "--run-id", f"pre-{name}", "--infer-run-id", f"inf-{name}"]
        )
        return drift, published

    # day 1 becomes the reference once published; day 2 is another seed range of the same generator
    assert run("day1", range(0, 150)) == (0, 0)
    assert run("day2", range(1000, 1060)) == (0, 0)
    drift = DeltaTable(str(lake / "drift")).to_pandas()
    day2 = drift[drift["run_id"] == "inf-day2"]
    assert set(day2["reference_run_id"]) == {"inf-day1"}
    gated = day2[day2["metric"] == "psi"]
    assert set(gated["status"]) == {"pass"} and (gated["value"] <= gated["threshold"]).all()
    assert len(gated) == 18 + 5 + 7  # every pathology, five intensity statistics, seven lineage mixes
    record = (lake / "reports" / "published.json").read_text()
    manifest = (lake / "_published" / "predictions" / "manifest").read_text()
    assert json.loads(record)["reference_infer_run_id"] == "inf-day1"
    capsys.readouterr()
    # the reference's input statistics were computed once, from its tensors, and cached
    from cxr.drift import _input_frame

    cache = lake / "reports" / "drift_reference" / "inf-day1.parquet"
    cached = pd.read_parquet(cache).sort_values("image_id").reset_index(drop=True)
    direct = _input_frame(str(lake), settings, sorted(cached["image_id"])).sort_values("image_id")
    pd.testing.assert_frame_equal(cached, direct.reset_index(drop=True))
    assert len(cached) == 150
    cached_at = cache.stat().st_mtime_ns

    # day 3: 30% of the images inverted
    assert run("day3", range(2000, 2060), inverted_share=0.3) == (1, 1)
    assert cache.stat().st_mtime_ns == cached_at  # read from the cache, not from the reference's tensors
    out = capsys.readouterr().out
    assert "drift of inf-day3 against inf-day1: FAIL" in out and "input.mean" in out
    drift = DeltaTable(str(lake / "drift")).to_pandas()
    day3 = drift[(drift["run_id"] == "inf-day3") & (drift["metric"] == "psi")]
    failed = set(day3.loc[day3["status"] == "fail", "feature"])
    assert "input.mean" in failed
    assert (day3.loc[day3["status"] == "fail", "value"] > day3.loc[day3["status"] == "fail", "threshold"]).all()

    # nothing of day 3 is visible: the publish record, the Athena manifest, queries and the report
    assert (lake / "reports" / "published.json").read_text() == record
    assert (lake / "_published" / "predictions" / "manifest").read_text() == manifest
    assert _count(lake, "predictions", settings) == 210 and _count(lake, "tensors", settings) == 210
    assert _count(lake, "predictions", settings, published=False) == 270
    html = build_report(str(lake), settings=settings)
    assert 'data-total="predictions">210<' in html
    # the report's drift section is day 2's published verdict, with this run's probabilities over the reference's
    section = html[html.index('<section id="drift">') : html.index('<section id="top-images">')]
    assert 'data-drift-verdict="pass"' in section and "inf-day2" in section and "inf-day3" not in section
    assert section.count('data-drift-hist="') == 18

    # day 4 is like day 1, but day 3 is still unpublished and failed: it does not ride along
    assert run("day4", range(3000, 3060)) == (0, 1)
    assert (lake / "reports" / "published.json").read_text() == record
    assert _count(lake, "predictions", settings) == 210
    # an operator accepts day 3's drift (a new scanner, say) by checking it again with a higher limit:
    # the rows record the limit used, and the next publish makes days 3 and 4 visible
    assert main(["drift", "--lakehouse", str(lake), "--run-id", "inf-day3", "--max-psi", "5"]) == 0
    assert main(["publish", "--lakehouse", str(lake), "--run-id", "pre-day4", "--infer-run-id", "inf-day4"]) == 0
    assert _count(lake, "predictions", settings) == 330
    accepted = DeltaTable(str(lake / "drift")).to_pandas()
    accepted = accepted[(accepted["run_id"] == "inf-day3") & (accepted["metric"] == "psi")]
    assert set(accepted["status"]) == {"pass"} and (accepted["threshold"] >= 5).all()
