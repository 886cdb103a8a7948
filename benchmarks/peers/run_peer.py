"""Find duplicate pairs in a folder of images with one peer tool, for side-by-side benchmarks.

Runs INSIDE the peers venv (`benchmarks/peers/setup.sh` makes it), never in dedup's own venv:

    benchmarks/.venv-peers/bin/python benchmarks/peers/run_peer.py \
        --tool {imagededup_phash,pdq,fastdup,cleanvision} --images DIR --out pairs.parquet [--threshold X]

Every image file directly inside DIR is one sample; its file stem is the sample key. Each tool is driven
through its own standard duplicate-finding API with its default (or documented recommended) threshold:

* imagededup_phash: `PHash().find_duplicates(image_dir=DIR, max_distance_threshold=10)` (64-bit pHash).
* pdq: `pdqhash.compute` on the RGB pixels, all pairs with Hamming distance <= 31 of 256 bits
  (ThreatExchange's default match threshold), compared with vectorised numpy on packed bits.
* fastdup: `fastdup.create(...).run()` then `connected_components()`; its default `cc_threshold` is 0.96
  (cosine similarity of its bundled ONNX embedding). Telemetry and the PyPI version check are turned off.
* cleanvision: `Imagelab(filepaths).find_issues({"exact_duplicates", "near_duplicates"})`; both kinds of
  sets (md5 equality, equal 64-bit pHash) become pairs. It has no distance threshold to set.

Writes a parquet file with `key_a`, `key_b` (key_a < key_b, one row per unordered pair) and prints one JSON
line on stdout: tool, n_images, seconds, images_per_s, peak_rss_mb, n_pairs, threshold, import_seconds,
version. Everything the tools print themselves goes to stderr, so stdout holds only that line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))  # dedup is not installed in the peers venv; its errors module is pure Python
from dedup.errors import DedupError

# Image suffixes every one of the four tools can read. Other files in DIR are ignored.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

IMAGEDEDUP_PHASH_MAX_DISTANCE = 10  # imagededup's own default for find_duplicates
PDQ_MAX_DISTANCE = 31  # ThreatExchange's default PDQ match threshold (of 256 bits)
FASTDUP_CC_THRESHOLD = 0.96  # fastdup's default cc_threshold for connected components
# Rows of the PDQ distance matrix done at once: chunk x n x 32 bytes stays near 128 MB for any n.
PDQ_CHUNK_BYTES = 128 * 1024 * 1024

Pair = tuple[str, str]


class PeerToolError(DedupError):
    """A peer tool cannot run on this input or with these options."""


@dataclass(frozen=True)
class ToolRun:
    pairs: set[Pair]
    extra: dict[str, object]  # tool-specific facts worth reporting next to the timings


def list_images(image_dir: Path) -> dict[str, Path]:
    """Map sample key (file stem) -> path for every image file directly inside `image_dir`."""
    if not image_dir.is_dir():
        raise PeerToolError(f"--images {image_dir} is not a folder", hint="pass a folder of image files")
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if not (path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES):
            continue
        if path.stem in images:
            raise PeerToolError(
                f"{path.name} and {images[path.stem].name} share the sample key {path.stem!r}",
                hint="give every image a unique file stem (the stem is the sample key)",
            )
        images[path.stem] = path
    if len(images) < 2:
        raise PeerToolError(
            f"{image_dir} holds {len(images)} image file(s); duplicate search needs at least 2",
            hint=f"put files ending in one of {sorted(IMAGE_SUFFIXES)} directly in the folder",
        )
    return images


def ordered_pair(a: str, b: str) -> Pair:
    return (a, b) if a < b else (b, a)


def pairs_from_groups(groups: Iterable[Iterable[str]]) -> set[Pair]:
    """Every unordered pair inside each group (a group is a set of keys a tool calls duplicates)."""
    pairs: set[Pair] = set()
    for group in groups:
        pairs.update(ordered_pair(a, b) for a, b in itertools.combinations(sorted(set(group)), 2))
    return pairs


def key_of(path_like: str | os.PathLike[str]) -> str:
    return Path(path_like).stem


# --- imagededup ---------------------------------------------------------------------------------------


def run_imagededup_phash(images: dict[str, Path], threshold: float | None, workers: int | None = None) -> ToolRun:
    from imagededup.methods import PHash

    max_distance = IMAGEDEDUP_PHASH_MAX_DISTANCE if threshold is None else int(threshold)
    image_dir = _single_parent(images)
    processes = {} if workers is None else {"num_enc_workers": workers, "num_dist_workers": workers}
    duplicates = PHash(verbose=False).find_duplicates(image_dir=image_dir, max_distance_threshold=max_distance,
                                                      **processes)
    pairs = {ordered_pair(key_of(name), key_of(other)) for name, others in duplicates.items() for other in others}
    return ToolRun(pairs, {"threshold": max_distance, "images_seen": len(duplicates), "workers": workers})


def _single_parent(images: dict[str, Path]) -> Path:
    """imagededup's API takes a folder, not a file list; all our files come from one folder."""
    return next(iter(images.values())).parent


