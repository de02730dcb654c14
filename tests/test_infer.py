"""The inference job: parity with xrv, idempotent and incremental runs, shards, SIGKILL and rerun,
the untrained stand-in. Tensors tables are written with delta-rs (the job has no JVM either)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from inference.job import Shard, run_infer
from lakehouse.config import Settings, load_settings
from lakehouse.delta_rs import read_arrow
from lakehouse.errors import WeightsNotFoundError
from lakehouse.tables import PATHOLOGY_COLUMNS, PREDICTIONS, TENSORS, UNTRAINED_SUFFIX, decode_tensor
from tests.conftest import MODEL, write_tensors_table
from transforms.sample import VALID_KINDS, write_samples


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory, settings: Settings) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("infer")
    files = write_samples(root / "in", count=len(VALID_KINDS) + 3, seed=7)
    n = write_tensors_table(root / "lake", files, settings)
    return root / "lake", n


def _copy(lake: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "lake"
    shutil.copytree(lake, dst)
    return dst


# (graph, engine it runs, tolerance, device label): the PyTorch paths are held to 1e-5; ONNX Runtime (the
# CPU default) computes the convolutions with its own kernels and lands ~2.5e-5..4.3e-5 away
# (docs/benchmarks.md): held to 1e-4 on every kind of generated image
@pytest.mark.parametrize(
    ("graph", "engine", "tolerance", "device"),
    [
        ("auto", "onnx", 1e-4, "cpu+onnxruntime-"),
        ("frozen", "frozen", 1e-5, "cpu"),
        ("eager", "eager", 1e-5, "cpu"),
        ("onnx", "onnx", 1e-4, "cpu+onnxruntime-"),
    ],
)
def test_predictions_equal_xrv_called_directly(
    graph: str,
    engine: str,
    tolerance: float,
    device: str,
    lake: tuple[Path, int],
    checkpoint: Path,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    import torchxrayvision as xrv

    monkeypatch.setenv("CXR_ONNX_CACHE", str(tmp_path / "onnx-cache"))
    settings = load_settings()  # the export cache is a setting, read from the environment
    root = _copy(lake[0], tmp_path)
    s = run_infer(
        str(root),
        settings=settings,
        weights_dir=str(checkpoint.parent),
        batch_size=3,
        device="cpu",
        graph=graph,  # type: ignore[arg-type]
        progress=False,
    )
    assert (s.predicted, s.candidates, s.untrained, s.extra["graph"]) == (lake[1], lake[1], False, engine)
    assert s.gpu_seconds == 0 and s.cpu_seconds > 0
    preds = read_arrow(str(root), PREDICTIONS, settings).to_pylist()
    tensors = {r["image_id"]: r for r in read_arrow(str(root), TENSORS, settings).to_pylist()}
    model = xrv.models.DenseNet(weights=MODEL, cache_dir=str(checkpoint.parent)).eval()
    # xrv's model called directly on the same tensors, in the same batches the job formed
    order = read_arrow(str(root), TENSORS, settings).column("image_id").to_pylist()
    expected_by_id = {}
    for start in range(0, len(order), 3):
        ids = order[start : start + 3]
        batch = torch.from_numpy(np.stack([decode_tensor(tensors[i]["tensor"], "float16", [1, 224, 224]) for i in ids]))
        with torch.inference_mode():
            expected_by_id.update(zip(ids, model(batch).numpy(), strict=True))
    expected = np.stack([expected_by_id[p["image_id"]] for p in preds])
    got = np.array([[p[PATHOLOGY_COLUMNS[t]] for t in model.targets] for p in preds], dtype=np.float32)
    assert np.abs(got - expected).max() <= tolerance
    kinds = {Path(tensors[p["image_id"]]["source_uri"]).name.rsplit("_", 1)[0] for p in preds}
    assert kinds == set(VALID_KINDS)  # every kind of generated image is in the comparison
    assert ((got >= 0) & (got <= 1)).all()  # xrv's calibrated outputs
    assert got.std(axis=0).max() > 1e-4  # outputs differ between images: the comparison means something
    row = preds[0]
    assert (
        row["model_id"] == MODEL
        and row["weights_source"] == "weights-dir"
        and row["tensors_version"] == s.tensors_version
    )
    assert len(row["weights_sha256"]) == 64 and row["xrv_version"] == xrv.__version__
    assert row["device"].startswith(device) and (device != "cpu" or row["device"] == "cpu")
    if engine == "onnx":  # exported once, reused by the next run (keyed by the weights' sha256)
        assert [p.name.split("-torch")[0] for p in (tmp_path / "onnx-cache").glob("*.onnx")] == [row["weights_sha256"]]


def test_default_without_onnxruntime_falls_back_to_the_frozen_graph_with_a_warning(
    lake: tuple[Path, int], checkpoint: Path, settings: Settings, tmp_path: Path
) -> None:
    """`cxr infer` (default --graph auto) where onnxruntime cannot be imported: it still scores, with the
    frozen graph, says so in a WARNING with the install command, and the rows say ``device`` = cpu."""
    import json

    root = _copy(lake[0], tmp_path)
    fake = tmp_path / "no-onnxruntime" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("No module named onnxruntime (removed by the test)")\n')
    repo = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(fake.parent), str(repo)]),
        "CXR_ONNX_CACHE": str(tmp_path / "onnx-cache"),
        "COLUMNS": "400",
    }
    cmd = [str(Path(sys.executable).parent / "cxr"), "infer", "--lakehouse", str(root), "--weights-dir", str(checkpoint.parent),
           "--device", "cpu", "--json", "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)[0]
    assert (summary["predicted"], summary["device"], summary["extra"]["graph"]) == (lake[1], "cpu", "frozen")
    log = " ".join(r.stderr.split())
    assert "WARNING" in log and "onnxruntime cannot be imported" in log, log[-2000:]
    assert "pip install 'cxr-lakehouse[inference]'" in log
    assert {row["device"] for row in read_arrow(str(root), PREDICTIONS, settings).to_pylist()} == {"cpu"}
    assert not (tmp_path / "onnx-cache").exists()  # nothing was exported


def test_rerun_scores_only_missing_pairs(
    lake: tuple[Path, int], checkpoint: Path, settings: Settings, tmp_path: Path
) -> None:
    root = _copy(lake[0], tmp_path)
    first = run_infer(str(root), settings=settings, weights_dir=str(checkpoint.parent), device="cpu", progress=False)
    again = run_infer(str(root), settings=settings, weights_dir=str(checkpoint.parent), device="cpu", progress=False)
    assert (first.predicted, again.predicted, again.already_predicted) == (lake[1], 0, lake[1])
    assert read_arrow(str(root), PREDICTIONS, settings).num_rows == lake[1]


def test_shards_are_disjoint_and_complete(
    lake: tuple[Path, int], checkpoint: Path, settings: Settings, tmp_path: Path
) -> None:
    root = _copy(lake[0], tmp_path)
    runs = [
        run_infer(
            str(root),
            settings=settings,
            weights_dir=str(checkpoint.parent),
            shard=Shard(i, 3),
            device="cpu",
            progress=False,
        )
        for i in range(3)
    ]
    counts = [s.predicted for s in runs]
    ids = read_arrow(str(root), PREDICTIONS, settings).column("image_id").to_pylist()
    assert sum(counts) == len(ids) == len(set(ids)) == lake[1]
    # candidates count every image a shard owns, predicted before or not: disjoint means they sum to n
    assert sum(s.candidates for s in runs) == lake[1]
    assert all(c > 0 for c in counts)
    assert Shard.parse("2/3") == Shard(2, 3)


def test_untrained_stand_in_says_so_in_every_row(
    lake: tuple[Path, int], settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _copy(lake[0], tmp_path)
    monkeypatch.setenv("CXR_WEIGHTS_BASE_URL", "http://127.0.0.1:9/unreachable")
    cache = str(tmp_path / "empty-cache")
    monkeypatch.setattr("torchxrayvision.utils.get_cache_dir", lambda: cache)
    with pytest.raises(WeightsNotFoundError):
        run_infer(str(root), settings=settings, device="cpu", progress=False)
    s = run_infer(str(root), settings=settings, allow_untrained=True, device="cpu", progress=False)
    assert s.untrained and s.model_id == MODEL + UNTRAINED_SUFFIX
    rows = read_arrow(str(root), PREDICTIONS, settings).to_pylist()
    assert len(rows) == lake[1]
    assert all(
        r["model_id"].endswith(UNTRAINED_SUFFIX)
        and r["weights_sha256"].startswith("none:")
        and r["weights_source"] == "untrained"
        for r in rows
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_loses_and_duplicates_nothing(
    lake: tuple[Path, int], checkpoint: Path, settings: Settings, tmp_path: Path
) -> None:
    root = _copy(lake[0], tmp_path)
    cmd = [str(Path(sys.executable).parent / "cxr"), "infer", "--lakehouse", str(root), "--weights-dir", str(checkpoint.parent),
           "--device", "cpu", "--batch-size", "2", "--commit-every", "2", "--no-progress"]  # fmt: skip
    log = tmp_path / "delta_log"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 300
    plog = root / "predictions" / "_delta_log"
    while time.time() < deadline and proc.poll() is None:  # wait for the first MERGE commits, then kill
        if plog.is_dir() and len(list(plog.glob("*.json"))) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: give it more tensors"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    del log
    partial = read_arrow(str(root), PREDICTIONS, settings).num_rows
    assert 0 < partial < lake[1]
    s = run_infer(str(root), settings=settings, weights_dir=str(checkpoint.parent), device="cpu", progress=False)
    ids = read_arrow(str(root), PREDICTIONS, settings).column("image_id").to_pylist()
    assert (s.already_predicted, s.predicted) == (partial, lake[1] - partial)
    assert len(ids) == len(set(ids)) == lake[1]


def test_within_2e3_of_xrvs_own_preprocessing_and_model(
    lake: tuple[Path, int], checkpoint: Path, settings: Settings, tmp_path: Path
) -> None:
    """Our stored float16 tensors -> our job, against xrv's own load -> crop -> resize -> model, per image kind."""
    import torch
    import torchxrayvision as xrv

    from tests.xrv_reference import xrv_reference

    root = _copy(lake[0], tmp_path)
    run_infer(str(root), settings=settings, weights_dir=str(checkpoint.parent), device="cpu", progress=False)
    preds = read_arrow(str(root), PREDICTIONS, settings).to_pylist()
    uris = {r["image_id"]: r["source_uri"] for r in read_arrow(str(root), TENSORS, settings).to_pylist()}
    model = xrv.models.DenseNet(weights=MODEL, cache_dir=str(checkpoint.parent)).eval()
    kinds = set()
    for p in preds:
        path = Path(uris[p["image_id"]])
        with torch.inference_mode():
            ref = model(torch.from_numpy(xrv_reference(path)[None])).numpy()[0]
        got = np.array([p[PATHOLOGY_COLUMNS[t]] for t in model.targets], dtype=np.float32)
        assert np.abs(got - ref).max() <= 2e-3, path.name
        kinds.add(path.name.rsplit("_", 1)[0])
    assert kinds == set(VALID_KINDS)


