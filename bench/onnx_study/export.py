"""Export ONNX variants: TorchScript exporter (dynamo=False) and dynamo exporter, with and without op_norm."""

import copy
import time

import torch
from common import D, load_model, make_checkpoint, make_inputs, sha256

torch.set_num_threads(2)
m = load_model()
print("op_threshs", m.op_threshs.shape, "input_resolution", getattr(m, "input_resolution", None))
print("weights sha256", sha256(make_checkpoint()))
x = make_inputs(64)
print("inputs", x.shape, x.dtype, float(x.min()), float(x.max()))
raw = copy.deepcopy(m)
raw.op_threshs = None  # raw logits (no sigmoid, no op_norm)
ex = x[:2]
for name, mod in [("cal", m), ("raw", raw)]:
    for dyn in (False, True):
        out = D / f"{name}_{'dynamo' if dyn else 'ts'}.onnx"
        t = time.perf_counter()
        try:
            kw = dict(input_names=["x"], output_names=["y"], opset_version=18, dynamo=dyn)
            if dyn:
                kw["dynamic_shapes"] = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
                kw["external_data"] = False
            else:
                kw["dynamic_axes"] = {"x": {0: "batch"}, "y": {0: "batch"}}
            with torch.no_grad():
                torch.onnx.export(mod, (ex,), str(out), **kw)
            print(f"EXPORT {out.name} ok {time.perf_counter() - t:.1f}s size {out.stat().st_size / 1e6:.1f}MB")
        except Exception as e:
            print(f"EXPORT {out.name} FAILED {time.perf_counter() - t:.1f}s: {type(e).__name__}: {str(e)[:1500]}")
