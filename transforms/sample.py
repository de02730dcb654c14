"""Synthetic chest-X-ray-like images in every supported encoding, for the demo, tests and benchmarks.

Nothing here is a real patient: the anatomy is drawn from ellipses and sinusoids, and the DICOM
identifiers are made up (they exist so tests can prove none of them reaches a table).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def synthetic_cxr(height: int, width: int, *, seed: int = 0) -> np.ndarray:
    """A chest-radiograph-like float image in [0, 1] (MONOCHROME2: bone bright, lungs dark)."""
    import cv2

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    yn, xn = (y - height / 2) / (height / 2), (x - width / 2) / (width / 2)
    img = np.full((height, width), 0.08, np.float32)
    body = (xn / 0.95) ** 2 + (yn / 1.15) ** 2 < 1
    img[body] = 0.55
    jitter = rng.uniform(-0.05, 0.05, 4)
    for side in (-1, 1):
        cx = side * (0.42 + jitter[0])
        lung = ((xn - cx) / (0.3 + jitter[1])) ** 2 + ((yn + 0.05) / (0.62 + jitter[2])) ** 2 < 1
        img[lung] = 0.22
        ribs = lung & (np.sin((yn * 9 + np.abs(xn - cx) * 2.5) * np.pi) > 0.55)
        img[ribs] += 0.12
    spine = np.abs(xn) < 0.08
    img[spine & body] = 0.8
    heart = ((xn + 0.12) / 0.3) ** 2 + ((yn - 0.25) / 0.28) ** 2 < 1
    img[heart] = np.maximum(img[heart], 0.7)
    img += rng.normal(0, 0.025, img.shape).astype(np.float32)
    k = max(3, (min(height, width) // 64) | 1)
    blurred = cv2.GaussianBlur(img, (k, k), 0)
    return np.clip(blurred, 0, 1)


def to_uint(img: np.ndarray, bits: int) -> np.ndarray:
    """Quantise a [0, 1] image to ``bits`` bits (uint8 up to 8 bits, uint16 above)."""
    maxval = 2**bits - 1
    dtype = np.uint8 if bits <= 8 else np.uint16
    return np.round(img * maxval).astype(dtype)


# --- PNG / JPEG ------------------------------------------------------------------------------------
def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of a uint8/uint16 gray (H, W) or RGB(A) (H, W, 3|4) array (channel order R, G, B)."""
    import cv2

    arr = pixels
    if arr.ndim == 3:
        arr = arr[:, :, [2, 1, 0, 3][: arr.shape[2]]]  # OpenCV writes BGR(A)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def jpeg_bytes(pixels: np.ndarray, *, quality: int = 92) -> bytes:
    """Baseline JPEG of a uint8 gray or RGB array (Pillow)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


# --- DICOM -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Identity:
    """Made-up direct identifiers written into synthetic DICOMs (they must never reach a table)."""

    patient_name: str = "SYNTHETIC^PATIENT"
    patient_id: str = "SYN-000001"
    birth_date: str = "19700101"


def dicom_bytes(
    pixels: np.ndarray,
    *,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = "1.2.840.10008.1.2.1",
    identity: Identity = Identity(),
    view_position: str = "PA",
    seed: int = 0,
    with_pixels: bool = True,
) -> bytes:
    """A DX DICOM file (Part 10) of a gray (H, W) or RGB (H, W, 3) array, encoded as asked.

    ``transfer_syntax``: explicit little endian, RLE, JPEG 2000 lossless (pydicom encoders), or JPEG
    baseline (.50), extended 12-bit (.51), lossless SV1 (.70) (encoded with imagecodecs).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    ts = UID(transfer_syntax)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"sop-{seed}"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"study-{seed // 2}"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"series-{seed}"])
    ds.PatientName = identity.patient_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth_date
    ds.PatientSex = "O"
    ds.Modality = "DX"
    ds.ViewPosition = view_position
    ds.BodyPartExamined = "CHEST"
    ds.InstitutionName = ("SYNTHETIC HOSPITAL", "SYNTHETIC CLINIC")[seed % 2]
    ds.Manufacturer = ("ACME MEDICAL", "GLOBEX IMAGING", "INITECH")[seed % 3]
    if with_pixels:
        rgb = pixels.ndim == 3
        ds.Rows, ds.Columns = pixels.shape[:2]
        ds.SamplesPerPixel = 3 if rgb else 1
        if rgb:
            ds.PlanarConfiguration = 0
        ds.PhotometricInterpretation = "RGB" if rgb and photometric.startswith("YBR") else photometric
        ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        if ts in ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90"):
            ds.compress(ts, generate_instance_uid=False)  # RLE Lossless / JPEG 2000 Lossless with pydicom's encoders
        elif ts in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70"):
            import imagecodecs

            if ts.endswith(".70"):
                frame = imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=bits_stored)
            elif ts.endswith(".51"):
                frame = imagecodecs.jpeg8_encode(pixels, level=92, bitspersample=12)
            elif rgb:
                frame = imagecodecs.jpeg8_encode(pixels, level=92, subsampling="422")
                ds.PhotometricInterpretation = "YBR_FULL_422"
            else:
                frame = imagecodecs.jpeg8_encode(pixels, level=92)
            ds.PixelData = encapsulate([bytes(frame)])
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
            ds.file_meta.TransferSyntaxUID = ts
            if ts.endswith((".50", ".51")):
                ds.LossyImageCompression = "01"
        elif ts != ExplicitVRLittleEndian:
            raise ValueError(f"transfer syntax {ts} not supported by the sample writer")
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --- the catalogue of sample kinds -----------------------------------------------------------------


