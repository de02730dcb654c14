"""Pure decode/normalise/crop/resize functions: exact values and parity with TorchXRayVision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lakehouse.errors import ImageTooLargeError, InputError, PixelRangeError
from lakehouse.tables import decode_tensor
from tests.xrv_reference import xrv_reference
from transforms.decode import decode, pseudonymize, skip_reason, sniff_format
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
    assert img.dicom["manufacturer"] == "ACME MEDICAL"  # seed 0
    import hashlib
    import hmac

    expected_site = hmac.new(KEY.encode(), b"site:SYNTHETIC HOSPITAL", hashlib.sha256).hexdigest()  # seed 0
    assert img.dicom["site_pseudonym"] == expected_site != img.dicom["patient_pseudonym"]
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


@pytest.mark.parametrize("corruption", ["transfer_syntax_minted_from_mrn", "mrn_in_photometric", "mrn_in_modality"])
def test_error_messages_never_carry_patient_identifiers(corruption: str) -> None:
    """Real failures whose raw text quotes element values never pass a patient identifier on.

    A site that mints UIDs from the medical record number writes it into a private transfer syntax UID,
    which pydicom quotes when it refuses to decode; an export that shifts values puts the patient ID into
    Photometric Interpretation or Modality, which our own messages quote.
    """
    import io

    import pydicom

    from transforms.sample import Identity

    mrn, name = "4217733901", "DOE^JANE"
    raw = dicom_bytes(np.full((20, 30), 100, np.uint16), bits_stored=12, identity=Identity(name, mrn, "19800229"))
    ds = pydicom.dcmread(io.BytesIO(raw))
    if corruption == "transfer_syntax_minted_from_mrn":
        ds.file_meta.TransferSyntaxUID = f"1.2.826.0.1.3680043.9.{mrn}"
    elif corruption == "mrn_in_photometric":
        ds.PhotometricInterpretation = mrn
    else:
        ds.Modality = mrn
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    if corruption == "mrn_in_modality":
        skip = skip_reason(buf.getvalue(), name="x.dcm", modalities=("DX",))
        assert skip is not None and skip.reason_class == "ModalityNotAllowed"
        message = skip.message
        assert message.startswith(
            "DICOM modality [redacted] (SOP class Digital X-Ray Image Storage - For Presentation) is"
        )
    else:
        with pytest.raises(InputError) as info:
            decode(buf.getvalue(), name="x.dcm", pseudonym_key=KEY)
        message = str(info.value)
        if corruption == "transfer_syntax_minted_from_mrn":
            assert mrn in str(info.value.__cause__)  # pydicom's own text quotes it: this path really leaks
            assert message.startswith(
                "DICOM pixel data cannot be decoded (transfer syntax 1.2.826.0.1.3680043.9.[redacted]"
            )
        else:
            assert message.startswith("photometric interpretation [redacted] is not supported")
    assert mrn not in message and name not in message and "[redacted]" in message


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


# --- skip_reason: objects left out by design, judged from the header -------------------------------------
ALLOWED = ("CR", "DX", "RG")


def _bundled(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    return Path(str(get_testdata_file(name))).read_bytes()


def _dx_variant(*, deflated: bool = False, **changes: str | None) -> bytes:
    """A sample DX with elements set (``None``: deleted), optionally written Deflated Explicit VR."""
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.full((20, 30), 100, np.uint16), bits_stored=12)))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    if "SOPClassUID" in changes:
        ds.file_meta.MediaStorageSOPClassUID = changes["SOPClassUID"]
    if deflated:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture
def header_only(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Record every dcmread call, and make reading pixel data fail the test."""
    import pydicom
    import pydicom.dataset

    calls: list[dict[str, object]] = []
    real = pydicom.dcmread

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    def boom(self: object) -> None:
        raise AssertionError("pixel data was read")

    monkeypatch.setattr(pydicom, "dcmread", spy)
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(boom))
    return calls


@pytest.mark.parametrize("deflated", [False, True])
def test_skip_reason_keeps_an_image(deflated: bool, header_only: list[dict[str, object]]) -> None:
    data = _dx_variant(deflated=deflated)
    header_only.clear()  # building the file read it
    assert skip_reason(data, name="a.dcm", modalities=ALLOWED) is None
    assert header_only and all(c.get("stop_before_pixels") is True and c.get("defer_size") for c in header_only)


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("test-SR.dcm", "SOP class Comprehensive SR Storage, modality SR"),
        ("reportsi.dcm", "SOP class Basic Text SR Storage, modality SR"),
        ("rtplan.dcm", "SOP class RT Plan Storage, modality RTPLAN"),
        ("rtstruct.dcm", "SOP class RT Structure Set Storage, modality RTSTRUCT"),
        ("waveform_ecg.dcm", "SOP class 12-lead ECG Waveform Storage, modality ECG"),
    ],
)
def test_skip_reason_no_pixel_data(name: str, what: str, header_only: list[dict[str, object]]) -> None:
    """Objects from other toolkits (pydicom's test data) that hold no image."""
    skip = skip_reason(_bundled(name), name=name, modalities=ALLOWED)
    assert skip is not None and skip.reason_class == "NoPixelData"
    assert skip.message == (
        f"DICOM object without pixel data ({what}): a report, presentation state, key object selection, "
        "RT plan or similar holds no image for a model; nothing to decode"
    )
    assert header_only and all(c.get("stop_before_pixels") is True for c in header_only)


def test_image_class_without_pixel_data_is_left_to_decode() -> None:
    """A DX object without pixels is broken, not a report: decode() quarantines it."""
    from lakehouse.errors import NoPixelDataError

    data = dicom_bytes(np.zeros((1, 1), np.uint8), bits_stored=8, with_pixels=False)
    assert skip_reason(data, name="dx.dcm", modalities=ALLOWED) is None
    with pytest.raises(NoPixelDataError, match="Digital X-Ray Image Storage - For Presentation"):
        decode(data, name="dx.dcm", pseudonym_key=KEY)


