"""Scale benchmark: what an incremental day costs in a lakehouse of 200 rows and in one of 50,000 rows.

Issue #12 asks every daily step to cost O(new images): 10 new images into a 50,000-row lakehouse within
1.5x the wall time and 1.2x the peak memory of the same 10 images into a 200-row one.

Two lakehouses are built once and cached (``--cache``, default ``/tmp/cxr-scale``):

- small generated 8-bit PNGs (``--image-size`` px; the stored tensors are 224x224, as the pipeline makes
  them; the default 256 px keeps each image's noise in its tensor, so tensors compress like real ones: about
  79 KB a row, against 14 KB from 64 px images, whose upscaled tensors are smooth and would make a scan of
  the tensor column look 5x cheaper than it is), written into ``input/day01 .. dayNN`` and ingested by the real
  ``cxr preprocess`` in ``--days`` runs (one per day folder, over the whole input folder, like a daily run
  that finds the archive plus a new day);
- after each run, a prediction row for each of its new tensors, written in bulk (scoring 50k images at
  ~15 img/s is an hour here): the ``predictions`` schema, the model id the untrained stand-in writes
  (``densenet121-res224-all+untrained-random-init``, so that ``cxr infer --allow-untrained`` counts them as
  done), run id ``inf-bench-bulk-dayNN``, ``weights_source`` ``bench-bulk``, and **null probabilities**:
  no model scored them, so no values are made up (the report's histograms see nulls for these rows);
- then ``cxr validate`` over every table (it must pass) and ``lakehouse.publish.publish``, so the state is
  what a daily run finds. The built lakehouse is kept as ``pristine/`` (hard links to its Parquet files,
  real copies of everything else).

A measurement restores ``lakehouse/`` from ``pristine/`` (Parquet files hard-linked, every other file
copied: ``published.json``, ``_last_checkpoint`` and the like are rewritten in place), adds the same
``--new`` generated images as ``input/new/``, and runs each step as its own process, in DAG order:

``preprocess``, ``validate_tensors`` (tensors, quarantine, files; the run's id), ``infer``
(``--allow-untrained``), ``validate_predictions`` (the inference run's id), ``report``; ``--steps`` also
takes ``drift`` and ``publish`` (the DAG's other daily steps). With ``--noop`` the steps are those of a day
with nothing new: ``infer`` and ``validate_predictions`` over the unchanged lakehouse.

Per step: wall seconds (the step's own process, from start to exit), peak RSS of its whole process tree
(psutil, sampled every 0.1 s, the summed RSS of every descendant: spark-submit's JVM and the Python
workers included), CPU seconds and bytes read. Bytes read are exact, not sampled: each step runs under a
small wrapper that makes itself the child subreaper, waits for every descendant (orphans included) and
reads its own ``/proc/self/io`` before and after; Linux adds a reaped child's I/O counters to its parent's,
so the difference is the whole tree's ``rchar`` (bytes returned by read() and friends, page cache hits
included, mmap not) and ``read_bytes`` (bytes fetched from the block device: near 0 when the files are in
the page cache).

Usage::

    python bench/scale.py --rate 1000                       # preprocess rate; projected build times
    python bench/scale.py --small 200 --large 50000 --rounds 1 --out bench/out/scale.json
    python bench/scale.py --noop --large 100000 --out bench/out/scale-noop.json

Prints a table (step, seconds at each size, ratio against the 1.5x target, RSS ratio against 1.2x, bytes
read) and writes it as JSON with the machine and the date (``--out``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CXR = str(ROOT / ".venv/bin/cxr")
MODEL = "densenet121-res224-all"
#: the run ids of the measured day
PRE_RUN, INF_RUN, NOOP_RUN = "pre-bench-new", "inf-bench-new", "inf-bench-noop"
#: targets of issue #12: large / small
TIME_TARGET, RSS_TARGET = 1.5, 1.2
#: first image index of the measured day's new images (far above any archive's)
NEW_IMAGE_BASE = 100_000_000
DAILY_STEPS = ("preprocess", "validate_tensors", "infer", "validate_predictions", "report")
OPTIONAL_STEPS = ("drift", "publish")
NOOP_STEPS = ("infer", "validate_predictions")
#: the order steps run in (a chosen subset keeps it)
STEP_ORDER = ("preprocess", "validate_tensors", "infer", "drift", "validate_predictions", "publish", "report")

# Runs the step given on its command line as a child, after making itself the child subreaper (so that
# orphaned descendants, e.g. a JVM, are reparented to it and reaped here); reaps every descendant, then
# writes the step's wall seconds, exit status, CPU seconds and the tree's I/O counters (its own
# /proc/self/io after minus before: the kernel adds each reaped child's counters to its parent's).
_WRAPPER = r"""
import ctypes, json, os, resource, signal, subprocess, sys, time

