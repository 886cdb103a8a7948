"""Fill corners of turned copies that other edits partly hide: caption strips, watermarks, thin wedges.

Real photos (the demo photos, downscaled from ../shared/data/real-dups), edited with the benchmark
generator's own transforms (`dedup.synth`), decoded as the pipeline decodes.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dedup.decode import decode_image
from dedup.descriptors.perceptual import (
    DEFAULT_THRESHOLD,
    PerceptualDescriptor,
    _thumbnail,
    describe,
    dihedral_similarity,
    fill_rotation,
)
from dedup.synth import caption_strip

DEMO_IMAGES = Path(__file__).resolve().parents[1] / "dedup" / "demo_images"


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(DEMO_IMAGES.glob("*.jpg"))]


def _stored(image: Image.Image, quality: int = 90) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return decode_image(buffer.getvalue(), target_side=PerceptualDescriptor.min_side).image


def _turned(photo: Image.Image, angle: float, fill, expand: bool) -> Image.Image:
    return photo.rotate(angle, resample=Image.Resampling.BICUBIC, expand=expand, fillcolor=fill)


@pytest.mark.parametrize("fill", [(255, 255, 255), (0, 0, 0)], ids=["white", "black"])
@pytest.mark.parametrize("angle", [4, 5])
def test_turned_copy_under_a_caption_strip_matches_its_original(photos, angle, fill):
    # The strip tints the bottom fill corners grey (white fill) or writes its caption over them
    # (black fill): the old code needed all four corners of one colour and each borrowed corner 90 %
    # fill, so it kept the corners (white, 4 deg: 52 % of copies above the cut; black, 4 deg: 63 %).
    rng = random.Random(angle)
    copies = [_stored(caption_strip(_turned(photo, angle * rng.choice((-1, 1)), fill, rng.random() < 0.5), rng))
              for photo in photos]
    sims = dihedral_similarity(describe(photos), describe(copies)).diagonal()
    assert (sims >= DEFAULT_THRESHOLD).mean() >= 0.95, sims.round(2)


def test_thin_fill_wedges_of_a_small_copy_are_turned_back(photos):
    # 2.5 degrees on a 192 px copy leaves wedges 4 px deep: three lines cross the short leg, too few to
    # fit; the many short runs across the long leg fit it (old code: none of the 27 found).
    small = [photo.resize((192, round(192 * photo.height / photo.width))) for photo in photos]
    found = [fill_rotation(np.asarray(_thumbnail(_stored(_turned(p, 2.5, (0, 0, 0), False))))) for p in small]
    angles = np.array([f.angle if f is not None else np.nan for f in found])
    assert (np.abs(angles - 2.5) <= 0.6).mean() >= 0.8, angles.round(2)


def test_strip_corner_pairs_leave_plain_photos_alone(photos):
    # Two white corners beside two grey ones is also a photo with a white sky over a grey street:
    # without straight fill edges that agree on one angle nothing is turned.
    for photo in photos:
        assert fill_rotation(np.asarray(_thumbnail(_stored(photo)))) is None


def _letterboxed(photo: Image.Image, colour) -> Image.Image:
    bar = photo.height // 4
    canvas = Image.new("RGB", (photo.width, photo.height + 2 * bar), colour)
    canvas.paste(photo, (0, bar))
    return canvas


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0)], ids=["white", "black"])
def test_letterbox_whose_bottom_bar_a_caption_strip_covers_is_trimmed(photos, colour):
    # Strip and the visible rest of the bottom bar together match the top bar: both bars go (the old
    # code kept the lone top bar as picture and the strip's grey as a band of another colour).
    from dedup.descriptors.perceptual import content_box

    rng = random.Random(3)
    trimmed = []
    for photo in photos:
        copy = _stored(caption_strip(_letterboxed(photo, colour), rng))
        top, bottom = content_box(np.asarray(copy))[1::2]
        bar = copy.height - photo.height * copy.width // photo.width  # both bars, in the decoded copy
        trimmed.append(abs(top - bar / 2) <= 3 and abs(copy.height - bottom - bar / 2) <= 3)
    assert np.mean(trimmed) >= 0.9, trimmed


def test_turned_and_letterboxed_copy_under_a_caption_strip_matches_its_original(photos):
    rng = random.Random(5)
    copies = [_stored(caption_strip(_letterboxed(_turned(photo, 3, (255, 255, 255), True), (255, 255, 255)), rng))
              for photo in photos]
    sims = dihedral_similarity(describe(photos), describe(copies)).diagonal()
    assert (sims >= DEFAULT_THRESHOLD).mean() >= 0.85, sims.round(2)


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0)], ids=["white", "black"])
def test_pillarbox_bars_under_a_caption_strip_are_trimmed(photos, colour):
    # The strip's caption starts inside the left bar, so the bar's columns are not uniform over their
    # whole height; above the strip they are (old code: bars kept on most copies).
    from dedup.descriptors.perceptual import content_box

    rng = random.Random(4)
    trimmed = []
    for photo in photos:
        bar = photo.width // 4
        canvas = Image.new("RGB", (photo.width + 2 * bar, photo.height), colour)
        canvas.paste(photo, (bar, 0))
        copy = _stored(caption_strip(canvas, rng))
        left, _, right, _ = content_box(np.asarray(copy))
        side = (copy.width - photo.width * copy.height / photo.height) / 2
        trimmed.append(abs(left - side) <= 3 and abs(copy.width - right - side) <= 3)
    assert np.mean(trimmed) >= 0.9, trimmed


def test_bars_inside_a_frame_under_a_caption_strip_are_trimmed(photos):
    # Frame, then pillarbox bars inside it, then a strip over the foot: after the frame is peeled the
    # blended line where frame and bars meet hid the bars (old code: the bars stayed in the picture).
    from dedup.descriptors.perceptual import content_box

    rng = random.Random(6)
    trimmed = []
    for photo in photos:
        bar, frame = photo.width // 4 | 1, photo.width // 16 | 1  # odd: the decoder's 1/2, 1/4 scale blends the edges
        canvas = Image.new("RGB", (photo.width + 2 * bar, photo.height), (0, 0, 0))
        canvas.paste(photo, (bar, 0))
        framed = Image.new("RGB", (canvas.width + 2 * frame, canvas.height + 2 * frame), (128, 128, 128))
        framed.paste(canvas, (frame, frame))
        copy = _stored(caption_strip(framed, rng))
        scale = copy.width / framed.width
        left, _, right, _ = content_box(np.asarray(copy))
        trimmed.append(abs(left - (frame + bar) * scale) <= 3 and abs(copy.width - right - (frame + bar) * scale) <= 3)
    assert np.mean(trimmed) >= 0.85, trimmed
