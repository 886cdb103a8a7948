"""Synthetic LAION-like shards with planted duplicates, built from real photos.

Everything here is deterministic: one seeded `random.Random` drives every choice,
and tars are written with fixed metadata, so a seed names an exact dataset.

Copies are made by small named transforms in two families:

* `BENIGN` - what the web does to a picture on its way to another page (resize,
  re-encode, small crop, letterbox, watermark, colour tweak, ...). A deduplicator
  should merge these.
* `HARD` - edits that keep the picture but move pixels a lot (flips, 90-degree
  rotations, large crops, grayscale, meme text bands, combinations). Still the
  same picture; recall on them is reported separately.

Sources are real photos (the package ships 27 under `dedup/demo_images/`). A
LAION-like set needs far more distinct pictures than that, so extra singleton
sources are real-photo-derived: random crops of 20-40% of a photo's area,
spread over different regions of it and resized. They are real image content
(never noise), but crops of one photo can overlap, so the truth table records
each sample's `parent` photo, `crop_box`, and `crop_sibling_iou` (the largest
overlap with another crop of the same photo) for evaluators that want to set
those pairs aside.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from dedup.errors import DedupError
from dedup.records import IMG2DATASET_PARQUET

Transform = Callable[[Image.Image, random.Random], Image.Image]

# Transforms never shrink a copy below this side: tiny images are planted on
# purpose as bad samples, and must not appear by accident among the copies.
MIN_SIDE = 32
# Every clean sample is stored as a JPEG at this quality unless its last
# transform chose another format (webp / png re-encodes are stored as such).
STORE_JPEG_QUALITY = 90
STORE_WEBP_QUALITY = 90
# zlib level 1: ~10x faster than the default 6 and still lossless; size is not the point here.
PNG_COMPRESS_LEVEL = 1
# Fixed tar metadata so that two runs with one seed give identical bytes.
TAR_MTIME = 1_600_000_000

BENIGN_FAMILY = "benign"
HARD_FAMILY = "hard"
FAMILIES = ("original", BENIGN_FAMILY, HARD_FAMILY, "hard_negative", "bad")


# --------------------------------------------------------------------------
# Small helpers shared by the transforms
# --------------------------------------------------------------------------


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _scaled(image: Image.Image, factor: float) -> Image.Image:
    width, height = image.size
    factor = max(factor, MIN_SIDE / min(width, height))
    size = (max(MIN_SIDE, round(width * factor)), max(MIN_SIDE, round(height * factor)))
    return image.resize(size, Image.Resampling.BICUBIC)


def _round_trip(image: Image.Image, fmt: str, **params: object) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return decoded.convert("RGB")  # convert() loads a copy before the file closes


def _random_crop(image: Image.Image, keep_w: float, keep_h: float, rng: random.Random) -> Image.Image:
    width, height = image.size
    crop_w = min(width, max(MIN_SIDE, round(width * keep_w)))
    crop_h = min(height, max(MIN_SIDE, round(height * keep_h)))
    left = rng.randint(0, width - crop_w)
    top = rng.randint(0, height - crop_h)
    return image.crop((left, top, left + crop_w, top + crop_h))


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, size))


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _fit_font(draw: ImageDraw.ImageDraw, text: str, size: int, max_width: int) -> ImageFont.ImageFont:
    """Largest default font <= `size` whose rendering of `text` fits `max_width`."""
    font = _font(size)
    while size > 8 and _text_width(draw, text, font) > max_width:
        size = int(size * 0.85)
        font = _font(size)
    return font


def _inner_rotated_rect(width: int, height: int, angle_degrees: float) -> tuple[float, float]:
    """Largest axis-aligned rectangle inside a width x height rectangle rotated by the angle."""
    angle = math.radians(abs(angle_degrees))
    sin_a, cos_a = math.sin(angle), math.cos(angle)
    long_side, short_side = max(width, height), min(width, height)
    if short_side <= 2.0 * sin_a * cos_a * long_side:
        half = 0.5 * short_side
        return (half / sin_a, half / cos_a) if width >= height else (half / cos_a, half / sin_a)
    cos_2a = cos_a * cos_a - sin_a * sin_a
    return (width * cos_a - height * sin_a) / cos_2a, (height * cos_a - width * sin_a) / cos_2a


# --------------------------------------------------------------------------
# BENIGN transforms
# --------------------------------------------------------------------------

WATERMARK_TEXTS = (
    "© photostock",
    "SAMPLE",
    "www.pinspire.example",
    "shared via imgshare",
    "Copyright 2016",
    "@travel.daily",
)
ON_IMAGE_CAPTIONS = (
    "Photo: staff photographer",
    "Click to enlarge",
    "Image courtesy of the archive",
    "Summer 2015",
    "View more at photostock.example",
)


def exact(image: Image.Image, rng: random.Random) -> Image.Image:
    """A byte-for-byte re-upload: the most common duplicate on the web."""
    return image.copy()


def resize(image: Image.Image, rng: random.Random) -> Image.Image:
    return _scaled(image, rng.uniform(0.3, 1.5))


def jpeg(image: Image.Image, rng: random.Random) -> Image.Image:
    return _round_trip(image, "JPEG", quality=rng.randint(20, 95))


def webp(image: Image.Image, rng: random.Random) -> Image.Image:
    return _round_trip(image, "WEBP", quality=rng.randint(40, 95), method=4)


def png(image: Image.Image, rng: random.Random) -> Image.Image:
    """Lossless: the pixels stay, the stored bytes (format) change."""
    return _round_trip(image, "PNG", compress_level=PNG_COMPRESS_LEVEL)


def crop_small(image: Image.Image, rng: random.Random) -> Image.Image:
    """Trim 2-6% of the width and of the height, split unevenly between the sides."""
    return _random_crop(image, 1 - rng.uniform(0.02, 0.06), 1 - rng.uniform(0.02, 0.06), rng)


LETTERBOX_ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16)


def letterbox(image: Image.Image, rng: random.Random) -> Image.Image:
    """Pad to another aspect ratio with black, white or blurred-picture bars."""
    width, height = image.size
    aspect = width / height
    targets = [a for a in LETTERBOX_ASPECTS if abs(a - aspect) / aspect > 0.08]
    target = rng.choice(targets)
    # Wider target: bars left and right; taller target: bars above and below.
    canvas_size = (round(height * target), height) if target > aspect else (width, round(width / target))
    style = rng.choice(("black", "white", "blur"))
    if style == "blur":
        canvas = image.resize(canvas_size, Image.Resampling.BILINEAR)
        canvas = canvas.filter(ImageFilter.GaussianBlur(radius=max(canvas_size) / 25))
    else:
        canvas = Image.new("RGB", canvas_size, (0, 0, 0) if style == "black" else (255, 255, 255))
    canvas.paste(image, ((canvas_size[0] - width) // 2, (canvas_size[1] - height) // 2))
    return canvas


def watermark(image: Image.Image, rng: random.Random) -> Image.Image:
    """Semi-transparent text in a corner or across the middle."""
    base = image.convert("RGBA")
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    width, height = base.size
    text = rng.choice(WATERMARK_TEXTS)
    font = _fit_font(draw, text, round(min(width, height) * rng.uniform(0.06, 0.14)), int(width * 0.9))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    text_w, text_h = right - left, bottom - top
    margin = max(2, round(min(width, height) * 0.03))
    spots = (
        (margin, margin),
        (width - text_w - margin, height - text_h - margin),
        (margin, height - text_h - margin),
        ((width - text_w) // 2, (height - text_h) // 2),
    )
    x, y = rng.choice(spots)
    alpha = rng.randint(110, 200)
    draw.text((x - left, y - top), text, font=font, fill=(255, 255, 255, alpha),
              stroke_width=1, stroke_fill=(0, 0, 0, alpha // 2))
    return Image.alpha_composite(base, overlay).convert("RGB")


def caption_strip(image: Image.Image, rng: random.Random) -> Image.Image:
    """A dark translucent strip along the bottom with a short caption, as news sites add."""
    base = image.convert("RGBA")
    width, height = base.size
    strip_h = max(10, round(height * rng.uniform(0.07, 0.12)))
    overlay = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((0, height - strip_h, width, height), fill=(0, 0, 0, rng.randint(120, 200)))
    text = rng.choice(ON_IMAGE_CAPTIONS)
    font = _fit_font(draw, text, round(strip_h * 0.65), int(width * 0.95))
    left, top, _, bottom = draw.textbbox((0, 0), text, font=font)
    y = height - strip_h + (strip_h - (bottom - top)) // 2 - top
    draw.text((max(2, round(width * 0.02)) - left, y), text, font=font, fill=(255, 255, 255, 255))
    return Image.alpha_composite(base, overlay).convert("RGB")


def color_jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation each scaled by 0.75-1.25."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(0.75, 1.25))
    return image


def blur(image: Image.Image, rng: random.Random) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.5, 1.5)))


def rotate_small(image: Image.Image, rng: random.Random) -> Image.Image:
    """Rotate by 0.5-3 degrees and crop away the corners the rotation left empty."""
    angle = rng.uniform(0.5, 3.0) * rng.choice((-1, 1))
    rotated = image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False)
    width, height = image.size
    inner_w, inner_h = _inner_rotated_rect(width, height, angle)
    # One pixel more on each side: bicubic smears the black fill into the edge.
    crop_w = max(MIN_SIDE, math.floor(inner_w) - 2)
    crop_h = max(MIN_SIDE, math.floor(inner_h) - 2)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return rotated.crop((left, top, left + crop_w, top + crop_h))


def _rotate_with_fill(image: Image.Image, degrees: float, rng: random.Random) -> Image.Image:
    """Rotate by `degrees` (either way) keeping the corners the turn leaves empty, filled black or white,
    on the same canvas (corners of the picture cut off) or on one grown to hold it all."""
    fill = rng.choice(((0, 0, 0), (255, 255, 255)))
    angle = degrees * rng.choice((-1, 1))
    return image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=rng.random() < 0.5, fillcolor=fill)


def _rotate_fill(degrees: int) -> Transform:
    def rotate_fill(image: Image.Image, rng: random.Random) -> Image.Image:
        return _rotate_with_fill(image, degrees + rng.uniform(-0.5, 0.0), rng)

    rotate_fill.__doc__ = f"Rotate by {degrees - 0.5:g}-{degrees} degrees with black or white fill corners."
    return rotate_fill


# One transform per whole degree, so recall can be reported per angle.
ROTATE_FILL_DEGREES = (1, 2, 3, 4, 5)


def crop_edges(image: Image.Image, rng: random.Random) -> Image.Image:
    """Cut 0-8% off each side independently (a re-framed upload)."""
    width, height = image.size
    left, right, top, bottom = (rng.uniform(0.0, 0.08) for _ in range(4))
    box = (round(left * width), round(top * height), width - round(right * width), height - round(bottom * height))
    return image.crop(box)


def border(image: Image.Image, rng: random.Random) -> Image.Image:
    """A uniform frame of 2-10% of the long side on every side, in black, white, grey or a random colour."""
    width = max(2, round(max(image.size) * rng.uniform(0.02, 0.10)))
    colour = rng.choice(((0, 0, 0), (255, 255, 255), (128, 128, 128), tuple(rng.randint(0, 255) for _ in range(3))))
    return ImageOps.expand(image, border=width, fill=colour)


# --------------------------------------------------------------------------
# HARD transforms
# --------------------------------------------------------------------------

MEME_TEXTS = (
    ("WHEN THE WEEKEND", "FINALLY ARRIVES"),
    ("NOBODY:", "ABSOLUTELY NOBODY:"),
    ("ME ON MONDAY", "BE LIKE"),
    ("ONE DOES NOT SIMPLY", "SKIP BREAKFAST"),
    ("EXPECTATION", "REALITY"),
)


def hflip(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.mirror(image)


def vflip(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.flip(image)


def rot90(image: Image.Image, rng: random.Random) -> Image.Image:
    return image.transpose(Image.Transpose.ROTATE_90)


def rot180(image: Image.Image, rng: random.Random) -> Image.Image:
    return image.transpose(Image.Transpose.ROTATE_180)


def rot270(image: Image.Image, rng: random.Random) -> Image.Image:
    return image.transpose(Image.Transpose.ROTATE_270)


def crop_large(image: Image.Image, rng: random.Random) -> Image.Image:
    """Keep 50-75% of the area, at a random place, aspect changed a little."""
    keep_area = rng.uniform(0.5, 0.75)
    stretch = rng.uniform(0.85, 1.15)
    keep_w = min(1.0, math.sqrt(keep_area) * stretch)
    keep_h = min(1.0, keep_area / keep_w)
    return _random_crop(image, keep_w, keep_h, rng)


def grayscale(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


def meme_text(image: Image.Image, rng: random.Random) -> Image.Image:
    """White bands above and below the picture with black caption text."""
    width, height = image.size
    band = max(14, round(height * rng.uniform(0.12, 0.2)))
    canvas = Image.new("RGB", (width, height + 2 * band), (255, 255, 255))
    canvas.paste(image, (0, band))
    draw = ImageDraw.Draw(canvas)
    for text, band_top in zip(rng.choice(MEME_TEXTS), (0, height + band), strict=True):
        font = _fit_font(draw, text, round(band * 0.6), int(width * 0.95))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = (width - (right - left)) // 2 - left
        y = band_top + (band - (bottom - top)) // 2 - top
        draw.text((x, y), text, font=font, fill=(0, 0, 0))
    return canvas


def meme_band(image: Image.Image, rng: random.Random) -> Image.Image:
    """A caption band above, below or both, white with black text or black with white text."""
    width, height = image.size
    band = max(14, round(height * rng.uniform(0.1, 0.25)))
    background, ink = rng.choice((((255, 255, 255), (0, 0, 0)), ((0, 0, 0), (255, 255, 255))))
    where = rng.choice(("top", "bottom", "both"))
    top = band if where in ("top", "both") else 0
    bottom = band if where in ("bottom", "both") else 0
    canvas = Image.new("RGB", (width, height + top + bottom), background)
    canvas.paste(image, (0, top))
    draw = ImageDraw.Draw(canvas)
    texts = rng.choice(MEME_TEXTS)
    for text, band_top, used in ((texts[0], 0, top), (texts[1], top + height, bottom)):
        if not used:
            continue
        font = _fit_font(draw, text, round(band * 0.6), int(width * 0.95))
        left, text_top, right, text_bottom = draw.textbbox((0, 0), text, font=font)
        x = (width - (right - left)) // 2 - left
        y = band_top + (band - (text_bottom - text_top)) // 2 - text_top
        draw.text((x, y), text, font=font, fill=ink)
    return canvas


# --------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------

BENIGN: dict[str, Transform] = {
    "exact": exact,
    "resize": resize,
    "jpeg": jpeg,
    "webp": webp,
    "png": png,
    "crop_small": crop_small,
    "letterbox": letterbox,
    "watermark": watermark,
    "caption_strip": caption_strip,
    "color_jitter": color_jitter,
    "blur": blur,
    "rotate_small": rotate_small,
    **{f"rotate_fill_{degrees}": _rotate_fill(degrees) for degrees in ROTATE_FILL_DEGREES},
    "crop_edges": crop_edges,
    "border": border,
}

_HARD_SINGLES: dict[str, Transform] = {
    "hflip": hflip,
    "vflip": vflip,
    "rot90": rot90,
    "rot180": rot180,
    "rot270": rot270,
    "crop_large": crop_large,
    "grayscale": grayscale,
    "meme_text": meme_text,
    "meme_band": meme_band,
}


def _chain(*steps: Transform) -> Transform:
    def chained(image: Image.Image, rng: random.Random) -> Image.Image:
        for step in steps:
            image = _rgb(step(image, rng))
        return image

    return chained


# Combinations are registered under "a+b" names so one name replays the whole copy.
_HARD_COMBOS: dict[str, Transform] = {
    "hflip+jpeg": _chain(hflip, jpeg),
    "crop_large+color_jitter": _chain(crop_large, color_jitter),
    "rot90+resize": _chain(rot90, resize),
    "grayscale+crop_small": _chain(grayscale, crop_small),
    "meme_text+jpeg": _chain(meme_text, jpeg),
    "vflip+blur": _chain(vflip, blur),
}

HARD: dict[str, Transform] = {**_HARD_SINGLES, **_HARD_COMBOS}
TRANSFORMS: dict[str, Transform] = {**BENIGN, **HARD}

# Order in which benign edits are chained: geometry, then appearance, then
# overlays, then the final re-encode (what a re-upload pipeline does).
_BENIGN_STAGE = {
    "crop_small": 0, "rotate_small": 0, "crop_edges": 0, "resize": 1, "letterbox": 2, "border": 2,
    "color_jitter": 3, "blur": 3, "watermark": 4, "caption_strip": 4,
    **{f"rotate_fill_{degrees}": 0 for degrees in ROTATE_FILL_DEGREES},
}


@dataclass(frozen=True)
class CopyMix:
    """Which edits copies are drawn from: `basic` (the demo set, unchanged) or `web` (the benchmark sets:
    also the families real web copies are made of, issue 12)."""

    benign: tuple[str, ...]  # names of _BENIGN_STAGE that benign chains sample
    hard: tuple[str, ...]  # HARD names a hard copy is drawn from
    max_benign_edits: int  # three combined is a common web history
    one_geometric_edit: bool  # a second crop or turn of a turned copy is not a web history


_WEB_ONLY_BENIGN = ("crop_edges", "border", *(f"rotate_fill_{degrees}" for degrees in ROTATE_FILL_DEGREES))
COPY_MIXES: dict[str, CopyMix] = {
    "basic": CopyMix(tuple(sorted(set(_BENIGN_STAGE) - set(_WEB_ONLY_BENIGN))),
                     tuple(sorted(set(HARD) - {"meme_band"})), 2, False),
    "web": CopyMix(tuple(sorted(_BENIGN_STAGE)), tuple(sorted(HARD)), 3, True),
}
_ENCODES = ("jpeg", "webp", "png")
# Share of benign copies that are byte-identical re-uploads.
EXACT_COPY_PROBABILITY = 0.15
# Share of edited benign copies that end with a re-encode.
REENCODE_PROBABILITY = 0.6


def apply_transform(image: Image.Image, name: str, rng: random.Random) -> Image.Image:
    """Apply the registered transform `name` (a BENIGN or HARD key) and return an RGB image."""
    try:
        transform = TRANSFORMS[name]
    except KeyError:
        raise DedupError(
            f"unknown transform {name!r}",
            hint=f"use one of: {', '.join(sorted(TRANSFORMS))}",
        ) from None
    return _rgb(transform(_rgb(image), rng))


def random_copy(image: Image.Image, family: str, rng: random.Random, mix: str = "basic") -> tuple[Image.Image, list[str]]:
    """Make one copy of `image` in `family` ('benign' or 'hard') from the edits of `COPY_MIXES[mix]`;
    returns it and the transform names applied."""
    chosen = _copy_mix(mix)
    if family == BENIGN_FAMILY:
        names = _benign_chain(rng, chosen)
    elif family == HARD_FAMILY:
        names = [rng.choice(chosen.hard)]
    else:
        raise DedupError(f"unknown copy family {family!r}", hint=f"use '{BENIGN_FAMILY}' or '{HARD_FAMILY}'")
    for name in names:
        image = apply_transform(image, name, rng)
    return image, names


def _copy_mix(mix: str) -> CopyMix:
    try:
        return COPY_MIXES[mix]
    except KeyError:
        raise DedupError(f"unknown copy mix {mix!r}", hint=f"use one of: {', '.join(COPY_MIXES)}") from None


def _benign_chain(rng: random.Random, mix: CopyMix) -> list[str]:
    if rng.random() < EXACT_COPY_PROBABILITY:
        return ["exact"]
    edits = rng.sample(mix.benign, rng.randint(0, mix.max_benign_edits))
    edits.sort(key=lambda name: _BENIGN_STAGE[name])
    if mix.one_geometric_edit:
        edits = [name for i, name in enumerate(edits) if _BENIGN_STAGE[name] > 0 or i == 0]
    if not edits or rng.random() < REENCODE_PROBABILITY:
        edits.append(rng.choice(_ENCODES))
    return edits


# --------------------------------------------------------------------------
# Bad samples
# --------------------------------------------------------------------------

BAD_KIND_EXPECTED_STATUS: dict[str, str] = {
    "truncated_jpeg": "truncated",
    "zero_bytes": "empty",
    "text_as_jpg": "decode_error",
    "png_as_jpg": "ok",  # wrong extension, but a decoder sniffs the bytes and reads it
    "one_pixel": "too_small",
    "json_only": "missing_image",
}
BAD_KINDS = tuple(BAD_KIND_EXPECTED_STATUS)

_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head>\n"
    b"<body><h1>Not Found</h1><p>The requested URL was not found on this server.</p></body></html>\n"
)


def _pattern_image() -> Image.Image:
    """A textured 256x192 picture for bad samples when no photo is given."""
    y, x = np.mgrid[0:192, 0:256]
    red = 127 + 120 * np.sin(x / 9.0)
    green = 127 + 120 * np.cos(y / 13.0)
    blue = 127 + 120 * np.sin((x + y) / 17.0)
    pixels = np.stack([red, green, blue], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _encoded(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def bad_files(kind: str, image: Image.Image) -> dict[str, bytes]:
    """The tar members (extension -> bytes, besides .txt/.json) of one bad sample of `kind`."""
    if kind == "truncated_jpeg":
        data = _encoded(_rgb(image), "JPEG", quality=STORE_JPEG_QUALITY)
        return {"jpg": data[: int(len(data) * 0.6)]}  # cut mid-scan, as an interrupted download is
    if kind == "zero_bytes":
        return {"jpg": b""}
    if kind == "text_as_jpg":
        return {"jpg": _ERROR_PAGE}
    if kind == "png_as_jpg":
        return {"jpg": _encoded(_rgb(image), "PNG", compress_level=PNG_COMPRESS_LEVEL)}
    if kind == "one_pixel":
        return {"jpg": _encoded(_rgb(image).resize((1, 1), Image.Resampling.BOX), "JPEG", quality=95)}
    if kind == "json_only":
        return {}
    raise DedupError(f"unknown bad sample kind {kind!r}", hint=f"use one of: {', '.join(BAD_KINDS)}")


def bad_samples(image: Image.Image | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (kind, {ext: bytes}) for each of the 6 bad kinds; see BAD_KIND_EXPECTED_STATUS."""
    picture = image if image is not None else _pattern_image()
    for kind in BAD_KINDS:
        yield kind, bad_files(kind, picture)


