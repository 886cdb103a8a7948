"""Choose the perceptual cut and the chaining-guard offset on a tuning set, then check them on a held-out set.

    .venv/bin/python benchmarks/calibrate.py              # n=3000 per set, ~3 min on 2 cores
    .venv/bin/python benchmarks/calibrate.py --n 1000 --min-hard-recall 0.5

1. Build (or reuse) the TUNING set (seed 1) and the HELD-OUT set (seed 2) with make_benchmark.py.
2. Run dedup once per set (perceptual descriptor) with neighbours searched down to `--search-threshold`
   (0.45), so every cut at or above it can be applied from the stored edges without searching again.
3. On the tuning set, re-cluster (`dedup.clustering.cluster_run`) and score (`dedup.evaluate.evaluate`)
   every (cut, guard offset) of the grid; the guard is `cut - offset`, as `dedup.config.default_guard`.
4. Choose: zero hard-negative merges and hard recall >= `--min-hard-recall`, then the highest benign pair
   F1 (to 3 decimals: smaller differences are noise at this size), then the highest hard recall, then the
   higher cut (more margin against false merges), then the smaller offset (stricter guard).
5. Score the held-out set at the chosen values and at the shipped defaults.

Benign pair F1 counts only samples of the `original` and `benign` families (see quality.benign_truth).
Precision is shown raw and with overlapping crop siblings set aside (quality.crop_sibling_pairs): the
generator's extra singleton sources are crops of a few photos, and two crops with IoU > 0.5 show much of
the same picture, which the truth calls different images.

Prints markdown tables; writes `benchmarks/results/calibration.json` (the whole grid included).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from quality import (
    DESCRIPTOR,
    HELDOUT_SEED,
    RESULTS_DIR,
    WORK_DIR,
    BenchmarkSet,
    embed_options,
    ensure_benchmark_set,
    fresh_run_dir,
    json_safe,
    recluster,
    score_clusters,
)
from rich.console import Console

from dedup import config as cfg
from dedup import pipeline
from dedup.errors import DedupError
from dedup.evaluate import load_truth
from dedup.store import RunDir

TUNING_SEED = 1
DEFAULT_N = 3000
SEARCH_THRESHOLD = 0.45
CUTS = tuple(round(float(c), 2) for c in np.arange(0.45, 0.8001, 0.01))
GUARD_OFFSETS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.15, 0.20)
# "Reasonable" hard recall: flips, 90-degree turns and grayscale must stay found; 50-75 % crops and meme
# bands are out of reach of a global descriptor whatever the cut (see BENCHMARKS.md).
DEFAULT_MIN_HARD_RECALL = 0.6
F1_DECIMALS = 3
# Columns kept per grid point (the per-group top-10 lists would only bloat the JSON).
GRID_COLUMNS = (
    "benign_pair_precision", "benign_pair_precision_siblings_aside", "benign_pair_recall", "benign_pair_f1",
    "benign_pair_f1_siblings_aside", "hard_recall", "pair_precision", "pair_precision_siblings_aside",
    "pair_recall", "pair_f1", "bcubed_f1", "hard_negative_merges", "top10_mean_relative_error",
    "top10_max_relative_error", "copy_count_spearman", "sibling_pairs",
)


def search_run(bench: BenchmarkSet, run_path: Path, search_threshold: float, workers: int, log: Console) -> RunDir:
    """Embed, index and search neighbours down to `search_threshold`; clustering is left to the sweep."""
    run = fresh_run_dir(run_path)
    pipeline.embed(bench.shards, run.root, embed_options(workers), log)
    pipeline.build_indexes(run.root, "2GB")
    pipeline.find_neighbors(run.root, [f"{DESCRIPTOR}={search_threshold}"], show_progress=False)
    return run


def score_point(run: RunDir, truth: pd.DataFrame, cut: float, offset: float) -> dict[str, Any]:
    metrics = score_clusters(recluster(run, cut, offset), truth)
    return {"cut": cut, "guard_offset": offset, **{name: metrics[name] for name in GRID_COLUMNS}}


def sweep(run: RunDir, truth: pd.DataFrame, cuts: tuple[float, ...], offsets: tuple[float, ...]) -> pd.DataFrame:
    return pd.DataFrame([score_point(run, truth, cut, offset) for cut in cuts for offset in offsets])


def choose(grid: pd.DataFrame, min_hard_recall: float) -> pd.Series:
    """The selection rule of the module docstring; raises when no grid point is allowed."""
    allowed = grid[(grid["hard_negative_merges"] == 0) & (grid["hard_recall"] >= min_hard_recall)]
    if allowed.empty:
        raise DedupError(
            f"no (cut, guard offset) has zero hard-negative merges and hard recall >= {min_hard_recall}",
            hint="lower --min-hard-recall or widen the grid",
        )
    ranked = allowed.assign(
        f1_key=allowed["benign_pair_f1"].round(F1_DECIMALS),
        hard_key=allowed["hard_recall"].round(F1_DECIMALS),
        offset_key=-allowed["guard_offset"],
    ).sort_values(["f1_key", "hard_key", "cut", "offset_key"], ascending=False)
    return ranked.iloc[0][grid.columns]


def point_row(label: str, point: pd.Series | dict[str, Any]) -> str:
    p = point
    return (f"| {label} | {p['cut']:.2f} | {p['guard_offset']:.2f} | {p['benign_pair_precision']:.3f} / "
            f"{p['benign_pair_precision_siblings_aside']:.3f} | {p['benign_pair_recall']:.3f} | "
            f"{p['benign_pair_f1']:.3f} | {p['hard_recall']:.3f} | {p['pair_f1']:.3f} | {p['bcubed_f1']:.3f} | "
            f"{int(p['hard_negative_merges'])} | {p['top10_max_relative_error']:.3f} |")


TABLE_HEADER = ("| set | cut | guard offset | benign pair P / P siblings aside | benign pair R | benign pair F1 "
                "| hard recall | all-pair F1 | B-cubed F1 | hard-neg. merges | top-10 max rel. error |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|")


def slice_table(grid: pd.DataFrame, fixed: str, value: float, label: str) -> str:
    part = grid[np.isclose(grid[fixed], value)]
    return "\n".join([TABLE_HEADER] + [point_row(label, row) for _, row in part.iterrows()])


def build_markdown(result: dict[str, Any], grid: pd.DataFrame) -> str:
    chosen, n = result["chosen"], result["n"]
    rows = [TABLE_HEADER]
    for name in ("tuning", "heldout"):
        seed = result[f"{name}_seed"]
        rows.append(point_row(f"{name} (seed {seed}) chosen", result[f"{name}_at_chosen"]))
        rows.append(point_row(f"{name} (seed {seed}) shipped default", result[f"{name}_at_default"]))
    summary = (f"Calibration, n={n} per set, {result['date']}. Chosen on the tuning set: cut "
               f"**{chosen['threshold']:.2f}**, guard offset **{chosen['guard_offset']:.2f}** (guard = cut - offset), "
               f"rule: zero hard-negative merges, hard recall >= {result['min_hard_recall']}, then max benign pair F1.")
    return "\n\n".join([
        summary,
        "\n".join(rows),
        f"Tuning set, cut swept at guard offset {chosen['guard_offset']:.2f}:",
        slice_table(grid, "guard_offset", chosen["guard_offset"], "tuning"),
        f"Tuning set, guard offset swept at cut {chosen['threshold']:.2f}:",
        slice_table(grid, "cut", chosen["threshold"], "tuning"),
    ]) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"samples per set (default {DEFAULT_N})")
    parser.add_argument("--work", type=Path, default=WORK_DIR, help=f"sets and runs (default {WORK_DIR})")
    parser.add_argument("--search-threshold", type=float, default=SEARCH_THRESHOLD,
                        help=f"neighbour search cut, the lowest cut swept (default {SEARCH_THRESHOLD})")
    parser.add_argument("--min-hard-recall", type=float, default=DEFAULT_MIN_HARD_RECALL,
                        help=f"selection floor on hard-copy recall (default {DEFAULT_MIN_HARD_RECALL})")
    parser.add_argument("--workers", type=int, default=2, help="decode workers (default 2)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "calibration.json", help="JSON results file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = Console(stderr=True)
    cuts = tuple(c for c in CUTS if c >= args.search_threshold - 1e-9)
    default_cut, default_offset = cfg.default_threshold(DESCRIPTOR), cfg.GUARD_OFFSET
    result: dict[str, Any] = {"n": args.n, "date": date.today().isoformat(), "tuning_seed": TUNING_SEED,
                              "heldout_seed": HELDOUT_SEED, "search_threshold": args.search_threshold,
                              "min_hard_recall": args.min_hard_recall,
                              "shipped_default": {"threshold": default_cut, "guard_offset": default_offset}}
    try:
        runs = {}
        for name, seed in (("tuning", TUNING_SEED), ("heldout", HELDOUT_SEED)):
            bench = ensure_benchmark_set(args.work, name, args.n, seed)
            run = search_run(bench, args.work / f"calibrate_{name}_n{args.n}_run", args.search_threshold,
                             args.workers, log)
            runs[name] = (run, load_truth(bench.truth_path))
        log.print(f"sweeping {len(cuts)} cuts x {len(GUARD_OFFSETS)} guard offsets on the tuning set ...")
        grid = sweep(*runs["tuning"], cuts, GUARD_OFFSETS)
        chosen = choose(grid, args.min_hard_recall)
    except DedupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result["chosen"] = {"threshold": float(chosen["cut"]), "guard_offset": float(chosen["guard_offset"])}
    for name, (run, truth) in runs.items():
        result[f"{name}_at_chosen"] = score_point(run, truth, float(chosen["cut"]), float(chosen["guard_offset"]))
        result[f"{name}_at_default"] = score_point(run, truth, default_cut, default_offset)
    result["grid_tuning"] = grid.to_dict("records")
    markdown = build_markdown(result, grid)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(json_safe(result), indent=2) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown, encoding="utf-8")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
