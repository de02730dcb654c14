"""Weights resolution: xrv's cache layout, integrity checks (zip and legacy formats), pinned hashes,
a weights file loaded from its own path, S3 into a private cache, the aws profile's pin requirement, and
the download path against a local HTTP server. The checkpoints are random-init models saved exactly as
xrv's files are (a whole pickled module), so xrv's own loading code runs on them."""

from __future__ import annotations

import functools
import http.server
import io
import pickle
import pickletools
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from inference.weights import (
    STORAGE_ELEMENT_SIZES,
    WeightsIntegrityError,
    resolve_weights,
    sha256_file,
    upstream_filename,
    verify,
)
from lakehouse.config import Settings, load_settings
from lakehouse.errors import ConfigError, WeightsNotFoundError
from tests.conftest import MODEL, make_bucket

PIN_VARIABLE = "CXR_WEIGHTS_SHA256_DENSENET121_RES224_ALL"


@pytest.fixture(scope="module")
def legacy_checkpoint(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-init checkpoint re-saved in torch's legacy (pre-zip) format, as xrv's DenseNet files are."""
    import torch

    path = tmp_path_factory.mktemp("legacy") / upstream_filename(MODEL)
    model = torch.load(checkpoint, map_location="cpu", weights_only=False)
    torch.save(model, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture()
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call of torch.load fails the test: a refused file must never reach the unpickler."""
    import torch

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load was called on a file the integrity check should have refused")

    monkeypatch.setattr(torch, "load", refuse)


def _pickled_part_end(data: bytes) -> int:
    """Where a legacy checkpoint's five pickles end and its raw storages begin (read with pickletools,
    which only decodes opcodes)."""
    stream = io.BytesIO(data)
    for _ in range(5):  # magic number, protocol version, system info, the object, the storage keys
        for _op in pickletools.genops(stream):
            pass
    return stream.tell()


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


def test_truncated_file_is_refused_before_unpickling(
    checkpoint: Path, tmp_path: Path, settings: Settings, no_torch_load: None
) -> None:
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
def test_weights_from_s3_go_to_a_private_cache_keyed_by_sha256(
    checkpoint: Path, tmp_path: Path, settings: Settings
) -> None:
    import torch

    from inference.job import _load_xrv
    from lakehouse.storage import s3_client

    bucket = make_bucket(settings, "cxr-models")
    s3_client(settings).put_object(Bucket="cxr-models", Key="xrv/any-name.pt", Body=checkpoint.read_bytes())
    xrv_cache, private = tmp_path / "xrv-cache", tmp_path / "private"
    uri = f"{bucket}/xrv/any-name.pt"
    w = resolve_weights(MODEL, settings=settings, weights_uri=uri, cache_dir=str(xrv_cache), uri_cache_dir=str(private))
    digest = sha256_file(checkpoint)
    assert (w.source, w.path, w.sha256) == ("uri", private / digest / upstream_filename(MODEL), digest)
    assert not xrv_cache.exists()  # never in xrv's shared cache under the upstream name
    again = resolve_weights(MODEL, settings=settings, weights_uri=uri, uri_cache_dir=str(private))
    assert again.path == w.path
    assert sorted(p.relative_to(private).as_posix() for p in private.rglob("*")) == [
        digest,
        f"{digest}/{upstream_filename(MODEL)}",
    ]  # one file per content, no temporary left behind
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert torch.equal(_load_xrv(MODEL, w).classifier.weight, saved.classifier.weight)


@pytest.mark.slow
def test_a_bad_s3_file_leaves_nothing_in_the_private_cache(
    checkpoint: Path, tmp_path: Path, settings: Settings
) -> None:
    from lakehouse.storage import s3_client

    bucket = make_bucket(settings, "cxr-models")
    s3_client(settings).put_object(Bucket="cxr-models", Key="xrv/bad.pt", Body=checkpoint.read_bytes()[:1000])
    private = tmp_path / "private"
    with pytest.raises(WeightsIntegrityError, match="truncated"):
        resolve_weights(MODEL, settings=settings, weights_uri=f"{bucket}/xrv/bad.pt", uri_cache_dir=str(private))
    assert list(private.iterdir()) == []


def test_unknown_model_name(settings: Settings) -> None:
    with pytest.raises(WeightsNotFoundError, match="unknown weights 'densenet-nope'"):
        resolve_weights("densenet-nope", settings=settings)


def test_legacy_torch_format_is_accepted_and_loaded_by_xrv(legacy_checkpoint: Path, settings: Settings) -> None:
    """xrv's published DenseNet files predate torch's zip format: they must pass verification."""
    import torchxrayvision as xrv

    w = resolve_weights(MODEL, settings=settings, weights_dir=str(legacy_checkpoint.parent), allow_download=False)
    assert (w.path, w.sha256) == (legacy_checkpoint, sha256_file(legacy_checkpoint))
    assert len(xrv.models.DenseNet(weights=MODEL, cache_dir=str(legacy_checkpoint.parent)).targets) == 18


def test_a_weights_file_is_loaded_from_its_own_path(checkpoint: Path, tmp_path: Path, settings: Settings) -> None:
    """``--weights FILE``: verified and loaded where it is, whatever its name; xrv's cache is never written."""
    import torch

    from inference.job import _load_xrv

    own = tmp_path / "fine-tuned" / "my-densenet.pt"
    own.parent.mkdir()
    own.write_bytes(checkpoint.read_bytes())
    xrv_cache = tmp_path / "xrv-cache"
    w = resolve_weights(MODEL, settings=settings, weights_uri=str(own), cache_dir=str(xrv_cache))
    assert (w.source, w.path, w.sha256) == ("uri", own, sha256_file(checkpoint))
    model = _load_xrv(MODEL, w)  # xrv's own loading code, on this very file
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert torch.equal(model.classifier.weight, saved.classifier.weight)
    assert not xrv_cache.exists()
    assert sorted(p.name for p in own.parent.iterdir()) == ["my-densenet.pt"]  # nothing beside it either

    bad = tmp_path / "bad.pt"
    bad.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(WeightsIntegrityError, match="truncated"):
        resolve_weights(MODEL, settings=settings, weights_uri=str(bad), cache_dir=str(xrv_cache))


# --- the aws profile loads only pinned weights files ---------------------------------------------------
def test_aws_profile_refuses_an_unpinned_weights_file(checkpoint: Path, settings: Settings) -> None:
    aws = replace(settings, profile="aws")
    with pytest.raises(ConfigError, match=f"set {PIN_VARIABLE} to the file's sha256"):
        resolve_weights(MODEL, settings=aws, weights_uri=str(checkpoint), allow_download=False)
    # refused before anything is fetched: this object does not even exist
    with pytest.raises(ConfigError, match=PIN_VARIABLE):
        resolve_weights(MODEL, settings=aws, weights_uri="s3://no-such-bucket/w.pt", allow_download=False)
    # the local profile loads it unpinned
    assert resolve_weights(MODEL, settings=settings, weights_uri=str(checkpoint)).path == checkpoint


def test_aws_profile_loads_a_pinned_weights_file(checkpoint: Path, settings: Settings) -> None:
    digest = sha256_file(checkpoint)
    aws = load_settings({"CXR_PROFILE": "aws", PIN_VARIABLE: digest})
    assert aws.weights_sha256_for(MODEL) == digest
    w = resolve_weights(MODEL, settings=aws, weights_uri=str(checkpoint), allow_download=False)
    assert (w.source, w.path, w.sha256) == ("uri", checkpoint, digest)
    aws_unpinned = replace(settings, profile="aws")
    w = resolve_weights(MODEL, settings=aws_unpinned, weights_uri=str(checkpoint), pinned={MODEL: digest})
    assert w.sha256 == digest
    with pytest.raises(WeightsIntegrityError, match="pinned"):
        resolve_weights(MODEL, settings=aws_unpinned, weights_uri=str(checkpoint), pinned={MODEL: "0" * 64})


# --- torch's legacy format (xrv's DenseNet files) ------------------------------------------------------
def test_truncated_legacy_checkpoint_is_refused_before_unpickling(
    legacy_checkpoint: Path, tmp_path: Path, settings: Settings, no_torch_load: None
) -> None:
    data = legacy_checkpoint.read_bytes()
    assert data[:2] == b"\x80\x02" and not data.startswith(b"PK")  # a pickle stream, not a zip archive
    pickled = _pickled_part_end(data)
    assert 0 < pickled < len(data)
    bad = tmp_path / upstream_filename(MODEL)
    for cut in (
        pickled // 2,  # inside the pickled module
        pickled,  # the pickles complete, every storage missing
        (pickled + len(data)) // 2,  # half the storages
        len(data) - 1,  # one byte short
    ):
        bad.write_bytes(data[:cut])
        with pytest.raises(WeightsIntegrityError, match="not a complete torch checkpoint \\(truncated"):
            resolve_weights(MODEL, settings=settings, weights_dir=str(tmp_path), allow_download=False)


#: set by :func:`_payload` when a pickle that names it is really unpickled
RAN: list[str] = []


def _payload(tag: str) -> None:
    RAN.append(tag)


class _RunsCodeWhenUnpickled:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_payload, ("unpickled",))


def test_legacy_check_runs_nothing_the_pickle_names(tmp_path: Path) -> None:
    """The check walks the pickles with every global inert: a function the file names is never called."""
    import torch

    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    magic, version = torch.serialization.MAGIC_NUMBER, torch.serialization.PROTOCOL_VERSION
    pickles: list[object] = [magic, version, sys_info, _RunsCodeWhenUnpickled(), []]  # object, then storage keys
    path = tmp_path / "payload.pt"
    path.write_bytes(b"".join(pickle.dumps(p, protocol=2) for p in pickles))
    RAN.clear()
    verify(path, MODEL)  # structurally complete (no storages): accepted, and nothing ran
    assert RAN == []
    torch.load(path, weights_only=False)  # the same bytes do run code when really unpickled
    assert RAN == ["unpickled"]
    RAN.clear()


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_storage_element_sizes_match_torch() -> None:
    import torch

    assert {name: getattr(torch, name)().element_size() for name in STORAGE_ELEMENT_SIZES} == STORAGE_ELEMENT_SIZES
