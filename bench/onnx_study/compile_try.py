"""torch.compile (inductor) on the CPU: first-call time, parity with eager, img/s (``python compile_try.py [mode]``)."""

import sys
import time

import numpy as np
import torch
from common import load_model, make_inputs

torch.set_num_threads(2)
m = load_model()
x = make_inputs(64)
mode = sys.argv[1] if len(sys.argv) > 1 else "default"
with torch.inference_mode():
    ref = np.concatenate([m(x[i : i + 16]).numpy() for i in range(0, 64, 16)])
c = torch.compile(m, mode=None if mode == "default" else mode, dynamic=False)
t = time.perf_counter()
with torch.inference_mode():
    c(x[:16])
print(f"compile {mode}: first call {time.perf_counter() - t:.1f}s", flush=True)


def run(mod):
    with torch.inference_mode():
        return np.concatenate([mod(x[i : i + 16]).numpy() for i in range(0, 64, 16)])


out = run(c)
print(f"parity cal maxabs vs eager {np.abs(out - ref).max():.3e}", flush=True)
for r in range(3):
    t = time.perf_counter()
    run(m)
    e = 64 / (time.perf_counter() - t)
    t = time.perf_counter()
    run(c)
    k = 64 / (time.perf_counter() - t)
    print(f"round {r}: eager {e:.2f}  compiled {k:.2f}  ratio {k / e:.3f}", flush=True)