@pytest.mark.parametrize("deflated", [False, True])
def test_skip_reason_modality_not_allowed(deflated: bool, header_only: list[dict[str, object]]) -> None:
    data = _dx_variant(deflated=deflated, Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2")
    header_only.clear()  # building the file read it
    skip = skip_reason(data, name="ct.dcm", modalities=ALLOWED)
    assert header_only and all(c.get("stop_before_pixels") is True for c in header_only)
    assert skip is not None and skip.reason_class == "ModalityNotAllowed"
    assert skip.message == (
        "DICOM modality CT (SOP class CT Image Storage) is not in the allowlist CR, DX, RG; "
        "skipped without reading its pixels; to include it add CT to CXR_MODALITIES "
        "(then `cxr requeue --skipped --error-class ModalityNotAllowed` for files already skipped)"
    )
    assert skip_reason(data, name="ct.dcm", modalities=(*ALLOWED, "CT")) is None


@pytest.mark.parametrize(
    ("sop_class", "allowed", "expected"),
    [
        ("1.2.840.10008.5.1.4.1.1.1.1", ALLOWED, None),  # DX storage implies DX
        ("1.2.840.10008.5.1.4.1.1.1", ("CR",), None),  # CR storage implies CR
        (
            "1.2.840.10008.5.1.4.1.1.1.2",
            ALLOWED,
            "Digital Mammography X-Ray Image Storage - For Presentation, which implies MG): MG is not in",
        ),
        ("1.2.840.10008.5.1.4.1.1.7", ALLOWED, "Secondary Capture Image Storage, which implies none): not in"),
        ("1.2.840.10008.5.1.4.1.1.7", (*ALLOWED, "NONE"), None),  # admitted on purpose
    ],
)
def test_skip_reason_missing_modality(sop_class: str, allowed: tuple[str, ...], expected: str | None) -> None:
    """Modality is Type 1 but missing from some exports: the SOP class decides, else the NONE entry."""
    skip = skip_reason(_dx_variant(Modality=None, SOPClassUID=sop_class), name="x.dcm", modalities=allowed)
    if expected is None:
        assert skip is None
    else:
        assert skip is not None and skip.reason_class == "ModalityNotAllowed"
        assert skip.message.startswith(
            f"DICOM without a Modality element (SOP class {expected} the allowlist CR, DX, RG;"
        )
        assert (
            f"add {'MG' if 'MG' in expected else 'NONE'} to CXR_MODALITIES (then `cxr requeue --skipped" in skip.message
        )


def test_skip_reason_multi_frame(header_only: list[dict[str, object]]) -> None:
    skip = skip_reason(_bundled("SC_rgb_rle_2frame.dcm"), name="two.dcm", modalities=("OT",))
    assert skip is not None and skip.reason_class == "MultiFrame"
    assert skip.message == (
        "multi-frame DICOM (2 frames; SOP class Secondary Capture Image Storage, modality OT) is not a single "
        "radiograph: skipped without reading its pixels; to include it, split it into single-frame files"
    )
    assert header_only and all(c.get("stop_before_pixels") is True for c in header_only)


@pytest.mark.parametrize("kind", sorted(INVALID_KINDS))
def test_skip_reason_leaves_failures_to_decode(kind: str) -> None:
    """Non-DICOM, corrupt and unparsable inputs are not skipped: decode() quarantines them with the reason."""
    fname, make, _ = INVALID_KINDS[kind]
    assert skip_reason(make(1), name=f"/in/{fname}", modalities=ALLOWED) is None


def test_skip_reason_on_the_sample_kinds() -> None:
    """The kinds `cxr sample` writes as not-radiographs are skipped for the reason the sample names."""
    from transforms.sample import SKIPPED_KINDS

    for kind, (fname, make, expected) in SKIPPED_KINDS.items():
        skip = skip_reason(make(1), name=fname, modalities=ALLOWED)
        assert skip is not None and skip.reason_class == expected, kind
        assert "SYN-" not in skip.message and "SYNTHETIC^" not in skip.message  # the samples' identifiers


def test_skip_reason_on_the_head_of_a_file_never_skips_wrongly() -> None:
    """Judged on the first bytes only (``partial``): a verdict when the whole header is there, else None,
    and never a skip for a radiograph whose header is cut (e.g. by an early end of the head)."""
    from transforms.sample import SKIPPED_KINDS, VALID_KINDS

    modalities = ("CR", "DX", "RG")
    for kind, (_, make, reason) in SKIPPED_KINDS.items():
        data = make(3)
        if kind == "multi_frame" or kind == "ct_slice":  # pixel data follows the header: the head suffices
            head = data[: data.index(b"\xe0\x7f\x10\x00") + 12]
            verdict = skip_reason(head, name="x.dcm", modalities=modalities, partial=True)
            assert verdict is not None and verdict.reason_class == reason, kind
        end = data.find(b"\xe0\x7f\x10\x00")  # the pixel data tag, where the header ends (-1: none)
        for cut in (140, 300, (end if end > 0 else len(data)) - 20):  # cut inside the header: no verdict
            assert skip_reason(data[:cut], name="x.dcm", modalities=modalities, partial=True) is None, (kind, cut)
    for kind, (ext, make) in VALID_KINDS.items():
        if ext == ".dcm":
            data = make(4)
            for cut in range(132, min(len(data), 4000), 97):
                assert skip_reason(data[:cut], name="x.dcm", modalities=modalities, partial=True) is None, (kind, cut)
