"""Pure decode/normalise/crop/resize functions: exact values and parity with TorchXRayVision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lakehouse.errors import ImageTooLargeError, InputError, PixelRangeError
from lakehouse.tables import decode_tensor
from tests.xrv_reference import xrv_reference
from transforms.decode import decode, pseudonymize, sniff_format
from transforms.sample import INVALID_KINDS, VALID_KINDS, dicom_bytes, png_bytes
from transforms.tensor import PreprocessParams, center_crop, normalize, preprocess_bytes, resize

KEY = "unit-test-key"


def _tensor(data: bytes, name: str, **params: object) -> np.ndarray:
    row = preprocess_bytes(data, name=name, params=PreprocessParams(**params), pseudonym_key=KEY)  # type: ignore[arg-type]
    return decode_tensor(row["tensor"], row["tensor_dtype"], row["tensor_shape"])


@pytest.mark.parametrize(
    ("values", "maxval", "expected"),
    [
        ([0, 255], 255, [-1024.0, 1024.0]),
        ([0, 4095, 2048], 4095, [-1024.0, 1024.0, (2 * (2048 / 4095) - 1) * 1024]),
        ([65535, 0], 65535, [1024.0, -1024.0]),
        ([1, 3], 3, [(2 * (1 / 3) - 1) * 1024, 1024.0]),
    ],
)
def test_normalize_exact(values: list[int], maxval: int, expected: list[float]) -> None:
    dtype = np.uint8 if maxval <= 255 else np.uint16
    out = normalize(np.array(values, dtype=dtype), maxval)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.array(expected, np.float32), rtol=0, atol=1e-3)


def test_normalize_lut_is_bit_identical_to_xrv_formula() -> None:
    import torchxrayvision as xrv

    img = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    assert np.array_equal(normalize(img, 4095), xrv.utils.normalize(img, 4095))


def test_normalize_refuses_values_above_maxval() -> None:
    with pytest.raises(PixelRangeError, match="higher than expected bound"):
        normalize(np.array([0, 4096], np.uint16), 4095)


@pytest.mark.parametrize(
    ("shape", "expected_rows", "expected_cols"),
    [((4, 6), (0, 4), (1, 5)), ((7, 3), (2, 5), (0, 3)), ((5, 5), (0, 5), (0, 5)), ((3, 8), (0, 3), (3, 6))],
)
def test_center_crop_matches_xrv(
    shape: tuple[int, int], expected_rows: tuple[int, int], expected_cols: tuple[int, int]
) -> None:
    import torchxrayvision as xrv

    img = np.arange(shape[0] * shape[1], dtype=np.float32).reshape(shape)
    out = center_crop(img)
    assert np.array_equal(out, img[expected_rows[0] : expected_rows[1], expected_cols[0] : expected_cols[1]])
    assert np.array_equal(out, xrv.datasets.XRayCenterCrop()(img[None])[0])


def test_resize_area_of_constant_blocks_is_exact() -> None:
    img = np.kron(np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), np.ones((4, 4), np.float32))
    out = resize(img, 2, engine="cv2")
    assert out.shape == (1, 2, 2)
    assert np.array_equal(out[0], np.array([[1.0, 2.0], [3.0, 4.0]], np.float32))


@pytest.mark.parametrize("kind", sorted(VALID_KINDS))
def test_parity_with_torchxrayvision(kind: str, tmp_path: Path) -> None:
    """Stored tensors equal xrv's own load -> crop -> resize(cv2) within 1.0 (float16) / 1e-3 (float32)."""
    ext, make = VALID_KINDS[kind]
    path = tmp_path / f"{kind}{ext}"
    path.write_bytes(make(7))
    reference = xrv_reference(path, engine="cv2")
    f16 = _tensor(path.read_bytes(), str(path), dtype="float16")
    f32 = _tensor(path.read_bytes(), str(path), dtype="float32")
    assert f16.shape == reference.shape == (1, 224, 224)
    assert np.abs(f16 - reference).max() <= 1.0
    assert np.abs(f32 - reference).max() <= 1e-3
    assert reference.std() > 50  # an image, not a constant: the comparison means something


@pytest.mark.parametrize("kind", ["png8_gray", "dcm_mono1_10bit", "dcm_j2k_12bit"])
def test_parity_skimage_engine(kind: str, tmp_path: Path) -> None:
    ext, make = VALID_KINDS[kind]
    path = tmp_path / f"{kind}{ext}"
    path.write_bytes(make(3))
    reference = xrv_reference(path, engine="skimage", size=128)
    ours = _tensor(path.read_bytes(), str(path), dtype="float32", engine="skimage", size=128)
    assert np.abs(ours - reference).max() <= 1e-3


@pytest.mark.parametrize("kind", sorted(INVALID_KINDS))
def test_invalid_inputs_raise_named_errors(kind: str) -> None:
    fname, make, expected = INVALID_KINDS[kind]
    with pytest.raises(InputError) as info:
        _tensor(make(1), f"/in/{fname}")
    assert type(info.value).__name__ == expected
    assert len(str(info.value)) > 20  # a message a user can act on, not a bare code


def test_pixel_limit_is_configurable_and_checked_before_decoding() -> None:
    data = png_bytes(np.zeros((300, 400), np.uint8))
    with pytest.raises(ImageTooLargeError, match=r"400x300 = 0.1 MP, above the limit of 0.1 MP"):
        decode(data, name="x.png", max_pixels=100_000, pseudonym_key=KEY)
    assert decode(data, name="x.png", max_pixels=120_000, pseudonym_key=KEY).width == 400


