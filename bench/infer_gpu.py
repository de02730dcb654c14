"""GPU inference benchmark (one short run on a lent GPU machine; see docs/benchmarks.md).

Measured side by side in one process on one GPU:

- bare forward passes of DenseNet-121 on tensors already on the GPU, batch 64 and 256, fp32 and AMP,
  NCHW and channels_last: the ceiling;
- ``run_infer`` (the same code `cxr infer` runs) on a tensors table of N and 4N rows, batch 64 and 256,
  AMP: marginal images/s = 3N / (t4N - tN), and the share of the scoring loop the GPU waited for data
  (``data_wait_s`` / (``data_wait_s`` + ``compute_s``), from the job's own summary).

The tensors are real preprocessing outputs of synthetic X-rays (64 distinct ones, repeated under
distinct image ids); the model is a random-init DenseNet in xrv's cache layout (speed does not depend
on the weights' values). Usage: ``python bench/infer_gpu.py [--rows 2048] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL = "densenet121-res224-all"


def build_table(lake: Path, rows: int) -> None:
    """A tensors table of ``rows`` rows: 64 distinct preprocessed synthetic X-rays, repeated."""
    import numpy as np
    import pyarrow as pa
    from deltalake import write_deltalake

    from lakehouse.config import load_settings
    from lakehouse.delta_rs import ensure_table
    from lakehouse.tables import TENSORS, arrow_schema, encode_tensor
    from transforms.decode import DecodedImage
    from transforms.sample import synthetic_cxr, to_uint
    from transforms.tensor import PreprocessParams, to_tensor

    params = PreprocessParams()
    blobs = []
    for s in range(64):
        img = to_uint(synthetic_cxr(512, 512, seed=s), 8)
        t = to_tensor(DecodedImage(img, 255, "png", 512, 512, 8, "GRAY"))
        blobs.append((encode_tensor(t, "float16"), float(t.min()), float(t.max())))
    now = datetime.now(UTC)
    cols: dict[str, list] = {c: [] for c in arrow_schema(TENSORS).names}
    for i in range(rows):
        blob, lo, hi = blobs[i % 64]
        row = {
            "image_id": hashlib.sha256(f"bench-{i}".encode()).hexdigest(),
            "tensor": blob,
            "tensor_dtype": "float16",
            "tensor_shape": [1, 224, 224],
            "tensor_min": lo,
            "tensor_max": hi,
            "source_uri": f"bench://{i}.png",
            "source_bytes": len(blob),
            "source_format": "png",
            "width": 512,
            "height": 512,
            "bits_stored": 8,
            "preprocess_version": "1",
            "preprocess_params": params.to_json(),
            "run_id": "bench",
            "ingested_at": now,
        }
        for c in cols:
            cols[c].append(row.get(c))
    settings = load_settings()
    ensure_table(str(lake), TENSORS, settings)
    write_deltalake(str(lake / "tensors"), pa.Table.from_pydict(cols, schema=arrow_schema(TENSORS)), mode="append")
    del np


def bare(batch: int, *, amp: bool, channels_last: bool, seconds: float = 3.0) -> float:
    """img/s of forward passes on GPU-resident input."""
    import torch
    import torchxrayvision as xrv

    model = xrv.models.DenseNet(weights=None).eval().cuda()
    x = torch.rand(batch, 1, 224, 224, device="cuda") * 2048 - 1024
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", enabled=amp):
        for _ in range(3):
            model(x)
        torch.cuda.synchronize()
        n, t = 0, time.perf_counter()
        while time.perf_counter() - t < seconds:
            model(x)
            n += batch
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t)


def job(lake: Path, work: Path, weights: Path, *, batch: int, channels_last: bool) -> dict:
    """One `run_infer` over a fresh copy of ``lake``: wall seconds and the job's own timing split."""
    from inference.job import run_infer
    from lakehouse.config import load_settings

    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(lake, run)
    t = time.perf_counter()
    s = run_infer(
        str(run),
        settings=load_settings(),
        model_id=MODEL,
        weights_dir=str(weights),
        batch_size=batch,
        device="cuda",
        amp=True,
        channels_last=channels_last,
        commit_every=4096,
        progress=False,
    )
    wall = time.perf_counter() - t
    loop = s.extra["data_wait_s"] + s.extra["compute_s"]
    return {
        "wall_s": round(wall, 3),
        "predicted": s.predicted,
        "data_wait_share": round(s.extra["data_wait_s"] / loop, 3) if loop else None,
        **s.extra,
    }


def main() -> None:
    import torch
    import torchxrayvision as xrv

    from inference.weights import upstream_filename

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2048, help="N: the small table (the large one has 4N rows)")
    ap.add_argument("--out", default=str(ROOT / "bench/out"))
    args = ap.parse_args()
    out = Path(args.out)
    work = Path("/tmp/cxr-gpu-bench")
    shutil.rmtree(work, ignore_errors=True)
    weights = work / "weights"
    weights.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(xrv.models.DenseNet(weights=None), weights / upstream_filename(MODEL))
    t = time.perf_counter()
    small, large = work / "small", work / "large"
    build_table(small, args.rows)
    build_table(large, args.rows * 4)
    print(f"tables built in {time.perf_counter() - t:.1f}s", flush=True)
    report: dict = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores, {platform.python_version()}",
        "torch": torch.__version__,
        "xrv": xrv.__version__,
        "rows": [args.rows, args.rows * 4],
        "bare_img_s": {},
        "job": {},
    }
    torch.backends.cudnn.benchmark = True
    for batch in (64, 256):
        for amp in (False, True):
            for cl in (False, True):
                key = f"b{batch}-{'amp' if amp else 'fp32'}-{'cl' if cl else 'nchw'}"
                report["bare_img_s"][key] = round(bare(batch, amp=amp, channels_last=cl), 1)
                print(key, report["bare_img_s"][key], flush=True)
    for batch in (64, 256):
        for cl in (False, True):
            key = f"b{batch}-amp-{'cl' if cl else 'nchw'}"
            job(small, work, weights, batch=batch, channels_last=cl)  # warm-up (cudnn autotune, page cache)
            a = job(small, work, weights, batch=batch, channels_last=cl)
            b = job(large, work, weights, batch=batch, channels_last=cl)
            marginal = 3 * args.rows / (b["wall_s"] - a["wall_s"])
            ceiling = report["bare_img_s"][key]
            report["job"][key] = {
                "small": a,
                "large": b,
                "marginal_img_s": round(marginal, 1),
                "vs_bare": round(marginal / ceiling, 2),
            }
            print(key, json.dumps(report["job"][key]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "infer_gpu.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
