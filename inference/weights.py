"""Model weights: find them, check them, and record exactly which file was loaded.

Resolution order for a TorchXRayVision weights name (e.g. ``densenet121-res224-all``):

1. ``weights_dir``: a folder in xrv's ``cache_dir`` layout (the upstream file name directly inside it);
2. ``weights_uri``: one file, local or ``s3://`` (copied into a local cache under the upstream name);
3. xrv's default cache (``~/.torchxrayvision/models_data/``);
4. the official download (machines with internet), through xrv's own ``utils.download``; the base URL
   can be overridden with ``CXR_WEIGHTS_BASE_URL`` (a mirror, or a local server in tests).

The sha256 of the file actually loaded is recorded. Weights files are pickled modules (loading runs
code): a hash pinned in config (``CXR_WEIGHTS_SHA256_<NAME>`` or ``pinned``) that does not match, or a
file that is empty or truncated, is refused before ``torch.load`` ever sees it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lakehouse.config import Settings
from lakehouse.errors import CxrError, WeightsNotFoundError
from lakehouse.storage import is_s3, read_bytes

log = logging.getLogger(__name__)

Source = Literal["weights-dir", "uri", "xrv-cache", "download"]

#: the first bytes of a checkpoint in torch's legacy (pre-1.6, non-zip) format: the pickled magic number
LEGACY_TORCH_HEADER = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


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
        WeightsIntegrityError: empty, truncated or corrupt (not a readable torch zip archive), or a
            pinned hash that does not match.
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
    with path.open("rb") as f:
        head = f.read(len(LEGACY_TORCH_HEADER))
    if head == LEGACY_TORCH_HEADER:
        # torch < 1.6 format (xrv's DenseNet files predate the zip format): a pickle stream; verified by
        # the pinned hash when one is set, and by torch.load's own end-of-stream checks otherwise
        return digest
    if not zipfile.is_zipfile(path):
        raise WeightsIntegrityError(
            f"{path} ({size} bytes) is not a complete torch checkpoint (truncated download?): delete it "
            f"and fetch {model_id} again"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise WeightsIntegrityError(f"{path} is corrupt ({exc}): delete it and fetch {model_id} again") from exc
    if bad is not None:
        raise WeightsIntegrityError(f"{path} is corrupt (member {bad} fails its CRC): fetch {model_id} again")
    return digest


def resolve_weights(
    model_id: str,
    *,
    settings: Settings,
    weights_dir: str | None = None,
    weights_uri: str | None = None,
    cache_dir: str | None = None,
    allow_download: bool = True,
    pinned: dict[str, str] | None = None,
) -> ResolvedWeights:
    """Find and verify the weights file for ``model_id`` (see the module docstring for the order).

    Args:
        model_id: a TorchXRayVision weights name.
        settings: for the S3 endpoint when ``weights_uri`` is ``s3://``.
        weights_dir: a folder in xrv's cache layout.
        weights_uri: one weights file, local path or ``s3://`` object.
        cache_dir: where downloads and copies go (default: xrv's cache).
        allow_download: try the official download when nothing local is found.
        pinned: weights name -> expected sha256.

    Returns:
        The verified file and how it was found.

    Raises:
        WeightsNotFoundError: nothing found and no download possible.
        WeightsIntegrityError: a file was found but fails verification.
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
        tried.append(weights_uri)
        target = cache / filename
        src = None if is_s3(weights_uri) else Path(weights_uri).expanduser()
        if src is not None and not src.is_file():
            raise WeightsNotFoundError(f"weights file not found: {src}")
        if src is not None and src.resolve() == target.resolve():
            return ResolvedWeights(model_id, target, verify(target, model_id, pinned=pinned), "uri")
        # copy to a private temporary name, verify, then move into place: a bad file never replaces a
        # good cached one, and concurrent jobs never read a half-written file
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkstemp(dir=target.parent, prefix=f".{filename}.", suffix=".part")[1])
        try:
            if src is None:
                tmp.write_bytes(read_bytes(weights_uri, settings))
            else:
                shutil.copyfile(src, tmp)
            digest = verify(tmp, model_id, pinned=pinned)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return ResolvedWeights(model_id, target, digest, "uri")
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


def _not_found(model_id: str, tried: list[str], filename: str) -> str:
    return (
        f"no weights for {model_id}; looked in: {', '.join(tried)}. On a machine without internet, copy "
        f"{filename} into a folder and pass --weights-dir FOLDER (or a file/s3:// object with --weights)"
    )