def test_missing_tensors_table_and_unknown_model_are_errors(tmp_path: Path, settings: Settings) -> None:
    from lakehouse.errors import CxrError

    with pytest.raises(CxrError, match="run `cxr preprocess` first"):
        run_infer(str(tmp_path / "nowhere"), settings=settings, allow_untrained=True, device="cpu", progress=False)
    assert not (tmp_path / "nowhere" / "tensors").exists()
    with pytest.raises(WeightsNotFoundError, match="unknown weights"):
        run_infer(str(tmp_path), settings=settings, model_id="densenet-nope", allow_untrained=True, progress=False)


def test_integrity_failures_never_fall_back_to_a_stand_in(
    lake: tuple[Path, int], checkpoint: Path, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference.weights import WeightsIntegrityError

    root = _copy(lake[0], tmp_path)
    monkeypatch.setenv("CXR_WEIGHTS_SHA256_DENSENET121_RES224_ALL", "0" * 64)
    with pytest.raises(WeightsIntegrityError):
        run_infer(
            str(root),
            settings=load_settings(),
            weights_dir=str(checkpoint.parent),
            allow_untrained=True,
            device="cpu",
            progress=False,
        )


@pytest.mark.slow
def test_resnet50_res512_on_224_tensors_upsamples_like_xrv(
    tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resnet50-res512-all` on a 224 lakehouse: xrv's ResNet resizes each input to 512 itself
    (`fix_resolution`, with a warning); the job gives exactly what xrv gives on the same tensors."""
    import torch
    import torchvision
    import torchxrayvision as xrv

    from inference.weights import upstream_filename

    name = "resnet50-res512-all"
    weights = tmp_path / "weights"
    weights.mkdir()
    files = write_samples(tmp_path / "in", count=3, seed=11)
    write_tensors_table(tmp_path / "lake", files, settings)
    tensors = read_arrow(str(tmp_path / "lake"), TENSORS, settings).to_pylist()
    batch = torch.from_numpy(np.stack([decode_tensor(t["tensor"], "float16", [1, 224, 224]) for t in tensors]))
    torch.manual_seed(0)
    net = torchvision.models.resnet50(num_classes=18, weights=None).eval()
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # random init saturates the outputs: rescale the classifier to unit-spread logits on these inputs
    feats: list[torch.Tensor] = []
    hook = net.fc.register_forward_hook(lambda _m, i, _o: feats.append(i[0]))
    with torch.no_grad():
        net(torch.nn.functional.interpolate(batch, size=(512, 512), mode="bilinear"))
        hook.remove()
        logits = net.fc(feats[0])
        net.fc.weight.mul_(1.0 / (logits.std(dim=0, keepdim=True).T + 1e-6))
        net.fc.bias.copy_(-net.fc(feats[0]).mean(dim=0) + net.fc.bias)
    torch.save(net.state_dict(), weights / upstream_filename(name))  # xrv's ResNet files are state dicts
    s = run_infer(str(tmp_path / "lake"), settings=settings, model_id=name, weights_dir=str(weights), progress=False)
    assert (s.predicted, s.untrained) == (3, False)
    # ONNX cannot export xrv's antialiased resize: the default falls back to the frozen graph (with a warning)
    assert (s.extra["graph"], s.device) == ("frozen", "cpu")
    preds = {r["image_id"]: r for r in read_arrow(str(tmp_path / "lake"), PREDICTIONS, settings).to_pylist()}
    model = xrv.models.ResNet(weights=name, cache_dir=str(weights)).eval()
    capsys.readouterr()
    with torch.inference_mode():
        expected = model(batch).numpy()
    assert "Input size (224x224) is not the native resolution (512x512)" in capsys.readouterr().out  # xrv prints
    # targets whose calibration threshold is NaN come out of xrv as a constant 0.5: the job writes null
    calibrated = [j for j, t in enumerate(model.op_threshs.tolist()) if t == t]
    assert len(calibrated) < len(model.targets)
    got = np.array(
        [[preds[t["image_id"]][PATHOLOGY_COLUMNS[k]] for k in model.targets] for t in tensors], dtype=np.float32
    )
    assert np.abs(got[:, calibrated] - expected[:, calibrated]).max() <= 1e-5
    assert got[:, calibrated].std(axis=0).max() > 1e-3  # not saturated: the comparison means something
    assert np.isnan(np.delete(got, calibrated, axis=1)).all()
    # every default pathology this model lacks is null, not zero
    lacking = set(PATHOLOGY_COLUMNS.values()) - {PATHOLOGY_COLUMNS[k] for k in model.targets if k in PATHOLOGY_COLUMNS}
    assert all(preds[t["image_id"]][c] is None for t in tensors for c in lacking)


_FAULTS = """
import ctypes, resource
from inference.job import tune_allocator
print(tune_allocator())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def churn():
    for _ in range(10):  # what a forward pass does: large blocks allocated, written, freed
        p = libc.malloc(48 << 20)
        ctypes.memset(p, 1, 48 << 20)
        libc.free(p)
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator tuning")
def test_allocator_tuning_reuses_large_blocks_instead_of_faulting_fresh_pages() -> None:
    """Large freed blocks stay on the heap (no fresh zero-filled pages per batch); off with CXR_MALLOC_TUNING=0."""
    root = Path(__file__).resolve().parent.parent

    def run(flag: str) -> tuple[str, int]:
        env = {**os.environ, "CXR_MALLOC_TUNING": flag, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, check=True)
        tuned, faults = out.stdout.split()
        return tuned, int(faults)

    tuned, faults_tuned = run("1")
    untuned, faults_default = run("0")
    assert (tuned, untuned) == ("True", "False")
    assert faults_default >= 10 * 48 // 2  # a fresh mapping per block: at least a fault per 2 MiB huge page
    assert faults_tuned < faults_default // 10, (faults_tuned, faults_default)
