"""Build a LAION-like benchmark set (shards + truth.parquet) from real photos.

    python benchmarks/make_benchmark.py --out benchmarks/_data/tune --n 5000 --seed 1
    python benchmarks/make_benchmark.py --out benchmarks/_data/heldout --n 5000 --seed 2
    python benchmarks/make_benchmark.py --refresh-demo-images

Seed 1 is the tuning set, seed 2 the held-out set: same source photos, different
copies, crops, captions and order. `--sources shared` (default) uses the
real-dups photos beside the repo (`../shared/data/real-dups`): the first image
of every group that is not a hard negative becomes a source, the hard-negative
rows become hard negatives, and the photos shipped in `dedup/demo_images/` add
their captions and hard-negative pairs. `--sources demo` uses only the shipped
photos and needs no shared data.

groups.csv is checked against the pixels before use: a hard negative that is
the same picture as a group member, or two groups holding the same picture,
would make the truth table wrong, so such rows are dropped (or merged) and
listed in the summary.

`--refresh-demo-images` rewrites `dedup/demo_images/` (downscaled photos,
manifest.csv, LICENSES.md) from the shared photos.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from dedup.decode import DecodeFailure, decode_image
from dedup.errors import DedupError
from dedup.synth import BAD_KINDS, demo_photos, make_laion_like, write_shards

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared" / "data" / "real-dups"
DEMO_DIR = REPO_ROOT / "dedup" / "demo_images"

SOURCE_MAX_SIDE = 384
# A source smaller than this cannot survive a 0.3x resize copy above the decoder's minimum.
MIN_SOURCE_SIDE = 64
# Two pictures whose 64x64 grayscale thumbnails differ by less than this mean
# absolute value (0-255), in some rotation/flip, are the same picture
# (re-encodes differ by < 1, different photos by > 20).
SAME_PICTURE_MAX_DIFF = 4.0
# The benchmark sets draw copies from every family real web copies are made of (issue 12: turns with
# fill corners, 8 % edge crops, borders, one-sided caption bands, three-edit chains); the demo set keeps
# the basic mix.
BENCHMARK_COPY_MIX = "web"


# --------------------------------------------------------------------------
# Demo photos shipped with the package
# --------------------------------------------------------------------------

DEMO_MAX_SIDE = 384
DEMO_JPEG_QUALITY = 90


@dataclass(frozen=True)
class DemoPhotoSpec:
    file: str  # name inside dedup/demo_images/
    shared_file: str  # groups.csv `file`
    caption: str
    negative_of: str = ""  # stem of the demo photo this one resembles but is not


def _kodak(number: int, caption: str, negative_of: str = "") -> DemoPhotoSpec:
    return DemoPhotoSpec(
        f"kodim{number:02d}.jpg", f"images/FFDNet__testsets__Kodak24__kodim{number:02d}.png", caption, negative_of
    )


DEMO_PHOTO_SPECS = (
    _kodak(1, "old stone house with red shutters and a red door"),
    _kodak(2, "weathered red door with a round white knob"),
    _kodak(3, "neon caps hanging on a fence in the sun"),
    _kodak(4, "young woman in a red hat"),
    _kodak(5, "motocross riders on dirt bikes at the start"),
    _kodak(6, "small sailboat on the open sea"),
    _kodak(7, "green shutters behind pink hibiscus flowers"),
    _kodak(8, "colourful half-timbered houses in an old town"),
    _kodak(9, "racing sailboats with colourful spinnakers"),
    _kodak(10, "sailing crew beside white sails in a regatta", negative_of="kodim09"),
    _kodak(11, "sailboat moored at a wooden pier"),
    _kodak(12, "couple walking on a tropical beach"),
    _kodak(13, "mountain stream in a green alpine valley"),
    _kodak(14, "white-water rafting team in a yellow raft"),
    _kodak(15, "little girl with face paint"),
    _kodak(16, "tropical island with palm trees across calm water"),
    _kodak(17, "white statue holding a golden globe"),
    _kodak(18, "woman in a dark dress with pearl necklaces in a garden"),
    _kodak(19, "lighthouse behind a white picket fence"),
    _kodak(20, "vintage yellow propeller plane on a grass field"),
    _kodak(21, "lighthouse on a rocky coast with crashing waves", negative_of="kodim19"),
    _kodak(22, "red barn reflected in a pond"),
    _kodak(23, "two macaw parrots, red and blue-yellow"),
    _kodak(24, "painted facade of an alpine house"),
    DemoPhotoSpec("hopper.jpg", "images/matplotlib__matplotlib__mpl-data__sample_data__grace_hopper.jpg",
                  "portrait of Grace Hopper in navy uniform"),
    DemoPhotoSpec("coaster_a.jpg", "images/ThreatExchange__pdq__data__misc-images__c.png",
                  "blue pen beside a wine-themed drink coaster"),
    DemoPhotoSpec("coaster_b.jpg", "images/ThreatExchange__pdq__data__reg-test-input__pen-and-coaster.png",
                  "red pen and keyboard beside a wine-themed drink coaster", negative_of="coaster_a"),
)


def read_groups(shared_dir: Path) -> pd.DataFrame:
    path = shared_dir / "groups.csv"
    if not path.is_file():
        raise DedupError(f"{path} not found", hint="put the real-dups data at ../shared/data/real-dups "
                         "beside the repo, pass --shared-dir, or use --sources demo")
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def load_photo(path: Path, max_side: int) -> Image.Image:
    """Decode any real-dups file (EXIF orientation, odd modes) to RGB no larger than `max_side`."""
    with warnings.catch_warnings():
        # Some real-dups files are deliberately broken (corrupt EXIF, bad MPO header); Pillow warns, decodes.
        warnings.simplefilter("ignore", UserWarning)
        decoded = decode_image(path.read_bytes(), target_side=max_side)
    image = decoded.image
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def refresh_demo_images(shared_dir: Path, dest: Path) -> list[Path]:
    """Rewrite the shipped demo photos, their manifest and LICENSES.md from the shared photos."""
    groups = read_groups(shared_dir).set_index("file")
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for spec in DEMO_PHOTO_SPECS:
        image = load_photo(shared_dir / spec.shared_file, DEMO_MAX_SIDE)
        image.save(dest / spec.file, "JPEG", quality=DEMO_JPEG_QUALITY, optimize=True)
        written.append(dest / spec.file)
    _write_demo_manifest(dest / "manifest.csv", groups)
    _write_demo_licenses(dest / "LICENSES.md", groups)
    return written


def _write_demo_manifest(path: Path, groups: pd.DataFrame) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["file", "caption", "negative_of", "origin", "license"])
        for spec in DEMO_PHOTO_SPECS:
            row = groups.loc[spec.shared_file]
            writer.writerow([spec.file, spec.caption, spec.negative_of, row["origin"], row["license"]])


_LICENSE_SUMMARY = {
    "kodim": "Kodak PhotoCD test image, released by Eastman Kodak for unrestricted use (free for any use)",
    "hopper": "public domain (US Navy photo of Grace Hopper)",
    "coaster": "BSD-3-Clause (facebook/ThreatExchange repository)",
}


def _write_demo_licenses(path: Path, groups: pd.DataFrame) -> None:
    lines = [
        "# Demo photos: origin and licence",
        "",
        f"Each file is the listed original downscaled to at most {DEMO_MAX_SIDE} px and saved as JPEG "
        f"quality {DEMO_JPEG_QUALITY} by `benchmarks/make_benchmark.py --refresh-demo-images`.",
        "Origins and recorded licences come from `shared/data/real-dups/groups.csv`.",
        "Hard-negative pairs (different photos that look alike, see `negative_of` in manifest.csv): "
        + ", ".join(f"{s.file} ~ {s.negative_of}.jpg" for s in DEMO_PHOTO_SPECS if s.negative_of) + ".",
        "",
        "| file | licence | origin | licence as recorded in groups.csv |",
        "|---|---|---|---|",
    ]
    for spec in DEMO_PHOTO_SPECS:
        row = groups.loc[spec.shared_file]
        summary = next(text for prefix, text in _LICENSE_SUMMARY.items() if spec.file.startswith(prefix))
        recorded = row["license"].replace("|", "/")
        lines.append(f"| {spec.file} | {summary} | `{row['origin']}` | {recorded} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# Sources from the shared real-dups photos
# --------------------------------------------------------------------------


@dataclass
class BenchmarkSources:
    sources: list[tuple[str, Image.Image]] = field(default_factory=list)
    hard_negatives: list[tuple[str, Image.Image, str]] = field(default_factory=list)
    captions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # every row dropped, merged or relabelled, and why


def fingerprint(image: Image.Image) -> np.ndarray:
    return np.asarray(ImageOps.grayscale(image).resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)


def _orientations(thumb: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations/flips of a square thumbnail: EXIF-rotated copies are the same picture."""
    turns = [np.rot90(thumb, k) for k in range(4)]
    return turns + [np.fliplr(turn) for turn in turns]


