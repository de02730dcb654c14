"""Decode PNG, JPEG and DICOM bytes into a 2-D pixel array: pure functions, numpy out.

The decoded values and the maximum value used for normalisation match TorchXRayVision's own loaders:

- PNG / JPEG (``xrv.utils.load_image``): colour images keep channel 0 (red); the maximum value comes
  from the bit depth (255 for 8-bit, 65535 for 16-bit). xrv's ``load_image`` assumes 8 bits and refuses
  16-bit files; here they are scaled by 65535 instead.
- DICOM (``xrv.utils.read_xray_dcm``): ``pixel_array`` through pydicom and its pixel-data plugins
  (uncompressed, RLE, JPEG baseline/extended/lossless, JPEG 2000, JPEG-LS); the maximum is
  ``2**BitsStored - 1``; MONOCHROME1 is inverted as ``maximum - value``. Like xrv, Rescale
  Slope/Intercept and the VOI LUT are not applied (models were trained on stored values); RGB and YBR images are
  converted to RGB by pydicom and keep channel 0, as ``load_image`` does for colour PNGs; multi-frame
  images are refused (quarantined) rather than silently reduced to one frame.

Decompression bombs are refused from headers, before pixel data is read or decoded: PNG IHDR and JPEG frame
sizes; DICOM Rows x Columns x SamplesPerPixel x NumberOfFrames (read with ``stop_before_pixels``), the
codestream size of JPEG / JPEG-LS / JPEG 2000 frames against Rows x Columns, and a Deflated Explicit VR
data set inflated with a cap that its header sets. :func:`skip_reason` judges, from the DICOM header alone,
the objects left out by design (no pixel data, a modality outside the allowlist, multi-frame).

Every failure raises a subclass of :class:`lakehouse.errors.InputError` with a message a user can act on;
no message carries a patient's name or ID.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import struct
import zlib
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np

from lakehouse.errors import (
    CodestreamMismatchError,
    DecodeError,
    EmptyFileError,
    ImageTooLargeError,
    InputError,
    NoPixelDataError,
    PixelRangeError,
    UnsupportedFormatError,
    UnsupportedImageError,
)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset, FileDataset

SourceFormat = Literal["png", "jpeg", "dicom"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
#: photometric interpretations pydicom converts to RGB (channel 0 is then kept, as xrv does for colour).
DICOM_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
DICOM_MONO = ("MONOCHROME1", "MONOCHROME2")
_PNG_COLOUR_TYPES = {0: "GRAY", 2: "RGB", 3: "PALETTE", 4: "GRAY_ALPHA", 6: "RGBA"}


@dataclass
class DecodedImage:
    """A decoded 2-D image with what is needed to normalise it and its lineage."""

    pixels: np.ndarray
    maxval: int
    source_format: SourceFormat
    width: int
    height: int
    bits_stored: int
    photometric: str
    #: DICOM identifiers that are not direct patient identifiers, plus the keyed patient pseudonym.
    dicom: dict[str, str | None] = field(default_factory=dict)


def sniff_format(data: bytes, name: str = "") -> SourceFormat:
    """Tell PNG, JPEG and DICOM apart by their signature (the extension only breaks ties).

    Raises:
        EmptyFileError: zero bytes.
        UnsupportedFormatError: no known signature.
    """
    if not data:
        raise EmptyFileError("the file is empty (0 bytes): re-export or re-copy it")
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if name.lower().endswith(DICOM_EXTENSIONS):
        return "dicom"  # a DICOM dataset without the 128-byte preamble; validated when parsed
    ext = name.rsplit(".", 1)[-1] if "." in name.rsplit("/", 1)[-1] else "(none)"
    raise UnsupportedFormatError(
        f"not a PNG, JPEG or DICOM file (extension {ext!r}, first bytes {data[:8].hex()}): "
        "convert it to one of these formats or remove it from the input"
    )


def check_pixels(
    width: int, height: int, frames: int, max_pixels: int, *, samples: int = 1, what: str = "the header"
) -> None:
    """Refuse an image that declares more values (pixels x samples x frames) than ``max_pixels``, before decoding.

    Args:
        width: columns.
        height: rows.
        frames: number of frames (0 or 1: one).
        max_pixels: the limit (``Settings.max_pixels``).
        samples: samples per pixel (DICOM SamplesPerPixel, codestream components).
        what: what declares the size, for the message.

    Raises:
        DecodeError: an empty image.
        ImageTooLargeError: more than ``max_pixels``.
    """
    if width <= 0 or height <= 0:
        raise DecodeError(f"{what} declares an empty image ({width}x{height})")
    total = width * height * max(samples, 1) * max(frames, 1)
    if total > max_pixels:
        raise ImageTooLargeError(
            f"{what} declares {width}x{height}"
            + (f"x{samples} samples" if samples > 1 else "")
            + (f"x{frames} frames" if frames > 1 else "")
            + f" = {total / 1e6:.1f} MP, above the limit of {max_pixels / 1e6:.1f} MP "
            "(raise it with --max-pixels / CXR_MAX_PIXELS if this image is genuine)"
        )


def pseudonymize(value: str, key: str) -> str:
    """A keyed pseudonym (HMAC-SHA256, hex) of a patient identifier; never reversible without the key."""
    return hmac.new(key.encode(), value.strip().encode(), hashlib.sha256).hexdigest()


def decode(data: bytes, *, name: str = "", max_pixels: int = 64_000_000, pseudonym_key: str) -> DecodedImage:
    """Decode image bytes of any supported format.

    Args:
        data: the file's bytes.
        name: the file name or URI (used only to recognise DICOM files without a preamble).
        max_pixels: images whose header declares more pixels are refused before decoding.
        pseudonym_key: the key of the patient pseudonym (DICOM only).

    Returns:
        The decoded image.

    Raises:
        InputError: a subclass naming why this file cannot become a tensor.
    """
    fmt = sniff_format(data, name)
    if fmt == "png":
        return decode_png(data, max_pixels=max_pixels)
    if fmt == "jpeg":
        return decode_jpeg(data, max_pixels=max_pixels)
    return decode_dicom(data, max_pixels=max_pixels, pseudonym_key=pseudonym_key)


# --- PNG -------------------------------------------------------------------------------------------
def decode_png(data: bytes, *, max_pixels: int) -> DecodedImage:
    """Decode a PNG with OpenCV (strict about truncation; values identical to Pillow's)."""
    import cv2

    cv2.setNumThreads(1)  # one worker process per core already: OpenCV's own threads would oversubscribe
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise DecodeError("truncated PNG: the IHDR header is missing")
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    bit_depth, colour_type = data[24], data[25]
    check_pixels(width, height, 1, max_pixels)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DecodeError(
            f"corrupt or truncated PNG ({width}x{height}, {len(data)} bytes): the image data cannot be decoded"
        )
    if img.ndim == 3:
        img = img[:, :, 2]  # OpenCV returns BGR(A): channel 2 is red, xrv's channel 0
    return DecodedImage(
        pixels=img,
        maxval=_maxval_of(img),
        source_format="png",
        width=width,
        height=height,
        bits_stored=8 if img.dtype == np.uint8 else 16,
        photometric=_PNG_COLOUR_TYPES.get(colour_type, f"PNG_COLOUR_{colour_type}") + f"_{bit_depth}BIT",
    )


# --- JPEG ------------------------------------------------------------------------------------------
def decode_jpeg(data: bytes, *, max_pixels: int) -> DecodedImage:
    """Decode a JPEG with Pillow, as xrv's ``skimage.io.imread`` does (refuses truncated files)."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        width, height = im.size  # header only: nothing is decoded yet
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"the JPEG header declares a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DecodeError(f"corrupt JPEG: the header cannot be read ({exc})") from exc
    check_pixels(width, height, 1, max_pixels)
    mode = im.mode
    if mode not in ("L", "RGB", "I;16", "I"):
        raise UnsupportedImageError(f"JPEG colour mode {mode} is not supported: export as grayscale or RGB")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"corrupt or truncated JPEG ({width}x{height}, {len(data)} bytes): {exc}") from exc
    img = np.asarray(im)
    if img.ndim == 3:
        img = img[:, :, 0]
    return DecodedImage(
        pixels=img,
        maxval=_maxval_of(img),
        source_format="jpeg",
        width=width,
        height=height,
        bits_stored=8 if img.dtype == np.uint8 else 16,
        photometric="GRAY" if mode == "L" else mode,
    )


def _maxval_of(img: np.ndarray) -> int:
    if img.dtype == np.uint8:
        return 255
    if img.dtype == np.uint16:
        return 65535
    raise UnsupportedImageError(f"pixel type {img.dtype} is not supported (expected 8 or 16 bits)")


# --- DICOM: the header, read before any pixel data -------------------------------------------------
#: the pixel data elements; a DICOM object with none of them holds no image (SR, PR, KO, RT plan, ...)
_PIXEL_TAGS = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}
#: header values longer than this are skipped, not read, while the header is judged (private blobs, overlays)
_DEFER_BYTES = 4096
_DEFLATED = "1.2.840.10008.1.2.1.99"
#: a deflated data set is inflated this far to read its header; a longer header is refused as a possible bomb
_HEADER_INFLATE_STEPS = (1 << 20, 16 << 20)
#: what a deflated data set may hold after its pixel data (padding, digital signatures)
_TRAILER_BYTES = 1 << 20
#: how much of the first frame's codestream is searched for its frame header
_CODESTREAM_HEAD_BYTES = 1 << 20
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM_TAG = b"\xfe\xff\x00\xe0"
#: JPEG frame headers: SOF0-3, 5-7, 9-11, 13-15 (T.81), DHP (hierarchical), SOF55 (JPEG-LS, T.87)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xDE, 0xF7}
_JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
#: SOP classes that imply the modality when the (Type 1) Modality element is missing
_SOP_CLASS_MODALITY = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",
    "1.2.840.10008.5.1.4.1.1.1.2": "MG",
    "1.2.840.10008.5.1.4.1.1.1.2.1": "MG",
    "1.2.840.10008.5.1.4.1.1.1.3": "IO",
    "1.2.840.10008.5.1.4.1.1.1.3.1": "IO",
}
#: the allowlist entry that admits objects without a Modality whose SOP class implies none
MISSING_MODALITY = "NONE"

SkipReason = Literal["NoPixelData", "ModalityNotAllowed", "MultiFrame"]


@dataclass(frozen=True)
class Skip:
    """A DICOM object left out by design, judged from its header alone (its pixel data is never read)."""

    reason_class: SkipReason
    #: what the object is and how to include it if wanted; never a patient identifier
    message: str


@dataclass(frozen=True)
class _DicomHeader:
    """A DICOM header read up to, not including, the pixel data, and where that pixel data lies."""

    ds: FileDataset
    #: the bytes parsed: the file, or for a deflated data set an explicit-VR file holding its inflated start
    data: bytes
    has_preamble: bool
    transfer_syntax: str
    pixel_keyword: str | None = None
    #: offset of the pixel data value in ``data`` and its length (0xFFFFFFFF: encapsulated); -1 when none
    pixel_offset: int = -1
    pixel_length: int = -1
    #: deflated only: where the deflate stream starts in the file, the length of the rewritten file meta
    #: that precedes the inflated bytes in ``data``, and whether the header did not fit in
    #: _HEADER_INFLATE_STEPS (the pixel data not reached)
    deflate_start: int = -1
    meta_bytes: int = 0
    incomplete: bool = False


def _parse_errors() -> tuple[type[Exception], ...]:
    """What pydicom and zlib raise on a header they cannot parse."""
    from pydicom.errors import BytesLengthException, InvalidDicomError

    return (
        InvalidDicomError,
        BytesLengthException,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        EOFError,
        OSError,
        OverflowError,
        RuntimeError,  # NotImplementedError (an unknown VR), pydicom's BytesLengthException
        struct.error,
        zlib.error,
    )


def _read_header(data: bytes, *, partial: bool = False) -> _DicomHeader:
    """Parse a DICOM header without reading its pixel data; a deflated data set is inflated only this far.

    ``partial``: ``data`` is the start of a longer file; the header is incomplete unless the pixel data
    element is found in it (a deflated data set is then not judged at all).

    Raises:
        the parser's own exceptions (see :func:`_parse_errors`); callers decide what they mean.
    """
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    meta, dataset_start = _file_meta(data)
    ts = str(meta.get("TransferSyntaxUID", "") or "").strip() if meta is not None else ""
    if meta is None or ts != _DEFLATED:
        ds, end = _header_dataset(data, force=not has_preamble)
        return _locate_pixel_data(_DicomHeader(ds, data, has_preamble, ts), end, more=partial)
    if partial:  # a deflate stream cut short: judged on the whole file (skip_reason gives None)
        raise EOFError("a deflated data set is judged on the whole file")
    prefix = _explicit_vr_file_start(meta)
    for limit in _HEADER_INFLATE_STEPS:  # most headers fit in the first step
        head, more = _inflate(memoryview(data)[dataset_start:], limit)
        parsed = prefix + head
        ds, end = _header_dataset(parsed, force=False)
        header = _DicomHeader(ds, parsed, True, ts, deflate_start=dataset_start, meta_bytes=len(prefix))
        header = _locate_pixel_data(header, end, more=more)
        if not header.incomplete:
            break
    return header


def _header_dataset(data: bytes, *, force: bool) -> tuple[FileDataset, int]:
    """The data set up to, not including, the pixel data (large values deferred, not read), and where it ends.

    The end is where dcmread stopped: the pixel data element's tag, or the end of the data set.
    """
    import pydicom

    fp = io.BytesIO(data)
    ds = pydicom.dcmread(fp, stop_before_pixels=True, defer_size=_DEFER_BYTES, force=force)
    # touch the elements every caller uses, so a corrupt header fails here
    _ = ds.get("SOPClassUID"), ds.get("PhotometricInterpretation"), ds.get("Modality")
    return ds, fp.tell()


def _locate_pixel_data(header: _DicomHeader, pos: int, *, more: bool = False) -> _DicomHeader:
    """Find the pixel data element at ``pos`` in ``header.data`` (where the header ends) without reading its value.

    ``more``: the data is the start of an inflated data set that goes on; not finding the pixel data then
    means the header is incomplete.
    """
    from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

    data, (is_implicit, is_little) = header.data, header.ds.original_encoding
    if pos + 8 > len(data):
        return replace(header, incomplete=more)
    order: Literal["little", "big"] = "little" if is_little is not False else "big"
    tag = int.from_bytes(data[pos : pos + 2], order) << 16 | int.from_bytes(data[pos + 2 : pos + 4], order)
    keyword = _PIXEL_TAGS.get(tag)
    if keyword is None:
        return replace(header, incomplete=more)
    vr = data[pos + 4 : pos + 6]
    if is_implicit or not b"AA" <= vr <= b"ZZ":  # an element written implicit in an explicit file: as pydicom
        length_at, value_at = pos + 4, pos + 8
    elif vr.decode("latin-1") in EXPLICIT_VR_LENGTH_32:
        length_at, value_at = pos + 8, pos + 12
    else:
        length_at, value_at = pos + 6, pos + 8
    if value_at > len(data):
        if more:
            return replace(header, incomplete=True)
        raise EOFError("the file ends inside the pixel data element's header")
    length = int.from_bytes(data[length_at:value_at], order)
    return replace(header, pixel_keyword=keyword, pixel_offset=value_at, pixel_length=length)


def _file_meta(data: bytes) -> tuple[Dataset | None, int]:
    """The File Meta Information group (None when it cannot be read) and the offset of the data set after it."""
    from pydicom.filereader import read_dataset, read_preamble

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, True)
        meta = read_dataset(fp, False, True, stop_when=lambda tag, vr, length: tag >> 16 != 2)
    except _parse_errors():
        return None, 0  # dcmread will say what is wrong
    return meta, fp.tell()


def _inflate(stream: bytes | memoryview, limit: int) -> tuple[bytes, bool]:
    """Inflate a raw deflate stream, never past ``limit`` bytes: (the bytes, whether more would follow)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = inflater.decompress(stream, limit)
    more = len(out) == limit and not inflater.eof and bool(inflater.decompress(inflater.unconsumed_tail, 1))
    return out, more


def _explicit_vr_file_start(meta: Dataset) -> bytes:
    """Preamble, 'DICM' and ``meta`` with the transfer syntax set to Explicit VR Little Endian (inflated)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    rewritten = FileMetaDataset(meta)
    rewritten.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, rewritten, enforce_standard=False)  # type: ignore[arg-type]
    return buf.getvalue()


def _geometry(ds: Dataset) -> tuple[int, int, int, int]:
    """Rows, Columns, SamplesPerPixel and NumberOfFrames of a header (absent: 0, 0, 1, 1)."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    return rows, cols, max(int(ds.get("SamplesPerPixel", 1) or 1), 1), max(int(ds.get("NumberOfFrames", 1) or 1), 1)


def _sop_name(ds: Dataset) -> str:
    """The SOP class's name (its UID when not a standard one)."""
    from pydicom.uid import UID

    sop = str(ds.get("SOPClassUID", "") or "").strip()
    return f"SOP class {UID(sop).name}" if sop else "no SOP class"


# --- DICOM: skipped by design ----------------------------------------------------------------------
def skip_reason(data: bytes, *, name: str = "", modalities: tuple[str, ...], partial: bool = False) -> Skip | None:
    """Judge from the header alone whether a DICOM object is left out by design; its pixels are never read.

    Non-DICOM data, a header that cannot be parsed and an object to decode all give ``None``: :func:`decode`
    judges them. A DICOM whose SOP class is an image storage class but which has no pixel data is broken,
    not a non-image object: ``None`` too (decode quarantines it as ``NoPixelDataError``).

    A missing Modality (Type 1, yet absent from some exports) is taken from the SOP class when that implies
    one (CR, DX, MG and intra-oral X-ray storage); otherwise the object is admitted only when
    ``modalities`` holds ``"NONE"`` (:data:`MISSING_MODALITY`, e.g. ``CXR_MODALITIES=CR,DX,RG,NONE``).

    Args:
        data: the file's bytes.
        name: the file name or URI (used only to recognise DICOM files without a preamble).
        modalities: the allowlist (``Settings.modalities``), upper case, e.g. ``("CR", "DX", "RG")``.
        partial: ``data`` is only the start of the file: a verdict is given only when the header is whole
            in it (its pixel data element found); otherwise ``None`` (judge the whole file then).

    Returns:
        A :class:`Skip` with reason ``NoPixelData`` (SR, PR, KO, RT plan, ...), ``ModalityNotAllowed`` or
        ``MultiFrame`` (NumberOfFrames > 1), or ``None``.
    """
    try:
        if sniff_format(data, name) != "dicom":
            return None
    except InputError:
        return None
    try:
        header = _read_header(data, partial=partial)
        frames = _geometry(header.ds)[3]
    except _parse_errors():
        return None
    ds = header.ds
    if header.incomplete or (not header.has_preamble and "SOPClassUID" not in ds and header.pixel_keyword is None):
        return None  # decode() refuses it with the reason
    recorded = str(ds.get("Modality", "") or "").strip().upper()[:16]
    sop = str(ds.get("SOPClassUID", "") or "").strip()
    modality = recorded or _SOP_CLASS_MODALITY.get(sop, MISSING_MODALITY)
    what = f"{_sop_name(ds)}, modality {recorded or '(missing)'}"
    if header.pixel_keyword is None:
        if "Image Storage" in _sop_name(ds):
            return None  # an image without its pixels: truncated or broken, decode() quarantines it
        return Skip(
            "NoPixelData",
            _redact(
                f"DICOM object without pixel data ({what}): a report, presentation state, key object selection, "
                "RT plan or similar holds no image for a model; nothing to decode",
                ds,
            ),
        )
    if modality not in modalities:
        allowlist = ", ".join(modalities)
        if recorded:
            why = f"modality {recorded} ({_sop_name(ds)}) is not in the allowlist {allowlist}"
        elif modality != MISSING_MODALITY:
            why = (
                f"without a Modality element ({_sop_name(ds)}, which implies {modality}): {modality} is not in "
                f"the allowlist {allowlist}"
            )
        else:
            why = f"without a Modality element ({_sop_name(ds)}, which implies none): not in the allowlist {allowlist}"
        return Skip(
            "ModalityNotAllowed",
            _redact(
                f"DICOM {why}; skipped without reading its pixels; to include it add {modality} to CXR_MODALITIES "
                "(then `cxr requeue --skipped --error-class ModalityNotAllowed` for files already skipped)",
                ds,
            ),
        )
    if frames > 1:
        return Skip(
            "MultiFrame",
            _redact(
                f"multi-frame DICOM ({frames} frames; {what}) is not a single radiograph: skipped without reading "
                "its pixels; to include it, split it into single-frame files",
                ds,
            ),
        )
    return None


# --- DICOM: decoded --------------------------------------------------------------------------------
def decode_dicom(data: bytes, *, max_pixels: int, pseudonym_key: str) -> DecodedImage:
    """Decode a DICOM file through pydicom and its pixel-data plugins, as xrv's ``read_xray_dcm``.

    Everything that bounds the work is checked from the header before pixel data is read or decoded:
    Rows x Columns x SamplesPerPixel x NumberOfFrames against ``max_pixels``, a compressed frame's
    codestream size against Rows/Columns, and a deflated data set is inflated with a cap derived from
    the header. Objects :func:`skip_reason` leaves out (no pixel data, multi-frame) are refused here too.
    """
    import pydicom

    header = _parse_header(data)
    ds = header.ds
    if header.incomplete:
        raise ImageTooLargeError(
            f"the deflated DICOM data set inflates to more than {_HEADER_INFLATE_STEPS[-1] >> 20} MiB before its pixel "
            "data: refused as a possible deflate bomb; re-encode it uncompressed (e.g. Explicit VR Little Endian)"
        )
    if header.pixel_keyword is None:
        raise NoPixelDataError(
            _redact(
                f"DICOM without pixel data ({_sop_name(ds)}, e.g. a report or presentation state): "
                "nothing to feed a model",
                ds,
            )
        )
    if header.pixel_keyword != "PixelData":
        raise UnsupportedImageError(
            f"DICOM with {header.pixel_keyword} (floating-point pixels, e.g. a parametric map) is not a radiograph: "
            "only integer Pixel Data is supported"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    try:
        rows, cols, samples, frames = _geometry(ds)
        bits_allocated = int(ds.get("BitsAllocated", 16) or 16)
        bits_stored = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 0) or 0)
    except _parse_errors() as exc:
        raise DecodeError(f"corrupt DICOM: an image pixel element is not a number ({type(exc).__name__})") from exc
    check_pixels(cols, rows, frames, max_pixels, samples=samples)
    if photometric not in DICOM_MONO + DICOM_COLOUR:
        raise UnsupportedImageError(
            _redact(
                f"photometric interpretation {photometric[:16] or '(missing)'} is not supported "
                f"(supported: {', '.join(DICOM_MONO + DICOM_COLOUR)})",
                ds,
            )
        )
    if frames > 1:
        raise UnsupportedImageError(
            f"multi-frame DICOM ({frames} frames) is not a single radiograph: split the frames first"
        )
    if not 1 <= bits_stored <= 16:
        raise UnsupportedImageError(f"BitsStored={bits_stored} is not supported (expected 1..16)")
    pixel_bytes = (rows * cols * samples * frames * min(max(bits_allocated, 1), 64) + 7) // 8
    full = header.data if header.deflate_start < 0 else _inflate_all(data, header, pixel_bytes)
    if header.pixel_length == _UNDEFINED_LENGTH:
        _check_codestream(header, rows=rows, cols=cols, samples=samples, max_pixels=max_pixels)
    elif len(full) - header.pixel_offset < min(header.pixel_length, pixel_bytes):
        raise DecodeError(
            f"truncated DICOM: the file holds {max(len(full) - header.pixel_offset, 0)} bytes of pixel data, "
            f"{cols}x{rows} pixels need {pixel_bytes}: re-copy or re-export it"
        )
    try:
        ds = pydicom.dcmread(io.BytesIO(full), force=not header.has_preamble)
    except _parse_errors() as exc:
        # the exception text may quote element values (patient data): only its type is kept
        raise DecodeError(f"corrupt DICOM: the data set cannot be parsed ({type(exc).__name__})") from exc
    ts = header.transfer_syntax or "unknown"
    try:
        arr = ds.pixel_array
    except (
        ValueError,
        RuntimeError,
        NotImplementedError,
        AttributeError,
        KeyError,
        TypeError,
        OSError,
        EOFError,
    ) as exc:
        raise DecodeError(_redact(f"DICOM pixel data cannot be decoded (transfer syntax {ts}): {exc}", ds)) from exc
    if arr.ndim == 3:
        if photometric in DICOM_COLOUR and arr.shape[-1] == 3:
            arr = arr[:, :, 0]  # pydicom returns RGB: keep red, as xrv's load_image does for colour
        else:
            raise UnsupportedImageError(f"unexpected pixel array shape {arr.shape} for {photometric}")
    maxval = 2**bits_stored - 1
    if arr.size and arr.min() < 0:
        raise PixelRangeError(
            f"signed pixel data with negative values (min {arr.min()}): xrv's normalisation "
            "expects 0..2**BitsStored-1; re-export as unsigned"
        )
    if arr.size and arr.max() > maxval:
        raise PixelRangeError(
            f"max pixel value {arr.max()} is above 2**BitsStored-1 = {maxval}: the header's BitsStored "
            "is wrong for this data"
        )
    if photometric == "MONOCHROME1":
        arr = maxval - arr  # exactly xrv's read_xray_dcm: max_possible_pixel_val - data
    try:
        patient_id = str(ds.get("PatientID", "") or "").strip()
        institution = str(ds.get("InstitutionName", "") or "").strip().upper()
        meta: dict[str, str | None] = {
            "study_uid": _str_or_none(ds.get("StudyInstanceUID")),
            "series_uid": _str_or_none(ds.get("SeriesInstanceUID")),
            "sop_uid": _str_or_none(ds.get("SOPInstanceUID")),
            "modality": _str_or_none(ds.get("Modality")),
            "view_position": _str_or_none(ds.get("ViewPosition")),
            "manufacturer": _str_or_none(ds.get("Manufacturer")),
            # the site as a keyed pseudonym (InstitutionName is an identifier); "site:" keeps it apart
            # from patient pseudonyms made with the same key
            "site_pseudonym": pseudonymize(f"site:{institution}", pseudonym_key) if institution else None,
            "patient_pseudonym": pseudonymize(patient_id, pseudonym_key) if patient_id else None,
            "transfer_syntax": _str_or_none(header.transfer_syntax),
        }
    except _parse_errors() as exc:
        raise DecodeError(f"corrupt DICOM: an identifying element cannot be read ({type(exc).__name__})") from exc
    return DecodedImage(
        pixels=arr,
        maxval=maxval,
        source_format="dicom",
        width=cols,
        height=rows,
        bits_stored=bits_stored,
        photometric=photometric,
        dicom=meta,
    )


