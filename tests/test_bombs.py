"""Decompression bombs are refused from headers, before any pixel data is read, inflated or decoded.

Every crafted file is small on disk and declares (or inflates to) something huge. The ``no_decoding``
fixture makes every pixel decoder raise ``AssertionError`` (not an ``InputError``), so a test passes only
when the refusal came first.
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from lakehouse.errors import CodestreamMismatchError, DecodeError, ImageTooLargeError
from transforms.decode import decode, skip_reason
from transforms.sample import dicom_bytes, jpeg_bytes, png_header_only

KEY = "unit-test-key"
DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
DEFLATED = "1.2.840.10008.1.2.1.99"
MIB = 1 << 20


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every pixel decoder the decode path can reach raises AssertionError."""
    import cv2
    import pydicom.dataset
    from PIL import ImageFile

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(boom))
    monkeypatch.setattr(cv2, "imdecode", boom)
    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    yield


# --- crafted files -----------------------------------------------------------------------------------
def _dx(rows: int, cols: int, *, samples: int = 1, frames: int = 0, pixels: bytes = bytes(16)) -> object:
    """A DX data set (pydicom Dataset + FileMetaDataset) declaring ``rows`` x ``cols`` x ``samples`` x ``frames``."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["bomb"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName, ds.PatientID = "DOE^JANE", "PID-4242"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames:
        ds.NumberOfFrames = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW"
    return ds


def _save(ds: object) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)  # type: ignore[attr-defined]
    return buf.getvalue()


def _zeros_stream(mib: int) -> bytes:
    """Raw deflate blocks inflating to ``mib`` MiB of zeros (about 1 KiB each): a bomb costs no time to build."""
    one = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = one.compress(bytes(MIB)) + one.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, history reset: repeatable
    return block * mib


def _deflated(ds: object, *, zeros_mib: int = 0, where: Literal["overlay", "padding"] = "padding") -> bytes:
    """``ds`` as a Deflated Explicit VR Little Endian file whose data set also holds ``zeros_mib`` MiB of zeros.

    ``overlay``: in an Overlay Data element before the pixel data (a header bomb); ``padding``: in Data Set
    Trailing Padding after it.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)  # type: ignore[arg-type]
    plain = body.getvalue()
    filler = struct.pack("<HH2sHI", *((0x6000, 0x3000) if where == "overlay" else (0xFFFC, 0xFFFC)), b"OB", 0, 0)
    filler = filler[:-4] + struct.pack("<I", zeros_mib * MIB)
    cut = plain.index(b"\xe0\x7f\x10\x00") if where == "overlay" else len(plain)
    head = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    tail = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = (
        head.compress(plain[:cut] + filler)
        + head.flush(zlib.Z_FULL_FLUSH)
        + _zeros_stream(zeros_mib)
        + tail.compress(plain[cut:])
        + tail.flush()
    )
    ds.file_meta.TransferSyntaxUID = DEFLATED  # type: ignore[attr-defined]
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta)  # type: ignore[arg-type, attr-defined]
    return out.getvalue() + stream


def _patch(data: bytes, marker: bytes, offset: int, fmt: str, *values: int) -> bytes:
    """``data`` with ``values`` packed at ``offset`` bytes after the first ``marker``."""
    at = data.index(marker) + offset
    size = struct.calcsize(fmt)
    return data[:at] + struct.pack(fmt, *values) + data[at + size :]


def _encapsulated(frame: bytes, ts: str, rows: int = 64, cols: int = 64) -> bytes:
    """A 64x64 8-bit DX whose pixel data is ``frame`` encapsulated under transfer syntax ``ts``."""
    from pydicom.encaps import encapsulate

    ds = _dx(rows, cols, pixels=encapsulate([frame]))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7  # type: ignore[attr-defined]
    ds["PixelData"].VR = "OB"  # type: ignore[index]
    ds["PixelData"].is_undefined_length = True  # type: ignore[index]
    ds.file_meta.TransferSyntaxUID = ts  # type: ignore[attr-defined]
    return _save(ds)


def _gray64() -> np.ndarray:
    return (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)


