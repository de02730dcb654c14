"""TorchXRayVision's own preprocessing path, the reference our tensors must match."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def xrv_reference(path: Path, *, size: int = 224, engine: str = "cv2") -> np.ndarray:
    """``xrv.utils.load_image`` -> ``XRayCenterCrop`` -> ``XRayResizer(size, engine)`` on one file.

    Where xrv itself refuses an input we accept, the reference applies xrv's own functions to the same
    decoded pixels: 16-bit PNGs (``load_image`` assumes 8 bits) use ``xrv.utils.normalize(img, 65535)``;
    RGB/YBR DICOMs (``read_xray_dcm`` raises NotImplementedError) use ``normalize(rgb[..., 0],
    2**BitsStored - 1)``, the channel ``load_image`` keeps for colour images.
    """
    import pydicom
    import skimage.io
    import torchxrayvision as xrv

    data = path.read_bytes()
    if data[128:132] == b"DICM":
        ds = pydicom.dcmread(path)
        if ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2"):
            img = xrv.utils.load_image(str(path))
        else:
            img = xrv.utils.normalize(ds.pixel_array[..., 0], 2**ds.BitsStored - 1)[None]
    else:
        raw = skimage.io.imread(path)
        if raw.dtype == np.uint8:
            img = xrv.utils.load_image(str(path))
        else:
            img = xrv.utils.normalize(raw, 65535)
            img = (img[:, :, 0] if img.ndim == 3 else img)[None]
    img = xrv.datasets.XRayCenterCrop()(img)
    return xrv.datasets.XRayResizer(size, engine=engine)(img)
