"""img/s of eager, channels_last, frozen TorchScript and ONNX Runtime (batch 16, 2 threads, interleaved rounds)."""

import copy
import json
import sys
import time

import numpy as np
import onnxruntime as ort
import torch
from common import D, load_model, make_inputs

torch.set_num_threads(2)
torch.set_num_interop_threads(1)
m = load_model()
x = make_inputs(64)
xn = x.numpy()
B = 16
cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
ex = torch.linspace(-1024, 1024, 2 * 224 * 224).reshape(2, 1, 224, 224)
with torch.no_grad():
    fr = torch.jit.freeze(torch.jit.trace(m, ex, check_trace=False).eval(), optimize_numerics=False)
LV = {
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def sess(path, lvl):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = LV[lvl]
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    t = time.perf_counter()
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    print(f"session {path.name} {lvl} created in {time.perf_counter() - t:.2f}s", flush=True)
    return s


def torch_fn(mod, clf=False):
    def f():
        with torch.inference_mode():
            for i in range(0, 64, B):
                xb = torch.from_numpy(xn[i : i + B])
                if clf:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                mod(xb).float().numpy()

    return f


def ort_fn(s):
    def f():
        for i in range(0, 64, B):
            s.run(None, {"x": xn[i : i + B]})

    return f


V = {"eager": torch_fn(m), "channels_last": torch_fn(cl, True), "frozen": torch_fn(fr)}
for exp in ("ts", "dynamo"):
    for lvl in ("BASIC", "EXTENDED", "ALL"):
        if lvl != "ALL":
            continue
        V[f"ort_{exp}_{lvl}"] = ort_fn(sess(D / f"cal_{exp}.onnx", lvl))
for f in V.values():  # warm-up
    f()
R = int(sys.argv[1]) if len(sys.argv) > 1 else 3
res = {k: [] for k in V}
keys = list(V)
for r in range(R):
    order = keys if r % 2 == 0 else keys[::-1]
    for k in order:
        t = time.perf_counter()
        V[k]()
        res[k].append(64 / (time.perf_counter() - t))
    print(f"round {r}: " + "  ".join(f"{k}={res[k][-1]:.2f}" for k in keys), flush=True)
print(
    "\nvariant               "
    + "  ".join(f"r{i}" for i in range(R))
    + "   mean  ratio_vs_eager(per-round mean)  ratio_vs_best_torch"
)
for k in keys:
    rat = [res[k][i] / res["eager"][i] for i in range(R)]
    best = [max(res["eager"][i], res["channels_last"][i], res["frozen"][i]) for i in range(R)]
    rb = [res[k][i] / best[i] for i in range(R)]
    print(
        f"{k:20s} "
        + " ".join(f"{v:5.2f}" for v in res[k])
        + f"  {np.mean(res[k]):5.2f}  {np.mean(rat):.3f} [{min(rat):.2f}-{max(rat):.2f}]"
        + f"  {np.mean(rb):.3f} [{min(rb):.2f}-{max(rb):.2f}]"
    )
with open(D / "bench.json", "w") as fh:
    json.dump(res, fh, indent=1)
