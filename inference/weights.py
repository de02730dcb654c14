"""Model weights: find them, check them, and record exactly which file was loaded.

Resolution order for a TorchXRayVision weights name (e.g. ``densenet121-res224-all``):

1. ``weights_dir``: a folder in xrv's ``cache_dir`` layout (the upstream file name directly inside it);
2. ``weights_uri``: one file. A local file is loaded from its own path; an ``s3://`` object is downloaded
   into a private cache keyed by its sha256 (``~/.cache/cxr/weights/<sha256>/``). Neither is ever written
   into xrv's shared cache under the upstream name, where a later run would take it for the official
   weights. In the aws profile the file must be pinned (``CXR_WEIGHTS_SHA256_<NAME>``);
3. xrv's default cache (``~/.torchxrayvision/models_data/``);
4. the official download (machines with internet), through xrv's own ``utils.download``; the base URL
   can be overridden with ``CXR_WEIGHTS_BASE_URL`` (a mirror, or a local server in tests).

The sha256 of the file actually loaded is recorded. Weights files are pickled modules (loading runs
code): a hash pinned in config (``CXR_WEIGHTS_SHA256_<NAME>`` or ``pinned``) that does not match, or a
file that is empty or truncated, is refused before ``torch.load`` ever sees it. Both of torch's formats
are checked: the zip archive (every member's CRC) and the legacy pickle stream xrv's DenseNet files use
(its pickles walked without importing or calling anything they name, then every storage's bytes counted).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from lakehouse.config import Settings, weights_sha_variable
from lakehouse.errors import ConfigError, CxrError, WeightsNotFoundError
from lakehouse.storage import is_s3, read_bytes

log = logging.getLogger(__name__)

Source = Literal["weights-dir", "uri", "xrv-cache", "download"]


class WeightsIntegrityError(CxrError):
    """A weights file is truncated, corrupt, or does not match its pinned sha256."""


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights file that will be loaded, and how it was found."""

    model_id: str
    path: Path
    sha256: str
    source: Source


def model_names() -> list[str]:
    """Every weights name TorchXRayVision knows."""
    import torchxrayvision as xrv

    return sorted(k for k in xrv.models.model_urls if "-" in k)


def upstream_url(model_id: str) -> str:
    """The official download URL of a weights name."""
    import torchxrayvision as xrv

    if model_id not in xrv.models.model_urls:
        raise WeightsNotFoundError(f"unknown weights {model_id!r}; known: {', '.join(model_names())}")
    return str(xrv.models.model_urls[model_id]["weights_url"])


def upstream_filename(model_id: str) -> str:
    """The file name xrv stores a weights name under (the last part of its URL)."""
    return upstream_url(model_id).rsplit("/", 1)[-1]


