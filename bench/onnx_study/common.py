"""Shared: build the rescaled random-init checkpoint (as tests/conftest.py does), load it with xrv, make inputs."""

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchxrayvision as xrv

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

MODEL = "densenet121-res224-all"
D = Path(os.environ.get("ORT_STUDY_DIR", "/tmp/ortstudy"))  # work folder: models, inputs, results
WDIR = D / "weights"


def make_checkpoint() -> Path:
    from inference.weights import upstream_filename
    from transforms.decode import DecodedImage
    from transforms.sample import synthetic_cxr, to_uint
    from transforms.tensor import to_tensor

    path = WDIR / upstream_filename(MODEL)
    if path.exists():
        return path
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None).eval()
    imgs = [to_uint(synthetic_cxr(256, 256, seed=s), 8) for s in range(4)]
    batch = torch.from_numpy(np.stack([to_tensor(DecodedImage(i, 255, "png", 256, 256, 8, "GRAY")) for i in imgs]))
    with torch.no_grad():
        feats = F.adaptive_avg_pool2d(F.relu(model.features(batch)), 1).flatten(1)
        logits = model.classifier(feats)
        model.classifier.weight.mul_(1.0 / (logits.std(dim=0, keepdim=True).T + 1e-6))
        model.classifier.bias.copy_(-model.classifier(feats).mean(dim=0) + model.classifier.bias)
    WDIR.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return path


def load_model():
    """As inference.job._load_xrv: xrv's own loader -> op_threshs + input_resolution set."""
    make_checkpoint()
    return xrv.models.DenseNet(weights=MODEL, cache_dir=str(WDIR)).eval()


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def make_inputs(n: int = 64) -> torch.Tensor:
    p = D / f"inputs{n}.pt"
    if p.exists():
        return torch.load(p)
    from transforms.decode import DecodedImage
    from transforms.sample import synthetic_cxr, to_uint
    from transforms.tensor import to_tensor

    arrs = []
    for s in range(n):
        h, w = (256, 256) if s % 2 == 0 else (320, 288)
        bits = 8 if s % 3 else 12
        u = to_uint(synthetic_cxr(h, w, seed=1000 + s), bits)
        arrs.append(to_tensor(DecodedImage(u, 2**bits - 1, "png", w, h, bits, "GRAY")))
    x = torch.from_numpy(np.stack(arrs).astype(np.float32))
    torch.save(x, p)
    return x
