"""``cxr cost``: cost per 1k images from the run summaries' measured seconds and a prices file.

The lakehouse is made by the real pipeline (``built_lakehouse``: Spark preprocessing, the inference job);
the expected numbers are computed here from the summaries' JSON, read from disk, with the formulas of
docs/costs.md written out again.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from cxr.cli import main
from cxr.cost import DEFAULT_PRICES, _money, compute_cost, load_prices
from lakehouse.config import Settings
from lakehouse.errors import ConfigError, CxrError

CORES = 2  # the cores the tests say the runs were measured on (--cores), unless a summary records its own

#: a small prices file with round numbers, written by the tests (not the shipped one)
PRICES: dict[str, Any] = {
    "version": 1,
    "name": "test prices",
    "currency": "USD",
    "region": "test-region-1",
    "prices": {
        "emr_serverless": {
            "vcpu_hour": {
                "value": 3.6,
                "unit": "per vCPU-hour",
                "source": "test",
                "date": "2026-12-01",
                "verified": True,
            },
            "gb_hour": {"value": 0.36, "unit": "per GB-hour", "source": "test", "date": "2026-12-01", "verified": True},
        },
        "fargate": {
            "vcpu_hour": {
                "value": 7.2,
                "unit": "per vCPU-hour",
                "source": "test",
                "date": "2026-12-01",
                "verified": True,
            },
            "gb_hour": {"value": 0.72, "unit": "per GB-hour", "source": "test", "date": "2026-12-01", "verified": True},
        },
        "gpu": {
            "on_demand_hour": {
                "value": 36.0,
                "unit": "per hour",
                "source": "test",
                "date": "2026-12-01",
                "verified": True,
            },
            "spot_hour": {"value": None, "unit": "per hour", "source": "test", "date": "2026-12-01", "verified": False},
        },
        "s3": {
            "put_per_1k": {"value": 5.0, "unit": "per 1k", "source": "test", "date": "2026-12-01", "verified": True},
            "get_per_1k": {"value": 0.4, "unit": "per 1k", "source": "test", "date": "2026-12-01", "verified": True},
            "storage_gb_month": {"value": 1.0, "unit": "per GB-month", "source": "t", "date": "d", "verified": True},
        },
        "athena": {"tb_scanned": {"value": 5.0, "unit": "per TB", "source": "t", "date": "d", "verified": True}},
        "mwaa": {"environment_hour": {"value": 1.0, "unit": "per hour", "source": "t", "date": "d", "verified": True}},
    },
    "assumptions": {
        "runs_per_day": 1,
        "archive_images": 0,
        "emr_serverless": {
            "worker_vcpu": 4,
            "worker_memory_gb": 16,
            "workers": 3,
            "minimum_s": 60,
            "startup_s": 0,
            "utilisation": "measured",
        },
        "fargate": {
            "task_vcpu": 2,
            "task_memory_gb": 4,
            "tasks": 1,
            "minimum_s": 60,
            "startup_s": 30,
            "utilisation": "measured",
        },
        "gpu": {"instance_type": "g5.xlarge", "gpu": "A10G", "instances": 1, "minimum_s": 60, "startup_s": 100},
        "s3": {"get_requests_per_image": 3, "list_requests_per_image": 0.001, "put_requests_per_data_file": 2},
        "athena": {"queries_per_day": 1, "min_scan_mb": 10},
        "mwaa": {"environment_class": "mw1.small", "hours_per_day": 24},
    },
}
EMR_RATE = (3.6 + (16 / 4) * 0.36) / 3600  # money per billed vCPU-second, the workers' memory included
FARGATE_RATE = (7.2 + (4 / 2) * 0.72) / 3600


def write_prices(path: Path, body: dict[str, Any]) -> Path:
    path.write_text(json.dumps(body))
    return path


def summaries(lake: Path) -> dict[str, dict[str, Any]]:
    """The run summaries' JSON as written, by run id (one model per run here)."""
    out = {}
    for f in sorted((lake / "runs").glob("*.json")):
        body = json.loads(f.read_text())
        if isinstance(body, dict) and "run_id" in body:
            out[body["run_id"]] = body
    return out


