"""Weight-free perceptual descriptor: low-frequency DCT of two views of the luma.

Built for the copies web-scale image sets are full of: resized, re-encoded,
slightly cropped, letterboxed or padded, watermarked, colour-shifted, grayscale,
brightness/contrast-edited, blurred or sharpened, flipped or rotated by 90°.

Recipe (all of it runs in `prepare`, inside the decode workers):

1. Box-reduce the RGB image to a long side under 512 px and find letterbox /
   padding bars (`content_box`): a bar must be uniform, end in a clear step into
   the picture, and be matched by a bar of the same colour and size on the
   opposite side.
   Uniform bands that belong to the photo (a grey sky above a horizon) are
   one-sided, so they are kept and a 4 % crop of such a photo still matches.
2. Two views of the luma inside that box, each area-resized to 64x64:
   the whole box squashed to a square, and its central square. The first
   survives resizing and squashing; the second survives centre crops to a
   square (thumbnails, the Kodak 500x500 crops), which the first cannot.
3. Per view: 2-D DCT-II, keep the 128 lowest frequencies (u + v small, a set
   closed under transposition), drop DC (brightness), multiply each coefficient
   by its radial frequency (flattens the 1/f spectrum of photos so edges, not
   the overall light gradient, decide the match), take a signed square root (no
   few strong coefficients dominate) and L2-normalise (contrast). The vector is
   [whole view | central view] / sqrt(2): 256 floats, unit length.
4. Images with almost no structure (blank, near-black, plain sky) get the zero
   vector: nothing identifies them, so they match nothing.

Flips and 90° rotations act on DCT coefficients as sign changes and a u<->v
swap, and both views commute with them, so `dihedral_variants` produces the 8
orientations of a stored vector without touching pixels; the neighbour search
queries all 8 against an index of plain vectors.

`DEFAULT_THRESHOLD` is calibrated on the real duplicate groups in
`shared/data/real-dups` by `benchmarks/perceptual_realdups.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dedup.decode import to_rgb
from dedup.descriptors.base import l2_normalize
from dedup.errors import DedupError

DIM = 256
GRID = 64  # side of each view before the DCT
VIEW_DIM = DIM // 2  # coefficients kept per view
TRIM_THUMBNAIL_SIDE = 256  # working images are box-reduced to a long side of 256..511 px

# Letterbox bars (pixel values on 0..255, RGB channels).
BAR_TOLERANCE = 6.0  # mean deviation of a bar line from the bar colour
BAR_STEP = 15.0  # the picture must differ from the bar colour by this much
MAX_BAR_FRACTION = 0.4  # never trim more than this per side
BAR_STEP_LOOKAHEAD = 3  # lines checked for the step (JPEG ringing blurs the edge)
# Meme-style caption bands: a line inside a bar may have up to this share of
# pixels off the bar colour (the text); the bar must open with clean lines.
MAX_TEXT_FRACTION = 0.75  # bold caption fonts cover up to ~60 % of a line; a picture line ~100 %
MIN_CLEAN_LINES = 2
MIN_TEXT_LINES = 3  # text lines that make a one-sided band a caption band
MAX_BAR_LAYERS = 3  # a frame inside a letterbox inside a frame
MAX_CAPTION_STRIP = 0.15  # share of the height a news-style caption strip over the bottom may cover
MIN_FRAME = 3  # lines: the narrowest frame `_covered_frame` completes
# Letterbox bars filled with a blurred, stretched copy of the picture: lines whose
# neighbouring pixels differ by under this (grey levels; photos measure 4-20) for at
# least MIN_BLUR_BAR lines, the same size on both sides, ending in a step.
BLUR_DETAIL = 1.5
MIN_BLUR_BAR = 4
# The step into the picture is this many times the mean step between the bar's own lines
# (measured: blurred bars 10-50x; smooth picture edges and fill corners 1-4.4x).
BLUR_EDGE_CONTRAST = 6.0
BLUR_MIN_STEP = BAR_STEP / 4  # and at least this (grey levels, mean over the line)

# Frequency weighting and coefficient compression (measured on real-dups and
# synthetic edits, see benchmarks/perceptual_realdups.py).
FREQUENCY_EXPONENT = 1.0
COEFFICIENT_POWER = 0.5
# RMS luma gradient (grey levels per 64-grid pixel) below which an image is
# "featureless": real photos measure >= 6, a plain sky ~1, clouds ~1.4.
MIN_STRUCTURE = 2.0

# Cosine similarity (max over the 8 orientations) at which two images are
# called copies. benchmarks/perceptual_realdups.py: the highest pair of
# different photos in real-dups scores 0.377 and the highest of ~400k random
# crops of different photos 0.52-0.54; the cut must clear them by 0.15 / 0.05
# (>= 0.574). Above 0.60 sit all tested edits of these kinds: resize,
# re-encode, 4 % crop, bars, watermark, colour, blur, flips, 3° rotation;
# also copies squashed to a square (~0.63), 80 % of centre-square crops
# (median 0.65) and 18 of the 24 Kodak 500x500 crops.
DEFAULT_THRESHOLD = 0.60


def low_frequency_coefficients(count: int) -> tuple[tuple[int, int], ...]:
    """The `count` lowest (u, v) DCT frequencies, DC included, closed under u<->v.

    Whole anti-diagonals u + v = s are taken in order; the last, partial one is
    filled with transpose pairs nearest the diagonal so a 90° rotation (which
    swaps u and v) maps the set onto itself.
    """
    chosen: list[tuple[int, int]] = []
    total = 0
    while True:
        diagonal = [(u, total - u) for u in range(total + 1)]
        if len(chosen) + len(diagonal) > count:
            break
        chosen.extend(diagonal)
        total += 1
    diagonal.sort(key=lambda uv: abs(uv[0] - uv[1]))
    for u, v in diagonal:
        room = count - len(chosen)
        if u == v and room >= 1:
            chosen.append((u, v))
        elif u < v and room >= 2:
            chosen.extend([(u, v), (v, u)])
    if len(chosen) != count:
        raise ValueError(f"cannot pick {count} coefficients closed under transposition; use an even count")
    return tuple(chosen)


def dct_matrix(size: int, frequencies: int) -> np.ndarray:
    """Orthonormal DCT-II rows 0..frequencies-1 for signals of length `size`."""
    samples = np.arange(size)
    rows = np.arange(frequencies)[:, None]
    matrix = np.cos(np.pi * (2 * samples + 1) * rows / (2 * size)) * math.sqrt(2.0 / size)
    matrix[0] /= math.sqrt(2.0)
    return matrix


# The 128 (u, v) pairs of one view; u = vertical, v = horizontal frequency.
# Vector index i holds COEFFICIENTS[i] of the whole view, VIEW_DIM + i the same
# frequency of the central square view.
COEFFICIENTS = low_frequency_coefficients(VIEW_DIM)
_U = np.array([u for u, _ in COEFFICIENTS])
_V = np.array([v for _, v in COEFFICIENTS])
_BLOCK = int(max(_U.max(), _V.max())) + 1
_DCT = dct_matrix(GRID, _BLOCK).astype(np.float32)
_FREQUENCY_WEIGHT = (np.maximum(np.hypot(_U, _V), 1.0) ** FREQUENCY_EXPONENT).astype(np.float32)
# Squared angular frequency per coefficient of the block: Parseval turns
# sum(w^2 c^2) into the mean squared gradient of the low-passed view.
_OMEGA = np.pi * np.arange(_BLOCK) / GRID
_GRADIENT_WEIGHT = (_OMEGA[:, None] ** 2 + _OMEGA[None, :] ** 2).astype(np.float32)

# The dihedral group, identity first, as PIL transposes and as coefficient
# actions (swap u<->v first, then negate odd-u and/or odd-v coefficients).
DIHEDRAL_TRANSFORMS: tuple[Image.Transpose | None, ...] = (
    None,
    Image.Transpose.FLIP_LEFT_RIGHT,
    Image.Transpose.FLIP_TOP_BOTTOM,
    Image.Transpose.ROTATE_180,
    Image.Transpose.TRANSPOSE,
    Image.Transpose.ROTATE_90,
    Image.Transpose.ROTATE_270,
    Image.Transpose.TRANSVERSE,
)
_DIHEDRAL_ACTIONS = (  # (swap u and v, negate odd u, negate odd v)
    (False, False, False),
    (False, False, True),  # mirror: x -> -x flips odd horizontal frequencies
    (False, True, False),
    (False, True, True),
    (True, False, False),
    (True, True, False),  # PIL ROTATE_90 is counter-clockwise: new[i, j] = old[j, N-1-i]
    (True, False, True),
    (True, True, True),
)


def _dihedral_tables() -> tuple[np.ndarray, np.ndarray]:
    """(8, DIM) source index and (8, DIM) sign: variant[:, i] = sign[i] * vector[:, source[i]]."""
    position = {uv: i for i, uv in enumerate(COEFFICIENTS)}
    transposed = np.array([position[(v, u)] for u, v in COEFFICIENTS])
    identity = np.arange(VIEW_DIM)
    sources, signs = [], []
    for swap, negate_u, negate_v in _DIHEDRAL_ACTIONS:
        view_source = transposed if swap else identity
        sign = np.ones(VIEW_DIM, dtype=np.float32)
        if negate_u:
            sign *= (-1.0) ** _U
        if negate_v:
            sign *= (-1.0) ** _V
        sources.append(np.concatenate([view_source, view_source + VIEW_DIM]))
        signs.append(np.concatenate([sign, sign]))
    return np.stack(sources), np.stack(signs).astype(np.float32)


_DIHEDRAL_SOURCE, _DIHEDRAL_SIGN = _dihedral_tables()


def dihedral_variants(vectors: np.ndarray) -> np.ndarray:
    """(n, 256) descriptors -> (8, n, 256): the same images flipped/rotated (order of DIHEDRAL_TRANSFORMS)."""
    vectors = _as_descriptor_rows(vectors)
    return np.ascontiguousarray(vectors[:, _DIHEDRAL_SOURCE].transpose(1, 0, 2) * _DIHEDRAL_SIGN[:, None, :])


def dihedral_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, 256) x (m, 256) -> (n, m): cosine of the best-aligned orientation of each pair.

    Symmetric: every variant is a signed permutation, so sim(a, b) = sim(b, a).T.
    """
    b = _as_descriptor_rows(b)
    return np.einsum("gnd,md->gnm", dihedral_variants(a), b, optimize=True).max(axis=0)


