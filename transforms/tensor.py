"""Normalise, centre-crop and resize: the exact arithmetic of TorchXRayVision, numpy in, numpy out.

``normalize`` is ``xrv.utils.normalize``; ``center_crop`` is ``xrv.datasets.XRayCenterCrop``;
``resize`` is ``xrv.datasets.XRayResizer`` with ``engine="cv2"`` (``cv2.INTER_AREA``, our default) or
``engine="skimage"`` (xrv's training default: ``skimage.transform.resize``, anti-aliased).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from lakehouse.errors import PixelRangeError
from lakehouse.tables import ResizeEngine, TensorDtype, encode_tensor
from transforms.decode import DecodedImage, decode

#: bump when the produced tensors change for the same input (recorded in every row).
PREPROCESS_VERSION = "1"


@lru_cache(maxsize=32)
def _lut(maxval: int) -> np.ndarray:
    """xrv's normalisation of every possible integer value 0..maxval, computed the same way."""
    return (2 * (np.arange(maxval + 1, dtype=np.float32) / maxval) - 1.0) * 1024


def normalize(img: np.ndarray, maxval: int) -> np.ndarray:
    """Scale to [-1024, 1024] as ``xrv.utils.normalize``: ``(2 * (img / maxval) - 1) * 1024`` in float32.

    Integer images go through a lookup table of that same formula (bit-identical, one pass).

    Raises:
        PixelRangeError: when a value is above ``maxval`` (xrv raises ValueError there).
    """
    top = img.max() if img.size else 0
    if top > maxval:
        raise PixelRangeError(f"max image value ({top}) higher than expected bound ({maxval})")
    if img.dtype in (np.uint8, np.uint16) and maxval <= 65535:
        return _lut(int(maxval))[img]
    return (2 * (img.astype(np.float32) / maxval) - 1.0) * 1024


def center_crop(img: np.ndarray) -> np.ndarray:
    """Centre crop to a square on the long side, exactly ``XRayCenterCrop.crop_center`` on a 2-D image."""
    y, x = img.shape
    crop = min(y, x)
    startx = x // 2 - (crop // 2)
    starty = y // 2 - (crop // 2)
    return img[starty : starty + crop, startx : startx + crop]


def resize(img: np.ndarray, size: int, *, engine: ResizeEngine = "cv2") -> np.ndarray:
    """Resize a square 2-D float32 image to ``(1, size, size)`` as ``XRayResizer(size, engine)``."""
    if engine == "cv2":
        import cv2

        out = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        return out.reshape(1, size, size).astype(np.float32, copy=False)
    if engine == "skimage":
        import warnings

        import skimage.transform

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = skimage.transform.resize(img[None], (1, size, size), mode="constant", preserve_range=True)
        return out.astype(np.float32)
    raise ValueError(f"unknown resize engine {engine!r}: expected 'cv2' or 'skimage'")


def to_tensor(image: DecodedImage, *, size: int = 224, engine: ResizeEngine = "cv2") -> np.ndarray:
    """normalize -> centre crop -> resize: the model input, float32 of shape (1, size, size).

    With the cv2 engine the order is crop -> resize -> normalize: INTER_AREA is a weighted mean whose
    weights sum to 1 (no padding), so it commutes with xrv's affine normalisation; the result equals
    xrv's order within float32 rounding (~1e-4 on the +-1024 scale, tested to 1e-3) while normalising
    50k output pixels instead of every input pixel. skimage pads with zeros, so it keeps xrv's order.
    """
    if engine != "cv2":
        return resize(center_crop(normalize(image.pixels, image.maxval)), size, engine=engine)
    px, maxval = image.pixels, image.maxval
    if not (px.dtype == np.uint8 and maxval >= 255) and not (px.dtype == np.uint16 and maxval >= 65535):
        top = px.max() if px.size else 0
        if top > maxval:
            raise PixelRangeError(f"max image value ({top}) higher than expected bound ({maxval})")
    small = resize(center_crop(px).astype(np.float32), size, engine="cv2")
    return (2 * (small / maxval) - 1.0) * 1024


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that determines a tensor besides the input bytes (stored as JSON in each row)."""

    size: int = 224
    engine: ResizeEngine = "cv2"
    dtype: TensorDtype = "float16"
    max_pixels: int = 64_000_000

    def to_json(self) -> str:
        """The canonical JSON recorded in ``preprocess_params``."""
        return json.dumps(
            {
                "normalize": "xrv.utils.normalize: (2*x/maxval-1)*1024",
                "crop": "xrv.datasets.XRayCenterCrop",
                "resize": f"xrv.datasets.XRayResizer(size={self.size}, engine={self.engine!r})",
                "resize_engine": self.engine,
                "size": self.size,
                "dtype": self.dtype,
                "byte_order": "little",
                "max_pixels": self.max_pixels,
                "versions": _library_versions(),
            },
            sort_keys=True,
        )


@lru_cache(maxsize=1)
def _library_versions() -> dict[str, str]:
    import cv2
    import PIL
    import pydicom

    return {
        "opencv": cv2.__version__,
        "pillow": PIL.__version__,
        "pydicom": pydicom.__version__,
        "numpy": np.__version__,
    }


def preprocess_bytes(data: bytes, *, name: str, params: PreprocessParams, pseudonym_key: str) -> dict[str, Any]:
    """Bytes of one file -> the tensor row fields (without run-level lineage).

    Raises:
        InputError: a subclass naming why this file cannot become a tensor.
    """
    image = decode(data, name=name, max_pixels=params.max_pixels, pseudonym_key=pseudonym_key)
    tensor = to_tensor(image, size=params.size, engine=params.engine)
    stored = tensor.astype(np.float16) if params.dtype == "float16" else tensor
    row: dict[str, Any] = {
        "tensor": encode_tensor(stored, params.dtype),
        "tensor_dtype": params.dtype,
        "tensor_shape": list(tensor.shape),
        "tensor_min": float(stored.min()),
        "tensor_max": float(stored.max()),
        "source_format": image.source_format,
        "width": image.width,
        "height": image.height,
        "bits_stored": image.bits_stored,
        "photometric": image.photometric,
    }
    for key in (
        "study_uid",
        "series_uid",
        "sop_uid",
        "modality",
        "view_position",
        "manufacturer",
        "site_pseudonym",
        "patient_pseudonym",
        "transfer_syntax",
    ):
        row[key] = image.dicom.get(key)
    return row