def cores_of(body: dict[str, Any]) -> int:
    return int(body.get("cores") or body.get("extra", {}).get("cores") or CORES)


def loop_seconds(body: dict[str, Any]) -> float:
    """An inference run's scoring loop: gpu_seconds on a GPU, else compute + data wait."""
    if body["gpu_seconds"] > 0:
        return float(body["gpu_seconds"])
    return float(body["extra"]["compute_s"]) + float(body["extra"]["data_wait_s"])


# --- prices files (no lakehouse needed) ----------------------------------------------------------------------
def test_the_shipped_prices_say_they_are_unverified_and_where_they_come_from() -> None:
    prices = load_prices()
    assert (prices.version, prices.currency, prices.region) == (1, "USD", "us-east-1")
    entries = [(s, i, p) for s, items in prices.prices.items() for i, p in items.items()]
    assert len(entries) == 11
    for service, item, p in entries:
        assert p.verified is False, f"{service}.{item}"
        assert p.source.startswith("https://aws.amazon.com/"), f"{service}.{item}"
        assert p.date == "2026-12-01"
    assert sorted(prices.unverified()) == sorted(f"{s}.{i}" for s, i, _ in entries)
    assert prices.prices["gpu"]["spot_hour"].value is None  # not a list price: unknown, not invented


@pytest.mark.parametrize(
    ("path", "named"),
    [
        (("currency",), "'currency'"),
        (("prices", "fargate", "gb_hour"), "prices.fargate.gb_hour"),
        (("prices", "s3", "get_per_1k", "source"), "'prices.s3.get_per_1k' has no 'source'"),
        (("assumptions", "emr_serverless", "worker_vcpu"), "assumptions.emr_serverless.worker_vcpu"),
        (("assumptions", "mwaa"), "assumptions.mwaa"),
    ],
)
def test_a_prices_file_missing_a_key_names_it(tmp_path: Path, path: tuple[str, ...], named: str) -> None:
    body = copy.deepcopy(PRICES)
    parent = body
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_prices(write_prices(tmp_path / "p.json", body))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update(version=2), "version 2 is not supported"),
        (lambda b: b["prices"]["mwaa"]["environment_hour"].update(value=-1), "must be a number >= 0"),
        (lambda b: b["prices"]["fargate"]["vcpu_hour"].update(value=None), "only gpu.spot_hour may be unknown"),
        (lambda b: b["prices"]["athena"]["tb_scanned"].update(value="5"), "must be a number"),
        (lambda b: b["assumptions"]["fargate"].update(utilisation=1.5), 'must be "measured" or a share'),
        (lambda b: b["assumptions"].update(runs_per_day=0), "runs_per_day must be positive"),
    ],
)
def test_a_bad_prices_file_is_refused_with_the_reason(tmp_path: Path, change: Any, message: str) -> None:
    body = copy.deepcopy(PRICES)
    change(body)
    with pytest.raises(ConfigError, match=message):
        load_prices(write_prices(tmp_path / "p.json", body))