def _as_descriptor_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2 or vectors.shape[1] != DIM:
        raise DedupError(
            f"perceptual vectors must have shape (n, {DIM}), got {vectors.shape}",
            hint="pass rows produced by PerceptualDescriptor.embed (or describe())",
        )
    return vectors


# --- letterbox / padding detection -------------------------------------------------------------


def _bar_profile(lines: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per line of an (n, m, 3) array: mean channel deviation from `colour`, fraction of values far from it."""
    flat = lines.reshape(len(lines), -1).astype(np.float32)  # long rows reduce much faster than (m, 3)
    deviation = np.abs(flat - np.tile(colour, lines.shape[1]))
    return deviation.mean(axis=1), (deviation > 2 * BAR_TOLERANCE).mean(axis=1)


def _bar_length(lines: np.ndarray, limit: int) -> tuple[int, np.ndarray, bool]:
    """Leading lines (rows of an (n, m, 3) array) that form a bar ending in a clear step.

    A bar is uniform lines, possibly with caption text inside (meme-style bands:
    lines where most pixels keep the bar colour). It must open with clean lines
    and ends at its last uniform line, so text never counts as picture. The third
    value says whether the bar holds text.
    """
    colour = np.median(lines[0], axis=0).astype(np.float32)
    head_deviation, head_outliers = _bar_profile(lines[:MIN_CLEAN_LINES], colour)
    if not ((head_deviation < BAR_TOLERANCE) & (head_outliers <= 0.1)).all():
        return 0, colour, False  # the common case: no bar, decided from two lines
    deviation, outliers = _bar_profile(lines[:limit], colour)
    # Uniform on average and nearly everywhere (a line crossing the picture is not a bar).
    uniform = (deviation < BAR_TOLERANCE) & (outliers <= 0.1)
    inside = uniform | (outliers <= MAX_TEXT_FRACTION)
    run = len(inside) if inside.all() else int(np.argmin(inside))
    clean = np.flatnonzero(uniform[:run])
    length = int(clean[-1]) + 1 if len(clean) else 0
    step_lines = lines[length : length + BAR_STEP_LOOKAHEAD]
    if length == 0 or len(step_lines) == 0:
        return 0, colour, False
    if _bar_profile(step_lines, colour)[0].max() < BAR_STEP:
        return 0, colour, False  # the "bar" fades into the picture: it is part of the photo
    return length, colour, int((~uniform[:length]).sum()) >= MIN_TEXT_LINES


def _opening_bars(lines: np.ndarray) -> tuple[bool, bool]:
    """Does each end of axis 0 open with MIN_CLEAN_LINES uniform lines (`_bar_length`'s first test)?

    Every image takes this test on all four sides, so both ends go through one stack of
    lines, in integers (twice the median colour is exact): a few array operations a side.
    """
    ends = np.concatenate([lines[:MIN_CLEAN_LINES], lines[::-1][:MIN_CLEAN_LINES]]).astype(np.int16)
    width = ends.shape[1]
    middle = np.partition(ends[::MIN_CLEAN_LINES], ((width - 1) // 2, width // 2), axis=1)
    twice_colour = middle[:, (width - 1) // 2] + middle[:, width // 2]  # each end's first line
    deviation = np.abs(2 * ends - np.repeat(twice_colour, MIN_CLEAN_LINES, axis=0)[:, None, :]).reshape(len(ends), -1)
    values = deviation.shape[1]
    uniform = deviation.sum(axis=1) < 2 * BAR_TOLERANCE * values
    uniform &= np.count_nonzero(deviation > 4 * BAR_TOLERANCE, axis=1) <= 0.1 * values
    start, end = uniform.reshape(2, MIN_CLEAN_LINES).all(axis=1)
    return bool(start), bool(end)


def _paired_bars(lines: np.ndarray, opening: tuple[bool, bool] | None = None) -> tuple[int, int]:
    """Bars at both ends of axis 0 of lines, kept when they match in colour and size or carry captions.

    A plain one-sided band is kept as picture (a grey sky above a horizon); a white or
    black band with text in it is a caption band (a meme's top text), added on one side or both.
    """
    limit = int(len(lines) * MAX_BAR_FRACTION)
    if limit == 0:
        return 0, 0
    opens_start, opens_end = opening if opening is not None else _opening_bars(lines)
    if not (opens_start or opens_end):
        return 0, 0  # the common case: no bar at either end
    start, start_colour, start_text = _bar_length(lines, limit) if opens_start else (0, None, False)
    end, end_colour, end_text = _bar_length(lines[::-1], limit) if opens_end else (0, None, False)
    if start and end:
        same_colour = np.abs(start_colour - end_colour).max() <= 2 * BAR_TOLERANCE
        same_size = abs(start - end) <= max(2, 0.3 * max(start, end))
        if same_colour and same_size:
            return start, end
        covered_end = _bar_under_strip(lines[::-1], end, start, start_colour, limit) if end_text and not start_text else 0
        if covered_end:
            return start, covered_end
        covered_start = _bar_under_strip(lines, start, end, end_colour, limit) if start_text and not end_text else 0
        if covered_start:
            return covered_start, end
    return (start if start_text and _blank(start_colour) else 0), (end if end_text and _blank(end_colour) else 0)


def _bar_under_strip(lines: np.ndarray, strip: int, other: int, colour: np.ndarray, limit: int) -> int:
    """Lines of a bar whose outer part a caption strip (`strip` lines with text) covers, 0 when there is none.

    A translucent strip drawn over a letterboxed copy tints the outer lines of one bar; past the
    strip the bar goes on in its own colour. Strip and visible bar together then match the bar at
    the other end (`other` lines of `colour`) in size.
    """
    for smear in range(BAR_STEP_LOOKAHEAD):  # the line where strip and bar meet is blended
        start = strip + smear
        rest, rest_colour, _ = _bar_length(lines[start:], max(0, limit - start))
        if rest and np.abs(rest_colour - colour).max() <= 2 * BAR_TOLERANCE:
            total = start + rest
            return total if abs(total - other) <= max(2, 0.3 * max(total, other)) else 0
    return 0


def _blank(colour: np.ndarray) -> bool:
    """White or black: the colour of caption bands (a sky with a watermark on it is neither)."""
    return bool(min(np.abs(colour).max(), np.abs(255.0 - colour).max()) <= 2 * BAR_TOLERANCE)


def _line_detail(lines: np.ndarray) -> np.ndarray:
    """Mean absolute step of the channel mean between neighbouring pixels of each line of an (n, m, 3) array.

    The channel mean, not one channel: averaging three channels keeps JPEG noise below the threshold in
    blurred bars. Integer maths keeps it cheap.
    """
    total = lines.astype(np.int16).sum(axis=2)
    return np.abs(np.diff(total, axis=1)).mean(axis=1) / 3.0


def _blurred_bar_end(lines: np.ndarray, limit: int) -> int:
    """Leading lines of a blurred bar: smooth on the whole, ending in the first clear step into the picture.

    The bar ends at the first step that stands out against the steps between the lines
    before it (a blurred bar barely changes from line to line), not where detail first
    rises: the blurred stretch gains some detail near the picture, and the pasted picture
    may open with smooth lines of its own (the fill corners of a rotated copy).
    """
    block = lines[: limit + 1, :, 1].astype(np.int16)
    steps = np.abs(np.diff(block, axis=0)).mean(axis=1)  # steps[i]: line i -> i + 1
    mean_before = np.cumsum(steps) / np.arange(1, len(steps) + 1)  # mean_before[i - 1]: steps[:i]
    candidates = np.arange(MIN_BLUR_BAR - 1, len(steps))
    stands_out = (steps[candidates] >= BLUR_MIN_STEP) & (steps[candidates] >= BLUR_EDGE_CONTRAST * mean_before[candidates - 1])
    edges = candidates[stands_out] + 1
    if not len(edges) or edges[0] >= limit:
        return 0
    bar = int(edges[0])
    if np.median(_line_detail(lines[:bar])) >= 2 * BLUR_DETAIL:
        return 0  # detailed lines before the step: picture, not a bar
    return bar


def _blurred_bars(lines: np.ndarray) -> tuple[int, int]:
    """Bars made of a blurred, stretched copy of the picture, matched in size at both ends of axis 0."""
    limit = int(len(lines) * MAX_BAR_FRACTION)
    if limit <= MIN_BLUR_BAR or lines.shape[1] < 2:
        return 0, 0
    if _line_detail(lines[[0, -1]]).max() >= BLUR_DETAIL:
        return 0, 0  # bars come in pairs: both edge lines must be smooth (a sky alone is not a bar)
    start = _blurred_bar_end(lines, limit)
    end = _blurred_bar_end(lines[::-1], limit) if start else 0
    if start and end and abs(start - end) <= max(2, 0.05 * max(start, end)):
        return start, end
    return 0, 0


def _covered_frame(rgb: np.ndarray, sides: tuple[int, int], opens_top: bool | None = None) -> int:
    """Width of a frame whose bottom a caption strip covers (0 when there is none).

    A translucent strip drawn over the bottom of a framed copy hides the bottom bar and
    darkens the foot of the side bars, so the top bar stands alone (kept as picture) and the
    side bars may not pair up either. Above the strip the frame is whole: a plain top bar
    whose colour and size the side bars (`sides`, else those of the upper part) repeat is
    that frame, on all four sides.
    """
    height = rgb.shape[0]
    if not (opens_top if opens_top is not None else _opening_bars(rgb)[0]):
        return 0
    top, colour, _ = _bar_length(rgb, int(height * MAX_BAR_FRACTION))
    if top < MIN_FRAME:
        return 0  # a line or two of fill at the top of a turned copy on a grown canvas, not a frame
    upper = rgb[: height - int(height * MAX_CAPTION_STRIP)].transpose(1, 0, 2)
    left, right = sides if sides[0] and sides[1] else _paired_bars(upper)
    if not (left and right) or max(abs(left - top), abs(right - top)) > max(2, 0.1 * top):
        return 0
    side_colour = np.median(upper[0], axis=0)
    return top if np.abs(side_colour - colour).max() <= 2 * BAR_TOLERANCE else 0


def _peel(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) widths of the outermost layer of bars of an (h, w, 3) array."""
    # Most images have no bar: the rows' opening test is shared with the covered-frame check below.
    opening = _opening_bars(rgb) if int(len(rgb) * MAX_BAR_FRACTION) else None
    top, bottom = _paired_bars(rgb, opening)
    left, right = _paired_bars(rgb.transpose(1, 0, 2))
    if not (left or right):
        # A caption strip over the foot of pillarbox bars writes into them: pair them above it.
        upper = rgb[: rgb.shape[0] - int(rgb.shape[0] * MAX_CAPTION_STRIP)]
        middle = len(upper) // 2
        sides_alike = _alike(upper, (0, 0), (middle, 0)) and _alike(upper, (0, -1), (middle, -1))
        if sides_alike and _alike(upper, (0, 0), (0, -1)):  # 4 pixels first: bars of one colour on both sides
            left, right = _paired_bars(upper.transpose(1, 0, 2))
    if not (top or bottom) and bool(left) == bool(right):
        frame = _covered_frame(rgb, (left, right), opening[0] if opening is not None else None)
        if frame:
            return frame, frame, frame, frame
    if not (top or bottom or left or right):
        top, bottom = _blurred_bars(rgb)
        left, right = _blurred_bars(rgb.transpose(1, 0, 2))
    return left, top, right, bottom


def _alike(rgb: np.ndarray, first: tuple[int, int], *others: tuple[int, int]) -> bool:
    """Is the pixel at `first` within a bar's tolerance of some pixel at `others`? (bars share one colour)"""
    reference = rgb[first].tolist()  # plain ints: a few numbers, compared without numpy's per-call cost
    for other in others:
        if max(abs(p - q) for p, q in zip(rgb[other].tolist(), reference, strict=True)) <= 2 * BAR_TOLERANCE:
            return True
    return False


def content_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the picture inside letterbox/pillarbox/padding bars of an (h, w, 3) array.

    Bars are peeled layer by layer: a framed copy may have been letterboxed again.
    """
    height, width = rgb.shape[:2]
    left, top, right, bottom = 0, 0, width, height
    for layer in range(MAX_BAR_LAYERS):
        peel = _peel(rgb[top:bottom, left:right])
        inner = rgb[top + 1 : bottom - 1, left + 1 : right - 1]
        if not any(peel) and layer and min(inner.shape[:2]) > 0 and _alike(inner, (0, 0), (0, -1), (-1, 0)):
            # The line where the outer bar met this layer is blended (resize, JPEG): look one line in.
            peel = tuple(side + 1 if side else 0 for side in _peel(inner))
        if not any(peel):
            break
        peel_left, peel_top, peel_right, peel_bottom = peel
        left, top, right, bottom = left + peel_left, top + peel_top, right - peel_right, bottom - peel_bottom
    return left, top, right, bottom


# --- fill corners of a rotated copy ----------------------------------------------------------------

# A copy rotated by a few degrees inside its frame (or on an expanded canvas) has a
# triangle of one fill colour in each corner. Those triangles are strong low-frequency
# structure that the original lacks, and every rotated copy shares them: left alone they
# pull a copy away from its original and two unrelated rotated photos together.
FILL_TOLERANCE = 24  # max channel distance from the fill colour (JPEG rings near the edge)
FILL_INSET = 2  # legs are measured this many lines inside the frame (the outer line may be smeared)
MIN_FILL_LEG = 4  # shorter legs (rotations under ~1.5 degrees here) hurt little and are left alone
MAX_FILL_ANGLE = 12.0  # degrees: larger angles are not "small rotations"
FILL_ANGLE_AGREEMENT = 1.5  # degrees: the four corners must tell the same angle
FIT_LINES = 48  # lines sampled along a long leg for the hypotenuse fit
MIN_FIT_LINES = 8  # a short leg crossed by fewer lines is fitted from the lines crossing the long leg
FILL_LINE_SHARE = 0.98  # a bar line of the fill colour (JPEG specks aside)
FILL_CHECK_PIXELS = 4096  # pixels of a borrowed triangle checked for fill (on a grid)
BORROWED_FILL_SHARE = 0.75  # share of a borrowed triangle that must be fill when two fitted corners agree
FILL_STRAIGHTNESS = 0.04  # the hypotenuse must be straight: RMS misfit of the runs, share of the long leg


def _fill_run(line: np.ndarray, colour: np.ndarray) -> int:
    """Leading pixels of a (n, 3) line within FILL_TOLERANCE of `colour`."""
    near = np.abs(line.astype(np.int16) - colour).max(axis=1) <= FILL_TOLERANCE
    return len(near) if near.all() else int(np.argmin(near))


def _corner_triangle(corner: np.ndarray, colour: np.ndarray) -> tuple[float, float] | None:
    """Legs (along x, along y) of a fill triangle at the top-left of `corner` (h, w, 3), or None.

    The fill runs of the lines crossing the long leg are fitted with a straight
    hypotenuse (least squares): the legs come out sub-pixel exact, and a photo's own
    dark corner, which is not bounded by a straight line, is refused by the residual.
    """
    along_y = _fill_run(corner[:, FILL_INSET], colour)
    along_x = _fill_run(corner[FILL_INSET], colour)
    height, width = corner.shape[:2]
    if along_x >= width - 1 or along_y >= height - 1 or min(along_x, along_y) < MIN_FILL_LEG:
        return None  # a bar along a whole side, or no triangle
    if min(along_x, along_y) > max(along_x, along_y) * math.tan(math.radians(MAX_FILL_ANGLE + 3)):
        return None  # a blob of the fill colour (a white background), not a thin wedge
    long_leg_along_y = along_x < along_y
    legs = _oriented_fit(corner, colour, along_x, along_y, transposed=long_leg_along_y)
    if legs is None and min(along_x, along_y) < MIN_FIT_LINES:
        # A thin wedge (a few degrees on a small image): too few lines cross its short leg,
        # so fit the many short runs of the lines crossing its long leg instead.
        legs = _oriented_fit(corner, colour, along_x, along_y, transposed=not long_leg_along_y)
    return legs


def _oriented_fit(corner: np.ndarray, colour: np.ndarray, along_x: int, along_y: int,
                  transposed: bool) -> tuple[float, float] | None:
    """`_fitted_legs` with the corner's top row (`transposed=False`) or left column along its first axis."""
    if not transposed:
        return _fitted_legs(corner, colour, along_x)
    legs = _fitted_legs(corner.transpose(1, 0, 2), colour, along_y)
    return None if legs is None else (legs[1], legs[0])


def _fitted_legs(corner: np.ndarray, colour: np.ndarray, long_leg: int) -> tuple[float, float] | None:
    """(long leg along x, short leg along y) of the triangle whose long leg runs along the top row."""
    height, width = corner.shape[:2]
    short_leg = _fill_run(corner[:, FILL_INSET], colour)
    if short_leg < MIN_FILL_LEG or long_leg >= width - 1 or short_leg >= height // 2:
        return None
    sampled = np.unique(np.linspace(FILL_INSET, short_leg, min(FIT_LINES, short_leg - FILL_INSET + 1)).astype(int))
    near = np.abs(corner[sampled, : long_leg + 2].astype(np.int16) - colour).max(axis=2) <= FILL_TOLERANCE
    runs = np.cumprod(near, axis=1).sum(axis=1).astype(np.float64)
    keep = (runs > 1) & (runs < min(width - 1, long_leg + 2))  # a 1-pixel run is the smeared frame edge
    rows, runs = sampled[keep], runs[keep]
    if len(rows) < 3:
        return None
    slope, intercept = np.polyfit(rows, runs, 1)
    error = np.abs(runs - (intercept + slope * rows))
    trusted = error <= np.quantile(error, 0.75)  # JPEG specks end a few runs early: refit without them
    slope, intercept = np.polyfit(rows[trusted], runs[trusted], 1)
    if slope >= 0 or intercept <= 0:
        return None
    residual = np.sqrt(np.mean((runs[trusted] - (intercept + slope * rows[trusted])) ** 2))
    if residual > max(1.5, FILL_STRAIGHTNESS * intercept):
        return None  # not a straight edge: a dark or bright corner of the photo itself
    return float(intercept), float(-intercept / slope)


@dataclass(frozen=True)
class FillCorners:
    """A copy rotated with fill corners: its angle (PIL `rotate` convention) and the four triangles."""

    angle: float
    legs: tuple[tuple[float, float], ...]  # (along x, along y) at TL, TR, BL, BR, each seen from its corner


def _smooth_fill(luma: Image.Image, inside: np.ndarray) -> np.ndarray:
    """The picture's nearby luma smeared into the cut corners (normalised convolution).

    A flat fill would leave a sharp diagonal edge in each corner, the same in every
    copy rotated by that angle, which two unrelated low-structure photos would share.
    """
    radius = max(2.0, 0.05 * max(luma.size))
    weight = Image.fromarray(inside.astype(np.uint8) * 255)
    masked = Image.fromarray(np.where(inside, np.asarray(luma), 0).astype(np.uint8))
    blur = ImageFilter.GaussianBlur(radius)
    total = np.asarray(masked.filter(blur), dtype=np.float32)
    share = np.asarray(weight.filter(blur), dtype=np.float32) / 255.0
    mean = float(np.asarray(luma, dtype=np.float32)[inside].mean()) if inside.any() else 0.0
    return np.where(share > 0.02, total / np.maximum(share, 1e-3), mean)


def _same_corners(rgb: np.ndarray) -> bool:
    """Do the four corner pixels share one colour (the cheap first test for fill corners)?"""
    return _fill_corner_ids(rgb) == ALL_CORNERS


ALL_CORNERS = (0, 1, 2, 3)  # TL, TR, BL, BR
# Two corners along one side, and the two along the opposite side: a translucent strip drawn over
# one side of a turned copy (a news caption over the bottom) tints that side's fill corners alike.
_CORNER_PAIRS = (((0, 1), (2, 3)), ((2, 3), (0, 1)), ((0, 2), (1, 3)), ((1, 3), (0, 2)))


def _fill_corner_ids(rgb: np.ndarray) -> tuple[int, ...]:
    """The corners to fit fill triangles in: all four when their pixels share a colour, or two corners
    along one side sharing white or black when the two opposite share some other colour; () otherwise."""
    if rgb.shape[0] < 2 * MIN_FILL_LEG or rgb.shape[1] < 2 * MIN_FILL_LEG:
        return ()
    colours = rgb[[0, 0, -1, -1], [0, -1, 0, -1]].astype(np.int16).tolist()

    def alike(a: int, b: int) -> bool:  # 12 numbers: plain Python beats numpy's per-call cost
        (r, g, b_), (r2, g2, b2) = colours[a], colours[b]
        return max(abs(r - r2), abs(g - g2), abs(b_ - b2)) <= FILL_TOLERANCE

    if alike(0, 1) and alike(0, 2) and alike(0, 3):
        return ALL_CORNERS
    for (a, b), (c, d) in _CORNER_PAIRS:
        if alike(a, b) and alike(c, d) and _blank(np.array(colours[a])):
            return a, b
    return ()


def _corner_views(rgb: np.ndarray) -> tuple[np.ndarray, ...]:
    return rgb, rgb[:, ::-1], rgb[::-1, :], rgb[::-1, ::-1]  # TL, TR, BL, BR, each seen as top-left


def fill_rotation(rgb: np.ndarray) -> FillCorners | None:
    """The fill triangles of a copy rotated by a small angle (in its frame or on a grown canvas), or None.

    Each corner's triangle is fitted where the fill meets the picture; where the picture
    itself has the fill colour (a white sky, a black suit) the edge is invisible, so that
    corner borrows the legs of the opposite one (a rotation about the centre makes them
    equal) and must be fill-coloured over the whole borrowed triangle. At least two
    fitted corners must tell the same small angle: a photo's own dark corners do not.
    Under a strip along one side only the two corners of the other side are fitted.
    """
    corners = _corner_views(rgb)
    candidates = _fill_corner_ids(rgb)
    if not candidates:
        return None
    colours = np.stack([corners[index][0, 0] for index in candidates]).astype(np.int16)
    colour = np.median(colours, axis=0).astype(np.int16)
    fitted = [_corner_triangle(corner, colour) if index in candidates else None for index, corner in enumerate(corners)]
    angles = {index: _signed_angle(index, legs) for index, legs in enumerate(fitted) if legs is not None}
    if not angles:
        return None
    consensus = float(np.median(list(angles.values())))
    # A corner whose picture runs dark (or bright) into the fill misreads its legs: it borrows instead.
    agreeing = {index: angle for index, angle in angles.items() if abs(angle - consensus) <= FILL_ANGLE_AGREEMENT}
    needed = len(candidates) if len(candidates) < len(ALL_CORNERS) else max(1, len(angles) - 1)
    if len(agreeing) < needed or abs(consensus) > MAX_FILL_ANGLE:
        return None
    fitted = [legs if index in agreeing else None for index, legs in enumerate(fitted)]
    angles = list(agreeing.values())
    legs = [legs if legs is not None else fitted[3 - index] for index, legs in enumerate(fitted)]
    if any(leg is None for leg in legs):
        legs = _grown_canvas_legs(legs, rgb.shape[1], rgb.shape[0])
    borrowed = [index for index, leg in enumerate(fitted) if leg is None]
    # Two fitted corners agreeing on one angle are strong evidence: a borrowed corner may then be partly
    # covered (a watermark or caption text over it), or tinted by a strip.
    share = BORROWED_FILL_SHARE if len(agreeing) >= 2 else 0.9
    if any(not _is_filled(corners[index], legs[index], colour, share) for index in borrowed):
        return None
    return FillCorners(float(np.mean(angles)), tuple(legs))


def _grown_canvas_legs(legs: list, width: int, height: int) -> list[tuple[float, float]]:
    """Complete one missing pair of opposite corners on a canvas grown to hold the rotated picture.

    There the picture's corners touch the canvas edges, so a corner's legs and its
    neighbour's add up to the canvas side. `_is_filled` then checks the guess.
    """
    known = 0 if legs[0] is not None else 1
    along_x, along_y = legs[known]
    other = (width - along_x, height - along_y)
    return [legs[i] if legs[i] is not None else other for i in range(4)]


def _signed_angle(index: int, legs: tuple[float, float]) -> float:
    along_x, along_y = legs
    # A counter-clockwise turn leaves the long leg along x at TL and BR, along y at TR and BL.
    sign = 1.0 if (along_x > along_y) == (index in (0, 3)) else -1.0
    return sign * math.degrees(math.atan(min(legs) / max(legs)))


def _is_filled(corner: np.ndarray, legs: tuple[float, float], colour: np.ndarray, share: float = 0.9) -> bool:
    """Is the triangle with these legs at the top-left of `corner` (almost) all fill colour?"""
    along_x, along_y = legs
    if min(along_x, along_y) < 1:
        return False
    height, width = min(int(along_y), corner.shape[0]), min(int(along_x), corner.shape[1])
    step = max(1, int(math.sqrt(height * width / FILL_CHECK_PIXELS)))  # a share needs no more pixels
    rows, cols = np.mgrid[:height:step, :width:step]
    inside = cols / along_x + rows / along_y < 0.9  # off the smeared hypotenuse
    pixels = corner[:height:step, :width:step].astype(np.int16)
    near = np.abs(pixels - colour).max(axis=2) <= FILL_TOLERANCE
    # or the corner's own colour: the fill under a translucent strip is tinted
    near |= np.abs(pixels - pixels[0, 0]).max(axis=2) <= FILL_TOLERANCE
    return bool(inside.any() and near[inside].mean() >= share)


def _unrotated_luma(thumbnail: Image.Image, fill: FillCorners) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The luma turned back by the fill angle, the fill replaced by the picture's mean, and the picture's box.

    Turning back aligns the copy with its original; the corners the rotation cut off stay
    unknown and get the picture's mean, which the DCT (DC dropped) sees as no structure.
    """
    width, height = thumbnail.size
    valid = Image.new("L", thumbnail.size, 255)
    draw = ImageDraw.Draw(valid)
    for (x0, y0, sx, sy), (along_x, along_y) in zip(
        ((0, 0, 1, 1), (width, 0, -1, 1), (0, height, 1, -1), (width, height, -1, -1)), fill.legs, strict=True
    ):
        pad = 1.5  # the smeared hypotenuse belongs to the fill
        draw.polygon([(x0, y0), (x0 + sx * (along_x + pad), y0), (x0, y0 + sy * (along_y + pad))], fill=0)
    luma = thumbnail.convert("L").rotate(-fill.angle, resample=Image.Resampling.BILINEAR)
    inside = np.asarray(valid.rotate(-fill.angle, resample=Image.Resampling.BILINEAR)) >= 250
    pixels = np.where(inside, np.asarray(luma, dtype=np.float32), _smooth_fill(luma, inside))
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1) if len(rows) else (0, 0, width, height)
    return Image.fromarray(pixels.astype(np.uint8)), box


# --- the descriptor ----------------------------------------------------------------------------


def _thumbnail(image: Image.Image) -> Image.Image:
    """Integer box-reduce to a long side of TRIM_THUMBNAIL_SIDE..2*TRIM_THUMBNAIL_SIDE-1 (cheap: no resampling)."""
    factor = max(image.size) // TRIM_THUMBNAIL_SIDE
    return image.reduce(factor) if factor >= 2 else image


def _central_square(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    left, top, right, bottom = box
    side = min(right - left, bottom - top)
    centre_x, centre_y = (left + right) / 2, (top + bottom) / 2
    return centre_x - side / 2, centre_y - side / 2, centre_x + side / 2, centre_y + side / 2


def _low_frequencies(luma: Image.Image, box: tuple[float, float, float, float]) -> np.ndarray:
    """The box of `luma` area-resized to GRID x GRID -> its (_BLOCK, _BLOCK) lowest DCT coefficients, DC zeroed."""
    view = np.asarray(luma.resize((GRID, GRID), Image.Resampling.BOX, box=box), dtype=np.float32)
    coefficients = _DCT @ view @ _DCT.T
    coefficients[0, 0] = 0.0
    return coefficients


def structure(coefficients: np.ndarray) -> float:
    """RMS luma gradient of the low-passed view, in grey levels per grid pixel."""
    return float(np.sqrt((_GRADIENT_WEIGHT * coefficients**2).sum()) / GRID)


def _signature(coefficients: np.ndarray) -> np.ndarray:
    """(_BLOCK, _BLOCK) coefficients -> the VIEW_DIM weighted, compressed, unit-length values."""
    weighted = coefficients[_U, _V] * _FREQUENCY_WEIGHT
    compressed = np.sign(weighted) * np.abs(weighted) ** COEFFICIENT_POWER
    return compressed / max(float(np.linalg.norm(compressed)), 1e-12)


def _picture(thumbnail: Image.Image) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The luma to describe and the picture's box in it: bars trimmed, a turn with fill corners undone.

    A rotated copy may also have been letterboxed or framed afterwards, so when the
    whole image shows no fill corners the box inside its bars is looked at again.
    """
    rgb = np.asarray(thumbnail)
    full = (0, 0, rgb.shape[1], rgb.shape[0])
    if _fill_corner_ids(rgb):
        fill = fill_rotation(rgb)
        if fill is not None:
            return _unrotated_luma(thumbnail, fill)
        margins = _fill_margins(rgb)  # bars of the fill colour around the turned picture
    else:
        margins = full
    box = content_box(rgb)
    for inner_box in (box, margins):
        if inner_box == full:
            continue
        inner_box = _inset(inner_box, full)  # the line where bar and picture meet is smeared
        if _fill_corner_ids(rgb[inner_box[1]:inner_box[3], inner_box[0]:inner_box[2]]):
            inner = thumbnail.crop(inner_box)
            fill = fill_rotation(np.asarray(inner))
            if fill is not None:
                return _unrotated_luma(inner, fill)
    return thumbnail.convert("L"), box


def _inset(box: tuple[int, int, int, int], full: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """`box` one pixel smaller on every side where it is inside the frame `full`."""
    left, top, right, bottom = box
    return (left + (left > full[0]), top + (top > full[1]), right - (right < full[2]), bottom - (bottom < full[3]))


def _fill_margins(rgb: np.ndarray) -> tuple[int, int, int, int]:
    """Box inside the rows and columns at the edges that are all the corner colour (bars the fill merges with)."""
    colour = rgb[0, 0].astype(np.int16)
    height, width = rgb.shape[:2]
    top, bottom = _fill_lines(rgb, colour), _fill_lines(rgb[::-1], colour)
    left, right = _fill_lines(rgb.transpose(1, 0, 2), colour), _fill_lines(rgb[:, ::-1].transpose(1, 0, 2), colour)
    if top + bottom >= height or left + right >= width:
        return 0, 0, width, height
    return left, top, width - right, height - bottom


def _fill_lines(lines: np.ndarray, colour: np.ndarray, block: int = 8) -> int:
    """Leading lines of an (n, m, 3) array that are (almost) all `colour`, read a few lines at a time."""
    start = 0
    while start < len(lines):
        near = np.abs(lines[start : start + block].astype(np.int16) - colour).max(axis=2) <= FILL_TOLERANCE
        full = near.mean(axis=1) >= FILL_LINE_SHARE
        if not full.all():
            return start + int(np.argmin(full))
        start += block
    return len(lines)


def perceptual_vector(image: Image.Image) -> np.ndarray:
    """One image -> its (256,) float32 descriptor (unit length, or all zeros when featureless)."""
    if image.mode != "RGB":
        image = to_rgb(image)
    luma, box = _picture(_thumbnail(image))
    whole = _low_frequencies(luma, box)
    if structure(whole) < MIN_STRUCTURE:
        return np.zeros(DIM, dtype=np.float32)
    central = _low_frequencies(luma, _central_square(box))
    vector = np.concatenate([_signature(whole), _signature(central)]) / math.sqrt(2.0)
    return vector.astype(np.float32)


class PerceptualDescriptor:
    """The `perceptual` descriptor: no weights, ~1 ms per decoded image on one core."""

    name: ClassVar[str] = "perceptual"
    dim: int = DIM
    # JPEGs may be DCT-downscaled to this short side: the 64x64 views then
    # average >= 2x2 decoded pixels and bar edges stay sharp enough to trim.
    min_side: int = 128

    def prepare(self, image: Image.Image) -> np.ndarray:
        return perceptual_vector(image)

    def embed(self, prepared: np.ndarray) -> np.ndarray:
        return l2_normalize(_as_descriptor_rows(prepared))


def describe(images: Sequence[Image.Image]) -> np.ndarray:
    """Images (any PIL mode) -> (n, 256) float32 descriptors, as the pipeline would store them."""
    descriptor = PerceptualDescriptor()
    if len(images) == 0:
        return np.zeros((0, DIM), dtype=np.float32)
    return descriptor.embed(np.stack([descriptor.prepare(image) for image in images]))
