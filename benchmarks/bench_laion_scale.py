"""LAION-scale run from precomputed embeddings: synthetic CLIP-like vectors -> manifests, per stage.

    PYTHONPATH=. python benchmarks/bench_laion_scale.py --sizes 1e6 --memory 4GB

For each size: generate a clip-retrieval folder (img_emb/*.npy float16 +
metadata/*.parquet), run ingest -> index -> neighbours -> cluster -> rank ->
manifests, each stage in its own process (so peak memory is the stage's), then
delete everything before the next size. Prints per stage wall time, peak RSS,
peak anonymous RSS (what --memory bounds; file pages of the memory maps are
the page cache's), disk, and pair recall / precision at the cut against the
planted truth, plus the growth exponent of each stage's time between sizes.

The vectors imitate CLIP ViT-L/14 image embeddings (768-d, unit length):
* clustered background, not isotropic noise: a shared mean direction plus
  one of `--topics` topic directions plus per-image noise (random pairs
  ~0.2 cosine, same topic ~0.6);
* duplicate groups with Zipf(`--zipf`) copy counts, the largest group at
  `--largest` copies (10,000 as in LAION), `--dup-fraction` of all vectors;
  copies of a group share one pairwise cosine drawn from [0.97, 0.995]
  (re-encodes and resizes of one image in CLIP space);
* near misses: `--near-miss-fraction` of vectors come in pairs of distinct
  images at cosine [0.90, 0.955], just below the 0.96 cut.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from anon_memory import communicate_sampled

REPO = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "index", "neighbors", "cluster", "rank", "manifests"]


# ---------------------------------------------------------------- synthetic LAION-like embeddings


def zipf_group_sizes(total: int, largest: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Copy counts (>= 2) whose sum is about `total`, Zipf-distributed, one group of exactly `largest`."""
    sizes = [largest]
    remaining = total - largest
    support = np.arange(2, largest + 1)
    weights = support.astype(np.float64) ** -alpha
    weights /= weights.sum()
    while remaining >= 2:
        batch = rng.choice(support, size=max(1, remaining // 4), p=weights)
        batch = batch[np.cumsum(batch) <= remaining]
        if not len(batch):
            break
        sizes.extend(batch.tolist())
        remaining -= int(batch.sum())
    return np.array(sizes, dtype=np.int64)


class Plan:
    """Which row is what: anchor (group / near-miss pair) per row, the cosine of each anchor's members."""

    def __init__(self, n: int, args, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.n, self.dim, self.seed = n, args.dim, seed
        dups = zipf_group_sizes(int(n * args.dup_fraction), min(args.largest, n // 10), args.zipf, rng)
        misses = int(n * args.near_miss_fraction) // 2
        sizes = np.concatenate([dups, np.full(misses, 2)])
        self.is_dup_anchor = np.r_[np.ones(len(dups), bool), np.zeros(misses, bool)]
        # Pairwise cosine of an anchor's members: copies 0.97-0.995, near misses 0.90-0.955.
        self.cosine = np.where(self.is_dup_anchor, rng.uniform(0.97, 0.995, len(sizes)),
                               rng.uniform(0.90, 0.955, len(sizes)))
        anchor_rows = rng.permutation(n)[: int(sizes.sum())]
        self.anchor = np.full(n, -1, dtype=np.int64)
        self.anchor[anchor_rows] = np.repeat(np.arange(len(sizes)), sizes)
        self.member_rank = np.zeros(n, dtype=np.int64)  # 0 = the anchor's first member (the original)
        order = np.argsort(self.anchor[anchor_rows], kind="stable")
        ranks = np.arange(len(order)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        self.member_rank[anchor_rows[order]] = ranks
        self.group_sizes = dups
        self.topics = _unit(rng.standard_normal((args.topics, args.dim)))
        self.mean = _unit(rng.standard_normal((1, args.dim)))[0]
        self.anchor_base = self.background(len(sizes), rng)

    def background(self, count: int, rng: np.random.Generator) -> np.ndarray:
        topic = self.topics[rng.integers(0, len(self.topics), count)]
        noise = _unit(rng.standard_normal((count, self.dim)))
        return _unit(np.sqrt(0.2) * self.mean + np.sqrt(0.4) * topic + np.sqrt(0.4) * noise)

    def rows(self, start: int, stop: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, start])
        x = self.background(stop - start, rng)
        anchor = self.anchor[start:stop]
        has = np.flatnonzero(anchor >= 0)
        if len(has):
            a = anchor[has]
            base, cosine = self.anchor_base[a], self.cosine[a]
            perturbed = self.member_rank[start:stop][has] > 0
            # Dup groups: every member at sqrt(c) from the base, so any two are at ~c.
            # Near misses: the original is the base, its partner at exactly c from it.
            s2 = np.where(self.is_dup_anchor[a], 1.0 - cosine, np.where(perturbed, 1.0 - cosine**2, 0.0))
            noise = rng.standard_normal((len(has), self.dim)).astype(np.float32)
            noise = _unit(noise - np.sum(noise * base, axis=1, keepdims=True) * base)  # orthogonal to the base
            x[has] = _unit(np.sqrt(1 - s2)[:, None] * base + np.sqrt(s2)[:, None] * noise)
        return x.astype(np.float16)

    def group_label(self) -> np.ndarray:
        """Dup-group id per row (-1: background or near miss): the truth for pair recall/precision."""
        label = np.where(self.anchor >= 0, self.anchor, -1)
        label[(label >= 0) & ~self.is_dup_anchor[np.maximum(label, 0)]] = -1
        return label

    def truth_pairs(self) -> int:
        return int((self.group_sizes * (self.group_sizes - 1) // 2).sum())


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def write_folder(plan: Plan, root: Path, part_rows: int) -> None:
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    for part, start in enumerate(range(0, plan.n, part_rows)):
        stop = min(start + part_rows, plan.n)
        np.save(root / "img_emb" / f"img_emb_{part}.npy", plan.rows(start, stop))
        keys = [f"{part:05d}{r:04d}" for r in range(stop - start)]
        pd.DataFrame({
            "image_path": [f"laion/{part:05d}.tar/{k}.jpg" for k in keys],
            "url": [f"https://img{(start + r) % 997}.example.com/{start + r}.jpg" for r in range(stop - start)],
            "caption": [f"synthetic caption {start + r}" for r in range(stop - start)],
        }).to_parquet(root / "metadata" / f"metadata_{part}.parquet")


# ---------------------------------------------------------------- running one stage in its own process

# Each stage runs in a fresh process on the run context, as `dedup run --embeddings` chains them.
_OPEN = ("from dedup.run import Run; from dedup.settings import EngineSettings, Settings, parse_size; "
         "run = Run.open({out!r}, memory_budget_bytes=parse_size({memory!r}), engine=EngineSettings(show_progress=False)); ")
STAGE_CODE = {
    "ingest": ("from dedup.run import Run; from dedup.settings import EngineSettings, Settings; "
               "from dedup.stages.precomputed import ingest_embeddings as f; "
               "run = Run.start({out!r}, Settings.build(shard_specs=[{src!r}], descriptors=['precomputed'], "
               "memory={memory!r}, engine=EngineSettings(show_progress=False))); f(run, {src!r})"),
    "index": _OPEN + "from dedup.stages.increment import build_indexes as f; print(f(run, gpu=False))",
    "neighbors": _OPEN + "from dedup.stages.neighbors import find_neighbors as f; f(run, gpu=False)",
    "cluster": _OPEN + "from dedup.stages.cluster import cluster as f; print(f(run))",
    "rank": _OPEN + "from dedup.stages.rank import rank as f; f(run)",
    "manifests": (_OPEN + "from dedup.stages.manifests import manifests_stage as f; print(f(run)); "
                  "from dedup.stages.precomputed import write_url_remove_list as g; g(run)"),
}


def run_stage(stage: str, src: Path, out: Path, memory: str) -> dict:
    code = STAGE_CODE[stage].format(src=str(src), out=str(out), memory=memory)
    code += "\nimport resource, json, sys; print('RUSAGE', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    began, cpu_before = time.perf_counter(), _children_cpu()
    load_before = os.getloadavg()[0]
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    output, peak = communicate_sampled(proc, every=0.1)
    seconds, cpu = time.perf_counter() - began, _children_cpu() - cpu_before
    if proc.returncode:
        raise SystemExit(f"stage {stage} failed:\n{output[-4000:]}")
    maxrss = int([line for line in output.splitlines() if line.startswith("RUSAGE")][-1].split()[1]) * 1024
    notes = [line for line in output.splitlines() if not line.startswith(("RUSAGE", "resizing"))]
    return {"stage": stage, "seconds": seconds, "cpu_seconds": cpu, "peak_rss": maxrss, "peak_anon": peak,
            "load_avg_1min": [load_before, os.getloadavg()[0]], "notes": notes[-2:]}


def _children_cpu() -> float:
    """User + system CPU seconds of every finished child process (and their children) so far.

    CPU time is far less sensitive than wall time to the other jobs sharing the machine.
    """
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------- measuring


def disk_bytes(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def pair_quality(out: Path, plan: Plan, threshold: float) -> dict:
    """Pair recall / precision of the stored edges at the cut, streamed file by file."""
    from dedup.ids import SAMPLE_ID_SHIFT

    label = plan.group_label()
    part_rows = int(json.loads((out / "_bench_part_rows").read_text()))
    found = correct = 0
    for path in sorted((out / "neighbors" / "precomputed").glob("part_*.parquet")):
        table = pq.read_table(path, columns=["id_a", "id_b", "similarity"])
        keep = table["similarity"].to_numpy() >= np.float32(threshold)
        rows = []
        for column in ("id_a", "id_b"):
            ids = table[column].to_numpy()[keep]
            rows.append((ids >> SAMPLE_ID_SHIFT) * part_rows + (ids & ((1 << SAMPLE_ID_SHIFT) - 1)))
        same = (label[rows[0]] == label[rows[1]]) & (label[rows[0]] >= 0)
        found += int(keep.sum())
        correct += int(same.sum())
    truth = plan.truth_pairs()
    return {"edges_at_cut": found, "truth_pairs": truth, "recall": correct / truth if truth else 1.0,
            "precision": correct / found if found else 1.0}


def probe_recall(out: Path, plan: Plan) -> dict:
    """Share of planted pairs (q < r) whose r lives in one of q's first k probed cells, k = 1..nprobe.

    Read from the index stage's stored probes (column 0 = home cell): the
    recall the join would have with nprobe = k, pair-weighted and averaged
    over groups (the pair count is dominated by the few largest groups).
    """
    probes_path = out / "index" / "precomputed.probes.npy"
    if not probes_path.exists():
        return {}
    probes = np.load(probes_path, mmap_mode="r")
    label = plan.group_label()
    order = np.argsort(label, kind="stable")
    bounds = np.searchsorted(label[order], np.arange(label.max() + 2))
    ks = range(1, probes.shape[1] + 1)
    hits, group_recall, total, groups = np.zeros(len(ks)), np.zeros(len(ks)), 0, 0
    for g in range(label.max() + 1):
        rows = np.sort(order[bounds[g] : bounds[g + 1]])
        if len(rows) < 2:
            continue
        cells = np.asarray(probes[rows])
        home, pairs, found = cells[:, 0], len(rows) * (len(rows) - 1) // 2, np.zeros(len(ks))
        for c0 in range(0, len(rows), 256):
            upper = np.arange(c0, min(c0 + 256, len(rows)))[:, None] < np.arange(len(rows))[None, :]
            for i, k in enumerate(ks):
                found[i] += ((cells[c0 : c0 + 256, :k, None] == home[None, None, :]).any(1) & upper).sum()
        hits, group_recall, total, groups = hits + found, group_recall + found / pairs, total + pairs, groups + 1
    return {f"k{k}": {"pair_recall": float(hits[i] / total), "group_recall": float(group_recall[i] / groups)}
            for i, k in enumerate(ks)}


def cell_stats(out: Path) -> dict:
    """Lists, mean cell and the row-weighted mean cell (sum of squares / n: what the join's cost follows)."""
    bounds_path = out / "index" / "precomputed.cell_bounds.npy"
    spec = json.loads((out / "index" / "precomputed.json").read_text())
    if not bounds_path.exists():
        return {"factory": spec["factory"]}
    sizes = np.diff(np.load(bounds_path)).astype(np.float64)
    return {"factory": spec["factory"], "nlist": int(len(sizes)), "nprobe": spec["nprobe"],
            "mean_cell": float(sizes.mean()), "row_weighted_cell": float((sizes**2).sum() / sizes.sum()),
            "largest_cell": int(sizes.max())}


def run_size(n: int, args) -> dict:
    base = Path(args.workdir) / f"n{n}"
    shutil.rmtree(base, ignore_errors=True)
    src, out = base / "emb", base / "run"
    began = time.perf_counter()
    plan = Plan(n, args, seed=args.seed)
    write_folder(plan, src, args.part_rows)
    generated = time.perf_counter() - began
    out.mkdir(parents=True)
    (out / "_bench_part_rows").write_text(str(args.part_rows))
    stages = []
    for stage in STAGES:
        stages.append(run_stage(stage, src, out, args.memory))
        print(f"  n={n:,} {stage:9s} {stages[-1]['seconds']:8.1f} s  cpu {stages[-1]['cpu_seconds']:8.1f} s"
              f"  load {stages[-1]['load_avg_1min'][1]:.1f}  peak RSS {stages[-1]['peak_rss'] / 2**30:5.2f} GiB"
              f"  anon {stages[-1]['peak_anon'] / 2**30:5.2f} GiB  {' | '.join(stages[-1]['notes'])[:160]}", flush=True)
    disk = {"vectors_float16": disk_bytes(src / "img_emb"), "metadata_in": disk_bytes(src / "metadata"),
            "index": disk_bytes(out / "index"), "edges": disk_bytes(out / "neighbors"),
            "run_total": disk_bytes(out)}
    quality = pair_quality(out, plan, args.threshold)
    quality["recall_by_nprobe"] = probe_recall(out, plan)
    cells = cell_stats(out)
    result = {"n": n, "generate_s": generated, "stages": stages, "disk": disk, "quality": quality,
              "groups": len(plan.group_sizes), "largest": int(plan.group_sizes.max()),
              "cells": cells, "load_avg": os.getloadavg()}
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return result


def print_summary(results: list[dict]) -> None:
    for r in results:
        total = sum(s["seconds"] for s in r["stages"])
        print(f"\nn = {r['n']:,}: {r['groups']:,} dup groups (largest {r['largest']:,}), "
              f"embeddings -> manifests {total:.0f} s (generation {r['generate_s']:.0f} s), load avg {r['load_avg']}")
        print(f"  {'stage':10s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS GiB':>13s} {'peak anon GiB':>14s}")
        for s in r["stages"]:
            print(f"  {s['stage']:10s} {s['seconds']:8.1f} {s['cpu_seconds']:8.1f} {s['peak_rss'] / 2**30:13.2f}"
                  f" {s['peak_anon'] / 2**30:14.2f}")
        d = r["disk"]
        print("  disk GiB: " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in d.items())
              + f"; index+edges = {(d['index'] + d['edges']) / d['vectors_float16']:.2f}x the float16 vectors")
        if r.get("cells", {}).get("nlist"):
            c = r["cells"]
            print(f"  cells: {c['factory']}, nprobe {c['nprobe']}, mean cell {c['mean_cell']:.0f} rows, row-weighted "
                  f"{c['row_weighted_cell']:.0f}, largest {c['largest_cell']:,}")
        q = r["quality"]
        print(f"  pairs at the cut: {q['edges_at_cut']:,} found, {q['truth_pairs']:,} planted; "
              f"recall {q['recall']:.4f}, precision {q['precision']:.4f}")
        if q.get("recall_by_nprobe"):
            print("  planted pairs in the first k probed cells (pair / group-averaged): " + ", ".join(
                f"{k} {v['pair_recall']:.4f} / {v['group_recall']:.4f}" for k, v in q["recall_by_nprobe"].items()))
    for a, b in itertools.pairwise(results):
        ratio = math.log(b["n"] / a["n"])
        for measure in ("seconds", "cpu_seconds"):
            growth = {s["stage"]: math.log(max(t[measure], 1e-3) / max(s[measure], 1e-3)) / ratio
                      for s, t in zip(a["stages"], b["stages"], strict=True)}
            total = math.log(sum(t[measure] for t in b["stages"]) / sum(s[measure] for s in a["stages"])) / ratio
            print(f"\ngrowth exponent ({measure}) {a['n']:,} -> {b['n']:,}: total {total:.2f}; "
                  + ", ".join(f"{k} {v:.2f}" for k, v in growth.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e6", help="comma-separated vector counts, e.g. 1e6,3e6,1e7")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--memory", default="4GB")
    parser.add_argument("--part-rows", type=int, default=100_000, help="rows per img_emb part")
    parser.add_argument("--threshold", type=float, default=0.96)
    parser.add_argument("--largest", type=int, default=10_000)
    parser.add_argument("--zipf", type=float, default=2.0)
    parser.add_argument("--dup-fraction", type=float, default=0.1)
    parser.add_argument("--near-miss-fraction", type=float, default=0.02)
    parser.add_argument("--topics", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/bench_laion_scale")
    parser.add_argument("--keep", action="store_true", help="keep the generated folder and run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = []
    for size in args.sizes.split(","):
        n = int(float(size))
        print(f"n = {n:,}: generating, then running every stage", flush=True)
        results.append(run_size(n, args))
    print_summary(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