def same_picture(a: np.ndarray, b: np.ndarray) -> bool:
    return any(float(np.abs(a - turned).mean()) < SAME_PICTURE_MAX_DIFF for turned in _orientations(b))


@dataclass
class _Photo:
    file: str
    group_id: str
    kind: str
    origin: str
    image: Image.Image
    print: np.ndarray


def _load_rows(shared_dir: Path, groups: pd.DataFrame, notes: list[str]) -> list[_Photo]:
    photos = []
    for row in groups.itertuples(index=False):
        try:
            image = load_photo(shared_dir / row.file, SOURCE_MAX_SIDE)
        except DecodeFailure as failure:
            notes.append(f"skipped {row.file}: cannot decode ({failure.status}: {failure.message})")
            continue
        photos.append(_Photo(row.file, row.group_id, row.kind, row.origin, image, fingerprint(image)))
    return photos


def _matching_group(photo: _Photo, members: list[_Photo]) -> str | None:
    others = (m for m in members if m.group_id != photo.group_id)
    return next((m.group_id for m in others if same_picture(photo.print, m.print)), None)


def has_picture_content(image: Image.Image) -> bool:
    """Independent of any descriptor: a flat frame (plain sky, black) or white noise is no photo to copy.

    Flat: luma std below 6 grey levels on a 64x64 thumbnail. Noise: neighbouring
    thumbnail pixels barely correlate (lag-1 correlation below 0.5; photos sit above 0.8).
    Exact copies of such files are still found by sha256; only "near copy" truth is meaningless for them.
    """
    luma = np.asarray(image.convert("L").resize((64, 64), Image.Resampling.BOX), dtype=np.float64)
    if luma.std() < 6.0:
        return False
    horizontal = np.corrcoef(luma[:, :-1].ravel(), luma[:, 1:].ravel())[0, 1]
    return bool(horizontal >= 0.5)