def _shape(seed: int) -> tuple[int, int]:
    sizes = [(320, 256), (288, 352), (384, 320), (256, 256), (300, 420)]
    return sizes[seed % len(sizes)]


def _gray(seed: int, bits: int) -> np.ndarray:
    h, w = _shape(seed)
    return to_uint(synthetic_cxr(h, w, seed=seed), bits)


def _rgb(seed: int) -> np.ndarray:
    g = _gray(seed, 8)
    return np.stack([g, (g * 0.9).astype(np.uint8), (g * 0.8).astype(np.uint8)], axis=-1)


def _identity(seed: int) -> Identity:
    return Identity(patient_name=f"SYNTHETIC^PATIENT^{seed:04d}", patient_id=f"SYN-{seed:06d}")


def _dcm(seed: int, bits: int, ts: str, photometric: str = "MONOCHROME2", rgb: bool = False) -> bytes:
    px = _rgb(seed) if rgb else _gray(seed, bits)
    if photometric == "MONOCHROME1":
        px = (2**bits - 1 - px).astype(px.dtype)
    view = ("PA", "AP", "LL")[seed % 3]
    return dicom_bytes(
        px,
        bits_stored=bits,
        photometric=photometric,
        transfer_syntax=ts,
        identity=_identity(seed),
        view_position=view,
        seed=seed,
    )


#: name -> (file extension, maker). Every kind decodes to a valid tensor.
VALID_KINDS: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "png8_gray": (".png", lambda s: png_bytes(_gray(s, 8))),
    "png16_gray": (".png", lambda s: png_bytes(_gray(s, 16))),
    "png8_rgb": (".png", lambda s: png_bytes(_rgb(s))),
    "png8_rgba": (".png", lambda s: png_bytes(np.dstack([_rgb(s), np.full(_shape(s), 255, np.uint8)]))),
    "jpeg_gray": (".jpg", lambda s: jpeg_bytes(_gray(s, 8))),
    "jpeg_rgb": (".jpeg", lambda s: jpeg_bytes(_rgb(s))),
    "dcm_mono2_12bit": (".dcm", lambda s: _dcm(s, 12, "1.2.840.10008.1.2.1")),
    "dcm_mono1_10bit": (".dcm", lambda s: _dcm(s, 10, "1.2.840.10008.1.2.1", "MONOCHROME1")),
    "dcm_mono2_8bit": (".dcm", lambda s: _dcm(s, 8, "1.2.840.10008.1.2.1")),
    "dcm_rle_12bit": (".dcm", lambda s: _dcm(s, 12, "1.2.840.10008.1.2.5")),
    "dcm_j2k_12bit": (".dcm", lambda s: _dcm(s, 12, "1.2.840.10008.1.2.4.90")),
    "dcm_jpeg_baseline": (".dcm", lambda s: _dcm(s, 8, "1.2.840.10008.1.2.4.50")),
    "dcm_jpeg_extended_12bit": (".dcm", lambda s: _dcm(s, 12, "1.2.840.10008.1.2.4.51")),
    "dcm_jpeg_lossless_16bit": (".dcm", lambda s: _dcm(s, 16, "1.2.840.10008.1.2.4.70")),
    "dcm_mono1_jpeg_lossless": (".dcm", lambda s: _dcm(s, 12, "1.2.840.10008.1.2.4.70", "MONOCHROME1")),
    "dcm_rgb": (".dcm", lambda s: _dcm(s, 8, "1.2.840.10008.1.2.1", "RGB", rgb=True)),
    "dcm_ybr_jpeg": (".dcm", lambda s: _dcm(s, 8, "1.2.840.10008.1.2.4.50", "YBR_FULL_422", rgb=True)),
}


def _palette_dicom(seed: int) -> bytes:
    raw = dicom_bytes(_gray(seed, 8), bits_stored=8, identity=_identity(seed), seed=seed)
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


