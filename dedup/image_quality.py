"""Cheap per-image quality signals, measured in the decode workers from the already-decoded image.

`colourfulness` is Hasler and Suesstrunk's metric (2003): sqrt(sd(rg)^2 + sd(yb)^2)
+ 0.3 * sqrt(mean(rg)^2 + mean(yb)^2) with rg = R - G and yb = (R + G) / 2 - B,
on a reduced copy (long side 128 px). A grayscale
image scores 0; JPEG chroma noise on a black-and-white photo stays below
GRAYSCALE_MAX; their scale calls ~15 "slightly colourful" and ~33 "moderately".
`--keep best` uses it to keep a colour copy over a grayscale one.

`content_fraction` is the share of the image inside letterbox / pillarbox / padding bars
(the perceptual descriptor's `content_box`, on the same reduced copy):
a padded copy's bars are not resolution, so `--keep best` counts content pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Both signals are read from one nearest-neighbour copy with a long side of ANALYSIS_SIDE: it touches
# only the output pixels (~0.05 ms, where a box reduce of a 512 px photo costs ~0.3 ms of CPU).
ANALYSIS_SIDE = 128
# Below this an image counts as grayscale (tinted B&W and JPEG chroma noise included).
GRAYSCALE_MAX = 4.0


def _reduced(image: Image.Image) -> np.ndarray:
    scale = ANALYSIS_SIDE / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.NEAREST)
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


# A line whose channels each vary by at most this could be a bar (content_box then decides).
BAR_LINE_RANGE = 48
COLOUR_SIDE = 64  # colourfulness is a global statistic: a 64 px grid of the reduced copy is plenty


def _maybe_bars(pixels: np.ndarray) -> bool:
    """Cheap pre-check: bars need uniform lines at both ends of one axis (most photos fail it at once)."""

    def uniform(line: np.ndarray) -> bool:
        return int(np.ptp(line, axis=0).max()) <= BAR_LINE_RANGE

    return (uniform(pixels[0]) and uniform(pixels[-1])) or (uniform(pixels[:, 0]) and uniform(pixels[:, -1]))


def _colourfulness(pixels: np.ndarray) -> float:
    step = max(1, -(-max(pixels.shape[:2]) // COLOUR_SIDE))
    grid = pixels[::step, ::step].astype(np.float32)  # the one copy
    rg = grid[..., 0] - grid[..., 1]
    yb = 0.5 * (grid[..., 0] + grid[..., 1]) - grid[..., 2]
    spread = np.sqrt(rg.var() + yb.var())
    cast = np.hypot(rg.mean(), yb.mean())
    return round(float(spread + 0.3 * cast), 3)


def _content_fraction(pixels: np.ndarray) -> float:
    from dedup.descriptors.perceptual import content_box

    if not _maybe_bars(pixels):
        return 1.0
    left, top, right, bottom = content_box(pixels)
    height, width = pixels.shape[:2]
    return round(max(0, right - left) * max(0, bottom - top) / (width * height), 4)


def quality_signals(image: Image.Image) -> tuple[float, float]:
    """(colourfulness, content_fraction) of a decoded image, from one reduced copy."""
    return quality_signals_of_reduced(_reduced(image))


def quality_signals_of_reduced(pixels: np.ndarray) -> tuple[float, float]:
    """The same signals from the reduced (h, w, 3) uint8 copy itself (the GPU decode path reduces on the device)."""
    return _colourfulness(pixels), _content_fraction(pixels)


def colourfulness(image: Image.Image) -> float:
    """Hasler-Suesstrunk colourfulness of an image (0 for grayscale)."""
    return _colourfulness(_reduced(image))


def content_fraction(image: Image.Image) -> float:
    """Share of the image's area inside letterbox/padding bars (1.0 when it has none)."""
    return _content_fraction(_reduced(image))
