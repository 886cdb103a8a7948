"""Cheap per-image quality signals, measured in the decode workers from the already-decoded image.

`colourfulness` is Hasler and Suesstrunk's metric (2003): sqrt(sd(rg)^2 + sd(yb)^2)
+ 0.3 * sqrt(mean(rg)^2 + mean(yb)^2) with rg = R - G and yb = (R + G) / 2 - B,
on a box-reduced copy (long side <= 64 px, so it costs microseconds). A grayscale
image scores 0; JPEG chroma noise on a black-and-white photo stays below
GRAYSCALE_MAX; their scale calls ~15 "slightly colourful" and ~33 "moderately".
`--keep best` uses it to keep a colour copy over a grayscale one.

`content_fraction` is the share of the image inside letterbox / pillarbox / padding bars
(the perceptual descriptor's `content_box`, on a copy reduced to a long side <= 256 px):
a padded copy's bars are not resolution, so `--keep best` counts content pixels.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

ANALYSIS_SIDE = 64
BARS_SIDE = 256
# Below this an image counts as grayscale (tinted B&W and JPEG chroma noise included).
GRAYSCALE_MAX = 4.0


def colourfulness(image: Image.Image) -> float:
    """Hasler-Suesstrunk colourfulness of an RGB image (0 for grayscale)."""
    factor = max(image.size) // ANALYSIS_SIDE
    small = image.reduce(factor) if factor >= 2 else image
    pixels = np.asarray(small.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    rg = pixels[:, 0] - pixels[:, 1]
    yb = 0.5 * (pixels[:, 0] + pixels[:, 1]) - pixels[:, 2]
    spread = np.sqrt(rg.std() ** 2 + yb.std() ** 2)
    cast = np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return round(float(spread + 0.3 * cast), 3)


def content_fraction(image: Image.Image) -> float:
    """Share of the image's area inside letterbox/padding bars (1.0 when it has none)."""
    from dedup.descriptors.perceptual import content_box

    factor = max(image.size) // BARS_SIDE
    small = image.reduce(factor) if factor >= 2 else image
    left, top, right, bottom = content_box(np.asarray(small.convert("RGB")))
    return round(max(0, right - left) * max(0, bottom - top) / (small.width * small.height), 4)
