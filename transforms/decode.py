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

Every failure raises a subclass of :class:`lakehouse.errors.InputError` with a message a user can act on.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from lakehouse.errors import (
    DecodeError,
    EmptyFileError,
    ImageTooLargeError,
    NoPixelDataError,
    PixelRangeError,
    UnsupportedFormatError,
    UnsupportedImageError,
)

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


def check_pixels(width: int, height: int, frames: int, max_pixels: int) -> None:
    """Refuse an image whose header declares more pixels than ``max_pixels`` (before decoding)."""
    if width <= 0 or height <= 0:
        raise DecodeError(f"the header declares an empty image ({width}x{height})")
    total = width * height * max(frames, 1)
    if total > max_pixels:
        raise ImageTooLargeError(
            f"the header declares {width}x{height}"
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


# --- DICOM -----------------------------------------------------------------------------------------
def decode_dicom(data: bytes, *, max_pixels: int, pseudonym_key: str) -> DecodedImage:
    """Decode a DICOM file through pydicom and its pixel-data plugins, as xrv's ``read_xray_dcm``."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
        # Touch the elements used below so a corrupt header fails here, not later.
        _ = ds.get("SOPClassUID"), ds.get("PhotometricInterpretation")
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError, OverflowError) as exc:
        # the exception text may quote element values (patient data): only its type is kept
        raise DecodeError(f"corrupt DICOM: the header cannot be parsed ({type(exc).__name__})") from exc
    if not has_preamble and "SOPClassUID" not in ds and "PixelData" not in ds:
        raise UnsupportedFormatError(
            "not a DICOM file: no 'DICM' signature and no recognisable DICOM elements "
            "(check the file; it may be another format named .dcm)"
        )
    if "PixelData" not in ds:
        sop = ds.get("SOPClassUID", "unknown")
        raise NoPixelDataError(
            f"DICOM without pixel data (SOP Class {sop}, e.g. a report or presentation state): nothing to feed a model"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    check_pixels(cols, rows, frames, max_pixels)
    if photometric not in DICOM_MONO + DICOM_COLOUR:
        raise UnsupportedImageError(
            f"photometric interpretation {photometric or '(missing)'} is not supported "
            f"(supported: {', '.join(DICOM_MONO + DICOM_COLOUR)})"
        )
    if frames > 1:
        raise UnsupportedImageError(
            f"multi-frame DICOM ({frames} frames) is not a single radiograph: split the frames first"
        )
    bits_stored = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 0) or 0)
    if not 1 <= bits_stored <= 16:
        raise UnsupportedImageError(f"BitsStored={bits_stored} is not supported (expected 1..16)")
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
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
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
    patient_id = str(ds.get("PatientID", "") or "").strip()
    meta: dict[str, str | None] = {
        "study_uid": _str_or_none(ds.get("StudyInstanceUID")),
        "series_uid": _str_or_none(ds.get("SeriesInstanceUID")),
        "sop_uid": _str_or_none(ds.get("SOPInstanceUID")),
        "modality": _str_or_none(ds.get("Modality")),
        "view_position": _str_or_none(ds.get("ViewPosition")),
        "patient_pseudonym": pseudonymize(patient_id, pseudonym_key) if patient_id else None,
        "transfer_syntax": _str_or_none(ds.file_meta.get("TransferSyntaxUID")) if hasattr(ds, "file_meta") else None,
    }
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


#: direct identifiers that must never reach a table, a log or a report, even inside an error message
_IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "PatientAddress",
    "AccessionNumber",
)


def _redact(message: str, ds: object) -> str:
    """Remove the values of direct identifiers from a decoder's error message."""
    for keyword in _IDENTIFYING_KEYWORDS:
        value = str(getattr(ds, keyword, "") or "").strip()
        if len(value) >= 3:
            message = message.replace(value, "[redacted]")
    return message


def _str_or_none(value: object) -> str | None:
    if value is None:
        return None
    s = str(value).strip()
    return s or None