# --- PNG and JPEG ------------------------------------------------------------------------------------
def test_png_bomb_refused_from_ihdr(no_decoding: None) -> None:
    data = png_header_only(100_000, 100_000)
    assert len(data) < 100
    with pytest.raises(ImageTooLargeError, match=r"declares 100000x100000 = 10000.0 MP"):
        decode(data, name="bomb.png", pseudonym_key=KEY)


@pytest.mark.parametrize(("side", "message"), [(60_000, "decompression bomb"), (9_000, r"declares 9000x9000 = 81.0")])
def test_jpeg_bomb_refused_from_sof(side: int, message: str, no_decoding: None) -> None:
    """Above Pillow's own bomb limit (60000^2) and between ours and Pillow's (9000^2 = 81 MP > 64 MP)."""
    data = _patch(jpeg_bytes(_gray64()), b"\xff\xc0", 5, ">HH", side, side)
    assert len(data) < 2000
    with pytest.raises(ImageTooLargeError, match=message):
        decode(data, name="bomb.jpg", pseudonym_key=KEY)


# --- DICOM: the header's geometry -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rows", "cols", "samples", "frames", "message"),
    [
        (60_000, 60_000, 1, 0, r"declares 60000x60000 = 3600.0 MP"),
        (5_000, 5_000, 3, 0, r"declares 5000x5000x3 samples = 75.0 MP"),  # 25 MP, refused for its 3 samples
        (4_096, 4_096, 1, 1_000, r"declares 4096x4096x1000 frames = 16777.2 MP"),
    ],
)
def test_dicom_header_bomb_refused(
    rows: int, cols: int, samples: int, frames: int, message: str, no_decoding: None
) -> None:
    data = _save(_dx(rows, cols, samples=samples, frames=frames))
    assert len(data) < 1000
    with pytest.raises(ImageTooLargeError, match=message):
        decode(data, name="bomb.dcm", pseudonym_key=KEY)


def test_samples_per_pixel_counts_towards_the_limit() -> None:
    """The same 5000x5000 declared with one sample passes the limit (then pydicom finds 16 bytes too few)."""
    with pytest.raises(DecodeError, match=r"less than expected \(16 vs 50000000 bytes\)"):
        decode(_save(_dx(5_000, 5_000)), name="short.dcm", pseudonym_key=KEY)


def test_truncated_pixel_data_refused_before_decoding(no_decoding: None) -> None:
    data = _save(_dx(64, 64, pixels=bytes(64 * 64 * 2)))
    with pytest.raises(DecodeError, match=r"truncated DICOM: the file holds 8092 bytes of pixel data, 64x64 .* 8192"):
        decode(data[:-100], name="cut.dcm", pseudonym_key=KEY)


def test_multiframe_bomb_is_skipped_without_reading_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """4096 x 4096 x 1000 frames declared, 16 bytes present: skipped from the header alone."""
    import pydicom

    calls: list[dict[str, object]] = []
    real = pydicom.dcmread

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom, "dcmread", spy)
    skip = skip_reason(_save(_dx(4_096, 4_096, frames=1_000)), name="cine.dcm", modalities=("DX",))
    assert skip is not None and skip.reason_class == "MultiFrame"
    assert skip.message.startswith("multi-frame DICOM (1000 frames; SOP class Digital X-Ray Image Storage")
    assert calls and all(c.get("stop_before_pixels") is True and c.get("defer_size") for c in calls)


# --- DICOM: encapsulated codestreams ----------------------------------------------------------------
def _jpeg_frame() -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpeg8_encode(_gray64(), level=90))


def _jpegls_frame() -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpegls_encode(_gray64()))


def _j2k_frame(codec: str) -> bytes:
    import imagecodecs

    return bytes(imagecodecs.jpeg2k_encode(_gray64(), level=0, codecformat=codec))