def _parse_header(data: bytes) -> _DicomHeader:
    """:func:`_read_header`, with a header that cannot be parsed refused as the user needs to hear it."""
    try:
        header = _read_header(data)
    except zlib.error as exc:
        raise DecodeError(f"corrupt deflated DICOM: the data set cannot be inflated ({exc})") from exc
    except _parse_errors() as exc:
        # the exception text may quote element values (patient data): only its type is kept
        raise DecodeError(f"corrupt DICOM: the header cannot be parsed ({type(exc).__name__})") from exc
    if not header.has_preamble and "SOPClassUID" not in header.ds and header.pixel_keyword is None:
        raise UnsupportedFormatError(
            "not a DICOM file: no 'DICM' signature and no recognisable DICOM elements "
            "(check the file; it may be another format named .dcm)"
        )
    return header


def _inflate_all(data: bytes, header: _DicomHeader, pixel_bytes: int) -> bytes:
    """The deflated file rewritten as Explicit VR Little Endian, inflated no further than its header allows."""
    limit = (header.pixel_offset - header.meta_bytes) + pixel_bytes + _TRAILER_BYTES
    try:
        inflated, more = _inflate(memoryview(data)[header.deflate_start :], limit)
    except zlib.error as exc:
        raise DecodeError(f"corrupt deflated DICOM: the data set cannot be inflated ({exc})") from exc
    if more:
        raise ImageTooLargeError(
            f"the deflated DICOM data set inflates to more than {limit} bytes although its header declares "
            f"{pixel_bytes} bytes of pixel data: refused as a deflate bomb or a corrupt file"
        )
    return header.data[: header.meta_bytes] + inflated


