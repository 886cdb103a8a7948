"""Which samples the batched GPU decoder takes, from the header alone (PIL only: no torch import).

Shard readers run this for every sample; keeping torch out of this module lets
them start reading at once instead of after a multi-second torch import.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from dedup import decode

# nvJPEG decodes a whole image at full size: beyond 16 MP the CPU's DCT-domain downscale (PIL draft) is cheaper.
DEFAULT_MAX_GPU_PIXELS = 4096 * 4096
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"


def gpu_route(
    data: bytes | None,
    max_pixels: int = decode.DEFAULT_MAX_PIXELS,
    min_side: int = decode.DEFAULT_MIN_SIDE,
    max_gpu_pixels: int = DEFAULT_MAX_GPU_PIXELS,
) -> tuple[int, int] | None:
    """(height, width) where the GPU decoder can take these bytes, else None (the CPU decoder decides)."""
    if not data or not data.startswith(_JPEG_START) or not _ends_with_eoi(data):
        return None
    header = _header(data)
    if header is None:
        return None
    width, height = header
    if width * height > min(max_pixels, max_gpu_pixels) or min(width, height) < min_side:
        return None
    return height, width


def _ends_with_eoi(data: bytes) -> bool:
    # A JPEG cut short has no end marker: the CPU decoder records it as truncated, as the CPU path does.
    return data[-64:].rstrip(b"\x00").endswith(_JPEG_END)


def _header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a plain baseline RGB/gray JPEG with no rotation; None for anything else."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                plain = image.format == "JPEG" and image.mode in ("RGB", "L") and not image.info.get("progressive")
                if not plain or decode._exif_orientation(image) != 1:
                    return None
                return image.size
    except Exception:  # noqa: BLE001 - an unreadable header is the CPU decoder's to report
        return None