def io():
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            k, v = line.split(":")
            out[k.strip()] = int(v)
    return out

ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
before = io()
t0 = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
rc = child.wait()
wall = time.perf_counter() - t0
orphans, lingering, deadline = 0, 0, time.monotonic() + 60
while True:
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid:
        orphans += 1
    elif time.monotonic() > deadline:
        lingering += 1
        for line in os.popen(f"ps -o pid= --ppid {os.getpid()}"):
            if line.strip() and int(line) != os.getpid():
                os.kill(int(line), signal.SIGKILL)
        deadline = time.monotonic() + 10
    else:
        time.sleep(0.05)
after = io()
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "orphans_reaped": orphans,
               "lingering_killed": lingering, "rchar": after["rchar"] - before["rchar"],
               "read_bytes": after["read_bytes"] - before["read_bytes"]}, f)
"""


@dataclass
class Sample:
    """One step run once: wall and CPU seconds, peak RSS of its process tree, bytes read."""

    step: str
    rows: int
    wall_s: float
    cpu_s: float
    peak_rss: int
    rchar: int
    read_bytes: int
    rc: int
    orphans_reaped: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


class StepFailed(RuntimeError):
    """A step exited non-zero or did not do what the benchmark set up (e.g. not exactly the new images)."""


#: the source tree the steps run (``--src``): this checkout, or e.g. an exported older commit
SRC = ROOT


def use_src(src: Path) -> None:
    """Run the steps (and this process's lakehouse imports) from ``src`` instead of this checkout.

    ``src`` is a plain copy of a commit (``git archive``); the steps run from a scratch folder with
    ``PYTHONPATH=src``, which comes before the editable install's finder. The JVM files ``make setup``
    generates (ignored by git) are copied from this checkout when ``src`` lacks them.
    """
    global SRC
    SRC = src.resolve()
    if SRC == ROOT:
        return
    for name in ("classpath.txt", "cxr-classes.jsa"):
        have, want = ROOT / "jvm" / name, SRC / "jvm" / name
        if have.exists() and not want.exists():
            shutil.copy2(have, want)
    sys.path.insert(0, str(SRC))


def step_env() -> dict[str, str]:
    """The steps' environment: a fixed pseudonym key; weights downloads pointed at a closed local port, so
    the stand-in is chosen at once (no weights are on this machine, and the bulk rows are the stand-in's);
    ``PYTHONPATH`` when the steps run another source tree (``--src``)."""
    env = {
        **os.environ,
        "CXR_PSEUDONYM_KEY": "bench-key",
        "CXR_WEIGHTS_BASE_URL": "http://127.0.0.1:9",
        "PYTHONUNBUFFERED": "1",
    }
    if SRC != ROOT:
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_measured(argv: Sequence[str], *, log_stem: Path, cwd: Path, interval: float = 0.1) -> dict[str, Any]:
    """Run ``argv`` under the wrapper; sample the tree's RSS every ``interval`` s.

    Returns:
        The wrapper's record plus ``peak_rss`` (bytes) and ``stdout`` (the step's standard output).
    """
    import psutil

    log_stem.parent.mkdir(parents=True, exist_ok=True)
    result = log_stem.with_suffix(".json")
    result.unlink(missing_ok=True)
    out, err = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    with out.open("wb") as fo, err.open("wb") as fe:
        proc = psutil.Popen(
            [sys.executable, "-c", _WRAPPER, str(result), *argv], stdout=fo, stderr=fe, cwd=cwd, env=step_env()
        )
        peak = 0
        while proc.poll() is None:
            total = 0
            try:
                kids = proc.children(recursive=True)
            except psutil.NoSuchProcess:
                kids = []
            for k in kids:
                try:
                    total += k.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            peak = max(peak, total)
            time.sleep(interval)
    if not result.exists():
        raise StepFailed(f"{argv[1]}: the measuring wrapper wrote no result (see {err})")
    record: dict[str, Any] = json.loads(result.read_text())
    record["peak_rss"] = peak
    record["stdout"] = out.read_text()
    record["stderr_log"] = str(err)
    return record


# --- images ------------------------------------------------------------------------------------------------
def _write_png(job: tuple[str, int, int]) -> None:
    """One distinct synthetic 8-bit PNG: one of 8 anatomies plus per-image noise (unique bytes)."""
    import numpy as np

    from transforms.sample import png_bytes, synthetic_cxr, to_uint

    path, index, size = job
    base = to_uint(synthetic_cxr(size, size, seed=index % 8), 8)
    noise = np.random.default_rng(index).integers(-3, 4, base.shape, dtype=np.int16)
    Path(path).write_bytes(png_bytes(np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)))


def write_images(folder: Path, indices: range, *, size: int) -> int:
    """Write the images ``img_<index>.png`` missing from ``folder``; returns how many the folder holds."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(str(folder / f"img_{i:09d}.png"), i, size) for i in indices]
    todo = [j for j in todo if not Path(j[0]).exists()]
    if todo:
        with mp.Pool(min(2, os.cpu_count() or 1)) as pool:
            pool.map(_write_png, todo, chunksize=64)
    return len(list(folder.glob("*.png")))


def day_ranges(rows: int, days: int) -> list[range]:
    """Split image indices 0..rows-1 into ``days`` consecutive ranges (the first ones one larger)."""
    per, extra = divmod(rows, days)
    out, start = [], 0
    for d in range(days):
        n = per + (1 if d < extra else 0)
        out.append(range(start, start + n))
        start += n
    return [r for r in out if len(r)]


# --- building a lakehouse ------------------------------------------------------------------------------------
def _cxr_json(argv: Sequence[str], *, cwd: Path) -> Any:
    """Run a ``cxr`` subcommand with ``--json``; its parsed output (StepFailed with its stderr otherwise)."""
    out = subprocess.run([CXR, *argv], cwd=cwd, env=step_env(), capture_output=True, text=True)
    if out.returncode != 0:
        raise StepFailed(f"cxr {' '.join(argv)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def bulk_predictions(lakehouse: Path, run_id: str, day: int) -> int:
    """Append one predictions row (null probabilities) for every tensor of preprocessing run ``run_id``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from deltalake import write_deltalake

    from lakehouse import delta_rs
    from lakehouse.config import load_settings
    from lakehouse.storage import table_uri
    from lakehouse.tables import PREDICTIONS, TENSORS, UNTRAINED_SUFFIX, arrow_schema

    settings = load_settings()
    lake = str(lakehouse)
    tensors = delta_rs.open_table(lake, TENSORS, settings)
    ids = tensors.to_pyarrow_table(columns=["image_id", "run_id"])
    ids = ids.filter(pc.equal(ids.column("run_id"), run_id)).column("image_id")
    n = len(ids)
    delta_rs.ensure_table(lake, PREDICTIONS, settings)
    schema = arrow_schema(PREDICTIONS)
    constants = {
        "model_id": MODEL + UNTRAINED_SUFFIX,
        "weights_sha256": "none:bench-bulk-not-scored",
        "weights_source": "bench-bulk",
        "tensors_version": int(tensors.version()),
        "run_id": f"inf-bench-bulk-day{day:02d}",
        "predicted_at": datetime.now(UTC),
        "device": "bench-bulk (not scored)",
        "torch_version": "bench-bulk",
        "xrv_version": "bench-bulk",
    }
    cols = {f.name: pa.nulls(n, f.type) for f in schema}
    cols["image_id"] = ids.combine_chunks() if n else pa.array([], pa.string())
    for name, value in constants.items():
        cols[name] = pa.array([value] * n, schema.field(name).type)
    write_deltalake(table_uri(lake, PREDICTIONS), pa.Table.from_pydict(cols, schema=schema), mode="append")
    return n


def copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst``: Parquet data files hard-linked (never rewritten), every other file copied."""

    def link_or_copy(s: str, d: str) -> None:
        if s.endswith(".parquet"):
            os.link(s, d)
        else:
            shutil.copy2(s, d)

    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=link_or_copy, symlinks=True)


@dataclass
class Built:
    """A cached lakehouse: where it is and how it was made."""

    rows: int
    root: Path
    info: dict[str, Any]

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def lakehouse(self) -> Path:
        return self.root / "lakehouse"

    @property
    def pristine(self) -> Path:
        return self.root / "pristine"


def build(cache: Path, rows: int, *, days: int, image_size: int, rebuild: bool) -> Built:
    """The lakehouse of ``rows`` rows, built (``days`` preprocessing runs, bulk predictions, publish) unless cached."""
    root = cache / f"rows-{rows}"
    marker = root / "built.json"
    if marker.exists() and not rebuild:
        info = json.loads(marker.read_text())
        if info.get("image_size") != image_size:
            raise SystemExit(f"{root} was built from {info.get('image_size')} px images: pass --rebuild")
        if info.get("commit") != git_commit():
            print(
                f"  note: {root} was built by {info.get('commit')}, the steps run {git_commit()} "
                "(--rebuild to build it with the code measured)",
                flush=True,
            )
        return Built(rows, root, info)
    shutil.rmtree(root, ignore_errors=True)
    cwd = root / "cwd"
    cwd.mkdir(parents=True)
    b = Built(rows, root, {})
    lake = str(b.lakehouse)
    started = time.perf_counter()
    per_day = []
    for d, indices in enumerate(day_ranges(rows, days), start=1):
        write_images(b.input / f"day{d:02d}", indices, size=image_size)
        t = time.perf_counter()
        run_id = f"pre-bench-day{d:02d}"
        s = _cxr_json(
            ["preprocess", "--input", str(b.input), "--lakehouse", lake, "--run-id", run_id, "--no-progress", "--json"],
            cwd=cwd,
        )
        if s["new"] != len(indices) or s["quarantined"] or s["duplicates"]:
            raise StepFailed(f"build day {d}: expected {len(indices)} new tensors, got {s}")
        pre_s = time.perf_counter() - t
        predicted = bulk_predictions(b.lakehouse, run_id, d)
        if predicted != len(indices):
            raise StepFailed(f"build day {d}: {predicted} bulk predictions for {len(indices)} tensors")
        per_day.append({"day": d, "images": len(indices), "preprocess_s": round(pre_s, 1)})
        print(f"  rows-{rows} day {d}: {len(indices)} images preprocessed in {pre_s:.1f} s", flush=True)
    report = _cxr_json(["validate", "--lakehouse", lake, "--json"], cwd=cwd)
    if not report.get("success"):
        raise StepFailed(f"the built lakehouse fails validation: {json.dumps(report)[:3000]}")
    from lakehouse.config import load_settings
    from lakehouse.publish import publish

    publish(lake, load_settings(), run_id=f"pre-bench-day{len(per_day):02d}")
    copy_tree(b.lakehouse, b.pristine)
    b.info = {
        "rows": rows,
        "days": len(per_day),
        "image_size": image_size,
        "build_s": round(time.perf_counter() - started, 1),
        "per_day": per_day,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "tensors_bytes": sum(f.stat().st_size for f in (b.pristine / "tensors").glob("*.parquet")),
    }
    marker.write_text(json.dumps(b.info, indent=2))
    return b


# --- the measured day ----------------------------------------------------------------------------------------
def step_argv(step: str, lake: str, input_uri: str, weights_dir: str, steps: Sequence[str], noop: bool) -> list[str]:
    """The command line of ``step``."""
    inf_run = NOOP_RUN if noop else INF_RUN
    if step == "preprocess":
        return [CXR, "preprocess", "--input", input_uri, "--lakehouse", lake, "--run-id", PRE_RUN, "--no-progress", "--json"]  # fmt: skip
    if step == "validate_tensors":
        tables = ["--table", "tensors", "--table", "quarantine", "--table", "files"]
        return [CXR, "validate", "--lakehouse", lake, *tables, "--run-id", PRE_RUN, "--json"]
    if step == "infer":
        return [CXR, "infer", "--lakehouse", lake, "--allow-untrained", "--weights-dir", weights_dir, "--run-id", inf_run, "--no-progress", "--json"]  # fmt: skip
    if step == "drift":
        return [CXR, "drift", "--lakehouse", lake, "--run-id", inf_run]
    if step == "validate_predictions":
        tables = ["--table", "predictions", *(["--table", "drift"] if "drift" in steps else [])]
        return [CXR, "validate", "--lakehouse", lake, *tables, "--run-id", inf_run, "--json"]
    if step == "publish":
        return [CXR, "publish", "--lakehouse", lake, "--run-id", PRE_RUN, "--infer-run-id", INF_RUN]
    if step == "report":
        # after publish the report sees the new run's rows; without it, read the latest versions for the same
        return [CXR, "report", "--lakehouse", lake, "--run-id", PRE_RUN, *([] if "publish" in steps else ["--unpublished"])]  # fmt: skip
    raise ValueError(f"unknown step {step!r}")


def check_step(step: str, stdout: str, *, new: int, noop: bool) -> dict[str, Any]:
    """What the step reported, checked against what the day holds; StepFailed when it did something else."""
    if step == "preprocess":
        s = json.loads(stdout)
        if s["new"] != new or s["quarantined"] or s["retryable"]:
            raise StepFailed(f"preprocess: expected {new} new tensors, got {s}")
        return {k: s[k] for k in ("discovered", "new", "already_present", "seconds")}
    if step == "infer":
        (s,) = json.loads(stdout)
        want = 0 if noop else new
        if s["predicted"] != want or not s["model_id"].startswith(MODEL) or not s["untrained"]:
            raise StepFailed(f"infer: expected {want} predictions by the untrained {MODEL} stand-in, got {s}")
        return {k: s[k] for k in ("candidates", "already_predicted", "predicted", "seconds")}
    if step.startswith("validate"):
        r = json.loads(stdout)
        return {"success": r.get("success"), "tables": sorted(r.get("tables", {}))}
    return {}


def measure_day(
    built: Built, steps: Sequence[str], *, new_images: Path, new: int, noop: bool, logs: Path, round_no: int
) -> list[Sample]:
    """Restore the pristine lakehouse, add the new images, run ``steps`` in order; one Sample per step."""
    copy_tree(built.pristine, built.lakehouse)
    day = built.input / "new"
    shutil.rmtree(day, ignore_errors=True)
    if not noop:
        day.mkdir()
        for p in sorted(new_images.glob("*.png")):
            os.link(p, day / p.name)
    weights_dir = built.root / "no-weights"
    weights_dir.mkdir(exist_ok=True)
    cwd = built.root / "cwd"
    cwd.mkdir(exist_ok=True)
    samples = []
    try:
        for step in steps:
            argv = step_argv(step, str(built.lakehouse), str(built.input), str(weights_dir), steps, noop)
            rec = run_measured(argv, log_stem=logs / f"rows-{built.rows}" / f"r{round_no}-{step}", cwd=cwd)
            if rec["rc"] != 0:
                tail = Path(rec["stderr_log"]).read_text()[-3000:]
                raise StepFailed(f"{step} at {built.rows} rows exited {rec['rc']}:\n{tail}")
            detail = check_step(step, rec["stdout"], new=new, noop=noop)
            samples.append(
                Sample(
                    step=step,
                    rows=built.rows,
                    wall_s=round(rec["wall_s"], 3),
                    cpu_s=round(rec["cpu_s"], 3),
                    peak_rss=rec["peak_rss"],
                    rchar=rec["rchar"],
                    read_bytes=rec["read_bytes"],
                    rc=rec["rc"],
                    orphans_reaped=rec["orphans_reaped"],
                    detail=detail,
                )
            )
            print(
                f"  rows-{built.rows} round {round_no} {step}: {rec['wall_s']:.1f} s, "
                f"{rec['peak_rss'] / 2**20:.0f} MiB, read {rec['rchar'] / 2**20:.1f} MiB",
                flush=True,
            )
    finally:
        shutil.rmtree(day, ignore_errors=True)
    return samples


# --- the rate check ------------------------------------------------------------------------------------------
def rate_check(cache: Path, n: int, *, image_size: int, days: int, sizes: Sequence[int]) -> dict[str, Any]:
    """``cxr preprocess`` of n/10 and of n images into fresh lakehouses: marginal rate, fixed overhead, and the
    projected build time of each size (``days`` runs: days x overhead + rows / rate; table growth not modelled)."""
    root = cache / "rate"
    shutil.rmtree(root / "lakehouses", ignore_errors=True)
    cwd = root / "cwd"
    cwd.mkdir(parents=True, exist_ok=True)
    times = {}
    for count in (max(1, n // 10), n):
        folder = root / f"input-{image_size}px-{count}"
        write_images(folder, range(count), size=image_size)
        t = time.perf_counter()
        _cxr_json(
            [
                "preprocess",
                "--input",
                str(folder),
                "--lakehouse",
                str(root / "lakehouses" / str(count)),
                "--no-progress",
                "--json",
            ],  # fmt: skip
            cwd=cwd,
        )
        times[count] = time.perf_counter() - t
        print(f"  preprocess of {count} images: {times[count]:.1f} s", flush=True)
    tensors = root / "lakehouses" / str(n) / "tensors"
    per_row = sum(f.stat().st_size for f in tensors.glob("*.parquet")) / n
    (a, ta), (b, tb) = sorted(times.items())
    rate = (b - a) / (tb - ta)
    overhead = max(0.0, ta - a / rate)
    return {
        "images": n,
        "seconds": {str(k): round(v, 1) for k, v in times.items()},
        "marginal_img_s": round(rate, 1),
        "fixed_overhead_s": round(overhead, 1),
        "tensor_bytes_per_row": round(per_row),
        "projected_build_s": {str(r): round(days * overhead + r / rate) for r in sizes},
    }


# --- report --------------------------------------------------------------------------------------------------
def summarize(samples: list[Sample], small: int, large: int) -> list[dict[str, Any]]:
    """Per step: medians at each size, ratios and verdicts."""
    rows = []
    for step in dict.fromkeys(s.step for s in samples):

        def med(rows_: int, attr: str, step: str = step) -> float:
            return float(statistics.median(getattr(s, attr) for s in samples if s.step == step and s.rows == rows_))

        t_s, t_l = med(small, "wall_s"), med(large, "wall_s")
        m_s, m_l = med(small, "peak_rss"), med(large, "peak_rss")
        rows.append(
            {
                "step": step,
                "wall_s": {str(small): round(t_s, 2), str(large): round(t_l, 2)},
                "time_ratio": round(t_l / t_s, 2),
                "time_ok": t_l / t_s <= TIME_TARGET,
                "cpu_s": {str(small): round(med(small, "cpu_s"), 2), str(large): round(med(large, "cpu_s"), 2)},
                "peak_rss_mib": {str(small): round(m_s / 2**20), str(large): round(m_l / 2**20)},
                "rss_ratio": round(m_l / m_s, 2),
                "rss_ok": m_l / m_s <= RSS_TARGET,
                "rchar": {str(small): int(med(small, "rchar")), str(large): int(med(large, "rchar"))},
                "read_bytes": {str(small): int(med(small, "read_bytes")), str(large): int(med(large, "read_bytes"))},
            }
        )
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def markdown(table: list[dict[str, Any]], small: int, large: int) -> str:
    """The summary as a Markdown table."""
    s, l_ = str(small), str(large)
    head = (
        f"| step | s @{small} | s @{large} | time ratio (<= {TIME_TARGET}x) | RSS MiB @{small} | RSS MiB @{large} "
        f"| RSS ratio (<= {RSS_TARGET}x) | read MiB @{small} | read MiB @{large} | disk read MiB @{small} / @{large} |"
    )
    lines = [head, "|" + "---|" * 10]
    for r in table:
        lines.append(
            f"| {r['step']} | {r['wall_s'][s]:.1f} | {r['wall_s'][l_]:.1f} | {r['time_ratio']:.2f}x "
            f"{'ok' if r['time_ok'] else 'OVER'} | {r['peak_rss_mib'][s]:,} | {r['peak_rss_mib'][l_]:,} "
            f"| {r['rss_ratio']:.2f}x {'ok' if r['rss_ok'] else 'OVER'} | {_mib(r['rchar'][s])} | {_mib(r['rchar'][l_])} "
            f"| {_mib(r['read_bytes'][s])} / {_mib(r['read_bytes'][l_])} |"
        )
    return "\n".join(lines)


def git_commit() -> str:
    """The commit the steps run: this checkout's (``+dirty`` when files differ from it), or ``--src``'s
    ``COMMIT`` file (write one beside an exported tree)."""
    if SRC != ROOT:
        marker = SRC / "COMMIT"
        return marker.read_text().strip() if marker.exists() else f"src:{SRC}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "-uno"], cwd=ROOT, capture_output=True, text=True
        ).stdout
    except OSError:
        return "unknown"
    return head.strip() + ("+dirty" if dirty.strip() else "")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--small", type=int, default=200, help="rows of the small lakehouse (default 200)")
    ap.add_argument("--large", type=int, default=50_000, help="rows of the large lakehouse (default 50000)")
    ap.add_argument("--new", type=int, default=10, help="new images of the measured day (default 10)")
    ap.add_argument("--rounds", type=int, default=1, help="measure each size N times, report the medians")
    ap.add_argument("--days", type=int, default=10, help="preprocessing runs a lakehouse is built in (default 10)")
    ap.add_argument(
        "--image-size", type=int, default=256, help="generated images' side in px (default 256: see the docstring)"
    )
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cxr-scale"), help="built lakehouses (reused)")
    ap.add_argument("--rebuild", action="store_true", help="build the lakehouses again")
    ap.add_argument("--steps", default=",".join(DAILY_STEPS), help=f"comma-separated, of {', '.join(STEP_ORDER)}")
    ap.add_argument("--noop", action="store_true", help=f"a day with nothing new: {', '.join(NOOP_STEPS)}")
    ap.add_argument("--rate", type=int, metavar="N", help="only measure the preprocess rate on N images; project")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    ap.add_argument("--src", type=Path, default=ROOT, help="source tree the steps run (default this checkout)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    use_src(args.src)
    cache: Path = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    if args.rate:
        result = rate_check(
            cache, args.rate, image_size=args.image_size, days=args.days, sizes=(args.small, args.large)
        )
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"date": _today(), "machine": machine(), "rate": result}, indent=2))
        return 0
    if args.noop:
        steps = list(NOOP_STEPS)
    else:
        chosen = [s.strip() for s in args.steps.split(",") if s.strip()]
        unknown = [s for s in chosen if s not in STEP_ORDER]
        if unknown:
            raise SystemExit(f"unknown steps {unknown}: choose from {', '.join(STEP_ORDER)}")
        steps = [s for s in STEP_ORDER if s in chosen]
    builds: dict[int, Built] = {}
    for rows in (args.small, args.large):
        print(f"lakehouse of {rows} rows under {cache}", flush=True)
        builds[rows] = build(cache, rows, days=args.days, image_size=args.image_size, rebuild=args.rebuild)
    new_images = cache / f"new-{args.image_size}px"
    write_images(new_images, range(NEW_IMAGE_BASE, NEW_IMAGE_BASE + args.new), size=args.image_size)
    for extra in sorted(new_images.glob("*.png"))[args.new :]:
        extra.unlink()
    logs = cache / "logs"
    samples: list[Sample] = []
    for r in range(1, args.rounds + 1):
        for rows in (args.small, args.large):  # alternate the sizes: the shared machine's speed drifts
            samples += measure_day(
                builds[rows], steps, new_images=new_images, new=args.new, noop=args.noop, logs=logs, round_no=r
            )
    table = summarize(samples, args.small, args.large)
    print()
    print(markdown(table, args.small, args.large))
    result = {
        "date": _today(),
        "machine": machine(),
        "commit": git_commit(),
        "params": {
            "small": args.small,
            "large": args.large,
            "new": args.new,
            "rounds": args.rounds,
            "days": args.days,
            "image_size": args.image_size,
            "steps": steps,
            "noop": args.noop,
        },
        "targets": {"time_ratio": TIME_TARGET, "rss_ratio": RSS_TARGET},
        "builds": {str(k): v.info for k, v in builds.items()},
        "summary": table,
        "samples": [asdict(s) for s in samples],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    return 0


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


if __name__ == "__main__":
    sys.exit(main())
