"""Inference benchmark: `cxr infer` against bare forward passes and the TorchXRayVision process_batch pattern.

Measured side by side in one run, CPU, 2 threads:

- ``cxr infer`` as a process on a tensors table of N and 10N rows: marginal rate = 9N / (t10N - tN),
  and its peak RSS at N and 10N rows (bounded batches: memory must not grow with the table);
- bare forward passes on in-memory tensors, batch 16, best of eager and channels_last;
- the xrv ``process_batch`` pattern: ``load_image`` per 1024x1024 PNG -> XRayCenterCrop ->
  XRayResizer(224) -> model on a batch of 1.

The model is a random-init DenseNet saved in xrv's cache layout (no weights can be downloaded here);
speed does not depend on the weights' values. Usage: ``python bench/infer.py [--rows 32]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = "densenet121-res224-all"


def build(work: Path, rows: int) -> tuple[Path, list[Path], Path]:
    """PNG files, a tensors table of ``rows`` rows made from them, and a weights folder."""
    import torch
    import torchxrayvision as xrv

    from bench.preprocess import make_pngs
    from inference.weights import upstream_filename
    from lakehouse.config import load_settings
    from tests.conftest import write_tensors_table

    pngs = make_pngs(work / "pngs", rows)
    lake = work / f"lake_{rows}"
    if not (lake / "tensors").exists():
        write_tensors_table(lake, pngs, load_settings())
    weights = work / "weights"
    if not (weights / upstream_filename(MODEL)).exists():
        weights.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(xrv.models.DenseNet(weights=None), weights / upstream_filename(MODEL))
    return lake, pngs, weights


def cxr_infer(lake: Path, weights: Path, tmp: Path, extra: list[str]) -> tuple[float, int, dict]:
    """Wall seconds, peak RSS (KiB) and summary of `cxr infer` on a fresh copy of ``lake``."""
    run = tmp / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(lake, run)
    cmd = ["/usr/bin/time", "-f", "%M", str(ROOT / ".venv/bin/cxr"), "infer", "--lakehouse", str(run),
           "--weights-dir", str(weights), "--device", "cpu", "--json", "--no-progress", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    rss = int(out.stderr.strip().splitlines()[-1])
    return wall, rss, json.loads(out.stdout)[0]


def bare_forward(n: int = 64) -> dict[str, float]:
    """img/s of eager and channels_last forward passes, batch 16, on in-memory tensors."""
    import torch
    import torchxrayvision as xrv

    torch.set_num_threads(2)
    model = xrv.models.DenseNet(weights=None).eval()
    x = torch.rand(16, 1, 224, 224) * 2048 - 1024
    out = {}
    for name, m, inp in (
        ("eager", model, x),
        ("channels_last", model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)),
    ):
        with torch.inference_mode():
            m(inp)
            t = time.perf_counter()
            for _ in range(n // 16):
                m(inp)
        out[name] = n / (time.perf_counter() - t)
    return out


def process_batch_pattern(pngs: list[Path]) -> float:
    """img/s of xrv's process_batch.py loop: load_image per file, batch of 1."""
    import torch
    import torchxrayvision as xrv

    torch.set_num_threads(2)
    model = xrv.models.DenseNet(weights=None).eval()
    crop, resize = xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)
    with torch.inference_mode():
        model(torch.from_numpy(resize(crop(xrv.utils.load_image(str(pngs[0])))))[None])
        t = time.perf_counter()
        for p in pngs:
            model(torch.from_numpy(resize(crop(xrv.utils.load_image(str(p)))))[None])
    return len(pngs) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32, help="N: the small table (the large one has 10N rows)")
    ap.add_argument("--work", default=str(ROOT / "bench/out/infer"))
    args = ap.parse_args()
    work = Path(args.work)
    small, pngs, weights = build(work, args.rows)
    large, _, _ = build(work, args.rows * 10)
    # this VM's speed drifts by +-20% over minutes: the references are measured before and after the
    # cxr runs and averaged
    bare_before = bare_forward()
    pattern_before = process_batch_pattern(pngs[: args.rows])
    results = {}
    import importlib.util

    graphs = ["frozen", "eager"] + (["onnx"] if importlib.util.find_spec("onnxruntime") else [])
    for graph in graphs:
        t1, rss1, _ = cxr_infer(small, weights, work, ["--graph", graph])
        t2, rss2, s2 = cxr_infer(large, weights, work, ["--graph", graph])
        assert s2["predicted"] == args.rows * 10, s2
        marginal = 9 * args.rows / (t2 - t1)
        results[graph] = {
            "small_s": round(t1, 2),
            "large_s": round(t2, 2),
            "marginal_img_s": round(marginal, 2),
            "fixed_s": round(t1 - args.rows / marginal, 2),
            "peak_rss_small_mib": round(rss1 / 1024),
            "peak_rss_large_mib": round(rss2 / 1024),
            "rss_ratio": round(rss2 / rss1, 2),
        }
    bare_after = bare_forward()
    pattern_after = process_batch_pattern(pngs[: args.rows])
    bare = {k: (bare_before[k] + bare_after[k]) / 2 for k in bare_before}
    pattern = (pattern_before + pattern_after) / 2
    best_bare = max(bare.values())
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads 2",
        "rows": [args.rows, args.rows * 10],
        "bare_forward_img_s": {k: round(v, 2) for k, v in bare.items()},
        "process_batch_pattern_img_s": round(pattern, 2),
        "before_after": {
            "bare": [{k: round(v, 2) for k, v in bare_before.items()}, {k: round(v, 2) for k, v in bare_after.items()}],
            "process_batch": [round(pattern_before, 2), round(pattern_after, 2)],
        },
        "cxr_infer": results,
        "ratio_vs_bare": {g: round(r["marginal_img_s"] / best_bare, 2) for g, r in results.items()},
        "ratio_vs_process_batch": {g: round(r["marginal_img_s"] / pattern, 2) for g, r in results.items()},
    }
    (ROOT / "bench/out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench/out/infer.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