# --------------------------------------------------------------------------
# Samples and shards
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSample:
    """One shard sample plus the ground truth of how it was made."""

    key: str
    image_bytes: bytes | None
    ext: str
    caption: str | None
    url: str
    extra_files: dict[str, bytes] = field(default_factory=dict)
    width: int | None = None  # stored image size (None when the bytes do not say)
    height: int | None = None
    # Truth
    source_id: str = ""
    family: str = "original"
    transforms: tuple[str, ...] = ()
    is_bad: bool = False
    bad_kind: str | None = None
    negative_of: str | None = None
    parent: str = ""
    crop_box: str = ""
    crop_sibling_iou: float = 0.0


def _header_size(data: bytes | None) -> tuple[int | None, int | None]:
    """The size an image header claims, without decoding pixels (None if unreadable)."""
    if not data:
        return None, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - bad samples are meant to be unreadable
        return None, None


def _sample_json(sample: SynthSample) -> bytes:
    meta = {
        "key": sample.key,
        "url": sample.url,
        "caption": sample.caption,
        "width": sample.width,
        "height": sample.height,
        "original_width": sample.width,
        "original_height": sample.height,
        "sha256": hashlib.sha256(sample.image_bytes).hexdigest() if sample.image_bytes is not None else None,
        "status": "success",
        "error_message": None,
    }
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