#: name -> (frame maker, transfer syntax, marker, offset of height/width after it, struct format, kind)
CODESTREAMS = {
    "jpeg_baseline": (_jpeg_frame, "1.2.840.10008.1.2.4.50", b"\xff\xc0", 5, ">HH", "JPEG"),
    "jpeg_ls": (_jpegls_frame, "1.2.840.10008.1.2.4.80", b"\xff\xf7", 5, ">HH", "JPEG-LS"),
    "j2k_codestream": (lambda: _j2k_frame("J2K"), "1.2.840.10008.1.2.4.90", b"\xff\x4f\xff\x51", 8, ">II", "JPEG 2000"),
    "jp2_boxes": (lambda: _j2k_frame("JP2"), "1.2.840.10008.1.2.4.91", b"\xff\x4f\xff\x51", 8, ">II", "JPEG 2000"),
}


@pytest.mark.parametrize("name", sorted(CODESTREAMS))
def test_valid_codestream_decodes(name: str) -> None:
    """The check does not refuse what the encoders write: each frame decodes to its exact pixels."""
    make, ts, *_ = CODESTREAMS[name]
    img = decode(_encapsulated(make(), ts), name=f"{name}.dcm", pseudonym_key=KEY)
    assert (img.width, img.height) == (64, 64)
    if name != "jpeg_baseline":  # the others are lossless
        assert np.array_equal(img.pixels, _gray64())


@pytest.mark.parametrize("name", sorted(CODESTREAMS))
def test_codestream_bomb_refused(name: str, no_decoding: None) -> None:
    """A 64x64 header over a codestream that declares 60000 x 60000."""
    make, ts, marker, offset, fmt, kind = CODESTREAMS[name]
    data = _encapsulated(_patch(make(), marker, offset, fmt, 60_000, 60_000), ts)
    assert len(data) < 10_000
    with pytest.raises(ImageTooLargeError, match=rf"the {kind} codestream declares 60000x60000 = 3600.0 MP"):
        decode(data, name=f"{name}.dcm", pseudonym_key=KEY)


@pytest.mark.parametrize("name", sorted(CODESTREAMS))
def test_codestream_larger_than_header_refused(name: str, no_decoding: None) -> None:
    """Under the pixel limit, but larger than the header's Rows x Columns: decoders would allocate more."""
    make, ts, marker, offset, fmt, kind = CODESTREAMS[name]
    data = _encapsulated(_patch(make(), marker, offset, fmt, 64, 128), ts)  # 128 wide or 128 high
    with pytest.raises(
        CodestreamMismatchError, match=rf"the {kind} codestream declares .* header's Columns x Rows = 64x64"
    ):
        decode(data, name=f"{name}.dcm", pseudonym_key=KEY)


def test_codestream_with_more_components_than_samples_refused(no_decoding: None) -> None:
    import imagecodecs

    rgb = bytes(imagecodecs.jpeg8_encode(np.stack([_gray64()] * 3, axis=-1), level=90))
    with pytest.raises(CodestreamMismatchError, match=r"64x64 with 3 component\(s\).* SamplesPerPixel 1"):
        decode(_encapsulated(rgb, "1.2.840.10008.1.2.4.50"), name="rgb_in_mono.dcm", pseudonym_key=KEY)