#: name -> (file name, maker, expected error_class). Every kind must be quarantined with that class.
INVALID_KINDS: dict[str, tuple[str, Callable[[int], bytes], str]] = {
    "zero_byte": ("empty.png", lambda s: b"", "EmptyFileError"),
    "truncated_png": ("truncated.png", lambda s: png_bytes(_gray(s, 8))[:2000], "DecodeError"),
    "truncated_jpeg": ("truncated.jpg", lambda s: jpeg_bytes(_gray(s, 8))[:1500], "DecodeError"),
    "truncated_dicom": ("truncated.dcm", lambda s: _dcm(s, 12, "1.2.840.10008.1.2.1")[:3000], "DecodeError"),
    "random_png": ("random.png", lambda s: np.random.default_rng(s).bytes(4096), "UnsupportedFormatError"),
    "random_jpg": ("random.jpg", lambda s: np.random.default_rng(s + 1).bytes(4096), "UnsupportedFormatError"),
    "random_dcm": ("random.dcm", lambda s: np.random.default_rng(s + 2).bytes(4096), "UnsupportedFormatError"),
    "dicom_palette": ("palette.dcm", _palette_dicom, "UnsupportedImageError"),
    "too_large_header": ("bomb.png", lambda s: png_header_only(20000, 20000), "ImageTooLargeError"),
}


def _dicom_variant(seed: int, **changes: object) -> bytes:
    """A valid DX sample with header elements changed (and, for ``NumberOfFrames``, that many frames)."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(_dcm(seed, 12, "1.2.840.10008.1.2.1")))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    frames = int(changes.get("NumberOfFrames", 1))  # type: ignore[call-overload]
    if frames > 1:
        ds.PixelData = bytes(ds.PixelData) * frames
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _no_pixels(seed: int, sop_class: str, modality: str) -> bytes:
    """A DICOM object without pixel data (a structured report, a key object selection...)."""
    import pydicom
    from pydicom.uid import UID

    raw = dicom_bytes(np.zeros((1, 1), np.uint8), bits_stored=8, with_pixels=False, identity=_identity(seed), seed=seed)
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.Modality = modality
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def rle_decoder_crash_dicom(seed: int) -> bytes:
    """An RLE Lossless DICOM whose second segment offset points 60 bytes early: pylibjpeg-rle's native
    (Rust) decoder panics on it (``PanicException``, which no ``except Exception`` catches). A real poison
    pill: the supervised decoder turns it into ``DecoderCrash`` for this one file."""
    import struct

    import pydicom
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(io.BytesIO(_dcm(seed, 12, "1.2.840.10008.1.2.5")))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    (offset,) = struct.unpack_from("<I", frame, 8)
    struct.pack_into("<I", frame, 8, offset - 60)
    ds.PixelData = encapsulate([bytes(frame)])
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


#: name -> (file name, maker, expected reason class). Every kind is ``skipped`` (not a failure): objects a
#: PACS export holds that are not single radiographs of an allowed modality.
SKIPPED_KINDS: dict[str, tuple[str, Callable[[int], bytes], str]] = {
    "structured_report": ("sr.dcm", lambda s: _no_pixels(s, "1.2.840.10008.5.1.4.1.1.88.22", "SR"), "NoPixelData"),
    "key_object": ("ko.dcm", lambda s: _no_pixels(s, "1.2.840.10008.5.1.4.1.1.88.59", "KO"), "NoPixelData"),
    "ct_slice": (
        "ct.dcm",
        lambda s: _dicom_variant(s, Modality="CT", SOPClassUID="1.2.840.10008.5.1.4.1.1.2"),
        "ModalityNotAllowed",
    ),
    "multi_frame": ("cine.dcm", lambda s: _dicom_variant(s, NumberOfFrames=3), "MultiFrame"),
}


def write_samples(output: Path, *, count: int = 34, include_invalid: bool = False, seed: int = 0) -> list[Path]:
    """Write ``count`` valid sample images cycling through every kind (and the invalid kinds if asked).

    Args:
        output: the folder to write into (created; files are named by kind and index).
        count: how many valid images.
        include_invalid: also write one file of every invalid kind under ``output/invalid/`` and one of
            every kind skipped by design (reports, CT, multi-frame) under ``output/not_radiographs/``.
        seed: varies the anatomy; the same seed gives the same bytes.

    Returns:
        The paths written.
    """
    output.mkdir(parents=True, exist_ok=True)
    names = list(VALID_KINDS)
    written = []
    for i in range(count):
        kind = names[i % len(names)]
        ext, make = VALID_KINDS[kind]
        sub = output / ("dicom" if ext == ".dcm" else "images")
        sub.mkdir(exist_ok=True)
        p = sub / f"{kind}_{seed + i:05d}{ext}"
        p.write_bytes(make(seed + i))
        written.append(p)
    if include_invalid:
        for folder, kinds in (("invalid", INVALID_KINDS), ("not_radiographs", SKIPPED_KINDS)):
            (output / folder).mkdir(exist_ok=True)
            for kind, (fname, make, _) in kinds.items():
                p = output / folder / f"{kind}_{fname}"
                p.write_bytes(make(seed))
                written.append(p)
    return written
