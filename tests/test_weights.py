"""Weights resolution: xrv's cache layout, integrity checks, pinned hashes, S3, and the download path
against a local HTTP server. The checkpoints are random-init models saved exactly as xrv's files are
(a whole pickled module), so xrv's own loading code runs on them."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.weights import WeightsIntegrityError, resolve_weights, sha256_file, upstream_filename
from lakehouse.config import Settings, load_settings
from lakehouse.errors import WeightsNotFoundError
from tests.conftest import MODEL, make_bucket


@pytest.fixture()
def http_server(checkpoint: Path) -> Iterator[str]:
    """A local HTTP server on 127.0.0.1 serving the checkpoint's folder."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(checkpoint.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_weights_dir_in_xrv_layout_is_loaded_by_xrv(checkpoint: Path, settings: Settings) -> None:
    import torch
    import torchxrayvision as xrv

    w = resolve_weights(MODEL, settings=settings, weights_dir=str(checkpoint.parent), allow_download=False)
    assert (w.source, w.path, w.sha256) == ("weights-dir", checkpoint, sha256_file(checkpoint))
    model = xrv.models.DenseNet(weights=MODEL, cache_dir=str(w.path.parent))  # xrv's real loading code
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert torch.equal(model.classifier.weight, saved.classifier.weight)
    assert model.targets[0] == "Atelectasis" and len(model.targets) == 18


def test_nothing_found_offline_says_what_to_do(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(WeightsNotFoundError, match="--weights-dir"):
        resolve_weights(
            MODEL, settings=settings, weights_dir=str(tmp_path), cache_dir=str(tmp_path / "c"), allow_download=False
        )


def test_truncated_file_is_refused_before_unpickling(checkpoint: Path, tmp_path: Path, settings: Settings) -> None:
    bad = tmp_path / upstream_filename(MODEL)
    bad.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(WeightsIntegrityError, match="truncated"):
        resolve_weights(MODEL, settings=settings, weights_dir=str(tmp_path), allow_download=False)
    bad.write_bytes(b"")
    with pytest.raises(WeightsIntegrityError, match="empty"):
        resolve_weights(MODEL, settings=settings, weights_dir=str(tmp_path), allow_download=False)


def test_pinned_hash(checkpoint: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    good = sha256_file(checkpoint)
    w = resolve_weights(MODEL, settings=settings, weights_dir=str(checkpoint.parent), pinned={MODEL: good.upper()})
    assert w.sha256 == good
    monkeypatch.setenv("CXR_WEIGHTS_SHA256_DENSENET121_RES224_ALL", "0" * 64)
    with pytest.raises(WeightsIntegrityError, match="pinned"):
        resolve_weights(MODEL, settings=load_settings(), weights_dir=str(checkpoint.parent))


def test_download_path_against_a_local_http_server(
    http_server: str, checkpoint: Path, tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_WEIGHTS_BASE_URL", http_server)
    settings = load_settings()  # the mirror is a setting, read from the environment
    assert settings.inference.weights_base_url == http_server
    cache = tmp_path / "cache"
    w = resolve_weights(MODEL, settings=settings, cache_dir=str(cache))
    assert (w.source, w.path) == ("download", cache / upstream_filename(MODEL))
    assert w.sha256 == sha256_file(checkpoint)
    again = resolve_weights(MODEL, settings=settings, cache_dir=str(cache))
    assert again.source == "xrv-cache"  # found in the cache the second time, not downloaded again


def test_download_failure_is_a_clear_error(
    http_server: str, tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_WEIGHTS_BASE_URL", http_server + "/missing")
    settings = load_settings()
    with pytest.raises(WeightsNotFoundError, match="download failed: 404"):
        resolve_weights(MODEL, settings=settings, cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / upstream_filename(MODEL)).exists()


@pytest.mark.slow
def test_weights_from_s3(checkpoint: Path, tmp_path: Path, settings: Settings) -> None:
    from lakehouse.storage import s3_client

    bucket = make_bucket(settings, "cxr-models")
    s3_client(settings).put_object(Bucket="cxr-models", Key="xrv/any-name.pt", Body=checkpoint.read_bytes())
    w = resolve_weights(MODEL, settings=settings, weights_uri=f"{bucket}/xrv/any-name.pt", cache_dir=str(tmp_path))
    assert (w.source, w.path.name, w.sha256) == ("uri", upstream_filename(MODEL), sha256_file(checkpoint))


def test_unknown_model_name(settings: Settings) -> None:
    with pytest.raises(WeightsNotFoundError, match="unknown weights 'densenet-nope'"):
        resolve_weights("densenet-nope", settings=settings)


def test_legacy_torch_format_is_accepted_and_loaded_by_xrv(
    checkpoint: Path, tmp_path: Path, settings: Settings
) -> None:
    """xrv's published DenseNet files predate torch's zip format: they must pass verification."""
    import torch
    import torchxrayvision as xrv

    legacy = tmp_path / upstream_filename(MODEL)
    torch.save(
        torch.load(checkpoint, map_location="cpu", weights_only=False), legacy, _use_new_zipfile_serialization=False
    )
    assert not legacy.read_bytes().startswith(b"PK")
    w = resolve_weights(MODEL, settings=settings, weights_dir=str(tmp_path), allow_download=False)
    assert w.sha256 == sha256_file(legacy)
    assert len(xrv.models.DenseNet(weights=MODEL, cache_dir=str(tmp_path)).targets) == 18


def test_a_bad_file_never_replaces_a_good_cached_one(checkpoint: Path, tmp_path: Path, settings: Settings) -> None:
    cache = tmp_path / "cache"
    good = resolve_weights(MODEL, settings=settings, weights_uri=str(checkpoint), cache_dir=str(cache))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(WeightsIntegrityError):
        resolve_weights(MODEL, settings=settings, weights_uri=str(bad), cache_dir=str(cache))
    assert sha256_file(good.path) == good.sha256
    assert sorted(p.name for p in cache.iterdir()) == [upstream_filename(MODEL)]  # no temporary left behind