# --- PDQ ----------------------------------------------------------------------------------------------


def run_pdq(images: dict[str, Path], threshold: float | None) -> ToolRun:
    max_distance = PDQ_MAX_DISTANCE if threshold is None else int(threshold)
    keys = list(images)
    packed, qualities = _pdq_hashes([images[key] for key in keys])
    pairs = {ordered_pair(keys[i], keys[j]) for i, j in _pairs_within_hamming(packed, max_distance)}
    # PDQ's authors call quality < 50 unreliable; reported, not filtered, as ThreatExchange's matcher does.
    low_quality = int(np.count_nonzero(qualities < 50))
    return ToolRun(pairs, {"threshold": max_distance, "low_quality_hashes": low_quality})


def _pdq_hashes(paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(n, 32) uint8 packed 256-bit hashes and (n,) qualities."""
    import pdqhash
    from PIL import Image

    packed = np.empty((len(paths), 32), dtype=np.uint8)
    qualities = np.empty(len(paths), dtype=np.int32)
    for row, path in enumerate(paths):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        bits, quality = pdqhash.compute(pixels)
        packed[row] = np.packbits(bits.astype(np.uint8))
        qualities[row] = quality
    return packed, qualities


_POPCOUNT_U8 = np.array([value.bit_count() for value in range(256)], dtype=np.uint16)


def _pairs_within_hamming(packed: np.ndarray, max_distance: int) -> Iterator[tuple[int, int]]:
    """Index pairs (i < j) whose packed hashes differ in <= max_distance bits, in row chunks."""
    count, width = packed.shape
    chunk = max(1, PDQ_CHUNK_BYTES // max(1, count * width))
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        # Compare rows [start, stop) with columns [start, count): pairs below the diagonal are done already.
        xor = packed[start:stop, None, :] ^ packed[None, start:, :]
        distances = _POPCOUNT_U8[xor].sum(axis=2)
        rows, cols = np.nonzero(distances <= max_distance)
        cols = cols + start
        rows = rows + start
        keep = cols > rows
        yield from zip(rows[keep].tolist(), cols[keep].tolist(), strict=True)


# --- fastdup ------------------------------------------------------------------------------------------

# fastdup reports crashes and usage to Sentry and asks PyPI for its latest version unless told not to.
# SENTRY_OPT_OUT turns off the Python Sentry client, FASTDUP_PRODUCTION skips the PyPI version check,
# and run_sentry=False (below) turns off the Sentry client inside its C++ library.
FASTDUP_OFFLINE_ENV = {"SENTRY_OPT_OUT": "1", "FASTDUP_PRODUCTION": "1"}


def run_fastdup(images: dict[str, Path], threshold: float | None) -> ToolRun:
    os.environ.update(FASTDUP_OFFLINE_ENV)  # must precede the import: fastdup starts Sentry on import
    import fastdup

    cc_threshold = FASTDUP_CC_THRESHOLD if threshold is None else float(threshold)
    with tempfile.TemporaryDirectory(prefix="fastdup_work_") as work_dir:
        dataset = fastdup.create(work_dir=work_dir, input_dir=[str(path.resolve()) for path in images.values()])
        dataset.run(overwrite=True, cc_threshold=cc_threshold, run_sentry=False)
        components, _info = dataset.connected_components()
    if components.empty:
        return ToolRun(set(), {"threshold": cc_threshold, "components": 0})
    valid = components[components["is_valid"]]
    groups = valid.groupby("component_id")["filename"].apply(lambda names: [key_of(n) for n in names])
    return ToolRun(pairs_from_groups(groups), {"threshold": cc_threshold, "components": len(groups)})


# --- cleanvision --------------------------------------------------------------------------------------


def run_cleanvision(images: dict[str, Path], threshold: float | None) -> ToolRun:
    if threshold is not None:
        raise PeerToolError(
            "cleanvision's near_duplicates has no distance threshold (it groups equal 64-bit pHashes)",
            hint="drop --threshold for --tool cleanvision",
        )
    from cleanvision import Imagelab

    imagelab = Imagelab(filepaths=[str(path) for path in images.values()], verbose=False)
    imagelab.find_issues({"exact_duplicates": {}, "near_duplicates": {}}, verbose=False)
    exact_sets = imagelab.info["exact_duplicates"]["sets"]
    near_sets = imagelab.info["near_duplicates"]["sets"]
    groups = [[key_of(path) for path in group] for group in itertools.chain(exact_sets, near_sets)]
    return ToolRun(pairs_from_groups(groups), {"exact_sets": len(exact_sets), "near_sets": len(near_sets)})


# --- driver -------------------------------------------------------------------------------------------

TOOLS: dict[str, tuple[str, Callable[[dict[str, Path], float | None], ToolRun]]] = {
    # tool name -> (distribution whose version is reported, runner)
    "imagededup_phash": ("imagededup", run_imagededup_phash),
    "pdq": ("pdqhash", run_pdq),
    "fastdup": ("fastdup", run_fastdup),
    "cleanvision": ("cleanvision", run_cleanvision),
}
# The modules each tool imports; imported before the clock starts so timings measure the work only.
TOOL_IMPORTS = {
    "imagededup_phash": ("imagededup.methods",),
    "pdq": ("pdqhash", "PIL.Image"),
    "fastdup": ("fastdup",),
    "cleanvision": ("cleanvision",),
}


def import_tool(tool: str) -> float:
    """Import the tool's modules; returns the seconds it took. A missing package names its installer."""
    if tool == "fastdup":
        os.environ.update(FASTDUP_OFFLINE_ENV)
    started = time.perf_counter()
    for module in TOOL_IMPORTS[tool]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise PeerToolError(
                f"--tool {tool} needs {module!r}, which does not import here: {exc}",
                hint="run benchmarks/peers/setup.sh and use benchmarks/.venv-peers/bin/python",
            ) from exc
    return time.perf_counter() - started


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send file descriptor 1 to stderr, so C++ libraries' prints cannot mix into our JSON line."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def peak_rss_mb() -> float:
    """Peak resident memory of this process plus its largest finished child (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024.0


def write_pairs(pairs: set[Pair], out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ordered = sorted(pairs)
    table = pa.table(
        {
            "key_a": pa.array([a for a, _ in ordered], pa.string()),
            "key_b": pa.array([b for _, b in ordered], pa.string()),
        }
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", required=True, choices=sorted(TOOLS))
    parser.add_argument("--images", required=True, type=Path, help="folder of image files (stem = key)")
    parser.add_argument("--out", required=True, type=Path, help="pairs parquet to write")
    parser.add_argument(
        "--threshold",
        type=float,
        help="imagededup_phash: max Hamming distance of 64 (default 10); pdq: max Hamming distance of 256 "
        "(default 31); fastdup: cc_threshold cosine similarity (default 0.96); cleanvision: not accepted",
    )
    parser.add_argument("--workers", type=int, help="imagededup_phash: num_enc_workers and num_dist_workers "
                        "(default: imagededup's own, the number of cores); the other tools ignore it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    images = list_images(args.images)
    distribution, runner = TOOLS[args.tool]
    with stdout_to_stderr():
        import_seconds = import_tool(args.tool)
        started = time.perf_counter()
        result = (runner(images, args.threshold, args.workers) if args.tool == "imagededup_phash"
                  else runner(images, args.threshold))
        seconds = time.perf_counter() - started
    write_pairs(result.pairs, args.out)
    report = {
        "tool": args.tool,
        "n_images": len(images),
        "seconds": round(seconds, 3),
        "images_per_s": round(len(images) / seconds, 2) if seconds > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "n_pairs": len(result.pairs),
        "import_seconds": round(import_seconds, 3),
        "version": importlib.metadata.version(distribution),
        **result.extra,
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    try:
        main()
    except DedupError as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        sys.exit(2)