def _check_codestream(header: _DicomHeader, *, rows: int, cols: int, samples: int, max_pixels: int) -> None:
    """Refuse a compressed frame whose codestream declares a larger image than the header (before decoding).

    Decoders allocate what the codestream declares, not what Rows and Columns say.
    """
    from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

    ts = header.transfer_syntax
    if ts in JPEGTransferSyntaxes or ts in JPEGLSTransferSyntaxes:
        kind, size = ("JPEG-LS" if ts in JPEGLSTransferSyntaxes else "JPEG"), _jpeg_size
    elif ts in JPEG2000TransferSyntaxes:
        kind, size = "JPEG 2000", _j2k_size
    else:
        return  # RLE decodes to Rows x Columns by construction; other syntaxes have no decoder here
    declared = size(_first_frame_start(header.data, header.pixel_offset))
    if declared is None:
        raise DecodeError(
            f"corrupt {kind} pixel data: no frame header in the first fragment's codestream; re-export the image"
        )
    width, height, components = declared
    if width == 0 or height == 0:
        raise CodestreamMismatchError(
            f"the {kind} codestream declares a {width}x{height} image (its size deferred to a later marker), "
            "which is not supported: re-export the image"
        )
    check_pixels(width, height, 1, max_pixels, samples=components, what=f"the {kind} codestream")
    if width > cols or height > rows or components > samples:
        raise CodestreamMismatchError(
            f"the {kind} codestream declares {width}x{height} with {components} component(s), more than the "
            f"header's Columns x Rows = {cols}x{rows} with SamplesPerPixel {samples}: refused before decoding "
            "(a corrupt or crafted file); re-export the image"
        )


