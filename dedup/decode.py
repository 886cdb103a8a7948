"""Turn untrusted image bytes into an RGB image, or a recorded failure.

Every failure maps to one status kind so the samples table can be grouped by
reason; nothing here raises anything but `DecodeFailure`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

OK = "ok"
EMPTY = "empty"
TRUNCATED = "truncated"
DECODE_ERROR = "decode_error"
TOO_SMALL = "too_small"
TOO_LARGE = "too_large"
MISSING_IMAGE = "missing_image"
SHARD_ERROR = "shard_error"

STATUSES = (OK, EMPTY, TRUNCATED, DECODE_ERROR, TOO_SMALL, TOO_LARGE, MISSING_IMAGE, SHARD_ERROR)

# Decompression-bomb guard: a 30 KB PNG can claim 50,000 x 50,000 pixels.
# We read the header (size, mode, bit depth) first and refuse before any pixel
# is decoded. The limit is Pillow's own default (Image.MAX_IMAGE_PIXELS,
# 89,478,485 pixels: about 9,460 x 9,460), stated here so it cannot drift.
DEFAULT_MAX_PIXELS = 89_478_485
# More than 8 bits a sample (16-bit PNG/TIFF, 32-bit int or float) costs several
# times an 8-bit image to unpack and rescale, so such pixels count this many
# times: a 173 KB 16-bit 10,000 x 8,900 PNG (89 MP) is refused instead of
# costing 19 s and 3.4 GB; 16-bit images up to 22 MP still decode.
HIGH_DEPTH_COST = 4
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# Below this, no descriptor can say anything useful (1x1 tracking pixels).
DEFAULT_MIN_SIDE = 8


class DecodeFailure(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, maybe DCT-downscaled
    width: int  # full-resolution size after orientation
    height: int
    format: str | None


def decode_image(
    data: bytes,
    target_side: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> DecodedImage:
    """Decode `data`; JPEGs are downscaled in the DCT domain to >= `target_side`."""
    if not data:
        raise DecodeFailure(EMPTY, "image file is empty (0 bytes)")
    image = _open(data)
    width, height = image.size
    _check_size(width, height, max_pixels // _pixel_cost(image), min_side)
    if target_side and image.format == "JPEG":
        # draft() picks a 1/2, 1/4 or 1/8 IDCT scale that keeps both sides >= the request.
        image.draft("RGB", (target_side, target_side))
    _load(image)
    fmt = image.format
    orientation = _exif_orientation(image)
    if orientation in _AXIS_SWAPPING_ORIENTATIONS:
        width, height = height, width
    if orientation in _TRANSPOSING_ORIENTATIONS:
        # Only then: for every other value exif_transpose returns a copy of the pixels (~0.15 ms a photo).
        image = _apply_orientation(image)
    return DecodedImage(to_rgb(image), width, height, fmt)


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own limit (_check_size) decides; Pillow's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:16]
        kind = "text" if _looks_like_text(head) else "unknown bytes"
        raise DecodeFailure(DECODE_ERROR, f"not an image ({kind}, {len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeFailure(TOO_LARGE, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any parser error is the sample's, not ours
        raise DecodeFailure(DECODE_ERROR, f"{type(exc).__name__}: {exc}") from None


def _pixel_cost(image: Image.Image) -> int:
    """HIGH_DEPTH_COST for images with more than 8 bits a sample (from the header only), else 1."""
    rawmodes = [tile[3] if isinstance(tile[3], str) else (tile[3] or ("",))[0] for tile in getattr(image, "tile", [])]
    deep = image.mode in _HIGH_DEPTH_MODES or any(";16" in str(raw) or ";32" in str(raw) for raw in rawmodes)
    return HIGH_DEPTH_COST if deep else 1


def _check_size(width: int, height: int, max_pixels: int, min_side: int) -> None:
    if width * height > max_pixels:
        raise DecodeFailure(
            TOO_LARGE, f"{width}x{height} exceeds the {max_pixels:,}-pixel decompression-bomb limit for this bit depth"
        )
    if min(width, height) < min_side:
        raise DecodeFailure(TOO_SMALL, f"{width}x{height} is below the {min_side}px minimum side")


def _load(image: Image.Image) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except OSError as exc:
        text = str(exc).lower()
        status = TRUNCATED if ("truncat" in text or "premature" in text) else DECODE_ERROR
        raise DecodeFailure(status, f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001
        raise DecodeFailure(DECODE_ERROR, f"{type(exc).__name__}: {exc}") from None


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the pixels
        return image


_AXIS_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF values that rotate by 90 or 270 degrees
_TRANSPOSING_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)  # EXIF values exif_transpose acts on (1 = upright)


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF counts as "no rotation"
        return 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; alpha is composited on white, high bit depths rescaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return _high_depth_to_rgb(image)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I;16"):
        # The high byte: no float copy of the image (16-bit images are the large ones).
        gray = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    pixels = np.asarray(image, dtype=np.float32)
    low, high = np.nanpercentile(pixels, [0.5, 99.5]) if pixels.size else (0.0, 1.0)
    scaled = (pixels - low) / max(float(high - low), 1e-9) * 255.0
    gray = np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _looks_like_text(head: bytes) -> bool:
    return all(32 <= b < 127 or b in (9, 10, 13) for b in head) and len(head) > 0
