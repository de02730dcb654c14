"""Host-side batch preparation of the inference job, old path against new, side by side.

What the GPU waits for between batches: Arrow batch of stored tensors -> model input. Old: a Python
bytes object per image, ``decode_tensor`` each to float32, ``np.stack``. New (``Predictor.pre``): one
(n, 1, 224, 224) view over the Arrow values buffer and a single copy (float16 kept for the GPU, where it
is converted). Usage: ``python bench/host_prep.py [--batch 256]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    import numpy as np
    import pyarrow as pa

    from inference.job import _stacked_view
    from lakehouse.tables import decode_tensor

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    blobs = [(rng.random((1, 224, 224), dtype=np.float32) * 2048 - 1024).astype("<f2").tobytes() for _ in range(64)]
    arr = pa.array([blobs[i % 64] for i in range(args.batch)], type=pa.binary())
    dtypes, shapes = ["float16"] * args.batch, [[1, 224, 224]] * args.batch

    def old() -> np.ndarray:
        return np.stack([decode_tensor(t, d, s) for t, d, s in zip(arr.to_pylist(), dtypes, shapes, strict=True)])

    def new_gpu() -> np.ndarray:  # what a CUDA host does: one copy into the pinned float16 buffer
        out = np.empty((args.batch, 1, 224, 224), dtype=np.float16)
        out[...] = _stacked_view(arr, dtypes, shapes)
        return out

    def new_cpu() -> np.ndarray:  # what a CPU host does: one float16 -> float32 copy
        return _stacked_view(arr, dtypes, shapes).astype(np.float32)

    assert np.array_equal(old(), new_cpu()) and np.array_equal(old(), new_gpu().astype(np.float32))
    res = {}
    for name, fn in (("old", old), ("new_cpu", new_cpu), ("new_gpu_host", new_gpu)):
        fn()
        t = time.perf_counter()
        for _ in range(args.repeat):
            fn()
        res[name] = round(args.batch * args.repeat / (time.perf_counter() - t))
    print(
        json.dumps(
            {"batch": args.batch, "images_per_s": res, "speedup_gpu_host": round(res["new_gpu_host"] / res["old"], 1)}
        )
    )


if __name__ == "__main__":
    main()
