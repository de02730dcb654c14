"""Cost per 1k images from the run summaries' measured seconds, priced with a versioned prices file.

The model (docs/costs.md explains it with a worked example):

* **Measured**: each run summary gives wall ``seconds``, ``cpu_seconds`` (user + system of every process of
  the run) and the images it produced (``new`` tensors for preprocessing, ``predicted`` rows for inference).
  A summary without ``cpu_seconds`` (0: written before the field existed) counts ``seconds x cores``: every
  core busy the whole run (said in the notes).
* **Billed**: EMR Serverless (preprocessing) and Fargate (CPU inference) bill *allocated* vCPU x wall time,
  and memory as allocated GB x wall time. With a utilisation ``u`` (the share of allocated vCPU time doing
  work), billed vCPU-seconds per image = CPU-seconds per image / ``u``; ``utilisation: "measured"`` takes
  ``u`` from the runs themselves (CPU-seconds / (wall x cores)), which reduces to wall x cores / images.
  Billed GB-seconds = billed vCPU-seconds x the worker's GB per vCPU. Each run bills at least
  ``workers x vCPU x max(minimum_s, startup_s + its share of the work)``.
* **GPU**: one instance type, billed per second of wall time; its images per second come from measured GPU
  runs, else it is unknown.
* **Fixed per day**: the MWAA environment (all day, whatever the images), Athena queries over the archive's
  predictions, and the archive's storage. The break-even is the images per day whose per-image cost
  equals the fixed cost.

Prices are inputs (``cxr/prices/*.json`` or ``--prices FILE``), each with its source and date; no price is a
constant here.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lakehouse.config import Settings
from lakehouse.errors import ConfigError, CxrError
from lakehouse.runs import InferRun, PreprocessRun, RunRecord, read_summaries

log = logging.getLogger(__name__)

#: the prices file format this module reads (the file's ``version``)
PRICES_FORMAT = 1
#: the prices file used without ``--prices``
DEFAULT_PRICES = Path(__file__).parent / "prices" / "aws-us-east-1.json"
#: images per day of the volume table
VOLUMES = (1_000, 10_000, 100_000, 400_000)
#: AWS's hours in a month for monthly prices (GB-month)
HOURS_PER_MONTH = 730
#: S3 storage GB are 2**30 bytes; Athena's TB is taken as 10**12 bytes and its MB as 10**6
GIB = 1 << 30
TB = 10**12
MB = 10**6

#: price keys every prices file must have: service -> items (``gpu.spot_hour`` may be null: unknown)
REQUIRED_PRICES: dict[str, tuple[str, ...]] = {
    "emr_serverless": ("vcpu_hour", "gb_hour"),
    "fargate": ("vcpu_hour", "gb_hour"),
    "gpu": ("on_demand_hour", "spot_hour"),
    "s3": ("put_per_1k", "get_per_1k", "storage_gb_month"),
    "athena": ("tb_scanned",),
    "mwaa": ("environment_hour",),
}
NULLABLE_PRICES = {("gpu", "spot_hour")}
#: assumption keys every prices file must have (numbers unless said)
REQUIRED_ASSUMPTIONS: dict[str, tuple[str, ...]] = {
    "emr_serverless": ("worker_vcpu", "worker_memory_gb", "workers", "minimum_s", "startup_s", "utilisation"),
    "fargate": ("task_vcpu", "task_memory_gb", "tasks", "minimum_s", "startup_s", "utilisation"),
    "gpu": ("instance_type", "gpu", "instances", "minimum_s", "startup_s"),
    "s3": ("get_requests_per_image", "list_requests_per_image", "put_requests_per_data_file"),
    "athena": ("queries_per_day", "min_scan_mb"),
    "mwaa": ("environment_class", "hours_per_day"),
}
_TEXT_ASSUMPTIONS = {"utilisation", "instance_type", "gpu", "environment_class", "why"}

UNTRAINED_NOTE = (
    "inference runs with the untrained stand-in: its speed is that of the trained weights (same network, same "
    "operations); only its outputs are meaningless"
)


# --- prices --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Price:
    """One price with where it came from."""

    value: float | None
    unit: str
    source: str
    date: str
    verified: bool
    note: str = ""


@dataclass(frozen=True)
class Prices:
    """A prices file, checked: every price and assumption the model needs is there."""

    path: str
    name: str
    version: int
    currency: str
    region: str
    prices: dict[str, dict[str, Price]]
    assumptions: dict[str, Any]

    def value(self, service: str, item: str) -> float:
        """The price ``service.item`` (not null)."""
        v = self.prices[service][item].value
        if v is None:
            raise ConfigError(f"{self.path}: prices.{service}.{item} is null (unknown); give a number")
        return v

    def unverified(self) -> list[str]:
        """``service.item`` of every price not marked verified."""
        return [f"{s}.{i}" for s, items in self.prices.items() for i, p in items.items() if not p.verified]

    def summary(self) -> dict[str, Any]:
        """The file's identity and every price, for ``--json``."""
        return {
            "file": self.path,
            "name": self.name,
            "version": self.version,
            "currency": self.currency,
            "region": self.region,
            "unverified": self.unverified(),
            "prices": {s: {i: asdict(p) for i, p in items.items()} for s, items in self.prices.items()},
        }


