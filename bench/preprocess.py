"""Preprocessing benchmark: `cxr preprocess` against the TorchXRayVision reference loop and the bare limit.

Measured side by side in one run on the same synthetic 1024x1024 8-bit PNGs:

- ``cxr preprocess`` as a process (Spark start-up included) on two archive sizes: the marginal rate
  is (n2 - n1) / (t2 - t1), the fixed overhead t1 - n1 / rate;
- the TorchXRayVision reference loop in one process: ``xrv.utils.load_image`` -> ``XRayCenterCrop``
  -> ``XRayResizer(224)`` with its default engine (skimage);
- the bare limit: cv2 decode + centre crop + INTER_AREA resize in 2 processes, nothing stored
  (measured before and after the cxr runs on the large set; the mean is used).

Usage: ``python bench/preprocess.py [--small 400] [--large 1600] [--sample 200]``; prints a Markdown
block for docs/benchmarks.md and writes bench/out/preprocess.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _write_one(args: tuple[Path, int, np.ndarray]) -> None:
    from transforms.sample import png_bytes

    path, i, base = args
    # per-image noise of a few grey levels (like detector noise): unique bytes, realistic compression
    noise = np.random.default_rng(i).integers(-3, 4, base.shape, dtype=np.int16)
    img = np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    path.write_bytes(png_bytes(img))


def make_pngs(folder: Path, n: int, *, size: int = 1024) -> list[Path]:
    """n distinct synthetic chest-X-ray-like 8-bit PNGs of size x size (cached between runs)."""
    from transforms.sample import synthetic_cxr, to_uint

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:06d}.png" for i in range(n)]
    todo = [p for p in paths if not p.exists()]
    if todo:
        bases = [to_uint(synthetic_cxr(size, size, seed=s), 8) for s in range(8)]
        with mp.Pool(2) as pool:
            pool.map(_write_one, [(p, int(p.stem[4:]), bases[int(p.stem[4:]) % 8]) for p in todo], chunksize=16)
    return paths


def _bare_one(path: str) -> float:
    import cv2

    img = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    h, w = img.shape[:2]
    c = min(h, w)
    img = img[h // 2 - c // 2 : h // 2 - c // 2 + c, w // 2 - c // 2 : w // 2 - c // 2 + c]
    return float(cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA)[0, 0])


def bare_limit(paths: list[Path]) -> float:
    """images/s of cv2 decode + crop + INTER_AREA resize in 2 processes."""
    with mp.Pool(2) as pool:
        pool.map(_bare_one, [str(p) for p in paths[:8]])  # warm the workers
        t = time.perf_counter()
        pool.map(_bare_one, [str(p) for p in paths], chunksize=8)
        return len(paths) / (time.perf_counter() - t)


def reference_loop(paths: list[Path]) -> float:
    """images/s of TorchXRayVision's own preprocessing in one process (default resize engine)."""
    import torchxrayvision as xrv

    crop, resize = xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(224)
    resize(crop(xrv.utils.load_image(str(paths[0]))))
    t = time.perf_counter()
    for p in paths:
        resize(crop(xrv.utils.load_image(str(p))))
    return len(paths) / (time.perf_counter() - t)


def cxr_preprocess(folder: Path, lakehouse: Path) -> tuple[float, dict]:
    """Wall time of `cxr preprocess` as a fresh process, and its JSON summary."""
    shutil.rmtree(lakehouse, ignore_errors=True)
    cmd = [
        str(ROOT / ".venv/bin/cxr"),
        "preprocess",
        "--input",
        str(folder),
        "--lakehouse",
        str(lakehouse),
        "--no-progress",
        "--json",
    ]
    env = {**os.environ, "CXR_PSEUDONYM_KEY": "bench-key"}
    t = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return time.perf_counter() - t, json.loads(out.stdout)


def stored_bytes_per_tensor(lakehouse: Path, rows: int) -> float:
    files = list((lakehouse / "tensors").glob("*.parquet"))
    return sum(f.stat().st_size for f in files) / rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=400)
    ap.add_argument("--large", type=int, default=1600)
    ap.add_argument("--sample", type=int, default=200, help="images for the (slow) reference loop")
    ap.add_argument("--work", default=str(ROOT / "bench/out/work"))
    args = ap.parse_args()
    work = Path(args.work)
    all_paths = make_pngs(work / "pngs_all", args.large)
    small = work / "small"
    large = work / "large"
    for folder, n in ((small, args.small), (large, args.large)):
        folder.mkdir(parents=True, exist_ok=True)
        for p in all_paths[:n]:
            link = folder / p.name
            if not link.exists():
                os.link(p, link)
    subset = all_paths[: args.sample]

    # the bare limit on the whole large set, before and after the cxr runs (this VM's speed drifts)
    bare_before = bare_limit(all_paths)
    ref = reference_loop(subset)
    t_small, s_small = cxr_preprocess(small, work / "lake_small")
    t_large, s_large = cxr_preprocess(large, work / "lake_large")
    bare_after = bare_limit(all_paths)
    bare = (bare_before + bare_after) / 2
    assert s_small["new"] == args.small and s_large["new"] == args.large, (s_small, s_large)
    marginal = (args.large - args.small) / (t_large - t_small)
    fixed = t_small - args.small / marginal
    per_tensor = stored_bytes_per_tensor(work / "lake_large", args.large)
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "images": "synthetic 1024x1024 8-bit PNG",
        "cxr_small_s": round(t_small, 2),
        "cxr_large_s": round(t_large, 2),
        "cxr_marginal_img_s": round(marginal, 2),
        "cxr_fixed_overhead_s": round(fixed, 2),
        "reference_loop_img_s": round(ref, 2),
        "bare_limit_img_s": round(bare, 2),
        "bare_limit_before_after_img_s": [round(bare_before, 2), round(bare_after, 2)],
        "ratio_vs_reference": round(marginal / ref, 2),
        "ratio_vs_bare": round(marginal / bare, 2),
        "stored_bytes_per_tensor": round(per_tensor),
    }
    (ROOT / "bench/out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench/out/preprocess.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(
        f"\n| {result['date']} | {result['machine']} | {args.small}/{args.large} | {marginal:.1f} | {fixed:.1f} s "
        f"| {ref:.1f} | {bare:.1f} | {result['ratio_vs_reference']}x | {result['ratio_vs_bare']}x | {per_tensor / 1000:.1f} KB |"
    )


if __name__ == "__main__":
    main()