def _pick_sources(photos: list[_Photo], notes: list[str]) -> dict[str, _Photo]:
    """First usable image of each non-negative group; a group repeating an earlier group's picture is merged."""
    chosen: dict[str, _Photo] = {}
    kept_members: list[_Photo] = []
    for group_id in dict.fromkeys(p.group_id for p in photos if p.kind != "hard_negative"):
        members = [p for p in photos if p.group_id == group_id]
        same_as = next((g for m in members if (g := _matching_group(m, kept_members))), None)
        if same_as:
            notes.append(f"merged group {group_id!r} into {same_as!r}: they hold the same picture")
            continue
        first = members[0]
        if not has_picture_content(first.image):
            notes.append(f"skipped group {group_id!r}: its first image is featureless or noise (no picture to copy)")
            continue
        if min(first.image.size) < MIN_SOURCE_SIDE:
            notes.append(f"skipped group {group_id!r}: first image {first.image.size} is under {MIN_SOURCE_SIDE} px")
            continue
        chosen[group_id] = first
        kept_members.extend(members)
    return chosen


def _resembled_group(negative: _Photo, photos: list[_Photo], candidates: dict[str, _Photo]) -> str | None:
    """The group with most members from the negative's own origin folder (groups.csv names no target)."""
    folder = PurePosixPath(negative.origin).parent
    votes = Counter(p.group_id for p in photos
                    if p.group_id in candidates and PurePosixPath(p.origin).parent == folder)
    return votes.most_common(1)[0][0] if votes else None


def _pick_hard_negatives(
    photos: list[_Photo], sources: dict[str, _Photo], notes: list[str]
) -> list[tuple[str, _Photo, str]]:
    group_members = [p for p in photos if p.kind != "hard_negative"]
    negatives = []
    for photo in (p for p in photos if p.kind == "hard_negative"):
        same_as = _matching_group(photo, group_members)
        if same_as:
            notes.append(f"dropped hard negative {photo.file}: mislabelled, it is the same picture as a "
                          f"member of group {same_as!r}")
            continue
        target = _resembled_group(photo, photos, sources)
        if target is None:
            notes.append(f"dropped hard negative {photo.file}: no source group shares its origin folder")
            continue
        negatives.append((photo.group_id, photo, target))
    return negatives


def _apply_demo_relations(
    result: BenchmarkSources, sources: dict[str, _Photo], photos: list[_Photo]
) -> None:
    """Demo captions go to the matching shared source; demo hard-negative pairs move sources to negatives."""
    members = [p for p in photos if p.group_id in sources]
    matched: dict[str, str] = {}
    shipped = demo_photos()
    for demo in shipped:
        demo_print = fingerprint(demo.image)
        group = next((m.group_id for m in members if same_picture(demo_print, m.print)), None)
        if group is None:
            name = f"demo:{demo.name}"
            result.sources.append((name, demo.image))
            result.captions[name] = demo.caption
            matched[demo.name] = name
            continue
        matched[demo.name] = group
        result.captions[group] = demo.caption
    for demo in shipped:
        if demo.negative_of and demo.negative_of in matched:
            _move_to_negatives(result, matched[demo.name], matched[demo.negative_of])