def test_bundled_codestreams_from_other_encoders_match_their_headers() -> None:
    """Every JPEG / JPEG-LS / JPEG 2000 file in pydicom's test data: the parsed size equals the header's.

    (One file is crafted by pydicom with a sequence delimiter inside its SIZ marker; it is refused.)
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    from transforms.decode import _first_frame_start, _j2k_size, _jpeg_size, _read_header

    folder = Path(str(get_testdata_file("CT_small.dcm"))).parent
    checked = 0
    for path in sorted(folder.glob("*.dcm")):
        header = _read_header(path.read_bytes())
        ts = header.transfer_syntax
        if ts not in JPEGTransferSyntaxes + JPEGLSTransferSyntaxes + JPEG2000TransferSyntaxes:
            continue
        if header.pixel_keyword is None:  # UN_sequence.dcm: a JPEG syntax, no image
            continue
        codestream = _first_frame_start(header.data, header.pixel_offset)
        size = (_j2k_size if ts in JPEG2000TransferSyntaxes else _jpeg_size)(codestream)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected = (ds.Columns, ds.Rows, ds.SamplesPerPixel)
        if path.name == "JPEG2000-embedded-sequence-delimiter.dcm":
            assert size is not None and size[0] > 1 << 30
        else:
            assert size == expected, path.name
        checked += 1
    assert checked >= 25


# --- DICOM: deflated data sets ------------------------------------------------------------------------
def test_deflated_dicom_decodes_exactly() -> None:
    """A Deflated Explicit VR file written by pydicom, and pydicom's bundled one, decode to their pixels."""
    import pydicom
    from pydicom.data import get_testdata_file

    pixels = (np.arange(48 * 40, dtype=np.uint16) % 4096).reshape(48, 40)
    ds = _dx(48, 40, pixels=pixels.tobytes())
    ds.file_meta.TransferSyntaxUID = DEFLATED  # type: ignore[attr-defined]
    data = _save(ds)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == DEFLATED
    img = decode(data, name="deflated.dcm", pseudonym_key=KEY)
    assert np.array_equal(img.pixels, pixels) and img.dicom["transfer_syntax"] == DEFLATED

    bundled = Path(str(get_testdata_file("image_dfl.dcm"))).read_bytes()
    img = decode(bundled, name="image_dfl.dcm", pseudonym_key=KEY)
    assert np.array_equal(img.pixels, pydicom.dcmread(io.BytesIO(bundled)).pixel_array)


def test_deflate_bomb_after_pixel_data_refused_without_inflating_it(no_decoding: None) -> None:
    """64x64 pixels, then 2 GiB of zeros in the trailing padding, in 2 MB: inflated only as far as the header allows."""
    data = _deflated(_dx(64, 64, pixels=bytes(64 * 64 * 2)), zeros_mib=2048, where="padding")
    assert len(data) < 3 * MIB
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(
            ImageTooLargeError, match=r"inflates to more than \d+ bytes although its header declares 8192"
        ):
            decode(data, name="bomb.dcm", pseudonym_key=KEY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB, f"{peak / MIB:.0f} MiB allocated"
    assert time.perf_counter() - started < 5


def test_deflate_bomb_before_pixel_data_refused(no_decoding: None) -> None:
    """2 GiB of zeros in an Overlay Data element: the header never ends within the inflation cap."""
    data = _deflated(_dx(64, 64, pixels=bytes(64 * 64 * 2)), zeros_mib=2048, where="overlay")
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError, match=r"inflates to more than 16 MiB before its pixel data"):
            decode(data, name="bomb.dcm", pseudonym_key=KEY)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 * MIB, f"{peak / MIB:.0f} MiB allocated"
    assert skip_reason(data, name="bomb.dcm", modalities=("DX",)) is None  # decode() judges it


def test_deflated_header_bomb_refused_from_header(no_decoding: None) -> None:
    """A deflated header declaring 60000 x 60000: refused from the header, the data set never fully inflated."""
    data = _deflated(_dx(60_000, 60_000))
    with pytest.raises(ImageTooLargeError, match=r"declares 60000x60000"):
        decode(data, name="bomb.dcm", pseudonym_key=KEY)


def test_corrupt_deflate_stream_is_a_decode_error() -> None:
    from transforms.decode import _file_meta

    data = _deflated(_dx(64, 64, pixels=bytes(64 * 64 * 2)))
    start = _file_meta(data)[1]
    corrupt = data[:start] + b"\xff" + data[start + 1 :]  # BTYPE 11: an invalid deflate block
    with pytest.raises(
        DecodeError,
        match=r"corrupt deflated DICOM: the data set cannot be inflated \(Error -3 .*: invalid block type\)",
    ):
        decode(corrupt, name="bad.dcm", pseudonym_key=KEY)
    assert skip_reason(corrupt, name="bad.dcm", modalities=("DX",)) is None


def test_sample_dicom_still_decodes() -> None:
    """The ordinary path is unchanged: a sample DX decodes with its lineage."""
    img = decode(dicom_bytes(np.full((20, 30), 7, np.uint16), bits_stored=12), name="a.dcm", pseudonym_key=KEY)
    assert (img.width, img.height, int(img.pixels.max())) == (30, 20, 7)
    assert img.dicom["transfer_syntax"] == "1.2.840.10008.1.2.1"