def _sample_members(sample: SynthSample) -> list[tuple[str, bytes]]:
    members = []
    if sample.image_bytes is not None:
        members.append((f"{sample.key}.{sample.ext}", sample.image_bytes))
    for ext in sorted(sample.extra_files):
        members.append((f"{sample.key}.{ext}", sample.extra_files[ext]))
    if sample.caption is not None:
        members.append((f"{sample.key}.txt", sample.caption.encode("utf-8")))
    members.append((f"{sample.key}.json", _sample_json(sample)))
    return members


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _write_tar(path: Path, samples: Sequence[SynthSample]) -> None:
    partial = path.with_name(path.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in samples:
            for name, data in _sample_members(sample):
                _add_member(tar, name, data)
    partial.replace(path)


_PARQUET_SCHEMA = IMG2DATASET_PARQUET  # the contract lives in dedup/records.py


def _write_parquet(path: Path, samples: Sequence[SynthSample]) -> None:
    rows = [json.loads(_sample_json(sample)) for sample in samples]
    table = pa.Table.from_pylist(rows, schema=_PARQUET_SCHEMA)
    pq.write_table(table, path)


def _chunks(samples: Iterable[SynthSample], size: int) -> Iterator[list[SynthSample]]:
    chunk: list[SynthSample] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_shards(
    samples: Iterable[SynthSample], out_dir: Path, samples_per_shard: int, prefix: str = ""
) -> list[Path]:
    """Write img2dataset-layout shards `{prefix}{shard:05d}.tar` (+ `.parquet`); returns the tar paths."""
    if samples_per_shard < 1:
        raise DedupError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    paths = []
    for shard_index, chunk in enumerate(_chunks(samples, samples_per_shard)):
        _check_unique_keys(chunk, seen)
        stem = f"{prefix}{shard_index:05d}"
        _write_tar(out_dir / f"{stem}.tar", chunk)
        _write_parquet(out_dir / f"{stem}.parquet", chunk)
        paths.append(out_dir / f"{stem}.tar")
    return paths


def _check_unique_keys(chunk: Sequence[SynthSample], seen: set[str]) -> None:
    # webdataset readers group consecutive members by key: a repeated key would merge two samples.
    for sample in chunk:
        if sample.key in seen:
            raise DedupError(f"sample key {sample.key!r} appears twice", hint="give every sample a unique key")
        seen.add(sample.key)


# --------------------------------------------------------------------------
# Captions and URLs
# --------------------------------------------------------------------------

CAPTION_VARIANTS = (
    "{base}",
    "{base} - stock photo",
    "{Base} | Free HD Wallpaper",
    "{base} stock photos and images",
    "Photo of {base}",
    "{Base}. Royalty-free image",
    "{base} #photography #travel",
    "Canvas print: {base}",
    "{Base} (photo: staff)",
    "{Base}, 2016",
    "Buy {base} poster online",
    "IMG_{number:04d}.JPG",
    "DSC{number:05d}",
)
DOMAINS = (
    "i.pinspire.example",
    "cdn.shopnova.example",
    "media.dailynews.example",
    "upload.wikimedia.example",
    "images.photostock.example",
    "blog.travelnotes.example",
    "static.recipehub.example",
    "img.forumcity.example",
)
URL_FOLDERS = ("uploads", "images", "media", "photos", "originals", "wp-content/uploads")
DETAIL_WORDS = ("detail of", "close-up of", "part of", "cropped photo of", "section of")
# Share of copies that keep the original's alt text word for word.
SAME_CAPTION_PROBABILITY = 0.45


def humanize(name: str) -> str:
    """A readable caption base from a source name such as 'kodak:kodim05' or 'a__b__c.jpg'."""
    last = re.split(r"[:/]|__", name)[-1]
    stem = re.sub(r"\.(jpe?g|png|webp|tiff?|gif|bmp)$", "", last, flags=re.IGNORECASE)
    words = re.sub(r"[_\-~]+", " ", stem).strip()
    return words or name


def _caption_variant(base: str, rng: random.Random) -> str:
    template = rng.choice(CAPTION_VARIANTS)
    return template.format(base=base, Base=base[:1].upper() + base[1:], number=rng.randint(1, 9999))


def _url(caption: str, rng: random.Random, ext: str) -> str:
    slug = "-".join(re.findall(r"[a-z0-9]+", caption.lower())[:6]) or "image"
    token = f"{rng.getrandbits(48):012x}"
    folder = rng.choice(URL_FOLDERS)
    date = f"{rng.randint(2012, 2023)}/{rng.randint(1, 12):02d}"
    return f"https://{rng.choice(DOMAINS)}/{folder}/{date}/{slug}-{token}.{ext}"


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    name: str
    image: Image.Image
    caption: str
    parent: str
    crop_box: str = ""
    sibling_iou: float = 0.0  # largest IoU with another crop of the same parent photo


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    image = _rgb(image)
    if max(image.size) <= max_side:
        return image
    fitted = image.copy()
    fitted.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return fitted


def _usable_crop_parent(image: Image.Image) -> bool:
    """A detailed natural photo: flat pictures (sky, black frames) give crops that all look
    alike, and noise (neighbouring pixels uncorrelated) is not a photo at all."""
    thumb = np.asarray(ImageOps.grayscale(image).resize((64, 64)), dtype=np.float64)
    if thumb.std() < 25.0:
        return False
    neighbour_correlation = np.corrcoef(thumb[:, :-1].ravel(), thumb[:, 1:].ravel())[0, 1]
    return bool(neighbour_correlation >= 0.5)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    left = np.maximum(box[0], others[:, 0])
    top = np.maximum(box[1], others[:, 1])
    right = np.minimum(box[2], others[:, 2])
    bottom = np.minimum(box[3], others[:, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    other_areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area + other_areas - inter)


# Each derived crop is the best of this many random candidates: the one that
# overlaps least with the crops already taken from the same photo.
_CROP_CANDIDATES = 24


def _spread_crop(size: tuple[int, int], taken: list[np.ndarray], rng: random.Random) -> np.ndarray:
    width, height = size
    best, best_overlap = None, math.inf
    for _ in range(_CROP_CANDIDATES):
        area = rng.uniform(0.2, 0.4) * width * height
        aspect = rng.uniform(0.75, 1.33)
        crop_w = min(width, round(math.sqrt(area * aspect)))
        crop_h = min(height, round(area / crop_w))
        left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
        box = np.array([left, top, left + crop_w, top + crop_h], dtype=np.float64)
        overlap = float(_iou(box, np.stack(taken)).max()) if taken else 0.0
        if overlap < best_overlap:
            best, best_overlap = box, overlap
    return best


def derive_sources(
    photos: Sequence[tuple[str, Image.Image, str]], count: int, rng: random.Random, max_side: int
) -> list[_Source]:
    """`count` extra distinct sources: crops of 20-40% of a photo's area, spread over each photo, resized.

    `photos` are (name, image, caption); flat or noise-like pictures are skipped as parents.
    """
    parents = [photo for photo in photos if _usable_crop_parent(photo[1])]
    if count and not parents:
        raise DedupError(
            "no detailed natural photo to derive extra singleton sources from (all flat or noise-like)",
            hint="pass more (or more detailed) source photos, or lower n_samples",
        )
    taken: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in parents}
    derived = []
    for index in range(count):
        name, image, caption = parents[index % len(parents)]
        box = _spread_crop(image.size, taken[name], rng)
        taken[name].append(box)
        crop = image.crop(tuple(int(v) for v in box))
        crop = _scaled(crop, rng.randint(round(0.7 * max_side), max_side) / max(crop.size))
        derived.append(_Source(
            name=f"{name}~crop{len(taken[name]):03d}",
            image=crop,
            caption=f"{rng.choice(DETAIL_WORDS)} {caption[:1].lower() + caption[1:]}",
            parent=name,
            crop_box=",".join(str(int(v)) for v in box),
        ))
    overlaps = {name: iter(_max_sibling_iou(boxes)) for name, boxes in taken.items()}
    return [dataclasses.replace(source, sibling_iou=next(overlaps[source.parent])) for source in derived]


def _max_sibling_iou(boxes: list[np.ndarray]) -> list[float]:
    if len(boxes) < 2:
        return [0.0] * len(boxes)
    stacked = np.stack(boxes)
    return [float(np.delete(_iou(box, stacked), index).max()) for index, box in enumerate(stacked)]


# --------------------------------------------------------------------------
# LAION-like set
# --------------------------------------------------------------------------


def zipf_group_sizes(n_items: int, largest: int, exponent: float, rng: random.Random) -> list[int]:
    """Group sizes summing to `n_items`: rank r gets ~largest * r^-exponent copies, the rest are singletons."""
    sizes: list[int] = []
    rank = 1
    while True:
        jitter = 1.0 if rank == 1 else rng.uniform(0.85, 1.15)  # the caller's `largest` is kept exact
        size = round(largest * rank ** -exponent * jitter)
        if size < 2 or sum(sizes) + size > n_items:
            break
        sizes.append(size)
        rank += 1
    return sizes + [1] * (n_items - sum(sizes))


def _encode_for_storage(image: Image.Image, transforms: Sequence[str]) -> tuple[bytes, str]:
    last = transforms[-1] if transforms else ""
    if last == "png":
        return _encoded(image, "PNG", compress_level=PNG_COMPRESS_LEVEL), "png"
    if last == "webp":
        return _encoded(image, "WEBP", quality=STORE_WEBP_QUALITY, method=4), "webp"
    return _encoded(image, "JPEG", quality=STORE_JPEG_QUALITY), "jpg"


def _clean_sample(
    image: Image.Image, caption: str, rng: random.Random, *, source: _Source, family: str,
    transforms: Sequence[str] = (), negative_of: str | None = None,
) -> SynthSample:
    data, ext = _encode_for_storage(image, transforms)
    return SynthSample(
        key="", image_bytes=data, ext=ext, caption=caption, url=_url(caption, rng, ext),
        width=image.width, height=image.height, source_id=source.name, family=family,
        transforms=tuple(transforms), negative_of=negative_of, parent=source.parent, crop_box=source.crop_box,
        crop_sibling_iou=source.sibling_iou,
    )


def _group_samples(source: _Source, size: int, hard_fraction: float, rng: random.Random,
                   mix: str = "basic") -> list[SynthSample]:
    samples = [_clean_sample(source.image, source.caption, rng, source=source, family="original")]
    for _ in range(size - 1):
        family = HARD_FAMILY if rng.random() < hard_fraction else BENIGN_FAMILY
        image, names = random_copy(source.image, family, rng, mix)
        same_caption = rng.random() < SAME_CAPTION_PROBABILITY
        caption = source.caption if same_caption else _caption_variant(source.caption, rng)
        samples.append(_clean_sample(image, caption, rng, source=source, family=family, transforms=names))
    return samples


def _bad_sample(kind: str, index: int, source: _Source, rng: random.Random) -> SynthSample:
    files = bad_files(kind, source.image)
    image_bytes = files.pop("jpg", None)
    width, height = _header_size(image_bytes)
    caption = _caption_variant(source.caption, rng)
    return SynthSample(
        key="", image_bytes=image_bytes, ext="jpg", caption=caption, url=_url(caption, rng, "jpg"),
        extra_files=files, width=width, height=height, source_id=f"bad:{index:05d}", family="bad",
        is_bad=True, bad_kind=kind, parent=source.parent, crop_box=source.crop_box,
        crop_sibling_iou=source.sibling_iou,
    )


def _truth_row(sample: SynthSample) -> dict[str, object]:
    return {
        "key": sample.key,
        "group_id": sample.source_id,
        "family": sample.family,
        "transforms": ";".join(sample.transforms),
        "negative_of": sample.negative_of,
        "bad_kind": sample.bad_kind,
        "expected_status": BAD_KIND_EXPECTED_STATUS[sample.bad_kind] if sample.is_bad else "ok",
        "parent": sample.parent,
        "crop_box": sample.crop_box,
        "crop_sibling_iou": sample.crop_sibling_iou,
    }


def _validate_inputs(
    source_names: Sequence[str], negative_names: Sequence[str], looks_like: Sequence[str], n_clean: int,
    samples_per_shard: int,
) -> None:
    if not source_names:
        raise DedupError("make_laion_like needs at least one source photo")
    names = list(source_names) + list(negative_names)
    if len(set(names)) != len(names):
        raise DedupError("source and hard-negative names must be unique", hint="rename the repeated photos")
    missing = sorted(set(looks_like) - set(source_names))
    if missing:
        raise DedupError(f"hard negatives resemble unknown sources: {missing}", hint="name a source photo")
    if not 1 <= samples_per_shard <= 10_000:
        raise DedupError(
            f"samples_per_shard must be 1..10000 for img2dataset keys, got {samples_per_shard}",
            hint="keys are {shard:05d}{index:04d}: the index has four digits",
        )
    if n_clean < max(1, len(set(looks_like))):
        raise DedupError(
            f"n_samples leaves {n_clean} clean samples: too few for the sources (and those hard negatives resemble)",
            hint="raise n_samples or lower bad_fraction",
        )


def make_laion_like(
    sources: Sequence[tuple[str, Image.Image]],
    n_samples: int,
    seed: int,
    hard_negatives: Sequence[tuple[str, Image.Image, str]] = (),
    bad_fraction: float = 0.01,
    *,
    captions: Mapping[str, str] | None = None,
    samples_per_shard: int = 10_000,
    largest_group: int | None = None,
    zipf_exponent: float = 1.3,
    hard_fraction: float = 0.3,
    max_side: int = 384,
    copy_mix: str = "basic",
) -> tuple[list[SynthSample], pd.DataFrame]:
    """A shuffled LAION-like sample list with planted duplicates, and its truth table.

    `sources` are (name, photo); `hard_negatives` are (name, photo, name of the
    source it resembles), each included once. Group sizes follow a Zipf-like law
    (`largest_group` copies for the top source, default 5% of the clean samples);
    most pictures appear once. Each copy is benign, or hard with probability
    `hard_fraction`, its edits drawn from `COPY_MIXES[copy_mix]`. `bad_fraction` of the samples
    are bad, every kind at least
    once when it is > 0. Photos are first downscaled to `max_side` (as img2dataset
    resizes). Keys are img2dataset's `{shard:05d}{index:04d}` for `samples_per_shard`.
    Truth columns: key, group_id, family, transforms, negative_of, bad_kind,
    expected_status, parent, crop_box, crop_sibling_iou.
    """
    _copy_mix(copy_mix)  # an unknown mix fails before any work
    rng = random.Random(seed)
    captions = dict(captions or {})
    n_bad = 0 if bad_fraction <= 0 else max(len(BAD_KINDS), round(bad_fraction * n_samples))
    n_clean = n_samples - n_bad - len(hard_negatives)
    looks_like = [looks for _, _, looks in hard_negatives]
    _validate_inputs([name for name, _ in sources], [name for name, _, _ in hard_negatives], looks_like, n_clean,
                     samples_per_shard)

    photos = [(name, _fit(image, max_side), captions.get(name, humanize(name))) for name, image in sources]
    group_sources = _order_sources(photos, set(looks_like), rng)
    largest = largest_group if largest_group is not None else max(2, round(0.05 * n_clean))
    sizes = zipf_group_sizes(n_clean, max(1, min(largest, n_clean)), zipf_exponent, rng)
    extra = derive_sources(photos, max(0, len(sizes) - len(group_sources)) + n_bad, rng, max_side)
    group_sources += extra[: len(extra) - n_bad]

    samples: list[SynthSample] = []
    for size, source in zip(sizes, group_sources[: len(sizes)], strict=True):
        samples.extend(_group_samples(source, size, hard_fraction, rng, copy_mix))
    samples.extend(_hard_negative_samples(hard_negatives, captions, max_side, rng))
    for index, source in enumerate(extra[len(extra) - n_bad:]):
        samples.append(_bad_sample(BAD_KINDS[index % len(BAD_KINDS)], index, source, rng))

    rng.shuffle(samples)
    samples = _with_keys(samples, samples_per_shard)
    return samples, pd.DataFrame([_truth_row(sample) for sample in samples])


def _order_sources(
    photos: Sequence[tuple[str, Image.Image, str]], first: set[str], rng: random.Random
) -> list[_Source]:
    """Real photos in random order, those a hard negative resembles first (they get the big groups)."""
    sources = [_Source(name, image, caption, parent=name) for name, image, caption in photos]
    rng.shuffle(sources)
    return sorted(sources, key=lambda source: source.name not in first)


def _hard_negative_samples(
    hard_negatives: Sequence[tuple[str, Image.Image, str]], captions: Mapping[str, str], max_side: int,
    rng: random.Random,
) -> list[SynthSample]:
    samples = []
    for name, image, looks_like in hard_negatives:
        source = _Source(name, _fit(image, max_side), captions.get(name, humanize(name)), parent=name)
        samples.append(_clean_sample(source.image, source.caption, rng, source=source,
                                     family="hard_negative", negative_of=looks_like))
    return samples


def _with_keys(samples: Sequence[SynthSample], samples_per_shard: int) -> list[SynthSample]:
    return [
        dataclasses.replace(sample, key=f"{i // samples_per_shard:05d}{i % samples_per_shard:04d}")
        for i, sample in enumerate(samples)
    ]


# --------------------------------------------------------------------------
# Demo
# --------------------------------------------------------------------------

DEMO_SAMPLES = 300
DEMO_SHARDS = 4
DEMO_LARGEST_GROUP = 40


@dataclass(frozen=True)
class DemoPhoto:
    name: str
    image: Image.Image
    caption: str
    negative_of: str  # "" unless this photo is a hard negative of another demo photo


def demo_photos() -> list[DemoPhoto]:
    """The real photos shipped in `dedup/demo_images/` (see its LICENSES.md and manifest.csv)."""
    folder = resources.files("dedup") / "demo_images"
    manifest = folder / "manifest.csv"
    if not manifest.is_file():
        raise DedupError(
            "the demo photos are missing from the installed package (dedup/demo_images/manifest.csv)",
            hint="reinstall dedup from a full source checkout: pip install --force-reinstall .",
        )
    with manifest.open("r", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    photos = []
    for row in rows:
        with (folder / row["file"]).open("rb") as handle, Image.open(io.BytesIO(handle.read())) as opened:
            image = opened.convert("RGB")
        photos.append(DemoPhoto(Path(row["file"]).stem, image, row["caption"], row["negative_of"]))
    return photos


def build_demo(out_dir: Path, seed: int = 0) -> tuple[list[Path], pd.DataFrame]:
    """Write ~300 samples in 4 shards with planted duplicates and the 6 bad kinds, plus truth.parquet."""
    photos = demo_photos()
    sources = [(photo.name, photo.image) for photo in photos if not photo.negative_of]
    negatives = [(photo.name, photo.image, photo.negative_of) for photo in photos if photo.negative_of]
    samples_per_shard = math.ceil(DEMO_SAMPLES / DEMO_SHARDS)
    samples, truth = make_laion_like(
        sources, DEMO_SAMPLES, seed, hard_negatives=negatives, bad_fraction=len(BAD_KINDS) / DEMO_SAMPLES,
        captions={photo.name: photo.caption for photo in photos},
        samples_per_shard=samples_per_shard, largest_group=DEMO_LARGEST_GROUP,
    )
    out_dir = Path(out_dir)
    shards = write_shards(samples, out_dir, samples_per_shard)
    truth.to_parquet(out_dir / "truth.parquet", index=False)
    return shards, truth
