"""Max abs difference of calibrated outputs and raw logits against eager: channels_last, frozen, ONNX Runtime."""

import copy

import numpy as np
import onnxruntime as ort
import torch
import torchxrayvision as xrv
from common import D, load_model, make_inputs

torch.set_num_threads(2)
m = load_model()
x = make_inputs(64)
raw = copy.deepcopy(m)
raw.op_threshs = None
B = 16


def run_torch(mod, cl=False):
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), B):
            xb = x[i : i + B]
            if cl:
                xb = xb.contiguous(memory_format=torch.channels_last)
            outs.append(mod(xb).float().numpy())
    return np.concatenate(outs)


ref = run_torch(m)
ref_raw = run_torch(raw)
th = m.op_threshs
print(
    "ref cal range",
    ref.min(),
    ref.max(),
    "frac in (0.02,0.98):",
    ((ref > 0.02) & (ref < 0.98)).mean(),
    "NaN-thresh cols",
    int(torch.isnan(th).sum()),
)
print("ref raw logits std", ref_raw.std(0).round(2))
# sanity: calibrated = op_norm(sigmoid(raw))
print(
    "op_norm(sigmoid(raw)) vs ref",
    np.abs(xrv.models.op_norm(torch.sigmoid(torch.from_numpy(ref_raw)), th).numpy() - ref).max(),
)


def rep(name, cal, rawo=None):
    s = f"{name:38s} cal maxabs {np.abs(cal - ref).max():.3e}"
    if rawo is not None:
        s += f"  raw maxabs {np.abs(rawo - ref_raw).max():.3e}"
        s += f"  (rel {np.abs(rawo - ref_raw).max() / np.abs(ref_raw).max():.1e})"
    print(s, flush=True)


# channels_last torch
cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
clr = copy.deepcopy(raw).to(memory_format=torch.channels_last)
rep("torch channels_last", run_torch(cl, True), run_torch(clr, True))
ex = torch.linspace(-1024, 1024, 2 * 224 * 224).reshape(2, 1, 224, 224)
with torch.no_grad():
    fr = torch.jit.freeze(torch.jit.trace(m, ex, check_trace=False).eval(), optimize_numerics=False)
    frr = torch.jit.freeze(torch.jit.trace(raw, ex, check_trace=False).eval(), optimize_numerics=False)
run_torch(fr)
run_torch(frr)
rep("torch frozen", run_torch(fr), run_torch(frr))
LV = {
    "DISABLE": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def sess(path, lvl):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.graph_optimization_level = LV[lvl]
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_ort(s, bs=B):
    xn = x.numpy()
    return np.concatenate([s.run(None, {"x": xn[i : i + bs]})[0] for i in range(0, len(xn), bs)])


for exp in ("ts", "dynamo"):
    for lvl in LV:
        sc = sess(D / f"cal_{exp}.onnx", lvl)
        sr = sess(D / f"raw_{exp}.onnx", lvl)
        c = run_ort(sc)
        r = run_ort(sr)
        rep(f"ORT {exp} {lvl}", c, r)
        # hybrid: ORT raw logits + torch sigmoid/op_norm
        hyb = xrv.models.op_norm(torch.sigmoid(torch.from_numpy(r)), th).numpy()
        print(
            f"   hybrid(ORT raw + torch op_norm) cal maxabs {np.abs(hyb - ref).max():.3e};"
            f"  ORT cal vs hybrid {np.abs(hyb - c).max():.3e}"
        )
        if lvl == "ALL":
            for bs in (1, 7, 64):
                print(f"   batch {bs}: cal maxabs {np.abs(run_ort(sc, bs) - ref).max():.3e}")
# eager batch-size dependence (reference noise floor)
print(
    "eager batch 1 vs batch 16",
    np.abs(np.concatenate([m(x[i : i + 1]).detach().numpy() for i in range(64)]) - ref).max(),
)