def sha256_file(path: Path) -> str:
    """sha256 hex of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pinned_sha256(model_id: str, pinned: dict[str, str] | None = None) -> str | None:
    """The pinned hash of a weights name in ``pinned``, or None."""
    if pinned and model_id in pinned:
        return pinned[model_id].lower()
    return None


def verify(path: Path, model_id: str, *, pinned: dict[str, str] | None = None) -> str:
    """Check a weights file before it is unpickled; return its sha256.

    Raises:
        WeightsIntegrityError: empty, truncated or corrupt (a torch zip archive with a bad member, or a
            legacy checkpoint whose pickles or storages end early), or a pinned hash that does not match.
    """
    size = path.stat().st_size
    if size == 0:
        raise WeightsIntegrityError(f"{path} is empty: delete it and download {model_id} again")
    digest = sha256_file(path)
    expected = pinned_sha256(model_id, pinned)
    if expected and digest != expected:
        raise WeightsIntegrityError(
            f"{path} has sha256 {digest}, but {model_id} is pinned to {expected}: refusing to load it "
            "(weights files are pickled code); replace the file or update the pin"
        )
    if not zipfile.is_zipfile(path):
        with path.open("rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        if zip_start:  # a zip archive without its central directory (at the end of the file)
            raise WeightsIntegrityError(
                f"{path} ({size} bytes) is not a complete torch checkpoint (truncated download? a zip archive "
                f"without its end): delete it and fetch {model_id} again"
            )
        check_legacy_checkpoint(path, model_id)  # torch < 1.6 format: xrv's DenseNet files predate the zip one
        return digest
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise WeightsIntegrityError(f"{path} is corrupt ({exc}): delete it and fetch {model_id} again") from exc
    if bad is not None:
        raise WeightsIntegrityError(f"{path} is corrupt (member {bad} fails its CRC): fetch {model_id} again")
    return digest


# --- torch's legacy (pre-1.6) format, checked without running it ---------------------------------------
#: ``torch.serialization.MAGIC_NUMBER`` and ``PROTOCOL_VERSION``: the first two pickles of a legacy file
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
#: bytes per element of each storage type a legacy file can name (``torch.<Name>``; a test checks them)
STORAGE_ELEMENT_SIZES: dict[str, int] = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexDoubleStorage": 16,
    "ComplexFloatStorage": 8,
    "UntypedStorage": 1,
    "QUInt8Storage": 1,
    "QInt8Storage": 1,
    "QInt32Storage": 4,
    "QUInt4x2Storage": 1,
    "QUInt2x4Storage": 1,
}
#: what a damaged pickle stream raises while it is walked
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
)


class _Inert:
    """Stands in for every class and function a pickle names: nothing is imported, nothing runs."""

    global_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Inert:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass


class _InertUnpickler(pickle.Unpickler):
    """Walks a pickle stream with every global replaced by an :class:`_Inert` class; records the
    storages a legacy checkpoint refers to (key -> bytes per element, first reference wins, as torch)."""

    def __init__(self, f: IO[bytes], storages: dict[str, int]) -> None:
        super().__init__(f, encoding="latin1")
        self.storages = storages

    def find_class(self, module: str, name: str) -> type:
        return type(name, (_Inert,), {"global_name": f"{module}.{name}"})

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid[:1] == ("storage",) and len(pid) >= 5:
            storage_type = getattr(pid[1], "global_name", "").rpartition(".")[2]
            if storage_type not in STORAGE_ELEMENT_SIZES:
                raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
            self.storages.setdefault(str(pid[2]), STORAGE_ELEMENT_SIZES[storage_type])
            return _Inert()
        return type("PersistentModule", (_Inert,), {})  # ("module", cls, ...): a class, as torch returns


def check_legacy_checkpoint(path: Path, model_id: str) -> None:
    """Check that a file is a complete checkpoint in torch's legacy format, without unpickling it.

    The format (``torch.serialization._legacy_save``): pickles of the magic number, the protocol version,
    the system info, the object (tensors refer to storages by key), and the sorted storage keys; then
    each storage in key order as an 8-byte element count and its raw bytes. The pickles are walked with
    every class and function they name replaced by an inert stand-in, so nothing is imported or called;
    then every storage's bytes must be present.

    Raises:
        WeightsIntegrityError: not a legacy checkpoint, or one that ends early (a truncated download).
    """
    size = path.stat().st_size

    def refuse(reason: str) -> WeightsIntegrityError:
        return WeightsIntegrityError(
            f"{path} ({size} bytes) is not a complete torch checkpoint (truncated download? {reason}): "
            f"delete it and fetch {model_id} again"
        )

    storages: dict[str, int] = {}
    with path.open("rb") as f:
        try:
            magic, protocol, sys_info = (_InertUnpickler(f, storages).load() for _ in range(3))
            if magic != _LEGACY_MAGIC or protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
                raise refuse("neither a zip archive nor torch's legacy format")
            _InertUnpickler(f, storages).load()
            keys = _InertUnpickler(f, storages).load()
        except _PICKLE_ERRORS as exc:
            raise refuse(f"its pickled part ends early or is damaged: {type(exc).__name__}: {exc}") from exc
        if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
            raise refuse("its list of storages does not match the tensors that use them")
        byteorder: Literal["little", "big"] = "little" if sys_info.get("little_endian", True) else "big"
        offset = f.tell()
        for key in keys:
            head = f.read(8)
            if len(head) < 8:
                raise refuse(f"storage {key} is missing")
            numel = int.from_bytes(head, byteorder, signed=True)
            if numel < 0:
                raise refuse(f"storage {key} has a negative size")
            offset += 8 + numel * storages[str(key)]
            if offset > size:
                raise refuse(f"storage {key} needs the file to be at least {offset} bytes")
            f.seek(offset)
    # bytes after the last storage are ignored, as torch.load ignores them


@contextmanager
def xrv_layout(weights: ResolvedWeights) -> Iterator[Path]:
    """A folder in xrv's ``cache_dir`` layout holding exactly the resolved file, for xrv's own loading code.

    The file's own folder when it has the upstream name; otherwise a temporary folder with the upstream
    name linked to the file (nothing is copied into xrv's shared cache).
    """
    filename = upstream_filename(weights.model_id)
    if weights.path.name == filename:
        yield weights.path.parent
        return
    with tempfile.TemporaryDirectory(prefix="cxr-weights-") as tmp:
        link = Path(tmp) / filename
        try:
            link.symlink_to(weights.path.resolve())
        except OSError:  # no symlinks here (some filesystems): a hard link, else a copy
            try:
                os.link(weights.path, link)
            except OSError:
                import shutil

                shutil.copyfile(weights.path, link)
        yield Path(tmp)


def default_uri_cache() -> Path:
    """Where ``s3://`` weights files are downloaded: ``~/.cache/cxr/weights`` (one folder per sha256)."""
    return Path.home() / ".cache" / "cxr" / "weights"


def require_pin(model_id: str, weights_uri: str, *, settings: Settings, pinned: dict[str, str]) -> None:
    """In the aws profile, refuse a weights file that has no pinned sha256.

    Raises:
        ConfigError: aws profile and no pin for ``model_id`` (naming the variable to set).
    """
    if settings.profile == "aws" and not pinned_sha256(model_id, pinned):
        raise ConfigError(
            f"--weights {weights_uri}: the aws profile loads a weights file only when its sha256 is pinned "
            f"(weights files are pickled code): set {weights_sha_variable(model_id)} to the file's sha256 "
            "(sha256sum FILE)"
        )


def resolve_weights(
    model_id: str,
    *,
    settings: Settings,
    weights_dir: str | None = None,
    weights_uri: str | None = None,
    cache_dir: str | None = None,
    uri_cache_dir: str | None = None,
    allow_download: bool = True,
    pinned: dict[str, str] | None = None,
) -> ResolvedWeights:
    """Find and verify the weights file for ``model_id`` (see the module docstring for the order).

    Args:
        model_id: a TorchXRayVision weights name.
        settings: the profile, the pins, and the S3 endpoint when ``weights_uri`` is ``s3://``.
        weights_dir: a folder in xrv's cache layout.
        weights_uri: one weights file, local path (loaded where it is) or ``s3://`` object.
        cache_dir: where official downloads go and are looked for (default: xrv's cache).
        uri_cache_dir: where ``s3://`` weights files are downloaded (default :func:`default_uri_cache`).
        allow_download: try the official download when nothing local is found.
        pinned: weights name -> expected sha256.

    Returns:
        The verified file and how it was found.

    Raises:
        WeightsNotFoundError: nothing found and no download possible.
        WeightsIntegrityError: a file was found but fails verification.
        ConfigError: an unpinned ``weights_uri`` in the aws profile.
    """
    import torchxrayvision as xrv

    filename = upstream_filename(model_id)
    cache = Path(cache_dir or xrv.utils.get_cache_dir()).expanduser()
    from_env = settings.weights_sha256_for(model_id)  # CXR_WEIGHTS_SHA256_<MODEL>; an explicit pin wins
    pinned = {**({model_id: from_env} if from_env else {}), **(pinned or {})}
    tried: list[str] = []

    if weights_dir:
        candidate = Path(weights_dir).expanduser() / filename
        tried.append(str(candidate))
        if candidate.is_file():
            return ResolvedWeights(model_id, candidate, verify(candidate, model_id, pinned=pinned), "weights-dir")
    if weights_uri:
        require_pin(model_id, weights_uri, settings=settings, pinned=pinned)
        if is_s3(weights_uri):
            return _download_uri(model_id, weights_uri, settings=settings, pinned=pinned, uri_cache_dir=uri_cache_dir)
        src = Path(weights_uri).expanduser()
        if not src.is_file():
            raise WeightsNotFoundError(f"weights file not found: {src}")
        return ResolvedWeights(model_id, src, verify(src, model_id, pinned=pinned), "uri")
    default = cache / filename
    tried.append(str(default))
    if default.is_file():
        return ResolvedWeights(model_id, default, verify(default, model_id, pinned=pinned), "xrv-cache")
    if not allow_download:
        raise WeightsNotFoundError(_not_found(model_id, tried, filename))
    url = upstream_url(model_id)
    base = settings.inference.weights_base_url
    if base:
        url = f"{base.rstrip('/')}/{filename}"
    log.info("downloading %s weights from %s", model_id, url)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        xrv.utils.download(url, str(default))
    except Exception as exc:  # requests raises many types; the reason is kept in the message
        raise WeightsNotFoundError(
            _not_found(model_id, [*tried, url], filename) + f" (download failed: {exc})"
        ) from exc
    try:
        digest = verify(default, model_id, pinned=pinned)
    except WeightsIntegrityError:
        default.unlink(missing_ok=True)  # never leave a bad download in the cache
        raise
    return ResolvedWeights(model_id, default, digest, "download")


def _download_uri(
    model_id: str, uri: str, *, settings: Settings, pinned: dict[str, str], uri_cache_dir: str | None
) -> ResolvedWeights:
    """Download an ``s3://`` weights file to ``<uri cache>/<sha256>/<upstream name>`` and verify it there.

    The bytes go to a private temporary name first and move into place only once verified: a bad file
    never lands in the cache, and concurrent jobs never read a half-written one.
    """
    cache = Path(uri_cache_dir).expanduser() if uri_cache_dir else default_uri_cache()
    cache.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=cache, prefix=".download.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.write_bytes(read_bytes(uri, settings))
        digest = verify(tmp, model_id, pinned=pinned)
        target = cache / digest / upstream_filename(model_id)
        target.parent.mkdir(exist_ok=True)
        tmp.replace(target)  # same bytes as any file already there (same sha256): atomic either way
    finally:
        tmp.unlink(missing_ok=True)
    log.info("weights %s from %s: %s", model_id, uri, target)
    return ResolvedWeights(model_id, target, digest, "uri")


def _not_found(model_id: str, tried: list[str], filename: str) -> str:
    return (
        f"no weights for {model_id}; looked in: {', '.join(tried)}. On a machine without internet, copy "
        f"{filename} into a folder and pass --weights-dir FOLDER (or a file/s3:// object with --weights)"
    )
