"""Calibrate and check the `perceptual` descriptor on real duplicate groups.

    python benchmarks/perceptual_realdups.py [--data ../shared/data/real-dups] [--threshold 0.55]

Reads `groups.csv` + `images/` of the real-dups set, decodes every image the
way the pipeline does (`dedup.decode.decode_image`, JPEG DCT-downscaled to the
descriptor's `min_side`), describes it, and compares every pair with
`dihedral_similarity` (max over the 8 flips/rotations). Prints:

* label corrections, each re-verified from the pixels (the set's labels merge
  or split a few pictures wrongly; numbers are shown both ways),
* per group: pairs, recall at the threshold, lowest pair similarity,
* the highest cross-group similarities (hard negatives and distinct photos
  included) and the threshold they allow with a margin,
* synthetic edits of the set's photos (median / 5th percentile similarity),
* a stress tail: random crops of different photos as negatives (quantiles),
* prepare() milliseconds per image.
"""

from __future__ import annotations

import argparse
import csv
import io
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from dedup.decode import decode_image
from dedup.descriptors.perceptual import (
    DEFAULT_THRESHOLD,
    PerceptualDescriptor,
    dihedral_similarity,
    dihedral_variants,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-dups"
# The threshold must clear the highest real cross-group pair by MARGIN and the
# highest random-crop stress pair by STRESS_MARGIN.
MARGIN = 0.15
STRESS_MARGIN = 0.05
SCENE = "scene"  # images that are neither copies nor unrelated: excluded from both sides
NOISE = "noise"  # random-noise fixtures: each its own group, never used as a photo


@dataclass(frozen=True)
class Row:
    file: str
    group: str  # after corrections
    labelled_group: str
    kind: str

    @property
    def name(self) -> str:
        return Path(self.file).name


@dataclass(frozen=True)
class Correction:
    """A label the pixels contradict. `evidence` re-measures it on every run."""

    files: tuple[str, ...]
    new_group: str  # a group id, or SCENE / NOISE (each file then gets its own group)
    reason: str
    evidence: Callable[[Path], str]


# --- evidence helpers (pixel measurements, so a correction is never taken on faith) -------------


def _luma(path: Path) -> np.ndarray:
    image = ImageOps.exif_transpose(Image.open(path)).convert("L")
    return np.asarray(image, dtype=np.float64)


def _mean_abs_difference(data: Path, a: str, b: str) -> str:
    x, y = _luma(data / "images" / a), _luma(data / "images" / b)
    if x.shape != y.shape:
        return f"sizes differ {x.shape} vs {y.shape}"
    return f"mean |luma difference| = {np.abs(x - y).mean():.2f}/255"


def _raw_mean_abs_difference(data: Path, a: str, b: str) -> str:
    """Pixels as stored, ignoring EXIF orientation."""
    x = np.asarray(Image.open(data / "images" / a).convert("L"), dtype=np.float64)
    y = np.asarray(Image.open(data / "images" / b).convert("L"), dtype=np.float64)
    exif = Image.open(data / "images" / a).getexif().get(0x0112, 1)
    return f"stored pixels: mean |difference| = {np.abs(x - y).mean():.2f}/255 (EXIF orientation tag {exif})"


def _neighbour_correlation(data: Path, name: str) -> str:
    pixels = np.asarray(Image.open(data / "images" / name), dtype=np.float64)
    pixels = pixels[..., 0] if pixels.ndim == 3 else pixels
    corr = np.corrcoef(pixels[:, 1:].ravel(), pixels[:, :-1].ravel())[0, 1]
    return f"{name[-14:]}: correlation of horizontal neighbours = {corr:.3f} (photos: > 0.8)"


_JENS = "jenssegers-imagehash__tests__images__"
_TE_RES = "ThreatExchange__python-threatexchange__threatexchange__tests__hashing__resources__"
_EXIF = "ThreatExchange__pdq__data__reg-test-input__exif-rotn__exif-rotn-"

CORRECTIONS = (
    Correction(
        (f"{_JENS}orientation__mismatch-1.jpg",), "forest",
        "is forest-high.jpg with an EXIF rotation tag (upstream only needs mismatch-* to differ from each other)",
        lambda d: _raw_mean_abs_difference(d, f"{_JENS}orientation__mismatch-1.jpg", f"{_JENS}forest__forest-high.jpg"),
    ),
    Correction(
        (f"{_JENS}orientation__mismatch-3.jpg",), "jenssegers:orientation",
        "is a re-encode of match-r0-f0.jpg, same framing (upstream only needs mismatch-* to differ from each other)",
        lambda d: _mean_abs_difference(d, f"{_JENS}orientation__mismatch-3.jpg",
                                       f"{_JENS}orientation__match-r0-f0.jpg"),
    ),
    Correction(
        tuple(f"JImageHash__src__test__resources__highQuality{s}.png" for s in ("Base", "Bright", "Dark", "Hue")),
        "forest", "JImageHash:highQuality_png is the forest photo (highQualityBase.png = forest-high.jpg)",
        lambda d: _mean_abs_difference(d, "JImageHash__src__test__resources__highQualityBase.png",
                                       f"{_JENS}forest__forest-high.jpg"),
    ),
    Correction(
        (f"{_TE_RES}I16.png", f"{_TE_RES}LA.png"), NOISE,
        "uniform random noise (mode-handling fixtures), not the bridge photo",
        lambda d: "; ".join(_neighbour_correlation(d, f"{_TE_RES}{n}") for n in ("I16.png", "LA.png")),
    ),
    Correction(
        tuple(f"{_EXIF}{n}.jpg" for n in (1, 3, 6, 8)), SCENE,
        "four separate captures of one desk (different framing), not copies: excluded from both sides",
        lambda d: _mean_abs_difference(d, f"{_EXIF}1.jpg", f"{_EXIF}3.jpg"),
    ),
)


def read_rows(data: Path) -> list[Row]:
    fixes: dict[str, str] = {}
    for correction in CORRECTIONS:
        for file in correction.files:
            fixes[file] = correction.new_group
    rows = []
    with open(data / "groups.csv", newline="") as handle:
        for record in csv.DictReader(handle):
            name = Path(record["file"]).name
            group = record["group_id"]
            if name in fixes:
                group = f"{fixes[name]}:{name}" if fixes[name] in (SCENE, NOISE) else fixes[name]
            rows.append(Row(record["file"], group, record["group_id"], record["kind"]))
    return rows


# --- descriptors and timing ---------------------------------------------------------------------


def decode_all(data: Path, rows: list[Row], min_side: int) -> list[Image.Image]:
    return [decode_image((data / row.file).read_bytes(), target_side=min_side).image for row in rows]


def describe_timed(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    descriptor = PerceptualDescriptor()
    prepared, millis = [], []
    for image in images:
        start = time.perf_counter()
        prepared.append(descriptor.prepare(image))
        millis.append((time.perf_counter() - start) * 1000)
    return descriptor.embed(np.stack(prepared)), np.array(millis)


def describe(images: list[Image.Image]) -> np.ndarray:
    return describe_timed(images)[0]


# --- pair statistics ----------------------------------------------------------------------------


def pair_table(rows: list[Row], sims: np.ndarray, use_labels: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper-triangle pair indices (i, j) and same/cross masks (scene pairs in neither)."""
    groups = [row.labelled_group if use_labels else row.group for row in rows]
    i, j = np.triu_indices(len(rows), 1)
    scene = np.array([groups[a].startswith(SCENE) or groups[b].startswith(SCENE) for a, b in zip(i, j, strict=True)])
    same = np.array([groups[a] == groups[b] for a, b in zip(i, j, strict=True)]) & ~scene
    cross = ~same & ~scene
    return np.stack([i, j], axis=1), same, cross


def print_groups(rows: list[Row], sims: np.ndarray, threshold: float) -> None:
    members: dict[str, list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        members[row.group].append(index)
    kodak_caught = 0
    kodak_sims = []
    print(f"\n{'group':34s} {'imgs':>4s} {'pairs':>5s} {'recall':>7s} {'min sim':>8s}  lowest pair")
    for group, indices in sorted(members.items()):
        if len(indices) < 2 or group.startswith(SCENE):
            continue
        pairs = [(sims[a, b], a, b) for n, a in enumerate(indices) for b in indices[n + 1:]]
        values = np.array([p[0] for p in pairs])
        low, a, b = min(pairs)
        if group.startswith("kodak:"):
            kodak_caught += int((values > threshold).all())
            kodak_sims.append(float(values.min()))
            continue
        print(f"{group:34s} {len(indices):4d} {len(pairs):5d} {np.mean(values > threshold):7.1%} {low:8.3f}  "
              f"{rows[a].name[-34:]} ~ {rows[b].name[-34:]}")
    if kodak_sims:
        print(f"{'kodak:* (768x512 vs 500x500 crop)':34s} {2 * len(kodak_sims):4d} {len(kodak_sims):5d} "
              f"{kodak_caught / len(kodak_sims):7.1%} {min(kodak_sims):8.3f}  caught {kodak_caught}/{len(kodak_sims)}; "
              f"median {np.median(kodak_sims):.3f}")


def print_cross(rows: list[Row], sims: np.ndarray, pairs: np.ndarray, cross: np.ndarray, top: int = 6) -> float:
    values = sims[pairs[:, 0], pairs[:, 1]]
    order = np.argsort(-np.where(cross, values, -np.inf))[:top]
    print("\nhighest cross-group pairs:")
    for k in order:
        a, b = pairs[k]
        print(f"  {values[k]:.3f}  {rows[a].name[-40:]} ({rows[a].kind}) ~ {rows[b].name[-40:]} ({rows[b].kind})")
    special = np.array([rows[a].kind != "near" or rows[b].kind != "near" for a, b in pairs]) & cross
    print(f"  max over pairs with a hard negative or distinct photo: {values[special].max():.3f}")
    return float(values[cross].max())


def print_recall(label: str, sims: np.ndarray, pairs: np.ndarray, same: np.ndarray, cross: np.ndarray,
                 threshold: float) -> None:
    values = sims[pairs[:, 0], pairs[:, 1]]
    print(f"{label}: same-group recall {np.mean(values[same] > threshold):.1%} of {same.sum()} pairs, "
          f"cross-group pairs above threshold {int((values[cross] > threshold).sum())} of {cross.sum()}, "
          f"max cross {values[cross].max():.3f}")


def print_threshold_sweep(sims: np.ndarray, pairs: np.ndarray, same: np.ndarray, rows: list[Row]) -> None:
    values = sims[pairs[:, 0], pairs[:, 1]]
    kodak = np.array([rows[a].group.startswith("kodak:") for a, _ in pairs]) & same
    print("recall by threshold (same-group pairs, corrected labels):")
    for threshold in (0.5, 0.55, 0.6, 0.65, 0.7, 0.8):
        caught = int((values[kodak] > threshold).sum())
        print(f"  {threshold:.2f}: all {np.mean(values[same] > threshold):6.1%}   without kodak crops "
              f"{np.mean(values[same & ~kodak] > threshold):6.1%}   kodak crops {caught}/{int(kodak.sum())}")


# --- synthetic edits and random-crop negatives ---------------------------------------------------


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    w, h = image.size
    return image.crop((round(w * left), round(h * top), round(w * (1 - right)), round(h * (1 - bottom))))


def _bars(image: Image.Image, fraction: float, colour: tuple[int, int, int], vertical: bool) -> Image.Image:
    w, h = image.size
    pad_w, pad_h = (0, round(h * fraction)) if vertical else (round(w * fraction), 0)
    canvas = Image.new("RGB", (w + 2 * pad_w, h + 2 * pad_h), colour)
    canvas.paste(image, (pad_w, pad_h))
    return canvas


def _text(image: Image.Image) -> Image.Image:
    image = image.copy()
    font = ImageFont.load_default(size=max(10, image.height // 9))
    ImageDraw.Draw(image).text((image.width * 0.05, image.height * 0.78), "SAMPLE WATERMARK", fill="white",
                               font=font, stroke_width=1, stroke_fill="black")
    return image


def _centre_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    return image.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resize 0.5x": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "thumbnail 96px": lambda im: im.resize((96, max(1, round(96 * im.height / im.width))), Image.Resampling.LANCZOS),
    "JPEG q=30": lambda im: _jpeg(im, 30),
    "JPEG q=10": lambda im: _jpeg(im, 10),
    "crop 4% each side": lambda im: _crop(im, 0.04, 0.04, 0.04, 0.04),
    "crop 4% one side": lambda im: _crop(im, 0.04, 0, 0, 0),
    "letterbox 10% black": lambda im: _bars(im, 0.10, (0, 0, 0), vertical=True),
    "pillarbox 15% blue": lambda im: _bars(im, 0.15, (40, 90, 160), vertical=False),
    "text watermark": _text,
    "brightness +30%": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
    "contrast 0.7": lambda im: ImageEnhance.Contrast(im).enhance(0.7),
    "grayscale": lambda im: ImageOps.grayscale(im).convert("RGB"),
    "saturation 0.3": lambda im: ImageEnhance.Color(im).enhance(0.3),
    "gaussian blur 2px": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "unsharp mask": lambda im: im.filter(ImageFilter.UnsharpMask(2, 150, 2)),
    "mirror": ImageOps.mirror,
    "rotate 90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "squash height 0.8": lambda im: im.resize((im.width, round(im.height * 0.8))),
    "rotate 3 degrees": lambda im: im.rotate(3, resample=Image.Resampling.BICUBIC),
    "crop 8% uneven": lambda im: _crop(im, 0.08, 0.02, 0.0, 0.06),
    "centre square crop": _centre_square,
}


def print_edits(photos: list[Image.Image], threshold: float) -> None:
    originals = describe(photos)
    keep = np.linalg.norm(originals, axis=1) > 0
    variants = dihedral_variants(originals)
    print(f"\nsynthetic edits of {keep.sum()} photos (similarity to the original: median / 5th pct / recall):")
    for name, edit in EDITS.items():
        edited = describe([edit(photo) for photo in photos])
        sims = np.einsum("gnd,nd->gn", variants, edited).max(axis=0)[keep]
        print(f"  {name:22s} {np.median(sims):.3f} / {np.quantile(sims, 0.05):.3f} / {np.mean(sims > threshold):6.1%}")


def random_crops(photos: list[Image.Image], per_photo: int, seed: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    rng = np.random.default_rng(seed)
    crops, owners = [], []
    for owner, photo in enumerate(photos):
        w, h = photo.size
        for _ in range(per_photo):
            scale, aspect = rng.uniform(0.3, 0.8), np.exp(rng.uniform(-np.log(2), np.log(2)))
            cw = int(min(w, scale * np.sqrt(w * h * aspect)))
            ch = int(min(h, scale * np.sqrt(w * h / aspect)))
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            crops.append(photo.crop((x, y, x + cw, y + ch)))
            owners.append(owner)
    return crops, np.array(owners)


def print_crop_tail(photos: list[Image.Image], threshold: float) -> float:
    crops, owners = random_crops(photos, per_photo=30)
    vectors = describe(crops)
    sims = dihedral_similarity(vectors, vectors)
    i, j = np.triu_indices(len(crops), 1)
    values = sims[i, j][owners[i] != owners[j]]
    q3, q4, q5 = np.quantile(values, [1 - 1e-3, 1 - 1e-4, 1 - 1e-5])
    print(f"\nstress negatives: {len(values):,} pairs of random crops of different photos "
          f"({int((np.linalg.norm(vectors, axis=1) == 0).sum())} featureless crops abstain)")
    print(f"  quantile 1-1e-3 {q3:.3f}, 1-1e-4 {q4:.3f}, 1-1e-5 {q5:.3f}, max {values.max():.3f}; "
          f"above threshold: {(values > threshold).mean():.2e} of pairs")
    return float(values.max())


def base_photos(rows: list[Row], images: list[Image.Image], vectors: np.ndarray) -> list[Image.Image]:
    """One image per distinct photo with structure and at least 200 px on its short side."""
    seen, photos = set(), []
    for row, image, vector in zip(rows, images, vectors, strict=True):
        if row.group in seen or row.group.startswith((SCENE, NOISE)) or min(image.size) < 200 or not vector.any():
            continue
        if row.name.startswith("FFDNet"):  # the Kodak crops: their full images are in the set
            continue
        seen.add(row.group)
        photos.append(image)
    return photos


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    args = parser.parse_args()

    print("label corrections (re-measured):")
    for correction in CORRECTIONS:
        print(f"  {', '.join(Path(f).name[-28:] for f in correction.files)}\n    {correction.reason}\n"
              f"    evidence: {correction.evidence(args.data)}")

    rows = read_rows(args.data)
    decode_start = time.perf_counter()
    images = decode_all(args.data, rows, PerceptualDescriptor.min_side)
    decode_ms = (time.perf_counter() - decode_start) * 1000 / len(rows)
    vectors, millis = describe_timed(images)
    abstained = [row.name for row, v in zip(rows, vectors, strict=True) if not v.any()]
    print(f"\n{len(rows)} images; featureless (zero vector): {abstained}")
    sims = dihedral_similarity(vectors, vectors)

    print_groups(rows, sims, args.threshold)
    pairs, same, cross = pair_table(rows, sims, use_labels=False)
    max_cross = print_cross(rows, sims, pairs, cross)
    print()
    print_recall("corrected labels", sims, pairs, same, cross, args.threshold)
    print_recall("labels as shipped", sims, *pair_table(rows, sims, use_labels=True), args.threshold)
    print_threshold_sweep(sims, pairs, same, rows)

    photos = base_photos(rows, images, vectors)
    print_edits(photos, args.threshold)
    stress_max = print_crop_tail(photos, args.threshold)
    lowest = max(max_cross + MARGIN, stress_max + STRESS_MARGIN)
    print(f"\nthreshold {args.threshold:.3f}; lowest allowed = max(real cross {max_cross:.3f} + {MARGIN}, "
          f"stress max {stress_max:.3f} + {STRESS_MARGIN}) = {lowest:.3f}")
    print(f"\nprepare(): median {np.median(millis):.2f} ms, p95 {np.quantile(millis, 0.95):.2f} ms, "
          f"max {millis.max():.2f} ms per image (decode with JPEG draft: {decode_ms:.1f} ms per image)")


if __name__ == "__main__":
    main()