def load_prices(path: str | Path | None = None) -> Prices:
    """Read and check a prices file.

    Args:
        path: a JSON prices file; None for the shipped ``cxr/prices/aws-us-east-1.json``.

    Returns:
        The checked prices.

    Raises:
        ConfigError: the file is missing, not JSON, of another format ``version``, or lacks a price or an
            assumption (the message names the key).
    """
    p = Path(path) if path is not None else DEFAULT_PRICES
    try:
        body = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"prices file {p} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"prices file {p} cannot be read as JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ConfigError(f"prices file {p}: expected a JSON object")
    where = str(p)
    for key in ("version", "currency", "region", "prices", "assumptions"):
        if key not in body:
            raise ConfigError(f"prices file {where}: no '{key}' key")
    if body["version"] != PRICES_FORMAT:
        raise ConfigError(
            f"prices file {where}: version {body['version']!r} is not supported (this cxr reads version "
            f"{PRICES_FORMAT}); copy {DEFAULT_PRICES.name} and edit its prices"
        )
    prices: dict[str, dict[str, Price]] = {}
    for service, items in REQUIRED_PRICES.items():
        prices[service] = {i: _price(body["prices"], service, i, where) for i in items}
    assumptions = body["assumptions"]
    if not isinstance(assumptions, dict):
        raise ConfigError(f"prices file {where}: 'assumptions' must be an object")
    for key in ("runs_per_day", "archive_images"):
        _number(assumptions.get(key), f"assumptions.{key}", where)
    for service, keys in REQUIRED_ASSUMPTIONS.items():
        section = assumptions.get(service)
        if not isinstance(section, dict):
            raise ConfigError(f"prices file {where}: no 'assumptions.{service}' object")
        for k in keys:
            if k not in section:
                raise ConfigError(f"prices file {where}: no 'assumptions.{service}.{k}' key")
            if k == "utilisation":
                _utilisation(section[k], f"assumptions.{service}.{k}", where)
            elif k not in _TEXT_ASSUMPTIONS:
                _number(section[k], f"assumptions.{service}.{k}", where)
    if assumptions["runs_per_day"] <= 0:
        raise ConfigError(f"prices file {where}: assumptions.runs_per_day must be positive")
    return Prices(
        path=where,
        name=str(body.get("name", p.stem)),
        version=int(body["version"]),
        currency=str(body["currency"]),
        region=str(body["region"]),
        prices=prices,
        assumptions=assumptions,
    )


def _price(section: Any, service: str, item: str, where: str) -> Price:
    """One checked price entry."""
    key = f"prices.{service}.{item}"
    entry = section.get(service, {}).get(item) if isinstance(section, dict) else None
    if not isinstance(entry, dict):
        raise ConfigError(f"prices file {where}: no '{key}' entry")
    for k in ("value", "unit", "source", "date", "verified"):
        if k not in entry:
            raise ConfigError(f"prices file {where}: '{key}' has no '{k}'")
    value = entry["value"]
    if value is None and (service, item) not in NULLABLE_PRICES:
        raise ConfigError(f"prices file {where}: '{key}.value' is null; only gpu.spot_hour may be unknown")
    if value is not None:
        _number(value, f"{key}.value", where)
    return Price(
        value=None if value is None else float(value),
        unit=str(entry["unit"]),
        source=str(entry["source"]),
        date=str(entry["date"]),
        verified=entry["verified"] is True,
        note=str(entry.get("note", "")),
    )


def _number(value: Any, key: str, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"prices file {where}: '{key}' must be a number >= 0 (got {value!r})")


def _utilisation(value: Any, key: str, where: str) -> None:
    if value == "measured":
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(f"prices file {where}: '{key}' must be \"measured\" or a share in (0, 1] (got {value!r})")


# --- measured ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSeconds:
    """One run's measured seconds, as its summary gives them."""

    run_id: str
    images: int
    wall_s: float
    cpu_s: float
    cores: int
    gpu_s: float = 0.0
    #: wall seconds of the per-image work alone when the summary times it (inference's scoring loop)
    loop_s: float | None = None
    mtime_ms: int = 0


@dataclass
class CpuStage:
    """A CPU stage (preprocessing, or one model on one CPU engine) over its runs."""

    stage: str
    #: the model scored ("" for preprocessing)
    model: str
    #: where it ran: the service for preprocessing, the device and graph for inference
    engine: str
    runs: list[str]
    images: int
    wall_s: float
    cpu_s: float
    #: mean wall seconds per run that do not depend on its images (start, model load), and how they were told
    #: apart: billed once per run, not per image
    overhead_s: float
    overhead_from: str
    #: wall seconds of per-image work (wall_s less every run's overhead)
    work_s: float
    #: runs whose summary had no cpu_seconds (counted as wall x cores)
    runs_without_cpu: list[str]
    #: CPU-seconds / (wall x cores) over the runs that measured CPU; None when none did
    measured_utilisation: float | None
    #: the utilisation billed vCPU-seconds are computed with ("measured" or the assumed share)
    utilisation: float | str
    #: CPU-seconds of the per-image work per image (a run's CPU-seconds shared as its wall seconds are)
    cpu_s_per_image: float
    billed_vcpu_s_per_image: float
    billed_gb_s_per_image: float
    usd_per_1k: float
    no_op_runs: list[str] = field(default_factory=list)
    latest_mtime_ms: int = 0


@dataclass
class GpuStage:
    """One model on one GPU over its runs."""

    model: str
    device: str
    runs: list[str]
    images: int
    wall_s: float
    gpu_s: float
    #: mean wall seconds per run outside the scoring loop (start, model load), and how they were told apart
    overhead_s: float
    overhead_from: str
    #: images per second over whole runs, and in the scoring loop alone (what a large run approaches)
    images_per_s: float
    loop_images_per_s: float
    #: the instance's money per 1k images at the scoring loop's speed
    usd_per_1k: float
    usd_per_1k_spot: float | None
    latest_mtime_ms: int = 0


