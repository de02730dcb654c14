"""The batch inference job: ``tensors`` (Delta, read with delta-rs) -> TorchXRayVision -> ``predictions``.

- Reads in O(new images), in two passes over the pinned ``tensors`` version (``tensors_version``):
  first only the small ``image_id`` column of each Parquet row group (row groups whose ``image_id``
  statistics fall outside this shard's range are not even opened), which decides the rows to score:
  those this ``--shard i/N`` owns and that have no prediction for this model yet (``predictions`` is read
  as ids only). Then the ``tensor`` columns of only the row groups that hold such rows, one row group at
  a time, in bounded batches: a run with nothing to score reads ids and Parquet footers, no tensor
  bytes, so a killed run is simply run again and N shards do not mean N full scans.
- ``--shard i/N`` splits the work by contiguous ranges of the image id (sha256 hex: uniform); files
  written sorted by ``image_id`` let a shard skip the row groups of the others by their statistics.
- The next batch is read and decoded on a background thread while the model computes.
- The model is loaded once per process; ``pre`` / ``predict`` / ``post`` are separate; output columns
  come from ``model.targets``; xrv's calibrated outputs (sigmoid + ``op_norm``) are kept as they are.
- Engines: on CPU the default is ONNX Runtime (the model exported once per weights file; ~2x the
  PyTorch forward here, calibrated outputs within 1e-4 of xrv's eager model), falling back with a
  warning to the frozen TorchScript graph (bit-exact to eager) when onnxruntime is not installed;
  eager PyTorch on CUDA. Rows name the engine (``device``).
- Results are MERGEd on (image_id, model_id) every ``commit_every`` images: a crash loses at most the
  uncommitted batches, never duplicates a row.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from inference.weights import ResolvedWeights, resolve_weights, upstream_url, xrv_layout
from lakehouse.config import Settings, load_settings
from lakehouse.errors import CxrError, WeightsNotFoundError
from lakehouse.progress import progress_bar
from lakehouse.runs import InferRun, new_run_id, write_summary
from lakehouse.tables import (
    DECISION_COLUMNS,
    NUMPY_DTYPES,
    PATHOLOGY_COLUMNS,
    PREDICTIONS,
    TENSORS,
    THRESHOLDS,
    UNTRAINED_SUFFIX,
    arrow_schema,
    decode_tensor,
)

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

log = logging.getLogger(__name__)

DeviceChoice = Literal["auto", "cpu", "cuda"]
#: ``auto``: ONNX Runtime on CPU (the frozen graph when onnxruntime is missing), eager on CUDA; ``frozen``:
#: a frozen TorchScript graph (bit-identical to eager); ``eager``: plain PyTorch; ``onnx``: ONNX Runtime (CPU)
GraphMode = Literal["auto", "eager", "frozen", "onnx"]
#: what `pip install` adds the default CPU engine with
ONNX_INSTALL_HINT = "pip install 'cxr-lakehouse[inference]' (or: pip install onnxruntime onnx)"
#: the hash space of an image id's first 8 hex digits, split into contiguous shard ranges
_PREFIX_SPACE = 1 << 32


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the images whose stable hash falls in it."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Shard:
        """Parse ``i/N`` (0 <= i < N)."""
        try:
            i, n = (int(x) for x in text.split("/"))
        except ValueError as exc:
            raise CxrError(f"--shard {text!r}: expected i/N, e.g. 0/4") from exc
        if not 0 <= i < n:
            raise CxrError(f"--shard {text!r}: need 0 <= i < N")
        return cls(i, n)

    def owns(self, image_id: str) -> bool:
        """True when this shard scores ``image_id``: its first 8 hex digits fall in the shard's range
        (image ids are sha256 hex: uniformly spread)."""
        return self.count == 1 or int(image_id[:8], 16) * self.count >> 32 == self.index

    def may_hold(self, low: object, high: object) -> bool:
        """False only when no id between ``low`` and ``high`` (a row group's ``image_id`` statistics) can
        be this shard's: contiguous ranges make sorted files prunable. Unknown statistics: True."""
        if self.count == 1:
            return True
        low, high = str(low), str(high)
        if len(low) < 8 or len(high) < 8:  # truncated statistics: no bound on the prefix
            return True
        try:
            lo, hi = int(low[:8], 16), int(high[:8], 16)
        except ValueError:
            return True
        start = -(-self.index * _PREFIX_SPACE // self.count)  # the smallest prefix p with p * N >> 32 == i
        end = -(-(self.index + 1) * _PREFIX_SPACE // self.count)
        return hi >= start and lo < end


class Predictor:
    """One TorchXRayVision model, loaded once: ``pre`` -> ``predict`` -> ``post``."""

    def __init__(
        self,
        model_id: str,
        weights: ResolvedWeights | None,
        *,
        device: DeviceChoice = "auto",
        amp: bool = False,
        graph: GraphMode = "auto",
        channels_last: bool = False,
        onnx_cache: str = "",
    ) -> None:
        import torch
        import torchxrayvision as xrv

        self.device = torch.device(
            "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        )
        self.amp = amp and self.device.type == "cuda"
        if weights is None:  # an untrained stand-in: every row it writes says so
            log.warning(
                "!!! no weights for %s: using an UNTRAINED random-init stand-in; its outputs are meaningless !!!",
                model_id,
            )
            urls = xrv.models.model_urls[model_id]
            if not model_id.startswith("densenet"):
                raise WeightsNotFoundError(
                    f"no weights for {model_id}, and an untrained stand-in exists only for DenseNet names"
                )
            torch.manual_seed(0)
            model = xrv.models.DenseNet(weights=None, op_threshs=torch.tensor(urls["op_threshs"]))
            model.targets = list(urls["labels"])
            self.model_id = model_id + UNTRAINED_SUFFIX
            self.weights_sha256, self.weights_source = "none:untrained-random-init-seed-0", "untrained"
        else:
            model = _load_xrv(model_id, weights)
            self.model_id, self.weights_sha256, self.weights_source = model_id, weights.sha256, weights.source
        # NCHW as xrv itself runs: channels_last measured no faster here (14.7 vs 14.3 img/s) and moved
        # calibrated outputs by ~1e-5 (op_norm amplifies tiny logit differences near the thresholds)
        self.channels_last = channels_last
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = self.eager = model.eval().to(self.device)
        self.targets = list(model.targets)
        # outputs whose calibration threshold is NaN come out of xrv's op_norm as a constant 0.5: not a prediction
        threshs = getattr(model, "op_threshs", None)
        self.uncalibrated = {j for j, t in enumerate(threshs.tolist()) if t != t} if threshs is not None else set()
        self.graph: GraphMode = _choose_graph(graph, self.device.type)
        self.session: Any = None
        if self.graph == "onnx":
            if self.device.type != "cpu":
                raise CxrError("--graph onnx runs on the CPU: use --device cpu (or --graph eager on CUDA)")
            try:
                self.session = _onnx_session(self.model, weights_sha256=self.weights_sha256, cache_dir=onnx_cache)
            except torch.onnx.OnnxExporterError as exc:  # an operator ONNX lacks (e.g. xrv's antialiased resize)
                reason = str(exc).splitlines()[0]
                if graph == "onnx":
                    raise CxrError(f"--graph onnx: {model_id} cannot be exported to ONNX ({reason})") from exc
                log.warning(
                    "%s cannot be exported to ONNX (%s): scoring with the frozen TorchScript graph instead",
                    model_id,
                    reason,
                )
                self.graph = "frozen"
        if self.graph == "frozen":
            # TorchScript trace -> freeze without numerics-changing passes: the same arithmetic as eager
            # (bit-identical outputs here) with less dispatch overhead, ~1.0-1.2x eager on a 2-core CPU.
            # optimize_for_inference / conv-BN folding were slower here and moved outputs by ~1e-5.
            example = torch.linspace(-1024, 1024, 2 * 224 * 224, device=self.device).reshape(2, 1, 224, 224)
            with torch.no_grad():
                traced = torch.jit.trace(self.model, example, check_trace=False)
                self.model = torch.jit.freeze(traced.eval(), optimize_numerics=False)
        self.columns = [PATHOLOGY_COLUMNS.get(t) for t in self.targets]

    def device_label(self) -> str:
        """What computed the outputs: ``cpu``, ``cpu+onnxruntime-<version>`` or the CUDA device's name."""
        import torch

        if self.device.type != "cpu":
            return str(torch.cuda.get_device_name(self.device))
        if self.session is not None:
            import onnxruntime as ort

            return f"cpu+onnxruntime-{ort.__version__}"
        return "cpu"

    def pre(self, tensors: pa.Array | list[bytes], dtypes: list[str], shapes: list[list[int]]) -> torch.Tensor:
        """Stored tensor bytes -> an NCHW batch, float32 on the CPU; on GPU hosts the stored dtype, pinned
        (converted to float32 on the GPU: half the copy, and no per-image work on the host)."""
        import torch

        arr = _stacked_view(tensors, dtypes, shapes)
        if arr is None:  # mixed dtypes or shapes: one image at a time
            arr = np.stack([decode_tensor(t, d, s) for t, d, s in zip(_as_bytes(tensors), dtypes, shapes, strict=True)])
        if self.device.type == "cuda":
            pinned = torch.empty(arr.shape, dtype=getattr(torch, str(arr.dtype)), pin_memory=True)
            pinned.numpy()[...] = arr  # one copy out of the (read-only) Arrow buffer
            return pinned
        return torch.from_numpy(arr.astype(np.float32))  # a copy: the view is read-only

    def predict(self, batch: torch.Tensor) -> np.ndarray:
        """The model's calibrated outputs for a batch, (batch, len(targets)) float32."""
        import torch

        # the frozen graph was traced at 224x224: any other size takes the eager path, where xrv's
        # fix_resolution resizes the input as the model expects
        if self.session is not None and tuple(batch.shape[-2:]) == (224, 224):
            inp = np.ascontiguousarray(batch.numpy(), dtype=np.float32)
            return np.asarray(self.session.run(None, {"x": inp})[0], dtype=np.float32)
        model = self.model if tuple(batch.shape[-2:]) == (224, 224) else self.eager
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.amp):
            x = batch.to(self.device, non_blocking=True).float()  # float16 -> float32 is exact
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = model(x)
        return out.float().cpu().numpy()

    def post(self, image_ids: list[str], outputs: np.ndarray) -> dict[str, list[Any]]:
        """Outputs -> prediction columns (null for default pathologies the model does not predict)."""
        cols: dict[str, list[Any]] = {"image_id": list(image_ids)}
        for name in PATHOLOGY_COLUMNS.values():
            cols[name] = [None] * len(image_ids)
        for j, col in enumerate(self.columns):
            if col is not None and j not in self.uncalibrated:
                cols[col] = [float(v) for v in outputs[:, j]]
        return cols


def _choose_graph(graph: GraphMode, device_type: str) -> GraphMode:
    """The engine ``graph`` means on ``device_type``; ``auto`` on CPU without onnxruntime falls back to the
    frozen graph with a warning (never an error: the frozen graph is the same model, only slower)."""
    if graph != "auto":
        return graph
    if device_type != "cpu":
        return "eager"
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        log.warning(
            "onnxruntime cannot be imported (%s): scoring with the frozen TorchScript graph instead (bit-exact "
            "to xrv's eager model, about half the speed of ONNX Runtime on CPU). Install the default CPU "
            "engine with: %s; or pass --graph frozen to choose this engine",
            exc,
            ONNX_INSTALL_HINT,
        )
        return "frozen"
    return "onnx"


def _load_xrv(model_id: str, weights: ResolvedWeights) -> Any:
    """Load the verified file with xrv's own code (from a folder in xrv's cache_dir layout holding it)."""
    import torchxrayvision as xrv

    with xrv_layout(weights) as folder:
        if model_id.startswith("resnet"):
            return xrv.models.ResNet(weights=model_id, cache_dir=str(folder))
        return xrv.models.DenseNet(weights=model_id, cache_dir=str(folder))


#: glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_LIMIT = 1 << 30


def tune_allocator(settings: Settings | None = None) -> bool:
    """Keep the forward pass's large tensors on glibc's heap instead of fresh mmaps.

    With glibc's defaults every activation above the (adaptive, at most 32 MB) mmap threshold is a
    fresh ``mmap`` that the kernel zero-fills page by page and ``munmap`` returns at once: DenseNet-121
    at batch 16 allocates hundreds of such blocks per batch. Raising the mmap and trim thresholds to
    1 GiB lets freed blocks be reused: measured on the 2-core VM, the job's forward pass went from
    11.3-12.4 to 15.4-17.2 img/s with bit-identical outputs (allocation does not touch arithmetic).
    Memory stays bounded (the heap keeps at most the peak of one batch). No effect off glibc;
    ``CXR_MALLOC_TUNING=0`` turns it off.

    Returns:
        True when both thresholds were set.
    """
    import ctypes
    import sys

    if not (settings or load_settings()).inference.malloc_tuning or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    # both, mmap first: a trim threshold alone freezes the mmap threshold at 128 KiB (2x slower here)
    return bool(mallopt(_M_MMAP_THRESHOLD, _ALLOCATOR_LIMIT) == 1 and mallopt(_M_TRIM_THRESHOLD, _ALLOCATOR_LIMIT) == 1)


def run_infer(
    lakehouse_uri: str,
    *,
    settings: Settings,
    model_id: str = "densenet121-res224-all",
    weights_dir: str | None = None,
    weights_uri: str | None = None,
    allow_untrained: bool = False,
    batch_size: int = 0,
    device: DeviceChoice = "auto",
    amp: bool = False,
    shard: Shard = Shard(),
    graph: GraphMode = "auto",
    channels_last: bool = False,
    commit_every: int = 1024,
    run_id: str | None = None,
    progress: bool = True,
    thresholds: str | None = None,
) -> InferRun:
    """Score every tensor of ``shard`` that lacks a prediction for ``model_id`` and MERGE the results.

    The latest ``tensors`` version is pinned (``tensors_version``); its ``image_id`` column is read first
    (:func:`plan_reads`), then the tensors of only the row groups holding rows to score
    (:func:`iter_rows_to_score`). With ``thresholds`` (``latest`` or a Delta version of the ``thresholds``
    table), each row also gets ``positive_<pathology>`` = probability >= the model's site threshold, and
    ``thresholds_version``; without, those columns are null.

    Args:
        lakehouse_uri: folder or ``s3://bucket/prefix``.
        settings: storage, ONNX export cache, allocator tuning.
        model_id: an xrv weights name.
        weights_dir: a folder in xrv's cache layout holding the weights file.
        weights_uri: one weights file (local or ``s3://``).
        allow_untrained: without weights, score with a random-init stand-in (marked in every row).
        batch_size: images per forward pass; 0: 16 on the CPU, 256 on CUDA (the fast GPU setting, measured
            in docs/benchmarks.md).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        amp: mixed precision on CUDA.
        shard: score only this shard's images.
        graph: the engine (see :data:`GraphMode`); ``auto`` is ONNX Runtime on CPU, eager on CUDA.
        channels_last: channels_last memory format.
        commit_every: MERGE every this many images.
        run_id: recorded in every row (default: generated).
        progress: show a progress bar (total = the rows to score).
        thresholds: ``latest`` or a ``thresholds`` version: add the decisions.

    Returns:
        The run summary (also written under ``runs/``): counts, engine, seconds, CPU and GPU seconds,
        and what was read (``extra``: row groups and tensor bytes).

    Raises:
        WeightsNotFoundError: no weights and no ``allow_untrained``.
        CxrError: no tensors table, or bad thresholds.
    """
    import pyarrow as pa
    import torch
    import torchxrayvision as xrv
    from deltalake.exceptions import TableNotFoundError

    from lakehouse import delta_rs

    started, cpu_started = time.perf_counter(), time.process_time()
    malloc_tuned = tune_allocator(settings)
    upstream_url(model_id)  # an unknown name is an error, never a stand-in
    try:
        tensors = delta_rs.open_table(lakehouse_uri, TENSORS, settings)
    except TableNotFoundError as exc:
        raise CxrError(f"no tensors table under {lakehouse_uri}: run `cxr preprocess` first") from exc
    try:
        weights: ResolvedWeights | None = resolve_weights(
            model_id, settings=settings, weights_dir=weights_dir, weights_uri=weights_uri
        )
    except WeightsNotFoundError:  # only missing weights may fall back; integrity failures never do
        if not allow_untrained:
            raise
        weights = None
    predictor = Predictor(
        model_id,
        weights,
        device=device,
        amp=amp,
        graph=graph,
        channels_last=channels_last,
        onnx_cache=settings.inference.onnx_cache,
    )
    predictions = delta_rs.ensure_table(lakehouse_uri, PREDICTIONS, settings)
    done = scored_ids(predictions, predictor.model_id, shard=shard)
    # over the columns read only: delta-rs builds a statistics guarantee per file and dataset column
    plan = plan_reads(delta_rs.projected_dataset(tensors, SCORE_COLUMNS), shard=shard, done=done)
    summary = InferRun(
        run_id=run_id or new_run_id("inf"),
        model_id=predictor.model_id,
        weights_sha256=predictor.weights_sha256,
        tensors_version=int(tensors.version()),
        device=predictor.device_label(),
        untrained=weights is None,
        candidates=plan.candidates,
        already_predicted=plan.candidates - plan.rows,
    )
    constants = {
        "model_id": predictor.model_id,
        "weights_sha256": predictor.weights_sha256,
        "weights_source": predictor.weights_source,
        "tensors_version": summary.tensors_version,
        "run_id": summary.run_id,
        "device": summary.device,
        "torch_version": torch.__version__,
        "xrv_version": xrv.__version__,
    }
    summary.extra.update(graph=predictor.graph, amp=predictor.amp, malloc_tuned=malloc_tuned, **plan.stats())
    cutoffs, thresholds_version = load_thresholds(lakehouse_uri, settings, predictor.model_id, thresholds)
    summary.extra.update(thresholds_version=thresholds_version)
    schema = arrow_schema(PREDICTIONS)
    pending: list[dict[str, list[Any]]] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if not pending_rows:
            return
        cols: dict[str, list[Any]] = {k: sum((p[k] for p in pending), []) for k in pending[0]}
        n = len(cols["image_id"])
        now = datetime.now(UTC)
        cols.update({k: [v] * n for k, v in constants.items()})
        cols["predicted_at"] = [now] * n
        cols.update(decide(cols, cutoffs))
        cols["thresholds_version"] = [thresholds_version] * n
        summary.predicted += delta_rs.merge_insert_new(
            lakehouse_uri, PREDICTIONS, pa.Table.from_pydict(cols, schema=schema), settings
        )
        pending, pending_rows = [], 0

    def prepared(batch: pa.RecordBatch) -> tuple[list[str], Any]:
        return batch.column("image_id").to_pylist(), predictor.pre(
            batch.column("tensor"),
            batch.column("tensor_dtype").to_pylist(),
            batch.column("tensor_shape").to_pylist(),
        )

    batch_size = batch_size or (256 if predictor.device.type == "cuda" else 16)
    summary.extra.update(batch_size=batch_size)
    reader = iter_rows_to_score(plan, batch_size=batch_size)
    data_wait = compute = 0.0
    scored = 0
    with (
        progress_bar(f"scoring with {predictor.model_id}", plan.rows, enabled=progress) as bar,
        ThreadPoolExecutor(1) as pool,
    ):
        nxt: Future[Any] | None = pool.submit(_next_work, reader, prepared)
        while nxt is not None:
            t_wait = time.perf_counter()
            work = nxt.result()
            data_wait += time.perf_counter() - t_wait  # the model idles, waiting for data
            if work is None:
                break
            nxt = pool.submit(_next_work, reader, prepared)  # read + decode the next batch while computing
            ids, batch = work
            t_compute = time.perf_counter()
            outputs = predictor.predict(batch)
            compute += time.perf_counter() - t_compute
            pending.append(predictor.post(ids, outputs))
            pending_rows += len(ids)
            scored += len(ids)
            bar.update(scored)
            if pending_rows >= commit_every:
                flush()
    flush()
    if scored != plan.rows:  # the pinned version changed under us? never silently short
        raise CxrError(f"planned {plan.rows} rows to score but read {scored}: tensors v{summary.tensors_version}")
    summary.seconds = round(time.perf_counter() - started, 3)
    summary.cpu_seconds = round(time.process_time() - cpu_started, 3)
    summary.cores = int(torch.get_num_threads())
    summary.gpu_seconds = round(compute, 3) if predictor.device.type == "cuda" else 0.0
    # share of the scoring loop the model spent waiting for the next batch (reading + decoding)
    summary.extra.update(data_wait_s=round(data_wait, 3), compute_s=round(compute, 3))
    _write_summary(lakehouse_uri, summary, settings, shard=shard)
    return summary


def load_thresholds(
    lakehouse_uri: str, settings: Settings, model_id: str, which: str | None
) -> tuple[dict[str, float], int | None]:
    """The model's site thresholds by prediction column, and the ``thresholds`` version they come from.

    Args:
        lakehouse_uri: folder or ``s3://bucket/prefix``.
        settings: storage endpoint.
        model_id: the model scored.
        which: ``latest`` (the latest *published* version: thresholds are used only once audited), a
            version number, or None/empty (no thresholds: ``({}, None)``).

    Raises:
        CxrError: no thresholds table, an unknown version, or no threshold for this model in it.
    """
    from deltalake.exceptions import DeltaError, TableNotFoundError

    from lakehouse import delta_rs

    if not which:
        return {}, None
    if which != "latest" and not which.isdigit():
        raise CxrError(f"--thresholds {which!r}: give latest or a version number of the thresholds table")
    from lakehouse.publish import published_versions

    version = published_versions(lakehouse_uri, settings).get("thresholds") if which == "latest" else int(which)
    if which == "latest" and version is None:
        raise CxrError(
            f"no published thresholds under {lakehouse_uri}: calibrate (cxr evaluate ... --calibrate youden), "
            "then publish (cxr publish) so that the thresholds are audited before they decide anything"
        )
    try:
        dt = delta_rs.open_table(lakehouse_uri, THRESHOLDS, settings, version=version)
    except TableNotFoundError:
        raise CxrError(
            f"no thresholds table under {lakehouse_uri}: calibrate first (cxr evaluate ... --calibrate youden)"
        ) from None
    except DeltaError as exc:
        raise CxrError(f"thresholds version {which} cannot be read: {str(exc).splitlines()[0]}") from None
    rows = [
        r
        for r in dt.to_pyarrow_table(columns=["model_id", "prediction_column", "threshold"]).to_pylist()
        if r["model_id"] == model_id
    ]
    if not rows:
        raise CxrError(f"thresholds v{dt.version()} hold no threshold for {model_id}: calibrate it with cxr evaluate")
    return {str(r["prediction_column"]): float(r["threshold"]) for r in rows}, int(dt.version())


def decide(cols: dict[str, list[Any]], cutoffs: dict[str, float]) -> dict[str, list[bool | None]]:
    """``positive_<pathology>`` columns: probability >= threshold; null without a threshold or a probability."""
    n = len(cols["image_id"])
    out: dict[str, list[bool | None]] = {}
    for column, decision in DECISION_COLUMNS.items():
        cut = cutoffs.get(column)
        values = cols.get(column, [None] * n)
        out[decision] = [None if cut is None or v is None else bool(v >= cut) for v in values]
    return out


#: what the second pass reads of each row to score
SCORE_COLUMNS = ["image_id", "tensor", "tensor_dtype", "tensor_shape"]


@dataclass
class ReadPlan:
    """The rows a run scores, by Parquet row group: what the first (ids-only) pass decided."""

    #: the dataset's schema: every file is read as it (files written by different writers may differ)
    schema: Any
    #: (data file fragment, row group id, ids to score in it), in table order
    groups: list[tuple[Any, int, frozenset[str]]]
    #: rows this shard owns (scored before or not)
    candidates: int = 0
    #: rows to score (owned and without a prediction for the model)
    rows: int = 0
    row_groups: int = 0
    #: row groups whose ids were read (the others were ruled out by their ``image_id`` statistics)
    row_groups_opened: int = 0
    #: compressed bytes of the ``tensor`` column chunks the second pass reads
    tensor_bytes: int = 0
    tensor_bytes_total: int = 0

    def stats(self) -> dict[str, int]:
        """What the run summary records of the plan (bytes and row groups: the O(new) evidence)."""
        return {
            "row_groups_total": self.row_groups,
            "row_groups_id_read": self.row_groups_opened,
            "row_groups_tensor_read": len(self.groups),
            "tensor_bytes_read": self.tensor_bytes,
            "tensor_bytes_total": self.tensor_bytes_total,
        }


def scored_ids(predictions: Any, model_id: str, *, shard: Shard = Shard()) -> set[str]:
    """The image ids of ``shard`` that already have a prediction for ``model_id`` (two id columns read).

    Args:
        predictions: the ``predictions`` DeltaTable.
        model_id: the model (as written in the rows, e.g. with the untrained suffix).
        shard: only this shard's ids are kept (memory: 1/N of the ids).
    """
    import pyarrow.compute as pc

    from lakehouse.delta_rs import projected_dataset

    table = projected_dataset(predictions, ["image_id", "model_id"]).to_table(
        columns=["image_id"], filter=pc.field("model_id") == pc.scalar(model_id)
    )
    return {i for i in table.column("image_id").to_pylist() if shard.owns(i)}


def plan_reads(dataset: Any, *, shard: Shard, done: set[str]) -> ReadPlan:
    """First pass: read the ``image_id`` column only, and list the row groups holding rows to score.

    Row groups whose ``image_id`` min/max statistics lie outside the shard's range are not read at
    all; of the others only the ids are read (sha256 ids: 64 bytes a row, against ~100 KB of tensor).

    Args:
        dataset: the pyarrow dataset of the pinned ``tensors`` version (Parquet fragments).
        shard: which rows this run owns.
        done: ids that already have a prediction for the model.

    Returns:
        The plan: row groups to read in the second pass, with the ids to score in each.
    """
    plan = ReadPlan(schema=dataset.schema, groups=[])
    for fragment in dataset.get_fragments():
        fragment.ensure_complete_metadata()  # the footer: row groups and their statistics
        meta = fragment.metadata
        tensor_col = meta.schema.names.index("tensor")
        sizes = {g.id: meta.row_group(g.id).column(tensor_col).total_compressed_size for g in fragment.row_groups}
        plan.row_groups += len(sizes)
        plan.tensor_bytes_total += sum(sizes.values())
        groups = [g for g in fragment.row_groups if _may_hold(shard, g)]
        if not groups:
            continue
        plan.row_groups_opened += len(groups)
        # one read of the file's image_id chunks (the groups' ids, in the order asked), split per group
        ids = (
            fragment.subset(row_group_ids=[g.id for g in groups])
            .to_table(schema=plan.schema, columns=["image_id"])
            .column("image_id")
            .to_pylist()
        )
        if len(ids) != sum(g.num_rows for g in groups):
            raise CxrError(
                f"{fragment.path}: its row groups hold {sum(g.num_rows for g in groups)} rows, read {len(ids)}"
            )
        start = 0
        for g in groups:
            owned = [i for i in ids[start : start + g.num_rows] if shard.owns(i)]
            start += g.num_rows
            todo = [i for i in owned if i not in done]
            plan.candidates += len(owned)
            plan.rows += len(todo)
            if todo:
                plan.groups.append((fragment, g.id, frozenset(todo)))
                plan.tensor_bytes += sizes[g.id]
    return plan


def _may_hold(shard: Shard, group: Any) -> bool:
    """Whether a row group may hold rows of ``shard``, by its ``image_id`` statistics (True without)."""
    stats = (group.statistics or {}).get("image_id") or {}
    return "min" not in stats or "max" not in stats or shard.may_hold(stats["min"], stats["max"])


def iter_rows_to_score(plan: ReadPlan, *, batch_size: int) -> Iterator[pa.RecordBatch]:
    """Second pass: the rows to score (``SCORE_COLUMNS``), in table order, in batches of ``batch_size``
    (the last one smaller). Reads one planned row group at a time: memory holds at most one row group
    and one batch, whatever the size of the table or of its files."""
    import pyarrow as pa

    buffered: list[pa.RecordBatch] = []
    n = 0
    for fragment, group, wanted in plan.groups:
        rows = fragment.subset(row_group_ids=[group]).to_batches(
            schema=plan.schema, columns=SCORE_COLUMNS, batch_size=batch_size
        )
        for batch in rows:
            keep = [i in wanted for i in batch.column("image_id").to_pylist()]
            if not all(keep):
                batch = batch.filter(pa.array(keep))
            if batch.num_rows:
                buffered.append(batch)
                n += batch.num_rows
            while n >= batch_size:
                head, buffered, n = _split(buffered, batch_size)
                yield head
    if n:
        yield _split(buffered, n)[0]


def _split(batches: list[pa.RecordBatch], k: int) -> tuple[pa.RecordBatch, list[pa.RecordBatch], int]:
    """The first ``k`` rows of ``batches`` as one batch (no copy when they lie in one), and the rest."""
    import pyarrow as pa

    table = pa.Table.from_batches(batches)
    head = table.slice(0, k).combine_chunks().to_batches()[0]
    rest = table.slice(k)
    return head, rest.to_batches(), rest.num_rows


def _write_summary(lakehouse_uri: str, summary: InferRun, settings: Settings, *, shard: Shard) -> None:
    """Write the run summary to ``<lakehouse>/runs/<run_id>[-shard-i-of-n]-<model>.json`` (one file per
    run and model: several models in one run each get a summary)."""
    name = summary.run_id
    if shard.count > 1:
        name += f"-shard-{shard.index}-of-{shard.count}"
    name += f"-{summary.model_id.replace('/', '_')}"
    write_summary(lakehouse_uri, summary, settings, name=name, extra_keys={"shard": f"{shard.index}/{shard.count}"})


def _onnx_session(model: Any, *, weights_sha256: str, cache_dir: str = "", threads: int | None = None) -> Any:
    """The model exported to ONNX once per (weights, torch, onnxruntime, opset), cached under
    ``CXR_ONNX_CACHE`` (default ``~/.cache/cxr/onnx``), and an ONNX Runtime CPU session over it.

    Measured here (docs/benchmarks.md): ~2x eager PyTorch on 2 cores; outputs within ~5e-5 of eager
    (ORT's convolution kernels; every graph optimisation level gives the same order; OpenVINO, tried too,
    lands on the same 4.3e-5 at the same or lower speed, so it is not a second engine).
    """
    import tempfile
    from pathlib import Path

    import torch

    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise CxrError(f"--graph onnx needs onnxruntime: {ONNX_INSTALL_HINT}") from exc
    opset = 18
    cache = Path(cache_dir or Path.home() / ".cache" / "cxr" / "onnx")
    cache.mkdir(parents=True, exist_ok=True)
    key = (
        f"{weights_sha256.replace(':', '_')}-torch{torch.__version__.replace('+', '_')}-ort{ort.__version__}-op{opset}"
    )
    path = cache / f"{key}.onnx"
    if not path.exists():
        log.info("exporting the model to ONNX once: %s", path)
        example = torch.linspace(-1024, 1024, 2 * 224 * 224).reshape(2, 1, 224, 224)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".onnx.tmp")
        os.close(fd)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model.eval(),
                    (example,),
                    tmp,
                    dynamo=False,
                    opset_version=opset,
                    input_names=["x"],
                    output_names=["y"],
                    dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
                )
            os.replace(tmp, path)  # atomic: concurrent jobs never read a half-written file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # no busy-waiting: the prefetch thread reads and decodes the next batch on the same cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _as_bytes(tensors: pa.Array | list[bytes]) -> list[bytes]:
    return tensors if isinstance(tensors, list) else tensors.to_pylist()


def _stacked_view(tensors: pa.Array | list[bytes], dtypes: list[str], shapes: list[list[int]]) -> np.ndarray | None:
    """The batch as one (n, *shape) array over the Arrow values buffer, without a copy per image, when
    every row has the same dtype and shape (always, within one tensors table); None otherwise."""
    import pyarrow as pa

    if isinstance(tensors, list) or not len(tensors) or tensors.null_count:
        return None
    if len(set(dtypes)) != 1 or any(list(s) != list(shapes[0]) for s in shapes):
        return None
    np_dtype = np.dtype(NUMPY_DTYPES[dtypes[0]])
    per_image = int(np.prod(shapes[0])) * np_dtype.itemsize
    if not (pa.types.is_binary(tensors.type) or pa.types.is_large_binary(tensors.type)):
        return None
    off_type = np.int64 if pa.types.is_large_binary(tensors.type) else np.int32
    _, offsets_buf, values_buf = tensors.buffers()
    n = len(tensors)
    offsets = np.frombuffer(offsets_buf, dtype=off_type)[tensors.offset : tensors.offset + n + 1]
    if not (np.diff(offsets) == per_image).all():
        return None  # a truncated tensor: let decode_tensor raise on it
    flat = np.frombuffer(values_buf, dtype=np_dtype, count=n * per_image // np_dtype.itemsize, offset=int(offsets[0]))
    return flat.reshape((n, *shapes[0]))


def _next_work(reader: Iterator[pa.RecordBatch], prepare: Any) -> Any:
    """The next batch to score, prepared for the model, or None at the end."""
    batch = next(reader, None)
    return None if batch is None else prepare(batch)