def test_sniff_by_signature_not_extension() -> None:
    assert sniff_format(png_bytes(np.zeros((2, 2), np.uint8)), "looks_like.dcm") == "png"


def test_dicom_lineage_and_pseudonym() -> None:
    from transforms.sample import Identity

    ident = Identity(patient_name="DOE^JANE", patient_id="PID-4242", birth_date="19800229")
    data = dicom_bytes(np.full((20, 30), 100, np.uint16), bits_stored=12, identity=ident, view_position="AP")
    img = decode(data, name="a.dcm", pseudonym_key=KEY)
    assert (img.width, img.height, img.bits_stored, img.maxval) == (30, 20, 12, 4095)
    assert img.dicom["view_position"] == "AP" and img.dicom["modality"] == "DX"
    assert img.dicom["patient_pseudonym"] == pseudonymize("PID-4242", KEY)
    assert "PID-4242" not in str(img.dicom.values()) and "DOE" not in str(img.dicom.values())


def test_pseudonym_depends_on_key() -> None:
    a, b = pseudonymize("PID-1", "k1"), pseudonymize("PID-1", "k2")
    assert a != b and len(a) == 64 and pseudonymize("PID-1", "k1") == a


@pytest.mark.parametrize(
    "name",
    [
        "JPEG-lossy.dcm",
        "JPGExtended.dcm",
        "JPEG2000.dcm",
        "693_J2KI.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEGLSNearLossless_16.dcm",
        "CT_small.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_rle.dcm",
    ],
)
def test_pydicom_bundled_files_from_other_encoders(name: str, tmp_path: Path) -> None:
    """Files written by other toolkits (pydicom's bundled test data): parity, or a named refusal."""
    import pydicom
    from pydicom.data import get_testdata_file

    src = Path(str(get_testdata_file(name)))
    path = tmp_path / name
    path.write_bytes(src.read_bytes())
    ds = pydicom.dcmread(path)
    try:
        pixels = ds.pixel_array
    except (RuntimeError, ValueError, NotImplementedError):  # xrv cannot read it either: quarantined
        from lakehouse.errors import DecodeError

        with pytest.raises(DecodeError, match="DICOM pixel data cannot be decoded"):
            _tensor(path.read_bytes(), name)
        return
    if pixels.min() < 0:  # signed data with negative values: refused with a reason
        with pytest.raises(PixelRangeError, match="negative"):
            _tensor(path.read_bytes(), name)
        return
    ours = _tensor(path.read_bytes(), name, dtype="float32")
    assert np.abs(ours - xrv_reference(path)).max() <= 1e-3


def test_multiframe_dicom_is_refused() -> None:
    from pydicom.data import get_testdata_file

    from lakehouse.errors import UnsupportedImageError

    data = Path(str(get_testdata_file("SC_rgb_rle_2frame.dcm"))).read_bytes()
    with pytest.raises(UnsupportedImageError, match="multi-frame DICOM \\(2 frames\\)"):
        _tensor(data, "two.dcm")


def test_error_messages_never_carry_patient_identifiers() -> None:
    from transforms.decode import _redact
    from transforms.sample import Identity

    ident = Identity(patient_name="DOE^JANE", patient_id="PID-777", birth_date="19800229")
    data = dicom_bytes(np.full((20, 30), 100, np.uint16), bits_stored=12, identity=ident)
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    assert (
        _redact("bad value PID-777 for DOE^JANE born 19800229", ds)
        == "bad value [redacted] for [redacted] born [redacted]"
    )


def test_samples_are_deterministic(tmp_path: Path) -> None:
    """The same seed writes the same bytes: rerunning `make run` finds everything already present."""
    from transforms.sample import write_samples

    a = write_samples(tmp_path / "a", count=len(VALID_KINDS), include_invalid=True)
    b = write_samples(tmp_path / "b", count=len(VALID_KINDS), include_invalid=True)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_oversized_files_are_quarantined_before_reading(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    import pyarrow as pa

    from lakehouse.config import load_settings
    from transforms.preprocess import process_files

    small, big = tmp_path / "small.png", tmp_path / "big.png"
    small.write_bytes(png_bytes(np.zeros((16, 16), np.uint8)))
    big.write_bytes(b"\0" * 5000)
    settings = load_settings({}).with_overrides(max_file_bytes=4096)
    batch = pa.RecordBatch.from_pydict(
        {"source_uri": [str(small), str(big)], "source_bytes": [small.stat().st_size, 5000], "mtime_ms": [0, 10**15]}
    )
    rows = pa.Table.from_batches(
        list(
            process_files(
                [batch],
                known_files={},
                known_ids=frozenset(),
                params=PreprocessParams(),
                settings=settings,
                lakehouse_uri=str(tmp_path / "lake"),
                lineage={
                    "preprocess_version": "t",
                    "preprocess_params": "{}",
                    "run_id": "r",
                    "ingested_at": datetime.now(UTC),
                },
            )
        )
    ).to_pylist()
    assert [r["status"] for r in rows] == ["new", "quarantined"]
    assert rows[1]["error_class"] == "ImageTooLargeError" and "5000 bytes" in rows[1]["error_message"]
    assert rows[1]["decoded"] is False and rows[1]["image_id"] is None  # never read
    assert rows[0]["data_file"] and (tmp_path / "lake" / "tensors" / rows[0]["data_file"]).is_file()
    assert rows[1]["data_file"] is None