@dataclass(frozen=True)
class TableBytes:
    """Sizes from the Delta logs (add actions), not from reading data."""

    tensor_bytes_per_image: float | None
    tensor_files_per_image: float | None
    prediction_bytes_per_row: float | None
    prediction_files_per_row: float | None


@dataclass
class CostReport:
    """What ``cxr cost`` prints: measured per-image figures, their price per 1k images, the fixed costs per
    day, the break-even and the cost per 1k images at several volumes. Money in ``currency``."""

    lakehouse_uri: str
    prices: Prices
    preprocess: CpuStage | None
    inference_cpu: list[CpuStage]
    inference_gpu: list[GpuStage]
    #: model ids priced (each image scored by each of them)
    models: list[str]
    table_bytes: TableBytes
    per_1k: dict[str, float | None]
    storage_per_1k_month: float | None
    fixed_per_day: dict[str, float]
    break_even_images_per_day: float | None
    break_even_images_per_day_gpu: float | None
    volumes: list[dict[str, Any]]
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The machine-readable report (``cxr cost --json``)."""
        return {
            "format": 1,
            "lakehouse": self.lakehouse_uri,
            "currency": self.prices.currency,
            "region": self.prices.region,
            "prices": self.prices.summary(),
            "assumptions": self.prices.assumptions,
            "measured": {
                "preprocess": asdict(self.preprocess) if self.preprocess else None,
                "inference_cpu": [asdict(s) for s in self.inference_cpu],
                "inference_gpu": [asdict(s) for s in self.inference_gpu],
                "models": self.models,
                "table_bytes": asdict(self.table_bytes),
            },
            "per_1k_images": self.per_1k,
            "storage_per_1k_images_month": self.storage_per_1k_month,
            "fixed_per_day": self.fixed_per_day,
            "break_even_images_per_day": self.break_even_images_per_day,
            "break_even_images_per_day_gpu": self.break_even_images_per_day_gpu,
            "volumes": self.volumes,
            "notes": self.notes,
        }


def compute_cost(
    lakehouse_uri: str,
    *,
    settings: Settings,
    prices: Prices,
    run_ids: Sequence[str] | None = None,
    cores: int | None = None,
) -> CostReport:
    """Price the lakehouse's measured runs.

    Args:
        lakehouse_uri: a folder or ``s3://bucket/prefix``.
        settings: for the storage endpoint.
        prices: from :func:`load_prices`.
        run_ids: only these runs' summaries (default: every run).
        cores: cores of the machine that measured the runs, for summaries that do not record theirs
            (default: this machine's).

    Returns:
        The report.

    Raises:
        CxrError: the lakehouse has no run summaries (or none of ``run_ids``), or ``cores`` is below 1.
    """
    if cores is not None and cores < 1:
        raise CxrError(f"--cores must be at least 1 (got {cores})")
    records = _read_records(lakehouse_uri, settings, run_ids)
    if not records:
        which = f" for run ids {', '.join(run_ids)}" if run_ids else ""
        raise CxrError(f"no run summaries under {lakehouse_uri}/runs{which}: run cxr preprocess and cxr infer first")
    notes: list[str] = []
    default_cores = cores or os.cpu_count() or 1
    if any(_recorded_cores(r) is None for r in records):
        source = "--cores" if cores else "this machine's core count"
        notes.append(
            f"summaries that do not record their machine's cores are taken as measured on {default_cores} cores "
            f"({source})"
        )
    pre = [r for r in records if isinstance(r, PreprocessRun)]
    inf = [r for r in records if isinstance(r, InferRun)]
    pre_runs = [_seconds(r, r.new, default_cores) for r in pre]
    cpu_inf: dict[tuple[str, str], list[RunSeconds]] = {}
    gpu_inf: dict[tuple[str, str], list[RunSeconds]] = {}
    for r in inf:
        runs = gpu_inf if _is_gpu(r) else cpu_inf
        runs.setdefault((r.model_id, _engine(r)), []).append(_seconds(r, r.predicted, default_cores))
    if any(r.untrained for r in inf):
        notes.append(UNTRAINED_NOTE)
    table_bytes = _table_bytes(lakehouse_uri, settings)
    return price_runs(
        lakehouse_uri=lakehouse_uri,
        prices=prices,
        preprocess_runs=pre_runs,
        cpu_inference=cpu_inf,
        gpu_inference=gpu_inf,
        table_bytes=table_bytes,
        notes=notes,
    )


def price_runs(
    *,
    lakehouse_uri: str,
    prices: Prices,
    preprocess_runs: list[RunSeconds],
    cpu_inference: dict[tuple[str, str], list[RunSeconds]],
    gpu_inference: dict[tuple[str, str], list[RunSeconds]],
    table_bytes: TableBytes,
    notes: list[str] | None = None,
) -> CostReport:
    """Price measured runs (no I/O): the model of the module docstring.

    Args:
        lakehouse_uri: named in the report.
        prices: from :func:`load_prices`.
        preprocess_runs: the preprocessing runs' seconds (images = new tensors).
        cpu_inference: CPU inference runs by (model id, engine) (images = predicted rows).
        gpu_inference: GPU inference runs by (model id, device).
        table_bytes: sizes from the Delta logs.
        notes: notes so far (added to).

    Returns:
        The report.
    """
    notes = list(notes or [])
    a = prices.assumptions
    emr, fg, gpu = a["emr_serverless"], a["fargate"], a["gpu"]
    emr_rate = _rate(prices, "emr_serverless", emr["worker_memory_gb"] / emr["worker_vcpu"])
    fg_rate = _rate(prices, "fargate", fg["task_memory_gb"] / fg["task_vcpu"])

    preprocess = (
        _cpu_stage("preprocess", "", "EMR Serverless", preprocess_runs, emr, emr_rate, notes)
        if preprocess_runs
        else None
    )
    if preprocess is None:
        notes.append("no preprocessing run measured: preprocessing cost unknown")
    elif preprocess.images == 0:
        preprocess = None
        notes.append("no preprocessing run wrote new tensors: preprocessing seconds per image unknown")

    inference_cpu = [
        s
        for (model, engine), runs in sorted(cpu_inference.items())
        if (s := _cpu_stage("inference", model, engine, runs, fg, fg_rate, notes)).images
    ]
    inference_gpu = [
        g
        for (model, device), runs in sorted(gpu_inference.items())
        if (g := _gpu_stage(model, device, runs, prices)).images
    ]
    # per model, the engine (device) of its latest run is the one priced
    priced_cpu = _latest_per_model(inference_cpu)
    priced_gpu = _latest_per_model(inference_gpu)
    models = sorted(set(priced_cpu) | set(priced_gpu))
    if len(priced_cpu) < len(inference_cpu):
        notes.append("a model measured on several CPU engines is priced with the engine of its latest run")
    if not inference_cpu and not inference_gpu:
        notes.append("no inference run scored images: inference cost unknown")
    elif not inference_cpu:
        notes.append("no CPU inference run measured: Fargate inference cost unknown")
    if not inference_gpu:
        notes.append(
            f"no GPU inference run measured: {gpu['instance_type']} images/s unknown (run cxr infer --device cuda "
            "on a GPU to measure it)"
        )
    for s in priced_gpu.values():
        if str(gpu["gpu"]).lower() not in s.device.lower():
            notes.append(
                f"GPU speed measured on {s.device}, priced as {gpu['instance_type']} ({gpu['gpu']}): their speeds "
                f"differ; measure on a {gpu['gpu']} to price it exactly"
            )

    s3_per_image, s3_notes = _s3_per_image(prices, table_bytes, n_models=max(len(models), 1))
    notes.extend(s3_notes)
    storage_bytes = _stored_bytes_per_image(table_bytes, max(len(models), 1))
    storage_per_1k_month = (
        None if storage_bytes is None else 1000 * storage_bytes / GIB * prices.value("s3", "storage_gb_month")
    )
    if storage_bytes is None:
        notes.append("no tensors table: storage cost unknown")

    all_models_cpu = bool(models) and all(m in priced_cpu for m in models)
    all_models_gpu = bool(models) and all(m in priced_gpu for m in models)
    inf_cpu_1k = sum(s.usd_per_1k for s in priced_cpu.values()) if all_models_cpu else None
    inf_gpu_1k = sum(s.usd_per_1k for s in priced_gpu.values()) if all_models_gpu else None
    inf_gpu_spot_1k = (
        sum(s.usd_per_1k_spot for s in priced_gpu.values() if s.usd_per_1k_spot is not None)
        if all_models_gpu and all(s.usd_per_1k_spot is not None for s in priced_gpu.values())
        else None
    )
    pre_1k = preprocess.usd_per_1k if preprocess else None
    s3_1k = 1000 * s3_per_image
    per_1k: dict[str, float | None] = {
        "preprocess_emr_serverless": pre_1k,
        "inference_fargate": inf_cpu_1k,
        "inference_gpu_on_demand": inf_gpu_1k,
        "inference_gpu_spot": inf_gpu_spot_1k,
        "s3_requests": s3_1k,
        "total_cpu": None if pre_1k is None or inf_cpu_1k is None else pre_1k + inf_cpu_1k + s3_1k,
        "total_gpu": None if pre_1k is None or inf_gpu_1k is None else pre_1k + inf_gpu_1k + s3_1k,
    }

    fixed = _fixed_per_day(prices, table_bytes, max(len(models), 1), storage_bytes)
    fixed_total = fixed["total"]
    break_even = _break_even(fixed_total, per_1k["total_cpu"])
    break_even_gpu = _break_even(fixed_total, per_1k["total_gpu"])

    # per run: (billed vCPU-seconds or instance-seconds per image, wall seconds of overhead); one inference
    # task (instance) scores every model, one after the other
    pre_bill = (preprocess.billed_vcpu_s_per_image, preprocess.overhead_s) if preprocess else None
    cpu_bill = (
        (
            sum(s.billed_vcpu_s_per_image for s in priced_cpu.values()),
            sum(s.overhead_s for s in priced_cpu.values()),
        )
        if all_models_cpu
        else None
    )
    gpu_bill = (
        (sum(1 / s.loop_images_per_s for s in priced_gpu.values()), sum(s.overhead_s for s in priced_gpu.values()))
        if all_models_gpu and all(s.loop_images_per_s > 0 for s in priced_gpu.values())
        else None
    )
    volumes = [
        _volume(n, prices, pre_bill, cpu_bill, gpu_bill, s3_per_image, fixed_total, emr_rate, fg_rate) for n in VOLUMES
    ]
    return CostReport(
        lakehouse_uri=lakehouse_uri,
        prices=prices,
        preprocess=preprocess,
        inference_cpu=inference_cpu,
        inference_gpu=inference_gpu,
        models=models,
        table_bytes=table_bytes,
        per_1k=per_1k,
        storage_per_1k_month=storage_per_1k_month,
        fixed_per_day=fixed,
        break_even_images_per_day=break_even,
        break_even_images_per_day_gpu=break_even_gpu,
        volumes=volumes,
        notes=notes,
    )


def _rate(prices: Prices, service: str, gb_per_vcpu: float) -> float:
    """Money per billed vCPU-second, memory included (the worker's GB per vCPU, billed alongside)."""
    return (prices.value(service, "vcpu_hour") + gb_per_vcpu * prices.value(service, "gb_hour")) / 3600


def _overheads(runs: list[RunSeconds], no_op: list[RunSeconds]) -> tuple[list[float], str]:
    """Each run's wall seconds that do not depend on its images, and how they were told apart: the
    summary's loop timer, else the median wall time of runs that had no image to process, else none (the
    per-image figure then carries each run's start)."""
    if all(r.loop_s is not None for r in runs):
        return [max(0.0, r.wall_s - (r.loop_s or 0.0)) for r in runs], "the runs' scoring-loop timers"
    if no_op:
        idle = statistics.median(r.wall_s for r in no_op)
        return [min(r.wall_s, idle) for r in runs], f"the median wall time of {len(no_op)} run(s) with no new image"
    return [0.0] * len(runs), "not told apart: each run's start is counted per image"


def _cpu_stage(
    stage: str, model: str, engine: str, runs: list[RunSeconds], assumed: dict[str, Any], rate: float, notes: list[str]
) -> CpuStage:
    """Billed vCPU-seconds per image over runs that produced images (runs of none only measure the overhead)."""
    worked = [r for r in runs if r.images > 0]
    no_op = [r for r in runs if r.images == 0]
    images = sum(r.images for r in worked)
    overheads, overhead_from = _overheads(worked, no_op)
    without_cpu = [r.run_id for r in worked if r.cpu_s <= 0]
    cpus = [r.cpu_s if r.cpu_s > 0 else r.wall_s * r.cores for r in worked]
    works = [r.wall_s - o for r, o in zip(worked, overheads, strict=True)]
    # a run's CPU-seconds are shared between its overhead and its work as its wall seconds are
    work_cpu = sum(c * w / r.wall_s if r.wall_s > 0 else 0.0 for r, c, w in zip(worked, cpus, works, strict=True))
    work_capacity = sum(w * r.cores for r, w in zip(worked, works, strict=True))
    measured_cpu = sum(r.cpu_s for r in worked if r.cpu_s > 0)
    measured_capacity = sum(r.wall_s * r.cores for r in worked if r.cpu_s > 0)
    measured_u = measured_cpu / measured_capacity if measured_capacity > 0 else None
    utilisation = assumed["utilisation"]
    # billed vCPU-seconds = allocated vCPU x wall: with the measured utilisation, the work's wall x the cores
    # that did it (= CPU-seconds / measured utilisation); with an assumed share u, CPU-seconds / u
    billed = work_capacity if utilisation == "measured" else work_cpu / float(utilisation)
    if without_cpu:
        notes.append(
            f"{stage} runs without cpu_seconds (older summaries): {', '.join(without_cpu)}: their CPU-seconds are "
            "counted as wall seconds x cores (all cores busy)"
        )
    if measured_u is not None and measured_u > 1.0:
        notes.append(
            f"{stage}: CPU-seconds exceed wall x cores (utilisation {measured_u:.2f}): the runs were measured on "
            "more cores than counted; give --cores"
        )
    if worked and overhead_from.startswith("not"):
        notes.append(
            f"{stage}: no run separates its start from its per-image work (a run with no new image measures the "
            "start): the per-image figure includes each run's start and overstates large volumes"
        )
    per_image = billed / images if images else 0.0
    return CpuStage(
        stage=stage,
        model=model,
        engine=engine,
        runs=[r.run_id for r in worked],
        images=images,
        wall_s=sum(r.wall_s for r in worked),
        cpu_s=sum(cpus),
        overhead_s=statistics.fmean(overheads) if overheads else 0.0,
        overhead_from=overhead_from,
        work_s=sum(works),
        runs_without_cpu=without_cpu,
        measured_utilisation=measured_u,
        utilisation=utilisation,
        cpu_s_per_image=work_cpu / images if images else 0.0,
        billed_vcpu_s_per_image=per_image,
        billed_gb_s_per_image=per_image * _gb_per_vcpu(assumed),
        usd_per_1k=1000 * per_image * rate,
        no_op_runs=[r.run_id for r in no_op],
        latest_mtime_ms=max((r.mtime_ms for r in worked), default=0),
    )


def _gb_per_vcpu(assumed: dict[str, Any]) -> float:
    if "worker_vcpu" in assumed:
        return float(assumed["worker_memory_gb"]) / float(assumed["worker_vcpu"])
    return float(assumed["task_memory_gb"]) / float(assumed["task_vcpu"])


def _gpu_stage(model: str, device: str, runs: list[RunSeconds], prices: Prices) -> GpuStage:
    """Images per second on a GPU and the instance's money per 1k images (the instance bills wall time)."""
    worked = [r for r in runs if r.images > 0]
    images = sum(r.images for r in worked)
    wall = sum(r.wall_s for r in worked)
    overheads, overhead_from = _overheads(worked, [r for r in runs if r.images == 0])
    work = wall - sum(overheads)
    on_demand = prices.value("gpu", "on_demand_hour")
    spot = prices.prices["gpu"]["spot_hour"].value
    s_per_image = work / images if images else 0.0
    return GpuStage(
        model=model,
        device=device,
        runs=[r.run_id for r in worked],
        images=images,
        wall_s=wall,
        gpu_s=sum(r.gpu_s for r in worked),
        overhead_s=statistics.fmean(overheads) if overheads else 0.0,
        overhead_from=overhead_from,
        images_per_s=images / wall if wall else 0.0,
        loop_images_per_s=images / work if work > 0 else 0.0,
        usd_per_1k=1000 * s_per_image * on_demand / 3600,
        usd_per_1k_spot=None if spot is None else 1000 * s_per_image * spot / 3600,
        latest_mtime_ms=max((r.mtime_ms for r in worked), default=0),
    )


def _latest_per_model(stages: Sequence[CpuStage | GpuStage]) -> dict[str, Any]:
    """Per model id, the stage (engine or device) of its latest run."""
    out: dict[str, Any] = {}
    for s in stages:
        if s.model not in out or s.latest_mtime_ms > out[s.model].latest_mtime_ms:
            out[s.model] = s
    return out


def _s3_per_image(prices: Prices, tb: TableBytes, *, n_models: int) -> tuple[float, list[str]]:
    """S3 request money per image: PUT-class (data files written + their commits, LIST pages) and GETs."""
    s3 = prices.assumptions["s3"]
    notes = []
    files = 0.0
    if tb.tensor_files_per_image is None:
        notes.append("no tensors table: the PUTs of its data files are left out")
    else:
        files += tb.tensor_files_per_image
    if tb.prediction_files_per_row is not None:
        files += tb.prediction_files_per_row * n_models
    puts = files * s3["put_requests_per_data_file"] + s3["list_requests_per_image"]
    gets = s3["get_requests_per_image"]
    return puts * prices.value("s3", "put_per_1k") / 1000 + gets * prices.value("s3", "get_per_1k") / 1000, notes


def _stored_bytes_per_image(tb: TableBytes, n_models: int) -> float | None:
    if tb.tensor_bytes_per_image is None:
        return None
    return tb.tensor_bytes_per_image + (tb.prediction_bytes_per_row or 0.0) * n_models


def _fixed_per_day(prices: Prices, tb: TableBytes, n_models: int, stored: float | None) -> dict[str, float]:
    """What a day costs whatever its images: MWAA, Athena queries over the archive, the archive's storage."""
    a = prices.assumptions
    archive = float(a["archive_images"])
    mwaa = prices.value("mwaa", "environment_hour") * float(a["mwaa"]["hours_per_day"])
    scanned = archive * (tb.prediction_bytes_per_row or 0.0) * n_models
    per_query = max(float(a["athena"]["min_scan_mb"]) * MB, scanned)
    athena = float(a["athena"]["queries_per_day"]) * per_query / TB * prices.value("athena", "tb_scanned")
    storage = (
        0.0
        if stored is None
        else archive * stored / GIB * prices.value("s3", "storage_gb_month") * 24 / HOURS_PER_MONTH
    )
    return {"mwaa": mwaa, "athena": athena, "archive_storage": storage, "total": mwaa + athena + storage}


def _break_even(fixed: float, per_1k: float | None) -> float | None:
    """Images per day at which the per-image cost equals the fixed cost per day."""
    if per_1k is None or per_1k <= 0:
        return None
    return fixed / (per_1k / 1000)


def _run_bill(allocated: float, minimum_s: float, startup_s: float, per_image: float, images: float) -> float:
    """Billed vCPU-seconds (or instance-seconds) of one run: every allocated unit billed for the start-up,
    and the work billed at ``per_image``; every unit billed at least ``minimum_s``."""
    return max(allocated * minimum_s, allocated * startup_s + images * per_image)


Bill = tuple[float, float]  # (billed vCPU- or instance-seconds per image, overhead wall seconds per run)


def _volume(
    images_per_day: int,
    prices: Prices,
    pre: Bill | None,
    cpu: Bill | None,
    gpu: Bill | None,
    s3_per_image: float,
    fixed: float,
    emr_rate: float,
    fg_rate: float,
) -> dict[str, Any]:
    """One row of the volume table: the day's money and the cost per 1k images at ``images_per_day``.

    Each of the day's runs bills ``max(units x minimum_s, units x (startup_s + measured overhead) + images x
    per-image)`` (units: the vCPUs of every worker or task, or the GPU instances).
    """
    a = prices.assumptions
    runs = float(a["runs_per_day"])
    n = images_per_day / runs
    emr, fg, g = a["emr_serverless"], a["fargate"], a["gpu"]

    def day(bill: Bill | None, units: float, assumed: dict[str, Any], rate: float) -> float | None:
        if bill is None:
            return None
        per_image, overhead = bill
        return runs * rate * _run_bill(units, assumed["minimum_s"], assumed["startup_s"] + overhead, per_image, n)

    pre_money = day(pre, emr["workers"] * emr["worker_vcpu"], emr, emr_rate)
    cpu_money = day(cpu, fg["tasks"] * fg["task_vcpu"], fg, fg_rate)
    gpu_money = day(gpu, g["instances"], g, prices.value("gpu", "on_demand_hour") / 3600)
    s3 = images_per_day * s3_per_image
    row: dict[str, Any] = {
        "images_per_day": images_per_day,
        "fixed": fixed,
        "preprocess": pre_money,
        "inference_fargate": cpu_money,
        "inference_gpu": gpu_money,
        "s3_requests": s3,
    }
    for path, inference in (("cpu", cpu_money), ("gpu", gpu_money)):
        if pre_money is None or inference is None:
            row[f"total_{path}"] = row[f"per_1k_{path}"] = row[f"fixed_share_{path}"] = None
            continue
        total = fixed + pre_money + inference + s3
        row[f"total_{path}"] = total
        row[f"per_1k_{path}"] = 1000 * total / images_per_day
        row[f"fixed_share_{path}"] = fixed / total if total else None
    return row


# --- reading ------------------------------------------------------------------------------------------------
def _read_records(lakehouse_uri: str, settings: Settings, run_ids: Sequence[str] | None) -> list[RunRecord]:
    if not run_ids:
        return read_summaries(lakehouse_uri, settings, kind=RunRecord)
    out: list[RunRecord] = []
    for rid in dict.fromkeys(run_ids):
        out.extend(read_summaries(lakehouse_uri, settings, kind=RunRecord, run_id=rid))
    return out


def _recorded_cores(r: RunRecord) -> int | None:
    """The cores a summary says its machine had (``cores``, or ``extra.cores``), if it says."""
    body = r.body
    value = body.get("cores")
    if value is None and isinstance(body.get("extra"), dict):
        value = body["extra"].get("cores")
    return int(value) if isinstance(value, int | float) and value > 0 else None


def _seconds(r: PreprocessRun | InferRun, images: int, default_cores: int) -> RunSeconds:
    return RunSeconds(
        run_id=r.run_id,
        images=int(images),
        wall_s=float(r.seconds),
        cpu_s=float(r.cpu_seconds),
        cores=_recorded_cores(r) or default_cores,
        gpu_s=float(getattr(r, "gpu_seconds", 0.0)),
        loop_s=_loop_seconds(r),
        mtime_ms=r.mtime_ms,
    )


def _loop_seconds(r: RunRecord) -> float | None:
    """Wall seconds of an inference run's scoring loop: ``gpu_seconds`` on a GPU, else the loop's compute
    plus data-wait timers (``extra``); None when the summary has neither (preprocessing, older runs)."""
    if not isinstance(r, InferRun):
        return None
    if r.gpu_seconds > 0:
        return float(r.gpu_seconds)
    extra = r.extra if isinstance(r.extra, dict) else {}
    compute, wait = extra.get("compute_s"), extra.get("data_wait_s")
    if isinstance(compute, int | float) and isinstance(wait, int | float):
        return float(compute) + float(wait)
    return None


def _is_gpu(r: InferRun) -> bool:
    """An inference run on a GPU: its device is a CUDA device's name (CPU devices are ``cpu...``)."""
    return r.gpu_seconds > 0 or not r.device.startswith("cpu")


def _engine(r: InferRun) -> str:
    """The device, and for the CPU the graph (``cpu / frozen``, ``cpu+onnxruntime-1.x / onnx``)."""
    graph = r.extra.get("graph") if isinstance(r.extra, dict) else None
    return r.device if _is_gpu(r) or not graph else f"{r.device} / {graph}"


def _table_bytes(lakehouse_uri: str, settings: Settings) -> TableBytes:
    """Bytes and data files per row of ``tensors`` and ``predictions`` from their Delta logs."""
    from lakehouse.tables import PREDICTIONS, TENSORS

    t_bytes, t_files = _log_sizes(lakehouse_uri, TENSORS, settings)
    p_bytes, p_files = _log_sizes(lakehouse_uri, PREDICTIONS, settings)
    return TableBytes(
        tensor_bytes_per_image=t_bytes,
        tensor_files_per_image=t_files,
        prediction_bytes_per_row=p_bytes,
        prediction_files_per_row=p_files,
    )


def _log_sizes(lakehouse_uri: str, spec: Any, settings: Settings) -> tuple[float | None, float | None]:
    """(bytes per row, data files per row) of a table's current version, from its log's add actions."""
    import pyarrow as pa
    from deltalake.exceptions import TableNotFoundError

    from lakehouse import delta_rs

    try:
        dt = delta_rs.open_table(lakehouse_uri, spec, settings)
    except TableNotFoundError:
        return None, None
    actions = pa.table(dt.get_add_actions(flatten=False)).select(["size_bytes", "num_records"])
    sizes = actions.column("size_bytes").to_pylist()
    records = actions.column("num_records").to_pylist()
    # a file written without statistics: count the rows from the Parquet footers
    rows = int(dt.to_pyarrow_dataset().count_rows()) if any(r is None for r in records) else int(sum(records))
    if not rows:
        return None, None
    return sum(sizes) / rows, len(sizes) / rows


# --- printing ------------------------------------------------------------------------------------------------
def print_report(report: CostReport) -> None:
    """The report as rich tables on stdout (``cxr cost``)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # wide enough that no number is cut to fit a narrow terminal or a pipe (80 columns)
    console = Console(soft_wrap=True)
    console = Console(soft_wrap=True, width=max(console.width, 150))
    p = report.prices
    cur = p.currency
    unverified = p.unverified()
    n_prices = sum(len(items) for items in p.prices.values())
    console.print(f"[bold]cost per 1k images[/bold] of {escape(report.lakehouse_uri)}")
    console.print(f"prices: {escape(p.name)} ({escape(p.path)}; version {p.version}, {cur}, {p.region})")
    if unverified:
        console.print(
            f"[yellow]{len(unverified)} of {n_prices} prices are not verified[/]: check them on their source pages "
            "and override them with --prices FILE (docs/costs.md)"
        )

    a = p.assumptions
    emr, fg, gpu = a["emr_serverless"], a["fargate"], a["gpu"]
    measured = Table(title="measured (the runs' summaries)")
    cols = ("stage", "runs", "images", "wall s", "CPU s", "utilisation", "start s / run", "CPU-s / image")
    for col in (*cols, "billed vCPU-s / image"):
        measured.add_column(col, justify="left" if col == "stage" else "right")
    stages = ([report.preprocess] if report.preprocess else []) + report.inference_cpu
    for s in stages:
        name = "preprocess" if s.stage == "preprocess" else f"infer {s.model} [{s.engine}]"
        util = "-" if s.measured_utilisation is None else f"{s.measured_utilisation:.2f}"
        used = "measured" if s.utilisation == "measured" else f"assumed {float(s.utilisation):.2f}"
        measured.add_row(
            escape(name),
            str(len(s.runs)),
            str(s.images),
            f"{s.wall_s:.1f}",
            f"{s.cpu_s:.1f}",
            f"{util} ({used})",
            f"{s.overhead_s:.1f}",
            f"{s.cpu_s_per_image:.3f}",
            f"{s.billed_vcpu_s_per_image:.3f}",
        )
    console.print(measured)
    for s in stages:
        name = " ".join(x for x in (s.stage, s.model) if x)
        console.print(f"{escape(name)}: start (per run) from {escape(s.overhead_from)}")
    for g in report.inference_gpu:
        console.print(
            f"GPU: infer {escape(g.model)} on {escape(g.device)}: {g.images} images in {g.wall_s:.1f} s "
            f"({g.images_per_s:.1f} images/s), {g.loop_images_per_s:.1f} images/s in the scoring loop "
            f"(start {g.overhead_s:.1f} s per run, from {escape(g.overhead_from)})"
        )
    if not report.inference_gpu:
        console.print(f"GPU ({gpu['instance_type']}): images/s unknown (no GPU run measured)")

    per = Table(title=f"{cur} per 1k images (per-image work and requests; per-run starts and fixed costs below)")
    per.add_column("item")
    per.add_column(cur, justify="right")
    per.add_column("how")
    k = report.per_1k
    per.add_row(
        "preprocess on EMR Serverless",
        _money(k["preprocess_emr_serverless"]),
        f"billed vCPU-s x ({emr['worker_vcpu']} vCPU, {emr['worker_memory_gb']} GB workers)",
    )
    per.add_row(
        "inference on Fargate (CPU)",
        _money(k["inference_fargate"]),
        f"billed vCPU-s x ({fg['task_vcpu']} vCPU, {fg['task_memory_gb']} GB task)",
    )
    per.add_row(f"inference on {gpu['instance_type']} on-demand", _money(k["inference_gpu_on_demand"]), "wall s")
    per.add_row(f"inference on {gpu['instance_type']} spot", _money(k["inference_gpu_spot"]), "wall s")
    per.add_row("S3 requests", _money(k["s3_requests"]), "PUT/LIST + GET per image")
    per.add_row("[bold]total, CPU inference[/]", _money(k["total_cpu"]), "")
    per.add_row("[bold]total, GPU inference[/]", _money(k["total_gpu"]), "")
    console.print(per)
    tb = report.table_bytes
    if report.storage_per_1k_month is not None:
        console.print(
            f"storage: {_money(report.storage_per_1k_month)} {cur} per month per 1k images kept "
            f"(tensors {tb.tensor_bytes_per_image:,.0f} B/image, predictions "
            f"{tb.prediction_bytes_per_row or 0:,.0f} B/row, from the Delta logs)"
        )
    f = report.fixed_per_day
    console.print(
        f"fixed per day: MWAA {a['mwaa']['environment_class']} {a['mwaa']['hours_per_day']} h {_money(f['mwaa'])}"
        f" + Athena {a['athena']['queries_per_day']} queries {_money(f['athena'])}"
        f" + storage of {a['archive_images']:,} archived images {_money(f['archive_storage'])}"
        f" = [bold]{_money(f['total'])} {cur}[/]"
    )
    be, be_gpu = report.break_even_images_per_day, report.break_even_images_per_day_gpu
    console.print(
        "break-even (per-image cost = fixed cost per day): "
        + ("unknown" if be is None else f"[bold]{be:,.0f} images/day[/] with CPU inference")
        + ("" if be_gpu is None else f", {be_gpu:,.0f} with GPU inference")
        + ": below it the fixed orchestration cost dominates"
    )

    vol = Table(
        title=f"{cur} per day and per 1k images by volume ({a['runs_per_day']} run(s) a day; each run's start and "
        "minimum billed)"
    )
    for col in ("images/day", "preprocess", "inference", "S3", "fixed", "total", "per 1k", "fixed share", "per 1k GPU"):
        vol.add_column(col, justify="right")
    for row in report.volumes:
        share = row["fixed_share_cpu"]
        vol.add_row(
            f"{row['images_per_day']:,}",
            _money(row["preprocess"]),
            _money(row["inference_fargate"]),
            _money(row["s3_requests"]),
            _money(row["fixed"]),
            _money(row["total_cpu"]),
            _money(row["per_1k_cpu"]),
            "-" if share is None else f"{100 * share:.1f}%",
            _money(row["per_1k_gpu"]),
        )
    console.print(vol)
    for note in report.notes:
        console.print(f"note: {escape(note)}")


def _money(x: float | None) -> str:
    """A money amount: 4 significant digits below 1, cents above; ``unknown`` for None."""
    if x is None:
        return "unknown"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:,.2f}"
    return f"{x:.4g}"