def _move_to_negatives(result: BenchmarkSources, name: str, looks_like: str) -> None:
    image = next(image for source_name, image in result.sources if source_name == name)
    result.sources = [(n, i) for n, i in result.sources if n != name]
    result.hard_negatives.append((name, image, looks_like))
    result.notes.append(f"hard negative {name!r} of {looks_like!r} (demo pair)")


def shared_sources(shared_dir: Path) -> BenchmarkSources:
    groups = read_groups(shared_dir)
    result = BenchmarkSources()
    photos = _load_rows(shared_dir, groups, result.notes)
    sources = _pick_sources(photos, result.notes)
    result.sources = [(group_id, photo.image) for group_id, photo in sources.items()]
    negatives = _pick_hard_negatives(photos, sources, result.notes)
    result.hard_negatives = [(name, photo.image, target) for name, photo, target in negatives]
    _apply_demo_relations(result, sources, photos)
    return result


def demo_only_sources() -> BenchmarkSources:
    result = BenchmarkSources()
    for photo in demo_photos():
        result.captions[photo.name] = photo.caption
        if photo.negative_of:
            result.hard_negatives.append((photo.name, photo.image, photo.negative_of))
        else:
            result.sources.append((photo.name, photo.image))
    return result


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def summarize(truth: pd.DataFrame, shards: list[Path], chosen: BenchmarkSources, seconds: float) -> str:
    sizes = truth.groupby("group_id").size()
    lines = [
        f"samples: {len(truth)} in {len(shards)} shards",
        f"sources: {len(chosen.sources)} photos, {len(chosen.hard_negatives)} hard negatives",
        f"groups: {len(sizes)} ({int((sizes >= 2).sum())} with copies), largest group: "
        f"{int(sizes.max())} ({sizes.idxmax()})",
        f"group sizes (top 10): {sorted(sizes.tolist(), reverse=True)[:10]}",
        "families: " + ", ".join(f"{k}={v}" for k, v in truth["family"].value_counts().items()),
        "bad kinds: " + ", ".join(f"{k}={v}" for k, v in truth["bad_kind"].dropna().value_counts().items()),
        f"built in {seconds:.1f} s",
    ]
    lines += [f"note: {note}" for note in chosen.notes]
    return "\n".join(lines)


def build_benchmark(args: argparse.Namespace) -> str:
    started = time.perf_counter()
    chosen = shared_sources(args.shared_dir) if args.sources == "shared" else demo_only_sources()
    samples, truth = make_laion_like(
        chosen.sources, args.n, args.seed, hard_negatives=chosen.hard_negatives, bad_fraction=args.bad_fraction,
        captions=chosen.captions, samples_per_shard=args.samples_per_shard, copy_mix=BENCHMARK_COPY_MIX,
    )
    shards = write_shards(samples, args.out, args.samples_per_shard)
    truth.to_parquet(args.out / "truth.parquet", index=False)
    settings = {"n": args.n, "seed": args.seed, "sources": args.sources, "bad_fraction": args.bad_fraction,
                "samples_per_shard": args.samples_per_shard, "notes": chosen.notes}
    (args.out / "benchmark.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return summarize(truth, shards, chosen, time.perf_counter() - started)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for the shards, truth.parquet and benchmark.json")
    parser.add_argument("--n", type=int, default=5000, help="number of samples (default 5000)")
    parser.add_argument("--seed", type=int, default=1, help="1 = tuning set, 2 = held-out set (default 1)")
    parser.add_argument("--sources", choices=("shared", "demo"), default="shared",
                        help="real-dups photos + demo pairs (shared) or only the shipped demo photos (demo)")
    parser.add_argument("--shared-dir", type=Path, default=SHARED_DIR, help=f"real-dups folder (default {SHARED_DIR})")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="default 1000")
    parser.add_argument("--bad-fraction", type=float, default=0.01,
                        help=f"share of bad samples, each of the {len(BAD_KINDS)} kinds at least once (default 0.01)")
    parser.add_argument("--refresh-demo-images", action="store_true",
                        help=f"rewrite {DEMO_DIR.relative_to(REPO_ROOT)} from the shared photos and exit")
    args = parser.parse_args(argv)
    if not args.refresh_demo_images and args.out is None:
        parser.error("--out is required (or pass --refresh-demo-images)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.refresh_demo_images:
            written = refresh_demo_images(args.shared_dir, DEMO_DIR)
            total = sum(path.stat().st_size for path in DEMO_DIR.iterdir())
            print(f"wrote {len(written)} photos to {DEMO_DIR} ({total / 1e6:.2f} MB with manifest and licences)")
        else:
            print(build_benchmark(args))
    except DedupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