def _first_frame_start(data: bytes, value_offset: int) -> bytes:
    """The start of the first frame's codestream: the fragments after the Basic Offset Table item."""
    parts: list[bytes] = []
    total, pos, first = 0, value_offset, True
    while pos + 8 <= len(data) and total < _CODESTREAM_HEAD_BYTES and data[pos : pos + 4] == _ITEM_TAG:
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        pos += 8
        if not first:  # the first item is the Basic Offset Table
            parts.append(data[pos : pos + min(length, _CODESTREAM_HEAD_BYTES - total)])
            total += len(parts[-1])
        first = False
        pos += length
    return b"".join(parts)


def _jpeg_size(cs: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) of a JPEG or JPEG-LS codestream's first frame header (SOFn, DHP, SOF55)."""
    if cs[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(cs):
        if cs[pos] != 0xFF:
            return None
        marker = cs[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _JPEG_STANDALONE:
            pos += 2
        elif marker in (0xD9, 0xDA):  # EOI or scan data before any frame header
            return None
        elif marker in _JPEG_SOF:
            if pos + 10 > len(cs):
                return None
            height, width = struct.unpack(">HH", cs[pos + 5 : pos + 9])
            return width, height, cs[pos + 9]
        else:
            pos += 2 + int.from_bytes(cs[pos + 2 : pos + 4], "big")
    return None


def _j2k_size(cs: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG 2000 SIZ marker, in a raw codestream or a JP2 file's jp2c box."""
    if cs[:4] == b"\xff\x4f\xff\x51":  # SOC, then SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz YTOsiz Csiz
        if len(cs) < 42:
            return None
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", cs[8:24])
        return max(xsiz - xosiz, 0), max(ysiz - yosiz, 0), int.from_bytes(cs[40:42], "big")
    if cs[4:8] != b"jP  ":
        return None
    pos = 0
    while pos + 8 <= len(cs):  # JP2 boxes: LBox TBox [XLBox]
        length, box = int.from_bytes(cs[pos : pos + 4], "big"), cs[pos + 4 : pos + 8]
        head = 8
        if length == 1:
            length, head = int.from_bytes(cs[pos + 8 : pos + 16], "big"), 16
        if box == b"jp2c":
            return _j2k_size(cs[pos + head :])
        if length < head:
            return None
        pos += length
    return None


#: direct identifiers that must never reach a table, a log or a report, even inside an error message
_IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "PatientAddress",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
)


def _redact(message: str, ds: object) -> str:
    """Remove the values of direct identifiers from a message built from a file's contents."""
    for keyword in _IDENTIFYING_KEYWORDS:
        try:
            value = str(getattr(ds, keyword, "") or "").strip()
        except _parse_errors():  # a malformed value, or a deferred one that cannot be re-read
            continue
        if len(value) >= 3:
            message = message.replace(value, "[redacted]")
    return message


def _str_or_none(value: object) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None