def test_cli_bad_prices_and_no_summaries_exit_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = copy.deepcopy(PRICES)
    body["version"] = 7
    bad = write_prices(tmp_path / "bad.json", body)
    (tmp_path / "lake").mkdir()
    assert main(["cost", "--lakehouse", str(tmp_path / "lake"), "--prices", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "ConfigError" in err and "version 7 is not supported" in err

    good = write_prices(tmp_path / "good.json", PRICES)
    assert main(["cost", "--lakehouse", str(tmp_path / "lake"), "--prices", str(good)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no run summaries under" in err


# --- the pipeline's lakehouse --------------------------------------------------------------------------------
@pytest.mark.slow
def test_per_1k_figures_equal_the_formulas_over_the_summaries(
    built_lakehouse: Path, settings: Settings, tmp_path: Path
) -> None:
    prices = load_prices(write_prices(tmp_path / "p.json", PRICES))
    report = compute_cost(str(built_lakehouse), settings=settings, prices=prices, cores=CORES)
    runs = summaries(built_lakehouse)
    pre, inf = runs["pre-test"], runs["inf-test"]
    assert pre["new"] > 0 and inf["predicted"] > 0

    # preprocessing: no run without new images, so its start is not told apart: all of its wall is work;
    # measured utilisation: billed vCPU-s = wall x cores
    assert report.preprocess is not None
    billed_pre = pre["seconds"] * cores_of(pre) / pre["new"]
    assert report.preprocess.billed_vcpu_s_per_image == pytest.approx(billed_pre, rel=1e-12)
    assert report.per_1k["preprocess_emr_serverless"] == pytest.approx(1000 * billed_pre * EMR_RATE, rel=1e-12)
    cpu_pre = pre["cpu_seconds"] if pre["cpu_seconds"] > 0 else pre["seconds"] * cores_of(pre)
    assert report.preprocess.cpu_s == pytest.approx(cpu_pre, rel=1e-12)

    # inference: the scoring loop's timers tell the start (model load) from the per-image work
    [stage] = report.inference_cpu
    loop = loop_seconds(inf)
    billed_inf = loop * cores_of(inf) / inf["predicted"]
    assert stage.billed_vcpu_s_per_image == pytest.approx(billed_inf, rel=1e-12)
    assert stage.overhead_s == pytest.approx(inf["seconds"] - loop, rel=1e-12)
    assert report.per_1k["inference_fargate"] == pytest.approx(1000 * billed_inf * FARGATE_RATE, rel=1e-12)
    assert report.per_1k["inference_gpu_on_demand"] is None  # no GPU run here: unknown, not zero
    assert any("no GPU inference run measured" in n for n in report.notes)

    # S3 requests: PUTs for each data file (and its commit) per image, LIST pages, 3 GETs per image
    tb = report.table_bytes
    assert tb.tensor_files_per_image is not None and tb.prediction_files_per_row is not None
    puts = 2 * (tb.tensor_files_per_image + tb.prediction_files_per_row) + 0.001
    s3 = puts * 5.0 / 1000 + 3 * 0.4 / 1000
    assert report.per_1k["s3_requests"] == pytest.approx(1000 * s3, rel=1e-12)
    total = 1000 * (billed_pre * EMR_RATE + billed_inf * FARGATE_RATE + s3)
    assert report.per_1k["total_cpu"] == pytest.approx(total, rel=1e-12)

    # an assumed utilisation: billed vCPU-s = the work's CPU-seconds / u
    body = copy.deepcopy(PRICES)
    body["assumptions"]["emr_serverless"]["utilisation"] = 0.5
    body["assumptions"]["fargate"]["utilisation"] = 0.25
    assumed = compute_cost(
        str(built_lakehouse), settings=settings, prices=load_prices(write_prices(tmp_path / "u.json", body)), cores=2
    )
    cpu_inf = inf["cpu_seconds"] if inf["cpu_seconds"] > 0 else inf["seconds"] * cores_of(inf)
    assert assumed.preprocess is not None
    assert assumed.preprocess.billed_vcpu_s_per_image == pytest.approx(cpu_pre / 0.5 / pre["new"], rel=1e-12)
    work_cpu_inf = cpu_inf * loop / inf["seconds"]  # the run's CPU shared as its wall seconds are
    assert assumed.inference_cpu[0].billed_vcpu_s_per_image == pytest.approx(
        work_cpu_inf / 0.25 / inf["predicted"], rel=1e-12
    )


@pytest.mark.slow
def test_a_day_worked_by_hand(built_lakehouse: Path, settings: Settings, tmp_path: Path) -> None:
    """The volume table's 1,000 and 400,000 images/day rows and the break-even, from the pipeline's
    summaries read back, computed step by step."""
    prices = load_prices(write_prices(tmp_path / "p.json", PRICES))
    report = compute_cost(str(built_lakehouse), settings=settings, prices=prices, cores=CORES)
    runs = summaries(built_lakehouse)
    pre, inf = runs["pre-test"], runs["inf-test"]
    tb = report.table_bytes
    assert tb.tensor_files_per_image is not None and tb.prediction_files_per_row is not None

    # fixed per day: MWAA 24 h x 1.0 = 24; Athena 1 query at the 10 MB minimum (an empty archive) at 5 per
    # TB = 5e-5; the archive's storage: 0 images = 0
    assert report.fixed_per_day == pytest.approx(
        {"mwaa": 24.0, "athena": 5e-5, "archive_storage": 0.0, "total": 24.00005}
    )
    fixed = 24.00005

    pre_per_image = pre["seconds"] * cores_of(pre) / pre["new"]  # billed vCPU-s (start not told apart)
    loop = loop_seconds(inf)
    inf_per_image = loop * cores_of(inf) / inf["predicted"]
    inf_start = inf["seconds"] - loop
    s3_per_image = (2 * (tb.tensor_files_per_image + tb.prediction_files_per_row) + 0.001) * 0.005 + 3 * 0.0004

    for n in (1_000, 400_000):
        # EMR Serverless: 3 workers x 4 vCPU, each billed at least 60 s; the run's work n x per-image
        emr_vcpu_s = max(12 * 60, 12 * 0 + n * pre_per_image)
        # Fargate: one 2-vCPU task, billed from the image pull (30 s) and the model load, at least 60 s
        fargate_vcpu_s = max(2 * 60, 2 * (30 + inf_start) + n * inf_per_image)
        day = fixed + emr_vcpu_s * EMR_RATE + fargate_vcpu_s * FARGATE_RATE + n * s3_per_image
        [row] = [r for r in report.volumes if r["images_per_day"] == n]
        assert row["preprocess"] == pytest.approx(emr_vcpu_s * EMR_RATE, rel=1e-12)
        assert row["inference_fargate"] == pytest.approx(fargate_vcpu_s * FARGATE_RATE, rel=1e-12)
        assert row["total_cpu"] == pytest.approx(day, rel=1e-12)
        assert row["per_1k_cpu"] == pytest.approx(1000 * day / n, rel=1e-12)
        assert row["fixed_share_cpu"] == pytest.approx(fixed / day, rel=1e-12)
        assert row["per_1k_gpu"] is None
    per_image = pre_per_image * EMR_RATE + inf_per_image * FARGATE_RATE + s3_per_image
    assert report.break_even_images_per_day == pytest.approx(fixed / per_image, rel=1e-12)
    assert [r["images_per_day"] for r in report.volumes] == [1_000, 10_000, 100_000, 400_000]


@pytest.mark.slow
def test_json_output_schema(
    built_lakehouse: Path, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prices_file = write_prices(tmp_path / "p.json", PRICES)
    expected = compute_cost(str(built_lakehouse), settings=settings, prices=load_prices(prices_file), cores=2)
    args = ["cost", "--lakehouse", str(built_lakehouse), "--prices", str(prices_file), "--cores", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out  # a pipe: numbers are printed whole, not cut to 80 columns
    be = expected.break_even_images_per_day
    assert be is not None and f"break-even (per-image cost = fixed cost per day): {be:,.0f} images/day" in printed
    row = expected.volumes[-1]
    cells = rf"400,000 │\s+{re.escape(_money(row['preprocess']))} │\s+{re.escape(_money(row['inference_fargate']))} │"
    assert re.search(cells, printed), printed

    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {
        "format",
        "lakehouse",
        "currency",
        "region",
        "prices",
        "assumptions",
        "measured",
        "per_1k_images",
        "storage_per_1k_images_month",
        "fixed_per_day",
        "break_even_images_per_day",
        "break_even_images_per_day_gpu",
        "volumes",
        "notes",
    }
    assert (out["format"], out["currency"], out["region"]) == (1, "USD", "test-region-1")
    assert out["prices"]["version"] == 1 and out["prices"]["unverified"] == ["gpu.spot_hour"]
    assert out["prices"]["prices"]["mwaa"]["environment_hour"]["source"] == "t"
    assert set(out["per_1k_images"]) == {
        "preprocess_emr_serverless",
        "inference_fargate",
        "inference_gpu_on_demand",
        "inference_gpu_spot",
        "s3_requests",
        "total_cpu",
        "total_gpu",
    }
    assert out["per_1k_images"] == pytest.approx(expected.per_1k)
    pre = out["measured"]["preprocess"]
    for key in ("runs", "images", "wall_s", "cpu_s", "overhead_s", "billed_vcpu_s_per_image", "usd_per_1k"):
        assert key in pre
    assert pre["runs"] == ["pre-test"]
    assert [s["runs"] for s in out["measured"]["inference_cpu"]] == [["inf-test"]]
    assert out["measured"]["inference_gpu"] == []
    assert [v["images_per_day"] for v in out["volumes"]] == [1_000, 10_000, 100_000, 400_000]
    for v in out["volumes"]:
        assert isinstance(v["total_cpu"], float) and v["total_gpu"] is None
    assert all(isinstance(n, str) for n in out["notes"])


@pytest.mark.slow
def test_table_bytes_come_from_the_delta_log(built_lakehouse: Path, settings: Settings) -> None:
    """Bytes per image = the live data files' sizes on disk / their rows (the log's add minus remove actions,
    read here by hand; the rows from the Parquet footers)."""
    import pyarrow.parquet as pq

    def live_files(table: Path) -> list[Path]:
        live: set[str] = set()
        for commit in sorted((table / "_delta_log").glob("*.json")):
            for line in commit.read_text().splitlines():
                action = json.loads(line)
                if "add" in action:
                    live.add(action["add"]["path"])
                elif "remove" in action:
                    live.discard(action["remove"]["path"])
        return [table / p for p in sorted(live)]

    report = compute_cost(str(built_lakehouse), settings=settings, prices=load_prices(), cores=CORES)
    for name, per_row, files_per_row in (
        ("tensors", report.table_bytes.tensor_bytes_per_image, report.table_bytes.tensor_files_per_image),
        ("predictions", report.table_bytes.prediction_bytes_per_row, report.table_bytes.prediction_files_per_row),
    ):
        files = live_files(built_lakehouse / name)
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        assert per_row == pytest.approx(sum(f.stat().st_size for f in files) / rows, rel=1e-12), name
        assert files_per_row == pytest.approx(len(files) / rows, rel=1e-12), name


@pytest.mark.slow
def test_older_summaries_without_cpu_seconds_count_wall_times_cores(
    built_lakehouse: Path, settings: Settings, tmp_path: Path
) -> None:
    from lakehouse.runs import PreprocessRun, read_summaries, write_summary

    lake = tmp_path / "lake"
    shutil.copytree(built_lakehouse, lake)
    [record] = read_summaries(str(lake), settings, kind=PreprocessRun, run_id="pre-test")
    record.cpu_seconds = 0.0  # as a summary written before the fields existed reads
    record.cores = 0
    write_summary(str(lake), record, settings)  # rewritten as a retried run rewrites its summary
    body = summaries(lake)["pre-test"]
    assert body["cpu_seconds"] == 0.0
    prices_body = copy.deepcopy(PRICES)
    prices_body["assumptions"]["emr_serverless"]["utilisation"] = 0.5
    report = compute_cost(
        str(lake), settings=settings, prices=load_prices(write_prices(tmp_path / "p.json", prices_body)), cores=3
    )
    assert report.preprocess is not None
    assert report.preprocess.runs_without_cpu == ["pre-test"]
    assert report.preprocess.cpu_s == pytest.approx(body["seconds"] * 3, rel=1e-12)
    assert report.preprocess.billed_vcpu_s_per_image == pytest.approx(
        body["seconds"] * 3 / 0.5 / body["new"], rel=1e-12
    )
    assert report.preprocess.measured_utilisation is None
    assert any("pre-test" in n and "wall seconds x cores" in n for n in report.notes)


@pytest.mark.slow
def test_a_run_with_no_new_image_measures_the_start(
    built_lakehouse: Path, settings: Settings, spark, samples_dir: Path, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A second preprocessing run over the same files writes nothing: its wall time is the per-run start,
    taken out of the first run's per-image work."""
    from transforms.preprocess import run_preprocess

    lake = tmp_path / "lake"
    shutil.copytree(built_lakehouse, lake)
    noop = run_preprocess(
        str(samples_dir), str(lake), settings=settings, run_id="pre-noop", spark=spark, progress=False
    )
    assert noop.new == 0
    prices = load_prices(write_prices(tmp_path / "p.json", PRICES))
    report = compute_cost(str(lake), settings=settings, prices=prices, cores=CORES)
    runs = summaries(lake)
    pre, idle = runs["pre-test"], runs["pre-noop"]
    start = min(pre["seconds"], idle["seconds"])
    assert report.preprocess is not None
    assert report.preprocess.no_op_runs == ["pre-noop"] and report.preprocess.runs == ["pre-test"]
    assert report.preprocess.overhead_s == pytest.approx(start, rel=1e-12)
    assert report.preprocess.billed_vcpu_s_per_image == pytest.approx(
        (pre["seconds"] - start) * cores_of(pre) / pre["new"], rel=1e-12
    )


@pytest.mark.slow
def test_gpu_runs_give_the_instance_its_images_per_second(
    built_lakehouse: Path, settings: Settings, tmp_path: Path
) -> None:
    """No GPU here: the inference summary is rewritten as a GPU host writes it (its device's name and
    gpu_seconds, the scoring loop's wall time), beside the CPU run."""
    from dataclasses import replace

    from lakehouse.runs import InferRun, read_summaries, write_summary

    lake = tmp_path / "lake"
    shutil.copytree(built_lakehouse, lake)
    [cpu_run] = read_summaries(str(lake), settings, kind=InferRun, run_id="inf-test")
    gpu_run = replace(cpu_run, run_id="inf-gpu", device="NVIDIA H200", gpu_seconds=0.5, seconds=4.5)
    write_summary(str(lake), gpu_run, settings)
    body = summaries(lake)["inf-gpu"]
    report = compute_cost(str(lake), settings=settings, prices=load_prices(write_prices(tmp_path / "p.json", PRICES)))
    [g] = report.inference_gpu
    n = body["predicted"]
    assert (g.device, g.runs) == ("NVIDIA H200", ["inf-gpu"])
    assert g.loop_images_per_s == pytest.approx(n / 0.5, rel=1e-12)
    assert g.images_per_s == pytest.approx(n / 4.5, rel=1e-12)
    assert g.overhead_s == pytest.approx(4.0, rel=1e-12)
    assert report.per_1k["inference_gpu_on_demand"] == pytest.approx(1000 * (0.5 / n) * 36.0 / 3600, rel=1e-12)
    assert report.per_1k["inference_gpu_spot"] is None  # spot price unknown in the file
    assert any("measured on NVIDIA H200, priced as g5.xlarge (A10G)" in note for note in report.notes)
    # a day of 400,000 images on one instance: its start (100 s assumed + 4 s measured) and the work
    [row] = [r for r in report.volumes if r["images_per_day"] == 400_000]
    assert row["inference_gpu"] == pytest.approx(36.0 / 3600 * max(60, 104 + 400_000 * 0.5 / n), rel=1e-12)


@pytest.mark.slow
def test_run_ids_select_runs(built_lakehouse: Path, settings: Settings) -> None:
    report = compute_cost(str(built_lakehouse), settings=settings, prices=load_prices(), run_ids=["inf-test"], cores=2)
    assert report.preprocess is None and [s.runs for s in report.inference_cpu] == [["inf-test"]]
    assert report.per_1k["total_cpu"] is None  # no preprocessing measured: the total is unknown
    assert any("no preprocessing run measured" in n for n in report.notes)
    with pytest.raises(CxrError, match="no run summaries .* for run ids nope"):
        compute_cost(str(built_lakehouse), settings=settings, prices=load_prices(), run_ids=["nope"])


def test_default_prices_file_is_the_shipped_one() -> None:
    assert DEFAULT_PRICES.is_file() and load_prices(DEFAULT_PRICES).path == str(DEFAULT_PRICES)
